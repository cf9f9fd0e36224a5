"""torchrun / DDP plumbing shared by training and evaluation.

`torchrun --nproc_per_node N bench.py train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; without them
everything runs as a single process. nccl on CUDA, gloo on CPU (docs/specs/protocol.md §8).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group when launched by torchrun; a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shard(count: int, ctx: DistContext) -> list[int]:
    """This rank's share of `count` items, unpadded: no item is seen twice across ranks (a padded
    DistributedSampler would count duplicated images twice in a reduced confusion matrix)."""
    return list(range(ctx.rank, count, ctx.world_size))


class TrainStep(nn.Module):
    """Routes `forward` to `forward_train`, so DDP's gradient hooks see the training pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_train(images, labels)


def training_module(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """The module the training loop calls: DDP-wrapped under torchrun, with SyncBatchNorm on CUDA only
    (SyncBN is GPU-only; timm's converter keeps timm's fused norm-act layers intact)."""
    step = TrainStep(model)
    if not ctx.distributed:
        return step
    if ctx.device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        step.model = convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        step, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is true on any (so that all ranks take the same branch)."""
    if not ctx.distributed:
        return bool(flag)
    tensor = torch.tensor([int(bool(flag))], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_lists(items: list, ctx: DistContext) -> list:
    """Every rank's list concatenated (picklable items; small ones: per-image summaries, not tensors of pixels)."""
    if not ctx.distributed:
        return items
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.item() / ctx.world_size


@contextlib.contextmanager
def primary_only(ctx: DistContext, factory):
    """`factory()` as a context on rank 0; None elsewhere (only rank 0 talks to MLflow)."""
    if ctx.is_primary:
        with factory() as value:
            yield value
    else:
        yield None
