"""Plain-PyTorch FP8 maths (docs/design.md §7): the spec the Triton kernel and the GEMM paths follow.

Scaled float8_e4m3fn quantization of the rows of a matrix (one scale per row):

    amax_m  = max_k |x[m, k]|                      (computed in fp32)
    scale_m = max(amax_m, AMAX_EPS) / FP8_MAX      (fp32, FP8_MAX = 448, the e4m3fn maximum)
    q[m, k] = cast_e4m3fn(clamp(x[m, k] / scale_m, -FP8_MAX, FP8_MAX))   (round to nearest even)
    x[m, k] ~ q[m, k] * scale_m

Applied to activations ``x [M, K]`` this is dynamic per-token quantization (``scale [M, 1]``);
applied to a weight ``W [N, K]`` it is per-output-channel quantization (``scale [N, 1]``).
The division is an IEEE fp32 division so the Triton kernel (``div_rn``) reproduces it bit for
bit. ``AMAX_EPS`` keeps an all-zero row finite (its scale is tiny and its codes are zero).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
AMAX_EPS = 1e-12


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def per_token_quant_fp8_ref(x: torch.Tensor, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` to float8_e4m3fn with its own fp32 scale.

    Args:
        x: ``[..., K]`` any float dtype, any strides.
        pad_to: the last dim of the result is ``K`` rounded up to a multiple of ``pad_to``; the
            extra columns are zero codes (``torch._scaled_mm`` wants K % 16 == 0).
    Returns:
        ``(q, scale)``: ``q [..., K_pad]`` float8_e4m3fn (contiguous), ``scale [..., 1]`` fp32,
        with ``x ~ q[..., :K].float() * scale``.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if x.shape[-1] else xf.new_zeros(*x.shape[:-1], 1)
    scale = amax.clamp(min=AMAX_EPS) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    k_pad = _round_up(x.shape[-1], pad_to)
    if k_pad != x.shape[-1]:
        q = torch.cat([q, q.new_zeros(*q.shape[:-1], k_pad - x.shape[-1])], dim=-1)
    return q.contiguous(), scale


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel quantization of a linear weight (done once, at conversion).

    Args:
        weight: ``[N, K]`` (``nn.Linear`` layout: out_features x in_features), any float dtype.
    Returns:
        ``(w_fp8 [N, K] float8_e4m3fn, scale [N, 1] fp32)`` with ``W ~ w_fp8.float() * scale``.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    return per_token_quant_fp8_ref(weight.detach())


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale`` cast to ``dtype`` (``scale`` broadcasts: ``[..., 1]`` per row)."""
    return (q.float() * scale.float()).to(dtype)


def fp8_linear_emulated(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """What a rowwise-scaled FP8 GEMM computes, in fp32 on any device.

    ``y = (x_q @ w_q^T) * x_scale * w_scale^T + bias``: the codes are multiplied exactly (an
    e4m3 x e4m3 product is exact in fp32), accumulated in fp32, then both scales are applied to
    the accumulator as ``torch._scaled_mm`` does in its epilogue.

    Args:
        x_q: ``[M, K]`` float8_e4m3fn; x_scale: ``[M, 1]`` fp32.
        w_q: ``[N, K]`` float8_e4m3fn; w_scale: ``[N, 1]`` fp32; bias: ``[N]`` or None.
    Returns:
        ``[M, N]`` in ``out_dtype``.
    """
    acc = x_q.float() @ w_q.float().t()
    y = acc * x_scale.float() * w_scale.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
