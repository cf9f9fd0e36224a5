"""STDC (STDCNet813 / "STDC1", Fan et al., CVPR 2021) as composable pieces, with the official key layout.

Used by ISDNet and RUE as a shallow full-resolution branch: the stem (two stride-2 ConvX) and stages 3-4 (two
CatBottlenecks each) give 256 ch at 1/8 and 512 ch at 1/16 (spec isdnet.md §2.4, rue.md §3.3).

Parameter names follow the official STDC-Seg `STDCNet813` (`features.N.conv_list.K.{conv,bn}`,
`features.N.avd_layer.{0,1}`), so the ImageNet file `STDCNet813M_73.91.tar` loads by name. The official model also
registers the same blocks a second time as `x2/x4/x8/x16/x32` (every tensor appears twice in its state dict); we do
not register those aliases, and `load_stdc_pretrained` folds them onto `features.*`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from methods.base import MethodError
from methods.blocks.backbones import read_state_dict

# keys of the ImageNet classifier, unused by a features-only trunk (upstream drops them with strict=False)
_CLASSIFIER_PREFIXES = ("conv_last.", "fc.", "bn.", "linear.")
_ALIAS = re.compile(r"^x(?:2|4|8|16|32)\.0\.(\d+)\.(.*)$")


class ConvX(nn.Module):
    """Conv (no bias, 'same' padding k//2) + BN + ReLU. Upstream hard-codes SyncBatchNorm here (spec §9.1 #5); plain
    BN is used and converted to SyncBN only under CUDA DDP."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class CatBottleneck(nn.Module):
    """STDC module: `block_num` convs applied in sequence, channel widths out/2, out/4, ..., out/2^(n-1) (the last
    repeated), outputs concatenated (no residual). With stride 2 a depthwise 3x3 s2 conv + BN (`avd_layer`, no ReLU)
    follows the first conv, and the first concatenated branch is AvgPool(3, 2, 1) of the first conv's output."""

    def __init__(self, in_channels: int, out_channels: int, block_num: int = 4, stride: int = 1) -> None:
        super().__init__()
        if block_num < 2:
            raise MethodError(f"CatBottleneck needs block_num >= 2, got {block_num}")
        if stride not in (1, 2):
            raise MethodError(f"CatBottleneck stride must be 1 or 2, got {stride}")
        self.stride = stride
        half = out_channels // 2
        if stride == 2:
            self.avd_layer = nn.Sequential(
                nn.Conv2d(half, half, 3, stride=2, padding=1, groups=half, bias=False),
                nn.BatchNorm2d(half),
            )
            self.skip = nn.AvgPool2d(3, stride=2, padding=1)
        widths = [half] + [out_channels // 2 ** (i + 1) for i in range(1, block_num - 1)]
        widths.append(widths[-1])  # the last conv keeps the width of the one before it
        convs = [ConvX(in_channels, half, kernel_size=1)]
        convs += [ConvX(widths[i - 1], widths[i]) for i in range(1, block_num)]
        self.conv_list = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.conv_list[0](x)
        out = self.avd_layer(first) if self.stride == 2 else first
        outs = []
        for conv in self.conv_list[1:]:
            out = conv(out)
            outs.append(out)
        if self.stride == 2:
            first = self.skip(first)
        return torch.cat([first, *outs], dim=1)


def stdc_features(in_channels: int = 3, base: int = 64, layers: Sequence[int] = (2, 2, 2),
                  block_num: int = 4) -> nn.Sequential:
    """The official `features` Sequential: ConvX s2 (in -> base/2), ConvX s2 (-> base), then per stage one stride-2
    CatBottleneck followed by `layers[i] - 1` stride-1 ones; stage i outputs base * 2^(i+2) channels."""
    blocks: list[nn.Module] = [ConvX(in_channels, base // 2, 3, 2), ConvX(base // 2, base, 3, 2)]
    channels = base
    for i, depth in enumerate(layers):
        out = base * 2 ** (i + 2)
        for j in range(depth):
            blocks.append(CatBottleneck(channels if j == 0 else out, out, block_num, 2 if j == 0 else 1))
        channels = out
    return nn.Sequential(*blocks)


class STDCNet(nn.Module):
    """STDC trunk returning the feature maps at the requested strides (each the output of the last block at that
    stride). STDC1 = `layers=(2, 2, 2)` (strides up to 32); ISDNet and RUE use `layers=(2, 2)` and strides (8, 16)."""

    def __init__(self, in_channels: int = 3, base: int = 64, layers: Sequence[int] = (2, 2, 2), block_num: int = 4,
                 out_strides: Sequence[int] = (8, 16)) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.features = stdc_features(in_channels, base, layers, block_num)
        # block index ending each stride: the two stem convs, then one entry per stage
        ends = {2: 0, 4: 1}
        index = 1
        for i, depth in enumerate(layers):
            index += depth
            ends[2 ** (i + 3)] = index
        unknown = [s for s in out_strides if s not in ends]
        if unknown:
            raise MethodError(f"STDCNet: out_strides {unknown} not available; choose from {sorted(ends)}")
        self.out_strides = tuple(out_strides)
        self.out_indices = tuple(ends[s] for s in out_strides)
        self.channels = tuple(_block_out_channels(self.features[i]) for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        last = max(self.out_indices)
        for i, block in enumerate(self.features[:last + 1]):
            x = block(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


def _block_out_channels(block: nn.Module) -> int:
    if isinstance(block, ConvX):
        return block.conv.out_channels
    return sum(conv.conv.out_channels for conv in block.conv_list)


def stdc_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official STDCNet813 keys -> `features.*` keys: folds the `x2/x4/x8/x16/x32.0.N.*` aliases onto
    `features.N.*` (checking that duplicated tensors agree) and drops the ImageNet classifier."""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in raw.items():
        alias = _ALIAS.match(key)
        if alias:
            key = f"features.{alias.group(1)}.{alias.group(2)}"
        elif key.startswith(_CLASSIFIER_PREFIXES):
            continue
        elif not key.startswith("features."):
            unexpected.append(key)
            continue
        if key in out and not torch.equal(out[key], value):
            raise MethodError(f"STDC checkpoint: '{key}' and its x2/x4/... alias hold different tensors")
        out[key] = value
    if unexpected:
        raise MethodError(f"STDC checkpoint has keys outside the STDCNet813 layout: {', '.join(unexpected[:10])}"
                          f"{' ...' if len(unexpected) > 10 else ''}; is it an STDCNet813M ImageNet file?")
    return out


def widen_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB first-conv weights for an input of `in_channels` = 3k channels: the 3-channel kernel concatenated k times,
    without rescaling (upstream ShallowNet.init_weight concatenates it twice for the 6-channel Laplacian input,
    spec §2.4)."""
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3 or in_channels % 3:
        raise MethodError(f"cannot widen a {weight.shape[1]}-channel first conv to {in_channels} channels "
                          "(only 3 -> 3k by concatenation)")
    return torch.cat([weight] * (in_channels // 3), dim=1)


def load_stdc_pretrained(net: STDCNet, path: str) -> list[str]:
    """Load the ImageNet STDC1 file (`STDCNet813M_73.91.tar`: `{'state_dict': ...}`, optionally `module.`-prefixed,
    with x2/x4/... aliases) into `net`, widening the first conv to `net.in_channels`.

    Every tensor of `net` must be provided (MethodError otherwise). Returns the checkpoint blocks that the truncated
    trunk does not use (e.g. `features.6`, `features.7` for stages 3-4 only)."""
    state = stdc_state_dict(read_state_dict(path))
    first = "features.0.conv.weight"
    if first in state:
        state[first] = widen_first_conv(state[first], net.in_channels)
    own = net.state_dict()
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise MethodError(f"STDC checkpoint {path} lacks {len(missing)} tensor(s) of the trunk: "
                          f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if state[k].shape != v.shape]
    if mismatched:
        raise MethodError(f"STDC checkpoint {path}: shape mismatch: {'; '.join(mismatched[:5])}")
    unused = sorted({".".join(k.split(".")[:2]) for k in state if k not in own})
    net.load_state_dict({k: state[k] for k in own}, strict=True)
    return unused


def init_stdc(net: nn.Module) -> None:
    """Upstream `init_params` (no pretrained file): kaiming-normal fan_out convs, BN 1/0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
