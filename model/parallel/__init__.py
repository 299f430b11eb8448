"""Sequence parallelism on torch.distributed: Ulysses, ring and CFG-parallel (docs/parallel.md).

``parallelize(model, ParallelConfig(ulysses=U, ring=R, cfg=C))`` wraps a :class:`WildActor` so
that its forward runs on ``C * R * U`` ranks; every rank passes the same full inputs and gets the
same full output.
"""

from .comm import CommCounter, count_communication
from .cost import comm_bytes_per_forward, step_time_model
from .launch import add_parallel_arguments, parallel_from_args
from .mesh import ParallelConfig, ParallelMesh
from .wrapper import ParallelWildActor, parallelize

__all__ = ["ParallelConfig", "ParallelMesh", "ParallelWildActor", "parallelize", "CommCounter",
           "count_communication", "comm_bytes_per_forward", "step_time_model", "add_parallel_arguments",
           "parallel_from_args"]
