"""Loss functions shared by methods."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of logits to a label size, a no-op when equal."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def segmentation_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy after resizing logits to the label size; mean over non-ignored pixels.

    A batch whose pixels are all ignored gives 0 (with a graph), not NaN.
    """
    logits = resize_logits(logits, labels.shape[-2:])
    if not (labels != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, ignore_index: int,
               eps: float = 1e-7) -> torch.Tensor:
    """GLNet's upstream `FocalLoss`: softmax probability of the true class clamped to [eps, 1 - eps],
    -(1 - p)^gamma log p, mean over pixels; plus a working ignore index (glnet spec §10.1 #13)."""
    valid = labels != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    target = torch.where(valid, labels, 0)
    p = F.softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1).clamp(eps, 1.0 - eps)
    loss = -((1.0 - p) ** gamma) * p.log()
    return loss[valid].mean()


def nearest_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """PIL-NEAREST downsampling of (B, H, W) labels (pixel-centre sampling = torch 'nearest-exact')."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()
