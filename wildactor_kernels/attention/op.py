"""Public asymmetric-attention ops: input checks, then Triton kernels or the reference."""

from __future__ import annotations

import contextlib

import torch

from .._utils import (
    ROPE_MODES,
    autocast_active,
    check_num_video,
    check_qkv,
    check_ref_kv,
    check_rope_tables,
    check_same_device,
    resolve_backend,
)
from .._validate import check_attention_scale
from . import fp8_op
from .reference import asym_attention_ref, cached_asym_attention_ref

__all__ = ["asym_attention", "cached_asym_attention", "ROPE_MODES"]


def _under_autocast(device: torch.device, *ts: torch.Tensor) -> tuple[list[torch.Tensor], object]:
    """One autocast rule on every backend, as ``F.scaled_dot_product_attention``: under autocast
    on the inputs' device the tensors are cast to the autocast dtype (differentiably: gradients
    come back in the callers' dtypes) and the backend runs with autocast off, so the reference
    and the Triton kernels see the same plain inputs and return that dtype (the Triton kernels
    used to ignore autocast and the reference to follow it)."""
    if not autocast_active(device):
        return list(ts), contextlib.nullcontext()
    dt = torch.get_autocast_dtype(device.type)
    return [t.to(dt) for t in ts], torch.autocast(device.type, enabled=False)


def _check_rope_mode(rope_mode: object) -> None:
    if rope_mode is not None and rope_mode not in ROPE_MODES:
        raise ValueError(f"rope_mode must be one of {ROPE_MODES} or None, got {rope_mode!r}")


def asym_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_video: int,
                   cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                   scale: float | None = None, backend: str = "auto",
                   rope_mode: str | None = None, precision: str | None = None) -> torch.Tensor:
    """Asymmetric identity-preserving attention (AIPA).

    Video queries (the first ``num_video`` tokens) attend to all N keys; reference queries
    attend to the reference keys only.

    Args:
        q, k, v: ``[B, N, H, D]``, one float dtype, tokens video-first.
        num_video: ``Nv`` in ``[0, N]``.
        cos, sin: optional float ``[N, D//2]``: when given, q and k are rotated first.
            Constants: a table that requires grad raises (no backend differentiates them).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto" | "triton" | "reference"``.
        rope_mode: where the Triton backend rotates q and k when cos/sin are given:
            ``"fused"`` inside the attention kernels, ``"prologue"`` in a separate rotation pass
            first (``apply_rope``), or None for the library default
            (``wildactor_kernels.attention.kernels.ROPE_MODE``). Both give the same result up to
            rounding; it only changes the speed. Validated on every backend, ignored by the
            reference backend (and when cos/sin are None).
        precision: None (the input dtype) or ``"fp8"``: 8-bit attention (``fp8_reference.py``),
            forward only: a gradient through it raises.
    Returns:
        ``[B, N, H, D]`` in the dtype of q. Differentiable in q, k, v (``precision=None``).
        Under autocast on q's device, as ``F.scaled_dot_product_attention`` (both backends):
        q, k, v are cast to the autocast dtype, which the output then has.
    """
    scale = check_attention_scale(scale)
    check_qkv(("q", "k", "v"), q, k, v)
    b, n, h, d = q.shape
    num_video = check_num_video(num_video, n)
    check_rope_tables(cos, sin, n, d)
    check_same_device(q=q, k=k, v=v, cos=cos, sin=sin)
    _check_rope_mode(rope_mode)
    if fp8_op.check_precision(precision):
        return fp8_op.asym_attention_fp8(q, k, v, num_video, cos, sin, scale, backend)
    (q, k, v), ctx = _under_autocast(q.device, q, k, v)
    with ctx:
        if resolve_backend(backend, q) == "reference":
            return asym_attention_ref(q, k, v, num_video, cos, sin, scale)
        if backend == "auto":  # on CUDA: the measured choice of dispatch.py (docs/design.md §9)
            from .dispatch import asym_attention_auto

            return asym_attention_auto(q, k, v, num_video, cos, sin, scale, rope_mode)
        from .kernels import asym_attention_triton

        return asym_attention_triton(q, k, v, num_video, cos, sin, scale, rope_mode=rope_mode)


def cached_asym_attention(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor,
                          ref_k: torch.Tensor, ref_v: torch.Tensor,
                          cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                          scale: float | None = None, backend: str = "auto",
                          rope_mode: str | None = None, precision: str | None = None) -> torch.Tensor:
    """Video queries over ``[video K/V; cached reference K/V]``, without concatenating them.

    Args:
        q_v, k_v, v_v: ``[B, Nv, H, D]`` video projections (cos/sin ``[Nv, D//2]`` rotate q_v, k_v).
        ref_k, ref_v: ``[B, Nr, H, D]`` cached reference keys (already rotated) and values.
            Any float dtype on both backends: they are cast to q_v's dtype (a cache may be
            kept in another precision); q_v, k_v, v_v share one dtype.
        scale, backend, rope_mode: as in :func:`asym_attention` (``rope_mode`` concerns the
            rotation of q_v and k_v only; the cached keys are never rotated again).
        precision: as in :func:`asym_attention`. With ``"fp8"``, ``ref_k`` may be a
            ``QuantizedKV`` from ``quantize_ref_kv(ref_k, ref_v)`` (then ``ref_v=None``).
    Returns:
        ``[B, Nv, H, D]`` in the dtype of q_v.
    """
    scale = check_attention_scale(scale)
    if fp8_op.check_precision(precision, ref_k):
        _check_rope_mode(rope_mode)
        return fp8_op.cached_asym_attention_fp8(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale, backend)
    check_qkv(("q_v", "k_v", "v_v"), q_v, k_v, v_v)
    check_ref_kv(ref_k, ref_v, q_v.shape)
    b, nv, h, d = q_v.shape
    check_rope_tables(cos, sin, nv, d)
    check_same_device(q_v=q_v, k_v=k_v, v_v=v_v, ref_k=ref_k, ref_v=ref_v, cos=cos, sin=sin)
    _check_rope_mode(rope_mode)
    (q_v, k_v, v_v, ref_k, ref_v), ctx = _under_autocast(q_v.device, q_v, k_v, v_v, ref_k, ref_v)
    with ctx:
        if resolve_backend(backend, q_v) == "reference":
            return cached_asym_attention_ref(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale)
        if backend == "auto":  # on CUDA: the measured choice of dispatch.py (docs/design.md §9)
            from .dispatch import cached_asym_attention_auto

            return cached_asym_attention_auto(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale, rope_mode)
        from .kernels import cached_asym_attention_triton

        return cached_asym_attention_triton(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale,
                                            rope_mode=rope_mode)
