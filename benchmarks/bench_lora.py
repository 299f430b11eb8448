"""Microbenchmark: reference-only LoRA linear (``ref_lora_linear``) on the wan2.2-5b linears.

Shapes: the three linears of a wan2.2-5b block (3072->3072 for q/k/v/o, 3072->14336 and
14336->3072 for the FFN) at the wan5b-720p token counts of docs/design.md §8 (Nv = 27,280 video rows,
Nr = 4,400 reference rows, B = 1), LoRA rank 128, bf16. Peers, all measured in the same run:

- ``base``:     ``F.linear`` over all rows, no adapter: the cuBLAS floor;
- ``peft``:     base GEMM, then PEFT-style LoRA on the reference slice (index, two small GEMMs,
                scale, add into the slice);
- ``unsloth``:  base GEMM, then ``addmm_``/``baddbmm_`` of ``(x_r A^T) B^T`` into the slice;
- ``fold``:     inference only: cached ``W_ref = W + s B A``, two cuBLAS GEMMs (video rows with
                W, reference rows with W_ref) writing one output;
- ``fold_triton``: inference only: one Triton GEMM choosing W or W_ref per M tile;
- ``triton``:   this library (``backend="triton"``): one GEMM whose epilogue adds the LoRA
                expand on reference tiles only, plus a small shrink kernel;
- ``compile`` (only with ``--impls ... compile``): ``torch.compile`` of the ``peft`` code.

``fwd`` runs under ``torch.no_grad``. ``fwd+bwd`` is a LoRA training step of one layer: the
base weight frozen, grads for x, lora_A and lora_B. Times are ``triton.testing.do_bench``
medians with 20/80 % quantiles; TFLOP/s counts the useful work of the layer
(``2 B N Din Dout + 2 B Nr r (Din + Dout)`` forward; backward ``dx`` the same again plus
``dA, dB`` another ``2 B Nr r (Din + Dout)``; ``base`` is credited with its own GEMMs only).

Usage::

    python benchmarks/bench_lora.py                       # all three linears, fwd and fwd+bwd
    python benchmarks/bench_lora.py --linears ffn_in --modes fwd --impls base triton fold
    python benchmarks/bench_lora.py --out lora_h100.json  # JSON appended in benchmarks/results/

Each run appends to a JSON file and rewrites a markdown table (``--md``) in
benchmarks/results/, both stamped with the GPU, torch/triton versions, git commit and date.
Without a CUDA device the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/bench_lora.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, ROOT)

import wildactor_kernels as wk  # noqa: E402
from benchmarks import harness  # noqa: E402
from wildactor_kernels.lora.module import folded_linear_torch  # noqa: E402

# wan2.2-5b: dim 3072, ffn 14336 (docs/design.md §6); wan5b-720p token counts (docs/design.md §8)
LINEARS = {"attn": (3072, 3072), "ffn_in": (3072, 14336), "ffn_out": (14336, 3072)}
NV, NR = harness.design_tokens("wan5b-720p")  # 27,280 video and 4,400 reference tokens
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ["base", "peft", "unsloth", "fold", "fold_triton", "triton", "compile"]
DEFAULT_IMPLS = [i for i in IMPLS if i != "compile"]
INFERENCE_ONLY = {"fold", "fold_triton"}


# --------------------------------------------------------------------------- peers
def _peft(x, w, b, a, lb, s, nv):
    y = F.linear(x, w, b)
    y[:, nv:] += F.linear(F.linear(x[:, nv:], a), lb) * s
    return y


def _unsloth(x, w, b, a, lb, s, nv):
    y = F.linear(x, w, b)
    h = F.linear(x[:, nv:], a)  # [B, Nr, r]
    y_r = y[:, nv:]
    if y.shape[0] == 1:
        y_r[0].addmm_(h[0], lb.t(), alpha=s)
    else:
        y_r.baddbmm_(h, lb.t().expand(y.shape[0], -1, -1), alpha=s)
    return y


def _case(din, dout, bsz, nv, nr, rank, dtype, device):
    from wildactor_kernels.lora.kernels import ref_folded_linear_triton

    n = nv + nr
    x = torch.randn(bsz, n, din, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(dout, din, device=device) / din**0.5).to(dtype)  # frozen base
    b = (0.01 * torch.randn(dout, device=device)).to(dtype)
    a = (torch.randn(rank, din, device=device) / din**0.5).to(dtype).requires_grad_(True)
    lb = (0.1 * torch.randn(dout, rank, device=device) / rank**0.5).to(dtype).requires_grad_(True)
    s = 1.0
    with torch.no_grad():
        w_ref = torch.addmm(w, lb, a, alpha=s)
    impls = {
        "base": lambda: F.linear(x, w, b),
        "peft": lambda: _peft(x, w, b, a, lb, s, nv),
        "unsloth": lambda: _unsloth(x, w, b, a, lb, s, nv),
        "fold": lambda: folded_linear_torch(x, w, w_ref, b, nv),
        "fold_triton": lambda: ref_folded_linear_triton(x, w, w_ref, b, nv),
        "triton": lambda: wk.ref_lora_linear(x, w, b, a, lb, s, nv, backend="triton"),
    }
    compiled = torch.compile(_peft, dynamic=False)
    impls["compile"] = lambda: compiled(x, w, b, a, lb, s, nv)
    base_f = 2 * bsz * n * din * dout
    lora_f = 2 * bsz * nr * rank * (din + dout)
    return dict(leaves=[x, a, lb], impls=impls, n=n,
                flops={"fwd": base_f + lora_f, "fwd+bwd": 2 * base_f + 3 * lora_f},
                base_flops={"fwd": base_f, "fwd+bwd": 2 * base_f})


# --------------------------------------------------------------------------- measurement
def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--linears", nargs="+", default=list(LINEARS), choices=list(LINEARS))
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS, choices=IMPLS)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--num-video", type=int, default=NV, help="Nv (wan5b-720p: 31x22x40)")
    ap.add_argument("--num-ref", type=int, default=NR, help="Nr (wan5b-720p: 5 x 22x40)")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense peak for the %% column (default: the GPU's datasheet figure for the dtype)")
    ap.add_argument("--out", default="bench_lora.json",
                    help="JSON file to append this run to; a bare name goes to benchmarks/results/, "
                         "a folder gets bench_lora.json")
    ap.add_argument("--md", default=None,
                    help="markdown table to (re)write; default benchmarks/results/bench_lora_<gpu>.md")
    return ap.parse_args(argv)


def run_benchmarks(args, device, peak=None, rows=None) -> list[dict]:
    """Measure every (linear, mode, impl), print one line each and return the rows (``peak``:
    dense TFLOP/s for the %% column, None to leave it empty), appended one by one to ``rows``
    when given (what was measured before an interruption stays there)."""
    rows = [] if rows is None else rows
    dtype = DTYPES[args.dtype]
    print(f"{'linear':8s} {'mode':8s} {'impl':12s} {'ms':>8s} {'p20':>8s} {'p80':>8s} {'TFLOP/s':>8s} "
          f"{'%peak':>6s} {'vs base':>8s} {'max|err|':>9s}")
    for lin in args.linears:
        din, dout = LINEARS[lin]
        case = _case(din, dout, args.batch, args.num_video, args.num_ref, args.rank, dtype, device)
        impls, leaves = case["impls"], case["leaves"]
        with torch.no_grad():
            y_ref = impls["peft"]().float()
        for mode in args.modes:
            base_ms = None
            for name in args.impls:
                row = dict(linear=lin, Din=din, Dout=dout, mode=mode, impl=name, dtype=args.dtype,
                           B=args.batch, Nv=args.num_video, Nr=args.num_ref, rank=args.rank)
                if mode == "fwd+bwd" and name in INFERENCE_ONLY:
                    continue  # a folded weight has no adapter grads: not a training path
                fn = impls[name]
                try:
                    with torch.no_grad():
                        y = fn()
                        row["max_abs_err_vs_peft"] = (y.float() - y_ref).abs().max().item()
                        del y
                    if mode == "fwd":
                        def call(fn=fn):
                            with torch.no_grad():
                                fn()
                    else:
                        dy = torch.randn_like(y_ref, dtype=dtype)

                        def call(fn=fn, dy=dy):
                            fn().backward(dy)
                    t = harness.bench(call, warmup=args.warmup, rep=args.rep, grad_to_none=leaves,
                                      device=device)
                    med = t["ms"]
                    flops = (case["base_flops"] if name == "base" else case["flops"])[mode]
                    tflops = harness.tflops(flops, med)
                    if name == "base":
                        base_ms = med
                    row.update(ms=med, ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], flops=flops, tflops=tflops,
                               pct_peak=100 * tflops / peak if peak else None,
                               vs_base=med / base_ms if base_ms else None)
                    pct = f"{row['pct_peak']:6.1f}" if peak else f"{'-':>6s}"
                    vb = f"{row['vs_base']:8.3f}" if base_ms else f"{'-':>8s}"
                    print(f"{lin:8s} {mode:8s} {name:12s} {med:8.3f} {t['ms_p20']:8.3f} {t['ms_p80']:8.3f} "
                          f"{tflops:8.1f} {pct} {vb} {row['max_abs_err_vs_peft']:9.2e}", flush=True)
                except Exception as e:  # a failing peer must not hide the other numbers
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    print(f"{lin:8s} {mode:8s} {name:12s} ERROR {row['error'][:90]}", flush=True)
                rows.append(row)
                for t in leaves:
                    t.grad = None
        del case, impls, leaves, y_ref
        torch.cuda.empty_cache()
    return rows


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# bench_lora: reference-only LoRA linear, {meta['dtype']}, rank {meta['rank']}", "",
             f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} "
             f"| {meta['date']}", "",
             f"B={meta['batch']}, Nv={meta['num_video']}, Nr={meta['num_ref']} (wan5b-720p). "
             "`vs base` = time / cuBLAS `F.linear` time (the floor). Median ms [20 %, 80 %].", "",
             "| linear | Din->Dout | mode | impl | ms [p20, p80] | TFLOP/s | % peak | vs base "
             "| max abs err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['linear']} | {r['Din']}->{r['Dout']} | {r['mode']} | {r['impl']} | "
                         f"error: {r['error'][:60]} | | | | |")
            continue
        pct = f"{r['pct_peak']:.1f}" if r.get("pct_peak") is not None else "-"
        vb = f"{r['vs_base']:.3f}" if r.get("vs_base") is not None else "-"
        lines.append(f"| {r['linear']} | {r['Din']}->{r['Dout']} | {r['mode']} | {r['impl']} | "
                     f"{r['ms']:.3f} [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}] | {r['tflops']:.1f} | {pct} | "
                     f"{vb} | {r['max_abs_err_vs_peft']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _parse(argv)
    device = harness.cuda_device_or_explain("bench_lora", "this benchmark times GPU GEMMs")
    if device is None:
        return 0
    env = harness.env_record(device)
    peak = args.peak_tflops or (harness.device_peaks(env["gpu"]) or {}).get(args.dtype)
    print(f"# {harness.env_summary(env)} | {args.dtype} | "
          f"B={args.batch} Nv={args.num_video} Nr={args.num_ref} rank={args.rank}"
          + (f" | dense peak {peak:.0f} TFLOP/s" if peak else ""), flush=True)
    rows, partial = [], {}
    with harness.keep_partial(partial):
        run_benchmarks(args, device, peak, rows)
    run = harness.script_run("bench_lora", env, dtype=args.dtype, batch=args.batch, num_video=args.num_video,
                             num_ref=args.num_ref, rank=args.rank, peak_tflops=peak, warmup_ms=args.warmup,
                             rep_ms=args.rep, **partial, results=rows)
    path = harness.append_json_run(harness.resolve_out(args.out, "bench_lora.json"), run)
    print(f"# appended {len(rows)} rows to {path}")
    md = harness.resolve_out(args.md or f"bench_lora_{harness.file_slug(env['gpu'] or 'cpu', '_')}.md",
                             "bench_lora.md")
    harness.write_text(md, _markdown(run, rows))
    print(f"# wrote {md}")
    return 130 if partial else 0


if __name__ == "__main__":
    sys.exit(main())
