"""``wildactor_kernels.model``: the WildActor model, sampler, quantization, export and
sequence parallelism, diffusers interop (docs/design.md §6-7, §10-11).

The repository keeps this package in its top-level ``model/`` folder; it is installed (and only
importable) as ``wildactor_kernels.model``. Names are resolved lazily so that importing it
stays cheap and an optional dependency of one part (onnxruntime, tensorrt, bitsandbytes,
diffusers) never breaks the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "WildActorConfig": "config",
    "WildActor": "wildactor",
    "Reference": "references",
    "RefCache": "references",
    "FlowMatchSampler": "sampler",
    "sample_views": "view_sampling",
    "quantize_model": "quant",
    "quantization_report": "quant",
    "export_onnx": "export.onnx_export",
    "OnnxWildActor": "export.onnx_export",
    "build_engine": "tensorrt",
    "TensorRTWildActor": "tensorrt",
    "WildActorPipeline": "pipeline",
    "patch_diffusers_wan": "diffusers_compat",
    "unpatch_diffusers_wan": "diffusers_compat",
    "register_with_diffusers": "diffusers_compat",
    "load_adapter_file": "adapter_formats",
    "adapter_rank": "adapter_formats",
    "AdapterReport": "adapter_formats",
    "parallelize": "parallel",
    "ParallelConfig": "parallel",
    "ParallelWildActor": "parallel",
}

__all__ = sorted(_EXPORTS)


def _register_with_diffusers() -> None:
    # diffusers already imported: let its pipelines save and load a WildActor (never imports it)
    import sys

    if "diffusers" in sys.modules:
        from .diffusers_compat import register_if_diffusers_loaded

        register_if_diffusers_loaded()


_register_with_diffusers()


def __getattr__(name: str):
    if name in _EXPORTS:
        mod = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
