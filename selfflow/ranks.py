"""Processes of `selfflow sample` and `selfflow eval` under torchrun / srun: who does which items.

Sampling and evaluation split their items across the processes of a torch.distributed group (one
per GPU; gloo on CPUs). A job launched by torchrun, the deepspeed launcher or srun joins the group
with `joined`; training's periodic evaluation runs inside the training job's group.

    with joined("auto") as (rank, world, device):
        mine = share(num_items, rank, world)          # a contiguous range of item indices
        parts = together(lambda: embed(mine))         # every rank's result, in rank order

A failure on one rank is gathered with the others' results, so every rank raises the same error
together instead of leaving the others waiting in the next collective.
"""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """This process's rank and the group's size (0, 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def joined(device: str = "auto") -> Iterator[tuple[int, int, torch.device]]:
    """Join the launcher's process group for the duration (NCCL on GPUs, gloo otherwise); alone, or
    already inside a group, nothing is joined. Yields (rank, world, this process's device)."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    name = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no GPU is visible")
    here = torch.device("cuda", local % torch.cuda.device_count()) if name == "cuda" else torch.device(name)
    start = world > 1 and not dist.is_initialized()
    if start:
        os.environ.setdefault("RANK", str(rank))  # srun: what torchrun would have set
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if here.type == "cuda":
            torch.cuda.set_device(here)
        dist.init_process_group("nccl" if here.type == "cuda" else "gloo")
    try:
        yield (*rank_world(), here)
    finally:
        if start:
            dist.destroy_process_group()


def share(count: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of `count` items (sizes differ by at most one; rank 0's first)."""
    return range(rank * count // world, (rank + 1) * count // world)


def together(work: Callable[[], Any]) -> list[Any]:
    """Every rank's `work()`, in rank order, on every rank; if it raised on any rank, every rank raises
    a `RuntimeError` naming each failed rank's error (one process: its own error as it is)."""
    rank, world = rank_world()
    try:
        mine, error = work(), None
    except Exception as err:
        if world == 1:
            raise
        mine, error = None, f"{type(err).__name__}: {err}"
    if world == 1:
        return [mine]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (error, mine))
    failed = [f"rank {r}: {e}" for r, (e, _) in enumerate(everyone) if e]
    if failed:
        raise RuntimeError("; ".join(failed))
    return [part for _, part in everyone]


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()
