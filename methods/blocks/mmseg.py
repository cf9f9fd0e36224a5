"""mmseg / mmcv conventions shared by the methods re-implemented from mmseg releases (ISDNet, RUE): the ConvModule
equivalent and its init, the `conv_seg` init, the conv_seg head (isdhead `SegmentationHead`), mmseg's
cross-entropy and the official-key mapping helper. "§" refers to `docs/specs/isdnet.md`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from methods.blocks.losses import resize_logits
from methods.blocks.stdc import stdc_state_dict

# ---------------------------------------------------------------------------------------------------------------
# ConvModule and initialisation


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, act: bool = True) -> ConvNormAct:
    """mmcv ConvModule equivalent (`.conv` no bias, `.bn`, optional ReLU, 'same' padding)."""
    return ConvNormAct(in_channels, out_channels, kernel_size, bias=False, apply_act=act)


def _conv_norm_pairs(module: nn.Module):
    """(conv, norm) of every ConvModule-like piece: timm ConvNormAct, or a Sequential with a Conv2d directly
    followed by a BatchNorm2d (the shared ASPP image pool, ISDNet's `pooled_conv_bn`)."""
    for m in module.modules():
        if isinstance(m, ConvNormAct):
            yield m.conv, m.bn
        elif isinstance(m, nn.Sequential):
            children = list(m.children())
            for conv, norm in zip(children, children[1:], strict=False):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    yield conv, norm


def init_conv_modules(module: nn.Module) -> None:
    """mmcv ConvModule init (§2.8): kaiming-normal fan_out/relu conv, zero bias, BN weight 1 / bias 0. Plain
    convs outside ConvModules (e.g. SegmentationHead.conv_out) keep PyTorch's default, as upstream."""
    for conv, norm in _conv_norm_pairs(module):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)


def init_conv_seg(module: nn.Module, std: float = 0.01) -> None:
    """mmseg `init_cfg=Normal(std=0.01, override=conv_seg)` under mmcv's whole-module override (§2.8): every weight
    in the `conv_seg` module (conv and BN gamma alike) ~ N(0, std), every bias 0."""
    for m in module.modules():
        if getattr(m, "weight", None) is not None:
            nn.init.normal_(m.weight, 0.0, std)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------------
# the conv_seg head


class SegmentationHead(nn.Module):
    """ConvBNReLU 3x3 (in -> mid) + 1x1 conv with bias (mid -> classes) (isdhead `SegmentationHead`)."""

    def __init__(self, in_channels: int, mid_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv_bn_relu = conv_bn(in_channels, mid_channels, 3)
        self.conv_out = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv_bn_relu(x))


# ---------------------------------------------------------------------------------------------------------------
# loss (§3)


def mmseg_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """mmseg 0.16 CrossEntropyLoss: logits bilinearly resized to the label size, per-pixel CE with ignored pixels
    set to 0, mean over ALL pixels (ignored ones count in the denominator, §3)."""
    logits = resize_logits(logits, labels.shape[-2:])
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none").mean()


# ---------------------------------------------------------------------------------------------------------------
# official checkpoint layout (§8)


# mmseg key prefixes -> ours, for the pieces several methods share: ResNetV1c's deep stem (timm names it conv1 / bn1),
# ASPPHead (our ImagePool is a plain Sequential, `aspp_modules` is `aspp`) and any head's `conv_seg` classifier
RESNET_V1C_RENAMES = (
    ("backbone.stem.0.", "backbone.conv1.0."), ("backbone.stem.1.", "backbone.conv1.1."),
    ("backbone.stem.3.", "backbone.conv1.3."), ("backbone.stem.4.", "backbone.conv1.4."),
    ("backbone.stem.6.", "backbone.conv1.6."), ("backbone.stem.7.", "backbone.bn1."),
)
ASPP_HEAD_RENAMES = (
    ("decode_head.image_pool.1.conv.", "decode_head.image_pool.1."),
    ("decode_head.image_pool.1.bn.", "decode_head.image_pool.2."),
    ("decode_head.aspp_modules.", "decode_head.aspp."), ("decode_head.conv_seg.", "decode_head.classifier."),
)


def map_official_keys(state: dict[str, torch.Tensor], renames, unused: tuple[str, ...] = ()
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """mmseg release keys -> our keys (prefix `renames`), STDC `x2/x4/x8/x16` aliases folded onto
    `features.*`; keys starting with an `unused` prefix are returned as skipped. Used by ISDNet and RUE."""
    stdc, out, skipped = {}, {}, []
    for key, value in state.items():
        if unused and key.startswith(unused):
            skipped.append(key)
            continue
        if key.startswith("refine_head.stdc_net."):
            stdc[key[len("refine_head.stdc_net."):]] = value
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    if stdc:
        out.update({f"refine_head.stdc_net.{k}": v for k, v in stdc_state_dict(stdc).items()})
    return out, skipped


def official_keys(state: dict[str, torch.Tensor], renames) -> dict[str, torch.Tensor]:
    """Our keys -> mmseg release keys: `map_official_keys` backwards (STDC stays under `features.*`, which the
    release's loader and ours both accept). For writing our weights in the upstream layout."""
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        out[key] = value
    return out
