"""Run under torchrun by tests/test_scale_and_faults.py (and in-process for the single-process reference):
what DDP must make equal to one process."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def train_local(data_root: Path, per_device: int, ctx, iterations: int = 3) -> dict[str, torch.Tensor]:
    """The `local` baseline trained `iterations` steps of global batch 2 with BN and dropout taken out (they make
    a batch of 2 differ from two batches of 1 by design); returns the weights."""
    from datasets import PreparedDataset
    from datasets.transforms import training_transform
    from pipelines.config import load_config
    from pipelines.train import Position, SeededSamples, train_phase

    config = load_config(overrides=[f"methods.local.recipes.smoke.iterations={iterations}",
                                    "methods.local.recipes.smoke.batch_size=2",
                                    # SGD: a step linear in the gradient (Adam divides float noise by ~0 where
                                    # a gradient vanishes)
                                    "methods.local.recipes.smoke.optimizer=sgd", "methods.local.recipes.smoke.lr=0.01",
                                    "methods.local.recipes.smoke.amp=null"])  # fp32: compared to float tolerance
    model = untrained_local()
    samples = SeededSamples(PreparedDataset(data_root / "synthetic", "train",
                                            transform=training_transform(64, hflip=True)), seed=0)
    train_phase(model, model.phases[0], config.recipe("local", "synthetic"), samples, ctx, Position(),
                batch_per_device=per_device)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def untrained_local():
    from methods import build_method

    torch.manual_seed(0)
    model = build_method("local", 7, channels=32, window=64, overlap=16)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (torch.nn.BatchNorm2d, torch.nn.Dropout2d)):
                setattr(module, name, torch.nn.Identity())
    return model


def map_values(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A different uncertainty map and label per image (image = rank here, both images in one process)."""
    g = torch.Generator().manual_seed(rank)
    return torch.rand(32, 32, generator=g), torch.randint(0, 7, (32, 32), generator=g)


def main() -> None:
    from pipelines import distributed
    from pipelines.evaluate import MapStats

    data_root, out = Path(sys.argv[1]), Path(sys.argv[2])
    ctx = distributed.init_distributed(torch.device("cpu"))
    weights = train_local(data_root, 1, ctx)
    stats = MapStats("u1", (1, 2))
    stats.update(*map_values(ctx.rank))
    stats.all_reduce(ctx)
    if ctx.is_primary:
        torch.save(weights, out / "ddp_weights.pt")
        (out / "ddp_map.json").write_text(json.dumps({"summary": stats.summary(), "counts": stats.counts}))
    distributed.shutdown(ctx)


if __name__ == "__main__":
    main()
