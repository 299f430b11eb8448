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
``v_scale_1 / v_scale_2`` (``p_ratio``); the epilogue multiplies by ``v_scale_2`` (``p_oscale``)
and divides by the row sum (which carries the same factor 448 as P).

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

Launchers: ``asym_attention_fp8_fwd`` (the attention kernel on two quantized sets) and
``quantize_kv_fwd`` (``_quantize_kv_kernel``); entry points ``asym_attention_fp8_triton`` /
``cached_asym_attention_fp8_triton`` (rotated inputs) and ``quantize_kv_triton``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._utils import (
    LOG2E,
    SUPPORTED_DTYPES,
    autotune_bench,
    autotune_configs,
    device_guard,
    interpreter_active,
)
from ..quant.reference import AMAX_EPS, FP8_DTYPE, FP8_MAX
from .fp8_reference import (
    INT8_MAX,
    LOG2_P_SCALE,
    TOKEN_PAD,
    QuantizedKV,
    key_mean,
    prepare_cached_sets,
    quantize_kv,
)
from .kernels import _block_d, _query_segment

__all__ = ["asym_attention_fp8_fwd", "quantize_kv_fwd", "fp8_block_m", "quantize_kv_triton",
           "asym_attention_fp8_triton", "cached_asym_attention_fp8_triton"]

# module constants read inside @triton.jit must be constexpr
_INT8_MAX = tl.constexpr(INT8_MAX)
_FP8_MAX = tl.constexpr(FP8_MAX)
_AMAX_EPS = tl.constexpr(AMAX_EPS)
_LOG2_P_SCALE = tl.constexpr(LOG2_P_SCALE)


@triton.jit
def _round_e4m3(b_x):
    """fp32 ``b_x`` -> the nearest e4m3fn value (ties to even), still in fp32, saturated to
    +-448. The interpreter's own fp32 -> fp8 conversion is wrong when rounding carries into the
    next binade; this uses exact power-of-two steps taken from the exponent bits."""
    b_e = ((b_x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    b_e = tl.maximum(b_e, -6)  # below 2^-6: subnormals, one fixed step 2^-9
    b_step = ((b_e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    b_t = b_x / b_step
    b_r = tl.floor(b_t + 0.5)
    b_odd = (b_r - 2.0 * tl.floor(b_r * 0.5)) != 0.0
    b_r = tl.where(((b_r - b_t) == 0.5) & b_odd, b_r - 1.0, b_r)
    return tl.minimum(tl.maximum(b_r * b_step, -_FP8_MAX), _FP8_MAX)


@triton.jit
def _fp8_block(b_acc, b_sum, b_max, b_q, qk_c, p_k, p_vt, ks, n_left, o_n, m_d,
               MASK_N: tl.constexpr, MASK_D: tl.constexpr, SCALE_NEG: tl.constexpr,
               UPCAST: tl.constexpr):
    m_n = o_n < n_left
    # ---- scores: int8 x int8 -> int32 (exact), one scalar rescale to base-2 logits
    if MASK_N:
        if MASK_D:
            b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0)
        else:
            b_k = tl.load(p_k, mask=m_n[:, None], other=0)
    else:
        if MASK_D:
            b_k = tl.load(p_k, mask=m_d[None, :], other=0)
        else:
            b_k = tl.load(p_k)
    b_qk = tl.dot(b_q, tl.trans(b_k), out_dtype=tl.int32).to(tl.float32)
    c = qk_c * ks  # > 0 unless the softmax scale is negative
    if MASK_N:
        b_s = tl.where(m_n[None, :], b_qk * c, float("-inf"))
        b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - (b_max_new - _LOG2_P_SCALE)[:, None])
    else:
        # full block: the max of the scaled scores is the scaled max (the min for c < 0), exactly
        if SCALE_NEG:
            b_max_new = tl.maximum(b_max, tl.min(b_qk, 1) * c)
        else:
            b_max_new = tl.maximum(b_max, tl.max(b_qk, 1) * c)
        b_p = tl.exp2(b_qk * c - (b_max_new - _LOG2_P_SCALE)[:, None])
    b_alpha = tl.exp2(b_max - b_max_new)
    b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
    # ---- PV: V^T tile [BD, BN] (tokens contiguous), its transpose is the K-major B operand
    if MASK_N:
        if MASK_D:
            b_vt = tl.load(p_vt, mask=m_d[:, None] & m_n[None, :], other=0.0)
        else:
            b_vt = tl.load(p_vt, mask=m_n[None, :], other=0.0)
    else:
        if MASK_D:
            b_vt = tl.load(p_vt, mask=m_d[:, None], other=0.0)
        else:
            b_vt = tl.load(p_vt)
    b_acc = b_acc * b_alpha[:, None]
    if UPCAST:
        b_acc = tl.dot(_round_e4m3(b_p), tl.trans(b_vt.to(tl.float32)), b_acc, input_precision="ieee")
    else:
        b_acc = tl.dot(b_p.to(tl.float8e4nv), tl.trans(b_vt), b_acc)
    return b_acc, b_sum, b_max_new


@triton.jit
def _fp8_set(b_acc, b_sum, b_max, b_q, qk_c, p_kq, p_ks, p_vt, n_keys, stride_kn, stride_vd, o_n,
             o_d, m_d, BLOCK_N: tl.constexpr, MASK_D: tl.constexpr, SCALE_NEG: tl.constexpr,
             UPCAST: tl.constexpr):
    """Online softmax over the ``n_keys`` keys of one quantized set: full blocks without key
    masks, then at most one masked tail. ``p_kq, p_ks, p_vt`` point at this (batch, head)."""
    o_k = o_n[:, None] * stride_kn + o_d[None, :]
    o_vt = o_d[:, None] * stride_vd + o_n[None, :]
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        ks = tl.load(p_ks + start // BLOCK_N)
        b_acc, b_sum, b_max = _fp8_block(b_acc, b_sum, b_max, b_q, qk_c, p_kq + start * stride_kn + o_k,
                                         p_vt + start + o_vt, ks, n_keys - start, o_n, m_d,
                                         False, MASK_D, SCALE_NEG, UPCAST)
    for start in range(n_full, n_keys, BLOCK_N):  # runs at most once: the ragged tail
        ks = tl.load(p_ks + start // BLOCK_N)
        b_acc, b_sum, b_max = _fp8_block(b_acc, b_sum, b_max, b_q, qk_c, p_kq + start * stride_kn + o_k,
                                         p_vt + start + o_vt, ks, n_keys - start, o_n, m_d,
                                         True, MASK_D, SCALE_NEG, UPCAST)
    return b_acc, b_sum, b_max


# sm_90 candidates (BLOCK_M, warps, stages); BLOCK_N is the quantization tile of K, chosen by the
# launcher. None spills at D = 128 on sm_90 (BLOCK_M = 128 with 4 warps does: dropped). Under
# the interpreter one small fixed tile: quick tests that still cover ragged tails.
_FP8_GPU = [(128, 8, 3), (128, 8, 4), (64, 4, 3), (64, 4, 2)]
_FP8_INTERPRETED = triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)


@triton.autotune(configs=autotune_configs([triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)
                                           for m, w, s in _FP8_GPU], _FP8_INTERPRETED),
                 key=["HEAD_DIM", "BLOCK_N", "SCALE_NEG", "UPCAST"],
                 do_bench=autotune_bench())
@triton.jit
def _fp8_attn_fwd_kernel(
    p_q, p_o, p_kq1, p_ks1, p_vt1, p_kq2, p_ks2, p_vt2, p_ratio, p_oscale,
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

    o_m = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    m_m = o_m < q_end - q_start

    # ---- q tile -> int8, one scale per tile and head; sm_scale * log2 e folded into it
    p_q0 = p_q + i_b * stride_qb + i_h * stride_qh + q_start.to(tl.int64) * stride_qn
    p_q1 = p_q0 + o_m[:, None] * stride_qn + o_d[None, :] * stride_qd
    b_q = tl.load(p_q1, mask=m_m[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(b_q), 1), 0), _AMAX_EPS)
    b_t = b_q * (_INT8_MAX / amax)
    b_t = tl.where(b_t >= 0, tl.floor(b_t + 0.5), -tl.floor(-b_t + 0.5))
    b_q8 = tl.minimum(tl.maximum(b_t, -_INT8_MAX), _INT8_MAX).to(tl.int8)
    qk_c = (amax / _INT8_MAX) * qk_scale

    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # ---- set 1 (video blocks only)
    b_acc, b_sum, b_max = _fp8_set(b_acc, b_sum, b_max, b_q8, qk_c, p_kq1 + i_bh64 * stride_k1h,
                                   p_ks1 + i_bh64 * stride_s1h, p_vt1 + i_bh64 * stride_v1h, n1,
                                   stride_k1n, stride_v1d, o_n, o_d, m_d, BLOCK_N, MASK_D, SCALE_NEG,
                                   UPCAST)
    # ---- set 2, after moving the accumulator to set 2's value scales
    o_c = i_bh64 * HEAD_DIM + o_d
    b_ratio = tl.load(p_ratio + o_c, mask=m_d, other=1.0)
    b_acc = b_acc * b_ratio[None, :]
    b_acc, b_sum, b_max = _fp8_set(b_acc, b_sum, b_max, b_q8, qk_c, p_kq2 + i_bh64 * stride_k2h,
                                   p_ks2 + i_bh64 * stride_s2h, p_vt2 + i_bh64 * stride_v2h, N2,
                                   stride_k2n, stride_v2d, o_n, o_d, m_d, BLOCK_N, MASK_D, SCALE_NEG,
                                   UPCAST)

    # ---- epilogue
    b_oscale = tl.load(p_oscale + o_c, mask=m_d, other=0.0)
    b_o = b_acc * b_oscale[None, :] / b_sum[:, None]
    p_o0 = p_o + i_b * stride_ob + i_h * stride_oh + q_start.to(tl.int64) * stride_on
    p_o1 = p_o0 + o_m[:, None] * stride_on + o_d[None, :] * stride_od
    tl.store(p_o1, b_o.to(p_o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


# =========================================================================== K/V quantizer
@triton.jit
def _quantize_kv_kernel(
    p_k, p_v, p_mean, p_vinv, p_kq, p_ks, p_vt,
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
    o_n = i_t * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    m_in = (o_n < N)[:, None] & m_d[None, :]
    m_out = (o_n < NPAD)[:, None] & m_d[None, :]

    b_mean = tl.load(p_mean + i_bh64 * HEAD_DIM + o_d, mask=m_d, other=0.0)
    p_k0 = p_k + i_b * stride_kb + i_h * stride_kh + o_n[:, None].to(tl.int64) * stride_kn \
        + o_d[None, :] * stride_kd
    b_k = tl.load(p_k0, mask=m_in, other=0.0).to(tl.float32)
    b_k = tl.where(m_in, b_k - b_mean[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(b_k), 1), 0), _AMAX_EPS)
    b_t = b_k * (_INT8_MAX / amax)
    b_t = tl.where(b_t >= 0, tl.floor(b_t + 0.5), -tl.floor(-b_t + 0.5))
    b_kq = tl.minimum(tl.maximum(b_t, -_INT8_MAX), _INT8_MAX).to(tl.int8)
    p_kq0 = p_kq + i_bh64 * NPAD * HEAD_DIM + o_n[:, None] * HEAD_DIM + o_d[None, :]
    tl.store(p_kq0, b_kq, mask=m_out)
    tl.store(p_ks + i_bh64 * NT + i_t, amax / _INT8_MAX)

    b_vinv = tl.load(p_vinv + i_bh64 * HEAD_DIM + o_d, mask=m_d, other=0.0)
    p_v0 = p_v + i_b * stride_vb + i_h * stride_vh + o_n[:, None].to(tl.int64) * stride_vn \
        + o_d[None, :] * stride_vd
    b_v = tl.load(p_v0, mask=m_in, other=0.0).to(tl.float32)
    b_v = tl.minimum(tl.maximum(b_v * b_vinv[None, :], -_FP8_MAX), _FP8_MAX)
    if UPCAST:  # the interpreter's fp32 -> e4m3 conversion misrounds; exact values convert fine
        b_v = _round_e4m3(b_v)
    p_vt0 = p_vt + i_bh64 * HEAD_DIM * NPAD + o_d[None, :] * NPAD + o_n[:, None]
    tl.store(p_vt0, b_v.to(tl.float8e4nv), mask=m_out)


def quantize_kv_fwd(k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor,
                    block_n: int) -> QuantizedKV:
    """Launcher of the K/V quantizer on the tensors' device: ``k, v [B, N, H, D]`` with any
    strides (passed to the kernel), ``k_mean [B, H, D]`` (made contiguous fp32), ``N > 0``.
    Returns the :class:`QuantizedKV` (contiguous tensors)."""
    with device_guard("quantize_kv_fwd", k=k, v=v, k_mean=k_mean):
        return _quantize_kv(k, v, k_mean, block_n)


def _quantize_kv(k, v, k_mean, block_n):
    b, n, h, d = k.shape
    npad = -(-n // TOKEN_PAD) * TOKEN_PAD
    nt = -(-n // block_n)
    vmax = torch.linalg.vector_norm(v, ord=float("inf"), dim=1, dtype=torch.float32)  # [B, H, D]
    vmax = vmax.clamp(min=AMAX_EPS)
    vinv = (FP8_MAX / vmax).contiguous()
    kq = torch.empty((b, h, npad, d), dtype=torch.int8, device=k.device)
    ks = torch.empty((b, h, nt), dtype=torch.float32, device=k.device)
    vt = torch.empty((b, h, d, npad), dtype=FP8_DTYPE, device=k.device)
    mean = k_mean.float().contiguous()
    _quantize_kv_kernel[(max(nt, -(-npad // block_n)), b * h)](
        k, v, mean, vinv, kq, ks, vt, *k.stride(), *v.stride(), h, n, npad, nt,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_N=block_n, UPCAST=interpreter_active(), num_warps=4,
    )
    return QuantizedKV(kq, ks, mean, vt, (vmax / FP8_MAX).contiguous(), n, block_n)


def quantize_kv_triton(k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor,
                       block_n: int) -> QuantizedKV:
    """``fp8_reference.quantize_kv`` on the GPU: same codes and scales (bit for bit under the
    interpreter; on the GPU up to the rounding of one fp32 division per tile / channel). The
    per-channel V maximum is one torch reduction (no copy); the rest is one Triton pass. An
    empty set (``N = 0``) has nothing to launch: the spec builds it."""
    if k.shape[1] == 0:
        return quantize_kv(k, v, k_mean, block_n)
    return quantize_kv_fwd(k, v, k_mean, block_n)


# =========================================================================== launcher
def fp8_block_m() -> int | None:
    """The query tile the kernel used: the interpreter's one config, or on the GPU the autotuner's
    last choice (None before the first launch). The reference reproduces the kernel when given
    this ``block_m``."""
    cfgs = _fp8_attn_fwd_kernel.configs
    if len(cfgs) == 1:
        return cfgs[0].kwargs["BLOCK_M"]
    best = getattr(_fp8_attn_fwd_kernel, "best_config", None)
    return None if best is None else best.kwargs["BLOCK_M"]


def _contiguous_set(s: QuantizedKV) -> QuantizedKV:
    """The kernel addresses a set's tensors as contiguous ``[B, H, ...]`` rows (one stride per
    batch*head index, unit innermost stride): a set built from views is copied once here
    (``quantize_kv`` / ``quantize_kv_triton`` already return contiguous tensors)."""
    fields = (s.k, s.k_scale, s.v, s.v_scale)
    if all(t.is_contiguous() for t in fields):
        return s
    k, k_scale, v, v_scale = (t.contiguous() for t in fields)
    return QuantizedKV(k, k_scale, s.k_mean, v, v_scale, s.num_tokens, s.block_n)


def _set_args(s: QuantizedKV):
    return (s.k.stride(1), s.k.stride(2), s.k_scale.stride(1), s.v.stride(1), s.v.stride(2))


def asym_attention_fp8_fwd(q: torch.Tensor, set1: QuantizedKV, set2: QuantizedKV, num_video: int,
                           scale: float) -> torch.Tensor:
    """Launch the 8-bit attention kernel on the device of the inputs.

    Args:
        q: ``[B, NQ, H, D]`` float16/bfloat16/float32 (rotated), any strides (passed to the kernel).
        set1: video key set, read by rows ``[0, Nv)`` (joint: the video keys, ``Nv`` of them;
            cached: the video keys, ``NQ = Nv``).
        set2: the reference key set, read by every row. Both sets' tensors are made contiguous
            when they are not (:func:`_contiguous_set`).
        num_video: ``Nv``; rows ``[Nv, NQ)`` are reference rows (joint mode).
        scale: softmax scale.
    Returns:
        ``[B, NQ, H, D]`` in the dtype of q.
    """
    with device_guard("asym_attention_fp8_fwd", q=q, set1_k=set1.k, set1_k_scale=set1.k_scale,
                      set1_v=set1.v, set1_v_scale=set1.v_scale, set2_k=set2.k,
                      set2_k_scale=set2.k_scale, set2_v=set2.v, set2_v_scale=set2.v_scale):
        return _fp8_fwd(q, set1, set2, num_video, scale)


def _fp8_fwd(q, set1, set2, num_video, scale):
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fp8 attention: q must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if not q.is_cuda and not interpreter_active():
        raise RuntimeError("fp8 attention: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    if set1.block_n != set2.block_n:
        raise ValueError(f"fp8 attention: both key sets need one block_n, got {set1.block_n} and "
                         f"{set2.block_n}")
    b, nq, h, d = q.shape
    o = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    if b * h * nq == 0:
        return o
    set1, set2 = _contiguous_set(set1), _contiguous_set(set2)
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
        h, nq, num_video, n1, n2, scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_N=set2.block_n,
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
    return asym_attention_fp8_fwd(q, vid, ref, num_video, scale)


def cached_asym_attention_fp8_triton(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor,
                                     ref_k: torch.Tensor | QuantizedKV, ref_v: torch.Tensor | None,
                                     scale: float | None = None, *, block_n: int) -> torch.Tensor:
    """Cached mode on rotated ``q_v, k_v, v_v [B, Nv, H, D]``: video queries over the video keys
    then the reference ``ref_k, ref_v [B, Nr, H, D]`` (quantized here, one smoothing vector for
    both sets) or ``ref_k`` a :class:`QuantizedKV` cache (``ref_v`` None: its mean and
    ``block_n`` are used), then the kernel."""
    scale = 1.0 / math.sqrt(q_v.shape[-1]) if scale is None else float(scale)
    vid, ref = prepare_cached_sets(k_v, v_v, ref_k, ref_v, block_n, quantize=quantize_kv_triton)
    return asym_attention_fp8_fwd(q_v, vid, ref, q_v.shape[1], scale)
