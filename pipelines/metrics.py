"""Dataset-level segmentation metrics from one int64 confusion matrix.

Rows are ground truth, columns predictions. Accumulated with `bincount` over every pixel of the
split (never per-image means, never float histograms: float32 counts stop being exact at 2^24
pixels, less than one Inria tile; docs/specs/protocol.md §4).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from datasets.base import DatasetError


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of predicted and true class-id maps (same shape)."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        target = target.to(self.matrix.device).reshape(-1).long()
        prediction = prediction.to(self.matrix.device).reshape(-1).long()
        valid = target != self.ignore_index
        target, prediction = target[valid], prediction[valid]
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            bad = target[(target < 0) | (target >= self.num_classes)][0].item()
            raise DatasetError(f"label value {bad} is neither a class id < {self.num_classes} nor ignore "
                               f"({self.ignore_index}); re-run prepare for this dataset")
        index = target * self.num_classes + prediction
        self.matrix += torch.bincount(index, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def all_reduce(self) -> None:
        """Sum over DDP ranks; each rank must have seen a disjoint share of the split."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)


def segmentation_scores(matrix: torch.Tensor, class_names: tuple[str, ...] | list[str],
                        counted_classes: tuple[int, ...] | list[int]) -> dict:
    """Per-class IoU and accuracy, mIoU over `counted_classes`, pixel accuracy.

    A class absent from both ground truth and prediction has IoU NaN (reported as None) and is left
    out of the mean (the mmseg / GLNet nan-mean convention).
    """
    m = matrix.double().cpu()
    true_positive = m.diag()
    gt_total = m.sum(1)
    pred_total = m.sum(0)
    union = gt_total + pred_total - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
    acc = torch.where(gt_total > 0, true_positive / gt_total.clamp(min=1), torch.full_like(union, float("nan")))
    counted = [iou[c].item() for c in counted_classes if not math.isnan(iou[c].item())]
    total = m.sum().item()
    return {
        "miou": sum(counted) / len(counted) if counted else float("nan"),
        "pixel_accuracy": true_positive.sum().item() / total if total else float("nan"),
        "iou": {name: _finite_or_none(iou[i].item()) for i, name in enumerate(class_names)},
        "accuracy": {name: _finite_or_none(acc[i].item()) for i, name in enumerate(class_names)},
        "counted_classes": [class_names[c] for c in counted_classes],
        "pixels": int(total),
    }


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


# Intervals over test images (issue "numbers a reviewer can trust"): resample the per-image confusion matrices with
# replacement and score each resample at dataset level (summed matrix -> IoU), never as a mean of per-image scores.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def headline_from_matrices(matrices: np.ndarray, counted_classes, headline_class: int | None = None) -> np.ndarray:
    """Dataset-level headline of each summed matrix in `matrices` (..., C, C): the nan-mean IoU over
    `counted_classes` (as `segmentation_scores`), or one class's IoU when `headline_class` is given."""
    m = np.asarray(matrices, dtype=np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    union = m.sum(-1) + m.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
    if headline_class is not None:
        return iou[..., headline_class]
    counted = iou[..., list(counted_classes)]
    with np.errstate(invalid="ignore"):
        return np.nanmean(counted, axis=-1) if counted.size else np.full(counted.shape[:-1], np.nan)


def headline_class(info) -> int | None:
    """The class whose IoU is the dataset's headline (Inria's `iou:building`), None for mIoU."""
    if info.headline.startswith("iou:"):
        return list(info.class_names).index(info.headline.split(":", 1)[1])
    return None


def bootstrap_weights(num_images: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, num_images) counts: how often each image is drawn in each resample (n draws with replacement).
    The same weights for two methods make the resamples paired."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_images, size=(resamples, num_images))
    return np.stack([np.bincount(row, minlength=num_images) for row in draws])


def bootstrap_scores(per_image: np.ndarray, counted_classes, headline_class: int | None = None,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """The headline of each bootstrap resample of the per-image matrices (N, C, C)."""
    per_image = np.asarray(per_image, dtype=np.int64)
    if weights is None:
        weights = bootstrap_weights(len(per_image))
    summed = np.tensordot(weights, per_image, axes=(1, 0))  # (resamples, C, C), exact in int64
    return headline_from_matrices(summed, counted_classes, headline_class)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap samples (NaN resamples left out)."""
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.nanpercentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def seeds_interval(per_image_by_seed: list[np.ndarray], counted_classes, headline_class: int | None = None,
                   level: float = 0.95) -> tuple[float, float]:
    """Interval over test images of the mean headline of several seeds' models (each (N, C, C), same images): each
    resample draws the same images for every seed, scores each seed at dataset level, and averages the seeds."""
    weights = bootstrap_weights(len(per_image_by_seed[0]))
    samples = np.mean([bootstrap_scores(m, counted_classes, headline_class, weights) for m in per_image_by_seed],
                      axis=0)
    return percentile_interval(samples, level)


def paired_difference(per_image_a, per_image_b, counted_classes, headline_class: int | None = None,
                      level: float = 0.95) -> dict:
    """Paired bootstrap of headline(A) - headline(B) over the same test images (same resamples for both): the
    observed difference, its interval, and whether the interval excludes 0 (the difference is significant). A and B
    are each one (N, C, C) array or a list of them, one per seed (then each side is the mean over its seeds)."""
    a_seeds, b_seeds = _seed_list(per_image_a), _seed_list(per_image_b)
    shapes = {m.shape for m in a_seeds + b_seeds}
    if len(shapes) != 1:
        raise ValueError(f"per-image matrices differ in shape: {sorted(shapes)}")
    weights = bootstrap_weights(len(a_seeds[0]))

    def mean_scores(seeds: list[np.ndarray]) -> np.ndarray:
        return np.mean([bootstrap_scores(m, counted_classes, headline_class, weights) for m in seeds], axis=0)

    def observed(seeds: list[np.ndarray]) -> float:
        return float(np.mean([headline_from_matrices(m.sum(0), counted_classes, headline_class) for m in seeds]))

    low, high = percentile_interval(mean_scores(a_seeds) - mean_scores(b_seeds), level)
    return {"difference": observed(a_seeds) - observed(b_seeds), "low": low, "high": high,
            "significant": bool(low > 0 or high < 0)}


def _seed_list(per_image) -> list[np.ndarray]:
    if isinstance(per_image, np.ndarray) and per_image.ndim == 3:
        return [per_image.astype(np.int64)]
    return [np.asarray(m, dtype=np.int64) for m in per_image]
