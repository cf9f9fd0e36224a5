"""VGG-16 trunks in torchvision's layout (`features.<i>.*` keys), shared by the VGG-based generic networks (FCN-8s,
SegNet), with the one place that loads torchvision's ImageNet weights.

`pretrained` is False (torchvision's init), True (torchvision's ImageNet weights, downloaded through torch.hub) or a
path to a local torchvision `vgg16` / `vgg16_bn` state dict (what you use on a machine without network).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import VGG16_BN_Weights, VGG16_Weights
from torchvision.models import vgg as tv_vgg

from methods.base import MethodError
from methods.blocks.backbones import read_state_dict


def vgg16_features(batch_norm: bool = False, width: float = 1.0) -> nn.Sequential:
    """torchvision's `vgg16(_bn)().features` (13 3x3 convs with bias, optional BN, 5 max-pools), initialised as
    torchvision does (kaiming-normal fan_out conv, zero bias, BN 1/0), without building the 120M-parameter
    classifier. `width` < 1 narrows every convolution (quick smoke runs only; no pretrained weights fit)."""
    cfg = [v if v == "M" else max(1, int(v * width)) for v in tv_vgg.cfgs["D"]]
    features = tv_vgg.make_layers(cfg, batch_norm=batch_norm)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return features


def vgg16_stages(features: nn.Sequential) -> list[nn.Sequential]:
    """The five stages of `features`, each ending with its max-pool (pool1 .. pool5)."""
    stages, start = [], 0
    for i, layer in enumerate(features):
        if isinstance(layer, nn.MaxPool2d):
            stages.append(features[start:i + 1])
            start = i + 1
    return stages


def torchvision_vgg16_state(pretrained: bool | str, batch_norm: bool = False) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet `vgg16` (or `vgg16_bn`) state dict: downloaded (True) or read from a file (a path)."""
    if isinstance(pretrained, str):
        return read_state_dict(pretrained)
    weights = VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - network / hash failures all get the same advice
        raise MethodError(f"could not download torchvision's VGG-16{'-BN' if batch_norm else ''} ImageNet weights "
                          f"({exc.__class__.__name__}: {exc}); fetch {weights.url} elsewhere and set "
                          "`pretrained: <path>`") from exc


def load_vgg16_features(features: nn.Sequential, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the `features.*` tensors of a torchvision VGG-16 state dict into `features`; every tensor must fit."""
    own = features.state_dict()
    found = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    missing = sorted(k for k in own if k not in found)
    bad = sorted(k for k, v in found.items() if k not in own or own[k].shape != v.shape)
    if missing or bad:
        kind = "vgg16_bn" if any(isinstance(m, nn.BatchNorm2d) for m in features) else "vgg16"
        raise MethodError(f"{source} is not a torchvision {kind} state dict: "
                          f"missing features.{missing[:4]}, unexpected or mis-shaped features.{bad[:4]}")
    features.load_state_dict(found, strict=True)
