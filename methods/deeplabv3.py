"""DeepLabv3 (Chen et al., 2017) as ISDNet's Cityscapes "DeepLabv3" row (Table 3, full scale), in global and local
inference.

Provenance: ISDNet's Table 3 numbers for the generic networks are mmsegmentation's R18-D8 Cityscapes results; 76.70
is mmseg's `deeplabv3/deeplabv3_r18-d8_512x1024_80k_cityscapes.py`, which this follows: ResNetV1c-18 dilated to
output stride 8 (deep stem; `pretrained: true` loads `open-mmlab://resnet18_v1c`), ASPPHead (in 512, 128 channels,
dilations 1/12/24/36, image pooling, Dropout2d 0.1) and an FCNHead auxiliary head on stage 3 (in 256, 64 channels,
one conv, loss weight 0.4), mmcv ConvModule init and N(0, 0.01) `conv_seg`. It is ISDNet's deep branch on its own
(`methods/isdnet.py` builds the same modules), and the network of `global` and `local` with mmseg's backbone
(they use timm's `resnet18d`, whose stem is the same, and no auxiliary head).
Parameters with 7 classes: 13,984,046 in total and 13,836,007 on the inference path (no auxiliary head), exactly as
mmseg 0.30 builds the config; with the same weights the two give identical logits (tests/golden/count_deeplabv3.py,
fixture tests/golden/deeplabv3.npz). `load_official` reads mmseg checkpoints of that config.
"""
from __future__ import annotations

import torch

from methods.base import LoadReport, ParamCount, register_method
from methods.blocks.backbones import read_state_dict, resnet_v1c
from methods.blocks.generic import GenericSegmenter
from methods.blocks.heads import ASPPHead, FCNHead
from methods.blocks.mmseg import (
    ASPP_HEAD_RENAMES,
    RESNET_V1C_RENAMES,
    init_conv_modules,
    init_conv_seg,
    map_official_keys,
    mmseg_cross_entropy,
    official_keys,
)

_OFFICIAL_RENAMES = (*RESNET_V1C_RENAMES, *ASPP_HEAD_RENAMES,
                     ("auxiliary_head.conv_seg.", "auxiliary_head.classifier."))


@register_method
class DeepLabV3(GenericSegmenter):
    name = "deeplabv3"
    description = "DeepLabv3 (ResNet-18-V1c-D8, mmseg config), generic baseline: variants deeplabv3-global and -local"
    published = {"DeepLabv3": {"variant": "global"}}
    aux_weights = (0.4,)
    loss = staticmethod(mmseg_cross_entropy)
    param_counts = (ParamCount("mmseg 0.30 deeplabv3_r18-d8_512x1024_80k_cityscapes, 7 classes", total=13_984_046,
                               inference=13_836_007, config={"inference": "global"}),)

    def __init__(self, num_classes: int, pretrained: bool | str = False, channels: int = 128,
                 dilations: tuple[int, ...] = (1, 12, 24, 36), **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.backbone = resnet_v1c(18, pretrained=pretrained, output_stride=8)
        self.decode_head = ASPPHead(512, channels, num_classes, tuple(dilations))
        self.auxiliary_head = FCNHead(256, 64, num_classes, num_convs=1)
        for head in (self.decode_head, self.auxiliary_head):
            init_conv_modules(head)
            init_conv_seg(head.classifier)

    def network_outputs(self, x):
        stage3, stage4 = self.backbone.forward_intermediates(x, indices=[3, 4], intermediates_only=True)
        logits = self.decode_head(stage4)[1]
        return [logits, self.auxiliary_head(stage3)] if self.training else [logits]

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """An mmseg checkpoint of the config above (`{"state_dict": ...}`, mmseg key names)."""
        return self.load_mapped_state(map_official_keys(read_state_dict(path), _OFFICIAL_RENAMES)[0], path, strict)

    def save_official(self, path: str) -> None:
        torch.save({"state_dict": official_keys(self.state_dict(), _OFFICIAL_RENAMES)}, path)
