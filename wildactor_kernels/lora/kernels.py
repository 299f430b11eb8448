"""Triton kernels for the reference-only LoRA linear (docs/design.md §5).

Maths (reference: :func:`wildactor_kernels.lora.reference.ref_lora_linear_ref`)::

    y = x W^T + b;   y[:, Nv:] += s * (x[:, Nv:] A^T) B^T      x [B, N, Din], W [Dout, Din],
                                                               A [r, Din], B [Dout, r]

Two kernels serve the forward, the backward and the folded inference path:

- ``_lora_shrink_kernel`` (launched by ``_shrink``): ``T = s * X_r P`` for the reference rows
  only (``X_r [B, Nr, K]``, ``P [K, r]``): the thin "shrink" GEMM of LoRA. Forward:
  ``X = x, P = A^T``; backward: ``X = dy, P = B`` (``U = s dy_r B``).
- ``_lora_gemm_kernel`` (launched by ``_gemm``): ``out = X Wt (+ bias)`` over all rows, fp32
  accumulation, where the M tiles are laid out per sample and per region so that a tile never
  holds both video and reference rows (nor rows of two samples). On reference tiles the epilogue either adds
  ``T Lt`` (``REF_MODE=1``: the LoRA "expand", one more ``tl.dot`` of depth ``r``) or the
  main loop streams a second weight ``Wt_ref`` (``REF_MODE=2``: folded ``W + s B A``).
  Forward: ``X = x, Wt = W^T, Lt = B^T``; backward ``dx``: ``X = dy, Wt = W, Lt = A``.

Video-only tiles skip the LoRA work with a scalar branch on program-id arithmetic
(``i_m >= cdiv(Nv, BLOCK_M)``), which Triton lowers to a uniform ``scf.if``: no extra loads,
no extra MMA, no tensor-valued control flow.

The launchers of the two ops are ``ref_lora_linear_fwd`` / ``ref_lora_linear_bwd`` and
``ref_folded_linear_fwd`` / ``ref_folded_linear_bwd``; the entry points ``ref_lora_linear_triton``
and ``ref_folded_linear_triton`` run them as torch.library custom ops.

The remaining backward pieces are plain torch (cuBLAS), on purpose:
``dA = U^T x_r`` ([r, Din]) and ``dB = dy_r^T T`` ([Dout, r]) have a tiny output and a long
reduction over ``B*Nr`` rows (a split-K shape cuBLAS already picks well; together they are
``r/Dout + r/Din`` of the main GEMM's work on the reference rows), and ``dW = dy^T x``,
``db = sum(dy)`` are exactly the base layer's own backward with nothing to fuse into them.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._utils import (
    SUPPORTED_DTYPES,
    autocast_active,
    autotune_bench,
    autotune_configs,
    device_guard,
    dot_flags,
    interpreter_active,
    register_fake,
    unit_last,
)

__all__ = ["ref_lora_linear_triton", "ref_folded_linear_triton", "ref_lora_linear_fwd",
           "ref_lora_linear_bwd", "ref_folded_linear_fwd", "ref_folded_linear_bwd"]


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _mma(b_a, b_b, b_acc, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """``b_acc += b_a @ b_b``. DOT_F32: the interpreter's bf16 dot is wrong (triton#11584), so
    bf16 tiles go through fp32 there. DOT_PREC: ``"ieee"`` unless torch allows TF32 for fp32
    matmuls (``"tf32"``); both flags come from :func:`wildactor_kernels._utils.dot_flags`."""
    if DOT_F32:
        b_a = b_a.to(tl.float32)
        b_b = b_b.to(tl.float32)
    return tl.dot(b_a, b_b, b_acc, input_precision=DOT_PREC)


def _rank_block(r: int, cap: int) -> int:
    """Rank tile: a power of two >= 16 (the smallest tl.dot side), at most ``cap``."""
    return min(max(16, triton.next_power_of_2(r)), cap)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even):
    there the kernels store fp32 and the launcher rounds with torch."""
    return torch.float32 if interpreter_active() and dtype == torch.bfloat16 else dtype


def _m_bucket(m: int) -> int:
    """Autotune key for the row count: tokens per call change with the resolution, a
    power-of-two bucket keeps the tuned config without retuning on every new N."""
    return triton.next_power_of_2(max(int(m), 1))


# ----------------------------------------------------------------------------- shrink
_SHRINK_CONFIGS = autotune_configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
     for bm, bk, w, s in [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (32, 128, 4, 4),
                          (128, 128, 8, 3)]],
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}))


@triton.autotune(configs=_SHRINK_CONFIGS, key=["M_BUCKET", "K", "RANK"],
                 do_bench=autotune_bench())
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _lora_shrink_kernel(
    p_x, p_p, p_t,
    NR, ROW0, K, RANK, M_BUCKET, scale,
    stride_xb, stride_xn, stride_xk,
    stride_pk, stride_pr,
    stride_tb, stride_tn, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """``T[b, m, :] = scale * X[b, ROW0 + m, :] @ P`` for ``m < NR``; grid (M tiles, r tiles, B)."""
    i_m, i_r, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < NR
    # rows past NR are clamped onto the last row: in-bounds unmasked loads, never stored
    o_m_ld = tl.minimum(o_m, NR - 1)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < RANK
    o_k = tl.arange(0, BLOCK_K)

    p_xk = (p_x + i_b.to(tl.int64) * stride_xb + (ROW0 + o_m_ld).to(tl.int64)[:, None] * stride_xn
            + o_k[None, :] * stride_xk)
    p_pk = p_p + o_k[:, None] * stride_pk + o_r[None, :] * stride_pr
    b_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            b_x = tl.load(p_xk)
            b_p = tl.load(p_pk, mask=m_r[None, :], other=0.0)
        else:
            m_k = o_k < K - i_k * BLOCK_K
            b_x = tl.load(p_xk, mask=m_k[None, :], other=0.0)
            b_p = tl.load(p_pk, mask=m_k[:, None] & m_r[None, :], other=0.0)
        b_acc = _mma(b_x, b_p, b_acc, DOT_F32, DOT_PREC)
        p_xk += BLOCK_K * stride_xk
        p_pk += BLOCK_K * stride_pk
    b_acc = b_acc * scale
    p_tm = p_t + i_b.to(tl.int64) * stride_tb + o_m[:, None] * stride_tn + o_r[None, :] * stride_tr
    tl.store(p_tm, b_acc.to(p_t.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])


def _shrink(x: torch.Tensor, p: torch.Tensor, scale: float, row0: int) -> torch.Tensor:
    """``scale * x[:, row0:] @ p`` -> ``[B, N - row0, r]`` in ``x.dtype`` (fp32 accumulation).

    ``x [B, N, K]`` with unit stride on the last dim (any batch/row strides); ``p [K, r]``
    (any strides, e.g. a transposed view of ``lora_A``).
    """
    bsz, n, k = x.shape
    rank = p.shape[1]
    nr = n - row0
    t = torch.empty((bsz, nr, rank), device=x.device, dtype=_out_dtype(x.dtype))
    if nr == 0 or bsz == 0:
        return t.to(x.dtype)
    block_r = _rank_block(rank, 128)

    def grid(m):
        return (triton.cdiv(nr, m["BLOCK_M"]), triton.cdiv(rank, block_r), bsz)

    dot_f32, dot_prec = dot_flags(x.dtype)
    _lora_shrink_kernel[grid](
        x, p, t, nr, row0, k, rank, _m_bucket(bsz * nr), float(scale),
        x.stride(0), x.stride(1), x.stride(2), p.stride(0), p.stride(1),
        t.stride(0), t.stride(1), t.stride(2),
        BLOCK_R=block_r, DOT_F32=dot_f32, DOT_PREC=dot_prec)
    return t.to(x.dtype)


# ----------------------------------------------------------------------------- main GEMM
# Hopper-friendly tiles (bf16); configs that do not fit (fp32 inputs) fail to compile and the
# autotuner drops them, the 64x64 ones fit every dtype. Every one builds for sm_90 (bf16,
# REF_MODE 1 and 2, triton 3.9) with 0 spill bytes (64-255 registers), as do the shrink configs
# above (rank tile 128).
_GEMM_CONFIGS = autotune_configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w,
                   num_stages=s)
     for bm, bn, bk, w, s in [
         (128, 256, 64, 8, 3),
         (128, 128, 64, 8, 4),
         (128, 128, 64, 4, 4),
         (128, 256, 32, 8, 4),
         (64, 256, 32, 4, 4),
         (128, 64, 64, 4, 4),
         (64, 128, 64, 4, 4),
         (64, 64, 64, 4, 3),
     ]],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}))


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "K", "NOUT", "RANK", "REF_MODE", "HAS_BIAS"],
                 do_bench=autotune_bench())
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _lora_gemm_kernel(
    p_x, p_w, p_wref, p_bias, p_t, p_l, p_o,
    N, NUM_VIDEO, K, NOUT, RANK, M_BUCKET,
    stride_xb, stride_xn, stride_xk,
    stride_wk, stride_wn,
    stride_tb, stride_tn, stride_tr,
    stride_lr, stride_ln,
    stride_ob, stride_on, stride_oo,
    stride_bias,
    HAS_BIAS: tl.constexpr, REF_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """``out[b, n] = X[b, n] @ Wt (+ bias)``, plus on reference rows (``n >= NUM_VIDEO``):
    REF_MODE 1: ``+ T[b, n - NUM_VIDEO] @ Lt``; REF_MODE 2: ``Wt_ref`` replaces ``Wt``.

    X ``[B, N, K]``, Wt and Wt_ref ``[K, NOUT]`` (both with strides wk/wn), T ``[B, N - NUM_VIDEO, RANK]``,
    Lt ``[RANK, NOUT]``, out ``[B, N, NOUT]``. Grid: (M tiles x N tiles of one sample, B).
    """
    # ---- tile id -> (region tile i_m, column tile i_n); grouped order for L2 reuse of Wt
    i_tile, i_b = tl.program_id(0), tl.program_id(1)
    tiles_v = tl.cdiv(NUM_VIDEO, BLOCK_M)
    tiles_m = tiles_v + tl.cdiv(N - NUM_VIDEO, BLOCK_M)
    tiles_n = tl.cdiv(NOUT, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (i_tile // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    i_m = first_m + (i_tile % per_group) % group_m
    i_n = (i_tile % per_group) // group_m

    # video tiles cover rows [0, Nv), reference tiles rows [Nv, N): no tile mixes the two
    is_ref = i_m >= tiles_v
    row0 = tl.where(is_ref, NUM_VIDEO + (i_m - tiles_v) * BLOCK_M, i_m * BLOCK_M)
    row_end = tl.where(is_ref, N, NUM_VIDEO)

    o_m = row0 + tl.arange(0, BLOCK_M)
    m_m = o_m < row_end
    o_m_ld = tl.minimum(o_m, row_end - 1)  # clamped rows: unmasked, in-bounds, never stored
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < NOUT
    o_k = tl.arange(0, BLOCK_K)

    p_xk = (p_x + i_b.to(tl.int64) * stride_xb + o_m_ld.to(tl.int64)[:, None] * stride_xn
            + o_k[None, :] * stride_xk)
    o_w = o_k[:, None] * stride_wk + o_n.to(tl.int64)[None, :] * stride_wn
    if REF_MODE == 2:
        # folded inference: reference tiles stream W_ref = W + s B A (same strides as W)
        if is_ref:
            p_wk = p_wref + o_w
        else:
            p_wk = p_w + o_w
    else:
        p_wk = p_w + o_w

    # ---- main loop: X tile [BLOCK_M, BLOCK_K] @ Wt tile [BLOCK_K, BLOCK_N], fp32 accumulator
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            b_x = tl.load(p_xk)
            b_w = tl.load(p_wk, mask=m_n[None, :], other=0.0)
        else:
            m_k = o_k < K - i_k * BLOCK_K
            b_x = tl.load(p_xk, mask=m_k[None, :], other=0.0)
            b_w = tl.load(p_wk, mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_acc = _mma(b_x, b_w, b_acc, DOT_F32, DOT_PREC)
        p_xk += BLOCK_K * stride_xk
        p_wk += BLOCK_K * stride_wk

    # ---- LoRA expand on reference tiles only: b_acc += T [BLOCK_M, r] @ Lt [r, BLOCK_N]
    if REF_MODE == 1:
        if is_ref:
            p_tm = (p_t + i_b.to(tl.int64) * stride_tb
                    + (o_m_ld - NUM_VIDEO).to(tl.int64)[:, None] * stride_tn)
            for i_r in range(0, RANK, BLOCK_R):
                o_r = i_r + tl.arange(0, BLOCK_R)
                m_r = o_r < RANK  # rank padded to BLOCK_R (>= 16) with zeros
                b_t = tl.load(p_tm + o_r[None, :] * stride_tr, mask=m_r[None, :], other=0.0)
                b_l = tl.load(p_l + o_r[:, None] * stride_lr + o_n[None, :] * stride_ln,
                              mask=m_r[:, None] & m_n[None, :], other=0.0)
                b_acc = _mma(b_t, b_l, b_acc, DOT_F32, DOT_PREC)

    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_n * stride_bias, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_om = (p_o + i_b.to(tl.int64) * stride_ob + o_m.to(tl.int64)[:, None] * stride_on
            + o_n[None, :] * stride_oo)
    tl.store(p_om, b_acc.to(p_o.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def _gemm(x: torch.Tensor, wt: torch.Tensor, num_video: int, bias: torch.Tensor | None = None,
              t: torch.Tensor | None = None, lt: torch.Tensor | None = None,
              wt_ref: torch.Tensor | None = None) -> torch.Tensor:
    """Launch ``_lora_gemm_kernel`` (every tensor's strides are passed to it).

    Args:
        x: ``[B, N, K]``, unit stride on the last dim (any batch/row strides).
        wt: ``[K, NOUT]`` (any strides: pass ``W.t()`` for a forward, ``W`` for ``dx``).
        num_video: rows ``n < num_video`` of each sample are video rows.
        bias: ``[NOUT]`` (any stride, 0 included) or None.
        t, lt: LoRA expand ``t [B, N - num_video, r]`` and ``lt [r, NOUT]``, added on reference rows.
        wt_ref: ``[K, NOUT]`` weight for reference rows (folded mode), with the strides of ``wt``;
            exclusive with ``t``.
    Returns:
        ``[B, N, NOUT]`` contiguous, in ``x.dtype``.
    """
    bsz, n, k = x.shape
    nout = wt.shape[1]
    out = torch.empty((bsz, n, nout), device=x.device, dtype=_out_dtype(x.dtype))
    if out.numel() == 0:
        return out.to(x.dtype)
    nr = n - num_video
    ref_mode = 0
    if nr > 0 and t is not None:
        ref_mode = 1
    elif nr > 0 and wt_ref is not None:
        ref_mode = 2
    if ref_mode == 2 and wt_ref.stride() != wt.stride():
        raise ValueError(f"wt_ref must have the strides of wt {wt.stride()}, got {wt_ref.stride()}")
    rank = t.shape[2] if ref_mode == 1 else 1
    t_ = t if ref_mode == 1 else x
    lt_ = lt if ref_mode == 1 else wt
    v_ = wt_ref if ref_mode == 2 else wt

    def grid(m):
        tiles_m = triton.cdiv(num_video, m["BLOCK_M"]) + triton.cdiv(nr, m["BLOCK_M"])
        return (tiles_m * triton.cdiv(nout, m["BLOCK_N"]), bsz)

    dot_f32, dot_prec = dot_flags(x.dtype)
    _lora_gemm_kernel[grid](
        x, wt, v_, bias if bias is not None else x, t_, lt_, out,
        n, num_video, k, nout, rank, _m_bucket(bsz * n),
        x.stride(0), x.stride(1), x.stride(2),
        wt.stride(0), wt.stride(1),
        *(t_.stride() if ref_mode == 1 else (0, 0, 0)), *(lt_.stride() if ref_mode == 1 else (0, 0)),
        out.stride(0), out.stride(1), out.stride(2),
        bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, REF_MODE=ref_mode, BLOCK_R=_rank_block(rank, 64),
        DOT_F32=dot_f32, DOT_PREC=dot_prec)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- torch.library ops
# Opaque custom ops with fake (meta) kernels and registered autograd (the pattern of
# ``attention/kernels.py``), so torch.compile(fullgraph=True) traces the layer without entering
# the launchers or Triton's runtime. Only the Triton pieces are ops; the backward's cuBLAS
# pieces (dA, dB, dW, db) stay plain torch in the registered backward, where the compiler sees
# them. Schemas are mutation-free: every output is allocated inside the op.
def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, N, C] -> [B*N, C]`` (also when C = 0, where ``reshape(-1, 0)`` is ambiguous)."""
    return t.flatten(0, -2)


def ref_lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale: float, num_video: int):
    """Launcher of the forward: ``(y [B, N, Dout], t [B, N - Nv, r])``; ``t = s x_r A^T`` is
    kept for the backward. Any strides (x gets a unit-stride last dim, the rest go to the
    kernels), all tensors on one device."""
    with device_guard("ref_lora_linear_fwd", x=x, weight=weight, bias=bias, lora_a=lora_a,
                      lora_b=lora_b):
        x = unit_last(x)
        t = _shrink(x, lora_a.t(), scale, num_video)  # [B, Nr, r] (empty when Nr = 0)
        y = _gemm(x, weight.t(), num_video, bias=bias, t=t, lt=lora_b.t())
        return y, t


def ref_lora_linear_bwd(dy, weight, lora_a, lora_b, scale: float, num_video: int, need_dx: bool):
    """Launcher of the backward's Triton part: ``(dx, u)`` with ``u = s dy_r B [B, N - Nv, r]``
    (shared by dx's epilogue and dA) and ``dx = dy W + u A [B, N, Din]`` on reference rows,
    ``dy W`` on video rows; with ``need_dx=False`` dx is an empty ``[0]`` tensor."""
    with device_guard("ref_lora_linear_bwd", dy=dy, weight=weight, lora_a=lora_a, lora_b=lora_b):
        dy = unit_last(dy)
        u = _shrink(dy, lora_b, scale, num_video)
        if not need_dx:
            return dy.new_empty((0,)), u
        return _gemm(dy, weight, num_video, t=u, lt=lora_a), u


def ref_folded_linear_fwd(x, weight, weight_ref, bias, num_video: int):
    """Launcher of the folded forward: ``x W^T + b`` on video rows, ``x W_ref^T + b`` on
    reference rows. The two weights are made contiguous (one stride pair serves both in the
    kernel; no copy for nn.Linear weights)."""
    with device_guard("ref_folded_linear_fwd", x=x, weight=weight, weight_ref=weight_ref, bias=bias):
        weight, weight_ref = weight.contiguous(), weight_ref.contiguous()
        return _gemm(unit_last(x), weight.t(), num_video, bias=bias, wt_ref=weight_ref.t())


def ref_folded_linear_bwd(dy, weight, weight_ref, num_video: int):
    """Launcher of the folded backward's ``dx``: ``dy W`` on video rows, ``dy W_ref`` on
    reference rows."""
    with device_guard("ref_folded_linear_bwd", dy=dy, weight=weight, weight_ref=weight_ref):
        weight, weight_ref = weight.contiguous(), weight_ref.contiguous()
        return _gemm(unit_last(dy), weight, num_video, wt_ref=weight_ref)


@torch.library.custom_op(
    "wildactor::ref_lora_linear_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
           "SymInt num_video) -> (Tensor, Tensor)")
def _ref_lora_linear_fwd_op(x, weight, bias, lora_a, lora_b, scale, num_video):
    return ref_lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale, num_video)


def _ref_lora_fwd_fake(x, weight, bias, lora_a, lora_b, scale, num_video):
    b, n, _ = x.shape
    return x.new_empty((b, n, weight.shape[0])), x.new_empty((b, n - num_video, lora_a.shape[0]))


register_fake(_ref_lora_linear_fwd_op, _ref_lora_fwd_fake)


@torch.library.custom_op(
    "wildactor::ref_lora_linear_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, SymInt num_video, "
           "bool need_dx) -> (Tensor, Tensor)")
def _ref_lora_linear_bwd_op(dy, weight, lora_a, lora_b, scale, num_video, need_dx):
    """``(dx, u)`` of :func:`ref_lora_linear_bwd` (custom ops cannot return None: an unneeded
    dx is an empty ``[0]`` tensor)."""
    return ref_lora_linear_bwd(dy, weight, lora_a, lora_b, scale, num_video, need_dx)


def _ref_lora_bwd_fake(dy, weight, lora_a, lora_b, scale, num_video, need_dx):
    b, n, _ = dy.shape
    u = dy.new_empty((b, n - num_video, lora_a.shape[0]))
    return (dy.new_empty((b, n, weight.shape[1])) if need_dx else dy.new_empty((0,))), u


register_fake(_ref_lora_linear_bwd_op, _ref_lora_bwd_fake)


def _ref_lora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, num_video = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scale, ctx.num_video, ctx.has_bias = scale, num_video, bias is not None


def _ref_lora_backward(ctx, dy, _dt):
    x, weight, lora_a, lora_b, t = ctx.saved_tensors
    s, nv = ctx.scale, ctx.num_video
    need_dx, need_dw, need_db, need_da, need_dlb = ctx.needs_input_grad[:5]
    dx = dw = db = da = dlb = None
    if dy is None:
        dy = x.new_zeros((*x.shape[:2], weight.shape[0]))
    if need_dx or need_da:
        dx, u = _ref_lora_linear_bwd_op(dy, weight, lora_a, lora_b, s, nv, need_dx)
        if not need_dx:
            dx = None
        # one GEMM over all B*Nr rows (a per-sample bmm + sum would round each partial);
        # Nr = 0 gives an empty reduction, i.e. zeros
        if need_da:
            da = _flat_rows(u).t() @ _flat_rows(x[:, nv:])
    if need_dlb:
        dlb = _flat_rows(dy[:, nv:]).t() @ _flat_rows(t)
    if need_dw:
        dw = _flat_rows(dy).t() @ _flat_rows(x)
    if need_db and ctx.has_bias:
        db = dy.sum((0, 1))
    return dx, dw, db, da, dlb, None, None


_ref_lora_linear_fwd_op.register_autograd(_ref_lora_backward, setup_context=_ref_lora_setup_context)


@torch.library.custom_op(
    "wildactor::ref_folded_linear_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor weight_ref, Tensor? bias, SymInt num_video) -> Tensor")
def _ref_folded_linear_fwd_op(x, weight, weight_ref, bias, num_video):
    return ref_folded_linear_fwd(x, weight, weight_ref, bias, num_video)


def _ref_folded_fwd_fake(x, weight, weight_ref, bias, num_video):
    b, n, _ = x.shape
    return x.new_empty((b, n, weight.shape[0]))


register_fake(_ref_folded_linear_fwd_op, _ref_folded_fwd_fake)


@torch.library.custom_op(
    "wildactor::ref_folded_linear_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor weight, Tensor weight_ref, SymInt num_video) -> Tensor")
def _ref_folded_linear_bwd_op(dy, weight, weight_ref, num_video):
    """``dx``: ``dy W`` on video rows, ``dy W_ref`` on reference rows."""
    return ref_folded_linear_bwd(dy, weight, weight_ref, num_video)


def _ref_folded_bwd_fake(dy, weight, weight_ref, num_video):
    b, n, _ = dy.shape
    return dy.new_empty((b, n, weight.shape[1]))


register_fake(_ref_folded_linear_bwd_op, _ref_folded_bwd_fake)


def _ref_folded_setup_context(ctx, inputs, output):
    x, weight, weight_ref, bias, num_video = inputs
    ctx.save_for_backward(x, weight, weight_ref)
    ctx.num_video, ctx.has_bias = num_video, bias is not None


def _ref_folded_backward(ctx, dy):
    x, weight, weight_ref = ctx.saved_tensors
    nv = ctx.num_video
    need_dx, need_dw, need_dwr, need_db = ctx.needs_input_grad[:4]
    dx = dw = dwr = db = None
    if need_dx:
        dx = _ref_folded_linear_bwd_op(dy, weight, weight_ref, nv)
    if need_dw:
        dw = _flat_rows(dy[:, :nv]).t() @ _flat_rows(x[:, :nv])
    if need_dwr:
        dwr = _flat_rows(dy[:, nv:]).t() @ _flat_rows(x[:, nv:])
    if need_db and ctx.has_bias:
        db = dy.sum((0, 1))
    return dx, dw, dwr, db, None


_ref_folded_linear_fwd_op.register_autograd(_ref_folded_backward, setup_context=_ref_folded_setup_context)


# ----------------------------------------------------------------------------- public
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype when autocast is on for x's device (what F.linear, and
    so the reference backend, would use; on the CPU too, under the interpreter)."""
    if autocast_active(x.device):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _no_autocast(x: torch.Tensor):
    # inputs are already in the compute dtype; keep autocast from re-casting the torch pieces
    if autocast_active(x.device):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _cast(dtype: torch.dtype, *ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    # differentiable casts outside the op: autograd returns grads in the callers' dtypes
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in ts]


def ref_lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                           num_video: int) -> torch.Tensor:
    """Triton reference-only LoRA linear (inputs already checked by ``ref_lora_linear``).

    ``x [B, N, Din]``, ``weight [Dout, Din]``, ``bias [Dout] | None``, ``lora_a [r, Din]``,
    ``lora_b [Dout, r]`` -> ``[B, N, Dout]`` in x's dtype (fp16, bf16 or fp32; the others
    are cast to it). Differentiable in every tensor argument. Runs the
    ``torch.ops.wildactor.ref_lora_linear_fwd`` op (backward ``ref_lora_linear_bwd`` plus torch
    GEMMs), so it compiles with ``torch.compile(fullgraph=True)``.
    """
    dtype = _compute_dtype(x)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"ref_lora_linear (triton): dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    x, weight, bias, lora_a, lora_b = _cast(dtype, x, weight, bias, lora_a, lora_b)
    with _no_autocast(x):
        y, _ = _ref_lora_linear_fwd_op(x, weight, bias, lora_a, lora_b, float(scale), num_video)
        return y


def ref_folded_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_ref: torch.Tensor,
                             bias: torch.Tensor | None, num_video: int) -> torch.Tensor:
    """One GEMM with the weight chosen per tile: ``x_v W^T + b`` on video rows and
    ``x_r W_ref^T + b`` on reference rows (folded LoRA, ``W_ref = W + s B A``).

    ``x [B, N, Din]``, ``weight, weight_ref [Dout, Din]``, ``bias [Dout] | None`` ->
    ``[B, N, Dout]`` in x's dtype. Differentiable in every tensor argument. Runs the
    ``torch.ops.wildactor.ref_folded_linear_fwd`` op (backward ``ref_folded_linear_bwd``).
    """
    dtype = _compute_dtype(x)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"folded linear (triton): dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if weight_ref.shape != weight.shape:
        raise ValueError(f"weight_ref must have the shape of weight {tuple(weight.shape)}, "
                         f"got {tuple(weight_ref.shape)}")
    x, weight, weight_ref, bias = _cast(dtype, x, weight, weight_ref, bias)
    with _no_autocast(x):
        return _ref_folded_linear_fwd_op(x, weight, weight_ref, bias, num_video)
