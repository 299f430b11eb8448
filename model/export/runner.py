"""The host half of running the two exported graphs, and the export manifest.

:func:`load_manifest` reads the ``manifest.json`` that :func:`~.onnx_export.export_onnx` writes
(and :func:`wildactor_kernels.model.tensorrt.build_engines` copies next to the engines).
:class:`TwoGraphRunner` does what the graphs leave to the host (input checks, patchify, I-RoPE
tables, the reference cache bound to a video grid and batch); the onnxruntime runner
(:class:`~.onnx_export.OnnxWildActor`) and the TensorRT one
(:class:`wildactor_kernels.model.tensorrt.TensorRTWildActor`) only run the graphs.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from wildactor_kernels import TokenLayout

from ..config import WildActorConfig
from ..references import RefCache, Reference, bind_ref_cache
from .contract import MANIFEST, patchify_references, rope_tables, video_grid

__all__ = ["load_manifest", "TwoGraphRunner"]


def load_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``manifest.json`` written by :func:`export_onnx` (also copied next to TensorRT engines)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {directory} an export_onnx output directory?")
    man = json.loads(path.read_text())
    if man.get("format") != "wildactor-onnx":
        raise ValueError(f"{path} is not a wildactor ONNX manifest")
    return man


# =========================================================================== runners
def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


class TwoGraphRunner(ABC):
    """The host half shared by the onnxruntime and TensorRT runners.

    Subclasses implement :meth:`_encode` (``ref_patches, cos_r, sin_r -> ref_k, ref_v``) and
    :meth:`_denoise` (the seven denoiser inputs -> velocity) on torch tensors; this class does
    what the graphs leave to the host: input checks, patchify, I-RoPE tables, the reference
    cache (binding it to a video grid and batch), exactly as :class:`wildactor_kernels.model.WildActor` does.
    """

    manifest: dict[str, Any]
    cfg: WildActorConfig

    def _setup(self, manifest: Mapping[str, Any]) -> None:
        self.manifest = dict(manifest)
        self.cfg = WildActorConfig.from_dict(self.manifest["config"])
        self.precision = self.manifest["precision"]
        self._rope: dict[TokenLayout, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ backend hooks
    @abstractmethod
    def _encode(self, ref_patches, cos_r, sin_r) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the reference-encoder graph."""

    @abstractmethod
    def _denoise(self, latents, timestep, context, ref_k, ref_v, cos_v, sin_v) -> torch.Tensor:
        """Run the denoiser graph."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # ------------------------------------------------------------------ host maths
    def video_grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        return video_grid(self.cfg, latent_shape)

    def rope_tables(self, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin [N, D//2]`` on this runner's device (cached per layout)."""
        hit = self._rope.get(layout)
        if hit is None:
            cos, sin = rope_tables(self.cfg, layout)
            hit = (cos.to(self.device), sin.to(self.device))
            if len(self._rope) > 32:
                self._rope.clear()
            self._rope[layout] = hit
        return hit

    def encode_references(self, refs: Sequence[Any], video_shape: Sequence[int] | None = None):
        """Reference K/V of every layer, once per generation: a :class:`RefCache` that
        this runner, other runners and :class:`wildactor_kernels.model.WildActor` all accept.

        Args:
            refs: :class:`Reference` items (latent batch 1 for a cache shared by the batch).
            video_shape: video latent shape to rotate the keys for; default a grid-free cache
                (bound to the video grid, with one extra key rotation, when used).
        """
        refs = list(refs or [])
        for i, r in enumerate(refs):
            if not isinstance(r, Reference):
                raise TypeError(f"refs[{i}] must be a Reference, got {type(r).__name__}")
            if r.latent.shape[1] != self.cfg.in_channels:
                raise ValueError(f"refs[{i}] latent has {r.latent.shape[1]} channels; the model expects "
                                 f"in_channels={self.cfg.in_channels}")
        grid = (0, 0, 0) if video_shape is None else self.video_grid(video_shape)
        if not refs:
            return RefCache([], [], [], grid)
        patches, grids = patchify_references(refs, self.cfg.patch_size)
        layout = TokenLayout(grid, grids)
        cos, sin = self.rope_tables(layout)
        nv = layout.num_video
        k, v = self._encode(patches.to(self.device), cos[nv:], sin[nv:])
        return RefCache(list(k.unbind(0)), list(v.unbind(0)), grids, grid)

    def _bind(self, cache, grid: tuple[int, int, int], b: int, memo: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ``ref_k, ref_v [L, b, Nr, H, D]`` of a cache, rotated for ``grid``: the model's
        own binding (:func:`wildactor_kernels.model.references.bind_ref_cache`), memo included."""
        return bind_ref_cache(cache, self.cfg, grid, b, device=self.device, backend="reference",
                              stacked=True, memo=memo)

    def __call__(self, latents, timestep, context, refs=None, ref_cache=None) -> torch.Tensor:
        return self.forward(latents, timestep, context, refs=refs, ref_cache=ref_cache)

    def forward(self, latents, timestep, context, refs=None, ref_cache=None) -> torch.Tensor:
        """Velocity ``[B, out_channels, T, H, W]``, the same call as :meth:`WildActor.forward`.

        Args:
            latents: ``[B, C, T, H, W]``; timestep: a number, ``[1]`` or ``[B]`` in [0, 1000];
            context: ``[B, L, text_dim]``; refs: references (encoded for this call) or
            ref_cache: a :class:`RefCache` (from any runner or the PyTorch model).
        """
        if refs is not None and ref_cache is not None:
            raise ValueError("give refs or ref_cache, not both")
        latents, context = _as_tensor(latents), _as_tensor(context)
        if latents.ndim != 5 or latents.shape[1] != self.cfg.in_channels:
            raise ValueError(f"latents must be [B, {self.cfg.in_channels}, T, H, W], got "
                             f"{tuple(latents.shape)}")
        b = latents.shape[0]
        pt, ph, pw = self.cfg.patch_size
        if any(s == 0 or s % p for s, p in zip(latents.shape[2:], (pt, ph, pw))):
            raise ValueError(f"latent T, H, W = {tuple(latents.shape[2:])} must be positive multiples of "
                             f"patch_size {self.cfg.patch_size}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.cfg.text_dim:
            raise ValueError(f"context must be [B, L, text_dim] = [{b}, L, {self.cfg.text_dim}], got "
                             f"{tuple(context.shape)}")
        t = _as_tensor(timestep).to(torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"timestep must be a number, [1] or [B] = [{b}], got {tuple(t.shape)}")
        grid = self.video_grid(latents.shape)
        if refs:
            k, v = self._bind(self.encode_references(list(refs), video_shape=latents.shape), grid, b,
                              memo=False)
        elif ref_cache is not None:
            k, v = self._bind(ref_cache, grid, b)
        else:
            k, v = self._bind(RefCache([], [], [], grid), grid, b, memo=False)
        cos, sin = self.rope_tables(TokenLayout(grid))
        dev = self.device
        return self._denoise(latents.to(dev), t.to(dev).contiguous(), context.to(dev), k, v, cos, sin)


