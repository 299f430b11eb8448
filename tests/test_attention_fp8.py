"""8-bit attention (``precision="fp8"``, docs/design.md §9): the plain-PyTorch spec against an fp64
truth and bf16 attention, the Triton kernel (interpreter on CPU) against the spec, cached mode
with a quantized reference cache, the op-level argument, the gradient error and the sm_90 build.

Accuracy is stated as docs/design.md §9 states it: cosine similarity >= 0.995 and relative L2 <= 0.05
against bf16 attention (and against the fp64 truth), at head_dim 128 with shortened token counts,
on activations shaped like a DiT's: per-channel gains, a K channel offset, V channel outliers.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, dense_asym_attention_fp64, rope_fp64, run_sm90_build

import wildactor_kernels as wk
from wildactor_kernels.attention import fp8_reference as R
from wildactor_kernels.attention.reference import asym_attention_ref

COS_MIN, REL_L2_MAX = 0.995, 0.05  # docs/design.md §9


def _acts(b, n, h, d, k_offset=4.0, dtype=torch.bfloat16, device=DEVICE):
    """q, k, v [B, N, H, D] with real-looking statistics: lognormal per-channel gains (as left by
    RMSNorm weights), small q/v channel means, and a K channel offset ``k_offset`` times the
    typical key scale (the outliers SageAttention's smoothing removes)."""
    def gain(s):
        return torch.exp(s * torch.randn(h, d))

    q = torch.randn(b, n, h, d) * gain(0.5) + 0.3 * torch.randn(h, d)
    k = torch.randn(b, n, h, d) * gain(0.5) + k_offset * torch.randn(h, d)
    v = torch.randn(b, n, h, d) * gain(0.7) + 0.5 * torch.randn(h, d)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _metrics(out, ref):
    o, r = out.detach().double().flatten().cpu(), ref.detach().double().flatten().cpu()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0).item()
    return cos, ((o - r).norm() / r.norm()).item()


def _assert_quality(out, ref, name):
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    cos, rel = _metrics(out, ref)
    print(f"{name}: cosine {cos:.5f}, rel L2 {rel:.4f}")
    assert cos >= COS_MIN and rel <= REL_L2_MAX, f"{name}: cosine {cos:.5f}, rel L2 {rel:.4f}"


def _cached_truth(q_v, k_v, v_v, ref_k, ref_v):
    """fp64 video rows over [video; reference] keys."""
    nv = q_v.shape[1]
    q = torch.cat([q_v, ref_k], 1)  # the reference rows are computed and dropped
    return dense_asym_attention_fp64(q, torch.cat([k_v, ref_k], 1), torch.cat([v_v, ref_v], 1), nv)[:, :nv]


def _kernels():
    from wildactor_kernels.attention import fp8_kernels

    return fp8_kernels


# =========================================================================== the spec (CPU path)
@pytest.mark.parametrize("k_offset", [0.0, 4.0, 10.0], ids=lambda x: f"koff{x:g}")
@pytest.mark.parametrize("nv,nr", [(512, 128), (300, 211)], ids=["640tok", "odd511"])
def test_reference_accuracy(nv, nr, k_offset):
    """bf16 inputs, D = 128: the 8-bit spec against the fp64 truth and against bf16 attention."""
    q, k, v = _acts(1, nv + nr, 2, 128, k_offset, device="cpu")
    out = R.asym_attention_fp8_ref(q, k, v, nv)
    _assert_quality(out, dense_asym_attention_fp64(q, k, v, nv), f"fp8 spec vs fp64 (koff {k_offset})")
    _assert_quality(out, asym_attention_ref(q, k, v, nv), f"fp8 spec vs bf16 (koff {k_offset})")


def test_smoothing_removes_the_key_offset(monkeypatch):
    """With a strong K channel offset, subtracting the key mean must cut the error clearly (this
    fails if the smoothing is dropped or applied per segment with different vectors)."""
    q, k, v = _acts(1, 640, 2, 128, k_offset=10.0, device="cpu")
    base = asym_attention_ref(q, k, v, 512)
    _, rel_smooth = _metrics(R.asym_attention_fp8_ref(q, k, v, 512), base)
    real = R.key_mean
    monkeypatch.setattr(R, "key_mean", lambda *ks: real(*ks) * 0)
    _, rel_plain = _metrics(R.asym_attention_fp8_ref(q, k, v, 512), base)
    print(f"rel L2 vs bf16: smoothed {rel_smooth:.4f}, unsmoothed {rel_plain:.4f}")
    assert rel_smooth < 0.7 * rel_plain


def test_reference_tiles_are_segment_aligned():
    """Moving the video/reference boundary by one token changes the tiling but the result stays
    within the scheme's error of the truth on both sides (no tile mixes segments)."""
    q, k, v = _acts(1, 200, 1, 64, device="cpu")
    for nv in (0, 1, 63, 64, 65, 199, 200):
        out = R.asym_attention_fp8_ref(q, k, v, nv, block_m=32, block_n=16)
        _assert_quality(out, dense_asym_attention_fp64(q, k, v, nv), f"Nv={nv}")


def test_quantizers():
    """int8 codes within +-127 and the tile max hitting 127; V codes e4m3, transposed, padded;
    dequantized K + mean and V reproduce the inputs to 8-bit precision."""
    _, k, v = _acts(2, 75, 3, 64, device="cpu", dtype=torch.float32)
    mean = R.key_mean(k)
    s = R.quantize_kv(k, v, mean, block_n=16)
    assert s.k.dtype == torch.int8 and s.k.shape == (2, 3, 80, 64)
    assert s.v.dtype == torch.float8_e4m3fn and s.v.shape == (2, 3, 64, 80)
    assert s.k_scale.shape == (2, 3, 5) and s.num_tokens == 75
    assert (s.k[:, :, 75:] == 0).all() and (s.v[..., 75:].float() == 0).all()
    assert s.k.abs().amax().item() == 127
    kd = s.k[:, :, :75].float() * s.k_scale.repeat_interleave(16, 2)[:, :, :75, None] + mean[:, :, None]
    err = (kd - k.permute(0, 2, 1, 3)).abs().max() / s.k_scale.max()
    assert err <= 0.5 + 1e-3, err
    vd = s.v[..., :75].float() * s.v_scale[..., None]
    _, rel = _metrics(vd, v.permute(0, 2, 3, 1))
    assert rel < 0.04, rel


# =========================================================================== the kernel
_KERNEL_CASES = [
    pytest.param(2, 211, 150, 2, 128, 16, id="B2-N211-Nv150-D128-bn16"),
    pytest.param(1, 211, 150, 2, 128, 64, id="N211-Nv150-D128-bn64"),
    pytest.param(1, 37, 37, 1, 64, 16, id="Nr0-N37-H1-D64"),
    pytest.param(1, 53, 0, 2, 64, 16, id="Nv0-N53"),
    pytest.param(1, 97, 40, 1, 96, 32, id="D96-padded"),
]


@pytest.mark.parametrize("b,n,nv,h,d,bn", _KERNEL_CASES)
def test_kernel_matches_reference(b, n, nv, h, d, bn, nan_empty):
    """Same quantization, same tiles: the kernel equals the spec up to the rounding of exp2 and
    of the sums (which can move a P value across an e4m3 rounding boundary in rare rows).
    fp32 inputs: the interpreter rounds fp32 -> bf16 outputs by truncation."""
    q, k, v = _acts(b, n, h, d, dtype=torch.float32)
    fk = _kernels()
    out = fk.asym_attention_fp8_triton(q, k, v, nv, block_n=bn)
    ref = R.asym_attention_fp8_ref(q, k, v, nv, block_m=fk.fp8_block_m() or R.DEFAULT_BLOCK_M,
                                   block_n=bn)
    assert not torch.isnan(out).any(), "NaN in output (unwritten elements?)"
    diff = (out - ref).abs()
    _, rel = _metrics(out, ref)
    far = (diff > 1e-4 * ref.abs().max()).float().mean().item()
    print(f"kernel vs spec: rel L2 {rel:.2e}, elements off by > 1e-4 max: {far:.2%}")
    assert rel <= 2e-3 and far <= 0.02, (rel, far)


@pytest.mark.parametrize("scale", [-0.125, 0.15], ids=["negative", "larger"])
def test_kernel_custom_scale(scale, nan_empty):
    """A negative softmax scale takes the min-based row max on full blocks (SCALE_NEG)."""
    q, k, v = _acts(1, 150, 1, 64, dtype=torch.float32)
    fk = _kernels()
    out = fk.asym_attention_fp8_triton(q, k, v, 100, scale, block_n=16)
    ref = R.asym_attention_fp8_ref(q, k, v, 100, scale=scale, block_m=fk.fp8_block_m() or 128,
                                   block_n=16)
    _, rel = _metrics(out, ref)
    assert rel <= 2e-3, rel
    _assert_quality(out, dense_asym_attention_fp64(q, k, v, 100, scale), f"scale {scale} vs fp64")


@pytest.mark.parametrize("k_offset", [0.0, 10.0], ids=lambda x: f"koff{x:g}")
def test_kernel_accuracy_bf16(k_offset, nan_empty):
    """bf16 inputs, D = 128, Nv = 192, Nr = 67: the kernel against fp64 and bf16 attention."""
    q, k, v = _acts(1, 259, 2, 128, k_offset)
    out = _kernels().asym_attention_fp8_triton(q, k, v, 192, block_n=16)
    _assert_quality(out, dense_asym_attention_fp64(q, k, v, 192), f"kernel vs fp64 (koff {k_offset})")
    _assert_quality(out, asym_attention_ref(q, k, v, 192), f"kernel vs bf16 (koff {k_offset})")


# =========================================================================== cached mode
def test_cached_reference_equals_joint_video_rows():
    """Cached mode with tensor references quantizes the same two sets with the same smoothing
    vector as joint mode: the video rows agree exactly."""
    q, k, v = _acts(1, 150, 2, 64, device="cpu")
    joint = R.asym_attention_fp8_ref(q, k, v, 100, block_m=32, block_n=16)
    cached = R.cached_asym_attention_fp8_ref(q[:, :100], k[:, :100], v[:, :100], k[:, 100:],
                                             v[:, 100:], block_m=32, block_n=16)
    assert torch.equal(cached, joint[:, :100])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("quantized_cache", [False, True], ids=["tensor-ref", "QuantizedKV"])
def test_cached_mode(backend, quantized_cache, nan_empty):
    """Video queries over [video; reference cache], with the cache as tensors or quantized once."""
    q, k, v = _acts(1, 173, 2, 128, k_offset=4.0)
    nv = 130
    q_v, k_v, v_v, ref_k, ref_v = q[:, :nv], k[:, :nv], v[:, :nv], k[:, nv:], v[:, nv:]
    if quantized_cache:
        cache = wk.attention.quantize_ref_kv(ref_k, ref_v)
        out = wk.cached_asym_attention(q_v, k_v, v_v, cache, None, backend=backend, precision="fp8")
    else:
        out = wk.cached_asym_attention(q_v, k_v, v_v, ref_k, ref_v, backend=backend, precision="fp8")
    assert out.shape == q_v.shape and out.dtype == q_v.dtype
    _assert_quality(out, _cached_truth(q_v, k_v, v_v, ref_k, ref_v), f"cached {backend} vs fp64")
    bf16 = wk.cached_asym_attention(q_v, k_v, v_v, ref_k, ref_v, backend="reference")
    _assert_quality(out, bf16, f"cached {backend} vs bf16")


def test_cached_kernel_matches_reference_with_cache(nan_empty):
    q, k, v = _acts(1, 120, 2, 64, dtype=torch.float32)
    cache = R.quantize_ref_kv(k[:, 90:], v[:, 90:], block_n=16)
    fk = _kernels()
    vid, ref = R.prepare_cached_sets(k[:, :90], v[:, :90], cache, None, 16)
    out = fk.asym_attention_fp8_fwd(q[:, :90], vid, ref, 90, 0.125)
    spec = R.cached_asym_attention_fp8_ref(q[:, :90], k[:, :90], v[:, :90], cache, None, scale=0.125,
                                           block_m=fk.fp8_block_m() or R.DEFAULT_BLOCK_M)
    _, rel = _metrics(out, spec)
    assert rel <= 2e-3, rel


def test_quantized_cache_is_smaller():
    _, k, v = _acts(1, 880, 4, 128, device="cpu")
    cache = R.quantize_ref_kv(k, v)
    bf16_bytes = 2 * k.numel() * 2
    assert cache.nbytes() < 0.55 * bf16_bytes, (cache.nbytes(), bf16_bytes)


# =========================================================================== the public argument
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_op_precision_with_rope(backend):
    """``wk.asym_attention(..., cos, sin, precision="fp8")``: rotation first, then 8-bit attention;
    checked against fp64 attention on fp64-rotated inputs."""
    layout = wk.TokenLayout(video=(2, 6, 8), refs=[("face", 4, 4), ("body", 3, 5)])
    pos = wk.irope_positions(layout)
    n, nv, d = pos.shape[0], 96, 128
    cos, sin = (t.to(DEVICE) for t in wk.rope_cos_sin(pos, d))
    q, k, v = _acts(1, n, 2, d)
    out = wk.asym_attention(q, k, v, nv, cos, sin, backend=backend, precision="fp8")
    truth = dense_asym_attention_fp64(rope_fp64(q, pos, d), rope_fp64(k, pos, d), v, nv)
    _assert_quality(out, truth, f"op {backend} + rope vs fp64")
    bf16 = wk.asym_attention(q, k, v, nv, cos, sin, backend="reference")
    _assert_quality(out, bf16, f"op {backend} + rope vs bf16")


def test_bad_precision_is_named():
    q, k, v = _acts(1, 16, 1, 16, device="cpu")
    with pytest.raises(ValueError, match="precision"):
        wk.asym_attention(q, k, v, 8, precision="int4")
    with pytest.raises(ValueError, match="precision"):
        wk.cached_asym_attention(q, k, v, k, v, precision="bf16")
    cache = R.quantize_ref_kv(k, v)
    with pytest.raises(ValueError, match="precision='fp8'"):
        wk.cached_asym_attention(q, k, v, cache, None)
    with pytest.raises(ValueError, match="ref_v"):
        wk.cached_asym_attention(q, k, v, cache, v, precision="fp8")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradient_raises(backend):
    q, k, v = _acts(1, 40, 1, 32)
    q.requires_grad_(True)
    out = wk.asym_attention(q, k, v, 24, backend=backend, precision="fp8")
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()
    k.requires_grad_(True)
    out = wk.cached_asym_attention(q[:, :24], k[:, :24], v[:, :24], k[:, 24:], v[:, 24:],
                                   backend=backend, precision="fp8")
    with pytest.raises(RuntimeError, match="forward-only"):
        torch.autograd.grad(out.sum(), k)
    with torch.no_grad():  # inference needs no guard
        assert not wk.asym_attention(q, k, v, 24, backend=backend, precision="fp8").requires_grad


# =========================================================================== compile for sm_90
_SM90_COMPILE = r'''
import os, re, subprocess, tempfile
os.environ["TRITON_INTERPRET"] = "0"  # real JITFunctions: configs and kernels as on the GPU
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from wildactor_kernels.attention import fp8_kernels as FK

ptxas = get_ptxas(90).path
UNIT = ("stride_qd", "stride_od", "stride_kd", "stride_vd")  # unit-stride head dim, as Triton specialises it


def build(kern, ptrs, consts, num_warps, num_stages, label):
    fn = kern.fn if hasattr(kern, "configs") else kern
    consts = dict(consts)
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
        elif a in UNIT:
            sig[a] = "constexpr"; consts[a] = 1
        elif a == "qk_scale":
            sig[a] = "fp32"
        elif a in ptrs:
            sig[a] = ptrs[a]; attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "i32"
            if a.startswith("stride") or a == "NPAD":
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    mmas = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.[\w.]+)", ptx)))
    with tempfile.TemporaryDirectory() as td:
        p = os.path.join(td, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", p, "-o", os.path.join(td, "k.cubin")],
                           capture_output=True, text=True)
    info = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    assert regs and spill, info[-2000:]
    print(f"{label} warps={num_warps} stages={num_stages}: regs={regs.group(1)} "
          f"spills={spill.group(1)}/{spill.group(2)} shared={k.metadata.shared} mma={mmas}")


ATTN = {"p_q": "*bf16", "p_o": "*bf16", "p_kq1": "*i8", "p_kq2": "*i8", "p_vt1": "*fp8e4nv",
        "p_vt2": "*fp8e4nv", "p_ks1": "*fp32", "p_ks2": "*fp32", "p_ratio": "*fp32", "p_oscale": "*fp32"}
kern = FK._fp8_attn_fwd_kernel
for cfg in kern.configs:
    build(kern, ATTN, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, SCALE_NEG=False, UPCAST=False,
                           **cfg.kwargs),
          cfg.num_warps, cfg.num_stages, f"ATTN BLOCK_M={cfg.kwargs['BLOCK_M']}")
QUANT = {"p_k": "*bf16", "p_v": "*bf16", "p_mean": "*fp32", "p_vinv": "*fp32", "p_kq": "*i8",
         "p_ks": "*fp32", "p_vt": "*fp8e4nv"}
build(FK._quantize_kv_kernel, QUANT, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, UPCAST=False), 4, 1,
      "QUANT BLOCK_N=64")
'''


def test_kernel_compiles_for_sm90():
    """Build every autotune candidate of the attention kernel and the K/V quantizer for sm_90
    ahead of time (D = 128, BLOCK_N = 64): QK^T must lower to int8 wgmma (s32.s8.s8), PV to fp8
    wgmma (e4m3.e4m3), with no register spills and within the shared-memory budget."""
    stdout = run_sm90_build(_SM90_COMPILE)
    print(stdout)
    attn = [ln for ln in stdout.splitlines() if ln.startswith("ATTN ")]
    quant = [ln for ln in stdout.splitlines() if ln.startswith("QUANT ")]
    assert len(attn) >= 2 and len(quant) == 1, stdout  # every sm_90 candidate is built
    for ln in attn:
        assert "s32.s8.s8" in ln, f"QK^T is not an int8 wgmma: {ln}"
        assert "e4m3.e4m3" in ln, f"PV is not an fp8 wgmma: {ln}"
    for ln in attn + quant:
        assert "spills=0/0" in ln, f"register spills: {ln}"
        shared = int(ln.split("shared=")[1].split()[0])
        assert shared <= 227 * 1024, ln


# =========================================================================== benchmark rows
def test_bench_fp8_rows_run():
    """The fp8 rows of bench_attention.py call what they claim (interpreter on CPU, tiny shape);
    the speed-up and quality fields are filled from the rows."""
    from benchmarks import bench_attention as BA

    layout = wk.TokenLayout(video=(1, 4, 8), refs=[("face", 2, 4)])
    n, nv, d = layout.num_tokens, layout.num_video, 64
    cos, sin = (t.to(DEVICE) for t in wk.rope_cos_sin(wk.irope_positions(layout), d))
    q, k, v = _acts(1, n, 2, d)
    ref = asym_attention_ref(q, k, v, nv, cos, sin)
    out = BA._joint_impls(["ours-fp8"], n, nv, DEVICE)["ours-fp8"]()(q, k, v, nv, cos, sin, 0.125)
    row = {}
    BA._fp8_metrics(row, out, ref)
    assert row["cos"] >= COS_MIN and row["rel_l2"] <= REL_L2_MAX, row
    qr, kr = (wk.apply_rope(t, cos, sin, backend="triton") for t in (q, k))
    out_k = BA._joint_impls(["ours-fp8-kernel"], n, nv, DEVICE)["ours-fp8-kernel"]()(
        qr, kr, v, nv, cos, sin, 0.125)
    assert torch.equal(out_k, out)  # same rotation, same quantization: the same kernel result
    vc, sc = (t[: nv] for t in (cos, sin))
    impls = BA._cached_impls(["ours-fp8", "ours-fp8-cache"])
    a = impls["ours-fp8"]()(q[:, :nv], k[:, :nv], v[:, :nv], k[:, nv:], v[:, nv:], vc, sc, 0.125)
    b = impls["ours-fp8-cache"]()(q[:, :nv], k[:, :nv], v[:, :nv], k[:, nv:], v[:, nv:], vc, sc, 0.125)
    assert a.shape == b.shape == (1, nv, 2, d) and not torch.isnan(b).any()
    rows = [dict(op="joint", shape="s", mode="fwd", impl="sdpa-cudnn-2call", status="ok", ms=2.0),
            dict(op="joint", shape="s", mode="fwd", impl="ours-fp8", status="ok", ms=1.0)]
    BA._x_vs_cudnn(rows, "sdpa-cudnn-2call")
    assert rows[1]["x_vs_cudnn"] == 2.0


# =========================================================================== the model
@pytest.fixture(scope="module")
def tiny_bf16():
    """A random tiny WildActor in bf16 with non-zero adapters, and inputs with a face and a body
    reference (test_quant.py's fixture)."""
    from wildactor_kernels.model import WildActor, WildActorConfig
    from wildactor_kernels.model.quant import _random_inputs, _randomize_adapters

    torch.manual_seed(0)
    cfg = WildActorConfig.preset("tiny")
    m = WildActor(cfg)
    _randomize_adapters(m, 0)
    return m.to(torch.bfloat16).eval(), _random_inputs(cfg, "cpu", torch.bfloat16, seed=0)


def test_model_fp8_attention_sqnr(tiny_bf16):
    """``quantize_model(m, "fp8", attention="fp8")``: FP8 linears + 8-bit self-attention, model
    output SQNR >= 20 dB against the bf16 model (joint and cached paths); 8-bit attention alone
    changes the output (it is really used) and stays above the floor too."""
    import copy

    from wildactor_kernels.model.quant import quantize_model, sqnr_db

    m, inp = tiny_bf16
    with torch.no_grad():
        y_ref = m(**inp)
        mq = quantize_model(copy.deepcopy(m), "fp8", attention="fp8")
        assert mq.quantization["attention"] == "fp8"
        assert all(b.attn1.precision == "fp8" for b in mq.blocks)
        y_q = mq(**inp)
        cache = mq.encode_references(inp["refs"])
        y_qc = mq(inp["latents"], inp["timestep"], inp["context"], ref_cache=cache)
        assert all(isinstance(k, R.QuantizedKV) for k in cache._bound[1])  # quantized once
        ma = copy.deepcopy(m)
        for b in ma.blocks:
            b.attn1.precision = "fp8"
        y_a = ma(**inp)
    joint, cached, attn_only = sqnr_db(y_ref, y_q), sqnr_db(y_ref, y_qc), sqnr_db(y_ref, y_a)
    print(f"tiny bf16: FP8 linears + FP8 attention {joint:.2f} dB (cached path {cached:.2f} dB), "
          f"FP8 attention alone {attn_only:.2f} dB")
    assert joint >= 20 and cached >= 20 and 20 <= attn_only < float("inf")
    with pytest.raises(ValueError, match="attention"):
        quantize_model(copy.deepcopy(m), "fp8", attention="int8")


@pytest.mark.parametrize("n,d,bn", [(75, 64, 16), (130, 128, 64), (37, 96, 32)],
                         ids=["N75-D64", "N130-D128", "N37-D96"])
def test_triton_quantizer_matches_spec(n, d, bn, nan_empty):
    """The one-pass Triton K/V quantizer writes the spec's codes and scales (bit for bit under
    the interpreter), padding included; strided inputs (views of a fused QKV) are read in place."""
    qkv = torch.randn(2, n, 3, 2, d, device=DEVICE) * 3 + torch.randn(2, d, device=DEVICE)
    k, v = qkv[:, :, 1].bfloat16(), qkv[:, :, 2]
    mean = R.key_mean(k)
    got = _kernels().quantize_kv_triton(k, v, mean, bn)
    want = R.quantize_kv(k, v, mean, bn)
    assert torch.equal(got.k, want.k)
    assert torch.equal(got.k_scale, want.k_scale)
    assert torch.equal(got.v.view(torch.uint8), want.v.view(torch.uint8))
    assert torch.equal(got.v_scale, want.v_scale) and got.num_tokens == n


# =========================================================================== GPU, full size
@pytest.mark.gpu
@pytest.mark.parametrize("cached", [False, True], ids=["joint", "cached"])
def test_gpu_wan5b_720p_accuracy(cached):
    """docs/design.md §8 wan5b-720p (B 1, 24 heads, D 128, Nv 27,280, Nr 4,400) on the GPU, bf16:
    8-bit attention against bf16 SDPA (the fp64 truth does not fit at this size)."""
    nv, nr = 31 * 22 * 40, 5 * 22 * 40
    q, k, v = _acts(1, nv + nr, 24, 128, k_offset=4.0)
    with torch.no_grad():
        if cached:
            args = (q[:, :nv], k[:, :nv], v[:, :nv], k[:, nv:], v[:, nv:])
            out = wk.cached_asym_attention(*args, backend="triton", precision="fp8")
            cache = wk.attention.quantize_ref_kv(k[:, nv:], v[:, nv:])
            out_c = wk.cached_asym_attention(*args[:3], cache, None, backend="triton", precision="fp8")
            base = wk.cached_asym_attention(*args, backend="reference")
            _assert_quality(out_c, base, "wan5b-720p cached, QuantizedKV vs bf16 SDPA")
        else:
            out = wk.asym_attention(q, k, v, nv, backend="triton", precision="fp8")
            base = asym_attention_ref(q, k, v, nv)
    _assert_quality(out, base, f"wan5b-720p {'cached' if cached else 'joint'} vs bf16 SDPA")


def test_gpu_without_fp8_tensor_cores(monkeypatch, caplog):
    """On an sm_80 GPU, backend='triton' raises (naming sm_89) and 'auto' warns and runs the
    reference: never a silent fallback."""
    from wildactor_kernels.attention import fp8_op

    class FakeCuda:
        is_cuda = True
        device = "cuda:0"

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match="sm_89"):
        fp8_op._resolve("triton", FakeCuda())
    with caplog.at_level("WARNING", logger="wildactor_kernels"):
        assert fp8_op._resolve("auto", FakeCuda()) == "reference"
    assert "sm_80" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_op._resolve("auto", FakeCuda()) == "triton"
