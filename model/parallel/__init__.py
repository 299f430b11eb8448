"""Sequence parallelism on torch.distributed: Ulysses, ring and CFG-parallel (docs/parallel.md).

``parallelize(model, ParallelConfig(ulysses=U, ring=R, cfg=C))`` wraps a :class:`WildActor` so
that its forward runs on ``C * R * U`` ranks; every rank passes the same full inputs and gets the
same full output.

Modules: ``mesh`` (config and groups), ``comm`` (the counted, differentiable collectives),
``attention`` (Ulysses and ring attention on a sharded sequence), ``wrapper`` (``parallelize``),
``cost`` (bytes and an analytical step-time model), ``launch`` (CLI flags, torchrun set-up).
Names resolve lazily, so the CLI can add its flags without importing the model.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ParallelConfig": "mesh",
    "ParallelMesh": "mesh",
    "ParallelWildActor": "wrapper",
    "parallelize": "wrapper",
    "CommCounter": "comm",
    "count_communication": "comm",
    "comm_bytes_per_forward": "cost",
    "step_time_model": "cost",
    "SHAPES": "cost",
    "add_parallel_arguments": "launch",
    "parallel_from_args": "launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
