"""The "Local inference" baseline of the UHR papers' tables: full-resolution crops in a sliding window.

DeepLabv3 (ASPP head) on a dilated ResNet-18 from timm (`resnet18d`: deep stem, output stride 8), the same
network as the `global` baseline (methods/global.py), fed differently (methods/blocks/deeplab.py).
"""
from __future__ import annotations

import torch

from methods.base import MethodError, register_method
from methods.blocks.deeplab import DeepLabV3
from methods.blocks.losses import resize_logits, segmentation_ce
from methods.blocks.windows import sliding_window_logits


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
