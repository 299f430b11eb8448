"""Self-attention over a sequence split across ranks: Ulysses, ring, or both (docs/parallel.md).

Each rank holds ``ns`` consecutive video tokens (shard ``s = r * U + u`` of the padded sequence of
``P * ns`` tokens, ``P = U * R``) with all ``H`` heads:

1. Ulysses (``U > 1``): one all-to-all turns the q/k/v shards ``[B, ns, H, D]`` into head shards
   ``[B, U * ns, H/U, D]`` covering ring chunk ``r`` (the ``U`` shards of one ring position are
   consecutive), and one all-to-all turns the output back.
2. Ring (``R > 1``): the K/V of ring chunk ``r`` travel around the ring; at step ``i`` this rank
   attends to chunk ``(r - i) mod R`` with :func:`attention_with_lse`, and the partial results
   merge by their log-sum-exp. Without autograd the next block is sent while the current one is
   computed; with autograd each shift is a differentiable exchange that completes first.
   Without a ring (``R = 1``) the rank holds the whole sequence for its heads and calls the
   library's attention op with the model's backend (on CUDA, ``"auto"`` picks a fast kernel).
3. Padding (``P * ns > Nv``) sits at the end of the sequence: keys past ``Nv`` are sliced off
   each block, so padded tokens are never attended to; padded query rows are dropped later.
4. References never need communication: the cached K/V (or, on the joint path, the reference
   rows every rank holds whole) are sliced to this rank's heads and read as one more key block.
   Reference rows of the joint path attend among themselves with all heads on every rank.

:func:`attend_override` installs this in place of ``SelfAttention.attend`` for one block call;
the block maths in ``wildactor.py`` is untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

import wildactor_kernels as wk
from wildactor_kernels.attention.lse import attention_with_lse, merge_attention

from .comm import all_to_all, ring_shift, ring_shift_start
from .mesh import ParallelMesh

Tensor = torch.Tensor


@dataclass(frozen=True)
class ShardPlan:
    """Where this rank's tokens sit in the video sequence.

    Attributes:
        num_video: ``Nv``, the real video tokens.
        shard: ``ns``, tokens per rank (``ceil(Nv / P)``); ``P * ns - Nv`` padding tokens at the end.
        mesh: the rank's :class:`ParallelMesh`.
    """

    num_video: int
    shard: int
    mesh: ParallelMesh

    @classmethod
    def make(cls, num_video: int, mesh: ParallelMesh) -> ShardPlan:
        p = mesh.config.seq
        return cls(num_video, -(-num_video // p), mesh)

    @property
    def padded(self) -> int:
        return self.shard * self.mesh.config.seq

    @property
    def local(self) -> slice:
        """This rank's rows of the padded sequence."""
        s = self.mesh.seq_rank * self.shard
        return slice(s, s + self.shard)

    def scatter(self, x: Tensor, dim: int = 1, fill: float = 0.0) -> Tensor:
        """This rank's shard of ``x`` (``Nv`` rows along ``dim``), padded with ``fill`` first."""
        pad = self.padded - x.shape[dim]
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_full(shape, fill)], dim=dim)
        return x.narrow(dim, self.local.start, self.shard)


def _head_slice(t: Tensor, plan: ShardPlan) -> Tensor:
    u, n = plan.mesh.ulysses_rank, plan.mesh.config.ulysses
    hs = t.shape[2] // n
    return t[:, :, u * hs:(u + 1) * hs]


def video_attention(q: Tensor, k: Tensor, v: Tensor, extra: tuple[Tensor, Tensor] | None,
                    plan: ShardPlan, backend: str) -> Tensor:
    """Attention of this rank's video queries over every video key and the ``extra`` (reference) keys.

    Args:
        q, k, v: ``[B, ns, H, D]``, this rank's shard (normed and rotated).
        extra: reference ``(k, v)`` ``[B, Nr, H, D]`` with all heads (every rank has them), or None.
    Returns:
        ``[B, ns, H, D]``; rows of padding tokens hold finite values that the caller drops.
    """
    cfg, pm = plan.mesh.config, plan.mesh
    U, R = cfg.ulysses, cfg.ring
    if U > 1:  # one all-to-all for q, k and v together: sequence shards -> head shards
        qkv = all_to_all(torch.stack([q, k, v]), pm.ulysses_group, scatter_dim=3, gather_dim=2)
        q, k, v = qkv.unbind(0)                              # [B, U*ns, H/U, D], ring chunk r
    if extra is not None:
        extra = (_head_slice(extra[0], plan), _head_slice(extra[1], plan))
    chunk = q.shape[1]
    if R == 1:
        nv = plan.num_video  # the whole sequence for these heads: the library op, padding sliced off
        if extra is not None:
            o = wk.cached_asym_attention(q[:, :nv], k[:, :nv], v[:, :nv], extra[0], extra[1], backend=backend)
        else:
            o = wk.asym_attention(q[:, :nv], k[:, :nv], v[:, :nv], nv, backend=backend)
        if nv < chunk:
            o = F.pad(o, (0, 0, 0, 0, 0, chunk - nv))
    else:
        parts, kv = [], torch.stack([k, v])
        # without autograd the next block is already on its way while this one is computed
        overlap = not (torch.is_grad_enabled() and kv.requires_grad)
        for i in range(R):
            src = (pm.ring_rank - i) % R
            valid = max(0, min(chunk, plan.num_video - src * chunk))   # padding is at the end
            pending = ring_shift_start(kv, pm.ring_next, pm.ring_prev) if overlap and i < R - 1 else None
            o_i, lse_i = attention_with_lse(q, kv[0, :, :valid], kv[1, :, :valid], backend=backend)
            if valid == 0 and not overlap:
                # an all-padding block gives zeros that do not depend on it; left out of the graph,
                # this rank would skip the backward of the shift that brought it while its ring
                # neighbours run theirs, and the ring would wait forever. An empty sum (exactly 0)
                # keeps the block in the graph.
                o_i = o_i + kv[:, :, :0].sum()
            parts.append((o_i, lse_i))
            if pending is not None:
                kv = pending.wait()
            elif i < R - 1:
                kv = ring_shift(kv, pm.ring_next, pm.ring_prev)
        if extra is not None:
            parts.append(attention_with_lse(q, extra[0], extra[1], backend=backend))
        o = merge_attention(parts, out_dtype=q.dtype)
    if U > 1:  # head shards -> sequence shards
        o = all_to_all(o, pm.ulysses_group, scatter_dim=1, gather_dim=2)
    return o


def make_attend(attn, plan: ShardPlan):
    """A replacement for ``attn.attend`` (``SelfAttention``) that runs on the sharded sequence.

    ``q, k, v`` hold this rank's ``ns`` video rows, followed on the joint path by every reference
    row; ``ref_kv`` is the cached reference K/V (all heads) on the cached path.
    """

    def attend(q: Tensor, k: Tensor, v: Tensor, num_video: int,
               ref_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        ns = num_video
        joint_refs = q.shape[1] > ns
        extra = ref_kv if ref_kv is not None else ((k[:, ns:], v[:, ns:]) if joint_refs else None)
        o = video_attention(q[:, :ns], k[:, :ns], v[:, :ns], extra, plan, attn.backend)
        if joint_refs:  # references read references only; all heads, on every rank alike
            o_ref = wk.asym_attention(q[:, ns:], k[:, ns:], v[:, ns:], 0, backend=attn.backend)
            o = torch.cat([o, o_ref], dim=1)
        return attn.to_out[0](o.flatten(2), num_video)

    return attend


@contextlib.contextmanager
def attend_override(attn, plan: ShardPlan) -> Iterator[None]:
    """Route ``attn.attend`` to the sharded attention for the duration of the block (an instance
    attribute shadows the method; removing it restores the single-process path)."""
    attn.attend = make_attend(attn, plan)
    try:
        yield
    finally:
        del attn.attend
