"""Rectified-flow Euler sampler with the Wan time shift, CFG and a reference K/V cache (docs/design.md §6).

Rectified flow: ``x_sigma = (1 - sigma) * x0 + sigma * noise`` and the model predicts the velocity
``v = noise - x0 = dx/dsigma``. Sigmas go from 1 to 0 in ``num_steps`` uniform steps, then the Wan
shift ``sigma' = s*sigma / (1 + (s-1)*sigma)`` moves them towards the noisy end; the model is fed
``timestep = 1000 * sigma'``. One Euler step: ``x <- x + (sigma'_next - sigma'_now) * v``.

References never read video tokens and always use timestep 0, so their per-layer keys/values are
the same at every step and in both guidance branches: with ``use_ref_cache=True`` they are encoded
once per generation (``WildActor.encode_references``) and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's time shift ``s*sigma / (1 + (s-1)*sigma)`` (identity for ``shift=1``)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


@dataclass
class FlowMatchSampler:
    """Euler sampler for rectified-flow video DiTs.

    Args:
        num_steps: denoising steps.
        shift: Wan time shift ``s`` (5.0 for 720p Wan2.x, 3.0 for 480p).
        guidance_scale: classifier-free guidance weight (``<= 1`` disables the unconditional branch).
        use_ref_cache: encode the references once and reuse their K/V at every step and branch.
        progress: show a tqdm progress bar (on stderr, left in place when sampling ends).
        progress_desc: the bar's label.
    """

    num_steps: int = 30
    shift: float = 5.0
    guidance_scale: float = 5.0
    use_ref_cache: bool = True
    progress: bool = True
    progress_desc: str = "denoising"

    def sigmas(self, device=None) -> torch.Tensor:
        """Shifted sigmas ``[num_steps + 1]`` from 1 down to 0 (float64)."""
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        base = torch.linspace(1.0, 0.0, self.num_steps + 1, dtype=torch.float64, device=device)
        return shift_sigmas(base, self.shift)

    @torch.no_grad()
    def sample(
        self,
        model,
        shape: Sequence[int] | None = None,
        context: torch.Tensor | None = None,
        *,
        negative_context: torch.Tensor | None = None,
        refs: Sequence | None = None,
        noise: torch.Tensor | None = None,
        seed: int | None = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Generate video latents.

        Args:
            model: a :class:`wildactor_kernels.model.WildActor`.
            shape: latent shape ``[B, C, T, H, W]`` (ignored when ``noise`` is given).
            context: text embeddings ``[B, L, text_dim]``.
            negative_context: unconditional text embeddings (default: zeros like ``context``).
            refs: list of :class:`Reference` (latents ``[1 or B, C, 1, h, w]``) or None.
            noise: starting noise; otherwise drawn from ``seed``.
        Returns:
            Denoised latents ``[B, C, T, H, W]``.
        """
        if context is None:
            raise ValueError("context (text embeddings [B, L, text_dim]) is required")
        device = torch.device(device) if device is not None else context.device
        dtype = dtype or context.dtype
        if noise is None:
            if shape is None:
                raise ValueError("give the latent shape [B, C, T, H, W] or the starting noise")
            gen = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
            noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
        x = noise.to(device=device, dtype=torch.float32)
        b = x.shape[0]
        cfg = self.guidance_scale > 1.0
        if cfg:
            neg = torch.zeros_like(context) if negative_context is None else negative_context
            ctx = torch.cat([context, neg.to(context.dtype)], dim=0)
        else:
            ctx = context
        refs = list(refs) if refs else []
        cache = None
        if refs and self.use_ref_cache:
            # once per generation, for every step and both branches; keys rotated for this grid
            cache = model.encode_references(refs, video_shape=x.shape)
        elif refs and cfg:
            refs = [type(r)(r.kind, _repeat_batch(r.latent, 2 * b)) for r in refs]

        sig = self.sigmas(device=device)
        steps = range(self.num_steps)
        for i in tqdm(steps, disable=not self.progress, desc=self.progress_desc, leave=True):
            s_now, s_next = sig[i], sig[i + 1]
            x_in = torch.cat([x, x], dim=0) if cfg else x
            t = torch.full((x_in.shape[0],), float(1000.0 * s_now), device=device, dtype=torch.float32)
            kwargs = {"ref_cache": cache} if cache is not None else ({"refs": refs} if refs else {})
            v = model(x_in.to(dtype), t, ctx, **kwargs).float()
            if cfg:
                v_cond, v_uncond = v.chunk(2, dim=0)
                v = v_uncond + self.guidance_scale * (v_cond - v_uncond)
            x = x + float(s_next - s_now) * v
        return x.to(dtype)


def _repeat_batch(t: torch.Tensor, b: int) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if b % t.shape[0]:
        raise ValueError(f"reference batch {t.shape[0]} does not divide the video batch {b}")
    return t.repeat(b // t.shape[0], *([1] * (t.ndim - 1)))
