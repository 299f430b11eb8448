"""``parallelize(model, ParallelConfig(...))``: a WildActor whose forward runs on a device mesh.

Every rank passes the same full inputs and gets the same full output. Inside:

- ``cfg > 1``: the batch is cut in ``cfg`` slices (the sampler's ``[cond; uncond]`` batch gives one
  guidance branch per slice) and each slice of the mesh runs its own; a batch that does not
  divide runs whole on every slice (with a warning, once);
- the video tokens are padded to a multiple of ``ulysses * ring`` and each rank keeps one shard;
  everything but self-attention (modulation, projections, LoRA, cross-attention to the text, FFN,
  output head) is per token and runs on the shard as it is;
- self-attention goes through :mod:`.attention` (Ulysses all-to-all and/or ring);
- the output pieces of every rank come back in one all-gather over the whole mesh.

The pieces that do not depend on the video (time and text embeddings, the reference stream of
the joint path, the reference K/V cache) are computed whole on every rank, with no communication.

Gradients (training on the joint path): each rank's parameters receive the gradient of the work
it did. Summed over the ranks (:meth:`ParallelWildActor.reduce_gradients`) they equal the
single-process gradient, provided every rank computes the same loss from the full output.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from wildactor_kernels import TokenLayout

from .. import checks
from ..wildactor import RefCache, Reference, WildActor
from .attention import ShardPlan, attend_override
from .comm import gather_ints, gather_output
from .mesh import ParallelConfig, ParallelMesh

logger = logging.getLogger("wildactor_kernels")
Tensor = torch.Tensor


class ParallelWildActor(nn.Module):
    """A :class:`WildActor` run with sequence parallelism; built by :func:`parallelize`.

    Call it like the model (``forward(latents, timestep, context, refs=None, ref_cache=None)``);
    :meth:`encode_references` and any other attribute are the wrapped model's.
    """

    def __init__(self, model: WildActor, config: ParallelConfig, mesh: ParallelMesh):
        super().__init__()
        self.model = model
        self.config = config
        self.mesh = mesh
        self._warned = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def encode_references(self, refs: Sequence[Reference],
                          video_shape: Sequence[int] | None = None) -> RefCache:
        """The wrapped model's reference cache: computed whole on every rank, once per generation."""
        return self.model.encode_references(refs, video_shape=video_shape)

    def reduce_gradients(self) -> None:
        """Sum the gradients of every parameter over the mesh (the single-process gradient)."""
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.mesh.group)

    # ------------------------------------------------------------------ forward
    def forward(self, latents: Tensor, timestep: Tensor | float, context: Tensor,
                refs: Sequence[Reference] | None = None, ref_cache: RefCache | None = None) -> Tensor:
        """Velocity ``[B, out_channels, T, H, W]``, equal on every rank (see :meth:`WildActor.forward`)."""
        m, cfg, pm = self.model, self.config, self.mesh
        _check_attention_precision(m)
        # the ranks agree on the shapes of their inputs before anything else: a rank whose inputs
        # differ (or fail the checks below where the others pass) would leave the others waiting
        # in a collective; this way every rank raises the same error
        sigs = gather_ints([_input_signature(latents, timestep, context, refs, ref_cache)], pm.group,
                           m.device)
        if any(s != sigs[0] for s in sigs):
            odd = [i for i, s in enumerate(sigs) if s != sigs[0]]
            raise ValueError("every rank must pass the same full inputs to a parallelized model; the "
                             f"shapes of latents, timestep, context, refs or ref_cache on rank(s) {odd} "
                             "of the mesh differ from rank 0's")
        b, grid, t = checks.check_call(m.cfg, latents, timestep, context, refs, ref_cache)
        nv = grid[0] * grid[1] * grid[2]
        split = cfg.cfg > 1 and b % cfg.cfg == 0
        if cfg.cfg > 1 and not split and not self._warned and pm.rank == 0:
            logger.warning("ParallelConfig.cfg=%d splits the batch, but this call's batch is %d: every cfg "
                           "group runs the whole batch (no CFG-parallel speed-up for such calls)", cfg.cfg, b)
            self._warned = True
        if split:  # this slice of the mesh runs one slice of the batch (one guidance branch)
            bc = b // cfg.cfg
            sl = slice(pm.cfg_rank * bc, (pm.cfg_rank + 1) * bc)
            latents, t, context = latents[sl], t[sl], context[sl]
            if refs:
                refs = [Reference(r.kind, r.latent[sl]) if r.latent.shape[0] == b and b > 1 else r
                        for r in refs]
        else:
            bc = b
        plan = ShardPlan.make(nv, pm)

        x = plan.scatter(m.patchify(latents))
        temb, e_video = m.time_embedding(t, nv)
        if t.ndim == 2:  # per-token timesteps: shard them with the tokens
            temb, e_video = plan.scatter(temb), plan.scatter(e_video)
        text = m.condition_embedder.text(context.to(m.dtype))

        if ref_cache is not None:
            # bound for the whole batch (the memo on the cache then serves every step), then this
            # group's slice: a per-sample cache (batch B) splits with the batch, a batch-1 one is a view
            ks, vs = m.bind_ref_cache(ref_cache, grid, b)
            if split:
                ks, vs = [k[sl] for k in ks], [v[sl] for v in vs]
            cos, sin = m.rope_tables(TokenLayout(grid), latents.device)
            cos, sin = plan.scatter(cos, 0, 1.0), plan.scatter(sin, 0, 0.0)
            for i, block in enumerate(m.blocks):
                ref_kv = (ks[i], vs[i]) if ks else None
                with attend_override(block.attn1, plan):
                    x, _, _ = block(x, plan.shard, e_video, None, text, cos, sin, ref_kv=ref_kv)
        else:
            ref_tokens, ref_grids = m.embed_references(refs or [], batch_size=bc)
            cos, sin = m.rope_tables(TokenLayout(grid, ref_grids), latents.device)
            cos = torch.cat([plan.scatter(cos[:nv], 0, 1.0), cos[nv:]])
            sin = torch.cat([plan.scatter(sin[:nv], 0, 0.0), sin[nv:]])
            x = torch.cat([x, ref_tokens], dim=1)   # the reference rows, whole on every rank
            e_ref = m.reference_modulation() if ref_grids else None
            for block in m.blocks:
                args = (block, plan, x, e_video, e_ref, text, cos, sin)
                if m.gradient_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(_run_block, *args, use_reentrant=False)
                else:
                    x = _run_block(*args)
        y = _head_tokens(m, x[:, :plan.shard], temb)                  # [bc, ns, out * prod(patch)]
        pieces = gather_output(y, pm.group, pm.rank)                  # [world, bc, ns, F]
        order = torch.tensor([c * cfg.seq + s for c, s in pm.coords], device=y.device)
        out = pieces[torch.argsort(order)].view(cfg.cfg, cfg.seq, bc, plan.shard, -1)
        # an unsplit batch was computed by every cfg group alike: the first group's copy is used
        # (so the others get no gradient, and the sum over ranks stays the single-process one)
        out = out if split else out[:1]
        out = out.transpose(1, 2).reshape(-1, plan.padded, out.shape[-1])[:, :nv]
        return _unpatchify(out, grid, m.cfg.patch_size)


def _shape_of(x) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _input_signature(latents, timestep, context, refs, ref_cache) -> int:
    """A 63-bit digest of the structure of one call's inputs (shapes, reference kinds, the cache's
    layout); equal on ranks whose inputs have the same shapes."""
    if isinstance(ref_cache, RefCache):
        cache = (ref_cache.num_layers, ref_cache.batch_size, tuple(map(tuple, ref_cache.refs)),
                 tuple(ref_cache.video_grid), _shape_of(ref_cache.k[0]) if ref_cache.k else None)
    else:
        cache = _shape_of(ref_cache)
    if refs is None or isinstance(refs, (Tensor, Reference)):
        rs = _shape_of(refs)
    else:
        try:
            rs = tuple((r.kind, _shape_of(r.latent)) if isinstance(r, Reference) else _shape_of(r)
                       for r in refs)
        except TypeError:
            rs = type(refs).__name__
    text = repr((_shape_of(latents), _shape_of(timestep) if isinstance(timestep, Tensor) else
                 (type(timestep).__name__,), _shape_of(context), rs, cache))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _check_attention_precision(m: WildActor) -> None:
    """8-bit attention (``quantize_model(..., attention="fp8")``) has no sharded form yet: refuse it
    rather than run the sharded attention in the activations' dtype without saying so."""
    if any(getattr(b.attn1, "precision", None) is not None for b in m.blocks):
        raise ValueError("parallelize: the model's self-attention runs in 8 bits (quantize_model(..., "
                         "attention='fp8')), which sequence parallelism does not support; quantize the "
                         "linears only (attention=None)")


def _run_block(block, plan: ShardPlan, x, e_video, e_ref, text, cos, sin) -> Tensor:
    # the override is installed inside the (possibly checkpointed) call, so a recomputation in
    # the backward pass runs the same sharded attention
    with attend_override(block.attn1, plan):
        return block(x, plan.shard, e_video, e_ref, text, cos, sin)[0]


def _head_tokens(m: WildActor, x: Tensor, temb: Tensor) -> Tensor:
    """The modulated output layer per token (``WildActor``'s head without the unpatchify)."""
    shift, scale = (m.scale_shift_table.float().unsqueeze(0) + temb.float().unsqueeze(2)).unbind(2)
    x = (m.norm_out(x) * (1 + scale) + shift).to(x.dtype)
    return m.proj_out(x)


def _unpatchify(x: Tensor, grid: tuple[int, int, int], patch: Sequence[int]) -> Tensor:
    """``[B, T*Hg*Wg, out * pt * ph * pw]`` -> ``[B, out, T*pt, Hg*ph, Wg*pw]``."""
    b, (t, h, w), (pt, ph, pw) = x.shape[0], grid, patch
    x = x.reshape(b, t, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, -1, t * pt, h * ph, w * pw)


def parallelize(model: WildActor, config: ParallelConfig, group_or_mesh=None) -> ParallelWildActor:
    """Run ``model`` with sequence parallelism over a process group or a ``DeviceMesh``.

    Args:
        model: a :class:`WildActor` with the same weights on every rank.
        config: :class:`ParallelConfig` ``(ulysses, ring, cfg)``.
        group_or_mesh: an initialised ``ProcessGroup`` (None: the default group) of
            ``cfg * ring * ulysses`` ranks, or a ``DeviceMesh`` of that shape with dims
            ``("cfg", "ring", "ulysses")``. Every rank of the default group must call this.
    Returns:
        a :class:`ParallelWildActor`; every rank passes the same inputs and gets the same output.
    Raises:
        ValueError: the heads do not divide by ``ulysses`` (use ``ring`` for the rest: e.g. 24
            heads on 16 ranks as ``ulysses=8, ring=2``), or the group has the wrong size.
    """
    if isinstance(model, ParallelWildActor):
        raise TypeError("the model is already parallelized")
    if not isinstance(model, WildActor):
        raise TypeError(f"model must be a WildActor, got {type(model).__name__}")
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"config must be a ParallelConfig, got {type(config).__name__}")
    _check_attention_precision(model)
    heads = model.cfg.num_heads
    if heads % config.ulysses:
        raise ValueError(f"ParallelConfig.ulysses={config.ulysses} must divide the number of heads "
                         f"({heads}); split the rest of the sequence with ring= instead")
    mesh = ParallelMesh(config, group_or_mesh, device_type=model.device.type)
    logger.info("parallelize: %s on rank %d", mesh, dist.get_rank())
    return ParallelWildActor(model, config, mesh)
