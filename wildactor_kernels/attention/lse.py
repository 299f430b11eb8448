"""Attention that also returns its log-sum-exp, and the merge of partial results (ring attention).

Ring attention (docs/parallel.md) splits the keys of one softmax into blocks that live on
different ranks. Each block gives a partial output ``o_i = softmax(s q k_i^T) v_i`` and the
log-sum-exp of its scores ``lse_i = log sum_j exp(s q.k_ij)``. The full result is

    lse = log sum_i exp(lse_i),    o = sum_i exp(lse_i - lse) o_i,

which is what :func:`merge_attention` computes. A block with no keys has ``lse = -inf`` and
weight 0, so padding a sequence to a multiple of the ring size and slicing the padding off each
block is exact.

``backend="triton"`` (and ``"auto"`` on CUDA) runs our attention kernel through its
log-sum-exp entry (``kernels.cached_asym_attention_lse_triton``: keys in one range, gradients
through both outputs); ``"reference"`` (and ``"auto"`` on the CPU) is the plain-PyTorch maths
below. With ``"auto"``, fp64 inputs take the reference (the kernels compute in fp32).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .._utils import check_tensor, resolve_backend

__all__ = ["attention_with_lse", "merge_attention"]

#: score elements per chunk of queries in the reference (bounds the ``[B, H, q, Nk]`` temporary)
_CHUNK_ELEMENTS = 1 << 26


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Full (unmasked) attention of ``q`` over ``k, v`` and the log-sum-exp of the scores.

    Args:
        q: ``[B, Nq, H, D]``.
        k, v: ``[B, Nk, H, D]`` (``Nk`` may be 0: then ``o`` is zeros and ``lse`` is ``-inf``).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (Triton on CUDA, the reference on the CPU), ``"triton"`` or
            ``"reference"``.
    Returns:
        ``(o, lse)``: ``o [B, Nq, H, D]`` in the dtype of ``q``; ``lse [B, Nq, H]`` in fp32
        (fp64 for fp64 inputs), natural log, scale included. Differentiable in q, k, v through
        both outputs.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, floating=True)
    b, nq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
        raise ValueError(f"k and v must have shape [B, Nk, H, D] = [{b}, Nk, {h}, {d}], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if resolve_backend(backend, q) == "triton":
        if q.dtype != torch.float64:
            from .kernels import cached_asym_attention_lse_triton

            return cached_asym_attention_lse_triton(q, k, v, scale=scale)
        if backend == "triton":
            raise TypeError("attention_with_lse(backend='triton'): q is float64; the kernels take "
                            "fp32/fp16/bf16 (use backend='reference' or 'auto' for float64)")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cd = _compute_dtype(q.dtype)
    nk = k.shape[1]
    if nk == 0 or nq == 0:
        o = torch.zeros_like(q)
        lse = torch.full((b, nq, h), float("-inf"), dtype=cd, device=q.device)
        return o, lse
    qf = q.to(cd).transpose(1, 2)                  # [B, H, Nq, D]
    kf = k.to(cd).transpose(1, 2)
    vf = v.to(cd).transpose(1, 2)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * h * nk))
    outs, lses = [], []
    for i in range(0, nq, step):
        s = (qf[:, :, i:i + step] @ kf.transpose(-1, -2)) * scale   # [B, H, q, Nk]
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse[..., None]) @ vf)
        lses.append(lse)
    o = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return o, torch.cat(lses, dim=2).transpose(1, 2)


def merge_attention(parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Combine partial attention results over disjoint key blocks into the full softmax result.

    Args:
        parts: ``[(o_i, lse_i), ...]`` as returned by :func:`attention_with_lse` for the same
            queries: ``o_i [B, Nq, H, D]``, ``lse_i [B, Nq, H]``.
        out_dtype: dtype of the result (default: that of ``o_0``).
    Returns:
        ``o [B, Nq, H, D]``. Rows whose every block is empty come out as zeros.
    """
    if not parts:
        raise ValueError("merge_attention needs at least one (o, lse) pair")
    out_dtype = parts[0][0].dtype if out_dtype is None else out_dtype
    if len(parts) == 1:
        return parts[0][0].to(out_dtype)
    lse = torch.stack([p[1] for p in parts])                         # [P, B, Nq, H]
    top = lse.amax(dim=0)
    # rows with no key anywhere keep weight 0 (not NaN): shift them by 0 instead of -inf
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    w = torch.exp(lse - top)                                         # [P, B, Nq, H], -inf -> 0
    den = w.sum(dim=0)
    den = torch.where(den > 0, den, torch.ones_like(den))
    acc = sum(w[i, ..., None] * parts[i][0].to(w.dtype) for i in range(len(parts)))
    return (acc / den[..., None]).to(out_dtype)
