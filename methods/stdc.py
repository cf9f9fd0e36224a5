"""STDC-Seg (Fan et al., "Rethinking BiSeNet For Real-time Semantic Segmentation", CVPR 2021), STDC1 ("STDC-Seg50"
trunk), as the UHR papers' generic "STDC" rows, in global and local inference.

Provenance: mmsegmentation 0.30 config `stdc/stdc1_512x1024_80k_cityscapes.py` (no ImageNet pretraining), read from
the config and the paper, not copied:
- `backbone` = `STDCContextPathNet`: the STDC1 trunk (`methods/blocks/stdc.py` STDCNet, 'cat' STDC modules, 4 convs
  each, stages 256/512/1024 ch at 1/8, 1/16, 1/32); the context path: global-average-pooled 1/32 features through a
  1x1 ConvBNReLU (`conv_avg`, 1024 -> 128), an Attention Refinement Module on 1/32 and 1/16 (`arms`, 3x3 ConvBNReLU
  to 128 ch times a sigmoid gate from GAP -> 1x1 conv -> BN) each added to the nearest-upsampled path and refined by
  a 3x3 ConvBNReLU (`convs`) after nearest upsampling; the Feature Fusion Module (`ffm`: cat[1/8 trunk (256),
  path (128)] -> 1x1 ConvBNReLU 384 -> 256, x * g + x with g = sigmoid(1x1 conv (no BN) 256 -> 64, ReLU, 1x1 64 ->
  256) of the GAP).
- `decode_head` = FCNHead on the FFM output (256 -> 256, one 3x3 ConvBNReLU, Dropout2d 0.1, 1x1 classifier); its
  logits are upsampled bilinearly with align_corners=True (the head's setting) to the network input.
- training only (`auxiliary_head`, loss weight 1 each): FCNHeads (128 -> 64) on the 1/8 (`auxiliary_head.0`) and
  1/16 (`auxiliary_head.1`) context-path outputs, and the STDCHead detail head (`auxiliary_head.2`, FCNHead 256 -> 64
  -> 2 on the 1/8 trunk features) trained by the Detail Aggregation loss: binary boundary targets from the labels
  (3x3 Laplacian at strides 1, 2, 4, clamped at 0, nearest-upsampled, each thresholded at 0.1, fused 0.6/0.3/0.1 and
  thresholded at 0.1, as mmseg `STDCHead.losses`, ignore pixels included as label value 255), logits resized with
  align_corners=True, sigmoid BCE on the one-hot 2-channel target (mean over every element) + Dice (softmax,
  smooth 1, exponent 2, per image and class, averaged).
- init as mmcv/mmseg: every conv kaiming-normal fan_out (ConvModule), BN 1/0, the decode head's `conv_seg` ~
  N(0, 0.01); the auxiliary heads' `conv_seg` keep PyTorch's default (mmseg never initialises a list of heads).

Ours: under global inference the detail targets come from the labels nearest-downsampled to the network input (the
head learns boundaries at the scale it sees, as in mmseg where image and labels share a resolution); the
segmentation terms are mmseg's cross-entropy without the config's OHEM pixel sampler (thresh 0.7 /
min_kept 10000); the BNs on pooled 1x1 maps (`conv_avg`, ARM gates) fall back to running statistics
for a one-sample batch, where plain BN raises (identical otherwise); STDCHead's two constant kernels
(`laplacian_kernel`, and `fusion_kernel`, a frozen nn.Parameter upstream) are not registered: `load_official`
skips them and `save_official` writes them. `pretrained` may name the STDC-Seg ImageNet file STDCNet813M_73.91.tar
(mmseg's `stdc1_in1k-pre` variant); the default follows the config (random init).

Parameters with 7 classes: 8,568,375 (mmseg 0.30 builds 8,568,378 from the config with num_classes=7 and BN: the
same tensors plus the 3 constant fusion weights); tests/golden/count_stdc.py counts it and checks the logits.
`load_official` reads an mmseg checkpoint (`{"state_dict": ...}`, `backbone.backbone.stages.*`, `decode_head.*`,
`auxiliary_head.{0,1,2}.*`).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import LoadReport, MethodError, ParamCount, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.generic import GenericSegmenter
from methods.blocks.heads import FCNHead, SampleSafeBatchNorm2d
from methods.blocks.losses import nearest_labels
from methods.blocks.mmseg import conv_bn, init_conv_seg, map_official_keys, mmseg_cross_entropy, official_keys
from methods.blocks.stdc import STDCNet, init_stdc, load_stdc_pretrained

# ---------------------------------------------------------------------------------------------------------------
# context path


def pooled_conv(in_channels: int, out_channels: int, norm: bool, act: bool) -> nn.Sequential:
    """mmcv ConvModule 1x1 (no bias) for a pooled (B, C, 1, 1) map, keys `conv`/`bn` as upstream; its BN uses the
    running statistics when a batch holds one value per channel."""
    layers = OrderedDict(conv=nn.Conv2d(in_channels, out_channels, 1, bias=False))
    if norm:
        layers["bn"] = SampleSafeBatchNorm2d(out_channels)
    if act:
        layers["act"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


class AttentionRefinementModule(nn.Module):
    """ARM: 3x3 ConvBNReLU, times a channel gate sigmoid(BN(1x1 conv(GAP)))."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_layer = conv_bn(in_channels, out_channels, 3)
        self.atten_conv_layer = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                              pooled_conv(out_channels, out_channels, norm=True, act=False),
                                              nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_layer(x)
        return x * self.atten_conv_layer(x)


class FeatureFusionModule(nn.Module):
    """STDC's FFM: 1x1 ConvBNReLU of cat[spatial, context], then x + x * sigmoid(SE-style gate, no BN)."""

    def __init__(self, in_channels: int, out_channels: int, scale_factor: int = 4) -> None:
        super().__init__()
        self.conv0 = conv_bn(in_channels, out_channels, 1)
        mid = out_channels // scale_factor
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                       pooled_conv(out_channels, mid, norm=False, act=True),
                                       pooled_conv(mid, out_channels, norm=False, act=False),
                                       nn.Sigmoid())

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.conv0(torch.cat([spatial, context], dim=1))
        return x * self.attention(x) + x


class STDCContextPathNet(nn.Module):
    """STDC1 trunk + context path. Returns (1/8 trunk features for the detail head, path at 1/16, path at 1/8,
    FFM output at 1/8), mmseg's output order."""

    def __init__(self, channels: int = 128, ffm_channels: int = 256) -> None:
        super().__init__()
        self.backbone = STDCNet(layers=(2, 2, 2), out_strides=(8, 16, 32))
        c8, c16, c32 = self.backbone.channels  # 256, 512, 1024
        self.arms = nn.ModuleList([AttentionRefinementModule(c32, channels), AttentionRefinementModule(c16, channels)])
        self.convs = nn.ModuleList([conv_bn(channels, channels, 3), conv_bn(channels, channels, 3)])
        self.conv_avg = pooled_conv(c32, channels, norm=True, act=True)
        self.ffm = FeatureFusionModule(c8 + channels, ffm_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.backbone(x)  # 1/8, 1/16, 1/32
        up = self.conv_avg(F.adaptive_avg_pool2d(outs[-1], 1)).expand(-1, -1, *outs[-1].shape[-2:])
        path = []
        for i, (arm, conv) in enumerate(zip(self.arms, self.convs, strict=True)):
            summed = arm(outs[-1 - i]) + up
            up = conv(F.interpolate(summed, size=outs[-2 - i].shape[-2:], mode="nearest"))
            path.append(up)
        return outs[0], path[0], path[1], self.ffm(outs[0], path[1])


# ---------------------------------------------------------------------------------------------------------------
# Detail Aggregation loss (mmseg STDCHead.losses)

_LAPLACIAN = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))
_FUSION = (0.6, 0.3, 0.1)  # the paper's "learnable" 1x1 fusion; a constant upstream (it follows a threshold)


def boundary_targets(labels: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(B, H, W) class labels -> (B, H, W) binary boundary map: Laplacian responses at strides 1, 2 and 4 (clamped
    at 0, nearest-upsampled, thresholded), fused 0.6/0.3/0.1 and thresholded again."""
    x = labels[:, None].float()
    kernel = x.new_tensor(_LAPLACIAN).view(1, 1, 3, 3)
    levels = []
    for stride in (1, 2, 4):
        edges = F.conv2d(x, kernel, stride=stride, padding=1).clamp(min=0)
        if stride > 1:
            edges = F.interpolate(edges, size=x.shape[-2:], mode="nearest")
        levels.append((edges > threshold).float())
    fused = F.conv2d(torch.cat(levels, dim=1), x.new_tensor(_FUSION).view(1, 3, 1, 1))
    return (fused > threshold).long()[:, 0]


def detail_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) of 2-channel detail logits against binary targets, as mmseg's CrossEntropyLoss(use_sigmoid=True)
    and DiceLoss on STDCHead: logits resized with align_corners=True; BCE with logits on the one-hot target, mean over
    all elements; Dice per image and channel on the softmax, 1 - (2 sum(p t) + 1) / (sum(p^2 + t^2) + 1), mean."""
    logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=True)
    onehot = F.one_hot(targets, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, onehot)
    prob = logits.softmax(dim=1)
    num = 2 * (prob * onehot).flatten(2).sum(-1) + 1
    den = (prob.pow(2) + onehot.pow(2)).flatten(2).sum(-1) + 1
    return bce, (1 - num / den).mean()


# ---------------------------------------------------------------------------------------------------------------
# official (mmseg) checkpoint layout


def _official_renames() -> tuple[tuple[str, str], ...]:
    """mmseg prefixes -> ours: `stages.{s}.{j}` -> `features.{n}` (layers -> conv_list, downsample.{conv,bn} ->
    avd_layer.{0,1}), conv_seg -> classifier."""
    old, new = "backbone.backbone.stages.", "backbone.backbone.features."
    renames = [(f"{old}0.", f"{new}0."), (f"{old}1.", f"{new}1.")]
    index = 2
    for stage in (2, 3, 4):
        for j in range(2):
            src, dst = f"{old}{stage}.{j}.", f"{new}{index}."
            renames += [(f"{src}layers.", f"{dst}conv_list."), (f"{src}downsample.conv.", f"{dst}avd_layer.0."),
                        (f"{src}downsample.bn.", f"{dst}avd_layer.1.")]
            index += 1
    for head in ("decode_head", "auxiliary_head.0", "auxiliary_head.1", "auxiliary_head.2"):
        renames.append((f"{head}.conv_seg.", f"{head}.classifier."))
    return tuple(renames)


_OFFICIAL_RENAMES = _official_renames()
_CONSTANTS = ("auxiliary_head.2.laplacian_kernel", "auxiliary_head.2.fusion_kernel")  # STDCHead's fixed kernels


# ---------------------------------------------------------------------------------------------------------------
# the method


@register_method
class STDC(GenericSegmenter):
    name = "stdc"
    description = "STDC-Seg (STDC1, mmseg 0.30 config), generic baseline: variants stdc-global and stdc-local"
    published = {"Global inference: STDC": {"variant": "global"}, "STDC": {"variant": "global"}}
    aux_weights = (1.0, 1.0)  # FCN auxiliary heads on the 1/8 and 1/16 context path
    loss = staticmethod(mmseg_cross_entropy)  # mmseg 0.30 CrossEntropyLoss (no OHEM: module docstring)
    detail_weights = (1.0, 1.0)  # STDCHead's BCE and Dice terms
    param_counts = (ParamCount("mmseg 0.30 stdc1_512x1024_80k_cityscapes (num_classes=7, BN): 8,568,378 incl. 3 "
                               "constant STDCHead fusion weights; ours without them", total=8_568_375,
                               config={"inference": "global"}),)

    def __init__(self, num_classes: int, pretrained: bool | str = False, boundary_threshold: float = 0.1,
                 **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        if pretrained is True:
            raise MethodError("stdc: pretrained must be false or the path to STDCNet813M_73.91.tar (the STDC-Seg "
                              "ImageNet STDC1 file has no download URL)")
        self.boundary_threshold = boundary_threshold
        self.backbone = STDCContextPathNet()
        self.decode_head = FCNHead(256, 256, num_classes, num_convs=1)
        self.auxiliary_head = nn.ModuleList([FCNHead(128, 64, num_classes, num_convs=1),
                                             FCNHead(128, 64, num_classes, num_convs=1),
                                             FCNHead(256, 64, 2, num_convs=1)])  # STDCHead: boundary / not
        init_stdc(self)  # mmcv ConvModule init of every conv, BN 1/0
        init_conv_seg(self.decode_head.classifier)
        # mmseg 0.30 keeps a list of auxiliary heads in a plain nn.ModuleList, which `init_weights` does not enter:
        # their conv_seg keep PyTorch's default init
        for head in self.auxiliary_head:
            head.classifier.reset_parameters()
        if pretrained:
            load_stdc_pretrained(self.backbone.backbone, str(pretrained))

    def _forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """([main logits at the input size, *aux logits (training)], detail logits (training) or None)."""
        detail, path16, path8, fused = self.backbone(x)
        main = F.interpolate(self.decode_head(fused), size=x.shape[-2:], mode="bilinear", align_corners=True)
        if not self.training:
            return [main], None
        aux = [self.auxiliary_head[0](path8), self.auxiliary_head[1](path16)]
        return [main, *aux], self.auxiliary_head[2](detail)

    def network_outputs(self, x):
        return self._forward(x)[0]

    def forward_train(self, images, labels):
        x = self._view(images)
        outputs, detail = self._forward(x)
        terms = self.segmentation_terms(outputs, labels)
        # boundaries at the resolution the network sees (== the labels' under local inference)
        targets = boundary_targets(nearest_labels(labels, x.shape[-2:]), self.boundary_threshold)
        bce, dice = detail_losses(detail, targets)
        terms["loss_detail_bce"] = self.detail_weights[0] * bce
        terms["loss_detail_dice"] = self.detail_weights[1] * dice
        return terms

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """An mmseg STDC1 checkpoint (`{"state_dict": ...}`); STDCHead's constant kernels are skipped."""
        state, skipped = map_official_keys(read_state_dict(path), _OFFICIAL_RENAMES, unused=_CONSTANTS)
        report = self.load_mapped_state(state, path, strict)
        report.skipped = skipped
        return report

    def save_official(self, path: str) -> None:
        state = official_keys(self.state_dict(), _OFFICIAL_RENAMES)
        state[_CONSTANTS[0]] = torch.tensor(_LAPLACIAN).view(1, 1, 3, 3)
        state[_CONSTANTS[1]] = torch.tensor(_FUSION).view(1, 3, 1, 1)
        torch.save({"state_dict": state}, path)
