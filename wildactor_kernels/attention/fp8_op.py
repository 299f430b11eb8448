"""``precision="fp8"`` of the asymmetric-attention ops: checks, dispatch, the forward-only guard.

:func:`asym_attention` and :func:`cached_asym_attention` (``op.py``) route here when given
``precision="fp8"`` (docs/design.md §9). The scheme is specified in ``fp8_reference.py``; the
Triton backend is ``fp8_kernels.py``. Rotation (cos/sin) always happens first, in its own pass:
the smoothing vector is the mean of the rotated keys, so K must be rotated before the 8-bit
kernel runs (``rope_mode`` is validated by the caller and has no effect here).
"""

from __future__ import annotations

import torch

from .._utils import (
    check_qkv,
    check_ref_kv,
    check_rope_tables,
    check_same_device,
    check_tensor,
    logger,
    resolve_backend,
)
from .fp8_reference import (
    DEFAULT_BLOCK_M,
    DEFAULT_BLOCK_N,
    QuantizedKV,
    asym_attention_fp8_ref,
    cached_asym_attention_fp8_ref,
    key_mean,
)
from .fp8_reference import quantize_ref_kv as _quantize_ref_kv_ref

__all__ = ["PRECISIONS", "check_precision", "asym_attention_fp8", "cached_asym_attention_fp8",
           "QuantizedKV", "quantize_ref_kv"]

#: Accepted values of ``precision``: None (the input dtype) or ``"fp8"`` (8-bit attention).
PRECISIONS = (None, "fp8")


#: fp8 tensor cores (e4m3 mma) start at sm_89 (Ada) / sm_90 (Hopper)
_MIN_CAPABILITY = (8, 9)


def _resolve(backend: str, t: torch.Tensor) -> str:
    """``resolve_backend`` plus the GPU generation: on a CUDA device without fp8 tensor cores,
    ``"auto"`` runs the reference with a warning and ``"triton"`` raises."""
    choice = resolve_backend(backend, t)
    if choice == "triton" and t.is_cuda:
        cap = torch.cuda.get_device_capability(t.device)
        if cap < _MIN_CAPABILITY:
            msg = (f"8-bit attention kernels need fp8 tensor cores (sm_89+); {t.device} is "
                   f"sm_{cap[0]}{cap[1]}")
            if backend == "triton":
                raise RuntimeError(msg + ": use backend='reference' or precision=None")
            logger.warning("%s: precision='fp8' runs the plain-PyTorch reference", msg)
            return "reference"
    return choice


def check_precision(precision: object, ref_k: object = None) -> bool:
    """True when ``precision`` asks for 8-bit attention; ValueError for an unknown value, and for
    a :class:`QuantizedKV` cache given without ``precision="fp8"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be None or 'fp8', got {precision!r}")
    if isinstance(ref_k, QuantizedKV) and precision != "fp8":
        raise ValueError("ref_k is a QuantizedKV (an 8-bit reference cache): pass precision='fp8'")
    return precision == "fp8"


class _ForwardOnly(torch.autograd.Function):
    """Identity on the output whose backward raises: 8-bit attention is inference-only."""

    @staticmethod
    def forward(ctx, o, *inputs):
        return o.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "asym_attention / cached_asym_attention with precision='fp8' are forward-only "
            "(inference): no gradient flows through 8-bit attention. Use precision=None to "
            "train, or run the forward under torch.no_grad()/torch.inference_mode().")


def _guard(o: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    needs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if needs and torch.is_grad_enabled():
        return _ForwardOnly.apply(o, *needs)
    return o


def quantize_ref_kv(ref_k: torch.Tensor, ref_v: torch.Tensor, block_n: int = DEFAULT_BLOCK_N,
                    backend: str = "auto") -> QuantizedKV:
    """Quantize a reference K/V cache once for ``cached_asym_attention(..., precision="fp8")``.

    Args:
        ref_k, ref_v: ``[B, Nr, H, D]`` float, keys already rotated.
        block_n: keys per int8 scale (the kernel's key block; keep the default).
        backend: ``"auto" | "triton" | "reference"`` (the quantizer that runs).
    Returns:
        a :class:`QuantizedKV` (int8 keys smoothed by their own mean, e4m3 values, scales) that
        replaces ``ref_k`` (with ``ref_v=None``): about half the bytes of a bf16 cache, and a step
        quantizes only the video keys and values.
    """
    check_tensor("ref_k", ref_k, ndim=4, floating=True)
    check_tensor("ref_v", ref_v, ndim=4, floating=True)
    if ref_k.shape != ref_v.shape:
        raise ValueError(f"ref_k and ref_v must share one shape, got {tuple(ref_k.shape)} and "
                         f"{tuple(ref_v.shape)}")
    if not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n!r}")
    check_same_device(ref_k=ref_k, ref_v=ref_v)
    if _resolve(backend, ref_k) == "reference":
        return _quantize_ref_kv_ref(ref_k, ref_v, block_n)
    from .fp8_kernels import quantize_kv_triton

    return quantize_kv_triton(ref_k, ref_v, key_mean(ref_k), block_n)


def _rotate(x: torch.Tensor, cos, sin, backend: str) -> torch.Tensor:
    from ..rope.op import apply_rope

    return apply_rope(x, cos, sin, backend=backend)


def asym_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_video: int,
                       cos: torch.Tensor | None, sin: torch.Tensor | None, scale: float | None,
                       backend: str) -> torch.Tensor:
    """8-bit joint asymmetric attention; inputs already checked by ``op.asym_attention``."""
    with torch.no_grad():
        if _resolve(backend, q) == "reference":
            o = asym_attention_fp8_ref(q, k, v, num_video, cos, sin, scale,
                                       block_m=DEFAULT_BLOCK_M, block_n=DEFAULT_BLOCK_N)
        else:
            from .fp8_kernels import asym_attention_fp8_triton

            qr, kr = q, k
            if cos is not None:
                qr, kr = _rotate(q, cos, sin, "triton"), _rotate(k, cos, sin, "triton")
            o = asym_attention_fp8_triton(qr, kr, v, num_video, scale, block_n=DEFAULT_BLOCK_N)
    return _guard(o, q, k, v)


def cached_asym_attention_fp8(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor,
                              ref_k: torch.Tensor | QuantizedKV, ref_v: torch.Tensor | None,
                              cos: torch.Tensor | None, sin: torch.Tensor | None,
                              scale: float | None, backend: str) -> torch.Tensor:
    """8-bit cached attention: video queries over ``[k_v; reference]``.

    ``ref_k, ref_v [B, Nr, H, D]`` tensors (quantized on every call), or ``ref_k`` a
    :class:`QuantizedKV` from :func:`quantize_ref_kv` and ``ref_v`` None (quantized once).
    """
    check_qkv(("q_v", "k_v", "v_v"), q_v, k_v, v_v)
    b, nv, h, d = q_v.shape
    if isinstance(ref_k, QuantizedKV):
        if ref_v is not None:
            raise ValueError("ref_v must be None when ref_k is a QuantizedKV (it holds the values)")
        if (ref_k.batch, ref_k.heads, ref_k.head_dim) != (b, h, d):
            raise ValueError(f"the QuantizedKV cache has (B, H, D) = "
                             f"{(ref_k.batch, ref_k.heads, ref_k.head_dim)}, q_v has {(b, h, d)}")
        if ref_k.device != q_v.device:
            raise ValueError(f"all inputs must be on one device: q_v is on {q_v.device} but the "
                             f"QuantizedKV cache is on {ref_k.device}")
        check_same_device(q_v=q_v, k_v=k_v, v_v=v_v, cos=cos, sin=sin)
    else:
        check_ref_kv(ref_k, ref_v, q_v.shape)
        check_same_device(q_v=q_v, k_v=k_v, v_v=v_v, ref_k=ref_k, ref_v=ref_v, cos=cos, sin=sin)
    check_rope_tables(cos, sin, nv, d)
    with torch.no_grad():
        if _resolve(backend, q_v) == "reference":
            o = cached_asym_attention_fp8_ref(q_v, k_v, v_v, ref_k, ref_v, cos, sin, scale,
                                              block_m=DEFAULT_BLOCK_M, block_n=DEFAULT_BLOCK_N)
        else:
            from .fp8_kernels import cached_asym_attention_fp8_triton

            qr, kr = q_v, k_v
            if cos is not None:
                qr, kr = _rotate(q_v, cos, sin, "triton"), _rotate(k_v, cos, sin, "triton")
            o = cached_asym_attention_fp8_triton(qr, kr, v_v, ref_k, ref_v, scale,
                                                 block_n=DEFAULT_BLOCK_N)
    # a QuantizedKV quantized from tensors that need grad carries their graph in its statistics
    refs = (ref_k, ref_v) if isinstance(ref_k, torch.Tensor) else (ref_k.k_mean, ref_k.k_scale, ref_k.v_scale)
    return _guard(o, q_v, k_v, v_v, *refs)
