"""The I-RoPE table cache of the PyTorch model: a small, thread-safe LRU.

Every forward needs the ``cos, sin`` tables of its token layout; a sampler calls the model with
the same layout for every step, so the tables are built once per layout and device.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

import wildactor_kernels as wk
from wildactor_kernels import TokenLayout

from .config import WildActorConfig

__all__ = ["RopeTableCache", "model_positions"]


class RopeTableCache:
    """LRU of I-RoPE tables keyed by layout, device and the config's RoPE fields.

    - Thread-safe: the LRU bookkeeping runs under a lock (a model shared by threads, e.g. a
      server answering requests in parallel, neither raises nor grows past ``max_entries``).
      Tables are built outside the lock; two threads missing on the same key at once both
      build it and the first insert wins.
    - Under ``torch.compile`` the cache is read but never written (and the lock is not taken):
      dynamo cannot replay a dict insert keyed by a ``TokenLayout`` built inside the compiled
      region without a graph break.
    - ``copy.deepcopy`` / pickling give an empty cache (a lock cannot be copied; tables are cheap).
    """

    def __init__(self, max_entries: int = 32):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        self._lru: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()

    def __deepcopy__(self, memo) -> RopeTableCache:
        return RopeTableCache(self.max_entries)

    def __getstate__(self) -> dict:
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_entries"])

    def get(self, cfg: WildActorConfig, layout: TokenLayout,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin [N, D//2]`` of ``layout`` on ``device`` (built on a miss)."""
        key = (layout, str(device), cfg.face_offset, cfg.body_offset, cfg.spatial_shift, cfg.ref_time,
               cfg.theta, cfg.head_dim)
        if torch.compiler.is_compiling():
            hit = self._lru.get(key)
            return hit if hit is not None else _build(cfg, layout, device)
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                return hit
        hit = _build(cfg, layout, device)
        with self._lock:
            hit = self._lru.setdefault(key, hit)
            self._lru.move_to_end(key)
            while len(self._lru) > self.max_entries:
                self._lru.popitem(last=False)
        return hit


def model_positions(cfg: WildActorConfig, layout: TokenLayout) -> torch.Tensor:
    """Integer ``(t, y, x)`` positions ``[N, 3]`` of ``layout`` under ``cfg``'s I-RoPE settings.

    :func:`wildactor_kernels.irope_positions` with the config's offsets and spatial shift; with
    ``cfg.ref_time == "before"`` (Stand-In's layout) every reference row moves to ``t = -1``.
    """
    pos = wk.irope_positions(layout, face_offset=cfg.face_offset, body_offset=cfg.body_offset,
                             spatial_shift=cfg.spatial_shift)
    if cfg.ref_time == "before":
        pos[layout.num_video:, 0] = -1
    return pos


def _build(cfg: WildActorConfig, layout: TokenLayout,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = model_positions(cfg, layout)
    cos, sin = wk.rope_cos_sin(pos, cfg.head_dim, theta=cfg.theta)
    return cos.to(device), sin.to(device)
