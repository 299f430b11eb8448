"""Triton reference-only LoRA kernels against the PyTorch reference and an fp64 ground truth.

flash-attn's rule throughout: the kernel's error against the fp64 truth is at most twice the
error of the reference backend run in the same dtype (plus a small atol), for the output and
for every gradient (x, lora_A, lora_B, and weight, bias when they require grad). Row counts
straddle every block size (37 video + 11 reference rows), the two degenerate layouts
(64/0: no references; 0/29: references only) are covered, ranks 1 (padded to 16 inside the
kernel), 8 and 128, Din/Dout that are not multiples of 16, batch > 1, strided x. ``nan_empty``
turns any element a kernel forgets to write into NaN. The CPU interpreter checks fp32 and
fp16 (and bf16 through the interpreter's fp32 upcast); native bf16 is GPU-marked. Every
tensor lives on ``helpers.DEVICE`` (CUDA when present).
"""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_DTYPES, DEVICE, assert_within_baseline, case, run_sm90_build

import wildactor_kernels as wk
from wildactor_kernels.lora.kernels import ref_folded_linear_triton, ref_lora_linear_triton
from wildactor_kernels.lora.reference import ref_lora_linear_ref

pytestmark = pytest.mark.usefixtures("nan_empty")


# (B, Nv, Nr, Din, Dout, rank, base weight/bias require grad)
CASES = [
    case(B=2, Nv=37, Nr=11, Din=72, Dout=200, r=8, gradW=True),
    case(B=2, Nv=37, Nr=11, Din=200, Dout=72, r=1, gradW=False),
    case(B=1, Nv=37, Nr=11, Din=72, Dout=200, r=128, gradW=False),
    case(B=1, Nv=64, Nr=0, Din=72, Dout=200, r=8, gradW=True),
    case(B=2, Nv=0, Nr=29, Din=200, Dout=72, r=128, gradW=True),
    case(B=3, Nv=5, Nr=40, Din=40, Dout=24, r=8, gradW=False),
]


def _inputs(bsz, nv, nr, din, dout, rank, dtype, grad_base=True, bias=True, device=DEVICE):
    """Random leaves in fp32, cast to ``dtype``; lora_B non-zero so the adapter matters."""
    n = nv + nr
    x = torch.randn(bsz, n, din)
    w = torch.randn(dout, din) / din**0.5
    b = torch.randn(dout) * 0.1 if bias else None
    a = torch.randn(rank, din) / din**0.5
    lb = torch.randn(dout, rank) / rank**0.5
    leaves = [t if t is None else t.to(device=device, dtype=dtype) for t in (x, w, b, a, lb)]
    for i, t in enumerate(leaves):
        if t is not None and (grad_base or i not in (1, 2)):
            t.requires_grad_(True)
    return leaves


def _run(fn, x, w, b, a, lb, scale, nv, dy):
    """Output and grads of every leaf that requires grad (None elsewhere)."""
    y = fn(x, w, b, a, lb, scale, nv)
    leaves = [t for t in (x, w, b, a, lb) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, leaves, dy, allow_unused=True, materialize_grads=True))
    return y, [next(grads) if t is not None and t.requires_grad else None for t in (x, w, b, a, lb)]


def _fp64(ts):
    return [t if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def _check_all(x, w, b, a, lb, scale, nv, names=("x", "weight", "bias", "lora_A", "lora_B"),
               backend="triton"):
    """Kernel vs the reference backend (same dtype) vs fp64 truth, forward and all grads."""
    dy = torch.randn(x.shape[0], x.shape[1], w.shape[0], device=x.device, dtype=x.dtype)
    kern = (lambda *args: wk.ref_lora_linear(*args, backend=backend))
    y, g = _run(kern, x, w, b, a, lb, scale, nv, dy)
    y_ref, g_ref = _run(ref_lora_linear_ref, x, w, b, a, lb, scale, nv, dy)
    y_64, g_64 = _run(ref_lora_linear_ref, *_fp64((x, w, b, a, lb)), scale, nv, dy.double())
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert_within_baseline(y, y_ref, y_64, name="y")
    for name, gk, gr, g6 in zip(names, g, g_ref, g_64):
        if g6 is None:
            assert gk is None, f"d{name} should be None"
            continue
        assert gk.dtype == g6.dtype or gk.dtype == gr.dtype
        assert_within_baseline(gk, gr, g6, name=f"d{name}")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("bsz,nv,nr,din,dout,rank,grad_base", CASES)
def test_forward_backward(bsz, nv, nr, din, dout, rank, grad_base, dtype):
    leaves = _inputs(bsz, nv, nr, din, dout, rank, dtype, grad_base)
    _check_all(*leaves, scale=0.5, nv=nv)


def test_no_bias_fp32():
    x, w, _, a, lb = _inputs(2, 37, 11, 72, 200, 8, torch.float32, bias=False)
    _check_all(x, w, None, a, lb, scale=2.0, nv=37)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only: bf16 through the interpreter's fp32 "
                    "upcast; native bf16 on CUDA is test_gpu_bf16 (same cases and more)")
def test_bf16_through_interpreter_upcast():
    """bf16 inputs: under the interpreter the kernel upcasts tiles (triton#11584); on GPU native."""
    leaves = _inputs(2, 37, 11, 72, 200, 8, torch.bfloat16, grad_base=True)
    _check_all(*leaves, scale=0.5, nv=37)


@pytest.mark.parametrize("layout", ["rows-strided", "last-dim-strided"])
def test_noncontiguous_x(layout):
    bsz, nv, nr, din, dout, rank = 2, 37, 11, 72, 200, 8
    n = nv + nr
    _, w, b, a, lb = _inputs(bsz, nv, nr, din, dout, rank, torch.float32)
    if layout == "rows-strided":  # every other row of a wider buffer: row stride 2*(din+8)
        x = torch.randn(bsz, 2 * n, din + 8, device=DEVICE)[:, ::2, 5:5 + din]
    else:  # [B, Din, N] transposed: last-dim stride N (the launcher copies)
        x = torch.randn(bsz, din, n, device=DEVICE).transpose(1, 2)
    assert not x.is_contiguous()
    x.requires_grad_(True)
    _check_all(x, w, b, a, lb, scale=0.5, nv=nv)


def test_expanded_grad_output():
    """``y.sum().backward()`` hands the backward a stride-0 dy."""
    x, w, b, a, lb = _inputs(1, 37, 11, 72, 40, 8, torch.float32)
    wk.ref_lora_linear(x, w, b, a, lb, 0.5, 37, backend="triton").sum().backward()
    got = [t.grad.clone() for t in (x, w, b, a, lb)]
    for t in (x, w, b, a, lb):
        t.grad = None
    ref_lora_linear_ref(x, w, b, a, lb, 0.5, 37).sum().backward()
    for g, t in zip(got, (x, w, b, a, lb)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_cast_to_x():
    """fp32 adapters on an fp16 layer: computed in x's dtype, grads come back in each leaf's."""
    x, w, b, a, lb = _inputs(1, 37, 11, 72, 40, 8, torch.float16)
    a32 = a.detach().float().requires_grad_(True)
    lb32 = lb.detach().float().requires_grad_(True)
    y = ref_lora_linear_triton(x, w, b, a32, lb32, 0.5, 37)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert a32.grad.dtype == torch.float32 and lb32.grad.dtype == torch.float32
    y_ref = ref_lora_linear_ref(x, w, b, a, lb, 0.5, 37)
    torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)


def test_rejects_float64():
    x, w, b, a, lb = _inputs(1, 4, 4, 16, 16, 2, torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        wk.ref_lora_linear(x, w, b, a, lb, 1.0, 4, backend="triton")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("bsz,nv,nr", [case(B=2, Nv=37, Nr=11), case(B=1, Nv=0, Nr=29),
                                       case(B=1, Nv=64, Nr=0)])
def test_folded_kernel(bsz, nv, nr, dtype):
    """One GEMM picking W or W_ref per tile == two reference GEMMs; dx, dW, dW_ref and db too."""
    din, dout = 72, 200
    x, w, b, a, lb = _inputs(bsz, nv, nr, din, dout, 8, dtype)
    w_ref = (w.detach().double() + 0.5 * lb.detach().double() @ a.detach().double()).to(dtype)
    w_ref.requires_grad_(True)

    def folded_ref(x, w, b, w_ref, _unused, _s, nv):
        return torch.cat([torch.nn.functional.linear(x[:, :nv], w, b),
                          torch.nn.functional.linear(x[:, nv:], w_ref, b)], 1)

    def folded_kernel(x, w, b, w_ref, _unused, _s, nv):
        return ref_folded_linear_triton(x, w, w_ref, b, nv)

    dy = torch.randn(bsz, nv + nr, dout, device=x.device, dtype=dtype)
    args = (x, w, b, w_ref, None)
    y, g = _run(folded_kernel, *args, 0.0, nv, dy)
    y_r, g_r = _run(folded_ref, *args, 0.0, nv, dy)
    y_64, g_64 = _run(folded_ref, *_fp64(args), 0.0, nv, dy.double())
    assert_within_baseline(y, y_r, y_64, name="y")
    for name, gk, gr, g6 in zip(("x", "weight", "bias", "weight_ref"), g, g_r, g_64):
        assert_within_baseline(gk, gr, g6, name=f"d{name}")


# ----------------------------------------------------------------------------- GPU only
GPU_CASES = CASES + [
    case(B=1, Nv=1000, Nr=300, Din=1024, Dout=1536, r=64, gradW=True),
    case(B=2, Nv=333, Nr=129, Din=3072, Dout=200, r=128, gradW=False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("bsz,nv,nr,din,dout,rank,grad_base", GPU_CASES)
def test_gpu_bf16(bsz, nv, nr, din, dout, rank, grad_base):
    leaves = _inputs(bsz, nv, nr, din, dout, rank, torch.bfloat16, grad_base, device="cuda")
    _check_all(*leaves, scale=0.5, nv=nv)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes_large(dtype):
    leaves = _inputs(1, 1000, 300, 1024, 1536, 64, dtype, True, device="cuda")
    _check_all(*leaves, scale=0.5, nv=1000)


@pytest.mark.gpu
def test_gpu_autocast():
    """fp32 leaves under bf16 autocast compute in bf16 like F.linear would."""
    x, w, b, a, lb = _inputs(1, 100, 37, 256, 320, 16, torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = wk.ref_lora_linear(x, w, b, a, lb, 0.5, 100, backend="triton")
        y_ref = ref_lora_linear_ref(x, w, b, a, lb, 0.5, 100)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_folded_bf16():
    x, w, b, a, lb = _inputs(2, 500, 130, 512, 768, 32, torch.bfloat16, device="cuda")
    with torch.no_grad():
        w_ref = torch.addmm(w, lb, a, alpha=0.5)
        y = ref_folded_linear_triton(x, w, w_ref, b, 500)
        y_ref = torch.cat([torch.nn.functional.linear(x[:, :500], w, b),
                           torch.nn.functional.linear(x[:, 500:], w_ref, b)], 1)
        y_64 = torch.cat([torch.nn.functional.linear(x[:, :500].double(), w.double(), b.double()),
                          torch.nn.functional.linear(x[:, 500:].double(), w_ref.double(), b.double())], 1)
    assert_within_baseline(y, y_ref, y_64, name="y")


# ----------------------------------------------------------------------------- sm_90 build
_SM90_COMPILE = r'''
import os
os.environ["TRITON_INTERPRET"] = "0"  # real JITFunctions, not interpreted ones
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wildactor_kernels.lora import kernels as K

def jit(f):
    while not isinstance(f, triton.runtime.jit.JITFunction):
        f = f.fn
    return f

def build(f, consts, num_warps, num_stages, unit=()):
    fn = jit(f)
    ptrs = [a for a in fn.arg_names if a.startswith("p_")]
    sig = {a: "constexpr" if a in consts or a in unit else "*bf16" if a in ptrs else
           "fp32" if a == "scale" else "i32" for a in fn.arg_names}
    # what Triton's launcher infers: 16-aligned pointers, ints divisible by 16, unit strides
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a] != "constexpr" and a != "scale"}
    k = triton.compile(ASTSource(fn, sig, constexprs={**consts, **{a: 1 for a in unit}}, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    assert "wgmma" in ptx, f"{fn.__name__} {consts}: no Hopper wgmma in the PTX"
    assert "cp.async" in ptx, f"{fn.__name__} {consts}: loads are not pipelined"
    print(fn.__name__, consts.get("REF_MODE"), "ok")

g = dict(GROUP_M=8, DOT_F32=False, DOT_PREC="ieee", HAS_BIAS=True, BLOCK_R=64, EVEN_K=True)
fwd = ("stride_xk", "stride_wk", "stride_tr", "stride_lr", "stride_oo")  # Wt = W^T, Lt = B^T
bwd = ("stride_xk", "stride_wn", "stride_tr", "stride_ln", "stride_oo")  # Wt = W,   Lt = A
build(K._lora_gemm_kernel, dict(g, REF_MODE=1, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 8, 3, fwd)
build(K._lora_gemm_kernel, dict(g, REF_MODE=1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, HAS_BIAS=False), 4, 3, bwd)
build(K._lora_gemm_kernel, dict(g, REF_MODE=1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16, EVEN_K=False),
      4, 3, fwd + ("RANK",))  # rank 1 padded to 16, Din not a multiple of BLOCK_K
build(K._lora_gemm_kernel, dict(g, REF_MODE=2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4, 3, fwd)
build(K._lora_shrink_kernel,
      dict(BLOCK_M=64, BLOCK_K=64, BLOCK_R=128, EVEN_K=True, DOT_F32=False, DOT_PREC="ieee"), 4, 4,
      ("stride_xk", "stride_pk", "stride_tr"))
'''


def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: build PTX + cubin for sm_90 (H100/H200)
    ahead of time for the forward, dx, rank-1/odd-K, folded and shrink variants, and check
    that the GEMMs lower to Hopper wgmma with cp.async-pipelined loads."""
    stdout = run_sm90_build(_SM90_COMPILE)
    assert stdout.count("ok") == 5, stdout
