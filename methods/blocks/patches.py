"""GLNet's patch grid (glnet spec §3.4, §3.9, §5.1; "§" below refers to it), shared by the patch-based methods
(GLNet, UHRSNet): the overlapping row-major grid of square patches, the patches' boxes in any feature map,
cutting patches out of an image or label map, and the full-resolution average of patch logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.base import MethodError

Box = tuple[int, int, int, int]  # (y, x, h, w) in some feature map


def grid_starts(length: int, patch: int, min_overlap: int = 50) -> list[int]:
    """Patch offsets along one side (upstream `get_patch_info`): the fewest patches covering the
    side whose overlap is >= min_overlap, evenly spaced (rounded half-to-even), the last flush."""
    if length < patch:
        raise MethodError(f"glnet: image side {length} is smaller than patch_size {patch}; lower patch_size")
    if not 0 <= min_overlap < patch:
        raise MethodError(f"glnet: min_overlap must be in [0, patch_size), got {min_overlap}")
    if length == patch:
        return [0]  # upstream divides by zero here
    n = max(2, -(-length // patch))
    while patch - (length - patch) / (n - 1) < min_overlap:
        n += 1
    step = (length - patch) / (n - 1)
    return [round(k * step) for k in range(n - 1)] + [length - patch]


@dataclass(frozen=True)
class PatchGrid:
    """The row-major patch grid of one image size and the patch boxes at any feature resolution."""

    height: int
    width: int
    patch: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @classmethod
    def build(cls, height: int, width: int, patch: int, min_overlap: int = 50) -> PatchGrid:
        return cls(height, width, patch, tuple(grid_starts(height, patch, min_overlap)),
                   tuple(grid_starts(width, patch, min_overlap)))

    @property
    def coords(self) -> list[tuple[int, int]]:
        return [(t, left) for t in self.tops for left in self.lefts]

    def __len__(self) -> int:
        return len(self.tops) * len(self.lefts)

    def boxes(self, fh: int, fw: int) -> list[Box]:
        """Patch boxes in an (fh, fw) map of the whole image (`_crop_global`): size round(f * p / side),
        origin round((top / side) * f), Python's round = numpy's half-to-even. The origin is clamped so a
        box never runs off the map (upstream would slice a smaller crop and fail to stack it)."""
        h, w = round(fh * (self.patch / self.height)), round(fw * (self.patch / self.width))
        return [(min(round((t / self.height) * fh), fh - h), min(round((left / self.width) * fw), fw - w), h, w)
                for t, left in self.coords]

    def coverage(self, fh: int, fw: int, device=None) -> torch.Tensor:
        """How many boxes cover each position of an (fh, fw) map, (1, 1, fh, fw)."""
        count = torch.zeros(1, 1, fh, fw, device=device)
        for y, x, h, w in self.boxes(fh, fw):
            count[..., y:y + h, x:x + w] += 1
        return count

    def upstream_coverage(self, fh: int, fw: int, device=None) -> torch.Tensor:
        """Upstream's approximation (§3.5, §10.1 #9): the full-resolution count map bilinearly resized."""
        full = torch.zeros(1, 1, self.height, self.width, device=device)
        for t, left in self.coords:
            full[..., t:t + self.patch, left:left + self.patch] += 1
        return F.interpolate(full, size=(fh, fw), mode="bilinear", align_corners=False)


def crop_boxes(fmap: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
    """Stack the boxes of one image's map (1, C, H, W) into a batch (n, C, h, w) (plain slicing, §3.4)."""
    return torch.cat([fmap[:, :, y:y + h, x:x + w] for y, x, h, w in boxes], dim=0)


def cut_patches(images: torch.Tensor, grid: PatchGrid, indices: Sequence[int]) -> torch.Tensor:
    """Patches `indices` of one image (1, C, H, W) or label map (1, H, W), stacked on dim 0."""
    p, coords = grid.patch, grid.coords
    return torch.cat([images[..., t:t + p, left:left + p] for t, left in (coords[j] for j in indices)])


class LogitStitcher:
    """Full-resolution average of patch logits (§5.1): each patch's stride-4 logits are upsampled
    nearest to the patch size and summed; dividing by the patch count makes it an average (upstream
    sums, which has the same argmax)."""

    def __init__(self, grid: PatchGrid, num_classes: int, device=None, dtype=torch.float32) -> None:
        self.grid = grid
        self.total = torch.zeros(1, num_classes, grid.height, grid.width, device=device, dtype=dtype)

    def add(self, logits: torch.Tensor, indices: Sequence[int]) -> None:
        p = self.grid.patch
        up = F.interpolate(logits.to(self.total.dtype), size=(p, p), mode="nearest")
        coords = self.grid.coords
        for i, j in enumerate(indices):
            t, left = coords[j]
            self.total[:, :, t:t + p, left:left + p] += up[i:i + 1]

    def result(self) -> torch.Tensor:
        count = torch.zeros(1, 1, self.grid.height, self.grid.width, device=self.total.device)
        p = self.grid.patch
        for t, left in self.grid.coords:
            count[..., t:t + p, left:left + p] += 1
        return self.total / count
