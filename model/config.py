"""``WildActorConfig``: one frozen dataclass with named presets (docs/design.md §6).

The backbone fields mirror diffusers ``WanTransformer3DModel`` (``dim = num_attention_heads *
attention_head_dim``); the WildActor fields add the reference-only LoRA and the I-RoPE offsets.

=============  ====  ======  =====  =====  ==========  ========  =========
preset          dim  layers  heads    ffn  in/out ch   text_dim  lora_rank
=============  ====  ======  =====  =====  ==========  ========  =========
tiny             64       2      4    128   4 / 4            32          8
wan2.1-1.3b    1536      30     12   8960  16 / 16         4096         64
wan2.2-5b      3072      30     24  14336  48 / 48         4096         64
wan2.1-14b     5120      40     40  13824  16 / 16         4096         64
=============  ====  ======  =====  =====  ==========  ========  =========

``lora_rank`` defaults: 8 for ``tiny`` (tests, demo), 64 for the real backbones (a field
default of 64 too); ``lora_alpha=None`` means ``alpha = rank`` (adapter scale 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from wildactor_kernels import BACKENDS

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, num_layers=2, num_heads=4, ffn_dim=128, in_channels=4, out_channels=4,
                 text_dim=32, lora_rank=8),
    "wan2.1-1.3b": dict(dim=1536, num_layers=30, num_heads=12, ffn_dim=8960, in_channels=16,
                        out_channels=16, text_dim=4096, lora_rank=64),
    "wan2.2-5b": dict(dim=3072, num_layers=30, num_heads=24, ffn_dim=14336, in_channels=48,
                      out_channels=48, text_dim=4096, lora_rank=64),
    "wan2.1-14b": dict(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824, in_channels=16,
                       out_channels=16, text_dim=4096, lora_rank=64),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)
#: ``WildActorConfig.ref_time`` values: references after the video (``T + Δkind``) or at ``t = -1``
REF_TIMES: tuple[str, ...] = ("after", "before")


@dataclass(frozen=True)
class WildActorConfig:
    """Hyper-parameters of a WildActor model (a Wan DiT plus reference conditioning).

    Backbone (diffusers Wan names in brackets):
        dim: model width (``num_attention_heads * attention_head_dim``).
        num_layers, num_heads, ffn_dim: transformer depth, heads, FFN hidden width.
        in_channels, out_channels: latent channels in and out (velocity).
        text_dim: width of the text-encoder states (``text_dim``, 4096 for umT5-XXL).
        freq_dim: sinusoidal timestep width; patch_size: ``(p_t, p_h, p_w)``; eps: norm epsilon.
        theta: RoPE base; rope_max_seq_len: kept for config parity with diffusers (our tables
            are computed from positions, so it is not a hard limit).
        cross_attn_norm: affine LayerNorm before cross-attention (``norm2``).
    WildActor:
        lora_rank: rank of the reference-only adapters (0 = no adapters); lora_alpha: LoRA
            alpha (None = rank, i.e. scale 1).
        face_offset, body_offset: temporal I-RoPE offsets ``Δface``, ``Δbody`` (docs/design.md §3).
        spatial_shift: give each reference its own spatial region (False = the ablation).
        ref_time: where references sit in time: ``"after"`` the video (``T + Δkind``, WildActor's
            layout, the default) or ``"before"`` it (``t = -1`` for every reference, Stand-In's
            layout; the spatial shift is unchanged).
        backend: kernel backend of every op, ``"auto" | "triton" | "reference"``.
    """

    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    theta: float = 10000.0
    rope_max_seq_len: int = 1024
    cross_attn_norm: bool = True
    lora_rank: int = 64
    lora_alpha: float | None = None
    face_offset: int = 1
    body_offset: int = 2
    spatial_shift: bool = True
    ref_time: str = "after"
    backend: str = "auto"

    def __post_init__(self) -> None:
        ps = self.patch_size
        if isinstance(ps, int) or len(tuple(ps)) != 3:
            raise ValueError(f"patch_size must be (p_t, p_h, p_w), got {ps!r}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in ps))
        for name in ("dim", "num_layers", "num_heads", "ffn_dim", "in_channels", "out_channels",
                     "text_dim", "freq_dim", "rope_max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if any(p <= 0 for p in self.patch_size):
            raise ValueError(f"patch_size entries must be positive, got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        hd = self.dim // self.num_heads
        if hd < 8 or hd % 2:
            raise ValueError(f"head_dim = dim / num_heads = {hd} must be even and >= 8 (3D RoPE splits "
                             f"it over t, h, w)")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0, got {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive or None, got {self.lora_alpha!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if not self.theta > 0:
            raise ValueError(f"theta must be positive, got {self.theta!r}")
        for name in ("face_offset", "body_offset"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1 (references sit after the video), got {v!r}")
        if self.ref_time not in REF_TIMES:
            raise ValueError(f"ref_time must be one of {REF_TIMES}, got {self.ref_time!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def lora_scale(self) -> float:
        """``alpha / rank`` (0 when there are no adapters)."""
        if self.lora_rank == 0:
            return 0.0
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / self.lora_rank

    def replace(self, **changes: Any) -> WildActorConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> WildActorConfig:
        """Named preset (``"tiny"``, ``"wan2.1-1.3b"``, ``"wan2.2-5b"``, ``"wan2.1-14b"``)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WildActorConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown WildActorConfig keys: {unknown}; valid keys: {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def from_diffusers_config(cls, wan_config: Mapping[str, Any], **overrides: Any) -> WildActorConfig:
        """Map a diffusers ``WanTransformer3DModel`` config (text-to-video) to a WildActor config.

        Image-conditioned variants (``image_dim``/``added_kv_proj_dim``) are not supported.
        """
        c = dict(wan_config)
        for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            if c.get(key) is not None:
                raise ValueError(f"diffusers Wan config has {key}={c[key]!r}: image-conditioned Wan "
                                 f"variants are not supported by WildActor")
        if c.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(f"only qk_norm='rms_norm_across_heads' is supported, got {c['qk_norm']!r}")
        heads, head_dim = int(c.get("num_attention_heads", 40)), int(c.get("attention_head_dim", 128))
        in_ch = int(c.get("in_channels", 16))
        kw = dict(dim=heads * head_dim, num_heads=heads, num_layers=int(c.get("num_layers", 40)),
                  ffn_dim=int(c.get("ffn_dim", 13824)), in_channels=in_ch,
                  out_channels=int(c.get("out_channels") or in_ch), text_dim=int(c.get("text_dim", 4096)),
                  freq_dim=int(c.get("freq_dim", 256)), patch_size=tuple(c.get("patch_size", (1, 2, 2))),
                  eps=float(c.get("eps", 1e-6)), rope_max_seq_len=int(c.get("rope_max_seq_len", 1024)),
                  cross_attn_norm=bool(c.get("cross_attn_norm", True)))
        return cls(**{**kw, **overrides})

    def to_diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of the matching diffusers ``WanTransformer3DModel``."""
        return dict(patch_size=tuple(self.patch_size), num_attention_heads=self.num_heads,
                    attention_head_dim=self.head_dim, in_channels=self.in_channels,
                    out_channels=self.out_channels, text_dim=self.text_dim, freq_dim=self.freq_dim,
                    ffn_dim=self.ffn_dim, num_layers=self.num_layers, cross_attn_norm=self.cross_attn_norm,
                    qk_norm="rms_norm_across_heads", eps=self.eps, rope_max_seq_len=self.rope_max_seq_len)
