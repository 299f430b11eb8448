"""The contract of the two exported graphs: names, I/O, host-side inputs and the graph wrappers.

Two graphs, because reference K/V are a pure function of the reference latents (docs/design.md §1, §7):

``reference_encoder.onnx``
    ``ref_patches [batch, num_ref, C*ph*pw]``, ``cos_r, sin_r [num_ref, D/2]`` ->
    ``ref_k, ref_v [num_layers, batch, num_ref, H, D]`` (keys normed and rotated).
``denoiser.onnx``
    ``latents [batch, C, frames, height, width]``, ``timestep [batch]``,
    ``context [batch, text_len, text_dim]``, ``ref_k, ref_v [num_layers, batch, num_ref, H, D]``,
    ``cos_v, sin_v [num_video, D/2]`` -> ``velocity [batch, out_channels, frames, height, width]``.

How references enter: a list of references of different kinds and sizes is not one tensor, so
the host does the weight-free part. It cuts each reference latent ``[B, C, 1, h, w]`` into
patches (the order of the ``Conv3d`` weight, ``(c, ph, pw)``; tokens row-major per reference),
concatenates the references in list order (:func:`patchify_references`), and computes the I-RoPE
tables with the library's own :func:`wildactor_kernels.irope_positions` and
:func:`wildactor_kernels.rope_cos_sin` (:func:`rope_tables`); kinds and sizes only change
positions, so they enter through ``cos_r, sin_r``. The graph applies the patch embedding as one
matmul with the ``Conv3d`` weight (the same sum), then the reference stream of every block
(:class:`ReferenceEncoderGraph`, :class:`DenoiserGraph`).

Tracing needs an example with batch, frames, grid sizes, text length and reference tokens all
>= 2 (torch.export specialises sizes 0 and 1; :func:`default_example`, :func:`check_example_sizes`);
the graphs then run at any size, 1 included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import wildactor_kernels as wk
from wildactor_kernels import TokenLayout

from ..config import WildActorConfig
from ..rope_tables import model_positions

__all__ = [
    "ENCODER",
    "DENOISER",
    "MANIFEST",
    "MANIFEST_VERSION",
    "PRECISIONS",
    "ATTENTION_FORMS",
    "COMPUTE_DTYPES",
    "EXTERNAL_DATA_THRESHOLD",
    "GRAPH_IO",
    "patchify_references",
    "rope_tables",
    "video_grid",
    "ReferenceEncoderGraph",
    "DenoiserGraph",
    "default_example",
    "graph_inputs",
    "check_example_sizes",
    "dynamic_shapes",
]

ENCODER = "reference_encoder"
DENOISER = "denoiser"
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
ATTENTION_FORMS = ("onnx", "decomposed")
MANIFEST_VERSION = 1
# float type of each non-FP8 export precision
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# graphs whose initializers pass this many bytes are written with ONNX external data
EXTERNAL_DATA_THRESHOLD = 1 << 30

# --------------------------------------------------------------------------- I/O contract
# (name, axes, dtype: "compute" = the export precision's float type, or "float32", doc)
GRAPH_IO: dict[str, dict[str, list[tuple[str, tuple[str, ...], str, str]]]] = {
    ENCODER: {
        "inputs": [
            ("ref_patches", ("batch", "num_ref", "patch_features"), "compute",
             "Patchified reference latents: each reference [B, C, 1, h, w] cut into (ph, pw) "
             "patches flattened in Conv3d weight order (c, ph, pw), tokens row-major inside a "
             "reference, references concatenated in list order (patchify_references)."),
            ("cos_r", ("num_ref", "rope_pairs"), "float32",
             "cos of the I-RoPE angles of the reference tokens: rows num_video: of "
             "rope_cos_sin(irope_positions(TokenLayout(video_grid, refs)))."),
            ("sin_r", ("num_ref", "rope_pairs"), "float32", "sin of the same angles."),
        ],
        "outputs": [
            ("ref_k", ("num_layers", "batch", "num_ref", "heads", "head_dim"), "compute",
             "Per-layer reference keys (q/k RMSNorm applied, rotated by cos_r/sin_r)."),
            ("ref_v", ("num_layers", "batch", "num_ref", "heads", "head_dim"), "compute",
             "Per-layer reference values."),
        ],
    },
    DENOISER: {
        "inputs": [
            ("latents", ("batch", "in_channels", "frames", "height", "width"), "compute",
             "Noisy video latents; frames/height/width multiples of the patch size."),
            ("timestep", ("batch",), "float32", "Diffusion timestep in [0, 1000] per sample."),
            ("context", ("batch", "text_len", "text_dim"), "compute", "Text-encoder states."),
            ("ref_k", ("num_layers", "batch", "num_ref", "heads", "head_dim"), "compute",
             "Reference keys from reference_encoder, rotated for this video grid (num_ref may be 0)."),
            ("ref_v", ("num_layers", "batch", "num_ref", "heads", "head_dim"), "compute",
             "Reference values from reference_encoder."),
            ("cos_v", ("num_video", "rope_pairs"), "float32",
             "cos of the I-RoPE angles of the video tokens (rows :num_video of the layout's "
             "table), num_video = frames/pt * height/ph * width/pw."),
            ("sin_v", ("num_video", "rope_pairs"), "float32", "sin of the same angles."),
        ],
        "outputs": [
            ("velocity", ("batch", "out_channels", "frames", "height", "width"), "compute",
             "Predicted rectified-flow velocity (noise - x0)."),
        ],
    },
}


# =========================================================================== host-side helpers
def patchify_references(refs: Sequence[Any], patch_size: Sequence[int], batch_size: int | None = None
                        ) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    """Cut references into patch vectors, the weight-free half of the patch embedding.

    Args:
        refs: :class:`Reference` items (``kind``, ``latent [B|1, C, 1, h, w]``).
        patch_size: ``(pt, ph, pw)`` of the model (``pt`` must be 1).
        batch_size: output batch (references of batch 1 broadcast); default the largest.
    Returns:
        ``patches [B, Nr, C*ph*pw]`` in the latents' dtype (``(c, ph, pw)`` order inside a
        vector, so ``patches @ conv.weight.flatten(1).T + conv.bias`` equals the ``Conv3d``
        tokens) and the token grid ``(kind, h/ph, w/pw)`` of every reference.
    """
    pt, ph, pw = (int(p) for p in patch_size)
    if pt != 1:
        raise ValueError("references are single latent frames: they need patch_size[0] == 1")
    refs = list(refs)
    if batch_size is None:
        batch_size = max((int(r.latent.shape[0]) for r in refs), default=1)
    parts, grids = [], []
    for i, r in enumerate(refs):
        lat = r.latent
        if lat.ndim != 5 or lat.shape[2] != 1:
            raise ValueError(f"refs[{i}] latent must be [B, C, 1, h, w], got {tuple(lat.shape)}")
        b, c, _, h, w = lat.shape
        if h % ph or w % pw or h == 0 or w == 0:
            raise ValueError(f"refs[{i}] latent h, w = {(h, w)} must be positive multiples of {(ph, pw)}")
        if b not in (1, batch_size):
            raise ValueError(f"refs[{i}] has batch {b}; expected 1 or {batch_size}")
        hg, wg = h // ph, w // pw
        x = lat.reshape(b, c, hg, ph, wg, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, hg * wg, c * ph * pw)
        parts.append(x.expand(batch_size, -1, -1))
        grids.append((r.kind, hg, wg))
    if not parts:
        return torch.zeros(batch_size, 0, 0), []
    return torch.cat(parts, dim=1).contiguous(), grids


def rope_tables(cfg: WildActorConfig, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin [N, D//2]`` of a layout, with the library's own functions (host side)."""
    return wk.rope_cos_sin(model_positions(cfg, layout), cfg.head_dim, theta=cfg.theta)



def video_grid(cfg: WildActorConfig, shape: Sequence[int]) -> tuple[int, int, int]:
    t, h, w = (int(s) for s in shape[-3:])
    pt, ph, pw = cfg.patch_size
    return t // pt, h // ph, w // pw


# =========================================================================== graph wrappers
class ReferenceEncoderGraph(nn.Module):
    """``reference_encoder``: patch vectors + reference rope tables -> stacked per-layer K/V."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ref_patches: torch.Tensor, cos_r: torch.Tensor, sin_r: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        conv = self.model.patch_embedding
        x = F.linear(ref_patches.to(conv.weight.dtype), conv.weight.flatten(1), conv.bias)
        ks, vs = self.model.reference_kv(x, cos_r, sin_r)
        return torch.stack(ks), torch.stack(vs)


class DenoiserGraph(nn.Module):
    """``denoiser``: the cached path of :meth:`WildActor.denoise` with stacked reference K/V."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, latents, timestep, context, ref_k, ref_v, cos_v, sin_v) -> torch.Tensor:
        return self.model.denoise(latents, timestep, context, list(ref_k.unbind(0)),
                                  list(ref_v.unbind(0)), cos_v, sin_v)


# =========================================================================== examples
def default_example(cfg: WildActorConfig, batch: int = 2, frames: int = 2, grid: tuple[int, int] = (4, 4),
                    text_len: int = 5, seed: int = 0) -> dict[str, Any]:
    """Random inputs for tracing (every dynamic size >= 2): ``latents, timestep, context, refs``."""
    from ..wildactor import Reference

    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = cfg.patch_size
    c = cfg.in_channels
    lat = torch.randn(batch, c, frames * pt, grid[0] * ph, grid[1] * pw, generator=g)
    refs = [Reference("face", torch.randn(1, c, 1, 2 * ph, 2 * pw, generator=g)),
            Reference("body", torch.randn(1, c, 1, 3 * ph, 2 * pw, generator=g))]
    return dict(latents=lat, timestep=torch.linspace(100.0, 900.0, batch),
                context=torch.randn(batch, text_len, cfg.text_dim, generator=g), refs=refs)


def graph_inputs(m: nn.Module, example: Mapping[str, Any], dtype: torch.dtype
                  ) -> dict[str, tuple[torch.Tensor, ...]]:
    """Example tensors of both graphs from a model-level example (reference K/V from the model)."""
    cfg: WildActorConfig = m.cfg
    dev = m.device
    if not example.get("refs"):
        raise ValueError("the export example needs references (example['refs']): the reference encoder "
                         "is traced on them")
    lat, ctx = example["latents"].to(dev), example["context"].to(dev)
    b = lat.shape[0]
    t = torch.as_tensor(example.get("timestep", 500.0), dtype=torch.float32).reshape(-1).expand(b).to(dev)
    patches, grids = patchify_references(example["refs"], cfg.patch_size, batch_size=b)
    grid = video_grid(cfg, lat.shape)
    layout = TokenLayout(grid, grids)
    cos, sin = (x.to(dev) for x in rope_tables(cfg, layout))
    nv = layout.num_video
    enc_in = (patches.to(dev, dtype), cos[nv:], sin[nv:])
    with torch.no_grad():
        k, v = ReferenceEncoderGraph(m)(*enc_in)
    den_in = (lat.to(dtype), t.contiguous(), ctx.to(dtype), k.to(dtype), v.to(dtype), cos[:nv], sin[:nv])
    return {ENCODER: enc_in, DENOISER: den_in}


def check_example_sizes(ins: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
    lat, _, ctx, k = ins[DENOISER][:4]
    sizes = {"batch": lat.shape[0], "frames": lat.shape[2], "height": lat.shape[3],
             "width": lat.shape[4], "text_len": ctx.shape[1], "reference tokens": k.shape[2]}
    small = {n: s for n, s in sizes.items() if s < 2}
    if small:
        raise ValueError(f"a dynamic export needs an example with every dynamic size >= 2 (torch.export "
                         f"specialises 0 and 1); got {small}. Use default_example(cfg) or larger inputs; "
                         f"the exported graphs still run at size 1.")


def dynamic_shapes(cfg: WildActorConfig) -> dict[str, dict[str, dict[int, Any]]]:
    from torch.export import Dim

    pt, ph, pw = cfg.patch_size
    batch, nr = Dim("batch"), Dim("num_ref")
    frames = Dim("frames") if pt == 1 else pt * Dim("tg")
    height, width = ph * Dim("hg"), pw * Dim("wg")
    kv = {1: batch, 2: nr}
    return {
        ENCODER: {"ref_patches": {0: batch, 1: nr}, "cos_r": {0: Dim.AUTO}, "sin_r": {0: Dim.AUTO}},
        DENOISER: {"latents": {0: batch, 2: frames, 3: height, 4: width}, "timestep": {0: batch},
                   "context": {0: batch, 1: Dim("text_len")}, "ref_k": kv, "ref_v": kv,
                   "cos_v": {0: Dim.AUTO}, "sin_v": {0: Dim.AUTO}},
    }

