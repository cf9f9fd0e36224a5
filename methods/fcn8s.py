"""FCN-8s (Long, Shelhamer, Darrell, CVPR 2015 / TPAMI 2017) as the UHR papers' generic "FCN-8s" rows, in global and
local inference.

Provenance: the authors' release `shelhamer/fcn.berkeleyvision.org`, `voc-fcn8s/net.py` (train.prototxt at commit
1305c73): the VGG-16 trunk with conv1_1 padded by 100 and ceil-mode max-pooling (caffe's), fc6/fc7 as 7x7 and 1x1
convolutions of 4096 channels each followed by ReLU and element-wise dropout 0.5, `score_fr` on fc7, `score_pool4`
and `score_pool3` 1x1 skips (unscaled: the 0.01 / 0.0001 `Scale` layers belong to the `voc-fcn8s-atonce` variant,
not to voc-fcn8s), the three deconvolutions `upscore2` (4x4 /2), `upscore_pool4` (4x4 /2) and `upscore8` (16x16 /8)
without bias, fixed (lr_mult 0) at the bilinear kernel on the channel diagonal (`surgery.interp`), and the crops at
offsets 5, 9 and 31 that the release's coord_map computed. The skip scores use caffe's default filler (zeros).

Ours: torchvision's VGG-16 (`features.*` keys) is the trunk, so `pretrained: true` starts from torchvision's ImageNet
weights (its classifier fc6/fc7 reshaped into the convolutions, as `surgery.transplant` does with caffe's VGG) and
the input is normalised with the ImageNet mean/std (not caffe's BGR mean subtraction). Training is one stage from
ImageNet (the release trains 32s -> 16s -> 8s) with the benchmark's mean cross-entropy; the upsampling kernels stay
fixed (left out of `phase_parameters`). `fc_channels` (default 4096, the release's) narrows fc6/fc7 for quick smoke
runs and tests only.
Parameters with 7 classes: 134,308,725, counted from the release's train.prototxt with 21 -> 7 classes (convolution
and deconvolution blobs) and equal to wkentaro/pytorch-fcn's `torchfcn.models.FCN8s(n_class=7)`
(tests/golden/count_fcn8s.py, which also runs torchfcn's FCN8s on our seeded weights: logits identical, max abs
difference 0; fixture tests/golden/fcn8s.npz).
`load_official` reads torchfcn's state-dict layout (`conv1_1.*` .. `conv5_3.*`, `fc6`, `fc7`, `score_*`, `upscore*`;
the layout of its caffe-converted `fcn8s_from_caffe.pth`), the practical public PyTorch one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import LoadReport, MethodError, ParamCount, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.generic import GenericSegmenter
from methods.blocks.vgg import load_vgg16_features, torchvision_vgg16_state, vgg16_features, vgg16_stages

# torchfcn / caffe names of the 13 trunk convolutions, in `features` order
CONV_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
              "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
UPSAMPLING = ("upscore2", "upscore_pool4", "upscore8")  # fixed bilinear deconvolutions (caffe lr_mult 0)


def bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """`surgery.interp`: the bilinear filter for upsampling by size // 2 on the channel diagonal (class i -> i)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    weight = torch.zeros(channels, channels, size, size, dtype=torch.float64)
    weight[range(channels), range(channels)] = torch.outer(ramp, ramp)
    return weight.float()


def _crop(x: torch.Tensor, offset: int, size) -> torch.Tensor:
    """caffe `Crop` (axis 2): the window of `size` starting `offset` pixels into both spatial axes."""
    return x[..., offset:offset + size[0], offset:offset + size[1]]


@register_method
class FCN8s(GenericSegmenter):
    name = "fcn8s"
    description = "FCN-8s (VGG16, official voc-fcn8s), generic baseline: variants fcn8s-global and fcn8s-local"
    published = {"Local inference: FCN-8s": {"variant": "local"}, "Global inference: FCN-8s": {"variant": "global"},
                 "FCN-8s": {"variant": "global"},  # Inria's "Generic" row: the whole tile, downsampled
                 "FCN-8s [local]": {"variant": "local"}, "FCN-8s [global]": {"variant": "global"}}
    param_counts = (ParamCount("fcn.berkeleyvision.org voc-fcn8s train.prototxt with 7 classes "
                               "(= torchfcn 1.9.7 FCN8s(n_class=7))", total=134_308_725,
                               config={"inference": "global"}),)

    def __init__(self, num_classes: int, pretrained: bool | str = False, dropout: float = 0.5,
                 fc_channels: int = 4096, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        if fc_channels != 4096 and pretrained:
            raise MethodError(f"{self.name}: ImageNet fc6/fc7 have 4096 channels; pretrained needs fc_channels 4096, "
                              f"got {fc_channels}")
        self.features = vgg16_features(batch_norm=False)
        self.features[0].padding = (100, 100)  # conv1_1 pad 100: any input size survives fc6's 7x7 at stride 32
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                layer.ceil_mode = True  # caffe pooling rounds up; the crop offsets assume it
        # fc6 / fc7 (4096 in the release; `fc_channels` narrows them only for quick smoke runs and tests)
        self.fc6 = nn.Conv2d(512, fc_channels, 7)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.drop = nn.Dropout(dropout)  # caffe Dropout: element-wise (torchfcn's Dropout2d drops channels)
        self.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.score_pool3 = nn.Conv2d(256, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
        self._init_weights()
        if pretrained:
            self._load_imagenet(pretrained)

    def _init_weights(self) -> None:
        with torch.no_grad():
            for fc in (self.fc6, self.fc7):  # torchvision's init of the classifier they come from
                nn.init.normal_(fc.weight, 0.0, 0.01)
                nn.init.zeros_(fc.bias)
            for score in (self.score_fr, self.score_pool4, self.score_pool3):  # caffe's default filler: zeros
                nn.init.zeros_(score.weight)
                nn.init.zeros_(score.bias)
            for name in UPSAMPLING:
                up = getattr(self, name)
                up.weight.copy_(bilinear_kernel(self.num_classes, up.kernel_size[0]))
                up.weight.requires_grad_(False)

    def _load_imagenet(self, pretrained: bool | str) -> None:
        """torchvision VGG-16 ImageNet weights: the trunk, and fc6/fc7 from classifier.0/.3 reshaped to convs."""
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

    def phase_parameters(self, phase):
        # the bilinear upsampling stays fixed (caffe lr_mult 0): the trainer trains what this yields
        fixed = {id(getattr(self, name).weight) for name in UPSAMPLING}
        return (p for p in super().phase_parameters(phase) if id(p) not in fixed)

    def network_outputs(self, x):
        stages = vgg16_stages(self.features)
        pool3 = stages[2](stages[1](stages[0](x)))  # 1/8
        pool4 = stages[3](pool3)  # 1/16
        pool5 = stages[4](pool4)  # 1/32
        h = self.drop(F.relu(self.fc6(pool5), inplace=True))
        h = self.drop(F.relu(self.fc7(h), inplace=True))
        upscore2 = self.upscore2(self.score_fr(h))  # 1/16
        fuse_pool4 = upscore2 + _crop(self.score_pool4(pool4), 5, upscore2.shape[-2:])
        upscore_pool4 = self.upscore_pool4(fuse_pool4)  # 1/8
        fuse_pool3 = upscore_pool4 + _crop(self.score_pool3(pool3), 9, upscore_pool4.shape[-2:])
        return [_crop(self.upscore8(fuse_pool3), 31, x.shape[-2:])]  # full input resolution

    # --- torchfcn layout --------------------------------------------------------------------------------------

    def _official_names(self) -> dict[str, str]:
        """our key -> torchfcn key"""
        convs = [i for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]
        names = {}
        for key in self.state_dict():
            if key.startswith("features."):
                index, leaf = key[len("features."):].split(".", 1)
                names[key] = f"{CONV_NAMES[convs.index(int(index))]}.{leaf}"
            else:
                names[key] = key
        return names

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """A torchfcn `FCN8s` state dict (plain, or torchfcn's trainer checkpoint under "model_state_dict")."""
        state = read_state_dict(path)
        if isinstance(state.get("model_state_dict"), dict):
            state = state["model_state_dict"]
        ours = {theirs: mine for mine, theirs in self._official_names().items()}
        # a key torchfcn does not have (ours `features.*` included) stays unplaced, reported under its own name
        return self.load_mapped_state({ours.get(k, f"{k} (not torchfcn)"): v for k, v in state.items()}, path, strict)

    def save_official(self, path: str) -> None:
        names = self._official_names()
        torch.save({names[k]: v for k, v in self.state_dict().items()}, path)
