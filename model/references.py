"""References and the reference K/V cache (docs/design.md §6).

- :class:`Reference`: one reference image of the actor, as a VAE latent, tagged face/body.
- :class:`RefCache`: the per-layer reference keys/values, computed once per generation.
- :func:`bind_ref_cache`: a cache made ready for one denoising call (keys rotated for the video
  grid, batch expanded, device and dtype), memoised on the cache. The PyTorch model and the
  ONNX / TensorRT runners all bind caches through it, so a cache made by any of them serves all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

import wildactor_kernels as wk
from wildactor_kernels import REF_KINDS

from .config import WildActorConfig

__all__ = ["Reference", "RefCache", "bind_ref_cache", "rerotate_keys"]

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class Reference:
    """One reference image of the actor, as a VAE latent.

    Args:
        kind: ``"face"`` (a face crop) or ``"body"`` (a full-body view); picks the I-RoPE offset.
        latent: float ``[B, C, 1, h, w]`` (one latent frame; ``B`` equal to the video batch or 1,
            which broadcasts). ``h, w`` must be multiples of the spatial patch size.
    """

    kind: str
    latent: Tensor

    def __post_init__(self) -> None:
        if self.kind not in REF_KINDS:
            raise ValueError(f"Reference kind must be one of {REF_KINDS}, got {self.kind!r}")
        if not isinstance(self.latent, torch.Tensor):
            raise TypeError(f"Reference latent must be a torch.Tensor, got {type(self.latent).__name__}")
        if not self.latent.is_floating_point():
            raise TypeError(f"Reference latent must be floating point, got {self.latent.dtype}")
        if self.latent.ndim != 5 or self.latent.shape[2] != 1:
            raise ValueError(f"Reference latent must have shape [B, C, 1, h, w] (one latent frame), got "
                             f"{tuple(self.latent.shape)}")


@dataclass
class RefCache:
    """Per-layer reference keys and values, computed once per generation.

    Attributes:
        k: one tensor per layer, ``[Bc, Nr, H, D]``: normed keys, rotated by I-RoPE for the video
            grid ``video_grid``.
        v: one tensor per layer, ``[Bc, Nr, H, D]``.
        refs: token grid of each reference, ``[(kind, h, w), ...]`` (after patchify).
        video_grid: ``(T, Hg, Wg)`` the keys are rotated for; ``(0, 0, 0)`` means "not bound to a
            video yet": :func:`bind_ref_cache` re-rotates the keys by the grid offset when the
            cache is used (reference-reference attention only sees position differences, so the
            reference hidden states do not depend on the video grid, only the final key rotation does).

    ``Bc`` is 1 (one identity shared by the whole video batch, e.g. both CFG branches: binding
    expands it) or the video batch size. Treat a cache as immutable once made: the binding memo
    trusts that its tensors do not change.
    """

    k: list[Tensor]
    v: list[Tensor]
    refs: list[tuple[str, int, int]] = field(default_factory=list)
    video_grid: tuple[int, int, int] = (0, 0, 0)
    # (key, k, v) as last bound by bind_ref_cache, reused by every step of a generation; not part
    # of the cache's value.
    _bound: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_ref(self) -> int:
        return sum(h * w for _, h, w in self.refs)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0] if self.k else 1

    def to(self, *args, **kwargs) -> RefCache:
        """``Tensor.to`` on every tensor (device and/or dtype); returns a new cache."""
        return RefCache([t.to(*args, **kwargs) for t in self.k], [t.to(*args, **kwargs) for t in self.v],
                        list(self.refs), tuple(self.video_grid))

    def expand(self, batch_size: int) -> RefCache:
        """Broadcast a batch-1 cache to ``batch_size`` (a view, no copy)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"a RefCache of batch {self.batch_size} cannot serve a video batch of "
                             f"{batch_size} (only batch 1 broadcasts)")
        return RefCache([t.expand(batch_size, -1, -1, -1) for t in self.k],
                        [t.expand(batch_size, -1, -1, -1) for t in self.v], list(self.refs),
                        tuple(self.video_grid))


def rerotate_keys(ks: Sequence[Tensor], cfg: WildActorConfig, num_ref: int, from_grid: Sequence[int],
                  to_grid: Sequence[int], backend: str = "auto") -> list[Tensor]:
    """Re-rotate cached reference keys ``[B, Nr, H, D]`` from one video grid to another.

    When the video grid changes every reference token moves by the same position offset, and
    rotations compose additively (``R(p + o) = R(o) R(p)``), so one extra rotation suffices.
    """
    if tuple(from_grid) == tuple(to_grid):
        return list(ks)
    s = 1 if cfg.spatial_shift else 0
    (t0, h0, w0), (t1, h1, w1) = from_grid, to_grid
    # references before the video (ref_time="before") sit at t = -1 whatever the video length
    dt = 0 if cfg.ref_time == "before" else t1 - t0
    off = torch.tensor([[dt, (h1 - h0) * s, (w1 - w0) * s]], dtype=torch.int64)
    cos, sin = wk.rope_cos_sin(off.expand(num_ref, 3), cfg.head_dim, cfg.theta)
    out = []
    for k in ks:
        out.append(wk.apply_rope(k, cos.to(k.device), sin.to(k.device), backend=backend))
    return out


def bind_ref_cache(cache: RefCache, cfg: WildActorConfig, video_grid: Sequence[int], batch_size: int, *,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   backend: str = "auto", stacked: bool = False, memo: bool = True,
                   quantize: bool = False):
    """A reference cache made ready for one denoising call.

    Args:
        cache: a :class:`RefCache` (from the PyTorch model or any runner).
        cfg: the config of the model that uses it (layer count, head dim, RoPE settings).
        video_grid: ``(T, Hg, Wg)`` token grid of the video the keys are rotated for.
        batch_size: the video batch; a batch-1 cache is expanded (a view).
        device, dtype: where/as what the K/V are returned (``None`` keeps the cache's own).
        backend: kernel backend of the key re-rotation (needed only when the grids differ).
        stacked: return two stacked contiguous tensors ``[L, B, Nr, H, D]`` (the graph inputs of
            the exported denoiser) instead of two lists of ``L`` tensors ``[B, Nr, H, D]``.
        quantize: 8-bit attention reads a quantized cache: each layer's keys become a
            :class:`wildactor_kernels.attention.QuantizedKV` (values inside; the values list
            holds ``None``), made once per grid and memoised like the rest.
        memo: keep the result on the cache (``cache._bound``) for the next call with the same
            grid, batch, device, dtype, backend and layout; every step of a generation then
            reuses it. ``False`` for a one-off cache.
    Returns:
        ``(ks, vs)``: two lists (empty for an empty cache) or, with ``stacked``, two tensors
        (``[L, B, 0, H, D]`` zeros for an empty cache).
    Raises:
        TypeError: ``cache`` is not a RefCache. ValueError: layer count or batch mismatch.
    """
    if not isinstance(cache, RefCache):
        raise TypeError(f"ref_cache must be a RefCache, got {type(cache).__name__}")
    if cache.num_layers == 0:
        if not stacked:
            return [], []
        z = torch.zeros(cfg.num_layers, batch_size, 0, cfg.num_heads, cfg.head_dim, device=device,
                        dtype=dtype)
        return z, z
    if cache.num_layers != cfg.num_layers:
        raise ValueError(f"ref_cache has {cache.num_layers} layers; this model has {cfg.num_layers}")
    grid = tuple(video_grid)
    if quantize and stacked:
        raise ValueError("quantize=True gives per-layer QuantizedKV, not stacked tensors")
    key = (grid, batch_size, None if device is None else str(device), dtype, backend, stacked,
           cfg.spatial_shift, cfg.ref_time, cfg.theta, cfg.head_dim, quantize)
    if cache._bound is not None and cache._bound[0] == key:  # same call as the previous step
        ks, vs = cache._bound[1], cache._bound[2]
        return (ks, vs) if stacked else (list(ks), list(vs))
    bound = cache.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else cache
    ks = rerotate_keys(bound.k, cfg, bound.num_ref, bound.video_grid, grid, backend=backend)
    bound = RefCache(ks, bound.v, list(bound.refs), grid).expand(batch_size)
    ks, vs = bound.k, bound.v
    if stacked:
        ks, vs = torch.stack(ks).contiguous(), torch.stack(vs).contiguous()
    elif quantize:
        ks = [wk.attention.quantize_ref_kv(k, v, backend=backend) for k, v in zip(ks, vs)]
        vs = [None] * len(ks)
    if memo:
        cache._bound = (key, ks, vs)
    return (ks, vs) if stacked else (list(ks), list(vs))
