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
inputs of ISDNet's "PSPNet (1/2 scale)" / "(1/4 scale)" rows (variants `half`, `quarter`); variant `isd` is
"PSPNet + ISD" (`methods/blocks/generic.py`: reconstructed, the official code does not define it).
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
from methods.blocks.generic import ISD_VARIANT, SCALE_VARIANTS, GenericSegmenter
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck's output (what the ISD framework fuses)."""
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))


@register_method
class PSPNet(GenericSegmenter):
    name = "pspnet"
    description = ("PSPNet (ResNet-18-D8, mmseg 0.30 config), generic baseline: variants pspnet-global, -local, -half, "
                   "-quarter (1/2, 1/4 scale) and -isd (deep branch of ISDNet's framework, reconstructed)")
    variants = (*GenericSegmenter.variants, *SCALE_VARIANTS, ISD_VARIANT)
    published = {"PSPNet": {"variant": "global"}, "PSPNet [local]": {"variant": "local"},
                 "PSPNet [global]": {"variant": "global"}, "PSPNet (1/2 scale)": {"variant": "half"},
                 "PSPNet (1/4 scale)": {"variant": "quarter"}, "PSPNet + ISD": {"variant": "isd"}}
    param_counts = (ParamCount("mmseg 0.30.0 pspnet_r18-d8_512x1024_80k_cityscapes.py, num_classes=7",
                               total=12_787_758, config={"inference": "global"}),
                   # "+ ISD" (reconstructed): that PSPNet plus ISDNet's head, the official code's 3,796,508
                   ParamCount("pspnet_r18-d8 (mmseg 0.30.0) + ISDNet's ISDHead (official code @7341335)",
                              total=12_787_758 + 3_796_508, config={"inference": "isd", "downsample": 4}))
    aux_weights = (0.4,)  # auxiliary_head loss_weight
    loss = staticmethod(mmseg_cross_entropy)  # mmseg 0.30 CrossEntropyLoss: mean over all pixels
    isd_channels = 128  # PSPHead's bottleneck, ISDNet's 128 (RAF's width): "+ ISD" adds exactly ISDNet's head

    def __init__(self, num_classes: int, pretrained: bool | str = False, dropout: float = 0.1, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.backbone = resnet_v1c(18, pretrained=pretrained, output_stride=8)
        self.decode_head = PSPHead(512, 128, num_classes, (1, 2, 3, 6), dropout)
        self.auxiliary_head = FCNHead(256, 64, num_classes, num_convs=1, dropout=dropout)
        for head in (self.decode_head, self.auxiliary_head):
            init_conv_modules(head)
            init_conv_seg(head.classifier)
        self.build_isd_head()

    def network_features(self, x):
        layer3, layer4 = self.backbone.forward_intermediates(x, indices=[3, 4], intermediates_only=True)
        features = self.decode_head.features(layer4)
        logits = self.decode_head.classifier(self.decode_head.dropout(features))
        return features, [logits, self.auxiliary_head(layer3)] if self.training else [logits]

    def network_outputs(self, x):
        return self.network_features(x)[1]

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """An mmseg PSPNet-R18-D8 checkpoint (`{"state_dict": {backbone.*, decode_head.*, auxiliary_head.*}}`)."""
        return self.load_mapped_state(map_official_keys(read_state_dict(path), _OFFICIAL_RENAMES)[0], path, strict)

    def save_official(self, path: str) -> None:
        torch.save({"state_dict": official_keys(self.state_dict(), _OFFICIAL_RENAMES)}, path)
