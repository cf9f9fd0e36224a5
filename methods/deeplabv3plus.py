"""DeepLabv3+ (Chen et al., ECCV 2018) as the UHR papers' generic "DeepLabv3+" rows, in global and local inference.

Provenance: ISDNet's DeepGlobe and Inria rows (Tables 1-2) and UHRNet's Table II copy GLNet's (CVPR 2019) and
MagNet's numbers, which name "DeepLabv3+" without a backbone or code. Ours is segmentation_models_pytorch 0.6.0
`DeepLabV3Plus` (the kept library for generic networks): ResNet-50 encoder at output stride 16 (timm/torchvision
layout, ImageNet weights with `pretrained: true`), ASPP with separable convolutions at rates (12, 24, 36), 256
channels, the 48-channel low-level projection of stride-4 features, 4x bilinear upsampling of the logits.
Parameters with 7 classes: 26,679,127 (ResNet-50) and 12,330,839 (ResNet-18, the smoke recipe), counted from smp,
the reference implementation (tests/test_contract.py). `load_official` reads an `smp.DeepLabV3Plus` state dict.
"""
from __future__ import annotations

import segmentation_models_pytorch as smp

from methods.base import ParamCount, register_method
from methods.blocks.smp_network import SmpSegmenter


@register_method
class DeepLabV3Plus(SmpSegmenter):
    name = "deeplabv3plus"
    description = "DeepLabv3+ (smp, ResNet-50), generic baseline: variants deeplabv3plus-global and deeplabv3plus-local"
    published = {"Local inference: DeepLabv3+": {"variant": "local"},
                 "Global inference: DeepLabv3+": {"variant": "global"},
                 "DeepLabv3+": {"variant": "global"},  # Inria's "Generic" row: the whole tile, downsampled
                 "DeepLabv3+ [local]": {"variant": "local"}, "DeepLabv3+ [global]": {"variant": "global"}}
    size_divisor = 16  # output stride 16
    param_counts = (ParamCount("smp 0.6.0 DeepLabV3Plus('resnet50', classes=7)", total=26_679_127,
                               config={"inference": "global"}),
                    ParamCount("smp 0.6.0 DeepLabV3Plus('resnet18', classes=7)", total=12_330_839,
                               config={"inference": "global", "encoder": "resnet18"}))

    def __init__(self, num_classes: int, encoder: str = "resnet50", pretrained: bool = False, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.network = smp.DeepLabV3Plus(encoder, encoder_weights="imagenet" if pretrained else None,
                                         classes=num_classes)
