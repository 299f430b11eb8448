"""Shared helpers: backend selection, input validation, Triton availability.

Every public op takes ``backend="auto" | "triton" | "reference"``:

- ``"reference"`` runs the plain-PyTorch spec (``<op>/reference.py``);
- ``"triton"`` runs the Triton kernels (on CPU only under ``TRITON_INTERPRET=1``);
- ``"auto"`` picks Triton when the inputs live on CUDA and Triton imports, else the reference.

A request for Triton that cannot be honoured raises; it never silently falls back.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
from collections.abc import Callable, Iterable, Sequence

import torch

logger = logging.getLogger("wildactor_kernels")

_warned_once: set = set()


def warn_once(msg: str, *args, key: object = None) -> None:
    """Log ``msg % args`` on the package logger at WARNING, once per process for each ``key``
    (default: the formatted message). Every fallback and unmeasured pick warns through here, so a
    long run states each one once instead of every step."""
    text = msg % args if args else msg
    key = text if key is None else key
    if key not in _warned_once:
        _warned_once.add(key)
        logger.warning(text)

BACKENDS = ("auto", "triton", "reference")

#: Where the Triton attention applies cos/sin when given: ``"fused"`` inside the attention
#: kernels, ``"prologue"`` in a separate rotation pass first (see ``attention/kernels.py``).
ROPE_MODES = ("fused", "prologue")

#: Input dtypes of every Triton kernel that computes in floating point (maths in fp32).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Head dims with a tuned Hopper attention kernel (``attention/hopper.py``). Here rather than
#: there so that the backend dispatcher decides without importing Triton.
HOPPER_HEAD_DIMS = (64, 128)

#: ``log2(e)``: the attention kernels run their softmax in base 2 (``exp2``), with this factor
#: folded into the softmax scale.
LOG2E = 1.4426950408889634


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def _interpreter_compat() -> None:
    """Make Triton 3.6's CPU interpreter work with NumPy >= 2.4 (a no-op elsewhere).

    The interpreter holds a scalar as a one-element array and converts it with ``int(array)``
    when a loop bound is a runtime value (``for start in range(0, n, BLOCK)``); NumPy 2.4 refuses
    that for arrays of ndim > 0. Newer Triton squeezes the array first, and so does this patch of
    the 3.6 hook, applied only when the installed interpreter still has the old conversion and
    NumPy refuses it."""
    import inspect

    import numpy as np

    try:
        int(np.ones(1))
        return  # this NumPy still converts one-element arrays
    except TypeError:
        pass
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - a Triton without the interpreter module
        return
    hook = getattr(interpreter, "_patch_lang_tensor", None)
    if hook is None or getattr(hook, "_wildactor_compat", False):
        return
    try:
        old = "int(self.handle.data))" in inspect.getsource(hook)
    except (OSError, TypeError):  # pragma: no cover - no source to read
        return
    if not old:
        return

    def patched(tensor, scope):
        hook(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._wildactor_compat = True
    interpreter._patch_lang_tensor = patched
    logger.debug("Triton interpreter: one-element scalars converted with squeeze() (Triton 3.6 with "
                 "NumPy >= 2.4)")


# Computed once at import: a plain constant is free to read under torch.compile (dynamo warns on
# ``functools.lru_cache``-wrapped functions and would guard on the cache).
_TRITON_AVAILABLE: bool = _import_triton()
if _TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpreter_compat()


def triton_available() -> bool:
    """True when ``triton`` and ``triton.language`` import (checked once, at import time)."""
    return _TRITON_AVAILABLE


def interpreter_active() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """Map ``backend`` to ``"triton"`` or ``"reference"`` for the given inputs.

    Raises ValueError for an unknown name and RuntimeError when Triton is requested but cannot
    run on these tensors (not CUDA and no interpreter, or Triton missing).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if (on_cuda and triton_available()) else "reference"
    # backend == "triton"
    if not triton_available():
        raise RuntimeError("backend='triton' was requested but triton does not import")
    if not on_cuda and not interpreter_active():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing wildactor_kernels, or use backend='auto'/'reference'"
        )
    return "triton"


def tf32_allowed() -> bool:
    """Whether the user allowed TF32 for fp32 CUDA matmuls (the kernels then use TF32 dots).

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" | "tf32" | "none");
    reading the legacy ``allow_tf32`` after the new API was used raises, so the new setting is
    read first and the legacy flag only when the new one is unset.
    """
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", None)
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    try:
        return bool(m.allow_tf32)
    except RuntimeError:  # a mix of the two APIs: the new one said nothing specific
        return False


# --------------------------------------------------------------------------- validation
def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    floating: bool = False,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    if not named:
        return
    dev = named[0][1].device
    for k, v in named[1:]:
        if v.device != dev:
            raise ValueError(
                f"all inputs must be on one device: {named[0][0]} is on {dev} but {k} is on {v.device}"
            )


def check_head_dim(name: str, d: int) -> None:
    if d < 8 or d % 2:
        raise ValueError(f"{name}: head_dim must be even and >= 8, got {d}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_qkv(names: tuple[str, str, str], q, k, v) -> None:
    """q, k, v of an attention op: 4-D float tensors of one shape ``[B, N, H, D]`` and one dtype,
    with an even head dim >= 8; errors name the arguments (``names``)."""
    for name, t in zip(names, (q, k, v)):
        check_tensor(name, t, ndim=4, floating=True)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{names[0]}, {names[1]}, {names[2]} must share one shape [B, N, H, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{names[0]}, {names[1]}, {names[2]} must share one dtype; got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    check_head_dim(names[0], q.shape[-1])


def check_ref_kv(ref_k, ref_v, q_shape: Sequence[int]) -> None:
    """The cached reference K/V of a cached attention op: 4-D float tensors of one shape
    ``[B, Nr, H, D]`` whose B, H and D are those of the video queries (shape ``q_shape``)."""
    check_tensor("ref_k", ref_k, ndim=4, floating=True)
    check_tensor("ref_v", ref_v, ndim=4, floating=True)
    b, _, h, d = q_shape
    if ref_k.shape != ref_v.shape:
        raise ValueError(f"ref_k and ref_v must share one shape, got {tuple(ref_k.shape)} and "
                         f"{tuple(ref_v.shape)}")
    if ref_k.shape[0] != b or ref_k.shape[2:] != (h, d):
        raise ValueError(f"ref_k must have shape [B, Nr, H, D] = [{b}, Nr, {h}, {d}], got "
                         f"{tuple(ref_k.shape)}")


def autocast_active(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (False for types autocast does not know,
    such as ``meta``, where ``torch.is_autocast_enabled`` raises)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def check_num_video(num_video: object, n: int) -> int:
    if isinstance(num_video, torch.Tensor):
        raise TypeError("num_video must be a Python int, not a tensor")
    if isinstance(num_video, bool) or type(num_video).__name__ == "bool_":
        raise TypeError(f"num_video must be an int, got bool {num_video!r}")
    try:  # a Python or NumPy integer; a float is never truncated
        num_video = int(operator.index(num_video))
    except TypeError:
        raise TypeError(f"num_video must be an int, got {type(num_video).__name__}") from None
    if not 0 <= num_video <= n:
        raise ValueError(f"num_video must lie in [0, N] = [0, {n}], got {num_video}")
    return num_video


def check_rope_tables(cos: torch.Tensor | None, sin: torch.Tensor | None, n: int, d: int,
                      what: str = "cos/sin") -> None:
    if (cos is None) != (sin is None):
        raise ValueError(f"{what}: give both cos and sin, or neither")
    if cos is None:
        return
    check_tensor("cos", cos, ndim=2, floating=True)
    check_tensor("sin", sin, ndim=2, floating=True)
    if tuple(cos.shape) != (n, d // 2) or tuple(sin.shape) != (n, d // 2):
        raise ValueError(
            f"{what} must have shape [N, D//2] = [{n}, {d // 2}], got cos {tuple(cos.shape)} and "
            f"sin {tuple(sin.shape)}"
        )
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        # one rule on both backends: the Triton kernels take no gradient for the tables, so
        # the reference must not give one either (it would differ silently)
        raise ValueError(f"{what}: cos and sin must not require grad: the rotary tables are constants "
                         f"on every backend (no gradient flows to them); pass cos.detach(), sin.detach()")


# --------------------------------------------------------------------------- kernel plumbing
def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """``(DOT_F32, DOT_PREC)`` for kernels whose inputs have ``dtype``.

    ``DOT_F32``: the interpreter multiplies bf16 ``tl.dot`` operands as raw bits
    (triton-lang/triton#11584), so under it bf16 tiles are upcast to fp32 before every dot.
    ``DOT_PREC``: fp32 inputs use IEEE dots unless torch allows TF32 matmuls (``"tf32"``); for
    16-bit inputs the precision has no effect.
    """
    dot_f32 = interpreter_active() and dtype == torch.bfloat16
    prec = "tf32" if (dtype == torch.float32 and tf32_allowed()) else "ieee"
    return dot_f32, prec


def autotune_configs(gpu: Sequence, interpreted) -> list:
    """The one way of autotuning under the interpreter: the GPU candidates when compiled, the
    single ``interpreted`` config under ``TRITON_INTERPRET=1`` (autotuning there would only run
    every candidate in Python). With one config Triton's autotuner neither prunes nor benchmarks.
    ``interpreted`` may also be a list when a constexpr in the config selects a code path that
    the CPU tests must reach; the kernel's prune then keeps one of them per call."""
    if not interpreter_active():
        return list(gpu)
    return list(interpreted) if isinstance(interpreted, (list, tuple)) else [interpreted]


def _no_timing(kernel_call, quantiles=None, **kwargs) -> list[float]:
    return [0.0, 0.0, 0.0] if quantiles is not None else 0.0


def autotune_bench() -> Callable | None:
    """The ``do_bench`` of every ``triton.autotune`` here: None (Triton's own timing) when
    compiled. Under the interpreter each kernel's prune leaves one config, so there is nothing to
    time; Triton 3.9 then skips the timing, Triton 3.6 would still time that one config through a
    GPU driver the CPU does not have. This no-op timing makes both versions just run it."""
    return _no_timing if interpreter_active() else None


def register_fake(op, fake: Callable) -> None:
    """Register ``fake`` as the fake (FakeTensor/torch.compile) and the meta kernel of the
    custom op ``op``: shapes only, meta tensors never reach a launcher."""
    op.register_fake(fake)
    op.register_kernel("meta", fake)


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit-stride last dim (a copy only when it has another stride): the kernels
    address the reduced/head dim as one contiguous vector (vectorised loads), and a strided last
    dim is rare, so it costs a copy rather than a code path. The other strides go to the kernel."""
    return t if t.stride(-1) == 1 else t.contiguous()


def device_guard(what: str, **tensors: torch.Tensor | None):
    """Checks that every given tensor lives on one device (a ValueError naming the two that
    differ) and returns the context a launcher runs its kernels in: ``torch.cuda.device`` of
    that device for CUDA tensors (the current device may be another GPU), nothing on CPU."""
    named = [(k, v) for k, v in tensors.items() if v is not None]
    if not named:
        return contextlib.nullcontext()
    dev = named[0][1].device
    for k, v in named[1:]:
        if v.device != dev:
            raise ValueError(f"{what}: all tensors must be on one device: {named[0][0]} is on {dev} "
                             f"but {k} is on {v.device}")
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def check_dtypes(what: str, dtype: torch.dtype, **tensors: torch.Tensor | None) -> None:
    """The mixed-dtype rule shared by both backends: every floating tensor argument has the
    dtype of the primary input (``dtype``); anything else is a TypeError naming the argument."""
    for k, v in tensors.items():
        if v is not None and v.dtype != dtype:
            raise TypeError(f"{what}: {k} must have the dtype of the input ({dtype}), got {v.dtype}")
