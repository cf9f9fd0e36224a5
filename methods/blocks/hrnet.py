"""HRNetV2 (Wang et al., TPAMI 2020) with the OCR head (Yuan et al., ECCV 2020) in the module layout of
HRNet-Semantic-Segmentation's `seg_hrnet_ocr`, as MagNet's Cityscapes backbone builds it (docs/specs/magnet.md §2.2:
VinAIResearch/MagNet @ 7f5b876, `magnet/model/hrnet_ocr/`; studied, not copied). State-dict names follow that layout
(`conv1`, `bn1`, `conv2`, `bn2`, `layer1`, `transition1-3`, `stage2-4.<module>.{branches,fuse_layers}`, `conv3x3_ocr`,
`ocr_distri_head.{object_context_block,conv_bn_dropout}`, `cls_head`, `aux_head`) so released files load by name.

timm's `hrnet_w18_small_v2` has the same stage names but a stride-2 stem and nearest-neighbour fusion upsampling,
and no OCR head: its forward is not this network, only its ImageNet weights fit (by name, `pretrained`).

Facts: the stem's two 3x3 convs have stride 1 (MagNet's `full_os`; the OCR gather needs the branch-0 maps at the input
size); every bilinear resize uses align_corners=True; BN momentum 0.01 in the stem, blocks, transitions and fusions,
PyTorch's 0.1 in the OCR and aux heads; `forward` returns (out + 0.4 aux) / 1.4, `forward(x, with_aux=True)` the pair.

`HRNet` is the backbone alone, shared with SegFix (docs/specs/segfix.md §3: openseg.pytorch @ aefc755
`lib/models/backbones/hrnet/hrnet_backbone.py:292-545`, `HighResolutionNet`): the same layout with the stem stride, BN
momentum, layer1 depth and stage configuration as arguments. openseg's HRNet-W48 (`HRNET_W48`) has a stride-2 stem
(output stride 4), 4 layer1 bottlenecks and BN momentum 0.1; its fusions and the returned branch list are as here.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.01
AUX_WEIGHT = 0.4  # the inference mix (out + 0.4 aux) / 1.4 and the training loss weight of the aux output

# (modules, blocks per branch, channels per branch) of stages 2-4; stage 1 is `layer1`: 2 bottlenecks of width 64
W18_SMALL_V2 = ((1, 2, (18, 36)), (3, 2, (18, 36, 72)), (2, 2, (18, 36, 72, 144)))
# openseg `hrnet_config.py` HRNET_48 / HRNET_18 (layer1: 4 bottlenecks), docs/specs/segfix.md §3
W48 = ((1, 4, (48, 96)), (4, 4, (48, 96, 192)), (3, 4, (48, 96, 192, 384)))
W18 = ((1, 4, (18, 36)), (4, 4, (18, 36, 72)), (3, 4, (18, 36, 72, 144)))
OCR_MID, OCR_KEY, OCR_DROPOUT = 512, 256, 0.05


def _up(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, relu: bool = True,
             momentum: float = BN_MOMENTUM) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout, momentum=momentum)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, channels: int, momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, momentum=momentum)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4, stride 1, BN momentum 0.01; a 1x1 conv + BN shortcut when the width changes):
    HRNet's layer1 and MagNet's refiner (upstream base.py)."""

    def __init__(self, cin: int, planes: int, momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=momentum)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=momentum)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None if cin == planes * 4 else _conv_bn(cin, planes * 4, 1, relu=False, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class HRModule(nn.Module):
    """One multi-resolution module: `branches` (BasicBlocks per resolution), then `fuse_layers[i][j]` bringing branch j
    to branch i (j > i: 1x1 conv + BN, then bilinear upsampling; j < i: i - j strided 3x3 conv + BN, ReLU between;
    j == i: None), summed and ReLU'd. Every output resolution is kept."""

    def __init__(self, channels: Sequence[int], blocks: int, momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(nn.Sequential(*(BasicBlock(c, momentum) for _ in range(blocks)))
                                      for c in channels)
        fuse = []
        for i in range(n):
            row: list[nn.Module | None] = []
            for j in range(n):
                if j > i:
                    row.append(_conv_bn(channels[j], channels[i], 1, relu=False, momentum=momentum))
                elif j == i:
                    row.append(None)
                else:
                    row.append(nn.Sequential(*(_conv_bn(channels[j], channels[i] if k == i - j - 1 else channels[j], 3,
                                                        2, relu=k < i - j - 1, momentum=momentum)
                                               for k in range(i - j))))
            fuse.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[0] if i == 0 else row[0](xs[0])
            for j in range(1, len(xs)):
                if j == i:
                    y = y + xs[j]
                elif j > i:
                    y = y + _up(row[j](xs[j]), xs[i].shape[-2:])
                else:
                    y = y + row[j](xs[j])
            out.append(self.relu(y))
        return out


def _bn_relu(channels: int) -> nn.Sequential:
    """The OCR head's BN + ReLU pair (one submodule, PyTorch's BN momentum)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


class ObjectAttention(nn.Module):
    """OCR's object-context block: pixel queries against class-centre keys (two 1x1 conv-BN-ReLU each), values from
    the centres (one), softmax over classes of q.k / sqrt(key), context projected back to the input width."""

    def __init__(self, channels: int, key: int) -> None:
        super().__init__()
        self.key = key
        self.f_pixel = nn.Sequential(nn.Conv2d(channels, key, 1, bias=False), _bn_relu(key),
                                     nn.Conv2d(key, key, 1, bias=False), _bn_relu(key))
        self.f_object = nn.Sequential(nn.Conv2d(channels, key, 1, bias=False), _bn_relu(key),
                                      nn.Conv2d(key, key, 1, bias=False), _bn_relu(key))
        self.f_down = nn.Sequential(nn.Conv2d(channels, key, 1, bias=False), _bn_relu(key))
        self.f_up = nn.Sequential(nn.Conv2d(key, channels, 1, bias=False), _bn_relu(channels))

    def forward(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        query = self.f_pixel(x).view(b, self.key, -1).permute(0, 2, 1)
        key = self.f_object(centres).view(b, self.key, -1)
        value = self.f_down(centres).view(b, self.key, -1).permute(0, 2, 1)
        attention = F.softmax((self.key ** -0.5) * torch.matmul(query, key), dim=-1)
        context = torch.matmul(attention, value).permute(0, 2, 1).contiguous().view(b, self.key, h, w)
        return self.f_up(context)


class SpatialOCR(nn.Module):
    def __init__(self, channels: int, key: int, dropout: float) -> None:
        super().__init__()
        self.object_context_block = ObjectAttention(channels, key)
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), _bn_relu(channels),
                                             nn.Dropout2d(dropout))

    def forward(self, feats: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return self.conv_bn_dropout(torch.cat([self.object_context_block(feats, centres), feats], 1))


def class_centres(feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """OCR's spatial gather: per class, the feature average weighted by the softmax of its logits over all positions;
    (B, channels, classes, 1)."""
    b, c = logits.shape[:2]
    probs = F.softmax(logits.view(b, c, -1), dim=2)
    return torch.matmul(probs, feats.view(b, feats.shape[1], -1).permute(0, 2, 1)).permute(0, 2, 1).unsqueeze(3)


class HRNet(nn.Module):
    """The HRNet backbone: stem (two 3x3 convs + BN + ReLU at `stem_stride` each), `layer1` (bottlenecks to width
    256), then per stage a transition (a 3x3 conv + BN + ReLU where a kept branch changes width; a chain of strided
    ones from the coarsest branch for a new branch) and its HRModules. `branches(x)` returns the last stage's maps,
    finest first; `features(x)` those maps resized to branch 0 and concatenated (width `sum(stages[-1][2])`)."""

    def __init__(self, stages=W18_SMALL_V2, stem_width: int = 64, layer1_blocks: int = 2, stem_stride: int = 1,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(stem_width, stem_width, 3, stem_stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_width, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(*(Bottleneck(stem_width if i == 0 else 4 * 64, 64, bn_momentum)
                                      for i in range(layer1_blocks)))
        previous = [4 * 64]
        for s, (modules, blocks, channels) in enumerate(stages, start=2):
            transition: list[nn.Module | None] = []
            for i, c in enumerate(channels):
                if i < len(previous):  # same resolution: a 3x3 conv where the width changes
                    transition.append(_conv_bn(previous[i], c, 3, momentum=bn_momentum) if previous[i] != c else None)
                else:  # a new, coarser branch from the coarsest one
                    steps = i + 1 - len(previous)
                    transition.append(nn.Sequential(*(_conv_bn(previous[-1], c if k == steps - 1 else previous[-1],
                                                               3, 2, momentum=bn_momentum) for k in range(steps))))
            setattr(self, f"transition{s - 1}", nn.ModuleList(transition))
            setattr(self, f"stage{s}", nn.Sequential(*(HRModule(channels, blocks, bn_momentum)
                                                       for _ in range(modules))))
            previous = list(channels)
        self.num_stages = len(stages)
        self.out_channels = sum(previous)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        xs = [self.layer1(x)]
        for s in range(2, self.num_stages + 2):
            # a kept branch reads its own map, a new one the coarsest
            inputs = [xs[min(i, len(xs) - 1)] for i in range(len(getattr(self, f"transition{s - 1}")))]
            xs = [x if t is None else t(x) for t, x in zip(getattr(self, f"transition{s - 1}"), inputs, strict=True)]
            xs = getattr(self, f"stage{s}")(xs)
        return xs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The branches upsampled to branch 0 and concatenated: (B, 270, H, W) for W18-small at a stride-1 stem."""
        xs = self.branches(x)
        size = xs[0].shape[-2:]
        return torch.cat([xs[0], *(_up(x, size) for x in xs[1:])], 1)


class HRNetOCR(HRNet):
    """HRNetV2-W18-Small-v2 (default `stages`) with a stride-1 stem and the OCR head; logits at the input size."""

    def __init__(self, num_classes: int, stages=W18_SMALL_V2, stem_width: int = 64, layer1_blocks: int = 2) -> None:
        super().__init__(stages, stem_width, layer1_blocks, stem_stride=1, bn_momentum=BN_MOMENTUM)
        width = self.out_channels
        self.conv3x3_ocr = nn.Sequential(nn.Conv2d(width, OCR_MID, 3, padding=1), nn.BatchNorm2d(OCR_MID),
                                         nn.ReLU(inplace=True))
        self.ocr_distri_head = SpatialOCR(OCR_MID, OCR_KEY, OCR_DROPOUT)
        self.cls_head = nn.Conv2d(OCR_MID, num_classes, 1)
        self.aux_head = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                      nn.Conv2d(width, num_classes, 1))
        self.init_weights()

    def init_weights(self) -> None:
        """The HRNet-Seg trainer's init: convs N(0, 0.001) and BN 1/0 outside the cls/aux/OCR heads (their
        PyTorch defaults stay)."""
        for name, m in self.named_modules():
            if any(part in name for part in ("cls", "aux", "ocr")):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        size = x.shape[-2:]
        feats = self.features(x)
        aux = _up(self.aux_head(feats), size)
        feats = self.conv3x3_ocr(feats)
        out = _up(self.cls_head(self.ocr_distri_head(feats, class_centres(feats, aux))), size)
        if with_aux:
            return out, aux
        return (out + AUX_WEIGHT * aux) / (1.0 + AUX_WEIGHT)

    def parameter_counts(self) -> dict[str, int]:
        """Parts as docs/specs/magnet.md §3.1 lists them."""
        def count(*modules: nn.Module) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        heads = (self.conv3x3_ocr, self.ocr_distri_head, self.aux_head, self.cls_head)
        return {"hrnet": count(self) - count(*heads), "conv3x3_ocr": count(self.conv3x3_ocr),
                "ocr_distri_head": count(self.ocr_distri_head), "aux_head": count(self.aux_head),
                "cls_head": count(self.cls_head)}


def load_imagenet(net: HRNet, pretrained: bool | str, timm_name: str = "hrnet_w18_small_v2") -> list[str]:
    """ImageNet initialisation merged by name (as the HRNet-Seg trainer does): `pretrained` a state-dict file in the
    HRNet-Image-Classification / timm layout (`model.` stripped, `last_layer` -> `aux_head`), or True for timm's
    `timm_name` weights (downloaded by timm). Tensors whose name and shape match are copied; returns their
    names. Raises ValueError when nothing matches."""
    if pretrained is True:
        import timm

        state = timm.create_model(timm_name, pretrained=True).state_dict()
        source = f"timm {timm_name}"
    else:
        if not os.path.isfile(str(pretrained)):
            raise ValueError(f"ImageNet HRNet file {pretrained} does not exist")
        state = torch.load(str(pretrained), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        source = str(pretrained)
    own = net.state_dict()
    state = {k.replace("last_layer", "aux_head").replace("model.", ""): v for k, v in state.items()}
    matched = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matched:
        raise ValueError(f"no tensor of {source} matches the HRNet-OCR layout")
    net.load_state_dict(matched, strict=False)
    return sorted(matched)
