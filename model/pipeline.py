"""``WildActorPipeline``: a prompt and tagged reference images -> video frames (docs/design.md §11).

Built on diffusers' Wan components: a UMT5 text encoder and its tokenizer (transformers),
``AutoencoderKLWan`` (encodes each reference image to one latent frame and decodes the video), and
our :class:`~wildactor_kernels.model.FlowMatchSampler` (Wan's time shift, classifier-free
guidance, the reference K/V cache encoded once per generation) driving a
:class:`~wildactor_kernels.model.WildActor`.

Layout of ``from_pretrained(local_dir)``: a diffusers Wan repository on disk (``transformer/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``); nothing is downloaded. The
``transformer/`` folder may hold diffusers' ``WanTransformer3DModel`` (safetensors, sharded or
not) or a :meth:`WildActor.save_pretrained` folder. Adapters load from a file afterwards
(:meth:`WildActorPipeline.load_adapters`, any format of :mod:`.adapter_formats`).

diffusers and transformers are imported when a pipeline is built, never with the package.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from wildactor_kernels import REF_KINDS

from . import weights
from .adapter_formats import AdapterReport, adapter_rank, load_adapter_file
from .references import Reference
from .sampler import FlowMatchSampler
from .wildactor import WildActor

__all__ = ["WildActorPipeline", "WildActorPipelineOutput", "tiny_wan_components", "load_wan_transformer"]

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


@dataclass
class WildActorPipelineOutput:
    """``frames``: ``"pt"``: float ``[B, F, 3, H, W]`` in ``[0, 1]``; ``"np"``: ``[B, F, H, W, 3]``;
    ``"pil"``: ``B`` lists of ``F`` PIL images; ``"latent"``: the latents ``[B, C, T, h, w]``."""

    frames: Any


def _image_to_tensor(img: Any, name: str) -> Tensor:
    """PIL image or float tensor ``[3, H, W]`` / ``[1, 3, H, W]`` in ``[0, 1]`` -> ``[1, 3, H, W]`` fp32."""
    if isinstance(img, torch.Tensor):
        t = img
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[:2] != (1, 3) or not t.is_floating_point():
            raise ValueError(f"{name}: a tensor image must be float [3, H, W] or [1, 3, H, W] in [0, 1], "
                             f"got {tuple(img.shape)} {img.dtype}")
        return t.float()
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with diffusers
        Image = None
    if Image is not None and isinstance(img, Image.Image):
        import numpy as np

        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()
    raise TypeError(f"{name}: expected a PIL image or a float tensor, got {type(img).__name__}")


def resize_center_crop(img: Tensor, height: int, width: int) -> Tensor:
    """Scale ``img [1, 3, H, W]`` to cover ``height x width`` (bilinear, antialiased), then crop
    the centre."""
    _, _, h, w = img.shape
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):
        img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    return img[:, :, top:top + height, left:left + width]


def _sched_shift(scheduler: Any, default: float = 5.0) -> float:
    cfg = getattr(scheduler, "config", None) or {}
    for key in ("flow_shift", "shift"):
        v = cfg.get(key) if hasattr(cfg, "get") else None
        if v is not None:
            return float(v)
    return default


class WildActorPipeline:
    """Prompt + tagged reference images -> frames.

    Args:
        transformer: a :class:`WildActor` (``WildActor.from_diffusers(t)`` for a diffusers Wan).
        vae: diffusers ``AutoencoderKLWan``.
        text_encoder: transformers ``UMT5EncoderModel`` (any encoder returning ``last_hidden_state``
            of width ``transformer.cfg.text_dim``).
        tokenizer: its tokenizer.
        scheduler: optional diffusers scheduler; only its flow shift (``shift`` / ``flow_shift``)
            is read: the steps are our :class:`FlowMatchSampler`'s (rectified-flow Euler).
    """

    def __init__(self, transformer: WildActor, vae: Any, text_encoder: Any, tokenizer: Any,
                 scheduler: Any = None):
        if not isinstance(transformer, WildActor):
            raise TypeError(f"transformer must be a WildActor (WildActor.from_diffusers(t) converts a "
                            f"diffusers Wan), got {type(transformer).__name__}")
        z = int(vae.config.z_dim)
        if z != transformer.cfg.in_channels:
            raise ValueError(f"the VAE's z_dim={z} differs from the transformer's in_channels="
                             f"{transformer.cfg.in_channels}")
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scheduler = scheduler
        self.vae_scale_temporal = int(vae.config.get("scale_factor_temporal", 4))
        self.vae_scale_spatial = int(vae.config.get("scale_factor_spatial", 8))
        self.progress = True
        #: the report of the adapters ``from_pretrained(..., adapters=)`` loaded (None otherwise)
        self.adapter_report: AdapterReport | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, local_dir: str, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", adapters: str | None = None,
                        adapter_format: str = "auto", **overrides) -> WildActorPipeline:
        """Read a diffusers Wan repository layout from disk (never downloads).

        ``overrides`` go to the WildActor config (e.g. ``lora_rank=128``, ``ref_time="before"``,
        ``backend="reference"``). ``adapters``: an adapter file (or PEFT folder) of any format of
        :mod:`.adapter_formats`, loaded after the model is built (its :class:`AdapterReport` is
        kept as ``pipe.adapter_report``); over a diffusers ``transformer/`` the model is built with
        the file's LoRA rank unless ``lora_rank`` is given.
        """
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"{local_dir} is not a folder (a diffusers Wan repository on disk)")
        for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
            if not os.path.isdir(os.path.join(local_dir, sub)):
                raise FileNotFoundError(f"{local_dir} has no {sub}/ folder (diffusers Wan layout: "
                                        f"transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")
        index_path = os.path.join(local_dir, "model_index.json")
        index = {}
        if os.path.exists(index_path):
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        second = index.get("transformer_2")
        if os.path.isdir(os.path.join(local_dir, "transformer_2")) or (
                isinstance(second, list) and second and second[0] is not None):
            raise ValueError(f"{local_dir} is a two-expert Wan2.2 repository (transformer_2/); "
                             "WildActorPipeline runs one transformer. Use diffusers' WanPipeline with "
                             "transformer=WildActor.from_diffusers(t1), "
                             "transformer_2=WildActor.from_diffusers(t2)")
        t_cfg = os.path.join(local_dir, "transformer", "config.json")
        if adapters is not None and "lora_rank" not in overrides and os.path.exists(t_cfg):
            with open(t_cfg, encoding="utf-8") as f:
                if "_class_name" in json.load(f):  # diffusers' Wan: no adapters of its own yet
                    overrides["lora_rank"] = adapter_rank(adapters, adapter_format)
        transformer = load_wan_transformer(os.path.join(local_dir, "transformer"), dtype=dtype, device=device,
                                           **overrides)
        vae = AutoencoderKLWan.from_pretrained(os.path.join(local_dir, "vae"), local_files_only=True,
                                               use_safetensors=True).to(device).eval()
        text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(local_dir, "text_encoder"),
                                                        local_files_only=True, use_safetensors=True)
        text_encoder = text_encoder.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(local_dir, "tokenizer"), local_files_only=True)
        scheduler = None
        if os.path.isdir(os.path.join(local_dir, "scheduler")):
            import diffusers

            with open(os.path.join(local_dir, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
                name = json.load(f).get("_class_name", "FlowMatchEulerDiscreteScheduler")
            scheduler = getattr(diffusers, name).from_pretrained(os.path.join(local_dir, "scheduler"),
                                                                 local_files_only=True)
        pipe = cls(transformer, vae, text_encoder, tokenizer, scheduler)
        if adapters is not None:
            pipe.adapter_report = pipe.load_adapters(adapters, adapter_format)
        return pipe

    def save_pretrained(self, local_dir: str) -> None:
        """Write the diffusers Wan layout, ``model_index.json`` included, through diffusers' own
        ``WanPipeline.save_pretrained`` (the transformer as a WildActor folder, adapters included):
        :meth:`from_pretrained` and diffusers' ``WanPipeline.from_pretrained`` both read it back."""
        from diffusers import WanPipeline

        from .diffusers_compat import register_with_diffusers

        register_with_diffusers()
        WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                    scheduler=self.scheduler, transformer=self.transformer).save_pretrained(local_dir)

    def load_adapters(self, path: str, format: str = "auto", **kwargs) -> AdapterReport:
        """Load an adapter file into the transformer (see :func:`.adapter_formats.load_adapter_file`)."""
        return load_adapter_file(self.transformer, path, format, **kwargs)

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    def to(self, device: torch.device | str) -> WildActorPipeline:
        """Move every component to ``device`` (dtypes unchanged); returns the pipeline."""
        for mod in (self.transformer, self.vae, self.text_encoder):
            mod.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_prompt(self, prompt: str | Sequence[str], max_sequence_length: int = 512) -> Tensor:
        """Text states ``[B, max_sequence_length, text_dim]`` (padding rows zeroed, as Wan does)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a str or a non-empty list of str")
        enc = self.tokenizer([p.strip() for p in prompts], padding="max_length",
                             max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                             return_attention_mask=True, return_tensors="pt")
        dev = next(self.text_encoder.parameters()).device
        ids, mask = enc.input_ids.to(dev), enc.attention_mask.to(dev)
        states = self.text_encoder(ids, mask).last_hidden_state
        states = states * mask[..., None].to(states.dtype)  # Wan zeroes the padding positions
        return states.to(device=self.device, dtype=self.transformer.dtype)

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        c = self.vae.config
        z = int(c.z_dim)
        mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        std = torch.tensor(c.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
        return mean.to(like.device), std.to(like.device)

    @torch.no_grad()
    def encode_reference(self, image: Any, kind: str, height: int, width: int) -> Reference:
        """One reference image -> a :class:`Reference` of one latent frame ``[1, C, 1, h, w]``.

        The image is scaled to cover ``height x width`` and centre-cropped, mapped to ``[-1, 1]``,
        encoded by the VAE as a one-frame video (the posterior mean) and normalised with the VAE's
        latent mean/std, as the video latents are.
        """
        img = resize_center_crop(_image_to_tensor(image, f"{kind} reference"), height, width)
        vdev, vdt = next(self.vae.parameters()).device, self.vae.dtype
        x = (img * 2.0 - 1.0)[:, :, None].to(vdev, vdt)
        lat = self.vae.encode(x).latent_dist.mode().float()
        mean, std = self._latent_stats(lat)
        lat = (lat - mean) / std
        return Reference(kind, lat.to(self.device, self.transformer.dtype))

    def encode_references(self, references: Sequence, height: int, width: int) -> list[Reference]:
        """``[(kind, image), ...]`` (kind ``"face"``/``"body"``; a :class:`Reference` passes through)."""
        out = []
        for i, r in enumerate(references or []):
            if isinstance(r, Reference):
                out.append(r)
                continue
            if isinstance(r, dict):
                r = (r.get("kind"), r.get("image"))
            if not isinstance(r, (tuple, list)) or len(r) != 2 or not isinstance(r[0], str):
                raise TypeError(f"references[{i}] must be (kind, image) with kind 'face' or 'body', got "
                                f"{r!r:.80}")
            kind, img = r
            if kind not in REF_KINDS:
                kinds = " or ".join(repr(k) for k in REF_KINDS)
                raise ValueError(f"references[{i}] kind must be {kinds}, got {kind!r}")
            out.append(self.encode_reference(img, kind, height, width))
        return out

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, T, h, w]`` -> video ``[B, 3, F, H, W]`` in ``[0, 1]`` (fp32)."""
        vdev, vdt = next(self.vae.parameters()).device, self.vae.dtype
        z = latents.to(vdev, torch.float32)
        mean, std = self._latent_stats(z)
        video = self.vae.decode((z * std + mean).to(vdt), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, references: Sequence = (), *,
                 negative_prompt: str | Sequence[str] = "", height: int = 480, width: int = 832,
                 num_frames: int = 81, num_inference_steps: int = 30, guidance_scale: float = 5.0,
                 shift: float | None = None, generator: torch.Generator | None = None,
                 latents: Tensor | None = None, reference_size: tuple[int, int] | None = None,
                 use_ref_cache: bool = True, max_sequence_length: int = 512,
                 prompt_embeds: Tensor | None = None, negative_prompt_embeds: Tensor | None = None,
                 output_type: str = "pt") -> WildActorPipelineOutput:
        """Generate a video of the person in ``references`` doing what ``prompt`` says.

        Args:
            prompt: a str or a list (the batch).
            references: ``[(kind, image), ...]``: kind ``"face"`` or ``"body"``, image a PIL image or
                a float tensor ``[3, H, W]`` in ``[0, 1]``; shared by the whole batch.
            height, width: pixels, multiples of ``vae spatial factor * patch`` (16 for Wan2.1).
            num_frames: ``4k + 1`` for Wan's VAE.
            guidance_scale: classifier-free guidance (``<= 1``: no unconditional branch).
            shift: Wan's time shift (default: the scheduler's, else 5.0).
            generator: seeds the starting noise (drawn on the generator's device, fp32).
            latents: starting noise ``[B, C, T, h, w]`` instead of drawing it.
            reference_size: ``(height, width)`` the references are cropped to (default: the video's).
            use_ref_cache: encode the references' K/V once (the default); False runs the joint path
                every step (same result, slower).
            prompt_embeds, negative_prompt_embeds: text states ``[B, L, text_dim]`` instead of
                ``prompt`` / ``negative_prompt`` (then no tokenizer or text encoder runs for them).
            output_type: ``"pt" | "np" | "pil" | "latent"``.
        """
        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}")
        ph, pw = self.transformer.cfg.patch_size[1:]
        mh, mw = self.vae_scale_spatial * ph, self.vae_scale_spatial * pw
        for name, v, m in (("height", height, mh), ("width", width, mw)):
            if not isinstance(v, int) or v <= 0 or v % m:
                raise ValueError(f"{name} must be a positive multiple of {m} (VAE factor x patch), got {v!r}")
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % self.vae_scale_temporal:
            raise ValueError(f"num_frames must be {self.vae_scale_temporal}k + 1, got {num_frames!r}")
        rh, rw = reference_size or (height, width)
        if rh % mh or rw % mw:
            raise ValueError(f"reference_size {(rh, rw)} must be multiples of {(mh, mw)}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give prompt or prompt_embeds (one of them)")
        if prompt_embeds is not None:
            context = prompt_embeds.to(self.device, self.transformer.dtype)
        else:
            context = self.encode_prompt(prompt, max_sequence_length)
        b = context.shape[0]
        negative = None
        if guidance_scale > 1.0 and negative_prompt_embeds is not None:
            negative = negative_prompt_embeds.to(self.device, self.transformer.dtype)
        elif guidance_scale > 1.0:
            negs = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != b:
                raise ValueError(f"{b} prompts but {len(negs)} negative prompts")
            negative = self.encode_prompt(negs, max_sequence_length)
        if negative is not None and negative.shape[:2] != context.shape[:2]:
            raise ValueError(f"negative text states {tuple(negative.shape)} and prompt text states "
                             f"{tuple(context.shape)} differ in batch or length (Wan pads both to "
                             f"max_sequence_length)")
        refs = self.encode_references(references, rh, rw)
        shape = (b, self.transformer.cfg.in_channels,
                 (num_frames - 1) // self.vae_scale_temporal + 1,
                 height // self.vae_scale_spatial, width // self.vae_scale_spatial)
        if latents is None:
            gdev = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        sampler = FlowMatchSampler(num_steps=num_inference_steps,
                                   shift=_sched_shift(self.scheduler) if shift is None else float(shift),
                                   guidance_scale=guidance_scale, use_ref_cache=use_ref_cache,
                                   progress=self.progress)
        out = sampler.sample(self.transformer, context=context, negative_context=negative, refs=refs,
                             noise=latents.to(self.device), dtype=self.transformer.dtype, device=self.device)
        if output_type == "latent":
            return WildActorPipelineOutput(out)
        video = self.decode(out).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
        if output_type == "pt":
            return WildActorPipelineOutput(video)
        arr = video.permute(0, 1, 3, 4, 2).cpu().numpy()
        if output_type == "np":
            return WildActorPipelineOutput(arr)
        from PIL import Image

        return WildActorPipelineOutput([[Image.fromarray((f * 255).round().astype("uint8")) for f in clip]
                                        for clip in arr])


# ============================================================================ loading a transformer
def load_wan_transformer(folder: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                         **overrides) -> WildActor:
    """A WildActor from a ``transformer/`` folder, built on meta and loaded all or nothing.

    The folder holds diffusers' ``WanTransformer3DModel`` (``config.json`` with ``_class_name`` and
    ``diffusion_pytorch_model.safetensors``, or shards with their ``.index.json``), or a
    :meth:`WildActor.save_pretrained` folder (``config.json`` + ``model.safetensors``).
    """
    from .config import WildActorConfig

    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json in {folder}") from None
    if "_class_name" not in raw:  # our own save_pretrained folder
        return WildActor.from_pretrained(folder, device=device, dtype=dtype, **overrides)
    if raw["_class_name"] != "WanTransformer3DModel":
        raise ValueError(f"{cfg_path}: _class_name {raw['_class_name']!r}; expected WanTransformer3DModel")
    cfg = WildActorConfig.from_diffusers_config({k: v for k, v in raw.items() if not k.startswith("_")},
                                                **overrides)
    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    index = single.replace(".safetensors", ".safetensors.index.json")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{folder} has no diffusion_pytorch_model.safetensors (nor a sharded index); "
                                f"weights load from safetensors only")
    sd: dict[str, Tensor] = {}
    for fp in files:
        sd.update(weights.read_safetensors(fp, device=device)[0])
    dt = dtype or sd["patch_embedding.weight"].dtype
    model = WildActor(cfg, device="meta", dtype=dt)
    model.load_wan_state_dict(sd, strict=True)
    return model.eval()


# ============================================================================ tiny random components
def tiny_wan_components(seed: int = 0, text_dim: int = 32, z_dim: int = 4) -> dict[str, Any]:
    """Tiny random diffusers Wan components, built from configs with no download (tests, README).

    Returns ``{"tokenizer", "text_encoder", "vae", "scheduler", "transformer"}``: a word-level
    tokenizer over a few words (made with ``tokenizers``), a 1-layer UMT5 encoder of width
    ``text_dim``, an ``AutoencoderKLWan`` with ``z_dim`` channels (spatial factor 8, temporal 4), a
    ``FlowMatchEulerDiscreteScheduler`` (shift 3) and a 2-layer diffusers ``WanTransformer3DModel``
    (2 heads of 16). Random weights: the frames are noise, the plumbing is real.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        words = ("a person woman man walks runs dances waves in the park street rain night at red blue "
                 "coat smiling slowly").split()
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        for w in words:
            vocab.setdefault(w, len(vocab))
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                            unk_token="<unk>")
        t5 = UMT5Config(vocab_size=len(vocab), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=1,
                        num_heads=4, relative_attention_num_buckets=8)
        text_encoder = UMT5EncoderModel(t5).eval()
        vae = AutoencoderKLWan(base_dim=4, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True],
                               latents_mean=[0.1 * (i % 3) for i in range(z_dim)],
                               latents_std=[1.0 + 0.25 * (i % 2) for i in range(z_dim)]).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                            attention_head_dim=16, in_channels=z_dim, out_channels=z_dim,
                                            text_dim=text_dim, freq_dim=32, ffn_dim=64, num_layers=2,
                                            rope_max_seq_len=64).eval()
        with torch.no_grad():  # diffusers zero-inits a few tensors; random everywhere exercises them all
            for p in transformer.parameters():
                p.add_(0.05 * torch.randn_like(p))
    finally:
        torch.random.set_rng_state(gen_state)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "scheduler": scheduler,
            "transformer": transformer}
