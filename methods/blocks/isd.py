"""The ISD framework's pieces (ISDNet, Guo et al., CVPR 2022; `methods/isdnet.py` has the provenance and the spec
sections cited as "§"): the Laplacian pyramid, the shallow STDC branch with Relation-Aware Fusion (`ISDHead`), the
training-only SR decoder and the SR / structure-distillation losses. ISDNet puts them on its ResNet-18 + ASPP deep
branch; the generic networks' `isd` variant (`methods/blocks/generic.py`) puts them on another deep branch, as the
paper's Table 4 ("PSPNet + ISD", "Segformer-b0 + ISD")."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MethodError
from methods.blocks.heads import SampleSafeBatchNorm2d
from methods.blocks.mmseg import SegmentationHead, conv_bn
from methods.blocks.stdc import STDCNet

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
        """High-frequency residuals [H0 (full size), H1 (1/2), ...]; the final low-pass level is discarded (§2.3).
        Always float32, also under bf16 autocast: a residual is the small difference of two nearly equal images,
        which bfloat16's 8-bit mantissa mostly rounds away (ISDNet's smoke run lost 16 mIoU to it)."""
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.decompose(x.float())[0]
        return self.decompose(x)[0]


def laplacian_input(residuals: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(6-channel shallow input cat[H0, up(H1)], SR target H0 + up(H1)); H1 bilinearly upsampled (§2.3, §2.7)."""
    h0, h1 = residuals
    h1 = F.interpolate(h1, size=h0.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([h0, h1], dim=1), h0 + h1


class ChannelAtt(nn.Module):
    """feat = ConvBNReLU 3x3 (in -> out); att = BN(conv 1x1(GAP(feat))), no activation (§2.5 step 1). Without
    `attention` (ablation, no CW) only the projection is built and att is None."""

    def __init__(self, in_channels: int, out_channels: int, attention: bool = True) -> None:
        super().__init__()
        self.conv_bn_relu = conv_bn(in_channels, out_channels, 3)
        if attention:
            self.conv_1x1 = pooled_conv_bn(out_channels)
        self.attention = attention

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feat = self.conv_bn_relu(x)
        return feat, self.conv_1x1(feat.mean(dim=(2, 3), keepdim=True)) if self.attention else None


FUSIONS = ("add", "cat")
RELATIONS = ("shallow", "deep")


class RelationAwareFusion(nn.Module):
    """RAF (§2.5): channel attention on both inputs, a (groups x groups) relation matrix between the two attention
    vectors split into `groups` groups of consecutive channels, two MLPs (with a trailing ReLU) on the flattened
    relation, gates `g1`, `g2` (zero at init: plain per-branch channel attention), then
    out = BN(conv3x3(s' + ConvBNReLU(up(c')))) without ReLU. Returns (s', c'', out).

    Ablation switches (Table 6, module docstring): `channel_weights` False drops the gates (s', c' are the plain
    projections), `relation` names the gates that get their MLP term ("shallow": g1, "deep": g2; only those MLPs and
    scalars are built), `fusion="cat"` replaces the sum by a ConvBNReLU 1x1 on the concatenation (`cat_conv`)."""

    def __init__(self, channels: int, in_channels: int, groups: int = 16, fusion: str = "add",
                 channel_weights: bool = True, relation: Sequence[str] = RELATIONS,
                 context_channels: int | None = None) -> None:
        super().__init__()
        if groups * groups != 2 * channels or channels % groups:
            raise MethodError(f"RAF needs groups^2 == 2 * channels (upstream r=16, C=128), got {groups}, {channels}")
        if fusion not in FUSIONS:
            raise MethodError(f"RAF fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if relation and not channel_weights:
            raise MethodError(f"RAF relation terms {list(relation)} modulate the channel gates: they need "
                              "channel_weights")
        self.groups = groups
        self.fusion = fusion
        self.channel_weights = channel_weights
        self.relation = tuple(r for r in RELATIONS if r in relation)
        if "shallow" in self.relation:
            self.g1 = nn.Parameter(torch.zeros(1))
        if "deep" in self.relation:
            self.g2 = nn.Parameter(torch.zeros(1))
        if "shallow" in self.relation:
            self.spatial_mlp = nn.Sequential(nn.Linear(2 * channels, channels), nn.ReLU(),
                                             nn.Linear(channels, channels))
        self.spatial_att = ChannelAtt(in_channels, channels, attention=channel_weights)
        if "deep" in self.relation:
            self.context_mlp = nn.Sequential(nn.Linear(2 * channels, channels), nn.ReLU(),
                                             nn.Linear(channels, channels))
        # the context (deep) input: `channels` wide in ISDNet; another deep branch's width is projected here
        self.context_att = ChannelAtt(context_channels or channels, channels, attention=channel_weights)
        self.context_head = conv_bn(channels, channels, 3)
        if fusion == "cat":
            self.cat_conv = conv_bn(2 * channels, channels, 1)
        self.smooth = conv_bn(channels, channels, 3, act=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s_feat, s_att = self.spatial_att(spatial)
        c_feat, c_att = self.context_att(context)
        if self.channel_weights:
            s_feat, c_feat = self._gate(s_feat, s_att, c_feat, c_att)
        c_feat = F.interpolate(c_feat, size=s_feat.shape[-2:], mode="bilinear", align_corners=False)
        c_feat = self.context_head(c_feat)
        fused = s_feat + c_feat if self.fusion == "add" else self.cat_conv(torch.cat([s_feat, c_feat], dim=1))
        return s_feat, c_feat, self.smooth(fused)

    def _gate(self, s_feat: torch.Tensor, s_att: torch.Tensor, c_feat: torch.Tensor,
              c_att: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both features times their sigmoid channel gates, each gate with its relation term where enabled."""
        b, c = s_att.shape[:2]
        if self.relation:
            relation = torch.bmm(s_att.view(b, self.groups, c // self.groups),
                                 c_att.view(b, self.groups, c // self.groups).transpose(1, 2)).view(b, -1)
        if "shallow" in self.relation:
            s_att = s_att + self.g1 * F.relu(self.spatial_mlp(relation)).view(b, c, 1, 1)
        if "deep" in self.relation:
            c_att = c_att + self.g2 * F.relu(self.context_mlp(relation)).view(b, c, 1, 1)
        return s_feat * torch.sigmoid(s_att), c_feat * torch.sigmoid(c_att)


class SRDecoder(nn.Module):
    """Training-only SR decoder (§2.7): nearest x4 -> ConvBNReLU 128->64 -> x2 -> 64->64 -> x2 -> 64->128 = F_sr,
    then SegmentationHead(128 -> 64 -> 3) = reconstruction of H0 + up(H1). Returns (F_sr, reconstruction)."""

    def __init__(self, channels: int = 128, scales: Sequence[int] = (4, 2, 2), out_channels: int = 3,
                 in_channels: int | None = None) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.conv1 = conv_bn(in_channels or channels, channels // 2, 3)
        self.conv2 = conv_bn(channels // 2, channels // 2, 3)
        self.conv3 = conv_bn(channels // 2, channels, 3)
        self.conv_sr = SegmentationHead(channels, channels // 2, out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for scale, conv in zip(self.scales, (self.conv1, self.conv2, self.conv3), strict=True):
            x = conv(F.interpolate(x, scale_factor=scale, mode="nearest"))
        return x, self.conv_sr(x)


class ISDHead(nn.Module):
    """Shallow branch + RAF cascade + heads (upstream `ISDHead`, §2.3-§2.7). Ablation switches (module docstring):
    `deep` False = shallow-only head (projection + conv_seg on 1/8, aux on 1/16, no fusion), `shallow_input`,
    `shallow_scale`, the RAF switches, and `sr` (build the SR decoder). `deep_channels`: the width of the deep
    features D when not `channels` (another deep branch, e.g. Segformer's 256), projected by the first RAF's context
    ChannelAtt and the SR decoder's first conv."""

    def __init__(self, num_classes: int, channels: int = 128, dropout: float = 0.1, *, deep: bool = True,
                 shallow_input: str = "laplacian", shallow_scale: float = 1.0, fusion: str = "add",
                 channel_weights: bool = True, relation: Sequence[str] = RELATIONS, sr: bool = True,
                 deep_channels: int | None = None) -> None:
        super().__init__()
        self.deep = deep
        self.shallow_input = shallow_input
        self.shallow_scale = shallow_scale
        self.laplacian = LaplacianPyramid(levels=2)
        self.stdc_net = STDCNet(in_channels=6 if shallow_input == "laplacian" else 3, layers=(2, 2),
                                out_strides=(8, 16))
        c8, c16 = self.stdc_net.channels
        if deep:
            raf = partial(RelationAwareFusion, fusion=fusion, channel_weights=channel_weights, relation=relation)
            self.fuse16 = raf(channels, c16, context_channels=deep_channels)
            self.fuse8 = raf(channels, c8)
        else:
            self.project8 = conv_bn(c8, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = SegmentationHead(channels, channels // 2, num_classes)
        # training only
        if deep:
            self.aux_head8 = SegmentationHead(channels, channels // 2, num_classes)  # upstream conv_seg_aux_16
            self.aux_head16 = SegmentationHead(channels, channels // 2, num_classes)  # upstream conv_seg_aux_8
        else:
            self.aux_head16 = SegmentationHead(c16, channels // 2, num_classes)  # on the raw 1/16 STDC features
        if sr:
            self.sr_decoder = SRDecoder(channels, (4, 2, 2), 3, in_channels=deep_channels)
        self.sr = sr

    def shallow_inputs(self, image: torch.Tensor, sr_target: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(STDC input, SR target H0 + up(H1) of the full-size image when `sr_target`, else None). The default
        (Laplacian, full scale) decomposes once and yields both, as upstream."""
        small = image
        if self.shallow_scale != 1:
            size = (max(1, round(image.shape[-2] * self.shallow_scale)),
                    max(1, round(image.shape[-1] * self.shallow_scale)))
            small = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        target = None
        if self.shallow_input == "laplacian":
            shallow_in, small_target = laplacian_input(self.laplacian(small))
            target = small_target if small is image else None
        else:
            shallow_in = small
        if sr_target and target is None:
            target = laplacian_input(self.laplacian(image))[1]
        return shallow_in, target

    def forward(self, image: torch.Tensor, deep_feat: torch.Tensor | None = None,
                train: bool = False) -> dict[str, torch.Tensor]:
        """`image`: normalised full-resolution input; `deep_feat`: D (ISDNet: 128 ch at 1/32; None for the
        shallow-only head).
        Returns `logits` (1/8 of the shallow input) and, when `train`, the auxiliary outputs."""
        shallow_in, sr_target = self.shallow_inputs(image, train and self.sr)
        feat8, feat16 = self.stdc_net(shallow_in)
        if not self.deep:
            out = {"logits": self.conv_seg(self.dropout(self.project8(feat8)))}
            if train:
                out["aux16"] = self.aux_head16(feat16)
            return out
        _, ctx16, fused16 = self.fuse16(feat16, deep_feat)
        _, ctx8, fused8 = self.fuse8(feat8, fused16)
        out = {"logits": self.conv_seg(self.dropout(fused8))}
        if train:
            out.update(aux8=self.aux_head8(ctx8), aux16=self.aux_head16(ctx16))
            if self.sr:
                sr_feat, sr_out = self.sr_decoder(deep_feat)
                out.update(sr_feat=sr_feat, sr_out=sr_out, sr_target=sr_target)
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


def isd_loss_terms(out: dict[str, torch.Tensor], deep_feat: torch.Tensor | None, ce, recon_weight: float,
                   fa_weight: float) -> dict[str, torch.Tensor]:
    """The ISD head's loss terms under the upstream log keys (§3), each already weighted: CE on the fused logits
    (`refine`), on the 1/8 and 1/16 auxiliary outputs, L_SR and L_SD; a term at weight 0 or without its output is
    absent. `ce(logits)` is the segmentation loss against the labels."""
    terms = {"refine.loss_seg": ce(out["logits"])}
    if "aux8" in out:
        terms["aux_1.loss_seg"] = ce(out["aux8"])
    terms["aux_2.loss_seg"] = ce(out["aux16"])
    if recon_weight and "sr_out" in out:
        terms["aux_3.recon_losses"] = recon_weight * reconstruction_loss(out["sr_out"], out["sr_target"])
    if fa_weight and "sr_feat" in out:
        terms["aux_4.fa_loss"] = fa_weight * feature_affinity_loss(deep_feat, out["sr_feat"])
    return terms
