"""sm_90 resource report: every Triton kernel of the library, every autotune config, built ahead
of time for an H100/H200 on the CPU (no GPU needed), at the docs/design.md §8 shapes (bf16, D=128).

How the kernels and their arguments are found (nothing here names a kernel or a launcher):

1. Discovery: every module of the ``wildactor_kernels`` package is imported and searched for
   Triton ``JITFunction``/``Autotuner``/``Heuristics`` objects; a JIT function is a *kernel* when
   its module's source launches it (``name[grid](...)``), the others are ``@triton.jit`` helpers.
2. Capture: the public ops (``wk.asym_attention`` fused/prologue, ``wk.cached_asym_attention``,
   ``wk.apply_rope``, ``wk.qk_norm_rope``, ``wk.ref_lora_linear``, ``RefLoRALinear`` folded,
   ``wk.per_token_quant_fp8``; the Hopper forward through its backend name ``"triton-hopper"``,
   once with the warp-specialised loop first and once hand-pipelined; ``precision="fp8"``
   attention, joint and with a ``quantize_ref_kv`` cache) run forward and backward on CPU
   tensors of the docs/design.md §8 shapes with
   Triton's launch entry points replaced by recorders: the launchers compute their grids,
   constexprs, heuristics and strides exactly as on the GPU (``TRITON_INTERPRET=0``), and
   every ``Autotuner`` launch is expanded into one launch per config. Nothing is computed on the
   uninitialised tensors except the small torch glue between launches.
3. Build: each distinct launch is compiled with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 90, 32))`` -- the route of ``tests/helpers.run_sm90_build`` -- with the
   argument specialisation Triton's launcher would apply (16-byte-aligned pointers and ints
   divisible by 16 get ``tt.divisibility``; ints equal to 1 become constants). ptxas ``-v``
   gives registers, spills and stack; Triton's metadata the shared memory.

A kernel that the library defines but no public op reached is an error (exit status 1, named
in the output and the report): add the op that launches it to :func:`workloads`.

Usage::

    python benchmarks/sm90_report.py        # benchmarks/results/sm90_resources_triton<ver>.{md,json}
    python benchmarks/sm90_report.py --shapes wan5b-720p --out-dir /tmp/r

Builds run one at a time (ptxas is CPU-heavy) and are cached by Triton (``~/.triton/cache``) and,
for the ptxas report, in ``--cache`` (default ``~/.cache/wildactor_sm90``): a second run takes
seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # the GPU's configs and launch paths, not the interpreter's

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/sm90_report.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from benchmarks import harness  # noqa: E402

RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

# sm_90 (H100/H200) per-SM limits (CUDA occupancy calculator, compute capability 9.0)
SM90 = dict(regs_per_sm=65536, max_regs_per_thread=255, reg_alloc_unit=256, max_warps=64,
            max_ctas=32, smem_per_sm=228 * 1024, smem_per_block=227 * 1024, smem_reserved_per_cta=1024)

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
           torch.uint8: "u8", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv",
           torch.float8_e5m2: "fp8e5"}

_PTX_FEATURES = {"wgmma": "wgmma.mma_async", "tma": "cp.async.bulk.tensor", "mbarrier": "mbarrier",
                 "setmaxnreg": "setmaxnreg", "cp_async": "cp.async"}
# ``wgmma.wait_group.sync.aligned N``: wait until at most N wgmma groups are in flight; N >= 1
# lets the next group's tensor-core work overlap what follows the wait (issue 13)
_WAIT_GROUP_RE = re.compile(r"wgmma\.wait_group\S*\s+(\d+)")


def wait_groups(ptx: str) -> list[int]:
    """The distinct ``N`` of the PTX's ``wgmma.wait_group N`` instructions, ascending."""
    return sorted({int(n) for n in _WAIT_GROUP_RE.findall(ptx)})


# =========================================================================== discovery
_DEFINES_KERNELS = re.compile(r"@(triton\.)?(jit|autotune|heuristics)\b|triton\.(jit|autotune|heuristics)\(")


def kernel_modules() -> list[str]:
    """The modules of the package whose source defines Triton kernels (``@triton.jit``,
    ``triton.autotune(...)``, ...; ``wildactor_kernels.model``, the repository's ``model/`` folder,
    included); the others are not imported."""
    import importlib.util

    import wildactor_kernels.model

    import wildactor_kernels

    names = []
    for pkg in (wildactor_kernels, wildactor_kernels.model):
        infos = [pkg.__name__] + [i.name for i in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
        for name in infos:
            if name in names:
                continue
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            with open(spec.origin, encoding="utf-8") as f:
                if _DEFINES_KERNELS.search(f.read()):
                    names.append(name)
    return names


def base_jit(obj) -> JITFunction:
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def kernel_label(fn: JITFunction) -> str:
    return f"{fn.fn.__module__.removeprefix('wildactor_kernels.')}.{fn.fn.__name__}"


def discover_kernels() -> dict[str, JITFunction]:
    """``{label: JITFunction}`` of every launched kernel of the package (helpers excluded)."""
    kernels: dict[str, JITFunction] = {}
    for name in kernel_modules():
        mod = importlib.import_module(name)
        try:
            src = inspect.getsource(mod)
        except (OSError, TypeError):
            continue
        for attr, obj in vars(mod).items():
            if not isinstance(obj, (JITFunction, Autotuner, Heuristics)):
                continue
            fn = base_jit(obj)
            if fn.fn.__module__ != name:
                continue  # imported from elsewhere: found in its own module
            if isinstance(obj, (Autotuner, Heuristics)) or re.search(rf"\b{re.escape(attr)}\s*\[", src):
                kernels[kernel_label(fn)] = fn
    return kernels


# =========================================================================== capture
@dataclass
class Launch:
    """One launch as the GPU would compile it: the kernel, its bound arguments, its options."""

    fn: JITFunction
    args: dict[str, Any]
    options: dict[str, Any]
    config: dict[str, Any] | None = None  # the autotune config, when launched by an Autotuner
    autotuned: bool = False
    candidate: bool = True  # kept by the autotuner's early prune for this call
    first_candidate: bool = False  # the autotuner's first candidate after pruning
    sites: list[str] = field(default_factory=list)


class Recorder:
    """Replaces ``JITFunction.run`` and ``Autotuner.run`` with recorders while active."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.site = ""
        self._tune: dict | None = None

    def _jit_run(rec, self, *args, grid, warmup, **kwargs):  # noqa: N805 (self is the JITFunction)
        names = set(self.arg_names)
        call_kw = {k: v for k, v in kwargs.items() if k in names}
        options = {k: v for k, v in kwargs.items() if k not in names}
        bound = self.signature.bind(*args, **call_kw)
        bound.apply_defaults()
        launch = Launch(self, dict(bound.arguments), options, sites=[rec.site])
        if rec._tune is not None:
            launch.config, launch.autotuned = rec._tune["config"], True
            launch.candidate, launch.first_candidate = rec._tune["candidate"], rec._tune["first"]
        rec.launches.append(launch)

    def _tune_run(rec, self, *args, **kwargs):  # noqa: N805 (self is the Autotuner)
        named = dict(zip(self.arg_names, args))
        meta = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        kept = self.configs
        if self.early_config_prune:
            kept = self.early_config_prune(self.configs, named, **meta)
        first = kept[0] if kept else None
        for cfg in self.configs:
            rec._tune = dict(config=dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                             candidate=any(cfg is c for c in kept), first=cfg is first)
            try:
                self.fn.run(*args, **kwargs, **cfg.all_kwargs())
            finally:
                rec._tune = None

    @contextlib.contextmanager
    def active(self):
        saved = (JITFunction.run, Autotuner.run, torch.cuda.device,
                 torch.cuda.get_device_properties, torch.cuda.get_device_capability)
        rec = self

        class _Props:  # what the launchers read of an H100
            multi_processor_count = 132
            major, minor = 9, 0
            name = "NVIDIA H100 (sm_90 report)"

        JITFunction.run = lambda s, *a, **k: rec._jit_run(s, *a, **k)
        Autotuner.run = lambda s, *a, **k: rec._tune_run(s, *a, **k)
        # the launchers check for CUDA tensors; nothing is launched, so CPU tensors stand in
        torch.Tensor.is_cuda = property(lambda t: t.device.type in ("cpu", "cuda"))
        torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
        torch.cuda.get_device_properties = lambda *a, **k: _Props()
        torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
        try:
            yield self
        finally:
            (JITFunction.run, Autotuner.run, torch.cuda.device,
             torch.cuda.get_device_properties, torch.cuda.get_device_capability) = saved
            del torch.Tensor.is_cuda  # back to the C property of the base class


def workloads(shapes: list[str]):
    """``(site, thunk)`` pairs: each thunk runs public ops forward and backward at a shape of
    docs/design.md §8. LoRA and FP8 use the wan2.2-5b linears at the wan5b-720p tokens
    (benchmarks/bench_lora.py)."""
    import wildactor_kernels as wk

    bf16 = torch.bfloat16

    def t(*shape, grad=True):
        return torch.empty(*shape, dtype=bf16).requires_grad_(grad)

    def backward(outs, ins):
        outs = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs])]
        torch.autograd.grad(outs, ins, grad_outputs=[torch.empty_like(o) for o in outs], allow_unused=True)

    for name in shapes:
        spec = harness.DESIGN_SHAPES[name]
        nv, nr = harness.design_tokens(name)
        b, h, d, n = spec["B"], spec["H"], spec["D"], nv + nr
        pos = wk.irope_positions(harness.design_layout(spec))
        cos, sin = wk.rope_cos_sin(pos, d)

        def joint(mode, b=b, n=n, h=h, d=d, nv=nv, cos=cos, sin=sin):
            q, k, v = t(b, n, h, d), t(b, n, h, d), t(b, n, h, d)
            rope = dict(cos=cos, sin=sin, rope_mode=mode) if mode else {}
            backward(wk.asym_attention(q, k, v, nv, backend="triton", **rope), (q, k, v))

        def cached(mode, b=b, h=h, d=d, nv=nv, nr=nr, cos=cos, sin=sin):
            ins = (t(b, nv, h, d), t(b, nv, h, d), t(b, nv, h, d), t(b, nr, h, d), t(b, nr, h, d))
            rope = dict(cos=cos[:nv], sin=sin[:nv], rope_mode=mode) if mode else {}
            backward(wk.cached_asym_attention(*ins, backend="triton", **rope), ins)

        def qk_norm(b=b, n=n, h=h, d=d, cos=cos, sin=sin):
            q, k, wq, wk_ = t(b, n, h, d), t(b, n, h, d), t(h * d), t(h * d)
            backward(wk.qk_norm_rope(q, k, wq, wk_, cos, sin, backend="triton"), (q, k, wq, wk_))

        for mode in ("fused", "prologue", None):
            label = mode or "no-rope"
            yield f"{name} joint {label}", lambda m=mode: joint(m)
            yield f"{name} cached {label}", lambda m=mode: cached(m)
        yield f"{name} qk_norm_rope", qk_norm

        # the Hopper forward (TMA descriptors, warp-specialised or hand-pipelined key loop):
        # backend="auto" picks it only on a measured sm_90, so it is driven by its backend name;
        # its backward is the kernels.py one (already built above)
        def hopper(cached_mode, warp_spec=None, b=b, n=n, h=h, d=d, nv=nv, nr=nr, cos=cos, sin=sin):
            from wildactor_kernels.attention import dispatch
            from wildactor_kernels.attention import hopper as hp

            saved, hp.HOPPER_WARP_SPEC = hp.HOPPER_WARP_SPEC, warp_spec
            try:
                with torch.no_grad():
                    if cached_mode:
                        ins = (t(b, nv, h, d), t(b, nv, h, d), t(b, nv, h, d), t(b, nr, h, d),
                               t(b, nr, h, d))
                        dispatch.run_cached_backend("triton-hopper", *ins, cos[:nv], sin[:nv])
                    else:
                        dispatch.run_backend("triton-hopper", t(b, n, h, d), t(b, n, h, d),
                                             t(b, n, h, d), nv, cos, sin)
            finally:
                hp.HOPPER_WARP_SPEC = saved

        # 8-bit attention (precision="fp8", forward only): K/V quantizer + int8/e4m3 kernel
        def fp8_attn(cached_mode, b=b, n=n, h=h, d=d, nv=nv, nr=nr, cos=cos, sin=sin):
            from wildactor_kernels.attention import quantize_ref_kv

            with torch.no_grad():
                if cached_mode:
                    cache = quantize_ref_kv(t(b, nr, h, d), t(b, nr, h, d), backend="triton")
                    wk.cached_asym_attention(t(b, nv, h, d), t(b, nv, h, d), t(b, nv, h, d), cache,
                                             None, cos[:nv], sin[:nv], backend="triton",
                                             precision="fp8")
                else:
                    wk.asym_attention(t(b, n, h, d), t(b, n, h, d), t(b, n, h, d), nv, cos, sin,
                                      backend="triton", precision="fp8")

        yield f"{name} hopper joint", lambda f=hopper: f(False)
        yield f"{name} hopper joint pipelined", lambda f=hopper: f(False, warp_spec=False)
        yield f"{name} hopper cached", lambda f=hopper: f(True)
        yield f"{name} fp8 joint", lambda f=fp8_attn: f(False)
        yield f"{name} fp8 cached", lambda f=fp8_attn: f(True)

    nv, nr = harness.design_tokens("wan5b-720p")
    for din, dout in ((3072, 3072), (3072, 14336), (14336, 3072)):
        def lora(din=din, dout=dout):
            x, w, bias = t(1, nv + nr, din), t(dout, din, grad=False), t(dout, grad=False)
            a, lb = t(128, din), t(dout, 128)
            backward(wk.ref_lora_linear(x, w, bias, a, lb, 1.0, nv, backend="triton"), (x, a, lb))

        def folded(din=din, dout=dout):
            lin = wk.RefLoRALinear(din, dout, rank=128, backend="triton", dtype=bf16).requires_grad_(False)
            lin.fold_mode = "fold"
            with torch.no_grad():
                lin(t(1, nv + nr, din, grad=False), nv)

        def quant(din=din):
            wk.per_token_quant_fp8(t(nv + nr, din, grad=False), pad_to=16, backend="triton")

        yield f"lora {din}->{dout} r128", lora
        yield f"lora folded {din}->{dout}", folded
        if dout == 3072:  # the quantized inputs: K = 3072 and K = 14336, once each
            yield f"fp8 per-token quant K={din}", quant


def capture(shapes: list[str], sites: set[str] | None = None) -> list[Launch]:
    """Every launch the public ops make at ``shapes`` (only the workloads named in ``sites``)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("sm90_report needs TRITON_INTERPRET=0 before wildactor_kernels is imported: "
                           "under the interpreter the launchers pick the interpreter's configs")
    rec = Recorder()
    with rec.active(), torch.random.fork_rng():
        for site, thunk in workloads(shapes):
            if sites is None or site in sites:
                rec.site = site
                thunk()
    return rec.launches


def dedupe(launches: list[Launch]) -> list[Launch]:
    """One launch per distinct build; the sites and candidate flags of its duplicates merged."""
    unique: dict[str, Launch] = {}
    for launch in launches:
        key = _launch_key(launch)
        if key in unique:
            u = unique[key]
            u.sites += [s for s in launch.sites if s not in u.sites]
            u.candidate |= launch.candidate
            u.first_candidate |= launch.first_candidate
        else:
            unique[key] = launch
    return [unique[k] for k in sorted(unique)]


def build_picks(shape: str, sites: list[str], cache_dir: str,
                launches: list[Launch] | None = None) -> dict[str, list[dict]]:
    """``{site: rows}``: for each workload, the config each launch picks -- the launcher's fixed
    config, or the autotuner's first candidate after its early prune -- built for sm_90.
    ``launches``: from :func:`capture` at ``shape`` (default: captured here for ``sites``)."""
    if launches is None:
        launches = capture([shape], set(sites))
    launches = [lc for lc in launches if (not lc.autotuned or lc.first_candidate)
                and any(s in sites for s in lc.sites)]
    out: dict[str, list[dict]] = {s: [] for s in sites}
    for launch in dedupe(launches):
        row = dict(kernel=kernel_label(launch.fn), config=launch.config or dict(launch.options))
        row.update(build(launch, cache_dir))
        for site in launch.sites:
            if site in out:
                out[site].append(row)
    return out


# =========================================================================== build
def _specialise(fn: JITFunction, args: dict[str, Any]):
    """Signature, constexprs and attributes as Triton's launcher specialises these values."""
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = args[p.name]
        if p.is_constexpr or v is None:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _DTYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                sig[p.name], consts[p.name] = "constexpr", 1
                continue
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel_label(fn)}: cannot specialise argument {p.name}={v!r}")
    return sig, consts, attrs


def _launch_key(launch: Launch) -> str:
    sig, consts, attrs = _specialise(launch.fn, launch.args)
    opts = {k: launch.options.get(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    return json.dumps([kernel_label(launch.fn), sig, {k: repr(v) for k, v in consts.items()},
                       sorted(str(k) for k in attrs), opts], sort_keys=True)


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}


def _parse_ptxas(log: str) -> dict[str, int] | None:
    if not _PTXAS_RE["registers"].search(log):
        return None
    out = {}
    for name, rx in _PTXAS_RE.items():
        vals = [int(m) for m in rx.findall(log)]
        out[name] = max(vals) if vals else 0
    return out


def _ptxas_report(ptx: str, cache_dir: str, log: str = "") -> dict[str, int]:
    """Registers, stack and spills of the PTX: from Triton's own ptxas ``-v`` log when this build
    ran ptxas (``log``), else from running the ptxas that Triton ships on the PTX; cached."""
    key = hashlib.sha256((triton.__version__ + ptx).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir, key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    out = _parse_ptxas(log)
    if out is not None:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f)
        return out
    from triton.backends.nvidia import compiler as nv

    has_arch = "arch" in inspect.signature(nv.get_ptxas).parameters
    ptxas = nv.get_ptxas(90).path if has_arch else nv.get_ptxas().path
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        extra = ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in inspect.getsource(nv) else []
        res = subprocess.run([ptxas, "-lineinfo", "-v", *extra, f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    out = _parse_ptxas(res.stderr + res.stdout)
    if out is None:
        raise RuntimeError(f"no register count in the ptxas log: {res.stderr[-500:]}")
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def ctas_per_sm(regs: int, smem: int, warps: int) -> dict[str, int]:
    """Resident CTAs per SM on sm_90 and which limit binds (registers, shared memory, warps)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / SM90["reg_alloc_unit"]) * SM90["reg_alloc_unit"]
    by_regs = (SM90["regs_per_sm"] // regs_per_warp) // warps
    by_smem = SM90["smem_per_sm"] // (smem + SM90["smem_reserved_per_cta"])
    by_warps = SM90["max_warps"] // warps
    limits = dict(registers=by_regs, shared=by_smem, warps=by_warps, ctas=SM90["max_ctas"])
    ctas = min(limits.values())
    return dict(ctas=ctas, bound_by=min(limits, key=limits.get))


def build(launch: Launch, cache_dir: str) -> dict[str, Any]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = _specialise(launch.fn, launch.args)
    opts = {k: launch.options[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")
            if launch.options.get(k) is not None}
    t0 = time.perf_counter()
    buf = io.StringIO()
    knobs = getattr(triton, "knobs", None)
    dump = contextlib.nullcontext()
    if knobs is not None and hasattr(knobs.nvidia, "scope"):
        dump = knobs.nvidia.scope()
    with dump, contextlib.redirect_stdout(buf):
        if knobs is not None:
            knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v when it runs ptxas
        k = triton.compile(ASTSource(launch.fn, sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = k.asm["ptx"]
    res = _ptxas_report(ptx, cache_dir, buf.getvalue())
    warps = k.metadata.num_warps
    smem = k.metadata.shared
    occ = ctas_per_sm(res["registers"], smem, warps)
    spill = res["spill_store_bytes"] + res["spill_load_bytes"]
    fits = (smem <= SM90["smem_per_block"] and res["registers"] <= SM90["max_regs_per_thread"]
            and occ["ctas"] >= 1)
    waits = wait_groups(ptx)
    return dict(res, shared_bytes=smem, num_warps=warps, num_stages=k.metadata.num_stages,
                ctas_per_sm=occ["ctas"], occupancy_bound_by=occ["bound_by"],
                spills=spill > 0, fits=fits,
                **{f: pat in ptx for f, pat in _PTX_FEATURES.items()},
                wait_groups=waits, wait_group_min=waits[0] if waits else None,
                wait_group_max=waits[-1] if waits else None,
                build_s=round(time.perf_counter() - t0, 2))


def _short(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def collect(shapes: list[str], cache_dir: str, log=print) -> dict[str, Any]:
    kernels = discover_kernels()
    unique = dedupe(capture(shapes))
    reached = {kernel_label(lc.fn) for lc in unique}
    missing = sorted(set(kernels) - reached)
    rows, errors = [], []
    for i, launch in enumerate(unique):
        label = kernel_label(launch.fn)
        consts = {p.name: launch.args[p.name] for p in launch.fn.params if p.is_constexpr}
        _, spec, _ = _specialise(launch.fn, launch.args)
        ones = [k for k in spec if k not in consts and spec[k] == 1]  # ints Triton makes constant 1
        row = dict(kernel=label, config=launch.config or {}, autotuned=launch.autotuned,
                   candidate=launch.candidate, first_candidate=launch.first_candidate,
                   constexprs={k: _short(v) for k, v in consts.items()}, equal_to_1=ones,
                   sites=launch.sites)
        try:
            row.update(build(launch, cache_dir))
        except Exception as e:  # a config that does not build is a finding, not a crash
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            row.update(error=f"{type(e).__name__}: {msg}", fits=False, spills=None)
            errors.append(f"{label} {row['config']}: {row['error']}")
        log(f"[{i + 1}/{len(unique)}] {label} {launch.config or launch.options} -> "
            + (row.get("error") or f"regs {row['registers']} spill {row['spill_store_bytes']}/"
               f"{row['spill_load_bytes']} smem {row['shared_bytes']} ctas/SM {row['ctas_per_sm']}"
               f" ({row['build_s']} s)"))
        rows.append(row)
    return dict(
        triton=triton.__version__, torch=torch.__version__, target="cuda sm_90 (GPUTarget('cuda', 90, 32))",
        shapes=shapes, dtype="bf16", head_dim=128, commit=harness.commit_label(harness.env_record("cpu")),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        limits=SM90, kernels=sorted(kernels), not_reached=missing, build_errors=errors, rows=rows)


# =========================================================================== output
def _cfg_text(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("num_warps", "num_stages")) or "-"


def _variant(row: dict, varying: dict[str, set[str]]) -> str:
    """The constexprs (not set by the autotune config) that differ between builds of the kernel."""
    keys = varying.get(row["kernel"], set())
    out = " ".join(f"{k}={v}" for k, v in row["constexprs"].items() if k in keys and k not in row["config"])
    if "equal_to_1" in keys and row.get("equal_to_1"):
        out += (" " if out else "") + "=1: " + ",".join(row["equal_to_1"])
    return out


def _waits(row: dict) -> str:
    w = row.get("wait_groups") or []
    return "-" if not w else str(w[0]) if len(w) == 1 else f"{w[0]}-{w[-1]}"


def _sites(row: dict, shapes: list[str]) -> str:
    """The workloads that launch this build, without the shape name when only one was built."""
    sites = row["sites"]
    if len(shapes) == 1:
        sites = [s.removeprefix(shapes[0] + " ") for s in sites]
    return ", ".join(sites)


def _varying(rows: list[dict]) -> dict[str, set[str]]:
    seen: dict[str, dict[str, set]] = {}
    for r in rows:
        for k, v in [*r["constexprs"].items(), ("equal_to_1", ",".join(r.get("equal_to_1", [])))]:
            seen.setdefault(r["kernel"], {}).setdefault(k, set()).add(v)
    return {kern: {k for k, vals in d.items() if len(vals) > 1} for kern, d in seen.items()}


def to_markdown(rep: dict) -> str:
    rows = rep["rows"]
    varying = _varying(rows)
    spill = [r for r in rows if r.get("spills")]
    nofit = [r for r in rows if not r.get("fits")]
    lines = [
        f"# sm_90 resources, Triton {rep['triton']}",
        "",
        f"Every launched kernel of `wildactor_kernels` and every autotune config, built ahead of time for "
        f"sm_90 on the CPU by `benchmarks/sm90_report.py` at the docs/design.md §8 shapes "
        f"({', '.join(rep['shapes'])}; bf16, D=128) through the public ops, forward and backward. "
        f"torch {rep['torch']}, commit {rep['commit']}, {rep['date']}.",
        "",
        "Columns: registers per thread, spill stores/loads (bytes per thread), stack frame, dynamic shared "
        "memory, warps, stages, resident CTAs per SM (65,536 registers, 228 KB shared memory, 64 warps, "
        "32 CTAs per SM; 1 KB reserved per CTA) with the limit that binds, and whether the PTX has "
        "`wgmma.mma_async`, `cp.async.bulk.tensor` (TMA), `mbarrier`, `setmaxnreg`; wait N: the `N` "
        "of the PTX's `wgmma.wait_group N` (smallest-largest; `-` none; N >= 1 somewhere means a wgmma "
        "group stays in flight past a wait). "
        "cand: kept by the autotuner's early prune at these shapes (1st: its first candidate; fixed: "
        "no autotuner). used by: the public-op workloads that launch this build (sm90_report.workloads). "
        "**SPILL** / **NO FIT** flag configs that spill or cannot run (over 227 KB shared or 0 CTAs/SM).",
        "",
        f"Summary: {len(rows)} builds of {len({r['kernel'] for r in rows})} kernels; "
        f"{len(spill)} spill, {len(nofit)} do not fit or failed to build"
        + (f"; kernels no public op reached: {', '.join(rep['not_reached'])}" if rep["not_reached"] else "")
        + ".",
        "",
    ]
    picks = [r for r in rows if "error" not in r and (r["first_candidate"] or not r["autotuned"])]
    if picks:
        yn = {True: "yes", False: "-"}
        lines += ["Picked configs (what each launch runs first: the launcher's fixed config or the "
                  "autotuner's first candidate after its early prune; the full table below has every "
                  "config):", "",
                  "| kernel | variant | config | warps | stages | regs | spill st/ld B | smem B | CTAs/SM "
                  "| wgmma | wait N | TMA | setmaxnreg | used by |",
                  "|" + "---|" * 14]
        for r in picks:
            lines.append(
                f"| `{r['kernel']}` | {_variant(r, varying)} | {_cfg_text(r['config'])} | {r['num_warps']} "
                f"| {r['num_stages']} | {r['registers']} | "
                + (f"**{r['spill_store_bytes']}/{r['spill_load_bytes']}**" if r["spills"] else "0/0")
                + f" | {r['shared_bytes']} | {r['ctas_per_sm']} | {yn[r['wgmma']]} | {_waits(r)} | "
                f"{yn[r['tma']]} | {yn[r['setmaxnreg']]} | {_sites(r, rep['shapes'])} |")
        lines.append("")
    if spill:
        lines += ["Spilling configs:", ""]
        for r in spill:
            lines.append(f"- `{r['kernel']}` {_cfg_text(r['config'])} w{r['num_warps']} s{r['num_stages']} "
                         f"{_variant(r, varying)}: {r['spill_store_bytes']} B stores / "
                         f"{r['spill_load_bytes']} B loads"
                         + (" (autotune candidate)" if r["candidate"] else " (pruned)"))
        lines.append("")
    hdr = ("| kernel | variant | config | warps | stages | regs | spill st/ld B | stack B | smem B "
           "| CTAs/SM | wgmma | wait N | TMA | mbarrier | setmaxnreg | cand | flags | used by |")
    lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['kernel']}` | {_variant(r, varying)} | {_cfg_text(r['config'])} | "
                         f"{r['config'].get('num_warps', '')} | {r['config'].get('num_stages', '')} | "
                         f"| | | | | | | | | | | **BUILD FAILED**: {r['error'][:120]} | "
                         f"{_sites(r, rep['shapes'])} |")
            continue
        flags = []
        if r["spills"]:
            flags.append("**SPILL**")
        if not r["fits"]:
            flags.append("**NO FIT**")
        cand = "1st" if r["first_candidate"] else "yes" if r["candidate"] else "no"
        cand = cand if r["autotuned"] else "fixed"
        yn = {True: "yes", False: "-"}
        lines.append(
            f"| `{r['kernel']}` | {_variant(r, varying)} | {_cfg_text(r['config'])} | {r['num_warps']} "
            f"| {r['num_stages']} | {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} "
            f"| {r['stack_bytes']} | "
            f"{r['shared_bytes']} | {r['ctas_per_sm']} ({r['occupancy_bound_by']}) | {yn[r['wgmma']]} | "
            f"{_waits(r)} | "
            f"{yn[r['tma']]} | {yn[r['mbarrier']]} | {yn[r['setmaxnreg']]} | {cand} | {' '.join(flags)} | "
            f"{_sites(r, rep['shapes'])} |")
    lines += ["", "The JSON file beside this one has every build's constexprs, the arguments Triton "
              "specialises to 1 (`equal_to_1`), its workloads and build time.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["wan5b-720p"], choices=list(harness.DESIGN_SHAPES),
                    help="docs/design.md §8 shapes whose launches are built (default wan5b-720p: the "
                         "strides and constexprs are those of every shape; the others add only int "
                         "specialisations)")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only rewrite the markdown beside a report JSON written earlier")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "wildactor_sm90"))
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            rep = json.load(f)
        with open(args.render.removesuffix(".json") + ".md", "w") as f:
            f.write(to_markdown(rep))
        return 0
    t0 = time.perf_counter()
    rep = collect(args.shapes, args.cache)
    ver = rep["triton"].split("+")[0]
    ver = ".".join(ver.split(".")[:2])
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"sm90_resources_triton{ver}")
    with open(base + ".json", "w") as f:
        json.dump(rep, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(to_markdown(rep))
    print(f"wrote {base}.md and .json in {time.perf_counter() - t0:.0f} s")
    bad = False
    if rep["not_reached"]:
        print("ERROR: kernels no public op launched (add them to workloads()):",
              ", ".join(rep["not_reached"]))
        bad = True
    if rep["build_errors"]:
        print("ERROR: builds that failed:\n  " + "\n  ".join(rep["build_errors"]))
        bad = True
    varying = _varying(rep["rows"])
    for r in rep["rows"]:
        if r.get("spills"):
            print(f"SPILL {r['kernel']} {r['config']} {_variant(r, varying)}: "
                  f"{r['spill_store_bytes']}/{r['spill_load_bytes']} B")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
