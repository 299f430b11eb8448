"""``ParallelConfig`` and the device mesh it runs on (docs/parallel.md).

The mesh has three named dimensions, outermost first: ``("cfg", "ring", "ulysses")`` of sizes
``(cfg, ring, ulysses)``. A rank at coordinate ``(c, r, u)`` serves guidance branch ``c`` (a slice
of the batch) and sequence shard ``s = r * ulysses + u`` of the video: the ``ulysses`` ranks of
one ring position together hold one contiguous ring chunk, so after the Ulysses all-to-all each
rank holds ring chunk ``r`` for its own ``1/ulysses`` of the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

MESH_DIMS = ("cfg", "ring", "ulysses")


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism.

    Args:
        ulysses: ranks exchanging sequence shards for head shards (all-to-all); must divide the
            number of heads.
        ring: ranks passing K/V blocks around a ring (log-sum-exp merge); any number.
        cfg: groups that split the batch, so the conditional and unconditional guidance
            branches (the sampler's ``[cond; uncond]`` batch) run on different ranks.
    The sequence is split over ``ulysses * ring`` ranks; ``cfg * ring * ulysses`` ranks in all.
    """

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring", "cfg"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ParallelConfig.{name} must be an int >= 1, got {v!r}")

    @property
    def seq(self) -> int:
        """Ranks that split the sequence (``ulysses * ring``)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.cfg, self.ring, self.ulysses)


def _check_whole_world(n: int, what: str) -> None:
    """The mesh's sub-groups are made with ``dist.new_group``, which every rank of the default group
    must enter with the same ranks: a group or mesh over only some of them would leave the others
    waiting forever, so it is refused before any group is made."""
    world = dist.get_world_size()
    if n != world:
        raise ValueError(f"parallelize() runs on every rank of the default process group ({world}); the "
                         f"{what} given has {n} ranks. Start as many processes as the ParallelConfig "
                         "needs (torchrun --nproc-per-node N), or pass the default group (None)")


class ParallelMesh:
    """The groups one rank talks to, built from a process group or a ``DeviceMesh``.

    Attributes:
        config: the :class:`ParallelConfig`.
        device_mesh: the ``DeviceMesh`` with dims ``("cfg", "ring", "ulysses")``.
        group: the process group of the whole mesh (the output all-gather runs on it).
        cfg_rank, ring_rank, ulysses_rank: this rank's coordinates (``ulysses_rank`` is its rank
            inside the Ulysses group, the order the all-to-all uses).
        seq_rank: ``ring_rank * ulysses + ulysses_rank``, the sequence shard this rank holds.
        ulysses_group, ring_group: the groups of the two sequence dimensions.
        ring_next, ring_prev: global ranks of the ring neighbours with the same head shard
            (K/V go to ``ring_next``).
        coords: ``(cfg, seq)`` coordinate of every member of ``group``, by group rank (how the
            gathered output is reassembled).
    """

    def __init__(self, config: ParallelConfig, group_or_mesh=None, device_type: str = "cpu"):
        from torch.distributed.device_mesh import DeviceMesh

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("parallelize() needs an initialised process group: call "
                               "torch.distributed.init_process_group() first (torchrun sets the "
                               "environment it reads)")
        self.config = config
        if isinstance(group_or_mesh, DeviceMesh):
            mesh = group_or_mesh
            if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
                raise ValueError(f"the DeviceMesh must have dims {MESH_DIMS}, got {mesh.mesh_dim_names}")
            if tuple(mesh.mesh.shape) != config.shape:
                raise ValueError(f"the DeviceMesh has shape {tuple(mesh.mesh.shape)}; ParallelConfig "
                                 f"(cfg, ring, ulysses) = {config.shape}")
            ranks = sorted(mesh.mesh.flatten().tolist())
            _check_whole_world(len(ranks), "DeviceMesh")
            group = None
        elif group_or_mesh is None or isinstance(group_or_mesh, dist.ProcessGroup):
            group = group_or_mesh
            ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
            if len(ranks) != config.world_size:
                raise ValueError(f"ParallelConfig {config} needs {config.world_size} ranks; the process "
                                 f"group has {len(ranks)}")
            _check_whole_world(len(ranks), "process group")
            mesh = DeviceMesh(device_type, torch.tensor(ranks).view(config.shape), mesh_dim_names=MESH_DIMS)
        else:
            raise TypeError("parallelize() takes a torch.distributed ProcessGroup, a DeviceMesh with dims "
                            f"{MESH_DIMS} or None (the default group); got {type(group_or_mesh).__name__}")
        self.device_mesh, self.group = mesh, group
        c, r, _ = mesh.get_coordinate()
        self.cfg_rank, self.ring_rank = int(c), int(r)
        self.ulysses_group = mesh.get_group("ulysses")
        self.ring_group = mesh.get_group("ring")
        # the all-to-all orders its pieces by rank inside the Ulysses group, so that rank (not the
        # mesh coordinate, which a user's mesh may number differently) decides the head shard
        self.ulysses_rank = dist.get_rank(self.ulysses_group)
        self.seq_rank = self.ring_rank * config.ulysses + self.ulysses_rank
        # Every member's (cfg, ring, ulysses rank, global rank), exchanged once, here: the ring
        # neighbours are the ranks with the same head shard one ring position away, and the
        # gathered output is reassembled by (cfg, sequence shard).
        dev = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else "cpu"
        mine = torch.tensor([self.cfg_rank, self.ring_rank, self.ulysses_rank, dist.get_rank()],
                            dtype=torch.int64, device=dev)  # NCCL moves CUDA tensors only
        table = [torch.zeros_like(mine) for _ in range(config.world_size)]
        dist.all_gather(table, mine, group=group)
        table = [tuple(int(x) for x in t) for t in table]
        where = {(c_, r_, u_): g for c_, r_, u_, g in table}
        R, c, u = config.ring, self.cfg_rank, self.ulysses_rank
        self.ring_next = where[(c, (self.ring_rank + 1) % R, u)]
        self.ring_prev = where[(c, (self.ring_rank - 1) % R, u)]
        self.coords = [(c_, r_ * config.ulysses + u_) for c_, r_, u_, _ in table]
        self.rank = dist.get_rank(group)

    def __repr__(self) -> str:
        return (f"ParallelMesh({self.config}, cfg_rank={self.cfg_rank}, ring_rank={self.ring_rank}, "
                f"ulysses_rank={self.ulysses_rank})")
