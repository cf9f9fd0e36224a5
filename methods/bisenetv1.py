"""BiSeNetV1 (Yu et al., "BiSeNet: Bilateral Segmentation Network for Real-time Semantic Segmentation", ECCV 2018)
as the UHR papers' generic "BiSeNetV1" rows, in global and local inference.

Provenance: mmsegmentation 0.30.0, config `bisenetv1/bisenetv1_r18-d32_4x4_1024x1024_160k_cityscapes.py` (base
`_base_/models/bisenetv1_r18-d32.py`), re-implemented from the config and the paper (no upstream code):
- context path: the config's `backbone_cfg` is mmseg `ResNet` depth 18 (not `ResNetV1c`: no deep stem, so the 7x7
  stem of torchvision's ResNet-18), output stride 32, here a timm ResNet-18 (`resnet_v1c(18, deep_stem=False)`,
  identical layout and init: kaiming fan_out, zero-initialised last BN of each block). ARMs on the 1/16 and 1/32
  features (3x3 ConvBNReLU 256/512 -> 128, then a sigmoid channel gate from GAP -> 1x1 conv -> BN), plus a global
  context (GAP -> 1x1 ConvBNReLU 512 -> 128) added to the 1/32 ARM; each sum is upsampled (nearest) and refined by a
  3x3 ConvBNReLU (`conv_head32`, `conv_head16`);
- spatial path: 7x7/2 (3 -> 64), 3x3/2, 3x3/2 (64), 1x1 (64 -> 128) ConvBNReLUs, 1/8 resolution;
- FFM: concat (128 + 128) -> 1x1 ConvBNReLU 256 -> x; x + x * sigmoid(ConvBNReLU 1x1 (GAP(x))) (mmseg's variant: BN
  and ReLU in the attention, one 1x1 conv instead of the paper's two);
- heads: `FCNHead` decode head on the FFM output (256 -> 256, one conv), two `FCNHead` auxiliary heads (128 -> 64,
  one conv) on the 1/8 and 1/16 context features, loss weights 1.0 and 1.0; `align_corners=False` throughout (the
  logits are resized bilinearly without corner alignment, as here).
Ours: pooled BNs use running statistics at training batch size 1 (where mmseg raises); `pretrained: true` loads
torchvision's ImageNet ResNet-18 (the config we follow trains from scratch; mmseg's `in1k-pre` config would load the
V1c weights, whose deep stem does not fit this 7x7 stem).

Parameters with 7 classes: 13,421,077, equal to mmseg 0.30 building the config (num_classes=7, BN for SyncBN;
`tests/golden/count_bisenetv1.py`, which also checks logit parity against mmseg on the same weights).
`load_official` / `save_official` use mmseg's checkpoint layout (module names mirror it; `conv_seg` = `classifier`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from methods.base import ParamCount, register_method
from methods.blocks.backbones import resnet_v1c
from methods.blocks.bisenet import FCNHeadsSegmenter, pooled_conv_bn
from methods.blocks.mmseg import init_conv_modules


class AttentionRefinement(nn.Module):
    """ARM: 3x3 ConvBNReLU, then a channel gate sigmoid(BN(1x1 conv(GAP)))."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_layer = ConvNormAct(in_channels, out_channels, 3)
        self.atten_conv_layer = nn.Sequential(nn.AdaptiveAvgPool2d(1), pooled_conv_bn(out_channels, out_channels,
                                                                                      act=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_layer(x)
        return x * self.atten_conv_layer(x)


class ContextPath(nn.Module):
    """ResNet-18 (output stride 32) with ARMs and the global context; returns the 1/8 and 1/16 context features."""

    def __init__(self, channels: tuple[int, int, int] = (128, 256, 512), pretrained: bool | str = False) -> None:
        super().__init__()
        self.backbone = resnet_v1c(18, pretrained=pretrained, output_stride=32, deep_stem=False)
        self.arm16 = AttentionRefinement(channels[1], channels[0])
        self.arm32 = AttentionRefinement(channels[2], channels[0])
        self.conv_head32 = ConvNormAct(channels[0], channels[0], 3)
        self.conv_head16 = ConvNormAct(channels[0], channels[0], 3)
        self.gap_conv = nn.Sequential(nn.AdaptiveAvgPool2d(1), pooled_conv_bn(channels[2], channels[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, x8, x16, x32 = self.backbone.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        up32 = self.conv_head32(F.interpolate(self.arm32(x32) + self.gap_conv(x32), size=x16.shape[-2:],
                                              mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(x16) + up32, size=x8.shape[-2:], mode="nearest"))
        return up16, up32


class SpatialPath(nn.Sequential):
    """Three stride-2 ConvBNReLUs (7x7, 3x3, 3x3) and a 1x1 projection: 1/8 resolution, wide channels."""

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (64, 64, 64, 128)) -> None:
        super().__init__()
        self.layer1 = ConvNormAct(in_channels, channels[0], 7, stride=2)
        self.layer2 = ConvNormAct(channels[0], channels[1], 3, stride=2)
        self.layer3 = ConvNormAct(channels[1], channels[2], 3, stride=2)
        self.layer4 = ConvNormAct(channels[2], channels[3], 1)


class FeatureFusion(nn.Module):
    """FFM: 1x1 ConvBNReLU on the concatenated paths, re-weighted by a channel gate and added back."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.conv_atten = nn.Sequential(pooled_conv_bn(out_channels, out_channels), nn.Sigmoid())

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        fused = self.conv1(torch.cat([spatial, context], dim=1))
        return fused + fused * self.conv_atten(self.gap(fused))


class BiSeNetV1Backbone(nn.Module):
    """mmseg `BiSeNetV1` backbone: outputs [FFM (out_channels, 1/8), context 1/8 (128), context 1/16 (128)]."""

    def __init__(self, spatial_channels=(64, 64, 64, 128), context_channels=(128, 256, 512), out_channels: int = 256,
                 pretrained: bool | str = False) -> None:
        super().__init__()
        self.context_path = ContextPath(context_channels, pretrained)
        self.spatial_path = SpatialPath(3, spatial_channels)
        self.ffm = FeatureFusion(context_channels[1], out_channels)
        # mmcv ConvModule init; the ResNet keeps its own (mmseg ResNet init = timm's)
        for module in (self.context_path.arm16, self.context_path.arm32, self.context_path.conv_head32,
                       self.context_path.conv_head16, self.context_path.gap_conv, self.spatial_path, self.ffm):
            init_conv_modules(module)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        context8, context16 = self.context_path(x)
        return [self.ffm(self.spatial_path(x), context8), context8, context16]


@register_method
class BiSeNetV1(FCNHeadsSegmenter):
    name = "bisenetv1"
    description = ("BiSeNetV1 (ResNet-18, mmseg 0.30 config), generic baseline: variants bisenetv1-global and "
                   "bisenetv1-local")
    published = {"Global inference: BiSeNetV1": {"variant": "global"}, "BiSeNetV1": {"variant": "global"}}
    param_counts = (ParamCount("mmseg 0.30.0 bisenetv1_r18-d32_4x4_1024x1024_160k_cityscapes (num_classes=7)",
                               total=13_421_077, config={"inference": "global"}),)
    aux_weights = (1.0, 1.0)  # the config's two auxiliary FCNHeads

    def __init__(self, num_classes: int, pretrained: bool | str = False, **kwargs) -> None:
        super().__init__(num_classes, BiSeNetV1Backbone(pretrained=pretrained), decode=(256, 256, 1),
                         aux=((1, 128, 64, 1), (2, 128, 64, 1)), **kwargs)
