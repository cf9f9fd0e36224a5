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
import torch
import torch.nn.functional as F

from methods.base import LoadReport, ParamCount, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.generic import GenericSegmenter


@register_method
class UNet(GenericSegmenter):
    name = "unet"
    description = "U-Net (smp, ResNet-34 encoder), generic baseline: variants unet-global and unet-local"
    published = {"Local inference: UNet": {"variant": "local"}, "Global inference: UNet": {"variant": "global"},
                 "UNet [local]": {"variant": "local"}, "UNet [global]": {"variant": "global"}}
    param_counts = (ParamCount("smp 0.6.0 Unet('resnet34', classes=7)", total=24_437_239,
                               config={"inference": "global"}),)

    def __init__(self, num_classes: int, encoder: str = "resnet34", pretrained: bool = False, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.network = smp.Unet(encoder, encoder_weights="imagenet" if pretrained else None, classes=num_classes)

    def network_outputs(self, x):
        # smp's U-Net needs sides divisible by 32: pad (zeros = the mean colour after normalisation), then crop
        h, w = x.shape[-2:]
        ph, pw = -h % 32, -w % 32
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return [self.network(x)[..., :h, :w]]

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """An `smp.Unet` state dict (optionally under "state_dict" / "model")."""
        state = {f"network.{k}": v for k, v in read_state_dict(path).items()}
        return self.load_mapped_state(state, path, strict)

    def save_official(self, path: str) -> None:
        torch.save({k[len("network."):]: v for k, v in self.state_dict().items()}, path)
