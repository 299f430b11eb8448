"""Plain-PyTorch asymmetric attention (AIPA, docs/design.md §4): the spec in code and the CPU path.

With ``Nv`` video and ``Nr`` reference tokens (``N = Nv + Nr``), after rotating q and k:

- video queries attend over all ``N`` keys:       ``out[:, :Nv] = softmax(s q_v k^T) v``
- reference queries attend over reference keys:   ``out[:, Nv:] = softmax(s q_r k_r^T) v_r``

Each segment is one SDPA call (two calls, as Stand-In does), so no N x N mask is built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..rope.reference import apply_rope_ref


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA on flash-attn layout ``[B, N, H, D]``."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       scale=scale)
    return o.transpose(1, 2)


def _empty_like_graph(q: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """An empty output shaped like ``q`` that is still connected to every input, so that
    ``backward()`` gives zero-filled gradients of the inputs' shapes (as the Triton ops do)."""
    link = sum(t.sum() * 0 for t in (q, *inputs))
    return q.new_zeros(q.shape) + link.to(q.dtype)


def asym_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_video: int,
                       cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """``q, k, v [B, N, H, D]`` -> ``[B, N, H, D]``; cos/sin ``[N, D//2]`` rotate q and k first."""
    if cos is not None:
        q, k = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    nv, n = num_video, q.shape[1]
    outs = []
    if nv > 0:
        outs.append(_sdpa(q[:, :nv], k, v, scale))
    if n - nv > 0:
        outs.append(_sdpa(q[:, nv:], k[:, nv:], v[:, nv:], scale))
    if not outs:
        return _empty_like_graph(q, k, v)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def cached_asym_attention_ref(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor,
                              ref_k: torch.Tensor, ref_v: torch.Tensor,
                              cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                              scale: float | None = None) -> torch.Tensor:
    """Video queries over ``[k_v; ref_k]`` / ``[v_v; ref_v]``; the cache is already rotated."""
    if cos is not None:
        q_v, k_v = apply_rope_ref(q_v, cos, sin), apply_rope_ref(k_v, cos, sin)
    scale = 1.0 / math.sqrt(q_v.shape[-1]) if scale is None else float(scale)
    if q_v.shape[1] == 0:
        return _empty_like_graph(q_v, k_v, v_v, ref_k, ref_v)
    k = torch.cat([k_v, ref_k.to(k_v.dtype)], dim=1)
    v = torch.cat([v_v, ref_v.to(v_v.dtype)], dim=1)
    return _sdpa(q_v, k, v, scale)
