"""The Hopper forward kernel (``attention/hopper.py``) against an fp64 truth and the reference.

The same ladder as ``test_attention_kernels.py``: flash-attn's 2x rule for the output and every
gradient (the backward is ``kernels.py``'s, fed by this forward's log-sum-exp), odd token counts
(37 + 11, 64 + 0, 0 + 29), q/k/v as views of a fused QKV tensor, NaN-filled outputs
(``nan_empty``). Under the CPU interpreter (which runs tensor descriptors) fp32 and fp16 with
both key loops (warp-specialised and hand-pipelined); bf16 on the GPU. The sm_90 build checks
the compiled form: TMA copies, mbarriers, warp specialisation (``setmaxnreg``, 12 warps), the
next QK^T in flight during the softmax, no spills.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, assert_within_baseline, dense_asym_attention_fp64, rope_fp64, run_sm90_build

import wildactor_kernels as wk
from wildactor_kernels.attention import hopper as Hm

pytestmark = pytest.mark.usefixtures("nan_empty")

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _atol(truth: torch.Tensor, dtype: torch.dtype) -> float:
    t = truth.detach().to(dtype)
    rounding = ((t + 0.3 - 0.3) - t).abs().max().item() if t.numel() else 0.0
    return max(2.0 * rounding, 1e-5)


def _check(name, out, base, truth, dtype):
    assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
    assert_within_baseline(out, base, truth, atol=_atol(truth, dtype), name=name)


def _leaves(*ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def _grads(out, do, inputs):
    return list(torch.autograd.grad(out, inputs, do))


def _qkv(b, n, h, d, dtype, fused=False):
    if fused:
        qkv = torch.randn(b, n, 3, h, d).to(device=DEVICE, dtype=dtype)
        return list(qkv.unbind(2))
    return [torch.randn(b, n, h, d).to(device=DEVICE, dtype=dtype) for _ in range(3)]


@pytest.fixture(params=[True, False], ids=["warp-spec", "pipelined"])
def ws(request, monkeypatch):
    monkeypatch.setattr(Hm, "HOPPER_WARP_SPEC", request.param)
    return request.param


def _run_joint(nv, nr, b, h, d, dtype, rope=False, fused=False, scale=None):
    n = nv + nr
    pos = cos = sin = None
    if rope:
        layout = wk.TokenLayout((1, 1, nv), [("face", 1, nr)] if nr else [])
        pos = wk.irope_positions(layout)
        cos, sin = wk.rope_cos_sin(pos.to(DEVICE), d)
    q, k, v = _qkv(b, n, h, d, dtype, fused)
    do = torch.randn(b, n, h, d).to(device=DEVICE, dtype=dtype)
    if fused:
        base = torch.stack([q, k, v], 2).detach().requires_grad_()
        ins = list(base.unbind(2))
        assert not ins[0].is_contiguous()
    else:
        ins = _leaves(q, k, v)
    out = Hm.asym_attention_hopper_triton(*ins, nv, cos, sin, scale)
    grads = _grads(out, do, [base] if fused else ins)
    if fused:
        grads = list(grads[0].unbind(2))
    r_in = _leaves(q, k, v)
    ref = wk.asym_attention(*r_in, nv, cos, sin, scale, backend="reference")
    r_grads = _grads(ref, do, r_in)
    t_in = _leaves(q, k, v, dtype=torch.float64)
    qr, kr = t_in[:2] if pos is None else (rope_fp64(t_in[0], pos, d), rope_fp64(t_in[1], pos, d))
    truth = dense_asym_attention_fp64(qr, kr, t_in[2], nv, scale)
    t_grads = _grads(truth, do.double(), t_in)
    assert out.shape == (b, n, h, d) and out.is_contiguous()
    _check("out", out, ref, truth, dtype)
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, r_grads, t_grads):
        _check(name, g, rg, tg, dtype)


JOINT = [
    pytest.param(37, 11, 2, 2, 64, "fp32", id="Nv37-Nr11-B2-H2-D64-fp32"),
    pytest.param(37, 11, 1, 2, 64, "fp16", id="Nv37-Nr11-B1-H2-D64-fp16"),
    pytest.param(64, 0, 1, 1, 128, "fp16", id="Nv64-Nr0-B1-H1-D128-fp16"),
    pytest.param(0, 29, 2, 1, 64, "fp32", id="Nv0-Nr29-B2-H1-D64-fp32"),
]


@pytest.mark.parametrize("nv, nr, b, h, d, dtype", JOINT)
def test_hopper_joint(nv, nr, b, h, d, dtype, ws):
    _run_joint(nv, nr, b, h, d, DT[dtype])


def test_hopper_joint_rope_fused_qkv_views(ws):
    """cos/sin (rotated by the rope-kernel prologue) and q/k/v as views of one [B, N, 3, H, D]."""
    _run_joint(37, 11, 2, 2, 64, torch.float16, rope=True, fused=True)


def test_hopper_negative_scale():
    _run_joint(37, 11, 1, 1, 64, torch.float32, scale=-0.2)


@pytest.mark.parametrize("nv, nr, dtype", [pytest.param(37, 29, "fp32", id="Nv37-Nr29-fp32"),
                                           pytest.param(45, 0, "fp16", id="Nv45-Nr0-fp16-empty"),
                                           pytest.param(20, 40, "fp16", id="Nv20-Nr40-fp16")])
def test_hopper_cached(nv, nr, dtype):
    dtype = DT[dtype]
    b, h, d = 2, 2, 64
    q, k, v = _qkv(b, nv, h, d, dtype)
    rk, rv = _qkv(b, nr, h, d, dtype)[:2]
    do = torch.randn(b, nv, h, d).to(device=DEVICE, dtype=dtype)
    ins = _leaves(q, k, v, rk, rv)
    out = Hm.cached_asym_attention_hopper_triton(*ins)
    grads = _grads(out, do, ins)
    r_in = _leaves(q, k, v, rk, rv)
    ref = wk.cached_asym_attention(*r_in, backend="reference")
    r_grads = _grads(ref, do, r_in)
    t = _leaves(q, k, v, rk, rv, dtype=torch.float64)
    kk, vv = torch.cat([t[1], t[3]], 1), torch.cat([t[2], t[4]], 1)
    s = torch.einsum("bnhd,bmhd->bnhm", t[0], kk) / math.sqrt(d)
    truth = torch.einsum("bnhm,bmhd->bnhd", s.softmax(-1), vv)
    t_grads = _grads(truth, do.double(), t)
    _check("out", out, ref, truth, dtype)
    for name, g, rg, tg in zip(("dq_v", "dk_v", "dv_v", "dref_k", "dref_v"), grads, r_grads, t_grads):
        _check(name, g, rg, tg, dtype)


def test_hopper_supported_reasons():
    q = torch.randn(1, 8, 2, 64, device=DEVICE)
    assert Hm.hopper_supported(q, q, q) is None
    assert "head_dim" in Hm.hopper_supported(*[torch.randn(1, 8, 2, 96, device=DEVICE)] * 3)
    odd = torch.randn(1, 8, 2, 65, device=DEVICE)[..., 1:]  # base pointer off by 4 bytes
    assert "TMA" in Hm.hopper_supported(odd, odd, odd)
    with pytest.raises(ValueError, match="Hopper kernel cannot run here: head_dim"):
        Hm.asym_attention_hopper_triton(*[torch.randn(1, 8, 2, 32, device=DEVICE)] * 3, 4)


def test_hopper_never_auto_under_interpreter():
    """backend="triton" keeps meaning kernels.py under the interpreter: the Hopper kernel is
    only picked on an sm_90+ device (or called explicitly, as this file does)."""
    from wildactor_kernels.attention import dispatch

    q = torch.randn(1, 8, 2, 64)
    assert dispatch.pick_backend(q, "joint") in ("reference", "triton")


def test_hopper_custom_ops_opcheck():
    """Schema, fake kernels, autograd registration (into kernels.py's backward ops)."""
    q, k, v = (torch.randn(1, 20, 2, 64, device=DEVICE, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.wildactor.hopper_asym_attention_fwd.default, (q, k, v, 13, 0.25))
    rk, rv = (torch.randn(1, 7, 2, 64, device=DEVICE, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.wildactor.hopper_cached_asym_attention_fwd.default,
                          (q, k, v, rk, rv, 0.25))


def test_hopper_torch_compile_fullgraph(monkeypatch):
    """No graph break: fullgraph compile (AOT autograd) of forward and backward, equal to eager."""
    monkeypatch.undo()  # nan_empty's Python-level torch.empty patch is not traceable by dynamo
    q, k, v = _leaves(*_qkv(1, 48, 2, 64, torch.float32))

    def loss(q, k, v):
        return (Hm.asym_attention_hopper_triton(q, k, v, 37).float() ** 2).sum()

    torch._dynamo.reset()
    gc = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    ge = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b_ in zip(gc, ge):
        assert torch.allclose(a, b_, atol=1e-6), (a - b_).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM90, reason="needs an sm_90+ GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
def test_hopper_gpu(dtype, d, ws):
    """Model-like lengths on the GPU; truth is the fp32 reference (an fp64 N x N would not fit)."""
    nv, nr, h = 4 * 22 * 40, 2 * 22 * 40 + 7, 3
    q, k, v = (torch.randn(1, nv + nr, h, d, device="cuda") for _ in range(3))
    do = torch.randn_like(q)
    t_in = _leaves(q, k, v)
    truth = wk.asym_attention(*t_in, nv, backend="reference")
    t_grads = _grads(truth, do, t_in)
    ins = _leaves(q, k, v, dtype=dtype)
    out = Hm.asym_attention_hopper_triton(*ins, nv)
    grads = _grads(out, do.to(dtype), ins)
    r_in = _leaves(q, k, v, dtype=dtype)
    ref = wk.asym_attention(*r_in, nv, backend="reference")
    r_grads = _grads(ref, do.to(dtype), r_in)
    _check("out", out, ref, truth, dtype)
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, r_grads, t_grads):
        _check(name, g, rg, tg, dtype)
    rk, rv = (torch.randn(1, nr, h, d, device="cuda", dtype=dtype) for _ in range(2))
    qv, kv, vv = (x.to(dtype)[:, :nv] for x in (q, k, v))
    oc = Hm.cached_asym_attention_hopper_triton(qv, kv, vv, rk, rv)
    rc = wk.cached_asym_attention(qv.float(), kv.float(), vv.float(), rk.float(), rv.float(),
                                  backend="reference")
    assert (oc.float() - rc).abs().max().item() < 2e-2


# =========================================================================== compile for sm_90
_SM90_BUILD = r'''
import os, re, subprocess, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia import compiler as nvc
from wildactor_kernels.attention import hopper as H

def ptxas_report(ptx):
    import inspect
    takes_arch = "arch" in str(inspect.signature(nvc.get_ptxas))
    tool = nvc.get_ptxas(90) if takes_arch else nvc.get_ptxas()
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([tool.path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True)
    os.unlink(f.name)
    text = out.stdout + out.stderr
    regs = int(re.findall(r"Used (\d+) registers", text)[0])
    return regs, int(re.findall(r"(\d+) bytes spill stores", text)[0])

def overlapped(ptx):
    """A wgmma group committed and the softmax's ex2 run before the next wait: the QK^T is in
    flight during the softmax."""
    ev = re.findall(r"(wgmma\.commit_group|wgmma\.wait_group\S*\s+\d+|ex2\.approx)", ptx)
    return any(a.startswith("wgmma.commit") and b.startswith("ex2") for a, b in zip(ev, ev[1:]))

fn = H._hopper_fwd_kernel.fn
for d in (64, 128):
    for cfg in H._hopper_configs():
        for cached in (False, True):
            ws = cfg.kwargs["WARP_SPEC"]
            if cached and ws:
                continue
            consts = dict(HEAD_DIM=d, CACHED=cached, WS_MODE=0, DOT_F32=False, DOT_PREC="ieee", **cfg.kwargs)
            sig, attrs = {}, {}
            for i, a in enumerate(fn.arg_names):
                if a in consts:
                    sig[a] = "constexpr"
                elif a == "qk_scale":
                    sig[a] = "fp32"
                elif a in ("H", "NQ", "NV", "NK2") or a.startswith("stride"):
                    sig[a] = "i32"
                    if a.startswith("stride"):
                        attrs[(i,)] = [["tt.divisibility", 16]]
                else:
                    sig[a] = "*fp32" if a == "p_lse" else "*bf16"
                    attrs[(i,)] = [["tt.divisibility", 16]]
            k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            ptx = k.asm["ptx"]
            regs, spills = ptxas_report(ptx)
            waits = sorted(set(re.findall(r"wgmma\.wait_group\S*\s+(\d+)", ptx)))
            print(f"D={d} BN={cfg.kwargs['BLOCK_N']} warps={cfg.num_warps} stages={cfg.num_stages} "
                  f"ws={ws} cached={cached}: regs={regs} spills={spills} smem={k.metadata.shared} "
                  f"warps_total={k.metadata.num_warps} tma={ptx.count('cp.async.bulk.tensor')} "
                  f"mbarrier={ptx.count('mbarrier.')} setmaxnreg={len(re.findall('setmaxnreg', ptx))} "
                  f"wait_groups={waits} overlap={overlapped(ptx)}")
            assert spills == 0, "spills"
            assert k.metadata.shared <= 227 * 1024, "shared memory"
            assert "cp.async.bulk.tensor" in ptx and "mbarrier.try_wait" in ptx, "no TMA"
            assert "cp.async.cg" not in ptx and "cp.async.ca" not in ptx, "per-thread cp.async left"
            if ws:
                assert k.metadata.num_warps == 12 and "setmaxnreg" in ptx, "not warp-specialised"
            else:
                assert overlapped(ptx), "softmax not overlapped with the next QK^T"
'''


def test_hopper_kernel_compiles_for_sm90():
    """Every autotune candidate, D 64 and 128, joint and cached, built for sm_90 by the installed
    Triton: TMA + mbarrier, no per-thread cp.async, 0 spills, shared memory within 227 KB;
    warp-specialised candidates get 12 warps and setmaxnreg; hand-pipelined ones keep a wgmma
    group in flight while the softmax's ex2 run. Prints the resource report."""
    out = run_sm90_build(_SM90_BUILD, timeout=900)
    print(out)
    assert out.count("spills=0") == 12, out
