"""Triton I-RoPE kernels against the PyTorch reference and an fp64 ground truth.

Every check follows flash-attn's rule: the kernel's error against the fp64 truth is at most twice
the error of the reference run in the same dtype (plus a small atol), for the forward and for
every gradient. Positions come from real token layouts (video + face/body references), token
counts are not block multiples, and ``nan_empty`` makes any element a kernel forgets to write
show up as NaN. Under the CPU interpreter the file checks fp32 and fp16; bf16 and model-sized
shapes are GPU-marked. The kernels' inputs live on ``helpers.DEVICE`` (CUDA when present).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CPU_DTYPES,
    DEVICE,
    GPU_DTYPES,
    GPU_LAYOUTS,
    LAYOUTS,
    assert_close_verbose,
    assert_within_baseline,
    case,
    rope_fp64,
    rope_tables,
    run_sm90_build,
)

import wildactor_kernels as wk
from wildactor_kernels.rope import apply_rope_ref, qk_norm_rope_ref

pytestmark = pytest.mark.usefixtures("nan_empty")

EPS = 1e-6

# Sanity bound against the reference itself (the baseline rule is the real criterion): about
# two ulps of the dtype, relative to each element and to the tensor's largest element. The
# second part matters for weight gradients, sums over tokens with cancellation, where the
# reference rounds each term to the input dtype and the kernel does not.
REF_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

def _leaf(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_()


def _check(name, out, ref, truth, dtype):
    """Kernel vs fp64 truth within 2x the reference's error; kernel close to the reference."""
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    assert_within_baseline(out, ref, truth, name=name)
    tol = REF_TOL[dtype]
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    assert_close_verbose(out, ref, atol=tol * max(scale, 1.0), rtol=tol, name=name + " vs reference")


def qk_norm_rope_fp64(x, w, pos, eps=EPS):
    """fp64 RMSNorm over H*D (optional weight) followed by fp64 I-RoPE."""
    b, n, h, d = x.shape
    xf = x.double().reshape(b, n, h * d)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        xf = xf * w.double()
    return rope_fp64(xf.reshape(b, n, h, d), pos, d)


# =========================================================================== apply_rope
def _run_apply_rope(make_x, layout, d, dtype, device=DEVICE):
    """``make_x(leaf)`` builds the kernel input (possibly a view) from one leaf tensor, so
    gradients are compared on the leaf, through the view."""
    pos, cos, sin = rope_tables(layout, d, device)
    base = torch.randn(make_x.leaf_shape, device=device)
    dy = torch.randn(make_x(base).shape, device=device)
    outs, grads = {}, {}
    for kind, dt in (("triton", dtype), ("ref", dtype), ("fp64", torch.float64)):
        leaf = _leaf(base, dt)
        x = make_x(leaf)
        if kind == "triton":
            y = wk.apply_rope(x, cos, sin, backend="triton")
            assert y.is_contiguous()
        elif kind == "ref":
            y = apply_rope_ref(x, cos, sin)
        else:  # the fp64 truth is computed on the CPU
            y = rope_fp64(x.cpu(), pos, d)
        outs[kind] = y
        (grads[kind],) = torch.autograd.grad(y, leaf, dy.to(y))
    _check("y", outs["triton"], outs["ref"], outs["fp64"], dtype)
    _check("dx", grads["triton"], grads["ref"], grads["fp64"], dtype)


class _Plain:
    """x = the leaf itself, contiguous [B, N, H, D]."""

    def __init__(self, b, n, h, d):
        self.leaf_shape = (b, n, h, d)

    def __call__(self, leaf):
        return leaf


class _FusedQKVSlice:
    """x = k out of a fused projection [B, N, 3, H, D]: token stride 3*H*D, not contiguous."""

    def __init__(self, b, n, h, d):
        self.leaf_shape = (b, n, 3, h, d)

    def __call__(self, leaf):
        return leaf[:, :, 1]


class _TransposedBack:
    """x = a [B, H, N, D] tensor transposed to [B, N, H, D] (strides (HND, D, ND, 1))."""

    def __init__(self, b, n, h, d):
        self.leaf_shape = (b, h, n, d)

    def __call__(self, leaf):
        return leaf.transpose(1, 2)


class _StridedLastDim:
    """x with a stride-2 head dim: the launcher copies it (documented slow path)."""

    def __init__(self, b, n, h, d):
        self.leaf_shape = (b, n, h, 2 * d)

    def __call__(self, leaf):
        return leaf[..., ::2]


ROPE_SHAPES = [
    case(B=2, layout="Nv15-Nr22", H=3, D=24),
    case(B=2, layout="Nv189-Nr22", H=1, D=64),
    case(B=3, layout="Nv15-Nr22", H=3, D=8),
    case(B=2, layout="Nv15-Nr22", H=1, D=16),
    case(B=1, layout="Nv189-Nr22", H=3, D=128),
    case(B=2, layout="Nv40-Nr0", H=3, D=128),
    case(B=2, layout="Nv0-Nr18", H=1, D=64),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("b, layout, h, d", ROPE_SHAPES)
def test_apply_rope(b, layout, h, d, dtype):
    n = LAYOUTS[layout].num_tokens
    _run_apply_rope(_Plain(b, n, h, d), layout, d, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("view", [
    pytest.param(_FusedQKVSlice, id="fused-qkv-slice"),
    pytest.param(_TransposedBack, id="transposed-back"),
    pytest.param(_StridedLastDim, id="strided-last-dim"),
])
def test_apply_rope_non_contiguous(view, dtype):
    b, layout, h, d = 2, "Nv15-Nr22", 3, 24
    make_x = view(b, LAYOUTS[layout].num_tokens, h, d)
    assert not make_x(torch.empty(make_x.leaf_shape, device=DEVICE)).is_contiguous()
    _run_apply_rope(make_x, layout, d, dtype)


# =========================================================================== qk_norm_rope
def _run_qk_norm_rope(b, layout, h, d, dtype, weights="both", fused=False, weight_dtype=None,
                      device=DEVICE):
    """Forward and every gradient of the fused q/k RMSNorm + I-RoPE, three ways.

    ``weights``: "both", "none" or "q-only"; ``fused``: q and k are slices of one [B, N, 3, H, D]
    leaf (gradients are then compared on that leaf).
    """
    pos, cos, sin = rope_tables(layout, d, device)
    n = pos.shape[0]
    weight_dtype = weight_dtype or dtype
    if fused:
        base = [torch.randn(b, n, 3, h, d, device=device)]
    else:
        base = [torch.randn(b, n, h, d, device=device), torch.randn(b, n, h, d, device=device)]
    # Weights near 1 as trained norms are, but not 1, so a dropped weight shows.
    w_base = [1 + 0.5 * torch.randn(h * d, device=device) for _ in range(2)]
    w_given = {"both": (True, True), "none": (False, False), "q-only": (True, False)}[weights]
    dys = [torch.randn(b, n, h, d, device=device) for _ in range(2)]

    outs, grads = {}, {}
    for kind, dt, wdt in (("triton", dtype, weight_dtype), ("ref", dtype, weight_dtype),
                          ("fp64", torch.float64, torch.float64)):
        leaves = [_leaf(t, dt) for t in base]
        q, k = (leaves[0][:, :, 0], leaves[0][:, :, 1]) if fused else leaves
        ws = [_leaf(w, wdt) if g else None for w, g in zip(w_base, w_given)]
        if kind == "triton":
            y = wk.qk_norm_rope(q, k, ws[0], ws[1], cos, sin, eps=EPS, backend="triton")
            assert all(t.is_contiguous() for t in y)
        elif kind == "ref":
            y = qk_norm_rope_ref(q, k, ws[0], ws[1], cos, sin, EPS)
        else:
            ws_cpu = [None if w is None else w.cpu() for w in ws]
            y = (qk_norm_rope_fp64(q.cpu(), ws_cpu[0], pos), qk_norm_rope_fp64(k.cpu(), ws_cpu[1], pos))
        inputs = leaves + [w for w in ws if w is not None]
        outs[kind] = y
        grads[kind] = torch.autograd.grad(y, inputs, [dy.to(t) for dy, t in zip(dys, y)])

    for name, i in (("q'", 0), ("k'", 1)):
        _check(name, outs["triton"][i], outs["ref"][i], outs["fp64"][i], dtype)
    names = (["dqkv"] if fused else ["dq", "dk"]) + [f"d{w}_weight" for w, g in zip("qk", w_given) if g]
    for name, gt, gr, g64 in zip(names, grads["triton"], grads["ref"], grads["fp64"]):
        # The activations' dtype sets the precision of every term, weight gradients included.
        _check(name, gt, gr, g64, dtype)


QK_SHAPES = [
    case(B=2, layout="Nv15-Nr22", H=3, D=24, weights="both"),
    case(B=2, layout="Nv189-Nr22", H=1, D=64, weights="both"),
    case(B=3, layout="Nv15-Nr22", H=3, D=128, weights="none"),
    case(B=2, layout="Nv15-Nr22", H=1, D=8, weights="both"),
    case(B=2, layout="Nv0-Nr18", H=3, D=16, weights="both"),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("b, layout, h, d, weights", QK_SHAPES)
def test_qk_norm_rope(b, layout, h, d, weights, dtype):
    _run_qk_norm_rope(b, layout, h, d, dtype, weights=weights)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_qk_norm_rope_fused_qkv_views(dtype):
    _run_qk_norm_rope(2, "Nv15-Nr22", 3, 24, dtype, weights="both", fused=True)


def test_qk_norm_rope_wan14b_width():
    """H*D = 5120 (Wan-14B: 40 heads x 128): the norm spans several head chunks, the last one
    partly masked. Few tokens keep the interpreter quick."""
    _run_qk_norm_rope(1, "Nv0-Nr18", 40, 128, torch.float32, weights="both")


def test_qk_norm_rope_one_weight_fp32_weights_fp16_inputs():
    """Only q has a norm weight, kept in fp32 (master weights) while activations are fp16."""
    _run_qk_norm_rope(2, "Nv15-Nr22", 3, 16, torch.float16, weights="q-only", weight_dtype=torch.float32)


def test_qk_norm_rope_rejects_mixed_dtypes():
    _, cos, sin = rope_tables("Nv15-Nr22", 16)
    q = torch.randn(1, 37, 2, 16, device=DEVICE)
    with pytest.raises(TypeError, match="dtype"):
        wk.qk_norm_rope(q, q.half(), None, None, cos, sin, backend="triton")


def test_broadcast_grads_and_empty_sequences():
    """``loss = y.sum()`` hands the backward a stride-0 (expanded) gradient; N = 0 launches nothing."""
    _, cos, sin = rope_tables("Nv15-Nr22", 16)
    x = torch.randn(2, 37, 3, 16, device=DEVICE, requires_grad=True)
    wk.apply_rope(x, cos, sin, backend="triton").sum().backward()
    gx = x.grad.clone()
    x.grad = None
    apply_rope_ref(x, cos, sin).sum().backward()
    assert_close_verbose(gx, x.grad, atol=1e-5, rtol=1e-5, name="dx (expanded dy)")

    q, k = (torch.randn(2, 37, 3, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    w = torch.rand(48, device=DEVICE, requires_grad=True)
    qo, ko = wk.qk_norm_rope(q, k, w, None, cos, sin, backend="triton")
    got = torch.autograd.grad(qo.sum() + ko.sum(), (q, k, w))
    qo, ko = qk_norm_rope_ref(q, k, w, None, cos, sin)
    want = torch.autograd.grad(qo.sum() + ko.sum(), (q, k, w))
    for name, a, e in zip(("dq", "dk", "dw"), got, want):
        assert_close_verbose(a, e, atol=1e-4, rtol=1e-4, name=name + " (expanded dy)")

    x0 = torch.randn(2, 0, 3, 16, device=DEVICE, requires_grad=True)
    cos0, sin0 = cos[:0], sin[:0]
    y0 = wk.apply_rope(x0, cos0, sin0, backend="triton")
    assert y0.shape == x0.shape
    y0.sum().backward()
    q0, k0 = (torch.randn(2, 0, 3, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    w0 = torch.rand(48, device=DEVICE, requires_grad=True)
    out = wk.qk_norm_rope(q0, k0, w0, w0, cos0, sin0, backend="triton")
    dw0 = torch.autograd.grad(out[0].sum() + out[1].sum(), w0)[0]
    assert torch.equal(dw0, torch.zeros_like(dw0))


# =========================================================================== GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("b, h, d", [pytest.param(1, 24, 128, id="B1-H24-D128"),
                                     pytest.param(2, 12, 80, id="B2-H12-D80")])
def test_apply_rope_gpu(b, h, d, dtype):
    layout = GPU_LAYOUTS["wan720p-T4"]
    _run_apply_rope(_Plain(b, layout.num_tokens, h, d), layout, d, dtype, device="cuda")
    _run_apply_rope(_FusedQKVSlice(b, layout.num_tokens, h, d), layout, d, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("h, d, weights, fused", [
    pytest.param(40, 128, "both", True, id="H40-D128-14b-fused-qkv"),  # H*D = 5120
    pytest.param(24, 128, "none", False, id="H24-D128-5b-no-weight"),
    pytest.param(12, 96, "both", False, id="H12-D96"),
])
def test_qk_norm_rope_gpu(h, d, weights, fused, dtype):
    _run_qk_norm_rope(1, GPU_LAYOUTS["wan720p-T4"], h, d, dtype, weights=weights, fused=fused,
                      device="cuda")


# =========================================================================== compile for sm_90
_SM90_COMPILE = r'''
import os, sys
os.environ["TRITON_INTERPRET"] = "0"  # real JITFunctions, not interpreted ones
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wildactor_kernels.rope import kernels as K

def jit(f):
    while not isinstance(f, triton.runtime.jit.JITFunction):
        f = f.fn
    return f

def build(f, types, consts, num_warps):
    fn = jit(f)
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    # what Triton's launcher infers for 16-aligned pointers and strides divisible by 16
    div = [i for i, a in enumerate(fn.arg_names) if a not in consts and a != "eps"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in div}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = k.asm["ptx"]
    assert ".v4." in ptx or "v4.b32" in ptx, f"{fn.__name__}: no vectorised global loads"
    print(fn.__name__, "ok")

x = "*bf16"
build(K._rope_kernel, dict(p_x=x, p_cos="*fp32", p_sin="*fp32", p_y=x),
      dict(CONJ=True, D_PAD=128, BLOCK_N=8, BLOCK_H=4), 4)
build(K._qk_norm_rope_fwd_kernel,
      dict(p_q=x, p_k=x, p_w="*fp32", p_cos="*fp32", p_sin="*fp32", p_yq=x, p_yk=x, p_rstd="*fp32",
           eps="fp32"),
      dict(HAS_WEIGHT=True, D_PAD=128, BLOCK_N=4, BLOCK_H=8), 4)
build(K._qk_norm_rope_bwd_kernel,
      dict(p_q=x, p_k=x, p_dyq=x, p_dyk=x, p_w="*fp32", p_cos="*fp32", p_sin="*fp32",
           p_rstd="*fp32", p_dq=x, p_dk=x, p_dw="*fp32"),
      dict(HAS_WEIGHT=True, D_PAD=32, BLOCK_N=4, BLOCK_H=32), 8)
'''


def test_kernels_compile_for_sm90():
    """The interpreter does not run Triton's compiler: build PTX + cubin for sm_90 (H100/H200)
    ahead of time, so a kernel that only the GPU toolchain rejects fails here too."""
    run_sm90_build(_SM90_COMPILE)
