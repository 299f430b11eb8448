"""Model-step benchmark: one denoising step of WildActor with CFG, four ways, in one run.

For each shape (docs/design.md §8), a WildActor of the matching preset with random weights, bf16,
built directly on the GPU, and 5 references; one denoising step with classifier-free
guidance = one forward of batch 2 (conditional + unconditional text), as the sampler runs it:

- ``eager``     (a) eager PyTorch, ``backend="reference"`` (Stand-In-style two SDPA calls), the
  joint path: reference tokens go through every layer at every step and in both branches;
- ``compile``   (b) best peer practice: ``backend="reference"`` with the reference K/V cache,
  ``torch.compile`` of each transformer block (regional compilation: one compiled graph reused by
  all blocks, so compile time does not grow with depth) and SDPA pinned to cuDNN
  (``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``; flash when a probe shows cuDNN cannot run);
- ``ours-bf16`` (c) ``backend="auto"``: the Triton kernels (fused q/k RMSNorm + I-RoPE, cached
  asymmetric attention) + the reference K/V cache;
- ``ours-fp8``  (d) ``quantize_model(m, "fp8")`` (rowwise ``torch._scaled_mm``) + kernels + cache.

Reported per path: ms per step (median, p20/p80 of ``--iters`` CUDA-event-timed steps after a
warm-up step), speedup vs (a) and vs (b), peak memory (``torch.cuda.max_memory_allocated``
during a step), the reference-encoding time (paid once per generation), the first-call time
(compilation, autotuning), effective TFLOP/s (FLOPs of a cached step: video rows only) and %
of the dense bf16 peak, SQNR (dB) of the output against (a), and for (d) the SQNR against (c).

Usage::

    python benchmarks/bench_model.py                               # wan5b-720p and wan1.3b-480p
    python benchmarks/bench_model.py --shapes wan1.3b-480p --layers 4 --no-compile   # quick check
    python benchmarks/bench_model.py --device cpu --shapes tiny    # CPU smoke run (seconds)

Rows are appended to ``benchmarks/results/model_step.jsonl`` (``--json`` elsewhere) with the
environment record; ``benchmarks/report.py`` makes the tables and plots from them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import harness  # noqa: E402

KIND = "model_step"

# docs/design.md §8 shapes as token grids (after the (1, 2, 2) patch); latents are (T, 2*Hg, 2*Wg).
# Reference kinds are not fixed by the table: the first two are faces, the rest bodies.
SHAPES: dict[str, dict[str, Any]] = {
    "wan5b-720p": dict(preset="wan2.2-5b", video=(31, 22, 40), refs=5, ref_grid=(22, 40), text_len=512),
    "wan1.3b-480p": dict(preset="wan2.1-1.3b", video=(21, 30, 52), refs=5, ref_grid=(30, 52), text_len=512),
    "wan14b-720p": dict(preset="wan2.1-14b", video=(21, 45, 80), refs=3, ref_grid=(45, 80), text_len=512),
    "tiny": dict(preset="tiny", video=(2, 4, 4), refs=2, ref_grid=(2, 2), text_len=8),  # CPU smoke
}
DEFAULT_SHAPES = ("wan5b-720p", "wan1.3b-480p")
PATHS = ("eager", "compile", "ours-bf16", "ours-fp8")
LABELS = {
    "eager": "(a) eager PyTorch, no cache",
    "compile": "(b) torch.compile + SDPA cuDNN + cache",
    "ours-bf16": "(c) ours bf16 (Triton + cache)",
    "ours-fp8": "(d) ours FP8 (Triton + cache)",
}
BATCH = 2  # CFG: conditional and unconditional branch in one forward
TIMESTEP = 750.0


class CompileTimeout(RuntimeError):
    """torch.compile's first call ran past ``--compile-timeout``."""


class _Alarm(BaseException):
    """Raised by the SIGALRM handler. A BaseException, because Inductor's compile workers catch
    (and swallow) ``Exception`` around their subprocess waits: an ``Exception`` raised there by a
    signal handler is lost and compilation simply goes on (seen on torch 2.13)."""


# ============================================================================ helpers
class _Log:
    def __init__(self, quiet: bool = False):
        self.t0, self.quiet = time.perf_counter(), quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)


def num_tokens(spec: dict[str, Any]) -> tuple[int, int]:
    """``(Nv, Nr)`` of a shape."""
    t, h, w = spec["video"]
    rh, rw = spec["ref_grid"]
    return t * h * w, spec["refs"] * rh * rw


def step_flops(cfg, batch: int, nv: int, nr: int, text_len: int) -> float:
    """FLOPs of one cached denoising step (video rows only; the useful work of a step).

    Per layer: self-attention q/k/v/o and cross-attention q/o GEMMs on ``batch*Nv`` rows,
    cross-attention k/v on the text, the FFN, self-attention over ``Nv + Nr`` keys
    (``4 B H D Nv (Nv + Nr)``) and cross-attention over the text; plus patch embedding, text
    embedding and the output projection.
    """
    d, f, h, hd = cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.head_dim
    m = batch * nv
    patch = math.prod(cfg.patch_size)
    per_layer = (2 * m * 6 * d * d + 2 * batch * text_len * 2 * d * d + 2 * m * 2 * d * f
                 + 4 * batch * h * hd * nv * (nv + nr) + 4 * batch * h * hd * nv * text_len)
    outer = (2 * m * cfg.in_channels * patch * d + 2 * m * d * cfg.out_channels * patch
             + 2 * batch * text_len * (cfg.text_dim * d + d * d))
    return float(cfg.num_layers * per_layer + outer)


def _param_bytes(cfg, dtype: torch.dtype) -> int:
    from wildactor_kernels.model import WildActor

    m = WildActor(cfg, device="meta", dtype=dtype)
    return sum(p.numel() * p.element_size() for p in m.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gb(nbytes: float) -> float:
    return nbytes / 2**30


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in list(cache.k) + list(cache.v))


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise :class:`CompileTimeout` in the main thread after ``seconds`` (SIGALRM; a no-op where
    that is unavailable)."""
    if not seconds or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise _Alarm()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    except _Alarm:
        raise CompileTimeout(f"torch.compile warm-up exceeded --compile-timeout {seconds:.0f} s") from None


def pick_sdpa_backend(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int):
    """``(name, SDPBackend, notes)``: cuDNN attention if a probe on the model's layout
    (``[B, N, H, D]`` transposed, unequal q/k lengths) runs, else flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    notes = []
    # token counts that are not multiples of any tile size, as the model's are (27,280; 4,400; 512)
    q = torch.randn(2, 257, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 333, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(be):
                o = F.scaled_dot_product_attention(q, k, k)
            _sync(device)
            if not torch.isfinite(o).all():
                raise RuntimeError("non-finite output")
            return name, be, notes
        except Exception as e:  # noqa: BLE001 - try the next backend, say why
            notes.append(f"SDPA {name} probe failed: {_first_line(e)}")
    raise RuntimeError("; ".join(notes))


def _first_line(e: BaseException, n: int = 200) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:n] if lines else ''}"


def _is_timeout(e: BaseException | None) -> bool:
    """True if ``e`` is (or wraps, as Dynamo's BackendCompilerFailed does) a CompileTimeout."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, CompileTimeout) or "--compile-timeout" in str(e):
            return True
        e, seen = (e.__cause__ or e.__context__), seen + 1
    return False


def _set_recompile_limit(n: int) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), n))


# ============================================================================ the benchmark
def build(shape: str, device: torch.device, dtype: torch.dtype, layers: int | None, seed: int):
    """Model (random weights, ``backend="reference"``, eval) and inputs of one shape."""
    from wildactor_kernels.model import Reference, WildActor, WildActorConfig

    spec = SHAPES[shape]
    over = {"num_layers": layers} if layers else {}
    cfg = WildActorConfig.preset(spec["preset"], backend="reference", **over)
    torch.manual_seed(seed)
    # Built in place on the device in the working dtype (no fp32 CPU copy); the default inits
    # (Kaiming-uniform linears, randn/sqrt(dim) modulation tables) keep activations finite.
    m = WildActor(cfg, device=device, dtype=dtype).eval()
    with torch.no_grad():  # trained adapters are not zero: make the reference-only LoRA do work
        for name, p in m.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0.0, 0.02)
    g = torch.Generator(device=device).manual_seed(seed)
    c, (pt, ph, pw) = cfg.in_channels, cfg.patch_size
    t, hg, wg = spec["video"]
    rh, rw = spec["ref_grid"]
    lat = torch.randn(1, c, t * pt, hg * ph, wg * pw, generator=g, device=device, dtype=dtype)
    inputs = dict(
        latents=lat.expand(BATCH, -1, -1, -1, -1).contiguous(),  # the same latents in both branches
        timestep=torch.full((BATCH,), TIMESTEP, device=device),
        context=torch.randn(BATCH, spec["text_len"], cfg.text_dim, generator=g, device=device, dtype=dtype),
    )
    refs = [Reference("face" if i < 2 else "body",
                      torch.randn(1, c, 1, rh * ph, rw * pw, generator=g, device=device, dtype=dtype))
            for i in range(spec["refs"])]
    return cfg, m, inputs, refs


def _measure_step(step: Callable[[], torch.Tensor], device: torch.device, iters: int, warmup: int,
                  first_call_limit: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """First call (compile/autotune; kept as the output), warm-up calls (peak memory), timed calls."""
    t0 = time.perf_counter()
    with _time_limit(first_call_limit):
        out = step()
        _sync(device)
    res: dict[str, Any] = {"first_call_s": time.perf_counter() - t0}
    if not torch.isfinite(out).all():
        raise FloatingPointError("the step output has non-finite values")
    res["out_rms"] = out.float().pow(2).mean().sqrt().item()
    if device.type == "cuda":
        res["mem_before_gb"] = _gb(torch.cuda.memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(1, warmup)):
        step()
    _sync(device)
    if device.type == "cuda":
        res["peak_mem_gb"] = _gb(torch.cuda.max_memory_allocated(device))
    t = harness.bench(step, iters=iters, warmup=0, device=device)
    res.update(ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], iters=t["n"], timing=t["method"])
    return out, res


def _measure_encode(m, refs, video_shape, device, iters: int):
    """Reference encoding (once per generation): timed, and the cache it returns."""
    cache = m.encode_references(refs, video_shape=video_shape)  # first call: autotune, compile
    _sync(device)
    t = harness.bench(lambda: m.encode_references(refs, video_shape=video_shape), iters=iters, warmup=1,
                      device=device)
    return cache, {"encode_ms": t["ms"], "encode_ms_p20": t["ms_p20"], "encode_ms_p80": t["ms_p80"],
                   "ref_cache_gb": _gb(_cache_bytes(cache))}


def run_shape(shape: str, *, device: torch.device, dtype: torch.dtype = torch.bfloat16,
              layers: int | None = None, paths: tuple[str, ...] = PATHS, iters: int = 5, warmup: int = 1,
              encode_iters: int = 3, compile_timeout: float | None = 120.0, seed: int = 0,
              log: Callable[[str], None] = print,
              sink: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Measure ``paths`` on one shape; returns one row per path (failed paths included), each
    also appended to ``sink`` as soon as it is measured (kept if the run is interrupted)."""
    from wildactor_kernels.model.quant import quantize_model, quantized_modules, sqnr_db

    from wildactor_kernels import attention_backends

    spec = SHAPES[shape]
    nv, nr = num_tokens(spec)
    common: dict[str, Any] = dict(shape=shape, preset=spec["preset"], batch=BATCH, Nv=nv, Nr=nr,
                                  num_refs=spec["refs"], text_len=spec["text_len"],
                                  dtype=str(dtype).replace("torch.", ""))
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown paths {unknown}; valid: {PATHS}")
    env_peaks = harness.device_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    from wildactor_kernels.model import WildActorConfig

    cfg0 = WildActorConfig.preset(spec["preset"], **({"num_layers": layers} if layers else {}))
    common["layers"] = cfg0.num_layers
    if device.type == "cuda":
        need = _param_bytes(cfg0, dtype)
        free, _total = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:
            msg = (f"{spec['preset']} weights need {_gb(need):.1f} GB in {common['dtype']}; only "
                   f"{_gb(free):.1f} GB free on the GPU (use --layers to benchmark a shallower stack)")
            log(f"{shape}: {msg}")
            rows = [dict(common, path=p, label=LABELS[p], **harness.failed(msg)) for p in paths]
            if sink is not None:
                sink.extend(rows)
            return rows

    log(f"{shape}: building {spec['preset']} ({cfg0.num_layers} layers, {common['dtype']}) on {device}, "
        f"Nv={nv}, Nr={nr} ({spec['refs']} refs), batch {BATCH} (CFG)")
    t0 = time.perf_counter()
    cfg, m, inputs, refs = build(shape, device, dtype, layers, seed)
    _sync(device)
    common["build_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        common["weights_gb"] = _gb(torch.cuda.memory_allocated(device))
    flops = step_flops(cfg, BATCH, nv, nr, spec["text_len"])
    video_shape = tuple(inputs["latents"].shape)
    outputs: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []

    def step_joint():
        with torch.no_grad():
            return m(**inputs, refs=refs)

    def cached_step(cache):
        def step():
            with torch.no_grad():
                return m(**inputs, ref_cache=cache)
        return step

    def run_eager() -> dict[str, Any]:
        m.set_backend("reference")
        out, res = _measure_step(step_joint, device, iters, warmup)
        outputs["eager"] = out
        res["encode_note"] = "no cache: references run inside every step, in both CFG branches"
        return res

    def run_compile() -> dict[str, Any]:
        if device.type != "cuda":
            return harness.skipped("torch.compile + cuDNN SDPA is measured on CUDA only")
        from torch.nn.attention import sdpa_kernel

        m.set_backend("reference")
        name, be, notes = pick_sdpa_backend(device, dtype, cfg.num_heads, cfg.head_dim)
        res: dict[str, Any] = {"sdpa_backend": name}
        if notes:
            res["notes"] = notes
        with torch.no_grad(), sdpa_kernel(be):
            cache, enc = _measure_encode(m, refs, video_shape, device, encode_iters)
        res.update(enc, encode_note="eager reference encoder (compiled blocks serve the step)")
        _set_recompile_limit(64)
        step = cached_step(cache)

        def attempt(backend, limit):
            for blk in m.blocks:  # regional compilation: one graph, reused by every block
                blk.compile(dynamic=False)

            def compiled_step():
                with sdpa_kernel(backend):
                    return step()

            try:
                return _measure_step(compiled_step, device, iters, warmup, first_call_limit=limit)
            finally:
                for blk in m.blocks:
                    blk._compiled_call_impl = None  # undo nn.Module.compile
                torch._dynamo.reset()

        t1 = time.perf_counter()
        try:
            out, r = attempt(be, compile_timeout)
        except Exception as e:
            left = compile_timeout - (time.perf_counter() - t1) if compile_timeout else None
            if name != "cudnn" or _is_timeout(e) or (left is not None and left < 0.5 * compile_timeout):
                raise
            # the probe passed but the model's shapes did not: the flash backend is the next best
            res.setdefault("notes", []).append(
                f"cuDNN SDPA failed in the compiled step ({_first_line(e)}); measured with the flash "
                f"backend instead")
            from torch.nn.attention import SDPBackend

            res["sdpa_backend"] = "flash"
            out, r = attempt(SDPBackend.FLASH_ATTENTION, left)
        res.update(r)
        outputs["compile"] = out
        return res

    def run_ours(key: str) -> dict[str, Any]:
        res: dict[str, Any] = {}
        if key == "ours-fp8":
            t1 = time.perf_counter()
            quantize_model(m, "fp8", emulate=True if device.type == "cpu" else None)
            _sync(device)
            res["quantize_s"] = time.perf_counter() - t1
            paths_used = Counter(str(getattr(q, "gemm_path", None)) for q in quantized_modules(m).values())
            res["fp8_gemm_paths"] = dict(paths_used)
            if device.type == "cuda":
                res["weights_fp8_gb"] = _gb(torch.cuda.memory_allocated(device))
                if paths_used.get("emulate"):
                    res.setdefault("notes", []).append(
                        f"{paths_used['emulate']} FP8 layers run the emulated GEMM on this GPU: not a "
                        f"fast path")
        m.set_backend("auto")
        # what backend="auto" runs: Triton on a CUDA device where it imports, else the reference
        lat = inputs["latents"]
        res["kernels"] = ("triton" if lat.is_cuda and attention_backends(lat.device)["available"]["triton"]
                          else "reference")
        with torch.no_grad():
            cache, enc = _measure_encode(m, refs, video_shape, device, encode_iters)
        res.update(enc)
        out, r = _measure_step(cached_step(cache), device, iters, warmup)
        res.update(r)
        outputs[key] = out
        del cache
        return res

    runners = {"eager": run_eager, "compile": run_compile, "ours-bf16": lambda: run_ours("ours-bf16"),
               "ours-fp8": lambda: run_ours("ours-fp8")}
    for p in PATHS:  # fixed order: the FP8 conversion is in place, so it comes last
        if p not in paths:
            continue
        log(f"{shape}: {LABELS[p]} ...")
        row = harness.run_peer(runners[p], **common, path=p, label=LABELS[p])
        if row.get("status") == "ok":
            row.update(harness.flops_metrics(flops, row["ms"], "bf16", env_peaks))
            row["flops_note"] = "FLOPs of a cached step (video rows); % of the dense bf16 peak"
            log(f"{shape}: {p:10s} {row['ms']:10.2f} ms [{row['ms_p20']:.2f}, {row['ms_p80']:.2f}]"
                + (f"  peak {row['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in row else "")
                + (f"  encode {row['encode_ms']:.1f} ms" if "encode_ms" in row else "")
                + f"  first call {row['first_call_s']:.1f} s")
        elif row.get("status") == "failed":
            log(f"{shape}: {p} FAILED: {row['error'][:300]}")
        else:
            log(f"{shape}: {p} skipped: {row.get('reason')}")
        rows.append(row)
        if sink is not None:
            sink.append(row)  # the same dict: the comparisons below still land in it
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------ same-run comparisons
    by = {r["path"]: r for r in rows}
    for ref_key, field in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
        base = by.get(ref_key)
        for r in rows:
            if r.get("status") == "ok" and base is not None and base.get("status") == "ok":
                r[field] = base["ms"] / r["ms"]
            elif r.get("status") == "ok":
                r[field] = None
    for r in rows:
        if r.get("status") != "ok":
            continue
        out = outputs.get(r["path"])
        if "eager" in outputs and r["path"] != "eager":
            r["sqnr_vs_eager_db"] = sqnr_db(outputs["eager"], out)
        if r["path"] == "ours-fp8":
            r["sqnr_vs_bf16_db"] = sqnr_db(outputs["ours-bf16"], out) if "ours-bf16" in outputs else None
    outputs.clear()
    return rows  # the model and its inputs go with this frame; run() collects before the next shape


# ============================================================================ command line
def add_arguments(ap, *, shapes_flag: bool = True, device_flag: bool = True) -> None:
    """Options of the model benchmark (shared with ``wildactor bench``)."""
    if shapes_flag:
        ap.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help=f"default: {' '.join(DEFAULT_SHAPES)} (tiny on CPU)")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--layers", type=int, default=None, help="transformer depth (default: the preset's)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per path (default 5; CPU 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call")
    ap.add_argument("--encode-iters", type=int, default=3, help="timed reference encodings")
    ap.add_argument("--no-compile", action="store_true", help="skip path (b) (torch.compile)")
    ap.add_argument("--compile-timeout", type=float, default=120.0,
                    help="seconds allowed for torch.compile's first call before (b) is recorded failed")
    ap.add_argument("--seed", type=int, default=0)
    if device_flag:
        ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                        help="default: cuda if available")


def run(args: argparse.Namespace, log: Callable[[str], None] | None = None,
        rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run the shapes and paths of ``args``; returns all rows (not yet written), appended one by
    one to ``rows`` when given (what was measured before an interruption stays there)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = list(args.shapes or (DEFAULT_SHAPES if device.type == "cuda" else ("tiny",)))
    paths = tuple(p for p in args.paths if not (args.no_compile and p == "compile"))
    iters = args.iters or (5 if device.type == "cuda" else 2)
    log = log or _Log()
    rows = [] if rows is None else rows
    for shape in shapes:
        run_shape(shape, device=device, layers=args.layers, paths=paths, iters=iters,
                  warmup=args.warmup, encode_iters=args.encode_iters,
                  compile_timeout=args.compile_timeout, seed=args.seed, log=log, sink=rows)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--json", default=None,
                    help=f"JSON-lines file to append to (default benchmarks/results/{KIND}.jsonl on CUDA, "
                         f"a temp file on CPU)")
    ap.add_argument("--no-report", action="store_true", help="do not (re)write the markdown/plots")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        print("bench_model: no CUDA device; running the CPU smoke configuration (timings are not "
              "performance data).")
    env = harness.env_record(device)
    rows: list[dict[str, Any]] = []
    partial: dict[str, Any] = {}
    with harness.keep_partial(partial):  # Ctrl-C / timeout -s INT: the paths measured are written
        run(args, rows=rows)
    if partial:
        for r in rows:
            r.setdefault("notes", []).append(partial["interrupted"])
    path = args.json or (harness.results_path(KIND) if device.type == "cuda" else
                         os.path.join(_tempdir(), f"{KIND}.jsonl"))
    harness.append_jsonl(path, rows, kind=KIND, env=env)
    print(f"# appended {len(rows)} rows to {path}")
    if not args.no_report:
        from benchmarks import report

        md = report.write_reports(path)
        for p in md:
            print(f"# wrote {p}")
        print(report.model_markdown(harness.read_jsonl(path)))
    failed = [f"{r['shape']}/{r['path']}" for r in rows if r.get("status") == "failed"]
    if failed:
        print(f"# failed (recorded with their errors): {', '.join(failed)}")
    # our own paths failing is an error; a peer failing (e.g. compile timeout) is a recorded result
    if any(f.endswith(("/ours-bf16", "/ours-fp8")) for f in failed):
        return 1
    return 130 if partial else 0


def _tempdir() -> str:
    import tempfile

    d = os.path.join(tempfile.gettempdir(), "wildactor-bench")
    os.makedirs(d, exist_ok=True)
    return d


if __name__ == "__main__":
    sys.exit(main())
