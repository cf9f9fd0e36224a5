"""Evaluation stage: one int64 confusion matrix over a split, scores, prediction images.

Writes `results/metrics/<dataset>/<method>.json` (scores and the confusion matrix) and an MLflow run with the
confusion matrix (JSON and a row-normalised heatmap), the prepared split as its dataset input and a few
image | ground truth | prediction panels as artifacts.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from datasets import PreparedDataset, get_dataset
from datasets.base import DatasetError, colorize
from methods import count_parameters, display_name, resolve_method_name
from pipelines import distributed, tracking
from pipelines.checkpoints import load_official_model, load_trained
from pipelines.config import Config, variant_label
from pipelines.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    ConfusionMatrix,
    bootstrap_scores,
    headline_class,
    percentile_interval,
    segmentation_scores,
)
from pipelines.paths import metrics_file, per_image_file
from pipelines.plots import confusion_figure

PANEL_MAX_SIDE = 768  # prediction panels are downscaled to keep artifacts small


def panel(image: torch.Tensor, label: torch.Tensor, prediction: torch.Tensor, palette) -> Image.Image:
    """image | ground truth | prediction, side by side, palette-coloured."""
    parts = [image.permute(1, 2, 0).numpy(), colorize(label.numpy().astype(np.uint8), palette),
             colorize(prediction.numpy().astype(np.uint8), palette)]
    strip = Image.fromarray(np.concatenate(parts, axis=1))
    scale = PANEL_MAX_SIDE / max(image.shape[-2:])
    if scale < 1:
        strip = strip.resize((round(strip.width * scale), round(strip.height * scale)), Image.NEAREST)
    return strip


def evaluate(config: Config, dataset: str, method: str, split: str | None = None, device: str = "auto",
             overrides: dict | None = None, variant: str | None = None, official: str | None = None) -> dict:
    """Score a trained method on a split. Under torchrun each rank takes an unpadded share of the
    images and the confusion matrices are summed, so no image is counted twice. `variant` labels the
    run and its result file (default: from `overrides`, e.g. RUE's `k0.5`; none = the default run).
    `official`: score an upstream release's checkpoint instead of ours (variant `official...`)."""
    method = resolve_method_name(method)
    ctx = distributed.init_distributed(tracking.resolve_device(device))
    try:
        return _evaluate(config, dataset, method, split, ctx, overrides, variant, official)
    finally:
        distributed.shutdown(ctx)


def _evaluate(config, dataset, method, split, ctx, overrides, variant, official=None) -> dict:
    eval_cfg = config.section("evaluate")
    split = split or eval_cfg.get("split", "test")
    num_panels = int(eval_cfg.get("num_visualizations", 3))
    tile, overlap = eval_cfg.get("tile_size"), int(eval_cfg.get("tile_overlap", 0) or 0)
    info = get_dataset(dataset).info
    dev = ctx.device
    if official:
        model, checkpoint, model_cfg = load_official_model(config, dataset, method, official, overrides, dev)
        variant = "_".join(v for v in (tracking.OFFICIAL_VARIANT, variant or variant_label(overrides)) if v)
    else:
        model, checkpoint, model_cfg = load_trained(config, dataset, method, overrides, dev)
    data = PreparedDataset(config.data_root / dataset, split)
    matrix = ConfusionMatrix(info.num_classes, info.ignore_index, dev)
    # the method's secondary outputs (whole images only): logits scored the same way (UHRSNet's "local"),
    # uncertainty maps summarised on fine-structure vs region pixels (RUE's U1)
    secondary = {o.name: ConfusionMatrix(info.num_classes, info.ignore_index, dev) for o in model.outputs
                 if o.kind == "logits"}
    maps = {o.name: MapStats(o.name, info.fine_classes) for o in model.outputs if o.kind == "uncertainty"}
    panels: list[tuple[str, Image.Image]] = []
    per_image: list[tuple[int, str, torch.Tensor]] = []  # (index, id, matrix): intervals need no re-inference
    sizes: set[tuple[int, int]] = set()
    start = time.perf_counter()
    with torch.inference_mode():
        for index in tqdm(distributed.shard(len(data), ctx), desc=f"evaluate {method} on {dataset}/{split}",
                          unit="img", disable=not ctx.is_primary):
            image, label, image_id = data[index]
            sizes.add(tuple(image.shape[-2:]))
            batch = image[None].to(dev)
            logits = model.predict_tiled(batch, tile, overlap) if tile else model.predict(batch)
            prediction = logits.argmax(1)[0]
            del logits
            image_matrix = ConfusionMatrix(info.num_classes, info.ignore_index, dev)
            image_matrix.update(prediction, label.to(dev))
            matrix.matrix += image_matrix.matrix
            per_image.append((index, image_id, image_matrix.matrix.cpu()))
            for name, other in secondary.items():
                other.update(model.predict_output(batch, name).argmax(1)[0], label.to(dev))
            drawn = len(panels) < num_panels
            if drawn:
                panels.append((image_id, panel(image, label, prediction.cpu(), info.palette)))
            for name, stats in maps.items():
                values = model.predict_output(batch, name)[0, 0].cpu()
                stats.update(values, label)
                if drawn:
                    panels.append((f"{image_id}_{name}", uncertainty_panel(values)))
    for m in (matrix, *secondary.values()):
        m.all_reduce()
    per_image = distributed.gather_lists(per_image, ctx)
    for stats in maps.values():
        stats.all_reduce(ctx)
    if int(matrix.matrix.sum()) == 0:  # no score exists; never write NaN as a headline
        raise DatasetError(f"the {split} split of {dataset} has no labelled pixel (every label is ignore = "
                           f"{info.ignore_index}) in {config.data_root / dataset / 'labels'}; prepare the dataset "
                           "again, or evaluate another split (--split)")
    seconds = time.perf_counter() - start
    if not ctx.is_primary:
        return {}
    scores = segmentation_scores(matrix.matrix, info.class_names, info.counted_classes)
    stacked = np.stack([m.numpy() for _, _, m in sorted(per_image, key=lambda item: item[0])])
    low, high = percentile_interval(bootstrap_scores(stacked, info.counted_classes, headline_class(info)))
    env = tracking.environment_info(dev)
    result = {
        "dataset": dataset, "method": method, "split": split, "images": len(data),
        "headline": info.headline, "headline_value": headline_value(scores, info.headline),
        # 95% bootstrap interval over test images (pipelines/metrics.py): how far the score moves with the images
        "headline_ci95": [low, high], "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED},
        **scores,
        "fine_classes": [info.class_names[c] for c in info.fine_classes],
        "params_m": count_parameters(model) / 1e6,
        "device": env["device"], "device_name": env["device_name"], "precision": "fp32",
        "input_size": sorted(f"{h}x{w}" for h, w in sizes), "tile": f"{tile}/{overlap}" if tile else "whole",
        "processes": ctx.world_size, "eval_seconds": seconds, "model_config": model_cfg,
        "profile": checkpoint["profile"],
        "weights": checkpoint.get("official_checkpoint", "trained by uhrbench"),
        "versions": {k: env[k] for k in ("torch", "timm", "cuda_compiled", "cudnn", "python")},
        "git_commit": env["git_commit"],
    }
    for stats in maps.values():
        result.update(stats.summary())
    if secondary:
        result["outputs"] = {name: segmentation_scores(m.matrix, info.class_names, info.counted_classes)
                             for name, m in secondary.items()}
    # the report draws the heatmap from this file (results/plots/confusion_<dataset>_<method>.png)
    result["confusion_matrix"] = {"classes": list(info.class_names), "rows": "ground truth", "columns": "prediction",
                                  "matrix": matrix.matrix.cpu().tolist()}
    variant = variant or variant_label(overrides)
    result["variant"] = variant or "default"
    with tracking.tracked_run(dataset, method, "evaluate", checkpoint["profile"], checkpoint["params_hash"],
                              tags={"split": split, "train_run_id": checkpoint.get("mlflow_run_id", ""),
                                    "variant": result["variant"], "seed": str(checkpoint.get("seed", "")),
                                    # which file an official-weights number came from (tables' provenance)
                                    **({"weights": Path(official).name} if official else {})},
                              device=dev.type) as run:
        run.tags({f"env.{k}": v for k, v in env.items()})
        run.dataset(config.data_root / dataset, dataset, split, "evaluation")
        run.params({"split": split, "precision": "fp32", "input_size": ",".join(result["input_size"]),
                    "tile": result["tile"], **{f"model.{k}": v for k, v in model_cfg.items()}})
        metrics = {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
                   "params_m": result["params_m"], "headline": result["headline_value"],
                   "headline_ci_low": low, "headline_ci_high": high}
        metrics.update({f"iou.{name}": v for name, v in scores["iou"].items() if v is not None})
        for stats in maps.values():
            metrics.update({k: v for k, v in stats.summary().items() if v is not None})
        metrics.update({f"output.{name}.miou": s["miou"] for name, s in result.get("outputs", {}).items()})
        run.metrics(metrics)
        run.json(result["confusion_matrix"], "confusion_matrix.json")
        run.figure(confusion_figure(result["confusion_matrix"]["matrix"], info.class_names,
                                    f"{display_name(method)} on {dataset}/{split}"
                                    + (f" ({result['variant']})" if result["variant"] != "default" else "")),
                   "confusion_matrix.png")
        with tempfile.TemporaryDirectory() as tmp:
            for image_id, strip in panels:
                strip.save(Path(tmp) / f"{image_id}.png")
            if panels:
                run.artifacts(tmp, "predictions")
        result["mlflow_run_id"] = run.id
        out = metrics_file(config, dataset, method, variant)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        run.artifact(out)
        matrices = per_image_file(config, dataset, method, variant)
        save_per_image(matrices, per_image, info.class_names)
        run.artifact(matrices)
    return result


def save_per_image(path: Path, per_image: list[tuple[int, str, torch.Tensor]], class_names) -> None:
    """The per-image confusion matrices (N, C, C) int64 in split order, with the image ids: what bootstrap intervals
    and paired comparisons resample (pipelines/metrics.py)."""
    rows = sorted(per_image, key=lambda item: item[0])
    np.savez_compressed(path, ids=np.array([image_id for _, image_id, _ in rows]),
                        matrices=np.stack([m.numpy() for _, _, m in rows]).astype(np.int64),
                        classes=np.array(list(class_names)))


class MapStats:
    """Mean of a per-pixel map in [0, 1] (RUE's uncertainty U1) on fine-structure vs large-region pixels."""

    def __init__(self, name: str, fine_classes: tuple[int, ...]) -> None:
        self.name = name
        self.fine_classes = list(fine_classes)
        self.sums = {"fine": 0.0, "region": 0.0}
        self.counts = {"fine": 0, "region": 0}

    def update(self, u1: torch.Tensor, label: torch.Tensor) -> None:
        valid = label != 255
        fine = torch.isin(label, torch.tensor(self.fine_classes)) & valid
        for key, mask in (("fine", fine), ("region", valid & ~fine)):
            self.sums[key] += u1[mask].double().sum().item()
            self.counts[key] += int(mask.sum())

    def all_reduce(self, ctx: distributed.DistContext) -> None:
        """Sum the sums and pixel counts over ranks (each rank saw only its share of the images)."""
        if not ctx.distributed:
            return
        keys = sorted(self.sums)
        totals = torch.tensor([self.sums[k] for k in keys] + [float(self.counts[k]) for k in keys],
                              dtype=torch.float64, device=ctx.device)
        torch.distributed.all_reduce(totals)
        for i, key in enumerate(keys):
            self.sums[key], self.counts[key] = totals[i].item(), int(totals[len(keys) + i].item())

    def summary(self) -> dict:
        return {f"{self.name}_{k}_mean": (self.sums[k] / self.counts[k] if self.counts[k] else None)
                for k in self.sums}


def uncertainty_panel(u1: torch.Tensor) -> Image.Image:
    """U1 in [0, 1] as a magma-coloured image."""
    from matplotlib import colormaps

    rgb = (colormaps["magma"](u1.clamp(0, 1).numpy())[..., :3] * 255).astype(np.uint8)
    strip = Image.fromarray(rgb)
    scale = PANEL_MAX_SIDE / max(u1.shape)
    if scale < 1:
        strip = strip.resize((round(strip.width * scale), round(strip.height * scale)), Image.BILINEAR)
    return strip


def headline_value(scores: dict, headline: str) -> float:
    if headline == "miou":
        return scores["miou"]
    if headline.startswith("iou:"):
        value = scores["iou"][headline.split(":", 1)[1]]
        return float("nan") if value is None else value
    raise ValueError(f"unknown headline metric '{headline}'")
