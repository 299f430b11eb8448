"""ONNX export of WildActor as two graphs, and runners behind the model's call (docs/deployment.md).

- :mod:`.contract`: the two graphs' names and I/O, the host-side inputs (patchified references,
  I-RoPE tables) and the ``nn.Module`` wrappers that are traced.
- :mod:`.passes`: the passes on the exported protos (RMSNorm and attention decompositions, FP8
  Q/DQ with calibration, I/O checks and docs, saving).
- :mod:`.runner`: the export manifest and :class:`TwoGraphRunner`, the host half shared by the
  onnxruntime and TensorRT runners (``wildactor_kernels.model.tensorrt`` imports only this
  module and :mod:`.contract`).
- :mod:`.onnx_export`: :func:`export_onnx`, :class:`OnnxWildActor` and the ``wildactor export``
  command (:func:`register_cli`).
"""

from .contract import (
    ATTENTION_FORMS,
    DENOISER,
    ENCODER,
    MANIFEST,
    PRECISIONS,
    default_example,
    patchify_references,
    rope_tables,
)
from .onnx_export import OnnxExport, OnnxWildActor, export_onnx, register_cli
from .passes import decompose_attention, decompose_rmsnorm, insert_fp8_qdq, ort_supports_attention
from .runner import TwoGraphRunner, load_manifest

__all__ = [
    "ENCODER",
    "DENOISER",
    "MANIFEST",
    "PRECISIONS",
    "ATTENTION_FORMS",
    "OnnxExport",
    "export_onnx",
    "OnnxWildActor",
    "TwoGraphRunner",
    "patchify_references",
    "rope_tables",
    "default_example",
    "load_manifest",
    "register_cli",
    "decompose_rmsnorm",
    "decompose_attention",
    "insert_fp8_qdq",
    "ort_supports_attention",
]
