"""Multi-process training helpers: torchrun environment, process group, sharded evaluation, reductions.

``torchrun --nproc_per_node N -m impatient_ros.training ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; :func:`init_distributed` then joins the process group (NCCL on
GPU, gloo on CPU). Without those variables everything here is a no-op on a
single process, so the trainer has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["DistContext", "init_distributed", "shutdown", "all_reduce_sum", "all_gather_objects", "ShardSampler"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes (one process: 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when a process group is in use."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs and progress bars."""
        return self.rank == 0


def init_distributed(use_cuda: bool) -> DistContext:
    """Join the torchrun process group if the environment asks for one (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        # One GPU per process: NCCL collectives need the device set before the first one.
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op on one process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it (unchanged on one process)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), indexed by rank; ``[obj]`` on one process."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


class ShardSampler(Sampler[int]):
    """Indices rank, rank + W, rank + 2W, ... of a dataset, in order and without padding.

    For evaluation: unlike DistributedSampler it never repeats samples to even
    out the shards, so summed correct counts are exact.
    """

    def __init__(self, length: int, ctx: DistContext) -> None:
        self.length = int(length)
        self.ctx = ctx

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.ctx.rank, self.length, self.ctx.world_size))

    def __len__(self) -> int:
        return len(range(self.ctx.rank, self.length, self.ctx.world_size))
