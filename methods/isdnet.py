"""ISDNet (Guo et al., CVPR 2022): a deep branch on the 4x-downsampled image and a shallow STDC branch on the
full-resolution Laplacian residuals, fused by Relation-Aware Fusion (RAF). Clean-room re-implementation of the
official release `cedricgsh/ISDNet` as specified in `docs/specs/isdnet.md` ("§" below refers to that file).

Module names follow the release (`backbone`, `decode_head`, `auxiliary_head`, `refine_head.{stdc_net, fuse16,
fuse8, conv_seg, sr_decoder}`) so `load_official` is a short list of renames; the two auxiliary heads get their
correct names (upstream `conv_seg_aux_16` runs at 1/8 and `conv_seg_aux_8` at 1/16, §2.6, §9.1 #8).

Ablations (paper Tables 5-7, `ISDNet.ablations`, `bench.py ablation --method isdnet`). The official code has only
the full model, so the switches below are OUR reading of the paper's text; the defaults build exactly the full
model (same modules, keys and outputs).
- `branches` ("both" | "deep" | "shallow", Table 5 D / S): deep only predicts the deep ASPP logits upsampled to the
  input size and trains decode CE + the FCN auxiliary (no refine head is built). Shallow only (our choice): the STDC
  trunk alone, its 1/8 features projected to 128 ch by a ConvBNReLU 3x3 (`refine_head.project8`, like RAF's own
  projection) into the usual `conv_seg`, and an auxiliary SegmentationHead directly on the 1/16 features
  (`refine_head.aux_head16`, 512 -> 64 -> classes). Keywords of a branch that is not built have no effect.
- scales (Table 5 input): the deep branch sees the image at 1/`down_ratio` (4 = 1/4, 1 = full); `shallow_scale`
  (1.0 = full, 0.25 = 1/4) bilinearly resizes the shallow branch's input; predictions are upsampled to input size.
- `shallow_input` (Table 7 H): "laplacian" = the 6-channel cat[H0, up(H1)]; "rgb" = the normalised RGB image
  (STDC `in_channels=3`). The SR target H0 + up(H1) always comes from the full-size image's Laplacian pyramid.
- RAF (Table 6): `channel_weights` (CW) = the sigmoid channel gates on both branches (without them the ChannelAtt
  projections are kept, the attention convs are neither built nor run); `relation` lists the gates that get the
  relation-MLP term: "shallow" = M_s (`g1 * relu(spatial_mlp(relation))` in the spatial gate), "deep" = M_d (the
  same with `g2`, `context_mlp` in the context gate); it needs CW. `fusion`: "add" = smooth(s' + head(up(c'))) as
  upstream; "cat" (our choice) = smooth(ConvBNReLU 1x1 (2C -> C)(cat[s', head(up(c'))])), ADD + CW being BiSeNet's
  ARM and CAT + CW its FFM as the paper says.
- losses (Table 7): `recon_weight` = L_SR, `fa_weight` = L_SD. At 0 the term is not returned; with both at 0 the SR
  decoder is neither built nor run (so nothing untrained sits in the model and DDP needs no unused-parameter
  search). L_SD distils the SR decoder's features, which only L_SR trains, so fa_weight > 0 needs recon_weight > 0;
  both need the deep branch. L_AUX (aux heads + FCN auxiliary head) is on in every configuration.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Ablation, LoadReport, MethodError, ParamCount, UHRMethod, register_method
from methods.blocks.backbones import read_state_dict, resnet_v1c
from methods.blocks.heads import ASPPHead, FCNHead, SampleSafeBatchNorm2d
from methods.blocks.mmseg import (
    ASPP_HEAD_RENAMES,
    RESNET_V1C_RENAMES,
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
                 channel_weights: bool = True, relation: Sequence[str] = RELATIONS) -> None:
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
        self.context_att = ChannelAtt(channels, channels, attention=channel_weights)
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
    """Shallow branch + RAF cascade + heads (upstream `ISDHead`, §2.3-§2.7). Ablation switches (module docstring):
    `deep` False = shallow-only head (projection + conv_seg on 1/8, aux on 1/16, no fusion), `shallow_input`,
    `shallow_scale`, the RAF switches, and `sr` (build the SR decoder)."""

    def __init__(self, num_classes: int, channels: int = 128, dropout: float = 0.1, *, deep: bool = True,
                 shallow_input: str = "laplacian", shallow_scale: float = 1.0, fusion: str = "add",
                 channel_weights: bool = True, relation: Sequence[str] = RELATIONS, sr: bool = True) -> None:
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
            self.fuse16 = raf(channels, c16)
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
            self.sr_decoder = SRDecoder(channels, (4, 2, 2), 3)
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
        """`image`: normalised full-resolution input; `deep_feat`: D (128 ch, 1/32; None for the shallow-only head).
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


# ---------------------------------------------------------------------------------------------------------------
# official checkpoint layout (§8)

# (release prefix, our prefix); first match wins
_OFFICIAL_RENAMES = (
    *RESNET_V1C_RENAMES, *ASPP_HEAD_RENAMES,
    ("auxiliary_head.conv_seg.", "auxiliary_head.classifier."),
    ("refine_head.conv_seg_aux_16.", "refine_head.aux_head8."),
    ("refine_head.conv_seg_aux_8.", "refine_head.aux_head16."),
)


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release keys -> our keys (§8)."""
    return map_official_keys(state, _OFFICIAL_RENAMES)[0]


# ---------------------------------------------------------------------------------------------------------------
# the method

BRANCHES = ("both", "deep", "shallow")
SHALLOW_INPUTS = ("laplacian", "rgb")


def check_ablation_keywords(branches: str, shallow_input: str, shallow_scale: float, fusion: str,
                            channel_weights: bool, relation: Sequence[str], recon_weight: float,
                            fa_weight: float) -> tuple[str, ...]:
    """One-line MethodErrors for the ablation keywords (module docstring), before anything is built; returns
    `relation` as a tuple in canonical order."""

    def choice(key: str, value: object, options: tuple[str, ...]) -> None:
        if value not in options:
            raise MethodError(f"isdnet: {key} must be one of {', '.join(options)}, got {value!r}")

    choice("branches", branches, BRANCHES)
    choice("shallow_input", shallow_input, SHALLOW_INPUTS)
    choice("fusion", fusion, FUSIONS)
    if not isinstance(shallow_scale, int | float) or isinstance(shallow_scale, bool) or not 0 < shallow_scale <= 1:
        raise MethodError(f"isdnet: shallow_scale must be a number in (0, 1] (1 = full resolution, 0.25 = 1/4), "
                          f"got {shallow_scale!r}")
    if not isinstance(channel_weights, bool):
        raise MethodError(f"isdnet: channel_weights must be true or false, got {channel_weights!r}")
    if isinstance(relation, str) or not isinstance(relation, Sequence):
        raise MethodError(f"isdnet: relation must be a list drawn from {list(RELATIONS)} (e.g. [shallow] or []), "
                          f"got {relation!r}")
    unknown = [r for r in relation if r not in RELATIONS]
    if unknown:
        raise MethodError(f"isdnet: relation entries must be drawn from {list(RELATIONS)}, got {unknown}")
    if relation and not channel_weights:
        raise MethodError(f"isdnet: relation {list(relation)} adds M_s/M_d to the channel gates, which "
                          "channel_weights: false removes; set relation: [] as well")
    for key, value in (("recon_weight", recon_weight), ("fa_weight", fa_weight)):
        if value < 0:
            raise MethodError(f"isdnet: {key} must be >= 0 (0 switches the loss off), got {value}")
    if branches != "both" and (recon_weight > 0 or fa_weight > 0):
        raise MethodError(f"isdnet: branches={branches!r} trains L_SEG + L_AUX only (Table 5); "
                          "set recon_weight: 0 and fa_weight: 0")
    if fa_weight > 0 and recon_weight == 0:
        raise MethodError("isdnet: fa_weight > 0 (L_SD) distils the SR decoder's features, which only L_SR trains; "
                          "set recon_weight > 0 or fa_weight: 0")
    return tuple(r for r in RELATIONS if r in relation)



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
                 recon_weight: float = 0.1, fa_weight: float = 1.0, branches: str = "both",
                 shallow_input: str = "laplacian", shallow_scale: float = 1.0, fusion: str = "add",
                 channel_weights: bool = True, relation: Sequence[str] = RELATIONS,
                 ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        if down_ratio < 1:
            raise MethodError(f"isdnet: down_ratio must be >= 1, got {down_ratio}")
        if stdc_pretrained is True:
            raise MethodError("isdnet: stdc_pretrained must be false or a path to STDCNet813M_73.91.tar "
                              "(the STDC-Seg ImageNet file has no download URL)")
        relation = check_ablation_keywords(branches, shallow_input, shallow_scale, fusion, channel_weights, relation,
                                           recon_weight, fa_weight)
        self.down_ratio = down_ratio
        self.branches = branches
        self.loss_weights = {"aux": aux_weight, "recon": recon_weight, "fa": fa_weight}
        channels = 128  # fixed by RAF's 16 x 8 relation matrix (r^2 = 2C, §2.5)
        if branches != "shallow":  # deep branch (§2.2)
            self.backbone = resnet_v1c(18, pretrained=pretrained, output_stride=8, deep_stem=deep_stem)
            self.decode_head = ASPPHead(512, channels, num_classes, tuple(dilations), dropout)  # RefineASPPHead
            self.auxiliary_head = FCNHead(256, 64, num_classes, num_convs=1, dropout=dropout)  # training only
        if branches != "deep":
            self.refine_head = ISDHead(num_classes, channels, dropout, deep=branches == "both",
                                       shallow_input=shallow_input, shallow_scale=float(shallow_scale), fusion=fusion,
                                       channel_weights=channel_weights, relation=relation,
                                       sr=recon_weight > 0 or fa_weight > 0)
        self._init_weights(stdc_pretrained)

    @property
    def has_deep(self) -> bool:
        return self.branches != "shallow"

    @property
    def has_shallow(self) -> bool:
        return self.branches != "deep"

    def _init_weights(self, stdc_pretrained: bool | str) -> None:
        heads = ((self.decode_head, self.auxiliary_head) if self.has_deep else ()) + \
            ((self.refine_head,) if self.has_shallow else ())
        for head in heads:
            init_conv_modules(head)
        if self.has_deep:
            init_conv_seg(self.decode_head.classifier)
            init_conv_seg(self.auxiliary_head.classifier)
        if not self.has_shallow:
            return
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
        if not self.has_shallow:  # Table 5 "D only": the deep ASPP logits
            logits = self._deep(x)[2]
        elif not self.has_deep:  # Table 5 "S only"
            logits = self.refine_head(x)["logits"]
        else:
            # the deep classifier runs and its logits are discarded, as upstream (counted in its FPS, §2.1)
            _, deep_feat, _ = self._deep(x)
            logits = self.refine_head(x, deep_feat)["logits"]
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms under the upstream log keys (§3), each already weighted; a term switched off (weight 0) or
        without its module (single-branch ablations) is absent."""
        x = self.normalize(images)
        ce = partial(mmseg_cross_entropy, labels=labels, ignore_index=self.ignore_index)
        w = self.loss_weights
        terms: dict[str, torch.Tensor] = {}
        deep_feat = None
        if self.has_deep:
            stages, deep_feat, deep_logits = self._deep(x)
            terms["decode.loss_seg"] = ce(deep_logits)
        if self.has_shallow:
            out = self.refine_head(x, deep_feat, train=True)
            terms["refine.loss_seg"] = ce(out["logits"])
            if "aux8" in out:
                terms["aux_1.loss_seg"] = ce(out["aux8"])
            terms["aux_2.loss_seg"] = ce(out["aux16"])
            if w["recon"]:
                terms["aux_3.recon_losses"] = w["recon"] * reconstruction_loss(out["sr_out"], out["sr_target"])
            if w["fa"]:
                terms["aux_4.fa_loss"] = w["fa"] * feature_affinity_loss(deep_feat, out["sr_feat"])
        if self.has_deep:
            terms["aux.loss_seg"] = w["aux"] * ce(self.auxiliary_head(stages[2]))
        return terms

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


# ---------------------------------------------------------------------------------------------------------------
# the paper's ablations (Tables 5-7, DeepGlobe; our reading of the switches: module docstring)

# Table 5's baseline: D + S, L_SEG + L_AUX only, RGB shallow input, fusion by plain addition (no CW, no M_s/M_d)
_TABLE5_BASE = {"shallow_input": "rgb", "recon_weight": 0.0, "fa_weight": 0.0, "fusion": "add",
                "channel_weights": False, "relation": []}


def _table5(key: str, label: str, branches: str, scale: str, model: dict) -> Ablation:
    """Table 5 baseline with the branches and the input scales of the row."""
    return Ablation(key, label, {"branches": branches, **_TABLE5_BASE, **model},
                    marks={"D": branches != "shallow", "S": branches != "deep", "input": scale}, table="Table 5")


def _table6(key: str, label: str, model: dict) -> Ablation:
    """Baseline + H + all losses, fusion per row (marks read off the keywords); M_s / M_d print "-" in the rows
    without either relation term, as the paper."""
    relation = model.get("relation", RELATIONS)
    marks = {"ADD": model.get("fusion", "add") == "add", "CAT": model.get("fusion", "add") == "cat",
             "CW": model.get("channel_weights", True),
             "M_s": "shallow" in relation if relation else "-", "M_d": "deep" in relation if relation else "-"}
    return Ablation(key, label, model, marks=marks, table="Table 6")


def _table7(key: str, label: str, model: dict) -> Ablation:
    """RAF fusion (the defaults) with L_SEG + L_AUX; L_SR, L_SD and the Laplacian input H per row (marks read off
    the keywords)."""
    marks = {"baseline": True, "L_SR": model.get("recon_weight", 0.1) > 0, "L_SD": model.get("fa_weight", 1.0) > 0,
             "H (Laplacian input)": model.get("shallow_input", "laplacian") == "laplacian"}
    return Ablation(key, label, model, marks=marks, table="Table 7")


ISDNet.ablations = (
    _table5("deep_quarter", "D only, 1/4 scale", "deep", "1/4 scale", {"down_ratio": 4}),
    _table5("deep_full", "D only, full scale", "deep", "full scale", {"down_ratio": 1}),
    _table5("shallow_quarter", "S only, 1/4 scale", "shallow", "1/4 scale", {"shallow_scale": 0.25}),
    _table5("shallow_full", "S only, full scale", "shallow", "full scale", {"shallow_scale": 1.0}),
    _table5("deep_shallow_add", "D + S, D at 1/4, S at full", "both", "D at 1/4, S at full",
            {"down_ratio": 4, "shallow_scale": 1.0}),
    _table6("add", "ADD", {"fusion": "add", "channel_weights": False, "relation": []}),
    _table6("add_cw", "ADD + CW", {"fusion": "add", "channel_weights": True, "relation": []}),
    _table6("cat", "CAT", {"fusion": "cat", "channel_weights": False, "relation": []}),
    _table6("cat_cw", "CAT + CW", {"fusion": "cat", "channel_weights": True, "relation": []}),
    _table6("add_cw_ms", "ADD + CW + M_s", {"fusion": "add", "channel_weights": True, "relation": ["shallow"]}),
    _table6("isdnet", "ADD + CW + M_s + M_d", {}),
    _table7("baseline", "baseline", {"shallow_input": "rgb", "recon_weight": 0.0, "fa_weight": 0.0}),
    _table7("sr", "baseline + L_SR", {"shallow_input": "rgb", "fa_weight": 0.0}),
    _table7("sr_sd", "baseline + L_SR + L_SD", {"shallow_input": "rgb"}),
    _table7("isdnet", "baseline + L_SR + L_SD + H", {}),
)
