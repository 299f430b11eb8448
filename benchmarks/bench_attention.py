"""Microbenchmark: asymmetric attention (AIPA) with I-RoPE, ours against the usual peers.

On the docs/design.md §8 shapes, bf16 by default, forward and forward+backward of the joint op
(video queries over all keys, reference queries over reference keys), q/k rotated by I-RoPE
first. q, k, v are views into one fused ``[B, N, 3, H, D]`` projection, as in the model.

Implementations (all measured in the same run; a peer that fails is reported as failed):

- ``ours-fused``      Triton kernels rotating q and k inside the attention kernels;
- ``ours-prologue``   the rope kernels (``apply_rope(..., backend="triton")``) then the attention
                      kernels with ``ROTATE=False`` (``ROPE_MODE = "prologue"``);
- ``ours-norope``     the attention kernels on inputs rotated beforehand (kernel-only lower bound);
- ``sdpa-cudnn-2call``, ``sdpa-flash-2call``  Stand-In style: eager I-RoPE, one SDPA call for the
                      video queries over all keys, one for the references, ``torch.cat`` of the two
                      outputs; every step counted;
- ``flex-blockmask``  FlexAttention with a block mask (``q < Nv or kv >= Nv``), rope and attention
                      compiled together by Inductor;
- ``flash-attn-2call`` flash-attn's ``flash_attn_func`` twice plus eager rope (when installed);
- ``compile-ref``     ``torch.compile`` of the plain-PyTorch reference;
- ``ours-hopper``     the sm_90 forward (``attention/hopper.py``: TMA, warp specialisation) after
                      the rope-kernel prologue; its backward is the ``ours-*`` one;
- ``auto``            ``backend="auto"``: the dispatcher's pick (column ``picked`` in the JSON).

``--ops dispatch`` times every candidate of the ``auto`` dispatcher available here exactly as it
runs them (modes ``joint``, ``joint-train`` = forward+backward, ``cached``); ``--write-table
[PATH]`` (implies it) writes those times, summed over the shapes measured, into the dispatcher's
table (default: the package's ``attention/backend_table.json``, which ``auto`` reads; commit it).

8-bit rows (forward only, inference; docs/design.md §9), against the bf16 rows above:

- ``ours-fp8``        ``asym_attention(..., precision="fp8")`` on the Triton backend: rope pass,
                      K/V quantization, the int8-QK^T / e4m3-PV kernel (Q quantized inside);
- ``ours-fp8-kernel`` the 8-bit kernel alone on inputs rotated and K/V quantized beforehand
                      (Q is still quantized inside): what the prologue passes cost is the
                      difference to ``ours-fp8``;
- ``sage-2call``      SageAttention's ``sageattn`` twice (video, references) plus eager rope
                      (when installed);
- ``fa3-fp8-2call``   FlashAttention-3's FP8 forward twice plus eager rope and a per-(B, H)
                      e4m3 cast of q, k, v (when ``flash_attn_interface`` is installed).

Their rows also carry ``cos`` / ``rel_l2`` against SDPA's bf16 output and ``x_vs_cudnn``, the
speed-up over ``sdpa-cudnn-2call`` on the same shape. FLOP/s count the bf16 FLOPs
(TFLOP/s-equivalent). Cached mode adds ``ours-fp8`` (reference K/V quantized on every call)
and ``ours-fp8-cache`` (quantized once by ``quantize_ref_kv``: the per-step cost).

``--ops cached`` adds the inference path (video queries over ``[k_v; cached ref_k]``, forward
only): ours in both rope modes against eager rope + ``torch.cat`` + one cuDNN SDPA call.

Numbers: ``triton.testing.do_bench`` median with 20/80 % quantiles (at least ``--min-reps``
timed calls each); FLOPs ``4*B*H*D*(Nv*(Nv+Nr) + Nr*Nr)`` for the forward (rope not counted) and
3.5x that for forward+backward (flash-attn's convention: the backward does 2.5x the forward's
matmul work); % of ``--peak-tflops`` (default: the GPU's dense peak from the harness table, 989
TFLOP/s bf16 on H100 SXM and H200). ``max|err|`` is the
largest output difference from SDPA's default backend in the same dtype. Autotuning happens on
the first shape measured (keys: head dim, dtype, rope mode; never token counts).

Usage::

    python benchmarks/bench_attention.py                              # all shapes, fwd + fwd+bwd
    python benchmarks/bench_attention.py --shapes wan5b-720p --no-bwd
    python benchmarks/bench_attention.py --impls ours-fused ours-prologue sdpa-cudnn-2call
    python benchmarks/bench_attention.py --ops joint cached --write-table  # + the auto table

Results are appended to ``benchmarks/results/bench_attention.json`` (``--out``) and the run's
table written beside it as ``bench_attention_<gpu>.md`` (GPU name, versions, commit and date
included; the whole ``benchmarks.harness.env_record`` in the JSON; runs of one session under
``$WILDACTOR_RUN_ID`` share the table). Stopped by Ctrl-C / ``timeout -s INT``, it writes the
shapes measured so far and exits 130.
Without a CUDA device the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/bench_attention.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, ROOT)

import wildactor_kernels as wk  # noqa: E402
from benchmarks import harness  # noqa: E402
from wildactor_kernels.attention import dispatch  # noqa: E402
from wildactor_kernels.attention import kernels as K  # noqa: E402
from wildactor_kernels.attention.reference import asym_attention_ref  # noqa: E402
from wildactor_kernels.quant import AMAX_EPS, FP8_DTYPE, FP8_MAX  # noqa: E402
from wildactor_kernels.rope.reference import apply_rope_ref  # noqa: E402

SHAPES = harness.DESIGN_SHAPES  # docs/design.md §8
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
JOINT_IMPLS = ("ours-fused", "ours-prologue", "ours-norope", "sdpa-cudnn-2call", "sdpa-flash-2call",
               "flex-blockmask", "flash-attn-2call", "compile-ref", "ours-hopper", "auto", "ours-fp8",
               "ours-fp8-kernel", "sage-2call", "fa3-fp8-2call")
CACHED_IMPLS = ("ours-fused", "ours-prologue", "sdpa-cudnn-cat", "ours-hopper", "auto", "ours-fp8",
                "ours-fp8-cache")
#: 8-bit implementations: forward only, rows carry cos / rel_l2 / x_vs_cudnn
FP8_IMPLS = ("ours-fp8", "ours-fp8-kernel", "sage-2call", "fa3-fp8-2call", "ours-fp8-cache")


def _fwd_flops(b, h, d, nv, nr) -> float:
    return 4.0 * b * h * d * (nv * (nv + nr) + nr * nr)


# --------------------------------------------------------------------------- implementations
def _sdpa_2call(backend):
    """Stand-In style: eager rope, two SDPA calls, concatenation (the reference under a backend)."""
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, nv, cos, sin, scale):
        with sdpa_kernel(backend):
            return asym_attention_ref(q, k, v, nv, cos, sin, scale)
    return fn


def _flex(n, nv, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx < nv) | (kv_idx >= nv)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)

    def fn(q, k, v, nv_, cos, sin, scale):
        qr, kr = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
        o = flex_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2),
                           block_mask=block_mask, scale=scale)
        return o.transpose(1, 2)
    return torch.compile(fn, dynamic=False)


def _flash_attn_2call():
    from flash_attn import flash_attn_func  # ImportError -> reported as failed (not installed)

    def fn(q, k, v, nv, cos, sin, scale):
        qr, kr = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
        outs = []
        if nv:
            outs.append(flash_attn_func(qr[:, :nv], kr, v, softmax_scale=scale))
        if q.shape[1] > nv:
            outs.append(flash_attn_func(qr[:, nv:], kr[:, nv:], v[:, nv:], softmax_scale=scale))
        return torch.cat(outs, 1)
    return fn


def _sage_2call():
    from sageattention import sageattn  # ImportError -> reported as not installed

    def fn(q, k, v, nv, cos, sin, scale):
        qr, kr = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
        outs = []
        if nv:
            outs.append(sageattn(qr[:, :nv], kr, v, tensor_layout="NHD", is_causal=False, sm_scale=scale))
        if q.shape[1] > nv:
            outs.append(sageattn(qr[:, nv:], kr[:, nv:], v[:, nv:], tensor_layout="NHD",
                                 is_causal=False, sm_scale=scale))
        return torch.cat(outs, 1)
    return fn


def _fa3_fp8_2call():
    from flash_attn_interface import flash_attn_func  # FlashAttention-3 (hopper/) build

    def e4m3(x):  # per-(B, H) scale, the descale layout FA3 takes
        amax = x.abs().amax(dim=(1, 3)).float().clamp(min=AMAX_EPS)
        xs = (x.float() / (amax / FP8_MAX)[:, None, :, None]).to(FP8_DTYPE)
        return xs, (amax / FP8_MAX).contiguous()

    def call(q, k, v, scale):
        (q8, dq), (k8, dk), (v8, dv) = e4m3(q), e4m3(k), e4m3(v)
        o = flash_attn_func(q8, k8, v8, softmax_scale=scale, causal=False, q_descale=dq,
                            k_descale=dk, v_descale=dv)
        return (o[0] if isinstance(o, tuple) else o).to(q.dtype)

    def fn(q, k, v, nv, cos, sin, scale):
        qr, kr = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
        outs = []
        if nv:
            outs.append(call(qr[:, :nv], kr, v, scale))
        if q.shape[1] > nv:
            outs.append(call(qr[:, nv:], kr[:, nv:], v[:, nv:], scale))
        return torch.cat(outs, 1)
    return fn


def _fp8_metrics(row, out, ref):
    o, r = out.float().flatten(), ref.float().flatten()
    row["cos"] = torch.nn.functional.cosine_similarity(o, r, dim=0).item()
    row["rel_l2"] = ((o - r).norm() / r.norm()).item()


def _x_vs_cudnn(rows, cudnn_impl):
    base = {r["mode"]: r["ms"] for r in rows if r["impl"] == cudnn_impl and r["status"] == "ok"}
    for r in rows:
        if r["impl"] in FP8_IMPLS and r["status"] == "ok" and r["mode"] in base:
            r["x_vs_cudnn"] = base[r["mode"]] / r["ms"]
            print(f"#   {r['op']} {r['shape']} {r['impl']}: {r['x_vs_cudnn']:.2f}x {cudnn_impl}, "
                  f"cos {r.get('cos', float('nan')):.5f}, rel L2 {r.get('rel_l2', float('nan')):.4f}",
                  flush=True)
def _hopper():
    from wildactor_kernels.attention import hopper  # sm_90+ forward (docs/design.md §9)

    return hopper


def _auto_pick(q, mode, *others) -> str:
    """The candidate ``backend="auto"`` runs for these inputs (recorded in the row)."""
    return dispatch.pick_backend(q, mode, q, *others)


def _joint_impls(names, n, nv, device):
    from torch.nn.attention import SDPBackend

    makers = {
        "ours-fused": lambda: (lambda q, k, v, nv_, c, s, sc:
                               K.asym_attention_triton(q, k, v, nv_, c, s, sc, rope_mode="fused")),
        "ours-prologue": lambda: (lambda q, k, v, nv_, c, s, sc:
                                  K.asym_attention_triton(q, k, v, nv_, c, s, sc, rope_mode="prologue")),
        "ours-norope": lambda: (lambda q, k, v, nv_, c, s, sc:
                                K.asym_attention_triton(q, k, v, nv_, None, None, sc)),
        "sdpa-cudnn-2call": lambda: _sdpa_2call(SDPBackend.CUDNN_ATTENTION),
        "sdpa-flash-2call": lambda: _sdpa_2call(SDPBackend.FLASH_ATTENTION),
        "flex-blockmask": lambda: _flex(n, nv, device),
        "flash-attn-2call": _flash_attn_2call,
        "compile-ref": lambda: torch.compile(asym_attention_ref, dynamic=False),
        "ours-fp8": lambda: (lambda q, k, v, nv_, c, s, sc:
                             wk.asym_attention(q, k, v, nv_, c, s, sc, backend="triton",
                                               precision="fp8")),
        "ours-fp8-kernel": lambda: _fp8_kernel_only,
        "sage-2call": _sage_2call,
        "fa3-fp8-2call": _fa3_fp8_2call,
        "ours-hopper": lambda: _hopper().asym_attention_hopper_triton,
        "auto": lambda: (lambda q, k, v, nv_, c, s, sc: wk.asym_attention(q, k, v, nv_, c, s, sc)),
    }
    return {name: makers[name] for name in names}


_CACHE: dict = {}


def _fp8_kernel_only(q, k, v, nv, cos, sin, scale):
    """The 8-bit kernel on rotated q and K/V sets quantized once (outside the timed calls)."""
    from wildactor_kernels.attention import fp8_kernels as FK
    from wildactor_kernels.attention.fp8_reference import DEFAULT_BLOCK_N, key_mean

    key = ("joint", k.data_ptr(), v.data_ptr(), tuple(k.shape), nv)
    if key not in _CACHE:
        _CACHE.clear()
        mean = key_mean(k)
        _CACHE[key] = (FK.quantize_kv_triton(k[:, :nv], v[:, :nv], mean, DEFAULT_BLOCK_N),
                       FK.quantize_kv_triton(k[:, nv:], v[:, nv:], mean, DEFAULT_BLOCK_N))
    return FK.asym_attention_fp8_fwd(q, *_CACHE[key], nv, scale)


def _fp8_cached_step(q, k, v, rk, rv, cos, sin, scale):
    """One cached step with the reference K/V quantized once (outside the timed calls)."""
    key = (rk.data_ptr(), rv.data_ptr(), tuple(rk.shape))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = wk.attention.quantize_ref_kv(rk, rv)
    return wk.cached_asym_attention(q, k, v, _CACHE[key], None, cos, sin, scale, backend="triton",
                                    precision="fp8")


def _cached_impls(names):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_cat(q, k, v, rk, rv, cos, sin, scale):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return wk.cached_asym_attention(q, k, v, rk, rv, cos, sin, scale, backend="reference")

    makers = {
        "ours-fused": lambda: (lambda *a: K.cached_asym_attention_triton(*a, rope_mode="fused")),
        "ours-prologue": lambda: (lambda *a: K.cached_asym_attention_triton(*a, rope_mode="prologue")),
        "sdpa-cudnn-cat": lambda: sdpa_cat,
        "ours-fp8": lambda: (lambda q, k, v, rk, rv, cos, sin, scale: wk.cached_asym_attention(
            q, k, v, rk, rv, cos, sin, scale, backend="triton", precision="fp8")),
        "ours-fp8-cache": lambda: _fp8_cached_step,
        "ours-hopper": lambda: _hopper().cached_asym_attention_hopper_triton,
        "auto": lambda: (lambda *a: wk.cached_asym_attention(*a)),
    }
    return {name: makers[name] for name in names}


# --------------------------------------------------------------------------- measurement
def _measure(row, call, leaves, flops, args, peak, device):
    t = harness.bench(call, warmup=args.warmup, rep=args.rep, min_reps=args.min_reps, grad_to_none=leaves,
                      device=device)
    tflops = harness.tflops(flops, t["ms"])
    row.update(ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], flops=flops, tflops=tflops,
               pct_peak=100.0 * tflops / peak, status="ok")


def _status(e: Exception) -> str:
    return "not installed" if isinstance(e, ImportError) else "failed"


def _print_row(row):
    if row["status"] == "ok":
        err = row.get("max_abs_err")
        print(f"{row['op']:6s} {row['mode']:8s} {row['shape']:13s} {row['impl']:17s} {row['ms']:9.3f} "
              f"{row['ms_p20']:9.3f} {row['ms_p80']:9.3f} {row['tflops']:7.1f} {row['pct_peak']:6.1f} "
              f"{'-' if err is None else f'{err:.2e}':>9s}", flush=True)
    else:
        print(f"{row['op']:6s} {row['mode']:8s} {row['shape']:13s} {row['impl']:17s} "
              f"{row['status'].upper()}: {row['error'][:120]}", flush=True)


def run_joint(args, shape, device, dtype, peak, sink: list[dict] | None = None) -> list[dict]:
    spec = SHAPES[shape]
    layout = harness.design_layout(spec)
    b, h, d = spec["B"], spec["H"], spec["D"]
    nv, nr, n = layout.num_video, layout.num_ref, layout.num_tokens
    scale = 1.0 / math.sqrt(d)
    cos, sin = wk.rope_cos_sin(wk.irope_positions(layout).to(device), d)
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.unbind(2)
    with torch.no_grad():
        q_rot, k_rot = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
        ref = asym_attention_ref(q_rot, k_rot, v, nv, None, None, scale)  # SDPA default backend
    qkv_rot = torch.stack([q_rot, k_rot, v], 2).requires_grad_()
    do = torch.randn(b, n, h, d, device=device, dtype=dtype)
    flops = _fwd_flops(b, h, d, nv, nr)
    rows = []
    impl_names = [i for i in JOINT_IMPLS if args.impls is None or i in args.impls]
    for name, make in _joint_impls(impl_names, n, nv, device).items():
        leaf = qkv_rot if name in ("ours-norope", "ours-fp8-kernel") else qkv
        args_of = (lambda t: (*t.unbind(2), nv, cos, sin, scale))
        fn = None
        for mode in (["fwd"] if args.no_bwd or name in FP8_IMPLS else ["fwd", "fwd+bwd"]):
            row = dict(op="joint", mode=mode, shape=shape, impl=name, dtype=args.dtype, B=b, H=h, D=d,
                       Nv=nv, Nr=nr)
            if name == "auto":
                row["picked"] = _auto_pick(q, "joint" if mode == "fwd" else "joint-train", k, v)
            try:
                if fn is None:
                    fn = make()
                if mode == "fwd":
                    with torch.no_grad():
                        out = fn(*args_of(leaf))
                    row["max_abs_err"] = (out.float() - ref.float()).abs().max().item()
                    if name in FP8_IMPLS:
                        _fp8_metrics(row, out, ref)
                    del out

                    def call(fn=fn, leaf=leaf):
                        with torch.no_grad():
                            fn(*args_of(leaf))
                    _measure(row, call, [leaf], flops, args, peak, device)
                else:
                    def call(fn=fn, leaf=leaf):
                        fn(*args_of(leaf)).backward(do)
                    _measure(row, call, [leaf], 3.5 * flops, args, peak, device)
            except Exception as e:  # a failing peer is reported, never silently skipped
                row.update(status=_status(e), error=f"{type(e).__name__}: {e}"[:500])
            _print_row(row)
            rows.append(row)
            if sink is not None:  # the caller keeps it if the run is interrupted
                sink.append(row)
            torch.cuda.empty_cache()
    _x_vs_cudnn(rows, "sdpa-cudnn-2call")
    return rows


def run_cached(args, shape, device, dtype, peak, sink: list[dict] | None = None) -> list[dict]:
    spec = SHAPES[shape]
    layout = harness.design_layout(spec)
    b, h, d = spec["B"], spec["H"], spec["D"]
    nv, nr = layout.num_video, layout.num_ref
    scale = 1.0 / math.sqrt(d)
    cos, sin = wk.rope_cos_sin(wk.irope_positions(wk.TokenLayout(layout.video)).to(device), d)
    qkv = torch.randn(b, nv, 3, h, d, device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)
    rk = torch.randn(b, nr, h, d, device=device, dtype=dtype)
    rv = torch.randn(b, nr, h, d, device=device, dtype=dtype)
    with torch.no_grad():
        ref = wk.cached_asym_attention(q, k, v, rk, rv, cos, sin, scale, backend="reference")
    flops = 4.0 * b * h * d * nv * (nv + nr)
    rows = []
    impl_names = [i for i in CACHED_IMPLS if args.impls is None or i in args.impls]
    for name, make in _cached_impls(impl_names).items():
        row = dict(op="cached", mode="fwd", shape=shape, impl=name, dtype=args.dtype, B=b, H=h, D=d,
                   Nv=nv, Nr=nr)
        if name == "auto":
            row["picked"] = _auto_pick(q, "cached", k, v, rk, rv)
        try:
            fn = make()
            with torch.no_grad():
                out = fn(q, k, v, rk, rv, cos, sin, scale)
                row["max_abs_err"] = (out.float() - ref.float()).abs().max().item()
                if name in FP8_IMPLS:
                    _fp8_metrics(row, out, ref)
                del out

            def call(fn=fn):
                with torch.no_grad():
                    fn(q, k, v, rk, rv, cos, sin, scale)
            _measure(row, call, None, flops, args, peak, device)
        except Exception as e:
            row.update(status=_status(e), error=f"{type(e).__name__}: {e}"[:500])
        _print_row(row)
        rows.append(row)
        if sink is not None:
            sink.append(row)
        torch.cuda.empty_cache()
    _x_vs_cudnn(rows, "sdpa-cudnn-cat")
    return rows


def run_dispatch(args, shape, device, dtype, peak, sink: list[dict] | None = None) -> list[dict]:
    """Time every dispatcher candidate available here exactly as ``backend="auto"`` would run it
    (our rope prologue included; fused-QKV views): ``joint`` and ``cached`` forward,
    ``joint-train`` forward+backward. Rows ``op="dispatch"``, ``mode`` the dispatcher's mode,
    ``impl`` the candidate; ``--write-table`` turns them into the dispatcher's table."""
    spec = SHAPES[shape]
    layout = harness.design_layout(spec)
    b, h, d = spec["B"], spec["H"], spec["D"]
    nv, nr, n = layout.num_video, layout.num_ref, layout.num_tokens
    cos, sin = wk.rope_cos_sin(wk.irope_positions(layout).to(device), d)
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.unbind(2)
    rk = torch.randn(b, nr, h, d, device=device, dtype=dtype)
    rv = torch.randn(b, nr, h, d, device=device, dtype=dtype)
    do = torch.randn(b, n, h, d, device=device, dtype=dtype)
    flops = _fwd_flops(b, h, d, nv, nr)
    rows = []
    for mode in dispatch.MODES:
        if mode == "joint-train" and args.no_bwd:
            continue
        avail = dispatch.available_backends(q, k, v) if mode != "cached" else \
            dispatch.available_backends(q[:, :nv], k[:, :nv], v[:, :nv], rk, rv)
        for name in (c for c in dispatch.BACKEND_NAMES if avail[c] and c != "sdpa-math"):
            row = dict(op="dispatch", mode=mode, shape=shape, impl=name, dtype=args.dtype, B=b, H=h,
                       D=d, Nv=nv, Nr=nr)
            try:
                if mode == "cached":
                    qv, kv, vv = q[:, :nv].detach(), k[:, :nv].detach(), v[:, :nv].detach()

                    def call(name=name):
                        with torch.no_grad():
                            dispatch.run_cached_backend(name, qv, kv, vv, rk, rv, cos[:nv], sin[:nv])
                    _measure(row, call, None, 4.0 * b * h * d * nv * (nv + nr), args, peak, device)
                elif mode == "joint":
                    def call(name=name):
                        with torch.no_grad():
                            dispatch.run_backend(name, q, k, v, nv, cos, sin)
                    _measure(row, call, [qkv], flops, args, peak, device)
                else:
                    def call(name=name):
                        dispatch.run_backend(name, *qkv.unbind(2), nv, cos, sin).backward(do)
                    _measure(row, call, [qkv], 3.5 * flops, args, peak, device)
            except Exception as e:  # a candidate that fails here is left out of the table
                row.update(status=_status(e), error=f"{type(e).__name__}: {e}"[:500])
            _print_row(row)
            rows.append(row)
            if sink is not None:  # the caller keeps it if the run is interrupted
                sink.append(row)
            torch.cuda.empty_cache()
    return rows


def table_entries(rows: list[dict], env: dict) -> list[dict]:
    """Dispatcher table entries from ``run_dispatch`` rows: per (GPU, dtype, head_dim, mode) the
    candidates' milliseconds summed over the shapes measured (a candidate that failed on one of
    them is left out), with the shapes, the script, the date and the versions."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r.get("op") != "dispatch":
            continue
        g = groups.setdefault((r["dtype"], r["D"], r["mode"]), {"times": {}, "failed": set(), "shapes": []})
        if r["shape"] not in g["shapes"]:
            g["shapes"].append(r["shape"])
        if r["status"] == "ok":
            g["times"][r["impl"]] = g["times"].get(r["impl"], 0.0) + r["ms"]
        else:
            g["failed"].add(r["impl"])
    out = []
    for (dtype, d, mode), g in sorted(groups.items()):
        times = {b: round(t, 4) for b, t in g["times"].items() if b not in g["failed"]}
        out.append(dict(device=env["gpu"], dtype=dtype, head_dim=d, mode=mode, times_ms=times,
                        shape="+".join(g["shapes"]), source="benchmarks/bench_attention.py",
                        date=env.get("date_utc"), torch=env.get("torch"), triton=env.get("triton")))
    return out


# --------------------------------------------------------------------------- output
def _session_rows(path: str) -> list[dict]:
    """The rows of the last run in ``path`` and of the runs before it in the same session
    (``harness.session_runs``: one ``$WILDACTOR_RUN_ID``), oldest first."""
    with open(path, encoding="utf-8") as fh:
        runs = json.load(fh)
    return [r for run in harness.session_runs(runs) for r in run.get("results", [])]


def _e(v) -> str:
    return "-" if v is None else f"{float(v):.2e}"  # JSON keeps a non-finite error as a string


def _markdown(run: dict, rows: list[dict] | None = None) -> str:
    """The table of ``rows`` (default: the run's own) under ``run``'s provenance line."""
    lines = [
        "# bench_attention",
        "",
        f"{run['gpu']} | torch {run['torch']} | triton {run['triton']} | commit {run['commit']} | "
        f"{run['date']} | {run['dtype']} | peak {run['peak_tflops']:.0f} TFLOP/s | "
        f"ROPE_MODE default {run['rope_mode_default']!r}",
        "",
        "Median ms with 20/80 % quantiles (triton.testing.do_bench). FLOPs: 4·B·H·D·(Nv·(Nv+Nr)+Nr²) "
        "forward, 3.5x for forward+backward; rope not counted. max|err|: output vs SDPA's default "
        "backend in the same dtype.",
        "",
        "| op | mode | shape | impl | ms | p20 | p80 | TFLOP/s | % peak | max abs err | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in run["results"] if rows is None else rows:
        if r["status"] == "ok":
            lines.append(f"| {r['op']} | {r['mode']} | {r['shape']} | {r['impl']} | {r['ms']:.3f} | "
                         f"{r['ms_p20']:.3f} | {r['ms_p80']:.3f} | {r['tflops']:.1f} | "
                         f"{r['pct_peak']:.1f} | {_e(r.get('max_abs_err'))} | ok |")
        else:
            msg = r["error"].replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {r['op']} | {r['mode']} | {r['shape']} | {r['impl']} | | | | | | | "
                         f"{r['status']}: {msg} |")
    return "\n".join(lines) + "\n"


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--ops", nargs="+", default=["joint", "cached"], choices=["joint", "cached", "dispatch"],
                    help="dispatch: time the auto dispatcher's candidates (implied by --write-table)")
    ap.add_argument("--impls", nargs="+", default=None,
                    choices=sorted(set(JOINT_IMPLS) | set(CACHED_IMPLS)),
                    help="subset of implementations (default: all)")
    ap.add_argument("--no-bwd", action="store_true", help="forward only")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--warmup", type=float, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=float, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--min-reps", type=int, default=5, help="at least this many timed calls")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense peak for the %% column (default: the GPU's datasheet figure for the "
                         "dtype; 989, H100 SXM bf16, for a GPU missing from the table)")
    ap.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, "bench_attention.json"),
                    help="JSON file to append this run to (a folder: bench_attention.json in it)")
    ap.add_argument("--write-table", nargs="?", const=dispatch.TABLE_PATH, default=None, metavar="PATH",
                    help="write the dispatcher candidates' times into the backend table (default: "
                         "the package's backend_table.json, which backend='auto' reads)")
    args = ap.parse_args(argv)
    if args.write_table and "dispatch" not in args.ops:
        args.ops.append("dispatch")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    device = harness.cuda_device_or_explain("bench_attention")
    if device is None:
        return 0
    dtype = DTYPES[args.dtype]
    env = harness.env_record(device)
    peak = args.peak_tflops or (harness.device_peaks(env["gpu"]) or {}).get(args.dtype, 989.0)
    t_start = time.perf_counter()
    print(f"# {harness.env_summary(env)} | {args.dtype} | peak {peak:.0f} TFLOP/s", flush=True)
    print(f"{'op':6s} {'mode':8s} {'shape':13s} {'impl':17s} {'ms':>9s} {'p20':>9s} {'p80':>9s} "
          f"{'TFLOP/s':>7s} {'%peak':>6s} {'max|err|':>9s}", flush=True)
    rows, partial = [], {}
    with harness.keep_partial(partial):
        for shape in args.shapes:
            # rows land in `rows` one by one: an interruption keeps those measured before it
            if "joint" in args.ops:
                run_joint(args, shape, device, dtype, peak, rows)
            if "cached" in args.ops:
                run_cached(args, shape, device, dtype, peak, rows)
            if "dispatch" in args.ops:
                run_dispatch(args, shape, device, dtype, peak, rows)
    print(f"# total {time.perf_counter() - t_start:.0f} s", flush=True)
    run = harness.script_run("bench_attention", env, dtype=args.dtype, peak_tflops=peak,
                             rope_mode_default=K.ROPE_MODE, warmup_ms=args.warmup, rep_ms=args.rep,
                             min_reps=args.min_reps, **partial, results=rows)
    out_json = harness.resolve_out(args.out, "bench_attention.json", bare_in_results=False)
    out_md = os.path.join(os.path.dirname(os.path.abspath(out_json)),
                          f"bench_attention_{harness.file_slug(env['gpu'] or 'cpu')}.md")
    harness.append_json_run(out_json, run)
    if args.write_table:
        entries = table_entries(rows, env)
        dispatch.write_table_entries(entries, args.write_table)
        print(f"# wrote {len(entries)} dispatcher entries to {args.write_table}")
    harness.write_text(out_md, _markdown(run, _session_rows(out_json)))
    print(f"# appended {len(rows)} rows to {out_json}; table in {out_md}")
    return 130 if partial else 0


if __name__ == "__main__":
    sys.exit(main())
