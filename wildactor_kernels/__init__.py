"""wildactor_kernels: Triton kernels for identity-preserving video DiTs (WildActor).

Public API:

- token layout and I-RoPE tables (plain PyTorch, no backend): :class:`TokenLayout`,
  :func:`irope_positions`, :func:`rope_cos_sin`, :func:`axis_dims`;
- I-RoPE: :func:`apply_rope`, :func:`qk_norm_rope` (Wan q/k RMSNorm across heads + I-RoPE);
- asymmetric attention: :func:`asym_attention`, :func:`cached_asym_attention`
  (:func:`attention_backends`: what ``backend="auto"`` picks on this machine, and why;
  ``precision="fp8"``: 8-bit attention, see :mod:`wildactor_kernels.attention`);
- reference-only LoRA: :func:`ref_lora_linear`, :class:`RefLoRALinear` (``backend=`` given to
  the constructor);
- FP8: :func:`per_token_quant_fp8` (dynamic per-token activation scales), :func:`fp8_linear`.

Backends and gradients:

- ``apply_rope``, ``qk_norm_rope``, ``asym_attention``, ``cached_asym_attention``,
  ``ref_lora_linear`` and ``RefLoRALinear`` take ``backend="auto" | "triton" | "reference"``
  and support autograd on every backend (the attention ops with their default precision:
  ``precision="fp8"``, 8-bit attention, is forward only and raises on a backward pass);
- ``per_token_quant_fp8`` takes ``backend=`` too but is not differentiable (it rounds; its
  input is detached);
- ``fp8_linear`` has no ``backend=``: ``gemm="auto" | "scaled_mm" | "emulate"`` picks the GEMM
  and ``act_backend=`` the backend of its per-token activation quantization; it is
  differentiable in ``x`` and ``bias`` (the FP8 weight is frozen).

Both backends follow one set of rules: the rotary tables ``cos``/``sin`` are constants (a table
that requires grad raises); under autocast, attention and the LoRA linear compute in the autocast
dtype as ``F.scaled_dot_product_attention`` and ``F.linear`` do; mixed dtypes are a TypeError
naming the argument; empty outputs give zero-filled gradients.

``backend="auto"`` is the PyTorch reference on the CPU and the Triton kernels on CUDA (for
attention: the fastest measured backend, see :func:`attention_backends`); ``"triton"`` on CPU
tensors needs ``TRITON_INTERPRET=1`` in the environment before the first import.

Each op lives in its own sub-package with ``reference.py`` (the maths), ``kernels.py`` (Triton)
and ``op.py`` (checks + dispatch). The WildActor model built on them is the subpackage
:mod:`wildactor_kernels.model` (the repository's ``model/`` folder).
"""

from ._checkout import install_checkout_finder as _install_checkout_finder
from ._utils import BACKENDS
from .attention import asym_attention, attention_backends, cached_asym_attention
from .layout import REF_KINDS, TokenLayout, axis_dims, irope_positions, rope_cos_sin
from .lora import RefLoRALinear, ref_lora_linear
from .quant import fp8_linear, per_token_quant_fp8
from .rope import apply_rope, qk_norm_rope

# In a source checkout that is not installed, serve wildactor_kernels.model from its model/ folder.
_install_checkout_finder()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "REF_KINDS",
    "TokenLayout",
    "irope_positions",
    "rope_cos_sin",
    "axis_dims",
    "apply_rope",
    "qk_norm_rope",
    "asym_attention",
    "cached_asym_attention",
    "attention_backends",
    "ref_lora_linear",
    "RefLoRALinear",
    "per_token_quant_fp8",
    "fp8_linear",
    "__version__",
]
