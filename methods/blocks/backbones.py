"""Backbones from timm, with one place that handles pretrained weights.

`pretrained` is False (random init), True (timm's published ImageNet weights, fetched by timm) or a
path to a local weights file in timm's layout (what you use on a machine without network).
"""
from __future__ import annotations

import os

import timm
from torch import nn

from methods.base import MethodError


def timm_features(
    name: str,
    *,
    pretrained: bool | str = False,
    output_stride: int = 32,
    out_indices: tuple[int, ...] | None = None,
    **kwargs,
) -> nn.Module:
    """A timm `features_only` trunk returning a list of feature maps.

    Channels and reductions are in `model.feature_info.channels()` / `.reduction()`.
    """
    if name.split(".")[0] not in timm.list_models():  # "resnet50.tv_in1k": a model with a pretrained tag
        raise MethodError(f"unknown timm backbone '{name}'; see timm.list_models()")
    options = dict(features_only=True, output_stride=output_stride, **kwargs)
    if out_indices is not None:
        options["out_indices"] = out_indices
    if isinstance(pretrained, str) and pretrained:
        if not os.path.isfile(pretrained):
            raise MethodError(
                f"pretrained weights file '{pretrained}' does not exist; give a timm-layout "
                f"{name} checkpoint path, true (download through timm) or false (random init)"
            )
        options["pretrained_cfg_overlay"] = dict(file=os.path.abspath(pretrained))
        pretrained = True
    try:
        return timm.create_model(name, pretrained=bool(pretrained), **options)
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise MethodError(
                f"could not load ImageNet weights for '{name}' ({exc.__class__.__name__}: {exc}); "
                "without network, download them elsewhere and set `pretrained: <path>` in params.yaml"
            ) from exc
        raise


# --- ResNet-V1c (mmseg / mmcv layout) and checkpoint reading -------------------------------------------------------

# `open-mmlab://resnet{18,50,101}_v1c` in mmcv's model zoo (the ImageNet weights mmseg's R*-D8 configs start from)
RESNET_V1C_URLS = {
    18: "https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth",
    50: "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    101: "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}
# mmcv V1c deep stem `stem.{0..8}` (conv, BN, ReLU x3) -> timm `conv1.{0..6}` + `bn1`
_V1C_STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
             "stem.6.": "conv1.6.", "stem.7.": "bn1."}


def read_state_dict(path: str) -> dict:
    """Tensors of a checkpoint file: unwraps `state_dict` / `model` and a DataParallel `module.` prefix.

    Loads with `weights_only=True` (no arbitrary unpickling)."""
    import torch

    if not os.path.isfile(path):
        raise MethodError(f"checkpoint file '{path}' does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure gets the same advice
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise MethodError(f"cannot read checkpoint '{path}' as plain tensors ({exc.__class__.__name__}: {first}); "
                          "re-save just its state_dict with torch.save") from exc
    for key in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not raw:
        raise MethodError(f"checkpoint '{path}' holds no state dict")
    if all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    return dict(raw)


def mmcv_resnet_to_timm(state_dict: dict) -> dict:
    """mmcv/mmseg ResNetV1c keys (`stem.*`, `layerN.*`) -> timm ResNet keys (`conv1.*`, `bn1.*`, `layerN.*`);
    timm-layout keys pass through. The ImageNet `fc.*` is dropped."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        for old, new in _V1C_STEM.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def undilate_basic_block_conv2(model: nn.Module) -> None:
    """mmseg's BasicBlock dilates only conv1; timm's dilates conv2 too. Reset every BasicBlock conv2 to a plain 3x3
    (dilation 1, padding 1) so a dilated timm ResNet-18/34 matches mmseg ResNetV1c-D8 (spec isdnet.md §2.2)."""
    from timm.models.resnet import BasicBlock

    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.conv2.dilation = (1, 1)
            block.conv2.padding = (1, 1)


def resnet_v1c(depth: int = 18, *, pretrained: bool | str = False, output_stride: int = 8,
               deep_stem: bool = True) -> nn.Module:
    """mmseg ResNetV1c as a timm ResNet without classifier: deep stem (3x3 s2 3->32, 32->32, 32->64), 1x1-conv
    downsample (no avg-down), dilated to `output_stride` with contracted first-block dilation, dilation on conv1 only.

    `pretrained`: False (timm init: kaiming fan_out, zero-init last BN, as mmseg), True (mmcv's
    `open-mmlab://resnet{depth}_v1c`, downloaded through torch.hub) or a path (mmcv V1c or timm layout).
    `deep_stem=False` gives the torchvision 7x7-stem ResNet (spec isdnet.md §9.3 substitute when V1c weights are
    unavailable); then True means timm's `resnet{depth}.tv_in1k` (the torchvision ImageNet weights).
    Stage outputs: `model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)`.
    """
    import torch

    if depth not in RESNET_V1C_URLS and deep_stem:
        raise MethodError(f"resnet_v1c: depth must be one of {sorted(RESNET_V1C_URLS)}, got {depth}")
    options = dict(num_classes=0, global_pool="", output_stride=output_stride)
    if deep_stem:
        model = timm.create_model(f"resnet{depth}d", avg_down=False, pretrained=False, **options)
    else:
        try:
            model = timm.create_model(f"resnet{depth}.tv_in1k", pretrained=pretrained is True, **options)
        except (OSError, RuntimeError) as exc:
            raise MethodError(f"could not load torchvision ResNet-{depth} weights through timm ({exc}); "
                              "set `pretrained: <path>` to a local file") from exc
        if pretrained is True:
            pretrained = False  # loaded by timm
    undilate_basic_block_conv2(model)
    if pretrained is True and deep_stem:
        try:
            state = torch.hub.load_state_dict_from_url(RESNET_V1C_URLS[depth], map_location="cpu", check_hash=True,
                                                       weights_only=True)
        except Exception as exc:  # noqa: BLE001 - network / hash failures all get the same advice
            raise MethodError(
                f"could not download ResNet-{depth}-V1c ImageNet weights ({exc.__class__.__name__}: {exc}); "
                f"fetch {RESNET_V1C_URLS[depth]} elsewhere and set `pretrained: <path>`") from exc
        state = state.get("state_dict", state)
    elif isinstance(pretrained, str) and pretrained:
        state = read_state_dict(pretrained)
    else:
        return model
    state = mmcv_resnet_to_timm(state)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise MethodError(f"ResNet-{depth} weights do not match the {'V1c' if deep_stem else 'torchvision'} layout: "
                          f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    model.load_state_dict(state, strict=True)
    return model
