"""The WildActor model (docs/design.md §6): a Wan DiT conditioned on text and on reference images.

Backbone: the text-to-video DiT of Wan2.1 / Wan2.2 with the parameter names of diffusers
``WanTransformer3DModel`` (so its state dicts load unchanged). WildActor adds, per block:

- reference latents ``[B, C, 1, h, w]`` patch-embedded with the same ``Conv3d``, appended after
  the video tokens (``Nv`` video rows, then ``Nr`` reference rows);
- per-segment adaLN modulation: video rows use ``temb(t)``, reference rows ``temb(0)``;
- asymmetric self-attention (AIPA): references see only references, video sees both;
- reference-only LoRA on self-attention q/k/v/o and both FFN linears;
- no cross-attention for reference rows; only video rows reach the output head;
- I-RoPE positions (docs/design.md §3) for every token.

Because reference rows never read video rows and use timestep 0, their keys/values in every
layer are a pure function of the reference latents: :meth:`WildActor.encode_references` computes
them once (a :class:`RefCache`) and the cached path reuses them for every step and CFG branch.

Two code paths, which must agree (tests check it to ~1e-5 in fp32):

- joint (``forward(..., refs=[...])``): one sequence of ``Nv + Nr`` tokens through
  :func:`wildactor_kernels.asym_attention` and ``RefLoRALinear`` with ``num_video=Nv``;
- cached (``forward(..., ref_cache=cache)`` = :meth:`WildActor.denoise`): video tokens only,
  attention by :func:`wildactor_kernels.cached_asym_attention` over the cached reference K/V.

Shape vocabulary: ``B`` batch, ``Nv``/``Nr`` video/reference tokens, ``H`` heads, ``D`` head dim,
``L`` text tokens; attention tensors use the flash-attn layout ``[B, N, H, D]``.

This file holds the maths; the plumbing lives beside it: ``references.py`` (:class:`Reference`,
:class:`RefCache` and ``bind_ref_cache``, shared with the ONNX/TensorRT runners), ``checks.py``
(input checks), ``rope_tables.py`` (the thread-safe I-RoPE table cache), ``weights.py``
(loading, all or nothing) and ``adapters.py`` (adapter key names). The kernel backend lives in
``cfg.backend`` alone, read by every op at call time through :class:`ConfigRef`.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import wildactor_kernels as wk
from wildactor_kernels import RefLoRALinear, TokenLayout

from . import checks, weights
from .adapters import is_adapter
from .config import WildActorConfig
from .diffusers_compat import (
    ATTENTION_KWARGS,
    DiffusersConfig,
    TransformerOutput,
    register_if_diffusers_loaded,
)
from .references import RefCache, Reference, bind_ref_cache
from .rope_tables import RopeTableCache

__all__ = ["WildActor", "WildActorConfig", "Reference", "RefCache", "KEEP_FP32"]

#: parameters kept in fp32 by :meth:`WildActor.cast` (diffusers' ``_keep_in_fp32_modules``)
KEEP_FP32 = re.compile(r"^(condition_embedder\.time_embedder\.|(blocks\.\d+\.)?scale_shift_table$"
                       r"|blocks\.\d+\.norm2\.)")
Tensor = torch.Tensor


# ============================================================================ building blocks
class FP32LayerNorm(nn.Module):
    """LayerNorm computed in fp32; returns fp32 (callers cast back). Optional affine weight/bias."""

    def __init__(self, dim: int, eps: float, affine: bool, device=None, dtype=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        if affine:
            self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (Wan normalises q/k across all heads), fp32 maths, input dtype out."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class MLP(nn.Module):
    """``linear_2(act(linear_1(x)))`` (diffusers ``TimestepEmbedding`` / ``PixArtAlphaTextProjection``)."""

    def __init__(self, d_in: int, d_hidden: int, act: Callable[[Tensor], Tensor], device=None, dtype=None):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(d_hidden, d_hidden, device=device, dtype=dtype)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def timestep_sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos | sin]`` of float timesteps ``t [M]`` -> fp32 ``[M, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


class ConditionEmbedder(nn.Module):
    """Timestep and text embeddings (diffusers ``WanTimeTextImageEmbedding``, text-to-video)."""

    def __init__(self, cfg: WildActorConfig, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.freq_dim, self.dim = cfg.freq_dim, cfg.dim
        self.time_embedder = MLP(cfg.freq_dim, cfg.dim, F.silu, **fk)
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim, **fk)
        self.text_embedder = MLP(cfg.text_dim, cfg.dim, lambda x: F.gelu(x, approximate="tanh"), **fk)

    def time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``t [M]`` float in ``[0, 1000]`` -> ``temb [M, dim]`` and the 6-vector modulation input
        ``e [M, 6, dim]``, in the dtype of ``time_proj`` (the time embedder itself may stay fp32)."""
        s = timestep_sinusoid(t, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(s).to(self.time_proj.weight.dtype)
        e = self.time_proj(F.silu(temb)).unflatten(-1, (6, self.dim))
        return temb, e

    def text(self, context: Tensor) -> Tensor:
        """``context [B, L, text_dim]`` -> ``[B, L, dim]``."""
        return self.text_embedder(context)


class ConfigRef:
    """The model's config, one mutable reference shared by the layers that read it at call time.

    The kernel backend lives in ``WildActor.cfg.backend`` only: :meth:`WildActor.set_backend`
    swaps the (frozen) config here and every layer sees it on its next call.
    """

    __slots__ = ("cfg",)

    def __init__(self, cfg: WildActorConfig):
        self.cfg = cfg


class AdapterLinear(RefLoRALinear):
    """:class:`~wildactor_kernels.RefLoRALinear` whose ``backend`` is the model's, read at call time.

    Assigning ``layer.backend = "triton"`` pins that one layer (e.g. to run only the LoRA kernels
    on Triton); ``layer.backend = None`` or :meth:`WildActor.set_backend` unpins it.
    """

    def __init__(self, d_in: int, d_out: int, ref: ConfigRef, device=None, dtype=None):
        object.__setattr__(self, "_ref", ref)  # read by the backend property during super().__init__
        cfg = ref.cfg
        super().__init__(d_in, d_out, bias=True, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                         backend=cfg.backend, device=device, dtype=dtype)
        self._pinned: str | None = None

    @property
    def backend(self) -> str:
        pinned = self.__dict__.get("_pinned")
        return pinned if pinned is not None else self._ref.cfg.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.__dict__["_pinned"] = value


class SelfAttention(nn.Module):
    """``attn1``: q/k/v/o are :class:`RefLoRALinear` (adapter on reference rows only); q/k get
    RMSNorm across heads and I-RoPE; attention is asymmetric (docs/design.md §4)."""

    def __init__(self, ref: ConfigRef, device=None, dtype=None):
        super().__init__()
        cfg = ref.cfg
        d = cfg.dim
        self._ref = ref
        self.heads, self.eps = cfg.num_heads, cfg.eps

        def lin() -> AdapterLinear:
            return AdapterLinear(d, d, ref, device=device, dtype=dtype)

        self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
        self.to_out = nn.ModuleList([lin()])
        self.norm_q = RMSNorm(d, cfg.eps, device=device, dtype=dtype)
        self.norm_k = RMSNorm(d, cfg.eps, device=device, dtype=dtype)
        # None: attention in the activations' dtype; "fp8": 8-bit attention (inference only),
        # set by quantize_model(..., attention="fp8")
        self.precision: str | None = None

    @property
    def backend(self) -> str:
        """The model's kernel backend (read at call time)."""
        return self._ref.cfg.backend

    def qkv(self, h: Tensor, num_video: int, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``h [B, N, dim]`` -> normed, rotated ``q, k`` and ``v``, each ``[B, N, H, D]``."""
        q = self.to_q(h, num_video).unflatten(-1, (self.heads, -1))
        k = self.to_k(h, num_video).unflatten(-1, (self.heads, -1))
        v = self.to_v(h, num_video).unflatten(-1, (self.heads, -1))
        q, k = wk.qk_norm_rope(q, k, self.norm_q.weight, self.norm_k.weight, cos, sin, self.eps,
                               backend=self.backend)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, num_video: int,
               ref_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Attention + output projection -> ``[B, N, dim]``.

        Without ``ref_kv``: AIPA over the joint sequence (``num_video`` video rows first).
        With ``ref_kv = (ref_k, ref_v)`` (``[B, Nr, H, D]``, rotated): q/k/v are video-only and the
        video queries also read the cached reference keys.
        """
        if ref_kv is None:
            o = wk.asym_attention(q, k, v, num_video, backend=self.backend, precision=self.precision)
        else:
            o = wk.cached_asym_attention(q, k, v, ref_kv[0], ref_kv[1], backend=self.backend,
                                         precision=self.precision)
        return self.to_out[0](o.flatten(2), num_video)


class CrossAttention(nn.Module):
    """``attn2``: video rows attend to the text tokens (plain linears, q/k RMSNorm across heads)."""

    def __init__(self, cfg: WildActorConfig, device=None, dtype=None):
        super().__init__()
        d, fk = cfg.dim, dict(device=device, dtype=dtype)
        self.heads = cfg.num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d, **fk), nn.Linear(d, d, **fk), nn.Linear(d, d, **fk)
        self.to_out = nn.ModuleList([nn.Linear(d, d, **fk)])
        self.norm_q = RMSNorm(d, cfg.eps, **fk)
        self.norm_k = RMSNorm(d, cfg.eps, **fk)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """``x [B, Nv, dim]``, ``context [B, L, dim]`` -> ``[B, Nv, dim]``."""
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = self.norm_k(self.to_k(context)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](o.transpose(1, 2).flatten(2))


class GELUProj(nn.Module):
    """``ffn.net.0``: ``gelu_tanh(proj(x))`` with a reference-only adapter on ``proj``."""

    def __init__(self, proj: RefLoRALinear):
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor, num_video: int | None = None) -> Tensor:
        return F.gelu(self.proj(x, num_video), approximate="tanh")


class FeedForward(nn.Module):
    """``ffn``: ``net.2(net.0(x))`` (``net.1`` is diffusers' dropout slot, an identity here)."""

    def __init__(self, ref: ConfigRef, device=None, dtype=None):
        super().__init__()
        cfg, fk = ref.cfg, dict(device=device, dtype=dtype)
        self.net = nn.ModuleList([GELUProj(AdapterLinear(cfg.dim, cfg.ffn_dim, ref, **fk)), nn.Identity(),
                                  AdapterLinear(cfg.ffn_dim, cfg.dim, ref, **fk)])

    def forward(self, x: Tensor, num_video: int | None = None) -> Tensor:
        return self.net[2](self.net[0](x, num_video), num_video)


def _per_segment(x: Tensor, num_video: int, f_video: Callable[[Tensor], Tensor],
                 f_ref: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``f_video`` to rows ``[:num_video]`` and ``f_ref`` to the rest of ``x [B, N, C]``."""
    n = x.shape[1]
    if num_video == n:
        return f_video(x)
    if num_video == 0:
        return f_ref(x)
    return torch.cat([f_video(x[:, :num_video]), f_ref(x[:, num_video:])], dim=1)


def _modulate(xn: Tensor, num_video: int, video: tuple[Tensor, Tensor] | None,
              ref: tuple[Tensor, Tensor] | None) -> Tensor:
    """adaLN ``xn * (1 + scale) + shift`` with a ``(shift, scale)`` pair per segment (fp32)."""
    return _per_segment(xn, num_video, lambda a: a * (1 + video[1]) + video[0],
                        lambda a: a * (1 + ref[1]) + ref[0])


def _gated_add(x: Tensor, y: Tensor, num_video: int, gate_video: Tensor | None,
               gate_ref: Tensor | None) -> Tensor:
    """``x + y * gate`` in fp32 with a gate per segment; result in ``x.dtype``."""
    yg = _per_segment(y.float(), num_video, lambda a: a * gate_video, lambda a: a * gate_ref)
    return (x.float() + yg).to(x.dtype)


class WanBlock(nn.Module):
    """One transformer block: modulated asymmetric self-attention, text cross-attention (video
    rows only), modulated FFN. ``scale_shift_table [1, 6, dim]`` holds the learned modulation bias
    (shift, scale, gate for attention; shift, scale, gate for the FFN)."""

    def __init__(self, ref: ConfigRef, device=None, dtype=None):
        super().__init__()
        cfg, fk = ref.cfg, dict(device=device, dtype=dtype)
        self.norm1 = FP32LayerNorm(cfg.dim, cfg.eps, affine=False)
        self.attn1 = SelfAttention(ref, **fk)
        # diffusers: an affine fp32 LayerNorm, or nothing at all when cross_attn_norm=False
        self.norm2 = (FP32LayerNorm(cfg.dim, cfg.eps, affine=True, **fk) if cfg.cross_attn_norm
                      else nn.Identity())
        self.attn2 = CrossAttention(cfg, **fk)
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps, affine=False)
        self.ffn = FeedForward(ref, **fk)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, cfg.dim, **fk) / cfg.dim**0.5)

    def modulation(self, e: Tensor) -> tuple[Tensor, ...]:
        """``e [B, M, 6, dim]`` (M = 1 or one per token) -> 6 fp32 tensors ``[B, M, dim]``."""
        return (self.scale_shift_table.float().unsqueeze(0) + e.float()).unbind(2)

    def forward(self, x: Tensor, num_video: int, e_video: Tensor | None, e_ref: Tensor | None,
                context: Tensor | None, cos: Tensor, sin: Tensor,
                ref_kv: tuple[Tensor, Tensor] | None = None,
                kv_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Run the block on ``x [B, N, dim]`` (``num_video`` video rows, then reference rows).

        Args:
            e_video: video modulation input ``[B, 1 | Nv, 6, dim]`` (None when ``num_video == 0``).
            e_ref: reference modulation input ``[1, 1, 6, dim]`` (timestep 0; None without refs).
            context: text states ``[B, L, dim]`` (unused when ``num_video == 0``).
            cos, sin: fp32 ``[N, D//2]`` I-RoPE tables of the rows of ``x``.
            ref_kv: cached reference ``(k, v)`` ``[B, Nr, H, D]``; then ``x`` holds video rows only.
            kv_only: return right after the self-attention keys/values (the last layer of the
                reference encoder needs nothing else).
        Returns:
            ``(x', k, v)``: the block output ``[B, N, dim]`` (``x`` itself when ``kv_only``) and this
            layer's rotated keys and values ``[B, N, H, D]``.
        """
        nv, n = num_video, x.shape[1]
        mv = self.modulation(e_video) if nv > 0 else (None,) * 6
        mr = self.modulation(e_ref) if nv < n else (None,) * 6

        # 1. asymmetric self-attention; LoRA on reference rows
        h = _modulate(self.norm1(x), nv, mv[0:2], mr[0:2]).to(x.dtype)
        q, k, v = self.attn1.qkv(h, nv, cos, sin)
        if kv_only:
            return x, k, v
        x = _gated_add(x, self.attn1.attend(q, k, v, nv, ref_kv), nv, mv[2], mr[2])

        # 2. cross-attention to the text: video rows only
        if nv > 0:
            xv = x[:, :nv]
            xv = xv + self.attn2(self.norm2(xv.float()).to(x.dtype), context)
            x = xv if nv == n else torch.cat([xv, x[:, nv:]], dim=1)

        # 3. feed-forward; LoRA on reference rows
        h = _modulate(self.norm3(x), nv, mv[3:5], mr[3:5]).to(x.dtype)
        x = _gated_add(x, self.ffn(h, nv), nv, mv[5], mr[5])
        return x, k, v


# ============================================================================ the model
class WildActor(nn.Module):
    """WildActor: Wan DiT + I-RoPE + asymmetric reference attention + reference-only LoRA.

    Args:
        cfg: a :class:`WildActorConfig` (e.g. ``WildActorConfig.preset("wan2.1-1.3b")``).
        device, dtype: where/how to allocate; ``device="meta"`` builds without allocating
            (then load weights with :meth:`load_wan_state_dict` or use :meth:`from_pretrained`).

    The backbone is frozen (``requires_grad=False``); the adapters are trainable
    (:meth:`trainable_parameters`). Norms and modulation maths run in fp32 whatever the parameter
    dtype; a low-precision ``dtype`` (or :meth:`cast`) keeps the parameters diffusers keeps in fp32
    (timestep embedder, modulation tables, cross-attention norm), as diffusers does.

    Main entry points: :meth:`forward` (joint path with ``refs``, cached path with ``ref_cache``),
    :meth:`encode_references` (-> :class:`RefCache`); pure-tensor core for export:
    :meth:`patchify`, :meth:`embed_references`, :meth:`rope_tables`, :meth:`reference_kv`,
    :meth:`denoise`, :meth:`bind_ref_cache`.
    """

    def __init__(self, cfg: WildActorConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(cfg, WildActorConfig):
            raise TypeError(f"cfg must be a WildActorConfig, got {type(cfg).__name__}")
        self._ref = ConfigRef(cfg)  # the one home of the config (and so of the backend)
        fk = dict(device=device, dtype=dtype)
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, **fk)
        self.condition_embedder = ConditionEmbedder(cfg, **fk)
        self.blocks = nn.ModuleList([WanBlock(self._ref, **fk) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(d, cfg.eps, affine=False)
        self.proj_out = nn.Linear(d, cfg.out_channels * math.prod(cfg.patch_size), **fk)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d, **fk) / d**0.5)
        self._rope_tables = RopeTableCache(max_entries=32)
        #: recompute each block in backward (joint path, training) to save activation memory
        self.gradient_checkpointing = False
        if dtype is not None:
            self.cast(dtype)
        self.freeze_backbone()
        register_if_diffusers_loaded()  # so that diffusers' pipelines save and load a WildActor

    # ------------------------------------------------------------------ parameters
    @property
    def cfg(self) -> WildActorConfig:
        """The model's :class:`WildActorConfig`; ``cfg.backend`` is read by every op at call time."""
        return self._ref.cfg

    @cfg.setter
    def cfg(self, cfg: WildActorConfig) -> None:
        if not isinstance(cfg, WildActorConfig):
            raise TypeError(f"cfg must be a WildActorConfig, got {type(cfg).__name__}")
        self._ref.cfg = cfg

    @property
    def config(self) -> DiffusersConfig:
        """diffusers' view of the model: the ``WanTransformer3DModel`` keyword arguments
        (``patch_size``, ``in_channels``, ``out_channels``, ...), read-only, so that diffusers'
        Wan pipelines take a WildActor as their ``transformer``. ``cfg`` is the real config."""
        return DiffusersConfig(self.cfg.to_diffusers_config())

    @config.setter
    def config(self, value: Mapping) -> None:
        # the view is derived from cfg; assigning the same view is allowed (code written for a
        # diffusers module may do it), a different one would disagree with the weights
        if not isinstance(value, Mapping) or dict(value) != dict(self.config):
            raise AttributeError("WildActor.config is derived from WildActor.cfg; change cfg "
                                 "(cfg.replace(...)) instead of assigning another config")

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """diffusers' per-call cache context (``"cond"`` / ``"uncond"``): WildActor has no step
        cache to steer (its reference K/V cache is step-independent), so this is a no-op."""
        yield

    @property
    def backend(self) -> str:
        """The kernel backend of every op (``cfg.backend``)."""
        return self._ref.cfg.backend

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def freeze_backbone(self) -> None:
        """Backbone ``requires_grad=False``, adapters ``requires_grad=True``."""
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter(name))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The reference-only LoRA parameters (``lora_A``/``lora_B`` of every adapted linear)."""
        for name, p in self.named_parameters():
            if is_adapter(name):
                yield p

    def num_parameters(self, include_adapters: bool = False) -> int:
        """Parameter count of the backbone (plus the adapters if asked); works on ``meta``."""
        return sum(p.numel() for name, p in self.named_parameters()
                   if include_adapters or not is_adapter(name))

    def cast(self, dtype: torch.dtype) -> WildActor:
        """Cast parameters to ``dtype``, except those diffusers keeps in fp32 (the timestep
        embedder, the modulation tables, the cross-attention norm), as ``WildActor(cfg, dtype=...)``
        does. ``model.to(dtype)`` casts everything, which also works (maths stays fp32 inside)."""
        for name, p in self.named_parameters():
            low = dtype in (torch.bfloat16, torch.float16)
            p.data = p.data.to(torch.float32 if low and KEEP_FP32.match(name) else dtype)
        return self

    def set_backend(self, backend: str) -> None:
        """Switch the kernel backend (``"auto" | "triton" | "reference"``) of every op, including
        layers pinned to another backend (see :class:`AdapterLinear`)."""
        self.cfg = self.cfg.replace(backend=backend)
        for mod in self.modules():
            if isinstance(mod, AdapterLinear):
                mod.backend = None  # follow the model again
            elif isinstance(mod, RefLoRALinear):  # a plain one swapped in by hand
                mod.backend = backend

    # ------------------------------------------------------------------ layout and RoPE
    def video_grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """Token grid ``(T, Hg, Wg)`` of a latent shape ``[..., T, H, W]``."""
        return checks.video_grid(self.cfg, latent_shape)

    def rope_tables(self, layout: TokenLayout,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """I-RoPE ``cos, sin``: fp32 ``[N, D//2]`` for ``layout`` (cached per layout and device)."""
        device = torch.device(device) if device is not None else self.device
        return self._rope_tables.get(self.cfg, layout, device)

    # ------------------------------------------------------------------ embeddings (pure tensors)
    def patchify(self, latents: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` latents -> tokens ``[B, T*Hg*Wg, dim]`` (``Conv3d`` + flatten order)."""
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2).contiguous()

    def time_embedding(self, timestep: Tensor, num_video: int) -> tuple[Tensor, Tensor]:
        """``timestep [B]`` (or per-token ``[B, Nv]``, Wan2.2 TI2V) -> ``temb [B, 1|Nv, dim]`` and the
        video modulation input ``e [B, 1|Nv, 6, dim]``."""
        temb, e = self.condition_embedder.time(timestep.flatten())
        if timestep.ndim == 2:
            return temb.unflatten(0, (-1, num_video)), e.unflatten(0, (-1, num_video))
        return temb[:, None], e[:, None]

    def reference_modulation(self) -> Tensor:
        """Modulation input of reference rows (timestep 0): ``[1, 1, 6, dim]``."""
        zero = torch.zeros(1, device=self.device, dtype=torch.float32)
        return self.condition_embedder.time(zero)[1][:, None]

    def _head(self, x: Tensor, temb: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Modulated output layer + unpatchify: ``x [B, Nv, dim]`` -> ``[B, out_ch, T, H, W]``."""
        shift, scale = (self.scale_shift_table.float().unsqueeze(0) + temb.float().unsqueeze(2)).unbind(2)
        x = (self.norm_out(x) * (1 + scale) + shift).to(x.dtype)
        x = self.proj_out(x)
        b, (t, h, w), (pt, ph, pw) = x.shape[0], grid, self.cfg.patch_size
        x = x.reshape(b, t, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, t * pt, h * ph, w * pw)

    # ------------------------------------------------------------------ pure-tensor core (export)
    def reference_kv(self, ref_tokens: Tensor, cos_r: Tensor,
                     sin_r: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Run the reference stream alone through every layer and collect its keys/values.

        Args:
            ref_tokens: ``[B, Nr, dim]`` patch-embedded references (:meth:`embed_references`).
            cos_r, sin_r: fp32 ``[Nr, D//2]``: the reference rows of the I-RoPE tables.
        Returns:
            ``(ks, vs)``: ``num_layers`` tensors each, ``[B, Nr, H, D]`` (keys normed and rotated).
            The last layer stops after its k/v projections (its attention output and FFN are unused).
        """
        e_ref = self.reference_modulation()
        x, ks, vs = ref_tokens, [], []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, 0, None, e_ref, None, cos_r, sin_r, kv_only=i == last)
            ks.append(k)
            vs.append(v)
        return ks, vs

    def denoise(self, latents: Tensor, timestep: Tensor, context: Tensor, ref_k: Sequence[Tensor],
                ref_v: Sequence[Tensor], cos_v: Tensor, sin_v: Tensor) -> Tensor:
        """Cached path: the velocity of the video given precomputed reference K/V.

        Args:
            latents: ``[B, C, T, H, W]`` video latents.
            timestep: float ``[B]`` in ``[0, 1000]`` (or per-token ``[B, Nv]``).
            context: ``[B, L, text_dim]`` text-encoder states.
            ref_k, ref_v: ``num_layers`` tensors ``[B, Nr, H, D]`` each (rotated for this video grid;
                ``Nr`` may be 0), or empty sequences for no references.
            cos_v, sin_v: fp32 ``[Nv, D//2]`` I-RoPE tables of the video tokens.
        Returns:
            velocity ``[B, out_channels, T, H, W]`` in the model dtype.
        """
        x = self.patchify(latents)
        nv, grid = x.shape[1], self.video_grid(latents.shape)
        temb, e_video = self.time_embedding(timestep, nv)
        text = self.condition_embedder.text(context.to(self.dtype))
        use_cache = len(ref_k) > 0
        for i, block in enumerate(self.blocks):
            ref_kv = (ref_k[i], ref_v[i]) if use_cache else None
            x, _, _ = block(x, nv, e_video, None, text, cos_v, sin_v, ref_kv=ref_kv)
        return self._head(x, temb, grid)

    # ------------------------------------------------------------------ public API
    def embed_references(self, refs: Sequence[Reference], batch_size: int | None = None
                         ) -> tuple[Tensor, list[tuple[str, int, int]]]:
        """Patch-embed references and join them: ``tokens [B, Nr, dim]`` and their token grids.

        ``batch_size=None`` uses the largest reference batch; references of batch 1 broadcast.
        """
        refs = checks.check_refs(self.cfg, refs)
        if batch_size is None:
            batch_size = max((r.latent.shape[0] for r in refs), default=1)
        toks, grids = [], []
        for i, r in enumerate(refs):
            rb = r.latent.shape[0]
            if rb not in (1, batch_size):
                raise ValueError(f"refs[{i}] has batch {rb}; expected 1 or {batch_size}")
            toks.append(self.patchify(r.latent).expand(batch_size, -1, -1))
            _, hg, wg = self.video_grid(r.latent.shape)
            grids.append((r.kind, hg, wg))
        if not toks:
            return torch.zeros(batch_size, 0, self.cfg.dim, device=self.device, dtype=self.dtype), []
        return torch.cat(toks, dim=1), grids

    def encode_references(self, refs: Sequence[Reference],
                          video_shape: Sequence[int] | None = None) -> RefCache:
        """Reference K/V of every layer, computed once per generation (the reference KV cache).

        Args:
            refs: the references (latent batch 1 for a cache shared by the whole video batch).
            video_shape: optional video latent shape (``[..., T, H, W]``) to rotate the keys for
                directly; without it the cache is grid-free and is bound to the video grid when
                used (one extra rotation of the keys per call, negligible).
        Returns:
            a :class:`RefCache` (model dtype, model device).
        """
        grid = (0, 0, 0) if video_shape is None else self.video_grid(video_shape)
        tokens, grids = self.embed_references(refs)
        if not grids:
            return RefCache([], [], [], grid)
        layout = TokenLayout(grid, grids)
        cos, sin = self.rope_tables(layout, tokens.device)
        nv = layout.num_video
        ks, vs = self.reference_kv(tokens, cos[nv:], sin[nv:])
        return RefCache(ks, vs, grids, grid)

    def bind_ref_cache(self, cache: RefCache, video_grid: tuple[int, int, int],
                       batch_size: int) -> tuple[list[Tensor], list[Tensor]]:
        """The cache's K/V ready for :meth:`denoise`: keys rotated for ``video_grid``, batch
        expanded to ``batch_size``, model dtype and device (see
        :func:`~wildactor_kernels.model.references.bind_ref_cache`; memoised on the cache, so a
        grid-free cache costs one rotation per generation)."""
        fp8 = any(getattr(b.attn1, "precision", None) == "fp8" for b in self.blocks)
        return bind_ref_cache(cache, self.cfg, video_grid, batch_size, device=self.device,
                              dtype=self.dtype, backend=self.backend, quantize=fp8)

    def forward(self, latents: Tensor | None = None, timestep: Tensor | float | None = None,
                context: Tensor | None = None, refs: Sequence[Reference] | None = None,
                ref_cache: RefCache | None = None, *, hidden_states: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None,
                encoder_hidden_states_image: Tensor | None = None,
                attention_kwargs: Mapping | None = None,
                return_dict: bool | None = None) -> Tensor | TransformerOutput | tuple[Tensor]:
        """Velocity of the video latents.

        Args:
            latents: ``[B, C, T, H, W]`` float video latents.
            timestep: float ``[B]`` in ``[0, 1000]`` (a scalar or ``[1]`` broadcasts; ``[B, Nv]``
                gives per-token timesteps as Wan2.2 TI2V does).
            context: ``[B, L, text_dim]`` text-encoder states.
            refs: references for the joint path (one sequence of video + reference tokens).
            ref_cache: a :class:`RefCache` from :meth:`encode_references` for the cached path.
        diffusers' calling convention (``WanTransformer3DModel.forward``), so that a WildActor is
        the ``transformer`` of diffusers' ``WanPipeline``:
            hidden_states: another name for ``latents``; encoder_hidden_states: for ``context``.
            encoder_hidden_states_image: must be None (image-conditioned Wan is not supported).
            attention_kwargs: ``{"refs": [Reference, ...]}`` (joint path) or
                ``{"ref_cache": RefCache}`` (cached path); None or ``{}`` for none. Other keys are
                refused (diffusers' ``"scale"`` for its own LoRA layers included).
            return_dict: True: a :class:`TransformerOutput` (``.sample``, or ``[0]``); False: a
                one-tuple ``(velocity,)``, as diffusers returns them. None (default): diffusers'
                default (True) when the call uses diffusers' names (``hidden_states=`` or
                ``encoder_hidden_states=``), so code written for ``WanTransformer3DModel`` runs
                unchanged; the plain tensor otherwise (``m(latents, timestep, context)``).
        Returns:
            ``[B, out_channels, T, H, W]`` in the model dtype (wrapped as ``return_dict`` asks).
        """
        latents, context, refs, ref_cache = self._diffusers_args(
            latents, context, refs, ref_cache, hidden_states, encoder_hidden_states,
            encoder_hidden_states_image, attention_kwargs)
        if timestep is None:
            raise TypeError("WildActor.forward() missing the timestep")
        v = self._velocity(latents, timestep, context, refs, ref_cache)
        if return_dict is None:
            if hidden_states is None and encoder_hidden_states is None:
                return v
            return_dict = True  # diffusers' default for a call in diffusers' names
        return TransformerOutput(v) if return_dict else (v,)

    @staticmethod
    def _diffusers_args(latents, context, refs, ref_cache, hidden_states, encoder_hidden_states,
                        encoder_hidden_states_image, attention_kwargs):
        """Merge diffusers' keyword names into ours; every conflict is an error."""
        if hidden_states is not None:
            if latents is not None:
                raise ValueError("give latents or hidden_states (the same input), not both")
            latents = hidden_states
        if encoder_hidden_states is not None:
            if context is not None:
                raise ValueError("give context or encoder_hidden_states (the same input), not both")
            context = encoder_hidden_states
        if encoder_hidden_states_image is not None:
            raise ValueError("encoder_hidden_states_image: image-conditioned Wan is not supported by "
                             "WildActor")
        if latents is None or context is None:
            raise TypeError("WildActor.forward() needs latents (hidden_states) and context "
                            "(encoder_hidden_states)")
        if attention_kwargs:
            if not isinstance(attention_kwargs, Mapping):
                raise TypeError(f"attention_kwargs must be a dict, got {type(attention_kwargs).__name__}")
            unknown = sorted(set(attention_kwargs) - set(ATTENTION_KWARGS))
            if unknown:
                raise ValueError(f"attention_kwargs keys {unknown} are not understood; WildActor reads "
                                 f"{list(ATTENTION_KWARGS)}")
            if attention_kwargs.get("refs") is not None:
                if refs is not None:
                    raise ValueError("refs given both as an argument and in attention_kwargs")
                refs = attention_kwargs["refs"]
            if attention_kwargs.get("ref_cache") is not None:
                if ref_cache is not None:
                    raise ValueError("ref_cache given both as an argument and in attention_kwargs")
                ref_cache = attention_kwargs["ref_cache"]
        return latents, context, refs, ref_cache

    def _velocity(self, latents: Tensor, timestep: Tensor | float, context: Tensor,
                  refs: Sequence[Reference] | None, ref_cache: RefCache | None) -> Tensor:
        b, grid, t = checks.check_call(self.cfg, latents, timestep, context, refs, ref_cache)
        nv = grid[0] * grid[1] * grid[2]
        if ref_cache is not None:
            ks, vs = self.bind_ref_cache(ref_cache, grid, b)
            cos, sin = self.rope_tables(TokenLayout(grid), latents.device)
            return self.denoise(latents, t, context, ks, vs, cos, sin)

        ref_tokens, ref_grids = self.embed_references(refs or [], batch_size=b)
        layout = TokenLayout(grid, ref_grids)
        cos, sin = self.rope_tables(layout, latents.device)
        x = torch.cat([self.patchify(latents), ref_tokens], dim=1)
        temb, e_video = self.time_embedding(t, nv)
        e_ref = self.reference_modulation() if ref_grids else None
        text = self.condition_embedder.text(context.to(self.dtype))
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, nv, e_video, e_ref, text, cos, sin, use_reentrant=False)[0]
            else:
                x, _, _ = block(x, nv, e_video, e_ref, text, cos, sin)
        return self._head(x[:, :nv], temb, grid)

    # ------------------------------------------------------------------ weights (model/weights.py)
    def load_wan_state_dict(self, state_dict: Mapping[str, Tensor],
                            strict: bool = True) -> weights.LoadResult:
        """Load diffusers ``WanTransformer3DModel`` weights (``lora_*`` keys optional); see
        :func:`~wildactor_kernels.model.weights.load_wan_state_dict`."""
        return weights.load_wan_state_dict(self, state_dict, strict=strict)

    def save_pretrained(self, directory: str, safe_serialization: bool = True) -> None:
        """Write ``config.json`` and ``model.safetensors`` (backbone + adapters) to ``directory``.

        ``safe_serialization`` is diffusers' argument (``WanPipeline.save_pretrained`` passes it):
        weights are written as safetensors only, so ``False`` is refused."""
        if safe_serialization is not True:
            raise ValueError(f"safe_serialization={safe_serialization!r}: WildActor writes its weights "
                             "as safetensors only (no pickle)")
        weights.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, *, torch_dtype: torch.dtype | None = None,
                        **overrides) -> WildActor:
        """Load a model written by :meth:`save_pretrained` (built on meta, no double allocation).
        ``dtype=None`` keeps the saved dtype (``torch_dtype`` is another name for it, the one
        diffusers' ``WanPipeline.from_pretrained`` passes); ``overrides`` change config fields that
        do not alter shapes (e.g. ``backend="reference"``)."""
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree (two names of one "
                                 "argument)")
            dtype = torch_dtype
        cfg, sd, saved_dtype = weights.read_pretrained(directory, device=device, **overrides)
        model = cls(cfg, device="meta", dtype=dtype or saved_dtype)
        model.load_wan_state_dict(sd, strict=True)
        return model

    @classmethod
    def from_diffusers(cls, wan_model: nn.Module, **overrides) -> WildActor:
        """Build from a diffusers ``WanTransformer3DModel`` (its weights, device, dtype; fresh adapters)."""
        cfg, sd, dtype = weights.read_diffusers(wan_model, **overrides)
        model = cls(cfg, device="meta", dtype=dtype)
        model.load_wan_state_dict(sd, strict=True)
        return model

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """PEFT-named adapter tensors, e.g. ``blocks.0.attn1.to_q.lora_A.weight``."""
        return {k: v for k, v in self.state_dict().items() if is_adapter(k)}

    def save_adapters(self, path: str) -> None:
        """Save the adapters alone to a ``.safetensors`` file (rank and ``lora_alpha`` in its metadata)."""
        weights.save_adapters(self, path)

    def load_adapters(self, path: str, strict: bool = True, alpha: str = "check") -> None:
        """Load adapters written by :meth:`save_adapters`, all or nothing. The rank must match;
        a different ``lora_alpha`` is an error unless ``alpha="file"`` (adopt the file's) or
        ``alpha="model"`` (keep the model's); see :func:`~wildactor_kernels.model.weights.load_adapters`."""
        weights.load_adapters(self, path, strict=strict, alpha=alpha)
