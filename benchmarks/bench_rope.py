"""Microbenchmark: I-RoPE (``apply_rope``) and fused q/k RMSNorm + I-RoPE (``qk_norm_rope``).

Measures, on the docs/design.md §8 shapes, the forward and forward+backward of

- ``triton``:  the library's Triton kernels (``backend="triton"``);
- ``eager``:   the plain-PyTorch reference (``backend="reference"``);
- ``compile``: ``torch.compile`` of that reference (the fused-by-Inductor peer);
- ``flash_attn``: flash-attn's interleaved ``apply_rotary_emb`` (apply_rope only, when installed;
  it takes cos/sin in the input dtype, so its tables are rounded to bf16).

q and k are views into a fused ``[B, N, 3, H, D]`` QKV tensor, as they come out of the model's
projection. Times are ``triton.testing.do_bench`` medians with 20/80 % quantiles. GB/s counts
the bytes an ideal kernel moves (every input read once, every output written once, tables
included), so it is comparable across implementations and with the HBM peak.

Usage::

    python benchmarks/bench_rope.py                                 # all shapes, bf16
    python benchmarks/bench_rope.py --shapes wan5b-720p --ops rope --modes fwd
    python benchmarks/bench_rope.py --out rope_h100.json            # -> benchmarks/results/

Without a CUDA device the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/bench_rope.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, ROOT)

import wildactor_kernels as wk  # noqa: E402
from benchmarks import harness  # noqa: E402
from wildactor_kernels.rope.reference import apply_rope_ref, qk_norm_rope_ref  # noqa: E402

SHAPES = harness.DESIGN_SHAPES  # docs/design.md §8
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- workloads
def _rope_case(spec, dtype, device):
    """Inputs, the implementations and the ideal byte counts of apply_rope on one shape."""
    layout = harness.design_layout(spec)
    b, h, d, n = spec["B"], spec["H"], spec["D"], layout.num_tokens
    cos, sin = wk.rope_cos_sin(wk.irope_positions(layout).to(device), d)
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, requires_grad=True)
    es = qkv.element_size()
    x_bytes = b * n * h * d * es
    table_bytes = 2 * cos.numel() * cos.element_size()
    impls = {
        "triton": lambda x: wk.apply_rope(x, cos, sin, backend="triton"),
        "eager": lambda x: apply_rope_ref(x, cos, sin),
        "compile": torch.compile(lambda x: apply_rope_ref(x, cos, sin), dynamic=False),
    }
    try:
        from flash_attn.layers.rotary import apply_rotary_emb

        cos_lp, sin_lp = cos.to(dtype), sin.to(dtype)
        impls["flash_attn"] = lambda x: apply_rotary_emb(x, cos_lp, sin_lp, interleaved=True)
    except Exception:
        pass

    def run(fn):
        return (fn(qkv[:, :, 0]),)

    return dict(
        leaves=[qkv], run=run, impls=impls, ref="eager", n=n,
        bytes_fwd=2 * x_bytes + table_bytes,
        bytes_bwd=2 * x_bytes + table_bytes,  # read dy, write dx
    )


def _qk_case(spec, dtype, device, eps=1e-6):
    layout = harness.design_layout(spec)
    b, h, d, n = spec["B"], spec["H"], spec["D"], layout.num_tokens
    cos, sin = wk.rope_cos_sin(wk.irope_positions(layout).to(device), d)
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, requires_grad=True)
    qw = (1 + 0.1 * torch.randn(h * d, device=device)).to(dtype).requires_grad_()
    kw = (1 + 0.1 * torch.randn(h * d, device=device)).to(dtype).requires_grad_()
    es = qkv.element_size()
    x_bytes = 2 * b * n * h * d * es  # q and k
    table_bytes = 2 * cos.numel() * cos.element_size()
    w_bytes = 2 * h * d * es
    ref = lambda q, k: qk_norm_rope_ref(q, k, qw, kw, cos, sin, eps)
    impls = {
        "triton": lambda q, k: wk.qk_norm_rope(q, k, qw, kw, cos, sin, eps, backend="triton"),
        "eager": ref,
        "compile": torch.compile(ref, dynamic=False),
    }

    def run(fn):
        return fn(qkv[:, :, 0], qkv[:, :, 1])

    return dict(
        leaves=[qkv, qw, kw], run=run, impls=impls, ref="eager", n=n,
        bytes_fwd=2 * x_bytes + table_bytes + w_bytes,
        # read x, dy, w, tables; write dx and dw
        bytes_bwd=3 * x_bytes + table_bytes + 2 * w_bytes,
    )


CASES = {"rope": _rope_case, "qk_norm_rope": _qk_case}


# --------------------------------------------------------------------------- measurement
def _max_err(outs, ref_outs) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, ref_outs))


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--ops", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--impls", nargs="+", default=None,
                    help="subset of triton eager compile flash_attn (default: all available)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="HBM peak for the %% column (default: the GPU's datasheet figure)")
    ap.add_argument("--out", default=None,
                    help="JSON file to append this run to; a bare name goes to benchmarks/results/")
    return ap.parse_args(argv)


def run_benchmarks(args, device, peak=None, rows=None) -> list[dict]:
    """Measure every (op, shape, mode, impl) and print one line each (``peak``: HBM GB/s for
    the %% column, None to leave it empty). Returns the rows, appended one by one to ``rows``
    when given (what was measured before an interruption stays there)."""
    dtype = DTYPES[args.dtype]
    print(f"{'op':13s} {'mode':8s} {'shape':13s} {'impl':10s} {'ms':>8s} {'p20':>8s} {'p80':>8s} "
          f"{'GB/s':>7s} {'%peak':>6s} {'max|err|':>9s}")
    rows = [] if rows is None else rows
    for op in args.ops:
        for shape in args.shapes:
            case = CASES[op](SHAPES[shape], dtype, device)
            run, leaves = case["run"], case["leaves"]
            impls = {k: v for k, v in case["impls"].items() if args.impls is None or k in args.impls}
            with torch.no_grad():
                ref_outs = run(case["impls"][case["ref"]])
            for mode in args.modes:
                for name, fn in impls.items():
                    row = dict(op=op, mode=mode, shape=shape, impl=name, dtype=args.dtype,
                               N=case["n"], **{k: SHAPES[shape][k] for k in ("B", "H", "D")})
                    try:
                        with torch.no_grad():
                            row["max_abs_err_vs_eager"] = _max_err(run(fn), ref_outs)
                        if mode == "fwd":
                            def call(fn=fn, run=run):
                                with torch.no_grad():
                                    run(fn)
                            nbytes = case["bytes_fwd"]
                        else:
                            grads = [torch.randn_like(o) for o in run(fn)]

                            def call(fn=fn, run=run, grads=grads):
                                torch.autograd.backward(run(fn), grads)
                            nbytes = case["bytes_fwd"] + case["bytes_bwd"]
                        t = harness.bench(call, warmup=args.warmup, rep=args.rep, grad_to_none=leaves,
                                          device=device)
                        row.update(ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"],
                                   **harness.bandwidth_metrics(nbytes, t["ms"], peak))
                        pct = f"{row['pct_peak']:6.1f}" if peak else f"{'-':>6s}"
                        print(f"{op:13s} {mode:8s} {shape:13s} {name:10s} {t['ms']:8.3f} {t['ms_p20']:8.3f} "
                              f"{t['ms_p80']:8.3f} {row['gbps']:7.0f} {pct} "
                              f"{row['max_abs_err_vs_eager']:9.2e}", flush=True)
                    except Exception as e:  # a failing peer must not hide the other numbers
                        row["error"] = f"{type(e).__name__}: {e}"[:500]
                        print(f"{op:13s} {mode:8s} {shape:13s} {name:10s} ERROR {row['error'][:80]}",
                              flush=True)
                    rows.append(row)
            del case, run, leaves, impls, ref_outs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = _parse(argv)
    device = harness.cuda_device_or_explain("bench_rope")
    if device is None:
        return 0
    env = harness.env_record(device)
    peak = args.peak_gbps or harness.device_hbm_gbps(env["gpu"])
    print(f"# {harness.env_summary(env)} | {args.dtype}" + (f" | HBM peak {peak:.0f} GB/s" if peak else ""),
          flush=True)
    rows, partial = [], {}
    with harness.keep_partial(partial):
        run_benchmarks(args, device, peak, rows)
    if args.out:
        path = harness.append_json_run(
            harness.resolve_out(args.out, "bench_rope.json"),
            harness.script_run("bench_rope", env, dtype=args.dtype, hbm_peak_gbps=peak, warmup_ms=args.warmup,
                               rep_ms=args.rep, **partial, results=rows))
        print(f"# appended {len(rows)} rows to {path}")
    return 130 if partial else 0


if __name__ == "__main__":
    sys.exit(main())
