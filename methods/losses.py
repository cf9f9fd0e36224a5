"""Loss functions shared by methods."""
from __future__ import annotations

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
