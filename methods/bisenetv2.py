"""BiSeNetV2 (Yu et al., "BiSeNet V2: Bilateral Network with Guided Aggregation for Real-time Semantic
Segmentation", IJCV 2021) as the UHR papers' generic "BiSeNetV2" row, in global and local inference.

Provenance: mmsegmentation 0.30.0, config `bisenetv2/bisenetv2_fcn_4x4_1024x1024_160k_cityscapes.py` (base
`_base_/models/bisenetv2.py`), re-implemented from the config and the paper (no upstream code):
- detail branch: three stages of 3x3 ConvBNReLUs (3 -> 64 /2, 64; 64 /2, 64, 64; 128 /2, 128, 128), 1/8 resolution;
- semantic branch: stem (3x3/2 -> 16; [1x1 -> 8, 3x3/2 -> 16] beside a 3x3/2 max pool, concatenated, 3x3 -> 16),
  gather-and-expansion layers (expansion 6; two per stage to 32 and 64 channels, four to 128, the first of each
  stride 2 with a depthwise-separable shortcut) and the context embedding (GAP -> BN -> 1x1 ConvBNReLU added to the
  input -> 3x3 ConvBNReLU), with mmseg's ReLUs after the depthwise convs that the paper does not show;
- BGA (128 channels): detail x sigmoid(up(semantic conv)) + up(down(detail) x sigmoid(semantic dwconv)), then a 3x3
  ConvBNReLU; the upsamplings are bilinear with `align_corners=False` as in the config;
- heads: `FCNHead` decode head on the BGA output (128 -> 1024, one conv) and four `FCNHead` auxiliary heads (two
  convs each; 16 -> 16, 32 -> 64, 64 -> 256, 128 -> 1024) on the semantic stages 1-4, loss weights all 1.0; logits
  resized bilinearly without corner alignment, as mmseg's `align_corners=False`;
- init: the backbone's `init_cfg` (kaiming-normal fan_out on every conv, BN 1 / 0); heads as mmseg's.
Ours: pooled BNs (context embedding) use running statistics at training batch size 1, where mmseg's BN raises.

Parameters with 7 classes: 14,775,587, equal to mmseg 0.30 building the config (num_classes=7, BN for SyncBN;
`tests/golden/count_bisenetv2.py`, which also checks logit parity against mmseg on the same weights).
`load_official` / `save_official` use mmseg's checkpoint layout (module names mirror it; `conv_seg` = `classifier`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from methods.base import ParamCount, register_method
from methods.blocks.bisenet import FCNHeadsSegmenter, pooled_conv_bn
from methods.blocks.heads import SampleSafeBatchNorm2d


class DepthwiseSeparable(nn.Module):
    """mmcv DepthwiseSeparableConvModule without activations: 3x3 depthwise conv + BN, 1x1 pointwise conv with BN
    (`pw_norm`) or with a bias (no BN)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, pw_norm: bool = True) -> None:
        super().__init__()
        self.depthwise_conv = ConvNormAct(in_channels, in_channels, 3, stride=stride, groups=in_channels,
                                          apply_act=False)
        self.pointwise_conv = ConvNormAct(in_channels, out_channels, 1, bias=not pw_norm, apply_norm=pw_norm,
                                          apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class DetailBranch(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (64, 64, 128), in_channels: int = 3) -> None:
        super().__init__()
        stages = []
        for i, c in enumerate(channels):
            layers = [ConvNormAct(channels[i - 1] if i else in_channels, c, 3, stride=2)]
            layers += [ConvNormAct(c, c, 3) for _ in range(1 if i == 0 else 2)]
            stages.append(nn.Sequential(*layers))
        self.detail_branch = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.detail_branch:
            x = stage(x)
        return x


class StemBlock(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 16) -> None:
        super().__init__()
        self.conv_first = ConvNormAct(in_channels, out_channels, 3, stride=2)
        self.convs = nn.Sequential(ConvNormAct(out_channels, out_channels // 2, 1),
                                   ConvNormAct(out_channels // 2, out_channels, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.fuse_last = ConvNormAct(out_channels * 2, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_first(x)
        return self.fuse_last(torch.cat([self.convs(x), self.pool(x)], dim=1))


class GatherExpansion(nn.Module):
    """GE layer: 3x3 ConvBNReLU, depthwise expansion (x`expansion`; stride 2: a strided depthwise conv + BN, then a
    depthwise ConvBNReLU), 1x1 projection + BN, residual (stride 2: depthwise-separable shortcut), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 6, stride: int = 1) -> None:
        super().__init__()
        mid = in_channels * expansion
        self.conv1 = ConvNormAct(in_channels, in_channels, 3)
        if stride == 1:
            self.dwconv = nn.Sequential(ConvNormAct(in_channels, mid, 3, groups=in_channels))
            self.shortcut = None
        else:
            self.dwconv = nn.Sequential(
                ConvNormAct(in_channels, mid, 3, stride=stride, groups=in_channels, apply_act=False),
                ConvNormAct(mid, mid, 3, groups=mid))
            self.shortcut = nn.Sequential(DepthwiseSeparable(in_channels, out_channels, stride))
        self.conv2 = nn.Sequential(ConvNormAct(mid, out_channels, 1, apply_act=False))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.conv2(self.dwconv(self.conv1(x))) + identity)


class ContextEmbedding(nn.Module):
    """CE block: GAP -> BN -> 1x1 ConvBNReLU, broadcast-added to the input, then a 3x3 ConvBNReLU."""

    def __init__(self, in_channels: int = 128, out_channels: int = 128) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), SampleSafeBatchNorm2d(in_channels))
        self.conv_gap = pooled_conv_bn(in_channels, out_channels)
        self.conv_last = ConvNormAct(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(x + self.conv_gap(self.gap(x)))


class SemanticBranch(nn.Module):
    """Stem, GE stages 2-4 and the CE block; returns the output of each of the 5 (stages 1-4 feed the boosters)."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128), in_channels: int = 3,
                 expansion: int = 6) -> None:
        super().__init__()
        self.stage1 = StemBlock(in_channels, channels[0])
        for i in range(1, len(channels)):
            repeats = 4 if i == len(channels) - 1 else 2
            layers = [GatherExpansion(channels[i - 1], channels[i], expansion, 2)]
            layers += [GatherExpansion(channels[i], channels[i], expansion, 1) for _ in range(repeats - 1)]
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
        self.add_module(f"stage{len(channels)}_CEBlock", ContextEmbedding(channels[-1], channels[-1]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.children():  # registration order: stage1..4, CE
            x = stage(x)
            outs.append(x)
        return outs


class BilateralGuidedAggregation(nn.Module):
    def __init__(self, channels: int = 128, align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.detail_dwconv = nn.Sequential(DepthwiseSeparable(channels, channels, pw_norm=False))
        self.detail_down = nn.Sequential(ConvNormAct(channels, channels, 3, stride=2, apply_act=False),
                                         nn.AvgPool2d(3, stride=2, padding=1))
        self.semantic_conv = nn.Sequential(ConvNormAct(channels, channels, 3, apply_act=False))
        self.semantic_dwconv = nn.Sequential(DepthwiseSeparable(channels, channels, pw_norm=False))
        self.conv = ConvNormAct(channels, channels, 3)

    def _up(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def forward(self, detail: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        detail_keep = self.detail_dwconv(detail)
        fuse1 = detail_keep * torch.sigmoid(self._up(self.semantic_conv(semantic), detail_keep))
        fuse2 = self.detail_down(detail) * torch.sigmoid(self.semantic_dwconv(semantic))
        return self.conv(fuse1 + self._up(fuse2, fuse1))


class BiSeNetV2Backbone(nn.Module):
    """mmseg `BiSeNetV2` backbone: outputs [BGA (1/8, 128), semantic stages 1-4 (16 @ 1/4 ... 128 @ 1/32)]."""

    def __init__(self, detail_channels=(64, 64, 128), semantic_channels=(16, 32, 64, 128), expansion: int = 6,
                 bga_channels: int = 128, align_corners: bool = False) -> None:
        super().__init__()
        self.detail = DetailBranch(detail_channels)
        self.semantic = SemanticBranch(semantic_channels, 3, expansion)
        self.bga = BilateralGuidedAggregation(bga_channels, align_corners)
        # the backbone's init_cfg: Kaiming on every Conv2d (bias 0); BN weight 1 / bias 0 is PyTorch's default
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        semantic = self.semantic(x)
        return [self.bga(self.detail(x), semantic[-1]), *semantic[:-1]]


@register_method
class BiSeNetV2(FCNHeadsSegmenter):
    name = "bisenetv2"
    description = ("BiSeNetV2 (mmseg 0.30 config), generic baseline: variants bisenetv2-global and "
                   "bisenetv2-local")
    published = {"BiSeNetV2": {"variant": "global"}}
    param_counts = (ParamCount("mmseg 0.30.0 bisenetv2_fcn_4x4_1024x1024_160k_cityscapes (num_classes=7)",
                               total=14_775_587, config={"inference": "global"}),)
    aux_weights = (1.0, 1.0, 1.0, 1.0)  # the config's four auxiliary FCNHeads (the "boosters")

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(num_classes, BiSeNetV2Backbone(), decode=(128, 1024, 1),
                         aux=((1, 16, 16, 2), (2, 32, 64, 2), (3, 64, 256, 2), (4, 128, 1024, 2)), **kwargs)
