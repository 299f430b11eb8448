"""Shared benchmark harness: environment record, timing, FLOP/s, GB/s and % of peak, result files.

Every benchmark (``bench_model.py``, ``suite.py``, the pytest-benchmark files and the per-kernel
scripts ``bench_rope.py``, ``bench_attention.py``, ``bench_lora.py``, ``bench_quant.py``)
measures through :func:`bench`, takes its shapes from :data:`DESIGN_SHAPES` and its peaks from
:func:`device_peaks` / :func:`device_hbm_gbps`, and stamps its results with :func:`env_record`,
so numbers from different scripts are taken the same way and carry the same provenance. The
suite stores rows as JSON lines (:func:`append_jsonl`); the per-kernel scripts append whole runs
to a JSON list (:func:`script_run`, :func:`append_json_run`), the format ``report.py`` indexes.

Timing (METHOD: medians, warm-up, never the cache, never zeros):

- CUDA, short work (``iters=None``): ``triton.testing.do_bench``, median with 20/80 %
  quantiles. do_bench zeroes a 256 MB buffer before every timed call (the L2 is flushed) and
  sizes warm-up and repetitions from its ``warmup``/``rep`` budgets in ms; ``min_reps`` raises
  the budgets after one sized call so that a call longer than ``rep`` is still timed that often.
- CUDA, long work (``iters=N``, e.g. a 2 s model step, where do_bench's time budget would give
  one repetition): ``N`` calls timed one by one with CUDA events, the same L2 flush before
  each, after ``warmup`` untimed calls.
- CPU (the smoke run): ``time.perf_counter`` around each call.
- ``inputs=[args0, args1, ...]``: argument sets cycled call by call, so a working set that
  fits in L2 is not what repeated calls measure.

A timing that is not a positive finite number raises :class:`BenchError`; a peer that fails is
stored as ``{"status": "failed", "error": ...}`` (:func:`failed`), never as zero or NaN.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

__all__ = [
    "RESULTS_DIR",
    "DESIGN_SHAPES",
    "BenchError",
    "design_layout",
    "design_tokens",
    "env_record",
    "env_summary",
    "module_version",
    "commit_label",
    "device_peaks",
    "device_hbm_gbps",
    "cuda_device_or_explain",
    "bench",
    "tflops",
    "gbps",
    "pct_of_peak",
    "flops_metrics",
    "bandwidth_metrics",
    "failed",
    "skipped",
    "run_peer",
    "new_run_id",
    "results_path",
    "append_jsonl",
    "read_jsonl",
    "sanitize",
    "cuda_sync",
    "file_slug",
    "resolve_out",
    "script_run",
    "session_runs",
    "keep_partial",
    "append_json_run",
    "write_text",
]

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, matched
# against torch.cuda.get_device_name() in this order (the more specific names first). H100 SXM
# and H200 have the same cores and clocks, hence the same peaks (docs/design.md §8: 989 bf16, 1979 fp8).
_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp8": 1671.0}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp8": 1671.0}),
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp8": 733.0}),
]

# HBM bandwidth in GB/s (datasheets), matched the same way, for the % of peak of memory-bound kernels.
_HBM_GBPS: list[tuple[str, float]] = [
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H200", 4800.0),
    ("H100", 3350.0),
    ("A100", 2000.0),
    ("L40S", 864.0),
]

#: The shapes the kernel benchmarks report (docs/design.md §8): batch ``B``, heads ``H``, head dim ``D``,
#: the video token grid ``(T, H, W)`` and ``refs`` reference images of ``ref_grid`` tokens each.
#: docs/design.md §8 does not fix the references' kinds: :func:`design_layout` makes the first two faces.
DESIGN_SHAPES: dict[str, dict[str, Any]] = {
    "wan5b-720p": dict(B=1, H=24, D=128, video=(31, 22, 40), refs=5, ref_grid=(22, 40)),
    "wan1.3b-480p": dict(B=1, H=12, D=128, video=(21, 30, 52), refs=5, ref_grid=(30, 52)),
    "wan14b-720p": dict(B=1, H=40, D=128, video=(21, 45, 80), refs=3, ref_grid=(45, 80)),
}


class BenchError(RuntimeError):
    """A measurement that cannot be reported (non-positive or non-finite time, bad FLOP count)."""


# ============================================================================ environment
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def module_version(module: str) -> str | None:
    """``module.__version__``, or None when it cannot be imported."""
    try:
        return str(__import__(module).__version__)
    except Exception:
        return None


_version = module_version


def device_peaks(name: str | None) -> dict[str, float] | None:
    """Dense tensor-core peaks ``{"bf16": TFLOP/s, "fp8": ...}`` of a GPU named ``name``
    (``torch.cuda.get_device_name``), or None for a device whose peak this table lacks."""
    if not name:
        return None
    for key, peaks in _PEAKS:
        if key.lower() in name.lower():
            return dict(peaks)
    return None


def device_hbm_gbps(name: str | None) -> float | None:
    """HBM bandwidth in GB/s of a GPU named ``name``, or None for a device this table lacks."""
    if not name:
        return None
    for key, peak in _HBM_GBPS:
        if key.lower() in name.lower():
            return peak
    return None


def design_layout(spec: Mapping[str, Any]):
    """The ``wildactor_kernels.TokenLayout`` of a :data:`DESIGN_SHAPES` entry (references: two
    faces, then bodies)."""
    import wildactor_kernels as wk

    refs = [("face" if i < 2 else "body", *spec["ref_grid"]) for i in range(spec["refs"])]
    return wk.TokenLayout(spec["video"], refs)


def design_tokens(name: str) -> tuple[int, int]:
    """``(Nv, Nr)``: video and reference token counts of the docs/design.md §8 shape ``name``."""
    spec = DESIGN_SHAPES[name]
    return math.prod(spec["video"]), spec["refs"] * math.prod(spec["ref_grid"])


def env_record(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where and with what a number was taken.

    Fields: ``date_utc``, ``device`` (``"cuda"``/``"cpu"``), ``gpu`` (name or None),
    ``compute_capability`` (``"9.0"`` or None), ``gpu_memory_gb``, ``sm_count``, ``peaks_tflops``
    (None when unknown), ``torch``, ``triton``, ``cuda``, ``cudnn``, ``python``, ``platform``,
    ``git_commit`` and ``git_dirty`` (tracked files changed). Without a ``.git`` (a copied tree)
    the commit is read from ``$WILDACTOR_GIT_COMMIT`` if set, else ``"unknown"``.
    """
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    rec: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.type,
        "gpu": None,
        "compute_capability": None,
        "gpu_memory_gb": None,
        "sm_count": None,
        "peaks_tflops": None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        rec.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   peaks_tflops=device_peaks(props.name))
    commit = _git("rev-parse", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        rec["git_commit"], rec["git_dirty"] = commit[:12], bool(dirty)
    else:
        rec["git_commit"] = os.environ.get("WILDACTOR_GIT_COMMIT", "unknown")
        rec["git_dirty"] = None
    return rec


def commit_label(env: Mapping[str, Any]) -> str:
    """``env``'s commit, with ``+dirty`` when tracked files had changed."""
    return str(env.get("git_commit")) + ("+dirty" if env.get("git_dirty") else "")


def env_summary(env: Mapping[str, Any]) -> str:
    """One line for a script's log: device, versions, commit."""
    return (f"{env.get('gpu') or 'CPU'} | torch {env.get('torch')} | triton {env.get('triton')} "
            f"| commit {commit_label(env)}")


def cuda_device_or_explain(script: str,
                           what: str = "this benchmark times GPU kernels") -> torch.device | None:
    """The CUDA device, or None after printing why ``script`` has nothing to measure here (the
    per-kernel scripts then exit 0)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    print(f"{script}: no CUDA device here; {what} and has nothing to measure on the CPU (the Triton "
          f"interpreter is for correctness only). Exiting.", flush=True)
    return None


# ============================================================================ timing
def cuda_sync(device: torch.device | str | None = None) -> None:
    """``torch.cuda.synchronize`` when ``device`` is CUDA (no-op on CPU)."""
    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        torch.cuda.synchronize(dev)


def _cycler(fn: Callable, inputs: Sequence | None) -> Callable[[], Any]:
    if inputs is None:
        return fn
    sets = [a if isinstance(a, tuple) else (a,) for a in inputs]
    if not sets:
        raise ValueError("inputs must hold at least one argument set")
    state = {"i": 0}

    def call():
        args = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*args)

    return call


def _quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """Median, 20 % and 80 % quantiles (linear interpolation, as torch.quantile/do_bench)."""
    t = torch.tensor(list(times), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _check_times(res: dict[str, Any]) -> dict[str, Any]:
    for key in ("ms", "ms_p20", "ms_p80"):
        v = res[key]
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise BenchError(f"timing {key}={v!r} is not a positive finite number ({res['method']}); "
                             f"refusing to report it")
    return res


def bench(fn: Callable, *, inputs: Sequence | None = None, warmup: float | None = None, rep: float = 100,
          iters: int | None = None, min_reps: int | None = None, device: torch.device | str | None = None,
          grad_to_none: Iterable[torch.Tensor] | None = None) -> dict[str, Any]:
    """Time ``fn`` and return ``{"ms", "ms_p20", "ms_p80", "n", "method"}`` (median and 20/80 %
    quantiles of single calls, milliseconds).

    Args:
        fn: the work; called as ``fn()`` or, with ``inputs``, ``fn(*inputs[i % len(inputs)])``.
        inputs: argument sets cycled per call (tuples; a bare tensor is one argument).
        warmup, rep: do_bench's budgets in ms (CUDA without ``iters``; also the CPU budget);
            ``warmup`` defaults to 25 ms.
        iters: fixed number of timed calls (CUDA events; CPU timer) after ``warmup`` untimed
            calls (then ``warmup`` is a count, default 1). Use it for work of 10 ms and more.
        min_reps: without ``iters``: at least this many timed calls. On CUDA ``fn`` is called
            once (compilation, autotuning) and once more on a wall clock, and do_bench's budgets
            grow to ``warmup >= 1 call`` and ``rep >= min_reps calls`` (do_bench alone would
            time a 300 ms call once).
        device: where ``fn`` runs (default: CUDA when available).
        grad_to_none: tensors whose ``.grad`` is reset before each timed call, outside the
            timing (fwd+bwd timing; on CUDA do_bench's own ``grad_to_none``).
    Raises:
        BenchError: a timing that is not a positive finite number.
    """
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if warmup is None:
        warmup = 25 if iters is None else 1
    if iters is not None and iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    call = _cycler(fn, inputs)
    grads = list(grad_to_none or [])

    def clear():
        for t in grads:
            t.grad = None

    if dev.type == "cuda" and iters is None:
        from triton.testing import do_bench

        if min_reps:
            call()  # compile / autotune outside the timing
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            call()
            torch.cuda.synchronize(dev)
            est = (time.perf_counter() - t0) * 1e3
            warmup, rep = max(warmup, est), max(rep, min_reps * est)
        med, p20, p80 = do_bench(call, warmup=warmup, rep=rep, grad_to_none=grads or None,
                                 quantiles=[0.5, 0.2, 0.8])
        n = None  # do_bench picks the count from its budget
        return _check_times({"ms": float(med), "ms_p20": float(p20), "ms_p80": float(p80), "n": n,
                             "method": "triton.do_bench"})

    if dev.type == "cuda":
        n_warm = int(warmup)
        for _ in range(n_warm):
            clear()
            call()
        # 256 MB zeroed before each call, larger than any L2 (H100 50 MB, H200 60 MB), as do_bench
        # does; allocated here and dropped on return, so it never shows in a caller's memory peak
        flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=dev)
        torch.cuda.synchronize(dev)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            clear()
            flush.zero_()
            starts[i].record()
            call()
            ends[i].record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        med, p20, p80 = _quantiles(times)
        return _check_times({"ms": med, "ms_p20": p20, "ms_p80": p80, "n": iters, "warmup_calls": n_warm,
                             "method": "cuda-events"})

    # CPU: plain wall clock per call
    if iters is None:
        t0 = time.perf_counter()
        clear()
        call()
        est = max(time.perf_counter() - t0, 1e-9) * 1e3
        n_warm = max(1, min(1000, int(warmup / est)))
        n = max(3, min_reps or 0, min(10000, int(rep / est)))
    else:
        n_warm, n = int(warmup), int(iters)
    for _ in range(n_warm):
        clear()
        call()
    times = []
    for _ in range(n):
        clear()
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = _quantiles(times)
    return _check_times({"ms": med, "ms_p20": p20, "ms_p80": p80, "n": n, "warmup_calls": n_warm,
                         "method": "cpu-perf_counter"})


# ============================================================================ derived metrics
def _per_second(amount: float, ms: float, what: str) -> float:
    if not (amount > 0 and math.isfinite(amount)):
        raise BenchError(f"{what} {amount!r} must be positive")
    if not (ms > 0 and math.isfinite(ms)):
        raise BenchError(f"time {ms!r} ms must be positive")
    return amount / (ms * 1e-3)


def tflops(flops: float, ms: float) -> float:
    """``flops`` done in ``ms`` milliseconds, in TFLOP/s."""
    return _per_second(flops, ms, "FLOP count") / 1e12


def gbps(nbytes: float, ms: float) -> float:
    """``nbytes`` moved in ``ms`` milliseconds, in GB/s."""
    return _per_second(nbytes, ms, "byte count") / 1e9


def pct_of_peak(value_tflops: float, dtype: str, peaks: Mapping[str, float] | None) -> float | None:
    """``value_tflops`` as % of the device's dense ``dtype`` peak; None when the peak is unknown."""
    if not peaks or dtype not in peaks:
        return None
    return 100.0 * value_tflops / peaks[dtype]


def flops_metrics(flops: float, ms: float, dtype: str = "bf16",
                  peaks: Mapping[str, float] | None = None) -> dict[str, Any]:
    """``{"flops", "tflops", "pct_peak", "peak_dtype"}`` for a timed piece of work."""
    t = tflops(flops, ms)
    return {"flops": float(flops), "tflops": t, "pct_peak": pct_of_peak(t, dtype, peaks), "peak_dtype": dtype}


def bandwidth_metrics(nbytes: float, ms: float, peak_gbps: float | None = None) -> dict[str, Any]:
    """``{"bytes", "gbps", "pct_peak"}`` for a timed memory-bound piece of work (``pct_peak`` None
    when the bandwidth peak is unknown)."""
    g = gbps(nbytes, ms)
    return {"bytes": nbytes, "gbps": g, "pct_peak": 100.0 * g / peak_gbps if peak_gbps else None}


# ============================================================================ rows
def failed(error: BaseException | str) -> dict[str, Any]:
    """The row fields of a peer that could not be measured."""
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"status": "failed", "error": msg.strip()[:1000]}


def skipped(reason: str) -> dict[str, Any]:
    """The row fields of a peer deliberately not run (and why)."""
    return {"status": "skipped", "reason": reason}


def run_peer(measure: Callable[[], Mapping[str, Any]], **fields: Any) -> dict[str, Any]:
    """``{**fields, **measure(), "status": "ok"}``, or ``{**fields, **failed(e)}`` when
    ``measure`` raises: one failing peer never hides the others."""
    row = dict(fields)
    try:
        out = dict(measure())
    except Exception as e:  # noqa: BLE001 - recorded in the row
        row.update(failed(e))
        return row
    row.update(out)
    row.setdefault("status", "ok")
    return row


def new_run_id() -> str:
    """Identifier shared by the rows of one run (UTC time + random suffix), or
    ``$WILDACTOR_RUN_ID`` when set: several processes then write one run (a GPU session's
    scripts, one model shape per process; see ``benchmarks/gpu_session.sh``)."""
    fixed = os.environ.get("WILDACTOR_RUN_ID", "").strip()
    if fixed:
        return fixed
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def results_path(kind: str, directory: str | None = None) -> str:
    """``benchmarks/results/<kind>.jsonl`` (or under ``directory``)."""
    return os.path.join(directory or RESULTS_DIR, f"{kind}.jsonl")


def sanitize(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``"inf"``/``"-inf"``/``"nan"`` strings (JSON has no
    such numbers and a silent null would hide them), dtypes/devices become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj).replace("torch.", "")
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return sanitize(obj.item())
    return str(obj)


def append_jsonl(path: str, rows: Iterable[Mapping[str, Any]], *, kind: str, env: Mapping[str, Any],
                 run_id: str | None = None) -> str:
    """Append ``rows`` to the JSON-lines file ``path``, one object per line, each stamped with
    ``kind``, ``run_id`` and the environment record ``env``. Returns ``path``."""
    run_id = run_id or new_run_id()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            rec = {"kind": kind, "run_id": run_id, **row, "env": dict(env)}
            fh.write(json.dumps(sanitize(rec), sort_keys=False) + "\n")
    return path


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a malformed line (e.g. a run killed mid-write) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                rows.append(rec)
    return rows


# ============================================================================ per-kernel script files
def file_slug(name: str, sep: str = "-") -> str:
    """``name`` (a GPU name) as a lower-case file-name part: runs of other characters than letters
    and digits become ``sep`` ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    return re.sub(r"[^A-Za-z0-9]+", sep, name).strip(sep).lower()


def resolve_out(path: str, default_name: str, *, bare_in_results: bool = True) -> str:
    """Where a script's ``--out`` points: an existing folder gets ``default_name`` inside it; with
    ``bare_in_results`` a bare file name goes to ``benchmarks/results/``; else ``path`` as given."""
    if os.path.isdir(path):
        return os.path.join(path, default_name)
    if bare_in_results and not os.path.dirname(path):
        return os.path.join(RESULTS_DIR, path)
    return path


def script_run(benchmark: str, env: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """One run of a per-kernel script as its JSON file stores it: ``benchmark``, ``gpu``,
    ``torch``, ``triton``, ``commit`` and ``date`` (what :func:`benchmarks.report.index_markdown`
    reads), ``run_id`` (:func:`new_run_id`), then ``fields`` (options, ``results`` rows, ...),
    then the whole environment record ``env``."""
    return {"benchmark": benchmark, "gpu": env.get("gpu"), "torch": env.get("torch"),
            "triton": env.get("triton"), "commit": commit_label(env), "date": env.get("date_utc"),
            "run_id": new_run_id(), **fields, "env": dict(env)}


def session_runs(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The last run of a script's JSON list and the runs just before it with the same ``run_id``
    (one script called several times in one session under ``$WILDACTOR_RUN_ID``), oldest first."""
    if not runs:
        return []
    rid = runs[-1].get("run_id")
    out = [runs[-1]]
    if rid:
        for r in reversed(runs[:-1]):
            if r.get("run_id") != rid:
                break
            out.append(r)
    return out[::-1]


@contextlib.contextmanager
def keep_partial(run: dict[str, Any]):
    """Measure inside this block: a KeyboardInterrupt (Ctrl-C, or the SIGINT of ``timeout -s INT``
    at a script's time limit) ends the measurements early and sets ``run["interrupted"]`` instead
    of propagating, so the script still writes the rows measured before it (and exits 130)."""
    t0 = time.perf_counter()
    try:
        yield run
    except KeyboardInterrupt:
        run["interrupted"] = (f"KeyboardInterrupt after {time.perf_counter() - t0:.0f} s: the results hold "
                              f"the rows measured before it")
        print(f"# {run['interrupted']}; writing them", flush=True)


def append_json_run(path: str, run: Mapping[str, Any]) -> str:
    """Append ``run`` to the JSON list of runs in ``path`` (a file holding one run object becomes
    a list); non-finite floats are stored as strings (:func:`sanitize`). Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    runs: list[Any] = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        runs = old if isinstance(old, list) else [old]
    runs.append(run)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(sanitize(runs), fh, indent=1)
    return path


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` (folders created). Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path
