"""PSPNet (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017) as the UHR papers' generic "PSPNet" rows (ISDNet
Tables 3-4 on Cityscapes, UHRNet Table II on DeepGlobe), in global and local inference.

Provenance: the papers name PSPNet without a configuration; ours follows mmsegmentation 0.30.0's config
`pspnet/pspnet_r18-d8_512x1024_80k_cityscapes.py`. Backbone ResNetV1c-18 dilated to output stride 8 (`resnet_v1c`;
`pretrained: true` loads `open-mmlab://resnet18_v1c`, as the config); decode head `PSPHead` on layer4 (512 channels):
pyramid pooling at scales (1, 2, 3, 6) to 128 channels each, concatenated after the input, 3x3 ConvModule bottleneck
to 128, Dropout2d(0.1), 1x1 classifier; auxiliary `FCNHead` on layer3 (256 -> 64, one 3x3 ConvModule,
Dropout2d(0.1)), loss weight 0.4, training only. Init as mmseg: ResNet kaiming fan_out with zero-init residual BN
(timm's), ConvModules kaiming fan_out, classifiers N(0, 0.01). Module names mirror mmseg (`backbone`,
`decode_head.psp_modules`, `decode_head.bottleneck`, `auxiliary_head.convs`), so release checkpoints map by the
ResNet stem and `conv_seg` -> `classifier` renames only. `downsample` (global inference) gives the reduced-scale
inputs of ISDNet's "PSPNet (1/2 scale)" / "(1/4 scale)" rows.
Parameters with 7 classes: 12,787,758, equal to mmseg 0.30.0's model built from that config
(`tests/golden/count_pspnet.py`); on the same seeded weights our logits match mmseg's to 7e-7 (decode and auxiliary
heads, `tests/test_generic_pspnet.py`).
Ours: the generic global / local inference (`methods/blocks/generic.py`) and the BN of the 1x1 pool branch,
which uses running statistics on a one-image training batch where mmseg's plain BN would raise (`blocks/ppm.py`).
"""
from __future__ import annotations

import torch
from torch import nn

from methods.base import LoadReport, ParamCount, register_method
from methods.blocks.backbones import read_state_dict, resnet_v1c
from methods.blocks.generic import GenericSegmenter
from methods.blocks.heads import FCNHead
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

# mmseg release keys -> ours: the V1c deep stem onto timm's, `conv_seg` onto our heads' `classifier`
_OFFICIAL_RENAMES = RESNET_V1C_RENAMES + (
    ("decode_head.conv_seg.", "decode_head.classifier."), ("auxiliary_head.conv_seg.", "auxiliary_head.classifier."))


class PSPHead(nn.Module):
    """mmseg `PSPHead`: [x, PPM(x)] concatenated -> 3x3 ConvModule -> Dropout2d -> 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.psp_modules = PPM(pool_scales, in_channels, channels)
        self.bottleneck = conv_bn(in_channels + len(pool_scales) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))
        return self.classifier(self.dropout(feats))


@register_method
class PSPNet(GenericSegmenter):
    name = "pspnet"
    description = "PSPNet (ResNet-18-D8, mmseg 0.30 config), generic baseline: variants pspnet-global and pspnet-local"
    published = {"PSPNet": {"variant": "global"}, "PSPNet [local]": {"variant": "local"},
                 "PSPNet [global]": {"variant": "global"}}
    param_counts = (ParamCount("mmseg 0.30.0 pspnet_r18-d8_512x1024_80k_cityscapes.py, num_classes=7",
                               total=12_787_758, config={"inference": "global"}),)
    aux_weights = (0.4,)  # auxiliary_head loss_weight
    loss = staticmethod(mmseg_cross_entropy)  # mmseg 0.30 CrossEntropyLoss: mean over all pixels

    def __init__(self, num_classes: int, pretrained: bool | str = False, dropout: float = 0.1, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.backbone = resnet_v1c(18, pretrained=pretrained, output_stride=8)
        self.decode_head = PSPHead(512, 128, num_classes, (1, 2, 3, 6), dropout)
        self.auxiliary_head = FCNHead(256, 64, num_classes, num_convs=1, dropout=dropout)
        for head in (self.decode_head, self.auxiliary_head):
            init_conv_modules(head)
            init_conv_seg(head.classifier)

    def network_outputs(self, x):
        layer3, layer4 = self.backbone.forward_intermediates(x, indices=[3, 4], intermediates_only=True)
        logits = self.decode_head(layer4)
        return [logits, self.auxiliary_head(layer3)] if self.training else [logits]

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """An mmseg PSPNet-R18-D8 checkpoint (`{"state_dict": {backbone.*, decode_head.*, auxiliary_head.*}}`)."""
        return self.load_mapped_state(map_official_keys(read_state_dict(path), _OFFICIAL_RENAMES)[0], path, strict)

    def save_official(self, path: str) -> None:
        torch.save({"state_dict": official_keys(self.state_dict(), _OFFICIAL_RENAMES)}, path)
