"""U-Net (Ronneberger et al., MICCAI 2015) as the UHR papers' generic "UNet" rows, in global and local inference.

Provenance: the DeepGlobe rows (ISDNet Table 1, UHRNet Table II) are copied from GLNet (CVPR 2019), which names
"U-Net" without a configuration, backbone or code. Ours is segmentation_models_pytorch 0.6.0 `Unet` (the kept library
for generic networks): a ResNet-34 encoder (timm/torchvision layout, ImageNet weights with `pretrained: true`), the
decoder channels (256, 128, 64, 32, 16) with BatchNorm and nearest upsampling, logits at full input resolution.
Parameters with 7 classes: 24,437,239 (counted from smp, the reference implementation; tests/test_contract.py).
`load_official` reads an smp checkpoint (`model.state_dict()` of `smp.Unet`, optionally under "state_dict").
"""
from __future__ import annotations

import segmentation_models_pytorch as smp

from methods.base import ParamCount, register_method
from methods.blocks.smp_network import SmpSegmenter


@register_method
class UNet(SmpSegmenter):
    name = "unet"
    description = "U-Net (smp, ResNet-34 encoder), generic baseline: variants unet-global and unet-local"
    published = {"Local inference: UNet": {"variant": "local"}, "Global inference: UNet": {"variant": "global"},
                 "UNet [local]": {"variant": "local"}, "UNet [global]": {"variant": "global"}}
    param_counts = (ParamCount("smp 0.6.0 Unet('resnet34', classes=7)", total=24_437_239,
                               config={"inference": "global"}),)

    def __init__(self, num_classes: int, encoder: str = "resnet34", pretrained: bool = False, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.network = smp.Unet(encoder, encoder_weights="imagenet" if pretrained else None, classes=num_classes)
