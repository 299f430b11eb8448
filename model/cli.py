"""The ``wildactor`` command line: ``info``, ``demo`` and the tools of later sections.

Each subcommand is a small function taking the parsed arguments; heavy imports happen inside
it, so ``wildactor info`` works even where an optional backend is broken.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

from .parallel.launch import add_parallel_arguments, parallel_from_args


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
    from wildactor_kernels._utils import interpreter_active

    rows = [
        ("wildactor_kernels", wk.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("CUDA device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
        ("triton", _probe("triton")),
        ("triton interpreter", "on (TRITON_INTERPRET=1)" if interpreter_active() else "off"),
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
def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import FlowMatchSampler, Reference, WildActor, WildActorConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    cfg = WildActorConfig.preset(args.preset)
    m = WildActor(cfg).to(device).eval()
    m = parallel_from_args(m, args)  # under torchrun: sequence parallel, only rank 0 prints
    c, (t, h, w) = cfg.in_channels, (args.frames, args.height, args.width)
    gen = torch.Generator().manual_seed(args.seed)
    refs = [Reference(kind, torch.randn(1, c, 1, rh, rw, generator=gen).to(device))
            for kind, rh, rw in (("face", 4, 4), ("face", 4, 6), ("body", 8, 6))]
    context = torch.randn(1, 16, cfg.text_dim, generator=gen).to(device)
    print(f"WildActor demo: preset={args.preset} ({m.num_parameters() / 1e3:.1f}k backbone params), "
          f"device={device}, latents [1, {c}, {t}, {h}, {w}], refs 2 face + 1 body, "
          f"{args.steps} steps, CFG {args.guidance}")
    # one untimed forward so that lazy initialisation is not charged to the first path
    with torch.no_grad():
        m(torch.randn(1, c, t, h, w, device=device), torch.tensor([500.0], device=device), context,
          refs=refs)
    results = {}
    for name, use_cache in (("with reference cache", True), ("without cache", False)):
        sampler = FlowMatchSampler(num_steps=args.steps, guidance_scale=args.guidance,
                                   use_ref_cache=use_cache, progress=not args.no_progress)
        start = time.perf_counter()
        out = sampler.sample(m, (1, c, t, h, w), context, refs=refs, seed=args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[name] = (time.perf_counter() - start, out)
    base = results["with reference cache"][1]
    print(f"\n{'path':<22} {'seconds':>8} {'max |diff|':>12}")
    worst = 0.0
    for name, (sec, out) in results.items():
        diff = (out.float() - base.float()).abs().max().item()
        worst = max(worst, diff)
        print(f"{name:<22} {sec:>8.2f} {diff:>12.3e}")
    ok = bool(torch.isfinite(base).all()) and worst <= args.tol
    print(f"\n{'OK' if ok else 'MISMATCH'}: cached and uncached sampling "
          f"{'agree' if ok else 'disagree'} (tolerance {args.tol:g})")
    return 0 if ok else 1


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wildactor", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, CUDA device, optional backends")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("demo", help="tiny WildActor sampled with and without the reference cache")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--frames", type=int, default=3)
    s.add_argument("--height", type=int, default=16, help="latent height (even)")
    s.add_argument("--width", type=int, default=16, help="latent width (even)")
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tol", type=float, default=1e-4, help="max allowed |cached - uncached|")
    s.add_argument("--no-progress", action="store_true")
    add_parallel_arguments(s)  # --ulysses, --ring, --cfg-parallel (docs/parallel.md)
    s.set_defaults(func=cmd_demo)

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


def _add_quantize_report(sub) -> None:
    s = sub.add_parser("quantize-report", help="SQNR of a quantized model against the unquantized one")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--mode", default="fp8", choices=["fp8", "int8", "nf4"])
    s.add_argument("--layers", type=int, default=None, help="override num_layers (e.g. 2 for big presets)")
    s.add_argument("--device", default=None)

    def run(args):
        from .quant import run_quantize_report

        run_quantize_report(args.preset, args.mode, device=args.device, layers=args.layers)
        return 0

    s.set_defaults(func=run)


def _add_export(sub) -> None:
    from .export import register_cli

    register_cli(sub)


def find_checkout(start: str | None = None) -> str | None:
    """The source checkout whose ``benchmarks/suite.py`` ``wildactor bench`` runs, or None.

    Looked for beside the imported package (an editable install or ``PYTHONPATH=.``), then in
    ``start`` (default: the working directory) and its parents. ``benchmarks/`` is never
    installed, so a wheel install outside a checkout has none.
    """
    import os

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
        if os.path.isfile(os.path.join(c, "benchmarks", "suite.py")) and os.path.isdir(
                os.path.join(c, "wildactor_kernels")):
            return c
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the checkout's benchmark suite (``python -m benchmarks.suite``) in a subprocess.

    The library never imports ``benchmarks/`` (imports run kernels <- model <- CLI, and the
    benchmarks sit on top of all three); the CLI only starts the checkout's own script, with
    every argument passed through unchanged.
    """
    import os
    import subprocess

    root = find_checkout()
    if root is None:
        print("wildactor bench: the benchmarks ship with the source checkout, not with the installed "
              "package; clone the repository and run `wildactor bench` (or `python -m benchmarks.suite`) "
              "inside it", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call([sys.executable, "-m", "benchmarks.suite", *args.bench_args], cwd=root, env=env)


def _add_bench(sub) -> None:
    s = sub.add_parser(
        "bench", add_help=False,
        help="the benchmark suite of a source checkout (runs python -m benchmarks.suite; "
             "`wildactor bench --help` lists its options)")
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench)


_EXTRA_COMMANDS = [_add_quantize_report, _add_export, _add_bench]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every option belongs to the checkout's suite, --help included
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
