"""Segmentation heads shared by several methods (mmseg-style layouts)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> nn.Module:
    """Conv (no bias) + BatchNorm + ReLU, 'same' padding."""
    return ConvNormAct(in_channels, out_channels, kernel_size, dilation=dilation, bias=False)


class SampleSafeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that uses its running statistics for a batch holding one value per channel (the
    ASPP image-pool branch at batch size 1), where plain BN raises; otherwise plain BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ImagePool(nn.Sequential):
    """Global average pool -> 1x1 conv -> BN -> ReLU (ASPP image-level features)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False),
                         SampleSafeBatchNorm2d(channels), nn.ReLU(inplace=True))


class ASPPHead(nn.Module):
    """DeepLabv3 ASPP head as in mmseg `ASPPHead`: image pooling + one 1x1 and three dilated 3x3
    branches, concatenated and fused by a 3x3 bottleneck; then Dropout2d(0.1) and a 1x1 classifier.

    `forward` returns (fused features, logits) so two-stream methods can reuse the features.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 dilations: tuple[int, ...] = (1, 12, 24, 36), dropout: float = 0.1) -> None:
        super().__init__()
        self.image_pool = ImagePool(in_channels, channels)
        self.aspp = nn.ModuleList(
            conv_bn_relu(in_channels, channels, 1 if d == 1 else 3, dilation=d) for d in dilations
        )
        self.bottleneck = conv_bn_relu((len(dilations) + 1) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = F.interpolate(self.image_pool(x), size=x.shape[2:], mode="bilinear", align_corners=False)
        feats = self.bottleneck(torch.cat([pooled] + [branch(x) for branch in self.aspp], dim=1))
        return feats, self.classifier(self.dropout(feats))


class FCNHead(nn.Module):
    """mmseg `FCNHead` (concat_input=False): `num_convs` 3x3 conv-BN-ReLU, Dropout2d, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        layers = [conv_bn_relu(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))
