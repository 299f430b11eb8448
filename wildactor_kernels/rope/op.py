"""Public I-RoPE ops: input checks, then dispatch to the Triton kernels or the reference."""

from __future__ import annotations

import torch

from .._utils import check_head_dim, check_rope_tables, check_same_device, check_tensor, resolve_backend
from .._validate import check_eps
from .reference import apply_rope_ref, qk_norm_rope_ref


def _check_x(name: str, x: torch.Tensor) -> None:
    check_tensor(name, x, ndim=4, floating=True)
    check_head_dim(name, x.shape[-1])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` by the I-RoPE tables.

    Args:
        x: ``[B, N, H, D]`` any float dtype (D even, >= 8).
        cos, sin: float ``[N, D//2]`` from :func:`wildactor_kernels.rope_cos_sin`.
            Constants: a table that requires grad raises (no backend differentiates them).
        backend: ``"auto" | "triton" | "reference"``.
    Returns:
        ``[B, N, H, D]`` in ``x.dtype`` (maths in fp32). Differentiable in ``x``.
    """
    _check_x("x", x)
    check_rope_tables(cos, sin, x.shape[1], x.shape[-1])
    if cos is None:
        raise ValueError("cos and sin are required")
    check_same_device(x=x, cos=cos, sin=sin)
    if resolve_backend(backend, x) == "reference":
        return apply_rope_ref(x, cos, sin)
    from .kernels import apply_rope_triton

    return apply_rope_triton(x, cos, sin)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float = 1e-6, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's q/k RMSNorm across heads (over ``H*D``, with weight) followed by I-RoPE.

    Args:
        q, k: ``[B, N, H, D]`` (same shape).
        q_weight, k_weight: ``[H*D]`` norm weights, or None for no affine weight.
        cos, sin: ``[N, D//2]`` float tables.
            Constants: a table that requires grad raises (no backend differentiates them).
    Returns:
        ``(q', k')`` with the shapes and dtypes of ``q, k``. Differentiable in q, k and weights.
    """
    eps = check_eps(eps)
    _check_x("q", q)
    _check_x("k", k)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    hd = q.shape[2] * q.shape[3]
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None:
            check_tensor(name, w, ndim=1, floating=True)
            if w.shape[0] != hd:
                raise ValueError(f"{name} must have shape [H*D] = [{hd}], got {tuple(w.shape)}")
    check_rope_tables(cos, sin, q.shape[1], q.shape[-1])
    if cos is None:
        raise ValueError("cos and sin are required")
    check_same_device(q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin)
    if resolve_backend(backend, q) == "reference":
        return qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, eps)
    from .kernels import qk_norm_rope_triton

    return qk_norm_rope_triton(q, k, q_weight, k_weight, cos, sin, eps)
