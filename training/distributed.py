"""Data parallelism through torchrun: process-group setup, DDP / FSDP2 wrapping, and small collectives.

The same command runs on one device or many: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the
rendezvous variables), `setup_distributed` reads them, and without them everything runs as rank 0 of 1.
NCCL is used on CUDA and gloo on the CPU. Wrapping is a transform on a built model (`wrap_model`), so
the model file knows nothing about parallelism.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global rank, its rank on the node, the world size and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> this process's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group from torchrun's environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def teardown_distributed() -> None:
    """Destroy the default process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (identity for one process) and return it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (identity for one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def resolve_strategy(strategy: str, info: DistInfo) -> str:
    """`auto` -> ddp when several processes run, else none."""
    if strategy == "auto":
        return "ddp" if info.distributed else "none"
    if strategy in ("ddp", "fsdp") and not info.distributed:
        return "none"  # one process: nothing to synchronise, and plain modules are easier to inspect
    return strategy


def wrap_model(model: nn.Module, strategy: str, info: DistInfo,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply data parallelism to a model already on `info.device`.

    ddp: DistributedDataParallel (gradients averaged in buckets during backward).
    fsdp: FSDP2 `fully_shard` on every decoder layer, then on the root; parameters are sharded across
    ranks and gathered per layer. `param_dtype` (e.g. bf16) makes FSDP compute in that dtype while it
    keeps fp32 master weights and reduces gradients in fp32; callers then skip autocast.
    """
    strategy = resolve_strategy(strategy, info)
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
        kwargs = {"mp_policy": policy} if policy else {}
        for layer in unwrap_model(model).model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"unknown parallel strategy {strategy!r}; use none, ddp or fsdp")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (FSDP2 shards in place, nothing to strip)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce inside this block when `enabled` is False (accumulation micro-steps).

    DDP exposes `no_sync()`; FSDP2 modules expose `set_requires_gradient_sync`. Plain modules ignore it.
    """
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
