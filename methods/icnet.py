"""ICNet (Zhao et al., "ICNet for Real-Time Semantic Segmentation on High-Resolution Images", ECCV 2018) as the UHR
papers' generic "ICNet" rows (ISDNet Table 3 on Cityscapes, UHRNet Table II on DeepGlobe), in global and local
inference.

Provenance: the papers name ICNet without a configuration; ours follows mmsegmentation 0.30.0's config
`icnet/icnet_r18-d8_832x832_160k_cityscapes.py`. Three resolution branches (mmseg `ICNet` backbone):
- sub1, full input: three 3x3 stride-2 ConvModules 3 -> 32 -> 32 -> 64 (1/8);
- sub2, input halved (bilinear): ResNetV1c-18-D8 stem, max-pool with ceil_mode, layer1, layer2 (128 ch, 1/16 of the
  input), 1x1 ConvModule -> 256;
- sub4, sub2's layer2 output halved again: layer3, layer4 (dilated, 512 ch, 1/32), pyramid pooling (1, 2, 3, 6) to
  512 each, concatenated before the input, 3x3 ConvModule bottleneck -> 512, 1x1 ConvModule -> 256.
`ICNeck`: cascade feature fusion sub4 + sub2 then + sub1 (the low input upsampled, 3x3 dilation-2 ConvModule; the high
input 1x1 ConvModule; sum, ReLU), 128 channels. Decode `FCNHead` (128 -> 128, one 3x3 ConvModule, no dropout) on the
last fusion (1/8); auxiliary `FCNHead`s (128 -> 128, Dropout2d(0.1)) on the two fusions' low-branch features
(1/16 and 1/8), loss weights 0.4 and 0.4, training only. The config trains from scratch (`pretrained: true` loads
`open-mmlab://resnet18_v1c` into the ResNet, the `icnet_r18-d8_in1k-pre` configs). Init as mmseg: convs kaiming
fan_out, BN 1/0, ResNet zero-init residual BN (timm's), classifiers N(0, 0.01). Module names mirror mmseg
(`backbone.backbone`, `backbone.psp_modules`, `neck.cff_24`, `auxiliary_head.<i>`), so release checkpoints map by the
ResNet stem and `conv_seg` -> `classifier` renames only.
Parameters with 7 classes: 25,169,749, equal to mmseg 0.30.0's model built from that config
(`tests/golden/count_icnet.py`); on the same seeded weights our logits match mmseg's to 7e-7 (decode and both
auxiliary heads, `tests/test_generic_icnet.py`).
Ours: the generic global / local inference (`methods/blocks/generic.py`) and the BN of the 1x1 pool branch, which
uses running statistics on a one-image training batch where mmseg's plain BN would raise (`blocks/ppm.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from methods.base import LoadReport, ParamCount, register_method
from methods.blocks.backbones import read_state_dict, resnet_v1c
from methods.blocks.generic import GenericSegmenter
from methods.blocks.heads import FCNHead, conv_bn_relu
from methods.blocks.mmseg import (
    RESNET_V1C_RENAMES,
    conv_bn,
    init_conv_modules,
    init_conv_seg,
    map_official_keys,
    mmseg_cross_entropy,
    official_keys,
)
from methods.blocks.ppm import PPM

# mmseg release keys -> ours: the V1c deep stem (inside the ICNet backbone) onto timm's, `conv_seg` onto `classifier`
_OFFICIAL_RENAMES = tuple((f"backbone.{old}", f"backbone.{new}") for old, new in RESNET_V1C_RENAMES) + (
    ("decode_head.conv_seg.", "decode_head.classifier."),
    ("auxiliary_head.0.conv_seg.", "auxiliary_head.0.classifier."),
    ("auxiliary_head.1.conv_seg.", "auxiliary_head.1.classifier."))


def _half(x: torch.Tensor) -> torch.Tensor:
    # mmseg `resize(scale_factor=0.5)`: the scale itself (not out/in sizes) sets the sampling grid on odd sides
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


class ICNetBackbone(nn.Module):
    """mmseg `ICNet` backbone: (sub1 1/8, sub2 1/16, sub4 1/32) features with channels `out_channels`."""

    def __init__(self, pretrained: bool | str = False, layer_channels: tuple[int, int] = (128, 512),
                 light_channels: int = 32, psp_channels: int = 512, out_channels: tuple[int, int, int] = (64, 256, 256),
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.backbone = resnet_v1c(18, pretrained=pretrained, output_stride=8)
        self.backbone.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)  # keeps the corner, as mmseg
        self.psp_modules = PPM(pool_scales, layer_channels[1], psp_channels)
        self.psp_bottleneck = conv_bn(layer_channels[1] + len(pool_scales) * psp_channels, psp_channels, 3)
        self.conv_sub1 = nn.Sequential(*(ConvNormAct(cin, cout, 3, stride=2, bias=False) for cin, cout in
                                         ((3, light_channels), (light_channels, light_channels),
                                          (light_channels, out_channels[0]))))
        self.conv_sub2 = conv_bn(layer_channels[0], out_channels[1], 1)
        self.conv_sub4 = conv_bn(psp_channels, out_channels[2], 1)
        for module in (self.psp_modules, self.psp_bottleneck, self.conv_sub1, self.conv_sub2, self.conv_sub4):
            init_conv_modules(module)  # the ResNet keeps its own init (zero-init residual BN), as mmseg's

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sub1 = self.conv_sub1(x)
        r = self.backbone
        x = r.layer2(r.layer1(r.maxpool(r.act1(r.bn1(r.conv1(_half(x)))))))
        sub2 = self.conv_sub2(x)
        x = r.layer4(r.layer3(_half(x)))
        x = self.psp_bottleneck(torch.cat([*self.psp_modules(x), x], dim=1))
        return sub1, sub2, self.conv_sub4(x)


class CascadeFeatureFusion(nn.Module):
    """mmseg CFF: low input upsampled to the high one's size -> 3x3 dilation-2 ConvModule; high -> 1x1 ConvModule;
    ReLU of the sum. Also returns the low branch's features (the auxiliary heads' input)."""

    def __init__(self, low_channels: int, high_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_low = conv_bn_relu(low_channels, out_channels, 3, dilation=2)
        self.conv_high = conv_bn(high_channels, out_channels, 1)

    def forward(self, x_low: torch.Tensor, x_high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_low = self.conv_low(F.interpolate(x_low, size=x_high.shape[2:], mode="bilinear", align_corners=False))
        return F.relu(x_low + self.conv_high(x_high)), x_low


class ICNeck(nn.Module):
    """mmseg `ICNeck`: (sub1, sub2, sub4) -> (aux features 1/16, aux features 1/8, fused 1/8)."""

    def __init__(self, in_channels: tuple[int, int, int] = (64, 256, 256), out_channels: int = 128) -> None:
        super().__init__()
        self.cff_24 = CascadeFeatureFusion(in_channels[2], in_channels[1], out_channels)
        self.cff_12 = CascadeFeatureFusion(out_channels, in_channels[0], out_channels)
        init_conv_modules(self)

    def forward(self, inputs):
        sub1, sub2, sub4 = inputs
        fused_24, x_24 = self.cff_24(sub4, sub2)
        fused_12, x_12 = self.cff_12(fused_24, sub1)
        return x_24, x_12, fused_12


@register_method
class ICNet(GenericSegmenter):
    name = "icnet"
    description = "ICNet (ResNet-18-D8, mmseg 0.30 config), generic baseline: variants icnet-global and icnet-local"
    published = {"ICNet": {"variant": "global"}, "ICNet [local]": {"variant": "local"},
                 "ICNet [global]": {"variant": "global"}}
    param_counts = (ParamCount("mmseg 0.30.0 icnet_r18-d8_832x832_160k_cityscapes.py, num_classes=7",
                               total=25_169_749, config={"inference": "global"}),)
    aux_weights = (0.4, 0.4)  # the two auxiliary_head loss_weights
    loss = staticmethod(mmseg_cross_entropy)  # mmseg 0.30 CrossEntropyLoss: mean over all pixels

    def __init__(self, num_classes: int, pretrained: bool | str = False, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.backbone = ICNetBackbone(pretrained)
        self.neck = ICNeck((64, 256, 256), 128)
        self.decode_head = FCNHead(128, 128, num_classes, num_convs=1, dropout=0.0)  # dropout_ratio=0 in the config
        self.auxiliary_head = nn.ModuleList(FCNHead(128, 128, num_classes, num_convs=1, dropout=0.1) for _ in range(2))
        for head in (self.decode_head, *self.auxiliary_head):
            init_conv_modules(head)
            init_conv_seg(head.classifier)

    def network_outputs(self, x):
        x_24, x_12, fused = self.neck(self.backbone(x))
        logits = self.decode_head(fused)
        if not self.training:
            return [logits]
        return [logits, self.auxiliary_head[0](x_24), self.auxiliary_head[1](x_12)]

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """An mmseg ICNet-R18-D8 checkpoint (`{"state_dict": {backbone.*, neck.*, decode_head.*,
        auxiliary_head.{0,1}.*}}`)."""
        return self.load_mapped_state(map_official_keys(read_state_dict(path), _OFFICIAL_RENAMES)[0], path, strict)

    def save_official(self, path: str) -> None:
        torch.save({"state_dict": official_keys(self.state_dict(), _OFFICIAL_RENAMES)}, path)
