"""Dataset-level segmentation metrics from one int64 confusion matrix.

Rows are ground truth, columns predictions. Accumulated with `bincount` over every pixel of the
split (never per-image means, never float histograms: float32 counts stop being exact at 2^24
pixels, less than one Inria tile; docs/specs/protocol.md §4).
"""
from __future__ import annotations

import math

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
