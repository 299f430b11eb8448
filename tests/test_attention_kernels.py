"""Triton asymmetric-attention kernels against an fp64 ground truth and the PyTorch reference.

flash-attn's rule throughout: the kernel's error against the fp64 truth (dense softmax with an
explicit N x N mask, I-RoPE by the formula of docs/design.md §3) is at most twice the error of the
reference backend run in the same dtype, plus a small atol; for the forward pass and for every
gradient. Token counts are not block multiples (37 + 11, 211 + 0, 0 + 29), head dims include
non-powers of two (24), rotation runs both fused in the kernel and as a prologue, inputs are
views into a fused QKV tensor, and ``nan_empty`` turns any element a kernel forgets to write
into NaN. Under the CPU interpreter the file checks fp32 and fp16 (and bf16 through the
interpreter's fp32 upcast); model-sized bf16/fp16 shapes are GPU-marked. The kernels' inputs
(and the fp64 truths) live on ``helpers.DEVICE`` (CUDA when present).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DEVICE,
    DT,
    GPU_DTYPES,
    GPU_LAYOUTS,
    LAYOUTS,
    assert_close_verbose,
    assert_within_baseline,
    case,
    dense_asym_attention_fp64,
    rope_fp64,
    rope_tables,
    run_sm90_build,
)

import wildactor_kernels as wk
from wildactor_kernels.attention import kernels as K

pytestmark = pytest.mark.usefixtures("nan_empty")

HAS_CUDA = torch.cuda.is_available()

def _atol(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """flash-attn's absolute slack: twice the rounding of the truth's magnitude in ``dtype``
    (``(x + 0.3 - 0.3) - x``), never below 1e-5."""
    t = truth.detach().to(dtype)
    rounding = ((t + 0.3 - 0.3) - t).abs().max().item() if t.numel() else 0.0
    return max(2.0 * rounding, 1e-5)


def _check(name: str, out: torch.Tensor, base: torch.Tensor, truth: torch.Tensor, dtype) -> None:
    assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
    assert_within_baseline(out, base, truth, atol=_atol(truth, dtype), name=name)


def _leaves(*ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def _grads(out: torch.Tensor, do: torch.Tensor, inputs) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, do))


def _truth_joint(q, k, v, num_video, pos, d, scale=None):
    """fp64 output and (dq, dk, dv) of rotate-then-attend; ``pos=None``: no rotation."""
    q64, k64, v64 = _leaves(q, k, v, dtype=torch.float64)
    qr, kr = (q64, k64) if pos is None else (rope_fp64(q64, pos, d), rope_fp64(k64, pos, d))
    return dense_asym_attention_fp64(qr, kr, v64, num_video, scale), (q64, k64, v64)


def _make_qkv(b, n, h, d, dtype, fused_qkv=False, device=DEVICE):
    if fused_qkv:  # views into one projection output [B, N, 3, H, D], as the model produces
        qkv = torch.randn(b, n, 3, h, d, dtype=torch.float32).to(device=device, dtype=dtype)
        return qkv.unbind(2)
    return [torch.randn(b, n, h, d, dtype=torch.float32).to(device=device, dtype=dtype) for _ in range(3)]


def _run_joint(layout_name, b, h, d, dtype, rope, monkeypatch, fused_qkv=False, scale=None):
    layout = LAYOUTS[layout_name]
    nv, n = layout.num_video, layout.num_tokens
    if rope != "none":
        monkeypatch.setattr(K, "ROPE_MODE", rope)
        pos, cos, sin = rope_tables(layout, d)
    else:
        pos = cos = sin = None
    q, k, v = _make_qkv(b, n, h, d, dtype, fused_qkv)
    if fused_qkv:
        assert not q.is_contiguous()
    do = torch.randn(b, n, h, d).to(device=DEVICE, dtype=dtype)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if fused_qkv:  # keep the views: gradients flow into the views' strides
        base = torch.stack([q, k, v], 2).detach().requires_grad_()
        leaves = list(base.unbind(2))
    out = wk.asym_attention(*leaves, nv, cos, sin, scale, backend="triton")
    grads = _grads(out, do, [base] if fused_qkv else leaves)
    if fused_qkv:
        grads = list(grads[0].unbind(2))

    ref_in = _leaves(q, k, v)
    ref = wk.asym_attention(*ref_in, nv, cos, sin, scale, backend="reference")
    ref_grads = _grads(ref, do, ref_in)

    truth, t_in = _truth_joint(q, k, v, nv, pos, d, scale)
    t_grads = _grads(truth, do.double(), t_in)

    assert out.shape == (b, n, h, d) and out.is_contiguous()
    _check("out", out, ref, truth, dtype)
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, ref_grads, t_grads):
        _check(name, g, rg, tg, dtype)
    return out


# =========================================================================== joint attention
JOINT_CASES = [
    # layout, B, H, D, dtype, rope
    case(layout="Nv37-Nr11", B=2, H=2, D=64, dtype="fp32", rope="none"),
    case(layout="Nv37-Nr11", B=2, H=2, D=64, dtype="fp16", rope="fused"),
    case(layout="Nv37-Nr11", B=2, H=2, D=64, dtype="fp16", rope="prologue"),
    case(layout="Nv37-Nr11", B=1, H=3, D=24, dtype="fp32", rope="fused"),
    case(layout="Nv37-Nr11", B=2, H=1, D=16, dtype="fp16", rope="none"),
    case(layout="Nv37-Nr11", B=1, H=1, D=128, dtype="fp16", rope="fused"),
    case(layout="Nv37-Nr11", B=1, H=2, D=128, dtype="fp32", rope="prologue"),
    case(layout="Nv211-Nr0", B=1, H=1, D=64, dtype="fp16", rope="none"),
    case(layout="Nv211-Nr0", B=1, H=1, D=24, dtype="fp32", rope="fused"),
    case(layout="Nv0-Nr29", B=2, H=2, D=64, dtype="fp32", rope="fused"),
    case(layout="Nv0-Nr29", B=1, H=2, D=16, dtype="fp16", rope="prologue"),
]


@pytest.mark.parametrize("layout, b, h, d, dtype, rope", JOINT_CASES)
def test_asym_attention(layout, b, h, d, dtype, rope, monkeypatch):
    _run_joint(layout, b, h, d, DT[dtype], rope, monkeypatch)


@pytest.mark.parametrize("rope", ["none", "fused", "prologue"])
def test_asym_attention_fused_qkv_views(rope, monkeypatch):
    """q, k, v as strided views into one [B, N, 3, H, D] tensor (no copies in the kernel)."""
    _run_joint("Nv37-Nr11", 2, 2, 32, torch.float16, rope, monkeypatch, fused_qkv=True)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter-only: bf16 tiles upcast by the interpreter; native bf16 on "
                    "CUDA is test_asym_attention_gpu / test_cached_gpu")
def test_asym_attention_bf16_interpreter_upcast(monkeypatch):
    """bf16 under the interpreter: tiles are upcast before every dot (triton-lang/triton#11584)."""
    _run_joint("Nv37-Nr11", 1, 2, 32, torch.bfloat16, "fused", monkeypatch)


def test_asym_attention_custom_scale(monkeypatch):
    _run_joint("Nv37-Nr11", 1, 2, 32, torch.float32, "none", monkeypatch, scale=0.3)


def test_asym_attention_negative_scale(monkeypatch):
    """The forward's running max uses the min of the raw scores when the scale is negative."""
    _run_joint("Nv37-Nr11", 1, 1, 32, torch.float32, "fused", monkeypatch, scale=-0.2)


def test_rope_modes_agree():
    """Fused rotation and the prologue round the rotated q/k to the input dtype the same way."""
    layout = LAYOUTS["Nv37-Nr11"]
    _, cos, sin = rope_tables(layout, 32)
    q, k, v = _make_qkv(1, layout.num_tokens, 2, 32, torch.float16)
    o_f = K.asym_attention_triton(q, k, v, layout.num_video, cos, sin, rope_mode="fused")
    o_p = K.asym_attention_triton(q, k, v, layout.num_video, cos, sin, rope_mode="prologue")
    assert_close_verbose(o_f, o_p, atol=2e-3, rtol=0, name="fused vs prologue")
    with pytest.raises(ValueError, match="rope_mode"):
        K.asym_attention_triton(q, k, v, layout.num_video, cos, sin, rope_mode="inline")


# =========================================================================== cached attention
def _run_cached(nv, nr, b, h, d, dtype, rope, monkeypatch):
    if rope != "none":
        monkeypatch.setattr(K, "ROPE_MODE", rope)
        layout = wk.TokenLayout((1, 1, nv))
        pos, cos, sin = rope_tables(layout, d)
    else:
        pos = cos = sin = None
    q, k, v = _make_qkv(b, nv, h, d, dtype)
    rk, rv = _make_qkv(b, nr, h, d, dtype)[:2]
    do = torch.randn(b, nv, h, d).to(device=DEVICE, dtype=dtype)

    ins = _leaves(q, k, v, rk, rv)
    out = wk.cached_asym_attention(*ins, cos, sin, backend="triton")
    grads = _grads(out, do, ins)
    ref_in = _leaves(q, k, v, rk, rv)
    ref = wk.cached_asym_attention(*ref_in, cos, sin, backend="reference")
    ref_grads = _grads(ref, do, ref_in)

    t_in = _leaves(q, k, v, rk, rv, dtype=torch.float64)
    qr, kr = (t_in[0], t_in[1]) if pos is None else (rope_fp64(t_in[0], pos, d), rope_fp64(t_in[1], pos, d))
    kk, vv = torch.cat([kr, t_in[3]], 1), torch.cat([t_in[2], t_in[4]], 1)
    truth = torch.einsum("bnhm,bmhd->bnhd",
                         (torch.einsum("bnhd,bmhd->bnhm", qr, kk) / math.sqrt(d)).softmax(-1), vv)
    t_grads = _grads(truth, do.double(), t_in)

    assert out.shape == (b, nv, h, d)
    _check("out", out, ref, truth, dtype)
    for name, g, rg, tg in zip(("dq_v", "dk_v", "dv_v", "dref_k", "dref_v"), grads, ref_grads, t_grads):
        _check(name, g, rg, tg, dtype)


CACHED_CASES = [
    # Nv, Nr, B, H, D, dtype, rope
    case(Nv=37, Nr=11, B=2, H=2, D=64, dtype="fp32", rope="fused"),
    case(Nv=37, Nr=11, B=1, H=2, D=64, dtype="fp16", rope="prologue"),
    case(Nv=37, Nr=29, B=2, H=1, D=24, dtype="fp16", rope="none"),
    case(Nv=45, Nr=0, B=1, H=2, D=16, dtype="fp32", rope="fused"),
    case(Nv=20, Nr=40, B=1, H=1, D=128, dtype="fp16", rope="fused"),
]


@pytest.mark.parametrize("nv, nr, b, h, d, dtype, rope", CACHED_CASES)
def test_cached_asym_attention(nv, nr, b, h, d, dtype, rope, monkeypatch):
    _run_cached(nv, nr, b, h, d, DT[dtype], rope, monkeypatch)


def test_cached_no_video_queries():
    """Nv = 0: an empty output, and zero gradients for the cache (no query reads it)."""
    q, k, v = _leaves(*_make_qkv(1, 0, 2, 16, torch.float32))
    rk, rv = _leaves(*_make_qkv(1, 7, 2, 16, torch.float32)[:2])
    out = wk.cached_asym_attention(q, k, v, rk, rv, backend="triton")
    assert out.shape == (1, 0, 2, 16)
    (out.sum() + 0 * (rk.sum() + rv.sum())).backward()
    assert torch.equal(rk.grad, torch.zeros_like(rk)) and torch.equal(rv.grad, torch.zeros_like(rv))


@pytest.mark.parametrize("rope", ["fused", "prologue"])
def test_cached_equals_joint_video_rows(rope, monkeypatch):
    """Cached attention over the rotated reference K/V gives the joint op's video rows, and the
    same gradients for the video q/k/v."""
    monkeypatch.setattr(K, "ROPE_MODE", rope)
    layout = LAYOUTS["Nv37-Nr11"]
    nv, d = layout.num_video, 32
    _, cos, sin = rope_tables(layout, d)
    q, k, v = _leaves(*_make_qkv(2, layout.num_tokens, 2, d, torch.float32))
    o = wk.asym_attention(q, k, v, nv, cos, sin, backend="triton")
    do = torch.randn_like(o)
    do[:, nv:] = 0  # only the video rows feed the loss
    o.backward(do)

    ref_k = wk.apply_rope(k.detach()[:, nv:], cos[nv:], sin[nv:], backend="reference")
    qv, kv, vv = _leaves(q[:, :nv], k[:, :nv], v[:, :nv])
    oc = wk.cached_asym_attention(qv, kv, vv, ref_k, v.detach()[:, nv:], cos[:nv], sin[:nv],
                                  backend="triton")
    oc.backward(do[:, :nv])
    assert_close_verbose(oc, o[:, :nv], atol=1e-5, name="cached vs joint out")
    for name, a, b_ in (("dq", qv.grad, q.grad), ("dk", kv.grad, k.grad), ("dv", vv.grad, v.grad)):
        assert_close_verbose(a, b_[:, :nv], atol=1e-5, name=f"cached vs joint {name}")


# =========================================================================== log-sum-exp entries
def _dense_lse(q, k, v, allowed, scale, dtype):
    """Plain PyTorch ``(o [B, Nq, H, D], lse [B, Nq, H])`` in ``dtype`` with an explicit
    ``[Nq, Nk]`` mask: the baseline in the input dtype, the truth in fp64."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    s = s.masked_fill(~allowed.to(s.device), float("-inf"))
    lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, -1)
    o = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)
    return o, lse.transpose(1, 2)


def _check_lse_case(fn, dense_args, ins, dtype, pos=None, d=None, rot=(0, 1)):
    """Forward (o and lse) and the gradients of ``<o, do> + <lse, g>`` in q, k, v (and the
    reference tensors) against fp64, with the 2x-baseline rule."""
    leaves = _leaves(*ins)
    o, lse = fn(*leaves)
    assert lse.dtype == torch.float32 and lse.shape == o.shape[:3] and lse.is_contiguous()
    do, g = torch.randn_like(o), torch.randn_like(lse)
    grads = _grads((o * do).sum() + (lse * g).sum(), None, leaves)

    def dense(dt, ts):
        ts = list(ts)
        if pos is not None:  # rotate q and k first
            ts[rot[0]], ts[rot[1]] = rope_fp64(ts[rot[0]], pos, d).to(ts[0].dtype), \
                rope_fp64(ts[rot[1]], pos, d).to(ts[0].dtype)
        return _dense_lse(*dense_args(ts), dt)

    results = []
    for dt in (dtype, torch.float64):
        t_in = _leaves(*ins, dtype=dt)
        to, tl_ = dense(dt, t_in)
        tg = _grads((to * do.to(dt)).sum() + (tl_ * g.to(tl_.dtype)).sum(), None, t_in)
        results.append((to, tl_, tg))
    (bo, bl, bg), (to, tl_, tg) = results
    assert_within_baseline(o, bo, to, atol=_atol(to, dtype), name="o")
    assert_within_baseline(lse, bl, tl_, atol=1e-5, name="lse")
    for i, (a, b_, t) in enumerate(zip(grads, bg, tg)):
        assert_within_baseline(a, b_, t, atol=_atol(t, dtype), name=f"grad {i}")
    return o, lse


@pytest.mark.parametrize("layout, dtype, rope", [
    case(layout="Nv37-Nr11", dtype="fp32", rope="none"),
    case(layout="Nv37-Nr11", dtype="fp16", rope="fused"),
    case(layout="Nv0-Nr29", dtype="fp32", rope="prologue"),
    case(layout="Nv211-Nr0", dtype="fp16", rope="none"),
])
def test_asym_attention_lse(layout, dtype, rope):
    """``asym_attention_lse_triton``: the natural-log LSE over the keys each row reads, and the
    gradients through o and lse (the LSE's gradient enters the backward as a shift of delta)."""
    layout, dtype, d = LAYOUTS[layout], DT[dtype], 32
    nv, n = layout.num_video, layout.num_tokens
    pos = cos = sin = None
    if rope != "none":
        pos, cos, sin = rope_tables(layout, d)
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[nv:, :nv] = False
    scale = 1.0 / math.sqrt(d)
    _check_lse_case(
        lambda q, k, v: K.asym_attention_lse_triton(q, k, v, nv, cos, sin,
                                                    rope_mode=None if rope == "none" else rope),
        lambda ts: (ts[0], ts[1], ts[2], allowed, scale), _make_qkv(2, n, 2, d, dtype), dtype, pos, d)


@pytest.mark.parametrize("nq, nk, nr, dtype", [
    case(Nq=37, Nk=37, Nr=11, dtype="fp32"),
    case(Nq=37, Nk=20, Nr=0, dtype="fp16"),   # plain attention, fewer keys than queries
    case(Nq=13, Nk=50, Nr=9, dtype="fp32"),   # more keys than queries, and a second range
    case(Nq=21, Nk=0, Nr=17, dtype="fp32"),   # the second range only
])
def test_cached_asym_attention_lse(nq, nk, nr, dtype):
    """``cached_asym_attention_lse_triton``: every query over ``[k_v; ref_k]``, any ``Nk``."""
    dtype, d, scale = DT[dtype], 24, 0.3
    q = _make_qkv(2, nq, 3, d, dtype)[0]
    k, v = _make_qkv(2, nk, 3, d, dtype)[:2]
    rk, rv = _make_qkv(2, nr, 3, d, dtype)[:2]
    allowed = torch.ones(nq, nk + nr, dtype=torch.bool)
    if nr:
        _check_lse_case(lambda *t: K.cached_asym_attention_lse_triton(*t, scale=scale),
                        lambda ts: (ts[0], torch.cat([ts[1], ts[3]], 1), torch.cat([ts[2], ts[4]], 1),
                                    allowed, scale), [q, k, v, rk, rv], dtype)
    else:
        _check_lse_case(lambda *t: K.cached_asym_attention_lse_triton(*t, scale=scale),
                        lambda ts: (*ts, allowed, scale), [q, k, v], dtype)


def test_cached_lse_rotated_matches_joint_video_rows():
    """With cos/sin, the cached entry's video rows equal the joint entry's (o and lse)."""
    layout = LAYOUTS["Nv37-Nr11"]
    nv, d = layout.num_video, 32
    _, cos, sin = rope_tables(layout, d)
    q, k, v = _make_qkv(1, layout.num_tokens, 2, d, torch.float32)
    o, lse = K.asym_attention_lse_triton(q, k, v, nv, cos, sin, rope_mode="fused")
    ref_k = wk.apply_rope(k[:, nv:], cos[nv:], sin[nv:], backend="reference")
    oc, lc = K.cached_asym_attention_lse_triton(q[:, :nv], k[:, :nv], v[:, :nv], ref_k, v[:, nv:],
                                                cos[:nv], sin[:nv], rope_mode="fused")
    assert_close_verbose(oc, o[:, :nv], atol=1e-5, name="cached vs joint o")
    assert_close_verbose(lc, lse[:, :nv], atol=1e-5, name="cached vs joint lse")


def test_lse_no_keys_and_bad_arguments():
    q = torch.randn(1, 5, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 0, 2, 16, device=DEVICE, requires_grad=True)
    o, lse = K.cached_asym_attention_lse_triton(q, k, k)
    assert torch.equal(o, torch.zeros_like(o)) and bool((lse == float("-inf")).all())
    o.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    with pytest.raises(ValueError, match="ref_k and ref_v"):
        K.cached_asym_attention_lse_triton(q, q, q, ref_k=q)
    ang = torch.rand(5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="as many keys"):
        K.cached_asym_attention_lse_triton(q, q[:, :3], q[:, :3], cos=ang.cos(), sin=ang.sin())


# =========================================================================== API, ops, compile
def test_rejects_unsupported_dtype_and_head_dim():
    q = torch.randn(1, 5, 1, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="support"):
        K.asym_attention_triton(q, q, q, 3)
    q = torch.randn(1, 5, 1, 258, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        K.asym_attention_triton(q, q, q, 3)


def test_default_rope_mode_is_documented():
    assert K.ROPE_MODE in K.ROPE_MODES == ("fused", "prologue")


def test_custom_ops_opcheck():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of the library ops."""
    b, n, h, d, nv = 1, 20, 2, 16, 13
    q, k, v = (torch.randn(b, n, h, d, device=DEVICE, requires_grad=True) for _ in range(3))
    ang = torch.rand(n, d // 2, device=DEVICE)
    torch.library.opcheck(torch.ops.wildactor.asym_attention_fwd.default,
                          (q, k, v, nv, ang.cos(), ang.sin(), 0.25))
    rk, rv = (torch.randn(b, 7, h, d, device=DEVICE, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.wildactor.cached_asym_attention_fwd.default,
                          (q, k, v, rk, rv, None, None, 0.25))


def test_backward_ops_opcheck_with_lse_gradient():
    """The backward ops with the optional gradient of the log-sum-exp (``dlse``)."""
    b, n, h, d, nv = 1, 20, 2, 16, 13
    q, k, v, do = (torch.randn(b, n, h, d, device=DEVICE) for _ in range(4))
    o, lse = torch.ops.wildactor.asym_attention_fwd(q, k, v, nv, None, None, 0.25)
    dlse = torch.randn_like(lse)
    torch.library.opcheck(torch.ops.wildactor.asym_attention_bwd.default,
                          (do, q, k, v, o, lse, nv, None, None, 0.25, dlse))
    rk, rv = (torch.randn(b, 7, h, d, device=DEVICE) for _ in range(2))
    o, lse = torch.ops.wildactor.cached_asym_attention_fwd(q, k, v, rk, rv, None, None, 0.25)
    torch.library.opcheck(torch.ops.wildactor.cached_asym_attention_bwd.default,
                          (do, q, k, v, rk, rv, o, lse, None, None, 0.25, dlse))


def test_torch_compile_fullgraph_lse(monkeypatch):
    """The log-sum-exp entry traces without graph breaks, gradients through o and lse."""
    monkeypatch.undo()  # nan_empty's Python-level torch.empty patch is not traceable by dynamo
    layout = LAYOUTS["Nv37-Nr11"]
    q, k, v = _leaves(*_make_qkv(1, layout.num_tokens, 2, 16, torch.float32))

    def loss(q, k, v):
        o, lse = K.asym_attention_lse_triton(q, k, v, layout.num_video)
        return (o ** 2).sum() + (lse * lse.detach().sign()).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    gc = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    ge = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b_ in zip(gc, ge):
        assert_close_verbose(a, b_, atol=1e-6, name="compiled grad")


def test_fake_kernels_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 9, 3, 24, dtype=torch.float16)
        rk = torch.empty(2, 4, 3, 24, dtype=torch.float16)
        o, lse = torch.ops.wildactor.asym_attention_fwd(q, q, q, 5, None, None, 0.2)
        assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (2, 3, 9)
        assert lse.dtype == torch.float32
        o, lse = torch.ops.wildactor.cached_asym_attention_fwd(q, q, q, rk, rk, None, None, 0.2)
        assert o.shape == q.shape and lse.shape == (2, 3, 9)
        grads = torch.ops.wildactor.cached_asym_attention_bwd(q, q, q, q, rk, rk, q, lse, None, None, 0.2)
        assert [g.shape for g in grads] == [q.shape] * 3 + [rk.shape] * 2
    q = torch.empty(2, 9, 3, 24, dtype=torch.bfloat16, device="meta")
    o, lse = torch.ops.wildactor.asym_attention_fwd(q, q, q, 5, None, None, 0.2)
    assert o.is_meta and o.shape == q.shape and lse.shape == (2, 3, 9)  # never the Triton launch


@pytest.mark.parametrize("rope", ["none", "fused"])
def test_torch_compile_fullgraph(rope, monkeypatch):
    """No graph break around the op: fullgraph compile (AOT autograd, no codegen) of forward and
    backward, equal to eager. (The "prologue" mode is traced only as far as the rope op allows.)"""
    monkeypatch.undo()  # nan_empty's Python-level torch.empty patch is not traceable by dynamo
    monkeypatch.setattr(K, "ROPE_MODE", "fused")
    layout = LAYOUTS["Nv37-Nr11"]
    _, cos, sin = rope_tables(layout, 16)
    if rope == "none":
        cos = sin = None
    q, k, v = _leaves(*_make_qkv(1, layout.num_tokens, 2, 16, torch.float32))

    def loss(q, k, v):
        o = wk.asym_attention(q, k, v, layout.num_video, cos, sin, backend="triton")
        return (o.float() ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    gc = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    ge = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b_ in zip(gc, ge):
        assert_close_verbose(a, b_, atol=1e-6, name="compiled grad")


# =========================================================================== compile for sm_90
_SM90_COMPILE = r'''
import os, re, sys
os.environ["TRITON_INTERPRET"] = "0"  # real JITFunctions: configs and kernels as on the GPU
sys.path.insert(0, "tests")
from helpers import ptxas_usage
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wildactor_kernels.attention import kernels as K

INTS = ("H", "NQ", "NV", "NK2")

def build(kernel, consts, cfg, first=True):
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # autotuned, or a plain JITFunction
    consts = dict(consts, **cfg.kwargs)
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
        elif a.startswith("stride") and a.endswith("d"):
            sig[a] = "constexpr"; consts[a] = 1  # unit-stride head dim, as Triton specialises it
        elif a.endswith("scale"):
            sig[a] = "fp32"
        elif a in INTS or a.startswith("stride"):
            sig[a] = "i32"
            if a.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "*fp32" if a in ("p_lse", "p_delta", "p_cos", "p_sin", "p_dqa") else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = k.asm["ptx"]
    if first:  # the preferred candidate takes the Hopper tensor-core path
        assert "wgmma.mma_async" in ptx, f"{fn.__name__}: no wgmma (Hopper tensor-core path)"
    assert k.metadata.shared <= K._SMEM_LIMIT, f"{fn.__name__}: {k.metadata.shared} B shared"
    regs, spill_st, spill_ld = ptxas_usage(k)
    assert spill_st == spill_ld == 0, f"{fn.__name__} {cfg}: spills {spill_st}/{spill_ld} B"
    print(fn.__name__, consts.get("ROTATE"), consts.get("CACHED"), "ok", k.metadata.shared, regs)
    return k

# every config the first call may pick at the docs/design.md §8 head dim (bf16, D = 128)
for rotate, cached in ((False, False), (True, True)):
    c = dict(HEAD_DIM=128, BLOCK_D=128, ROTATE=rotate, CACHED=cached, DOT_F32=False, DOT_PREC="ieee")
    for kern, kind in ((K._attn_fwd_kernel, "fwd"), (K._attn_bwd_kernel, "dkdv")):
        extra = dict(SCALE_NEG=False) if kind == "fwd" else {}
        shortlist = K._make_prune(kind)(kern.configs, {}, BLOCK_D=128, ROTATE=rotate)
        assert 1 <= len(shortlist) <= 3, (kind, shortlist)
        for i, cfg in enumerate(shortlist):
            built = build(kern, dict(c, **extra), cfg, first=i == 0)
            if kind == "dkdv":  # five matmuls per tile, in the full-block and the tail step
                assert built.asm["ttir"].count("tt.dot ") == 10, "backward: not 5 matmuls per tile"
    # the fp32 dq accumulator -> dq pass (no dot)
    build(K._attn_bwd_dq_kernel, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, ROTATE=rotate),
          triton.Config({}, num_warps=4, num_stages=1), first=False)
'''


def test_first_call_compiles_few_configs():
    """The prune keyed by head dim, dtype and ROTATE leaves at most three candidates per kernel
    for the first call (not every config), all from the ROTATE list and within shared memory."""
    import triton

    for kind, gpu in (("fwd", K._FWD_GPU), ("dkdv", K._DKDV_GPU)):
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in dict.fromkeys(gpu[False] + gpu[True])]
        for rotate in (False, True):
            for d, dtype in ((128, torch.bfloat16), (64, torch.float16), (256, torch.bfloat16),
                             (128, torch.float32)):
                q = torch.empty(0, dtype=dtype)
                kept = K._make_prune(kind)(configs, {"p_q": q}, BLOCK_D=d, ROTATE=rotate)
                assert 1 <= len(kept) <= K._FIRST_CALL == 3, (kind, rotate, d, dtype, kept)
                for c in kept:
                    shape = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                    assert shape in gpu[rotate], (kind, rotate, shape)
                    assert K._smem_estimate(kind, c, d, q.element_size(), rotate) <= K._SMEM_LIMIT


def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: build PTX + cubin for sm_90 (H100/H200)
    ahead of time for every autotune candidate the first call compiles at D = 128 bf16 (at most
    three per kernel), plain and with fused rotation + cache, and check the wgmma path, the
    shared-memory budget and that no config spills registers."""
    run_sm90_build(_SM90_COMPILE)


# =========================================================================== GPU only


def _gpu_joint(layout, b, h, d, dtype, rope, fused_qkv=False):
    """On the GPU the truth is the fp32 reference (fp64 N x N would not fit for long clips)."""
    nv, n = layout.num_video, layout.num_tokens
    cos = sin = None
    if rope != "none":
        _, cos, sin = rope_tables(layout, d, device="cuda")
    q, k, v = (t.cuda() for t in _make_qkv(b, n, h, d, torch.float32, fused_qkv))
    do = torch.randn(b, n, h, d, device="cuda")
    t_in = _leaves(q, k, v)
    truth = wk.asym_attention(*t_in, nv, cos, sin, backend="reference")
    t_grads = _grads(truth, do, t_in)
    ins = _leaves(q, k, v, dtype=dtype)
    out = K.asym_attention_triton(*ins, nv, cos, sin, rope_mode=rope if rope != "none" else None)
    grads = _grads(out, do.to(dtype), ins)
    r_in = _leaves(q, k, v, dtype=dtype)
    ref = wk.asym_attention(*r_in, nv, cos, sin, backend="reference")
    r_grads = _grads(ref, do.to(dtype), r_in)
    _check("out", out, ref, truth, dtype)
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, r_grads, t_grads):
        _check(name, g, rg, tg, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("layout, h, d, rope", [
    case(layout="wan720p-T4", H=4, D=128, rope="fused"),
    case(layout="wan720p-T4", H=4, D=128, rope="prologue"),
    case(layout="wan720p-T4", H=2, D=128, rope="none"),
    case(layout="odd", H=3, D=64, rope="fused"),
    case(layout="odd", H=2, D=96, rope="none"),
    case(layout="odd", H=1, D=256, rope="fused"),
])
def test_asym_attention_gpu(layout, h, d, rope, dtype):
    _gpu_joint(GPU_LAYOUTS[layout], 1, h, d, dtype, rope)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_asym_attention_gpu_fused_qkv(dtype):
    _gpu_joint(GPU_LAYOUTS["odd"], 2, 4, 128, dtype, "fused", fused_qkv=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rope", ["fused", "prologue"])
def test_cached_gpu(rope, dtype):
    layout = GPU_LAYOUTS["wan720p-T4"]
    nv, nr, h, d = layout.num_video, layout.num_ref, 4, 128
    _, cos, sin = rope_tables(wk.TokenLayout(layout.video), d, device="cuda")
    q, k, v = (t.cuda() for t in _make_qkv(1, nv, h, d, torch.float32))
    rk, rv = (t.cuda() for t in _make_qkv(1, nr, h, d, torch.float32)[:2])
    do = torch.randn(1, nv, h, d, device="cuda")
    t_in = _leaves(q, k, v, rk, rv)
    truth = wk.cached_asym_attention(*t_in, cos, sin, backend="reference")
    t_grads = _grads(truth, do, t_in)
    ins = _leaves(q, k, v, rk, rv, dtype=dtype)
    out = K.cached_asym_attention_triton(*ins, cos, sin, rope_mode=rope)
    grads = _grads(out, do.to(dtype), ins)
    r_in = _leaves(q, k, v, rk, rv, dtype=dtype)
    ref = wk.cached_asym_attention(*r_in, cos, sin, backend="reference")
    r_grads = _grads(ref, do.to(dtype), r_in)
    _check("out", out, ref, truth, dtype)
    for name, g, rg, tg in zip(("dq_v", "dk_v", "dv_v", "dref_k", "dref_v"), grads, r_grads, t_grads):
        _check(name, g, rg, tg, dtype)


@pytest.mark.gpu
def test_torch_compile_inductor_gpu():
    """fullgraph Inductor compile around the op on CUDA: no graph break, same result."""
    layout = GPU_LAYOUTS["odd"]
    _, cos, sin = rope_tables(layout, 64, device="cuda")
    q, k, v = (t.cuda().to(torch.bfloat16).requires_grad_()
               for t in _make_qkv(1, layout.num_tokens, 2, 64, torch.float32))

    def loss(q, k, v):
        o = wk.asym_attention(q * 1.0, k, v, layout.num_video, cos, sin)
        return (o.float() ** 2).sum()

    torch._dynamo.reset()
    gc = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    ge = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b_ in zip(gc, ge):
        assert_close_verbose(a, b_, atol=2e-2, rtol=2e-2, name="compiled grad")
