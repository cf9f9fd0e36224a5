"""Pyramid Pooling Module (Zhao et al., PSPNet, CVPR 2017) in the layout of mmseg 0.30 `PPM`, shared by PSPNet's
decode head and ICNet's low-resolution branch.

Each pool scale s: adaptive average pool to s x s -> ConvModule 1x1 (conv without bias, BN, ReLU) -> bilinear
upsampling (align_corners=False) to the input size. Submodule names mirror mmseg (`<i>.1.conv`, `<i>.1.bn`), so
release keys map one to one. Ours: the BN falls back to its running statistics when it sees one value per channel
(the 1x1 pool of a one-image training batch), where plain BN raises; otherwise it is plain BN (the project's
convention for global-pool branches, as in ASPP's image pool and DAPPM).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from methods.blocks.heads import SampleSafeBatchNorm2d


class PPM(nn.ModuleList):
    """`forward(x)` -> the list of pooled branches, each upsampled to x's size (the caller concatenates them with
    x in its own order: PSPHead puts x first, ICNet last)."""

    def __init__(self, pool_scales: tuple[int, ...], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, channels, 1, bias=False), bn=SampleSafeBatchNorm2d(channels),
                act=nn.ReLU(inplace=True))))
            for scale in pool_scales)
        self.pool_scales = tuple(pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.interpolate(branch(x), size=x.shape[2:], mode="bilinear", align_corners=False) for branch in self]
