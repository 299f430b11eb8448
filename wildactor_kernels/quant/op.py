"""Public per-token FP8 quantization: input checks, then the Triton kernel or the reference."""

from __future__ import annotations

import torch

from .._utils import SUPPORTED_DTYPES, check_tensor, resolve_backend
from .._validate import check_pad_to
from .reference import per_token_quant_fp8_ref


def per_token_quant_fp8(x: torch.Tensor, pad_to: int = 1,
                        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) float8_e4m3fn quantization.

    Args:
        x: ``[..., K]`` float (fp32, bf16 or fp16), any strides; each row over the last dim is
            one token with its own scale.
        pad_to: round the last dim of the codes up to a multiple of this (16 for
            ``torch._scaled_mm``); the padding columns are zero codes.
        backend: ``"auto"`` (Triton on CUDA, reference on CPU), ``"triton"``, ``"reference"``.
    Returns:
        ``(q, scale)``: ``q [..., K_pad]`` float8_e4m3fn contiguous, ``scale [..., 1]`` fp32, with
        ``x ~ q[..., :K].float() * scale``. Not differentiable (rounding); the FP8 linear defines
        its own gradient.
    """
    pad_to = check_pad_to(pad_to)
    check_tensor("x", x, floating=True)
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be fp32, bf16 or fp16, got {x.dtype}")
    if not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive int, got {pad_to!r}")
    x = x.detach()
    if resolve_backend(backend, x) == "reference":
        return per_token_quant_fp8_ref(x, pad_to)
    from .kernels import per_token_quant_fp8_triton

    # the custom op runs the Triton launcher; torch.compile sees one opaque node with a fake kernel
    return per_token_quant_fp8_triton(x, pad_to)
