"""ONNX export of WildActor as two graphs (:func:`export_onnx`), an onnxruntime runner behind the
model's call (:class:`OnnxWildActor`), and the ``wildactor export`` command (:func:`register_cli`).

The graphs and their inputs are described in :mod:`.contract`; the passes run on them after
tracing in :mod:`.passes`; the host half of the runners in :mod:`.runner`.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (``torch.export``, non-strict) with
``torch.export.Dim`` dynamic axes. It handles the symbolic shapes of this model (frame and grid
sizes flow through patchify/unpatchify reshapes) and lowers SDPA to the opset-23 ``Attention``
op; the TorchScript exporter also traces it but is deprecated and only emits MatMul/Softmax.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import wildactor_kernels as wk

from ..config import WildActorConfig
from .contract import (
    ATTENTION_FORMS,
    COMPUTE_DTYPES,
    DENOISER,
    ENCODER,
    EXTERNAL_DATA_THRESHOLD,
    GRAPH_IO,
    MANIFEST,
    MANIFEST_VERSION,
    PRECISIONS,
    DenoiserGraph,
    ReferenceEncoderGraph,
    check_example_sizes,
    default_example,
    dynamic_shapes,
    graph_inputs,
)
from .passes import (
    calibrate,
    decompose_attention,
    decompose_rmsnorm,
    fp8_targets,
    initializer_bytes,
    insert_fp8_qdq,
    io_spec,
    ort_supports_attention,
    rename_dims,
    require_onnx,
    save_model,
)
from .runner import TwoGraphRunner, load_manifest

logger = logging.getLogger("wildactor_kernels")

__all__ = ["OnnxExport", "export_onnx", "OnnxWildActor", "register_cli"]


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
                progress: bool | Callable[[str], None] | None = None) -> OnnxExport:
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
        progress: ``None`` / ``False`` (default): quiet, the stage lines go to the
            ``wildactor_kernels`` logger (INFO). ``True`` (what ``wildactor export`` passes): a
            tqdm bar over the stages (trace each graph, FP8 calibration, graph passes, save and
            check each graph) on stderr, left in place, and the stage lines on stdout. A callable
            (e.g. ``print``): receives the stage lines, no bar.
    Returns:
        :class:`OnnxExport` (paths, manifest, seconds).
    """
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise TypeError(f"progress must be a bool, None or a callable taking a line, got "
                        f"{type(progress).__name__}")
    if callable(progress):
        say = progress
    elif progress:
        def say(line: str) -> None:  # above the bar, which stays at the bottom of the terminal
            tqdm.write(line, file=sys.stdout)
    else:
        def say(line: str) -> None:
            logger.info(line)
    # stages: trace both graphs, [FP8 calibration], passes on both graphs, save + check both
    total = 2 + (precision == "fp8") + 2 + 2
    with tqdm(total=total, desc="export: ", unit="stage", leave=True, file=sys.stderr,
              disable=progress is not True,
              bar_format="{desc}{n_fmt}/{total_fmt} stages |{bar:20}| [{elapsed}]") as bar:
        return _export_onnx(m, out_dir, opset=opset, attention=attention, precision=precision,
                            dynamic=dynamic, example=example, fp8_base=fp8_base, calibration=calibration,
                            external_data=external_data, say=say, bar=bar)


class _Stage:
    """One stage of the export: names it on the bar while it runs, counts it when it ends."""

    def __init__(self, bar: tqdm, name: str):
        self.bar, self.name = bar, name

    def __enter__(self):
        self.bar.set_description(f"export: {self.name}")
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.bar.update(1)
        return False


def _export_onnx(m: nn.Module, out_dir, *, opset, attention, precision, dynamic, example, fp8_base,
                 calibration, external_data, say: Callable[[str], None], bar: tqdm) -> OnnxExport:
    start = time.perf_counter()
    onnx = require_onnx()
    cfg: WildActorConfig = m.cfg
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if attention not in ATTENTION_FORMS:
        raise ValueError(f"attention must be one of {ATTENTION_FORMS}, got {attention!r}")
    if fp8_base not in COMPUTE_DTYPES:
        raise ValueError(f"fp8_base must be one of {tuple(COMPUTE_DTYPES)}, got {fp8_base!r}")
    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset must be an int >= 18 (torch.onnx dynamo exporter), got {opset!r}")
    if precision == "fp8" and opset < 19:
        raise ValueError("float8 QuantizeLinear/DequantizeLinear need opset >= 19")
    from ..quant import quantized_modules

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

    compute = COMPUTE_DTYPES[fp8_base if precision == "fp8" else precision]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = dict(example) if example is not None else default_example(cfg)

    # ---- the model to trace: a copy in the export dtype, reference backend (no Triton)
    was_training, backend = m.training, cfg.backend
    mx = m if m.dtype == compute else copy.deepcopy(m).to(compute)
    mx.eval()
    mx.set_backend("reference")
    try:
        ins = graph_inputs(mx, example, compute)
        if dynamic:
            check_example_sizes(ins)
        shapes = dynamic_shapes(cfg) if dynamic else {ENCODER: None, DENOISER: None}
        protos, seconds = {}, {}
        for gname in (ENCODER, DENOISER):
            t0 = time.perf_counter()
            say(f"[export] tracing {gname} (torch.onnx dynamo, opset {opset}, {precision}) ...")
            wrapper = ReferenceEncoderGraph if gname == ENCODER else DenoiserGraph
            names = [n for n, *_ in GRAPH_IO[gname]["inputs"]]
            outs = [n for n, *_ in GRAPH_IO[gname]["outputs"]]
            with _Stage(bar, f"trace {gname}"):
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
            targets = fp8_targets(mc)
            calib = list(calibration) if calibration is not None else [
                dict(example, timestep=torch.full((example["latents"].shape[0],), float(t)))
                for t in (0.0, 250.0, 500.0, 750.0, 1000.0)]
            with _Stage(bar, "fp8 calibration"):
                cins = [graph_inputs(mc, ex, torch.float32) for ex in calib]
                amax = {ENCODER: calibrate(mc, [c[ENCODER] for c in cins], ReferenceEncoderGraph, targets),
                        DENOISER: calibrate(mc, [c[DENOISER] for c in cins], DenoiserGraph, targets)}
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
        with _Stage(bar, f"passes {gname}"):
            n_rms = decompose_rmsnorm(proto)
            n_att = sum(n.op_type == "Attention" for n in proto.graph.node)
            if attention == "decomposed":
                decompose_attention(proto, cfg.head_dim, compute)
            passes[gname].update(rmsnorm_decomposed=n_rms, attention_nodes=n_att)
            if precision == "fp8":
                rep = insert_fp8_qdq(proto, targets, amax[gname], compute)
                fp8_reports[gname] = rep
            rename_dims(proto, gname)
        if precision == "fp8":
            say(f"[export] {gname}: FP8 Q/DQ on {len(rep['quantized'])} linears")

    # ---- metadata, manifest, save, check
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "wildactor_kernels": wk.__version__}
    total = sum(initializer_bytes(p) for p in protos.values())
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
        io = io_spec(gname, proto, compute)
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
        nbytes = initializer_bytes(proto)
        with _Stage(bar, f"save + check {gname}"):
            save_model(proto, path, external)  # (moves the weights out of the proto when external)
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
    bar.set_description("export: done")
    say(f"[export] done in {elapsed:.1f} s -> {out}")
    return OnnxExport(out, out / f"{ENCODER}.onnx", out / f"{DENOISER}.onnx", manifest, elapsed)


# =========================================================================== onnxruntime runner
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
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the export, check and engine stages; they go to stderr)")
    s.set_defaults(func=_cmd_export)


def _bar(desc: str, total: int, show: bool) -> tqdm:
    """A stage bar of ``wildactor export`` on stderr, left in place when done."""
    return tqdm(total=total, desc=f"{desc}: ", unit="stage", leave=True, file=sys.stderr, disable=not show,
                bar_format="{desc}{n_fmt}/{total_fmt} stages |{bar:20}| [{elapsed}]")


def _cmd_export(args) -> int:
    from ..quant import sqnr_db
    from ..wildactor import WildActor

    show = not getattr(args, "no_progress", False)

    def say(line: str) -> None:  # a line above the bars (which stay at the bottom of the terminal)
        tqdm.write(line, file=sys.stdout)

    torch.manual_seed(args.seed)
    if args.weights:
        m = WildActor.from_pretrained(args.weights, device="cpu", dtype=torch.float32)
    else:
        over = {"num_layers": args.layers} if args.layers else {}
        m = WildActor(WildActorConfig.preset(args.preset, **over))
    m.eval()
    precision = "fp8" if args.fp8 else (args.precision or "fp32")
    fp8_base = args.precision or "bf16"
    source = f"weights {args.weights}" if args.weights else f"preset={args.preset} (random weights)"
    print(f"wildactor export: {source}, {m.cfg.num_layers} layers, "
          f"{m.num_parameters() / 1e6:.2f}M backbone params, precision={precision}"
          f"{' on ' + fp8_base if args.fp8 else ''}, attention={args.attention}, opset {args.opset}")
    res = export_onnx(m, args.out, opset=args.opset, attention=args.attention, precision=precision,
                      dynamic=not args.static, fp8_base=fp8_base, progress=True if show else print)
    print(f"export: {res.seconds:.1f} s, attention form used: {res.attention}")
    ok = True
    if not args.no_check:
        if res.manifest["compute_dtype"] == "bfloat16":
            print("check: skipped (bf16 graphs cannot be fed through onnxruntime's Python API; build an "
                  "engine and compare with TensorRTWildActor on a GPU)")
        else:
            ex = default_example(m.cfg, seed=args.seed + 1)
            ex2 = default_example(m.cfg, batch=1, frames=3, grid=(3, 5), text_len=3, seed=args.seed + 2)
            cases = (("refs, example size", ex, ex["refs"]), ("no refs, example size", ex, None),
                     ("refs, other size (B1 T3 6x10)", ex2, ex2["refs"]))
            with _bar("onnxruntime check", 1 + len(cases), show) as bar:
                bar.set_description("onnxruntime check: load sessions")
                runner = OnnxWildActor(args.out)
                bar.update(1)
                say(f"{'check (onnxruntime vs PyTorch)':<44} {'max |err|':>10} {'SQNR dB':>8}")
                for name, e, refs in cases:
                    bar.set_description(f"onnxruntime check: {name}")
                    with torch.no_grad():
                        want = m(e["latents"], e["timestep"], e["context"], refs=refs)
                    got = runner(e["latents"], e["timestep"], e["context"], refs=refs).float()
                    err = (got - want).abs().max().item()
                    say(f"  {name:<42} {err:>10.2e} {sqnr_db(want, got):>8.1f}")
                    if precision == "fp8":
                        ok &= sqnr_db(want, got) > 25.0
                    else:
                        ok &= err <= (1e-3 if precision == "fp32" else 5e-2)
                    bar.update(1)
                bar.set_description("onnxruntime check: done")
            print(f"check: {'OK' if ok else 'MISMATCH'}")
    if args.engine:
        from ..tensorrt import build_engines

        small = dict(frames=(1, 4, 8), height=(2, 16, 32), width=(2, 16, 32), text_len=(1, 16, 64),
                     num_ref=(1, 32, 64))
        with _bar("TensorRT engines", 2, show) as bar:
            def log(line: str) -> None:  # build_engines' lines: "[trt] building X ..." / "[trt] wrote X"
                if line.startswith("[trt] building "):
                    bar.set_description(f"TensorRT engines: build {line.split()[2].split('.')[0]}")
                say(line)
                if line.startswith("[trt] wrote "):
                    bar.update(1)

            try:
                build_engines(args.out, args.out, workspace_gb=args.workspace_gb, log=log,
                              **(small if args.preset == "tiny" and not args.weights else {}))
            except ImportError as e:
                print(f"engine: not built: {e}")
                return 2
            bar.set_description("TensorRT engines: done")
        print(f"engines written to {args.out}; run them with model.TensorRTWildActor({args.out!r})")
    return 0 if ok else 1
