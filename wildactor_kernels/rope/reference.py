"""Plain-PyTorch I-RoPE: the spec in code, the CPU path and the ground truth of the kernels.

Rotation of interleaved pairs ``(x0, x1) -> (x0*cos - x1*sin, x0*sin + x1*cos)`` in fp32, with
``cos, sin: [N, D//2]`` broadcast over batch and heads of ``x: [B, N, H, D]``.
"""

from __future__ import annotations

import torch


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, N, H, D]`` by ``cos, sin [N, D//2]``; fp32 maths, result in ``x.dtype``."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos.float()[None, :, None, :]
    s = sin.float()[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


def rmsnorm_across_heads_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Wan's q/k RMSNorm over the whole ``H*D`` feature of each token (diffusers ``RMSNorm``).

    ``x [B, N, H, D]``, ``weight [H*D]`` or None. Statistics in fp32; the result has ``x.dtype``.
    """
    b, n, h, d = x.shape
    xf = x.reshape(b, n, h * d).float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        xf = xf * weight.float()
    return xf.to(x.dtype).reshape(b, n, h, d)


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm across heads, then I-RoPE, for q and k (the prologue of self-attention)."""
    qn = rmsnorm_across_heads_ref(q, q_weight, eps)
    kn = rmsnorm_across_heads_ref(k, k_weight, eps)
    return apply_rope_ref(qn, cos, sin), apply_rope_ref(kn, cos, sin)
