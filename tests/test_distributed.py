"""pipelines/distributed.py: sharding, the single-process fallbacks, and the collective helpers in a real 2-process
gloo group (spawned here, so the whole file stays in-process for the rest)."""
from __future__ import annotations

import contextlib
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pipelines import distributed
from pipelines.distributed import DistContext
from pipelines.metrics import ConfusionMatrix


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_complete_and_unpadded(world):
    for count in range(10):
        shards = [distributed.shard(count, DistContext(rank, world)) for rank in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(count))  # every item once, none twice
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        for rank, part in enumerate(shards):
            assert part == sorted(part) and (not part or part[0] == rank)


def test_context_flags_and_single_process_fallbacks(monkeypatch):
    assert DistContext().is_primary and not DistContext().distributed
    assert not DistContext(rank=1, world_size=2).is_primary and DistContext(rank=1, world_size=2).distributed
    for value in (None, "1"):
        if value is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", value)
        ctx = distributed.init_distributed(torch.device("cpu"))
        assert ctx == DistContext(device=torch.device("cpu"))
    single = DistContext()
    assert distributed.any_rank(True, single) is True and distributed.any_rank(0, single) is False
    assert distributed.all_reduce_mean(2.5, single) == 2.5
    distributed.barrier(single)
    distributed.shutdown(single)
    with distributed.primary_only(single, lambda: contextlib.nullcontext("run")) as value:
        assert value == "run"
    with distributed.primary_only(DistContext(rank=1, world_size=2), lambda: pytest.fail("rank 1 built it")) as v:
        assert v is None


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward_train(self, images, labels):
        return {"loss": (self.weight * images).sum() + labels.sum()}


def test_training_module_routes_forward_to_forward_train():
    model = Recorder()
    step = distributed.training_module(model, DistContext())
    assert not isinstance(step, nn.parallel.DistributedDataParallel) and step.model is model
    assert step(torch.full((2,), 3.0), torch.ones(2))["loss"].item() == 8.0


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = distributed.init_distributed(torch.device("cpu"))
    model = Recorder()
    step = distributed.training_module(model, ctx)
    loss = step(torch.full((1,), float(rank + 1)), torch.zeros(1))["loss"]
    loss.backward()  # DDP averages: (1 + 2) / 2 on both ranks
    with distributed.primary_only(ctx, lambda: contextlib.nullcontext("primary")) as value:
        primary = value
    matrix = ConfusionMatrix(2)
    matrix.update(torch.tensor([rank]), torch.tensor([1]))
    matrix.all_reduce()
    result = {"matrix": matrix.matrix.tolist(),
              "rank": ctx.rank, "world": ctx.world_size, "ddp": isinstance(step, nn.parallel.DistributedDataParallel),
              "grad": model.weight.grad.item(), "any": distributed.any_rank(rank == 1, ctx),
              "none": distributed.any_rank(False, ctx), "mean": distributed.all_reduce_mean(float(rank) * 4, ctx),
              "primary": primary, "shard": distributed.shard(5, ctx)}
    distributed.barrier(ctx)
    distributed.shutdown(ctx)
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(result, handle)


def test_collectives_in_a_two_process_gloo_group(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(ranks):
        assert result["rank"] == rank and result["world"] == 2 and result["ddp"]
        assert result["grad"] == pytest.approx(1.5)  # gradients averaged over the ranks
        assert result["any"] is True and result["none"] is False  # a flag on rank 1 reaches rank 0
        assert result["mean"] == pytest.approx(2.0)  # (0 + 4) / 2
        assert result["primary"] == ("primary" if rank == 0 else None)
    assert ranks[0]["shard"] == [0, 2, 4] and ranks[1]["shard"] == [1, 3]
    assert ranks[0]["matrix"] == ranks[1]["matrix"] == [[0, 0], [1, 1]]  # both ranks' pixels, on every rank


def test_init_distributed_reads_the_torchrun_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.init_distributed(torch.device("cpu"))
    assert ctx == DistContext(rank=2, world_size=3, local_rank=1, device=torch.device("cpu")) and calls == ["gloo"]
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.init_distributed(torch.device("cpu")).local_rank == 0  # torchrun always sets it; default 0
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # joined already: not twice
    distributed.init_distributed(torch.device("cpu"))
    assert calls == ["gloo", "gloo"]


def test_collective_paths_in_process(tmp_path):
    """The distributed branches in this process, in a real gloo group of one (mutation testing sees calls in this
    process only): the context claims 2 ranks, so the mean divides the group's sum by 2."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ctx = DistContext(rank=0, world_size=2)
        assert distributed.any_rank(True, ctx) is True and distributed.any_rank(False, ctx) is False
        assert distributed.all_reduce_mean(3.0, ctx) == 1.5
        step = distributed.training_module(Recorder(), ctx, find_unused_parameters=True)
        assert isinstance(step, nn.parallel.DistributedDataParallel) and step.find_unused_parameters
        assert isinstance(step.module, distributed.TrainStep) and step.device_ids is None
        matrix = ConfusionMatrix(2)
        matrix.update(torch.tensor([0, 1]), torch.tensor([1, 1]))
        matrix.all_reduce()  # a group of one: the sum is this process's matrix
        assert matrix.matrix.tolist() == [[0, 0], [1, 1]]
        # the mean is taken in float64: 1e8 + 1 survives (float32 would round it to 1e8)
        assert distributed.all_reduce_mean(100_000_001.0, ctx) == 50_000_000.5
        distributed.barrier(ctx)
        distributed.shutdown(DistContext())  # a single-process context never tears down a live group
        assert torch.distributed.is_initialized()
    finally:
        distributed.shutdown(DistContext(rank=0, world_size=2))
    assert not torch.distributed.is_initialized()


def test_cuda_ranks_take_nccl_their_local_gpu_and_sync_bn(monkeypatch):
    """What a CUDA rank does, with the CUDA and NCCL calls recorded (no GPU here): nccl, device cuda:LOCAL_RANK,
    SyncBatchNorm conversion, DDP pinned to that GPU. The real thing runs in the GPU reference run."""
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.init_distributed(torch.device("cuda"))
    assert ctx.device == torch.device("cuda", 1) and ctx.local_rank == 1
    assert calls == [("set_device", 1), ("init", "nccl")]

    import timm.layers

    def fake_ddp(module, device_ids=None, find_unused_parameters=False):
        calls.append(("ddp", device_ids, find_unused_parameters))
        return module

    synced = Recorder()
    monkeypatch.setattr(timm.layers, "convert_sync_batchnorm", lambda m: calls.append(("sync_bn", m)) or synced)
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", fake_ddp)
    model = Recorder()
    step = distributed.training_module(model, ctx, find_unused_parameters=True)
    assert calls[2:] == [("sync_bn", model), ("ddp", [1], True)] and step.model is synced
    calls.clear()
    step = distributed.training_module(model, DistContext(0, 2), find_unused_parameters=False)  # CPU: no SyncBN
    assert calls == [("ddp", None, False)] and step.model is model
