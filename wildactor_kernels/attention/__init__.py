"""Asymmetric attention: reference (``reference.py``), Triton kernels (``kernels.py``), ops (``op.py``)."""

from .op import asym_attention, cached_asym_attention
from .reference import asym_attention_ref, cached_asym_attention_ref

__all__ = ["asym_attention", "cached_asym_attention", "asym_attention_ref", "cached_asym_attention_ref"]
from .fp8_op import QuantizedKV, quantize_ref_kv  # noqa: E402,F401  (precision="fp8")
