"""Rules every Triton launcher follows, and that both backends share (issue 11, items 1, 2, 4).

- Strides: each tensor argument's strides reach the kernel or are normalised in the launcher
  (regression: a strided or stride-0 LoRA bias was read as contiguous). The Hopper and 8-bit
  attention launchers too: a strided head dim (TMA reads unit-stride rows) and a
  :class:`QuantizedKV` of views are normalised.
- Devices: every launcher checks that its tensors share one device and launches on it
  (``torch.cuda.device``), not on the current CUDA device. Without a GPU this is checked by
  recording the guard's calls; with two GPUs, on ``cuda:1``.
- Both backends: one dtype rule with a TypeError naming the argument, and zero-filled
  gradients of the right shape in the empty-output edge cases.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE

import wildactor_kernels as wk
from wildactor_kernels import _utils
from wildactor_kernels.attention import fp8_kernels as fp8_k
from wildactor_kernels.attention import hopper as hopper_k
from wildactor_kernels.attention import kernels as attn_k
from wildactor_kernels.attention.fp8_reference import QuantizedKV, key_mean, quantize_kv
from wildactor_kernels.lora import kernels as lora_k
from wildactor_kernels.lora.kernels import ref_folded_linear_triton
from wildactor_kernels.quant import kernels as quant_k
from wildactor_kernels.rope import kernels as rope_k

pytestmark = pytest.mark.usefixtures("nan_empty")

BACKENDS = ("triton", "reference")


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(True)


# =========================================================================== strides (item 1)
def _bias(kind: str, n: int) -> torch.Tensor:
    if kind == "strided":
        return torch.randn(2 * n, device=DEVICE)[::2]
    if kind == "stride0":
        return torch.randn(1, device=DEVICE).expand(n)
    return torch.randn(n, device=DEVICE)


@pytest.mark.parametrize("kind", ["contiguous", "strided", "stride0"])
def test_lora_bias_strides(kind):
    x, w, a, lb = _leaf(2, 48, 72), _leaf(40, 72), _leaf(8, 72), _leaf(40, 8)
    b = _bias(kind, 40)
    assert kind != "stride0" or b.stride() == (0,)
    y = wk.ref_lora_linear(x, w, b, a, lb, 0.5, 37, backend="triton")
    y_ref = wk.ref_lora_linear(x, w, b, a, lb, 0.5, 37, backend="reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    # the folded GEMM reads the bias through the same kernel
    w_ref = w.detach() + 0.5 * lb.detach() @ a.detach()
    y_f = ref_folded_linear_triton(x, w, w_ref, b, 37)
    want = torch.cat([F.linear(x[:, :37], w, b), F.linear(x[:, 37:], w_ref, b)], 1)
    torch.testing.assert_close(y_f, want, rtol=1e-4, atol=1e-4)


def test_launchers_take_strided_views():
    """A strided view of every tensor argument gives the contiguous result (attention, rope,
    qk-norm, LoRA, FP8 quantization)."""
    def nc(t):  # same values, last dim strided, other dims permuted in memory
        return t.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_(t.requires_grad)

    q, k, v = (torch.randn(2, 19, 2, 16, device=DEVICE) for _ in range(3))
    cos, sin = wk.rope_cos_sin(torch.randint(0, 9, (19, 3), device=DEVICE), 16)
    o = wk.asym_attention(q, k, v, 13, cos, sin, backend="triton", rope_mode="fused")
    torch.testing.assert_close(wk.asym_attention(nc(q), nc(k), nc(v), 13, nc(cos), nc(sin),
                                                 backend="triton", rope_mode="fused"), o)
    torch.testing.assert_close(wk.apply_rope(nc(q), nc(cos), nc(sin), backend="triton"),
                               wk.apply_rope(q, cos, sin, backend="triton"))
    wq, wk_ = torch.randn(32, device=DEVICE), torch.randn(64, device=DEVICE)[::2]
    for got, want in zip(wk.qk_norm_rope(nc(q), nc(k), wq, wk_, nc(cos), nc(sin), backend="triton"),
                         wk.qk_norm_rope(q, k, wq, wk_.contiguous(), cos, sin, backend="reference")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(6, 40, device=DEVICE)
    for got, want in zip(wk.per_token_quant_fp8(nc(x), backend="triton"),
                         wk.per_token_quant_fp8(x, backend="reference")):
        assert torch.equal(got.float(), want.float())


def _permuted(t: torch.Tensor) -> torch.Tensor:
    """Same values, batch and head swapped in memory (unit last stride kept)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _nc(t: torch.Tensor) -> torch.Tensor:
    """Same values, last dim strided, other dims permuted in memory."""
    return t.transpose(0, -1).contiguous().transpose(0, -1)


def test_hopper_launcher_takes_strided_views():
    """The Hopper launcher passes batch/token/head strides to its descriptors and copies a
    strided head dim to unit stride (TMA's rule); the entry takes permuted views as they are."""
    q, k, v = (torch.randn(2, 19, 2, 64, device=DEVICE) for _ in range(3))
    o, lse = hopper_k.asym_attention_hopper_fwd(q, k, v, None, None, 13, 0.125, False)
    o2, lse2 = hopper_k.asym_attention_hopper_fwd(_nc(q), _nc(k), _nc(v), None, None, 13, 0.125, False)
    torch.testing.assert_close(o2, o)
    torch.testing.assert_close(lse2, lse)
    qv, kv, vv = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qv.is_contiguous() and qv.stride(-1) == 1
    torch.testing.assert_close(hopper_k.asym_attention_hopper_triton(qv, kv, vv, 13, scale=0.125), o)
    rk, rv = torch.randn(2, 7, 2, 64, device=DEVICE), torch.randn(2, 7, 2, 64, device=DEVICE)
    oc, _ = hopper_k.asym_attention_hopper_fwd(q, k, v, rk, rv, 19, 0.125, True)
    oc2, _ = hopper_k.asym_attention_hopper_fwd(_nc(q), k, _nc(v), _nc(rk), _nc(rv), 19, 0.125, True)
    torch.testing.assert_close(oc2, oc)


def test_fp8_launchers_take_strided_views():
    """The K/V quantizer and the 8-bit attention kernel read any strides of q, k, v; a
    :class:`QuantizedKV` built from views is made contiguous by the launcher (the kernel
    addresses its sets as contiguous ``[B, H, ...]`` rows)."""
    q, k, v = (torch.randn(2, 37, 2, 32, device=DEVICE) for _ in range(3))
    o = fp8_k.asym_attention_fp8_triton(q, k, v, 21, block_n=16)
    torch.testing.assert_close(fp8_k.asym_attention_fp8_triton(_nc(q), _nc(k), _nc(v), 21, block_n=16), o)
    mean = key_mean(k)
    s1 = fp8_k.quantize_kv_triton(k[:, :21], v[:, :21], mean, 16)
    s1_nc = fp8_k.quantize_kv_triton(_nc(k)[:, :21], _nc(v)[:, :21], _nc(mean), 16)
    for a, b in zip((s1.k, s1.k_scale, s1.v, s1.v_scale), (s1_nc.k, s1_nc.k_scale, s1_nc.v, s1_nc.v_scale)):
        assert torch.equal(a.float(), b.float())
    s2 = quantize_kv(k[:, 21:], v[:, 21:], mean, 16)
    views = QuantizedKV(_permuted(s2.k), _permuted(s2.k_scale), s2.k_mean,
                        _permuted(s2.v.view(torch.int8)).view(torch.float8_e4m3fn),
                        _permuted(s2.v_scale), s2.num_tokens, s2.block_n)
    assert not views.k.is_contiguous() and not views.v.is_contiguous()
    want = fp8_k.asym_attention_fp8_fwd(q, s1, s2, 21, 0.25)
    torch.testing.assert_close(fp8_k.asym_attention_fp8_fwd(_nc(q), s1, views, 21, 0.25), want)


# =========================================================================== devices (item 2)
class _FakeCuda:
    """Stands in for a tensor on ``cuda:1`` (no GPU needed): only ``.device`` is read."""

    def __init__(self, index: int):
        self.device = torch.device("cuda", index)


def test_device_guard_enters_the_tensors_device(monkeypatch):
    seen = []
    monkeypatch.setattr(_utils.torch.cuda, "device", lambda d: seen.append(d) or contextlib.nullcontext())
    with _utils.device_guard("op", x=_FakeCuda(1), y=None, z=_FakeCuda(1)):
        pass
    assert seen == [torch.device("cuda", 1)]
    with _utils.device_guard("op", x=torch.zeros(1)):  # CPU: nothing to enter
        pass
    assert len(seen) == 1


def test_device_guard_rejects_mixed_devices():
    with pytest.raises(ValueError, match=r"myop: .*x is on cuda:0 but w is on cuda:1"):
        _utils.device_guard("myop", x=_FakeCuda(0), b=None, w=_FakeCuda(1))
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="asym_attention_fwd: .* k is on meta"):
        attn_k.asym_attention_fwd(q, q.to("meta"), q, None, None, 4, None, None, 0.25, False)
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="ref_lora_linear_fwd: .* lora_b is on meta"):
        lora_k.ref_lora_linear_fwd(x, torch.randn(8, 16), None, torch.randn(2, 16),
                                   torch.randn(8, 2, device="meta"), 1.0, 2)
    q = torch.randn(1, 4, 1, 64)
    with pytest.raises(ValueError, match="asym_attention_hopper_fwd: .* v2 is on meta"):
        hopper_k.asym_attention_hopper_fwd(q, q, q, q, q.to("meta"), 4, 0.125, True)
    with pytest.raises(ValueError, match="quantize_kv_fwd: .* v is on meta"):
        fp8_k.quantize_kv_fwd(q, q.to("meta"), key_mean(q), 16)
    s = quantize_kv(q, q, key_mean(q), 16)
    s_meta = QuantizedKV(*(t.to("meta") for t in (s.k, s.k_scale, s.k_mean, s.v, s.v_scale)),
                         s.num_tokens, s.block_n)
    with pytest.raises(ValueError, match="asym_attention_fp8_fwd: .* set2_k is on meta"):
        fp8_k.asym_attention_fp8_fwd(q, s, s_meta, 4, 0.125)


def _record_guards(monkeypatch):
    calls = []
    real = _utils.device_guard

    def spy(what, **tensors):
        calls.append((what, sorted(k for k, v in tensors.items() if v is not None)))
        return real(what, **tensors)

    for mod in (attn_k, fp8_k, hopper_k, lora_k, quant_k, rope_k):
        monkeypatch.setattr(mod, "device_guard", spy)
    return calls


def test_every_launcher_guards_its_device(monkeypatch):
    """Every launch goes through the guard with all of its tensor arguments."""
    calls = _record_guards(monkeypatch)
    q, k, v = _leaf(1, 9, 2, 16), _leaf(1, 9, 2, 16), _leaf(1, 9, 2, 16)
    cos, sin = wk.rope_cos_sin(torch.randint(0, 5, (9, 3), device=DEVICE), 16)
    wk.asym_attention(q, k, v, 6, cos, sin, backend="triton", rope_mode="fused").sum().backward()
    rk, rv = _leaf(1, 4, 2, 16), _leaf(1, 4, 2, 16)
    wk.cached_asym_attention(q, k, v, rk, rv, backend="triton").sum().backward()
    wk.apply_rope(q, cos, sin, backend="triton").sum().backward()
    yq, yk = wk.qk_norm_rope(q, k, _leaf(32), None, cos, sin, backend="triton")
    (yq.sum() + yk.sum()).backward()
    x, w, a, lb = _leaf(1, 9, 16), _leaf(8, 16), _leaf(2, 16), _leaf(8, 2)
    wk.ref_lora_linear(x, w, _leaf(8), a, lb, 1.0, 6, backend="triton").sum().backward()
    ref_folded_linear_triton(x, w, w.detach() + 1, None, 6).sum().backward()
    wk.per_token_quant_fp8(x, backend="triton")
    # the Hopper forward (its backward is kernels.py's) and the 8-bit attention (forward only)
    q, k, v, rk, rv = (_leaf(1, 9, 2, 64) for _ in range(5))
    hopper_k.asym_attention_hopper_triton(q, k, v, 6).sum().backward()
    hopper_k.cached_asym_attention_hopper_triton(q, k, v, rk, rv).sum().backward()
    with torch.no_grad():
        wk.asym_attention(q, k, v, 6, backend="triton", precision="fp8")
        cache = wk.attention.quantize_ref_kv(rk, rv, backend="triton")
        wk.cached_asym_attention(q, k, v, cache, None, backend="triton", precision="fp8")
    launched = {what for what, _ in calls}
    assert launched == {"asym_attention_fwd", "asym_attention_bwd", "apply_rope_fwd", "apply_rope_bwd",
                        "qk_norm_rope_fwd", "qk_norm_rope_bwd", "ref_lora_linear_fwd",
                        "ref_lora_linear_bwd", "ref_folded_linear_fwd", "ref_folded_linear_bwd",
                        "per_token_quant_fp8_fwd", "asym_attention_hopper_fwd", "asym_attention_fp8_fwd",
                        "quantize_kv_fwd"}, launched
    by_name = {}
    for what, names in calls:  # the first launch of each
        by_name.setdefault(what, names)
    assert by_name["asym_attention_fwd"] == ["cos", "k", "q", "sin", "v"]
    assert by_name["ref_lora_linear_fwd"] == ["bias", "lora_a", "lora_b", "weight", "x"]
    assert by_name["asym_attention_hopper_fwd"] == ["k", "q", "v"]
    assert ["k", "k2", "q", "v", "v2"] in [n for w, n in calls if w == "asym_attention_hopper_fwd"]
    assert by_name["quantize_kv_fwd"] == ["k", "k_mean", "v"]
    assert by_name["asym_attention_fp8_fwd"] == sorted(
        ["q"] + [f"set{i}_{f}" for i in (1, 2) for f in ("k", "k_scale", "v", "v_scale")])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_on_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: every op matches its reference there."""
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    q, k, v = (torch.randn(2, 70, 2, 64, device=dev, dtype=torch.float16) for _ in range(3))
    cos, sin = wk.rope_cos_sin(torch.randint(0, 9, (70, 3), device=dev), 64)
    for mode in ("fused", "prologue"):
        torch.testing.assert_close(wk.asym_attention(q, k, v, 50, cos, sin, backend="triton", rope_mode=mode),
                                   wk.asym_attention(q, k, v, 50, cos, sin, backend="reference"),
                                   rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(wk.apply_rope(q, cos, sin, backend="triton"),
                               wk.apply_rope(q, cos, sin, backend="reference"), rtol=2e-3, atol=2e-3)
    x = torch.randn(2, 70, 64, device=dev, dtype=torch.float16)
    w, a, lb = (torch.randn(s, device=dev, dtype=torch.float16) * 0.1 for s in ((32, 64), (8, 64), (32, 8)))
    torch.testing.assert_close(wk.ref_lora_linear(x, w, None, a, lb, 1.0, 50, backend="triton"),
                               wk.ref_lora_linear(x, w, None, a, lb, 1.0, 50, backend="reference"),
                               rtol=2e-2, atol=2e-2)
    qt, st = wk.per_token_quant_fp8(x, backend="triton")
    qr, sr = wk.per_token_quant_fp8(x, backend="reference")
    assert torch.equal(qt.float(), qr.float()) and torch.equal(st, sr)


# =========================================================================== both backends (item 4)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_mixed_dtypes_raise_type_error(backend):
    x = torch.randn(1, 6, 16, device=DEVICE, dtype=torch.float16)
    w, a, lb = (torch.randn(s, device=DEVICE, dtype=torch.float16) for s in ((8, 16), (2, 16), (8, 2)))
    with pytest.raises(TypeError, match="lora_a must have the dtype of the input"):
        wk.ref_lora_linear(x, w, None, a.double(), lb, 1.0, 4, backend=backend)
    with pytest.raises(TypeError, match="bias must have the dtype of the input"):
        wk.ref_lora_linear(x, w, torch.zeros(8, device=DEVICE), a, lb, 1.0, 4, backend=backend)
    with pytest.raises(TypeError, match="weight must have the dtype"):
        wk.ref_lora_linear(x.float(), w, None, a.float(), lb.float(), 1.0, 4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_backward_with_din_zero(backend):
    x, w, b, a, lb = _leaf(2, 7, 0), _leaf(6, 0), _leaf(6), _leaf(4, 0), _leaf(6, 4)
    y = wk.ref_lora_linear(x, w, b, a, lb, 0.5, 5, backend=backend)
    torch.testing.assert_close(y, b.detach().expand(2, 7, 6))
    y.sum().backward()
    for t in (x, w, a):
        assert t.grad is not None and t.grad.shape == t.shape
    assert torch.equal(lb.grad, torch.zeros_like(lb))
    torch.testing.assert_close(b.grad, torch.full_like(b, 14.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_no_reference_rows_adapters_only(backend):
    """num_video = N with only the adapters requiring grad: zero grads, not an error."""
    x = torch.randn(2, 9, 16, device=DEVICE)
    w, b = torch.randn(8, 16, device=DEVICE), torch.randn(8, device=DEVICE)
    a, lb = _leaf(4, 16), _leaf(8, 4)
    y = wk.ref_lora_linear(x, w, b, a, lb, 0.5, 9, backend=backend)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(lb.grad, torch.zeros_like(lb))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_empty_queries_give_zero_grads(backend):
    q, k, v = _leaf(2, 0, 2, 16), _leaf(2, 0, 2, 16), _leaf(2, 0, 2, 16)
    o = wk.asym_attention(q, k, v, 0, backend=backend)
    assert o.shape == q.shape
    o.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape

    qv, kv, vv = _leaf(2, 0, 2, 16), _leaf(2, 0, 2, 16), _leaf(2, 0, 2, 16)
    rk, rv = _leaf(2, 5, 2, 16), _leaf(2, 5, 2, 16)
    o = wk.cached_asym_attention(qv, kv, vv, rk, rv, backend=backend)
    assert o.shape == qv.shape
    o.sum().backward()
    for t in (qv, kv, vv):
        assert t.grad is not None and t.grad.shape == t.shape
    assert torch.equal(rk.grad, torch.zeros_like(rk)) and torch.equal(rv.grad, torch.zeros_like(rv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_tables_that_require_grad_raise_on_both_backends(backend):
    """The reference used to differentiate cos/sin while the Triton kernels silently gave them no
    gradient: one rule now, a ValueError naming the tables (none under ``torch.no_grad``)."""
    x, k, v = _leaf(1, 5, 2, 16), _leaf(1, 5, 2, 16), _leaf(1, 5, 2, 16)
    cos, sin = wk.rope_cos_sin(torch.randint(0, 7, (5, 3), device=DEVICE), 16)
    w = torch.ones(32, device=DEVICE)
    calls = {
        "apply_rope": lambda c, s: wk.apply_rope(x, c, s, backend=backend),
        "qk_norm_rope": lambda c, s: wk.qk_norm_rope(x, k, w, w, c, s, backend=backend),
        "asym_attention": lambda c, s: wk.asym_attention(x, k, v, 3, c, s, backend=backend),
        "cached_asym_attention": lambda c, s: wk.cached_asym_attention(x, k, v, k[:, :2], v[:, :2], c, s,
                                                                       backend=backend),
    }
    for call in calls.values():
        for c, s in ((cos.clone().requires_grad_(), sin), (cos, sin.clone().requires_grad_())):
            with pytest.raises(ValueError, match="cos and sin must not require grad"):
                call(c, s)
            with torch.no_grad():
                call(c, s)
        out = call(cos, sin)
        (out[0] if isinstance(out, tuple) else out).sum().backward()


@pytest.mark.parametrize("shape", [(3, 0), (2, 3, 0), (0, 0), (0,)])
@pytest.mark.parametrize("pad_to", [1, 16])
def test_fp8_quant_and_linear_with_zero_k(shape, pad_to):
    """K = 0 (the reference handled it, the Triton launcher reshaped with -1 and crashed): both
    backends give codes [..., K_pad] and the zero-row scale; fp8_linear gives the bias, and a
    bias gradient for N = 0 outputs."""
    x = torch.randn(*shape, device=DEVICE)
    ref = wk.per_token_quant_fp8(x, pad_to=pad_to, backend="reference")
    tri = wk.per_token_quant_fp8(x, pad_to=pad_to, backend="triton")
    for a, b in zip(ref, tri):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.float(), b.float())
    assert ref[0].shape == (*shape[:-1], 0)
    fp8 = torch.float8_e4m3fn
    for act in BACKENDS:
        x = torch.randn(2, 3, 0, device=DEVICE, requires_grad=True)
        b = torch.randn(5, device=DEVICE, requires_grad=True)
        y = wk.fp8_linear(x, torch.zeros(5, 0, device=DEVICE).to(fp8), torch.ones(5, 1, device=DEVICE), b,
                          gemm="emulate", act_backend=act)
        torch.testing.assert_close(y, b.detach().expand(2, 3, 5))
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.equal(b.grad, torch.full_like(b, 6.0))
        x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
        b = torch.randn(0, device=DEVICE, requires_grad=True)
        y = wk.fp8_linear(x, torch.zeros(0, 8, device=DEVICE).to(fp8), torch.ones(0, 1, device=DEVICE), b,
                          gemm="emulate", act_backend=act)
        assert y.shape == (2, 3, 0)
        y.sum().backward()
        assert b.grad.shape == (0,) and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("n,nv", [(9, 4), (0, 0), (5, 0)])
def test_autocast_one_rule_on_both_backends(n, nv):
    """Under autocast on the inputs' device, attention and the LoRA linear compute in the
    autocast dtype and return it on both backends, as F.scaled_dot_product_attention and
    F.linear do (the Triton attention ignored autocast, the reference followed it; the Triton
    LoRA followed CUDA autocast only). Gradients come back in the leaves' dtypes."""
    dev, dt = DEVICE.type, torch.bfloat16
    outs = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        q, k, v = _leaf(2, n, 2, 16), _leaf(2, n, 2, 16), _leaf(2, n, 2, 16)
        rk, rv = _leaf(2, 3, 2, 16), _leaf(2, 3, 2, 16)
        x, w, b, a, lb = _leaf(2, n, 24), _leaf(12, 24), _leaf(12), _leaf(4, 24), _leaf(12, 4)
        with torch.autocast(dev, dtype=dt):
            o1 = wk.asym_attention(q, k, v, nv, backend=backend)
            o2 = wk.cached_asym_attention(q, k, v, rk, rv, backend=backend)
            o3 = wk.ref_lora_linear(x, w, b, a, lb, 0.5, nv, backend=backend)
        for o in (o1, o2, o3):
            assert o.dtype == dt, (backend, o.dtype)
        (o1.float().sum() + o2.float().sum() + o3.float().sum()).backward()
        for t in (q, k, v, rk, rv, x, w, b, a, lb):
            assert t.grad is not None and t.grad.dtype == torch.float32 and t.grad.shape == t.shape
        outs[backend] = (o1, o2, o3)
    for r, t in zip(outs["reference"], outs["triton"]):
        torch.testing.assert_close(t.float(), r.float(), rtol=3e-2, atol=3e-2)


def test_cached_kv_of_another_dtype_is_cast_on_both_backends():
    """The cached K/V may be kept in another float dtype: both backends cast it to q_v's dtype,
    give the same result, and return its gradient in its own dtype."""
    outs = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        q, k, v = _leaf(2, 6, 2, 16), _leaf(2, 6, 2, 16), _leaf(2, 6, 2, 16)
        rk, rv = _leaf(2, 3, 2, 16, dtype=torch.float64), _leaf(2, 3, 2, 16, dtype=torch.float16)
        o = wk.cached_asym_attention(q, k, v, rk, rv, backend=backend)
        assert o.dtype == torch.float32
        o.sum().backward()
        assert rk.grad.dtype == torch.float64 and rv.grad.dtype == torch.float16
        outs[backend] = (o, rk.grad, rv.grad)
    for r, t in zip(outs["reference"], outs["triton"]):
        torch.testing.assert_close(t.float(), r.float(), rtol=2e-3, atol=2e-3)
