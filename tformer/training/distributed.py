"""Where training runs: the process's rank in a DDP job, its device, and the process group's lifetime.

* ``Dist.current()``: rank, world size and local rank, read from the process group when the
  caller already created one, otherwise from torchrun's ``RANK`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK`` (a single process when they are unset).
* ``resolve_device(name)``: ``"auto"`` is CUDA when available, else CPU; under DDP each process
  takes the CUDA device of its local rank.
* ``process_group(world, device)``: creates the group when a multi-process run has none (nccl on
  CUDA, gloo otherwise) and destroys only a group it created itself: a caller's group survives.
* ``Dist.largest(value)``: a MAX all-reduce of one integer. After every step the processes of a run
  agree with it on a stop request (SIGINT/SIGTERM), so all of them stop after the same step, even when
  the signal reached only one of them (torchrun forwards a SIGINT/SIGTERM it receives to every worker
  and kills the workers still running after its shutdown timeout, 30 s by default: the last step and
  the checkpoint must fit in that).
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

    def largest(self, value: int, device: torch.device) -> int:
        """The largest of every process's ``value`` (a collective: every process must call it; free in one
        process). The training loop agrees this way on whether, and on which signal, to stop after a step."""
        if self.world_size == 1:
            return value
        flag = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


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


PARALLEL = ("ddp", "fsdp")


def check_parallel(train: dict, device: torch.device) -> None:
    from ..errors import ConfigError

    if train["parallel"] not in PARALLEL:
        raise ConfigError(f"train.parallel={train['parallel']!r}; valid choices: {', '.join(map(repr, PARALLEL))}")
    if train["cpu_offload"] and (train["parallel"] != "fsdp" or device.type != "cuda"):
        raise ConfigError("train.cpu_offload=true moves FSDP's parameter shards to CPU memory between uses: it needs "
                          f"train.parallel=fsdp on CUDA (this run: parallel={train['parallel']!r} on {device.type})")


def fsdp_precision(train: dict):
    """FSDP's own mixed-precision policy for ``train.precision`` (None for fp32): parameters gathered in
    bf16/fp16 for compute, gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .engine import PRECISIONS

    dtype = PRECISIONS[train["precision"]]
    return None if dtype is None else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def wrap_model(model, world: Dist, device: torch.device, train: dict):
    """The module the training step runs: the model itself in one process; under several processes a
    DistributedDataParallel wrapper (``train.parallel=ddp``), or the model with every Transformer block
    and then the whole model sharded by FSDP2's ``fully_shard`` (``fsdp``), in place."""
    check_parallel(train, device)
    if world.world_size == 1:
        return model
    if train["parallel"] == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from ..blocks import TransformerBlock

    mesh = init_device_mesh(device.type, (world.world_size,))
    options = {"mesh": mesh}
    policy = fsdp_precision(train)
    if policy is not None:
        options["mp_policy"] = policy
    if train["cpu_offload"]:
        options["offload_policy"] = CPUOffloadPolicy()
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_value(t: Tensor) -> Tensor:
    """A DTensor's full value (a collective: every rank must call it), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def barrier(world: Dist) -> None:
    if world.world_size > 1 and dist.is_initialized():
        dist.barrier()
