"""Loading and saving WildActor weights (safetensors only, never pickle).

- :func:`load_wan_state_dict`: diffusers ``WanTransformer3DModel`` keys load unchanged; the
  adapter keys (``...lora_A.weight`` / ``...lora_B.weight``) are optional.
- :func:`save_pretrained` / :func:`read_pretrained`: ``config.json`` + ``model.safetensors``.
- :func:`save_adapters` / :func:`load_adapters`: the PEFT-named adapters alone, with their rank
  and ``lora_alpha`` in the file's metadata.
- :func:`read_diffusers`: the config and weights of a diffusers Wan module.
- :func:`validate_state_dict`: the check every loader runs first (also the quantized loader).

Every load is all or nothing: the whole state dict is checked (keys, shapes, dtypes, types,
devices) before the first parameter is written, so a failed load leaves the model unchanged.
The model classmethods ``WildActor.from_pretrained`` / ``from_diffusers`` build on ``meta`` and
load through :func:`load_wan_state_dict`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.nn as nn

from .adapters import is_adapter
from .config import WildActorConfig

# The model is passed in (a WildActor: ``cfg``, ``dtype``, ``state_dict``, ``freeze_backbone``,
# ``adapter_state_dict``); this module never imports model/wildactor.py, which imports it.

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: ``load_adapters(alpha=...)`` modes
ALPHA_MODES = ("check", "model", "file")
#: float8 dtypes: a tensor of one of them holds codes (with a scale elsewhere), never cast into
FP8_CODE_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                   "float8_e5m2fnuz") if hasattr(torch, n))
# diffusers declares these as ignorable when loading a Wan checkpoint.
IGNORED_KEYS = re.compile(r"(^|\.)norm_added_q\.")


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def summarize_keys(keys, limit: int = 12) -> str:
    """Group per-block keys: ``blocks.{0-29}.attn1.to_q.weight`` instead of 30 lines."""
    groups: dict[str, list[int]] = defaultdict(list)
    for k in keys:
        m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
        if m:
            groups["blocks.{}." + m.group(2)].append(int(m.group(1)))
        else:
            groups[k].append(-1)
    lines = []
    for pattern, idx in sorted(groups.items()):
        if idx == [-1]:
            lines.append(pattern)
            continue
        idx = sorted(set(idx))
        runs, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        lines.append(pattern.replace("{}", "{" + ",".join(runs) + "}"))
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n  " + "\n  ".join(lines[:limit]) + more


def _listing(problems: list[str], limit: int = 12) -> str:
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n  " + "\n  ".join(problems[:limit]) + more


def validate_state_dict(state_dict: Any, expected: Mapping[str, Any], *, strict: bool = True,
                        optional: Callable[[str], bool] | None = None, assign: bool = False,
                        source: str = "state dict", target: str = "the model",
                        any_shape: Callable[[str], bool] | None = None) -> LoadResult:
    """Check a whole state dict against the tensors it will overwrite, before anything is written.

    Every loader calls this first, so a load either writes every tensor or none.

    Args:
        state_dict: ``{key: tensor}`` to load.
        expected: the destination, e.g. ``model.state_dict()`` (non-tensor entries are skipped).
        strict: missing (unless ``optional``) and unexpected keys are errors.
        optional: ``key -> bool``: expected keys that may be missing even when ``strict``.
        assign: the tensors will be assigned, not copied (a model built on ``meta``): they must
            all be on one device.
        source, target: names for the messages (e.g. the file path, ``"WildActor(2 layers)"``).
        any_shape: ``key -> bool``: serialized blobs whose length varies (bitsandbytes' packed
            quant state); their type, dtype and device are checked, not their shape.
    Returns:
        ``LoadResult(missing_keys, unexpected_keys)`` (missing ones exclude ``optional`` keys).
    Raises:
        TypeError: ``state_dict`` not a mapping; a key not a str; a value not a ``torch.Tensor``
            (numpy arrays, lists, None, ...); a tensor that is not floating point (int, bool,
            complex) for a floating-point destination, or of another dtype than a non-floating
            or float8 destination (int8 / packed / FP8 codes). Nothing is cast across kinds.
        ValueError: a sparse or ``meta`` tensor; a shape mismatch; tensors on several devices
            with ``assign``; with ``strict``, missing or unexpected keys.
        Each error lists every offending key (the first 12 in full).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{source} must be a mapping of str to torch.Tensor, got {type(state_dict).__name__}")
    types, values = [], []
    devices = set()
    for k, v in state_dict.items():
        if not isinstance(k, str):
            types.append(f"key {k!r}: keys must be str, got {type(k).__name__}")
            continue
        if not isinstance(v, torch.Tensor):
            types.append(f"{k}: expected a torch.Tensor, got {type(v).__name__}")
            continue
        if v.layout != torch.strided:
            values.append(f"{k}: a sparse tensor ({v.layout}); give a dense one")
            continue
        if v.is_meta:
            values.append(f"{k}: on the meta device (no data)")
            continue
        devices.add(v.device)
        want = expected.get(k)
        if not isinstance(want, torch.Tensor):
            continue
        if want.dtype in FP8_CODE_DTYPES:
            if v.dtype != want.dtype:
                types.append(f"{k}: dtype {v.dtype}; this {want.dtype} tensor holds FP8 codes and takes "
                             f"{want.dtype} only (codes are never cast)")
                continue
        elif want.is_floating_point():
            if not v.is_floating_point():
                types.append(f"{k}: dtype {v.dtype} for a {want.dtype} parameter (only floating-point "
                             f"tensors load into it; int/bool/complex are refused, not cast)")
                continue
        elif v.dtype != want.dtype:
            types.append(f"{k}: dtype {v.dtype}; this {want.dtype} tensor takes {want.dtype} only")
            continue
        if tuple(v.shape) != tuple(want.shape) and not (any_shape and any_shape(k)):
            values.append(f"{k}: shape {tuple(v.shape)} in the {source}, {tuple(want.shape)} in {target}")
    if types:
        raise TypeError(f"{len(types)} bad entries in the {source} (nothing was loaded):" + _listing(types))
    if values:
        raise ValueError(f"{len(values)} bad entries in the {source} (nothing was loaded; wrong config?):"
                         + _listing(values))
    if assign and len(devices) > 1:
        raise ValueError(f"the {source} holds tensors on several devices {sorted(map(str, devices))}; a "
                         f"model built on meta takes them as they are: move them to one device first")
    optional = optional or (lambda k: False)
    missing = sorted(k for k, v in expected.items()
                     if isinstance(v, torch.Tensor) and k not in state_dict and not optional(k))
    unexpected = sorted(k for k in state_dict if k not in expected)
    if strict and (missing or unexpected):
        msg = [f"the {source} does not match {target} (nothing was loaded)"]
        if missing:
            msg.append(f"missing {len(missing)} keys:" + summarize_keys(missing))
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} keys:" + summarize_keys(unexpected))
        raise ValueError("\n".join(msg))
    return LoadResult(missing, unexpected)


def read_safetensors(path: str, device: torch.device | str = "cpu"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file; errors name the file."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such safetensors file: {path}") from e
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"cannot read {path} as safetensors: {e}") from e
    return tensors, meta


def _materialize_meta_adapters(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Adapters left on ``meta`` after loading a backbone-only checkpoint get a fresh PEFT init."""
    from wildactor_kernels import RefLoRALinear

    for mod in model.modules():
        if isinstance(mod, RefLoRALinear) and mod.rank > 0 and mod.lora_A.weight.is_meta:
            for lin in (mod.lora_A, mod.lora_B):
                lin.weight = nn.Parameter(torch.empty(lin.weight.shape, device=device, dtype=dtype))
            mod.reset_lora_parameters()


def _quantize_float_weights(own: Mapping[str, Any], state_dict: dict[str, Any]) -> dict[str, Any]:
    """A float weight for an FP8 code tensor (a float checkpoint, e.g. diffusers Wan, loaded into
    an FP8-quantized model) quantized here with its per-channel scale, as the conversion does, so
    that it is checked and written like any other entry instead of being cast to codes."""
    from wildactor_kernels.quant import quantize_weight_fp8

    out = dict(state_dict)
    for k, v in state_dict.items():
        want, scale_key = own.get(k), f"{k}_scale"
        if (isinstance(want, torch.Tensor) and want.dtype in FP8_CODE_DTYPES and scale_key in own
                and isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_meta
                and v.is_floating_point() and v.dtype not in FP8_CODE_DTYPES
                and tuple(v.shape) == tuple(want.shape) and v.ndim == 2):
            out[k], out[scale_key] = quantize_weight_fp8(v.detach())
    return out


def _describe(model: nn.Module) -> str:
    return f"WildActor({model.cfg.num_layers} layers, dim {model.cfg.dim})"


def load_wan_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                        strict: bool = True, source: str = "state dict") -> LoadResult:
    """Load diffusers Wan weights (and optionally adapters) into ``model``: all or nothing.

    Tensors are cast to the dtype of the model's parameters (floating to floating only; a float
    weight for an FP8-quantized layer is quantized with its scale, never cast to codes). On a
    ``meta`` model the tensors are assigned (no copy, unless one is not contiguous), so build
    with ``device="meta"`` to avoid allocating twice; its adapters, when the state dict has
    none, get a fresh PEFT init.

    Raises (before anything is written; see :func:`validate_state_dict`):
        TypeError: a value that is not a tensor, or a non-floating tensor.
        ValueError: shape mismatches, sparse or meta tensors, and (``strict``) missing backbone
            keys or unexpected keys (grouped by block). Missing adapter keys are never an error:
            adapters keep their current values (PEFT init, ``lora_B = 0``: a no-op). On a model
            built on ``meta``, ``strict=False`` with missing backbone keys is an error too: those
            parameters would have no data.
    Returns:
        ``LoadResult(missing_keys, unexpected_keys)`` (missing backbone keys only).
    """
    own = model.state_dict()
    if isinstance(state_dict, Mapping):
        state_dict = {k: v for k, v in state_dict.items()
                      if not (isinstance(k, str) and IGNORED_KEYS.search(k))}
        state_dict = _quantize_float_weights(own, state_dict)
    assign = any(p.is_meta for p in own.values())
    try:
        missing, unexpected = validate_state_dict(state_dict, own, strict=strict, optional=is_adapter,
                                                  assign=assign, source=source, target=_describe(model))
    except ValueError as e:
        if model.cfg.lora_rank == 0 and isinstance(state_dict, Mapping) and any(
                isinstance(k, str) and is_adapter(k) for k in state_dict):
            raise ValueError(f"{e}\n(the checkpoint has LoRA adapters but this model has "
                             f"lora_rank=0)") from None
        raise
    if assign and missing:
        raise ValueError(f"strict=False on a model built on meta: {len(missing)} parameters are not in the "
                         f"{source} and would stay on meta (no data); nothing was loaded:"
                         + summarize_keys(missing))
    # cast first (may allocate), write second: nothing is written unless everything is ready
    # (assigned tensors become the parameters: a strided or expanded view would be a parameter
    # that in-place updates, e.g. an optimizer step, cannot write; contiguous() is free otherwise)
    load = {k: v.detach().to(own[k].dtype) for k, v in state_dict.items() if k in own}
    if assign:
        load = {k: v.contiguous() for k, v in load.items()}
    with torch.no_grad():
        model.load_state_dict(load, strict=False, assign=assign)
    if assign and load:
        _materialize_meta_adapters(model, next(iter(load.values())).device, model.dtype)
    model.freeze_backbone()
    return LoadResult(missing, unexpected)


def _save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    out = {}
    for k, v in tensors.items():
        if v.is_meta:
            raise ValueError(f"cannot save {k}: it is on the meta device (load weights first)")
        out[k] = v.detach().to("cpu").contiguous()
    save_file(out, path, metadata=metadata)


def save_pretrained(model: nn.Module, directory: str) -> None:
    """``directory/config.json`` (the :class:`WildActorConfig`) + ``directory/model.safetensors``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(model.cfg.to_dict(), f, indent=2)
    _save_file(model.state_dict(), os.path.join(directory, WEIGHTS_NAME),
               {"format": "pt", "model": "WildActor"})


def read_config(directory: str) -> WildActorConfig:
    """The :class:`WildActorConfig` of a :func:`save_pretrained` directory. A file that is not JSON,
    not an object or not a WildActor config raises ValueError/TypeError naming the file; a missing
    file raises the OSError of ``open``."""
    cfg_path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")
    try:
        return WildActorConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{cfg_path} is not a WildActor config: {e}") from e


def check_pretrained_header(directory: str, model_shapes: dict[str, tuple[int, ...]]) -> int:
    """Check a :func:`save_pretrained` directory's weights file against ``model_shapes`` (name ->
    shape of the model its config builds) from the safetensors header alone, no tensor read: every
    backbone tensor present in its shape, no tensor the model lacks. Returns the file's element
    count; raises ValueError naming the file and the first offending tensor."""
    from safetensors import safe_open

    w_path = os.path.join(directory, WEIGHTS_NAME)
    try:
        with safe_open(w_path, framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{w_path} cannot be read as safetensors ({first})") from e
    missing = [k for k in model_shapes if not is_adapter(k) and k not in shapes]
    if missing:
        raise ValueError(f"{w_path} lacks {len(missing)} tensor(s) of the model its {CONFIG_NAME} "
                         f"describes (e.g. {missing[0]})")
    unknown = [k for k in shapes if k not in model_shapes and not IGNORED_KEYS.search(k)]
    if unknown:
        raise ValueError(f"{w_path} has {len(unknown)} tensor(s) that the model its {CONFIG_NAME} "
                         f"describes does not have (e.g. {unknown[0]})")
    wrong = [k for k in model_shapes if k in shapes and shapes[k] != model_shapes[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{w_path} has {len(wrong)} tensor(s) whose shape does not match {CONFIG_NAME} "
                         f"(e.g. {k}: {list(shapes[k])}, expected {list(model_shapes[k])})")
    return sum(math.prod(shape) for shape in shapes.values())


def read_pretrained(directory: str, device: torch.device | str | None = None, **overrides
                    ) -> tuple[WildActorConfig, dict[str, torch.Tensor], torch.dtype]:
    """``(config, state dict, saved dtype)`` of a :func:`save_pretrained` directory, for
    :meth:`WildActor.from_pretrained`. ``overrides`` change config fields that do not alter
    shapes (e.g. ``backend="reference"``). Errors name the file."""
    cfg = read_config(directory)
    if overrides:
        cfg = cfg.replace(**overrides)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    sd, _ = read_safetensors(weights_path, device=device or "cpu")
    # the saved compute dtype (a few fp32-kept tensors aside, see WildActor.cast)
    dtype = sd["patch_embedding.weight"].dtype if "patch_embedding.weight" in sd else torch.float32
    if not dtype.is_floating_point:
        raise TypeError(f"{weights_path}: patch_embedding.weight has dtype {dtype}; weights must be "
                        f"floating point")
    return cfg, sd, dtype


def read_diffusers(wan_model: nn.Module, **overrides
                   ) -> tuple[WildActorConfig, dict[str, torch.Tensor], torch.dtype]:
    """``(config, state dict copy, dtype)`` of a diffusers ``WanTransformer3DModel``, for
    :meth:`WildActor.from_diffusers`."""
    if not isinstance(wan_model, nn.Module) or not hasattr(wan_model, "config"):
        raise TypeError(f"wan_model must be a diffusers WanTransformer3DModel, got "
                        f"{type(wan_model).__name__}")
    cfg = WildActorConfig.from_diffusers_config(dict(wan_model.config), **overrides)
    p = next(wan_model.parameters())
    if not p.is_floating_point():
        raise TypeError(f"wan_model parameters must be floating point, got {p.dtype}")
    return cfg, {k: v.clone() for k, v in wan_model.state_dict().items()}, p.dtype


def _model_alpha(cfg: WildActorConfig) -> float:
    return float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank)


def save_adapters(model: nn.Module, path: str) -> None:
    """The reference-only adapters alone, PEFT names, in one ``.safetensors`` file; its metadata
    holds ``lora_rank`` and ``lora_alpha`` (checked by :func:`load_adapters`)."""
    if model.cfg.lora_rank == 0:
        raise ValueError("this model has no adapters (lora_rank=0)")
    meta = {"format": "pt", "lora_rank": str(model.cfg.lora_rank),
            "lora_alpha": repr(_model_alpha(model.cfg))}
    _save_file(model.adapter_state_dict(), path, meta)


def _set_alpha(model: nn.Module, alpha: float) -> None:
    from wildactor_kernels import RefLoRALinear

    rank = model.cfg.lora_rank
    model.cfg = model.cfg.replace(lora_alpha=None if alpha == rank else alpha)
    for mod in model.modules():
        if isinstance(mod, RefLoRALinear) or (hasattr(mod, "alpha") and hasattr(mod, "lora_A")):
            if getattr(mod, "rank", 0):
                mod.alpha = float(alpha)
                if hasattr(mod, "invalidate_fold_cache"):
                    mod.invalidate_fold_cache()


def load_adapters(model: nn.Module, path: str, strict: bool = True, alpha: str = "check") -> None:
    """Load adapters written by :func:`save_adapters` into ``model``: all or nothing.

    Args:
        path: the ``.safetensors`` file.
        strict: missing or unexpected adapter keys are errors.
        alpha: what to do when the file's ``lora_alpha`` differs from the model's (the adapter
            scale ``alpha / rank`` would change the outputs):
            ``"check"`` (default): raise ValueError;
            ``"file"``: adopt the file's alpha (``model.cfg.lora_alpha`` and every adapted layer);
            ``"model"``: keep the model's alpha and load the tensors anyway.
            A file without ``lora_alpha`` metadata (written by another tool) loads with a warning.
    Raises:
        ValueError: unreadable file (named), rank mismatch (always), alpha mismatch (``"check"``),
            non-adapter keys, shape mismatches, sparse/meta tensors, (``strict``) missing or
            unexpected keys; on a model built on ``meta``, adapters the file lacks.
        TypeError: a non-floating tensor. Nothing is written unless every check passes.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    sd, meta = read_safetensors(path)
    cfg = model.cfg
    try:
        rank = int(meta["lora_rank"]) if "lora_rank" in meta else None
        file_alpha = float(meta["lora_alpha"]) if "lora_alpha" in meta else None
    except ValueError as e:
        raise ValueError(f"{path}: unreadable adapter metadata {meta}: {e}") from e
    if rank is not None and rank < 1:
        raise ValueError(f"{path}: lora_rank metadata must be an int >= 1, got {meta['lora_rank']!r}")
    if file_alpha is not None and not (math.isfinite(file_alpha) and file_alpha > 0):
        raise ValueError(f"{path}: lora_alpha metadata must be a finite number > 0, got "
                         f"{meta['lora_alpha']!r}")
    if rank is not None and rank != cfg.lora_rank:
        raise ValueError(f"{path} holds rank-{rank} adapters; this model has lora_rank={cfg.lora_rank}")
    if file_alpha is None:
        logger.warning("%s has no lora_alpha metadata: loading it with the model's alpha %s", path,
                       _model_alpha(cfg))
    elif file_alpha != _model_alpha(cfg) and alpha == "check":
        raise ValueError(f"{path} was saved with lora_alpha={file_alpha:g}; this model has "
                         f"lora_alpha={_model_alpha(cfg):g} (adapter scale alpha/rank differs). Pass "
                         f"alpha='file' to adopt the file's alpha or alpha='model' to keep the model's")
    not_adapters = sorted(k for k in sd if not is_adapter(k))
    if not_adapters:
        raise ValueError(f"{path} holds non-adapter keys (nothing was loaded):"
                         + summarize_keys(not_adapters))
    own = model.adapter_state_dict()
    missing, _ = validate_state_dict(sd, own, strict=strict, source=path,
                                     target=_describe(model) + " adapters")
    meta_left = [k for k in missing if own[k].is_meta]
    if meta_left:
        raise ValueError(f"{path} lacks {len(meta_left)} adapter tensors that are on meta in the model "
                         f"(they would have no data); nothing was loaded:" + summarize_keys(meta_left))
    params = dict(model.named_parameters())
    load = {k: v.to(params[k].dtype if not params[k].is_meta else model.dtype) for k, v in sd.items()
            if k in params}
    with torch.no_grad():
        for k, v in load.items():
            p = params[k]
            if p.is_meta:
                model.get_submodule(k.rsplit(".", 1)[0]).weight = nn.Parameter(v)
            else:
                p.copy_(v)
    if file_alpha is not None and alpha == "file" and file_alpha != _model_alpha(cfg):
        _set_alpha(model, file_alpha)
    model.freeze_backbone()
