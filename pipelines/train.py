"""Training stage: an iteration-based loop driven by a params.yaml recipe, one run per phase.

- Runs as one process or under `torchrun` (DDP; SyncBN on CUDA only; rank 0 logs and checkpoints).
- Checkpoints are written atomically (temp file + rename) every `checkpoint_every` iterations and at
  the end. An interrupted run of the same configuration resumes from `last.pt` exactly: model,
  optimizer, scheduler, scaler, RNG states, data position and MLflow run all continue.
- Data order and augmentation depend only on (seed, epoch, sample index), never on how far the
  process got, which is what makes a resumed run bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from datasets import DecodeCache, PreparedDataset, get_dataset
from datasets.base import read_meta
from datasets.transforms import training_transform
from methods import UHRMethod, build_method, resolve_method_name
from pipelines import distributed, tracking
from pipelines.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from pipelines.config import Config, ConfigError, full_model_config
from pipelines.paths import checkpoint_dir
from pipelines.schema import Recipe


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGTERM or Ctrl-C (its MLflow runs end as KILLED); the message says where it resumes."""


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and a first Ctrl-C ask for a stop at the end of the current step, after a checkpoint; a second
    Ctrl-C stops at once. Yields the flag the training loop reads (only the main thread can take signals)."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def ask(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        tqdm.write("stop requested: finishing this step and writing a checkpoint (Ctrl-C again stops at once)",
                   file=sys.stderr)

    for sig in previous:
        signal.signal(sig, ask)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Bit-reproducible kernels (slower) while training; off by default, recorded with the run. An op without a
    deterministic kernel (SegNet's max-unpooling) warns instead of failing. The previous settings come back after,
    so that training in-process (tests, notebooks) leaves no global state behind."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False if enabled else torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2:]


def param_groups(recipe: Recipe, named_params) -> list[dict]:
    """The optimizer's parameter groups: one, or with `param_groups` one per (lr_mult, decay_mult), each parameter
    taking the multipliers of the longest key contained in its name (mmcv's DefaultOptimizerConstructor)."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not recipe.param_groups:
        return [{"params": [p for _, p in named], "lr": recipe.lr, "weight_decay": recipe.weight_decay}]
    keys = sorted(sorted(recipe.param_groups), key=len, reverse=True)
    unused = [k for k in keys if not any(k in n for n, _ in named)]
    if unused:
        raise TrainingError(f"recipe param_groups: {', '.join(repr(k) for k in unused)} matches no trainable parameter "
                            f"name (e.g. {named[0][0]!r}); fix the key or remove it")
    groups: dict[tuple[float, float], list] = {}
    for name, param in named:
        mult = next((recipe.param_groups[k] for k in keys if k in name), {})
        groups.setdefault((mult.get("lr_mult", 1.0), mult.get("decay_mult", 1.0)), []).append(param)
    return [{"params": ps, "lr": recipe.lr * lr_mult, "weight_decay": recipe.weight_decay * decay_mult}
            for (lr_mult, decay_mult), ps in groups.items()]


def build_optimizer(recipe: Recipe, named_params) -> torch.optim.Optimizer:
    groups = param_groups(recipe, named_params)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """mmseg poly: lr = (base - min_lr) * (1 - it/total)^power + min_lr, stepped per iteration, times mmcv's linear
    warm-up factor 1 - (1 - it/warmup_iters) * (1 - warmup_ratio) during the first `warmup_iters`. One factor for
    every group (a group's lr_mult scales its base, and its min_lr, as mmcv's PolyLrUpdaterHook does not: the
    difference is lr_mult x min_lr at the very end). `multistep`: torch's MultiStepLR, gamma per milestone passed."""
    schedule, total, base = recipe.schedule, recipe.iterations, recipe.lr

    def factor(it: int) -> float:
        if schedule.name == "multistep":
            value = schedule.gamma ** sum(it >= m for m in schedule.milestones)
        else:
            value = 1.0 if schedule.name == "constant" else \
                ((base - schedule.min_lr) * (1 - min(it, total) / total) ** schedule.power + schedule.min_lr) / base
        if it < schedule.warmup_iters:
            value *= 1 - (1 - it / schedule.warmup_iters) * (1 - schedule.warmup_ratio)
        return value

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class SeededSamples(Dataset):
    """Applies each sample's augmentation under its own seed (seed, epoch, index), without touching
    the global RNG, so a resumed run sees exactly the samples an uninterrupted one would."""

    def __init__(self, dataset: PreparedDataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
            return self.dataset[index]


@dataclass
class Position:
    """Where a phase is: optimizer steps done, and the data position (epoch, micro-batches into it)."""

    iteration: int = 0
    epoch: int = 0
    offset: int = 0
    losses: list[float] = field(default_factory=list)


def micro_batches(samples: SeededSamples, ctx: distributed.DistContext, batch: int, position: Position,
                  workers: int, pin: bool):
    """Endless micro-batches from `position` on; each epoch is a DistributedSampler permutation
    (also with one process), so the order is a function of (seed, epoch) only."""
    sampler = DistributedSampler(samples, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=samples.seed, drop_last=True)
    while True:
        sampler.set_epoch(position.epoch)
        samples.epoch = position.epoch
        order = list(sampler)[position.offset * batch:]
        # a private generator: a new loader iterator must not draw from the global RNG (dropout's)
        loader = DataLoader(samples, batch_size=batch, sampler=order, drop_last=True, num_workers=workers,
                            pin_memory=pin, generator=torch.Generator().manual_seed(samples.seed + position.epoch))
        for images, labels, _ in loader:
            position.offset += 1
            yield images, labels
        position.epoch, position.offset = position.epoch + 1, 0


def _autocast(device: torch.device, amp: str | None):
    """Mixed precision as the recipe asks: fp16 or bf16 on CUDA; bf16 on CPU too (oneDNN runs it on AMX / AVX512-BF16,
    ~1.3-2.7x faster than fp32 training on a Xeon that has them). fp16 on CPU is refused, not silently dropped."""
    if amp is None:
        return contextlib.nullcontext()
    if device.type != "cuda" and amp != "bf16":
        raise ConfigError(f"recipe amp: {amp} needs a CUDA device; on {device.type} use amp: bf16 or amp: null")
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


@contextlib.contextmanager
def autocast_modules(model: torch.nn.Module, names: Sequence[str], device: torch.device, amp: str | None):
    """Mixed precision inside the named submodules only (recipe `amp_modules`), their floating outputs handed on
    in fp32: for a method whose other parts lose accuracy under autocast (ISDNet's smoke run: the SR decoder in
    bf16 saves a quarter of the step, the whole model in bf16 costs 11 mIoU). Restored on exit."""
    patched = []
    try:
        for name in names:
            module = model.get_submodule(name)
            forward = module.forward

            def run(*args, _forward=forward, **kwargs):
                with _autocast(device, amp):
                    out = _forward(*args, **kwargs)
                return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                                out)

            module.forward = run
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # the class's own forward again


def present_modules(model: UHRMethod, method: str, num_classes: int, names: Sequence[str]) -> list[str]:
    """The `amp_modules` this model has. A name the method's default configuration has but this one does not (an
    ablation row without ISDNet's SR decoder) is skipped; a name neither has is one line (a typo)."""
    own = dict(model.named_modules())
    missing = [n for n in names if n not in own]
    if missing:
        with torch.device("meta"):
            default = dict(build_method(method, num_classes).named_modules())
        unknown = [n for n in missing if n not in default]
        if unknown:
            raise ConfigError(f"recipe amp_modules: '{unknown[0]}' is not a submodule of {method} (e.g. "
                              f"{', '.join(n for n, _ in list(model.named_children())[:3])})")
    return [n for n in names if n in own]


def scoped_amp(recipe: Recipe, model: UHRMethod, method: str, num_classes: int) -> Recipe:
    """The recipe with `amp_modules` narrowed to what this model has; none left: no autocast at all (not the whole
    model, which `amp` alone would mean)."""
    if not recipe.amp_modules:
        return recipe
    present = present_modules(model, method, num_classes, recipe.amp_modules)
    return replace(recipe, amp_modules=present) if present else replace(recipe, amp=None, amp_modules=None)


def rng_state() -> dict:
    """Every RNG's state in plain types (tensors, numbers, strings), so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def accumulation_steps(recipe: Recipe, world_size: int, batch_per_device: int | None) -> tuple[int, int]:
    """(micro-batch per process, micro-batches per step) so that the global batch is the recipe's."""
    per_device = batch_per_device or recipe.batch_size // world_size
    if per_device < 1 or recipe.batch_size % (per_device * world_size):
        raise ConfigError(f"batch_size {recipe.batch_size} is not a multiple of {world_size} process(es) x "
                          f"train.batch_per_device {per_device}; change one of them")
    return per_device, recipe.batch_size // (per_device * world_size)


def train_phase(model: UHRMethod, phase, recipe: Recipe, samples: SeededSamples,
                ctx: distributed.DistContext, position: Position, workers: int = 0, batch_per_device=None,
                resume: dict | None = None, log=None, on_checkpoint=None, stop: dict | None = None) -> list[float]:
    """Run one phase up to `recipe.iterations` optimizer steps from `position`; returns its losses. When `stop`
    says so (a signal), it checkpoints at the end of the step and raises TrainingInterrupted."""
    per_device, accum = accumulation_steps(recipe, ctx.world_size, batch_per_device)
    if len(samples) // ctx.world_size < per_device:
        raise ConfigError(f"a batch of {per_device} per process exceeds the {len(samples)} training images; "
                          "lower batch_size")
    trainable = {id(p) for p in model.phase_parameters(phase)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    # wrapped per phase: DDP must be built after the phase decides which parameters train
    step_module = distributed.training_module(model, ctx, getattr(model, "ddp_find_unused_parameters", False))
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(recipe, ((names[id(p)], p) for p in model.phase_parameters(phase)))
    scheduler = build_scheduler(recipe, optimizer)
    scaler = torch.amp.GradScaler("cuda", enabled=recipe.amp == "fp16" and ctx.device.type == "cuda")
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        restore_rng(resume["rng"])
    model.train()  # keeps the phase's frozen_eval submodules in eval mode (UHRMethod.train)
    channels_last = recipe.channels_last  # NHWC: oneDNN on CPU and cuDNN both have faster kernels for it
    batches = micro_batches(samples, ctx, per_device, position, workers, ctx.device.type == "cuda")
    bar = tqdm(total=recipe.iterations, initial=position.iteration, desc=f"train {model.name}/{phase.name}",
               unit="it", dynamic_ncols=True, mininterval=2.0, disable=not ctx.is_primary)
    with autocast_modules(model, recipe.amp_modules or (), ctx.device, recipe.amp):
        while position.iteration < recipe.iterations:
            optimizer.zero_grad(set_to_none=True)
            total, terms_sum = 0.0, {}
            for micro in range(accum):
                images, labels = next(batches)
                images = images.to(ctx.device, non_blocking=True)
                labels = labels.to(ctx.device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                sync = contextlib.nullcontext()
                if ctx.distributed and micro < accum - 1:
                    sync = step_module.no_sync()  # all-reduce gradients once per step, not per micro-batch
                with sync:
                    with _autocast(ctx.device, None if recipe.amp_modules else recipe.amp):
                        terms = step_module(images, labels)
                    loss = sum(terms.values()) / accum
                    if not torch.isfinite(loss):
                        raise TrainingError(f"{model.name}: loss became {loss.item()} at iteration "
                                            f"{position.iteration + 1} of phase {phase.name}; lower the recipe's lr")
                    scaler.scale(loss).backward()
                total += loss.item()
                for key, value in terms.items():
                    terms_sum[key] = terms_sum.get(key, 0.0) + value.item() / accum
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            position.iteration += 1
            position.losses.append(distributed.all_reduce_mean(total, ctx))
            bar.update(1)
            bar.set_postfix(loss=f"{position.losses[-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if log is not None and (position.iteration % recipe.log_every == 0
                                    or position.iteration == recipe.iterations):
                window = position.losses[-recipe.log_every:]
                log({"loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0], **terms_sum},
                    position.iteration)
            if (on_checkpoint is not None and recipe.checkpoint_every
                    and position.iteration % recipe.checkpoint_every == 0 and position.iteration < recipe.iterations):
                on_checkpoint(optimizer, scheduler, scaler)
            if stop is not None and distributed.any_rank(stop["stop"], ctx):  # every rank stops at the same step
                if on_checkpoint is not None:
                    on_checkpoint(optimizer, scheduler, scaler)
                bar.close()
                raise TrainingInterrupted(f"phase {phase.name} iteration {position.iteration}")
    bar.close()
    return position.losses


def train(config: Config, dataset: str, method: str, device: str = "auto", workers: int | None = None) -> Path:
    """Train `method` on `dataset` through all its phases; returns the final checkpoint path. A run named
    `<method>@seed<N>` trains with seed N into its own folder."""
    method = resolve_method_name(method)
    config = config.for_run(method)
    info = get_dataset(dataset).info
    root = config.data_root / dataset
    read_meta(root)  # a clear error when the dataset is not prepared
    train_cfg = config.section("train")
    workers = train_cfg.get("workers", 0) if workers is None else workers
    ctx = distributed.init_distributed(tracking.resolve_device(device))
    out_dir = checkpoint_dir(config, dataset, method)
    lock = FileLock(out_dir.parent / f".{method}.train.lock")  # beside the folder DVC tracks, not in it
    try:
        if ctx.is_primary:
            try:
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                lock.acquire(timeout=0)
            except Timeout:
                raise TrainingError(f"another `bench.py train` is writing {out_dir} (lock {lock.lock_file}); wait "
                                    "for it to finish or stop it, then run this again") from None
        with stop_on_signals() as stop, deterministic(bool(train_cfg.get("deterministic", False))):
            return _train(config, dataset, method, info, root, ctx, workers, train_cfg.get("batch_per_device"), stop,
                          DecodeCache(train_cfg.get("cache_mib", 0)))
    except KeyboardInterrupt as exc:
        where = str(exc) if isinstance(exc, TrainingInterrupted) else "mid-step"
        raise TrainingInterrupted(f"{method} on {dataset} stopped ({where}); {resume_point(out_dir / 'last.pt')}") \
            from None
    finally:
        if lock.is_locked:
            lock.release()
        distributed.shutdown(ctx)


def resume_point(path: Path) -> str:
    """Where the next run of the same configuration resumes, for the message at a stop."""
    try:
        state = load_checkpoint(path, ("phase", "position"))
    except CheckpointError:
        return "no checkpoint was written yet: the next run starts afresh"
    return (f"the same `bench.py train` resumes from {path} (phase {state['phase']}, iteration "
            f"{state['position']['iteration']})")


def _train(config, dataset, method, info, root, ctx, workers, batch_per_device, stop=None, cache=None) -> Path:
    seed_everything(config.seed)
    model_cfg = full_model_config(method, config.method_model(method, dataset))  # pinned in the checkpoint
    model = build_method(method, info.num_classes, ignore_index=info.ignore_index, **model_cfg).to(ctx.device)
    phases = model.phases
    recipes = [config.recipe(method, dataset, phase.recipe) for phase in phases]  # all errors before any work
    recipes = [scoped_amp(r, model, method, info.num_classes) for r in recipes]
    if any(r.channels_last for r in recipes):
        model = model.to(memory_format=torch.channels_last)
    out_dir = checkpoint_dir(config, dataset, method)
    params_hash = config.params_hash(method, dataset)
    payload = {"method": method, "dataset": dataset, "num_classes": info.num_classes,
               "ignore_index": info.ignore_index, "model_config": model_cfg, "seed": config.seed,
               "profile": config.profile, "params_hash": params_hash, "world_size": ctx.world_size}
    resume = _resumable(out_dir / "last.pt", params_hash, ctx)
    if resume is not None:
        model.load_state_dict(resume["model"])
    nested = len(phases) > 1
    run_ids: dict[str, str] = dict(resume["mlflow_run_ids"]) if resume else {}
    history: dict[str, list[float]] = dict(resume["loss_history"]) if resume else {}

    def run_factory(name: str, phase: str | None = None):
        # named `<method> · train · <dataset>[ · phase p]`; CPU/GPU/memory use sampled into system/* on the main run
        return lambda: tracking.tracked_run(dataset, method, "train", config.profile, params_hash,
                                            nested=phase is not None, run_id=run_ids.get(name),
                                            tags={"phase": phase, "split": "train"} if phase else {"split": "train"},
                                            device=ctx.device.type, log_system_metrics=phase is None)

    with distributed.primary_only(ctx, run_factory("main")) as run:
        if run is not None:
            run_ids["main"] = run.id
            if resume is None:
                run.params({"seed": config.seed, "device": ctx.device.type, "world_size": ctx.world_size,
                            **_flat("model", model_cfg)})
                run.dataset(root, dataset, "train", "training")
                run.tags({f"env.{k}": v for k, v in tracking.environment_info(ctx.device).items()})
            else:
                run.tags({"resumed_at": f"{resume['phase']}:{resume['position']['iteration']}"})
        for index, (phase, recipe) in enumerate(zip(phases, recipes, strict=True)):
            if phase.name in history and (resume is None or resume["phase"] != phase.name):
                continue  # finished before the interruption
            model.set_phase(phase.name)
            resuming = resume is not None and resume["phase"] == phase.name
            position = Position(**resume["position"]) if resuming else Position()
            phase_seed = config.seed + 1000 * (index if phase.data_stream is None else phase.data_stream)
            if not resuming:  # (a resumed phase restores its RNG state from last.pt instead)
                # the phase's own randomness (dropout, point sampling) from (seed, phase) only, never from how much
                # randomness building the model took: a refiner's base phase trains exactly as the same base
                # elsewhere, whichever refiner was built after it
                seed_everything(phase_seed)
            samples = SeededSamples(PreparedDataset(root, "train", transform=training_transform(
                recipe.crop_size, recipe.resize_ratio, recipe.hflip, recipe.vflip, recipe.rot90, recipe.rotate,
                recipe.photometric, recipe.cat_max_ratio), cache=cache), phase_seed)
            factory = run_factory(phase.name, phase.name) if nested else contextlib.nullcontext
            with distributed.primary_only(ctx, factory) as phase_run:
                log = None
                if ctx.is_primary:
                    target = phase_run if nested else run
                    if nested:
                        run_ids[phase.name] = phase_run.id
                    if not resuming:
                        target.params(_flat(f"recipe.{phase.name}" if nested else "recipe", asdict(recipe)))
                    prefix = f"train/{phase.name}/" if nested else "train/"

                    def log(metrics, step, prefix=prefix, target=target):
                        target.metrics({prefix + k: v for k, v in metrics.items()}, step=step)

                def on_checkpoint(optimizer, scheduler, scaler, phase=phase, position=position):
                    if ctx.is_primary:
                        save_checkpoint(out_dir / "last.pt", {
                            **payload, "phase": phase.name, "position": asdict(position), "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(), "rng": rng_state(), "mlflow_run_ids": run_ids,
                            "loss_history": history})
                    distributed.barrier(ctx)

                history[phase.name] = train_phase(model, phase, recipe, samples, ctx, position, workers,
                                                  batch_per_device, resume if resuming else None, log, on_checkpoint,
                                                  stop)
            if nested and ctx.is_primary:  # each phase's result is kept (e.g. GLNet's phase-1 global branch)
                save_checkpoint(out_dir / f"phase_{phase.name}.pt", {**payload, "phase": phase.name,
                                                                     "model": model.state_dict()})
            resume = None
        final = out_dir / "final.pt"
        if ctx.is_primary:
            save_checkpoint(final, {**payload, "model": model.state_dict(), "loss_history": history,
                                    "mlflow_run_id": run_ids["main"]})
            if (out_dir / "last.pt").exists():
                (out_dir / "last.pt").unlink()  # finished: final.pt supersedes the in-progress checkpoint
            run.params({"checkpoint": str(final)})
            run.metrics({"train/final_loss": _mean_tail(history)})
    return final


RESUME_KEYS = ("phase", "position", "model", "optimizer", "scheduler", "scaler", "rng", "mlflow_run_ids",
               "loss_history")


def _resumable(path: Path, params_hash: str, ctx: distributed.DistContext) -> dict | None:
    """The interrupted run's checkpoint when it belongs to the same configuration, else None. An unreadable one
    never blocks training: it is set aside (renamed, not deleted) and training starts afresh."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path, ("params_hash", "world_size"))
        same = state["params_hash"] == params_hash and state["world_size"] == ctx.world_size
        missing = [key for key in RESUME_KEYS if key not in state]
        if same and missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    except CheckpointError as exc:
        aside = path.with_name(path.name + ".corrupt")
        if ctx.is_primary:
            os.replace(path, aside)
            tqdm.write(f"{exc}; moved it to {aside} and starting afresh", file=sys.stderr)
        distributed.barrier(ctx)
        return None
    if not same:
        if ctx.is_primary:
            tqdm.write(f"not resuming from {path}: it belongs to another configuration; starting afresh",
                       file=sys.stderr)
        return None
    if ctx.is_primary:
        tqdm.write(f"resuming from {path} (phase {state['phase']}, iteration {state['position']['iteration']})",
                   file=sys.stderr)
    return state


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
