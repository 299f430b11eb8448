"""FP8 quantization: reference maths (``reference.py``), the per-token quantization kernel
(``kernels.py``), its public op (``op.py``) and the FP8 linear with its GEMM paths
(``linear.py``), and the FP8 layers with their frozen config and module swap (``module.py``:
:class:`Float8Config`, :class:`Float8Linear`, :func:`convert_to_fp8_linear`). The WildActor
choice of layers (the Wan filter), bitsandbytes and the SQNR report live in
:mod:`wildactor_kernels.model.quant`."""

from .linear import GEMM_PATHS, GEMMS, fp8_gemm, fp8_linear, resolve_fp8_gemm, scaled_mm_rowwise
from .module import Float8Config, Float8Linear, Float8RefLoRALinear, RefLoRAMixin, convert_to_fp8_linear
from .op import per_token_quant_fp8
from .reference import (
    AMAX_EPS,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8,
    fp8_linear_emulated,
    per_token_quant_fp8_ref,
    quantize_weight_fp8,
)

__all__ = [
    "per_token_quant_fp8",
    "per_token_quant_fp8_ref",
    "quantize_weight_fp8",
    "dequantize_fp8",
    "fp8_linear",
    "fp8_linear_emulated",
    "fp8_gemm",
    "scaled_mm_rowwise",
    "resolve_fp8_gemm",
    "GEMMS",
    "GEMM_PATHS",
    "FP8_DTYPE",
    "FP8_MAX",
    "AMAX_EPS",
    "Float8Config",
    "Float8Linear",
    "Float8RefLoRALinear",
    "RefLoRAMixin",
    "convert_to_fp8_linear",
]
