"""Asymmetric attention: reference (``reference.py``), Triton kernels (``kernels.py``), ops (``op.py``)."""

from .dispatch import attention_backends
from .op import asym_attention, cached_asym_attention
from .reference import asym_attention_ref, cached_asym_attention_ref

__all__ = ["attention_backends", "asym_attention", "cached_asym_attention", "asym_attention_ref",
           "cached_asym_attention_ref"]
