"""FP8 quantization benchmark: per-layer and per-block speed, backbone memory per mode.

    python benchmarks/bench_quant.py                      # all sections the machine can run
    python benchmarks/bench_quant.py --sections memory    # meta-device memory table only (any machine)
    python benchmarks/bench_quant.py --m 4096 --quick     # smaller token count, fewer repeats

Sections:

- ``layers`` (CUDA): the wan2.2-5b linears 3072->3072, 3072->14336 and 14336->3072 at
  ``M = 27,280 + 4,400`` tokens (the wan5b-720p video plus five 22x40 references, docs/design.md §8):
  bf16 cuBLAS (``F.linear``) vs FP8 end to end (Triton per-token quantization + rowwise
  ``torch._scaled_mm``), the FP8 GEMM alone, the quantization kernel alone (GB/s) against the
  eager torch reference, and bitsandbytes int8 / NF4 when installed. ``triton.testing.do_bench``
  medians with 20/80 quantiles; TFLOP/s = 2 M K N / t and % of the H100 dense peak (989 bf16,
  1979 fp8).
- ``block`` (CUDA): one wan2.2-5b ``WanBlock`` forward on the same token layout (text 512
  tokens), bf16 vs the block after ``quantize_model(..., "fp8")``.
- ``memory`` (any device): bytes of the wan2.2-5b backbone in bf16, fp8, int8 and nf4, computed
  on the ``meta`` device (no allocation; fp8 also by converting the meta model for real), plus
  the measured ``torch.cuda.memory_allocated`` of the model built and quantized on the GPU.

Results: a run is appended to ``benchmarks/results/bench_quant_<device>.json`` and the latest
run is written as ``benchmarks/results/bench_quant_<device>.md``, with device, versions,
commit and date. On a machine without CUDA the timing sections are skipped with a message.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/bench_quant.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, ROOT)

from benchmarks import harness  # noqa: E402

# % of peak against the H100 SXM dense peaks (docs/design.md §8: 989 bf16, 1979 fp8; H200 has the same cores)
PEAK_TFLOPS = harness.device_peaks("H100")
NV, NR = harness.design_tokens("wan5b-720p")  # video 31x22x40, references 5 x (22x40)
TEXT_LEN = 512
LAYERS = [("attn q/k/v/o", 3072, 3072), ("ffn up", 3072, 14336), ("ffn down", 14336, 3072)]


# --------------------------------------------------------------------------- metadata
def metadata(device: torch.device, env: dict | None = None) -> dict:
    """The run's ``meta`` block, from the harness environment record ``env`` (taken if None)."""
    env = env if env is not None else harness.env_record(device)
    return {"date": env["date_utc"], "commit": harness.commit_label(env), "device": env["gpu"] or "none",
            "compute_capability": env["compute_capability"], "cuda": env["cuda"], "torch": env["torch"],
            "triton": env["triton"] or "not installed",
            "bitsandbytes": harness.module_version("bitsandbytes") or "not installed",
            "python": env["python"], "host": platform.node()}


# --------------------------------------------------------------------------- timing helpers
def bench(fn, quick: bool) -> dict:
    """``do_bench`` median and 20/80 quantiles in ms (:func:`benchmarks.harness.bench`)."""
    t = harness.bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100)
    return {"ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"]}


def _row(name: str, t: dict, flops: float | None = None, peak: str | None = None,
         nbytes: float | None = None, **extra) -> dict:
    r = {"name": name, **t, **extra}
    if flops:
        r["tflops"] = harness.tflops(flops, t["ms"])
        if peak:
            r["pct_peak"] = harness.pct_of_peak(r["tflops"], peak, PEAK_TFLOPS)
    if nbytes:
        r["gbps"] = harness.gbps(nbytes, t["ms"])
    return r


# --------------------------------------------------------------------------- layers
def bench_layers(device: torch.device, m_tokens: int, quick: bool,
                 rows: list[dict] | None = None) -> list[dict]:
    """Rows of every layer, appended one by one to ``rows`` when given (what was measured before
    an interruption stays there)."""
    rows = [] if rows is None else rows
    for label, k, n in LAYERS:
        _bench_layer(device, label, m_tokens, k, n, quick, rows)
        torch.cuda.empty_cache()
    return rows


def _bench_layer(device: torch.device, label: str, m_tokens: int, k: int, n: int, quick: bool,
                 rows: list[dict]) -> list[dict]:
    from wildactor_kernels.quant import (
        fp8_gemm,
        per_token_quant_fp8,
        per_token_quant_fp8_ref,
        quantize_weight_fp8,
        scaled_mm_rowwise,
    )

    torch.manual_seed(0)
    x = torch.randn(m_tokens, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / math.sqrt(k)
    b = torch.randn(n, device=device, dtype=torch.bfloat16) * 0.01
    wq, ws = quantize_weight_fp8(w)
    flops = 2.0 * m_tokens * k * n
    shape = {"layer": label, "M": m_tokens, "K": k, "N": n}
    rows.append(_row("bf16 F.linear (cuBLAS)", bench(lambda: F.linear(x, w, b), quick), flops, "bf16",
                     **shape))
    try:
        t = bench(lambda: fp8_gemm(x, wq, ws, b, "scaled_mm"), quick)
        rows.append(_row("fp8 quant + _scaled_mm rowwise", t, flops, "fp8", **shape))
        xq, xs = per_token_quant_fp8(x, pad_to=16)
        t = bench(lambda: scaled_mm_rowwise(xq, xs, wq, ws, b, n, True), quick)
        rows.append(_row("fp8 _scaled_mm rowwise only", t, flops, "fp8", **shape))
    except RuntimeError as e:
        rows.append({"name": "fp8 _scaled_mm rowwise", "error": str(e).splitlines()[0], **shape})
    io = m_tokens * k * (2 + 1) + m_tokens * 4  # bf16 in, fp8 out, fp32 scales
    t = bench(lambda: per_token_quant_fp8(x, pad_to=16), quick)
    rows.append(_row("per-token quant (Triton)", t, nbytes=io, **shape))
    t = bench(lambda: per_token_quant_fp8_ref(x), quick)
    rows.append(_row("per-token quant (torch eager ref)", t, nbytes=io, **shape))
    rows.extend(_bnb_layer_rows(x, w, b, flops, shape, quick))
    return rows


def _bnb_layer_rows(x, w, b, flops, shape, quick) -> list[dict]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return []
    from wildactor_kernels.model.quant import Int8Config, NF4Config, quantize_model

    lin = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    lin.weight.data.copy_(w)
    lin.bias.data.copy_(b)
    rows = []
    nf4 = NF4Config(compute_dtype=torch.bfloat16)

    def swap(mode, config):  # the library's own swap, on this one layer
        return quantize_model(torch.nn.Sequential(lin), mode, config=config,
                              module_filter_fn=lambda mod, fqn: True)[0]

    for name, make in (("bnb int8 (LLM.int8)", lambda: swap("int8", Int8Config())),
                       ("bnb nf4 (bf16 compute)", lambda: swap("nf4", nf4))):
        try:
            q = make().eval()
            with torch.no_grad():
                rows.append(_row(name, bench(lambda: q(x), quick), flops, "bf16", **shape))
        except Exception as e:  # report, do not abort the run
            rows.append({"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}", **shape})
    return rows


# --------------------------------------------------------------------------- block
def _block_inputs(cfg, device: torch.device, video: tuple[int, int, int], num_refs: int, text_len: int):
    """Latents for a ``video`` token grid (T, Hg, Wg), ``num_refs`` references of one frame with
    the video's spatial size (2 face, the rest body), random text states."""
    from wildactor_kernels.model import Reference

    c, (pt, ph, pw) = cfg.in_channels, cfg.patch_size
    t, hg, wg = video
    latents = torch.randn(1, c, t * pt, hg * ph, wg * pw, device=device, dtype=torch.bfloat16)
    refs = [Reference("face" if i < 2 else "body",
                      torch.randn(1, c, 1, hg * ph, wg * pw, device=device, dtype=torch.bfloat16))
            for i in range(num_refs)]
    context = torch.randn(1, text_len, cfg.text_dim, device=device, dtype=torch.bfloat16)
    return dict(latents=latents, timestep=torch.full((1,), 500.0, device=device), context=context, refs=refs)


def bench_block(device: torch.device, quick: bool, preset: str = "wan2.2-5b",
                video: tuple[int, int, int] = (31, 22, 40), num_refs: int = 5,
                text_len: int = TEXT_LEN, rows: list[dict] | None = None) -> list[dict]:
    """One transformer block (attention included), bf16 vs after ``quantize_model(.., "fp8")``;
    the block's inputs are captured from a one-layer model's forward. Rows are appended to
    ``rows`` when given, one by one."""
    rows = [] if rows is None else rows
    from wildactor_kernels.model import WildActor, WildActorConfig
    from wildactor_kernels.model.quant import quantize_model

    torch.manual_seed(0)
    cfg = WildActorConfig.preset(preset, num_layers=1)
    m = WildActor(cfg, device=device, dtype=torch.bfloat16).eval()
    inputs = _block_inputs(cfg, device, video, num_refs, text_len)
    captured = {}

    def grab(mod, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    h = m.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        m(**inputs)
    h.remove()
    args, kwargs = captured["args"], captured["kwargs"]
    nv = video[0] * video[1] * video[2]
    n_all = nv + num_refs * video[1] * video[2]
    d, f = cfg.dim, cfg.ffn_dim
    # linear FLOPs of the block: self-attn q/k/v/o and FFN on all tokens, cross-attn q/o on the
    # video rows and k/v on the text (attention itself is timed but not counted)
    lin_flops = 2.0 * (n_all * (4 * d * d + 2 * d * f) + nv * 2 * d * d + text_len * 2 * d * d)
    blocks = {"bf16": m.blocks[0]}
    with torch.no_grad():
        rows.append(_row("block bf16", bench(lambda: blocks["bf16"](*args, **kwargs), quick), lin_flops,
                         "bf16", tokens=n_all, preset=preset))
        quantize_model(m, "fp8")
        blocks["fp8"] = m.blocks[0]
        rows.append(_row("block fp8 (quantize_model)", bench(lambda: blocks["fp8"](*args, **kwargs), quick),
                         lin_flops, "fp8", tokens=n_all, preset=preset,
                         gemm_path=blocks["fp8"].attn1.to_q.gemm_path))
    return rows


# --------------------------------------------------------------------------- memory
def _converted_bytes(mode: str, n: int, k: int) -> int:
    """Bytes of one converted weight ``[n, k]`` and its scales (bias counted separately)."""
    if mode == "bf16":
        return 2 * n * k
    if mode == "fp8":
        return n * k + 4 * n  # e4m3 codes + fp32 per-channel scales
    if mode == "int8":
        return n * k + 4 * n + 1  # int8 codes + fp32 SCB + weight_format byte
    if mode == "nf4":  # QLoRA storage: blocksize 64, double quantization of the absmax
        blocks = math.ceil(n * k / 64)
        return math.ceil(n * k / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256)
    raise ValueError(mode)


def memory_table(device: torch.device, measure: bool) -> dict:
    from wildactor_kernels.model import WildActor, WildActorConfig
    from wildactor_kernels.model.quant import default_module_filter, quantize_model

    cfg = WildActorConfig.preset("wan2.2-5b")
    meta = WildActor(cfg, device="meta", dtype=torch.bfloat16)
    converted = {fqn for fqn, mod in meta.named_modules() if fqn and default_module_filter(mod, fqn)}
    adapters = sum(p.numel() for name, p in meta.named_parameters() if "lora_" in name)
    table = {"preset": "wan2.2-5b", "num_layers": cfg.num_layers, "backbone_params": meta.num_parameters(),
             "converted_linears": len(converted), "adapter_params": adapters,
             "adapter_bytes_bf16": 2 * adapters, "modes": {}}
    for mode in ("bf16", "fp8", "int8", "nf4"):
        total = 0
        for name, p in meta.named_parameters():
            if "lora_" in name:
                continue
            owner, _, leaf = name.rpartition(".")
            if owner in converted and leaf == "weight":
                total += _converted_bytes(mode, *p.shape)
            else:  # unconverted parameters keep their dtype (the model holds some in fp32)
                total += p.numel() * p.element_size()
        table["modes"][mode] = {"bytes_meta": total}
    # fp8: convert the meta model for real and count its state dict (must match the formula)
    logging.getLogger("wildactor_kernels").setLevel(logging.ERROR)
    quantize_model(meta, "fp8", emulate=True)
    table["modes"]["fp8"]["bytes_meta_converted"] = sum(  # the state dict without the adapters
        v.numel() * v.element_size() for k, v in meta.state_dict().items()
        if isinstance(v, torch.Tensor) and "lora_" not in k)
    del meta
    if measure and device.type == "cuda":
        for mode in ("bf16", "fp8", "int8", "nf4"):
            table["modes"][mode]["bytes_cuda_allocated"] = _measure_cuda(cfg, device, mode)
    return table


def _measure_cuda(cfg, device: torch.device, mode: str) -> int | str:
    from wildactor_kernels.model import WildActor
    from wildactor_kernels.model.quant import quantize_model

    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    try:
        m = WildActor(cfg, device=device, dtype=torch.bfloat16)
        if mode != "bf16":
            quantize_model(m, mode)
        gc.collect()
        torch.cuda.empty_cache()
        lora = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if "lora_" in n)
        used = torch.cuda.memory_allocated(device) - base - lora
        del m
        return int(used)
    except Exception as e:
        return f"error: {type(e).__name__}: {str(e).splitlines()[0]}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- output
def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if isinstance(b, (int, float)) else str(b)


def to_markdown(run: dict) -> str:
    md = [f"# bench_quant: {run['meta']['device']}", "",
          "| key | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in run["meta"].items()]
    if run.get("notes"):
        md += ["", *[f"> {n}" for n in run["notes"]]]
    if run.get("layers"):
        md += ["", "## Per layer (wan2.2-5b linears)", "",
               "| layer | M | K | N | variant | ms (p20-p80) | TFLOP/s | % peak | GB/s |",
               "|---|---:|---:|---:|---|---|---:|---:|---:|"]
        for r in run["layers"]:
            if "error" in r:
                md.append(f"| {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {r['name']} | "
                          f"{r['error']} | | | |")
                continue
            md.append(f"| {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {r['name']} | {r['ms']:.3f} "
                      f"({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | {r.get('tflops', float('nan')):.0f} | "
                      f"{r.get('pct_peak', float('nan')):.0f} | {r.get('gbps', float('nan')):.0f} |")
    if run.get("block"):
        md += ["", "## One wan2.2-5b block (video 31x22x40 + 5 references 22x40, text 512)", "",
               "| variant | tokens | ms (p20-p80) | TFLOP/s (linears only) |", "|---|---:|---|---:|"]
        for r in run["block"]:
            md.append(f"| {r['name']} | {r['tokens']} | {r['ms']:.3f} "
                      f"({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | {r.get('tflops', float('nan')):.0f} |")
    if run.get("memory"):
        mem = run["memory"]
        md += ["", f"## Memory of the wan2.2-5b backbone ({mem['backbone_params'] / 1e9:.3f} B params, "
               f"{mem['converted_linears']} converted linears; adapters excluded: "
               f"{mem['adapter_params'] / 1e6:.1f} M params, {_gib(mem['adapter_bytes_bf16'])} GiB in bf16)",
               "",
               "| mode | GiB (meta-device count) | GiB (CUDA allocated) | vs bf16 |", "|---|---:|---:|---:|"]
        ref = mem["modes"]["bf16"]["bytes_meta"]
        for mode, v in mem["modes"].items():
            md.append(f"| {mode} | {_gib(v['bytes_meta'])} | {_gib(v.get('bytes_cuda_allocated', 'n/a'))} | "
                      f"{v['bytes_meta'] / ref:.2f}x |")
        fp8 = mem["modes"]["fp8"]
        md.append("")
        md.append(f"fp8 check: formula {fp8['bytes_meta']} B, state dict of the meta model after "
                  f"quantize_model {fp8['bytes_meta_converted']} B.")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="layers,block,memory",
                    help="comma-separated subset of layers,block,memory (default: all)")
    ap.add_argument("--m", type=int, default=NV + NR, help=f"tokens per layer GEMM (default {NV + NR})")
    ap.add_argument("--quick", action="store_true", help="fewer timing repeats")
    ap.add_argument("--no-measure-memory", action="store_true",
                    help="skip building the full wan2.2-5b on the GPU for measured allocations")
    ap.add_argument("--out-dir", default=harness.RESULTS_DIR)
    args = ap.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"layers", "block", "memory"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = harness.env_record(device)
    run = {"meta": metadata(device, env), "notes": []}
    if device.type != "cuda":
        msg = ("No CUDA device: FP8 timings need an sm_89+ GPU (H100/H200). Skipping the 'layers' and "
               "'block' sections; computing the meta-device memory table only.")
        print(msg)
        run["notes"].append(msg)
        sections &= {"memory"}
    elif torch.cuda.get_device_capability(device) < (8, 9):
        run["notes"].append("GPU below sm_89: torch._scaled_mm FP8 rows will report errors")

    with harness.keep_partial(run):  # Ctrl-C / timeout -s INT: the finished sections are written
        # rows land in the run one by one: an interruption keeps those measured before it
        if "layers" in sections:
            bench_layers(device, args.m, args.quick, run.setdefault("layers", []))
        if "block" in sections:
            bench_block(device, args.quick, rows=run.setdefault("block", []))
        if "memory" in sections:
            run["memory"] = memory_table(device, measure=not args.no_measure_memory)
    if "interrupted" in run:
        run["notes"].append(run["interrupted"])
    run["env"] = env

    slug = harness.file_slug(env["gpu"] or "cpu")
    jpath = harness.append_json_run(os.path.join(args.out_dir, f"bench_quant_{slug}.json"), run)
    md = to_markdown(run)
    harness.write_text(os.path.join(args.out_dir, f"bench_quant_{slug}.md"), md)
    print(md)
    print(f"appended to {jpath}")
    return 130 if "interrupted" in run else 0


if __name__ == "__main__":
    sys.exit(main())
