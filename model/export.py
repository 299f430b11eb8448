"""ONNX export of WildActor as two graphs, and an onnxruntime runner behind the model's call.

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
:func:`wildactor_kernels.rope_cos_sin`; kinds and sizes only change positions, so they enter
through ``cos_r, sin_r``. The graph applies the patch embedding as one matmul with the
``Conv3d`` weight (the same sum), then the reference stream of every block.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (``torch.export``, non-strict) with
``torch.export.Dim`` dynamic axes. It handles the symbolic shapes of this model (frame and grid
sizes flow through patchify/unpatchify reshapes) and lowers SDPA to the opset-23 ``Attention``
op; the TorchScript exporter also traces it but is deprecated and only emits MatMul/Softmax.
Tracing needs an example with batch, frames, grid sizes, text length and reference tokens all
>= 2 (torch.export specialises sizes 0 and 1); the graphs then run at any size, 1 included.

Post-export passes (all plain ``onnx`` protos):
- ``RMSNormalization`` (opset 23, fused by the exporter's optimizer) is decomposed into
  primitive ops: TensorRT 10.x's ONNX parser has no importer for it.
- ``attention="decomposed"`` rewrites every ``Attention`` node as MatMul -> Softmax -> MatMul
  (softmax in fp32), for TensorRT < 10.14 or runtimes without Attention-23.
- ``precision="fp8"`` inserts explicit QuantizeLinear/DequantizeLinear (float8e4m3fn, zero
  point 0) on the block linears: weights stored as FP8 initializers with per-output-channel
  scales, activations per-tensor with static scales calibrated on example inputs (what
  TensorRT's strongly typed FP8 GEMMs take).
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import logging
import math
import os
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import wildactor_kernels as wk
from wildactor_kernels import TokenLayout

from .config import WildActorConfig

logger = logging.getLogger("wildactor_kernels")

__all__ = [
    "ENCODER",
    "DENOISER",
    "MANIFEST",
    "PRECISIONS",
    "OnnxExport",
    "export_onnx",
    "OnnxWildActor",
    "patchify_references",
    "rope_tables",
    "default_example",
    "load_manifest",
    "register_cli",
]

ENCODER = "reference_encoder"
DENOISER = "denoiser"
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
ATTENTION_FORMS = ("onnx", "decomposed")
MANIFEST_VERSION = 1
FP8_MAX = 448.0
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# graphs whose initializers pass this many bytes are written with ONNX external data
EXTERNAL_DATA_THRESHOLD = 1 << 30

# --------------------------------------------------------------------------- I/O contract
# (name, axes, dtype: "compute" = the export precision's float type, or "float32", doc)
_IO: dict[str, dict[str, list[tuple[str, tuple[str, ...], str, str]]]] = {
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
    pos = wk.irope_positions(layout, face_offset=cfg.face_offset, body_offset=cfg.body_offset,
                             spatial_shift=cfg.spatial_shift)
    return wk.rope_cos_sin(pos, cfg.head_dim, theta=cfg.theta)


def _rebind_keys(ks: Sequence[torch.Tensor], cfg: WildActorConfig, num_ref: int,
                 from_grid: Sequence[int], to_grid: Sequence[int]) -> list[torch.Tensor]:
    """Re-rotate cached reference keys from one video grid to another.

    Every reference token moves by the same position offset when the grid changes, and
    rotations compose additively (``R(p + o) = R(o) R(p)``), so one extra rotation suffices.
    """
    if tuple(from_grid) == tuple(to_grid):
        return list(ks)
    s = 1 if cfg.spatial_shift else 0
    (t0, h0, w0), (t1, h1, w1) = from_grid, to_grid
    off = torch.tensor([[t1 - t0, (h1 - h0) * s, (w1 - w0) * s]], dtype=torch.int64)
    cos, sin = wk.rope_cos_sin(off.expand(num_ref, 3), cfg.head_dim, cfg.theta)
    return [wk.apply_rope(k, cos.to(k.device), sin.to(k.device), backend="reference") for k in ks]


def _video_grid(cfg: WildActorConfig, shape: Sequence[int]) -> tuple[int, int, int]:
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
    from .wildactor import Reference

    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = cfg.patch_size
    c = cfg.in_channels
    lat = torch.randn(batch, c, frames * pt, grid[0] * ph, grid[1] * pw, generator=g)
    refs = [Reference("face", torch.randn(1, c, 1, 2 * ph, 2 * pw, generator=g)),
            Reference("body", torch.randn(1, c, 1, 3 * ph, 2 * pw, generator=g))]
    return dict(latents=lat, timestep=torch.linspace(100.0, 900.0, batch),
                context=torch.randn(batch, text_len, cfg.text_dim, generator=g), refs=refs)


def _graph_inputs(m: nn.Module, example: Mapping[str, Any], dtype: torch.dtype
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
    grid = _video_grid(cfg, lat.shape)
    layout = TokenLayout(grid, grids)
    cos, sin = (x.to(dev) for x in rope_tables(cfg, layout))
    nv = layout.num_video
    enc_in = (patches.to(dev, dtype), cos[nv:], sin[nv:])
    with torch.no_grad():
        k, v = ReferenceEncoderGraph(m)(*enc_in)
    den_in = (lat.to(dtype), t.contiguous(), ctx.to(dtype), k.to(dtype), v.to(dtype), cos[:nv], sin[:nv])
    return {ENCODER: enc_in, DENOISER: den_in}


def _check_example_sizes(ins: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
    lat, _, ctx, k = ins[DENOISER][:4]
    sizes = {"batch": lat.shape[0], "frames": lat.shape[2], "height": lat.shape[3],
             "width": lat.shape[4], "text_len": ctx.shape[1], "reference tokens": k.shape[2]}
    small = {n: s for n, s in sizes.items() if s < 2}
    if small:
        raise ValueError(f"a dynamic export needs an example with every dynamic size >= 2 (torch.export "
                         f"specialises 0 and 1); got {small}. Use default_example(cfg) or larger inputs; "
                         f"the exported graphs still run at size 1.")


def _dynamic_shapes(cfg: WildActorConfig) -> dict[str, dict[str, dict[int, Any]]]:
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


# =========================================================================== onnx helpers
def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs the 'onnx' and 'onnxscript' packages: "
                          "pip install onnx onnxscript (or pip install wildactor-kernels[test])") from e
    return onnx


def _elem_type(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    return {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
            torch.bfloat16: TensorProto.BFLOAT16, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
            torch.int64: TensorProto.INT64}[dtype]


def _tensor_proto(name: str, t: torch.Tensor):
    """TensorProto from a torch tensor (raw little-endian bytes; works for bf16 and fp8)."""
    from onnx import helper

    t = t.detach().cpu().contiguous()
    raw = t.view(torch.uint8) if t.element_size() == 1 else t.view(-1).view(torch.uint8)
    return helper.make_tensor(name, _elem_type(t.dtype), list(t.shape), raw.numpy().tobytes(), raw=True)


def _to_torch(init) -> torch.Tensor:
    from onnx import TensorProto, numpy_helper

    if init.data_type == TensorProto.BFLOAT16:
        import numpy as np

        raw = init.raw_data if init.raw_data else np.asarray(init.int32_data, np.uint16).tobytes()
        return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(list(init.dims))
    return torch.from_numpy(numpy_helper.to_array(init).copy())


class _Names:
    """Fresh value/initializer names inside one graph."""

    def __init__(self, graph):
        self.used = {n for node in graph.node for n in (*node.input, *node.output)}
        self.used |= {i.name for i in graph.initializer} | {i.name for i in graph.input}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _replace_nodes(graph, replacements: Mapping[int, list]) -> None:
    """Replace ``graph.node[i]`` by a list of nodes (topological order kept)."""
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(replacements.get(i, [node]))
    del graph.node[:]
    graph.node.extend(nodes)


def decompose_rmsnorm(model) -> int:
    """Rewrite opset-23 ``RMSNormalization`` nodes as primitive ops; returns how many.

    ``y = cast_like(x / sqrt(mean(x^2, axis=-1) + eps), scale) * scale`` with the statistics in
    the node's ``stash_type`` (fp32). TensorRT 10.x's ONNX parser has no RMSNormalization.
    """
    from onnx import TensorProto, helper

    g, names, repl = model.graph, _Names(model.graph), {}
    for i, node in enumerate(g.node):
        if node.op_type != "RMSNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        axis = int(_attr(node, "axis", -1))
        if axis != -1:
            raise NotImplementedError(f"RMSNormalization with axis={axis} (this model only emits -1)")
        eps = float(_attr(node, "epsilon", 1e-5))
        stash = int(_attr(node, "stash_type", 1))
        x, scale = node.input[0], node.input[1]
        p = names(node.name or "rmsnorm")
        axes, eps_c = names(p + "_axes"), names(p + "_eps")
        g.initializer.extend([helper.make_tensor(axes, TensorProto.INT64, [1], [-1]),
                              helper.make_tensor(eps_c, stash, [], [eps])])
        xf, sq, mean, var, rms, yn, ync = (names(f"{p}_{s}") for s in ("xf", "sq", "mean", "var", "rms",
                                                                        "norm", "normc"))
        # the output has the scale's type (V); normalising in the stash type and casting to V
        # before the scale equals the spec when X and scale share a type, and keeps the fp32
        # maths of the model when a low-precision X meets an fp32 scale
        repl[i] = [
            helper.make_node("Cast", [x], [xf], to=stash, name=names(p + "/cast")),
            helper.make_node("Mul", [xf, xf], [sq], name=names(p + "/sq")),
            helper.make_node("ReduceMean", [sq, axes], [mean], keepdims=1, name=names(p + "/mean")),
            helper.make_node("Add", [mean, eps_c], [var], name=names(p + "/eps")),
            helper.make_node("Sqrt", [var], [rms], name=names(p + "/sqrt")),
            helper.make_node("Div", [xf, rms], [yn], name=names(p + "/div")),
            helper.make_node("CastLike", [yn, scale], [ync], name=names(p + "/castback")),
            helper.make_node("Mul", [ync, scale], list(node.output), name=names(p + "/scale")),
        ]
    _replace_nodes(g, repl)
    return len(repl)


def decompose_attention(model, head_dim: int, compute: torch.dtype = torch.float32) -> int:
    """Rewrite opset-23 ``Attention`` nodes (4-D q/k/v, no mask, no cache, not causal) as
    ``MatMul(q, k^T) * scale -> Softmax (fp32) -> MatMul(., v)``; returns how many."""
    from onnx import TensorProto, helper

    g, names, repl = model.graph, _Names(model.graph), {}
    low = compute != torch.float32
    for i, node in enumerate(g.node):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        extra = [n for n in node.input[3:] if n]
        if extra or len([o for o in node.output if o]) != 1 or _attr(node, "is_causal", 0) \
                or _attr(node, "softcap", 0.0) or _attr(node, "q_num_heads") is not None:
            raise NotImplementedError(f"Attention node {node.name!r}: only 4-D, unmasked, non-causal "
                                      f"attention without KV cache is decomposed")
        scale = _attr(node, "scale")
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        q, k, v = node.input[:3]
        p = names(node.name or "attention")
        sc = names(p + "_scale")
        g.initializer.append(helper.make_tensor(sc, TensorProto.FLOAT, [], [scale]))
        kt, s, sf, ss, pr, prc = (names(f"{p}_{x}") for x in ("kT", "qk", "qkf", "qks", "p", "pc"))
        nodes = [helper.make_node("Transpose", [k], [kt], perm=[0, 1, 3, 2], name=names(p + "/kT")),
                 helper.make_node("MatMul", [q, kt], [s], name=names(p + "/qk"))]
        if low:  # softmax statistics in fp32 (docs/design.md §4)
            nodes.append(helper.make_node("Cast", [s], [sf], to=TensorProto.FLOAT, name=names(p + "/up")))
        else:
            sf = s
        nodes += [helper.make_node("Mul", [sf, sc], [ss], name=names(p + "/scale")),
                  helper.make_node("Softmax", [ss], [pr], axis=-1, name=names(p + "/softmax"))]
        if low:
            nodes.append(helper.make_node("CastLike", [pr, v], [prc], name=names(p + "/down")))
        else:
            prc = pr
        nodes.append(helper.make_node("MatMul", [prc, v], [node.output[0]], name=names(p + "/pv")))
        repl[i] = nodes
    _replace_nodes(g, repl)
    return len(repl)


@functools.cache
def ort_supports_attention() -> bool | None:
    """Whether the installed onnxruntime executes an opset-23 ``Attention`` node on CPU
    (None: onnxruntime is not installed, so nothing can be checked here)."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 3, 8]) for n in "qkvy"]
    g = helper.make_graph([helper.make_node("Attention", ["q", "k", "v"], ["y"])], "probe", vi[:3], vi[3:])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    try:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 2, 3, 8)).astype(np.float32)
        y = s.run(None, {"q": x, "k": x, "v": x})[0]
    except Exception:  # not implemented in this onnxruntime
        return False
    return bool(np.isfinite(y).all())


# --------------------------------------------------------------------------- FP8 Q/DQ
def _name_scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(ast.literal_eval(p.value))
            except (ValueError, SyntaxError):
                return []
    return []


def _fp8_targets(model: nn.Module) -> dict[str, nn.Module]:
    from .quant import default_module_filter

    return {n: mod for n, mod in model.named_modules() if default_module_filter(mod, n)}


def insert_fp8_qdq(model_proto, targets: Mapping[str, nn.Module], act_amax: Mapping[str, float],
                   base: torch.dtype, prefix: str = "model.") -> dict[str, Any]:
    """Put FP8 Q/DQ around the MatMuls of the target linears.

    Args:
        model_proto: the exported graph (modified in place).
        targets: ``{fqn: module}`` of the linears to quantize (``.weight [Dout, Din]``).
        act_amax: calibrated ``max |x|`` of each target's input.
        base: the graph's float type (scales are stored in it: a DequantizeLinear outputs the
            type of its scale, which TensorRT's strongly typed mode follows).
    Returns:
        a report ``{"quantized": [fqn, ...], "activation_scales": {fqn: s}, ...}``.
    """
    from onnx import TensorProto, helper

    g, names = model_proto.graph, _Names(model_proto.graph)
    inits = {i.name: i for i in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for n in node.input:
            uses[n] = uses.get(n, 0) + 1
    tiny = torch.finfo(base).tiny
    zp_scalar = names("fp8_zero_point")
    g.initializer.append(helper.make_tensor(zp_scalar, TensorProto.FLOAT8E4M3FN, [], b"\x00", raw=True))
    repl, report, w_done = {}, {"quantized": [], "activation_scales": {}}, {}
    for i, node in enumerate(g.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        fqn = next((s[len(prefix):] if s.startswith(prefix) else s for s in reversed(_name_scopes(node))
                    if (s[len(prefix):] if s.startswith(prefix) else s) in targets), None)
        if fqn is None:
            continue
        w = targets[fqn].weight.detach().float()  # [Dout, Din]
        init = inits[node.input[1]]
        if list(init.dims) != [w.shape[1], w.shape[0]]:
            continue  # a LoRA matmul in the same module scope
        w_t = _to_torch(init).float()
        if not torch.equal(w_t, w.t().to(w_t.dtype)) and not torch.equal(w_t, w.t().to(base).float()):
            continue
        # ---- weight: FP8 codes + per-output-channel scale (axis 1 of the [Din, Dout] MatMul B)
        key = init.name
        if key not in w_done:
            scale = (w_t.abs().amax(dim=0) / FP8_MAX).clamp_min(tiny).to(base)
            codes = (w_t / scale.float()[None, :]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            wq, ws, wz = names(key + "_fp8"), names(key + "_scale"), names(key + "_zero_point")
            g.initializer.extend([_tensor_proto(wq, codes), _tensor_proto(ws, scale),
                                  helper.make_tensor(wz, TensorProto.FLOAT8E4M3FN, [scale.numel()],
                                                     bytes(scale.numel()), raw=True)])
            w_done[key] = (wq, ws, wz)
        wq, ws, wz = w_done[key]
        # ---- activation: static per-tensor scale
        amax = float(act_amax.get(fqn, 0.0))
        if not amax > 0:
            raise ValueError(f"no calibration statistics for {fqn!r}: did the calibration run it?")
        a_scale = torch.tensor(max(amax / FP8_MAX, tiny)).to(base)
        xs = names(fqn + ".input_scale")
        g.initializer.append(_tensor_proto(xs, a_scale))
        p = names(f"{fqn}/fp8")
        xq, xdq, wdq = names(p + "_xq"), names(p + "_x"), names(p + "_w")
        repl[i] = [
            helper.make_node("QuantizeLinear", [node.input[0], xs, zp_scalar], [xq],
                             name=names(p + "/quant_x")),
            helper.make_node("DequantizeLinear", [xq, xs, zp_scalar], [xdq], name=names(p + "/dequant_x")),
            helper.make_node("DequantizeLinear", [wq, ws, wz], [wdq], axis=1, name=names(p + "/dequant_w")),
            helper.make_node("MatMul", [xdq, wdq], list(node.output), name=node.name),
        ]
        uses[key] -= 1
        report["quantized"].append(fqn)
        report["activation_scales"][fqn] = float(a_scale.float())
    _replace_nodes(g, repl)
    dead = {k for k in w_done if uses.get(k, 0) == 0}
    if dead:  # float weights now only live as FP8 codes
        keep = [i for i in g.initializer if i.name not in dead]
        del g.initializer[:]
        g.initializer.extend(keep)
    report["num_qdq_nodes"] = 3 * len(repl)
    report["weight_dtype"] = "float8e4m3fn"
    report["weight_granularity"] = "per-output-channel (DequantizeLinear axis=1 of MatMul B [Din, Dout])"
    report["activation_granularity"] = "per-tensor, static (calibrated amax / 448)"
    return report


def _calibrate(model: nn.Module, ins: Sequence[tuple[torch.Tensor, ...]], wrapper: type,
               targets: Mapping[str, nn.Module]) -> dict[str, float]:
    """``max |x|`` at the input of every target linear over calibration inputs of one graph."""
    amax: dict[str, float] = {}
    hooks = []
    for fqn, mod in targets.items():
        def hook(_mod, args, fqn=fqn):
            x = args[0].detach()
            amax[fqn] = max(amax.get(fqn, 0.0), float(x.abs().max()) if x.numel() else 0.0)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            w = wrapper(model)
            for x in ins:
                w(*x)
    finally:
        for h in hooks:
            h.remove()
    return amax


# --------------------------------------------------------------------------- dims, docs, metadata
def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _rename_dims(model_proto, graph_name: str) -> None:
    """Give the exporter's symbols (``s17``, ``2*hg``) the manifest's axis names."""
    g = model_proto.graph
    spec = {n: axes for n, axes, _, _ in _IO[graph_name]["inputs"] + _IO[graph_name]["outputs"]}
    mapping: dict[str, str] = {}
    for vi in list(g.input) + list(g.output):
        for d, axis in zip(vi.type.tensor_type.shape.dim, spec.get(vi.name, ())):
            if d.dim_param and d.dim_param != axis:
                mapping.setdefault(d.dim_param, axis)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]


def _io_spec(graph_name: str, model_proto, compute: torch.dtype) -> dict[str, list[dict[str, Any]]]:
    from onnx import TensorProto, helper

    g = model_proto.graph
    vis = {vi.name: vi for vi in list(g.input) + list(g.output)}
    out = {}
    for kind in ("inputs", "outputs"):
        rows = []
        for name, axes, dtype, doc in _IO[graph_name][kind]:
            vi = vis[name]
            vi.doc_string = doc
            elem = vi.type.tensor_type.elem_type
            want = _elem_type(compute) if dtype == "compute" else TensorProto.FLOAT
            if elem != want:
                raise RuntimeError(f"{graph_name}.{name}: exported dtype {TensorProto.DataType.Name(elem)} "
                                   f"!= expected {TensorProto.DataType.Name(want)}")
            rows.append(dict(name=name, dtype=helper.tensor_dtype_to_np_dtype(elem).name
                             if elem != TensorProto.BFLOAT16 else "bfloat16",
                             shape=_dims(vi), axes=list(axes), doc=doc))
        out[kind] = rows
    return out


def _save(model_proto, path: Path, external: bool) -> None:
    onnx = _onnx()
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model_proto, str(path))


def _init_bytes(model_proto) -> int:
    return sum(len(i.raw_data) for i in model_proto.graph.initializer)


# =========================================================================== export
@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    out_dir: Path
    reference_encoder: Path
    denoiser: Path
    manifest: dict[str, Any]
    seconds: float

    @property
    def attention(self) -> str:
        return self.manifest["attention"]


def _torch_export(module: nn.Module, args: tuple, names: list[str], outputs: list[str], opset: int,
                  dynamic_shapes: dict | None):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, None, input_names=names, output_names=outputs,
                                 dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                                 external_data=False, verbose=False)
    return prog.model_proto


def export_onnx(m: nn.Module, out_dir: str | os.PathLike, *, opset: int = 23, attention: str = "onnx",
                precision: str = "fp32", dynamic: bool = True, example: Mapping[str, Any] | None = None,
                fp8_base: str = "bf16", calibration: Sequence[Mapping[str, Any]] | None = None,
                external_data: bool | None = None,
                progress: Callable[[str], None] | None = None) -> OnnxExport:
    """Export ``reference_encoder.onnx`` and ``denoiser.onnx`` (plus ``manifest.json``).

    Args:
        m: a float :class:`WildActor` (export before :func:`quantize_model`;
            ``precision="fp8"`` puts explicit Q/DQ into the graph instead).
        out_dir: directory to write (created).
        opset: ONNX opset (>= 18; ``attention="onnx"`` needs 23).
        attention: ``"onnx"``: the opset-23 ``Attention`` op (TensorRT >= 10.14; onnxruntime 1.31
            runs it on CPU); falls back to ``"decomposed"`` with a warning when the installed
            onnxruntime cannot run it or ``opset < 23``.
            ``"decomposed"``: MatMul/Softmax/MatMul (any TensorRT 10.x).
        precision: ``"fp32" | "fp16" | "bf16"`` (weights and activations in that type; norms,
            modulation, softmax and RoPE keep fp32 as in the model) or ``"fp8"`` (the
            ``fp8_base`` graph plus FP8 Q/DQ on the block linears).
        dynamic: dynamic batch, frames, height, width, text length and reference tokens (else
            every size is fixed to the example's).
        example: ``dict(latents, timestep, context, refs)`` to trace with (default
            :func:`default_example`; every dynamic size must be >= 2).
        fp8_base: float type of the non-quantized ops of an FP8 export (``"bf16"``, ``"fp16"``,
            or ``"fp32"``, which onnxruntime on CPU can execute).
        calibration: model-level examples (like ``example``) for the FP8 activation scales;
            default the example at 5 timesteps in [0, 1000]. Random inputs give placeholder
            scales: calibrate on real latents/text for deployment.
        external_data: write weights to ``<graph>.onnx.data``; default when they pass 1 GiB.
        progress: callable receiving progress lines (e.g. ``print``).
    Returns:
        :class:`OnnxExport` (paths, manifest, seconds).
    """
    start = time.perf_counter()
    say = progress or (lambda s: logger.info(s))
    onnx = _onnx()
    cfg: WildActorConfig = m.cfg
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if attention not in ATTENTION_FORMS:
        raise ValueError(f"attention must be one of {ATTENTION_FORMS}, got {attention!r}")
    if fp8_base not in _DTYPES:
        raise ValueError(f"fp8_base must be one of {tuple(_DTYPES)}, got {fp8_base!r}")
    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset must be an int >= 18 (torch.onnx dynamo exporter), got {opset!r}")
    if precision == "fp8" and opset < 19:
        raise ValueError("float8 QuantizeLinear/DequantizeLinear need opset >= 19")
    from .quant import quantized_modules

    if quantized_modules(m):
        raise ValueError("export_onnx needs the float model: export before quantize_model(); "
                         "precision='fp8' inserts Q/DQ nodes into the graph instead")
    requested = attention
    notes: list[str] = []
    if attention == "onnx" and opset < 23:
        attention = "decomposed"
        notes.append(f"attention='onnx' needs opset 23 (got {opset}): exported in decomposed form")
    if attention == "onnx" and ort_supports_attention() is False:
        attention = "decomposed"
        notes.append("this onnxruntime cannot run the opset-23 Attention op: attention decomposed "
                     "into MatMul/Softmax/MatMul")
    elif attention == "onnx" and ort_supports_attention() is None:
        notes.append("onnxruntime is not installed: the Attention op is kept but could not be checked here")
    for n in notes:
        warnings.warn(n, stacklevel=2)
        say(f"NOTE: {n}")

    compute = _DTYPES[fp8_base if precision == "fp8" else precision]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = dict(example) if example is not None else default_example(cfg)

    # ---- the model to trace: a copy in the export dtype, reference backend (no Triton)
    was_training, backend = m.training, cfg.backend
    mx = m if m.dtype == compute else copy.deepcopy(m).to(compute)
    mx.eval()
    mx.set_backend("reference")
    try:
        ins = _graph_inputs(mx, example, compute)
        if dynamic:
            _check_example_sizes(ins)
        shapes = _dynamic_shapes(cfg) if dynamic else {ENCODER: None, DENOISER: None}
        protos, seconds = {}, {}
        for gname in (ENCODER, DENOISER):
            t0 = time.perf_counter()
            say(f"[export] tracing {gname} (torch.onnx dynamo, opset {opset}, {precision}) ...")
            wrapper = ReferenceEncoderGraph if gname == ENCODER else DenoiserGraph
            names = [n for n, *_ in _IO[gname]["inputs"]]
            outs = [n for n, *_ in _IO[gname]["outputs"]]
            protos[gname] = _torch_export(wrapper(mx), ins[gname], names, outs, opset, shapes[gname])
            seconds[gname] = time.perf_counter() - t0
            say(f"[export] {gname}: traced in {seconds[gname]:.1f} s")
    finally:
        mx.set_backend(backend)
        m.set_backend(backend)
        m.train(was_training)

    # ---- graph passes
    passes: dict[str, dict[str, Any]] = {g: {} for g in protos}
    fp8_reports: dict[str, Any] = {}
    if precision == "fp8":
        say("[export] calibrating FP8 activation scales ...")
        mc = m if m.dtype == torch.float32 else copy.deepcopy(m).float()
        mc.eval()
        mc.set_backend("reference")
        try:
            targets = _fp8_targets(mc)
            calib = list(calibration) if calibration is not None else [
                dict(example, timestep=torch.full((example["latents"].shape[0],), float(t)))
                for t in (0.0, 250.0, 500.0, 750.0, 1000.0)]
            cins = [_graph_inputs(mc, ex, torch.float32) for ex in calib]
            amax = {ENCODER: _calibrate(mc, [c[ENCODER] for c in cins], ReferenceEncoderGraph, targets),
                    DENOISER: _calibrate(mc, [c[DENOISER] for c in cins], DenoiserGraph, targets)}
        finally:
            mc.set_backend(backend)
            m.set_backend(backend)
    if attention == "onnx" and not any(n.op_type == "Attention" for n in protos[DENOISER].graph.node):
        # (the reference encoder of a 1-layer model has no attention at all: only its k/v are used)
        msg = "the exporter emitted no Attention op (SDPA was decomposed): the graphs are in decomposed form"
        warnings.warn(msg, stacklevel=2)
        say(f"NOTE: {msg}")
        notes.append(msg)
        attention = "decomposed"
    for gname, proto in protos.items():
        n_rms = decompose_rmsnorm(proto)
        n_att = sum(n.op_type == "Attention" for n in proto.graph.node)
        if attention == "decomposed":
            decompose_attention(proto, cfg.head_dim, compute)
        passes[gname].update(rmsnorm_decomposed=n_rms, attention_nodes=n_att)
        if precision == "fp8":
            rep = insert_fp8_qdq(proto, targets, amax[gname], compute)
            fp8_reports[gname] = rep
            say(f"[export] {gname}: FP8 Q/DQ on {len(rep['quantized'])} linears")
        _rename_dims(proto, gname)

    # ---- metadata, manifest, save, check
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "wildactor_kernels": wk.__version__}
    total = sum(_init_bytes(p) for p in protos.values())
    external = bool(external_data) if external_data is not None else total > EXTERNAL_DATA_THRESHOLD
    manifest: dict[str, Any] = dict(
        format="wildactor-onnx", version=MANIFEST_VERSION, config=cfg.to_dict(), precision=precision,
        compute_dtype=str(compute).replace("torch.", ""), attention=attention, attention_requested=requested,
        opset=opset, dynamic=dynamic, external_data=external,
        exporter="torch.onnx.export(dynamo=True) (torch.export, non-strict)", versions=versions,
        notes=notes, host=dict(
            patchify="patchify_references: [B, C, 1, h, w] -> [B, h/ph*w/pw, C*ph*pw], (c, ph, pw) order, "
                     "references concatenated in list order",
            rope="wildactor_kernels.irope_positions(TokenLayout((T/pt, H/ph, W/pw), refs), face_offset, "
                 "body_offset, spatial_shift) -> rope_cos_sin(pos, head_dim, theta); rows :num_video -> "
                 "cos_v/sin_v, rows num_video: -> cos_r/sin_r",
            cache="reference K/V rotated for video grid (T, Hg, Wg) can serve another grid after one "
                  "rotation of the keys by the position offset (see OnnxWildActor)"),
        graphs={})
    for gname, proto in protos.items():
        path = out / f"{gname}.onnx"
        io = _io_spec(gname, proto, compute)
        meta = {"wildactor.graph": gname, "wildactor.precision": precision, "wildactor.attention": attention,
                "wildactor.config": json.dumps(cfg.to_dict()), "wildactor.io": json.dumps(io)}
        if gname in fp8_reports:
            meta["wildactor.fp8"] = json.dumps({k: v for k, v in fp8_reports[gname].items()
                                                if k != "activation_scales"})
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        proto.doc_string = (f"WildActor {gname} ({precision}, attention={attention}); inputs/outputs "
                            f"documented in metadata 'wildactor.io' and manifest.json")
        proto.producer_name = "wildactor-kernels"
        proto.producer_version = wk.__version__
        nbytes = _init_bytes(proto)
        _save(proto, path, external)  # (moves the weights out of the proto when external)
        onnx.checker.check_model(str(path), full_check=True)
        ops: dict[str, int] = {}
        for n in proto.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        entry = dict(file=path.name, data_file=path.name + ".data" if external else None,
                     trace_seconds=round(seconds[gname], 2), op_counts=dict(sorted(ops.items())),
                     **passes[gname], **io)
        if gname in fp8_reports:
            entry["fp8"] = fp8_reports[gname]
        manifest["graphs"][gname] = entry
        say(f"[export] wrote {path} ({sum(ops.values())} nodes, {nbytes / 2**20:.1f} MiB weights"
            f"{', external data' if external else ''})")
    elapsed = time.perf_counter() - start
    manifest["export_seconds"] = round(elapsed, 2)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"[export] done in {elapsed:.1f} s -> {out}")
    return OnnxExport(out, out / f"{ENCODER}.onnx", out / f"{DENOISER}.onnx", manifest, elapsed)


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
        return _video_grid(self.cfg, latent_shape)

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
        from .wildactor import RefCache, Reference

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
        """Stacked ``ref_k, ref_v [L, b, Nr, H, D]`` of a cache, rotated for ``grid``.

        One cache serves every denoising step, so the bound copy is kept for the next call with
        the same cache object (held by reference; treat a cache as immutable once made).
        """
        from .wildactor import RefCache

        if not isinstance(cache, RefCache):
            raise TypeError(f"ref_cache must be a RefCache, got {type(cache).__name__}")
        if cache.num_layers == 0:
            return self._empty_kv(b)
        if cache.num_layers != self.cfg.num_layers:
            raise ValueError(f"ref_cache has {cache.num_layers} layers; the graphs have "
                             f"{self.cfg.num_layers}")
        if memo and getattr(self, "_bound_src", None) is cache and self._bound_key == (grid, b):
            return self._bound
        full = cache.expand(b)
        ks = [k.to(self.device) for k in full.k]
        ks = _rebind_keys(ks, self.cfg, full.num_ref, full.video_grid, grid)
        k = torch.stack(ks).contiguous()
        v = torch.stack([t.to(self.device) for t in full.v]).contiguous()
        if memo:
            self._bound_src, self._bound_key, self._bound = cache, (grid, b), (k, v)
        return k, v

    def _empty_kv(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        z = torch.zeros(c.num_layers, b, 0, c.num_heads, c.head_dim, device=self.device)
        return z, z

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
            k, v = self._empty_kv(b)
        cos, sin = self.rope_tables(TokenLayout(grid))
        dev = self.device
        return self._denoise(latents.to(dev), t.to(dev).contiguous(), context.to(dev), k, v, cos, sin)


def _ort_dtype(type_str: str) -> torch.dtype:
    table = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
             "tensor(bfloat16)": torch.bfloat16}
    if type_str not in table:
        raise TypeError(f"unsupported graph I/O type {type_str}")
    return table[type_str]


class OnnxWildActor(TwoGraphRunner):
    """Run an :func:`export_onnx` directory with onnxruntime, behind the model's call.

    ``runner(latents, timestep, context, refs=None, ref_cache=None)`` and
    ``runner.encode_references(refs)`` behave like :class:`WildActor` (torch tensors in
    and out, CPU by default), so an export is checked against the PyTorch model on any
    machine and can drive :class:`FlowMatchSampler`. Positions and cos/sin are computed on
    the host by wildactor_kernels' own functions.

    Args:
        out_dir: the export directory (``manifest.json`` + both graphs).
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
        session_options: an ``onnxruntime.SessionOptions`` (FP8 graphs default to basic graph
            optimisations: onnxruntime's extended QDQ fusions reject float8 MatMul inputs).
    """

    def __init__(self, out_dir: str | os.PathLike, providers: Sequence[Any] | None = None,
                 session_options: Any = None):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("OnnxWildActor needs onnxruntime: pip install onnxruntime") from e
        self.out_dir = Path(out_dir)
        self._setup(load_manifest(self.out_dir))
        if self.manifest["compute_dtype"] == "bfloat16":
            raise TypeError("this export runs in bfloat16, which onnxruntime's Python API cannot feed "
                            "(no numpy bfloat16): check fp32/fp16 (or fp8 with fp8_base='fp32') exports "
                            "with onnxruntime, bf16 ones with TensorRTWildActor")
        so = session_options
        if so is None:
            so = ort.SessionOptions()
            if self.precision == "fp8":
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.sessions = {g: ort.InferenceSession(str(self.out_dir / self.manifest["graphs"][g]["file"]), so,
                                                 providers=providers) for g in (ENCODER, DENOISER)}
        self._in = {g: {i.name: _ort_dtype(i.type) for i in s.get_inputs()} for g, s in self.sessions.items()}

    def _run(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        types = self._in[graph]
        arrays = {n: t.detach().to("cpu", types[n]).contiguous().numpy() for n, t in feeds.items()}
        return [torch.from_numpy(a) for a in self.sessions[graph].run(None, arrays)]

    def _encode(self, ref_patches, cos_r, sin_r):
        b0 = self.sessions[ENCODER].get_inputs()[0].shape[0]
        b = ref_patches.shape[0]
        if isinstance(b0, int) and b0 != b and b == 1:  # a static export: run at its batch, keep one
            ref_patches = ref_patches.expand(b0, -1, -1)
        k, v = self._run(ENCODER, dict(ref_patches=ref_patches, cos_r=cos_r, sin_r=sin_r))
        return k[:, :b], v[:, :b]

    def _denoise(self, latents, timestep, context, ref_k, ref_v, cos_v, sin_v):
        return self._run(DENOISER, dict(latents=latents, timestep=timestep, context=context, ref_k=ref_k,
                                        ref_v=ref_v, cos_v=cos_v, sin_v=sin_v))[0]


# =========================================================================== command line
def register_cli(subparsers) -> None:
    """Add ``wildactor export`` to an ``argparse`` subparsers object (see ``model/cli.py``).

    ``wildactor export --preset tiny --out DIR [--engine] [--fp8]``: export both graphs, check
    them with onnxruntime against the PyTorch model, and optionally build TensorRT engines.
    """
    s = subparsers.add_parser("export", help="export ONNX graphs (and TensorRT engines) of a WildActor model")
    s.add_argument("--preset", default="tiny", help="config preset (default tiny)")
    s.add_argument("--weights", default=None, help="directory written by WildActor.save_pretrained "
                   "(default: random weights)")
    s.add_argument("--layers", type=int, default=None, help="override num_layers (e.g. 2 for a quick export "
                   "of a big preset)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="graph precision (default fp32; bf16 base with --fp8)")
    s.add_argument("--fp8", action="store_true",
                   help="FP8 Q/DQ on the block linears (TensorRT strongly typed)")
    s.add_argument("--attention", default="onnx", choices=list(ATTENTION_FORMS),
                   help="opset-23 Attention op (TensorRT >= 10.14) or MatMul/Softmax (any TensorRT 10)")
    s.add_argument("--opset", type=int, default=23)
    s.add_argument("--static", action="store_true",
                   help="fixed shapes (the example's) instead of dynamic axes")
    s.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch check")
    s.add_argument("--engine", action="store_true", help="also build TensorRT engines (needs tensorrt + GPU)")
    s.add_argument("--workspace-gb", type=float, default=8.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .quant import sqnr_db
    from .wildactor import WildActor

    torch.manual_seed(args.seed)
    if args.weights:
        m = WildActor.from_pretrained(args.weights, device="cpu", dtype=torch.float32)
    else:
        over = {"num_layers": args.layers} if args.layers else {}
        m = WildActor(WildActorConfig.preset(args.preset, **over))
    m.eval()
    precision = "fp8" if args.fp8 else (args.precision or "fp32")
    fp8_base = args.precision or "bf16"
    print(f"wildactor export: preset={args.preset}{' (' + args.weights + ')' if args.weights else ''}, "
          f"{m.num_parameters() / 1e6:.2f}M backbone params, precision={precision}"
          f"{' on ' + fp8_base if args.fp8 else ''}, attention={args.attention}, opset {args.opset}")
    res = export_onnx(m, args.out, opset=args.opset, attention=args.attention, precision=precision,
                      dynamic=not args.static, fp8_base=fp8_base, progress=print)
    print(f"export: {res.seconds:.1f} s, attention form used: {res.attention}")
    ok = True
    if not args.no_check:
        if res.manifest["compute_dtype"] == "bfloat16":
            print("check: skipped (bf16 graphs cannot be fed through onnxruntime's Python API; build an "
                  "engine and compare with TensorRTWildActor on a GPU)")
        else:
            runner = OnnxWildActor(args.out)
            ex = default_example(m.cfg, seed=args.seed + 1)
            ex2 = default_example(m.cfg, batch=1, frames=3, grid=(3, 5), text_len=3, seed=args.seed + 2)
            print(f"{'check (onnxruntime vs PyTorch)':<44} {'max |err|':>10} {'SQNR dB':>8}")
            for name, e, refs in (("refs, example size", ex, ex["refs"]), ("no refs, example size", ex, None),
                                  ("refs, other size (B1 T3 6x10)", ex2, ex2["refs"])):
                with torch.no_grad():
                    want = m(e["latents"], e["timestep"], e["context"], refs=refs)
                got = runner(e["latents"], e["timestep"], e["context"], refs=refs).float()
                err = (got - want).abs().max().item()
                print(f"  {name:<42} {err:>10.2e} {sqnr_db(want, got):>8.1f}")
                if precision == "fp8":
                    ok &= sqnr_db(want, got) > 25.0
                else:
                    ok &= err <= (1e-3 if precision == "fp32" else 5e-2)
            print(f"check: {'OK' if ok else 'MISMATCH'}")
    if args.engine:
        from .tensorrt import build_engines

        small = dict(frames=(1, 4, 8), height=(2, 16, 32), width=(2, 16, 32), text_len=(1, 16, 64),
                     num_ref=(1, 32, 64))
        try:
            build_engines(args.out, args.out, workspace_gb=args.workspace_gb, log=print,
                          **(small if args.preset == "tiny" else {}))
        except ImportError as e:
            print(f"engine: not built: {e}")
            return 2
        print(f"engines written to {args.out}; run them with model.TensorRTWildActor({args.out!r})")
    return 0 if ok else 1
