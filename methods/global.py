"""The "Global inference" baseline of the UHR papers' tables: the whole image, downsampled.

DeepLabv3 (ASPP head) on a dilated ResNet-18 from timm (`resnet18d`: deep stem, output stride 8), the same
network as the `local` baseline (methods/local.py), fed differently (methods/blocks/deeplab.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import MethodError, register_method
from methods.blocks.deeplab import DeepLabV3
from methods.blocks.losses import resize_logits, segmentation_ce


@register_method
class GlobalBaseline(DeepLabV3):
    name = "global"
    description = "DeepLabv3-ResNet18 on the 4x-downsampled whole image ('Global inference' rows)"

    def __init__(self, num_classes: int, downsample: int = 4, resize_mode: str = "bilinear", **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        if downsample < 1:
            raise MethodError(f"global: downsample must be >= 1, got {downsample}")
        if resize_mode not in ("bilinear", "nearest", "area"):
            raise MethodError(f"global: resize_mode must be bilinear, nearest or area, got '{resize_mode}'")
        self.downsample = downsample
        self.resize_mode = resize_mode

    def _downsampled_logits(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if self.downsample > 1:
            size = (max(1, x.shape[-2] // self.downsample), max(1, x.shape[-1] // self.downsample))
            if self.resize_mode == "bilinear":
                # antialias: a faithful low-resolution view, not a strided sample of it
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            else:
                x = F.interpolate(x, size=size, mode=self.resize_mode)
        return self.network_logits(x)

    def forward_train(self, images, labels):
        return {"loss_seg": segmentation_ce(self._downsampled_logits(images), labels, self.ignore_index)}

    def predict(self, images):
        return resize_logits(self._downsampled_logits(images), images.shape[-2:])
