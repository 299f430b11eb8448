"""The three collectives sequence parallelism uses, differentiable and counted.

Each is a thin ``torch.autograd.Function`` around one torch.distributed call (no transport of
our own):

- :func:`all_to_all`: ``dist.all_to_all_single`` (Ulysses: sequence shards <-> head shards);
  its backward is the inverse all-to-all.
- :func:`ring_shift`: one ``dist.batch_isend_irecv`` pair (ring: send to the next rank, receive
  from the previous one); its backward shifts the gradient the other way. Without autograd,
  :func:`ring_shift_start` starts the same exchange and returns at once, so the next K/V block
  travels while the current one is computed.
- :func:`gather_output`: ``dist.all_gather_single`` (``all_gather_into_tensor`` before torch
  2.13) of every rank's piece of the output; every rank computes the same loss from the same
  gathered output, so the backward keeps this rank's slice of the gradient and sends nothing.

:func:`count_communication` records the payload each call sends from this rank, by kind and
pass: an all-to-all sends ``(P-1)/P`` of its input, a ring shift its whole tensor, an all-gather
its piece to each of the ``P-1`` others (the ring all-gather's traffic per rank).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["CommCounter", "count_communication", "all_to_all", "ring_shift", "ring_shift_start",
           "gather_output", "gather_ints"]


class CommCounter:
    """Bytes sent by this rank and number of calls, keyed by ``(pass, kind)`` with pass
    ``"forward"`` or ``"backward"`` and kind ``"all_to_all" | "p2p" | "all_gather" | "check"``
    (``"check"``: the few bytes of :func:`gather_ints`, the input-shape agreement of each call)."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, phase: str, kind: str, nbytes: int) -> None:
        self.bytes[(phase, kind)] += int(nbytes)
        self.calls[(phase, kind)] += 1

    def total(self, phase: str = "forward") -> int:
        return sum(v for (p, _), v in self.bytes.items() if p == phase)

    def as_dict(self) -> dict[str, int]:
        return {f"{p}/{k}": v for (p, k), v in sorted(self.bytes.items())}

    def __repr__(self) -> str:
        return f"CommCounter({self.as_dict()})"


_ACTIVE: list[CommCounter] = []


@contextlib.contextmanager
def count_communication() -> Iterator[CommCounter]:
    """Count what the collectives of this module send from this rank inside the ``with`` block."""
    c = CommCounter()
    _ACTIVE.append(c)
    try:
        yield c
    finally:
        _ACTIVE.remove(c)


def _record(phase: str, kind: str, nbytes: int) -> None:
    for c in _ACTIVE:
        c.add(phase, kind, nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------- all-to-all
def _a2a(x: torch.Tensor, group, scatter_dim: int, gather_dim: int, phase: str) -> torch.Tensor:
    p = dist.get_world_size(group)
    inp = torch.stack(x.chunk(p, dim=scatter_dim), dim=0).contiguous()   # piece j goes to rank j
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp, group=group)
    _record(phase, "all_to_all", _nbytes(inp) * (p - 1) // p)
    return torch.cat(out.unbind(0), dim=gather_dim)                       # in source-rank order


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _a2a(x, group, scatter_dim, gather_dim, "forward")

    @staticmethod
    def backward(ctx, g):
        s, t = ctx.dims
        return _a2a(g, ctx.group, t, s, "backward"), None, None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` in ``P`` pieces along ``scatter_dim`` (piece ``j`` to group rank ``j``) and join the
    received pieces along ``gather_dim`` in rank order. ``x.shape[scatter_dim]`` must divide by ``P``."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


# --------------------------------------------------------------------------- ring
def _shift(x: torch.Tensor, send_to: int, recv_from: int, group, phase: str) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, send_to, group), dist.P2POp(dist.irecv, out, recv_from, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    _record(phase, "p2p", _nbytes(x))
    return out


class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_to, recv_from, group):
        ctx.peers, ctx.group = (send_to, recv_from), group
        return _shift(x, send_to, recv_from, group, "forward")

    @staticmethod
    def backward(ctx, g):
        send_to, recv_from = ctx.peers
        return _shift(g, recv_from, send_to, ctx.group, "backward"), None, None, None


def ring_shift(x: torch.Tensor, send_to: int, recv_from: int, group=None) -> torch.Tensor:
    """Send ``x`` to global rank ``send_to`` and return the tensor received from ``recv_from``."""
    return _RingShift.apply(x, send_to, recv_from, group)


class PendingShift:
    """A ring shift in flight (:func:`ring_shift_start`); :meth:`wait` returns the received tensor."""

    def __init__(self, x: torch.Tensor, send_to: int, recv_from: int, group) -> None:
        self._x = x.contiguous()  # kept alive until the send completes
        self._out = torch.empty_like(self._x)
        ops = [dist.P2POp(dist.isend, self._x, send_to, group),
               dist.P2POp(dist.irecv, self._out, recv_from, group)]
        self._reqs = dist.batch_isend_irecv(ops)
        _record("forward", "p2p", _nbytes(self._x))

    def wait(self) -> torch.Tensor:
        for req in self._reqs:
            req.wait()
        return self._out


def ring_shift_start(x: torch.Tensor, send_to: int, recv_from: int, group=None) -> PendingShift:
    """Start a ring shift without waiting for it, so compute can overlap the transfer. Not
    differentiable: for tensors that need no gradient (inference); :func:`ring_shift` otherwise."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("ring_shift_start is not differentiable; use ring_shift for tensors that "
                           "need a gradient")
    return PendingShift(x, send_to, recv_from, group)


# --------------------------------------------------------------------------- output gather
# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns)
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, rank):
        p = dist.get_world_size(group)
        x = x.contiguous()
        out = torch.empty((p * x.numel(),), dtype=x.dtype, device=x.device)
        _ALL_GATHER(out, x.flatten(), group=group)
        _record("forward", "all_gather", _nbytes(x) * (p - 1))
        ctx.rank = rank
        return out.view(p, *x.shape)

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rank], None, None


def gather_output(x: torch.Tensor, group, rank: int) -> torch.Tensor:
    """``[P, *x.shape]``: every rank's ``x`` by group rank (``rank`` is this rank's index)."""
    if dist.get_world_size(group) == 1:
        return x[None]
    return _GatherOutput.apply(x, group, rank)


def gather_ints(values: list[int], group, device) -> list[list[int]]:
    """Every member's ``values`` (the same count on each), by group rank: one small all-gather."""
    p = dist.get_world_size(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    if p == 1:
        return [mine.tolist()]
    out = torch.empty((p * mine.numel(),), dtype=torch.int64, device=device)
    _ALL_GATHER(out, mine, group=group)
    _record("forward", "check", _nbytes(mine) * (p - 1))
    return out.view(p, -1).tolist()
