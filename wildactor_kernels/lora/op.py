"""Public reference-only LoRA linear: input checks, then the Triton GEMMs or the reference."""

from __future__ import annotations

import torch

from .._utils import (
    autocast_active,
    check_dtypes,
    check_num_video,
    check_same_device,
    check_tensor,
    resolve_backend,
)
from .._validate import check_lora_scale
from .reference import ref_lora_linear_ref


def ref_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, num_video: int,
                    backend: str = "auto") -> torch.Tensor:
    """Linear layer whose low-rank adapter acts on the reference rows only.

    Args:
        x: ``[B, N, Din]``; rows ``n < num_video`` of every sample are video rows.
        weight: ``[Dout, Din]``; bias: ``[Dout]`` or None.
        lora_a: ``[r, Din]`` (PEFT ``lora_A``); lora_b: ``[Dout, r]`` (PEFT ``lora_B``).
        scale: ``alpha / r``.
        num_video: ``Nv`` in ``[0, N]``.
    Dtypes (one rule on both backends): weight, bias, lora_a and lora_b have x's dtype, else a
    TypeError naming the argument. Under autocast on x's device they are computed in the
    autocast dtype instead, as ``F.linear`` does.
    Returns:
        ``[B, N, Dout]`` in x's dtype. Differentiable in x, A, B, and W, b when they need grad.
    """
    scale = check_lora_scale(scale)
    check_tensor("x", x, ndim=3, floating=True)
    check_tensor("weight", weight, ndim=2, floating=True)
    check_tensor("lora_a", lora_a, ndim=2, floating=True)
    check_tensor("lora_b", lora_b, ndim=2, floating=True)
    din, dout, r = x.shape[-1], weight.shape[0], lora_a.shape[0]
    if weight.shape[1] != din:
        raise ValueError(f"weight must have shape [Dout, Din] with Din = {din}, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        if bias.shape[0] != dout:
            raise ValueError(f"bias must have shape [Dout] = [{dout}], got {tuple(bias.shape)}")
    if lora_a.shape[1] != din:
        raise ValueError(f"lora_a must have shape [r, Din] = [r, {din}], got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (dout, r):
        raise ValueError(f"lora_b must have shape [Dout, r] = [{dout}, {r}], got {tuple(lora_b.shape)}")
    if r < 1:
        raise ValueError(f"lora_a and lora_b must have rank r >= 1 (lora_a [r, Din], lora_b [Dout, r]), "
                         f"got lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)}")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    num_video = check_num_video(num_video, x.shape[1])
    check_same_device(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    if not autocast_active(x.device):
        check_dtypes("ref_lora_linear", x.dtype, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    if resolve_backend(backend, x) == "reference":
        return ref_lora_linear_ref(x, weight, bias, lora_a, lora_b, float(scale), num_video)
    from .kernels import ref_lora_linear_triton

    return ref_lora_linear_triton(x, weight, bias, lora_a, lora_b, float(scale), num_video)
