"""Communication volume and an analytical step-time model for sequence parallelism (docs/parallel.md).

:func:`comm_bytes_per_forward` is exact: it is what :func:`.count_communication` records for one
forward call of a :class:`ParallelWildActor` (the tests check the two agree). :func:`step_time_model`
is a model on paper: FLOPs at a stated fraction of the peak, bytes at a stated fraction of the
link bandwidth. Its assumptions are its arguments; docs/parallel.md prints its tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .mesh import ParallelConfig

__all__ = ["comm_bytes_per_forward", "step_time_model", "markdown_report", "Shape", "SHAPES"]


def comm_bytes_per_forward(config: ParallelConfig, *, batch: int, num_video: int, heads: int, head_dim: int,
                           layers: int, out_features: int, elem_bytes: int = 2) -> dict[str, int]:
    """Bytes one rank sends in one forward call (same for the joint and cached paths: the reference
    side never communicates).

    Args:
        config: the parallel degrees.
        batch: the batch of the call (the sampler's ``[cond; uncond]`` batch counts 2).
        num_video: video tokens ``Nv``; heads, head_dim, layers: the model's.
        out_features: ``out_channels * prod(patch_size)`` (what the head emits per token).
        elem_bytes: bytes per element of the activations (4 fp32, 2 bf16).
    Returns:
        ``{"all_to_all": ..., "p2p": ..., "all_gather": ...}``.
    """
    u, r, c = config.ulysses, config.ring, config.cfg
    bc = batch // c
    ns = math.ceil(num_video / config.seq)
    tok = bc * ns * heads * head_dim * elem_bytes          # one q, k, v or o shard of one layer
    a2a = layers * ((3 * tok) * (u - 1) // u + tok * (u - 1) // u) if u > 1 else 0
    p2p = layers * (r - 1) * 2 * tok
    world = config.world_size
    gather = bc * ns * out_features * elem_bytes * (world - 1) if world > 1 else 0
    return {"all_to_all": a2a, "p2p": p2p, "all_gather": gather}


@dataclass(frozen=True)
class Shape:
    """One benchmark shape of docs/design.md §8 with its backbone."""

    name: str
    heads: int
    head_dim: int
    grid: tuple[int, int, int]
    num_ref: int
    dim: int
    ffn: int
    layers: int
    text_len: int = 512
    out_features: int = 16 * 4

    @property
    def num_video(self) -> int:
        return math.prod(self.grid)


SHAPES = {
    s.name: s for s in (
        Shape("wan5b-720p", 24, 128, (31, 22, 40), 4400, 3072, 14336, 30, out_features=48 * 4),
        Shape("wan1.3b-480p", 12, 128, (21, 30, 52), 7800, 1536, 8960, 30),
        Shape("wan14b-720p", 40, 128, (21, 45, 80), 10800, 5120, 13824, 40),
    )
}


def _flops_per_branch(s: Shape, tokens: int) -> tuple[float, float, float]:
    """(attention, per-token linears, replicated) FLOPs of one cached-path forward of one branch
    for ``tokens`` video query rows per rank (keys: all ``Nv`` video + ``Nr`` cached references)."""
    nv, d = s.num_video, s.dim
    attn = 4 * s.heads * s.head_dim * tokens * (nv + s.num_ref)
    lin = (4 * 2 * tokens * d * d            # self-attention q, k, v, o
           + 2 * 2 * tokens * d * d          # cross-attention q, o
           + 4 * tokens * s.text_len * d     # cross-attention scores and values
           + 2 * 2 * tokens * d * s.ffn)     # FFN
    repl = 2 * 2 * s.text_len * d * d        # cross-attention k, v of the text (every rank)
    return attn * s.layers, lin * s.layers, repl * s.layers


def step_time_model(shape: Shape | str, config: ParallelConfig, *, guidance_branches: int = 2,
                    peak_flops: float = 989e12, efficiency: float = 0.5, link_bw: float = 450e9,
                    a2a_efficiency: float = 0.75, p2p_efficiency: float = 0.85, ring_bw: float | None = None,
                    overlap_ring: bool = True, elem_bytes: int = 2,
                    rank_efficiency: float | None = None) -> dict[str, float]:
    """Seconds per denoising step (every guidance branch) on ``config.world_size`` GPUs, on paper.

    Compute: FLOPs of the cached path (one-time reference encoding left out) at
    ``efficiency * peak_flops``. Ulysses: all-to-all bytes at ``a2a_efficiency * link_bw``, not
    overlapped. Ring: each of the ``R - 1`` K/V shifts per layer at ``p2p_efficiency * ring_bw``
    (``ring_bw`` defaults to ``link_bw``; give the inter-node bandwidth when the ring crosses
    nodes), hidden behind the attention of the block in flight when ``overlap_ring`` (only its
    excess counts) or added in full when not. Output all-gather included. Returns a dict with
    ``compute``, ``all_to_all``, ``p2p``, ``gather``, ``step`` (seconds), ``single`` (one GPU,
    same efficiency) and ``speedup``. ``rank_efficiency`` (default ``efficiency``) is the fraction
    of the peak each rank of the parallel run reaches (its shards are ``P`` times shorter).
    """
    s = SHAPES[shape] if isinstance(shape, str) else shape
    if s.heads % config.ulysses:
        raise ValueError(f"{s.name}: {s.heads} heads do not divide by ulysses={config.ulysses}")
    if guidance_branches % config.cfg:
        raise ValueError(f"cfg={config.cfg} must divide the {guidance_branches} guidance branches")
    rate = efficiency * peak_flops
    branches = guidance_branches // config.cfg          # branches each rank runs
    ns = math.ceil(s.num_video / config.seq)
    attn, lin, repl = _flops_per_branch(s, ns)
    prate = (efficiency if rank_efficiency is None else rank_efficiency) * peak_flops
    compute = branches * (attn + lin + repl) / prate
    a1, l1, r1 = _flops_per_branch(s, s.num_video)
    single = guidance_branches * (a1 + l1 + r1) / rate
    b = comm_bytes_per_forward(config, batch=branches * config.cfg, num_video=s.num_video, heads=s.heads,
                               head_dim=s.head_dim, layers=s.layers, out_features=s.out_features,
                               elem_bytes=elem_bytes)
    a2a = b["all_to_all"] / (a2a_efficiency * link_bw)
    p2p_total = b["p2p"] / (p2p_efficiency * (ring_bw or link_bw))
    if overlap_ring and config.ring > 1:
        # per layer: R - 1 shifts, each hidden behind the attention of one K/V block (1/R of it)
        shifts = s.layers * (config.ring - 1)
        per_shift = p2p_total / shifts
        per_block = branches * attn / config.ring / s.layers / prate
        p2p = shifts * max(0.0, per_shift - per_block)
    else:
        p2p = p2p_total
    gather = b["all_gather"] / (a2a_efficiency * link_bw)
    step = compute + a2a + p2p + gather
    return {"compute": compute, "all_to_all": a2a, "p2p": p2p, "gather": gather, "step": step,
            "single": single, "speedup": single / step, "attn_flops_per_rank": branches * attn,
            "bytes_a2a": b["all_to_all"], "bytes_p2p": b["p2p"]}


def _row(name: str, cfg: ParallelConfig, label: str = "", **kw) -> str:
    r = step_time_model(name, cfg, **kw)
    return (f"| {name} | {label or f'U{cfg.ulysses} R{cfg.ring} C{cfg.cfg}'} | "
            f"{r['attn_flops_per_rank'] / 1e15:.2f} | {r['bytes_a2a'] / 1e9:.2f} | "
            f"{r['bytes_p2p'] / 1e9:.2f} | "
            f"{r['compute'] * 1e3:.0f} | {r['all_to_all'] * 1e3:.1f} | {r['p2p'] * 1e3:.1f} | "
            f"{r['step'] * 1e3:.0f} | {r['single']:.2f} | {r['speedup']:.2f}x |")


_HEADER = ("| shape | scheme | attn PFLOP/rank | a2a GB/rank | P2P GB/rank | compute ms | a2a ms | "
           "P2P ms (exposed) | step ms | 1 GPU s | speed-up |\n|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_report() -> str:
    """The tables of docs/parallel.md (``python -m wildactor_kernels.model.parallel.cost``)."""
    C = ParallelConfig
    out = ["### 8 x H100, one node (NVLink 450 GB/s per direction)", "", _HEADER]
    for name, s in SHAPES.items():
        for cfg in (C(ulysses=8), C(ring=8), C(ulysses=4, ring=2), C(ulysses=4, cfg=2),
                    C(ulysses=2, ring=2, cfg=2)):
            if s.heads % cfg.ulysses == 0:
                out.append(_row(name, cfg))
        out.append(_row(name, C(ring=8), "R8, shifts not overlapped (autograd path)", overlap_ring=False))
    out += ["", "### 16 x H100, two nodes (ring or cfg across nodes at 50 GB/s per GPU)", "", _HEADER]
    for name in ("wan5b-720p", "wan14b-720p"):
        heads = SHAPES[name].heads
        out.append(_row(name, C(ulysses=8, ring=2), "U8 R2, ring across nodes", ring_bw=50e9))
        out.append(_row(name, C(ring=16), "R16 (ring crosses nodes)", ring_bw=50e9))
        out.append(_row(name, C(ulysses=8, cfg=2), "U8 C2, cfg across nodes"))
        if heads % 16 == 0:
            out.append(_row(name, C(ulysses=16), "U16 across nodes", link_bw=50e9))
    out += ["", "### wan14b-720p, U8 on 8 GPUs: what the goal depends on", "",
            "| assumption changed | speed-up |", "|---|---|"]
    for label, kw in (("baseline (50% of peak on 1 and on 8 GPUs, a2a at 75% of 450 GB/s)", {}),
                      ("all-to-all at 25% of 450 GB/s", dict(a2a_efficiency=0.25)),
                      ("each of the 8 ranks at 45% of peak (single GPU 50%)", dict(rank_efficiency=0.45)),
                      ("each of the 8 ranks at 44% of peak", dict(rank_efficiency=0.44)),
                      ("fp32 activations on the wire", dict(elem_bytes=4))):
        out.append(f"| {label} | {step_time_model('wan14b-720p', C(ulysses=8), **kw)['speedup']:.2f}x |")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_report())
