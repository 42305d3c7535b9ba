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


def launcher_env() -> dict[str, str]:
    """`RANK`, `WORLD_SIZE`, `LOCAL_RANK` where the environment lacks them: srun's `SLURM_PROCID`,
    `SLURM_NTASKS`, `SLURM_LOCALID` stand in for what torchrun / the deepspeed launcher set, and a
    plain process is rank 0 of 1 (nothing when `RANK` is set)."""
    env = os.environ
    if "RANK" in env:
        return {}
    if "SLURM_PROCID" in env:
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"]}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def rank_world() -> tuple[int, int]:
    """This process's rank and the group's size (0, 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def joined(device: str = "auto") -> Iterator[tuple[int, int, torch.device]]:
    """Join the launcher's process group for the duration (NCCL on GPUs, gloo otherwise); alone, or
    already inside a group, nothing is joined. Yields (rank, world, this process's device)."""
    missing = launcher_env()
    given = {**os.environ, **missing}
    world, local = int(given.get("WORLD_SIZE", 1)), int(given.get("LOCAL_RANK", 0))
    name = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no GPU is visible")
    here = torch.device("cuda", local % torch.cuda.device_count()) if name == "cuda" else torch.device(name)
    start = world > 1 and not dist.is_initialized()
    before = set(os.environ)
    if start:
        os.environ.update(missing)  # srun: what torchrun would have set
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
            for name in set(os.environ) - before:  # a later job of this process starts clean
                os.environ.pop(name)


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
