"""torch.library custom ops and torch.compile(fullgraph=True) across the library and the model.

Every Triton entry point runs through ``torch.ops.wildactor.*`` custom ops with fake (meta)
kernels and registered autograd, so dynamo never enters a launcher or Triton's runtime:

- ``torch.library.opcheck`` validates schema, fake kernels, autograd registration and AOT
  dispatch of each op (small fp32 shapes);
- ``torch.compile(fullgraph=True, backend="aot_eager")`` of apply_rope, qk_norm_rope,
  ref_lora_linear (and the folded variant), asym_attention / cached_asym_attention in both rope
  modes, per_token_quant_fp8 and a ``Float8Linear`` with the Triton activation path, and a whole
  tiny WildActor (joint path with references, cached path): forward and
  gradients equal eager, and ``torch._dynamo.explain`` sees one graph and no break. On CPU the
  kernels run under the Triton interpreter (``aot_eager``: AOT autograd, no code generation);
  the ``gpu`` tests repeat the compile checks with Inductor on CUDA.

Every tensor and model that reaches a Triton path lives on ``helpers.DEVICE`` (CUDA when present).
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close_verbose
from wildactor_kernels.model import Reference, WildActor, WildActorConfig

import wildactor_kernels as wk
from wildactor_kernels import _utils
from wildactor_kernels.attention import kernels as attn_kernels
from wildactor_kernels.attention import op as attn_op
from wildactor_kernels.lora.kernels import ref_folded_linear_triton
from wildactor_kernels.rope import kernels as _rope_kernels  # noqa: F401  (registers the rope ops)

HAS_CUDA = torch.cuda.is_available()
ops = torch.ops.wildactor  # the ops register when their kernels module is imported


# =========================================================================== helpers
def _tables(layout: wk.TokenLayout, d: int, device=DEVICE):
    pos = wk.irope_positions(layout, face_offset=1, body_offset=2, spatial_shift=True)
    cos, sin = wk.rope_cos_sin(pos, d)
    return cos.to(device), sin.to(device)


def _leaf(*shape, scale=1.0, dtype=torch.float32, device=DEVICE):
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype).requires_grad_()


def _as_tuple(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _assert_one_graph(fn, *args):
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args)
    reasons = [str(r.reason)[:500] for r in ex.break_reasons]
    assert ex.graph_break_count == 0 and ex.graph_count == 1, (ex.graph_count, reasons)


def _check_compiled(fn, args, wrt, backend="aot_eager", atol=1e-6, rtol=0.0, explain=True):
    """``fn(*args)`` compiled with fullgraph equals eager: outputs and the grads of ``wrt`` under
    a random cotangent; optionally ``explain`` reports one graph and no break."""
    if explain:
        _assert_one_graph(fn, *args)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    out_c = _as_tuple(compiled(*args))
    out_e = _as_tuple(fn(*args))
    cot = [torch.randn_like(o, dtype=torch.float32) for o in out_e]
    for i, (c, e) in enumerate(zip(out_c, out_e)):
        assert_close_verbose(c, e, atol=atol, rtol=rtol, name=f"compiled output {i}")

    def grads(outs):
        loss = sum((o.float() * g).sum() for o, g in zip(outs, cot))
        return torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)

    for i, (gc, ge) in enumerate(zip(grads(out_c), grads(out_e))):
        assert_close_verbose(gc, ge, atol=atol, rtol=rtol, name=f"compiled grad {i}")


# =========================================================================== registration
def test_triton_available_is_a_constant():
    assert isinstance(_utils._TRITON_AVAILABLE, bool)
    assert _utils.triton_available() is _utils._TRITON_AVAILABLE
    assert not hasattr(_utils.triton_available, "cache_info")  # no lru_cache for dynamo to trip on


def test_ops_registered():
    for name in ("apply_rope_fwd", "apply_rope_bwd", "qk_norm_rope_fwd", "qk_norm_rope_bwd",
                 "ref_lora_linear_fwd", "ref_lora_linear_bwd", "ref_folded_linear_fwd",
                 "ref_folded_linear_bwd", "asym_attention_fwd", "asym_attention_bwd",
                 "cached_asym_attention_fwd", "cached_asym_attention_bwd"):
        assert hasattr(ops, name), name


def test_opcheck_rope_ops():
    b, n, h, d = 1, 10, 2, 8
    ang = torch.rand(n, d // 2, device=DEVICE) * 3
    cos, sin = ang.cos(), ang.sin()
    x = _leaf(b, n, h, d)
    torch.library.opcheck(ops.apply_rope_fwd.default, (x, cos, sin))
    torch.library.opcheck(ops.apply_rope_bwd.default, (x, cos, sin))
    # a strided view (fused QKV layout) and an fp16 input
    qkv = torch.randn(b, n, 3, h, d, device=DEVICE)
    torch.library.opcheck(ops.apply_rope_fwd.default, (qkv[:, :, 1], cos, sin))
    torch.library.opcheck(ops.apply_rope_fwd.default, (_leaf(b, n, h, d, dtype=torch.float16), cos, sin))

    q, k = _leaf(b, n, h, d), _leaf(b, n, h, d)
    wq, wk_ = _leaf(h * d, scale=0.2), _leaf(h * d, scale=0.2)
    with torch.no_grad():
        wq += 1
        wk_ += 1
    for weights in ((wq, wk_), (None, None), (wq, None), (None, wk_)):
        torch.library.opcheck(ops.qk_norm_rope_fwd.default, (q, k, *weights, cos, sin, 1e-6))
    yq, yk, rstd = ops.qk_norm_rope_fwd(q, k, wq, wk_, cos, sin, 1e-6)
    dy = [torch.randn(b, n, h, d, device=DEVICE) for _ in range(2)]
    for weights in ((wq.detach(), wk_.detach()), (None, None)):
        torch.library.opcheck(ops.qk_norm_rope_bwd.default,
                              (*dy, q.detach(), k.detach(), *weights, cos, sin, rstd.detach()))


@pytest.mark.parametrize("nv", [7, 0, 12], ids=["mixed", "refs-only", "video-only"])
def test_opcheck_lora_ops(nv):
    b, n, din, dout, r = 2, 12, 16, 24, 4
    x, w, bias = _leaf(b, n, din), _leaf(dout, din, scale=0.25), _leaf(dout, scale=0.1)
    a, lb = _leaf(r, din, scale=0.25), _leaf(dout, r, scale=0.5)
    torch.library.opcheck(ops.ref_lora_linear_fwd.default, (x, w, bias, a, lb, 0.5, nv))
    torch.library.opcheck(ops.ref_lora_linear_fwd.default, (x, w, None, a, lb, 2.0, nv))
    dy = torch.randn(b, n, dout, device=DEVICE)
    for need_dx in (True, False):
        torch.library.opcheck(ops.ref_lora_linear_bwd.default,
                              (dy, w.detach(), a.detach(), lb.detach(), 0.5, nv, need_dx))
    w_ref = _leaf(dout, din, scale=0.25)
    torch.library.opcheck(ops.ref_folded_linear_fwd.default, (x, w, w_ref, bias, nv))
    torch.library.opcheck(ops.ref_folded_linear_bwd.default, (dy, w.detach(), w_ref.detach(), nv))


def test_fake_kernels_never_launch():
    """Meta tensors (e.g. ``WildActor(device="meta")``) get shapes from the fake kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for mode in (FakeTensorMode(), None):
        ctx = mode if mode is not None else torch.device("meta")
        with ctx:
            x = torch.empty(2, 9, 3, 24, dtype=torch.bfloat16)
            cos = torch.empty(9, 12)
            w = torch.empty(72)
            assert ops.apply_rope_fwd(x, cos, cos).shape == x.shape
            yq, yk, rstd = ops.qk_norm_rope_fwd(x, x, w, None, cos, cos, 1e-6)
            assert yq.shape == yk.shape == x.shape and yq.dtype == x.dtype
            assert rstd.shape == (2, 2, 9) and rstd.dtype == torch.float32
            dq, dk, dw = ops.qk_norm_rope_bwd(x, x, x, x, None, None, cos, cos, rstd)
            assert dq.shape == x.shape and dw.shape == (2, 0)
            h = torch.empty(2, 9, 40, dtype=torch.float16)
            y, t = ops.ref_lora_linear_fwd(h, torch.empty(56, 40), None, torch.empty(8, 40),
                                           torch.empty(56, 8), 1.0, 5)
            assert y.shape == (2, 9, 56) and t.shape == (2, 4, 8) and y.dtype == torch.float16
            dx, u = ops.ref_lora_linear_bwd(y, torch.empty(56, 40), torch.empty(8, 40),
                                            torch.empty(56, 8), 1.0, 5, True)
            assert dx.shape == h.shape and u.shape == (2, 4, 8)


def test_rope_double_backward():
    """apply_rope's backward is the apply_rope_bwd op, itself differentiable."""
    layout = wk.TokenLayout((1, 2, 3), [("face", 1, 2)])
    cos, sin = _tables(layout, 16)
    x = _leaf(1, layout.num_tokens, 2, 16)
    g = torch.randn_like(x, requires_grad=True)
    hh = torch.randn_like(x)
    res = []
    for backend in ("triton", "reference"):
        gx, = torch.autograd.grad(wk.apply_rope(x, cos, sin, backend=backend), x, g, create_graph=True)
        res.append(torch.autograd.grad((gx * hh).sum(), g)[0])
    assert_close_verbose(res[0], res[1], atol=1e-6, name="d(dx)/d(dy)")


_FRESH_PROCESS = r"""
import os, sys
dev = os.environ["WILDACTOR_TEST_DEVICE"]  # helpers.DEVICE of the parent
os.environ["TRITON_INTERPRET"] = "1" if dev == "cpu" else "0"  # the interpreter only on the CPU
import torch
import wildactor_kernels as wk
assert "wildactor_kernels.rope.kernels" not in sys.modules  # the kernels import lazily
layout = wk.TokenLayout((1, 2, 3), [("face", 1, 2)])
cos, sin = (t.to(dev) for t in wk.rope_cos_sin(wk.irope_positions(layout), 16))
q, k = (torch.randn(1, layout.num_tokens, 2, 16, device=dev, requires_grad=True) for _ in range(2))
w = torch.ones(32, device=dev, requires_grad=True)

def f(q, k, w):
    a, b = wk.qk_norm_rope(q, k, w, None, cos, sin, backend="triton")
    o = wk.asym_attention(a, b, q, layout.num_video, cos, sin, backend="triton")
    return wk.ref_lora_linear(o.flatten(2), torch.eye(32, device=dev), None, torch.ones(2, 32, device=dev),
                              torch.ones(32, 2, device=dev), 1.0, layout.num_video, backend="triton")

y = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, w)
y.square().sum().backward()
assert all(t.grad is not None for t in (q, k, w))
print("ok")
"""


def test_compile_first_call_imports_kernels():
    """In a fresh process the first Triton call may happen inside torch.compile: dynamo runs the
    lazy ``from .kernels import ...`` (which registers the ops) and still captures one graph."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1" if DEVICE.type == "cpu" else "0",
               WILDACTOR_TEST_DEVICE=DEVICE.type,
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr[-3000:]


# =========================================================================== rope_mode argument
def test_rope_mode_argument():
    assert attn_op.ROPE_MODES == attn_kernels.ROPE_MODES
    layout = wk.TokenLayout((1, 2, 5), [("face", 2, 2)])
    cos, sin = _tables(layout, 16)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 16, device=DEVICE) for _ in range(3))
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match="rope_mode"):
            wk.asym_attention(q, k, v, layout.num_video, cos, sin, backend=backend, rope_mode="inline")
        with pytest.raises(ValueError, match="rope_mode"):
            wk.cached_asym_attention(q, k, v, k, v, cos, sin, backend=backend, rope_mode="Fused")
    ref = wk.asym_attention(q, k, v, layout.num_video, cos, sin, backend="reference", rope_mode="fused")
    for mode in ("fused", "prologue", None):
        out = wk.asym_attention(q, k, v, layout.num_video, cos, sin, backend="triton", rope_mode=mode)
        assert_close_verbose(out, ref, atol=2e-5, name=f"asym rope_mode={mode}")
    nv = layout.num_video
    rk, rv = torch.randn(1, 4, 2, 16, device=DEVICE), torch.randn(1, 4, 2, 16, device=DEVICE)
    ref = wk.cached_asym_attention(q[:, :nv], k[:, :nv], v[:, :nv], rk, rv, cos[:nv], sin[:nv],
                                   backend="reference")
    for mode in ("fused", "prologue"):
        out = wk.cached_asym_attention(q[:, :nv], k[:, :nv], v[:, :nv], rk, rv, cos[:nv], sin[:nv],
                                       backend="triton", rope_mode=mode)
        assert_close_verbose(out, ref, atol=2e-5, name=f"cached rope_mode={mode}")


def test_rope_mode_is_passed_through(monkeypatch):
    seen = []
    real = attn_kernels.asym_attention_triton
    monkeypatch.setattr(attn_kernels, "asym_attention_triton",
                        lambda *a, rope_mode=None, **kw: seen.append(rope_mode) or real(*a, **kw))
    q = torch.randn(1, 6, 1, 8, device=DEVICE)
    for mode in ("fused", "prologue", None):
        wk.asym_attention(q, q, q, 4, backend="triton", rope_mode=mode)
    assert seen == ["fused", "prologue", None]


# =========================================================================== compile: ops
def test_compile_apply_rope():
    layout = wk.TokenLayout((1, 3, 3), [("face", 2, 2)])
    cos, sin = _tables(layout, 24)
    qkv = _leaf(2, layout.num_tokens, 3, 2, 24)  # a strided view, as the model's fused QKV

    def fn(qkv):
        return wk.apply_rope(qkv[:, :, 1] * 2.0, cos, sin, backend="triton")

    _check_compiled(fn, (qkv,), (qkv,))


def test_compile_qk_norm_rope():
    layout = wk.TokenLayout((1, 2, 3), [("face", 2, 2), ("body", 1, 3)])
    cos, sin = _tables(layout, 16)
    q, k = _leaf(2, layout.num_tokens, 3, 16), _leaf(2, layout.num_tokens, 3, 16)
    wq, wk_ = _leaf(48, scale=0.1), _leaf(48, scale=0.1)

    def fn(q, k, wq, wk_):
        return wk.qk_norm_rope(q, k, wq + 1.0, wk_ + 1.0, cos, sin, 1e-6, backend="triton")

    _check_compiled(fn, (q, k, wq, wk_), (q, k, wq, wk_), atol=1e-5)


def test_compile_ref_lora_linear():
    nv, nr, din, dout, r = 9, 5, 24, 40, 4
    x, w, b = _leaf(2, nv + nr, din), _leaf(dout, din, scale=0.2), _leaf(dout, scale=0.1)
    a, lb = _leaf(r, din, scale=0.2), _leaf(dout, r, scale=0.5)

    def fn(x, w, b, a, lb):
        return wk.ref_lora_linear(x, w, b, a, lb, 0.5, nv, backend="triton")

    _check_compiled(fn, (x, w, b, a, lb), (x, w, b, a, lb), atol=1e-5)


def test_compile_folded_linear():
    nv, nr, din, dout = 9, 5, 24, 40
    x, w, w_ref, b = (_leaf(2, nv + nr, din), _leaf(dout, din, scale=0.2),
                      _leaf(dout, din, scale=0.2), _leaf(dout, scale=0.1))

    def fn(x, w, w_ref, b):
        return ref_folded_linear_triton(x, w, w_ref, b, nv)

    _check_compiled(fn, (x, w, w_ref, b), (x, w, w_ref, b), atol=1e-5)


@pytest.mark.parametrize("rope_mode", ["fused", "prologue"])
def test_compile_asym_attention(rope_mode):
    layout = wk.TokenLayout((1, 3, 5), [("face", 2, 2), ("body", 1, 3)])
    cos, sin = _tables(layout, 16)
    q, k, v = (_leaf(1, layout.num_tokens, 2, 16) for _ in range(3))

    def fn(q, k, v):
        return wk.asym_attention(q, k, v, layout.num_video, cos, sin, backend="triton",
                                 rope_mode=rope_mode)

    _check_compiled(fn, (q, k, v), (q, k, v), atol=1e-5)


@pytest.mark.parametrize("rope_mode", ["fused", "prologue"])
def test_compile_cached_asym_attention(rope_mode):
    layout = wk.TokenLayout((1, 3, 5))
    cos, sin = _tables(layout, 16)
    q, k, v = (_leaf(1, layout.num_tokens, 2, 16) for _ in range(3))
    rk, rv = _leaf(1, 6, 2, 16), _leaf(1, 6, 2, 16)

    def fn(q, k, v, rk, rv):
        return wk.cached_asym_attention(q, k, v, rk, rv, cos, sin, backend="triton", rope_mode=rope_mode)

    _check_compiled(fn, (q, k, v, rk, rv), (q, k, v, rk, rv), atol=1e-5)


# =========================================================================== compile: the model
def _tiny_model(device=DEVICE, dtype=torch.float32, backend="triton"):
    torch.manual_seed(0)
    m = WildActor(WildActorConfig.preset("tiny")).to(device=device, dtype=dtype)
    with torch.no_grad():  # non-zero lora_B: the adapters change the output and get grads
        for name, p in m.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    m.set_backend(backend)
    return m


def _model_inputs(device=DEVICE, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 4, 2, 4, 6, generator=g).to(device, dtype)  # grid (2, 2, 3): Nv = 12
    ctx = torch.randn(1, 5, 32, generator=g).to(device, dtype)
    refs = [Reference("face", torch.randn(1, 4, 1, 4, 4, generator=g).to(device, dtype)),
            Reference("body", torch.randn(1, 4, 1, 2, 6, generator=g).to(device, dtype))]
    return lat, torch.tensor([700.0], device=device), ctx, refs


def test_compile_model_joint_path():
    """Joint path (video + references in one sequence): output and adapter grads as eager."""
    m = _tiny_model()
    lat, t, ctx, refs = _model_inputs()
    params = list(m.trainable_parameters())
    assert params and all(p.requires_grad for p in params)

    def fn(lat, t, ctx):
        return m(lat, t, ctx, refs=refs)

    with torch.no_grad():
        fn(lat, t, ctx)  # eager first call (the cold-cache case is its own test below)
    _check_compiled(fn, (lat, t, ctx), params, atol=2e-5, rtol=1e-4)


def test_compile_model_cached_path():
    """Cached path: reference K/V encoded once in eager, the denoiser compiled."""
    m = _tiny_model()
    lat, t, ctx, refs = _model_inputs()
    with torch.no_grad():
        cache = m.encode_references(refs)
        joint = m(lat, t, ctx, refs=refs)

    def fn(lat, t, ctx):
        return m(lat, t, ctx, ref_cache=cache)

    with torch.no_grad():
        assert_close_verbose(fn(lat, t, ctx), joint, atol=2e-5, name="cached vs joint (eager)")
        _assert_one_graph(fn, lat, t, ctx)
        torch._dynamo.reset()
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(lat, t, ctx)
    assert_close_verbose(out, joint, atol=2e-5, name="compiled cached vs joint")


def test_compile_model_cold_rope_cache():
    """The first call of a layout happens inside the compiled region: no graph break (the model
    reads its rope-table cache under torch.compile but never writes it)."""
    m = _tiny_model()
    lat, t, ctx, refs = _model_inputs()
    with torch.no_grad():
        cache = m.encode_references(refs)
        torch._dynamo.reset()
        joint = torch.compile(lambda a, b, c: m(a, b, c, refs=refs), fullgraph=True,
                              backend="aot_eager")(lat, t, ctx)
        torch._dynamo.reset()
        cached = torch.compile(lambda a, b, c: m(a, b, c, ref_cache=cache), fullgraph=True,
                               backend="aot_eager")(lat, t, ctx)
        eager = m(lat, t, ctx, refs=refs)
    assert_close_verbose(joint, eager, atol=2e-5, name="compiled joint (cold cache) vs eager")
    assert_close_verbose(cached, eager, atol=2e-5, name="compiled cached (cold cache) vs eager")


# =========================================================================== GPU: Inductor
def _gpu_leaf(*shape, scale=1.0):
    return _leaf(*shape, scale=scale, dtype=torch.bfloat16, device="cuda")


def _gpu_check(fn, args, wrt, atol, rtol):
    _check_compiled(fn, args, wrt, backend="inductor", atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_inductor_gpu_rope_ops():
    layout = wk.TokenLayout((2, 6, 8), [("face", 6, 8)])
    cos, sin = _tables(layout, 64, "cuda")
    n = layout.num_tokens
    x = _gpu_leaf(1, n, 3, 4, 64)
    wq, wk_ = _gpu_leaf(256, scale=0.1), _gpu_leaf(256, scale=0.1)

    def fn(x, wq, wk_):
        q, k = wk.qk_norm_rope(x[:, :, 0], x[:, :, 1], wq + 1.0, wk_ + 1.0, cos, sin)
        return q, k, wk.apply_rope(x[:, :, 2] * 1.5, cos, sin)

    _gpu_check(fn, (x, wq, wk_), (x, wq, wk_), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_inductor_gpu_ref_lora_linear():
    nv, nr, din, dout, r = 300, 70, 256, 512, 16
    x, w, b = _gpu_leaf(2, nv + nr, din), _gpu_leaf(dout, din, scale=0.06), _gpu_leaf(dout)
    a, lb = _gpu_leaf(r, din, scale=0.06), _gpu_leaf(dout, r, scale=0.25)

    def fn(x, w, b, a, lb):
        return torch.nn.functional.gelu(wk.ref_lora_linear(x, w, b, a, lb, 0.5, nv))

    _gpu_check(fn, (x, w, b, a, lb), (x, w, b, a, lb), atol=5e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("rope_mode", ["fused", "prologue"])
def test_inductor_gpu_attention(rope_mode):
    layout = wk.TokenLayout((2, 8, 9), [("face", 8, 9), ("body", 4, 9)])
    cos, sin = _tables(layout, 64, "cuda")
    n, nv = layout.num_tokens, layout.num_video
    q, k, v = (_gpu_leaf(1, n, 2, 64) for _ in range(3))

    def fn(q, k, v):
        joint = wk.asym_attention(q * 1.0, k, v, nv, cos, sin, rope_mode=rope_mode)
        cached = wk.cached_asym_attention(q[:, :nv], k[:, :nv], v[:, :nv], k[:, nv:], v[:, nv:],
                                          cos[:nv], sin[:nv], rope_mode=rope_mode)
        return joint, cached

    _gpu_check(fn, (q, k, v), (q, k, v), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["joint", "cached"])
def test_inductor_gpu_model(path):
    m = _tiny_model("cuda", torch.bfloat16, backend="auto")
    lat, t, ctx, refs = _model_inputs("cuda", torch.bfloat16)
    if path == "joint":
        def fn(lat, t, ctx):
            return m(lat, t, ctx, refs=refs)
        wrt = list(m.trainable_parameters())
    else:
        with torch.no_grad():
            cache = m.encode_references(refs)

        def fn(lat, t, ctx):
            return m(lat, t, ctx, ref_cache=cache)
        wrt = [lat.requires_grad_()]
    with torch.no_grad():
        fn(lat, t, ctx)  # warm the rope-table cache
    _gpu_check(fn, (lat, t, ctx), wrt, atol=5e-2, rtol=5e-2)


# =========================================================================== FP8 quantization
def _assert_same_fp8(got, want):
    (q, s), (qr, sr) = got, want
    assert q.dtype == qr.dtype == torch.float8_e4m3fn and q.shape == qr.shape
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), "fp8 codes differ"
    assert_close_verbose(s, sr, atol=0.0, rtol=0.0, name="scales")


def test_per_token_quant_op_registered():
    from wildactor_kernels.quant import kernels as _quant_kernels  # noqa: F401  (registers the op)

    assert hasattr(ops, "per_token_quant_fp8")


@pytest.mark.parametrize("dtype, pad_to", [(torch.float32, 1), (torch.bfloat16, 16)],
                         ids=["fp32", "bf16-pad16"])
def test_compile_per_token_quant_fp8(dtype, pad_to):
    """``per_token_quant_fp8(x, backend="triton")`` under fullgraph compile: one graph, no break,
    codes and scales bit-identical to eager."""
    from wildactor_kernels.quant import per_token_quant_fp8

    def fn(x):
        return per_token_quant_fp8(x, pad_to=pad_to, backend="triton")

    x = (torch.randn(2, 9, 45) * 3).to(device=DEVICE, dtype=dtype)
    _assert_one_graph(fn, x)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    _assert_same_fp8(got, fn(x))


@pytest.mark.parametrize("gemm", ["emulate", "scaled_mm"])
def test_compile_float8_linear_triton_act(gemm):
    """``Float8Linear`` with ``act_backend="triton"`` (the activation quantization is the custom
    op): fullgraph compile has one graph, output and input gradient equal eager. The
    GEMM path is resolved at conversion, so the forward takes no resolve branch."""
    from wildactor_kernels.model.quant import Float8Config, Float8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24).to(DEVICE)  # K = 40 and N = 24 exercise the _scaled_mm padding
    m = Float8Linear.from_float(lin, Float8Config(gemm=gemm, act_backend="triton"))
    assert m.gemm_path == gemm
    x = _leaf(2, 5, 40)
    _check_compiled(m, (x,), (x,))
