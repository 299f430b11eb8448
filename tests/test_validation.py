"""Bad inputs raise ValueError/TypeError that name the argument and what was expected."""

import pytest
import torch

import wildactor_kernels as wk


def _qkv(n=10, d=16, b=1, h=2, dtype=torch.float32):
    return [torch.randn(b, n, h, d, dtype=dtype) for _ in range(3)]


def test_backend_name():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        wk.asym_attention(q, k, v, 5, backend="cuda")


@pytest.mark.parametrize("case,exc,match", [
    ("rank", ValueError, "q must have 4 dimensions"),
    ("shape", ValueError, "must share one shape"),
    ("dtype", TypeError, "must share one dtype"),
    ("int", TypeError, "floating-point"),
    ("odd_d", ValueError, "head_dim must be even and >= 8"),
    ("small_d", ValueError, "head_dim must be even and >= 8"),
    ("nv_high", ValueError, r"num_video must lie in \[0, N\]"),
    ("nv_neg", ValueError, r"num_video must lie in \[0, N\]"),
    ("nv_float", TypeError, "num_video must be an int"),
    ("cos_shape", ValueError, r"must have shape \[N, D//2\]"),
    ("cos_only", ValueError, "give both cos and sin"),
    ("not_tensor", TypeError, "q must be a torch.Tensor"),
])
def test_asym_attention_errors(case, exc, match):
    q, k, v = _qkv()
    cos = sin = None
    nv = 5
    if case == "rank":
        q = q[0]
    elif case == "shape":
        k = torch.randn(1, 11, 2, 16)
    elif case == "dtype":
        v = v.double()
    elif case == "int":
        q, k, v = (torch.zeros(1, 10, 2, 16, dtype=torch.int32) for _ in range(3))
    elif case == "odd_d":
        q, k, v = _qkv(d=15)
    elif case == "small_d":
        q, k, v = _qkv(d=6)
    elif case == "nv_high":
        nv = 11
    elif case == "nv_neg":
        nv = -1
    elif case == "nv_float":
        nv = 5.0
    elif case == "cos_shape":
        cos, sin = torch.zeros(10, 7), torch.zeros(10, 7)
    elif case == "cos_only":
        cos = torch.zeros(10, 8)
    elif case == "not_tensor":
        q = q.numpy()
    with pytest.raises(exc, match=match):
        wk.asym_attention(q, k, v, nv, cos, sin, backend="reference")


def test_mixed_devices():
    q, k, v = _qkv()
    cos, sin = torch.zeros(10, 8, device="meta"), torch.zeros(10, 8, device="meta")
    with pytest.raises(ValueError, match="one device"):
        wk.asym_attention(q, k, v, 5, cos, sin, backend="reference")


def test_cached_errors():
    q, k, v = _qkv(n=6)
    with pytest.raises(ValueError, match="ref_k and ref_v must share one shape"):
        wk.cached_asym_attention(q, k, v, torch.randn(1, 3, 2, 16), torch.randn(1, 4, 2, 16))
    with pytest.raises(ValueError, match=r"ref_k must have shape \[B, Nr, H, D\]"):
        wk.cached_asym_attention(q, k, v, torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16))
    with pytest.raises(ValueError, match=r"\[Nv, D//2\]|\[N, D//2\]"):
        wk.cached_asym_attention(q, k, v, torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16),
                                 torch.zeros(9, 8), torch.zeros(9, 8))


def test_rope_errors():
    x = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="cos/sin must have shape"):
        wk.apply_rope(x, torch.zeros(5, 8), torch.zeros(5, 8))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        wk.apply_rope(x[0], torch.zeros(4, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="pos must be an integer tensor of shape"):
        wk.rope_cos_sin(torch.zeros(4, 2, dtype=torch.int64), 16)
    with pytest.raises(TypeError, match="pos must be an integer tensor"):
        wk.rope_cos_sin(torch.zeros(4, 3), 16)
    with pytest.raises(ValueError, match="head_dim must be even"):
        wk.rope_cos_sin(torch.zeros(4, 3, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match=r"q_weight must have shape \[H\*D\]"):
        wk.qk_norm_rope(x, x, torch.ones(16), None, torch.zeros(4, 8), torch.zeros(4, 8))


def test_layout_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        wk.TokenLayout((1, 2, 2), [("hand", 2, 2)])
    with pytest.raises(ValueError, match="video must be"):
        wk.TokenLayout((1, 2))
    with pytest.raises(ValueError, match="grid must be positive"):
        wk.TokenLayout((1, 2, 2), [("face", 0, 2)])
    with pytest.raises(TypeError, match="layout must be a TokenLayout"):
        wk.irope_positions((1, 2, 2))


@pytest.mark.parametrize("case,exc,match", [
    ("x_rank", ValueError, "x must have 3 dimensions"),
    ("w_shape", ValueError, r"weight must have shape \[Dout, Din\]"),
    ("a_shape", ValueError, r"lora_a must have shape \[r, Din\]"),
    ("b_shape", ValueError, r"lora_b must have shape \[Dout, r\]"),
    ("bias", ValueError, r"bias must have shape \[Dout\]"),
    ("nv", ValueError, r"num_video must lie in \[0, N\]"),
    ("scale", TypeError, "scale must be a Python float"),
])
def test_lora_errors(case, exc, match):
    x, w, bias = torch.randn(2, 9, 12), torch.randn(10, 12), torch.randn(10)
    a, b = torch.randn(4, 12), torch.randn(10, 4)
    scale, nv = 1.0, 5
    if case == "x_rank":
        x = x[0]
    elif case == "w_shape":
        w = torch.randn(10, 13)
    elif case == "a_shape":
        a = torch.randn(4, 13)
    elif case == "b_shape":
        b = torch.randn(10, 5)
    elif case == "bias":
        bias = torch.randn(11)
    elif case == "nv":
        nv = 10
    elif case == "scale":
        scale = torch.tensor(1.0)
    with pytest.raises(exc, match=match):
        wk.ref_lora_linear(x, w, bias, a, b, scale, nv, backend="reference")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        wk.asym_attention(q, k, v, 5, backend="triton")


def test_tf32_setting_reads_new_api_without_error():
    """The kernels ask whether TF32 is allowed; with the torch >= 2.9 API set, the legacy flag
    raises on read, so the library must read the new setting."""
    from wildactor_kernels._utils import tf32_allowed

    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 flag")
    old = m.fp32_precision
    try:
        m.fp32_precision = "tf32"
        assert tf32_allowed() is True
        m.fp32_precision = "ieee"
        assert tf32_allowed() is False
    finally:
        m.fp32_precision = old


# ----------------------------------------------------------------------------- numbers (issue 11)
_POS = torch.zeros(4, 3, dtype=torch.int64)
_X = torch.randn(1, 4, 2, 16)
_TAB = torch.zeros(4, 8)
_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize("call,exc,match", [
    # sizes are ints: never truncated, bool is not an int
    (lambda: wk.TokenLayout((2.7, 3, 4)), TypeError, r"video\[0\] must be an int, got float 2.7"),
    (lambda: wk.TokenLayout((2, 3.0, 4)), TypeError, r"video\[1\] must be an int"),
    (lambda: wk.TokenLayout((True, 3, 4)), TypeError, r"video\[0\] must be an int, got bool"),
    (lambda: wk.TokenLayout(video=None), TypeError, "video must be a sequence"),
    (lambda: wk.TokenLayout("abc"), TypeError, "video must be a sequence"),
    (lambda: wk.TokenLayout((1, 2, -1)), ValueError, "video must be .* non-negative"),
    (lambda: wk.TokenLayout((1, 2, 2), refs=3), TypeError, "refs must be an iterable"),
    (lambda: wk.TokenLayout((1, 2, 2), [5]), TypeError, r"refs\[0\] must be a \(kind, h, w\)"),
    (lambda: wk.TokenLayout((1, 2, 2), [("face", 1.5, 2)]), TypeError, r"refs\[0\] height must be an int"),
    (lambda: wk.TokenLayout((1, 2, 2), [("face", "a", 2)]), TypeError, r"refs\[0\] height must be an int"),
    (lambda: wk.TokenLayout((1, 2, 2), [("body", 2, False)]), TypeError, r"refs\[0\] width must be an int"),
    (lambda: wk.TokenLayout((1, 2, 2), [(1, 2, 2)]), TypeError, r"refs\[0\] kind must be a str"),
    (lambda: wk.irope_positions(wk.TokenLayout((1, 2, 2)), face_offset=1.5), TypeError,
     "face_offset must be an int"),
    (lambda: wk.irope_positions(wk.TokenLayout((1, 2, 2)), body_offset=True), TypeError,
     "body_offset must be an int"),
    (lambda: wk.irope_positions(wk.TokenLayout((1, 2, 2)), spatial_shift=1), TypeError,
     "spatial_shift must be a bool"),
    # theta: finite and positive
    (lambda: wk.rope_cos_sin(_POS, 16, theta=0), ValueError, "theta must be positive"),
    (lambda: wk.rope_cos_sin(_POS, 16, theta=-10), ValueError, "theta must be positive"),
    (lambda: wk.rope_cos_sin(_POS, 16, theta=_NAN), ValueError, "theta must be finite"),
    (lambda: wk.rope_cos_sin(_POS, 16, theta=_INF), ValueError, "theta must be finite"),
    (lambda: wk.rope_cos_sin(_POS, 16, theta="1e4"), TypeError, "theta must be a Python float"),
    (lambda: wk.rope_cos_sin(_POS, 16, theta=torch.tensor(1e4)), TypeError, "theta must be a Python float"),
    (lambda: wk.rope_cos_sin(_POS, 16.0), TypeError, "head_dim must be an int"),
    (lambda: wk.rope_cos_sin(_POS > 0, 16), TypeError, "pos must be an integer tensor, got dtype torch.bool"),
    (lambda: wk.axis_dims(True), TypeError, "head_dim must be an int"),
    # scale / eps
    (lambda: wk.asym_attention(_X, _X, _X, 2, scale=_NAN), ValueError, "scale must be finite"),
    (lambda: wk.asym_attention(_X, _X, _X, 2, scale=-_INF), ValueError, "scale must be finite"),
    (lambda: wk.asym_attention(_X, _X, _X, 2, scale=[0.5]), TypeError, "scale must be a Python float"),
    (lambda: wk.asym_attention(_X, _X, _X, 2, scale=True), TypeError, "scale must be a Python float"),
    (lambda: wk.cached_asym_attention(_X, _X, _X, _X, _X, scale=_INF), ValueError, "scale must be finite"),
    (lambda: wk.cached_asym_attention(_X, _X, _X, _X, _X, scale="1"), TypeError,
     "scale must be a Python float"),
    (lambda: wk.qk_norm_rope(_X, _X, None, None, _TAB, _TAB, eps=None), TypeError,
     "eps must be a Python float"),
    (lambda: wk.qk_norm_rope(_X, _X, None, None, _TAB, _TAB, eps=_NAN), ValueError, "eps must be finite"),
    (lambda: wk.qk_norm_rope(_X, _X, None, None, _TAB, _TAB, eps=-1e-6), ValueError, "eps must be >= 0"),
    (lambda: wk.per_token_quant_fp8(torch.randn(3, 8), pad_to=True), TypeError, "pad_to must be an int"),
    (lambda: wk.per_token_quant_fp8(torch.randn(3, 8), pad_to=0), ValueError, "pad_to must be an int >= 1"),
    (lambda: wk.per_token_quant_fp8(torch.randn(3, 8), pad_to=16.0), TypeError, "pad_to must be an int"),
])
def test_numbers_are_checked_not_truncated(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("scale,exc,match", [
    (float("nan"), ValueError, "scale must be finite"),
    (float("inf"), ValueError, "scale must be finite"),
    ([0.5], TypeError, "scale must be a Python float"),
    (True, TypeError, "scale must be a Python float"),
    (None, TypeError, "scale must be a Python float"),
])
def test_lora_scale_checked(scale, exc, match):
    x, w, a, b = torch.randn(2, 9, 12), torch.randn(10, 12), torch.randn(4, 12), torch.randn(10, 4)
    for backend in ("reference", "triton"):
        with pytest.raises(exc, match=match):
            wk.ref_lora_linear(x, w, None, a, b, scale, 5, backend=backend)


def test_valid_numbers_still_accepted():
    """NumPy integers/floats and ints where floats are expected keep working."""
    np = pytest.importorskip("numpy")
    lay = wk.TokenLayout(np.array([1, 2, 3]), [("face", np.int64(2), 2)])
    assert lay.video == (1, 2, 3) and lay.refs == (("face", 2, 2),)
    assert all(type(v) is int for v in lay.video)
    pos = wk.irope_positions(lay, face_offset=np.int32(1), body_offset=2)
    cos, _ = wk.rope_cos_sin(pos, np.int64(16), theta=10000)
    c64, _ = wk.rope_cos_sin(pos, 16, theta=np.float64(10000.0))
    torch.testing.assert_close(cos, c64, rtol=0, atol=0)
    q = torch.randn(1, 4, 2, 16)
    torch.testing.assert_close(wk.asym_attention(q, q, q, 2, scale=1, backend="reference"),
                               wk.asym_attention(q, q, q, 2, scale=1.0, backend="reference"))
    wk.qk_norm_rope(q, q, None, None, _TAB, _TAB, eps=0, backend="reference")


def test_fp8_linear_argument_errors():
    from wildactor_kernels.quant.reference import quantize_weight_fp8

    x = torch.randn(3, 16)
    w_q, w_s = quantize_weight_fp8(torch.randn(8, 16))
    for kwargs, exc, match in [
        ({"x": x.numpy()}, TypeError, "x must be a torch.Tensor"),
        ({"x": x.long()}, TypeError, "x must be a floating-point tensor"),
        ({"weight_scale": w_s.numpy()}, TypeError, "weight_scale must be a torch.Tensor"),
        ({"bias": torch.randn(7)}, ValueError, r"bias must have shape \[N\] = \[8\]"),
        ({"bias": torch.zeros(8, dtype=torch.int32)}, TypeError, "bias must be a floating-point"),
        ({"bias": [0.0] * 8}, TypeError, "bias must be a torch.Tensor"),
        ({"use_fast_accum": 1}, TypeError, "use_fast_accum must be a bool"),
        ({"bias": torch.zeros(8, device="meta")}, ValueError, "one device"),
    ]:
        args = {"x": x, "weight_fp8": w_q, "weight_scale": w_s, "bias": None, "use_fast_accum": True}
        args.update(kwargs)
        with pytest.raises(exc, match=match):
            wk.fp8_linear(args["x"], args["weight_fp8"], args["weight_scale"], args["bias"],
                          gemm="emulate", use_fast_accum=args["use_fast_accum"])


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"rank": 1.5}, TypeError, "rank must be an int, got float 1.5"),
    ({"rank": True}, TypeError, "rank must be an int, got bool"),
    ({"rank": -1}, ValueError, "rank must be an int >= 0"),
    ({"in_features": 8.0}, TypeError, "in_features must be an int"),
    ({"out_features": "6"}, TypeError, "out_features must be an int"),
    ({"alpha": float("nan")}, ValueError, "alpha must be finite"),
    ({"alpha": 0.0}, ValueError, "alpha must be positive"),
    ({"alpha": "16"}, TypeError, "alpha must be a Python float"),
    ({"bias": "yes"}, TypeError, "bias must be a bool"),
])
def test_ref_lora_module_constructor_numbers(kwargs, exc, match):
    args = {"in_features": 8, "out_features": 6, "rank": 2} | kwargs
    with pytest.raises(exc, match=match):
        wk.RefLoRALinear(**args)
