"""wildactor_kernels: Triton kernels for identity-preserving video DiTs (WildActor).

Public ops (each takes ``backend="auto" | "triton" | "reference"`` and supports autograd):

- I-RoPE: :class:`TokenLayout`, :func:`irope_positions`, :func:`rope_cos_sin`,
  :func:`apply_rope`, :func:`qk_norm_rope` (Wan q/k RMSNorm across heads + I-RoPE);
- asymmetric attention: :func:`asym_attention`, :func:`cached_asym_attention`;
- reference-only LoRA: :func:`ref_lora_linear`, :class:`RefLoRALinear`;
- FP8: :func:`per_token_quant_fp8` (dynamic per-token activation scales), :func:`fp8_linear`.

Each op lives in its own sub-package with ``reference.py`` (the maths), ``kernels.py`` (Triton)
and ``op.py`` (checks + dispatch). The WildActor model built on them is the subpackage
:mod:`wildactor_kernels.model` (the repository's ``model/`` folder, see below).
"""

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys


# ---------------------------------------------------------------- wildactor_kernels.model
# An installed copy (wheel) holds the model package at wildactor_kernels/model/, and an editable
# install maps it there through setuptools' package_dir. A source checkout run without
# installing (PYTHONPATH=., e.g. on a machine without a registry) keeps it in model/ beside this
# package: this finder serves exactly that one name from the checkout this package was imported
# from, so a second checkout never picks up another's model code, and no top-level ``model``
# name is ever created.
class _CheckoutModelFinder(_abc.MetaPathFinder):
    name = __name__ + ".model"

    def __init__(self, model_dir: str):
        self.model_dir = model_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return _util.spec_from_file_location(fullname, _os.path.join(self.model_dir, "__init__.py"),
                                             submodule_search_locations=[self.model_dir])


def _install_checkout_finder() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isfile(_os.path.join(here, "model", "__init__.py")):
        return  # installed layout: the subpackage sits inside this package
    model_dir = _os.path.join(_os.path.dirname(here), "model")
    if not (_os.path.isfile(_os.path.join(model_dir, "__init__.py"))
            and _os.path.isfile(_os.path.join(_os.path.dirname(here), "setup.py"))):
        return
    _sys.meta_path[:] = [f for f in _sys.meta_path if not isinstance(f, _CheckoutModelFinder)
                         and type(f).__name__ != "_CheckoutModelFinder"]
    _sys.meta_path.insert(0, _CheckoutModelFinder(model_dir))


_install_checkout_finder()

from ._utils import BACKENDS
from .attention import asym_attention, cached_asym_attention
from .layout import REF_KINDS, TokenLayout, axis_dims, irope_positions, rope_cos_sin
from .lora import RefLoRALinear, ref_lora_linear
from .quant import fp8_linear, per_token_quant_fp8
from .rope import apply_rope, qk_norm_rope

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
    "ref_lora_linear",
    "RefLoRALinear",
    "per_token_quant_fp8",
    "fp8_linear",
    "__version__",
]
