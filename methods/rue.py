"""RUE (Qin et al., CVPR 2025, "Boosting the Dual-Stream Architecture in UHR Segmentation with Resolution-Biased
Uncertainty Estimation"). Clean-room re-implementation of the release `Qinrong-NKU/RUE` as specified in
`docs/specs/rue.md` ("§" below refers to that file); no upstream code is copied.

Data flow (§1, §3):
- deep stream: image 4x nearest-downsampled -> ResNet-18-V1c-D8 -> DAPPM (F_D, 128 ch) -> Dropout2d + 1x1 = O_D;
  FCN auxiliary head on layer3 (training only, weight 0.4);
- Estimator: beta = conv1x1([mean_c, max_c] |F_D2 - ConvBNReLU3x3(Up F_D1)|) (logits, F_D2 = layer1, F_D1 = layer2),
  eps = softmax entropy of O_D / divisor, detached; U2 = sigmoid(Down_PxP beta) + Down_PxP eps (bilinear point
  sampling), U1 = (sigmoid(Up beta) + Up eps) / 2 on the fusion canvas;
- Selector: top-K of U2 on the P x P grid (stable sort: ties go to the lower row-major index), full-resolution RGB
  patches of all images batched [B*K, 3, p, p] through STDC stages 1-4 -> F_S (64 ch, stride 8 of the patch);
- Ensembler: on the (s*P)^2 canvas, (1 - U1) Up(F_D) + U1 F_S inside selected patches, Up(F_D) elsewhere, then
  ConvBNReLU 3x3 (64->32) + 1x1 = O_S, bilinearly resized to the input;
- Complementer (USEG): mean over all pixels of (1 + U1.detach())^gamma * CE(O_S).

Dataset-specific constants (P at train and test, gamma, entropy divisor, class suppression) are constructor kwargs
fed from params.yaml; K (share of patches) is the runtime attribute/kwarg `k` (§12.1 #3, #12). Upstream defects of
§12.1 are absent: no `topk` module, plain BatchNorm (SyncBN only via the trainer under CUDA DDP), no file paths.

Deviations, by design and documented:
- rectangular inputs: the grid is P x P with patch height H // P and width W // P (upstream takes `int(H / P)` for
  both, which only works for square inputs; identical for square ones). Remainder rows/columns beyond P * p are not
  fed to the shallow stream, as upstream (§3.5); the deep canvas still covers the whole image (§3.6 edge note).
- `entropy_divisor` must be >= ln C so that eps and U1 stay in [0, 1] (upstream's defect #3 ran ln 2-scaled
  constants on 7 classes).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from methods.base import Knob, LoadReport, MethodError, Output, ParamCount, UHRMethod, register_method
from methods.blocks.backbones import read_state_dict, resnet_v1c
from methods.blocks.dappm import DAPPM
from methods.blocks.heads import FCNHead
from methods.blocks.losses import resize_logits
from methods.blocks.mmseg import (
    RESNET_V1C_RENAMES,
    SegmentationHead,
    init_conv_modules,
    init_conv_seg,
    map_official_keys,
    mmseg_cross_entropy,
    official_keys,
)
from methods.blocks.stdc import STDCNet, init_stdc, load_stdc_pretrained

# ---------------------------------------------------------------------------------------------------------------
# pure building blocks (Estimator, Selector, Ensembler, Complementer)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def num_selected(k: float, patch_num: int) -> int:
    """K = ceil(k * P^2) patches (§13.8), at least 1. A tolerance keeps e.g. 0.3 * 100 at 30, not 31."""
    total = patch_num * patch_num
    return max(1, min(total, math.ceil(k * total - 1e-9)))


def check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < float(k) <= 1.0:
        raise MethodError(f"rue: k (share of patches sent through the shallow stream) must be in (0, 1], got {k!r}")
    return float(k)


def entropy_map(logits: torch.Tensor, divisor: float) -> torch.Tensor:
    """eps: softmax entropy over classes of O_D divided by `divisor` (~ln C), (B, 1, h, w), detached (§3.4).
    Clamped to [0, ln C] against float rounding only (a uniform O_D can round to ln C + 1e-7)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    entropy = (-(log_p.exp() * log_p).sum(dim=1, keepdim=True)).clamp(0.0, math.log(logits.shape[1]))
    return (entropy / divisor).detach()


def patch_scores(beta: torch.Tensor, eps: torch.Tensor, patch_num: int) -> torch.Tensor:
    """U2 = sigmoid(Down beta) + Down eps on the P x P grid (bilinear point sampling, no 1/2), (B, P*P) row-major."""
    grid = (patch_num, patch_num)
    return (torch.sigmoid(_resize(beta, grid)) + _resize(eps.to(beta.dtype), grid)).flatten(1)


def pixel_uncertainty(beta: torch.Tensor, eps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """U1 = (sigmoid(Up beta) + Up eps) / 2, sigmoid after upsampling (§3.4), (B, 1, *size)."""
    return 0.5 * (torch.sigmoid(_resize(beta, size)) + _resize(eps.to(beta.dtype), size))


def select_patches(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (B, count) of the `count` highest scores per image, in descending order; equal scores are taken in
    row-major order (stable sort), so the selection is deterministic."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]


def _tiles(x: torch.Tensor, patch_num: int, tile_h: int, tile_w: int) -> torch.Tensor:
    """View (B, P, P, C, th, tw) of the top-left P*th x P*tw region of x (B, C, H, W); no copy."""
    x = x[:, :, :patch_num * tile_h, :patch_num * tile_w]
    return x.unflatten(2, (patch_num, tile_h)).unflatten(4, (patch_num, tile_w)).permute(0, 2, 4, 1, 3, 5)


def patch_size(height: int, width: int, patch_num: int) -> tuple[int, int]:
    ph, pw = height // patch_num, width // patch_num
    if ph < 1 or pw < 1:
        raise MethodError(f"rue: a {height}x{width} image is too small for a {patch_num}x{patch_num} patch grid; "
                          "lower patch_num / train_patch_num in params.yaml")
    return ph, pw


def cut_patches(x: torch.Tensor, patch_num: int, ids: torch.Tensor) -> torch.Tensor:
    """Full-resolution patches `ids` (B, K) of each image, batched image-major: (B*K, C, H // P, W // P). Rows and
    columns beyond P * p are dropped (upstream `unfold`, §3.5)."""
    ph, pw = patch_size(x.shape[-2], x.shape[-1], patch_num)
    batch = torch.arange(x.shape[0], device=ids.device)[:, None]
    return _tiles(x, patch_num, ph, pw)[batch, ids // patch_num, ids % patch_num].flatten(0, 1)


def ensemble(deep: torch.Tensor, u1: torch.Tensor, shallow: torch.Tensor, ids: torch.Tensor,
             patch_num: int) -> torch.Tensor:
    """Ensembler (§3.6): F'_S = (1 - U1) D + U1 F_S on the selected tiles, D elsewhere.

    deep (B, C, P*s, P*s'), u1 (B, 1, P*s, P*s'), shallow (B, K, C, s, s') in `ids` (B, K) order. U1 is not
    detached: the blend is beta's only learning signal."""
    b, _, height, width = deep.shape
    th, tw = height // patch_num, width // patch_num
    batch = torch.arange(b, device=ids.device)[:, None]
    rows, cols = ids // patch_num, ids % patch_num
    d_sel = _tiles(deep, patch_num, th, tw)[batch, rows, cols]
    u_sel = _tiles(u1, patch_num, th, tw)[batch, rows, cols]
    out = deep.clone()
    _tiles(out, patch_num, th, tw)[batch, rows, cols] = (1 - u_sel) * d_sel + u_sel * shallow.to(d_sel.dtype)
    return out


def complementer_weight(u1: torch.Tensor, gamma: float) -> torch.Tensor:
    """USEG per-pixel weight w = (1 + U1.detach())^gamma (§4)."""
    return (1.0 + u1.detach()) ** gamma


def useg_loss(logits: torch.Tensor, u1: torch.Tensor, labels: torch.Tensor, gamma: float,
              ignore_index: int = 255) -> torch.Tensor:
    """Complementer: O_S and w bilinearly resized to the label size, mean over ALL pixels of w * CE (ignored pixels
    count 0 but stay in the denominator; not normalised by sum w), as mmseg 0.16 `weight_reduce_loss` (§4)."""
    size = labels.shape[-2:]
    logits = resize_logits(logits, size)
    weight = resize_logits(complementer_weight(u1, gamma), size)[:, 0]
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    return (ce * weight.float()).mean()


def shallow_size(n: int, halvings: int = 3) -> int:
    """Side of F_S for a patch side n: every stride-2 conv / pool gives ceil(n/2) (§3.10)."""
    for _ in range(halvings):
        n = (n + 1) // 2
    return n


# ---------------------------------------------------------------------------------------------------------------
# modules (names follow the release so `load_official` is a short rename list, §11)


class Reducer(nn.Module):
    """1x1 conv (no bias) + BN + ReLU (upstream `Reducer`, keys conv1/bn1)."""

    def __init__(self, in_channels: int, out_channels: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class ScoreHead(nn.Module):
    """Estimator's resolution-biased term: beta logits = conv1x1_{2->1}([mean_c r, max_c r]),
    r = |F_D2 - ConvBNReLU3x3_{128->64}(Up F_D1)| (§3.4; 1x1 as coded, the figure says 3x3)."""

    def __init__(self, in_channels: int = 128, mid_channels: int = 64) -> None:
        super().__init__()
        self.conv_bn_relu = ConvNormAct(in_channels, mid_channels, 3, bias=False)
        self.conv_out = nn.Conv2d(2, 1, 1, bias=True)

    def forward(self, feat_d2: torch.Tensor, feat_d1: torch.Tensor) -> torch.Tensor:
        r = torch.abs(feat_d2 - self.conv_bn_relu(_resize(feat_d1, feat_d2.shape[-2:])))
        return self.conv_out(torch.cat([r.mean(dim=1, keepdim=True), r.amax(dim=1, keepdim=True)], dim=1))


class DeepHead(nn.Module):
    """Upstream `RefineASPPHead`: DAPPM (512 -> 128) = F_D, then Dropout2d + 1x1 `conv_seg` = O_D."""

    def __init__(self, num_classes: int, in_channels: int = 512, channels: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.dappm = DAPPM(in_channels, channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.dappm(x)
        return feat, self.conv_seg(self.dropout(feat))


class RUEHead(nn.Module):
    """Estimator + Selector + shallow STDC stream + Ensembler + segmentation head (upstream `ISDHead` of RUE)."""

    def __init__(self, num_classes: int, channels: int = 128, final_channels: int = 64) -> None:
        super().__init__()
        self.stdc_net = STDCNet(in_channels=3, layers=(2, 2), out_strides=(8, 16))
        c8, c16 = self.stdc_net.channels
        self.score_head = ScoreHead(channels, channels // 2)
        self.reduce1 = Reducer(c16, final_channels)
        self.reduce2 = Reducer(c8, final_channels)
        self.reduce3 = Reducer(channels, final_channels)
        self.conv_seg_aux_16 = SegmentationHead(final_channels, final_channels // 2, num_classes)  # gives O_S

    def shallow(self, patches: torch.Tensor) -> torch.Tensor:
        """F_S = Up(reduce1(feat16)) + reduce2(feat8), 64 ch at stride 8 of the patch."""
        feat8, feat16 = self.stdc_net(patches)
        return _resize(self.reduce1(feat16), feat8.shape[-2:]) + self.reduce2(feat8)


# ---------------------------------------------------------------------------------------------------------------
# official layout (§11): only the module names are known (no checkpoint is released)

_OFFICIAL_RENAMES = (*RESNET_V1C_RENAMES, ("auxiliary_head.conv_seg.", "auxiliary_head.classifier."))
# present in the release's state dict but unused by its forward (§3.7, §11): skipped by name, not an error
_OFFICIAL_UNUSED = ("refine_head.conv_seg.",)


def official_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Release keys -> our keys (§11); returns (mapped, skipped)."""
    return map_official_keys(state, _OFFICIAL_RENAMES, _OFFICIAL_UNUSED)


# ---------------------------------------------------------------------------------------------------------------
# the method


@register_method
class RUE(UHRMethod):
    name = "rue"
    description = ("RUE: ResNet18-D8+DAPPM on the 4x-downsampled image, uncertainty-selected top-K full-resolution "
                   "patches through STDC, uncertainty-weighted fusion and loss")
    knobs = (Knob("k", sweep=(1.0, 0.75, 0.5, 0.25), label="K", bounds=(0.0, 1.0),
                  help="share of the P x P patches the shallow stream refines at inference (§13.8)"),)
    published = {"RUE (K = 100%)": {"k": 1.0}, "RUE (K = 75%)": {"k": 0.75}, "RUE (K = 50%)": {"k": 0.5}}
    # counted on the official model (RUE@ccbfce2 + the ad3097f DeepGlobe head, 7 classes) by
    # tests/golden/make_rue.py: 13,847,423 in all, less its never-used refine_head.conv_seg (903), less the
    # training-only auxiliary FCN head for inference
    param_counts = (ParamCount("official code, counted by tests/golden/make_rue.py", total=13_846_520,
                               inference=13_698_481),)

    def __init__(self, num_classes: int, pretrained: bool | str = False, stdc_pretrained: bool | str = False,
                 down_ratio: int = 4, deep_stem: bool = True, patch_num: int = 8, train_patch_num: int | None = None,
                 k: float = 1.0, train_k: float = 1.0, entropy_divisor: float | None = None, gamma: float = 1.0,
                 suppress_class: int | None = None, dropout: float = 0.1, aux_weight: float = 0.4,
                 ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        if down_ratio < 1:
            raise MethodError(f"rue: down_ratio must be >= 1, got {down_ratio}")
        if stdc_pretrained is True:
            raise MethodError("rue: stdc_pretrained must be false or a path to STDCNet813M_73.91.tar "
                              "(the STDC-Seg ImageNet file has no download URL)")
        for key, value in (("patch_num", patch_num), ("train_patch_num", train_patch_num)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise MethodError(f"rue: {key} must be a positive integer, got {value!r}")
        if entropy_divisor is None:
            entropy_divisor = math.log(num_classes)
        if entropy_divisor < math.log(num_classes) - 1e-9:
            raise MethodError(f"rue: entropy_divisor {entropy_divisor} < ln({num_classes}) = "
                              f"{math.log(num_classes):.4f} would let eps and U1 exceed 1 (upstream defect: Inria "
                              "constants on DeepGlobe, spec §12.1 #3); use ~ln C (0.7 Inria, 1.946 DeepGlobe)")
        if suppress_class is not None and not 0 <= suppress_class < num_classes:
            raise MethodError(f"rue: suppress_class must be a class id in [0, {num_classes}), got {suppress_class}")
        self.down_ratio = down_ratio
        self.patch_num = patch_num  # test-time grid P
        self.train_patch_num = train_patch_num or patch_num
        self.k = k  # test-time share of patches (validated by the property)
        self.train_k = check_k(train_k)
        self.entropy_divisor = float(entropy_divisor)
        self.gamma = float(gamma)
        self.suppress_class = suppress_class
        self.aux_weight = aux_weight
        channels = 128
        self.backbone = resnet_v1c(18, pretrained=pretrained, output_stride=8, deep_stem=deep_stem)
        self.decode_head = DeepHead(num_classes, 512, channels, dropout)
        self.auxiliary_head = FCNHead(256, 64, num_classes, num_convs=1, dropout=dropout)  # training only
        self.refine_head = RUEHead(num_classes, channels, 64)
        self._init_weights(stdc_pretrained)

    @property
    def k(self) -> float:
        """Share of the P x P patches sent through the shallow stream at inference; settable on a built model."""
        return self._k

    @k.setter
    def k(self, value: float) -> None:
        self._k = check_k(value)

    def _init_weights(self, stdc_pretrained: bool | str) -> None:
        # mmcv ConvModule init for the ConvModules (score head, O_S head, FCN aux); DAPPM and Reducers keep PyTorch
        # defaults as upstream (§3.7); mmseg Normal(0.01) on the `conv_seg` classifiers
        for module in (self.refine_head.score_head, self.refine_head.conv_seg_aux_16, self.auxiliary_head):
            init_conv_modules(module)
        init_conv_seg(self.decode_head.conv_seg)
        init_conv_seg(self.auxiliary_head.classifier)
        if stdc_pretrained:
            load_stdc_pretrained(self.refine_head.stdc_net, str(stdc_pretrained))
        else:
            init_stdc(self.refine_head.stdc_net)

    # -- forward ----------------------------------------------------------------------------------------------
    def _deep(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Deep stream on the nearest-downsampled normalised image (§3.1-§3.2)."""
        size = (x.shape[-2] // self.down_ratio, x.shape[-1] // self.down_ratio)
        stages = self.backbone.forward_intermediates(F.interpolate(x, size=size, mode="nearest"),
                                                     indices=[1, 2, 3, 4], intermediates_only=True)
        feat, logits = self.decode_head(stages[3])
        return {"stages": stages, "deep_feat": feat, "deep_logits": logits}

    def _estimate(self, deep: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(beta logits at F_D2 resolution, eps at O_D resolution)."""
        stages = deep["stages"]
        beta = self.refine_head.score_head(stages[0], stages[1])
        return beta, entropy_map(deep["deep_logits"], self.entropy_divisor)

    def run(self, x: torch.Tensor, patch_num: int, count: int) -> dict[str, torch.Tensor]:
        """Whole pipeline on a normalised batch with a P x P grid and `count` selected patches per image; returns
        every intermediate (tests and visualisation read them): deep outputs, beta, eps, u2, ids, shallow (F_S,
        (B, K, 64, s, s')), u1, deep_canvas, fused (F'_S), logits (O_S at the canvas size)."""
        out = self._deep(x)
        beta, eps = self._estimate(out)
        head = self.refine_head
        u2 = patch_scores(beta, eps, patch_num)
        ids = select_patches(u2, count)
        shallow = head.shallow(cut_patches(x, patch_num, ids))
        shallow = shallow.unflatten(0, (x.shape[0], count))
        canvas = (patch_num * shallow.shape[-2], patch_num * shallow.shape[-1])
        u1 = pixel_uncertainty(beta, eps, canvas)
        deep_canvas = _resize(head.reduce3(out["deep_feat"]), canvas)
        fused = ensemble(deep_canvas, u1, shallow, ids, patch_num)
        out.update(beta=beta, eps=eps, u2=u2, ids=ids, shallow=shallow, u1=u1, deep_canvas=deep_canvas, fused=fused,
                   logits=head.conv_seg_aux_16(fused))
        return out

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        logits = self.run(x, self.patch_num, num_selected(self.k, self.patch_num))["logits"]
        if self.suppress_class is not None:  # DeepGlobe: "unknown" never predicted (§3.6)
            logits = logits.clone()
            logits[:, self.suppress_class] -= 1000.0
        return _resize(logits, x.shape[-2:])

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms under the upstream log keys (§4), each already weighted."""
        x = self.normalize(images)
        out = self.run(x, self.train_patch_num, num_selected(self.train_k, self.train_patch_num))
        ce = mmseg_cross_entropy
        return {
            "decode.loss_seg": ce(out["deep_logits"], labels, self.ignore_index),
            "refine.loss_seg": useg_loss(out["logits"], out["u1"], labels, self.gamma, self.ignore_index),
            "aux.loss_seg": self.aux_weight * ce(self.auxiliary_head(out["stages"][2]), labels, self.ignore_index),
        }

    @property
    def outputs(self) -> tuple[Output, ...]:
        return (Output("uncertainty", "uncertainty", "U1, the pixel uncertainty the Ensembler weights by"),)

    def predict_output(self, images: torch.Tensor, output: str) -> torch.Tensor:
        if output == "uncertainty":
            return self.uncertainty_map(images)
        return super().predict_output(images, output)

    @torch.no_grad()
    def uncertainty_map(self, images: torch.Tensor) -> torch.Tensor:
        """U1 (B, 1, H, W) in [0, 1] at the input resolution: computed on the test-time fusion canvas (as the
        Ensembler sees it), bilinearly resized; clamped only against float rounding. Deep stream only."""
        x = self.normalize(images)
        beta, eps = self._estimate(self._deep(x))
        ph, pw = patch_size(x.shape[-2], x.shape[-1], self.patch_num)
        canvas = (self.patch_num * shallow_size(ph), self.patch_num * shallow_size(pw))
        return _resize(pixel_uncertainty(beta, eps, canvas), x.shape[-2:]).clamp_(0.0, 1.0)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """Load a checkpoint in the release's mmseg layout (§11; no RUE checkpoint is released, so this serves
        weights trained with the upstream code). Missing, unexpected or mis-shaped keys are named in the
        MethodError (strict) or in the returned LoadReport (strict=False, the matching tensors are loaded)."""
        state, skipped = official_to_ours(read_state_dict(path))
        report = self.load_mapped_state(state, path, strict)
        report.skipped = skipped
        return report

    def save_official(self, path: str) -> None:
        """This model in the release's mmseg layout (`{"state_dict": ...}`, §11 key names)."""
        torch.save({"state_dict": official_keys(self.state_dict(), _OFFICIAL_RENAMES)}, path)
