"""FCN-8s layers, shared by the generic FCN-8s (methods/fcn8s.py) and FCtL's local network (methods/fctl.py): the
VGG-16 trunk with conv1_1 padded by 100 and ceil-mode max-pooling, fc6/fc7 as 7x7 and 1x1 convolutions with ReLU
and element-wise dropout, the three score layers, the fixed bilinear deconvolutions and the crops at offsets 5, 9
and 31 (provenance: methods/fcn8s.py).

`FCN8Layers` is a mixin for an `nn.Module`: its layers are attributes of the module itself, so the state-dict keys
stay flat (`features.*`, `fc6`, `score_fr`, ...), torchfcn's layout apart from the trunk's names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MethodError
from methods.blocks.vgg import load_vgg16_features, torchvision_vgg16_state, vgg16_features, vgg16_stages

UPSAMPLING = ("upscore2", "upscore_pool4", "upscore8")  # fixed bilinear deconvolutions (caffe lr_mult 0)


def bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """`surgery.interp`: the bilinear filter for upsampling by size // 2 on the channel diagonal (class i -> i)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    weight = torch.zeros(channels, channels, size, size, dtype=torch.float64)
    weight[range(channels), range(channels)] = torch.outer(ramp, ramp)
    return weight.float()


def crop(x: torch.Tensor, offset: int, size) -> torch.Tensor:
    """caffe `Crop` (axis 2): the window of `size` starting `offset` pixels into both spatial axes."""
    return x[..., offset:offset + size[0], offset:offset + size[1]]


def fcn_vgg16_trunk(width: float = 1.0) -> nn.Sequential:
    """torchvision's VGG-16 `features` with conv1_1 padded by 100 (any input survives fc6's 7x7 at stride 32) and
    ceil-mode pooling (caffe's rounding, which the crop offsets assume)."""
    features = vgg16_features(batch_norm=False, width=width)
    features[0].padding = (100, 100)
    for layer in features:
        if isinstance(layer, nn.MaxPool2d):
            layer.ceil_mode = True
    return features


class FCN8Layers:
    """Builds the FCN-8s layers on `self` (an nn.Module) and runs them; see the module docstring."""

    num_classes: int

    def build_fcn8(self, num_classes: int, fc_channels: int = 4096, dropout: float = 0.5,
                   pretrained: bool | str = False, name: str = "fcn8", width: float = 1.0) -> None:
        """`fc_channels` (4096 in the releases) and `width` (the trunk's, 1 in the releases) narrow the network only
        for quick smoke runs and tests."""
        if (fc_channels != 4096 or width != 1) and pretrained:
            raise MethodError(f"{name}: ImageNet VGG-16 has fc6/fc7 of 4096 channels and width 1; pretrained needs "
                              f"fc_channels 4096 and width 1, got {fc_channels} and {width}")
        self.features = fcn_vgg16_trunk(width)
        pool3, pool5 = self.features[14].out_channels, self.features[28].out_channels  # conv3_3, conv5_3
        self.fc6 = nn.Conv2d(pool5, fc_channels, 7)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.drop = nn.Dropout(dropout)  # caffe Dropout: element-wise (torchfcn's Dropout2d drops channels)
        self.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
        self.score_pool4 = nn.Conv2d(pool5, num_classes, 1)  # pool4 has pool5's width
        self.score_pool3 = nn.Conv2d(pool3, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)

    def init_fcn8(self, zero_scores: bool) -> None:
        """fc6/fc7 as torchvision initialises the classifier they come from; the score layers zero (caffe's default
        filler) or left at torch's default; the upsampling fixed at the bilinear kernel."""
        with torch.no_grad():
            for fc in (self.fc6, self.fc7):
                nn.init.normal_(fc.weight, 0.0, 0.01)
                nn.init.zeros_(fc.bias)
            if zero_scores:
                for score in (self.score_fr, self.score_pool4, self.score_pool3):
                    nn.init.zeros_(score.weight)
                    nn.init.zeros_(score.bias)
            for name in UPSAMPLING:
                up = getattr(self, name)
                up.weight.copy_(bilinear_kernel(up.out_channels, up.kernel_size[0]))
                up.weight.requires_grad_(False)

    def fixed_parameters(self) -> set[int]:
        """ids of the fixed upsampling kernels, which no phase trains."""
        return {id(getattr(self, name).weight) for name in UPSAMPLING}

    def load_imagenet_fcn8(self, pretrained: bool | str) -> None:
        """torchvision VGG-16 ImageNet weights: the trunk, and fc6/fc7 from classifier.0/.3 reshaped to convs (as
        `surgery.transplant` does with caffe's VGG)."""
        state = torchvision_vgg16_state(pretrained, batch_norm=False)
        source = pretrained if isinstance(pretrained, str) else "torchvision vgg16 IMAGENET1K_V1"
        load_vgg16_features(self.features, state, source)
        with torch.no_grad():
            for fc, key in ((self.fc6, "classifier.0"), (self.fc7, "classifier.3")):
                weight = state.get(f"{key}.weight")
                if weight is None or weight.numel() != fc.weight.numel():
                    raise MethodError(f"{source}: no torchvision vgg16 {key}.weight of {fc.weight.numel()} values")
                fc.weight.copy_(weight.view_as(fc.weight))
                fc.bias.copy_(state[f"{key}.bias"])

    def fcn8_trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pool3 (1/8), pool4 (1/16), pool5 (1/32) of a normalised input."""
        stages = vgg16_stages(self.features)
        pool3 = stages[2](stages[1](stages[0](x)))
        pool4 = stages[3](pool3)
        return pool3, pool4, stages[4](pool4)

    def fcn8_decode(self, pool3: torch.Tensor, pool4: torch.Tensor, pool5: torch.Tensor, size,
                    skip_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """Logits at `size` (the input's). `skip_scales` multiply pool4 and pool3 before their score layers (1, 1 in
        voc-fcn8s; 0.01, 0.0001 in voc-fcn8s-atonce and in FCtL's FCN8)."""
        h = self.drop(F.relu(self.fc6(pool5), inplace=True))
        h = self.drop(F.relu(self.fc7(h), inplace=True))
        upscore2 = self.upscore2(self.score_fr(h))  # 1/16
        score_pool4 = self.score_pool4(pool4 if skip_scales[0] == 1 else skip_scales[0] * pool4)
        upscore_pool4 = self.upscore_pool4(upscore2 + crop(score_pool4, 5, upscore2.shape[-2:]))  # 1/8
        score_pool3 = self.score_pool3(pool3 if skip_scales[1] == 1 else skip_scales[1] * pool3)
        fuse_pool3 = upscore_pool4 + crop(score_pool3, 9, upscore_pool4.shape[-2:])
        return crop(self.upscore8(fuse_pool3), 31, size)  # full input resolution
