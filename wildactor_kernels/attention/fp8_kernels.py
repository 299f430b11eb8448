"""Triton kernel for 8-bit asymmetric attention (int8 QK^T, e4m3 PV; sm_89 / sm_90).

The spec is ``fp8_reference.py`` (scheme, tiles, order of fp32 operations); the launcher reuses
its quantizers for K and V, so the kernel proper is the attention loop:

``_fp8_attn_fwd_kernel``
    grid ``(cdiv(Nv, BLOCK_M) + cdiv(NQ - Nv, BLOCK_M), B*H)``, the asymmetric mapping of
    ``kernels._query_segment``: video query blocks first, then reference query blocks. A block
    reads at most two *key sets* (``QuantizedKV``): set 1 is read by video blocks only (joint:
    the video keys; cached: the video keys), set 2 by every block (joint: the reference keys;
    cached: the reference cache). Reference blocks of joint mode read set 2 only, so they never
    see video keys. In cached mode every block is a video block.

Per program: the q tile is loaded once, quantized to int8 in registers (one scale for the tile
and head), and the softmax scale ``sm_scale * log2 e`` is folded into that scale. Per key block:
``int8 q @ int8 k^T`` (int32 accumulate, exact), one scalar rescale to fp32 scores, online
softmax in fp32 base 2 with the P scale folded into the exponent (``p = exp2(s*c - (m - log2
448))``, one FMA + one exp2 per score on full blocks, where the row max is taken on the int32
scores and scaled once per row), ``P`` to e4m3, ``acc += P @ V`` with the e4m3 ``V`` tile (fp32
accumulate). Between the two sets the accumulator is rescaled per channel by
``RATIO = v_scale_1 / v_scale_2``; the epilogue multiplies by ``OSCALE = v_scale_2`` and divides
by the row sum (which carries the same factor 448 as P).

Operand layouts for Hopper wgmma: int8 and fp8 wgmma need both shared-memory operands K-major
(the reduction dimension contiguous). QK^T reduces over D: q ``[BM, D]`` and k ``[BN, D]`` are
stored D-contiguous. PV reduces over the keys: the quantizer stores V transposed
(``[B, H, D, Np]``, tokens contiguous), the kernel loads ``[D, BN]`` tiles and hands
``tl.trans`` of them to the dot, so no transpose happens in shared memory.

Interpreter (``TRITON_INTERPRET=1``, the CPU tests): int8 dots are exact there, but converting
fp32 to ``float8e4nv`` rounds wrongly when the mantissa carries into the next binade (7.77 -> 4),
and fp8 operands would be multiplied as raw bits in mixed dots. So under the interpreter only
(``UPCAST``) P is rounded to the e4m3 grid in fp32 arithmetic (``_round_e4m3``, round to nearest
even, saturating as the GPU's ``cvt.rn.satfinite``) and the PV dot runs in fp32 on the upcast
e4m3 values, which are exactly representable: the result is the GPU's up to accumulation order.

Scores are never stored; no N x N matrix exists. Forward only (inference).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._utils import interpreter_active
from .fp8_reference import (
    AMAX_EPS,
    E4M3_MAX,
    INT8_MAX,
    LOG2_P_SCALE,
    TOKEN_PAD,
    QuantizedKV,
    key_mean,
    quantize_kv,
)
from .kernels import _query_segment

__all__ = ["fp8_attention_fwd", "fp8_block_m", "quantize_kv_triton", "asym_attention_fp8_triton"]

_LOG2E = 1.4426950408889634
# module constants read inside @triton.jit must be constexpr
_INT8_MAX = tl.constexpr(INT8_MAX)
_AMAX_EPS = tl.constexpr(AMAX_EPS)
_LOG2_P_SCALE = tl.constexpr(LOG2_P_SCALE)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _round_e4m3(x):
    """fp32 ``x`` -> the nearest e4m3fn value (ties to even), still in fp32, saturated to +-448.
    The interpreter's own fp32 -> fp8 conversion is wrong when rounding carries into the next
    binade; this uses exact power-of-two steps taken from the exponent bits."""
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # below 2^-6: subnormals, one fixed step 2^-9
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    t = x / step
    r = tl.floor(t + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where(((r - t) == 0.5) & odd, r - 1.0, r)
    return tl.minimum(tl.maximum(r * step, -448.0), 448.0)


@triton.jit
def _fp8_block(acc, l_i, m_i, q, qk_c, p_k, p_vt, ks, n_left, offs_n, d_ok,
               MASK_N: tl.constexpr, MASK_D: tl.constexpr, SCALE_NEG: tl.constexpr,
               UPCAST: tl.constexpr):
    n_ok = offs_n < n_left
    # ---- scores: int8 x int8 -> int32 (exact), one scalar rescale to base-2 logits
    if MASK_N:
        if MASK_D:
            k = tl.load(p_k, mask=n_ok[:, None] & d_ok[None, :], other=0)
        else:
            k = tl.load(p_k, mask=n_ok[:, None], other=0)
    else:
        if MASK_D:
            k = tl.load(p_k, mask=d_ok[None, :], other=0)
        else:
            k = tl.load(p_k)
    qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    c = qk_c * ks  # > 0 unless the softmax scale is negative
    if MASK_N:
        s = tl.where(n_ok[None, :], qk * c, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - (m_new - _LOG2_P_SCALE)[:, None])
    else:
        # full block: the max of the scaled scores is the scaled max (the min for c < 0), exactly
        if SCALE_NEG:
            m_new = tl.maximum(m_i, tl.min(qk, 1) * c)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * c)
        p = tl.exp2(qk * c - (m_new - _LOG2_P_SCALE)[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # ---- PV: V^T tile [BD, BN] (tokens contiguous), its transpose is the K-major B operand
    if MASK_N:
        if MASK_D:
            vt = tl.load(p_vt, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            vt = tl.load(p_vt, mask=n_ok[None, :], other=0.0)
    else:
        if MASK_D:
            vt = tl.load(p_vt, mask=d_ok[:, None], other=0.0)
        else:
            vt = tl.load(p_vt)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(_round_e4m3(p), tl.trans(vt.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc)
    return acc, l_i, m_new


@triton.jit
def _fp8_set(acc, l_i, m_i, q, qk_c, KQ, KS, VT, n_keys, stride_kn, stride_vd, offs_n, offs_d, d_ok,
             BLOCK_N: tl.constexpr, MASK_D: tl.constexpr, SCALE_NEG: tl.constexpr,
             UPCAST: tl.constexpr):
    """Online softmax over the ``n_keys`` keys of one quantized set: full blocks without key
    masks, then at most one masked tail. ``KQ, KS, VT`` point at this (batch, head)."""
    o_k = offs_n[:, None] * stride_kn + offs_d[None, :]
    o_vt = offs_d[:, None] * stride_vd + offs_n[None, :]
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        ks = tl.load(KS + start // BLOCK_N)
        acc, l_i, m_i = _fp8_block(acc, l_i, m_i, q, qk_c, KQ + start * stride_kn + o_k,
                                   VT + start + o_vt, ks, n_keys - start, offs_n, d_ok,
                                   False, MASK_D, SCALE_NEG, UPCAST)
    for start in range(n_full, n_keys, BLOCK_N):  # runs at most once: the ragged tail
        ks = tl.load(KS + start // BLOCK_N)
        acc, l_i, m_i = _fp8_block(acc, l_i, m_i, q, qk_c, KQ + start * stride_kn + o_k,
                                   VT + start + o_vt, ks, n_keys - start, offs_n, d_ok,
                                   True, MASK_D, SCALE_NEG, UPCAST)
    return acc, l_i, m_i


def _fwd_configs():
    if interpreter_active():  # one small fixed tile: quick tests that still cover ragged tails
        return [triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)]
    # sm_90 candidates (BLOCK_M, warps, stages); BLOCK_N is the quantization tile of K, chosen
    # by the launcher. None spills at D = 128 on sm_90 (BLOCK_M = 128 with 4 warps does: dropped).
    cfgs = [(128, 8, 3), (128, 8, 4), (64, 4, 3), (64, 4, 2)]
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in cfgs]


@triton.autotune(configs=_fwd_configs(), key=["HEAD_DIM", "BLOCK_N", "SCALE_NEG", "UPCAST"])
@triton.jit
def _fp8_attn_fwd_kernel(
    Q, Out, KQ1, KS1, VT1, KQ2, KS2, VT2, RATIO, OSCALE,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_k1h, stride_k1n, stride_s1h, stride_v1h, stride_v1d,
    stride_k2h, stride_k2n, stride_s2h, stride_v2h, stride_v2d,
    H, NQ, NV, N1, N2, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCALE_NEG: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program = one query block of one (batch, head). Quantized sets are contiguous
    ``[B, H, ...]``, so one stride per (batch*H + head) index ``i_bh`` addresses them."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_bh64 = i_bh.to(tl.int64)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    q_start, q_end, k_start = _query_segment(i_m, NV, NQ, BLOCK_M)
    n1 = tl.where(k_start == 0, N1, 0)  # reference blocks (k_start = Nv > 0) skip set 1

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < q_end - q_start

    # ---- q tile -> int8, one scale per tile and head; sm_scale * log2 e folded into it
    q_base = Q + i_b * stride_qb + i_h * stride_qh + q_start.to(tl.int64) * stride_qn
    p_q = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(p_q, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(q), 1), 0), _AMAX_EPS)
    t = q * (_INT8_MAX / amax)
    t = tl.where(t >= 0, tl.floor(t + 0.5), -tl.floor(-t + 0.5))
    q8 = tl.minimum(tl.maximum(t, -_INT8_MAX), _INT8_MAX).to(tl.int8)
    qk_c = (amax / _INT8_MAX) * qk_scale

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # ---- set 1 (video blocks only)
    acc, l_i, m_i = _fp8_set(acc, l_i, m_i, q8, qk_c, KQ1 + i_bh64 * stride_k1h,
                             KS1 + i_bh64 * stride_s1h, VT1 + i_bh64 * stride_v1h, n1, stride_k1n,
                             stride_v1d, offs_n, offs_d, d_ok, BLOCK_N, MASK_D, SCALE_NEG, UPCAST)
    # ---- set 2, after moving the accumulator to set 2's value scales
    p_c = i_bh64 * HEAD_DIM + offs_d
    ratio = tl.load(RATIO + p_c, mask=d_ok, other=1.0)
    acc = acc * ratio[None, :]
    acc, l_i, m_i = _fp8_set(acc, l_i, m_i, q8, qk_c, KQ2 + i_bh64 * stride_k2h,
                             KS2 + i_bh64 * stride_s2h, VT2 + i_bh64 * stride_v2h, N2, stride_k2n,
                             stride_v2d, offs_n, offs_d, d_ok, BLOCK_N, MASK_D, SCALE_NEG, UPCAST)

    # ---- epilogue
    oscale = tl.load(OSCALE + p_c, mask=d_ok, other=0.0)
    o = acc * oscale[None, :] / l_i[:, None]
    o_base = Out + i_b * stride_ob + i_h * stride_oh + q_start.to(tl.int64) * stride_on
    p_o = o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(p_o, o.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# =========================================================================== K/V quantizer
@triton.jit
def _quant_kv_kernel(
    K, V, MEAN, VINV, KQ, KS, VT,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    H, N, NPAD, NT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program = one tile of ``BLOCK_N`` keys of one (batch, head): ``quantize_kv`` of the
    spec in one read of K and V. K: minus the mean, int8 with the tile's scale, rows ``[B, H,
    Np, D]``; V: times ``448 / v_amax`` per channel, e4m3, written transposed ``[B, H, D, Np]``.
    Rows ``[N, Np)`` are written as zeros (loaded as zeros), so the outputs need no memset."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_bh64 = i_bh.to(tl.int64)
    offs_n = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_in = (offs_n < N)[:, None] & d_ok[None, :]
    m_out = (offs_n < NPAD)[:, None] & d_ok[None, :]

    mean = tl.load(MEAN + i_bh64 * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    p_k = K + i_b * stride_kb + i_h * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn \
        + offs_d[None, :] * stride_kd
    k = tl.load(p_k, mask=m_in, other=0.0).to(tl.float32)
    k = tl.where(m_in, k - mean[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), _AMAX_EPS)
    t = k * (_INT8_MAX / amax)
    t = tl.where(t >= 0, tl.floor(t + 0.5), -tl.floor(-t + 0.5))
    kq = tl.minimum(tl.maximum(t, -_INT8_MAX), _INT8_MAX).to(tl.int8)
    p_kq = KQ + i_bh64 * NPAD * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(p_kq, kq, mask=m_out)
    tl.store(KS + i_bh64 * NT + i_t, amax / _INT8_MAX)

    vinv = tl.load(VINV + i_bh64 * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    p_v = V + i_b * stride_vb + i_h * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn \
        + offs_d[None, :] * stride_vd
    v = tl.load(p_v, mask=m_in, other=0.0).to(tl.float32)
    v = tl.minimum(tl.maximum(v * vinv[None, :], -448.0), 448.0)
    if UPCAST:  # the interpreter's fp32 -> e4m3 conversion misrounds; exact values convert fine
        v = _round_e4m3(v)
    p_vt = VT + i_bh64 * HEAD_DIM * NPAD + offs_d[None, :] * NPAD + offs_n[:, None]
    tl.store(p_vt, v.to(tl.float8e4nv), mask=m_out)


def quantize_kv_triton(k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor,
                       block_n: int) -> QuantizedKV:
    """``fp8_reference.quantize_kv`` on the GPU: same codes and scales (bit for bit under the
    interpreter; on the GPU up to the rounding of one fp32 division per tile / channel). The
    per-channel V maximum is one torch reduction (no copy); the rest is one Triton pass."""
    b, n, h, d = k.shape
    if n == 0:
        return quantize_kv(k, v, k_mean, block_n)
    npad = -(-n // TOKEN_PAD) * TOKEN_PAD
    nt = -(-n // block_n)
    vmax = torch.linalg.vector_norm(v, ord=float("inf"), dim=1, dtype=torch.float32)  # [B, H, D]
    vmax = vmax.clamp(min=AMAX_EPS)
    vinv = (E4M3_MAX / vmax).contiguous()
    kq = torch.empty((b, h, npad, d), dtype=torch.int8, device=k.device)
    ks = torch.empty((b, h, nt), dtype=torch.float32, device=k.device)
    vt = torch.empty((b, h, d, npad), dtype=torch.float8_e4m3fn, device=k.device)
    mean = k_mean.float().contiguous()
    _quant_kv_kernel[(max(nt, -(-npad // block_n)), b * h)](
        k, v, mean, vinv, kq, ks, vt, *k.stride(), *v.stride(), h, n, npad, nt,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=block_n,
        UPCAST=interpreter_active(), num_warps=4,
    )
    return QuantizedKV(kq, ks, mean, vt, (vmax / E4M3_MAX).contiguous(), n, block_n)


# =========================================================================== launcher
def fp8_block_m() -> int | None:
    """The query tile the kernel used: the interpreter's one config, or on the GPU the autotuner's
    last choice (None before the first launch). The reference reproduces the kernel when given
    this ``block_m``."""
    cfgs = _fwd_configs()
    if len(cfgs) == 1:
        return cfgs[0].kwargs["BLOCK_M"]
    best = getattr(_fp8_attn_fwd_kernel, "best_config", None)
    return None if best is None else best.kwargs["BLOCK_M"]


def _set_args(s: QuantizedKV):
    return (s.k.stride(1), s.k.stride(2), s.k_scale.stride(1), s.v.stride(1), s.v.stride(2))


def fp8_attention_fwd(q: torch.Tensor, set1: QuantizedKV, set2: QuantizedKV, num_video: int,
                      scale: float) -> torch.Tensor:
    """Launch the 8-bit attention kernel on the device of ``q``.

    Args:
        q: ``[B, NQ, H, D]`` float16/bfloat16/float32 (rotated), any strides.
        set1: video key set, read by rows ``[0, Nv)`` (joint: the video keys, ``Nv`` of them;
            cached: the video keys, ``NQ = Nv``).
        set2: the reference key set, read by every row.
        num_video: ``Nv``; rows ``[Nv, NQ)`` are reference rows (joint mode).
        scale: softmax scale.
    Returns:
        ``[B, NQ, H, D]`` in the dtype of q.
    """
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fp8 attention: q must be one of {_SUPPORTED_DTYPES}, got {q.dtype}")
    if not q.is_cuda and not interpreter_active():
        raise RuntimeError("fp8 attention: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    if set1.block_n != set2.block_n:
        raise ValueError(f"fp8 attention: both key sets need one block_n, got {set1.block_n} and "
                         f"{set2.block_n}")
    b, nq, h, d = q.shape
    o = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    if b * h * nq == 0:
        return o
    n1, n2 = set1.num_tokens, set2.num_tokens
    # an empty set is never read: alias it to the other so every pointer is valid
    if n2 == 0:
        set2, ratio = set1, torch.ones_like(set1.v_scale)
    else:
        ratio = (set1.v_scale / set2.v_scale).contiguous()
        if n1 == 0:
            set1 = set2
    oscale = set2.v_scale.contiguous()

    def grid(meta):
        bm = meta["BLOCK_M"]
        return (triton.cdiv(num_video, bm) + triton.cdiv(nq - num_video, bm), b * h)

    _fp8_attn_fwd_kernel[grid](
        q, o, set1.k, set1.k_scale, set1.v, set2.k, set2.k_scale, set2.v, ratio, oscale,
        *q.stride(), *o.stride(), *_set_args(set1), *_set_args(set2),
        h, nq, num_video, n1, n2, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=set2.block_n,
        SCALE_NEG=scale < 0, UPCAST=interpreter_active(),
    )
    return o


def asym_attention_fp8_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_video: int,
                              scale: float | None = None, *, block_n: int) -> torch.Tensor:
    """Joint mode on rotated ``q, k, v [B, N, H, D]``: K/V quantized (video set, reference set,
    one smoothing vector) by :func:`quantize_kv_triton`, then the kernel."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mean = key_mean(k)
    vid = quantize_kv_triton(k[:, :num_video], v[:, :num_video], mean, block_n)
    ref = quantize_kv_triton(k[:, num_video:], v[:, num_video:], mean, block_n)
    return fp8_attention_fwd(q, vid, ref, num_video, scale)
