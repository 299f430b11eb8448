"""Reference-only LoRA: reference (``reference.py``), Triton GEMMs (``kernels.py``), op, module."""

from .module import RefLoRALinear
from .op import ref_lora_linear
from .reference import ref_lora_linear_ref

__all__ = ["ref_lora_linear", "ref_lora_linear_ref", "RefLoRALinear"]
