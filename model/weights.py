"""Loading and saving WildActor weights (safetensors only, never pickle).

- :func:`load_wan_state_dict`: diffusers ``WanTransformer3DModel`` keys load unchanged; the
  adapter keys (``...lora_A.weight`` / ``...lora_B.weight``) are optional.
- :func:`save_pretrained` / :func:`read_pretrained`: ``config.json`` + ``model.safetensors``.
- :func:`save_adapters` / :func:`load_adapters`: the PEFT-named adapters alone.
- :func:`read_diffusers`: the config and weights of a diffusers Wan module.

The model classmethods ``WildActor.from_pretrained`` / ``from_diffusers`` build on ``meta`` and
load through :func:`load_wan_state_dict`.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Mapping, NamedTuple

import torch
import torch.nn as nn

from .adapters import is_adapter
from .config import WildActorConfig

# The model is passed in (a WildActor: ``cfg``, ``dtype``, ``state_dict``, ``freeze_backbone``,
# ``adapter_state_dict``); this module never imports model/wildactor.py, which imports it.

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# diffusers declares these as ignorable when loading a Wan checkpoint.
_IGNORED_KEYS = re.compile(r"(^|\.)norm_added_q\.")


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


def _materialize_meta_adapters(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Adapters left on ``meta`` after loading a backbone-only checkpoint get a fresh PEFT init."""
    from wildactor_kernels import RefLoRALinear

    for mod in model.modules():
        if isinstance(mod, RefLoRALinear) and mod.rank > 0 and mod.lora_A.weight.is_meta:
            for lin in (mod.lora_A, mod.lora_B):
                lin.weight = nn.Parameter(torch.empty(lin.weight.shape, device=device, dtype=dtype))
            mod.reset_lora_parameters()


def load_wan_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                        strict: bool = True) -> LoadResult:
    """Load diffusers Wan weights (and optionally adapters) into ``model``.

    Tensors are cast to the dtype of the model's parameters. On a ``meta`` model the tensors are
    assigned (no copy), so build with ``device="meta"`` to avoid allocating twice.

    Raises:
        ValueError: shape mismatches (always), and missing backbone keys or unexpected keys when
            ``strict`` (grouped by block in the message). Missing adapter keys are never an error:
            adapters keep their current values (PEFT init, ``lora_B = 0``: a no-op).
    Returns:
        ``LoadResult(missing_keys, unexpected_keys)`` (missing backbone keys only).
    """
    own = model.state_dict()
    sd = {k: v for k, v in state_dict.items() if not _IGNORED_KEYS.search(k)}
    missing = sorted(k for k in own if k not in sd and not is_adapter(k))
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(sd) if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if mismatched:
        raise ValueError(f"{len(mismatched)} shape mismatches loading into WildActor "
                         f"(wrong config?):\n  " + "\n  ".join(mismatched[:12]))
    if strict and (missing or unexpected):
        msg = [f"state dict does not match WildActor({model.cfg.num_layers} layers, dim {model.cfg.dim})"]
        if missing:
            msg.append(f"missing {len(missing)} keys:" + summarize_keys(missing))
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} keys:" + summarize_keys(unexpected))
        if any(is_adapter(k) for k in unexpected) and model.cfg.lora_rank == 0:
            msg.append("(the checkpoint has LoRA adapters but this model has lora_rank=0)")
        raise ValueError("\n".join(msg))
    assign = any(p.is_meta for p in own.values())
    load = {k: v.to(own[k].dtype) for k, v in sd.items() if k in own}
    if assign:
        # Tensors are taken as they are: keep them on their device, as the requested dtype.
        load = {k: v.detach() for k, v in load.items()}
    with torch.no_grad():
        model.load_state_dict(load, strict=False, assign=assign)
    if assign:
        ref = next(iter(load.values())) if load else None
        if ref is not None:
            _materialize_meta_adapters(model, ref.device, model.dtype)
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


def read_pretrained(directory: str, device: torch.device | str | None = None, **overrides
                    ) -> tuple[WildActorConfig, dict[str, torch.Tensor], torch.dtype]:
    """``(config, state dict, saved dtype)`` of a :func:`save_pretrained` directory, for
    :meth:`WildActor.from_pretrained`. ``overrides`` change config fields that do not alter
    shapes (e.g. ``backend="reference"``)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
        cfg = WildActorConfig.from_dict(json.load(f))
    if overrides:
        cfg = cfg.replace(**overrides)
    sd = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(device or "cpu"))
    # the saved compute dtype (a few fp32-kept tensors aside, see WildActor.cast)
    dtype = sd["patch_embedding.weight"].dtype if "patch_embedding.weight" in sd else torch.float32
    return cfg, sd, dtype


def read_diffusers(wan_model: nn.Module, **overrides
                   ) -> tuple[WildActorConfig, dict[str, torch.Tensor], torch.dtype]:
    """``(config, state dict copy, dtype)`` of a diffusers ``WanTransformer3DModel``, for
    :meth:`WildActor.from_diffusers`."""
    cfg = WildActorConfig.from_diffusers_config(dict(wan_model.config), **overrides)
    p = next(wan_model.parameters())
    return cfg, {k: v.clone() for k, v in wan_model.state_dict().items()}, p.dtype


def save_adapters(model: nn.Module, path: str) -> None:
    """The reference-only adapters alone, PEFT names, in one ``.safetensors`` file."""
    if model.cfg.lora_rank == 0:
        raise ValueError("this model has no adapters (lora_rank=0)")
    alpha = model.cfg.lora_alpha if model.cfg.lora_alpha is not None else model.cfg.lora_rank
    meta = {"format": "pt", "lora_rank": str(model.cfg.lora_rank), "lora_alpha": str(alpha)}
    _save_file(model.adapter_state_dict(), path, meta)


def load_adapters(model: nn.Module, path: str, strict: bool = True) -> None:
    """Load adapters written by :func:`save_adapters` into ``model`` (same rank).

    Raises ValueError on a rank mismatch, on non-adapter keys, and (``strict``) on missing or
    unexpected adapter keys.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    rank = int(meta.get("lora_rank", -1))
    if rank >= 0 and rank != model.cfg.lora_rank:
        raise ValueError(f"adapter file has rank {rank}; this model has lora_rank={model.cfg.lora_rank}")
    sd = load_file(path)
    not_adapters = sorted(k for k in sd if not is_adapter(k))
    if not_adapters:
        raise ValueError("adapter file holds non-adapter keys:" + summarize_keys(not_adapters))
    own = model.adapter_state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        msg = ["adapter keys do not match the model"]
        if missing:
            msg.append(f"missing {len(missing)}:" + summarize_keys(missing))
        if unexpected:
            msg.append(f"unexpected {len(unexpected)}:" + summarize_keys(unexpected))
        raise ValueError("\n".join(msg))
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"adapter shapes differ, e.g. {bad[0]}: file {tuple(sd[bad[0]].shape)} vs model "
                         f"{tuple(own[bad[0]].shape)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            if k not in params:
                continue
            p = params[k]
            if p.is_meta:
                params_owner = model.get_submodule(k.rsplit(".", 1)[0])
                params_owner.weight = nn.Parameter(v.to(model.dtype))
            else:
                p.copy_(v)
    model.freeze_backbone()
