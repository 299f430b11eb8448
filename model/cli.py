"""The wildactor command: check the install, run the demo, measure quantization, export, benchmark.

Each subcommand is a small function taking the parsed arguments. Heavy imports happen inside it,
so ``wildactor info`` works even where an optional backend is broken. Every argument is checked
before any work starts; a mistake prints one line on stderr and exits with status 2 (``--debug``
or ``WILDACTOR_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import platform
import statistics
import sys
import textwrap
import time

from .parallel.launch import add_parallel_arguments, parallel_from_args, positive_int

DEBUG_ENV = "WILDACTOR_DEBUG"
EPILOG_HINT = "Add --debug (or set WILDACTOR_DEBUG=1) to see the full traceback of an error."


class UsageError(Exception):
    """A mistake on the command line: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as :class:`UsageError` (one line, no usage block)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message: str):  # noqa: D401 - argparse hook
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# --------------------------------------------------------------------------- argument types
def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


SEED_RANGE = (-0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF)  # what torch.manual_seed accepts


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not SEED_RANGE[0] <= v <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"expected a whole number from -2**63 to 2**64-1, got {v}")
    return v


def _device_name(text: str) -> str:
    t = text.strip().lower()
    if t == "cpu" or t == "cuda" or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _version() -> str:
    import wildactor_kernels

    return wildactor_kernels.__version__


def _presets() -> tuple[str, ...]:
    from .config import PRESETS

    return PRESETS


# --------------------------------------------------------------------------- checks (before any work)
def check_device(device: str | None, flag: str = "--device") -> str:
    """The device to run on: ``device`` if it exists here, else a :class:`UsageError`.

    ``None`` picks ``cuda`` when a CUDA device is present, else ``cpu``."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "torch sees no CUDA device")
            raise UsageError(f"{flag} {device}: no CUDA device is available ({why}, torch "
                             f"{torch.__version__}); use {flag} cpu")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise UsageError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def check_out_dir(path: str, flag: str = "--out", create: bool = True) -> str:
    """Create the output directory ``path`` (if needed) and check that files can be written in it.
    With ``create=False`` nothing is left behind: a name, not a file, no file on the way, and a
    probe file made and removed in the nearest existing folder."""
    if not path.strip():
        raise UsageError(f"{flag} {path!r}: expected a directory name (it is made if missing)")
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise UsageError(f"{flag} {path}: is a file, not a directory")
    anc = p
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise UsageError(f"{flag} {path}: {anc} is a file, so no directory can be made below it")
    if not create:
        import tempfile

        try:
            with tempfile.TemporaryFile(dir=anc):
                pass
        except OSError as e:
            raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
        return p
    try:
        os.makedirs(p, exist_ok=True)
        probe = os.path.join(p, f".wildactor-write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return p


def check_weights_dir(path: str, flag: str = "--weights") -> str:
    """``path`` must be a directory written by ``WildActor.save_pretrained``."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such directory")
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a file; give the directory written by "
                         f"WildActor.save_pretrained (config.json + .safetensors weights)")
    from .weights import CONFIG_NAME, WEIGHTS_NAME

    names = os.listdir(path)
    if CONFIG_NAME not in names or WEIGHTS_NAME not in names:
        raise UsageError(f"{flag} {path}: not a directory written by WildActor.save_pretrained "
                         f"(it needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    _check_weight_files(path, flag)
    return path


def _check_weight_files(path: str, flag: str) -> None:
    """The saved config builds a WildActorConfig and the weights file's header (read without the
    tensors) has every backbone tensor of that model, in its shape (the loader's own checks, in
    ``weights``, answered here in one line)."""
    import torch

    from . import WildActor
    from .weights import check_pretrained_header, read_config

    def first_line(e: Exception) -> str:
        return str(e).splitlines()[0] if str(e) else type(e).__name__

    try:
        cfg = read_config(path)
    except (OSError, TypeError, ValueError) as e:
        raise UsageError(f"{flag} {path}: {first_line(e)}") from None
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in WildActor(cfg).state_dict().items()}
    try:
        numel = check_pretrained_header(path, own)
    except ValueError as e:
        raise UsageError(f"{flag} {path}: {first_line(e)}") from None
    check_memory(4 * numel, "cpu", f"{flag} {path}: loading {_count(numel)} parameters as fp32 on the CPU")


def require_module(module: str, needed_for: str, install: str) -> None:
    """Raise :class:`UsageError` when ``module`` does not import (checked before any work)."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"{needed_for} needs the '{module}' package, which does not import here "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); {install}") from None


def free_memory_bytes(device: str) -> int | None:
    """Bytes of memory free for new tensors on ``device`` (``MemAvailable`` of /proc/meminfo on
    the CPU, ``torch.cuda.mem_get_info`` on CUDA), or None where it cannot be read."""
    if device.startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - unknown: no check
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


#: Bytes per video token and per unit of model width held during one denoising step of the
#: demo (activations of both guidance branches, fp32), fitted on the tiny preset on a CPU
#: (about 11.6 kB per token at dim 64, ffn 128); used to refuse sizes that cannot fit.
DEMO_BYTES_PER_TOKEN_DIM = 4 * 40
DEMO_BYTES_PER_TOKEN_FFN = 4 * 4


def check_memory(need: int, device: str, what: str) -> None:
    """Refuse (one line) work that needs about ``need`` bytes where less memory is free."""
    free = free_memory_bytes(device)
    if free is not None and need > free:
        raise UsageError(f"{what} needs about {need / 1e9:.1f} GB of memory and only {free / 1e9:.1f} GB "
                         f"is free on {device}")


def _check_sizes(args: argparse.Namespace) -> None:
    from .config import WildActorConfig

    cfg = WildActorConfig.preset(args.preset, **({"num_layers": args.layers} if args.layers else {}))
    pt, ph, pw = cfg.patch_size
    for flag, v, p in (("--height", args.height, ph), ("--width", args.width, pw)):
        if v % p:
            raise UsageError(f"{flag} {v}: the latent {flag[2:]} must be a multiple of the patch size "
                             f"{p} (for example {max(p, v - v % p)} or {v - v % p + p})")
    tokens = -(-args.frames // pt) * (args.height // ph) * (args.width // pw)
    need = tokens * (cfg.dim * DEMO_BYTES_PER_TOKEN_DIM + cfg.ffn_dim * DEMO_BYTES_PER_TOKEN_FFN)
    need += 4 * demo_parameters(args.preset, args.layers)  # the random fp32 weights
    if args.device != "cpu":
        # the estimate is fitted on the CPU path; on CUDA an out-of-memory error is itself one line
        # (exit 1), while a CPU process past the memory is killed by the system without a word
        return
    check_memory(need, args.device, f"--frames {args.frames} --height {args.height} --width {args.width}: "
                 f"{tokens} video tokens; one denoising step of preset {args.preset}")


def check_parallel(args: argparse.Namespace) -> None:
    """``--ulysses/--ring/--cfg-parallel``: sizes >= 1, started by torchrun with as many processes
    as they multiply to, Ulysses dividing the heads (all before the model is built)."""
    from .config import WildActorConfig

    ulysses, ring = getattr(args, "ulysses", 1), getattr(args, "ring", 1)
    cfg_par = getattr(args, "cfg_parallel", False)
    for flag, v in (("--ulysses", ulysses), ("--ring", ring)):
        if v < 1:
            raise UsageError(f"{flag} {v}: expected a whole number >= 1")
    asked = (ulysses, ring, cfg_par) != (1, 1, False)
    world = os.environ.get("WORLD_SIZE")
    if asked and (world is None or "RANK" not in os.environ):
        flags = " ".join(f for f, on in ((f"--ulysses {ulysses}", ulysses > 1), (f"--ring {ring}", ring > 1),
                                         ("--cfg-parallel", cfg_par)) if on)
        raise UsageError(f"{flags}: sequence parallelism runs several processes; start the command with "
                         f"torchrun --nproc-per-node N -m wildactor_kernels.model.cli {args.command} ...")
    if asked and world is not None and world.isdigit():
        want = ulysses * ring * (2 if cfg_par else 1)
        if want != int(world):
            branches = " x 2 (--cfg-parallel)" if cfg_par else ""
            raise UsageError(f"--ulysses {ulysses} x --ring {ring}{branches} = {want} processes, but "
                             f"torchrun started {world}")
    heads = WildActorConfig.preset(args.preset).num_heads
    if heads % ulysses:
        raise UsageError(f"--ulysses {ulysses}: must divide the {heads} attention heads of preset "
                         f"{args.preset}; split the rest with --ring")
    if cfg_par and args.guidance <= 1:
        raise UsageError(f"--cfg-parallel: splits the two guidance branches, but --guidance "
                         f"{args.guidance:g} turns guidance off")


# --------------------------------------------------------------------------- noise from other packages
class _DropMessages(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


#: logger name -> messages that say nothing to a wildactor user
QUIET_LOGS = {
    # bitsandbytes looks for an optional CPU 4-bit kernel package on import; its absence only
    # means the stock CPU path is used
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    # the ONNX exporter lists torchvision's detection ops it will not register; we export none
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
}
_quieted = False


def quiet_third_party() -> None:
    """Filter third-party log lines that carry no information for our user (CLI only)."""
    global _quieted
    if _quieted:
        return
    for name, needles in QUIET_LOGS.items():
        logging.getLogger(name).addFilter(_DropMessages(*needles))
    _quieted = True


# --------------------------------------------------------------------------- info
def _probe(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # report why an optional backend is unusable
        return f"not available ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    return f"{getattr(mod, '__version__', 'installed')}"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import wildactor_kernels as wk

    rows = [
        ("wildactor_kernels", wk.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("CUDA device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
        ("triton", _probe("triton")),
        ("triton interpreter", "on (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1"
         else "off"),
        ("flash-attn", _probe("flash_attn")),
        ("bitsandbytes", _probe("bitsandbytes")),
        ("tensorrt", _probe("tensorrt")),
        ("onnx", _probe("onnx")),
        ("onnxruntime", _probe("onnxruntime")),
        ("diffusers", _probe("diffusers")),
    ]
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(0)
        rows.insert(4, ("compute capability", f"sm{cap[0]}{cap[1]}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


# --------------------------------------------------------------------------- demo
#: Largest model (parameters, adapters included) ``wildactor demo`` builds on a CPU: its random
#: fp32 weights take 4 bytes each (8 GB here) and every step runs the whole stack. tiny and
#: wan2.1-1.3b (1.5B) fit; wan2.2-5b and wan2.1-14b need ``--layers N`` or a CUDA device.
CPU_DEMO_MAX_PARAMS = 2_000_000_000


def _count(n: float) -> str:
    """``1234567`` -> ``'1.23M'`` (parameters in plain words)."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def demo_parameters(preset: str, layers: int | None = None) -> int:
    """Parameters (adapters included) of the demo's model, counted on the ``meta`` device (no memory)."""
    import torch

    from . import WildActor, WildActorConfig

    with torch.device("meta"):
        m = WildActor(WildActorConfig.preset(preset, **({"num_layers": layers} if layers else {})))
    return m.num_parameters(include_adapters=True)


def check_cpu_model_size(preset: str, layers: int | None, what: str, elsewhere: str) -> None:
    """Refuse, in one line, a random-weight model of ``preset`` too big to build on a CPU
    (``what`` names the command, ``elsewhere`` what the user can do instead of shrinking it)."""
    n = demo_parameters(preset, layers)
    if n <= CPU_DEMO_MAX_PARAMS:
        return
    from .config import WildActorConfig

    cfg = WildActorConfig.preset(preset, **({"num_layers": layers} if layers else {}))
    per_layer = (n - demo_parameters(preset, 1)) / max(cfg.num_layers - 1, 1)
    fit = max(1, int((CPU_DEMO_MAX_PARAMS - (n - cfg.num_layers * per_layer)) // per_layer))
    raise UsageError(
        f"--preset {preset}: {_count(n)} parameters ({cfg.num_layers} layers, "
        f"{n * 4 / 1e9:.0f} GB of random fp32 weights) is more than {what} builds on a CPU "
        f"({_count(CPU_DEMO_MAX_PARAMS)}); add --layers N (N <= {min(fit, cfg.num_layers - 1)}, "
        f"e.g. --layers 2) for a shorter model of the same width, or {elsewhere}")


def check_demo(args: argparse.Namespace) -> None:
    args.device = check_device(args.device)
    check_parallel(args)
    if args.device == "cpu":
        check_cpu_model_size(args.preset, args.layers, "the demo", "run it on a CUDA device")
    _check_sizes(args)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import FlowMatchSampler, Reference, WildActor, WildActorConfig

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = WildActorConfig.preset(args.preset, **({"num_layers": args.layers} if args.layers else {}))
    m = WildActor(cfg).to(device).eval()
    m = parallel_from_args(m, args)  # under torchrun: sequence parallel, only rank 0 prints
    dtype = next(m.parameters()).dtype
    c, (t, h, w) = cfg.in_channels, (args.frames, args.height, args.width)
    gen = torch.Generator().manual_seed(args.seed)
    refs = [Reference(kind, torch.randn(1, c, 1, rh, rw, generator=gen).to(device))
            for kind, rh, rw in (("face", 4, 4), ("face", 4, 6), ("body", 8, 6))]
    context = torch.randn(1, 16, cfg.text_dim, generator=gen).to(device)
    ops = ("Triton kernels" if device.type == "cuda" else "PyTorch reference ops") if cfg.backend == "auto" \
        else f"backend={cfg.backend}"
    depth = f", {cfg.num_layers} layers (--layers)" if args.layers else ""
    print(f"WildActor demo: preset {args.preset}{depth} ({_count(m.num_parameters())} backbone parameters, "
          f"random weights), {ops} on {device}, {str(dtype).replace('torch.', '')}; latents "
          f"[1, {c}, {t}, {h}, {w}], references 2 face + 1 body, {args.steps} steps, "
          f"guidance {args.guidance:g}")

    paths = (("with reference cache", True), ("without cache", False))

    def sample(use_cache: bool, steps: int, desc: str | None):
        sampler = FlowMatchSampler(num_steps=steps, guidance_scale=args.guidance, use_ref_cache=use_cache,
                                   progress=desc is not None, progress_desc=desc or "denoising")
        out = sampler.sample(m, (1, c, t, h, w), context, refs=refs, seed=args.seed)
        _sync(device)
        return out

    # warm-up: one untimed 1-step run of each path, so lazy initialisation and first-call costs
    # (allocator, kernel compilation) are charged to neither timed path
    for _, use_cache in paths:
        sample(use_cache, 1, None)
    times: dict[str, list[float]] = {name: [] for name, _ in paths}
    outs = {}
    for r in range(args.repeats):  # interleaved, so slow drift of the machine hits both paths alike
        for name, use_cache in paths:
            desc = None if args.no_progress else f"{name} ({r + 1}/{args.repeats})"
            start = time.perf_counter()
            outs[name] = sample(use_cache, args.steps, desc)
            times[name].append(time.perf_counter() - start)

    print(f"\nwall-clock seconds per generation ({args.steps} steps), median of {args.repeats} runs "
          f"after one warm-up run of each path:")
    print(f"  {'path':<22} {'median s':>9} {'min s':>8} {'max s':>8}")
    for name, ts in times.items():
        print(f"  {name:<22} {statistics.median(ts):>9.3f} {min(ts):>8.3f} {max(ts):>8.3f}")
    t_c, t_u = (statistics.median(times[n]) for n, _ in paths)
    print(f"  speed-up from the cache: {t_u / t_c:.2f}x (median without / median with; the tiny "
          f"preset has little reference work to save)" if args.preset == "tiny" else
          f"  speed-up from the cache: {t_u / t_c:.2f}x (median without / median with)")

    cached, uncached = outs["with reference cache"].float(), outs["without cache"].float()
    diff = (uncached - cached).abs().max().item()
    finite = bool(torch.isfinite(cached).all() and torch.isfinite(uncached).all())
    ok = finite and diff <= args.tol
    print(f"\nmax |uncached - cached| over the final latents (same seed, same noise): {diff:.3e}")
    print(f"{'OK' if ok else 'MISMATCH'}: sampling with and without the reference cache "
          f"{'agrees' if ok else 'disagrees'} (tolerance {args.tol:g}"
          f"{'' if finite else '; the output has NaN or inf'})")
    return 0 if ok else 1


# --------------------------------------------------------------------------- quantize-report
def check_quantize_report(args: argparse.Namespace) -> None:
    args.device = check_device(args.device)
    if args.device == "cpu":  # the model and its quantized copy, random weights built on the CPU
        check_cpu_model_size(args.preset, args.layers, "quantize-report", "run it on a CUDA device")
    # fp32 weights as built, their bf16 cast and the quantized copy (at most 1 byte a weight)
    if args.device == "cpu":  # (on CUDA an out-of-memory error is itself one line)
        n = demo_parameters(args.preset, args.layers)
        check_memory(7 * n, "cpu", f"--preset {args.preset}: {_count(n)} parameters; quantize-report")
    if args.mode in ("int8", "nf4"):
        require_module("bitsandbytes", f"--mode {args.mode}", "pip install bitsandbytes "
                       "(or pip install wildactor-kernels[quant]), or use --mode fp8")


def cmd_quantize_report(args: argparse.Namespace) -> int:
    from .quant import run_quantize_report

    run_quantize_report(args.preset, args.mode, device=args.device, layers=args.layers,
                        attention=args.attention, progress=not args.no_progress)
    return 0


# --------------------------------------------------------------------------- export
MIN_OPSET = 18  # the torch.onnx dynamo exporter


def _given(args: argparse.Namespace, flag: str) -> bool:
    """Whether ``flag`` is on the command line (also as ``flag=value`` or an abbreviation of it)."""
    return any(flag.startswith(g) and len(g) > 2 for g in getattr(args, "given_flags", ()))


def check_export(args: argparse.Namespace) -> None:
    """Checks of ``wildactor export``'s arguments (the subcommand itself lives with the exporter;
    an option it does not declare is read as its default)."""
    layers, weights = getattr(args, "layers", None), getattr(args, "weights", None)
    opset, fp8 = getattr(args, "opset", 23), getattr(args, "fp8", False)
    attention, engine = getattr(args, "attention", "onnx"), getattr(args, "engine", False)
    no_check, workspace_gb = getattr(args, "no_check", False), getattr(args, "workspace_gb", 8.0)
    if layers is not None and layers < 1:
        raise UsageError(f"--layers {layers}: expected a whole number >= 1")
    if not weights:  # random weights, built (and traced) on the CPU
        check_cpu_model_size(args.preset, layers, "the export of random weights",
                             "export real weights with --weights DIR")
    if weights:
        if layers is not None:
            raise UsageError(f"--layers {layers}: applies to random weights only; with --weights the "
                             f"saved config.json sets the depth")
        if _given(args, "--preset") or args.preset != "tiny":
            raise UsageError(f"--preset {args.preset}: applies to random weights only; with --weights the "
                             f"saved config.json sets the model")
        check_weights_dir(weights)
    # the arguments first (a mistake in them is answered whatever is installed), then the packages
    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset}: expected at least {MIN_OPSET} (the exporter needs opset >= "
                         f"{MIN_OPSET}; default 23)")
    if not (math.isfinite(workspace_gb) and workspace_gb > 0):
        raise UsageError(f"--workspace-gb {workspace_gb:g}: expected a positive number of GB")
    if not engine and (_given(args, "--workspace-gb") or workspace_gb != 8.0):
        raise UsageError(f"--workspace-gb {workspace_gb:g}: applies to the TensorRT build only; add --engine "
                         f"or drop it")
    check_out_dir(args.out, create=False)  # made at the end, once every check has passed
    if engine:
        require_module("tensorrt", "--engine", "install TensorRT 10 (pip install tensorrt) on a CUDA "
                       "machine, or drop --engine to export the ONNX graphs only")
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--engine: TensorRT engines are built on a CUDA device and none is available "
                             "here; drop --engine to export the ONNX graphs only")
    require_module("onnx", "wildactor export", "pip install onnx onnxscript (or pip install "
                   "wildactor-kernels[test])")
    require_module("onnxscript", "wildactor export", "pip install onnxscript")
    import onnx

    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= top:
        raise UsageError(f"--opset {opset}: expected {MIN_OPSET} to {top} (the exporter needs "
                         f"opset >= {MIN_OPSET}; this onnx knows up to {top}; default 23)")
    if fp8 and opset < 19:
        raise UsageError(f"--opset {opset}: --fp8 needs opset >= 19 (float8 Q/DQ)")
    if attention == "onnx" and opset < 23:
        print(f"wildactor export: note: --opset {opset} has no Attention op (opset 23); attention "
              f"is exported in decomposed form (MatMul/Softmax)", file=sys.stderr)
    if not no_check:
        require_module("onnxruntime", "the onnxruntime check of wildactor export",
                       "pip install onnxruntime, or skip the check with --no-check")
    check_out_dir(args.out)


def _add_export(sub) -> None:
    from .export import register_cli

    register_cli(sub)
    p = sub.choices["export"]
    p.description = textwrap.fill(
        "Export a WildActor model as two ONNX graphs (the reference encoder, run once per generation, "
        "and the denoiser, run every step), check them with onnxruntime against PyTorch, and "
        "optionally build TensorRT engines.", 88)
    p.epilog = ("valid presets: " + ", ".join(_presets()) + "\n\nexamples:\n"
                "  wildactor export --preset tiny --out export/\n"
                "  wildactor export --preset tiny --out export8/ --fp8   # FP8 Q/DQ graphs for TensorRT\n"
                "  wildactor export --preset wan2.2-5b --layers 2 --out export5b/\n\n" + EPILOG_HINT)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    for a in p._actions:  # plain-word help where the exporter's parser has none
        if a.dest == "preset":
            a.choices = list(_presets())
            a.help = "model configuration (default: tiny); one of " + ", ".join(_presets())
        elif a.dest == "opset" and not a.help:
            a.help = f"ONNX opset, {MIN_OPSET} or more (default: 23, which has the Attention op)"
        elif a.dest == "workspace_gb" and not a.help:
            a.help = "TensorRT builder workspace in GB (default: 8)"
        elif a.dest == "seed":
            a.type = _seed
            a.help = a.help or "random seed of the weights and the check inputs (default: 0)"
        elif a.dest == "layers":
            a.type = positive_int
            a.help = ("build only this many transformer blocks of the preset (random weights only; e.g. 2 "
                      "for a quick export of a big preset)")
        elif a.dest == "weights":
            a.metavar = "DIR"
            a.help = ("a folder written by WildActor.save_pretrained (config.json + model.safetensors); "
                      "default: random weights of --preset")
        elif a.dest == "out":
            a.metavar = "DIR"
            a.help = "output folder for the graphs and manifest.json (made if missing)"
    _add_debug(p)


# --------------------------------------------------------------------------- bench
def find_checkout(start: str | None = None) -> str | None:
    """The source checkout whose ``benchmarks/suite.py`` ``wildactor bench`` runs, or None.

    Looked for beside the imported package (an editable install or ``PYTHONPATH=.``), then in
    ``start`` (default: the working directory) and its parents. ``benchmarks/`` is never
    installed, so a wheel install outside a checkout has none.
    """
    import wildactor_kernels

    candidates = [os.path.dirname(os.path.dirname(os.path.abspath(wildactor_kernels.__file__)))]
    d = os.path.abspath(start or os.getcwd())
    while True:
        candidates.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for c in candidates:
        if is_checkout(c):
            return c
    return None


def is_checkout(path: str) -> bool:
    """Whether ``path`` is a source checkout of this project: ``setup.py`` beside the kernel
    package, the ``model/`` folder and ``benchmarks/suite.py``. A site-packages folder never is,
    even when another distribution installed a top-level ``benchmarks`` package into it."""
    return all(os.path.isfile(os.path.join(path, *rel)) for rel in (
        ("setup.py",), ("wildactor_kernels", "__init__.py"), ("model", "__init__.py"),
        ("benchmarks", "suite.py")))


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the checkout's benchmark suite (``python -m benchmarks.suite``) in a subprocess.

    The library never imports ``benchmarks/`` (imports run kernels <- model <- CLI, and the
    benchmarks sit on top of all three); the CLI only starts the checkout's own script, with
    every argument passed through unchanged (``--debug`` becomes ``WILDACTOR_DEBUG=1``).
    """
    import subprocess

    root = find_checkout()
    if root is None:
        raise UsageError("the benchmarks ship with the source checkout, not with the installed package; "
                         "clone the repository and run `wildactor bench` (or `python -m benchmarks.suite`) "
                         "inside it")
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if getattr(args, "debug", False):
        env[DEBUG_ENV] = "1"
    # The suite runs in the checkout (so `-m benchmarks.suite` is the checkout's, whatever the
    # working directory holds); a relative --json names a file where the user is, not there.
    return subprocess.call([sys.executable, "-m", "benchmarks.suite", *_absolute_paths(args.bench_args)],
                           cwd=root, env=env)


#: the suite's options that take a path, resolved against the caller's working directory
BENCH_PATH_OPTIONS = ("--json",)


def _absolute_paths(argv: list[str]) -> list[str]:
    out, take = [], False
    for a in argv:
        if take:
            out.append(os.path.abspath(a))
            take = False
            continue
        opt, eq, value = a.partition("=")
        if opt in BENCH_PATH_OPTIONS and eq:
            out.append(f"{opt}={os.path.abspath(value)}" if value else a)
        else:
            out.append(a)
            take = a in BENCH_PATH_OPTIONS
    return out


# --------------------------------------------------------------------------- parser
def _add_debug(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the subcommand it sets args.debug; otherwise the top-level value stays
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")


def _sub(sub, name: str, summary: str, description: str, examples: list[str], presets: bool = False):
    epilog = ""
    if presets:
        epilog += "valid presets: " + ", ".join(_presets()) + "\n\n"
    epilog += "examples:\n" + "".join(f"  {e}\n" for e in examples) + "\n" + EPILOG_HINT
    p = sub.add_parser(name, help=summary, description=textwrap.fill(description, 88), epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_debug(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="wildactor",
        description=textwrap.fill("WildActor kernels: check the install, run a small demo, measure "
                                  "quantization quality, export to ONNX/TensorRT, run the benchmarks.", 88),
        epilog=("Run `wildactor COMMAND --help` for the options and an example of each command.\n"
                + EPILOG_HINT))
    p.add_argument("--debug", action="store_true", default=os.environ.get(DEBUG_ENV) == "1",
                   help="show the full traceback of an error (same as WILDACTOR_DEBUG=1)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                   help="print the version of wildactor-kernels and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    presets = _presets()

    s = _sub(sub, "info", "show versions, the CUDA device and which optional packages work",
             "Show the versions of Python, torch and Triton, the CUDA device, and whether each optional "
             "package (flash-attn, bitsandbytes, TensorRT, ONNX, onnxruntime, diffusers) imports.",
             ["wildactor info"])
    s.set_defaults(func=cmd_info)

    s = _sub(sub, "demo", "sample a small random model with and without the reference cache",
             "Build a WildActor model with random weights, sample the same video latents twice (with "
             "the reference key/value cache and without it), time both and check that they agree. "
             "Runs in seconds on a CPU with the default tiny preset.",
             ["wildactor demo", "wildactor demo --steps 4 --frames 2 --height 8 --width 8 --device cpu"],
             presets=True)
    s.add_argument("--preset", default="tiny", choices=presets, metavar="NAME",
                   help="model configuration (default: tiny)")
    s.add_argument("--layers", type=positive_int, default=None,
                   help="build only this many transformer blocks (e.g. 2 to try a big preset on a CPU, "
                        f"where the demo builds at most {_count(CPU_DEMO_MAX_PARAMS)} parameters)")
    s.add_argument("--steps", type=positive_int, default=8, help="denoising steps (default: 8)")
    s.add_argument("--frames", type=positive_int, default=3, help="latent frames (default: 3)")
    s.add_argument("--height", type=positive_int, default=16,
                   help="latent height, a multiple of 2 (default: 16)")
    s.add_argument("--width", type=positive_int, default=16,
                   help="latent width, a multiple of 2 (default: 16)")
    s.add_argument("--guidance", type=_finite_float, default=5.0,
                   help="classifier-free guidance scale; 1 or less turns guidance off (default: 5)")
    s.add_argument("--device", type=_device_name, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if a CUDA device is present, else cpu)")
    s.add_argument("--seed", type=_seed, default=0,
                   help="random seed of weights, inputs and noise (default: 0)")
    s.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs of each path; the median is reported (default: 3)")
    s.add_argument("--tol", type=_finite_float, default=1e-4,
                   help="largest allowed |uncached - cached| difference of the results (default: 1e-4)")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_parallel_arguments(s)  # --ulysses, --ring, --cfg-parallel (docs/parallel.md)
    s.set_defaults(func=cmd_demo, check=check_demo)

    s = _sub(sub, "quantize-report", "signal-to-noise ratio of a quantized model against the original",
             "Build a model with random weights, quantize a copy (fp8, int8 or nf4) and print the "
             "signal-to-quantization-noise ratio (SQNR, in dB; higher is better) of every converted "
             "layer and of the model output.",
             ["wildactor quantize-report --preset tiny --mode fp8",
              "wildactor quantize-report --preset wan2.2-5b --layers 2 --mode int8",
              "wildactor quantize-report --preset tiny --mode fp8 --attention fp8"], presets=True)
    s.add_argument("--preset", default="tiny", choices=presets, metavar="NAME",
                   help="model configuration (default: tiny)")
    s.add_argument("--mode", default="fp8", choices=["fp8", "int8", "nf4"],
                   help="fp8 (our kernels) or int8 / nf4 (bitsandbytes) (default: fp8)")
    s.add_argument("--layers", type=positive_int, default=None,
                   help="build only this many transformer blocks (e.g. 2 to try a big preset quickly)")
    s.add_argument("--device", type=_device_name, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if a CUDA device is present, else cpu)")
    s.add_argument("--attention", default=None, choices=["fp8"],
                   help="also run self-attention in 8 bits (inference only; default: the model's dtype)")
    s.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar (building, quantizing, each layer; it goes to stderr)")
    s.set_defaults(func=cmd_quantize_report, check=check_quantize_report)

    _add_export(sub)
    sub.choices["export"].set_defaults(check=check_export)

    s = sub.add_parser(
        "bench", add_help=False,
        help="run the benchmark suite of a source checkout (`wildactor bench --help` lists its options)")
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench)
    return p


# --------------------------------------------------------------------------- main
def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) and len(e.args) == 1:
        text = str(e.args[0])
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV) == "1"
    # --debug before the subcommand (or anywhere for bench, whose other options are the suite's)
    while argv[:1] == ["--debug"]:
        debug = True
        argv = argv[1:]
    prog = "wildactor" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")
    quiet_third_party()
    try:
        if argv[:1] == ["bench"]:  # every option belongs to the checkout's suite, --help included
            rest = [a for a in argv[1:] if a != "--debug"]
            return cmd_bench(argparse.Namespace(bench_args=rest, debug=debug or len(rest) < len(argv) - 1))
        args = build_parser().parse_args(argv)
        args.given_flags = {a.split("=")[0] for a in argv if a.startswith("--")}
        debug = debug or bool(getattr(args, "debug", False))
        check = getattr(args, "check", None)
        if check is not None:
            check(args)
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe (`wildactor demo | head -1`) shows here, inside the try
        return rc
    except BrokenPipeError:  # the reader went away: stop quietly, as shell tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        os.close(devnull)
        return 141  # 128 + SIGPIPE
    except UsageError as e:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank checks; rank 0 tells
            print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)} (run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
