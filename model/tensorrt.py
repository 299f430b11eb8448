"""TensorRT engines for the two WildActor graphs, and a runner behind the model's call.

Written against the TensorRT 10.x Python API (``tensorrt`` is imported lazily; nothing here
was executed on a machine with TensorRT when it was written, see ``docs/deployment.md``):

- :func:`build_engine`: ``OnnxParser.parse_from_file`` (handles ONNX external data), one
  optimization profile from ``min/opt/max`` shapes, ``build_serialized_network``. FP8 and
  low-precision ONNX graphs build a *strongly typed* network (the graph's types, Q/DQ
  included, are the engine's); an fp32 graph built with ``precision="fp16"/"bf16"`` uses the
  builder flags of a weakly typed network instead (deprecated since TensorRT 10.12; export in
  the target precision to stay strongly typed).
- :func:`engine_shapes`: the profile shapes of both graphs from frame/size/text/reference ranges.
- :func:`build_engines`: both engines of an :func:`export_onnx` directory plus the manifest.
- :class:`TensorRTWildActor`: runs both engines with torch CUDA tensors bound as I/O
  (``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on the current stream),
  with the host half (patchify, I-RoPE tables, reference cache) shared with
  :class:`wildactor_kernels.model.OnnxWildActor`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .export.contract import DENOISER, ENCODER, MANIFEST, PRECISIONS
from .export.runner import TwoGraphRunner, load_manifest

__all__ = ["build_engine", "build_engines", "engine_shapes", "TensorRTWildActor", "ENGINE_SUFFIX"]

ENGINE_SUFFIX = ".engine"
Shapes = Mapping[str, Sequence[int]]


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(
            "TensorRT is not installed: pip install tensorrt (10.x, needs an NVIDIA GPU and driver), "
            "or pip install wildactor-kernels[trt]. The ONNX graphs themselves run anywhere with "
            "wildactor_kernels.model.OnnxWildActor.") from e
    return trt


# =========================================================================== profiles
def engine_shapes(manifest_or_dir: Mapping[str, Any] | str | os.PathLike, *,
                  batch: Sequence[int] = (1, 2, 2), frames: Sequence[int] = (1, 21, 21),
                  height: Sequence[int] = (16, 60, 90), width: Sequence[int] = (16, 104, 160),
                  text_len: Sequence[int] = (1, 512, 512), num_ref: Sequence[int] = (1, 4400, 4400),
                  denoiser_min_ref: int = 0) -> dict[str, tuple[dict, dict, dict]]:
    """``(min, opt, max)`` input shapes of both graphs for :func:`build_engine`.

    Each range is ``(min, opt, max)`` in latent units (``frames/height/width`` of the video
    latents, ``num_ref`` reference tokens). The denoiser's reference axis starts at
    ``denoiser_min_ref`` (0: generation without references uses the same engine).
    The defaults cover Wan 480p/720p-class latents with two CFG branches.
    """
    man = load_manifest(manifest_or_dir) if not isinstance(manifest_or_dir, Mapping) else manifest_or_dir
    c = man["config"]
    pt, ph, pw = c["patch_size"]
    heads, hd, layers = c["num_heads"], c["dim"] // c["num_heads"], c["num_layers"]
    pairs = hd // 2
    out: dict[str, list[dict]] = {ENCODER: [], DENOISER: []}
    for i in range(3):
        b, f, h, w, lt, nr = (int(r[i]) for r in (batch, frames, height, width, text_len, num_ref))
        if f % pt or h % ph or w % pw:
            raise ValueError(f"frames/height/width {(f, h, w)} must be multiples of the patch {(pt, ph, pw)}")
        nv = (f // pt) * (h // ph) * (w // pw)
        nr_d = max(denoiser_min_ref, nr) if i else denoiser_min_ref
        out[ENCODER].append({"ref_patches": (b, nr, c["in_channels"] * ph * pw), "cos_r": (nr, pairs),
                             "sin_r": (nr, pairs)})
        out[DENOISER].append({"latents": (b, c["in_channels"], f, h, w), "timestep": (b,),
                              "context": (b, lt, c["text_dim"]),
                              "ref_k": (layers, b, nr_d, heads, hd), "ref_v": (layers, b, nr_d, heads, hd),
                              "cos_v": (nv, pairs), "sin_v": (nv, pairs)})
    return {g: tuple(v) for g, v in out.items()}


# =========================================================================== build
def _onnx_precision(onnx_path: Path) -> str | None:
    man = onnx_path.parent / MANIFEST
    if man.exists():
        try:
            return json.loads(man.read_text())["precision"]
        except (KeyError, ValueError):
            return None
    return None


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, precision: str = "bf16",
                 min_shapes: Shapes | None = None, opt_shapes: Shapes | None = None,
                 max_shapes: Shapes | None = None, *, workspace_gb: float = 8.0,
                 strongly_typed: bool | None = None, tf32: bool = True, verbose: bool = False,
                 log: Callable[[str], None] | None = print) -> Path:
    """Build and serialize a TensorRT engine from one ONNX graph.

    Args:
        onnx_path: ``reference_encoder.onnx`` or ``denoiser.onnx`` (external data beside it).
        engine_path: where to write the serialized engine.
        precision: ``"fp32" | "fp16" | "bf16" | "fp8"``: the precision the graph was exported in
            (strongly typed build) or, for an fp32 graph, the reduced precision the builder may
            pick (weakly typed ``BuilderFlag.FP16/BF16``).
        min_shapes, opt_shapes, max_shapes: ``{input name: shape}`` of the optimization profile
            (see :func:`engine_shapes`); required for every input with a dynamic axis.
        workspace_gb: workspace memory pool limit.
        strongly_typed: force the network mode; default strongly typed unless an fp32 graph is
            built for fp16/bf16.
        tf32: allow TF32 for fp32 layers (turn off to compare fp32 engines tightly).
    Returns:
        ``engine_path``.
    """
    trt = _trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be fp32, fp16, bf16 or fp8, got {precision!r}")
    exported = _onnx_precision(onnx_path) or precision
    if precision == "fp8" and exported != "fp8":
        raise ValueError(f"{onnx_path} was exported as {exported!r}: FP8 engines need the Q/DQ graph of "
                         f"export_onnx(..., precision='fp8')")
    if strongly_typed is None:
        strongly_typed = not (exported == "fp32" and precision in ("fp16", "bf16"))
    say = log or (lambda s: None)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        errors = "\n".join(e.desc() if hasattr(e, "desc") else str(e) for e in errs)
        hint = ""
        if "Attention" in errors:
            hint = ("\nThis TensorRT has no importer for the opset-23 Attention op (added in 10.14): "
                    "re-export with export_onnx(..., attention='decomposed').")
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}{hint}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strongly_typed:
        flag = {"fp16": "FP16", "bf16": "BF16"}.get(precision)
        if flag is not None:
            if not hasattr(trt.BuilderFlag, flag):
                raise RuntimeError(f"this TensorRT ({trt.__version__}) has no BuilderFlag.{flag} (weak "
                                   f"typing was removed): export the graphs with precision={precision!r}")
            config.set_flag(getattr(trt.BuilderFlag, flag))
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)

    profile = builder.create_optimization_profile()
    missing = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        name, dims = tensor.name, tuple(tensor.shape)
        shapes = [s.get(name) if s is not None else None for s in (min_shapes, opt_shapes, max_shapes)]
        if any(s is None for s in shapes):
            if any(d < 0 for d in dims):
                missing.append(f"{name} {dims}")
            continue
        profile.set_shape(name, *(tuple(int(d) for d in s) for s in shapes))
    if missing:
        raise ValueError(f"no min/opt/max shapes for dynamic inputs: {', '.join(missing)} "
                         f"(see wildactor_kernels.model.tensorrt.engine_shapes)")
    config.add_optimization_profile(profile)

    mode = "strongly typed" if strongly_typed else f"weakly typed + {precision} flag"
    say(f"[trt] building {engine_path.name} from {onnx_path.name} ({mode}, TensorRT {trt.__version__}) ...")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with open(engine_path, "wb") as f:
        f.write(memoryview(serialized))
    say(f"[trt] wrote {engine_path} in {time.perf_counter() - t0:.1f} s")
    return engine_path


def build_engines(onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike | None = None,
                  precision: str | None = None, shapes: Mapping[str, tuple] | None = None,
                  workspace_gb: float = 8.0, log: Callable[[str], None] | None = print,
                  **shape_ranges) -> dict[str, Path]:
    """Build ``reference_encoder.engine`` and ``denoiser.engine`` for an export directory.

    ``precision`` defaults to the export's; ``shapes`` (``{graph: (min, opt, max)}``) defaults
    to :func:`engine_shapes` with ``shape_ranges``. The manifest is copied next to the engines
    (with the profiles used) so :class:`TensorRTWildActor` needs only ``engine_dir``.
    """
    trt = _trt()
    onnx_dir = Path(onnx_dir)
    engine_dir = Path(engine_dir) if engine_dir is not None else onnx_dir
    man = load_manifest(onnx_dir)
    precision = precision or man["precision"]
    shapes = dict(shapes) if shapes is not None else engine_shapes(man, **shape_ranges)
    out = {}
    for g in (ENCODER, DENOISER):
        mn, op, mx = shapes[g]
        out[g] = build_engine(onnx_dir / man["graphs"][g]["file"], engine_dir / f"{g}{ENGINE_SUFFIX}",
                              precision, mn, op, mx, workspace_gb=workspace_gb, log=log)
    man = dict(man, engines=dict(tensorrt=str(trt.__version__), precision=precision,
                                 files={g: p.name for g, p in out.items()},
                                 profiles={g: [{k: list(v) for k, v in s.items()} for s in shapes[g]]
                                           for g in shapes}))
    engine_dir.mkdir(parents=True, exist_ok=True)
    (engine_dir / MANIFEST).write_text(json.dumps(man, indent=2) + "\n")
    return out


# =========================================================================== runner
def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool, trt.DataType.INT8: torch.int8}
    for name, td in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("FP8", torch.float8_e4m3fn)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = td
    if dt not in table:
        raise TypeError(f"unsupported TensorRT I/O type {dt}")
    return table[dt]


class _Engine:
    """One deserialized engine + execution context with named torch bindings."""

    def __init__(self, trt, runtime, path: Path, device: torch.device):
        self.trt, self.path, self.device = trt, path, device
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (built with another TensorRT "
                               f"version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        # TensorRT wants a valid address even for an empty tensor (no references)
        self._dummy = torch.empty(256, dtype=torch.uint8, device=device)

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self._dummy.data_ptr()

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        keep = []
        for name in self.inputs:
            t = feeds[name].to(self.device, self.dtypes[name]).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"{self.path.name}: input {name} shape {tuple(t.shape)} is outside the "
                                 f"engine's optimization profile")
            self.context.set_tensor_address(name, self._address(t))
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            o = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, self._address(o))
            outs.append(o)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path.name}: execute_async_v3 failed")
        # inputs stay referenced until the stream has consumed them
        ev = torch.cuda.Event()
        ev.record(stream)
        self._inflight = (ev, keep)
        return outs


class TensorRTWildActor(TwoGraphRunner):
    """Run the two engines of :func:`build_engines` behind the model's call.

    ``runner(latents, timestep, context, refs=None, ref_cache=None)`` and
    ``runner.encode_references(refs)``, with torch CUDA tensors in and out (bound directly as
    the engines' I/O, executed on the current CUDA stream).

    Args:
        engine_dir: directory with ``reference_encoder.engine``, ``denoiser.engine`` and
            ``manifest.json``.
        device: CUDA device (default the current one).
    """

    def __init__(self, engine_dir: str | os.PathLike, device: torch.device | str | None = None):
        trt = _trt()
        if not torch.cuda.is_available():
            raise RuntimeError("TensorRTWildActor needs a CUDA device")
        self.engine_dir = Path(engine_dir)
        man = load_manifest(self.engine_dir)
        self._setup(man)
        self._device = torch.device(device) if device is not None else torch.device("cuda",
                                                                                    torch.cuda.current_device())
        files = man.get("engines", {}).get("files", {g: f"{g}{ENGINE_SUFFIX}" for g in (ENCODER, DENOISER)})
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(self._device):
            self.engines = {g: _Engine(trt, self.runtime, self.engine_dir / files[g], self._device)
                            for g in (ENCODER, DENOISER)}

    @property
    def device(self) -> torch.device:
        return self._device

    def _encode(self, ref_patches, cos_r, sin_r):
        k, v = self.engines[ENCODER](dict(ref_patches=ref_patches, cos_r=cos_r, sin_r=sin_r))
        return k, v

    def _denoise(self, latents, timestep, context, ref_k, ref_v, cos_v, sin_v):
        return self.engines[DENOISER](dict(latents=latents, timestep=timestep, context=context, ref_k=ref_k,
                                           ref_v=ref_v, cos_v=cos_v, sin_v=sin_v))[0]
