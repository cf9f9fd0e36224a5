"""DeepLabv3 (ASPP head) on a timm trunk, the network of the `global` and `local` baselines (by default a dilated
ResNet-18, `resnet18d`: deep stem, output stride 8); the baselines differ only in what the network sees.
"""
from __future__ import annotations

import torch

from methods.base import UHRMethod
from methods.blocks.backbones import timm_features
from methods.blocks.heads import ASPPHead


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
