"""Sliding-window tiling and stitching, shared by every method that infers on crops."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with windows of `window` every `stride`; the last window is
    flush with the end (mmseg `slide_inference` grid). A length <= window gives one window at 0."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window} and {stride}")
    if length <= window:
        return [0]
    count = (length - window + stride - 1) // stride + 1
    return [min(i * stride, length - window) for i in range(count)]


def window_grid(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(top, left) of every window, row-major."""
    return [(y, x) for y in window_starts(height, window, stride) for x in window_starts(width, window, stride)]


def sliding_window_logits(
    infer: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    num_classes: int,
    window: int,
    stride: int,
    batch: int = 4,
) -> torch.Tensor:
    """Run `infer` (crops -> logits at crop size) over overlapping windows and average the logits
    where windows overlap. Images smaller than a window are zero-padded (after normalisation) and the
    padding is cropped away."""
    b, _, h, w = images.shape
    pad_h, pad_w = max(window - h, 0), max(window - w, 0)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    height, width = images.shape[-2:]
    grid = window_grid(height, width, window, stride)
    total = torch.zeros((b, num_classes, height, width), dtype=torch.float32, device=images.device)
    count = torch.zeros((1, 1, height, width), dtype=torch.float32, device=images.device)
    for start in range(0, len(grid), batch):
        chunk = grid[start:start + batch]
        crops = torch.cat([images[:, :, y:y + window, x:x + window] for y, x in chunk], dim=0)
        logits = infer(crops).to(total.dtype)
        for i, (y, x) in enumerate(chunk):
            total[:, :, y:y + window, x:x + window] += logits[i * b:(i + 1) * b]
            count[:, :, y:y + window, x:x + window] += 1
    return (total / count)[:, :, :h, :w]
