"""SegNet (Badrinarayanan, Kendall, Cipolla, TPAMI 2017) as the UHR papers' generic "SegNet" rows, in global and
local inference.

Provenance: the authors' release, `alexgkendall/SegNet-Tutorial` `Models/segnet_train.prototxt` (commit bb68b64,
run by `alexgkendall/caffe-segnet`): an encoder of the 13 VGG-16 3x3 convolutions (with bias), each followed by BN
(scale and shift) and ReLU, five 2x2 / 2 max-pools (caffe's, rounding up) whose argmax indices go to the mirrored
decoder; the decoder unpools with those indices (`Upsample` to the pre-pool size) and runs 12 conv (with bias) + BN +
ReLU layers, 512-512-512 | 512-512-256 | 256-256-128 | 128-64 | 64, then the classifier `conv1_1_D`, a 3x3
convolution to the classes without BN. Init as the prototxt: MSRA (kaiming-normal, fan_in) convolutions with zero
bias, BN scale 1 and shift 0.001.

Ours: the encoder is torchvision's VGG-16-BN (`features.*` keys), so `pretrained: true` starts from torchvision's
ImageNet VGG-16-BN (the release starts from caffe's VGG-16 without BN, its BN layers fresh); ImageNet mean/std input
normalisation; the benchmark's cross-entropy (the release weights CamVid classes by median frequency). The decoder
keeps the prototxt's layer names (`decoder.<i>.conv5_3_D`, `...conv5_3_D_bn`) and the classifier is `conv1_1_D`.
Parameters with 7 classes: 29,447,047, counted from the release's segnet_train.prototxt with 11 -> 7 classes
(Convolution weights + biases, BN scale + shift; tests/golden/count_segnet.py).
`load_official`: there is no official PyTorch SegNet; it reads a PyTorch state dict in our layout, whose encoder keys
are torchvision's VGG-16-BN ones (where public encoder weights come from), optionally under "state_dict" / "model".
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import LoadReport, ParamCount, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.generic import GenericSegmenter
from methods.blocks.vgg import load_vgg16_features, torchvision_vgg16_state, vgg16_features, vgg16_stages

# decoder stages after upsample5 .. upsample2/1: (caffe layer name, in, out) of each conv + BN + ReLU
DECODER = (
    (("conv5_3_D", 512, 512), ("conv5_2_D", 512, 512), ("conv5_1_D", 512, 512)),
    (("conv4_3_D", 512, 512), ("conv4_2_D", 512, 512), ("conv4_1_D", 512, 256)),
    (("conv3_3_D", 256, 256), ("conv3_2_D", 256, 256), ("conv3_1_D", 256, 128)),
    (("conv2_2_D", 128, 128), ("conv2_1_D", 128, 64)),
    (("conv1_2_D", 64, 64),),
)


def _decoder_stage(layers) -> nn.Sequential:
    modules = OrderedDict()
    for name, cin, cout in layers:
        modules[name] = nn.Conv2d(cin, cout, 3, padding=1)
        modules[f"{name}_bn"] = nn.BatchNorm2d(cout)
        modules[f"relu{name[4:]}"] = nn.ReLU(inplace=True)
    return nn.Sequential(modules)


@register_method
class SegNet(GenericSegmenter):
    name = "segnet"
    description = "SegNet (VGG16-BN, official segnet_train), generic baseline: variants segnet-global and segnet-local"
    published = {"SegNet [local]": {"variant": "local"}, "SegNet [global]": {"variant": "global"}}
    param_counts = (ParamCount("SegNet-Tutorial Models/segnet_train.prototxt with 7 classes", total=29_447_047,
                               config={"inference": "global"}),)

    def __init__(self, num_classes: int, pretrained: bool | str = False, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.features = vgg16_features(batch_norm=True)
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                layer.ceil_mode = True  # caffe pooling rounds up; unpooling restores the pre-pool size
                layer.return_indices = True  # pool<i>_mask
        self.decoder = nn.ModuleList(_decoder_stage(stage) for stage in DECODER)
        self.conv1_1_D = nn.Conv2d(64, num_classes, 3, padding=1)
        self._init_weights()
        if pretrained:
            source = pretrained if isinstance(pretrained, str) else "torchvision vgg16_bn IMAGENET1K_V1"
            load_vgg16_features(self.features, torchvision_vgg16_state(pretrained, batch_norm=True), source)

    def _init_weights(self) -> None:
        for m in self.modules():  # the prototxt's fillers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")  # msra
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 0.001)

    def network_outputs(self, x):
        masks = []
        for stage in vgg16_stages(self.features):
            for layer in stage[:-1]:
                x = layer(x)
            size = x.shape[-2:]
            x, indices = stage[-1](x)
            masks.append((indices, size))
        for stage, (indices, size) in zip(self.decoder, reversed(masks), strict=True):
            x = stage(F.max_unpool2d(x, indices, 2, 2, output_size=size))
        return [self.conv1_1_D(x)]

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """A state dict in our layout (encoder `features.*` as torchvision vgg16_bn), optionally wrapped."""
        return self.load_mapped_state(read_state_dict(path), path, strict)

    def save_official(self, path: str) -> None:
        torch.save(self.state_dict(), path)
