"""Command-line glue: the ``--ulysses/--ring/--cfg-parallel`` flags and the process group they need.

``torchrun --nproc-per-node N -m wildactor_kernels.model.cli demo --ulysses 2 --cfg-parallel``
starts ``N`` processes; :func:`parallel_from_args` initialises the default group from torchrun's
environment (NCCL when CUDA is there, gloo otherwise), pins each rank to its GPU, wraps the model,
and silences every rank but 0 (no prints, no progress bars; only rank 0 writes files). Nothing
heavy is imported until a flag asks for it.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys

__all__ = ["add_parallel_arguments", "parallel_from_args", "is_main_process", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a usage error otherwise). The parallel degrees use it,
    and the CLI's sizes and counts."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v}")
    return v


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--ulysses N``, ``--ring N``, ``--cfg-parallel`` to a subcommand's parser."""
    g = parser.add_argument_group("sequence parallelism (run under torchrun; docs/parallel.md)")
    g.add_argument("--ulysses", type=positive_int, default=1, help="Ulysses degree (must divide the heads)")
    g.add_argument("--ring", type=positive_int, default=1, help="ring-attention degree")
    g.add_argument("--cfg-parallel", action="store_true",
                   help="run the two guidance branches on two halves of the ranks")


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _init_from_env() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("--ulysses/--ring/--cfg-parallel need several processes: start the command with "
                           "torchrun --nproc-per-node N ...")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # "cuda" now means this rank's GPU
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def parallel_from_args(model, args: argparse.Namespace):
    """Wrap ``model`` as the flags ask (unchanged when they ask for nothing and no torchrun runs).

    Builds ``ParallelConfig(ulysses, ring, cfg=2 if --cfg-parallel)``; under torchrun with no
    flags, all ranks go to Ulysses when the heads allow it, else to the ring. On ranks other than
    0, stdout goes to /dev/null and ``args.no_progress`` is set.
    """
    import torch
    import torch.distributed as dist

    from .mesh import ParallelConfig
    from .wrapper import parallelize

    ulysses, ring = getattr(args, "ulysses", 1), getattr(args, "ring", 1)
    cfg = 2 if getattr(args, "cfg_parallel", False) else 1
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if (ulysses, ring, cfg) == (1, 1, 1) and not torchrun:
        return model
    _init_from_env()
    if model.device.type == "cuda":  # each rank on its own GPU (torchrun's LOCAL_RANK)
        model = model.to(torch.device("cuda", torch.cuda.current_device()))
    world = dist.get_world_size()
    if (ulysses, ring, cfg) == (1, 1, 1):
        ulysses = world if model.cfg.num_heads % world == 0 else 1
        ring = world // ulysses
    config = ParallelConfig(ulysses=ulysses, ring=ring, cfg=cfg)
    if config.world_size != world:
        raise SystemExit(f"--ulysses {ulysses} x --ring {ring} x cfg {cfg} = {config.world_size} ranks, "
                         f"but torchrun started {world}")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        if hasattr(args, "no_progress"):
            args.no_progress = True
    else:
        print(f"sequence parallel: {config} on {world} ranks ({dist.get_backend()})")
    return parallelize(model, config)
