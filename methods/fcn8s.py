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
from torch import nn

from methods.base import LoadReport, ParamCount, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.fcn8 import FCN8Layers
from methods.blocks.generic import GenericSegmenter

# torchfcn / caffe names of the 13 trunk convolutions, in `features` order
CONV_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
              "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")


@register_method
class FCN8s(FCN8Layers, GenericSegmenter):
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
        self.build_fcn8(num_classes, fc_channels, dropout, pretrained, self.name)
        self.init_fcn8(zero_scores=True)  # caffe's default filler for the score layers: zeros
        if pretrained:
            self.load_imagenet_fcn8(pretrained)

    def phase_parameters(self, phase):
        # the bilinear upsampling stays fixed (caffe lr_mult 0): the trainer trains what this yields
        fixed = self.fixed_parameters()
        return (p for p in super().phase_parameters(phase) if id(p) not in fixed)

    def network_outputs(self, x):
        return [self.fcn8_decode(*self.fcn8_trunk(x), x.shape[-2:])]

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
