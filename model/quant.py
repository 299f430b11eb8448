"""Quantization of the WildActor backbone as config + module swap, the torchao way (docs/design.md §7).

``quantize_model(m, mode)`` replaces the frozen base linears of every transformer block in
place and returns ``m``:

- self-attention ``blocks.{i}.attn1.{to_q,to_k,to_v,to_out.0}`` and the FFN
  ``blocks.{i}.ffn.net.0.proj`` / ``blocks.{i}.ffn.net.2`` (``RefLoRALinear``: their
  reference-only adapters ``lora_A`` / ``lora_B`` are kept as they are, trainable, same PEFT
  keys, applied in plain torch to the reference rows on top of the quantized base);
- cross-attention ``blocks.{i}.attn2.{to_q,to_k,to_v,to_out.0}`` (``nn.Linear``).

Patch/condition embeddings, time and text MLPs, modulation tables, norms and the output head
are not touched (pass ``module_filter_fn(module, fqn) -> bool`` to choose other layers).

Modes (one frozen dataclass config each):

``"fp8"`` (:class:`~wildactor_kernels.quant.Float8Config`, H100 class; the layers and the module
    swap, :func:`~wildactor_kernels.quant.convert_to_fp8_linear`, live beside their kernel in
    :mod:`wildactor_kernels.quant` and are re-exported here): weights float8_e4m3fn with per-output-channel
    fp32 scales (``weight``, ``weight_scale [N, 1]``); activations quantized per token at every
    call (the Triton kernel on CUDA, the torch reference on CPU); the GEMM is rowwise
    ``torch._scaled_mm`` on sm_89+ and an emulated fp32 matmul of the same FP8 codes elsewhere
    (CPU). Which one runs is decided per layer and is never silent: ``logger.warning`` at
    conversion and at first use, ``layer.gemm_path`` / ``layer.fallback_reason`` on every
    converted layer, and the ``fallbacks`` field of :func:`quantization_report`.
    Per-token activation scales keep a token's codes independent of the other tokens in the
    batch, so the reference K/V cache still equals the joint forward after quantization.
``"int8"`` (:class:`Int8Config`): bitsandbytes ``Linear8bitLt`` (LLM.int8: int8 weights with
    per-row scales, activations quantized per row, outlier columns in fp16), frozen. With
    ``threshold > 0`` the outlier columns are chosen over all rows of the call, so a video row's
    result can depend on which reference rows are present: cache == joint then holds only up
    to that effect (``Int8Config(threshold=0.0)`` makes every row independent again).
``"nf4"`` (:class:`NF4Config`): bitsandbytes ``Linear4bit`` with ``quant_type="nf4"`` (QLoRA
    storage), frozen; adapters train on top of it (QLoRA-style).

Saving: ``m.state_dict()`` of a quantized model holds the codes and scales as plain tensors;
:func:`save_quantized` / :func:`load_quantized` write and read them with safetensors (load into
a model built and quantized the same way, as with torchao). Loading a *float* checkpoint into an
FP8 model quantizes its weights on the fly.

Quality: :func:`quantization_report` gives the SQNR (dB) of each converted layer and of the
model output against the unquantized model; :func:`run_quantize_report` builds a random model
and prints that table (the ``wildactor quantize-report`` command).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from wildactor_kernels.lora.module import RefLoRALinear
from wildactor_kernels.quant import (
    Float8Config,
    Float8Linear,
    Float8RefLoRALinear,
    RefLoRAMixin,
    convert_to_fp8_linear,
)

logger = logging.getLogger("wildactor_kernels")

MODES = ("fp8", "int8", "nf4")

__all__ = [
    "MODES",
    "Float8Config",
    "Int8Config",
    "NF4Config",
    "Float8Linear",
    "Float8RefLoRALinear",
    "quantize_model",
    "default_module_filter",
    "quantized_modules",
    "quantization_report",
    "format_report",
    "run_quantize_report",
    "save_quantized",
    "load_quantized",
    "sqnr_db",
]


# =========================================================================== configs
@dataclass(frozen=True)
class Int8Config:
    """bitsandbytes LLM.int8 (``Linear8bitLt``, ``has_fp16_weights=False``).

    Attributes:
        threshold: outlier threshold of the mixed-precision decomposition (0 disables it).
    """

    threshold: float = 6.0


@dataclass(frozen=True)
class NF4Config:
    """bitsandbytes 4-bit NormalFloat (``Linear4bit``, QLoRA storage).

    Attributes:
        compute_dtype: dtype of the dequantized matmul (None: the layer's weight dtype).
        blocksize: elements per absmax block (64 as QLoRA).
        double_quant: quantize the absmax statistics too (QLoRA's double quantization).
    """

    compute_dtype: torch.dtype | None = None
    blocksize: int = 64
    double_quant: bool = True


_CONFIG_TYPES = {"fp8": Float8Config, "int8": Int8Config, "nf4": NF4Config}


# =========================================================================== bitsandbytes modules
def _import_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(
            "quantize_model(mode='int8' | 'nf4') needs bitsandbytes, which is not installed: "
            "`pip install 'bitsandbytes>=0.45'` (or `pip install wildactor-kernels[quant]`). "
            "mode='fp8' needs only torch."
        ) from e
    return bnb


@functools.cache
def _bnb_classes() -> dict[str, type]:
    """The bitsandbytes-backed layers (defined on first use: bitsandbytes is optional)."""
    bnb = _import_bnb()

    class Int8Linear(RefLoRAMixin, bnb.nn.Linear8bitLt):
        """bitsandbytes ``Linear8bitLt`` (frozen int8 base) + optional reference-only adapter.
        Keys: ``weight`` int8, ``SCB`` fp32 row scales, ``weight_format``, ``bias``, ``lora_*``."""

        def forward(self, x: torch.Tensor, num_video: int | None = None) -> torch.Tensor:
            # LLM.int8 computes in fp16: cast here instead of bitsandbytes warning at every call
            base = super().forward
            return self._ref_forward(x, num_video, lambda t: base(t.to(torch.float16)).to(t.dtype))

    class NF4Linear(RefLoRAMixin, bnb.nn.Linear4bit):
        """bitsandbytes ``Linear4bit`` (frozen NF4 base) + optional reference-only adapter.
        Keys: ``weight`` packed uint8, ``weight.absmax`` / ``weight.quant_map`` / ... (quant
        state), ``bias``, ``lora_*``."""

        def forward(self, x: torch.Tensor, num_video: int | None = None) -> torch.Tensor:
            return self._ref_forward(x, num_video, super().forward)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            # bitsandbytes' Linear4bit saves its quant state next to the packed weight but has no
            # loader for it: rebuild the parameter from the saved codes and statistics.
            key = prefix + "weight"
            stats = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + ".")}
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            if stats and key in state_dict:
                for k in stats:  # consumed here, not unexpected
                    if key + "." + k in unexpected_keys:
                        unexpected_keys.remove(key + "." + k)
                dev = self.weight.device
                self.weight = bnb.nn.Params4bit.from_prequantized(
                    data=state_dict[key], quantized_stats=stats, requires_grad=False, device=dev,
                    module=self)

    Int8Linear.__module__ = NF4Linear.__module__ = __name__
    Int8Linear.__qualname__, NF4Linear.__qualname__ = "Int8Linear", "NF4Linear"
    return {"Int8Linear": Int8Linear, "NF4Linear": NF4Linear}


def __getattr__(name: str):
    if name in ("Int8Linear", "NF4Linear"):
        return _bnb_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _to_int8(lin: nn.Module, cfg: Int8Config) -> nn.Module:
    bnb = _import_bnb()
    cls = _bnb_classes()["Int8Linear"]
    w = lin.weight.detach()
    new = cls(w.shape[1], w.shape[0], bias=lin.bias is not None, has_fp16_weights=False,
              threshold=cfg.threshold, device="meta")
    # Int8Params quantizes when it moves off the CPU onto a device (the CPU included).
    new.weight = bnb.nn.Int8Params(w.cpu().clone(), requires_grad=False, has_fp16_weights=False)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    new = new.to(w.device)
    new._take_lora(lin)
    return new


def _to_nf4(lin: nn.Module, cfg: NF4Config) -> nn.Module:
    bnb = _import_bnb()
    cls = _bnb_classes()["NF4Linear"]
    w = lin.weight.detach()
    new = cls(w.shape[1], w.shape[0], bias=lin.bias is not None, compute_dtype=cfg.compute_dtype or w.dtype,
              compress_statistics=cfg.double_quant, quant_type="nf4", device="meta")
    new.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=cfg.blocksize,
                                   compress_statistics=cfg.double_quant, quant_type="nf4", module=new)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    new = new.to(w.device)  # Params4bit quantizes on its first .to(device)
    # bitsandbytes' AVX512-BF16 CPU inference path repacks the weight in place at the first eval
    # forward (absmax rounded to bf16; needs N % 32 == 0 and K % 64 == 0, fails otherwise): off,
    # so eval and train compute the same thing and the saved state never depends on a forward.
    new.support_avx512bf16_for_cpu = False
    new._take_lora(lin)
    return new


# =========================================================================== conversion
_BLOCK_LINEAR = re.compile(
    r"(^|\.)blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_k|to_v|to_out\.0)"
    r"|ffn\.net\.(0\.proj|2))$")


def default_module_filter(module: nn.Module, fqn: str) -> bool:
    """The frozen base linears of the transformer blocks (diffusers-Wan names): self- and
    cross-attention q, k, v, o and both FFN linears. Everything else stays unquantized."""
    return isinstance(module, (nn.Linear, RefLoRALinear)) and bool(_BLOCK_LINEAR.search(fqn))


def _is_quantized(module: nn.Module) -> bool:
    if isinstance(module, Float8Linear):
        return True
    cache = _bnb_classes.cache_info().currsize  # never import bitsandbytes just to check
    return bool(cache) and isinstance(module, tuple(_bnb_classes().values()))


def quantized_modules(m: nn.Module) -> dict[str, nn.Module]:
    """``{fqn: module}`` of every layer converted by :func:`quantize_model` in ``m``."""
    return {n: mod for n, mod in m.named_modules() if _is_quantized(mod)}


def quantize_model(m: nn.Module, mode: str, *,
                   module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
                   emulate: bool | None = None,
                   config: Float8Config | Int8Config | NF4Config | None = None,
                   attention: str | None = None) -> nn.Module:
    """Convert the base linears of ``m`` in place and return ``m``.

    Args:
        m: a WildActor (or any module; see ``module_filter_fn``). Cast it to its working dtype
            (e.g. bf16) *before* quantizing: the quantized weights keep their own dtype.
        mode: ``"fp8" | "int8" | "nf4"``.
        module_filter_fn: ``(module, fqn) -> bool`` choosing the ``nn.Linear`` /
            ``RefLoRALinear`` layers to convert (default :func:`default_module_filter`).
        emulate: FP8 only. ``True`` forces the emulated GEMM, ``False`` requires rowwise
            ``torch._scaled_mm``, ``None`` (default) lets the device decide (with a warning
            when it falls back).
        config: a :class:`Float8Config` / :class:`Int8Config` / :class:`NF4Config` matching
            ``mode`` (default: the dataclass defaults).
        attention: None (attention stays in the activations' dtype) or ``"fp8"``: every
            self-attention (``precision`` attribute, ``attn1``) runs 8-bit attention
            (``asym_attention(..., precision="fp8")``, docs/design.md §9). Inference only: a
            gradient through it raises. A quantization flag rather than a config field because,
            like the FP8 linears, it is an inference-time transform of a trained model.
    Returns:
        ``m``, with ``m.quantization = {"mode", "config", "converted": [fqn, ...], "attention"}``.
    Raises:
        ValueError: unknown mode, config of the wrong type, ``emulate`` with a bitsandbytes
            mode, or no layer matched. ImportError: bitsandbytes missing for int8 / nf4.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; valid modes: {', '.join(MODES)}")
    if attention not in (None, "fp8"):
        raise ValueError(f"attention must be None or 'fp8', got {attention!r}")
    if config is None:
        config = _CONFIG_TYPES[mode]()
    if not isinstance(config, _CONFIG_TYPES[mode]):
        raise ValueError(f"mode {mode!r} takes a {_CONFIG_TYPES[mode].__name__}, got {type(config).__name__}")
    if emulate is not None:
        if mode != "fp8":
            raise ValueError("emulate applies to mode='fp8' only (bitsandbytes picks its own kernels)")
        config = Float8Config(**{**asdict(config), "gemm": "emulate" if emulate else "scaled_mm"})
    if mode in ("int8", "nf4"):
        _import_bnb()
    filt = module_filter_fn or default_module_filter

    targets = [(fqn, mod) for fqn, mod in m.named_modules()
               if fqn and isinstance(mod, (nn.Linear, RefLoRALinear)) and not _is_quantized(mod)
               and filt(mod, fqn)]
    if not targets:
        raise ValueError(f"quantize_model({mode!r}): no nn.Linear / RefLoRALinear matched the module filter")
    converted = [fqn for fqn, _ in targets]
    if mode == "fp8":
        chosen = {id(mod) for _, mod in targets}
        convert_to_fp8_linear(m, config, module_filter_fn=lambda mod, fqn: id(mod) in chosen)
    else:
        for fqn, mod in targets:
            new = _to_int8(mod, config) if mode == "int8" else _to_nf4(mod, config)
            new.train(mod.training)
            parent_name, _, child = fqn.rpartition(".")
            setattr(m.get_submodule(parent_name) if parent_name else m, child, new)

    if mode == "fp8":
        reasons: dict[str, int] = {}
        for fqn in converted:
            r = m.get_submodule(fqn).fallback_reason
            if r is not None:
                reasons[r] = reasons.get(r, 0) + 1
        log = logger.warning if config.gemm == "auto" else logger.info  # asked for: not a surprise
        for r, n in reasons.items():
            log("quantize_model('fp8'): %d of %d layers use the emulated FP8 GEMM: %s", n, len(converted), r)
    prev = getattr(m, "quantization", None)
    info = {"mode": mode, "config": config, "converted": converted, "attention": attention}
    if attention is not None:
        for mod in m.modules():
            if hasattr(mod, "attend") and hasattr(mod, "precision"):  # SelfAttention (attn1)
                mod.precision = attention
    if isinstance(prev, dict) and prev.get("converted"):  # a second call on other layers
        info["converted"] = list(prev["converted"]) + converted
    object.__setattr__(m, "quantization", info)
    logger.info("quantize_model(%r): converted %d layers", mode, len(converted))
    return m


# =========================================================================== save / load
def save_quantized(m: nn.Module, path: str) -> None:
    """Write ``m.state_dict()`` (codes, scales, bitsandbytes quant state, adapters) to a
    safetensors file, with the quantization mode in its metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    mode = getattr(m, "quantization", {}).get("mode", "none")
    save_file(sd, path, metadata={"quantization_mode": mode, "format": "wildactor-quantized"})


def load_quantized(m: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load a :func:`save_quantized` file into ``m``, which must have been built and quantized
    with the same mode (the torchao habit: construct, convert, then load).

    All or nothing, as every loader (:func:`wildactor_kernels.model.weights.validate_state_dict`):
    keys, shapes, dtypes (FP8 codes and packed tensors exactly, floats floating only), types and
    devices of the whole file are checked before the first tensor is written, so a failed load
    leaves ``m`` unchanged. Errors name the file."""
    from .weights import read_safetensors, validate_state_dict

    on_meta = sorted(k for k, v in m.state_dict().items() if isinstance(v, torch.Tensor) and v.is_meta)
    if on_meta:  # copying into meta tensors is a silent no-op: the model would keep no data
        raise ValueError(f"load_quantized({path}): {len(on_meta)} tensors of the model are on meta (no "
                         f"data; copying into them would do nothing), e.g. {on_meta[0]}: build the model "
                         f"on a device, quantize it, then load")
    dev = next((p.device for p in m.parameters()), torch.device("cpu"))
    sd, meta = read_safetensors(path, device=dev)
    want = getattr(m, "quantization", {}).get("mode", "none")
    got = meta.get("quantization_mode", "none")
    if got != want:
        raise ValueError(f"{path} holds a {got!r}-quantized state dict but the model is {want!r}; call "
                         f"quantize_model(m, {got!r}) before loading")
    own = m.state_dict()
    # bitsandbytes stores its NF4 quant state as a JSON blob in a uint8 tensor of varying length
    validate_state_dict(sd, own, strict=strict, source=path, target=f"the {want!r}-quantized model",
                        any_shape=lambda k: ".quant_state." in k)
    with torch.no_grad():
        m.load_state_dict(sd, strict=strict)
    return m


# =========================================================================== quality report
def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - test||^2)`` in dB (fp64);
    ``inf`` when equal."""
    r = ref.detach().double()
    t = test.detach().double().to(r.device)
    noise = (r - t).pow(2).sum().item()
    signal = r.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    for name in ("sample", "out"):
        if hasattr(out, name):
            return getattr(out, name)
    raise TypeError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def _state_bytes(mod: nn.Module, skip_lora: bool = True) -> int:
    return sum(v.numel() * v.element_size() for k, v in mod.state_dict().items()
               if isinstance(v, torch.Tensor) and not (skip_lora and "lora_" in k))


def _call(m: nn.Module, inputs: Any):
    if isinstance(inputs, dict):
        return m(**inputs)
    if isinstance(inputs, (tuple, list)):
        return m(*inputs)
    return m(inputs)


def _progress_bar(total: int, show: bool) -> tqdm:
    """The bar of the quantization report on stderr, left in place when done."""
    return tqdm(total=total, desc="quantize-report: ", leave=True, file=sys.stderr, disable=not show,
                bar_format="{desc}{n_fmt}/{total_fmt} |{bar:20}| [{elapsed}<{remaining}]")


def _check_progress(progress: object) -> None:
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")


@torch.no_grad()
def quantization_report(m_ref: nn.Module, m_quant: nn.Module, inputs: Any, *, progress: bool = False) -> dict:
    """SQNR of a quantized model against its unquantized twin on the same inputs.

    Args:
        m_ref: the unquantized model; m_quant: the same weights after :func:`quantize_model`.
        inputs: forward arguments, a dict of keyword arguments or a tuple of positional ones.
        progress: a tqdm bar on stderr (left in place) over the two forwards and the converted
            layers; off by default (library calls stay quiet).
    Returns:
        a dict with ``output_sqnr_db`` (model output, quantized vs reference) and ``layers``, one
        entry per converted layer: ``sqnr_db`` (the quantized layer applied to exactly the input
        the reference layer saw, against the reference output: this layer's own error) and
        ``sqnr_e2e_db`` (the layer's output inside the quantized model, errors of earlier layers
        included). Also ``min_layer_sqnr_db``, ``mean_layer_sqnr_db``, ``mode``, ``fallbacks``
        (FP8 layers not on the fast GEMM, with the reason), ``gemm_paths`` and ``bytes`` of the
        converted base layers before and after.
    """
    _check_progress(progress)
    qmods = quantized_modules(m_quant)
    if not qmods:
        raise ValueError("m_quant has no quantized layers: call quantize_model first")
    with _progress_bar(2 + len(qmods), progress) as bar:
        return _report(m_ref, m_quant, inputs, qmods, bar)


def _report(m_ref: nn.Module, m_quant: nn.Module, inputs: Any, qmods: dict[str, nn.Module],
            bar: tqdm) -> dict:
    rec_ref: dict[str, list] = {n: [] for n in qmods}
    rec_q: dict[str, list] = {n: [] for n in qmods}
    handles = []

    def ref_hook(name):
        def hook(mod, args, kwargs, out):
            rec_ref[name].append((args, dict(kwargs), out))
        return hook

    def q_hook(name):
        def hook(mod, args, out):
            rec_q[name].append(out)
        return hook

    try:
        for name, qm in qmods.items():
            handles.append(m_ref.get_submodule(name).register_forward_hook(ref_hook(name), with_kwargs=True))
            handles.append(qm.register_forward_hook(q_hook(name)))
        bar.set_description("quantize-report: forward of the unquantized model")
        y_ref = _first_tensor(_call(m_ref, inputs))
        bar.update(1)
        bar.set_description("quantize-report: forward of the quantized model")
        y_q = _first_tensor(_call(m_quant, inputs))
        bar.update(1)
    finally:
        for h in handles:
            h.remove()

    layers = []
    for name, qm in qmods.items():
        bar.set_description(f"quantize-report: layer {name}")
        bar.update(1)
        refs, outs = rec_ref[name], rec_q[name]
        if not refs:
            continue
        iso_r, iso_q = [], []
        for args, kwargs, out in refs:
            iso_r.append(out.float().flatten())
            iso_q.append(qm(*args, **kwargs).float().flatten())
        iso = sqnr_db(torch.cat(iso_r), torch.cat(iso_q))
        e2e = float("nan")
        if len(outs) == len(refs):
            e2e = sqnr_db(torch.cat([o.float().flatten() for _, _, o in refs]),
                          torch.cat([o.float().flatten() for o in outs]))
        w = m_ref.get_submodule(name).weight
        layers.append({"name": name, "type": type(qm).__name__, "in_features": w.shape[1],
                       "out_features": w.shape[0], "sqnr_db": iso, "sqnr_e2e_db": e2e})

    fallbacks, paths = [], {}
    for name, qm in qmods.items():
        if isinstance(qm, Float8Linear):
            paths[qm.gemm_path] = paths.get(qm.gemm_path, 0) + 1
            if qm.fallback_reason:
                fallbacks.append({"name": name, "gemm_path": qm.gemm_path, "reason": qm.fallback_reason})
    info = getattr(m_quant, "quantization", {}) or {}
    mode = info.get("mode") or next(iter({_mode_of(q) for q in qmods.values()}))
    iso_vals = [ly["sqnr_db"] for ly in layers]
    bar.set_description("quantize-report: done")
    return {
        "mode": mode,
        "output_sqnr_db": sqnr_db(y_ref, y_q),
        "min_layer_sqnr_db": min(iso_vals) if iso_vals else float("nan"),
        "mean_layer_sqnr_db": sum(iso_vals) / len(iso_vals) if iso_vals else float("nan"),
        "num_converted": len(qmods),
        "layers": layers,
        "fallbacks": fallbacks,
        "gemm_paths": paths,
        "bytes": {"base_ref": sum(_state_bytes(m_ref.get_submodule(n)) for n in qmods),
                  "base_quant": sum(_state_bytes(q) for q in qmods.values())},
    }


def _mode_of(mod: nn.Module) -> str:
    if isinstance(mod, Float8Linear):
        return "fp8"
    return "int8" if type(mod).__name__ == "Int8Linear" else "nf4"


def format_report(report: dict) -> str:
    """Markdown table of a :func:`quantization_report` result."""
    lines = [f"quantization: {report['mode']}  |  model output SQNR: {report['output_sqnr_db']:.2f} dB  |  "
             f"converted layers: {report['num_converted']}  |  base bytes: "
             f"{report['bytes']['base_ref'] / 2**20:.2f} MiB -> "
             f"{report['bytes']['base_quant'] / 2**20:.2f} MiB",
             "",
             "| layer | type | in | out | SQNR (dB, own error) | SQNR (dB, in model) |",
             "|---|---|---:|---:|---:|---:|"]
    for ly in report["layers"]:
        lines.append(f"| {ly['name']} | {ly['type']} | {ly['in_features']} | {ly['out_features']} | "
                     f"{ly['sqnr_db']:.2f} | {ly['sqnr_e2e_db']:.2f} |")
    lines.append(f"| **model output** | | | | | **{report['output_sqnr_db']:.2f}** |")
    if report.get("gemm_paths"):
        lines += ["", "FP8 GEMM paths: " + ", ".join(f"{k}: {v}" for k, v in report["gemm_paths"].items())]
    for fb in {f["reason"] for f in report.get("fallbacks", [])}:
        lines.append(f"fallback: {fb}")
    return "\n".join(lines)


def _random_inputs(cfg, device, dtype, seed: int, frames: int = 2, height: int = 8, width: int = 8,
                   text_len: int = 8):
    from .wildactor import Reference

    g = torch.Generator().manual_seed(seed)
    c = cfg.in_channels
    latents = torch.randn(1, c, frames, height, width, generator=g)
    refs = [Reference("face", torch.randn(1, c, 1, height // 2, width // 2, generator=g).to(device, dtype)),
            Reference("body", torch.randn(1, c, 1, height, width // 2, generator=g).to(device, dtype))]
    return dict(latents=latents.to(device, dtype), timestep=torch.tensor([500.0], device=device),
                context=torch.randn(1, text_len, cfg.text_dim, generator=g).to(device, dtype), refs=refs)


def _randomize_adapters(m: nn.Module, seed: int) -> None:
    """Trained adapters are not zero: give lora_B small random values so the reference rows
    exercise the adapter path in the report."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in m.named_parameters():
        if name.endswith("lora_B.weight"):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)


def run_quantize_report(preset: str, mode: str, *, device: str | torch.device | None = None,
                        layers: int | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                        print_table: bool = True, attention: str | None = None,
                        progress: bool = False) -> dict:
    """Build a random WildActor (``preset``, ``layers`` blocks), quantize a copy with ``mode`` and
    return :func:`quantization_report` on random latents, text and two references (face, body),
    with ``report["table"]`` the markdown table (printed unless ``print_table=False``).

    ``device=None`` picks CUDA when available. ``layers``: override the depth (for a
    wan2.2-5b-shaped stack on CPU use ``layers=2``). ``dtype``: model and input dtype (bf16: the
    SQNR is measured against the bf16 model, as docs/design.md §7 states). ``attention="fp8"``:
    8-bit self-attention too (:func:`quantize_model`'s flag). ``progress``: a tqdm bar on stderr
    (left in place) over building, quantizing, the two forwards and each converted layer (what
    ``wildactor quantize-report`` shows); off by default.
    """
    from .config import WildActorConfig
    from .wildactor import WildActor

    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; valid modes: {', '.join(MODES)}")
    _check_progress(progress)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = WildActorConfig.preset(preset, **({"num_layers": layers} if layers else {}))
    with torch.device("meta"):  # count the layers to convert without building the model
        n_conv = sum(default_module_filter(mod, fqn) for fqn, mod in WildActor(cfg).named_modules())
    torch.manual_seed(seed)
    with _progress_bar(4 + n_conv, progress) as bar:
        bar.set_description(f"quantize-report: build {preset} ({cfg.num_layers} layers, random weights)")
        m_ref = WildActor(cfg)
        _randomize_adapters(m_ref, seed)
        m_ref = m_ref.to(device=device, dtype=dtype).eval()
        bar.update(1)
        what = mode + (", 8-bit attention" if attention else "")
        bar.set_description(f"quantize-report: quantize a copy ({what})")
        m_q = quantize_model(copy.deepcopy(m_ref), mode, attention=attention)
        bar.update(1)
        qmods = quantized_modules(m_q)
        if len(qmods) != n_conv:  # (a model whose layers the filter counts differently)
            bar.total = 4 + len(qmods)
        with torch.no_grad():
            rep = _report(m_ref, m_q, _random_inputs(cfg, device, dtype, seed), qmods, bar)
    rep.update(preset=preset, num_layers=cfg.num_layers, device=str(device), attention=attention,
               dtype=str(dtype).replace("torch.", ""))
    rep["table"] = (f"preset {preset} ({cfg.num_layers} layers, dim {cfg.dim}), {rep['dtype']} on {device}\n"
                    + format_report(rep))
    if print_table:
        print(rep["table"])
    return rep
