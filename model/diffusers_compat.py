"""Interop with diffusers' Wan stack (docs/design.md §11).

- :class:`DiffusersConfig`: the read-only ``config`` a diffusers pipeline reads from its
  ``transformer`` (``transformer.config.patch_size``, ``.in_channels``, ...): the keyword arguments of
  the matching ``WanTransformer3DModel``, readable as attributes or as a mapping.
- :class:`TransformerOutput`: what ``WildActor(..., return_dict=True)`` returns (``.sample``), the
  shape of diffusers' ``Transformer2DModelOutput``.
- :func:`patch_diffusers_wan`: for users who keep diffusers' own ``WanTransformer3DModel``: swap
  every self-attention processor for :class:`FusedWanSelfAttnProcessor` (our fused q/k RMSNorm +
  RoPE prologue and our attention op); the output is unchanged (fp32, within 1e-5).
- :func:`register_with_diffusers`: make WildActor a component class diffusers' pipelines save and
  load (``WanPipeline.save_pretrained`` / ``from_pretrained``).

Nothing here imports diffusers at module level: WildActor works without it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

import wildactor_kernels as wk

__all__ = ["DiffusersConfig", "TransformerOutput", "FusedWanSelfAttnProcessor", "patch_diffusers_wan",
           "unpatch_diffusers_wan", "ATTENTION_KWARGS", "register_with_diffusers", "DIFFUSERS_LIBRARY"]

logger = logging.getLogger(__name__)

#: the keys :meth:`WildActor.forward` reads from diffusers' ``attention_kwargs``
ATTENTION_KWARGS = ("refs", "ref_cache")
#: the library under which WildActor is entered in diffusers' table of loadable classes
DIFFUSERS_LIBRARY = "wildactor_kernels.model"
_SAVE_LOAD = ("save_pretrained", "from_pretrained")


def register_with_diffusers() -> None:
    """Make :class:`WildActor` a component that diffusers' pipelines save and load.

    ``DiffusionPipeline.save_pretrained`` writes only components whose class it knows (its
    ``LOADABLE_CLASSES`` table) and skips the others with a warning; ``from_pretrained`` reads
    ``model_index.json`` through the same table. This enters WildActor there with its own
    ``save_pretrained`` / ``from_pretrained``, so ``WanPipeline(..., transformer=wa).save_pretrained(d)``
    writes ``d/transformer`` as a WildActor folder (adapters included) and
    ``WanPipeline.from_pretrained(d)`` gives the WildActor back (``model_index.json`` names it
    ``["wildactor_kernels.model.wildactor", "WildActor"]``; diffusers looks that module up among
    the imported ones, so import WildActor before loading).

    Idempotent. It runs by itself when a WildActor is built (or ``wildactor_kernels.model`` is
    imported) while diffusers is already imported; call it yourself when diffusers comes later.
    """
    from diffusers.pipelines import pipeline_loading_utils as plu

    plu.LOADABLE_CLASSES.setdefault(DIFFUSERS_LIBRARY, {})["WildActor"] = list(_SAVE_LOAD)
    plu.ALL_IMPORTABLE_CLASSES["WildActor"] = list(_SAVE_LOAD)


def register_if_diffusers_loaded() -> bool:
    """:func:`register_with_diffusers` when diffusers is already imported (never imports it);
    returns whether WildActor is registered."""
    if sys.modules.get("diffusers") is None:  # not imported (or blocked with a None entry)
        return False
    plu = sys.modules.get("diffusers.pipelines.pipeline_loading_utils")
    if plu is not None and "WildActor" in plu.LOADABLE_CLASSES.get(DIFFUSERS_LIBRARY, {}):
        return True
    try:
        register_with_diffusers()
    except Exception as e:  # an unexpected diffusers layout: saving through its pipelines will skip us
        logger.warning("could not register WildActor with diffusers' pipelines (%s: %s); "
                       "WanPipeline.save_pretrained will skip a WildActor transformer", type(e).__name__, e)
        return False
    return True


class DiffusersConfig(Mapping[str, Any]):
    """A read-only mapping with attribute access (the part of diffusers' ``FrozenDict`` that its
    pipelines use): ``cfg.patch_size`` and ``cfg["patch_size"]`` are the same value."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"the transformer config has no field {name!r}; fields: "
                                 f"{sorted(self._data)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the transformer config is read-only (change WildActor.cfg instead)")

    def __repr__(self) -> str:
        return f"DiffusersConfig({self._data!r})"


@dataclass
class TransformerOutput:
    """``sample``: the velocity ``[B, out_channels, T, H, W]`` (diffusers' ``Transformer2DModelOutput``)."""

    sample: torch.Tensor

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.to_tuple()[i]

    def to_tuple(self) -> tuple[torch.Tensor]:
        return (self.sample,)


# ============================================================================ patching diffusers' Wan
class FusedWanSelfAttnProcessor:
    """Self-attention of a diffusers ``WanAttention`` with our kernels.

    q/k/v projections as diffusers makes them (fused ``to_qkv`` included), then
    :func:`wildactor_kernels.qk_norm_rope` (RMSNorm across heads + 3D RoPE in one pass) and
    :func:`wildactor_kernels.asym_attention` with no references (plain full attention), then the
    output projection. Cross-attention layers are not handled (``patch_diffusers_wan`` leaves them).

    ``rotary_emb`` is diffusers' ``(freqs_cos, freqs_sin)``, ``[1, N, 1, D]`` with each angle
    repeated for the two channels of its pair; the processor reads one value per pair.
    """

    # read by diffusers' attention-backend and context-parallel plumbing; neither applies here
    _attention_backend = None
    _parallel_config = None

    def __init__(self, backend: str = "auto"):
        if backend not in wk.BACKENDS:
            raise ValueError(f"backend must be one of {wk.BACKENDS}, got {backend!r}")
        self.backend = backend

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or getattr(attn, "add_k_proj", None) is not None:
            raise ValueError("FusedWanSelfAttnProcessor serves self-attention only (attn1)")
        if attention_mask is not None:
            raise ValueError("FusedWanSelfAttnProcessor takes no attention_mask (Wan's self-attention has "
                             "none)")
        if rotary_emb is None:
            raise ValueError("FusedWanSelfAttnProcessor needs diffusers' rotary_emb (freqs_cos, freqs_sin)")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        h = attn.heads
        q, k, v = (t.unflatten(-1, (h, -1)) for t in (q, k, v))
        freqs_cos, freqs_sin = rotary_emb
        n = q.shape[1]
        cos = freqs_cos.reshape(n, -1)[:, 0::2].float()
        sin = freqs_sin.reshape(n, -1)[:, 1::2].float()
        eps_q, eps_k = attn.norm_q.eps, attn.norm_k.eps
        if eps_q != eps_k:
            raise ValueError(f"norm_q.eps={eps_q} and norm_k.eps={eps_k} differ; the fused prologue takes "
                             "one eps")
        q, k = wk.qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, cos, sin,
                               1e-6 if eps_q is None else eps_q, backend=self.backend)
        o = wk.asym_attention(q, k, v, n, backend=self.backend)
        o = o.flatten(2).type_as(q)
        o = attn.to_out[0](o)
        return attn.to_out[1](o)


def _self_attentions(transformer: nn.Module) -> list[nn.Module]:
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn1") for b in blocks):
        raise TypeError(f"transformer must be a diffusers WanTransformer3DModel (blocks[i].attn1), got "
                        f"{type(transformer).__name__}")
    return [b.attn1 for b in blocks]


def patch_diffusers_wan(transformer: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap the self-attention of a diffusers ``WanTransformer3DModel`` to our kernels, in place.

    Every ``blocks[i].attn1`` gets a :class:`FusedWanSelfAttnProcessor` (fused q/k RMSNorm + RoPE,
    our attention op); cross-attention, embeddings and the head stay diffusers'. Weights are not
    touched, so :func:`unpatch_diffusers_wan` restores the original processors.

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (text-to-video or image-conditioned; only
            self-attention is swapped).
        backend: kernel backend, ``"auto" | "triton" | "reference"``.
    Returns:
        ``transformer`` itself.
    """
    attns = _self_attentions(transformer)
    proc = FusedWanSelfAttnProcessor(backend)
    for a in attns:
        if not hasattr(a, "_wildactor_original_processor"):
            a._wildactor_original_processor = a.processor
        a.set_processor(proc)
    logger.info("patch_diffusers_wan: %d self-attention layers now use the fused q/k norm + RoPE and "
                "wildactor_kernels attention (backend=%s)", len(attns), backend)
    return transformer


def unpatch_diffusers_wan(transformer: nn.Module) -> nn.Module:
    """Undo :func:`patch_diffusers_wan` (restore each layer's original processor)."""
    for a in _self_attentions(transformer):
        orig = a.__dict__.pop("_wildactor_original_processor", None)
        if orig is not None:
            a.set_processor(orig)
    return transformer
