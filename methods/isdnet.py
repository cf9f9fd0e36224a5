"""ISDNet (Guo et al., CVPR 2022): a deep branch on the 4x-downsampled image and a shallow STDC branch on the
full-resolution Laplacian residuals, fused by Relation-Aware Fusion (RAF). Clean-room re-implementation of the
official release `cedricgsh/ISDNet` as specified in `specs/isdnet.md` ("§" below refers to that file).

Module names follow the release (`backbone`, `decode_head`, `auxiliary_head`, `refine_head.{stdc_net, fuse16,
fuse8, conv_seg, sr_decoder}`) so `load_official` is a short list of renames; the two auxiliary heads get their
correct names (upstream `conv_seg_aux_16` runs at 1/8 and `conv_seg_aux_8` at 1/16, §2.6, §9.1 #8).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import LoadReport, MethodError, ParamCount, UHRMethod, register_method
from methods.blocks.backbones import read_state_dict, resnet_v1c
from methods.blocks.heads import ASPPHead, FCNHead, SampleSafeBatchNorm2d
from methods.blocks.mmseg import (
    SegmentationHead,
    conv_bn,
    init_conv_modules,
    init_conv_seg,
    map_official_keys,
    mmseg_cross_entropy,
    official_keys,
)
from methods.blocks.stdc import STDCNet, init_stdc, load_stdc_pretrained

# ---------------------------------------------------------------------------------------------------------------
# building blocks


def pooled_conv_bn(channels: int) -> nn.Sequential:
    """ConvModule(1x1, BN, no act) for a pooled (B, C, 1, 1) vector: its BN falls back to running statistics when
    there is one value per channel (batch 1 in training), where plain BN raises (§9.3 batch-size note)."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(channels, channels, 1, bias=False),
                                     bn=SampleSafeBatchNorm2d(channels)))


class LaplacianPyramid(nn.Module):
    """Two-level Laplacian decomposition of §2.3: 5x5 binomial blur with reflect padding, `[::2, ::2]` down,
    zero-insertion up blurred with 4x the kernel, nearest resize when sizes differ (odd inputs). The kernel is a
    non-persistent buffer, so it follows the module's device (upstream builds it on CUDA, §9.1 #5)."""

    def __init__(self, levels: int = 2) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        self.levels = levels
        self.register_buffer("kernel", torch.outer(taps, taps) / 256.0, persistent=False)

    def blur(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        channels = x.shape[1]
        weight = (self.kernel * gain).to(x.dtype).expand(channels, 1, 5, 5)
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), weight, groups=channels)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        up = x.new_zeros(b, c, 2 * h, 2 * w)
        up[:, :, ::2, ::2] = x
        return self.blur(up, gain=4.0)

    def expand(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """`upsample`, then the upstream nearest "size fix" to `size` when they differ (odd inputs)."""
        up = self.upsample(x)
        if up.shape[-2:] != tuple(size):
            up = F.interpolate(up, size=tuple(size), mode="nearest")
        return up

    def decompose(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(residuals [H0 (full size), H1 (1/2), ...], final low-pass level); `x` is exactly recovered by
        `current = low; for h in reversed(residuals): current = h + expand(current, h.shape[-2:])`."""
        residuals = []
        current = x
        for _ in range(self.levels):
            down = self.blur(current)[:, :, ::2, ::2]
            residuals.append(current - self.expand(down, current.shape[-2:]))
            current = down
        return residuals, current

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """High-frequency residuals [H0 (full size), H1 (1/2), ...]; the final low-pass level is discarded (§2.3)."""
        return self.decompose(x)[0]


def laplacian_input(residuals: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(6-channel shallow input cat[H0, up(H1)], SR target H0 + up(H1)); H1 bilinearly upsampled (§2.3, §2.7)."""
    h0, h1 = residuals
    h1 = F.interpolate(h1, size=h0.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([h0, h1], dim=1), h0 + h1


class ChannelAtt(nn.Module):
    """feat = ConvBNReLU 3x3 (in -> out); att = BN(conv 1x1(GAP(feat))), no activation (§2.5 step 1)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_bn_relu = conv_bn(in_channels, out_channels, 3)
        self.conv_1x1 = pooled_conv_bn(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.conv_bn_relu(x)
        return feat, self.conv_1x1(feat.mean(dim=(2, 3), keepdim=True))


class RelationAwareFusion(nn.Module):
    """RAF (§2.5): channel attention on both inputs, a (groups x groups) relation matrix between the two attention
    vectors split into `groups` groups of consecutive channels, two MLPs (with a trailing ReLU) on the flattened
    relation, gates `g1`, `g2` (zero at init: plain per-branch channel attention), then
    out = BN(conv3x3(s' + ConvBNReLU(up(c')))) without ReLU. Returns (s', c'', out)."""

    def __init__(self, channels: int, in_channels: int, groups: int = 16) -> None:
        super().__init__()
        if groups * groups != 2 * channels or channels % groups:
            raise MethodError(f"RAF needs groups^2 == 2 * channels (upstream r=16, C=128), got {groups}, {channels}")
        self.groups = groups
        self.g1 = nn.Parameter(torch.zeros(1))
        self.g2 = nn.Parameter(torch.zeros(1))
        self.spatial_mlp = nn.Sequential(nn.Linear(2 * channels, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.spatial_att = ChannelAtt(in_channels, channels)
        self.context_mlp = nn.Sequential(nn.Linear(2 * channels, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.context_att = ChannelAtt(channels, channels)
        self.context_head = conv_bn(channels, channels, 3)
        self.smooth = conv_bn(channels, channels, 3, act=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s_feat, s_att = self.spatial_att(spatial)
        c_feat, c_att = self.context_att(context)
        b, c = s_att.shape[:2]
        relation = torch.bmm(s_att.view(b, self.groups, c // self.groups),
                             c_att.view(b, self.groups, c // self.groups).transpose(1, 2)).view(b, -1)
        s_gate = torch.sigmoid(s_att + self.g1 * F.relu(self.spatial_mlp(relation)).view(b, c, 1, 1))
        c_gate = torch.sigmoid(c_att + self.g2 * F.relu(self.context_mlp(relation)).view(b, c, 1, 1))
        s_feat = s_feat * s_gate
        c_feat = F.interpolate(c_feat * c_gate, size=s_feat.shape[-2:], mode="bilinear", align_corners=False)
        c_feat = self.context_head(c_feat)
        return s_feat, c_feat, self.smooth(s_feat + c_feat)


class SRDecoder(nn.Module):
    """Training-only SR decoder (§2.7): nearest x4 -> ConvBNReLU 128->64 -> x2 -> 64->64 -> x2 -> 64->128 = F_sr,
    then SegmentationHead(128 -> 64 -> 3) = reconstruction of H0 + up(H1). Returns (F_sr, reconstruction)."""

    def __init__(self, channels: int = 128, scales: Sequence[int] = (4, 2, 2), out_channels: int = 3) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.conv1 = conv_bn(channels, channels // 2, 3)
        self.conv2 = conv_bn(channels // 2, channels // 2, 3)
        self.conv3 = conv_bn(channels // 2, channels, 3)
        self.conv_sr = SegmentationHead(channels, channels // 2, out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for scale, conv in zip(self.scales, (self.conv1, self.conv2, self.conv3), strict=True):
            x = conv(F.interpolate(x, scale_factor=scale, mode="nearest"))
        return x, self.conv_sr(x)


class ISDHead(nn.Module):
    """Shallow branch + RAF cascade + heads (upstream `ISDHead`, §2.3-§2.7)."""

    def __init__(self, num_classes: int, channels: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.laplacian = LaplacianPyramid(levels=2)
        self.stdc_net = STDCNet(in_channels=6, layers=(2, 2), out_strides=(8, 16))
        c8, c16 = self.stdc_net.channels
        self.fuse16 = RelationAwareFusion(channels, c16)
        self.fuse8 = RelationAwareFusion(channels, c8)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = SegmentationHead(channels, channels // 2, num_classes)
        # training only
        self.aux_head8 = SegmentationHead(channels, channels // 2, num_classes)  # upstream conv_seg_aux_16
        self.aux_head16 = SegmentationHead(channels, channels // 2, num_classes)  # upstream conv_seg_aux_8
        self.sr_decoder = SRDecoder(channels, (4, 2, 2), 3)

    def forward(self, image: torch.Tensor, deep_feat: torch.Tensor, train: bool = False) -> dict[str, torch.Tensor]:
        """`image`: normalised full-resolution input; `deep_feat`: D (128 ch, 1/32). Returns `logits` (1/8) and,
        when `train`, the auxiliary outputs."""
        shallow_in, sr_target = laplacian_input(self.laplacian(image))
        feat8, feat16 = self.stdc_net(shallow_in)
        _, ctx16, fused16 = self.fuse16(feat16, deep_feat)
        _, ctx8, fused8 = self.fuse8(feat8, fused16)
        out = {"logits": self.conv_seg(self.dropout(fused8))}
        if train:
            sr_feat, sr_out = self.sr_decoder(deep_feat)
            out.update(aux8=self.aux_head8(ctx8), aux16=self.aux_head16(ctx16), sr_feat=sr_feat, sr_out=sr_out,
                       sr_target=sr_target)
        return out


# ---------------------------------------------------------------------------------------------------------------
# losses (§3)


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the bilinearly resized SR output and H0 + up(H1) (normalised units), unweighted."""
    if prediction.shape[-2:] != target.shape[-2:]:
        prediction = F.interpolate(prediction, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.mse_loss(prediction, target)


def affinity(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, N, N) similarity of spatial positions after L2-normalising each channel over space (§3: per channel,
    not per pixel)."""
    flat = features.flatten(2)
    flat = flat / (flat.norm(p=2, dim=2, keepdim=True) + eps)
    return flat.transpose(1, 2) @ flat


def feature_affinity_loss(deep_feat: torch.Tensor, sr_feat: torch.Tensor) -> torch.Tensor:
    """Structure distillation: L1 between the affinity of D and that of F_sr resized to D's size; the SR side is
    detached (before the N x N product: same gradients as upstream's `sr_sim.detach()`, no graph kept for it), so
    only the deep branch learns from it. Computed in float32 even under autocast (N = h*w of D)."""
    sr_feat = sr_feat.detach()
    if sr_feat.shape[-2:] != deep_feat.shape[-2:]:
        sr_feat = F.interpolate(sr_feat, size=deep_feat.shape[-2:], mode="bilinear", align_corners=False)
    with torch.autocast(deep_feat.device.type, enabled=False):
        return F.l1_loss(affinity(deep_feat.float()), affinity(sr_feat.float()))


# ---------------------------------------------------------------------------------------------------------------
# official checkpoint layout (§8)

# (release prefix, our prefix); first match wins
_OFFICIAL_RENAMES = (
    ("backbone.stem.0.", "backbone.conv1.0."), ("backbone.stem.1.", "backbone.conv1.1."),
    ("backbone.stem.3.", "backbone.conv1.3."), ("backbone.stem.4.", "backbone.conv1.4."),
    ("backbone.stem.6.", "backbone.conv1.6."), ("backbone.stem.7.", "backbone.bn1."),
    ("decode_head.image_pool.1.conv.", "decode_head.image_pool.1."),
    ("decode_head.image_pool.1.bn.", "decode_head.image_pool.2."),
    ("decode_head.aspp_modules.", "decode_head.aspp."), ("decode_head.conv_seg.", "decode_head.classifier."),
    ("auxiliary_head.conv_seg.", "auxiliary_head.classifier."),
    ("refine_head.conv_seg_aux_16.", "refine_head.aux_head8."),
    ("refine_head.conv_seg_aux_8.", "refine_head.aux_head16."),
)


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release keys -> our keys (§8)."""
    return map_official_keys(state, _OFFICIAL_RENAMES)[0]


# ---------------------------------------------------------------------------------------------------------------
# the method


@register_method
class ISDNet(UHRMethod):
    name = "isdnet"
    description = "ISDNet: ResNet18-D8+ASPP on the 4x-downsampled image + STDC on Laplacian residuals, RAF fusion"
    published = {"ISDNet": {}}
    # spec §2.10 (17.78 M total, 17.23 M on the inference path, 7 classes); exact counts as the official code's
    param_counts = (ParamCount("spec §2.10, official code @7341335", total=17_780_554, inference=17_225_010),)

    def __init__(self, num_classes: int, pretrained: bool | str = False, stdc_pretrained: bool | str = False,
                 down_ratio: int = 4, deep_stem: bool = True, dilations: Sequence[int] = (1, 12, 24, 36),
                 dropout: float = 0.1, aux_weight: float = 0.4,
                 recon_weight: float = 0.1, fa_weight: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        if down_ratio < 1:
            raise MethodError(f"isdnet: down_ratio must be >= 1, got {down_ratio}")
        if stdc_pretrained is True:
            raise MethodError("isdnet: stdc_pretrained must be false or a path to STDCNet813M_73.91.tar "
                              "(the STDC-Seg ImageNet file has no download URL)")
        self.down_ratio = down_ratio
        self.loss_weights = {"aux": aux_weight, "recon": recon_weight, "fa": fa_weight}
        channels = 128  # fixed by RAF's 16 x 8 relation matrix (r^2 = 2C, §2.5)
        # deep branch (§2.2)
        self.backbone = resnet_v1c(18, pretrained=pretrained, output_stride=8, deep_stem=deep_stem)
        self.decode_head = ASPPHead(512, channels, num_classes, tuple(dilations), dropout)  # RefineASPPHead
        self.auxiliary_head = FCNHead(256, 64, num_classes, num_convs=1, dropout=dropout)  # training only
        self.refine_head = ISDHead(num_classes, channels, dropout)
        self._init_weights(stdc_pretrained)

    def _init_weights(self, stdc_pretrained: bool | str) -> None:
        for head in (self.decode_head, self.auxiliary_head, self.refine_head):
            init_conv_modules(head)
        init_conv_seg(self.decode_head.classifier)
        init_conv_seg(self.auxiliary_head.classifier)
        init_conv_seg(self.refine_head.conv_seg)
        if stdc_pretrained:
            load_stdc_pretrained(self.refine_head.stdc_net, str(stdc_pretrained))
        else:
            init_stdc(self.refine_head.stdc_net)

    # -- forward ----------------------------------------------------------------------------------------------
    def _deep(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Deep branch on the nearest-downsampled normalised image (== x[..., ::4, ::4] for sizes divisible by 4,
        §2.1): (ResNet stages, D, deep logits)."""
        size = (x.shape[-2] // self.down_ratio, x.shape[-1] // self.down_ratio)
        stages = self.backbone.forward_intermediates(F.interpolate(x, size=size, mode="nearest"),
                                                     indices=[1, 2, 3, 4], intermediates_only=True)
        deep_feat, deep_logits = self.decode_head(stages[3])
        return stages, deep_feat, deep_logits

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        # the deep classifier runs and its logits are discarded, as upstream (counted in its FPS, §2.1)
        _, deep_feat, _ = self._deep(x)
        logits = self.refine_head(x, deep_feat)["logits"]
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms under the upstream log keys (§3), each already weighted."""
        x = self.normalize(images)
        stages, deep_feat, deep_logits = self._deep(x)
        out = self.refine_head(x, deep_feat, train=True)
        ce = partial(mmseg_cross_entropy, labels=labels, ignore_index=self.ignore_index)
        w = self.loss_weights
        return {
            "decode.loss_seg": ce(deep_logits),
            "refine.loss_seg": ce(out["logits"]),
            "aux_1.loss_seg": ce(out["aux8"]),
            "aux_2.loss_seg": ce(out["aux16"]),
            "aux_3.recon_losses": w["recon"] * reconstruction_loss(out["sr_out"], out["sr_target"]),
            "aux_4.fa_loss": w["fa"] * feature_affinity_loss(deep_feat, out["sr_feat"]),
            "aux.loss_seg": w["aux"] * ce(self.auxiliary_head(stages[2])),
        }

    # -- checkpoints --------------------------------------------------------------------------------------------
    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """Load a released ISDNet checkpoint (mmseg layout, §8). Returns a LoadReport naming every key that could
        not be placed. With `strict` (default) any missing, unexpected or mismatched key raises MethodError and
        nothing is loaded; with `strict=False` the matching tensors are loaded and the report says what was
        skipped (the released files are known not to match the released code: ASPP norms, SR decoder, §8)."""
        return self.load_mapped_state(official_to_ours(read_state_dict(path)), path, strict)

    def save_official(self, path: str) -> None:
        """This model in the release's mmseg layout (`{"state_dict": ...}`, §8 key names)."""
        torch.save({"state_dict": official_keys(self.state_dict(), _OFFICIAL_RENAMES)}, path)
