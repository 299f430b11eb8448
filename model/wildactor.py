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
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import wildactor_kernels as wk
from wildactor_kernels import REF_KINDS, RefLoRALinear, TokenLayout

from .config import WildActorConfig

#: parameters kept in fp32 by :meth:`WildActor.cast` (diffusers' ``_keep_in_fp32_modules``)
KEEP_FP32 = re.compile(r"^(condition_embedder\.time_embedder\.|(blocks\.\d+\.)?scale_shift_table$"
                       r"|blocks\.\d+\.norm2\.)")
Tensor = torch.Tensor


# ============================================================================ inputs and cache
@dataclass(frozen=True, eq=False)
class Reference:
    """One reference image of the actor, as a VAE latent.

    Args:
        kind: ``"face"`` (a face crop) or ``"body"`` (a full-body view); picks the I-RoPE offset.
        latent: float ``[B, C, 1, h, w]`` (one latent frame; ``B`` equal to the video batch or 1,
            which broadcasts). ``h, w`` must be multiples of the spatial patch size.
    """

    kind: str
    latent: Tensor

    def __post_init__(self) -> None:
        if self.kind not in REF_KINDS:
            raise ValueError(f"Reference kind must be one of {REF_KINDS}, got {self.kind!r}")
        if not isinstance(self.latent, torch.Tensor):
            raise TypeError(f"Reference latent must be a torch.Tensor, got {type(self.latent).__name__}")
        if not self.latent.is_floating_point():
            raise TypeError(f"Reference latent must be floating point, got {self.latent.dtype}")
        if self.latent.ndim != 5 or self.latent.shape[2] != 1:
            raise ValueError(f"Reference latent must have shape [B, C, 1, h, w] (one latent frame), got "
                             f"{tuple(self.latent.shape)}")


@dataclass
class RefCache:
    """Per-layer reference keys and values, computed once per generation.

    Attributes:
        k: one tensor per layer, ``[Bc, Nr, H, D]``: normed keys, rotated by I-RoPE for the video
            grid ``video_grid``.
        v: one tensor per layer, ``[Bc, Nr, H, D]``.
        refs: token grid of each reference, ``[(kind, h, w), ...]`` (after patchify).
        video_grid: ``(T, Hg, Wg)`` the keys are rotated for; ``(0, 0, 0)`` means "not bound to a
            video yet": the model re-rotates the keys by the grid offset when it uses the cache
            (reference-reference attention only sees position differences, so the reference
            hidden states do not depend on the video grid, only the final key rotation does).

    ``Bc`` is 1 (one identity shared by the whole video batch, e.g. both CFG branches: the model
    expands it) or the video batch size.
    """

    k: list[Tensor]
    v: list[Tensor]
    refs: list[tuple[str, int, int]] = field(default_factory=list)
    video_grid: tuple[int, int, int] = (0, 0, 0)
    # K/V as last bound by WildActor.bind_ref_cache (grid, batch, device, dtype), reused by every
    # step of a generation; not part of the cache's value.
    _bound: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_ref(self) -> int:
        return sum(h * w for _, h, w in self.refs)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0] if self.k else 1

    def to(self, *args, **kwargs) -> RefCache:
        """``Tensor.to`` on every tensor (device and/or dtype); returns a new cache."""
        return RefCache([t.to(*args, **kwargs) for t in self.k], [t.to(*args, **kwargs) for t in self.v],
                        list(self.refs), tuple(self.video_grid))

    def expand(self, batch_size: int) -> RefCache:
        """Broadcast a batch-1 cache to ``batch_size`` (a view, no copy)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"a RefCache of batch {self.batch_size} cannot serve a video batch of "
                             f"{batch_size} (only batch 1 broadcasts)")
        return RefCache([t.expand(batch_size, -1, -1, -1) for t in self.k],
                        [t.expand(batch_size, -1, -1, -1) for t in self.v], list(self.refs),
                        tuple(self.video_grid))


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


class SelfAttention(nn.Module):
    """``attn1``: q/k/v/o are :class:`RefLoRALinear` (adapter on reference rows only); q/k get
    RMSNorm across heads and I-RoPE; attention is asymmetric (docs/design.md §4)."""

    def __init__(self, cfg: WildActorConfig, device=None, dtype=None):
        super().__init__()
        d = cfg.dim
        self.heads, self.eps, self.backend = cfg.num_heads, cfg.eps, cfg.backend

        def lin() -> RefLoRALinear:
            return RefLoRALinear(d, d, bias=True, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                 backend=cfg.backend, device=device, dtype=dtype)

        self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
        self.to_out = nn.ModuleList([lin()])
        self.norm_q = RMSNorm(d, cfg.eps, device=device, dtype=dtype)
        self.norm_k = RMSNorm(d, cfg.eps, device=device, dtype=dtype)
        # None: attention in the activations' dtype; "fp8": 8-bit attention (inference only),
        # set by quantize_model(..., attention="fp8")
        self.precision: str | None = None

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

    def __init__(self, cfg: WildActorConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=True, rank=cfg.lora_rank, alpha=cfg.lora_alpha, backend=cfg.backend,
                  device=device, dtype=dtype)
        self.net = nn.ModuleList([GELUProj(RefLoRALinear(cfg.dim, cfg.ffn_dim, **kw)), nn.Identity(),
                                  RefLoRALinear(cfg.ffn_dim, cfg.dim, **kw)])

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

    def __init__(self, cfg: WildActorConfig, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.norm1 = FP32LayerNorm(cfg.dim, cfg.eps, affine=False)
        self.attn1 = SelfAttention(cfg, **fk)
        # diffusers: an affine fp32 LayerNorm, or nothing at all when cross_attn_norm=False
        self.norm2 = (FP32LayerNorm(cfg.dim, cfg.eps, affine=True, **fk) if cfg.cross_attn_norm
                      else nn.Identity())
        self.attn2 = CrossAttention(cfg, **fk)
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps, affine=False)
        self.ffn = FeedForward(cfg, **fk)
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


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


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
        self.cfg = cfg
        fk = dict(device=device, dtype=dtype)
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, **fk)
        self.condition_embedder = ConditionEmbedder(cfg, **fk)
        self.blocks = nn.ModuleList([WanBlock(cfg, **fk) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(d, cfg.eps, affine=False)
        self.proj_out = nn.Linear(d, cfg.out_channels * math.prod(cfg.patch_size), **fk)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d, **fk) / d**0.5)
        self._rope_cache: OrderedDict = OrderedDict()
        #: recompute each block in backward (joint path, training) to save activation memory
        self.gradient_checkpointing = False
        if dtype is not None:
            self.cast(dtype)
        self.freeze_backbone()

    # ------------------------------------------------------------------ parameters
    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def freeze_backbone(self) -> None:
        """Backbone ``requires_grad=False``, adapters ``requires_grad=True``."""
        for name, p in self.named_parameters():
            p.requires_grad_(_is_adapter(name))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The reference-only LoRA parameters (``lora_A``/``lora_B`` of every adapted linear)."""
        for name, p in self.named_parameters():
            if _is_adapter(name):
                yield p

    def num_parameters(self, include_adapters: bool = False) -> int:
        """Parameter count of the backbone (plus the adapters if asked); works on ``meta``."""
        return sum(p.numel() for name, p in self.named_parameters()
                   if include_adapters or not _is_adapter(name))

    def cast(self, dtype: torch.dtype) -> WildActor:
        """Cast parameters to ``dtype``, except those diffusers keeps in fp32 (the timestep
        embedder, the modulation tables, the cross-attention norm), as ``WildActor(cfg, dtype=...)``
        does. ``model.to(dtype)`` casts everything, which also works (maths stays fp32 inside)."""
        for name, p in self.named_parameters():
            low = dtype in (torch.bfloat16, torch.float16)
            p.data = p.data.to(torch.float32 if low and KEEP_FP32.match(name) else dtype)
        return self

    def set_backend(self, backend: str) -> None:
        """Switch the kernel backend (``"auto" | "triton" | "reference"``) of every op."""
        self.cfg = self.cfg.replace(backend=backend)
        for mod in self.modules():
            if isinstance(mod, (RefLoRALinear, SelfAttention)):
                mod.backend = backend

    # ------------------------------------------------------------------ layout and RoPE
    def video_grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """Token grid ``(T, Hg, Wg)`` of a latent shape ``[..., T, H, W]``."""
        t, h, w = latent_shape[-3:]  # no int(): symbolic sizes stay symbolic under torch.export
        pt, ph, pw = self.cfg.patch_size
        return t // pt, h // ph, w // pw

    def rope_tables(self, layout: TokenLayout,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """I-RoPE ``cos, sin``: fp32 ``[N, D//2]`` for ``layout`` (cached per layout and device)."""
        device = torch.device(device) if device is not None else self.device
        c = self.cfg
        key = (layout, str(device), c.face_offset, c.body_offset, c.spatial_shift, c.theta, c.head_dim)
        hit = self._rope_cache.get(key)
        # Under torch.compile the cache is read but never written: dynamo cannot replay a dict
        # insert keyed by a TokenLayout built inside the compiled region (a graph break).
        compiling = torch.compiler.is_compiling()
        if hit is None:
            pos = wk.irope_positions(layout, face_offset=c.face_offset, body_offset=c.body_offset,
                                     spatial_shift=c.spatial_shift)
            cos, sin = wk.rope_cos_sin(pos, c.head_dim, theta=c.theta)
            hit = (cos.to(device), sin.to(device))
            if compiling:
                return hit
            self._rope_cache[key] = hit
            while len(self._rope_cache) > 32:
                self._rope_cache.popitem(last=False)
        elif not compiling:
            self._rope_cache.move_to_end(key)
        return hit

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
        refs = self._check_refs(refs)
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
        expanded to ``batch_size``, model dtype and device. The result is memoised on the cache
        for the same grid/batch/dtype, so a grid-free cache costs one rotation per generation."""
        if not isinstance(cache, RefCache):
            raise TypeError(f"ref_cache must be a RefCache, got {type(cache).__name__}")
        if cache.num_layers == 0:
            return [], []
        if cache.num_layers != len(self.blocks):
            raise ValueError(f"ref_cache has {cache.num_layers} layers; this model has {len(self.blocks)}")
        c = self.cfg
        fp8 = any(getattr(b.attn1, "precision", None) == "fp8" for b in self.blocks)
        key = (tuple(video_grid), batch_size, str(self.device), self.dtype, c.spatial_shift, c.theta, fp8)
        if cache._bound is not None and cache._bound[0] == key:  # same grid as the previous step
            return list(cache._bound[1]), list(cache._bound[2])
        bound = cache.to(device=self.device, dtype=self.dtype)
        if tuple(bound.video_grid) != tuple(video_grid):
            # Rotations compose additively, R(p + o) = R(o) R(p), and every reference token moves by
            # the same offset o when the video grid changes.
            s = 1 if c.spatial_shift else 0
            (t0, h0, w0), (t1, h1, w1) = bound.video_grid, video_grid
            off = torch.tensor([[t1 - t0, (h1 - h0) * s, (w1 - w0) * s]], dtype=torch.int64)
            cos, sin = wk.rope_cos_sin(off.expand(bound.num_ref, 3), c.head_dim, c.theta)
            cos, sin = cos.to(self.device), sin.to(self.device)
            bound.k = [wk.apply_rope(k, cos, sin, backend=c.backend) for k in bound.k]
        bound = bound.expand(batch_size)
        ks, vs = list(bound.k), list(bound.v)
        if fp8:  # 8-bit attention reads a quantized cache (QuantizedKV, values inside): once per grid
            ks = [wk.attention.quantize_ref_kv(k, v, backend=c.backend) for k, v in zip(ks, vs)]
            vs = [None] * len(ks)
        cache._bound = (key, ks, vs)
        return list(ks), list(vs)

    def forward(self, latents: Tensor, timestep: Tensor | float, context: Tensor,
                refs: Sequence[Reference] | None = None, ref_cache: RefCache | None = None) -> Tensor:
        """Velocity of the video latents.

        Args:
            latents: ``[B, C, T, H, W]`` float video latents.
            timestep: float ``[B]`` in ``[0, 1000]`` (a scalar or ``[1]`` broadcasts; ``[B, Nv]``
                gives per-token timesteps as Wan2.2 TI2V does).
            context: ``[B, L, text_dim]`` text-encoder states.
            refs: references for the joint path (one sequence of video + reference tokens).
            ref_cache: a :class:`RefCache` from :meth:`encode_references` for the cached path.
        Returns:
            ``[B, out_channels, T, H, W]`` in the model dtype.
        """
        if refs is not None and ref_cache is not None:
            raise ValueError("give refs (joint path) or ref_cache (cached path), not both")
        b, grid = self._check_video(latents)
        nv = grid[0] * grid[1] * grid[2]
        t = self._check_timestep(timestep, b, nv, latents.device)
        self._check_context(context, b)
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
    def load_wan_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        """Load diffusers ``WanTransformer3DModel`` weights (``lora_*`` keys optional)."""
        from .weights import load_wan_state_dict

        return load_wan_state_dict(self, state_dict, strict=strict)

    def save_pretrained(self, directory: str) -> None:
        """Write ``config.json`` and ``model.safetensors`` (backbone + adapters) to ``directory``."""
        from .weights import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, **overrides) -> WildActor:
        """Load a model written by :meth:`save_pretrained` (built on meta, no double allocation)."""
        from .weights import from_pretrained

        return from_pretrained(directory, device=device, dtype=dtype, **overrides)

    @classmethod
    def from_diffusers(cls, wan_model: nn.Module, **overrides) -> WildActor:
        """Build from a diffusers ``WanTransformer3DModel`` (its weights, device, dtype)."""
        from .weights import from_diffusers

        return from_diffusers(wan_model, **overrides)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """PEFT-named adapter tensors, e.g. ``blocks.0.attn1.to_q.lora_A.weight``."""
        return {k: v for k, v in self.state_dict().items() if _is_adapter(k)}

    def save_adapters(self, path: str) -> None:
        """Save the adapters alone to a ``.safetensors`` file."""
        from .weights import save_adapters

        save_adapters(self, path)

    def load_adapters(self, path: str, strict: bool = True) -> None:
        """Load adapters written by :meth:`save_adapters` (rank must match)."""
        from .weights import load_adapters

        load_adapters(self, path, strict=strict)

    # ------------------------------------------------------------------ input checks
    def _check_video(self, latents: object) -> tuple[int, tuple[int, int, int]]:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.ndim != 5:
            raise ValueError(f"latents must have shape [B, C, T, H, W], got {tuple(latents.shape)}")
        if not latents.is_floating_point():
            raise TypeError(f"latents must be floating point, got {latents.dtype}")
        b, c, t, h, w = latents.shape
        if c != self.cfg.in_channels:
            raise ValueError(f"latents have {c} channels; the model expects "
                             f"in_channels={self.cfg.in_channels}")
        p = self.cfg.patch_size
        if t == 0 or h == 0 or w == 0 or t % p[0] or h % p[1] or w % p[2]:
            raise ValueError(f"latent T, H, W = {(t, h, w)} must be positive multiples of patch_size {p}")
        return b, self.video_grid(latents.shape)

    def _check_timestep(self, timestep: object, b: int, nv: int, device: torch.device) -> Tensor:
        if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            timestep = torch.tensor([float(timestep)])
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be a tensor or a number, got {type(timestep).__name__}")
        t = timestep.to(device=device, dtype=torch.float32)
        if t.ndim == 0 or tuple(t.shape) == (1,):
            return t.reshape(1).expand(b)
        if tuple(t.shape) in ((b,), (b, nv)):
            return t
        raise ValueError(f"timestep must have shape [B] = [{b}] (or [B, Nv] = [{b}, {nv}]), "
                         f"got {tuple(t.shape)}")

    def _check_context(self, context: object, b: int) -> None:
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.cfg.text_dim:
            raise ValueError(f"context must have shape [B, L, text_dim] = [{b}, L, {self.cfg.text_dim}], got "
                             f"{tuple(context.shape)}")

    def _check_refs(self, refs: Iterable[Reference] | None) -> list[Reference]:
        if refs is None:
            return []
        if isinstance(refs, Reference):
            raise TypeError("refs must be a list of Reference, not a single Reference")
        refs = list(refs)
        ph, pw = self.cfg.patch_size[1:]
        for i, r in enumerate(refs):
            if not isinstance(r, Reference):
                raise TypeError(f"refs[{i}] must be a Reference, got {type(r).__name__}")
            _, c, _, h, w = r.latent.shape
            if c != self.cfg.in_channels:
                raise ValueError(f"refs[{i}] latent has {c} channels; the model expects "
                                 f"in_channels={self.cfg.in_channels}")
            if self.cfg.patch_size[0] != 1:
                raise ValueError("references are single latent frames: they need patch_size[0] == 1")
            if h == 0 or w == 0 or h % ph or w % pw:
                raise ValueError(f"refs[{i}] latent h, w = {(h, w)} must be positive multiples of "
                                 f"the spatial patch {(ph, pw)}")
        return refs
