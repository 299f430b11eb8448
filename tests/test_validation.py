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
