"""The generic baselines of the UHR papers' tables: "Global inference" (the whole image,
downsampled) and "Local inference" (full-resolution crops in a sliding window).

Both are DeepLabv3 (ASPP head) on a dilated ResNet-18 from timm (`resnet18d`: deep stem,
output stride 8), the same network fed differently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.backbones import timm_features
from methods.base import MethodError, UHRMethod, register_method
from methods.heads import ASPPHead
from methods.losses import resize_logits, segmentation_ce
from methods.windows import sliding_window_logits


class DeepLabV3(UHRMethod):
    """DeepLabv3 on a timm trunk; subclasses decide what the network sees."""

    def __init__(self, num_classes: int, backbone: str = "resnet18d", pretrained: bool | str = False,
                 output_stride: int = 8, channels: int = 128, dilations: tuple[int, ...] = (1, 12, 24, 36),
                 ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        self.backbone = timm_features(backbone, pretrained=pretrained, output_stride=output_stride,
                                      out_indices=(4,))
        self.decode_head = ASPPHead(self.backbone.feature_info.channels()[-1], channels, num_classes,
                                    tuple(dilations))

    def network_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> logits at the network's output stride."""
        return self.decode_head(self.backbone(images)[-1])[1]


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


@register_method
class LocalBaseline(DeepLabV3):
    name = "local"
    description = "DeepLabv3-ResNet18 on full-resolution crops, sliding window ('Local inference' rows)"

    def __init__(self, num_classes: int, window: int = 512, overlap: int = 128, window_batch: int = 4,
                 **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        if not 0 <= overlap < window:
            raise MethodError(f"local: overlap must be in [0, window), got overlap={overlap}, window={window}")
        self.window, self.overlap, self.window_batch = window, overlap, window_batch

    def forward_train(self, images, labels):
        # training crops come from the recipe; each is one window
        logits = self.network_logits(self.normalize(images))
        return {"loss_seg": segmentation_ce(logits, labels, self.ignore_index)}

    def _window_logits(self, crops: torch.Tensor) -> torch.Tensor:
        return resize_logits(self.network_logits(crops), crops.shape[-2:])

    def predict(self, images):
        return sliding_window_logits(self._window_logits, self.normalize(images), self.num_classes,
                                     self.window, self.window - self.overlap, self.window_batch)
