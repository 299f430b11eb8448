"""Checks of the plain-Python arguments of the public ops: numbers are checked, never truncated.

Every check raises a TypeError (wrong kind of value) or a ValueError (right kind, bad value)
whose message starts with the argument's name and says what was expected. ``bool`` is never
accepted where a number is expected (``True`` is an ``int`` to Python, never a size here), and
tensors are refused where a Python number is expected (reading one would synchronise the device
and, under ``torch.compile``, break the graph).
"""

from __future__ import annotations

import math
import numbers
import operator

import torch


def _kind(value: object) -> str:
    if isinstance(value, (bool, float, str)):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as an ``int``: a Python or NumPy integer (never a bool, float or tensor), at
    least ``minimum`` when given."""
    if isinstance(value, (bool, torch.Tensor)) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be an int, got {_kind(value)}")
    try:
        out = int(operator.index(value))
    except TypeError:
        raise TypeError(f"{name} must be an int, got {_kind(value)}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {out}")
    return out


def check_real(name: str, value: object, *, positive: bool = False,
               nonnegative: bool = False) -> float:
    """``value`` as a finite ``float`` (a Python/NumPy int or float; never a bool or tensor)."""
    if (isinstance(value, (bool, torch.Tensor)) or type(value).__name__ == "bool_"
            or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a Python float, got {_kind(value)}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    if positive and not out > 0:
        raise ValueError(f"{name} must be positive, got {out}")
    if nonnegative and not out >= 0:
        raise ValueError(f"{name} must be >= 0, got {out}")
    return out


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_kind(value)}")
    return value


def check_attention_scale(scale: object) -> float | None:
    """Softmax scale of the attention ops: None (``1/sqrt(D)``) or a finite float."""
    return None if scale is None else check_real("scale", scale)


def check_lora_scale(scale: object) -> float:
    """Adapter scale ``alpha / r`` of the LoRA op: a finite float."""
    return check_real("scale", scale)


def check_eps(eps: object) -> float:
    """RMSNorm epsilon: a finite float >= 0."""
    return check_real("eps", eps, nonnegative=True)


def check_theta(theta: object) -> float:
    """RoPE base: a finite float > 0 (0 or a negative base gives NaN tables)."""
    return check_real("theta", theta, positive=True)


def check_pad_to(pad_to: object) -> int:
    """Column padding of the FP8 codes: an int >= 1."""
    return check_int("pad_to", pad_to, minimum=1)


def _tensor(name: str, t: object, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_fp8_linear_args(x: object, weight_fp8: object, weight_scale: object, bias: object,
                          use_fast_accum: object) -> None:
    """Types, shapes and devices of :func:`wildactor_kernels.fp8_linear`'s arguments (the
    dtype of ``weight_fp8`` and the gemm/backend names are checked where they are used)."""
    _tensor("x", x)
    if x.ndim < 1:
        raise ValueError("x must have shape [..., K], got a 0-d tensor")
    _tensor("weight_fp8", weight_fp8, floating=False)
    _tensor("weight_scale", weight_scale)
    if bias is not None:
        _tensor("bias", bias)
        if bias.ndim != 1 or weight_fp8.ndim != 2 or bias.shape[0] != weight_fp8.shape[0]:
            n = weight_fp8.shape[0] if weight_fp8.ndim == 2 else "N"
            raise ValueError(f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
    check_bool("use_fast_accum", use_fast_accum)
    named = [("x", x), ("weight_fp8", weight_fp8), ("weight_scale", weight_scale), ("bias", bias)]
    devs = [(k, t.device) for k, t in named if t is not None]
    for k, dev in devs[1:]:
        if dev != devs[0][1]:
            raise ValueError(f"all inputs must be on one device: x is on {devs[0][1]} but {k} is on {dev}")
