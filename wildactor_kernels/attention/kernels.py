"""Triton kernels for asymmetric attention (AIPA, docs/design.md §4), with optional fused I-RoPE.

Maths (the spec is ``reference.py``): with ``Nv`` video and ``Nr`` reference tokens,

- video queries attend over all keys:           ``o[:, :Nv] = softmax(s q_v k^T) v``
- reference queries over the reference keys:    ``o[:, Nv:] = softmax(s q_r k_r^T) v_r``
- cached mode: video queries over ``[k_v; ref_k]`` read from two tensors.

Kernels (flash-attention 2 structure, fp32 online softmax in base 2):

``_attn_fwd_kernel``
    grid ``(cdiv(Nv, BLOCK_M) + cdiv(Nr, BLOCK_M), B*H)``: program ids first cover the video
    query blocks, then the reference query blocks, so a block never mixes both segments and
    its key range is one scalar: ``[0, N)`` for video rows, ``[Nv, N)`` for reference rows.
    Cached mode (``CACHED``) has video blocks only and walks two key ranges, ``k_v[0, Nv)`` then
    ``ref_k[0, Nr)``, switching the base pointer between the loops instead of concatenating.
    Saves the log-sum-exp (base 2, scaled units) for the backward pass.
``_attn_bwd_preprocess_kernel``
    ``delta = rowsum(o * do)`` in fp32.
``_attn_bwd_dkdv_kernel``
    one program per key block; video key blocks are read by the video queries only (query
    range ``[0, Nv)``), reference key blocks by every query (``[0, N)``): again one scalar range.
    In cached mode the key blocks come from ``k_v`` then ``ref_k`` and all are read by the video
    queries; ``ref_k`` is never rotated.
``_attn_bwd_dq_kernel``
    one program per query block with the key ranges of the forward pass.

I-RoPE fusion (``ROTATE``): a ``[rows, D]`` tile is reshaped to ``[rows, D/2, 2]`` and split into
its even/odd channels, rotated in fp32 with the per-token ``cos, sin [N, D/2]`` tables and joined
back, so every ``tl.dot`` keeps one full-width operand. q is rotated once per program, k once
per inner iteration (forward, dq) or once per program (dk/dv). The gradients of the rotated
operands are mapped back by the conjugate rotation (``sin -> -sin``). Rotated tiles are rounded
to the input dtype before the dot, exactly as a separate rotation pass would store them.

Whether fusing the rotation beats rotating q/k beforehand (``apply_rope``/``qk_norm_rope``) is
decided by measurement on the GPU (``benchmarks/bench_attention.py``); ``ROPE_MODE`` selects it.

Layout ``[B, N, H, D]`` with arbitrary strides (q, k, v may be views of one fused QKV tensor);
any even ``D`` in 8..256 is padded to a power of two inside the kernels with masks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._utils import interpreter_active, tf32_allowed
from .reference import asym_attention_ref, cached_asym_attention_ref  # noqa: F401  (the spec)

__all__ = ["asym_attention_triton", "cached_asym_attention_triton", "ROPE_MODE", "ROPE_MODES"]

#: How ``asym_attention_triton``/``cached_asym_attention_triton`` apply cos/sin when given:
#: ``"fused"`` rotates q and k inside the attention kernels; ``"prologue"`` rotates them first
#: with the rope kernels (``apply_rope(..., backend="triton")``) and runs the kernels with
#: ``ROTATE=False``. The GPU benchmark decides the default; until it has, "prologue" is used.
ROPE_MODES = ("fused", "prologue")
ROPE_MODE = "prologue"

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# =========================================================================== tile helpers
@triton.jit
def _load_tile(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile; masks are only built when the constexpr flags ask for them so the
    unmasked hot loop keeps plain (vectorisable, pipelinable) loads."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_vec(ptrs, ok, other, MASK: tl.constexpr):
    if MASK:
        x = tl.load(ptrs, mask=ok, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _rope(x, c, s):
    """Rotate interleaved pairs of ``x [R, BD]`` (fp32) by ``c, s [R, BD/2]``:
    ``(x0, x1) -> (x0 c - x1 s, x0 s + x1 c)``. Pass ``-s`` for the inverse (backward) map."""
    x0, x1 = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
    y = tl.join(x0 * c - x1 * s, x0 * s + x1 * c)
    return tl.reshape(y, (x.shape[0], x.shape[1]))


@triton.jit
def _load_cos_sin(p_cos, p_sin, row_ok, pair_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """cos/sin tile; masked entries read as the identity rotation (cos 1, sin 0)."""
    if MASK_ROWS or MASK_COLS:
        # a flag left off means that mask is all-true, so one broadcast mask serves every case
        m = row_ok[:, None] & pair_ok[None, :]
        c = tl.load(p_cos, mask=m, other=1.0)
        s = tl.load(p_sin, mask=m, other=0.0)
    else:
        c = tl.load(p_cos)
        s = tl.load(p_sin)
    return c.to(tl.float32), s.to(tl.float32)


@triton.jit
def _query_segment(i_m, NV, NQ, BLOCK_M: tl.constexpr):
    """The asymmetric structure, in one place: query blocks ``[0, cdiv(Nv, BM))`` are video blocks,
    the rest reference blocks, so a block never mixes the two. Returns the block's first query row,
    the end of its segment, and its first key: video rows read keys ``[0, N)``, reference rows
    ``[Nv, N)`` (references never read video keys)."""
    n_vblk = tl.cdiv(NV, BLOCK_M)
    is_ref = (i_m >= n_vblk).to(tl.int32)
    q_start = i_m * BLOCK_M + is_ref * (NV - n_vblk * BLOCK_M)
    q_end = NV + is_ref * (NQ - NV)
    k_start = is_ref * NV
    return q_start, q_end, k_start


# =========================================================================== forward
@triton.jit
def _fwd_block(acc, l_i, m_i, q, p_k, p_v, p_cos, p_sin, n_left, offs_n, d_ok, pair_ok, qk_scale,
               ROTATE_K: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
               SCALE_NEG: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    n_ok = offs_n < n_left
    k = _load_tile(p_k, n_ok, d_ok, MASK_N, MASK_D)
    if ROTATE_K:
        c, s = _load_cos_sin(p_cos, p_sin, n_ok, pair_ok, MASK_N, MASK_D)
        k = _rope(k.to(tl.float32), c, s).to(p_k.dtype.element_ty)
    if DOT_F32:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASK_N:
        qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
    else:
        # full block: fold the scale into one FMA per score (max of the unscaled scores times
        # the scale; the min when the scale is negative)
        if SCALE_NEG:
            m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(p_v, n_ok, d_ok, MASK_N, MASK_D)
    if DOT_F32:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_range(acc, l_i, m_i, q, K, V, COS, SIN, n_keys, stride_kn, stride_vn, stride_cn,
               o_k, o_v, o_cs, offs_n, d_ok, pair_ok, qk_scale, BLOCK_N: tl.constexpr,
               ROTATE_K: tl.constexpr, MASK_D: tl.constexpr, SCALE_NEG: tl.constexpr,
               DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over keys ``[0, n_keys)`` of one range: full blocks without key masks,
    then at most one masked tail block. ``K, V, COS, SIN`` point at the first key of the range."""
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        st = tl.cast(start, tl.int64)
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K + st * stride_kn + o_k, V + st * stride_vn + o_v,
                                   COS + start * stride_cn + o_cs, SIN + start * stride_cn + o_cs,
                                   n_keys - start, offs_n, d_ok, pair_ok, qk_scale,
                                   ROTATE_K, False, MASK_D, SCALE_NEG, DOT_F32, DOT_PREC)
    for start in range(n_full, n_keys, BLOCK_N):  # runs at most once: the ragged tail
        st = tl.cast(start, tl.int64)
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K + st * stride_kn + o_k, V + st * stride_vn + o_v,
                                   COS + start * stride_cn + o_cs, SIN + start * stride_cn + o_cs,
                                   n_keys - start, offs_n, d_ok, pair_ok, qk_scale,
                                   ROTATE_K, True, MASK_D, SCALE_NEG, DOT_F32, DOT_PREC)
    return acc, l_i, m_i


def _fwd_configs():
    if interpreter_active():  # one small fixed tile: quick tests that still cover ragged tails
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # sm90 candidates (BLOCK_M, BLOCK_N, warps, stages): none of them spills for D=128 when
    # compiled by triton 3.6 for sm_90; the last one is a small fallback for other GPUs.
    cfgs = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3),
            (64, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cfgs]


_SMEM_LIMIT = 227 * 1024  # per-block opt-in shared memory on H100/H200


def _smem_estimate(kind: str, cfg, block_d: int, elem: int, rotate: bool) -> int:
    """Shared memory of one program as triton 3.6 lays it out for sm_90: the streamed operand
    pair sits in ``num_stages`` buffers, the fp32 cos/sin tiles of the streamed operand in
    ``num_stages - 1``, the resident tiles once (checked against compiled kernels, D = 128)."""
    bm, bn, st = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_stages
    stream, resident = (bm, bn) if kind == "dkdv" else (bn, bm)
    nres = 1 if kind == "fwd" else 2
    cs = (st - 1) * stream * block_d * 4 if rotate else 0
    return st * 2 * stream * block_d * elem + cs + nres * resident * block_d * elem


def _make_prune(kind: str):
    def prune(configs, named_args, **kwargs):
        """Drop candidates that cannot fit in shared memory, so no time is spent compiling them;
        always keep at least the smallest one."""
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
        rotate = bool(kwargs.get("ROTATE", named_args.get("ROTATE", False)))
        q = named_args.get("Q")
        elem = q.element_size() if hasattr(q, "element_size") else 2
        est = [(_smem_estimate(kind, c, block_d, elem, rotate), i) for i, c in enumerate(configs)]
        kept = [configs[i] for e, i in est if e <= _SMEM_LIMIT]
        return kept or [configs[min(est)[1]]]
    return prune


@triton.autotune(configs=_fwd_configs(), key=["HEAD_DIM", "ROTATE", "CACHED", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": _make_prune("fwd")})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, K2, V2, Out, LSE, COS, SIN,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_k2b, stride_k2n, stride_k2h, stride_k2d,
    stride_v2b, stride_v2n, stride_v2h, stride_v2d,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_cn,
    H, NQ, NV, NK2, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROTATE: tl.constexpr, CACHED: tl.constexpr, SCALE_NEG: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program = one query block of one (batch, head).

    Joint (``CACHED=False``): ``NQ = N`` rows; video blocks read keys ``[0, N)``, reference blocks
    keys ``[Nv, N)`` of ``K``. Cached: ``NQ = NV`` video rows read ``K[0, NV)`` then ``K2[0, NK2)``.
    """
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    # ---- segment of this query block: video blocks first, then reference blocks
    q_start, q_end, k_start = _query_segment(i_m, NV, NQ, BLOCK_M)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_D // 2)
    d_ok = offs_d < HEAD_DIM
    pair_ok = offs_p < HEAD_DIM // 2
    m_ok = offs_m < q_end - q_start

    # ---- q tile, rotated once per program
    q_base = Q + i_b * stride_qb + i_h * stride_qh + q_start.to(tl.int64) * stride_qn
    q = _load_tile(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, m_ok, d_ok,
                   True, MASK_D)
    o_cs = offs_n[:, None] * stride_cn + offs_p[None, :]
    if ROTATE:
        p_cq = q_start * stride_cn + offs_m[:, None] * stride_cn + offs_p[None, :]
        c, s = _load_cos_sin(COS + p_cq, SIN + p_cq, m_ok, pair_ok, True, MASK_D)
        q = _rope(q.to(tl.float32), c, s).to(Q.dtype.element_ty)
    if DOT_F32:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # ---- key range 1: K[k_start, NQ)
    o_k = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    o_v = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    K_1 = K + i_b * stride_kb + i_h * stride_kh + k_start.to(tl.int64) * stride_kn
    V_1 = V + i_b * stride_vb + i_h * stride_vh + k_start.to(tl.int64) * stride_vn
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, K_1, V_1, COS + k_start * stride_cn,
                               SIN + k_start * stride_cn, NQ - k_start, stride_kn, stride_vn,
                               stride_cn, o_k, o_v, o_cs, offs_n, d_ok, pair_ok, qk_scale, BLOCK_N,
                               ROTATE, MASK_D, SCALE_NEG, DOT_F32, DOT_PREC)
    # ---- key range 2 (cached mode): the reference cache, already rotated
    if CACHED:
        o_k2 = offs_n[:, None] * stride_k2n + offs_d[None, :] * stride_k2d
        o_v2 = offs_n[:, None] * stride_v2n + offs_d[None, :] * stride_v2d
        K_2 = K2 + i_b * stride_k2b + i_h * stride_k2h
        V_2 = V2 + i_b * stride_v2b + i_h * stride_v2h
        acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, K_2, V_2, COS, SIN, NK2, stride_k2n,
                                   stride_v2n, stride_cn, o_k2, o_v2, o_cs, offs_n, d_ok, pair_ok,
                                   qk_scale, BLOCK_N, False, MASK_D, SCALE_NEG, DOT_F32, DOT_PREC)

    # ---- epilogue
    o = acc / l_i[:, None]
    o_base = Out + i_b * stride_ob + i_h * stride_oh + q_start.to(tl.int64) * stride_on
    p_o = o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(p_o, o.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = m_i + tl.log2(l_i)
    tl.store(LSE + i_bh.to(tl.int64) * NQ + q_start + offs_m, lse, mask=m_ok)


# =========================================================================== backward
@triton.jit
def _attn_bwd_preprocess_kernel(Out, DO, DELTA, stride_ob, stride_on, stride_oh, stride_od,
                                stride_dob, stride_don, stride_doh, stride_dod, H, NQ,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr):
    """``delta[b, h, n] = sum_d o * do`` in fp32."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    rows = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = (rows < NQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + i_b * stride_ob + i_h * stride_oh + rows[:, None].to(tl.int64) * stride_on
                + offs_d[None, :] * stride_od, mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + i_b * stride_dob + i_h * stride_doh + rows[:, None].to(tl.int64) * stride_don
                 + offs_d[None, :] * stride_dod, mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + i_bh.to(tl.int64) * NQ + rows, tl.sum(o * do, 1), mask=rows < NQ)


@triton.jit
def _dkdv_block(dk, dv, k, v, p_q, p_do, p_lse, p_delta, p_cos, p_sin, n_left, offs_m, d_ok,
                pair_ok, qk_scale, ROTATE_Q: tl.constexpr, MASK_M: tl.constexpr,
                MASK_D: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    m_ok = offs_m < n_left
    q = _load_tile(p_q, m_ok, d_ok, MASK_M, MASK_D)
    if ROTATE_Q:
        c, s = _load_cos_sin(p_cos, p_sin, m_ok, pair_ok, MASK_M, MASK_D)
        q = _rope(q.to(tl.float32), c, s).to(p_q.dtype.element_ty)
    do = _load_tile(p_do, m_ok, d_ok, MASK_M, MASK_D)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # rows past the range read lse = +inf, so their probabilities are exactly 0
    lse = _load_vec(p_lse, m_ok, float("inf"), MASK_M)
    delta = _load_vec(p_delta, m_ok, 0.0, MASK_M)
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
    pT = tl.exp2(qkT * qk_scale - lse[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


def _bwd_configs(kind: str):
    if interpreter_active():
        blk = {"BLOCK_M": 16, "BLOCK_N": 32} if kind == "dkdv" else {"BLOCK_M": 32, "BLOCK_N": 16}
        return [triton.Config(blk, num_warps=4, num_stages=1)]
    if kind == "dkdv":  # one key block resident, query blocks streamed through it
        cfgs = [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2)]
    else:  # dq: one query block resident, key blocks streamed
        cfgs = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (128, 128, 8, 2)]
    out = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cfgs]
    out.append(triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2))  # fallback
    return out


@triton.autotune(configs=_bwd_configs("dkdv"), key=["HEAD_DIM", "ROTATE", "CACHED", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": _make_prune("dkdv")})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, K2, V2, DO, LSE, DELTA, DK, DV, DK2, DV2, COS, SIN,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_k2b, stride_k2n, stride_k2h, stride_k2d,
    stride_v2b, stride_v2n, stride_v2h, stride_v2d,
    stride_dob, stride_don, stride_doh, stride_dod,
    stride_cn,
    H, NQ, NV, NK2, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROTATE: tl.constexpr, CACHED: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program = one key block. Key blocks ``[0, cdiv(NV, BLOCK_N))`` are the video keys,
    the rest the reference keys: ``K[NV, NQ)`` (joint) or ``K2[0, NK2)`` (cached).
    Gradients are written to contiguous ``DK/DV`` (and ``DK2/DV2`` in cached mode)."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    n_vblk = tl.cdiv(NV, BLOCK_N)
    is_ref = i_n >= n_vblk
    is_ref_i = is_ref.to(tl.int32)
    if CACHED:
        # rows relative to the start of the tensor that holds them
        k_start = i_n * BLOCK_N - is_ref_i * n_vblk * BLOCK_N
        k_end = NV + is_ref_i * (NK2 - NV)
        q_end = NQ  # every video query reads every key
        K_t = tl.where(is_ref, K2 + i_b * stride_k2b + i_h * stride_k2h,
                       K + i_b * stride_kb + i_h * stride_kh)
        V_t = tl.where(is_ref, V2 + i_b * stride_v2b + i_h * stride_v2h,
                       V + i_b * stride_vb + i_h * stride_vh)
        skn = tl.where(is_ref, stride_k2n, stride_kn)
        skd = tl.where(is_ref, stride_k2d, stride_kd)
        svn = tl.where(is_ref, stride_v2n, stride_vn)
        svd = tl.where(is_ref, stride_v2d, stride_vd)
        DK_t = tl.where(is_ref, DK2, DK)
        DV_t = tl.where(is_ref, DV2, DV)
        nk_out = NV + is_ref_i * (NK2 - NV)  # rows of the gradient tensor written
    else:
        k_start = i_n * BLOCK_N + is_ref_i * (NV - n_vblk * BLOCK_N)
        k_end = NV + is_ref_i * (NQ - NV)
        q_end = NV + is_ref_i * (NQ - NV)  # video keys: video queries; reference keys: all
        K_t = K + i_b * stride_kb + i_h * stride_kh
        V_t = V + i_b * stride_vb + i_h * stride_vh
        skn = stride_kn
        skd = stride_kd
        svn = stride_vn
        svd = stride_vd
        DK_t = DK
        DV_t = DV
        nk_out = NQ

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_D // 2)
    d_ok = offs_d < HEAD_DIM
    pair_ok = offs_p < HEAD_DIM // 2
    n_ok = offs_n < k_end - k_start
    if CACHED:
        ck_ok = offs_n < (k_end - k_start) * (1 - is_ref_i)  # the cache is already rotated
    else:
        ck_ok = n_ok

    # ---- key/value block, rotated once
    k_rows = K_t + k_start.to(tl.int64) * skn
    k = _load_tile(k_rows + offs_n[:, None] * skn + offs_d[None, :] * skd, n_ok, d_ok, True, MASK_D)
    v = _load_tile(V_t + k_start.to(tl.int64) * svn + offs_n[:, None] * svn + offs_d[None, :] * svd,
                   n_ok, d_ok, True, MASK_D)
    if ROTATE:
        p_ck = (k_start + offs_n)[:, None] * stride_cn + offs_p[None, :]
        ck, sk = _load_cos_sin(COS + p_ck, SIN + p_ck, ck_ok, pair_ok, True, MASK_D)
        k = _rope(k.to(tl.float32), ck, sk).to(K.dtype.element_ty)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # ---- stream the query blocks that see this key block: rows [0, q_end)
    Q_b = Q + i_b * stride_qb + i_h * stride_qh
    DO_b = DO + i_b * stride_dob + i_h * stride_doh
    o_q = offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    o_do = offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    o_cs = offs_m[:, None] * stride_cn + offs_p[None, :]
    LSE_b = LSE + i_bh.to(tl.int64) * NQ + offs_m
    DELTA_b = DELTA + i_bh.to(tl.int64) * NQ + offs_m
    m_full = (q_end // BLOCK_M) * BLOCK_M
    for start in range(0, m_full, BLOCK_M):
        st = tl.cast(start, tl.int64)
        dk, dv = _dkdv_block(dk, dv, k, v, Q_b + st * stride_qn + o_q, DO_b + st * stride_don + o_do,
                             LSE_b + start, DELTA_b + start, COS + start * stride_cn + o_cs,
                             SIN + start * stride_cn + o_cs, q_end - start, offs_m, d_ok, pair_ok,
                             qk_scale, ROTATE, False, MASK_D, DOT_F32, DOT_PREC)
    for start in range(m_full, q_end, BLOCK_M):  # ragged tail, at most once
        st = tl.cast(start, tl.int64)
        dk, dv = _dkdv_block(dk, dv, k, v, Q_b + st * stride_qn + o_q, DO_b + st * stride_don + o_do,
                             LSE_b + start, DELTA_b + start, COS + start * stride_cn + o_cs,
                             SIN + start * stride_cn + o_cs, q_end - start, offs_m, d_ok, pair_ok,
                             qk_scale, ROTATE, True, MASK_D, DOT_F32, DOT_PREC)

    # ---- epilogue: d(k_rot) -> dk by the inverse rotation
    dk = dk * sm_scale
    if ROTATE:
        dk = _rope(dk, ck, -sk)
    # gradient tensors are contiguous [B, rows, H, D]
    g_base = (i_b * nk_out + k_start) * H * HEAD_DIM + i_h * HEAD_DIM
    o_g = offs_n[:, None] * (H * HEAD_DIM) + offs_d[None, :]
    g_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(DK_t + g_base + o_g, dk.to(DK.dtype.element_ty), mask=g_mask)
    tl.store(DV_t + g_base + o_g, dv.to(DV.dtype.element_ty), mask=g_mask)


@triton.jit
def _dq_block(dq, q, do, lse, delta, p_k, p_v, p_cos, p_sin, n_left, offs_n, d_ok, pair_ok,
              qk_scale, ROTATE_K: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
              DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    n_ok = offs_n < n_left
    k = _load_tile(p_k, n_ok, d_ok, MASK_N, MASK_D)
    if ROTATE_K:
        c, s = _load_cos_sin(p_cos, p_sin, n_ok, pair_ok, MASK_N, MASK_D)
        k = _rope(k.to(tl.float32), c, s).to(p_k.dtype.element_ty)
    v = _load_tile(p_v, n_ok, d_ok, MASK_N, MASK_D)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    p = tl.exp2(qk * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where(n_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _dq_range(dq, q, do, lse, delta, K, V, COS, SIN, n_keys, stride_kn, stride_vn, stride_cn,
              o_k, o_v, o_cs, offs_n, d_ok, pair_ok, qk_scale, BLOCK_N: tl.constexpr,
              ROTATE_K: tl.constexpr, MASK_D: tl.constexpr, DOT_F32: tl.constexpr,
              DOT_PREC: tl.constexpr):
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        st = tl.cast(start, tl.int64)
        dq = _dq_block(dq, q, do, lse, delta, K + st * stride_kn + o_k, V + st * stride_vn + o_v,
                       COS + start * stride_cn + o_cs, SIN + start * stride_cn + o_cs, n_keys - start,
                       offs_n, d_ok, pair_ok, qk_scale, ROTATE_K, False, MASK_D, DOT_F32, DOT_PREC)
    for start in range(n_full, n_keys, BLOCK_N):
        st = tl.cast(start, tl.int64)
        dq = _dq_block(dq, q, do, lse, delta, K + st * stride_kn + o_k, V + st * stride_vn + o_v,
                       COS + start * stride_cn + o_cs, SIN + start * stride_cn + o_cs, n_keys - start,
                       offs_n, d_ok, pair_ok, qk_scale, ROTATE_K, True, MASK_D, DOT_F32, DOT_PREC)
    return dq


@triton.autotune(configs=_bwd_configs("dq"), key=["HEAD_DIM", "ROTATE", "CACHED", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": _make_prune("dq")})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, K2, V2, DO, LSE, DELTA, DQ, COS, SIN,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_k2b, stride_k2n, stride_k2h, stride_k2d,
    stride_v2b, stride_v2n, stride_v2h, stride_v2d,
    stride_dob, stride_don, stride_doh, stride_dod,
    stride_cn,
    H, NQ, NV, NK2, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROTATE: tl.constexpr, CACHED: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program = one query block, with the key ranges of the forward kernel."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D

    q_start, q_end, k_start = _query_segment(i_m, NV, NQ, BLOCK_M)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_D // 2)
    d_ok = offs_d < HEAD_DIM
    pair_ok = offs_p < HEAD_DIM // 2
    m_ok = offs_m < q_end - q_start

    q_base = Q + i_b * stride_qb + i_h * stride_qh + q_start.to(tl.int64) * stride_qn
    q = _load_tile(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, m_ok, d_ok,
                   True, MASK_D)
    if ROTATE:
        p_cq = q_start * stride_cn + offs_m[:, None] * stride_cn + offs_p[None, :]
        cq, sq = _load_cos_sin(COS + p_cq, SIN + p_cq, m_ok, pair_ok, True, MASK_D)
        q = _rope(q.to(tl.float32), cq, sq).to(Q.dtype.element_ty)
    do_base = DO + i_b * stride_dob + i_h * stride_doh + q_start.to(tl.int64) * stride_don
    do = _load_tile(do_base + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, m_ok,
                    d_ok, True, MASK_D)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + i_bh.to(tl.int64) * NQ + q_start + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + i_bh.to(tl.int64) * NQ + q_start + offs_m, mask=m_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    o_cs = offs_n[:, None] * stride_cn + offs_p[None, :]
    o_k = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    o_v = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    K_1 = K + i_b * stride_kb + i_h * stride_kh + k_start.to(tl.int64) * stride_kn
    V_1 = V + i_b * stride_vb + i_h * stride_vh + k_start.to(tl.int64) * stride_vn
    dq = _dq_range(dq, q, do, lse, delta, K_1, V_1, COS + k_start * stride_cn,
                   SIN + k_start * stride_cn, NQ - k_start, stride_kn, stride_vn, stride_cn, o_k, o_v,
                   o_cs, offs_n, d_ok, pair_ok, qk_scale, BLOCK_N, ROTATE, MASK_D, DOT_F32, DOT_PREC)
    if CACHED:
        o_k2 = offs_n[:, None] * stride_k2n + offs_d[None, :] * stride_k2d
        o_v2 = offs_n[:, None] * stride_v2n + offs_d[None, :] * stride_v2d
        K_2 = K2 + i_b * stride_k2b + i_h * stride_k2h
        V_2 = V2 + i_b * stride_v2b + i_h * stride_v2h
        dq = _dq_range(dq, q, do, lse, delta, K_2, V_2, COS, SIN, NK2, stride_k2n, stride_v2n,
                       stride_cn, o_k2, o_v2, o_cs, offs_n, d_ok, pair_ok, qk_scale, BLOCK_N, False,
                       MASK_D, DOT_F32, DOT_PREC)

    dq = dq * sm_scale
    if ROTATE:
        dq = _rope(dq, cq, -sq)
    # DQ is contiguous [B, NQ, H, D]
    g_base = (i_b * NQ + q_start) * H * HEAD_DIM + i_h * HEAD_DIM
    p_dq = DQ + g_base + offs_m[:, None] * (H * HEAD_DIM) + offs_d[None, :]
    tl.store(p_dq, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# =========================================================================== launchers
def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, DOT_PREC). The interpreter multiplies bf16 operands as raw bits
    (triton-lang/triton#11584), so there bf16 tiles are upcast before every dot. fp32 inputs use
    IEEE dots unless torch allows TF32 matmuls."""
    dot_f32 = interpreter_active() and dtype == torch.bfloat16
    prec = "tf32" if (dtype == torch.float32 and tf32_allowed()) else "ieee"
    return dot_f32, prec


def _rope_tables(cos: torch.Tensor | None, sin: torch.Tensor | None, dummy: torch.Tensor):
    if cos is None:
        return dummy, dummy, 0
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    return cos, sin, cos.stride(0)


def _check_inputs(what: str, *tensors: torch.Tensor) -> None:
    q = tensors[0]
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{what}: the Triton kernels support {_SUPPORTED_DTYPES}, got {q.dtype}")
    if q.shape[-1] > 256 or q.shape[-1] % 2:
        raise ValueError(f"{what}: the Triton kernels support even head_dim <= 256, got {q.shape[-1]}")
    for t in tensors[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"{what}: all inputs must share one dtype, got {q.dtype} and {t.dtype}")
    if not q.is_cuda and not interpreter_active():
        raise RuntimeError(f"{what}: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")


def _attn_fwd(q, k, v, k2, v2, num_video: int, cos, sin, scale: float, cached: bool):
    """Launch the forward kernel. Returns ``o [B, NQ, H, D]`` (dtype of q) and the base-2
    log-sum-exp ``lse [B, H, NQ]`` float32 (in units of ``scale * log2(e) * q.k``)."""
    b, nq, h, d = q.shape
    o = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    if b * h * nq == 0:
        return o, lse
    nk2 = k2.shape[1] if cached else 0
    if nk2 == 0:  # keep a valid pointer for the unused second range
        k2, v2 = k, v
    cos_t, sin_t, stride_cn = _rope_tables(cos, sin, lse)
    dot_f32, prec = _dot_flags(q.dtype)

    def grid(meta):
        bm = meta["BLOCK_M"]
        return (triton.cdiv(num_video, bm) + triton.cdiv(nq - num_video, bm), b * h)

    _attn_fwd_kernel[grid](
        q, k, v, k2, v2, o, lse, cos_t, sin_t,
        *q.stride(), *k.stride(), *v.stride(), *k2.stride(), *v2.stride(), *o.stride(), stride_cn,
        h, nq, num_video, nk2, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=_block_d(d), ROTATE=cos is not None, CACHED=cached,
        SCALE_NEG=scale < 0, DOT_F32=dot_f32, DOT_PREC=prec,
    )
    return o, lse


def _attn_bwd(do, q, k, v, k2, v2, o, lse, num_video: int, cos, sin, scale: float, cached: bool):
    """Launch the backward kernels. Returns ``(dq, dk, dv)`` and, in cached mode, also
    ``(dk2, dv2)``; all contiguous in the dtype of q."""
    b, nq, h, d = q.shape
    nk2 = k2.shape[1] if cached else 0
    dq = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty(tuple(k.shape), dtype=q.dtype, device=q.device)
    dv = torch.empty(tuple(v.shape), dtype=q.dtype, device=q.device)
    if cached:
        dk2 = torch.empty((b, nk2, h, d), dtype=q.dtype, device=q.device)
        dv2 = torch.empty((b, nk2, h, d), dtype=q.dtype, device=q.device)
    if b * h * nq == 0:
        if cached:  # no query reads the cache
            return dq, dk, dv, dk2.zero_(), dv2.zero_()
        return dq, dk, dv
    if nk2 == 0:
        k2, v2 = k, v
        dk2_t, dv2_t = dk, dv
    else:
        dk2_t, dv2_t = dk2, dv2
    if not cached:
        dk2_t, dv2_t = dk, dv
    block_d = _block_d(d)
    do = do.to(q.dtype)
    delta = torch.empty_like(lse)
    pre_m = 32 if interpreter_active() else 128
    _attn_bwd_preprocess_kernel[(triton.cdiv(nq, pre_m), b * h)](
        o, do, delta, *o.stride(), *do.stride(), h, nq,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=pre_m, num_warps=4,
    )
    cos_t, sin_t, stride_cn = _rope_tables(cos, sin, lse)
    dot_f32, prec = _dot_flags(q.dtype)
    n_ref = nk2 if cached else nq - num_video
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, ROTATE=cos is not None, CACHED=cached,
                  DOT_F32=dot_f32, DOT_PREC=prec)
    strides = (*q.stride(), *k.stride(), *v.stride(), *k2.stride(), *v2.stride(), *do.stride(),
               stride_cn)

    def grid_dkdv(meta):
        bn = meta["BLOCK_N"]
        return (triton.cdiv(num_video, bn) + triton.cdiv(n_ref, bn), b * h)

    _attn_bwd_dkdv_kernel[grid_dkdv](
        q, k, v, k2, v2, do, lse, delta, dk, dv, dk2_t, dv2_t, cos_t, sin_t, *strides,
        h, nq, num_video, nk2, scale * _LOG2E, scale, **common,
    )

    def grid_dq(meta):
        bm = meta["BLOCK_M"]
        return (triton.cdiv(num_video, bm) + triton.cdiv(nq - num_video, bm), b * h)

    _attn_bwd_dq_kernel[grid_dq](
        q, k, v, k2, v2, do, lse, delta, dq, cos_t, sin_t, *strides,
        h, nq, num_video, nk2, scale * _LOG2E, scale, **common,
    )
    if cached:
        return dq, dk, dv, dk2, dv2
    return dq, dk, dv


# =========================================================================== torch.library ops
# Opaque custom ops with fake (meta) kernels and registered autograd: torch.compile(fullgraph=True)
# traces through them without graph breaks; the backward is its own op.
@torch.library.custom_op(
    "wildactor::asym_attention_fwd", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, SymInt num_video, Tensor? cos, Tensor? sin, float scale)"
           " -> (Tensor, Tensor)")
def _asym_attention_fwd_op(q, k, v, num_video, cos, sin, scale):
    return _attn_fwd(q, k, v, None, None, num_video, cos, sin, scale, cached=False)


@_asym_attention_fwd_op.register_fake
def _asym_fwd_fake(q, k, v, num_video, cos, sin, scale):
    b, n, h, d = q.shape
    return q.new_empty((b, n, h, d)), q.new_empty((b, h, n), dtype=torch.float32)


_asym_attention_fwd_op.register_kernel("meta", _asym_fwd_fake)  # meta tensors never reach the kernels


@torch.library.custom_op(
    "wildactor::asym_attention_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, SymInt num_video, "
           "Tensor? cos, Tensor? sin, float scale) -> (Tensor, Tensor, Tensor)")
def _asym_attention_bwd_op(do, q, k, v, o, lse, num_video, cos, sin, scale):
    return _attn_bwd(do, q, k, v, None, None, o, lse, num_video, cos, sin, scale, cached=False)


@_asym_attention_bwd_op.register_fake
def _asym_bwd_fake(do, q, k, v, o, lse, num_video, cos, sin, scale):
    return (q.new_empty(tuple(q.shape)), q.new_empty(tuple(k.shape)), q.new_empty(tuple(v.shape)))


_asym_attention_bwd_op.register_kernel("meta", _asym_bwd_fake)  # meta tensors never reach the kernels


def _asym_setup_context(ctx, inputs, output):
    q, k, v, num_video, cos, sin, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cos, sin)
    ctx.num_video = num_video
    ctx.scale = scale


def _asym_backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, cos, sin = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dk, dv = _asym_attention_bwd_op(grad_o, q, k, v, o, lse, ctx.num_video, cos, sin, ctx.scale)
    return dq, dk, dv, None, None, None, None


_asym_attention_fwd_op.register_autograd(_asym_backward, setup_context=_asym_setup_context)


@torch.library.custom_op(
    "wildactor::cached_asym_attention_fwd", mutates_args=(),
    schema="(Tensor q_v, Tensor k_v, Tensor v_v, Tensor ref_k, Tensor ref_v, Tensor? cos, "
           "Tensor? sin, float scale) -> (Tensor, Tensor)")
def _cached_fwd_op(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale):
    return _attn_fwd(q_v, k_v, v_v, ref_k, ref_v, q_v.shape[1], cos, sin, scale, cached=True)


@_cached_fwd_op.register_fake
def _cached_fwd_fake(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale):
    b, n, h, d = q_v.shape
    return q_v.new_empty((b, n, h, d)), q_v.new_empty((b, h, n), dtype=torch.float32)


_cached_fwd_op.register_kernel("meta", _cached_fwd_fake)  # meta tensors never reach the kernels


@torch.library.custom_op(
    "wildactor::cached_asym_attention_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q_v, Tensor k_v, Tensor v_v, Tensor ref_k, Tensor ref_v, Tensor o, "
           "Tensor lse, Tensor? cos, Tensor? sin, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _cached_bwd_op(do, q_v, k_v, v_v, ref_k, ref_v, o, lse, cos, sin, scale):
    return _attn_bwd(do, q_v, k_v, v_v, ref_k, ref_v, o, lse, q_v.shape[1], cos, sin, scale,
                     cached=True)


@_cached_bwd_op.register_fake
def _cached_bwd_fake(do, q_v, k_v, v_v, ref_k, ref_v, o, lse, cos, sin, scale):
    return (q_v.new_empty(tuple(q_v.shape)), q_v.new_empty(tuple(k_v.shape)),
            q_v.new_empty(tuple(v_v.shape)), q_v.new_empty(tuple(ref_k.shape)),
            q_v.new_empty(tuple(ref_v.shape)))


_cached_bwd_op.register_kernel("meta", _cached_bwd_fake)  # meta tensors never reach the kernels


def _cached_setup_context(ctx, inputs, output):
    q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale = inputs
    o, lse = output
    ctx.save_for_backward(q_v, k_v, v_v, ref_k, ref_v, o, lse, cos, sin)
    ctx.scale = scale


def _cached_backward(ctx, grad_o, grad_lse):
    q_v, k_v, v_v, ref_k, ref_v, o, lse, cos, sin = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    grads = _cached_bwd_op(grad_o, q_v, k_v, v_v, ref_k, ref_v, o, lse, cos, sin, ctx.scale)
    return (*grads, None, None, None)


_cached_fwd_op.register_autograd(_cached_backward, setup_context=_cached_setup_context)


# =========================================================================== public functions
def _resolve_rope_mode(rope_mode: str | None) -> str:
    mode = ROPE_MODE if rope_mode is None else rope_mode
    if mode not in ROPE_MODES:
        raise ValueError(f"rope_mode must be one of {ROPE_MODES}, got {mode!r}")
    return mode


def _prologue_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from ..rope.op import apply_rope

    return apply_rope(x, cos, sin, backend="triton")


def asym_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_video: int,
                          cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                          scale: float | None = None, *, rope_mode: str | None = None) -> torch.Tensor:
    """Asymmetric attention on the Triton kernels (inputs are checked by ``op.asym_attention``).

    Args:
        q, k, v: ``[B, N, H, D]`` float16/bfloat16/float32, any strides; ``D`` even, <= 256.
        num_video: ``Nv``; rows ``[Nv, N)`` are reference tokens.
        cos, sin: optional ``[N, D//2]`` tables: q and k are rotated first (see ``ROPE_MODE``).
        scale: softmax scale, default ``1/sqrt(D)``.
        rope_mode: ``"fused" | "prologue"``; None uses the module's ``ROPE_MODE``.
    Returns:
        ``[B, N, H, D]`` contiguous, dtype of q. Differentiable in q, k, v.
    """
    _check_inputs("asym_attention_triton", q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cos is not None and _resolve_rope_mode(rope_mode) == "prologue":
        q, k = _prologue_rope(q, cos, sin), _prologue_rope(k, cos, sin)
        cos = sin = None
    o, _ = _asym_attention_fwd_op(q, k, v, num_video, cos, sin, scale)
    return o


def cached_asym_attention_triton(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor,
                                 ref_k: torch.Tensor, ref_v: torch.Tensor,
                                 cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                                 scale: float | None = None, *,
                                 rope_mode: str | None = None) -> torch.Tensor:
    """Video queries over ``[k_v; ref_k]`` / ``[v_v; ref_v]`` without concatenation.

    Args:
        q_v, k_v, v_v: ``[B, Nv, H, D]``; cos/sin ``[Nv, D//2]`` rotate q_v and k_v.
        ref_k, ref_v: ``[B, Nr, H, D]`` cached reference keys (already rotated) and values; cast
            to the dtype of q_v when they differ.
        scale, rope_mode: as in :func:`asym_attention_triton`.
    Returns:
        ``[B, Nv, H, D]`` contiguous, dtype of q_v. Differentiable in all five tensors.
    """
    ref_k, ref_v = ref_k.to(q_v.dtype), ref_v.to(q_v.dtype)
    _check_inputs("cached_asym_attention_triton", q_v, k_v, v_v, ref_k, ref_v)
    scale = 1.0 / math.sqrt(q_v.shape[-1]) if scale is None else float(scale)
    if cos is not None and _resolve_rope_mode(rope_mode) == "prologue":
        q_v, k_v = _prologue_rope(q_v, cos, sin), _prologue_rope(k_v, cos, sin)
        cos = sin = None
    o, _ = _cached_fwd_op(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale)
    return o
