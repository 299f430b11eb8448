"""Hopper (sm_90+) forward kernel for asymmetric attention (AIPA, docs/design.md §4).

Same maths, API and asymmetric block mapping as ``kernels.py`` (``_query_segment`` is shared);
what changes is how the tiles move:

- K/V (and Q) tiles are read through tensor descriptors (``tl.make_tensor_descriptor``), one
  2-D ``[rows, D]`` descriptor per (batch, head), so on sm_90 every tile is a TMA copy
  (``cp.async.bulk.tensor``) completed on an mbarrier instead of per-thread ``cp.async``. The
  descriptor's row bound is the end of the key range: a ragged tile reads zeros past it, and its
  scores are masked by an additive 0/-inf column bias. Device-side descriptors live in a global
  scratch buffer; the launcher installs a torch allocator for it (``triton.set_allocator``)
  unless one is set.
- Two key loops, both autotune candidates (``WARP_SPEC`` in the config; ``HOPPER_WARP_SPEC``
  can force one):
  ``_range_ws``: ``tl.range(..., warp_specialize=True)``: Triton's Hopper pass gives the TMA
  loads to a producer warp group and the query rows to two consumer warp groups, so one group's
  softmax overlaps the other's wgmma (joint mode only: the pass takes one loop per kernel).
  ``_range_overlap``: hand-pipelined: the QK^T of tile ``j+1`` is issued before the softmax of
  tile ``j`` and only loop-carried, so its wgmma runs during that softmax (FA3's intra-warpgroup
  overlap; joint and cached).

The rotation of q/k (I-RoPE) is always a prologue here (``apply_rope`` first, the
``"prologue"`` mode of ``kernels.py``): rotating K inside the loop would put registers between
the TMA copy and the wgmma that reads shared memory.

Compiled for sm_90 (``tests/test_attention_hopper.py`` prints the report; triton 3.6 and 3.9
agree): every candidate loads K/V/Q with ``cp.async.bulk.tensor`` on mbarriers (no per-thread
``cp.async``), 0 spills, at most 213 KB of shared memory. Warp-specialised candidates run 12 warps
(1 producer + 2 consumer warp groups, ``setmaxnreg`` 40/232, 168 registers at launch). The
hand-pipelined ones (8 warps, 155-204 registers) commit the next QK^T wgmma and run the softmax's
``ex2`` before waiting on it; Triton's pipeliner retires it with the ``wgmma.wait_group 0`` after the
next P@V (the P@V accumulator is rescaled every step, so that dot cannot stay in flight), hence no
``wait_group 1`` in the PTX. No persistent scheduling yet: the grid is (query blocks, B*H) with the
query blocks of one head adjacent, so K/V of a head stay in L2 across its blocks.

Layout ``[B, N, H, D]``, any strides with a unit head-dim stride and 16-byte aligned rows (TMA's
rules; ``hopper_supported`` checks them). ``D`` in ``HOPPER_HEAD_DIMS``. The log-sum-exp is
stored in the units of ``kernels.py`` (base 2, scaled), so the backward pass is the existing one
(``torch.ops.wildactor.asym_attention_bwd`` / ``cached_asym_attention_bwd``).

Launcher: ``asym_attention_hopper_fwd`` (joint and cached); entry points
``asym_attention_hopper_triton`` / ``cached_asym_attention_hopper_triton``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._utils import (
    HOPPER_HEAD_DIMS,
    LOG2E,
    SUPPORTED_DTYPES,
    autotune_bench,
    autotune_configs,
    device_guard,
    dot_flags,
    interpreter_active,
    logger,
    register_fake,
    unit_last,
)
from .kernels import _prologue_rope, _query_segment

__all__ = [
    "HOPPER_HEAD_DIMS",
    "HOPPER_WARP_SPEC",
    "asym_attention_hopper_fwd",
    "asym_attention_hopper_triton",
    "cached_asym_attention_hopper_triton",
    "hopper_layout_reason",
    "hopper_supported",
]

#: Which key loop the joint kernel may use: None lets the autotuner time both the
#: warp-specialised loop and the hand-pipelined one; True / False forces one (cached mode always
#: uses the hand-pipelined loop).
HOPPER_WARP_SPEC: bool | None = None


# =========================================================================== kernel
@triton.jit
def _scores(b_q, desc_k, row, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """``q @ k^T`` for the key tile starting at ``row`` of ``desc_k`` (one TMA copy)."""
    b_k = desc_k.load([row, 0])
    if DOT_F32:
        b_k = b_k.to(tl.float32)
    return tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)


@triton.jit
def _softmax(b_qk, b_max, b_sum, n_left, o_n, qk_scale):
    """Online-softmax statistics of one score tile whose keys past ``n_left`` are masked (an
    additive 0/-inf bias per column: one compare per column, one add per score, no branch)."""
    b_bias = tl.where(o_n < n_left, 0.0, float("-inf"))
    b_qk = b_qk * qk_scale + b_bias[None, :]
    b_max_new = tl.maximum(b_max, tl.max(b_qk, 1))
    b_p = tl.exp2(b_qk - b_max_new[:, None])
    b_alpha = tl.exp2(b_max - b_max_new)
    b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
    return b_p, b_alpha, b_max_new, b_sum


@triton.jit
def _pv(b_acc, b_p, b_alpha, desc_v, row, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    b_v = desc_v.load([row, 0])
    if DOT_F32:
        b_v = b_v.to(tl.float32)
    return tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=DOT_PREC)


@triton.jit
def _range_ws(b_acc, b_sum, b_max, b_q, desc_k, desc_v, k_lo, k_hi, o_n, qk_scale,
              BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """Keys ``[k_lo, k_hi)`` in one warp-specialised loop: Triton's Hopper pass gives the TMA
    loads to a producer warp group and splits the query rows over two consumer warp groups
    (``setmaxnreg`` moves registers to them), so one group's softmax runs while the other's
    wgmma does. The pass accepts one such loop per kernel, no branch with an else, and no dot
    outside it: hence the ragged tail is masked inside the loop, not peeled off."""
    for start in tl.range(k_lo, k_hi, BLOCK_N, warp_specialize=True):
        b_qk = _scores(b_q, desc_k, start, DOT_F32, DOT_PREC)
        b_p, b_alpha, b_max, b_sum = _softmax(b_qk, b_max, b_sum, k_hi - start, o_n, qk_scale)
        b_acc = _pv(b_acc, b_p, b_alpha, desc_v, start, DOT_F32, DOT_PREC)
    return b_acc, b_sum, b_max


@triton.jit
def _range_overlap(b_acc, b_sum, b_max, b_q, desc_k, desc_v, k_lo, k_hi, o_n, qk_scale,
                   BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """Keys ``[k_lo, k_hi)`` (never empty), software-pipelined by hand so the QK^T of tile
    ``j+1`` runs on the tensor cores while the softmax of tile ``j`` runs on the ALUs.

    Iteration ``j`` issues ``P_{j-1} V_{j-1}`` (waited at once: its accumulator is rescaled),
    then ``S_{j+1} = Q K_{j+1}^T``, whose result is only loop-carried, so Triton's pipeliner
    leaves that wgmma in flight (no wait) while the exp2/max/sum of ``S_j`` execute; the next
    iteration's wait retires it. The prefetch of the last iteration reads past ``k_hi`` (TMA
    fills zeros) and is discarded."""
    n_tiles = tl.cdiv(k_hi - k_lo, BLOCK_N)
    b_qk = _scores(b_q, desc_k, k_lo, DOT_F32, DOT_PREC)
    b_p, b_alpha, b_max, b_sum = _softmax(b_qk, b_max, b_sum, k_hi - k_lo, o_n, qk_scale)
    b_qk = _scores(b_q, desc_k, k_lo + BLOCK_N, DOT_F32, DOT_PREC)
    for j in tl.range(1, n_tiles):
        row = k_lo + j * BLOCK_N
        b_acc = _pv(b_acc, b_p, b_alpha, desc_v, row - BLOCK_N, DOT_F32, DOT_PREC)
        b_qk_next = _scores(b_q, desc_k, row + BLOCK_N, DOT_F32, DOT_PREC)
        b_p, b_alpha, b_max, b_sum = _softmax(b_qk, b_max, b_sum, k_hi - row, o_n, qk_scale)
        b_qk = b_qk_next
    b_acc = _pv(b_acc, b_p, b_alpha, desc_v, k_lo + (n_tiles - 1) * BLOCK_N, DOT_F32, DOT_PREC)
    return b_acc, b_sum, b_max


# Autotune candidates (BLOCK_M, BLOCK_N, warps, stages, WARP_SPEC). Warp specialisation needs
# ``num_warps=4`` (Triton adds a producer and a second consumer warp group: 12 warps); the
# hand-pipelined loop uses 8 warps. Built for sm_90 by triton 3.6 and 3.9 with HEAD_DIM 64 and
# 128: 0 spills, at most 213 KB of shared memory (``tests/test_attention_hopper.py`` checks it).
_HOPPER_GPU = [(128, 128, 4, 2, True), (128, 64, 4, 3, True), (128, 64, 8, 3, False),
               (128, 64, 8, 2, False)]
# Under the interpreter: small tiles that still leave ragged tails in the tests, one per key
# loop (the prune keeps the one WS_MODE asks for).
_HOPPER_INTERPRETED = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "WARP_SPEC": ws}, num_warps=4,
                                     num_stages=1) for ws in (True, False)]


def _hopper_configs() -> list:
    return autotune_configs(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "WARP_SPEC": ws}, num_warps=w, num_stages=s)
         for m, n, w, s, ws in _HOPPER_GPU],
        _HOPPER_INTERPRETED)


def _prune(configs, named_args, **kwargs):
    """``WS_MODE``: 0 either loop, 1 warp-specialised only, 2 hand-pipelined only. The cached
    mode walks two key ranges, which the warp-specialisation pass does not accept (one loop per
    kernel), so it always gets the hand-pipelined loop. Under the interpreter one config is kept
    (no autotuning run)."""
    mode = kwargs.get("WS_MODE", named_args.get("WS_MODE", 0))
    cached = kwargs.get("CACHED", named_args.get("CACHED", False))
    if cached:
        mode = 2
    kept = [c for c in configs if mode == 0 or c.kwargs["WARP_SPEC"] == (mode == 1)]
    return kept[:1] if interpreter_active() else kept


@triton.autotune(configs=_hopper_configs(), key=["HEAD_DIM", "CACHED", "WS_MODE", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": _prune},
                 do_bench=autotune_bench())
@triton.jit
def _hopper_fwd_kernel(
    p_q, p_k, p_v, p_k2, p_v2, p_o, p_lse,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_k2b, stride_k2n, stride_k2h,
    stride_v2b, stride_v2n, stride_v2h,
    stride_ob, stride_on, stride_oh,
    H, NQ, NV, NK2, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CACHED: tl.constexpr, WS_MODE: tl.constexpr, WARP_SPEC: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program = one query block of one (batch, head); the grid and the key ranges are those
    of ``kernels._attn_fwd_kernel`` (video blocks first, then reference blocks). The head dim
    has unit stride (TMA's rule: the launcher makes it so)."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    q_start, q_end, k_start = _query_segment(i_m, NV, NQ, BLOCK_M)

    # per-(batch, head) [rows, D] descriptors; the row bound zero-fills reads past the end
    desc_q = tl.make_tensor_descriptor(p_q + i_b * stride_qb + i_h * stride_qh, shape=[NQ, HEAD_DIM],
                                       strides=[stride_qn, 1], block_shape=[BLOCK_M, HEAD_DIM])
    desc_k = tl.make_tensor_descriptor(p_k + i_b * stride_kb + i_h * stride_kh, shape=[NQ, HEAD_DIM],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(p_v + i_b * stride_vb + i_h * stride_vh, shape=[NQ, HEAD_DIM],
                                       strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM])

    b_q = desc_q.load([q_start, 0])
    if DOT_F32:
        b_q = b_q.to(tl.float32)
    o_n = tl.arange(0, BLOCK_N)
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if WARP_SPEC and not CACHED:  # one key range, one warp-specialised loop
        b_acc, b_sum, b_max = _range_ws(b_acc, b_sum, b_max, b_q, desc_k, desc_v, k_start, NQ, o_n,
                                        qk_scale, BLOCK_N, DOT_F32, DOT_PREC)
    else:
        b_acc, b_sum, b_max = _range_overlap(b_acc, b_sum, b_max, b_q, desc_k, desc_v, k_start, NQ,
                                             o_n, qk_scale, BLOCK_N, DOT_F32, DOT_PREC)
    if CACHED:  # second key range: the reference cache, read in place (NK2 > 0)
        desc_k2 = tl.make_tensor_descriptor(p_k2 + i_b * stride_k2b + i_h * stride_k2h,
                                            shape=[NK2, HEAD_DIM], strides=[stride_k2n, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
        desc_v2 = tl.make_tensor_descriptor(p_v2 + i_b * stride_v2b + i_h * stride_v2h,
                                            shape=[NK2, HEAD_DIM], strides=[stride_v2n, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
        b_acc, b_sum, b_max = _range_overlap(b_acc, b_sum, b_max, b_q, desc_k2, desc_v2, 0, NK2, o_n,
                                             qk_scale, BLOCK_N, DOT_F32, DOT_PREC)

    # ---- epilogue: masked pointer stores (a block's last rows may belong to the next segment)
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < q_end - q_start
    b_o = b_acc / b_sum[:, None]
    p_o0 = (p_o + i_b * stride_ob + i_h * stride_oh + q_start.to(tl.int64) * stride_on
            + o_m[:, None] * stride_on + o_d[None, :])
    tl.store(p_o0, b_o.to(p_o.dtype.element_ty), mask=m_m[:, None])
    tl.store(p_lse + i_bh.to(tl.int64) * NQ + q_start + o_m, b_max + tl.log2(b_sum), mask=m_m)


# =========================================================================== launcher
def _tma_ok(t: torch.Tensor) -> bool:
    """TMA's rules for a ``[B, N, H, D]`` operand read as per-(batch, head) ``[N, D]`` tiles:
    unit head-dim stride, 16-byte aligned base and row/batch/head strides."""
    e = t.element_size()
    strides_ok = t.stride(-1) == 1 and all((s * e) % 16 == 0 for s in t.stride()[:3])
    if torch.compiler.is_compiling():  # no pointer while tracing: the launcher checks it at run time
        return strides_ok
    return strides_ok and t.data_ptr() % 16 == 0


def hopper_layout_reason(*tensors: torch.Tensor) -> str | None:
    """None when dtype, head_dim and layouts suit the Hopper kernel, else the reason. Under
    torch.compile only the strides are judged (the launch checks the base pointers)."""
    q = tensors[0]
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of {SUPPORTED_DTYPES}"
    if q.shape[-1] not in HOPPER_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not one of {HOPPER_HEAD_DIMS}"
    for t in tensors:
        if t.dtype != q.dtype:
            return f"mixed dtypes {q.dtype} and {t.dtype}"
        if t.numel() and not _tma_ok(t):
            return "a tensor's layout breaks TMA's rules (unit head-dim stride, 16-byte alignment)"
    return None


def hopper_supported(*tensors: torch.Tensor) -> str | None:
    """None when the Hopper kernel can run on these ``[B, N, H, D]`` inputs, else the reason:
    an sm_90+ GPU with fp16/bf16 inputs (or the Triton interpreter on CPU tensors, fp32 too) and
    :func:`hopper_layout_reason`."""
    q = tensors[0]
    if q.is_cuda:
        # under torch.compile the device was judged when the backend was picked (dispatch.py)
        if not torch.compiler.is_compiling() and torch.cuda.get_device_capability(q.device)[0] < 9:
            return "needs compute capability 9.0+ (Hopper)"
        if q.dtype == torch.float32:  # tiles sized for 16-bit operands (shared memory)
            return "fp32 on the GPU is left to kernels.py (the tiles are sized for fp16/bf16)"
    elif not interpreter_active():
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    return hopper_layout_reason(*tensors)


def _torch_scratch(size: int, alignment: int, stream):
    # called at launch, inside the launcher's device guard: "cuda" is the tensors' device
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side tensor descriptors live in a global scratch buffer that Triton asks an
    allocator for at launch. Install a torch-backed one unless the user set their own."""
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        unset = isinstance(current, _allocation.NullAllocator)
    except (ImportError, AttributeError):  # another triton layout: set ours
        unset = True
    if unset:
        triton.set_allocator(_torch_scratch)
        logger.info("attention.hopper: installed a torch allocator for Triton's scratch memory")


def _ws_mode() -> int:
    return 0 if HOPPER_WARP_SPEC is None else (1 if HOPPER_WARP_SPEC else 2)


def asym_attention_hopper_fwd(q, k, v, k2, v2, num_video: int, scale: float, cached: bool):
    """Launcher of the Hopper forward kernel (joint, or cached with ``k2, v2`` the reference
    cache) on the tensors' device. Batch, token and head strides are passed to the kernel; a
    head dim with another stride than 1 is copied to unit stride (TMA reads rows), and every
    operand must then have 16-byte aligned strides and base (ValueError otherwise). Returns
    ``o [B, NQ, H, D]`` and the base-2 scaled ``lse [B, H, NQ]`` (float32), the units of
    ``kernels.asym_attention_fwd``."""
    with device_guard("asym_attention_hopper_fwd", q=q, k=k, v=v, k2=k2, v2=v2):
        return _fwd(q, k, v, k2, v2, num_video, scale, cached)


def _fwd(q, k, v, k2, v2, num_video, scale, cached):
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    if cached:
        k2, v2 = unit_last(k2), unit_last(v2)
    for t in (q, k, v) + ((k2, v2) if cached else ()):
        if t.numel() and not _tma_ok(t):
            raise ValueError("attention.hopper: a tensor's base pointer or strides are not 16-byte "
                             "aligned (TMA); use backend='triton' or make it contiguous")
    b, nq, h, d = q.shape
    o = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    if b * h * nq == 0:
        return o, lse
    nk2 = k2.shape[1] if cached else 0
    if nk2 == 0:  # an empty cache: video queries over the video keys only (one range)
        cached = False
        k2, v2 = k, v
    if q.is_cuda:
        _ensure_allocator()
    dot_f32, prec = dot_flags(q.dtype)

    def grid(meta):
        bm = meta["BLOCK_M"]
        return (triton.cdiv(num_video, bm) + triton.cdiv(nq - num_video, bm), b * h)

    _hopper_fwd_kernel[grid](
        q, k, v, k2, v2, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *k2.stride()[:3], *v2.stride()[:3],
        *o.stride()[:3], h, nq, num_video, nk2, scale * LOG2E,
        HEAD_DIM=d, CACHED=cached, WS_MODE=_ws_mode(), DOT_F32=dot_f32, DOT_PREC=prec,
    )
    return o, lse


# =========================================================================== torch.library ops
# The forward is new; the backward is the existing one (same saved log-sum-exp).
@torch.library.custom_op("wildactor::hopper_asym_attention_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, SymInt num_video, float scale)"
                                " -> (Tensor, Tensor)")
def _hopper_asym_fwd_op(q, k, v, num_video, scale):
    return asym_attention_hopper_fwd(q, k, v, None, None, num_video, scale, cached=False)


def _hopper_asym_fwd_fake(q, k, v, num_video, scale):
    b, n, h, d = q.shape
    return q.new_empty((b, n, h, d)), q.new_empty((b, h, n), dtype=torch.float32)


register_fake(_hopper_asym_fwd_op, _hopper_asym_fwd_fake)


def _hopper_asym_setup(ctx, inputs, output):
    q, k, v, num_video, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.num_video, ctx.scale = num_video, scale


def _hopper_asym_backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dk, dv = torch.ops.wildactor.asym_attention_bwd(grad_o, q, k, v, o, lse, ctx.num_video,
                                                        None, None, ctx.scale)
    return dq, dk, dv, None, None


_hopper_asym_fwd_op.register_autograd(_hopper_asym_backward, setup_context=_hopper_asym_setup)


@torch.library.custom_op("wildactor::hopper_cached_asym_attention_fwd", mutates_args=(),
                         schema="(Tensor q_v, Tensor k_v, Tensor v_v, Tensor ref_k, Tensor ref_v, "
                                "float scale) -> (Tensor, Tensor)")
def _hopper_cached_fwd_op(q_v, k_v, v_v, ref_k, ref_v, scale):
    return asym_attention_hopper_fwd(q_v, k_v, v_v, ref_k, ref_v, q_v.shape[1], scale, cached=True)


def _hopper_cached_fwd_fake(q_v, k_v, v_v, ref_k, ref_v, scale):
    b, n, h, d = q_v.shape
    return q_v.new_empty((b, n, h, d)), q_v.new_empty((b, h, n), dtype=torch.float32)


register_fake(_hopper_cached_fwd_op, _hopper_cached_fwd_fake)


def _hopper_cached_setup(ctx, inputs, output):
    q_v, k_v, v_v, ref_k, ref_v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q_v, k_v, v_v, ref_k, ref_v, o, lse)
    ctx.scale = scale


def _hopper_cached_backward(ctx, grad_o, grad_lse):
    q_v, k_v, v_v, ref_k, ref_v, o, lse = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    grads = torch.ops.wildactor.cached_asym_attention_bwd(grad_o, q_v, k_v, v_v, ref_k, ref_v, o,
                                                          lse, None, None, ctx.scale)
    return (*grads, None)


_hopper_cached_fwd_op.register_autograd(_hopper_cached_backward, setup_context=_hopper_cached_setup)


# =========================================================================== public functions
def _require(what: str, *tensors: torch.Tensor) -> None:
    reason = hopper_supported(*tensors)
    if reason is not None:
        raise ValueError(f"{what}: the Hopper kernel cannot run here: {reason}")


def asym_attention_hopper_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_video: int,
                                 cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                                 scale: float | None = None) -> torch.Tensor:
    """:func:`kernels.asym_attention_triton` on the Hopper kernel (inputs checked by ``op.py``).

    Args:
        q, k, v: ``[B, N, H, D]`` fp16/bf16/fp32 with ``D`` in :data:`HOPPER_HEAD_DIMS` and
            TMA-compatible strides (:func:`hopper_supported`); views of a fused QKV are fine.
        num_video: ``Nv``; cos/sin ``[N, D//2]`` rotate q and k first (a rope-kernel prologue).
        scale: softmax scale, default ``1/sqrt(D)``.
    Returns:
        ``[B, N, H, D]`` contiguous, dtype of q. Differentiable (the backward of ``kernels.py``).
    """
    if cos is not None:
        q, k = _prologue_rope(q, cos, sin), _prologue_rope(k, cos, sin)
    _require("asym_attention_hopper_triton", q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _ = _hopper_asym_fwd_op(q, k, v, num_video, scale)
    return o


def cached_asym_attention_hopper_triton(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor,
                                        ref_k: torch.Tensor, ref_v: torch.Tensor,
                                        cos: torch.Tensor | None = None,
                                        sin: torch.Tensor | None = None,
                                        scale: float | None = None) -> torch.Tensor:
    """Video queries over ``[k_v; ref_k]`` / ``[v_v; ref_v]`` on the Hopper kernel: two key
    ranges, two descriptors, no concatenation. Shapes as in
    :func:`kernels.cached_asym_attention_triton`; ref_k/ref_v are cast to the dtype of q_v."""
    ref_k, ref_v = ref_k.to(q_v.dtype), ref_v.to(q_v.dtype)
    if cos is not None:
        q_v, k_v = _prologue_rope(q_v, cos, sin), _prologue_rope(k_v, cos, sin)
    _require("cached_asym_attention_hopper_triton", q_v, k_v, v_v, ref_k, ref_v)
    scale = 1.0 / math.sqrt(q_v.shape[-1]) if scale is None else float(scale)
    o, _ = _hopper_cached_fwd_op(q_v, k_v, v_v, ref_k, ref_v, scale)
    return o
