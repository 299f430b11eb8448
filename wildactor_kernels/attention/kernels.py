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
    ``delta = rowsum(o * do)`` in fp32 (minus the log-sum-exp's gradient, when it has one).
``_attn_bwd_kernel``
    FlashAttention-3's backward: one program per key block computes its dk/dv and adds its
    share of dq to an fp32 accumulator with atomics, five matmuls per tile. Video key blocks
    are read by the video queries only (query range ``[0, Nv)``), reference key blocks by every
    query (``[0, N)``): again one scalar range. In cached mode the key blocks come from ``k_v``
    then ``ref_k`` and all are read by the video queries; ``ref_k`` is never rotated.
``_attn_bwd_dq_kernel``
    the fp32 dq accumulator, scaled and rotated back, cast to the dtype of q.

The segment arithmetic lives in ``_query_segment`` (query blocks: forward) and its twin
``_key_segment`` (key blocks: backward), and the "full blocks without masks, then one masked
tail block" loop in ``_stream``, which both kernels call with their block step (``_fwd_block``,
``_bwd_block``). Launchers: ``asym_attention_fwd`` / ``asym_attention_bwd`` (joint and cached);
entry points ``asym_attention_triton`` / ``cached_asym_attention_triton``, and with the
log-sum-exp (natural log, ``[B, N, H]``; ring attention) ``asym_attention_lse_triton`` /
``cached_asym_attention_lse_triton``.

I-RoPE fusion (``ROTATE``): a ``[rows, D]`` tile is reshaped to ``[rows, D/2, 2]`` and split into
its even/odd channels, rotated in fp32 with the per-token ``cos, sin [N, D/2]`` tables and joined
back, so every ``tl.dot`` keeps one full-width operand. The forward rotates q once per program
and k once per step; the backward k once per program and q once per step. The gradients of the
rotated operands are mapped back by the conjugate rotation (``sin -> -sin``). Rotated tiles are rounded
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

from .._utils import LOG2E as _LOG2E
from .._utils import (
    ROPE_MODES,
    SUPPORTED_DTYPES,
    autotune_bench,
    autotune_configs,
    device_guard,
    dot_flags,
    interpreter_active,
    register_fake,
)
from .reference import asym_attention_ref, cached_asym_attention_ref  # noqa: F401  (the spec)

__all__ = ["asym_attention_triton", "cached_asym_attention_triton", "asym_attention_lse_triton",
           "cached_asym_attention_lse_triton", "asym_attention_fwd", "asym_attention_bwd", "ROPE_MODE",
           "ROPE_MODES"]

#: How ``asym_attention_triton``/``cached_asym_attention_triton`` apply cos/sin when given (one
#: of ``ROPE_MODES``): ``"fused"`` rotates q and k inside the attention kernels; ``"prologue"``
#: rotates them first with the rope kernels (``apply_rope(..., backend="triton")``) and runs the
#: kernels with ``ROTATE=False``. The GPU benchmark decides the default; until it has,
#: "prologue" is used.
ROPE_MODE = "prologue"


# =========================================================================== tile helpers
@triton.jit
def _dot(b_a, b_b, b_acc, IEEE: tl.constexpr):
    """``b_a @ b_b (+ b_acc)``; ``IEEE`` picks IEEE fp32 dots over TF32 (16-bit inputs ignore it).
    A bool rather than the precision string, so that it can travel in the ``args`` tuples."""
    if IEEE:
        b_out = tl.dot(b_a, b_b, b_acc, input_precision="ieee")
    else:
        b_out = tl.dot(b_a, b_b, b_acc, input_precision="tf32")
    return b_out


@triton.jit
def _load_tile(p, m_row, m_col, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile; masks are only built when the constexpr flags ask for them so the
    unmasked hot loop keeps plain (vectorisable, pipelinable) loads."""
    if MASK_ROWS:
        if MASK_COLS:
            b_x = tl.load(p, mask=m_row[:, None] & m_col[None, :], other=0.0)
        else:
            b_x = tl.load(p, mask=m_row[:, None], other=0.0)
    else:
        if MASK_COLS:
            b_x = tl.load(p, mask=m_col[None, :], other=0.0)
        else:
            b_x = tl.load(p)
    return b_x


@triton.jit
def _load_vec(p, m, other, MASK: tl.constexpr):
    if MASK:
        b_x = tl.load(p, mask=m, other=other)
    else:
        b_x = tl.load(p)
    return b_x


@triton.jit
def _rope(b_x, b_c, b_s):
    """Rotate interleaved pairs of ``b_x [R, BD]`` (fp32) by ``b_c, b_s [R, BD/2]``:
    ``(x0, x1) -> (x0 c - x1 s, x0 s + x1 c)``. Pass ``-b_s`` for the inverse (backward) map."""
    b_x0, b_x1 = tl.split(tl.reshape(b_x, (b_x.shape[0], b_x.shape[1] // 2, 2)))
    b_y = tl.join(b_x0 * b_c - b_x1 * b_s, b_x0 * b_s + b_x1 * b_c)
    return tl.reshape(b_y, (b_x.shape[0], b_x.shape[1]))


@triton.jit
def _load_cos_sin(p_cos, p_sin, m_row, m_pair, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """cos/sin tile; masked entries read as the identity rotation (cos 1, sin 0)."""
    if MASK_ROWS or MASK_COLS:
        # a flag left off means that mask is all-true, so one broadcast mask serves every case
        m_cs = m_row[:, None] & m_pair[None, :]
        b_c = tl.load(p_cos, mask=m_cs, other=1.0)
        b_s = tl.load(p_sin, mask=m_cs, other=0.0)
    else:
        b_c = tl.load(p_cos)
        b_s = tl.load(p_sin)
    return b_c.to(tl.float32), b_s.to(tl.float32)


@triton.jit
def _query_segment(i_m, NV, NQ, BLOCK_M: tl.constexpr):
    """The asymmetric structure seen from a query block: blocks ``[0, cdiv(Nv, BM))`` are video
    blocks, the rest reference blocks, so a block never mixes the two. Returns the block's first
    query row, the end of its segment, and its first key: video rows read keys ``[0, N)``,
    reference rows ``[Nv, N)`` (references never read video keys)."""
    n_vblk = tl.cdiv(NV, BLOCK_M)
    is_ref = (i_m >= n_vblk).to(tl.int32)
    q_start = i_m * BLOCK_M + is_ref * (NV - n_vblk * BLOCK_M)
    q_end = NV + is_ref * (NQ - NV)
    k_start = is_ref * NV
    return q_start, q_end, k_start


@triton.jit
def _key_segment(i_n, NV, NQ, NK2, BLOCK_N: tl.constexpr, CACHED: tl.constexpr):
    """The twin of :func:`_query_segment` seen from a key block: blocks ``[0, cdiv(Nv, BN))``
    are video keys, the rest reference keys (``K[Nv, NQ)`` joint, ``K2[0, NK2)`` cached, where
    ``K`` holds ``NV`` rows, read by all ``NQ`` queries).
    Returns ``(k_start, k_end, q_end, is_ref)``: the block's first row and the end of its
    segment, both counted in the tensor that holds the rows, and the end of the query rows
    that read it (video keys: the video queries ``[0, Nv)``, reference keys: every query
    ``[0, NQ)``; cached: every query reads every key)."""
    n_vblk = tl.cdiv(NV, BLOCK_N)
    is_ref = (i_n >= n_vblk).to(tl.int32)
    if CACHED:
        k_start = i_n * BLOCK_N - is_ref * n_vblk * BLOCK_N
        k_end = NV + is_ref * (NK2 - NV)
        q_end = NQ
    else:
        k_start = i_n * BLOCK_N + is_ref * (NV - n_vblk * BLOCK_N)
        k_end = NV + is_ref * (NQ - NV)
        q_end = k_end
    return k_start, k_end, q_end, is_ref


@triton.jit
def _stream(BLOCK_FN: tl.constexpr, state, args, n, BLOCK: tl.constexpr, ROTATE: tl.constexpr,
            MASK_D: tl.constexpr, SCALE_NEG: tl.constexpr, DOT_F32: tl.constexpr,
            DOT_IEEE: tl.constexpr):
    """The one "full blocks, then masked tail" loop of the forward and backward kernels:
    ``state = BLOCK_FN(state, args, start, n - start, MASK, flags...)`` over the rows ``[0, n)``
    of the streamed operand, full blocks without row masks, then at most one masked tail block.
    ``state`` and ``args`` are tuples of tensors; the flags stay separate constexpr arguments
    (inside a tuple they would turn ``if FLAG:`` into a runtime branch)."""
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):
        state = BLOCK_FN(state, args, start, n - start, False, ROTATE, MASK_D, SCALE_NEG, DOT_F32,
                         DOT_IEEE)
    for start in range(n_full, n, BLOCK):  # runs at most once: the ragged tail
        state = BLOCK_FN(state, args, start, n - start, True, ROTATE, MASK_D, SCALE_NEG, DOT_F32,
                         DOT_IEEE)
    return state


# =========================================================================== forward
@triton.jit
def _fwd_block(state, args, start, n_left, MASK_N: tl.constexpr, ROTATE_K: tl.constexpr,
               MASK_D: tl.constexpr, SCALE_NEG: tl.constexpr, DOT_F32: tl.constexpr,
               DOT_IEEE: tl.constexpr):
    """One key block of the online softmax. ``state = (b_acc, b_sum, b_max)``; ``args`` as
    packed by the forward kernel; the streamed pointers point at the range's first key."""
    b_acc, b_sum, b_max = state
    (b_q, p_k, p_v, p_cos, p_sin, stride_kn, stride_vn, stride_cn, o_k, o_v, o_cs, o_n, m_d, m_p,
     qk_scale) = args
    st = tl.cast(start, tl.int64)
    m_n = o_n < n_left
    b_k = _load_tile(p_k + st * stride_kn + o_k, m_n, m_d, MASK_N, MASK_D)
    if ROTATE_K:
        b_c, b_s = _load_cos_sin(p_cos + start * stride_cn + o_cs, p_sin + start * stride_cn + o_cs,
                                 m_n, m_p, MASK_N, MASK_D)
        b_k = _rope(b_k.to(tl.float32), b_c, b_s).to(p_k.dtype.element_ty)
    if DOT_F32:
        b_k = b_k.to(tl.float32)
    b_qk = _dot(b_q, tl.trans(b_k), None, DOT_IEEE)
    if MASK_N:
        b_qk = tl.where(m_n[None, :], b_qk * qk_scale, float("-inf"))
        b_max_new = tl.maximum(b_max, tl.max(b_qk, 1))
        b_p = tl.exp2(b_qk - b_max_new[:, None])
    else:
        # full block: fold the scale into one FMA per score (max of the unscaled scores times
        # the scale; the min when the scale is negative)
        if SCALE_NEG:
            b_max_new = tl.maximum(b_max, tl.min(b_qk, 1) * qk_scale)
        else:
            b_max_new = tl.maximum(b_max, tl.max(b_qk, 1) * qk_scale)
        b_p = tl.exp2(b_qk * qk_scale - b_max_new[:, None])
    b_alpha = tl.exp2(b_max - b_max_new)
    b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
    b_v = _load_tile(p_v + st * stride_vn + o_v, m_n, m_d, MASK_N, MASK_D)
    if DOT_F32:
        b_v = b_v.to(tl.float32)
    b_acc = b_acc * b_alpha[:, None]
    b_acc = _dot(b_p.to(b_v.dtype), b_v, b_acc, DOT_IEEE)
    return b_acc, b_sum, b_max_new


# Autotune candidates (BLOCK_M, BLOCK_N, warps, stages), most preferred first, per ROTATE. Each
# one builds for sm_90 at D = 128 bf16 with 0 spill bytes (ptxas -v, triton 3.9 and 3.6; joint and
# cached) except the one named below: the configs that spilled were dropped (see _DKDV_GPU). The
# autotuner sees the union; _make_prune keeps the ROTATE list, drops what does not fit in shared
# memory for this head dim and dtype, and compiles at most _FIRST_CALL of the rest.
# Kept although it spills: the CACHED build of 128x128x8x3 (two key ranges keep more pointers
# live) spills 8 B on Triton 3.9 (benchmarks/results/sm90_resources_triton3.9.md); the joint build
# and every build on Triton 3.6, the GPU machine's version, are spill-free, and 128x128 is the tile
# Hopper attention kernels run fastest with. The GPU run's autotuning decides between it and the
# spill-free 128x64 tiles; tests/test_sm90_configs.py pins the 8 B as a known spill on 3.9.
_FWD_GPU = {
    False: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3),
            (64, 32, 4, 2)],
    # with rotation the 128x128x3 and 128x64x4 tiles exceed shared memory at D = 128, and the
    # 128x128x2 and 64x64x4x3 tiles spill (20-36 B joint, 32-36 B cached, Triton 3.9)
    True: [(128, 64, 8, 3), (64, 32, 4, 2)],
}
_FWD_INTERPRETED = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)
_FIRST_CALL = 3  # candidates compiled and timed on the first call of a (D, dtype, flags) key


def _configs(gpu: dict, interpreted):
    union = list(dict.fromkeys(gpu[False] + gpu[True]))
    return autotune_configs(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in union],
        interpreted)


_SMEM_LIMIT = 227 * 1024  # per-block opt-in shared memory on H100/H200


def _smem_estimate(kind: str, cfg, block_d: int, elem: int, rotate: bool) -> int:
    """Shared memory of one program as triton 3.6 lays it out for sm_90: the streamed operand
    pair sits in ``num_stages`` buffers, the fp32 cos/sin tiles of the streamed operand in
    ``num_stages - 1``, the resident tiles once (checked against compiled kernels, D = 128).
    The backward also stages k for ``dS K`` and the ``P^T`` / ``dS^T`` tiles (an upper bound:
    within 8 KiB of triton 3.9's layouts at D = 128)."""
    bm, bn, st = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_stages
    stream, resident = (bm, bn) if kind == "dkdv" else (bn, bm)
    nres = 1 if kind == "fwd" else 2
    cs = (st - 1) * stream * block_d * 4 if rotate else 0
    extra = bn * block_d * elem + 2 * bm * bn * elem + 2048 if kind == "dkdv" else 0
    return st * 2 * stream * block_d * elem + cs + nres * resident * block_d * elem + extra


def _make_prune(kind: str):
    def prune(configs, named_args, **kwargs):
        """The first call's shortlist, keyed by head dim, dtype and ROTATE: the candidates of this
        ROTATE in order of preference, without those that cannot fit in shared memory at this
        ``BLOCK_D`` and element size, at most ``_FIRST_CALL`` of them (at least the smallest)."""
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
        rotate = bool(kwargs.get("ROTATE", named_args.get("ROTATE", False)))
        q = named_args.get("p_q")
        elem = q.element_size() if hasattr(q, "element_size") else 2
        gpu = {"fwd": _FWD_GPU, "dkdv": _DKDV_GPU}[kind]
        by_shape = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c
                    for c in configs}
        cands = [by_shape[t] for t in gpu[rotate] if t in by_shape] or list(configs)
        est = [(_smem_estimate(kind, c, block_d, elem, rotate), i) for i, c in enumerate(cands)]
        kept = [cands[i] for e, i in est if e <= _SMEM_LIMIT]
        return kept[:_FIRST_CALL] or [cands[min(est)[1]]]
    return prune


@triton.autotune(configs=_configs(_FWD_GPU, _FWD_INTERPRETED),
                 key=["HEAD_DIM", "ROTATE", "CACHED", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": _make_prune("fwd")},
                 do_bench=autotune_bench())
@triton.jit
def _attn_fwd_kernel(
    p_q, p_k, p_v, p_k2, p_v2, p_o, p_lse, p_cos, p_sin,
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
    keys ``[Nv, N)`` of ``k``. Cached: all ``NQ`` rows are video rows and read ``k[0, NV)`` then
    ``k2[0, NK2)`` (``NV``, the rows of ``k``, is ``NQ`` for the video op and may differ from it
    for the plain attention of the log-sum-exp entry).
    """
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    DOT_IEEE: tl.constexpr = DOT_PREC == "ieee"

    # ---- segment of this query block: video blocks first, then reference blocks
    if CACHED:  # every query block is a video block
        q_start, q_end, k_start = _query_segment(i_m, NQ, NQ, BLOCK_M)
        n_k1 = NV
    else:
        q_start, q_end, k_start = _query_segment(i_m, NV, NQ, BLOCK_M)
        n_k1 = NQ - k_start

    o_m = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_p = tl.arange(0, BLOCK_D // 2)
    m_d = o_d < HEAD_DIM
    m_p = o_p < HEAD_DIM // 2
    m_m = o_m < q_end - q_start

    # ---- q tile, rotated once per program
    p_q0 = p_q + i_b * stride_qb + i_h * stride_qh + q_start.to(tl.int64) * stride_qn
    b_q = _load_tile(p_q0 + o_m[:, None] * stride_qn + o_d[None, :] * stride_qd, m_m, m_d, True, MASK_D)
    o_cs = o_n[:, None] * stride_cn + o_p[None, :]
    if ROTATE:
        o_cq = q_start * stride_cn + o_m[:, None] * stride_cn + o_p[None, :]
        b_c, b_s = _load_cos_sin(p_cos + o_cq, p_sin + o_cq, m_m, m_p, True, MASK_D)
        b_q = _rope(b_q.to(tl.float32), b_c, b_s).to(p_q.dtype.element_ty)
    if DOT_F32:
        b_q = b_q.to(tl.float32)

    state = (tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32),
             tl.full([BLOCK_M], float("-inf"), dtype=tl.float32))

    # ---- key range 1: k[k_start, NQ) (cached: k[0, NV))
    o_k = o_n[:, None] * stride_kn + o_d[None, :] * stride_kd
    o_v = o_n[:, None] * stride_vn + o_d[None, :] * stride_vd
    p_k1 = p_k + i_b * stride_kb + i_h * stride_kh + k_start.to(tl.int64) * stride_kn
    p_v1 = p_v + i_b * stride_vb + i_h * stride_vh + k_start.to(tl.int64) * stride_vn
    args = (b_q, p_k1, p_v1, p_cos + k_start * stride_cn, p_sin + k_start * stride_cn, stride_kn,
            stride_vn, stride_cn, o_k, o_v, o_cs, o_n, m_d, m_p, qk_scale)
    state = _stream(_fwd_block, state, args, n_k1, BLOCK_N, ROTATE, MASK_D, SCALE_NEG,
                    DOT_F32, DOT_IEEE)
    # ---- key range 2 (cached mode): the reference cache, already rotated
    if CACHED:
        o_k2 = o_n[:, None] * stride_k2n + o_d[None, :] * stride_k2d
        o_v2 = o_n[:, None] * stride_v2n + o_d[None, :] * stride_v2d
        p_k2b = p_k2 + i_b * stride_k2b + i_h * stride_k2h
        p_v2b = p_v2 + i_b * stride_v2b + i_h * stride_v2h
        args = (b_q, p_k2b, p_v2b, p_cos, p_sin, stride_k2n, stride_v2n, stride_cn, o_k2, o_v2, o_cs,
                o_n, m_d, m_p, qk_scale)
        state = _stream(_fwd_block, state, args, NK2, BLOCK_N, False, MASK_D, SCALE_NEG, DOT_F32,
                        DOT_IEEE)
    b_acc, b_sum, b_max = state

    # ---- epilogue
    b_o = b_acc / b_sum[:, None]
    p_o0 = p_o + i_b * stride_ob + i_h * stride_oh + q_start.to(tl.int64) * stride_on
    tl.store(p_o0 + o_m[:, None] * stride_on + o_d[None, :] * stride_od, b_o.to(p_o.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])
    b_lse = b_max + tl.log2(b_sum)
    tl.store(p_lse + i_bh.to(tl.int64) * NQ + q_start + o_m, b_lse, mask=m_m)


# =========================================================================== backward
@triton.jit
def _attn_bwd_preprocess_kernel(p_o, p_do, p_delta, p_dlse, stride_ob, stride_on, stride_oh, stride_od,
                                stride_dob, stride_don, stride_doh, stride_dod, H, NQ, log2e,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr):
    """``delta[b, h, n] = sum_d o * do`` in fp32, minus ``log2(e) * dlse`` when the base-2
    log-sum-exp has a gradient ``dlse [B, H, NQ]`` (``d lse / d s = p``, so that gradient enters
    ``ds = p * (dp - delta)`` as a shift of delta)."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_od = (o_m < NQ)[:, None] & (o_d < HEAD_DIM)[None, :]
    b_o = tl.load(p_o + i_b * stride_ob + i_h * stride_oh + o_m[:, None].to(tl.int64) * stride_on
                  + o_d[None, :] * stride_od, mask=m_od, other=0.0).to(tl.float32)
    b_do = tl.load(p_do + i_b * stride_dob + i_h * stride_doh + o_m[:, None].to(tl.int64) * stride_don
                   + o_d[None, :] * stride_dod, mask=m_od, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    if HAS_DLSE:
        b_delta -= log2e * tl.load(p_dlse + i_bh.to(tl.int64) * NQ + o_m, mask=o_m < NQ, other=0.0)
    tl.store(p_delta + i_bh.to(tl.int64) * NQ + o_m, b_delta, mask=o_m < NQ)


@triton.jit
def _bwd_block(state, args, start, n_left, MASK_M: tl.constexpr, ROTATE_Q: tl.constexpr,
               MASK_D: tl.constexpr, SCALE_NEG: tl.constexpr, DOT_F32: tl.constexpr,
               DOT_IEEE: tl.constexpr):
    """One query block streamed through the resident key block: the five matmuls of a tile.
    ``state = (b_dk, b_dv)``; this block's share of ``dq`` is added to the fp32 accumulator."""
    b_dk, b_dv = state
    (b_k, b_v, b_kbias, p_q, p_do, p_lse, p_delta, p_dqa, p_cos, p_sin, stride_qn, stride_don,
     stride_cn, o_q, o_do, o_dqa, o_cs, o_m, m_d, m_p, qk_scale) = args
    st = tl.cast(start, tl.int64)
    m_m = o_m < n_left
    b_q = _load_tile(p_q + st * stride_qn + o_q, m_m, m_d, MASK_M, MASK_D)
    if ROTATE_Q:
        b_c, b_s = _load_cos_sin(p_cos + start * stride_cn + o_cs, p_sin + start * stride_cn + o_cs,
                                 m_m, m_p, MASK_M, MASK_D)
        b_q = _rope(b_q.to(tl.float32), b_c, b_s).to(p_q.dtype.element_ty)
    b_do = _load_tile(p_do + st * stride_don + o_do, m_m, m_d, MASK_M, MASK_D)
    if DOT_F32:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    # rows past the range read lse = +inf, so their probabilities are exactly 0; keys past the
    # key range carry the bias -inf (their rows of k are 0, and exp2(-lse) could overflow)
    b_lse = _load_vec(p_lse + start, m_m, float("inf"), MASK_M)
    b_delta = _load_vec(p_delta + start, m_m, 0.0, MASK_M)
    b_qkT = _dot(b_k, tl.trans(b_q), None, DOT_IEEE)  # 1: S^T [BLOCK_N, BLOCK_M]
    b_pT = tl.exp2(b_qkT * qk_scale + (b_kbias[:, None] - b_lse[None, :]))
    b_dv = _dot(b_pT.to(b_do.dtype), b_do, b_dv, DOT_IEEE)  # 2: dV += P^T dO
    b_dpT = _dot(b_v, tl.trans(b_do), None, DOT_IEEE)  # 3: dP^T = V dO^T
    b_dsT = (b_pT * (b_dpT - b_delta[None, :])).to(b_q.dtype)
    b_dk = _dot(b_dsT, b_q, b_dk, DOT_IEEE)  # 4: dK += dS^T Q
    # 5: dQ += dS K [BLOCK_M, BLOCK_D]. With BLOCK_M < 64 this one runs on mma.sync, not wgmma.
    # The transposed form dQ^T = K^T dS^T (M = head dim) into a [BLOCK_D, NQ] accumulator puts it
    # on wgmma too, but at D = 128 bf16 it spills at 32x128x8x3 (40/36 B on triton 3.9, 44/44 B
    # on 3.6) and 64x64x8x3 (104 | 244 B), with rotation at every 64-key tile on 3.6 (16-140 B),
    # and 3.6 emits scalar reductions for it: only 16x128x8x3 (241 | 243-250 registers) fits.
    b_dq = _dot(tl.trans(b_dsT), b_k, None, DOT_IEEE)
    # the accumulator is [B*H, NQ, BLOCK_D] fp32 (padded head dim: no column mask needed)
    if MASK_M:
        tl.atomic_add(p_dqa + st * b_dq.shape[1] + o_dqa, b_dq, mask=m_m[:, None], sem="relaxed")
    else:
        tl.atomic_add(p_dqa + st * b_dq.shape[1] + o_dqa, b_dq, sem="relaxed")
    return b_dk, b_dv


_BWD_INTERPRETED = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)
# (BLOCK_M streamed queries, BLOCK_N resident keys, warps, stages), most preferred first.
# Registers / spill bytes at D = 128 bf16 for sm_90 (ptxas -v on the PTX of triton 3.9 | 3.6,
# joint and cached builds; the kept ones spill nothing on either):
#   no rotation  32x128x8x3  252-255 | 234-238     16x128x8x3  234 | 210
#                32x128x8x2  254-255 | 242         32x32x4x2   252 | 250 (mma.sync fallback)
#   rotation     16x64x8x3   224-232 | 253-255     16x64x8x2   223-226 | 246-252
#                32x32x8x2   176-177 | 178-180 (mma.sync fallback)
# Dropped for spilling (bytes stored, 3.9 | 3.6): no rotation 64x64x8x3 (0 | 4-12),
# 64x128x8 x2/x3 (260-272 | -), 64x64x4x3 (524), 32x64x4x3 (40), 128x64x8x2 (692),
# 128x128x8x2 (1040); rotation 32x64x8x3 (0 | 32-44), 32x64x8x2 (0 | 4-20), 32x128x8x2 (204),
# 16x128x8 x2/x3 (60-88), 64x64x8x2 (76), 16x64x4x2 (100), 32x32x4x2 (8). The resident dk/dv
# accumulators (2 x BLOCK_N x 128 fp32) and k, v take most of the 255 registers at
# BLOCK_N = 128; with rotation the per-step fp32 q tile and its cos/sin push every 128-key tile
# over. So the fused-rotation backward fits only with 64-key tiles, which doubles the dq
# atomics per flop (see _attn_bwd_kernel): one more reason ROPE_MODE stays "prologue" until the
# GPU benchmark says otherwise.
_DKDV_GPU = {
    False: [(32, 128, 8, 3), (16, 128, 8, 3), (32, 128, 8, 2), (32, 32, 4, 2)],
    True: [(16, 64, 8, 3), (16, 64, 8, 2), (32, 32, 8, 2)],
}


@triton.autotune(configs=_configs(_DKDV_GPU, _BWD_INTERPRETED),
                 key=["HEAD_DIM", "ROTATE", "CACHED", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": _make_prune("dkdv")},
                 reset_to_zero=["p_dqa"],
                 do_bench=autotune_bench())
@triton.jit
def _attn_bwd_kernel(
    p_q, p_k, p_v, p_k2, p_v2, p_do, p_lse, p_delta, p_dk, p_dv, p_dk2, p_dv2, p_dqa, p_cos, p_sin,
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
    """One program = one key block (see :func:`_key_segment`): ``dk, dv`` of the block, written
    to contiguous ``dk/dv`` (and ``dk2/dv2`` in cached mode), and its share of ``dq`` added to
    the fp32 accumulator ``dqa [B*H, NQ, BLOCK_D]`` (scaled and rotated back by
    :func:`_attn_bwd_dq_kernel`).

    FlashAttention-3's shape: five matmuls per (key block, query block) tile, ``S^T = K Q^T``,
    ``dV += P^T dO``, ``dP^T = V dO^T``, ``dK += dS^T Q``, ``dQ += dS K``, against seven when dq
    has its own pass (which recomputes ``S`` and ``dP``: 40% more tensor-core work). The price
    is the accumulation of dq across key blocks: fp32 ``red.global.add.v4.f32`` (relaxed) of a
    ``BLOCK_M x D`` tile per step, ``4 BLOCK_M D`` bytes per ``10 BLOCK_M BLOCK_N D`` flops, i.e.
    one byte per ``2.5 BLOCK_N`` flops (320 at ``BLOCK_N = 128``: about 2 TB/s of L2 reductions
    at 600 TFLOP/s, within an H100's L2, as FA3 does at this tile). The separate pass would only
    win where the atomics saturate L2 (64-key tiles, i.e. the fused-rotation configs); the GPU
    benchmark is the judge. Atomics make dq order-dependent on the GPU (fp32 sums in the order
    the programs run, a few ulps before the cast); dk and dv are deterministic. Under the
    interpreter programs run in order, so everything is reproducible there."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    DOT_IEEE: tl.constexpr = DOT_PREC == "ieee"

    k_start, k_end, q_end, is_ref = _key_segment(i_n, NV, NQ, NK2, BLOCK_N, CACHED)
    if CACHED:
        # reference key blocks live in k2/v2 and write dk2/dv2
        is_r = is_ref != 0
        p_kt = tl.where(is_r, p_k2 + i_b * stride_k2b + i_h * stride_k2h,
                        p_k + i_b * stride_kb + i_h * stride_kh)
        p_vt = tl.where(is_r, p_v2 + i_b * stride_v2b + i_h * stride_v2h,
                        p_v + i_b * stride_vb + i_h * stride_vh)
        skn = tl.where(is_r, stride_k2n, stride_kn)
        skd = tl.where(is_r, stride_k2d, stride_kd)
        svn = tl.where(is_r, stride_v2n, stride_vn)
        svd = tl.where(is_r, stride_v2d, stride_vd)
        p_dkt = tl.where(is_r, p_dk2, p_dk)
        p_dvt = tl.where(is_r, p_dv2, p_dv)
        nk_out = k_end  # rows of the gradient tensor written
    else:
        p_kt = p_k + i_b * stride_kb + i_h * stride_kh
        p_vt = p_v + i_b * stride_vb + i_h * stride_vh
        skn = stride_kn
        skd = stride_kd
        svn = stride_vn
        svd = stride_vd
        p_dkt = p_dk
        p_dvt = p_dv
        nk_out = NQ

    o_m = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_p = tl.arange(0, BLOCK_D // 2)
    m_d = o_d < HEAD_DIM
    m_p = o_p < HEAD_DIM // 2
    m_n = o_n < k_end - k_start
    if CACHED:
        m_ck = o_n < (k_end - k_start) * (1 - is_ref)  # the cache is already rotated
    else:
        m_ck = m_n
    b_kbias = tl.where(m_n, 0.0, float("-inf"))

    # ---- key/value block, rotated once
    b_k = _load_tile(p_kt + k_start.to(tl.int64) * skn + o_n[:, None] * skn + o_d[None, :] * skd,
                     m_n, m_d, True, MASK_D)
    b_v = _load_tile(p_vt + k_start.to(tl.int64) * svn + o_n[:, None] * svn + o_d[None, :] * svd,
                     m_n, m_d, True, MASK_D)
    if ROTATE:
        o_ck = (k_start + o_n)[:, None] * stride_cn + o_p[None, :]
        b_ck, b_sk = _load_cos_sin(p_cos + o_ck, p_sin + o_ck, m_ck, m_p, True, MASK_D)
        b_k = _rope(b_k.to(tl.float32), b_ck, b_sk).to(p_k.dtype.element_ty)
    if DOT_F32:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)

    # ---- stream the query blocks that see this key block: rows [0, q_end)
    o_q = o_m[:, None] * stride_qn + o_d[None, :] * stride_qd
    o_do = o_m[:, None] * stride_don + o_d[None, :] * stride_dod
    o_cs = o_m[:, None] * stride_cn + o_p[None, :]
    o_dqa = o_m[:, None] * BLOCK_D + o_d[None, :]
    args = (b_k, b_v, b_kbias, p_q + i_b * stride_qb + i_h * stride_qh,
            p_do + i_b * stride_dob + i_h * stride_doh, p_lse + i_bh.to(tl.int64) * NQ + o_m,
            p_delta + i_bh.to(tl.int64) * NQ + o_m, p_dqa + i_bh.to(tl.int64) * NQ * BLOCK_D, p_cos,
            p_sin, stride_qn, stride_don, stride_cn, o_q, o_do, o_dqa, o_cs, o_m, m_d, m_p, qk_scale)
    state = (tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32))
    b_dk, b_dv = _stream(_bwd_block, state, args, q_end, BLOCK_M, ROTATE, MASK_D, False, DOT_F32,
                         DOT_IEEE)

    # ---- epilogue: d(k_rot) -> dk by the inverse rotation
    b_dk = b_dk * sm_scale
    if ROTATE:
        # cos/sin read again rather than kept live through the loop (registers)
        b_ck, b_sk = _load_cos_sin(p_cos + o_ck, p_sin + o_ck, m_ck, m_p, True, MASK_D)
        b_dk = _rope(b_dk, b_ck, -b_sk)
    # gradient tensors are contiguous [B, rows, H, D]
    o_g0 = (i_b * nk_out + k_start) * H * HEAD_DIM + i_h * HEAD_DIM
    o_g = o_n[:, None] * (H * HEAD_DIM) + o_d[None, :]
    m_g = m_n[:, None] & m_d[None, :]
    tl.store(p_dkt + o_g0 + o_g, b_dk.to(p_dk.dtype.element_ty), mask=m_g)
    tl.store(p_dvt + o_g0 + o_g, b_dv.to(p_dv.dtype.element_ty), mask=m_g)


@triton.jit
def _attn_bwd_dq_kernel(p_dqa, p_dq, p_cos, p_sin, stride_cn, H, NQ, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        ROTATE: tl.constexpr):
    """``dq = rot^-1(sm_scale * dqa)`` in the dtype of q: the fp32 accumulator ``[B*H, NQ,
    BLOCK_D]`` of :func:`_attn_bwd_kernel` to the contiguous ``dq [B, NQ, H, D]``."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_p = tl.arange(0, BLOCK_D // 2)
    m_m = o_m < NQ
    b_dq = tl.load(p_dqa + (i_bh.to(tl.int64) * NQ + o_m[:, None]) * BLOCK_D + o_d[None, :],
                   mask=m_m[:, None], other=0.0) * sm_scale
    if ROTATE:
        o_cq = o_m[:, None] * stride_cn + o_p[None, :]
        b_c, b_s = _load_cos_sin(p_cos + o_cq, p_sin + o_cq, m_m, o_p < HEAD_DIM // 2, True, True)
        b_dq = _rope(b_dq, b_c, -b_s)
    p_dq0 = p_dq + (i_b * NQ * H + i_h) * HEAD_DIM
    tl.store(p_dq0 + o_m[:, None].to(tl.int64) * (H * HEAD_DIM) + o_d[None, :],
             b_dq.to(p_dq.dtype.element_ty), mask=m_m[:, None] & (o_d < HEAD_DIM)[None, :])


# =========================================================================== launchers
def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _rope_tables(cos: torch.Tensor | None, sin: torch.Tensor | None, dummy: torch.Tensor):
    if cos is None:
        return dummy, dummy, 0
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    return cos, sin, cos.stride(0)


def _check_inputs(what: str, *tensors: torch.Tensor) -> None:
    q = tensors[0]
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: the Triton kernels support {SUPPORTED_DTYPES}, got {q.dtype}")
    if q.shape[-1] > 256 or q.shape[-1] % 2:
        raise ValueError(f"{what}: the Triton kernels support even head_dim <= 256, got {q.shape[-1]}")
    for t in tensors[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"{what}: all inputs must share one dtype, got {q.dtype} and {t.dtype}")
    if not q.is_cuda and not interpreter_active():
        raise RuntimeError(f"{what}: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")


def asym_attention_fwd(q, k, v, k2, v2, num_video: int, cos, sin, scale: float, cached: bool):
    """Launcher of the forward kernel (joint, or cached with ``k2, v2`` the reference cache).
    In cached mode ``num_video`` is ignored: every query is a video query and ``k, v`` may hold
    another number of rows than ``q`` (without rotation). A query with no key at all gets
    ``o = 0`` and ``lse = -inf``. Every tensor may have any strides (they are passed to the
    kernel; the small cos/sin tables are made contiguous fp32). Returns ``o [B, NQ, H, D]``
    (dtype of q) and the base-2 log-sum-exp ``lse [B, H, NQ]`` float32 (in units of
    ``scale * log2(e) * q.k``)."""
    with device_guard("asym_attention_fwd", q=q, k=k, v=v, k2=k2, v2=v2, cos=cos, sin=sin):
        return _fwd(q, k, v, k2, v2, num_video, cos, sin, scale, cached)


def _fwd(q, k, v, k2, v2, num_video, cos, sin, scale, cached):
    b, nq, h, d = q.shape
    o = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    if b * h * nq == 0:
        return o, lse
    nk2 = k2.shape[1] if cached else 0
    if cached:
        num_video = k.shape[1]  # the rows of the first key range
        if num_video + nk2 == 0:
            return o.zero_(), lse.fill_(float("-inf"))
    if nk2 == 0:  # keep a valid pointer for the unused second range
        k2, v2 = k, v
    cos_t, sin_t, stride_cn = _rope_tables(cos, sin, lse)
    dot_f32, prec = dot_flags(q.dtype)

    def grid(meta):
        bm = meta["BLOCK_M"]
        if cached:
            return (triton.cdiv(nq, bm), b * h)
        return (triton.cdiv(num_video, bm) + triton.cdiv(nq - num_video, bm), b * h)

    _attn_fwd_kernel[grid](
        q, k, v, k2, v2, o, lse, cos_t, sin_t,
        *q.stride(), *k.stride(), *v.stride(), *k2.stride(), *v2.stride(), *o.stride(), stride_cn,
        h, nq, num_video, nk2, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=_block_d(d), ROTATE=cos is not None, CACHED=cached,
        SCALE_NEG=scale < 0, DOT_F32=dot_f32, DOT_PREC=prec,
    )
    return o, lse


def asym_attention_bwd(do, q, k, v, k2, v2, o, lse, num_video: int, cos, sin, scale: float,
                       cached: bool, dlse=None):
    """Launcher of the backward kernels (strides as in :func:`asym_attention_fwd`). Returns
    ``(dq, dk, dv)`` and, in cached mode, also ``(dk2, dv2)``; all contiguous in the dtype of q.
    ``dlse``: optional gradient of the base-2 ``lse [B, H, NQ]`` the forward returned.

    dq is order-dependent on the GPU: the key-block programs add their shares into one fp32
    accumulator with atomics, in whatever order they run (run-to-run differences of a few fp32
    ulps before the cast to the dtype of q). dk and dv are deterministic."""
    with device_guard("asym_attention_bwd", do=do, q=q, k=k, v=v, k2=k2, v2=v2, o=o, lse=lse,
                      cos=cos, sin=sin, dlse=dlse):
        return _bwd(do, q, k, v, k2, v2, o, lse, num_video, cos, sin, scale, cached, dlse)


def _bwd(do, q, k, v, k2, v2, o, lse, num_video, cos, sin, scale, cached, dlse=None):
    b, nq, h, d = q.shape
    nk2 = k2.shape[1] if cached else 0
    dq = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty(tuple(k.shape), dtype=q.dtype, device=q.device)
    dv = torch.empty(tuple(v.shape), dtype=q.dtype, device=q.device)
    if cached:
        dk2 = torch.empty((b, nk2, h, d), dtype=q.dtype, device=q.device)
        dv2 = torch.empty((b, nk2, h, d), dtype=q.dtype, device=q.device)
    n_keys = nq
    if cached:
        num_video = k.shape[1]  # the rows of the first key range
        n_keys = num_video + nk2
    if b * h * nq == 0 or n_keys == 0:  # no query or no key: zero gradients
        if cached:
            return dq.zero_(), dk.zero_(), dv.zero_(), dk2.zero_(), dv2.zero_()
        return dq.zero_(), dk.zero_(), dv.zero_()
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
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    pre_m = 32 if interpreter_active() else 128
    _attn_bwd_preprocess_kernel[(triton.cdiv(nq, pre_m), b * h)](
        o, do, delta, delta if dlse is None else dlse, *o.stride(), *do.stride(), h, nq, _LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=pre_m, HAS_DLSE=dlse is not None, num_warps=4,
    )
    cos_t, sin_t, stride_cn = _rope_tables(cos, sin, lse)
    dot_f32, prec = dot_flags(q.dtype)
    n_ref = nk2 if cached else nq - num_video
    rotate = cos is not None
    strides = (*q.stride(), *k.stride(), *v.stride(), *k2.stride(), *v2.stride(), *do.stride(),
               stride_cn)
    # dq accumulates over the key blocks in fp32 (atomics), padded to BLOCK_D columns
    dqa = torch.zeros((b * h, nq, block_d), dtype=torch.float32, device=q.device)

    def grid(meta):
        bn = meta["BLOCK_N"]
        return (triton.cdiv(num_video, bn) + triton.cdiv(n_ref, bn), b * h)

    _attn_bwd_kernel[grid](
        q, k, v, k2, v2, do, lse, delta, dk, dv, dk2_t, dv2_t, dqa, cos_t, sin_t, *strides,
        h, nq, num_video, nk2, scale * _LOG2E, scale,
        HEAD_DIM=d, BLOCK_D=block_d, ROTATE=rotate, CACHED=cached, DOT_F32=dot_f32, DOT_PREC=prec,
    )
    # 16K elements per program: 191 registers and no spill on sm_90 with rotation at every head dim
    dq_m = pre_m if interpreter_active() else 16384 // block_d
    _attn_bwd_dq_kernel[(triton.cdiv(nq, dq_m), b * h)](
        dqa, dq, cos_t, sin_t, stride_cn, h, nq, scale,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=dq_m, ROTATE=rotate, num_warps=4,
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
    return asym_attention_fwd(q, k, v, None, None, num_video, cos, sin, scale, cached=False)


def _asym_fwd_fake(q, k, v, num_video, cos, sin, scale):
    b, n, h, d = q.shape
    return q.new_empty((b, n, h, d)), q.new_empty((b, h, n), dtype=torch.float32)


register_fake(_asym_attention_fwd_op, _asym_fwd_fake)


@torch.library.custom_op(
    "wildactor::asym_attention_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, SymInt num_video, "
           "Tensor? cos, Tensor? sin, float scale, Tensor? dlse=None) -> (Tensor, Tensor, Tensor)")
def _asym_attention_bwd_op(do, q, k, v, o, lse, num_video, cos, sin, scale, dlse=None):
    return asym_attention_bwd(do, q, k, v, None, None, o, lse, num_video, cos, sin, scale, cached=False,
                              dlse=dlse)


def _asym_bwd_fake(do, q, k, v, o, lse, num_video, cos, sin, scale, dlse=None):
    return (q.new_empty(tuple(q.shape)), q.new_empty(tuple(k.shape)), q.new_empty(tuple(v.shape)))


register_fake(_asym_attention_bwd_op, _asym_bwd_fake)


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
    dq, dk, dv = _asym_attention_bwd_op(grad_o, q, k, v, o, lse, ctx.num_video, cos, sin, ctx.scale,
                                        grad_lse)
    return dq, dk, dv, None, None, None, None


_asym_attention_fwd_op.register_autograd(_asym_backward, setup_context=_asym_setup_context)


@torch.library.custom_op(
    "wildactor::cached_asym_attention_fwd", mutates_args=(),
    schema="(Tensor q_v, Tensor k_v, Tensor v_v, Tensor ref_k, Tensor ref_v, Tensor? cos, "
           "Tensor? sin, float scale) -> (Tensor, Tensor)")
def _cached_fwd_op(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale):
    return asym_attention_fwd(q_v, k_v, v_v, ref_k, ref_v, q_v.shape[1], cos, sin, scale, cached=True)


def _cached_fwd_fake(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale):
    b, n, h, d = q_v.shape
    return q_v.new_empty((b, n, h, d)), q_v.new_empty((b, h, n), dtype=torch.float32)


register_fake(_cached_fwd_op, _cached_fwd_fake)


@torch.library.custom_op(
    "wildactor::cached_asym_attention_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q_v, Tensor k_v, Tensor v_v, Tensor ref_k, Tensor ref_v, Tensor o, "
           "Tensor lse, Tensor? cos, Tensor? sin, float scale, Tensor? dlse=None) -> "
           "(Tensor, Tensor, Tensor, Tensor, Tensor)")
def _cached_bwd_op(do, q_v, k_v, v_v, ref_k, ref_v, o, lse, cos, sin, scale, dlse=None):
    return asym_attention_bwd(do, q_v, k_v, v_v, ref_k, ref_v, o, lse, q_v.shape[1], cos, sin, scale,
                              cached=True, dlse=dlse)


def _cached_bwd_fake(do, q_v, k_v, v_v, ref_k, ref_v, o, lse, cos, sin, scale, dlse=None):
    return (q_v.new_empty(tuple(q_v.shape)), q_v.new_empty(tuple(k_v.shape)),
            q_v.new_empty(tuple(v_v.shape)), q_v.new_empty(tuple(ref_k.shape)),
            q_v.new_empty(tuple(ref_v.shape)))


register_fake(_cached_bwd_op, _cached_bwd_fake)


def _cached_setup_context(ctx, inputs, output):
    q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale = inputs
    o, lse = output
    ctx.save_for_backward(q_v, k_v, v_v, ref_k, ref_v, o, lse, cos, sin)
    ctx.scale = scale


def _cached_backward(ctx, grad_o, grad_lse):
    q_v, k_v, v_v, ref_k, ref_v, o, lse, cos, sin = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    grads = _cached_bwd_op(grad_o, q_v, k_v, v_v, ref_k, ref_v, o, lse, cos, sin, ctx.scale, grad_lse)
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


# =========================================================================== log-sum-exp entries
_LN2 = 0.6931471805599453


def _natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' base-2 ``lse [B, H, N]`` (units of ``scale * log2(e) * q.k``) as the natural
    log-sum-exp of ``scale * q.k`` in ``[B, N, H]`` fp32 (differentiable: its gradient reaches
    the backward kernel as ``dlse``)."""
    return (lse2 * _LN2).transpose(1, 2).contiguous()


def asym_attention_lse_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_video: int,
                              cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                              scale: float | None = None, *,
                              rope_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`asym_attention_triton` that also returns the log-sum-exp of each query's scores.

    Returns:
        ``(o, lse)``: ``o [B, N, H, D]`` as :func:`asym_attention_triton`; ``lse [B, N, H]``
        float32, natural log, ``lse[b, i, h] = log sum_j exp(scale * q_i . k_j)`` over the keys
        row ``i`` reads (video rows: all ``N``, reference rows: the ``Nr`` reference keys), with
        q and k rotated when cos/sin are given. Differentiable in q, k, v through both outputs
        (the merge of partial results by log-sum-exp in ring attention).
    """
    _check_inputs("asym_attention_lse_triton", q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cos is not None and _resolve_rope_mode(rope_mode) == "prologue":
        q, k = _prologue_rope(q, cos, sin), _prologue_rope(k, cos, sin)
        cos = sin = None
    o, lse2 = _asym_attention_fwd_op(q, k, v, num_video, cos, sin, scale)
    return o, _natural_lse(lse2)


def cached_asym_attention_lse_triton(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor,
                                     ref_k: torch.Tensor | None = None,
                                     ref_v: torch.Tensor | None = None,
                                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                                     scale: float | None = None, *,
                                     rope_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query over the keys ``[k_v; ref_k]`` (values ``[v_v; ref_v]``), read from the two
    tensors without concatenation, and the log-sum-exp of its scores.

    With ``ref_k = ref_v = None`` this is plain (unmasked) attention of ``q_v`` over ``k_v``,
    which may hold a different number of rows than ``q_v`` (none included: then ``o = 0`` and
    ``lse = -inf``) when cos/sin are not given.

    Args:
        q_v: ``[B, Nq, H, D]``; k_v, v_v: ``[B, Nk, H, D]`` (``Nk = Nq`` with cos/sin ``[Nq,
            D//2]``, which rotate q_v and k_v).
        ref_k, ref_v: optional ``[B, Nr, H, D]`` second key range (already rotated), cast to the
            dtype of q_v.
        scale, rope_mode: as in :func:`asym_attention_triton`.
    Returns:
        ``(o [B, Nq, H, D], lse [B, Nq, H])``: lse float32, natural log, scale included.
        Differentiable in every tensor through both outputs.
    """
    if (ref_k is None) != (ref_v is None):
        raise ValueError("cached_asym_attention_lse_triton: give both ref_k and ref_v, or neither")
    if ref_k is None:
        ref_k = ref_v = k_v.new_empty((k_v.shape[0], 0, *k_v.shape[2:]))
    ref_k, ref_v = ref_k.to(q_v.dtype), ref_v.to(q_v.dtype)
    _check_inputs("cached_asym_attention_lse_triton", q_v, k_v, v_v, ref_k, ref_v)
    if cos is not None and k_v.shape[1] != q_v.shape[1]:
        raise ValueError(f"cached_asym_attention_lse_triton: rotation (cos/sin) needs as many keys k_v as "
                         f"queries q_v, got {k_v.shape[1]} and {q_v.shape[1]}")
    scale = 1.0 / math.sqrt(q_v.shape[-1]) if scale is None else float(scale)
    if cos is not None and _resolve_rope_mode(rope_mode) == "prologue":
        q_v, k_v = _prologue_rope(q_v, cos, sin), _prologue_rope(k_v, cos, sin)
        cos = sin = None
    o, lse2 = _cached_fwd_op(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale)
    return o, _natural_lse(lse2)
