"""Post-export passes on the ONNX protos of the two graphs (plain ``onnx`` protos, in place).

- ``RMSNormalization`` (opset 23, fused by the exporter's optimizer) is decomposed into
  primitive ops (:func:`decompose_rmsnorm`): TensorRT 10.x's ONNX parser has no importer for it.
- ``attention="decomposed"`` rewrites every ``Attention`` node as MatMul -> Softmax -> MatMul
  (softmax in fp32, :func:`decompose_attention`), for TensorRT < 10.14 or runtimes without
  Attention-23 (:func:`ort_supports_attention` probes the installed onnxruntime).
- ``precision="fp8"`` inserts explicit QuantizeLinear/DequantizeLinear (float8e4m3fn, zero
  point 0) on the block linears (:func:`insert_fp8_qdq`): weights stored as FP8 initializers
  with per-output-channel scales, activations per-tensor with static scales calibrated on
  example inputs (:func:`calibrate`; what TensorRT's strongly typed FP8 GEMMs take).
- The I/O of each graph is checked against :data:`~.contract.GRAPH_IO` and documented in the
  proto (:func:`rename_dims`, :func:`io_spec`); :func:`save_model` writes it (external data
  for big weights).
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from wildactor_kernels.quant import FP8_DTYPE, FP8_MAX

from .contract import GRAPH_IO

__all__ = [
    "require_onnx",
    "to_torch",
    "decompose_rmsnorm",
    "decompose_attention",
    "ort_supports_attention",
    "fp8_targets",
    "insert_fp8_qdq",
    "calibrate",
    "rename_dims",
    "io_spec",
    "save_model",
    "initializer_bytes",
]


# =========================================================================== onnx helpers
def require_onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs the 'onnx' and 'onnxscript' packages: "
                          "pip install onnx onnxscript (or pip install wildactor-kernels[test])") from e
    return onnx


def _elem_type(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    return {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
            torch.bfloat16: TensorProto.BFLOAT16, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
            torch.int64: TensorProto.INT64}[dtype]


def _tensor_proto(name: str, t: torch.Tensor):
    """TensorProto from a torch tensor (raw little-endian bytes; works for bf16 and fp8)."""
    from onnx import helper

    t = t.detach().cpu().contiguous()
    raw = t.view(torch.uint8) if t.element_size() == 1 else t.view(-1).view(torch.uint8)
    return helper.make_tensor(name, _elem_type(t.dtype), list(t.shape), raw.numpy().tobytes(), raw=True)


def to_torch(init) -> torch.Tensor:
    from onnx import TensorProto, numpy_helper

    if init.data_type == TensorProto.BFLOAT16:
        import numpy as np

        raw = init.raw_data if init.raw_data else np.asarray(init.int32_data, np.uint16).tobytes()
        return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(list(init.dims))
    return torch.from_numpy(numpy_helper.to_array(init).copy())


class _Names:
    """Fresh value/initializer names inside one graph."""

    def __init__(self, graph):
        self.used = {n for node in graph.node for n in (*node.input, *node.output)}
        self.used |= {i.name for i in graph.initializer} | {i.name for i in graph.input}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _replace_nodes(graph, replacements: Mapping[int, list]) -> None:
    """Replace ``graph.node[i]`` by a list of nodes (topological order kept)."""
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(replacements.get(i, [node]))
    del graph.node[:]
    graph.node.extend(nodes)


def decompose_rmsnorm(model) -> int:
    """Rewrite opset-23 ``RMSNormalization`` nodes as primitive ops; returns how many.

    ``y = cast_like(x / sqrt(mean(x^2, axis=-1) + eps), scale) * scale`` with the statistics in
    the node's ``stash_type`` (fp32). TensorRT 10.x's ONNX parser has no RMSNormalization.
    """
    from onnx import TensorProto, helper

    g, names, repl = model.graph, _Names(model.graph), {}
    for i, node in enumerate(g.node):
        if node.op_type != "RMSNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        axis = int(_attr(node, "axis", -1))
        if axis != -1:
            raise NotImplementedError(f"RMSNormalization with axis={axis} (this model only emits -1)")
        eps = float(_attr(node, "epsilon", 1e-5))
        stash = int(_attr(node, "stash_type", 1))
        x, scale = node.input[0], node.input[1]
        p = names(node.name or "rmsnorm")
        axes, eps_c = names(p + "_axes"), names(p + "_eps")
        g.initializer.extend([helper.make_tensor(axes, TensorProto.INT64, [1], [-1]),
                              helper.make_tensor(eps_c, stash, [], [eps])])
        xf, sq, mean, var, rms, yn, ync = (names(f"{p}_{s}") for s in ("xf", "sq", "mean", "var", "rms",
                                                                        "norm", "normc"))
        # the output has the scale's type (V); normalising in the stash type and casting to V
        # before the scale equals the spec when X and scale share a type, and keeps the fp32
        # maths of the model when a low-precision X meets an fp32 scale
        repl[i] = [
            helper.make_node("Cast", [x], [xf], to=stash, name=names(p + "/cast")),
            helper.make_node("Mul", [xf, xf], [sq], name=names(p + "/sq")),
            helper.make_node("ReduceMean", [sq, axes], [mean], keepdims=1, name=names(p + "/mean")),
            helper.make_node("Add", [mean, eps_c], [var], name=names(p + "/eps")),
            helper.make_node("Sqrt", [var], [rms], name=names(p + "/sqrt")),
            helper.make_node("Div", [xf, rms], [yn], name=names(p + "/div")),
            helper.make_node("CastLike", [yn, scale], [ync], name=names(p + "/castback")),
            helper.make_node("Mul", [ync, scale], list(node.output), name=names(p + "/scale")),
        ]
    _replace_nodes(g, repl)
    return len(repl)


def decompose_attention(model, head_dim: int, compute: torch.dtype = torch.float32) -> int:
    """Rewrite opset-23 ``Attention`` nodes (4-D q/k/v, no mask, no cache, not causal) as
    ``MatMul(q, k^T) * scale -> Softmax (fp32) -> MatMul(., v)``; returns how many."""
    from onnx import TensorProto, helper

    g, names, repl = model.graph, _Names(model.graph), {}
    low = compute != torch.float32
    for i, node in enumerate(g.node):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        extra = [n for n in node.input[3:] if n]
        if extra or len([o for o in node.output if o]) != 1 or _attr(node, "is_causal", 0) \
                or _attr(node, "softcap", 0.0) or _attr(node, "q_num_heads") is not None:
            raise NotImplementedError(f"Attention node {node.name!r}: only 4-D, unmasked, non-causal "
                                      f"attention without KV cache is decomposed")
        scale = _attr(node, "scale")
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        q, k, v = node.input[:3]
        p = names(node.name or "attention")
        sc = names(p + "_scale")
        g.initializer.append(helper.make_tensor(sc, TensorProto.FLOAT, [], [scale]))
        kt, s, sf, ss, pr, prc = (names(f"{p}_{x}") for x in ("kT", "qk", "qkf", "qks", "p", "pc"))
        nodes = [helper.make_node("Transpose", [k], [kt], perm=[0, 1, 3, 2], name=names(p + "/kT")),
                 helper.make_node("MatMul", [q, kt], [s], name=names(p + "/qk"))]
        if low:  # softmax statistics in fp32 (docs/design.md §4)
            nodes.append(helper.make_node("Cast", [s], [sf], to=TensorProto.FLOAT, name=names(p + "/up")))
        else:
            sf = s
        nodes += [helper.make_node("Mul", [sf, sc], [ss], name=names(p + "/scale")),
                  helper.make_node("Softmax", [ss], [pr], axis=-1, name=names(p + "/softmax"))]
        if low:
            nodes.append(helper.make_node("CastLike", [pr, v], [prc], name=names(p + "/down")))
        else:
            prc = pr
        nodes.append(helper.make_node("MatMul", [prc, v], [node.output[0]], name=names(p + "/pv")))
        repl[i] = nodes
    _replace_nodes(g, repl)
    return len(repl)


@functools.cache
def ort_supports_attention() -> bool | None:
    """Whether the installed onnxruntime executes an opset-23 ``Attention`` node on CPU
    (None: onnxruntime is not installed, so nothing can be checked here)."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 3, 8]) for n in "qkvy"]
    g = helper.make_graph([helper.make_node("Attention", ["q", "k", "v"], ["y"])], "probe", vi[:3], vi[3:])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    try:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 2, 3, 8)).astype(np.float32)
        y = s.run(None, {"q": x, "k": x, "v": x})[0]
    except Exception:  # not implemented in this onnxruntime
        return False
    return bool(np.isfinite(y).all())


# --------------------------------------------------------------------------- FP8 Q/DQ
def _name_scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(ast.literal_eval(p.value))
            except (ValueError, SyntaxError):
                return []
    return []


def fp8_targets(model: nn.Module) -> dict[str, nn.Module]:
    from ..quant import default_module_filter

    return {n: mod for n, mod in model.named_modules() if default_module_filter(mod, n)}


def insert_fp8_qdq(model_proto, targets: Mapping[str, nn.Module], act_amax: Mapping[str, float],
                   base: torch.dtype, prefix: str = "model.") -> dict[str, Any]:
    """Put FP8 Q/DQ around the MatMuls of the target linears.

    Args:
        model_proto: the exported graph (modified in place).
        targets: ``{fqn: module}`` of the linears to quantize (``.weight [Dout, Din]``).
        act_amax: calibrated ``max |x|`` of each target's input.
        base: the graph's float type (scales are stored in it: a DequantizeLinear outputs the
            type of its scale, which TensorRT's strongly typed mode follows).
    Returns:
        a report ``{"quantized": [fqn, ...], "activation_scales": {fqn: s}, ...}``.
    """
    from onnx import TensorProto, helper

    g, names = model_proto.graph, _Names(model_proto.graph)
    inits = {i.name: i for i in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for n in node.input:
            uses[n] = uses.get(n, 0) + 1
    tiny = torch.finfo(base).tiny
    zp_scalar = names("fp8_zero_point")
    g.initializer.append(helper.make_tensor(zp_scalar, TensorProto.FLOAT8E4M3FN, [], b"\x00", raw=True))
    repl, report, w_done = {}, {"quantized": [], "activation_scales": {}}, {}
    for i, node in enumerate(g.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        fqn = next((s[len(prefix):] if s.startswith(prefix) else s for s in reversed(_name_scopes(node))
                    if (s[len(prefix):] if s.startswith(prefix) else s) in targets), None)
        if fqn is None:
            continue
        w = targets[fqn].weight.detach().float()  # [Dout, Din]
        init = inits[node.input[1]]
        if list(init.dims) != [w.shape[1], w.shape[0]]:
            continue  # a LoRA matmul in the same module scope
        w_t = to_torch(init).float()
        if not torch.equal(w_t, w.t().to(w_t.dtype)) and not torch.equal(w_t, w.t().to(base).float()):
            continue
        # ---- weight: FP8 codes + per-output-channel scale (axis 1 of the [Din, Dout] MatMul B)
        key = init.name
        if key not in w_done:
            scale = (w_t.abs().amax(dim=0) / FP8_MAX).clamp_min(tiny).to(base)
            codes = (w_t / scale.float()[None, :]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            wq, ws, wz = names(key + "_fp8"), names(key + "_scale"), names(key + "_zero_point")
            g.initializer.extend([_tensor_proto(wq, codes), _tensor_proto(ws, scale),
                                  helper.make_tensor(wz, TensorProto.FLOAT8E4M3FN, [scale.numel()],
                                                     bytes(scale.numel()), raw=True)])
            w_done[key] = (wq, ws, wz)
        wq, ws, wz = w_done[key]
        # ---- activation: static per-tensor scale
        amax = float(act_amax.get(fqn, 0.0))
        if not amax > 0:
            raise ValueError(f"no calibration statistics for {fqn!r}: did the calibration run it?")
        a_scale = torch.tensor(max(amax / FP8_MAX, tiny)).to(base)
        xs = names(fqn + ".input_scale")
        g.initializer.append(_tensor_proto(xs, a_scale))
        p = names(f"{fqn}/fp8")
        xq, xdq, wdq = names(p + "_xq"), names(p + "_x"), names(p + "_w")
        repl[i] = [
            helper.make_node("QuantizeLinear", [node.input[0], xs, zp_scalar], [xq],
                             name=names(p + "/quant_x")),
            helper.make_node("DequantizeLinear", [xq, xs, zp_scalar], [xdq], name=names(p + "/dequant_x")),
            helper.make_node("DequantizeLinear", [wq, ws, wz], [wdq], axis=1, name=names(p + "/dequant_w")),
            helper.make_node("MatMul", [xdq, wdq], list(node.output), name=node.name),
        ]
        uses[key] -= 1
        report["quantized"].append(fqn)
        report["activation_scales"][fqn] = float(a_scale.float())
    _replace_nodes(g, repl)
    dead = {k for k in w_done if uses.get(k, 0) == 0}
    if dead:  # float weights now only live as FP8 codes
        keep = [i for i in g.initializer if i.name not in dead]
        del g.initializer[:]
        g.initializer.extend(keep)
    report["num_qdq_nodes"] = 3 * len(repl)
    report["weight_dtype"] = "float8e4m3fn"
    report["weight_granularity"] = "per-output-channel (DequantizeLinear axis=1 of MatMul B [Din, Dout])"
    report["activation_granularity"] = f"per-tensor, static (calibrated amax / {FP8_MAX:g})"
    return report


def calibrate(model: nn.Module, ins: Sequence[tuple[torch.Tensor, ...]], wrapper: type,
               targets: Mapping[str, nn.Module]) -> dict[str, float]:
    """``max |x|`` at the input of every target linear over calibration inputs of one graph."""
    amax: dict[str, float] = {}
    hooks = []
    for fqn, mod in targets.items():
        def hook(_mod, args, fqn=fqn):
            x = args[0].detach()
            amax[fqn] = max(amax.get(fqn, 0.0), float(x.abs().max()) if x.numel() else 0.0)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            w = wrapper(model)
            for x in ins:
                w(*x)
    finally:
        for h in hooks:
            h.remove()
    return amax


# --------------------------------------------------------------------------- dims, docs, metadata
def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def rename_dims(model_proto, graph_name: str) -> None:
    """Give the exporter's symbols (``s17``, ``2*hg``) the manifest's axis names."""
    g = model_proto.graph
    spec = {n: axes for n, axes, _, _ in GRAPH_IO[graph_name]["inputs"] + GRAPH_IO[graph_name]["outputs"]}
    mapping: dict[str, str] = {}
    for vi in list(g.input) + list(g.output):
        for d, axis in zip(vi.type.tensor_type.shape.dim, spec.get(vi.name, ())):
            if d.dim_param and d.dim_param != axis:
                mapping.setdefault(d.dim_param, axis)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]


def io_spec(graph_name: str, model_proto, compute: torch.dtype) -> dict[str, list[dict[str, Any]]]:
    from onnx import TensorProto, helper

    g = model_proto.graph
    vis = {vi.name: vi for vi in list(g.input) + list(g.output)}
    out = {}
    for kind in ("inputs", "outputs"):
        rows = []
        for name, axes, dtype, doc in GRAPH_IO[graph_name][kind]:
            vi = vis[name]
            vi.doc_string = doc
            elem = vi.type.tensor_type.elem_type
            want = _elem_type(compute) if dtype == "compute" else TensorProto.FLOAT
            if elem != want:
                raise RuntimeError(f"{graph_name}.{name}: exported dtype {TensorProto.DataType.Name(elem)} "
                                   f"!= expected {TensorProto.DataType.Name(want)}")
            rows.append(dict(name=name, dtype=helper.tensor_dtype_to_np_dtype(elem).name
                             if elem != TensorProto.BFLOAT16 else "bfloat16",
                             shape=_dims(vi), axes=list(axes), doc=doc))
        out[kind] = rows
    return out


def save_model(model_proto, path: Path, external: bool) -> None:
    onnx = require_onnx()
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model_proto, str(path))


def initializer_bytes(model_proto) -> int:
    return sum(len(i.raw_data) for i in model_proto.graph.initializer)

