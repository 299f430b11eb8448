"""FP8 linear: per-token activation quantization + rowwise-scaled FP8 GEMM (docs/design.md §7).

``y = fp8_linear(x, w_fp8, w_scale, bias)`` computes ``y ~ x W^T + b`` with

- ``W ~ w_fp8 * w_scale`` quantized once per output channel (``w_scale [N, 1]`` fp32), see
  :func:`~wildactor_kernels.quant.reference.quantize_weight_fp8`;
- ``x ~ x_q * x_scale`` quantized per token at every call (``x_scale [M, 1]`` fp32): the Triton
  kernel on CUDA, the reference on CPU (:func:`per_token_quant_fp8`);
- the GEMM, by one of two paths (:data:`GEMM_PATHS`):

  ``"scaled_mm"``  ``torch._scaled_mm(x_q, w_fp8.t(), scale_a=[M, 1], scale_b=[1, N],
                   out_dtype=bf16, bias=...)``: rowwise scaling, cuBLASLt/CUTLASS on sm_89+.
                   K and N are zero-padded to multiples of 16 (its layout rule): the
                   activation's K padding is written by the quantization kernel itself, the
                   weight (and its scales, bias) are padded per call, which only happens for
                   odd test shapes: every Wan width is a multiple of 16.
  ``"emulate"``    the same maths in fp32 with plain matmuls
                   (:func:`~wildactor_kernels.quant.reference.fp8_linear_emulated`): any device,
                   used on CPU and wherever rowwise ``_scaled_mm`` is missing.

``gemm="auto"`` picks ``"scaled_mm"`` on CUDA devices of compute capability >= 8.9 and
``"emulate"`` elsewhere; that choice (and any run-time fallback after ``_scaled_mm`` raised) is
logged with ``logger.warning`` and returned by :func:`resolve_fp8_gemm`, never silent.

Gradient: the base weight is frozen (FP8 codes have no gradient); ``dL/dx = dL/dy @ W_deq``
with the dequantized weight (straight-through over the activation rounding), ``dL/db`` when the
bias requires grad. This is what QLoRA-style training of adapters above an FP8 base needs.
"""

from __future__ import annotations

import logging
import math

import torch

from .._utils import warn_once
from .._validate import check_fp8_linear_args
from .op import per_token_quant_fp8
from .reference import FP8_DTYPE, _round_up, dequantize_fp8, fp8_linear_emulated

logger = logging.getLogger("wildactor_kernels")

GEMMS = ("auto", "scaled_mm", "emulate")
GEMM_PATHS = ("scaled_mm", "emulate")
_SCALED_MM_ALIGN = 16
def resolve_fp8_gemm(gemm: str, device: torch.device | str) -> tuple[str, str | None]:
    """Map ``gemm`` to a concrete path for ``device``.

    Returns:
        ``(path, reason)``: ``path`` in :data:`GEMM_PATHS`; ``reason`` is None when the request
        was honoured as the fast path, else a sentence saying why the emulated path runs.
    """
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    device = torch.device(device)
    if gemm == "emulate":
        return "emulate", "emulation requested (gemm='emulate')"
    if gemm == "scaled_mm":
        return "scaled_mm", None
    if device.type != "cuda":
        return "emulate", (f"no FP8 tensor cores on device type {device.type!r}: rowwise torch._scaled_mm "
                           "replaced by an emulated fp32 matmul of the FP8 codes")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return "emulate", (f"CUDA capability {cap[0]}.{cap[1]} < 8.9 has no FP8 GEMM: emulated fp32 matmul "
                           "of the FP8 codes")
    return "scaled_mm", None


def scaled_mm_rowwise(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, n: int, use_fast_accum: bool,
                      fuse_bias: bool = True) -> torch.Tensor:
    """The ``"scaled_mm"`` GEMM alone, on operands already quantized: rowwise ``torch._scaled_mm``.

    Args:
        x_q, x_scale: ``[M, K_pad]`` float8_e4m3fn and ``[M, 1]`` fp32, as
            ``per_token_quant_fp8(x, pad_to=16)`` returns them (K zero-padded to 16).
        w_q, w_scale: ``[N, K]`` float8_e4m3fn and ``[N, 1]`` fp32 (padded here when needed).
        bias: ``[N]`` or None; n: the output width ``N``.
        use_fast_accum: ``_scaled_mm``'s fast accumulation; fuse_bias: add the bias in the GEMM.
    Returns:
        ``[M, N]`` bf16.
    """
    k_pad = x_q.shape[1]
    n_pad = _round_up(n, _SCALED_MM_ALIGN)
    if w_q.shape[1] != k_pad or n_pad != n:
        w_p = w_q.new_zeros(n_pad, k_pad)
        w_p[:n, : w_q.shape[1]] = w_q
        s_p = w_scale.new_ones(n_pad, 1)
        s_p[:n] = w_scale
        w_q, w_scale = w_p, s_p
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(n_pad - n)])
    scale_b = w_scale.reshape(1, -1).float().contiguous()
    b = bias.to(torch.bfloat16) if (bias is not None and fuse_bias) else None
    y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale.contiguous(), scale_b=scale_b, bias=b,
                         out_dtype=torch.bfloat16, use_fast_accum=use_fast_accum)
    if bias is not None and not fuse_bias:
        y = y + bias.to(y.dtype)
    return y[:, :n] if n_pad != n else y


def fp8_gemm(x2: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
             path: str, act_backend: str = "auto", use_fast_accum: bool = True,
             fuse_bias: bool = True) -> torch.Tensor:
    """Forward maths on a 2-D input ``x2 [M, K]`` -> ``[M, N]`` in ``x2.dtype`` (no autograd)."""
    n = w_q.shape[0]
    if path == "scaled_mm":
        x_q, x_scale = per_token_quant_fp8(x2, pad_to=_SCALED_MM_ALIGN, backend=act_backend)
        y = scaled_mm_rowwise(x_q, x_scale, w_q, w_scale, bias, n, use_fast_accum, fuse_bias)
        return y.to(x2.dtype)
    if path == "emulate":
        x_q, x_scale = per_token_quant_fp8(x2, backend=act_backend)
        return fp8_linear_emulated(x_q, x_scale, w_q, w_scale, bias, x2.dtype)
    raise ValueError(f"path must be one of {GEMM_PATHS}, got {path!r}")


class Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_q, w_scale, bias, path, act_backend, use_fast_accum, fuse_bias):
        lead = x.shape[:-1]
        # math.prod, not -1: K or the batch may be 0
        y = fp8_gemm(x.reshape(math.prod(lead), x.shape[-1]), w_q, w_scale, bias, path, act_backend,
                     use_fast_accum, fuse_bias)
        ctx.save_for_backward(w_q, w_scale)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return y.reshape(*lead, w_q.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        w_q, w_scale = ctx.saved_tensors
        grad_x = grad_y @ dequantize_fp8(w_q, w_scale, grad_y.dtype) if ctx.needs_input_grad[0] else None
        n = grad_y.shape[-1]
        grad_b = grad_y.reshape(math.prod(grad_y.shape[:-1]), n).sum(0) if ctx.bias_grad else None
        return grad_x, None, None, grad_b, None, None, None, None


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, *, gemm: str = "auto", act_backend: str = "auto",
               use_fast_accum: bool = True) -> torch.Tensor:
    """FP8 linear layer ``y ~ x W^T + b`` (see the module docstring for the paths).

    Args:
        x: ``[..., K]`` fp32/bf16/fp16.
        weight_fp8: ``[N, K]`` float8_e4m3fn; weight_scale: ``[N, 1]`` fp32 (per output channel).
        bias: ``[N]`` or None.
        gemm: ``"auto" | "scaled_mm" | "emulate"``; act_backend: backend of the per-token
            activation quantization (``"auto" | "triton" | "reference"``).
        use_fast_accum: ``_scaled_mm``'s fast accumulation (inference default, as torchao).
    Returns:
        ``[..., N]`` in ``x.dtype``; differentiable in ``x`` (and ``bias``).
    """
    check_fp8_linear_args(x, weight_fp8, weight_scale, bias, use_fast_accum)
    if weight_fp8.dtype != FP8_DTYPE:
        raise TypeError(f"weight_fp8 must be float8_e4m3fn, got {weight_fp8.dtype}")
    if weight_fp8.ndim != 2 or x.shape[-1] != weight_fp8.shape[1]:
        raise ValueError(f"x [..., K] and weight_fp8 [N, K] disagree: {tuple(x.shape)} vs "
                         f"{tuple(weight_fp8.shape)}")
    if tuple(weight_scale.shape) != (weight_fp8.shape[0], 1):
        raise ValueError(f"weight_scale must have shape [N, 1] = [{weight_fp8.shape[0]}, 1], got "
                         f"{tuple(weight_scale.shape)}")
    path, reason = resolve_fp8_gemm(gemm, x.device)
    if reason is not None and gemm == "auto":
        warn_once(f"fp8_linear: {reason}")
    return Fp8LinearFn.apply(x, weight_fp8, weight_scale, bias, path, act_backend, use_fast_accum, True)
