"""Input checks of :class:`~wildactor_kernels.model.WildActor` (a clear TypeError / ValueError
naming the argument and what was expected), and the token grid of a latent shape."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .config import WildActorConfig
from .references import Reference

__all__ = ["video_grid", "check_video", "check_timestep", "check_context", "check_refs"]


def video_grid(cfg: WildActorConfig, latent_shape: Sequence[int]) -> tuple[int, int, int]:
    """Token grid ``(T, Hg, Wg)`` of a latent shape ``[..., T, H, W]``."""
    t, h, w = latent_shape[-3:]  # no int(): symbolic sizes stay symbolic under torch.export
    pt, ph, pw = cfg.patch_size
    return t // pt, h // ph, w // pw


def check_video(cfg: WildActorConfig, latents: object) -> tuple[int, tuple[int, int, int]]:
    """``latents [B, C, T, H, W]`` -> ``(B, token grid)``."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if latents.ndim != 5:
        raise ValueError(f"latents must have shape [B, C, T, H, W], got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be floating point, got {latents.dtype}")
    b, c, t, h, w = latents.shape
    if c != cfg.in_channels:
        raise ValueError(f"latents have {c} channels; the model expects in_channels={cfg.in_channels}")
    p = cfg.patch_size
    if t == 0 or h == 0 or w == 0 or t % p[0] or h % p[1] or w % p[2]:
        raise ValueError(f"latent T, H, W = {(t, h, w)} must be positive multiples of patch_size {p}")
    return b, video_grid(cfg, latents.shape)


def check_timestep(timestep: object, b: int, nv: int, device: torch.device) -> torch.Tensor:
    """A number, ``[]``, ``[1]``, ``[B]`` or per-token ``[B, Nv]`` -> fp32 ``[B]`` / ``[B, Nv]``."""
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        timestep = torch.tensor([float(timestep)])
    if not isinstance(timestep, torch.Tensor):
        raise TypeError(f"timestep must be a tensor or a number, got {type(timestep).__name__}")
    t = timestep.to(device=device, dtype=torch.float32)
    if t.ndim == 0 or tuple(t.shape) == (1,):
        return t.reshape(1).expand(b)
    if tuple(t.shape) in ((b,), (b, nv)):
        return t
    raise ValueError(f"timestep must have shape [B] = [{b}] (or [B, Nv] = [{b}, {nv}]), got {tuple(t.shape)}")


def check_context(cfg: WildActorConfig, context: object, b: int) -> None:
    """``context [B, L, text_dim]``."""
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
        raise ValueError(f"context must have shape [B, L, text_dim] = [{b}, L, {cfg.text_dim}], got "
                         f"{tuple(context.shape)}")


def check_refs(cfg: WildActorConfig, refs: Iterable[Reference] | None) -> list[Reference]:
    """A list of :class:`Reference` whose latents fit the model (``None`` -> ``[]``)."""
    if refs is None:
        return []
    if isinstance(refs, Reference):
        raise TypeError("refs must be a list of Reference, not a single Reference")
    refs = list(refs)
    ph, pw = cfg.patch_size[1:]
    for i, r in enumerate(refs):
        if not isinstance(r, Reference):
            raise TypeError(f"refs[{i}] must be a Reference, got {type(r).__name__}")
        _, c, _, h, w = r.latent.shape
        if c != cfg.in_channels:
            raise ValueError(f"refs[{i}] latent has {c} channels; the model expects "
                             f"in_channels={cfg.in_channels}")
        if cfg.patch_size[0] != 1:
            raise ValueError("references are single latent frames: they need patch_size[0] == 1")
        if h == 0 or w == 0 or h % ph or w % pw:
            raise ValueError(f"refs[{i}] latent h, w = {(h, w)} must be positive multiples of "
                             f"the spatial patch {(ph, pw)}")
    return refs


def check_call(cfg: WildActorConfig, latents: object, timestep: object, context: object,
               refs: object, ref_cache: object) -> tuple[int, tuple[int, int, int], torch.Tensor]:
    """The checks of one model call (``WildActor.forward`` and its parallel wrapper): joint or
    cached path, video latents, timestep and text states. Returns the batch size, the token grid
    and the timestep as a float tensor ``[B]`` or ``[B, Nv]``."""
    if refs is not None and ref_cache is not None:
        raise ValueError("give refs (joint path) or ref_cache (cached path), not both")
    b, grid = check_video(cfg, latents)
    t = check_timestep(timestep, b, grid[0] * grid[1] * grid[2], latents.device)
    check_context(cfg, context, b)
    return b, grid, t
