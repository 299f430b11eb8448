"""Triton kernel: dynamic per-token FP8 quantization in one launch (docs/design.md §7).

Maths: :func:`wildactor_kernels.quant.reference.per_token_quant_fp8_ref` (amax over the row,
``scale = max(amax, eps) / 448``, ``q = cast_e4m3fn(clamp(x / scale))``).

One program owns ``BLOCK_M`` whole rows. When a row fits in one ``BLOCK_K`` tile (every Wan
width: 1536 ... 14336 <= 16384) it is read from memory once, reduced to its amax in registers
and written as codes: a single pass. Wider rows take two sweeps of the same program (amax, then
quantize); the second sweep re-reads the row, which is still in L2.

Where the codes are converted to float8 (visible in :func:`fp8_store_mode`):

- ``"kernel"``: on a GPU with native e4m3 conversion (sm_89+), the kernel stores float8
  (``cvt.rn.satfinite``: round to nearest even, like torch).
- ``"launcher_cast"``: everywhere else, the Triton CPU interpreter included, the kernel stores
  the clamped fp32 codes and the launcher casts them with ``tensor.to(torch.float8_e4m3fn)``.
  Reason: Triton 3.9's interpreter rounds fp32 -> fp8e4nv wrongly when rounding carries into
  the exponent (125.06 becomes 64 instead of 128) and flushes subnormals; the maths of the
  kernel is identical in both modes, only the final conversion moves.

The K padding for ``torch._scaled_mm`` (K % 16 == 0) is fused: columns ``K <= k < K_OUT`` are
written as zero codes, so no separate pad copy of the activation is made.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import triton
import triton.language as tl

from .._utils import device_guard, interpreter_active, register_fake
from .reference import AMAX_EPS, FP8_DTYPE, FP8_MAX, _round_up

__all__ = ["per_token_quant_fp8_triton", "per_token_quant_fp8_fwd", "fp8_store_mode"]

logger = logging.getLogger("wildactor_kernels")

# Largest row kept whole in registers (fp32 tile of BLOCK_M x BLOCK_K <= 16384 elements).
MAX_SINGLE_PASS_K = 16384
_TILE_ELEMS = 8192


@triton.jit
def _per_token_quant_fp8_kernel(
    p_x, p_q, p_s,
    M, K, K_OUT,
    stride_xm, stride_xk, stride_qm,
    AMAX_EPS: tl.constexpr, FP8_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    i_m = tl.program_id(0)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    # int64 row offsets: M * stride reaches 2**31 at Wan sizes with batch > 1
    o_xm = o_m.to(tl.int64) * stride_xm
    o_qm = o_m.to(tl.int64) * stride_qm
    o_k = tl.arange(0, BLOCK_K)
    # div_rn (IEEE division), not `/` (approximate div.full.f32 on NVIDIA): the codes then match
    # the torch reference bit for bit; the kernel is memory-bound, the slower division is free.

    if SINGLE_PASS:
        # ---- whole row in registers: read once
        m_x = m_m[:, None] & (o_k < K)[None, :]
        b_x = tl.load(p_x + o_xm[:, None] + o_k[None, :] * stride_xk, mask=m_x, other=0.0).to(tl.float32)
        b_amax = tl.max(tl.abs(b_x), axis=1)
        b_s = tl.math.div_rn(tl.maximum(b_amax, AMAX_EPS), tl.full([BLOCK_M], FP8_MAX, tl.float32))
        b_q = tl.math.div_rn(b_x, tl.broadcast_to(b_s[:, None], (BLOCK_M, BLOCK_K)))
        b_q = tl.minimum(tl.maximum(b_q, -FP8_MAX), FP8_MAX)
        m_q = m_m[:, None] & (o_k < K_OUT)[None, :]
        tl.store(p_q + o_qm[:, None] + o_k[None, :], b_q.to(p_q.dtype.element_ty), mask=m_q)
    else:
        # ---- sweep 1: row amax
        b_amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            m_x = m_m[:, None] & ((k0 + o_k) < K)[None, :]
            b_x = tl.load(p_x + o_xm[:, None] + (k0 + o_k)[None, :] * stride_xk, mask=m_x, other=0.0)
            b_amax = tl.maximum(b_amax, tl.max(tl.abs(b_x.to(tl.float32)), axis=1))
        b_s = tl.math.div_rn(tl.maximum(b_amax, AMAX_EPS), tl.full([BLOCK_M], FP8_MAX, tl.float32))
        b_sb = tl.broadcast_to(b_s[:, None], (BLOCK_M, BLOCK_K))
        # ---- sweep 2: codes (the row is re-read from L2); covers the zero padding up to K_OUT
        for k0 in range(0, K_OUT, BLOCK_K):
            m_x = m_m[:, None] & ((k0 + o_k) < K)[None, :]
            b_x = tl.load(p_x + o_xm[:, None] + (k0 + o_k)[None, :] * stride_xk, mask=m_x,
                          other=0.0).to(tl.float32)
            b_q = tl.math.div_rn(b_x, b_sb)
            b_q = tl.minimum(tl.maximum(b_q, -FP8_MAX), FP8_MAX)
            m_q = m_m[:, None] & ((k0 + o_k) < K_OUT)[None, :]
            tl.store(p_q + o_qm[:, None] + (k0 + o_k)[None, :], b_q.to(p_q.dtype.element_ty), mask=m_q)
    tl.store(p_s + o_m, b_s, mask=m_m)


def fp8_store_mode(device: torch.device) -> str:
    """``"kernel"`` when the kernel itself stores float8 on ``device`` (CUDA sm_89+, compiled),
    ``"launcher_cast"`` when it stores fp32 codes that the launcher casts (interpreter, older
    GPUs). The codes are the same either way; see the module docstring."""
    if device.type == "cuda" and not interpreter_active():
        if torch.cuda.get_device_capability(device) >= (8, 9):
            return "kernel"
    return "launcher_cast"


@functools.cache
def _note_store_mode(mode: str, device_type: str) -> None:
    if mode == "launcher_cast":
        logger.info("per_token_quant_fp8 on %s: the Triton kernel stores fp32 codes and the launcher casts "
                    "them to float8_e4m3fn (no native/exact fp8 conversion here)", device_type)


def _launch_config(k_out: int) -> tuple[int, int, bool, int]:
    block_k = triton.next_power_of_2(max(k_out, 16))
    single = block_k <= MAX_SINGLE_PASS_K
    if not single:
        block_k = 4096
    block_m = max(1, min(64, _TILE_ELEMS // block_k))
    tile = block_m * block_k
    num_warps = 4 if tile <= 4096 else (8 if tile <= 8192 else 16)
    return block_m, block_k, single, num_warps


def per_token_quant_fp8_fwd(x: torch.Tensor, pad_to: int = 1,
                            store_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: ``x [..., K]`` (any float dtype and strides) -> ``(q [..., K_pad] fp8, scale [..., 1])``.

    ``store_mode`` overrides :func:`fp8_store_mode` (tests use ``"kernel"`` to exercise the
    interpreter's own float8 conversion). Row and column strides of ``x`` go to the kernel
    (the leading dims are merged by a view where possible, else a copy).
    """
    with device_guard("per_token_quant_fp8_fwd", x=x):
        return _quant(x, pad_to, store_mode)


def _quant(x, pad_to, store_mode):
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(math.prod(lead), k)  # a view whenever the leading dims can be merged (K may be 0)
    m = x2.shape[0]
    k_out = _round_up(k, pad_to)
    mode = store_mode or fp8_store_mode(x.device)
    _note_store_mode(mode, x.device.type)
    q = torch.empty(m, k_out, device=x.device, dtype=FP8_DTYPE if mode == "kernel" else torch.float32)
    scale = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m > 0 and k_out > 0:
        block_m, block_k, single, num_warps = _launch_config(k_out)
        grid = (triton.cdiv(m, block_m),)
        _per_token_quant_fp8_kernel[grid](
            x2, q, scale, m, k, k_out, x2.stride(0), x2.stride(1), q.stride(0),
            AMAX_EPS=AMAX_EPS, FP8_MAX=FP8_MAX, BLOCK_M=block_m, BLOCK_K=block_k, SINGLE_PASS=single,
            num_warps=num_warps,
        )
    elif m > 0:
        scale.fill_(AMAX_EPS / FP8_MAX)
    if mode != "kernel":
        q = q.to(FP8_DTYPE)
    return q.reshape(*lead, k_out), scale.reshape(*lead, 1)


# =========================================================================== torch.library op
# Registered so that torch.compile(fullgraph=True) treats the launcher as one opaque node: dynamo
# never traces the launcher, Triton's runtime or the interpreter. Both outputs are allocated
# inside (float8 codes and fp32 scales); the store mode follows the device as in eager.
@torch.library.custom_op("wildactor::per_token_quant_fp8", mutates_args=(),
                         schema="(Tensor x, int pad_to) -> (Tensor, Tensor)")
def _per_token_quant_fp8_op(x: torch.Tensor, pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [..., K_pad] float8_e4m3fn contiguous, scale [..., 1] fp32)``, K_pad = K rounded up
    to a multiple of ``pad_to``."""
    return per_token_quant_fp8_fwd(x, pad_to)


def _per_token_quant_fp8_fake(x: torch.Tensor, pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    lead, k = x.shape[:-1], x.shape[-1]
    k_out = (k + pad_to - 1) // pad_to * pad_to  # _round_up, kept SymInt-friendly
    return (x.new_empty((*lead, k_out), dtype=FP8_DTYPE),
            x.new_empty((*lead, 1), dtype=torch.float32))


register_fake(_per_token_quant_fp8_op, _per_token_quant_fp8_fake)


def per_token_quant_fp8_triton(x: torch.Tensor, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token FP8 quantization (inputs checked by ``op.per_token_quant_fp8``): runs the
    ``torch.ops.wildactor.per_token_quant_fp8`` op, one opaque node for torch.compile."""
    return _per_token_quant_fp8_op(x, pad_to)
