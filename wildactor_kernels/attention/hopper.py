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
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._utils import interpreter_active, logger, tf32_allowed
from .kernels import _query_segment

__all__ = [
    "HOPPER_HEAD_DIMS",
    "HOPPER_WARP_SPEC",
    "asym_attention_hopper",
    "cached_asym_attention_hopper",
    "hopper_layout_reason",
    "hopper_supported",
]

#: Head dims with a tuned Hopper kernel; others use ``kernels.py``.
HOPPER_HEAD_DIMS = (64, 128)
#: Which key loop the joint kernel may use: None lets the autotuner time both the
#: warp-specialised loop and the hand-pipelined one; True / False forces one (cached mode always
#: uses the hand-pipelined loop).
HOPPER_WARP_SPEC: bool | None = None

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# =========================================================================== kernel
@triton.jit
def _scores(q, k_desc, row, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """``q @ k^T`` for the key tile starting at ``row`` of ``k_desc`` (one TMA copy)."""
    k = k_desc.load([row, 0])
    if DOT_F32:
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=DOT_PREC)


@triton.jit
def _softmax(qk, m_i, l_i, n_left, offs_n, qk_scale):
    """Online-softmax statistics of one score tile whose keys past ``n_left`` are masked (an
    additive 0/-inf bias per column: one compare per column, one add per score, no branch)."""
    bias = tl.where(offs_n < n_left, 0.0, float("-inf"))
    qk = qk * qk_scale + bias[None, :]
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _pv(acc, p, alpha, v_desc, row, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    v = v_desc.load([row, 0])
    if DOT_F32:
        v = v.to(tl.float32)
    return tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)


@triton.jit
def _range_ws(acc, l_i, m_i, q, k_desc, v_desc, k_lo, k_hi, offs_n, qk_scale,
              BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """Keys ``[k_lo, k_hi)`` in one warp-specialised loop: Triton's Hopper pass gives the TMA
    loads to a producer warp group and splits the query rows over two consumer warp groups
    (``setmaxnreg`` moves registers to them), so one group's softmax runs while the other's
    wgmma does. The pass accepts one such loop per kernel, no branch with an else, and no dot
    outside it: hence the ragged tail is masked inside the loop, not peeled off."""
    for start in tl.range(k_lo, k_hi, BLOCK_N, warp_specialize=True):
        qk = _scores(q, k_desc, start, DOT_F32, DOT_PREC)
        p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, k_hi - start, offs_n, qk_scale)
        acc = _pv(acc, p, alpha, v_desc, start, DOT_F32, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _range_overlap(acc, l_i, m_i, q, k_desc, v_desc, k_lo, k_hi, offs_n, qk_scale,
                   BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """Keys ``[k_lo, k_hi)`` (never empty), software-pipelined by hand so the QK^T of tile
    ``j+1`` runs on the tensor cores while the softmax of tile ``j`` runs on the ALUs.

    Iteration ``j`` issues ``P_{j-1} V_{j-1}`` (waited at once: its accumulator is rescaled),
    then ``S_{j+1} = Q K_{j+1}^T``, whose result is only loop-carried, so Triton's pipeliner
    leaves that wgmma in flight (no wait) while the exp2/max/sum of ``S_j`` execute; the next
    iteration's wait retires it. The prefetch of the last iteration reads past ``k_hi`` (TMA
    fills zeros) and is discarded."""
    n_tiles = tl.cdiv(k_hi - k_lo, BLOCK_N)
    qk = _scores(q, k_desc, k_lo, DOT_F32, DOT_PREC)
    p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, k_hi - k_lo, offs_n, qk_scale)
    qk = _scores(q, k_desc, k_lo + BLOCK_N, DOT_F32, DOT_PREC)
    for j in tl.range(1, n_tiles):
        row = k_lo + j * BLOCK_N
        acc = _pv(acc, p, alpha, v_desc, row - BLOCK_N, DOT_F32, DOT_PREC)
        qk_next = _scores(q, k_desc, row + BLOCK_N, DOT_F32, DOT_PREC)
        p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, k_hi - row, offs_n, qk_scale)
        qk = qk_next
    acc = _pv(acc, p, alpha, v_desc, k_lo + (n_tiles - 1) * BLOCK_N, DOT_F32, DOT_PREC)
    return acc, l_i, m_i


def _hopper_configs():
    """(BLOCK_M, BLOCK_N, warps, stages, WARP_SPEC). Warp specialisation needs ``num_warps=4``
    (Triton adds a producer and a second consumer warp group: 12 warps); the hand-pipelined loop
    uses 8 warps. Built for sm_90 by triton 3.6 and 3.9 with HEAD_DIM 64 and 128: 0 spills, at
    most 213 KB of shared memory (``tests/test_attention_hopper.py`` checks it)."""
    if interpreter_active():  # small tiles that still leave ragged tails in the tests
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "WARP_SPEC": ws}, num_warps=4,
                              num_stages=1) for ws in (True, False)]
    cfgs = [(128, 128, 4, 2, True), (128, 64, 4, 3, True), (128, 64, 8, 3, False),
            (128, 64, 8, 2, False)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "WARP_SPEC": ws}, num_warps=w, num_stages=s)
            for m, n, w, s, ws in cfgs]


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
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _hopper_fwd_kernel(
    Q, K, V, K2, V2, Out, LSE,
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
    of ``kernels._attn_fwd_kernel`` (video blocks first, then reference blocks)."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    q_start, q_end, k_start = _query_segment(i_m, NV, NQ, BLOCK_M)

    # per-(batch, head) [rows, D] descriptors; the row bound zero-fills reads past the end
    q_desc = tl.make_tensor_descriptor(Q + i_b * stride_qb + i_h * stride_qh, shape=[NQ, HEAD_DIM],
                                       strides=[stride_qn, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + i_b * stride_kb + i_h * stride_kh, shape=[NQ, HEAD_DIM],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + i_b * stride_vb + i_h * stride_vh, shape=[NQ, HEAD_DIM],
                                       strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM])

    q = q_desc.load([q_start, 0])
    if DOT_F32:
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if WARP_SPEC and not CACHED:  # one key range: one key range, one warp-specialised loop
        acc, l_i, m_i = _range_ws(acc, l_i, m_i, q, k_desc, v_desc, k_start, NQ, offs_n, qk_scale,
                                  BLOCK_N, DOT_F32, DOT_PREC)
    else:
        acc, l_i, m_i = _range_overlap(acc, l_i, m_i, q, k_desc, v_desc, k_start, NQ, offs_n,
                                       qk_scale, BLOCK_N, DOT_F32, DOT_PREC)
    if CACHED:  # second key range: the reference cache, read in place (NK2 > 0)
        k2_desc = tl.make_tensor_descriptor(K2 + i_b * stride_k2b + i_h * stride_k2h,
                                            shape=[NK2, HEAD_DIM], strides=[stride_k2n, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
        v2_desc = tl.make_tensor_descriptor(V2 + i_b * stride_v2b + i_h * stride_v2h,
                                            shape=[NK2, HEAD_DIM], strides=[stride_v2n, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
        acc, l_i, m_i = _range_overlap(acc, l_i, m_i, q, k2_desc, v2_desc, 0, NK2, offs_n,
                                       qk_scale, BLOCK_N, DOT_F32, DOT_PREC)

    # ---- epilogue: masked pointer stores (a block's last rows may belong to the next segment)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < q_end - q_start
    o = acc / l_i[:, None]
    p_o = (Out + i_b * stride_ob + i_h * stride_oh + q_start.to(tl.int64) * stride_on
           + offs_m[:, None] * stride_on + offs_d[None, :])
    tl.store(p_o, o.to(Out.dtype.element_ty), mask=m_ok[:, None])
    tl.store(LSE + i_bh.to(tl.int64) * NQ + q_start + offs_m, m_i + tl.log2(l_i), mask=m_ok)


# =========================================================================== launcher
def _tma_ok(t: torch.Tensor) -> bool:
    """TMA's rules for a ``[B, N, H, D]`` operand read as per-(batch, head) ``[N, D]`` tiles:
    unit head-dim stride, 16-byte aligned base and row/batch/head strides."""
    e = t.element_size()
    strides_ok = t.stride(-1) == 1 and all((s * e) % 16 == 0 for s in t.stride()[:3])
    if torch.compiler.is_compiling():  # no pointer while tracing: _hopper_fwd checks it at run time
        return strides_ok
    return strides_ok and t.data_ptr() % 16 == 0


def hopper_layout_reason(*tensors: torch.Tensor) -> str | None:
    """None when dtype, head_dim and layouts suit the Hopper kernel, else the reason. Under
    torch.compile only the strides are judged (the launch checks the base pointers)."""
    q = tensors[0]
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not one of {_DTYPES}"
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


def _hopper_fwd(q, k, v, k2, v2, num_video: int, scale: float, cached: bool):
    """Launch; returns ``o [B, NQ, H, D]`` and the base-2 scaled ``lse [B, H, NQ]`` (float32),
    the units of ``kernels._attn_fwd``."""
    for t in (q, k, v) + ((k2, v2) if cached else ()):
        if t.numel() and t.data_ptr() % 16:
            raise ValueError("attention.hopper: a tensor's base pointer is not 16-byte aligned "
                             "(TMA); use backend='triton' or make it contiguous")
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
    dot_f32 = interpreter_active() and q.dtype == torch.bfloat16
    prec = "tf32" if (q.dtype == torch.float32 and tf32_allowed()) else "ieee"

    def grid(meta):
        bm = meta["BLOCK_M"]
        return (triton.cdiv(num_video, bm) + triton.cdiv(nq - num_video, bm), b * h)

    _hopper_fwd_kernel[grid](
        q, k, v, k2, v2, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *k2.stride()[:3], *v2.stride()[:3],
        *o.stride()[:3], h, nq, num_video, nk2, scale * _LOG2E,
        HEAD_DIM=d, CACHED=cached, WS_MODE=_ws_mode(), DOT_F32=dot_f32, DOT_PREC=prec,
    )
    return o, lse


# =========================================================================== torch.library ops
# The forward is new; the backward is the existing one (same saved log-sum-exp).
@torch.library.custom_op("wildactor::hopper_asym_attention_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, SymInt num_video, float scale)"
                                " -> (Tensor, Tensor)")
def _hopper_asym_fwd_op(q, k, v, num_video, scale):
    return _hopper_fwd(q, k, v, None, None, num_video, scale, cached=False)


@_hopper_asym_fwd_op.register_fake
def _hopper_asym_fwd_fake(q, k, v, num_video, scale):
    b, n, h, d = q.shape
    return q.new_empty((b, n, h, d)), q.new_empty((b, h, n), dtype=torch.float32)


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
    return _hopper_fwd(q_v, k_v, v_v, ref_k, ref_v, q_v.shape[1], scale, cached=True)


@_hopper_cached_fwd_op.register_fake
def _hopper_cached_fwd_fake(q_v, k_v, v_v, ref_k, ref_v, scale):
    b, n, h, d = q_v.shape
    return q_v.new_empty((b, n, h, d)), q_v.new_empty((b, h, n), dtype=torch.float32)


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
def _rotate(x, cos, sin):
    from ..rope.op import apply_rope

    return apply_rope(x, cos, sin, backend="triton")


def _require(what: str, *tensors: torch.Tensor) -> None:
    reason = hopper_supported(*tensors)
    if reason is not None:
        raise ValueError(f"{what}: the Hopper kernel cannot run here: {reason}")


def asym_attention_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_video: int,
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
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    _require("asym_attention_hopper", q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _ = _hopper_asym_fwd_op(q, k, v, num_video, scale)
    return o


def cached_asym_attention_hopper(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor,
                                 ref_k: torch.Tensor, ref_v: torch.Tensor,
                                 cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                                 scale: float | None = None) -> torch.Tensor:
    """Video queries over ``[k_v; ref_k]`` / ``[v_v; ref_v]`` on the Hopper kernel: two key
    ranges, two descriptors, no concatenation. Shapes as in
    :func:`kernels.cached_asym_attention_triton`; ref_k/ref_v are cast to the dtype of q_v."""
    ref_k, ref_v = ref_k.to(q_v.dtype), ref_v.to(q_v.dtype)
    if cos is not None:
        q_v, k_v = _rotate(q_v, cos, sin), _rotate(k_v, cos, sin)
    _require("cached_asym_attention_hopper", q_v, k_v, v_v, ref_k, ref_v)
    scale = 1.0 / math.sqrt(q_v.shape[-1]) if scale is None else float(scale)
    o, _ = _hopper_cached_fwd_op(q_v, k_v, v_v, ref_k, ref_v, scale)
    return o
