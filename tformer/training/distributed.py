"""Where training runs: the process's rank in a DDP job, its device, and the process group's lifetime.

* ``Dist.current()``: rank, world size and local rank, read from the process group when the
  caller already created one, otherwise from torchrun's ``RANK`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK`` (a single process when they are unset).
* ``resolve_device(name)``: ``"auto"`` is CUDA when available, else CPU; under DDP each process
  takes the CUDA device of its local rank.
* ``process_group(world, device)``: creates the group when a multi-process run has none (nccl on
  CUDA, gloo otherwise) and destroys only a group it created itself: a caller's group survives.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    @classmethod
    def current(cls) -> Dist:
        """The caller's process group if there is one, else torchrun's environment."""
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
            return cls(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", str(rank))))
        return cls.from_env()

    def mean(self, value: Tensor) -> Tensor:
        if self.world_size > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value


def resolve_device(name: str, world: Dist | None = None) -> torch.device:
    """``name`` as a device, ``"auto"`` resolved; a multi-process CUDA run gets its local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world is not None and world.world_size > 1:
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


@contextmanager
def process_group(world: Dist, device: torch.device):
    """Run the body inside a process group; create and destroy one only if the caller has none."""
    owned = world.world_size > 1 and not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
