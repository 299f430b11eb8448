"""Tables and plots from the benchmark result files; no number is typed by hand.

Inputs: the JSON-lines files of the suite (``benchmarks/results/<kind>.jsonl``, written by
:mod:`benchmarks.harness`) and, for the index, the per-kernel scripts' JSON files (a list of
runs, each with its ``results`` rows). Outputs, next to the inputs:

- ``<kind>.md``: the latest run of each kind as a markdown table (``model_step.md``, ...);
- ``<kind>.png``: a plot (model step times per path and shape) when matplotlib is installed;
- ``index.md``: every result file with the device, date and commit of its latest run.

``--choices`` prints the comparison behind the two kernel defaults left to the GPU (``ROPE_MODE``,
``RefLoRALinear.AUTO_FOLD_INFERENCE``) from the latest session of the kernel scripts' JSON.

``--readme`` prints the block for README.md (the latest model-step table with device and
date) between ``<!-- bench:start -->`` and ``<!-- bench:end -->``; ``--update-readme PATH``
replaces that block in PATH when both markers are there (:func:`update_readme`).

Usage::

    python -m benchmarks.report                       # all files in benchmarks/results/
    python -m benchmarks.report --results /tmp/wildactor-bench/model_step.jsonl --no-plots
    python -m benchmarks.report --readme              # print the README block
    python -m benchmarks.report --update-readme README.md
    python -m benchmarks.report --choices             # ROPE_MODE / AUTO_FOLD_INFERENCE numbers
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import harness  # noqa: E402
from benchmarks.harness import RESULTS_DIR, read_jsonl  # noqa: E402

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
PATH_ORDER = ("eager", "compile", "ours-bf16", "ours-fp8")

__all__ = ["load_rows", "latest_run", "model_markdown", "generic_markdown", "write_reports", "plot_model",
           "index_markdown", "kernel_choices", "readme_block", "update_readme", "main"]


# ============================================================================ loading
def _jsonl_files(paths: str | Sequence[str] | None) -> list[str]:
    if paths is None:
        paths = [RESULTS_DIR]
    if isinstance(paths, str):
        paths = [paths]
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files.extend(sorted(glob.glob(os.path.join(p, "*.jsonl"))))
        elif os.path.exists(p):
            files.append(p)
    return files


def load_rows(paths: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
    """All rows of the JSON-lines files in ``paths`` (files or directories; default
    ``benchmarks/results``), in file order."""
    rows: list[dict[str, Any]] = []
    for f in _jsonl_files(paths):
        for r in read_jsonl(f):
            r.setdefault("_file", f)
            rows.append(r)
    return rows


def _run_date(rows: Iterable[dict[str, Any]]) -> str:
    return max((str(r.get("env", {}).get("date_utc", "")) for r in rows), default="")


def latest_run(rows: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The rows of the most recent run (by ``env.date_utc``, then file order) of ``kind``."""
    runs: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for r in rows:
        if r.get("kind") == kind:
            runs.setdefault(str(r.get("run_id")), []).append(r)
    if not runs:
        return []
    order = list(runs)
    best = max(order, key=lambda k: (_run_date(runs[k]), order.index(k)))
    return runs[best]


# ============================================================================ formatting
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):  # harness.sanitize writes non-finite floats as strings
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _ms(v: Any) -> str:
    x = _num(v)
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.4f}" if x < 0.01 else f"{x:.3f}"


def _fmt(v: Any, digits: int = 2, suffix: str = "") -> str:
    x = _num(v)
    if x is None:
        return "-"
    if math.isinf(x):
        return ("inf" if x > 0 else "-inf") + suffix
    return f"{x:.{digits}f}{suffix}"


def _sig(v: Any) -> str:
    """Three significant digits for small values, one decimal otherwise."""
    x = _num(v)
    if x is None:
        return "-"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def env_line(env: dict[str, Any]) -> str:
    """One line naming the device, versions, commit and date of a run."""
    if env.get("device") == "cuda":
        dev = f"{env.get('gpu')} (sm {env.get('compute_capability')})"
    else:
        dev = f"CPU ({env.get('platform', '')}), smoke run: not performance data"
    commit = str(env.get("git_commit"))
    if env.get("git_dirty"):
        commit += "+dirty"
    return (f"{dev} | torch {env.get('torch')} | triton {env.get('triton')} | python {env.get('python')} "
            f"| commit {commit} | {env.get('date_utc')}")


def _status_cell(r: dict[str, Any]) -> str | None:
    st = r.get("status", "ok")
    if st == "failed":
        return f"failed: {_cell(str(r.get('error', ''))[:90])}"
    if st == "skipped":
        return f"skipped: {_cell(r.get('reason', ''))}"
    return None


def model_markdown(rows: Sequence[dict[str, Any]], heading: str = "###") -> str:
    """Markdown of the latest ``model_step`` run in ``rows`` (one table per shape)."""
    run = latest_run(rows, "model_step")
    if not run:
        return "_No model-step results yet._\n"
    env = run[0].get("env", {})
    how = {"cuda-events": "CUDA-event-timed steps", "cpu-perf_counter": "wall-clock-timed steps (CPU)"}.get(
        str(next((r.get("timing") for r in run if r.get("timing")), "")), "timed steps")
    lines = [f"{heading} One denoising step (CFG, batch 2), random weights", "", env_line(env), "",
             f"ms per step: median [p20, p80] of {how}; speedups are time ratios within "
             "this run; peak = `torch.cuda.max_memory_allocated` during a step (weights included); "
             "ref encode = once per generation; TFLOP/s counts the FLOPs of a cached step; "
             "SQNR of the velocity in dB.", ""]
    shapes: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for r in run:
        shapes.setdefault(str(r.get("shape")), []).append(r)
    for shape, rs in shapes.items():
        r0 = rs[0]
        lines.append(f"**{shape}**: {r0.get('preset')}, {r0.get('layers')} layers, {r0.get('dtype')}, "
                     f"Nv={r0.get('Nv')}, Nr={r0.get('Nr')} ({r0.get('num_refs')} references), text "
                     f"{r0.get('text_len')} tokens")
        lines.append("")
        lines.append("| path | ms / step [p20, p80] | vs (a) | vs (b) | peak GB | ref encode ms "
                     "| first call s | TFLOP/s (% peak) | SQNR vs (a) | SQNR vs (c) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        rs = sorted(rs, key=lambda r: PATH_ORDER.index(r["path"]) if r.get("path") in PATH_ORDER else 99)
        for r in rs:
            label = _cell(r.get("label") or r.get("path"))
            bad = _status_cell(r)
            if bad:
                lines.append(f"| {label} | {bad} | - | - | - | - | - | - | - | - |")
                continue
            ms = f"{_ms(r.get('ms'))} [{_ms(r.get('ms_p20'))}, {_ms(r.get('ms_p80'))}]"
            sv = [_fmt(r.get("speedup_vs_eager"), 2, "x"), _fmt(r.get("speedup_vs_compile"), 2, "x")]
            enc = (f"{_ms(r.get('encode_ms'))} [{_ms(r.get('encode_ms_p20'))}, {_ms(r.get('encode_ms_p80'))}]"
                   if _num(r.get("encode_ms")) is not None else "- (no cache)")
            tf = _sig(r.get("tflops"))
            if _num(r.get("pct_peak")) is not None:
                tf += f" ({_fmt(r.get('pct_peak'), 1)} %)"
            lines.append(f"| {label} | {ms} | {sv[0]} | {sv[1]} | {_fmt(r.get('peak_mem_gb'), 1)} | {enc} "
                         f"| {_fmt(r.get('first_call_s'), 1)} | {tf} | {_fmt(r.get('sqnr_vs_eager_db'), 1)} "
                         f"| {_fmt(r.get('sqnr_vs_bf16_db'), 1)} |")
        notes = []
        for r in rs:
            for n in r.get("notes") or []:
                notes.append(f"{r.get('path')}: {n}")
            if r.get("sdpa_backend"):
                notes.append(f"{r.get('path')}: SDPA backend {r['sdpa_backend']}")
            if r.get("fp8_gemm_paths"):
                notes.append(f"{r.get('path')}: FP8 GEMM paths {r['fp8_gemm_paths']}")
        if notes:
            lines.append("")
            lines.extend(f"- {_cell(n)}" for n in notes)
        lines.append("")
    return "\n".join(lines)


_GENERIC_COLS = ["op", "linear", "name", "script", "shape", "mode", "impl", "path", "status", "ms", "ms_p20",
                 "ms_p80", "tflops", "gbps", "pct_peak", "vs_base", "seconds", "rc", "error", "reason"]


def generic_markdown(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """A table of ``rows`` with the usual result columns that any row has."""
    if not rows:
        return "_No rows._\n"
    cols = [c for c in _GENERIC_COLS if any(c in r for r in rows)]
    lines = []
    if title:
        lines += [title, ""]
    env = rows[0].get("env")
    if isinstance(env, dict):
        lines += [env_line(env), ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c.startswith("ms"):
                cells.append(_ms(v))
            elif c in ("tflops", "gbps", "pct_peak", "vs_base", "seconds"):
                cells.append(_sig(v))
            else:
                cells.append(_cell("" if v is None else str(v)[:120]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ============================================================================ plots
def plot_model(rows: Sequence[dict[str, Any]], png_path: str) -> str | None:
    """Bar chart of the latest model-step run (ms per step by shape and path, p20/p80 whiskers,
    speedup vs (a) on the bars). Returns the path, or None without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    run = [r for r in latest_run(rows, "model_step") if r.get("status", "ok") == "ok"]
    if not run:
        return None
    shapes = list(OrderedDict.fromkeys(str(r["shape"]) for r in run))
    paths = [p for p in PATH_ORDER if any(r.get("path") == p for r in run)]
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = {r["path"]: r for r in run if r["shape"] == shape}
        xs = [p for p in paths if p in rs]
        ms = [float(rs[p]["ms"]) for p in xs]
        lo = [float(rs[p]["ms"]) - float(rs[p]["ms_p20"]) for p in xs]
        hi = [float(rs[p]["ms_p80"]) - float(rs[p]["ms"]) for p in xs]
        bars = ax.bar(range(len(xs)), ms, yerr=[lo, hi], capsize=3, color="#4c72b0")
        for b, p in zip(bars, xs):
            s = _num(rs[p].get("speedup_vs_eager"))
            if s is not None:
                ax.annotate(f"{s:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=8)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=20)
        ax.set_ylabel("ms per step (median)")
        ax.set_title(shape)
    env = run[0].get("env", {})
    fig.suptitle(f"WildActor denoising step (CFG batch 2) - {env.get('gpu') or 'CPU'} - "
                 f"{str(env.get('date_utc', ''))[:10]}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ============================================================================ files
def _kind_markdown(kind: str, rows: Sequence[dict[str, Any]]) -> str:
    if kind == "model_step":
        return model_markdown(rows, heading="#")
    run = latest_run(rows, kind)
    return generic_markdown(run, title=f"# {kind}")


def write_reports(paths: str | Sequence[str] | None = None, out_dir: str | None = None,
                  plots: bool = True) -> list[str]:
    """Write ``<kind>.md`` (and ``model_step.png``) for every kind found in the JSON-lines files
    ``paths`` (default ``benchmarks/results``), into ``out_dir`` (default: beside each file).
    Returns the paths written."""
    written = []
    for f in _jsonl_files(paths):
        rows = read_jsonl(f)
        kinds = list(OrderedDict.fromkeys(str(r.get("kind")) for r in rows if r.get("kind")))
        d = out_dir or os.path.dirname(os.path.abspath(f))
        os.makedirs(d, exist_ok=True)
        for kind in kinds:
            md = os.path.join(d, f"{kind}.md")
            with open(md, "w", encoding="utf-8") as fh:
                fh.write(_kind_markdown(kind, rows))
            written.append(md)
            if plots and kind == "model_step":
                png = plot_model(rows, os.path.join(d, f"{kind}.png"))
                if png:
                    written.append(png)
    return written


def _json_runs(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except Exception:
        return []
    runs = data if isinstance(data, list) else [data]
    return [r for r in runs if isinstance(r, dict)]


def index_markdown(results_dir: str = RESULTS_DIR) -> str:
    """Every result file of ``results_dir`` with the device/date/commit of its latest run; the
    per-kernel scripts' latest ``results`` rows as tables."""
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.report` from the files in this folder.", ""]
    for f in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        rows = read_jsonl(f)
        kinds = list(OrderedDict.fromkeys(str(r.get("kind")) for r in rows))
        for kind in kinds:
            run = latest_run(rows, kind)
            env = run[0].get("env", {}) if run else {}
            lines.append(f"- `{os.path.basename(f)}` ({kind}, {len(rows)} rows): latest run "
                         f"{env_line(env) if env else '-'} -> [{kind}.md]({kind}.md)")
    for f in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        runs = _json_runs(f)
        if not runs:
            continue
        session = harness.session_runs(runs)  # the last run, with the runs of its session before it
        last = runs[-1]
        meta = last.get("meta", last)
        who = meta.get("gpu") or meta.get("device") or "?"
        also = (f" (+{len(session) - 1} earlier runs of its session, rows included)"
                if len(session) > 1 else "")
        lines.append(f"- `{os.path.basename(f)}` ({len(runs)} runs): latest {who} "
                     f"| torch {meta.get('torch')} | commit {meta.get('commit')} | {meta.get('date')}{also}")
        tables: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        for run in session:
            for key, rows in run.items():  # "results" (rope, lora), "layers"/"block" (quant), ...
                if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
                    tables.setdefault(key, []).extend(rows)
            if run.get("interrupted"):
                lines += ["", f"> {_cell(run['interrupted'])}"]
        for key, rows in tables.items():
            lines += ["", f"`{key}`:", "", generic_markdown(rows), ""]
    return "\n".join(lines) + "\n"


# ============================================================================ kernel defaults
#: Times within this factor of each other are treated as a tie (noise, clocks): keep the default.
TIE = 1.03


def _session_rows(path: str, key: str = "results") -> list[dict[str, Any]]:
    """The ``key`` rows of the latest session in the JSON list of runs ``path`` (none if absent)."""
    if not os.path.exists(path):
        return []
    return [r for run in harness.session_runs(_json_runs(path)) for r in (run.get(key) or [])
            if isinstance(r, dict)]


def _choice(title: str, header: Sequence[str], pairs: Iterable[tuple[list[str], float]],
            verdict: Callable[[float], str]) -> list[str]:
    """A section of :func:`kernel_choices`: the table of ``(cells, ratio)`` pairs, then
    ``verdict`` of their geometric mean (or "keep the default" without pairs)."""
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ratios = []
    for cells, ratio in pairs:
        ratios.append(ratio)
        lines.append("| " + " | ".join([*cells, f"{ratio:.3f}"]) + " |")
    g = _geomean(ratios)
    return lines + ["", "Nothing to compare measured: keep the default." if g is None else verdict(g), ""]


def _ms_of(rows: Sequence[dict[str, Any]], **match: Any) -> float | None:
    """Median ms of the last ok row matching ``match``, or None."""
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())
            and r.get("status", "ok") == "ok" and "error" not in r and _num(r.get("ms")) is not None]
    return _num(hits[-1]["ms"]) if hits else None


def _geomean(xs: Sequence[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def kernel_choices(results_dir: str = RESULTS_DIR) -> str:
    """The two defaults the design leaves to the GPU, from the latest session of
    ``bench_attention.json`` and ``bench_lora.json``: time ratios and a suggestion.

    - ``ROPE_MODE``: prologue/fused time per shape for joint fwd, joint fwd+bwd and cached fwd;
      "fused" is suggested when their geometric mean is at least :data:`TIE`, else "prologue".
    - ``RefLoRALinear.AUTO_FOLD_INFERENCE``: unfolded ``triton`` / folded ``fold_triton`` forward
      time per linear (the paths ``fold_mode="auto"`` picks between in inference with the Triton
      backend); True is suggested when their geometric mean is at least :data:`TIE`. Folding keeps
      one extra ``[Dout, Din]`` weight per adapted linear: weigh the memory too.
    """
    def rope_pairs(rows):
        for shape in OrderedDict.fromkeys(str(r.get("shape")) for r in rows):
            for op, mode in (("joint", "fwd"), ("joint", "fwd+bwd"), ("cached", "fwd")):
                pro = _ms_of(rows, shape=shape, op=op, mode=mode, impl="ours-prologue")
                fus = _ms_of(rows, shape=shape, op=op, mode=mode, impl="ours-fused")
                if pro is not None and fus is not None:
                    yield [shape, op, mode, _ms(pro), _ms(fus)], pro / fus

    def fold_pairs(rows):
        for lin in OrderedDict.fromkeys(str(r.get("linear")) for r in rows):
            unf = _ms_of(rows, linear=lin, mode="fwd", impl="triton")
            fold = _ms_of(rows, linear=lin, mode="fwd", impl="fold_triton")
            if unf is not None and fold is not None:
                cub = _ms(_ms_of(rows, linear=lin, mode="fwd", impl="fold"))
                yield [lin, _ms(unf), _ms(fold), cub], unf / fold

    out = ["# Kernel defaults from the latest GPU session", ""]
    out += _choice(
        "## ROPE_MODE (wildactor_kernels/attention/kernels.py)",
        ["shape", "op", "mode", "ours-prologue ms", "ours-fused ms", "prologue / fused"],
        rope_pairs(_session_rows(os.path.join(results_dir, "bench_attention.json"))),
        lambda g: f"Geometric mean prologue/fused {g:.3f} -> suggest ROPE_MODE = "
                  f"{'fused' if g >= TIE else 'prologue'!r} (fused only when >= {TIE} faster).")
    out += _choice(
        "## RefLoRALinear.AUTO_FOLD_INFERENCE (wildactor_kernels/lora/module.py)",
        ["linear", "triton ms (unfolded)", "fold_triton ms", "fold (cuBLAS x2) ms", "triton / fold_triton"],
        fold_pairs(_session_rows(os.path.join(results_dir, "bench_lora.json"))),
        lambda g: f"Geometric mean unfolded/folded {g:.3f} -> suggest AUTO_FOLD_INFERENCE = {g >= TIE} "
                  f"(True only when folding is >= {TIE} faster; it costs one extra weight per adapted "
                  f"linear).")
    return "\n".join(out)


# ============================================================================ README
def readme_block(rows: Sequence[dict[str, Any]] | None = None) -> str:
    """The README block: the latest model-step table (device and date included) between the
    ``<!-- bench:start -->`` / ``<!-- bench:end -->`` markers."""
    rows = load_rows() if rows is None else rows
    body = model_markdown(rows, heading="####").rstrip()
    run = latest_run(rows, "model_step")
    src = run[0].get("_file") if run else None
    src = os.path.relpath(src, ROOT) if src and os.path.abspath(src).startswith(ROOT + os.sep) else (
        os.path.basename(src) if src else "benchmarks/results/model_step.jsonl")
    return (f"{README_START}\n{body}\n\n_Generated by `python -m benchmarks.report --readme` from "
            f"`{src}`; regenerate, do not edit._\n{README_END}")


def update_readme(path: str, block: str | None = None) -> bool:
    """Replace the text between (and including) the bench markers in ``path`` by ``block``
    (default :func:`readme_block` of ``benchmarks/results``). Returns False, leaving the file
    untouched, when either marker is missing or out of order."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    i, j = text.find(README_START), text.find(README_END)
    if i < 0 or j < 0 or j < i:
        return False
    block = readme_block() if block is None else block
    if not (block.startswith(README_START) and block.rstrip().endswith(README_END)):
        block = f"{README_START}\n{block.strip()}\n{README_END}"
    new = text[:i] + block.rstrip() + text[j + len(README_END):]
    if new != text:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(new)
    return True


# ============================================================================ command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", nargs="+", default=None,
                    help="JSON-lines files or folders (default benchmarks/results)")
    ap.add_argument("--out-dir", default=None, help="where to write (default: beside each input)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--readme", action="store_true", help="print the README block and exit")
    ap.add_argument("--update-readme", metavar="PATH", default=None,
                    help="replace the bench block in PATH (between the markers)")
    ap.add_argument("--choices", action="store_true",
                    help="print the ROPE_MODE / AUTO_FOLD_INFERENCE comparison of the latest kernel "
                         "session (benchmarks/results, or the first --results folder) and exit")
    args = ap.parse_args(argv)
    if args.choices:
        folder = next((p for p in (args.results or []) if os.path.isdir(p)), RESULTS_DIR)
        print(kernel_choices(folder))
        return 0
    rows = load_rows(args.results)
    if args.readme:
        print(readme_block(rows))
        return 0
    if args.update_readme:
        ok = update_readme(args.update_readme, readme_block(rows))
        what = "updated" if ok else f"no {README_START} / {README_END} markers: left unchanged"
        print(f"{args.update_readme}: {what}")
        return 0 if ok else 1
    for p in write_reports(args.results, args.out_dir, plots=not args.no_plots):
        print(f"wrote {p}")
    if args.results is None and os.path.isdir(RESULTS_DIR):
        idx = os.path.join(args.out_dir or RESULTS_DIR, "index.md")
        os.makedirs(os.path.dirname(idx), exist_ok=True)
        with open(idx, "w", encoding="utf-8") as fh:
            fh.write(index_markdown(RESULTS_DIR))
        print(f"wrote {idx}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
