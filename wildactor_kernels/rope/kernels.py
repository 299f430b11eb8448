"""Triton kernels for I-RoPE and for Wan's q/k RMSNorm fused with I-RoPE.

The maths is :mod:`wildactor_kernels.rope.reference` (``apply_rope_ref``, ``qk_norm_rope_ref``);
this file holds, top to bottom: the ``@triton.jit`` kernels (autotune configs directly above
them), the launchers ``apply_rope_fwd`` / ``apply_rope_bwd`` / ``qk_norm_rope_fwd`` /
``qk_norm_rope_bwd`` (device guard, allocation, grid), the autograd Functions and the two entry
points called by :mod:`.op`.

Layout: ``x, q, k: [B, N, H, D]`` with a unit-stride last dim and any other strides (q and k are
often views into a fused QKV projection ``[B, N, 3, H, D]``); ``cos, sin: [N, D//2]`` float32.
Results are contiguous. All maths runs in fp32; loads/stores use the input dtype.

Design (the ops are memory bound, so the aim is one read and one write of every element):

- one program owns ``BLOCK_N`` tokens of one sample and walks all of their heads in chunks of
  ``BLOCK_H``, so the ``[BLOCK_N, D//2]`` cos/sin tile is loaded once and reused for every head;
- the head dim is padded to ``D_PAD`` (next power of two) with masks, so D = 24, 80, ... work;
- interleaved pairs are formed in registers (``reshape`` + ``split``/``join``) from one
  contiguous, vectorisable load instead of two stride-2 loads;
- the RMSNorm is over ``H*D`` (up to 5120 for Wan-14B), too wide for one register tile, so
  the fused kernel makes two passes over the head chunks of its tokens: the first sums squares,
  the second normalises, scales, rotates and stores. The second pass re-reads only the program's
  own few tens of KB, which should still sit in L1/L2 (to be confirmed on the GPU with
  ``benchmarks/bench_rope.py``; the alternative, a token's whole feature in registers, would
  pad 5120 to 8192 lanes and spill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import (
    autotune_bench,
    autotune_configs,
    device_guard,
    interpreter_active,
    register_fake,
    unit_last,
)

__all__ = ["apply_rope_triton", "qk_norm_rope_triton", "apply_rope_fwd", "apply_rope_bwd",
           "qk_norm_rope_fwd", "qk_norm_rope_bwd"]

# Under the CPU interpreter every program is simulated in Python: autotuning there would only
# multiply the test time, so a single fixed config is used. Its BLOCK_H (2 for H <= 4, else 16)
# makes the small test shapes (H = 1, 3) and the Wan-14B width (H = 40: chunks 16+16+8 of 16)
# exercise both the head-chunk loop and the head mask, in few interpreted iterations.
_INTERPRET = interpreter_active()

# Elements of one [BLOCK_N, BLOCK_H, D_PAD] register tile on GPU: 4096 fp32 values are 32 per
# thread at 4 warps, which leaves room for the pair split/join (ptxas for sm_90: no spills).
_TILE_ELEMS = 4096


def _configs(gpu: list[tuple[int, int]]) -> list[triton.Config]:
    """Autotune space on GPU, a single config under the interpreter. ``gpu``: (BLOCK_N, warps)."""
    return autotune_configs([triton.Config({"BLOCK_N": bn}, num_warps=nw) for bn, nw in gpu],
                            triton.Config({"BLOCK_N": 16}, num_warps=1))


def _block_h(args: dict) -> int:
    """Heads per loop iteration: fill the register tile budget, never more heads than exist."""
    if _INTERPRET:
        return 2 if args["H"] <= 4 else 16
    return min(triton.next_power_of_2(args["H"]), max(1, _TILE_ELEMS // (args["BLOCK_N"] * args["D_PAD"])))


# =========================================================================== jit helpers
@triton.jit
def _rotate_pairs(b_x, b_cos, b_sin, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, D_PAD: tl.constexpr):
    """Rotate interleaved pairs of ``b_x [BLOCK_N, BLOCK_H, D_PAD]`` (fp32) by
    ``b_cos, b_sin [BLOCK_N, 1, D_PAD // 2]``: ``(x0, x1) -> (x0 c - x1 s, x0 s + x1 c)``."""
    b_x0, b_x1 = tl.split(tl.reshape(b_x, (BLOCK_N, BLOCK_H, D_PAD // 2, 2)))
    b_y0 = b_x0 * b_cos - b_x1 * b_sin
    b_y1 = b_x0 * b_sin + b_x1 * b_cos
    return tl.reshape(tl.join(b_y0, b_y1), (BLOCK_N, BLOCK_H, D_PAD))


@triton.jit
def _load_cos_sin(p_cos, p_sin, o_n, m_n, stride_cn, D, D_PAD: tl.constexpr):
    """``[BLOCK_N, 1, D_PAD // 2]`` fp32 tiles of the ``[N, D//2]`` tables (unit last stride).

    The row stride is an argument, not ``D // 2`` computed in the kernel, so Triton sees its
    divisibility and vectorises the table loads too."""
    o_p = tl.arange(0, D_PAD // 2)
    o_cs = o_n[:, None] * stride_cn + o_p[None, :]
    m_cs = m_n[:, None] & (o_p < D // 2)[None, :]
    b_cos = tl.load(p_cos + o_cs, mask=m_cs, other=0.0).to(tl.float32)
    b_sin = tl.load(p_sin + o_cs, mask=m_cs, other=0.0).to(tl.float32)
    return b_cos[:, None, :], b_sin[:, None, :]


# =========================================================================== apply_rope
@triton.autotune(
    configs=_configs([(4, 4), (8, 4), (16, 4), (16, 8), (32, 8)]),
    key=["H", "D_PAD"],
    do_bench=autotune_bench(),
)
@triton.heuristics({"BLOCK_H": _block_h})
@triton.jit
def _rope_kernel(
    p_x, p_cos, p_sin, p_y,
    N, H, D,
    stride_xb, stride_xn, stride_xh, stride_cn,
    CONJ: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program: ``BLOCK_N`` tokens of sample ``i_b``, every head. ``y`` is contiguous.

    ``CONJ`` rotates by ``-angle`` (sin -> -sin): the backward of a rotation is its transpose.
    """
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_hh = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D

    b_cos, b_sin = _load_cos_sin(p_cos, p_sin, o_n, m_n, stride_cn, D, D_PAD)
    if CONJ:
        b_sin = -b_sin

    # int64 row offsets: a fused-QKV view of a large video can pass 2**31 elements.
    o_xrow = i_b.to(tl.int64) * stride_xb + o_n.to(tl.int64) * stride_xn
    o_yrow = (i_b.to(tl.int64) * N + o_n) * H * D
    for i_h in range(0, H, BLOCK_H):
        o_h = i_h + o_hh
        m_x = m_n[:, None, None] & (o_h < H)[None, :, None] & m_d[None, None, :]
        o_x = o_xrow[:, None, None] + (o_h * stride_xh)[None, :, None] + o_d[None, None, :]
        b_x = tl.load(p_x + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_y = _rotate_pairs(b_x, b_cos, b_sin, BLOCK_N, BLOCK_H, D_PAD)
        o_y = o_yrow[:, None, None] + (o_h * D)[None, :, None] + o_d[None, None, :]
        tl.store(p_y + o_y, b_y.to(p_y.dtype.element_ty), mask=m_x)


# =========================================================================== qk_norm_rope
@triton.autotune(
    configs=_configs([(2, 4), (4, 4), (4, 8), (8, 8), (16, 8)]),
    key=["H", "D_PAD"],
    do_bench=autotune_bench(),
)
@triton.heuristics({"BLOCK_H": _block_h})
@triton.jit
def _qk_norm_rope_fwd_kernel(
    p_q, p_k, p_w, p_cos, p_sin, p_yq, p_yk, p_rstd,
    B, N, H, D,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_cn, eps,
    HAS_WEIGHT: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program: ``BLOCK_N`` tokens of sample ``i_b`` of q (``i_qk = 0``) or k (``i_qk = 1``).

    ``p_w``: ``[2, H*D]`` fp32 (q row, k row); ``p_yq, p_yk``: contiguous ``[B, N, H, D]`` outputs
    (two allocations: a custom op may not return two views of one buffer); ``p_rstd``: ``[2, B, N]``
    fp32 (saved for the backward). q and k share one launch so small shapes still fill the GPU.
    """
    i_n, i_b, i_qk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Select q or k by scalar selects, not branches: both arms are plain pointer/int values.
    is_q = i_qk == 0
    p_x = tl.where(is_q, p_q, p_k)
    p_y = tl.where(is_q, p_yq, p_yk)
    stride_xb = tl.where(is_q, stride_qb, stride_kb)
    stride_xn = tl.where(is_q, stride_qn, stride_kn)
    stride_xh = tl.where(is_q, stride_qh, stride_kh)

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_hh = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    o_xrow = i_b.to(tl.int64) * stride_xb + o_n.to(tl.int64) * stride_xn
    o_tok = (i_qk * B + i_b).to(tl.int64) * N + o_n  # token index inside [2, B, N] (rstd)
    o_yrow = (i_b.to(tl.int64) * N + o_n) * (H * D)  # row offset inside [B, N, H, D] (y)

    # ---- pass 1: sum of squares over the whole H*D feature of each token
    b_ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i_h in range(0, H, BLOCK_H):
        o_h = i_h + o_hh
        m_x = m_n[:, None, None] & (o_h < H)[None, :, None] & m_d[None, None, :]
        o_x = o_xrow[:, None, None] + (o_h * stride_xh)[None, :, None] + o_d[None, None, :]
        b_x = tl.load(p_x + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_ss += tl.sum(tl.sum(b_x * b_x, axis=2), axis=1)
    b_rstd = tl.rsqrt(b_ss / (H * D) + eps)
    tl.store(p_rstd + o_tok, b_rstd, mask=m_n)

    # ---- pass 2: normalise, scale, rotate, store (the re-read is served by L1/L2)
    b_cos, b_sin = _load_cos_sin(p_cos, p_sin, o_n, m_n, stride_cn, D, D_PAD)
    for i_h in range(0, H, BLOCK_H):
        o_h = i_h + o_hh
        m_h = o_h < H
        m_x = m_n[:, None, None] & m_h[None, :, None] & m_d[None, None, :]
        o_x = o_xrow[:, None, None] + (o_h * stride_xh)[None, :, None] + o_d[None, None, :]
        b_x = tl.load(p_x + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_x = b_x * b_rstd[:, None, None]
        if HAS_WEIGHT:
            o_w = i_qk * H * D + o_h[:, None] * D + o_d[None, :]
            b_w = tl.load(p_w + o_w, mask=m_h[:, None] & m_d[None, :], other=0.0)
            b_x = b_x * b_w[None, :, :]
        b_y = _rotate_pairs(b_x, b_cos, b_sin, BLOCK_N, BLOCK_H, D_PAD)
        o_y = o_yrow[:, None, None] + (o_h * D)[None, :, None] + o_d[None, None, :]
        tl.store(p_y + o_y, b_y.to(p_y.dtype.element_ty), mask=m_x)


# No autotune here: the kernel accumulates weight-gradient partials with read-modify-write, so
# autotune's replays would need reset hooks, and the tile follows the same budget as the forward.
@triton.heuristics({"BLOCK_H": _block_h})
@triton.jit
def _qk_norm_rope_bwd_kernel(
    p_q, p_k, p_dyq, p_dyk, p_w, p_cos, p_sin, p_rstd, p_dq, p_dk, p_dw,
    B, N, H, D, G,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_dqb, stride_dqn, stride_dqh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_cn,
    HAS_WEIGHT: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program ``(i_g, i_qk)`` walks token blocks ``i_g, i_g + G, ...`` of the flattened ``B*N``
    tokens of q or k.

    With ``x̂ = x * rstd``, ``n = x̂ * w`` and ``g = R(-angle) dy`` (the transposed rotation):
    ``dw += sum_tokens g * x̂``, ``dn = g * w``, ``dx = rstd * (dn - x̂ * mean_HD(dn * x̂))``.
    The mean needs the whole token first, hence two passes again. ``p_dw`` is ``[2, G, H*D]``
    fp32 zeros; each program owns one row (no atomics) and the launcher sums the G rows.
    ``p_dq, p_dk``: contiguous ``[B, N, H, D]`` gradients (two allocations, as in the forward).
    A grid of G programs rather than one per token block keeps that partial buffer small.
    """
    i_g, i_qk = tl.program_id(0), tl.program_id(1)
    is_q = i_qk == 0
    p_x = tl.where(is_q, p_q, p_k)
    p_dy = tl.where(is_q, p_dyq, p_dyk)
    p_dx = tl.where(is_q, p_dq, p_dk)
    stride_xb = tl.where(is_q, stride_qb, stride_kb)
    stride_xn = tl.where(is_q, stride_qn, stride_kn)
    stride_xh = tl.where(is_q, stride_qh, stride_kh)
    stride_db = tl.where(is_q, stride_dqb, stride_dkb)
    stride_dn = tl.where(is_q, stride_dqn, stride_dkn)
    stride_dh = tl.where(is_q, stride_dqh, stride_dkh)

    o_hh = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    p_dw_row = p_dw + (i_qk * G + i_g).to(tl.int64) * H * D
    for i_t in range(i_g * BLOCK_N, B * N, G * BLOCK_N):
        o_t = i_t + tl.arange(0, BLOCK_N)  # flattened (b, n)
        m_t = o_t < B * N
        o_b = (o_t // N).to(tl.int64)
        o_n = o_t % N
        o_xrow = o_b * stride_xb + o_n.to(tl.int64) * stride_xn
        o_drow = o_b * stride_db + o_n.to(tl.int64) * stride_dn
        o_tok = i_qk.to(tl.int64) * B * N + o_t  # token index inside [2, B, N] (rstd)
        o_dxrow = o_t.to(tl.int64) * (H * D)  # row offset inside [B, N, H, D] (dq or dk)
        b_rstd = tl.load(p_rstd + o_tok, mask=m_t, other=0.0)
        b_cos, b_sin = _load_cos_sin(p_cos, p_sin, o_n, m_t, stride_cn, D, D_PAD)
        b_sin = -b_sin

        # ---- pass 1: sum over H*D of dn * x (times rstd / (H*D) below gives mean(dn * x̂))
        b_c = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i_h in range(0, H, BLOCK_H):
            o_h = i_h + o_hh
            m_h = o_h < H
            m_x = m_t[:, None, None] & m_h[None, :, None] & m_d[None, None, :]
            o_x = o_xrow[:, None, None] + (o_h * stride_xh)[None, :, None] + o_d[None, None, :]
            o_dy = o_drow[:, None, None] + (o_h * stride_dh)[None, :, None] + o_d[None, None, :]
            b_x = tl.load(p_x + o_x, mask=m_x, other=0.0).to(tl.float32)
            b_dy = tl.load(p_dy + o_dy, mask=m_x, other=0.0).to(tl.float32)
            b_dn = _rotate_pairs(b_dy, b_cos, b_sin, BLOCK_N, BLOCK_H, D_PAD)
            if HAS_WEIGHT:
                o_w = i_qk * H * D + o_h[:, None] * D + o_d[None, :]
                b_w = tl.load(p_w + o_w, mask=m_h[:, None] & m_d[None, :], other=0.0)
                b_dn = b_dn * b_w[None, :, :]
            b_c += tl.sum(tl.sum(b_dn * b_x, axis=2), axis=1)
        b_c = b_c * b_rstd / (H * D)

        # ---- pass 2: dx, and this program's share of dw
        for i_h in range(0, H, BLOCK_H):
            o_h = i_h + o_hh
            m_h = o_h < H
            m_x = m_t[:, None, None] & m_h[None, :, None] & m_d[None, None, :]
            o_x = o_xrow[:, None, None] + (o_h * stride_xh)[None, :, None] + o_d[None, None, :]
            o_dy = o_drow[:, None, None] + (o_h * stride_dh)[None, :, None] + o_d[None, None, :]
            b_xhat = tl.load(p_x + o_x, mask=m_x, other=0.0).to(tl.float32) * b_rstd[:, None, None]
            b_dy = tl.load(p_dy + o_dy, mask=m_x, other=0.0).to(tl.float32)
            b_g = _rotate_pairs(b_dy, b_cos, b_sin, BLOCK_N, BLOCK_H, D_PAD)
            b_dn = b_g
            if HAS_WEIGHT:
                o_w = o_h[:, None] * D + o_d[None, :]
                m_w = m_h[:, None] & m_d[None, :]
                b_w = tl.load(p_w + i_qk * H * D + o_w, mask=m_w, other=0.0)
                b_dn = b_g * b_w[None, :, :]
                # The thread that loads an element of the dw row need not be the one that stored
                # it on the previous token block (layouts differ, small tiles are replicated):
                # the barrier makes those global stores visible inside the program first.
                tl.debug_barrier()
                b_dw = tl.load(p_dw_row + o_w, mask=m_w, other=0.0)
                tl.store(p_dw_row + o_w, b_dw + tl.sum(b_g * b_xhat, axis=0), mask=m_w)
            b_dx = (b_dn - b_xhat * b_c[:, None, None]) * b_rstd[:, None, None]
            o_dx = o_dxrow[:, None, None] + (o_h * D)[None, :, None] + o_d[None, None, :]
            tl.store(p_dx + o_dx, b_dx.to(p_dx.dtype.element_ty), mask=m_x)


# =========================================================================== launchers
def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # [N, D//2] is small next to x; fp32 contiguous lets the kernel index it with one stride.
    return cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous()


def apply_rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   conj: bool = False) -> torch.Tensor:
    """Rotate ``x [B, N, H, D]`` (any strides: a strided head dim is copied to unit stride, the
    other strides go to the kernel) by ``cos, sin [N, D//2]`` (made contiguous fp32);
    ``conj=True`` rotates by the opposite angle. Returns contiguous ``x.dtype``."""
    with device_guard("apply_rope_fwd", x=x, cos=cos, sin=sin):
        return _rope(x, cos, sin, conj)


def apply_rope_bwd(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`apply_rope_fwd`: a rotation's adjoint is the rotation by the opposite
    angle."""
    with device_guard("apply_rope_bwd", dy=dy, cos=cos, sin=sin):
        return _rope(dy, cos, sin, True)


def _rope(x, cos, sin, conj):
    b, n, h, d = x.shape
    x = unit_last(x)
    cos, sin = _tables(cos, sin)
    y = torch.empty((b, n, h, d), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b)
    _rope_kernel[grid](
        x, cos, sin, y, n, h, d, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
        CONJ=conj, D_PAD=triton.next_power_of_2(d),
    )
    return y


def _stack_weights(q_weight, k_weight, hd: int, device) -> torch.Tensor | None:
    """``[2, H*D]`` fp32 (q row, k row), or None when neither weight is given. A single missing
    weight becomes ones: the kernel then has one code path and the grad is just not returned."""
    if q_weight is None and k_weight is None:
        return None
    ones = torch.ones(hd, dtype=torch.float32, device=device)
    return torch.stack([ones if w is None else w.to(torch.float32) for w in (q_weight, k_weight)])


def qk_norm_rope_fwd(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor | None, cos: torch.Tensor,
                     sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher of the fused forward. ``w``: ``[2, H*D]`` fp32 or None; ``cos, sin`` ``[N, D//2]``.

    Returns ``(q', k', rstd)``: two contiguous ``[B, N, H, D]`` tensors and ``rstd [2, B, N]`` fp32
    for the backward. Strides as in :func:`apply_rope_fwd` (``w`` is built contiguous).
    """
    with device_guard("qk_norm_rope_fwd", q=q, k=k, w=w, cos=cos, sin=sin):
        return _qk_fwd(q, k, w, cos, sin, eps)


def _qk_fwd(q, k, w, cos, sin, eps):
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share one dtype, got {q.dtype} and {k.dtype}")
    b, n, h, d = q.shape
    q, k = unit_last(q), unit_last(k)
    cos, sin = _tables(cos, sin)
    yq = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    yk = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    rstd = torch.empty((2, b, n), dtype=torch.float32, device=q.device)
    if yq.numel() == 0:
        return yq, yk, rstd
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b, 2)
    _qk_norm_rope_fwd_kernel[grid](
        q, k, w if w is not None else rstd, cos, sin, yq, yk, rstd,
        b, n, h, d,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), float(eps),
        HAS_WEIGHT=w is not None, D_PAD=triton.next_power_of_2(d),
    )
    return yq, yk, rstd


def _bwd_block() -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the backward: x, dy, their rotations and the weights are live at
    once, so the tile is split over 8 warps (about 16 values a thread, no spills on sm_90)."""
    if _INTERPRET:
        return 16, 1
    return 4, 8


def qk_norm_rope_bwd(q, k, dyq, dyk, w, cos, sin, rstd):
    """Launcher of the fused backward. Returns ``(dq, dk, dw)``: contiguous ``[B, N, H, D]`` grads
    in q's dtype and ``dw [2, H*D]`` fp32, or None when ``w`` is None. Strides as in the forward;
    ``rstd`` is the forward's contiguous output."""
    with device_guard("qk_norm_rope_bwd", q=q, k=k, dyq=dyq, dyk=dyk, w=w, cos=cos, sin=sin,
                      rstd=rstd):
        return _qk_bwd(q, k, dyq, dyk, w, cos, sin, rstd.contiguous())


def _qk_bwd(q, k, dyq, dyk, w, cos, sin, rstd):
    b, n, h, d = q.shape
    q, k = unit_last(q), unit_last(k)
    cos, sin = _tables(cos, sin)
    dyq, dyk = unit_last(dyq.to(q.dtype)), unit_last(dyk.to(q.dtype))
    d_pad = triton.next_power_of_2(d)
    block_n, num_warps = _bwd_block()
    n_blocks = triton.cdiv(b * n, block_n)
    if _INTERPRET:
        # Few programs, so the interpreter tests cover programs that walk several token blocks.
        g = min(n_blocks, 4)
    else:
        g = min(n_blocks, 2 * torch.cuda.get_device_properties(q.device).multi_processor_count)
    g = max(g, 1)
    dq = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    dw = torch.zeros((2, g, h * d), dtype=torch.float32, device=q.device) if w is not None else None
    if dq.numel() == 0:
        return dq, dk, (dw.sum(1) if dw is not None else None)
    _qk_norm_rope_bwd_kernel[(g, 2)](
        q, k, dyq, dyk, w if w is not None else rstd, cos, sin, rstd, dq, dk,
        dw if dw is not None else rstd,
        b, n, h, d, g,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        dyq.stride(0), dyq.stride(1), dyq.stride(2), dyk.stride(0), dyk.stride(1), dyk.stride(2),
        cos.stride(0),
        HAS_WEIGHT=w is not None, D_PAD=d_pad, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dq, dk, (dw.sum(1) if dw is not None else None)


# =========================================================================== torch.library ops
# Opaque custom ops with fake (meta) kernels and registered autograd (the pattern of
# ``attention/kernels.py``): torch.compile(fullgraph=True) traces through them without graph
# breaks and never enters the launchers or Triton's runtime; each backward is an op of its own.
# The schemas are mutation-free: every output is allocated inside the op.
@torch.library.custom_op("wildactor::apply_rope_fwd", mutates_args=(),
                         schema="(Tensor x, Tensor cos, Tensor sin) -> Tensor")
def _apply_rope_fwd_op(x, cos, sin):
    return apply_rope_fwd(x, cos, sin)


@torch.library.custom_op("wildactor::apply_rope_bwd", mutates_args=(),
                         schema="(Tensor dy, Tensor cos, Tensor sin) -> Tensor")
def _apply_rope_bwd_op(dy, cos, sin):
    return apply_rope_bwd(dy, cos, sin)


def _rope_fake(x, cos, sin):
    return x.new_empty(tuple(x.shape))  # contiguous, like the launcher's output


register_fake(_apply_rope_fwd_op, _rope_fake)
register_fake(_apply_rope_bwd_op, _rope_fake)


def _rope_setup_context(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _apply_rope_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _apply_rope_bwd_op(dy, cos, sin), None, None


def _apply_rope_bwd_backward(ctx, ddx):
    cos, sin = ctx.saved_tensors  # the rotations are linear: each one's adjoint is the other
    return _apply_rope_fwd_op(ddx, cos, sin), None, None


_apply_rope_fwd_op.register_autograd(_apply_rope_backward, setup_context=_rope_setup_context)
_apply_rope_bwd_op.register_autograd(_apply_rope_bwd_backward, setup_context=_rope_setup_context)


@torch.library.custom_op(
    "wildactor::qk_norm_rope_fwd", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor cos, Tensor sin, "
           "float eps) -> (Tensor, Tensor, Tensor)")
def _qk_norm_rope_fwd_op(q, k, q_weight, k_weight, cos, sin, eps):
    w = _stack_weights(q_weight, k_weight, q.shape[2] * q.shape[3], q.device)
    return qk_norm_rope_fwd(q, k, w, cos, sin, eps)


def _qk_fwd_fake(q, k, q_weight, k_weight, cos, sin, eps):
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share one dtype, got {q.dtype} and {k.dtype}")
    b, n, h, d = q.shape
    return (q.new_empty((b, n, h, d)), q.new_empty((b, n, h, d)),
            q.new_empty((2, b, n), dtype=torch.float32))


register_fake(_qk_norm_rope_fwd_op, _qk_fwd_fake)


@torch.library.custom_op(
    "wildactor::qk_norm_rope_bwd", mutates_args=(),
    schema="(Tensor dyq, Tensor dyk, Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, "
           "Tensor cos, Tensor sin, Tensor rstd) -> (Tensor, Tensor, Tensor)")
def _qk_norm_rope_bwd_op(dyq, dyk, q, k, q_weight, k_weight, cos, sin, rstd):
    """Returns ``(dq, dk, dw)``; ``dw`` is ``[2, H*D]`` fp32 (q row, k row) when a weight is given,
    else an empty ``[2, 0]`` (custom ops cannot return None)."""
    hd = q.shape[2] * q.shape[3]
    w = _stack_weights(q_weight, k_weight, hd, q.device)
    dq, dk, dw = qk_norm_rope_bwd(q, k, dyq, dyk, w, cos, sin, rstd)
    if dw is None:
        dw = torch.empty((2, 0), dtype=torch.float32, device=q.device)
    return dq, dk, dw


def _qk_bwd_fake(dyq, dyk, q, k, q_weight, k_weight, cos, sin, rstd):
    b, n, h, d = q.shape
    hd = h * d if (q_weight is not None or k_weight is not None) else 0
    return (q.new_empty((b, n, h, d)), q.new_empty((b, n, h, d)),
            q.new_empty((2, hd), dtype=torch.float32))


register_fake(_qk_norm_rope_bwd_op, _qk_bwd_fake)


def _qk_setup_context(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, _ = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, output[2])


def _qk_backward(ctx, dyq, dyk, _drstd):
    q, k, q_weight, k_weight, cos, sin, rstd = ctx.saved_tensors
    if dyq is None:
        dyq = torch.zeros_like(q)
    if dyk is None:
        dyk = torch.zeros_like(k)
    dq, dk, dw = _qk_norm_rope_bwd_op(dyq, dyk, q, k, q_weight, k_weight, cos, sin, rstd)
    dqw = None if q_weight is None else dw[0].to(q_weight.dtype)
    dkw = None if k_weight is None else dw[1].to(k_weight.dtype)
    return dq, dk, dqw, dkw, None, None, None


_qk_norm_rope_fwd_op.register_autograd(_qk_backward, setup_context=_qk_setup_context)


# =========================================================================== entry points
def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton I-RoPE. ``x [B, N, H, D]`` float (fp32/fp16/bf16), ``cos, sin [N, D//2]``.

    Returns contiguous ``[B, N, H, D]`` in ``x.dtype``; differentiable in ``x`` (the tables are
    constants), twice over (the backward is the conjugate rotation, itself differentiable).
    Runs the ``torch.ops.wildactor.apply_rope_fwd`` op (backward ``apply_rope_bwd``), so it
    compiles with ``torch.compile(fullgraph=True)``. Inputs are assumed checked by
    :func:`wildactor_kernels.apply_rope`.
    """
    return _apply_rope_fwd_op(x, cos, sin)


def qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                        k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm across heads (over ``H*D``, optional weight ``[H*D]``) then I-RoPE, q and k
    in one launch. ``q, k [B, N, H, D]`` one float dtype; ``cos, sin [N, D//2]``.

    Returns ``(q', k')`` contiguous in the input dtype; differentiable in q, k and the weights
    (weight grads in the weights' dtypes). Runs the ``torch.ops.wildactor.qk_norm_rope_fwd`` op
    (backward ``qk_norm_rope_bwd``). Unlike the reference, the normalised value is not rounded
    to the input dtype before the rotation (one rounding instead of two), so low-precision
    results are slightly closer to the fp64 truth.
    """
    yq, yk, _ = _qk_norm_rope_fwd_op(q, k, q_weight, k_weight, cos, sin, float(eps))
    return yq, yk
