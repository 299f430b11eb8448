"""``backend="auto"`` on CUDA: the fastest measured implementation of asymmetric attention.

docs/design.md §9. The candidates ("attention backends"):

``triton``          our kernels (``kernels.py``), rotation as ``rope_mode`` says;
``triton-hopper``   our sm_90 forward (``hopper.py``; D 64/128, TMA-compatible layouts);
``sdpa-cudnn``      two PyTorch SDPA calls under the cuDNN backend on strided views of q/k/v:
                    video queries over all keys, reference queries over the reference keys (no
                    concatenation of the inputs; the two outputs are joined);
``sdpa-flash``      the same two calls under SDPA's flash backend;
``sdpa-math``       the same under SDPA's math backend (runs anywhere; a correctness peer);
``fa3`` / ``fa2``   FlashAttention-3 (``flash_attn_interface``) / -2 (``flash_attn``), two calls,
                    when installed.

In every case q and k are rotated by our rope kernels first (the I-RoPE prologue stays ours;
the q/k RMSNorm before it is the model's ``qk_norm_rope``). Cached mode: our kernels read the
two key ranges ``[k_v; ref_k]`` in place; a peer has no two-range form, so it gets
``torch.cat`` of the keys and values (``attention_backends()`` says so per candidate).

The choice comes from a committed table, ``backend_table.json`` beside this file (written by
``benchmarks/bench_attention.py --write-table``): per (GPU name, dtype, head_dim, mode) the
measured milliseconds of each candidate; ``auto`` takes the fastest one available here. Where
nothing is measured it uses our kernel (``triton-hopper`` when that runs, else ``triton``) and
says so once through the ``wildactor_kernels`` logger. Modes: ``joint`` (forward),
``joint-train`` (forward + backward: inputs need gradients) and ``cached``.
``backend="triton"`` never comes here: it always means ``kernels.py``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os

import torch

from .._utils import HOPPER_HEAD_DIMS, interpreter_active, triton_available, warn_once

__all__ = ["BACKEND_NAMES", "MODES", "TABLE_PATH", "attention_backends", "available_backends",
           "choose", "load_table", "pick_backend", "run_backend", "write_table_entries"]

BACKEND_NAMES = ("triton", "triton-hopper", "sdpa-cudnn", "sdpa-flash", "sdpa-math", "fa3", "fa2")
MODES = ("joint", "joint-train", "cached")
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_table.json")
#: Where the table has no time for a case on an sm_90+ GPU, ``auto`` runs the Hopper kernel
#: when True (the issue's intent), ``kernels.py`` when False.
UNMEASURED_PREFERS_HOPPER = True
#: Candidates that concatenate the keys/values in cached mode (no two-range form).
CONCAT_IN_CACHED = ("sdpa-cudnn", "sdpa-flash", "sdpa-math", "fa3", "fa2")

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: Candidates that take only these (the Hopper kernel, SDPA's flash backend, FA2/FA3).
_HALF_DTYPES = ("fp16", "bf16")


# =========================================================================== the table
@functools.lru_cache(maxsize=4)
def load_table(path: str = TABLE_PATH) -> dict:
    """The measured table: ``{"version": 1, "entries": [{"device", "dtype", "head_dim", "mode",
    "times_ms": {backend: ms}, ...provenance}]}``; an empty table when the file is missing."""
    if not os.path.exists(path):
        return {"version": 1, "entries": []}
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise ValueError(f"{path}: expected {{'version': 1, 'entries': [...]}}")
    return table


def _find_entry(table: dict, device: str, dtype: str, head_dim: int, mode: str) -> dict | None:
    for e in table.get("entries", []):
        key = (e.get("device"), e.get("dtype"), e.get("head_dim"), e.get("mode"))
        if key == (device, dtype, head_dim, mode):
            return e
    return None


def choose(device: str, dtype: str, head_dim: int, mode: str, available: dict[str, bool],
           table: dict, default: str = "triton") -> tuple[str, str]:
    """Pure decision: the fastest measured candidate that is available, as ``(backend, source)``.
    ``source`` names the measurement (``"measured: ..."``) or says ``"unmeasured: ..."`` when
    the table has no time for an available candidate of this case (then ``default``)."""
    entry = _find_entry(table, device, dtype, head_dim, mode)
    times = {} if entry is None else entry.get("times_ms", {})
    usable = {b: float(t) for b, t in times.items()
              if available.get(b) and t is not None and math.isfinite(float(t))}
    if not usable:
        why = "no entry" if entry is None else "no available candidate timed"
        return default, f"unmeasured: {why} for ({device}, {dtype}, D={head_dim}, {mode}) in the table"
    best = min(usable, key=usable.get)
    what = ", ".join(f"{b} {t:.3f} ms" for b, t in sorted(usable.items(), key=lambda x: x[1]))
    prov = " ".join(str(entry[k]) for k in ("shape", "source", "date") if entry.get(k))
    return best, f"measured: {what}" + (f" ({prov})" if prov else "")


def write_table_entries(rows: list[dict], path: str = TABLE_PATH) -> None:
    """Merge measured rows (same keys as the table's entries) into ``path``: a row replaces the
    entry of its (device, dtype, head_dim, mode)."""
    table = json.loads(json.dumps(load_table(path)))  # a copy of the cached dict
    for row in rows:
        old = _find_entry(table, row["device"], row["dtype"], row["head_dim"], row["mode"])
        if old is not None:
            table["entries"].remove(old)
        table["entries"].append(row)
    table["entries"].sort(key=lambda e: (e["device"], e["dtype"], e["head_dim"], e["mode"]))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    load_table.cache_clear()


# =========================================================================== availability
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@functools.cache
def _static_available(is_cuda: bool, capability_major: int) -> tuple[tuple[str, bool], ...]:
    """What can run on this kind of device (inputs aside)."""
    trit = triton_available() and (is_cuda or interpreter_active())
    avail = {
        "triton": trit,
        "triton-hopper": trit and (capability_major >= 9 or (not is_cuda and interpreter_active())),
        "sdpa-cudnn": is_cuda and torch.backends.cuda.cudnn_sdp_enabled(),
        "sdpa-flash": is_cuda and torch.backends.cuda.flash_sdp_enabled(),
        "sdpa-math": True,
        "fa3": is_cuda and capability_major >= 9 and _has_module("flash_attn_interface"),
        "fa2": is_cuda and capability_major >= 8 and _has_module("flash_attn"),
    }
    return tuple(avail.items())


def _filter(avail: dict[str, bool], dtype: str, head_dim: int, hopper_layout_ok: bool) -> dict[str, bool]:
    # HOPPER_HEAD_DIMS lives in _utils so that deciding never imports Triton (hopper.py does)
    avail = dict(avail)
    avail["triton-hopper"] = (avail["triton-hopper"] and hopper_layout_ok
                              and head_dim in HOPPER_HEAD_DIMS and dtype in _HALF_DTYPES)
    for name in ("sdpa-flash", "fa3", "fa2"):  # half precision only
        avail[name] = avail[name] and dtype in _HALF_DTYPES
    return avail


def available_backends(q: torch.Tensor, *others: torch.Tensor) -> dict[str, bool]:
    """Candidates that can run on these inputs (device, dtype, head_dim, layout)."""
    cap = torch.cuda.get_device_capability(q.device)[0] if q.is_cuda else 0
    return _filter(dict(_static_available(q.is_cuda, cap)), _DTYPE_NAMES.get(q.dtype, str(q.dtype)),
                   q.shape[-1], _hopper_layout_ok(q, *others))


def _hopper_layout_ok(*tensors: torch.Tensor) -> bool:
    if not triton_available():
        return False
    from .hopper import hopper_layout_reason

    return hopper_layout_reason(*tensors) is None


# =========================================================================== picking
def _mode(cached: bool, *tensors: torch.Tensor) -> str:
    if cached:
        return "cached"
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return "joint-train" if train else "joint"


@torch.compiler.assume_constant_result
def _pick(device_index: int, dtype: str, head_dim: int, mode: str, hopper_layout_ok: bool) -> str:
    """The decision for one case on one CUDA device (a constant for torch.compile: no graph
    break, no guard on the table)."""
    cap = torch.cuda.get_device_capability(device_index)[0]
    avail = _filter(dict(_static_available(True, cap)), dtype, head_dim, hopper_layout_ok)
    default = "triton-hopper" if avail["triton-hopper"] and UNMEASURED_PREFERS_HOPPER else "triton"
    device = torch.cuda.get_device_name(device_index)
    choice, source = choose(device, dtype, head_dim, mode, avail, load_table(), default)
    if source.startswith("unmeasured"):
        warn_once("attention auto backend: %s; using our kernel %r", source, choice,
                  key=("attention-auto", device, dtype, head_dim, mode))
    return choice


def pick_backend(q: torch.Tensor, mode: str, *others: torch.Tensor) -> str:
    """What ``backend="auto"`` runs for these inputs: ``"reference"`` off CUDA, else a name
    from :data:`BACKEND_NAMES` (see :func:`choose`). Logs once per case when unmeasured."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not q.is_cuda or not triton_available():
        return "reference"
    return _pick(q.device.index, _DTYPE_NAMES.get(q.dtype, str(q.dtype)), q.shape[-1], mode,
                 _hopper_layout_ok(q, *others))


# =========================================================================== the candidates
def _rotate(x, cos, sin):
    if cos is None:
        return x
    from ..rope.op import apply_rope

    return apply_rope(x, cos, sin, backend="triton" if (x.is_cuda or interpreter_active()) else "reference")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-math": SDPBackend.MATH}[name]


def _sdpa(name: str, q, k, v, scale):
    """One SDPA call on ``[B, N, H, D]`` views (transposed to SDPA's ``[B, H, N, D]``, no copy)."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_sdpa_backend(name)]):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


def _fa(name: str, q, k, v, scale):
    if name == "fa3":
        from flash_attn_interface import flash_attn_func
    else:
        from flash_attn import flash_attn_func
    o = flash_attn_func(q, k, v, softmax_scale=scale)
    return o[0] if isinstance(o, tuple) else o


def _peer(name: str):
    return functools.partial(_sdpa if name.startswith("sdpa") else _fa, name)


def run_backend(name: str, q, k, v, num_video: int, cos=None, sin=None, scale=None, *,
                rope_mode: str | None = None) -> torch.Tensor:
    """Joint asymmetric attention on one named candidate (inputs checked by ``op.py``).
    ``[B, N, H, D]`` in, contiguous ``[B, N, H, D]`` in the dtype of q out."""
    if name == "triton":
        from .kernels import asym_attention_triton

        return asym_attention_triton(q, k, v, num_video, cos, sin, scale, rope_mode=rope_mode)
    if name == "triton-hopper":
        from .hopper import asym_attention_hopper_triton

        return asym_attention_hopper_triton(q, k, v, num_video, cos, sin, scale)
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {name!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    attend = _peer(name)
    parts = []
    if num_video:  # video queries over all keys
        parts.append(attend(q[:, :num_video], k, v, scale))
    if num_video < q.shape[1]:  # reference queries over the reference keys
        parts.append(attend(q[:, num_video:], k[:, num_video:], v[:, num_video:], scale))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0].contiguous()


def run_cached_backend(name: str, q_v, k_v, v_v, ref_k, ref_v, cos=None, sin=None, scale=None, *,
                       rope_mode: str | None = None) -> torch.Tensor:
    """Cached attention on one named candidate; peers concatenate ``[k_v; ref_k]`` (see
    :data:`CONCAT_IN_CACHED`), our kernels read the two ranges in place."""
    if name == "triton":
        from .kernels import cached_asym_attention_triton

        return cached_asym_attention_triton(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale,
                                            rope_mode=rope_mode)
    if name == "triton-hopper":
        from .hopper import cached_asym_attention_hopper_triton

        return cached_asym_attention_hopper_triton(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale)
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {name!r}")
    scale = 1.0 / math.sqrt(q_v.shape[-1]) if scale is None else float(scale)
    q_v, k_v = _rotate(q_v, cos, sin), _rotate(k_v, cos, sin)
    k = torch.cat([k_v, ref_k.to(q_v.dtype)], 1)
    v = torch.cat([v_v, ref_v.to(q_v.dtype)], 1)
    return _peer(name)(q_v, k, v, scale).contiguous()


def asym_attention_auto(q, k, v, num_video, cos=None, sin=None, scale=None, rope_mode=None):
    """``backend="auto"`` for CUDA inputs: the picked candidate (see :func:`pick_backend`)."""
    name = pick_backend(q, _mode(False, q, k, v), q, k, v)
    return run_backend(name, q, k, v, num_video, cos, sin, scale, rope_mode=rope_mode)


def cached_asym_attention_auto(q_v, k_v, v_v, ref_k, ref_v, cos=None, sin=None, scale=None,
                               rope_mode=None):
    name = pick_backend(q_v, "cached", q_v, k_v, v_v, ref_k, ref_v)
    return run_cached_backend(name, q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale,
                              rope_mode=rope_mode)


# =========================================================================== report
def attention_backends(device: torch.device | str | None = None, head_dims=(64, 128),
                       table: dict | None = None) -> dict:
    """What ``backend="auto"`` can use on this machine and what it picks.

    Returns ``{"device", "table", "available": {name: bool}, "notes": {name: str},
    "picks": [{"dtype", "head_dim", "mode", "backend", "source"}]}``; on a machine without
    CUDA ``auto`` runs the reference and ``picks`` say so. ``head_dims`` are reported in
    addition to those the table measures.
    """
    table = load_table() if table is None else table
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if is_cuda else "cpu"
    cap = torch.cuda.get_device_capability(device)[0] if is_cuda else 0
    avail = dict(_static_available(is_cuda, cap))
    notes = {b: "cached mode concatenates [k_v; ref_k] and [v_v; ref_v]" for b in CONCAT_IN_CACHED}
    notes["triton"] = notes["triton-hopper"] = "cached mode reads the two key ranges in place"
    notes["triton-hopper"] += "; head_dim 64 or 128 and TMA-compatible layouts (else triton)"
    measured = {e["head_dim"] for e in table.get("entries", []) if e.get("device") == name}
    dims = sorted(set(head_dims) | measured)
    picks = []
    for dtype in ("bf16", "fp16", "fp32"):
        for d in dims:
            for mode in MODES:
                if not is_cuda or not triton_available():
                    picks.append(dict(dtype=dtype, head_dim=d, mode=mode, backend="reference",
                                      source="no CUDA device: auto runs the reference"))
                    continue
                av = _filter(avail, dtype, d, True)
                default = "triton-hopper" if av["triton-hopper"] and UNMEASURED_PREFERS_HOPPER else "triton"
                b, src = choose(name, dtype, d, mode, av, table, default)
                picks.append(dict(dtype=dtype, head_dim=d, mode=mode, backend=b, source=src))
    return {"device": name, "table": TABLE_PATH, "available": avail, "notes": notes, "picks": picks}
