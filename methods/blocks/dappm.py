"""DAPPM: DDRNet's Deep Aggregation Pyramid Pooling Module (Hong et al., 2021), as used by RUE's deep head
(spec rue.md §3.2, upstream `aspp_refine_head.py` L12-92, which despite its name is this module).

Pre-activation branches (BN -> ReLU -> conv): four pooled scales (AvgPool 5/2, 9/4, 17/8, global) plus the identity
scale, each reduced 1x1 to `branch_planes`; scales 1-4 are upsampled bilinearly (align_corners=False), added to the
previous branch output and refined by BN-ReLU-conv3x3 (hierarchical residual); the five branches are concatenated
and compressed 1x1, plus a BN-ReLU-conv1x1 shortcut of the input.

Submodule names and `nn.Sequential` layouts follow the release, so its keys (`scale1.1.weight`, `scale1.3.weight`,
...) map one to one. BN momentum 0.1 (upstream `bn_mom`); upstream hard-codes SyncBatchNorm (spec §12.1 #9): plain
BN here, converted to SyncBN by the trainer only under CUDA DDP. The global-pool branch uses `SampleSafeBatchNorm2d`
so a training batch of one image does not raise on its 1x1 map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.blocks.heads import SampleSafeBatchNorm2d


def _bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int = 1, pool: nn.Module | None = None,
                  norm: type[nn.BatchNorm2d] = nn.BatchNorm2d) -> nn.Sequential:
    layers = [] if pool is None else [pool]
    layers += [norm(in_channels, momentum=0.1), nn.ReLU(inplace=True),
               nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)]
    return nn.Sequential(*layers)


class DAPPM(nn.Module):
    """DDRNet DAPPM (inplanes -> outplanes at the input's resolution)."""

    def __init__(self, inplanes: int = 512, branch_planes: int = 128, outplanes: int = 128) -> None:
        super().__init__()
        self.scale1 = _bn_relu_conv(inplanes, branch_planes, pool=nn.AvgPool2d(5, stride=2, padding=2))
        self.scale2 = _bn_relu_conv(inplanes, branch_planes, pool=nn.AvgPool2d(9, stride=4, padding=4))
        self.scale3 = _bn_relu_conv(inplanes, branch_planes, pool=nn.AvgPool2d(17, stride=8, padding=8))
        self.scale4 = _bn_relu_conv(inplanes, branch_planes, pool=nn.AdaptiveAvgPool2d((1, 1)),
                                    norm=SampleSafeBatchNorm2d)
        self.scale0 = _bn_relu_conv(inplanes, branch_planes)
        self.process1 = _bn_relu_conv(branch_planes, branch_planes, 3)
        self.process2 = _bn_relu_conv(branch_planes, branch_planes, 3)
        self.process3 = _bn_relu_conv(branch_planes, branch_planes, 3)
        self.process4 = _bn_relu_conv(branch_planes, branch_planes, 3)
        self.compression = _bn_relu_conv(5 * branch_planes, outplanes)
        self.shortcut = _bn_relu_conv(inplanes, outplanes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [self.scale0(x)]
        for scale, process in ((self.scale1, self.process1), (self.scale2, self.process2),
                               (self.scale3, self.process3), (self.scale4, self.process4)):
            up = F.interpolate(scale(x), size=size, mode="bilinear", align_corners=False)
            outs.append(process(up + outs[-1]))
        return self.compression(torch.cat(outs, dim=1)) + self.shortcut(x)
