"""Joint image/label augmentation for training, built on torchvision.transforms.v2.

Images are uint8 (3, H, W) tensors, labels int64 (H, W); labels are padded with the ignore index.
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from datasets.base import IGNORE_INDEX


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees (exact, no interpolation or padding)."""

    def forward(self, image: torch.Tensor, label: torch.Tensor):
        k = int(torch.randint(0, 4, ()).item())
        return (tv_tensors.wrap(torch.rot90(image, k, (-2, -1)), like=image),
                tv_tensors.wrap(torch.rot90(label, k, (-2, -1)), like=label))


class CatMaxRatioCrop(torch.nn.Module):
    """mmseg `RandomCrop(cat_max_ratio)`: retry up to 10 crops until no class covers more than
    `cat_max_ratio` of the crop's valid pixels (used by ISDNet's recipes)."""

    def __init__(self, size: int, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size, self.cat_max_ratio, self.ignore_index = size, cat_max_ratio, ignore_index
        self.crop = v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index})

    def forward(self, image, label):
        for _ in range(10):
            out_image, out_label = self.crop(image, label)
            valid = out_label[out_label != self.ignore_index]
            if valid.numel() == 0:
                continue
            counts = torch.bincount(valid.flatten())
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
        return out_image, out_label


def training_transform(crop_size: int | tuple[int, int] | None, resize_ratio: float | tuple[float, float] = 1.0,
                       hflip: bool = True, vflip: bool = False,
                       rot90: bool = False, rotate: dict | None = None, photometric: bool = False,
                       cat_max_ratio: float | None = None):
    """A callable (image, label) -> (image, label) applying the recipe's augmentations in mmseg order:
    resize, crop, flip, rotate, photometric distortion. `resize_ratio` (lo, hi): a ratio drawn uniformly per sample
    (mmseg `Resize(ratio_range=...)`, relative to the image's own size); `crop_size` an int or (height, width)."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    steps: list = []
    if isinstance(resize_ratio, list | tuple):
        steps.append(_ScaleBy(*resize_ratio))
    elif resize_ratio != 1.0:
        steps.append(_ScaleBy(resize_ratio))
    if crop_size is not None:
        if cat_max_ratio is not None and cat_max_ratio < 1.0:
            steps.append(CatMaxRatioCrop(crop_size, cat_max_ratio))
        else:
            steps.append(v2.RandomCrop(crop_size, pad_if_needed=True, fill=fill))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if vflip:
        steps.append(v2.RandomVerticalFlip())
    if rot90:
        steps.append(RandomRot90())
    if rotate:
        degrees = rotate.get("degrees", [90, 270])
        steps.append(v2.RandomApply([v2.RandomRotation(degrees, fill=fill)], p=rotate.get("prob", 0.5)))
    if photometric:
        # Close to mmseg PhotoMetricDistortion (brightness +-32, contrast/saturation 0.5-1.5, hue +-18 deg)
        steps.append(v2.ColorJitter(brightness=32 / 255, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18 / 360))
    pipeline = v2.Compose(steps)

    def apply(image: torch.Tensor, label: torch.Tensor):
        out_image, out_label = pipeline(tv_tensors.Image(image), tv_tensors.Mask(label))
        return out_image.as_subclass(torch.Tensor), out_label.as_subclass(torch.Tensor)

    return apply


class _ScaleBy(torch.nn.Module):
    """Resize by a fixed ratio, e.g. Inria's 5000 -> 4000, or by one drawn uniformly from [ratio, high] per sample
    (mmseg's random rescale, Cityscapes [0.5, 2]); bilinear image, nearest label."""

    def __init__(self, ratio: float, high: float | None = None) -> None:
        super().__init__()
        self.ratio, self.high = ratio, high

    def forward(self, image, label):
        h, w = image.shape[-2:]
        ratio = self.ratio if self.high is None else self.ratio + float(torch.rand(())) * (self.high - self.ratio)
        size = [round(h * ratio), round(w * ratio)]
        return v2.functional.resize(image, size, antialias=True), v2.functional.resize(label, size)
