"""GLNet's FPN heads (spec glnet.md §3.2-3.3): purely linear feature pyramids (no BN, no ReLU) in a
global and a local variant that exchange feature maps by channel concatenation.

Layer names and channel widths follow the upstream model file so the released checkpoints map onto
these modules key for key (§8). Every list of pyramid maps here runs coarse to fine: [p5, p4, p3, p2]
(and [c5, c4, c3, c2] for the trunk outputs), the upstream order of `ps0`/`ps1`/`ps2`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MethodError
from methods.blocks.backbones import timm_features


def fpn_trunk(backbone: str, pretrained: bool | str, method: str) -> nn.Module:
    """A timm ResNet giving the C2..C5 maps (strides 4/8/16/32) the FPN heads read; torchvision-style keys
    (conv1, bn1, layer1..4) as upstream GLNet's `models/resnet.py` (glnet spec §3.1)."""
    trunk = timm_features(backbone, pretrained=pretrained, out_indices=(1, 2, 3, 4))
    if trunk.feature_info.reduction() != [4, 8, 16, 32]:
        raise MethodError(f"{method}: backbone '{backbone}' must give stride 4/8/16/32 maps (a ResNet)")
    return trunk

LEVELS = 4
WIDTH = 256  # upstream lateral / first smooth width (§3.2); the second smooth has WIDTH // 2


def ps3_channels(width: int = WIDTH) -> int:
    """Channels of ps3, the 4-level concat of the second smooth: 4 x 128 = 512 upstream."""
    return LEVELS * (width // 2)


def resize_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize to `like`'s spatial size (align_corners=False, as upstream on torch >= 0.4.1).
    An equal size is an exact identity for this interpolation, so it is skipped."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def concat_levels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Upsample every level to the finest one and concatenate, coarse first (upstream `_concatenate`)."""
    finest = maps[-1]
    return torch.cat([resize_like(m, finest) for m in maps], dim=1)


@dataclass
class Pyramid:
    """The 16 maps GLNet shares between its branches (§3.4): trunk outputs c and FPN stages ps0-ps2,
    each a list of 4 levels, coarse to fine."""

    c: list[torch.Tensor]
    ps0: list[torch.Tensor]
    ps1: list[torch.Tensor]
    ps2: list[torch.Tensor]

    def maps(self) -> list[torch.Tensor]:
        return [*self.c, *self.ps0, *self.ps1, *self.ps2]

    @classmethod
    def from_maps(cls, maps: Sequence[torch.Tensor]) -> Pyramid:
        maps = list(maps)
        return cls(*(maps[i:i + LEVELS] for i in range(0, 4 * LEVELS, LEVELS)))

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Pyramid:
        return Pyramid.from_maps([fn(m) for m in self.maps()])


@dataclass
class HeadOutput:
    logits: torch.Tensor  # stride 4
    ps3: torch.Tensor  # the 512-ch map the classifier (and the ensemble head) reads
    pyramid: Pyramid


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, padding=k // 2)


def init_head_(head: nn.Module) -> None:
    """N(0, 0.01) weights, zero biases on every direct child conv (§3.7)."""
    for m in head.children():
        nn.init.normal_(m.weight, mean=0.0, std=0.01)
        nn.init.zeros_(m.bias)


def _top_down(laterals: Sequence[nn.Module], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """p_coarsest = lat(x); p = up(p_coarser) + lat(x) going finer (upstream `_upsample_add`)."""
    p = laterals[0](inputs[0])
    out = [p]
    for lateral, x in zip(laterals[1:], inputs[1:], strict=True):
        y = lateral(x)
        p = resize_like(p, y) + y
        out.append(p)
    return out


class _PyramidHead(nn.Module):
    """Shared layer bookkeeping: upstream names `toplayer`, `latlayer{1,2,3}`, `smooth{k}_{1,2}`
    (k = 1..4 for p5..p2), each optionally with a suffix such as `_ext`."""

    def _add_layers(self, trunk_channels: Sequence[int], width: int, fold: int, suffix: str) -> None:
        c2, c3, c4, c5 = trunk_channels
        for name, cin in zip(self._lateral_names(suffix), (c5, c4, c3, c2), strict=True):
            self.add_module(name, _conv(cin * fold, width, 1))
        for k in range(1, LEVELS + 1):
            self.add_module(f"smooth{k}_1{suffix}", _conv(width * fold, width, 3))
        for k in range(1, LEVELS + 1):
            self.add_module(f"smooth{k}_2{suffix}", _conv(width * fold, width // 2, 3))

    @staticmethod
    def _lateral_names(suffix: str) -> list[str]:
        return [f"toplayer{suffix}"] + [f"latlayer{i}{suffix}" for i in (1, 2, 3)]

    def _laterals(self, suffix: str) -> list[nn.Module]:
        return [getattr(self, n) for n in self._lateral_names(suffix)]

    def _smooth(self, stage: int, suffix: str) -> list[nn.Module]:
        return [getattr(self, f"smooth{k}_{stage}{suffix}") for k in range(1, LEVELS + 1)]


class GlobalFPN(_PyramidHead):
    """`fpn_module_global` (§3.2). Base layers run on the global trunk alone (stage 1); with `ext=True`
    the double-width `_ext` layers and `smooth` exist too and run when local canvases are given
    (stage 3). `classify` is shared by both paths. `width` 256 is upstream's; smaller is for CPU runs."""

    def __init__(self, trunk_channels: Sequence[int], num_classes: int, ext: bool = True,
                 width: int = WIDTH) -> None:
        super().__init__()
        ps3 = ps3_channels(width)
        self._add_layers(trunk_channels, width, fold=1, suffix="")
        self.classify = _conv(ps3, num_classes, 3)
        self.ext = ext
        if ext:
            self._add_layers(trunk_channels, width, fold=2, suffix="_ext")
            self.smooth = _conv(2 * ps3, ps3, 3)
        init_head_(self)

    @classmethod
    def path_names(cls, ext: bool) -> list[str]:
        """Child names one path uses: base (stage 1) or ext (stage 3); `classify` is in both."""
        suffix = "_ext" if ext else ""
        names = cls._lateral_names(suffix)
        names += [f"smooth{k}_{s}{suffix}" for s in (1, 2) for k in range(1, LEVELS + 1)]
        return names + (["smooth", "classify"] if ext else ["classify"])

    def forward(self, c: Sequence[torch.Tensor], local: Pyramid | None = None) -> HeadOutput:
        """c: trunk maps coarse to fine; local: the pasted local canvases at the same sizes (stage 3)."""
        if local is None:
            ps0 = _top_down(self._laterals(""), c)
            ps1 = [conv(p) for conv, p in zip(self._smooth(1, ""), ps0, strict=True)]
            ps2 = [conv(p) for conv, p in zip(self._smooth(2, ""), ps1, strict=True)]
            ps3 = concat_levels(ps2)
        else:
            if not self.ext:
                raise RuntimeError("this GlobalFPN has no _ext layers")

            def cat(a, b):  # [global, local] order (§3.2)
                return torch.cat([a, b], dim=1)

            ps0 = _top_down(self._laterals("_ext"), [cat(x, e) for x, e in zip(c, local.c, strict=True)])
            ps1 = [conv(cat(p, e)) for conv, p, e in zip(self._smooth(1, "_ext"), ps0, local.ps0, strict=True)]
            ps2 = [conv(cat(p, e)) for conv, p, e in zip(self._smooth(2, "_ext"), ps1, local.ps1, strict=True)]
            ps3 = self.smooth(concat_levels([cat(p, e) for p, e in zip(ps2, local.ps2, strict=True)]))
        return HeadOutput(self.classify(ps3), ps3, Pyramid(list(c), ps0, ps1, ps2))


class LocalFPN(_PyramidHead):
    """`fpn_module_local` (§3.3): every lateral and smooth input is cat(local, G(global crop)) where G
    bilinearly resizes the already-cropped global map to the local map's size; `smooth` fuses the
    4-level concat (1024 -> 512) into ps3."""

    def __init__(self, trunk_channels: Sequence[int], num_classes: int, width: int = WIDTH) -> None:
        super().__init__()
        ps3 = ps3_channels(width)
        self._add_layers(trunk_channels, width, fold=2, suffix="")
        self.smooth = _conv(2 * ps3, ps3, 3)
        self.classify = _conv(ps3, num_classes, 3)
        init_head_(self)

    def forward(self, c: Sequence[torch.Tensor], crops: Pyramid) -> HeadOutput:
        def cat(x, g):  # [local, global] order (§3.3)
            return torch.cat([x, resize_like(g, x)], dim=1)

        ps0 = _top_down(self._laterals(""), [cat(x, g) for x, g in zip(c, crops.c, strict=True)])
        ps1 = [conv(cat(p, g)) for conv, p, g in zip(self._smooth(1, ""), ps0, crops.ps0, strict=True)]
        ps2 = [conv(cat(p, g)) for conv, p, g in zip(self._smooth(2, ""), ps1, crops.ps1, strict=True)]
        ps3 = self.smooth(concat_levels([cat(p, g) for p, g in zip(ps2, crops.ps2, strict=True)]))
        return HeadOutput(self.classify(ps3), ps3, Pyramid(list(c), ps0, ps1, ps2))


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """BN momentum 0 while activation checkpointing recomputes a forward (e.g. of an `fpn_trunk` on a patch
    batch), so running statistics are updated once per patch batch, as without checkpointing."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(bns, saved, strict=True):
            m.momentum = momentum
