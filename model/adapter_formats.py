"""Adapter files in the formats people hold (docs/design.md §11), loaded all or nothing.

==============  =========================================================  =====================
format          file                                                       alpha / scale
==============  =========================================================  =====================
``wildactor``   :meth:`WildActor.save_adapters` (``lora_rank``/``alpha``   from the metadata
                metadata)
``peft``        a PEFT folder: ``adapter_model.safetensors`` +             ``lora_alpha / r`` or
                ``adapter_config.json`` (keys ``base_model.model.``...)    ``/ sqrt(r)`` (rsLoRA)
``diffusers``   ``save_lora_weights`` output (keys ``transformer.``...;    metadata, the
                ``lora_adapter_metadata`` in the safetensors metadata)     ``alpha=`` argument,
                                                                           or ``alpha = r``
``standin``     Stand-In's identity adapter, converted to safetensors      1 (``up(down(x))``)
                (``blocks.{i}.self_attn.{q,k,v}_loras.{down,up}.weight``)
==============  =========================================================  =====================

Module names are diffusers' (``blocks.0.attn1.to_q``); Wan's original names (``self_attn.q``,
``cross_attn.k``, ``ffn.0``, as Stand-In and other trainers write them) are mapped onto them.

Two ways to apply a LoRA (``apply=``):

- ``"references"`` (default): the file's ``A``/``B`` go into WildActor's reference-only adapter
  slots (q/k/v/o of self-attention and both FFN linears, docs/design.md §5). Adapters the file does
  not cover get ``lora_B = 0`` (a no-op), so the model is exactly the file's adapter. This is what
  a reference adapter means (Stand-In's, a WildActor adapter trained with PEFT).
- ``"fuse"``: ``W += scale * B @ A`` into the backbone weights, for a LoRA trained on every token
  (a style or motion LoRA for Wan); any linear of the backbone may be a target. Not undoable.

Every loader returns an :class:`AdapterReport` (and logs it): what was mapped onto what, which
adapter slots the file left at zero, which scale was used and where it came from. Every check
(key names, ranks, shapes, dtypes) runs before the first tensor is written. Weights come from
safetensors only: Stand-In's ``.ckpt`` is a pickle, convert it once with ``torch.load(...,
weights_only=True)`` and ``safetensors.torch.save_file``; it is never unpickled here.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from . import weights
from .adapters import is_adapter

__all__ = ["AdapterReport", "FORMATS", "APPLY_MODES", "detect_format", "adapter_rank", "load_adapter_file",
           "load_peft_adapter", "load_diffusers_lora", "load_standin_adapter", "standin_to_peft_keys"]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "wildactor", "peft", "diffusers", "standin")
APPLY_MODES = ("references", "fuse")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_PEFT_PREFIX = "base_model.model."

# Wan's original module names (Wan repo, DiffSynth, Stand-In) -> diffusers' names
_WAN_NAMES = [
    (re.compile(r"\.self_attn\.(q|k|v)$"), r".attn1.to_\1"),
    (re.compile(r"\.self_attn\.o$"), r".attn1.to_out.0"),
    (re.compile(r"\.cross_attn\.(q|k|v)$"), r".attn2.to_\1"),
    (re.compile(r"\.cross_attn\.o$"), r".attn2.to_out.0"),
    (re.compile(r"\.ffn\.0$"), r".ffn.net.0.proj"),
    (re.compile(r"\.ffn\.2$"), r".ffn.net.2"),
]
# (A suffix, B suffix) spellings of a LoRA pair
_PAIR_SUFFIXES = [(".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
                  (".lora.down.weight", ".lora.up.weight")]
_STANDIN_KEY = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.self_attn\.([qkv])_loras\.(down|up)\.weight$")


@dataclass
class AdapterReport:
    """What an adapter load did.

    Attributes:
        source: the file or folder; format: ``"wildactor" | "peft" | "diffusers" | "standin"``.
        apply: ``"references"`` or ``"fuse"``.
        rank: the LoRA rank; alpha: the alpha the model now uses (``references``); scale: the
            multiplier of ``B @ A`` (``alpha / rank``, ``alpha / sqrt(rank)`` for rsLoRA).
        scale_source: where the scale came from (``"metadata"``, ``"argument"``, ...).
        mapped: ``{file module: model module}`` of every LoRA pair loaded.
        zeroed: model adapter modules the file did not cover (``lora_B`` set to 0: a no-op).
        ignored: file keys not loaded (only with ``strict=False``).
        notes: anything else worth knowing (config changes such as ``ref_time``).
    """

    source: str
    format: str
    apply: str = "references"
    rank: int | None = None
    alpha: float | None = None
    scale: float | None = None
    scale_source: str = ""
    mapped: dict[str, str] = field(default_factory=dict)
    zeroed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.format} adapter {self.source} ({self.apply}): {len(self.mapped)} LoRA pairs mapped, "
                 f"rank {self.rank}, scale {self.scale:g} ({self.scale_source})"
                 if self.scale is not None else
                 f"{self.format} adapter {self.source} ({self.apply}): {len(self.mapped)} LoRA pairs mapped"]
        if self.mapped:
            mapped = sorted(set(self.mapped.values()))
            lines.append("  mapped:" + weights.summarize_keys(mapped).replace("\n", "\n  "))
        if self.zeroed:
            lines.append("  left at zero (not in the file):"
                         + weights.summarize_keys(self.zeroed).replace("\n", "\n  "))
        if self.ignored:
            lines.append("  ignored file keys:" + weights.summarize_keys(self.ignored).replace("\n", "\n  "))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ============================================================================ helpers
def _wan_to_diffusers(module: str) -> str:
    for pat, repl in _WAN_NAMES:
        module = pat.sub(repl, module)
    return module


def _split_pairs(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, tuple], list[str]]:
    """``{module: (A, B)}`` and the keys that are not half of a LoRA pair (``.alpha`` tensors are
    collected as ``{module: alpha}`` under the key ``module + ".alpha"`` in the second list)."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for k, v in sd.items():
        for a_suf, b_suf in _PAIR_SUFFIXES:
            if k.endswith(a_suf):
                halves.setdefault(k[: -len(a_suf)], {})["A"] = v
                break
            if k.endswith(b_suf):
                halves.setdefault(k[: -len(b_suf)], {})["B"] = v
                break
        else:
            other.append(k)
    broken = sorted(m for m, h in halves.items() if len(h) != 2)
    if broken:
        raise ValueError(f"{source}: {len(broken)} LoRA modules have lora_A without lora_B or the "
                         f"reverse (nothing was loaded):" + weights.summarize_keys(broken))
    return {m: (h["A"], h["B"]) for m, h in halves.items()}, other


def _check_tensor(name: str, t: Any, source: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{source}: {name} is a {type(t).__name__}, expected a torch.Tensor")
    if not t.is_floating_point():
        raise TypeError(f"{source}: {name} has dtype {t.dtype}; LoRA weights must be floating point")
    if t.ndim != 2:
        raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}; LoRA weights are 2D")
    return t


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); NaN for a rank < 1 (refused in
    :func:`_apply_pairs` with every other bad module)."""
    if rank < 1:
        return math.nan
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern``: a key matches a module name ending in it (regex)."""
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


def _invalidate(model: nn.Module) -> None:
    for mod in model.modules():
        if hasattr(mod, "invalidate_fold_cache"):
            mod.invalidate_fold_cache()


def _apply_pairs(model: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 scales: dict[str, float], report: AdapterReport, apply: str) -> AdapterReport:
    """Validate every pair against the model, then write (all or nothing)."""
    source = report.source
    for m, (a, b) in pairs.items():
        _check_tensor(m + ".lora_A", a, source)
        _check_tensor(m + ".lora_B", b, source)
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{source}: {m}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             f"disagree on the rank (nothing was loaded)")
    bad = sorted(f"{m}: rank {pairs[m][0].shape[0]}, scale {s!r}" for m, s in scales.items()
                 if pairs[m][0].shape[0] < 1 or not (math.isfinite(s) and s > 0))
    if bad:
        raise ValueError(f"{source}: {len(bad)} LoRA modules have a rank < 1 or an alpha that is not a "
                         f"finite number > 0 (nothing was loaded):" + weights._listing(bad))
    ranks = sorted({a.shape[0] for a, _ in pairs.values()})
    report.rank = ranks[0] if len(ranks) == 1 else None
    if apply == "fuse":
        return _fuse(model, pairs, scales, report)

    own = model.adapter_state_dict()
    slots = sorted({k.rsplit(".lora_", 1)[0] for k in own})
    if not slots:
        raise ValueError(f"{source}: this model has no adapter slots (lora_rank=0); build it with "
                         f"lora_rank={ranks[0] if ranks else 'r'}, or pass apply='fuse'")
    unknown = sorted(m for m in pairs if m not in slots)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} LoRA modules have no reference-adapter slot in WildActor "
                         "(slots: self-attention q/k/v/o and the two FFN linears); nothing was loaded. "
                         "A LoRA trained on every token loads with apply='fuse':"
                         + weights.summarize_keys(unknown))
    rank = model.cfg.lora_rank
    if ranks and ranks != [rank]:
        raise ValueError(f"{source} holds rank-{ranks} adapters; this model has lora_rank={rank}. "
                         f"Build it with lora_rank={ranks[0]} (e.g. WildActor.from_diffusers(t, "
                         f"lora_rank={ranks[0]})); nothing was loaded")
    # one scale for the model (its alpha); a module whose own scale differs gets the ratio folded into B
    base = max(set(scales.values()), key=list(scales.values()).count) if scales else 1.0
    new: dict[str, torch.Tensor] = {}
    for m in slots:
        if m in pairs:
            a, b = pairs[m]
            ratio = scales[m] / base
            new[f"{m}.lora_A.weight"] = a
            new[f"{m}.lora_B.weight"] = b if ratio == 1.0 else b.float() * ratio
        else:
            new[f"{m}.lora_A.weight"] = own[f"{m}.lora_A.weight"]
            new[f"{m}.lora_B.weight"] = torch.zeros_like(own[f"{m}.lora_B.weight"])
            report.zeroed.append(m)
    folded = sorted(m for m in pairs if scales[m] != base)
    if folded:
        report.notes.append(f"{len(folded)} modules have their own alpha; their scale ratio was folded into "
                            "lora_B")
    weights.validate_state_dict(new, own, strict=True, source=source, target="WildActor adapters")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in new.items():
            if v is not own[k]:
                params[k].copy_(v.to(params[k].dtype))
    alpha = base * rank
    weights._set_alpha(model, alpha)
    _invalidate(model)
    model.freeze_backbone()
    report.mapped = report.mapped or {m: m for m in pairs}
    report.alpha, report.scale = alpha, base
    return report


def _fuse(model: nn.Module, pairs, scales, report: AdapterReport) -> AdapterReport:
    source = report.source
    targets, problems = {}, []
    for m, (a, b) in pairs.items():
        try:
            mod = model.get_submodule(m)
        except AttributeError:
            problems.append(f"{m}: no such module in the model")
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            problems.append(f"{m}: not a linear layer")
        elif tuple(w.shape) != (b.shape[0], a.shape[1]):
            problems.append(f"{m}: B @ A is {(b.shape[0], a.shape[1])}, the weight {tuple(w.shape)}")
        else:
            targets[m] = w
    if problems:
        raise ValueError(f"{source}: cannot fuse {len(problems)} LoRA modules (nothing was loaded):"
                         + weights._listing(problems))
    deltas = {m: (scales[m] * (pairs[m][1].float() @ pairs[m][0].float())).to(w.device)
              for m, w in targets.items()}
    with torch.no_grad():
        for m, w in targets.items():
            w.copy_((w.float() + deltas[m]).to(w.dtype))
    _invalidate(model)
    report.mapped = report.mapped or {m: m for m in pairs}
    svals = sorted(set(scales.values()))
    report.scale = svals[0] if len(svals) == 1 else None
    report.notes.append("fused into the backbone weights (applies to every token; not undoable)")
    return report


def _finish(report: AdapterReport) -> AdapterReport:
    (logger.warning if report.zeroed or report.ignored else logger.info)("%s", report)
    return report


def _check_apply(apply: str) -> None:
    if apply not in APPLY_MODES:
        raise ValueError(f"apply must be one of {APPLY_MODES}, got {apply!r}")


def _normalize(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], source: str, strict: bool,
               report: AdapterReport) -> tuple[dict[str, tuple], dict[str, float]]:
    """Strip ``prefixes``, map Wan names, split into pairs; ``.alpha`` tensors -> per-module alphas."""
    keep, foreign = {}, []
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                keep[k[len(p):]] = v
                break
        else:
            foreign.append(k)
    if foreign:
        if strict:
            raise ValueError(f"{source}: {len(foreign)} keys outside {list(prefixes)} (another model's "
                             f"LoRA, e.g. the text encoder's); nothing was loaded. strict=False skips them:"
                             + weights.summarize_keys(foreign))
        report.ignored += sorted(foreign)
    pairs, other = _split_pairs(keep, source)
    alphas: dict[str, float] = {}
    rest = []
    for k in other:
        if k.endswith(".alpha") and isinstance(keep[k], torch.Tensor) and keep[k].numel() == 1:
            alphas[k[: -len(".alpha")]] = float(keep[k])
        else:
            rest.append(k)
    if rest:
        if strict:
            raise ValueError(f"{source}: {len(rest)} keys are not LoRA weights (DoRA magnitudes, biases, "
                             "...); nothing was loaded. strict=False skips "
                             "them:" + weights.summarize_keys(rest))
        report.ignored += sorted(rest)
    mapped = {}
    out = {}
    for m, ab in pairs.items():
        ours = _wan_to_diffusers(m)
        if ours in out:
            raise ValueError(f"{source}: two LoRA pairs map onto {ours}")
        out[ours], mapped[m] = ab, ours
    report.mapped = mapped
    alphas = {_wan_to_diffusers(m): a for m, a in alphas.items()}
    return out, alphas


# ============================================================================ the formats
def load_peft_adapter(model: nn.Module, path: str, *, apply: str = "references",
                      strict: bool = True) -> AdapterReport:
    """Load a PEFT adapter: a folder with ``adapter_model.safetensors`` and ``adapter_config.json``
    (or the ``.safetensors`` file with its ``adapter_config.json`` beside it).

    The config gives ``r``, ``lora_alpha``, ``use_rslora`` (scale ``alpha / sqrt(r)``),
    ``rank_pattern``/``alpha_pattern`` and ``target_modules`` (reported). DoRA is refused.
    """
    _check_apply(apply)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, PEFT_WEIGHTS) if os.path.isdir(path) else path
    cfg_path = os.path.join(folder, PEFT_CONFIG)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            pc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {PEFT_CONFIG} beside {file}: a PEFT adapter needs it for r and "
                                f"lora_alpha") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(pc, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object")
    if pc.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {pc.get('peft_type')!r}; only LORA adapters load")
    if pc.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters (use_dora=true) are not supported")
    sd, _ = weights.read_safetensors(file)
    report = AdapterReport(source=file, format="peft", apply=apply)
    pairs, file_alphas = _normalize(sd, (_PEFT_PREFIX, ""), file, strict, report)
    r, alpha = int(pc.get("r", 8)), float(pc.get("lora_alpha", 8))
    rs = bool(pc.get("use_rslora", False))
    scales = {}
    for m, (a, _) in pairs.items():
        rm = int(_pattern_value(pc.get("rank_pattern"), m, r))
        am = float(_pattern_value(pc.get("alpha_pattern"), m, alpha))
        if a.shape[0] != rm:
            raise ValueError(f"{file}: {m} has rank {a.shape[0]}; {PEFT_CONFIG} says {rm} (nothing was "
                             "loaded)")
        scales[m] = _scale(am, rm, rs)
    report.scale_source = f"{PEFT_CONFIG}: lora_alpha={alpha:g}, r={r}" + (", rsLoRA" if rs else "")
    targets = pc.get("target_modules")
    if targets is not None:
        report.notes.append(f"target_modules: {targets}")
    return _finish(_apply_pairs(model, pairs, scales, report, apply))


def _diffusers_meta(meta: Mapping[str, str], source: str) -> dict[str, Any]:
    raw = meta.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: unreadable {DIFFUSERS_METADATA_KEY} metadata: {e}") from e
    return {k[len("transformer."):]: v for k, v in d.items() if k.startswith("transformer.")}


def load_diffusers_lora(model: nn.Module, path: str, *, alpha: float | None = None,
                        apply: str = "references", strict: bool = True) -> AdapterReport:
    """Load a LoRA file written by diffusers' ``save_lora_weights`` (``transformer.`` keys).

    ``alpha``: the LoRA alpha when the file's metadata has none (an explicit argument wins over the
    metadata, which wins over per-module ``.alpha`` tensors; with none of them ``alpha = r``, scale 1,
    as diffusers itself loads such a file, and the report says so). Keys of other components
    (``text_encoder.``) are refused unless ``strict=False``.
    """
    _check_apply(apply)
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"alpha must be None or a finite number > 0, got {type(alpha).__name__}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be None or a finite number > 0, got {alpha!r}")
    sd, meta = weights.read_safetensors(path)
    report = AdapterReport(source=os.fspath(path), format="diffusers", apply=apply)
    prefixes = ("transformer.", "diffusion_model.") if any(k.startswith("transformer.") for k in sd) \
        else ("diffusion_model.", "")
    pairs, file_alphas = _normalize(sd, prefixes, report.source, strict, report)
    md = _diffusers_meta(meta, report.source)
    rs = bool(md.get("use_rslora", False))
    scales = {}
    for m, (a, _) in pairs.items():
        r = a.shape[0]
        if alpha is not None:
            am, src = float(alpha), "argument"
        elif "lora_alpha" in md:
            am = float(_pattern_value(md.get("alpha_pattern"), m, md["lora_alpha"]))
            src = "metadata"
        elif m in file_alphas:
            am, src = file_alphas[m], ".alpha tensors"
        else:
            am, src = float(r), "none in the file: alpha = rank (scale 1), as diffusers loads it"
        scales[m] = _scale(am, r, rs)
        report.scale_source = src + (", rsLoRA" if rs else "")
    if report.scale_source.startswith("none"):
        report.notes.append("no alpha in the file or the arguments: alpha = rank assumed; pass alpha= "
                            "if the adapter was trained with another")
    return _finish(_apply_pairs(model, pairs, scales, report, apply))


def standin_to_peft_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stand-In's key names -> ours: ``blocks.{i}.self_attn.{q,k,v}_loras.{down,up}.weight`` ->
    ``blocks.{i}.attn1.to_{q,k,v}.lora_{A,B}.weight``. Other keys raise ValueError."""
    out, bad = {}, []
    for k, v in state_dict.items():
        m = _STANDIN_KEY.match(k)
        if not m:
            bad.append(k)
            continue
        i, proj, half = m.groups()
        out[f"blocks.{i}.attn1.to_{proj}.lora_{'A' if half == 'down' else 'B'}.weight"] = v
    if bad:
        raise ValueError(f"{len(bad)} keys are not Stand-In adapter keys "
                         "(blocks.i.self_attn.q_loras.down.weight, "
                         f"...); nothing was loaded:" + weights.summarize_keys(bad))
    return out


def load_standin_adapter(model: nn.Module, path_or_state_dict: str | Mapping[str, torch.Tensor], *,
                         set_ref_time: bool = True) -> AdapterReport:
    """Load Stand-In's identity adapter (rank-128 LoRA on self-attention q/k/v of reference rows).

    Stand-In adds ``up(down(x))`` (scale 1) to q, k, v of the reference rows only; o and the FFN
    carry no adapter (left at zero here), references use timestep 0 and skip cross-attention, and
    sit at time ``t = -1`` with the same spatial shift as WildActor's. ``set_ref_time=True`` switches
    the model to ``ref_time="before"`` (reported); ``False`` leaves the layout and notes it.

    Stand-In attends each reference to itself only; with one reference (its released use) that is
    what WildActor computes. With several, WildActor lets references read one another.
    """
    if isinstance(path_or_state_dict, Mapping):
        sd, source = dict(path_or_state_dict), "Stand-In state dict"
    else:
        source = os.fspath(path_or_state_dict)
        if not source.endswith(".safetensors"):
            raise ValueError(f"{source}: Stand-In's .ckpt is a pickle and is never unpickled here; "
                             f"convert it once with torch.load(path, weights_only=True) and "
                             f"safetensors.torch.save_file")
        sd, _ = weights.read_safetensors(source)
    ours = standin_to_peft_keys(sd)
    report = AdapterReport(source=source, format="standin", apply="references")
    pairs, _ = _split_pairs(ours, source)
    report.mapped = {f"blocks.{m.split('.')[1]}.self_attn.{m[-1]}_loras": m for m in pairs}
    report.scale_source = "Stand-In adds up(down(x)): scale 1"
    _apply_pairs(model, pairs, {m: 1.0 for m in pairs}, report, "references")
    report.notes.append("Stand-In attends each reference to itself only: give one reference (its released "
                        "use); with several, WildActor lets references read one another")
    if model.cfg.ref_time != "before":
        if set_ref_time:
            model.cfg = model.cfg.replace(ref_time="before")
            report.notes.append("model switched to ref_time='before' (references at t = -1, "
                                "Stand-In's layout)")
        else:
            report.notes.append("model keeps ref_time='after': references are NOT where Stand-In was "
                                "trained to find them (t = -1)")
    return _finish(report)


def detect_format(path: str) -> str:
    """``"peft" | "diffusers" | "standin" | "wildactor"`` from a folder or a safetensors file's keys."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, PEFT_CONFIG)):
            return "peft"
        raise ValueError(f"{path} is a folder without {PEFT_CONFIG}; give the adapter file")
    if os.path.exists(os.path.join(os.path.dirname(os.fspath(path)), PEFT_CONFIG)) and \
            os.path.basename(path) == PEFT_WEIGHTS:
        return "peft"
    sd, meta = weights.read_safetensors(path)
    keys = list(sd)
    if keys and all(_STANDIN_KEY.match(k) for k in keys):
        return "standin"
    if "lora_rank" in meta and all(is_adapter(k) for k in keys):
        return "wildactor"
    if any(k.startswith("transformer.") for k in keys) or DIFFUSERS_METADATA_KEY in meta:
        return "diffusers"
    if any(k.startswith(_PEFT_PREFIX) for k in keys):
        raise ValueError(f"{path} has PEFT keys but no {PEFT_CONFIG} beside it (needed for r and lora_alpha)")
    if keys and all(is_adapter(k) for k in keys):
        return "wildactor"
    raise ValueError(f"{path}: cannot tell the adapter format from its keys (e.g. {keys[:3]}); pass format=")


def adapter_rank(path: str, format: str = "auto") -> int:
    """The LoRA rank of an adapter file or PEFT folder (any supported format), read from the file's
    header without loading the tensors: the ``lora_rank`` to build a model that takes the file with."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    from safetensors import safe_open

    path = os.fspath(path)
    fmt = detect_format(path) if format == "auto" else format
    file = os.path.join(path, PEFT_WEIGHTS) if os.path.isdir(path) else path
    down = tuple(a for a, _ in _PAIR_SUFFIXES) + ("_loras.down.weight",)
    ranks = set()
    with safe_open(file, framework="pt") as f:
        meta = f.metadata() or {}
        if fmt == "wildactor" and "lora_rank" in meta:
            return int(meta["lora_rank"])
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            if k.endswith(down) and len(shape) == 2:
                ranks.add(int(shape[0]))
    if len(ranks) != 1:
        raise ValueError(f"{file}: cannot tell one LoRA rank (found {sorted(ranks)}); give lora_rank= "
                         "yourself")
    return ranks.pop()


def load_adapter_file(model: nn.Module, path: str, format: str = "auto", *, alpha: float | None = None,
                      apply: str = "references", strict: bool = True) -> AdapterReport:
    """Load an adapter file of any supported format (``format="auto"`` detects it); see the module
    docstring. Returns (and logs) an :class:`AdapterReport`."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = os.fspath(path)
    fmt = detect_format(path) if format == "auto" else format
    if alpha is not None and fmt != "diffusers":  # never ignored silently
        raise ValueError(f"alpha= applies to diffusers LoRA files only; {path} is a {fmt} adapter, which "
                         f"carries its own alpha (PEFT: adapter_config.json; WildActor: its metadata)")
    if fmt == "peft":
        return load_peft_adapter(model, path, apply=apply, strict=strict)
    if fmt == "diffusers":
        return load_diffusers_lora(model, path, alpha=alpha, apply=apply, strict=strict)
    if fmt == "standin":
        return load_standin_adapter(model, path)
    if apply != "references":
        raise ValueError("a WildActor adapter file loads into the reference adapters only "
                         "(apply='references')")
    weights.load_adapters(model, path, strict=strict, alpha="file")
    report = AdapterReport(source=path, format="wildactor", rank=model.cfg.lora_rank,
                           alpha=float(model.cfg.lora_alpha or model.cfg.lora_rank),
                           scale=model.cfg.lora_scale, scale_source="file metadata")
    report.mapped = {k.rsplit(".lora_", 1)[0]: k.rsplit(".lora_", 1)[0] for k in model.adapter_state_dict()}
    return _finish(report)
