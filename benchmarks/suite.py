"""The benchmark suite behind ``wildactor bench``.

    wildactor bench [--suite kernels|model|all] [--shape NAME] [--json PATH]
    python -m benchmarks.suite ...                      # the same, without the console script

On CUDA:

- ``kernels``: the per-kernel scripts (``bench_rope.py``, ``bench_attention.py``,
  ``bench_lora.py``, ``bench_quant.py``) on the design's benchmark shapes, each in its own process
  (a CUDA fault or a hang in one cannot take the others down; ``--script-timeout`` bounds each;
  ``--in-process`` calls their ``main(argv)`` instead). They write their own JSON and markdown
  in ``benchmarks/results/``; the suite records which ran, how long, and how they ended.
- ``model``: ``bench_model.py``: one CFG denoising step of wan2.2-5b at wan5b-720p and
  wan2.1-1.3b at wan1.3b-480p, four paths (eager, torch.compile + cuDNN, ours bf16, ours FP8).
- ``all`` (default): both, kernels first.

Rows go to ``benchmarks/results/{kernel_suite,model_step}.jsonl`` (or all to ``--json PATH``),
then :mod:`benchmarks.report` writes the markdown tables and plots.

Without CUDA (or with ``--smoke`` or ``--device cpu``) it says so and runs a smoke run in seconds
instead: each op on a tiny layout (reference backend) and the model step on the ``tiny`` preset,
written to ``--json PATH`` or a temp file, never into ``benchmarks/results/`` unless that is the
path given. Options that only the CUDA run uses (``--shape``, the model-suite options) are refused
there rather than ignored, and ``--device cuda`` without a CUDA device is an error.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench_model, harness, report  # noqa: E402

BENCH_DIR = os.path.join(ROOT, "benchmarks")
KERNEL_SHAPES = ("wan5b-720p", "wan1.3b-480p", "wan14b-720p")  # docs/design.md §8
#: (name, script): run in this order by ``--suite kernels``
KERNEL_SCRIPTS = (("rope", "bench_rope.py"), ("attention", "bench_attention.py"),
                  ("lora", "bench_lora.py"), ("quant", "bench_quant.py"))
SUITES = ("kernels", "model", "all")

__all__ = ["BenchUsageError", "register_cli", "cmd_bench", "run_full", "run_kernel_suite", "run_smoke",
           "op_cases", "main"]


class BenchUsageError(ValueError):
    """A mistake in the ``bench`` arguments: :func:`main` prints it as one line (exit status 2)."""


# ============================================================================ ops at a small shape
def op_cases(device: torch.device | str, dtype: torch.dtype = torch.float32, backend: str = "reference",
             video: tuple[int, int, int] = (2, 4, 4), refs: tuple = (("face", 2, 2), ("body", 2, 3)),
             heads: int = 2, head_dim: int = 16, din: int = 32, dout: int = 48, rank: int = 4,
             seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each public op on one small I-RoPE layout: ``{name: {"fn": callable, "flops": float|None}}``.

    Used by the CPU smoke run and by the pytest-benchmark files. Inputs are random (never zeros),
    drawn once per call of this function.
    """
    import wildactor_kernels as wk

    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

    layout = wk.TokenLayout(video, list(refs))
    cos, sin = wk.rope_cos_sin(wk.irope_positions(layout), head_dim)
    cos, sin = cos.to(dev), sin.to(dev)
    n, nv = layout.num_tokens, layout.num_video
    nr, b, h, d = n - nv, 1, heads, head_dim
    q, k, v = rnd(b, n, h, d), rnd(b, n, h, d), rnd(b, n, h, d)
    qw, kw = 1 + rnd(h * d, scale=0.1), 1 + rnd(h * d, scale=0.1)
    ref_k, ref_v = rnd(b, nr, h, d), rnd(b, nr, h, d)
    x, w, bias = rnd(b, n, din), rnd(dout, din, scale=din**-0.5), rnd(dout, scale=0.1)
    lora_a, lora_b = rnd(rank, din, scale=din**-0.5), rnd(dout, rank, scale=0.02)
    return {
        "apply_rope": {"fn": lambda: wk.apply_rope(q, cos, sin, backend=backend), "flops": None},
        "qk_norm_rope": {"fn": lambda: wk.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6, backend=backend),
                         "flops": None},
        "asym_attention": {"fn": lambda: wk.asym_attention(q, k, v, nv, backend=backend),
                           "flops": 4.0 * b * h * d * (nv * n + nr * nr)},
        "cached_asym_attention": {
            "fn": lambda: wk.cached_asym_attention(q[:, :nv], k[:, :nv], v[:, :nv], ref_k, ref_v,
                                                   backend=backend),
            "flops": 4.0 * b * h * d * nv * (nv + nr)},
        "ref_lora_linear": {
            "fn": lambda: wk.ref_lora_linear(x, w, bias, lora_a, lora_b, 1.0, nv, backend=backend),
            "flops": 2.0 * b * n * din * dout + 2.0 * b * nr * rank * (din + dout)},
    }


# ============================================================================ kernel scripts
def _script_options(path: str) -> set[str]:
    """The ``--options`` a script's argparse declares (read from its source, nothing imported)."""
    with open(path, encoding="utf-8") as fh:
        src = fh.read()
    return set(re.findall(r"add_argument\(\s*['\"](--[A-Za-z0-9][\w-]*)['\"]", src))


def _script_argv(path: str, name: str, shapes: list[str] | None, out_dir: str | None) -> list[str]:
    opts = _script_options(path)
    argv: list[str] = []
    if shapes and "--shapes" in opts:
        argv += ["--shapes", *shapes]
    stem = os.path.splitext(os.path.basename(path))[0]
    if "--out" in opts:  # an absolute path: the scripts differ in how they read a bare name
        argv += ["--out", os.path.join(out_dir or harness.RESULTS_DIR, f"{stem}.json")]
    if "--out-dir" in opts and out_dir:
        argv += ["--out-dir", out_dir]
    return argv


def _run_subprocess(cmd: list[str], timeout: float, prefix: str,
                    echo: Callable[[str], None]) -> tuple[int | None, bool, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        proc.kill()  # our own child, by its handle

    timer = threading.Timer(timeout, kill)
    timer.start()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            echo(f"{prefix}{line}")
        rc = proc.wait()
    finally:
        timer.cancel()
    return (None if timed_out.is_set() else rc), timed_out.is_set(), "\n".join(tail)


def _run_in_process(path: str, argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location(f"_wildactor_{os.path.basename(path)[:-3]}", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    if not hasattr(mod, "main"):
        raise RuntimeError(f"{path} has no main(argv)")
    try:
        return int(mod.main(argv) or 0)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1


def run_kernel_suite(shapes: list[str] | None = None, out_dir: str | None = None, timeout: float = 300.0,
                     in_process: bool = False, scripts=KERNEL_SCRIPTS,
                     echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run each per-kernel script; one row per script (``ok`` / ``failed`` / ``skipped``)."""
    shapes = [s for s in (shapes or []) if s in KERNEL_SHAPES] or None
    rows = []
    for name, fname in scripts:
        path = os.path.join(BENCH_DIR, fname)
        row: dict[str, Any] = {"script": fname, "op": name}
        if not os.path.exists(path):
            row.update(harness.skipped(f"{fname} is not in this checkout"))
            echo(f"[kernels] {fname}: not in this checkout, skipped")
            rows.append(row)
            continue
        argv = _script_argv(path, name, shapes, out_dir)
        row["args"] = argv
        echo(f"[kernels] {fname} {' '.join(argv)}")
        t0 = time.perf_counter()
        try:
            if in_process:
                rc, timed_out, tail = _run_in_process(path, argv), False, ""
            else:
                rc, timed_out, tail = _run_subprocess([sys.executable, "-u", path, *argv], timeout,
                                                      f"  [{name}] ", echo)
        except Exception as e:  # noqa: BLE001 - recorded
            rc, timed_out, tail = None, False, ""
            row.update(harness.failed(e))
        row["seconds"] = time.perf_counter() - t0
        row["rc"] = rc
        if tail:
            row["output_tail"] = tail
        if timed_out:
            row.update(harness.failed(f"timed out after {timeout:.0f} s (--script-timeout)"))
        elif rc not in (0, None):
            row.update(harness.failed(f"exit status {rc}: " + (tail.splitlines()[-1] if tail else "")))
        row.setdefault("status", "ok")
        echo(f"[kernels] {fname}: {row['status']} in {row['seconds']:.0f} s")
        rows.append(row)
    return rows


# ============================================================================ CPU smoke run
def run_smoke(suite: str, json_path: str | None, *, quiet: bool = False, report_md: bool = True) -> str:
    """A seconds-long CPU run of the whole pipeline: ops on a tiny layout (reference backend) and
    the ``tiny`` model step; rows appended to ``json_path`` (default a temp file). Returns the path."""
    device = torch.device("cpu")
    env = harness.env_record(device)
    run_id = harness.new_run_id()
    path = json_path or os.path.join(bench_model._tempdir(), "smoke.jsonl")
    log = bench_model._Log(quiet=quiet)
    if suite in ("kernels", "all"):
        rows = []
        for name, case in op_cases(device).items():
            row = harness.run_peer(lambda c=case: harness.bench(c["fn"], warmup=5, rep=20, device=device),
                                   op=name, shape="tiny-layout", impl="reference")
            if row.get("status") == "ok" and case["flops"]:
                row.update(harness.flops_metrics(case["flops"], row["ms"]))
            log(f"ops: {name:22s} " + (f"{row['ms']:.4f} ms" if row["status"] == "ok" else row["status"]))
            rows.append(row)
        harness.append_jsonl(path, rows, kind="ops_smoke", env=env, run_id=run_id)
    if suite in ("model", "all"):
        rows = bench_model.run_shape("tiny", device=device, paths=bench_model.PATHS, iters=3, warmup=1,
                                     encode_iters=3, log=log)
        for row in rows:
            row["label"] = smoke_label(row, device)
            if row.get("path") in ("ours-bf16", "ours-fp8") and row.get("kernels") != "triton":
                row.setdefault("notes", []).append(
                    "same reference ops as (a): its speed-up over (a) comes from the reference cache "
                    "alone, not from kernels")
        harness.append_jsonl(path, rows, kind=bench_model.KIND, env=env, run_id=run_id)
    if report_md:
        for p in report.write_reports(path, plots=False):
            log(f"wrote {p}")
    return path


def smoke_label(row: dict[str, Any], device: torch.device) -> str:
    """A model-step row's label by what actually ran (ops backend, GEMM, dtype, device), not by
    the CUDA path it stands in for."""
    path, dtype, dev = row.get("path"), row.get("dtype", "?"), device.type
    ops = {"triton": "Triton kernels", "reference": "reference ops"}.get(str(row.get("kernels")),
                                                                       "reference ops")
    if path == "eager":
        return f"(a) eager, reference ops, no cache, {dtype}, {dev}"
    if path == "compile":
        return "(b) torch.compile + SDPA cuDNN + cache (CUDA only)"
    if path == "ours-bf16":
        return f"(c) {ops} + cache, {dtype}, {dev}"
    if path == "ours-fp8":
        gemm = ", ".join(sorted(row.get("fp8_gemm_paths") or {})) or "?"
        return f"(d) {ops} + cache, FP8 weights ({gemm} GEMM), {dtype} activations, {dev}"
    return str(row.get("label") or path)


# ============================================================================ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=SUITES, default="all", help="what to run (default: all)")
    shapes = sorted(set(KERNEL_SHAPES) | set(bench_model.SHAPES))
    p.add_argument("--shape", action="append", default=None, metavar="NAME", choices=shapes,
                   help=f"limit to this benchmark shape, one of {', '.join(shapes)} (CUDA only; repeatable; "
                        f"default: wan5b-720p and wan1.3b-480p for the model, each script's own default for "
                        f"the kernels)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="append all rows to this JSON-lines file (default: benchmarks/results/<kind>.jsonl "
                        "on CUDA, a temp file for the CPU smoke run)")
    p.add_argument("--smoke", action="store_true", help="the CPU smoke run even where CUDA is available")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="cuda: the measured run; cpu: the smoke run (default: cuda if available)")
    p.add_argument("--script-timeout", type=float, default=300.0, help="seconds per kernel script")
    p.add_argument("--in-process", action="store_true",
                   help="call the kernel scripts' main(argv) in this process instead of subprocesses")
    p.add_argument("--no-report", action="store_true", help="do not write markdown/plots")
    g = p.add_argument_group("model suite")
    bench_model.add_arguments(g, shapes_flag=False, device_flag=False)


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to a ``wildactor`` sub-command parser (``argparse`` subparsers action).
    The parser calls :func:`cmd_bench` through ``args.func(args)``."""
    p = subparsers.add_parser(
        "bench", help="benchmark suite: kernels and model step on CUDA (a CPU smoke run elsewhere)",
        description="Time the kernels and one model denoising step on CUDA against their peers; "
                    "without CUDA, a seconds-long smoke run of the same pipeline (not performance data).",
        epilog="examples:\n  wildactor bench --suite kernels\n  wildactor bench --suite model --shape "
               "wan5b-720p --json results.jsonl\n  wildactor bench --smoke --json /tmp/smoke.jsonl\n\n"
               "Add --debug (or set WILDACTOR_DEBUG=1) to see the full traceback of an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


#: model-suite and kernel-script options that only the CUDA run reads
CUDA_ONLY_OPTIONS = ("shape", "paths", "layers", "iters", "warmup", "encode_iters", "no_compile",
                     "compile_timeout", "seed", "script_timeout", "in_process")


def check_json_path(path: str, flag: str = "--json") -> str:
    """``path`` can be appended to: its folder exists or can be made, and a file can be opened there."""
    p = os.path.abspath(path)
    if os.path.isdir(p):
        raise BenchUsageError(f"{flag} {path}: is a directory; give a file name (e.g. {path.rstrip('/')}/"
                              f"bench.jsonl)")
    anc = os.path.dirname(p)
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise BenchUsageError(f"{flag} {path}: {anc} is a file, so no folder can be made below it")
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise BenchUsageError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


def check_args(args: argparse.Namespace) -> bool:
    """Check ``args`` before any work; returns True for the smoke run, False for the CUDA run."""
    cuda_here = torch.cuda.is_available()
    if args.device == "cuda" and not cuda_here:
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise BenchUsageError(f"--device cuda: no CUDA device is available ({why}, torch "
                              f"{torch.__version__}); without --device a CPU smoke run checks the "
                              f"pipeline")
    smoke = args.smoke or args.device == "cpu" or not cuda_here
    if smoke:
        defaults = argparse.ArgumentParser()
        add_arguments(defaults)
        base = vars(defaults.parse_args([]))
        given = [o for o in CUDA_ONLY_OPTIONS if o in base and getattr(args, o, base[o]) != base[o]]
        if given:
            why = "there is no CUDA device here" if not cuda_here else (
                "of --smoke" if args.smoke else "of --device cpu")
            flags = ", ".join("--" + o.replace("_", "-") for o in given)
            it = "them" if len(given) > 1 else "it"
            raise BenchUsageError(f"{flags}: only the CUDA run reads {it}; here the smoke run (tiny "
                                  f"shapes, reference ops) runs because {why}; drop {it}, or run on a "
                                  f"CUDA machine")
    if args.json:
        check_json_path(args.json)
    return smoke


def cmd_bench(args: argparse.Namespace) -> int:
    """Run what ``args`` asks; returns the exit status."""
    if check_args(args):
        why = ("no CUDA device here" if not torch.cuda.is_available()
               else "--smoke" if args.smoke else "--device cpu")
        print("wildactor bench: " + why + ". The kernel "
              "and model benchmarks time GPU work (H100-class) and have nothing meaningful to measure "
              "on the CPU; running a smoke run instead (tiny shapes, reference backend, a couple of "
              "steps) to check the pipeline. Its timings are not performance data.", flush=True)
        path = run_smoke(args.suite, args.json, report_md=not args.no_report)
        rows = harness.read_jsonl(path)
        if args.suite in ("model", "all"):
            print(report.model_markdown(rows))
        if args.suite in ("kernels", "all"):
            print(report.generic_markdown(report.latest_run(rows, "ops_smoke"), title="### ops (smoke)"))
        print(f"# rows appended to {path}")
        return 0

    return run_full(args, torch.device("cuda"))


def run_full(args: argparse.Namespace, device: torch.device) -> int:
    """The kernel and/or model suite of ``args`` on ``device`` (CUDA; the CPU only in tests, with
    the ``tiny`` shape). Returns the exit status: 1 if a kernel script or one of our model paths
    failed, else 0 (a failed peer is a recorded result, not an error)."""
    env = harness.env_record(device)
    run_id = harness.new_run_id()
    log = bench_model._Log()
    written: list[str] = []
    rc = 0
    log(f"wildactor bench --suite {args.suite} on {env['gpu'] or 'cpu'} (sm {env['compute_capability']}), "
        f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}")
    if args.suite in ("kernels", "all"):
        out_dir = os.path.dirname(os.path.abspath(args.json)) if args.json else None
        rows = run_kernel_suite(args.shape, out_dir=out_dir, timeout=args.script_timeout,
                                in_process=args.in_process)
        path = args.json or harness.results_path("kernel_suite")
        written.append(harness.append_jsonl(path, rows, kind="kernel_suite", env=env, run_id=run_id))
        if any(r.get("status") == "failed" for r in rows):
            rc = 1
    if args.suite in ("model", "all"):
        ns = argparse.Namespace(**vars(args))
        ns.shapes = [s for s in (args.shape or []) if s in bench_model.SHAPES] or None
        ns.device = device.type
        rows = bench_model.run(ns, log=log)
        path = args.json or harness.results_path(bench_model.KIND)
        written.append(harness.append_jsonl(path, rows, kind=bench_model.KIND, env=env, run_id=run_id))
        if any(r.get("status") == "failed" and r.get("path", "").startswith("ours") for r in rows):
            rc = 1
        print(report.model_markdown(rows_with_env(rows, env, run_id)))
    if not args.no_report:
        for p in report.write_reports(sorted(set(written))):
            log(f"wrote {p}")
        if not args.json:
            with open(os.path.join(harness.RESULTS_DIR, "index.md"), "w", encoding="utf-8") as fh:
                fh.write(report.index_markdown(harness.RESULTS_DIR))
    for p in sorted(set(written)):
        log(f"rows appended to {p}")
    log("done")
    return rc


def rows_with_env(rows: list[dict[str, Any]], env: dict[str, Any], run_id: str) -> list[dict[str, Any]]:
    """Rows as they read back from the JSON-lines file (kind, run id and env attached)."""
    return [{"kind": bench_model.KIND, "run_id": run_id, **r, "env": env} for r in rows]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise BenchUsageError(f"{message} (see `{self.prog} --help`)")


def main(argv: list[str] | None = None) -> int:
    """``wildactor bench``: a mistake prints one line on stderr (exit 2), a failure one line
    (exit 1); ``--debug`` or ``WILDACTOR_DEBUG=1`` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("WILDACTOR_DEBUG") == "1" or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = _Parser(prog="wildactor")
    sub = parser.add_subparsers(dest="command")
    register_cli(sub)
    if not argv or argv[0] != "bench":
        argv = ["bench", *argv]
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except BenchUsageError as e:
        if debug:
            raise
        print(f"wildactor bench: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"wildactor bench: error: {type(e).__name__}: {first} (run again with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
