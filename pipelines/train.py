"""Training stage: an iteration-based loop driven by a params.yaml recipe, one run per phase.

Checkpoints are written atomically (temp file + rename) every `checkpoint_every` iterations and at
the end; the final checkpoint holds what evaluation needs to rebuild the model.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets import PreparedDataset, get_dataset
from datasets.base import read_meta
from datasets.transforms import training_transform
from methods import UHRMethod, build_method, resolve_method_name
from pipelines import tracking
from pipelines.config import Config, ConfigError, Recipe


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def checkpoint_dir(config: Config, dataset: str, method: str) -> Path:
    return config.checkpoint_root / dataset / method


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temp file in the same folder, then rename: a crash never corrupts the last good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def build_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """mmseg poly: lr = (base - min_lr) * (1 - it/total)^power + min_lr, stepped per iteration."""
    schedule, total, base = recipe.schedule, recipe.iterations, recipe.lr

    def factor(it: int) -> float:
        if schedule.name == "constant":
            return 1.0
        return ((base - schedule.min_lr) * (1 - min(it, total) / total) ** schedule.power + schedule.min_lr) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, amp: str | None):
    if amp is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def _batches(loader):
    """Endless iteration over the loader; the seeded sampler reshuffles every pass."""
    while True:
        yield from loader


def train_phase(model: UHRMethod, phase, recipe: Recipe, dataset: PreparedDataset, device: torch.device,
                generator: torch.Generator, workers: int = 0, log=None, on_checkpoint=None) -> list[float]:
    """Run one phase for `recipe.iterations` iterations; returns the per-iteration total loss."""
    if len(dataset) < recipe.batch_size:
        raise ConfigError(f"batch_size {recipe.batch_size} exceeds the {len(dataset)} training images; lower it")
    trainable = {id(p) for p in model.phase_parameters(phase)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = build_optimizer(recipe, model.phase_parameters(phase))
    scheduler = build_scheduler(recipe, optimizer)
    scaler = torch.amp.GradScaler("cuda", enabled=recipe.amp == "fp16" and device.type == "cuda")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=recipe.batch_size, shuffle=True, drop_last=True, num_workers=workers,
        generator=generator, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    model.train()
    for name in phase.frozen_eval:
        model.get_submodule(name).eval()
    losses: list[float] = []
    batches = _batches(loader)
    bar = tqdm(range(1, recipe.iterations + 1), desc=f"train {model.name}/{phase.name}", unit="it",
               dynamic_ncols=True, mininterval=2.0)
    for iteration in bar:
        images, labels, _ = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(device, recipe.amp):
            terms = model.forward_train(images, labels)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise TrainingError(f"{model.name}: loss became {loss.item()} at iteration {iteration} of phase "
                                f"{phase.name}; lower the recipe's lr or enable a smaller batch/crop")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if log is not None and (iteration % recipe.log_every == 0 or iteration == recipe.iterations):
            window = losses[-recipe.log_every:]
            log({"loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                 **{k: v.item() for k, v in terms.items()}}, iteration)
        if on_checkpoint is not None and recipe.checkpoint_every and iteration % recipe.checkpoint_every == 0:
            on_checkpoint(iteration, optimizer, scheduler)
    return losses


def train(config: Config, dataset: str, method: str, device: str = "auto", workers: int | None = None) -> Path:
    """Train `method` on `dataset` through all its phases; returns the final checkpoint path."""
    method = resolve_method_name(method)
    info = get_dataset(dataset).info
    root = config.data_root / dataset
    read_meta(root)  # a clear error when the dataset is not prepared
    dev = tracking.resolve_device(device)
    train_cfg = config.section("train")
    workers = train_cfg.get("workers", 0) if workers is None else workers
    generator = seed_everything(config.seed)
    model_cfg = config.method_model(method, dataset)
    model = build_method(method, info.num_classes, ignore_index=info.ignore_index, **model_cfg).to(dev)
    out_dir = checkpoint_dir(config, dataset, method)
    params_hash = config.params_hash(method, dataset)
    phases = model.phases
    recipes = [config.recipe(method, dataset, phase.recipe) for phase in phases]  # all errors before any work
    payload = {"method": method, "dataset": dataset, "num_classes": info.num_classes,
               "ignore_index": info.ignore_index, "model_config": model_cfg, "seed": config.seed,
               "profile": config.profile, "params_hash": params_hash}

    with tracking.tracked_run(dataset, method, "train", config.profile, params_hash) as run:
        import mlflow

        mlflow.log_params({"seed": config.seed, "device": dev.type, **_flat("model", model_cfg)})
        mlflow.set_tags({f"env.{k}": v for k, v in tracking.environment_info(dev).items()})
        history: dict[str, list[float]] = {}
        for phase, recipe in zip(phases, recipes):
            if hasattr(model, "set_phase"):
                model.set_phase(phase.name)
            data = PreparedDataset(root, "train", transform=training_transform(
                recipe.crop_size, recipe.resize_ratio, recipe.hflip, recipe.vflip, recipe.rot90, recipe.rotate,
                recipe.photometric, recipe.cat_max_ratio))
            nested = len(phases) > 1
            with (tracking.tracked_run(dataset, method, "train", config.profile, params_hash, nested=True,
                                       run_name=f"{method}-train-{phase.name}", tags={"phase": phase.name})
                  if nested else contextlib.nullcontext(run)):
                mlflow.log_params(_flat(f"recipe.{phase.name}" if nested else "recipe", asdict(recipe)))

                def log(metrics, step, prefix=f"train/{phase.name}/" if nested else "train/"):
                    mlflow.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step)

                def on_checkpoint(iteration, optimizer, scheduler, phase=phase):
                    save_checkpoint(out_dir / "last.pt", {**payload, "phase": phase.name, "iteration": iteration,
                                                          "model": model.state_dict(),
                                                          "optimizer": optimizer.state_dict(),
                                                          "scheduler": scheduler.state_dict(),
                                                          "mlflow_run_id": run.info.run_id})

                history[phase.name] = train_phase(model, phase, recipe, data, dev, generator, workers, log,
                                                  on_checkpoint)
        final = out_dir / "final.pt"
        save_checkpoint(final, {**payload, "model": model.state_dict(), "loss_history": history,
                                "mlflow_run_id": run.info.run_id})
        last = out_dir / "last.pt"
        if last.exists():
            last.unlink()  # the run finished; final.pt supersedes the in-progress checkpoint
        mlflow.log_param("checkpoint", str(final))
        mlflow.log_metric("train/final_loss", _mean_tail(history))
    return final


def _mean_tail(history: dict[str, list[float]], n: int = 20) -> float:
    last = list(history.values())[-1]
    tail = last[-n:] if last else [math.nan]
    return sum(tail) / len(tail)


def _flat(prefix: str, value, out: dict | None = None) -> dict:
    """Nested dicts -> {'a.b.c': value} for MLflow params."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat(f"{prefix}.{key}", inner, out)
    else:
        out[prefix] = value
    return out
