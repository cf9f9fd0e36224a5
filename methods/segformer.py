"""SegFormer-B0 (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
NeurIPS 2021) as the UHR papers' generic "Segformer-b0" row, in global and local inference.

Provenance: mmsegmentation 0.30 config `segformer/segformer_mit-b0_8x1_1024x1024_160k_cityscapes.py`, read from the
config and the paper, not copied:
- `backbone`: the MiT-b0 encoder of segmentation_models_pytorch 0.6.0 (`mit_b0`: embed dims 32/64/160/256, 2 blocks
  per stage, heads 1/2/5/8, spatial reduction 8/4/2/1, overlapping patch embeddings 7x7 s4 then 3x3 s2, Mix-FFN
  ratio 4, stochastic depth 0.1), the NVlabs layout (`patch_embed{i}`, `block{i}`, `norm{i}`). mmseg's
  MixVisionTransformer computes the same functions (nn.MultiheadAttention over q and the reduced k/v, 1x1 convs for
  the FFN's linear layers) with every LayerNorm at eps 1e-6, where the NVlabs/smp patch-embedding and reduction
  norms use 1e-5: we set 1e-6 as mmseg.
- `decode_head`: mmseg's SegformerHead, the "all-MLP" decoder with 256 channels: per stage a 1x1 ConvModule (conv,
  BN, ReLU) to 256 ch, bilinear resize to the 1/4 map, concatenation in stage order 1/4 -> 1/32, a 1x1 ConvModule
  1024 -> 256 (`fusion_conv`), Dropout2d 0.1, 1x1 `conv_seg`; logits at 1/4, upsampled bilinearly
  (align_corners=False) by the GenericSegmenter base. No auxiliary head.
- init as mmseg without a pretrained file: Linear trunc-normal(0.02), LayerNorm 1/0, convs N(0, sqrt(2 / fan_out))
  (the FFN's fc1/fc2, 1x1 convs upstream, included), q and kv as the slices of nn.MultiheadAttention's in-projection
  (xavier-uniform over the (3C, C) matrix, zero bias); head ConvModules kaiming fan_out, `conv_seg` ~ N(0, 0.01).
  `pretrained: true` loads smp's ImageNet MiT-b0 (the NVlabs weights mmseg's `mit_b0_20220624` converts, as the
  config's init_cfg); a path loads a MiT-b0 file in the NVlabs/smp or the mmseg layout.

Why not `smp.Segformer`: its decoder is the NVlabs MLP head (per-stage Linear with bias, no BN/ReLU; concatenation
from 1/32 down; no dropout; upsampling x4 with align_corners=True); 3,715,943 parameters (-0.03%) but not mmseg's
architecture, so the head here is ours on smp's encoder.

Parameters with 7 classes: 3,716,967, exactly mmseg 0.30's count for the config with num_classes=7 and BN
(tests/golden/count_segformer.py counts it and checks the logits). `load_official` reads an mmseg checkpoint
(`{"state_dict": ...}` with `backbone.layers.*` and `decode_head.*`).
"""
from __future__ import annotations

import math
import re

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import LoadReport, MethodError, ParamCount, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.generic import ISD_VARIANT, SCALE_VARIANTS, GenericSegmenter
from methods.blocks.mmseg import conv_bn, init_conv_modules, init_conv_seg, mmseg_cross_entropy

# ---------------------------------------------------------------------------------------------------------------
# MiT encoder: mmseg conventions on smp's module


def init_mit_mmseg(encoder: nn.Module) -> None:
    """mmseg `MixVisionTransformer.init_weights` without a checkpoint, on the smp/NVlabs layout. smp's own init is
    already mmseg's for Linear (trunc-normal 0.02, zero bias), LayerNorm (1, 0) and convs (N(0, sqrt(2 / fan_out)),
    zero bias); what differs is redone: the FFN's fc1/fc2 (1x1 convs upstream) and q/kv (slices of
    nn.MultiheadAttention's in-projection, xavier-uniform over the (3C, C) matrix)."""
    for name, m in encoder.named_modules():
        if name.endswith("mlp"):  # fan_out = out channels
            for fc in (m.fc1, m.fc2):
                nn.init.normal_(fc.weight, 0.0, math.sqrt(2.0 / fc.out_features))
        elif name.endswith("attn"):
            bound = math.sqrt(6.0 / (4 * m.q.in_features))
            for proj in (m.q, m.kv):
                nn.init.uniform_(proj.weight, -bound, bound)


# mmseg TransformerEncoderLayer names -> smp Block names (after `layers.{i}.1.{j}.`)
_BLOCK_RENAMES = (("attn.attn.out_proj.", "attn.proj."), ("ffn.layers.0.", "mlp.fc1."),
                  ("ffn.layers.1.", "mlp.dwconv.dwconv."), ("ffn.layers.4.", "mlp.fc2."))
_MMSEG_KEY = re.compile(r"^layers\.(\d+)\.([012])\.(.*)$")
_SMP_KEY = re.compile(r"^(patch_embed|block|norm)(\d+)\.(.*)$")


def mit_from_mmseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmseg MixVisionTransformer keys -> smp/NVlabs keys: in_proj split into q and kv, 1x1-conv FFN weights
    flattened to Linear. Keys outside the layout are kept as they are (a strict load then names them)."""
    out = {}
    for key, value in state.items():
        match = _MMSEG_KEY.match(key)
        if not match:
            out[key] = value
            continue
        stage, part, rest = int(match.group(1)) + 1, match.group(2), match.group(3)
        if part == "0":
            out[f"patch_embed{stage}.{rest.replace('projection.', 'proj.', 1)}"] = value
        elif part == "2":
            out[f"norm{stage}.{rest}"] = value
        else:
            block, rest = rest.split(".", 1)
            prefix = f"block{stage}.{block}."
            if rest.startswith("attn.attn.in_proj_"):
                leaf = rest[len("attn.attn.in_proj_"):]
                dim = value.shape[0] // 3
                out[f"{prefix}attn.q.{leaf}"], out[f"{prefix}attn.kv.{leaf}"] = value[:dim], value[dim:]
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    if new.startswith("mlp.fc") and value.dim() == 4:
                        value = value.flatten(1)
                    break
            out[prefix + rest] = value
    return out


def mit_to_mmseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`mit_from_mmseg` backwards."""
    out = {}
    for key, value in state.items():
        kind, stage, rest = _SMP_KEY.match(key).groups()
        layer = f"layers.{int(stage) - 1}."
        if kind == "patch_embed":
            out[layer + "0." + rest.replace("proj.", "projection.", 1)] = value
        elif kind == "norm":
            out[layer + "2." + rest] = value
        else:
            block, rest = rest.split(".", 1)
            prefix = f"{layer}1.{block}."
            if rest.startswith("attn.kv."):
                continue  # written with q
            if rest.startswith("attn.q."):
                leaf = rest[len("attn.q."):]
                out[f"{prefix}attn.attn.in_proj_{leaf}"] = torch.cat([value, state[key.replace(".q.", ".kv.")]])
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    if new.startswith("mlp.fc") and value.dim() == 2:
                        value = value[:, :, None, None]
                    break
            out[prefix + rest] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# head


class SegformerHead(nn.Module):
    """mmseg SegformerHead: per-stage 1x1 ConvBNReLU to `channels`, resized to the first stage, concatenated,
    fused by a 1x1 ConvBNReLU, Dropout2d, 1x1 classifier."""

    def __init__(self, in_channels: tuple[int, ...], channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv_bn(c, channels, 1) for c in in_channels)
        self.fusion_conv = conv_bn(channels * len(in_channels), channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The fused 1/4 map before dropout and classifier (what the ISD framework fuses)."""
        size = features[0].shape[-2:]
        outs = [F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False)
                for conv, x in zip(self.convs, features, strict=True)]
        return self.fusion_conv(torch.cat(outs, dim=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.features(features)))


# ---------------------------------------------------------------------------------------------------------------
# the method


@register_method
class Segformer(GenericSegmenter):
    name = "segformer"
    description = ("Segformer-b0 (mmseg 0.30 config), generic baseline: variants segformer-global, -local, -half, "
                   "-quarter (1/2, 1/4 scale) and -isd (deep branch of ISDNet's framework, reconstructed)")
    variants = (*GenericSegmenter.variants, *SCALE_VARIANTS, ISD_VARIANT)
    published = {"Segformer-b0": {"variant": "global"}, "Segformer-b0 (1/2 scale)": {"variant": "half"},
                 "Segformer-b0 (1/4 scale)": {"variant": "quarter"}, "Segformer-b0 + ISD": {"variant": "isd"}}
    # "+ ISD": the 256-channel fused map goes to the ISD head, projected to its 128 channels by the first RAF's
    # context ChannelAtt and by the SR decoder's first conv (reconstructed, `methods/blocks/generic.py`)
    isd_channels = 256
    loss = staticmethod(mmseg_cross_entropy)  # mmseg 0.30 CrossEntropyLoss: mean over all pixels
    param_counts = (ParamCount("mmseg 0.30 segformer_mit-b0_8x1_1024x1024_160k_cityscapes (num_classes=7, BN)",
                               total=3_716_967, config={"inference": "global"}),
                   # "+ ISD" (reconstructed): ISDNet's head (3,796,508 in the official code) with its two 3x3
                   # projections from Segformer's 256 channels where ISDNet's deep features have 128
                   ParamCount("segformer_mit-b0 (mmseg 0.30) + ISDNet's ISDHead (official code @7341335) widened",
                              total=3_716_967 + 3_796_508 + 128 * 128 * 9 + 128 * 64 * 9,
                              config={"inference": "isd", "downsample": 4}))

    def __init__(self, num_classes: int, pretrained: bool | str = False, channels: int = 256, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.isd_channels = channels
        self.backbone = smp.encoders.get_encoder("mit_b0", in_channels=3, depth=5,
                                                 weights="imagenet" if pretrained is True else None)
        for m in self.backbone.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-6  # mmseg's norm_cfg for every MiT norm
        self.decode_head = SegformerHead(tuple(self.backbone.out_channels[2:]), channels, num_classes)
        if not pretrained:
            init_mit_mmseg(self.backbone)
        elif pretrained is not True:
            self._load_encoder(str(pretrained))
        init_conv_modules(self.decode_head)
        init_conv_seg(self.decode_head.conv_seg)
        self.build_isd_head()

    def _load_encoder(self, path: str) -> None:
        """A MiT-b0 ImageNet file: NVlabs/smp keys (`patch_embed1.*`, classifier `head.*` dropped) or mmseg keys
        (`layers.*`, e.g. mit_b0_20220624-7e0fe6dd.pth)."""
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("head.")}
        state = mit_from_mmseg({k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()})
        own = self.backbone.state_dict()
        bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
        if bad:
            raise MethodError(f"segformer: {path} is not a MiT-b0 checkpoint: {len(bad)} keys missing, unexpected or "
                              f"mis-shaped ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})")
        nn.Module.load_state_dict(self.backbone, state)

    def network_features(self, x):
        # smp's first two entries: the input and an empty 1/2 map
        features = self.decode_head.features(self.backbone(x)[2:])
        return features, [self.decode_head.conv_seg(self.decode_head.dropout(features))]

    def network_outputs(self, x):
        return self.network_features(x)[1]

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """An mmseg SegFormer checkpoint (`backbone.layers.*`, `decode_head.*`)."""
        state = read_state_dict(path)
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        state.update({f"backbone.{k}": v for k, v in mit_from_mmseg(backbone).items()})
        return self.load_mapped_state(state, path, strict)

    def save_official(self, path: str) -> None:
        own = self.state_dict()
        backbone = mit_to_mmseg({k[len("backbone."):]: v for k, v in own.items() if k.startswith("backbone.")})
        state = {f"backbone.{k}": v for k, v in backbone.items()}
        state.update({k: v for k, v in own.items() if not k.startswith("backbone.")})
        torch.save({"state_dict": state}, path)
