"""Asymmetric attention: reference (``reference.py``), Triton kernels (``kernels.py``), ops (``op.py``)."""

from .dispatch import attention_backends
from .fp8_op import QuantizedKV, quantize_ref_kv  # noqa: E402  (precision="fp8")
from .op import asym_attention, cached_asym_attention
from .reference import asym_attention_ref, cached_asym_attention_ref

__all__ = ["attention_backends", "asym_attention", "cached_asym_attention", "asym_attention_ref",
           "cached_asym_attention_ref", "QuantizedKV", "quantize_ref_kv"]
