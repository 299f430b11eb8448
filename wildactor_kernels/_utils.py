"""Shared helpers: backend selection, input validation, Triton availability.

Every public op takes ``backend="auto" | "triton" | "reference"``:

- ``"reference"`` runs the plain-PyTorch spec (``<op>/reference.py``);
- ``"triton"`` runs the Triton kernels (on CPU only under ``TRITON_INTERPRET=1``);
- ``"auto"`` picks Triton when the inputs live on CUDA and Triton imports, else the reference.

A request for Triton that cannot be honoured raises; it never silently falls back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import torch

logger = logging.getLogger("wildactor_kernels")

BACKENDS = ("auto", "triton", "reference")


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


# Computed once at import: a plain constant is free to read under torch.compile (dynamo warns on
# ``functools.lru_cache``-wrapped functions and would guard on the cache).
_TRITON_AVAILABLE: bool = _import_triton()


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


def check_num_video(num_video: object, n: int) -> int:
    if isinstance(num_video, torch.Tensor):
        raise TypeError("num_video must be a Python int, not a tensor")
    if not isinstance(num_video, int) or isinstance(num_video, bool):
        raise TypeError(f"num_video must be an int, got {type(num_video).__name__}")
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
