"""PointRend (Kirillov, Wu, He, Girshick, "PointRend: Image Segmentation as Rendering", CVPR 2020) in its semantic
segmentation setting as the UHR tables' "PointRend" row, composed with any registered one-phase base method (`base:`
in params). Facts cite docs/specs/pointrend.md (§N); upstream is detectron2 `projects/PointRend` @ 02b5c4e
(Apache-2.0: read for facts, written anew); tests/golden/make_pointrend.py checks ours against its functions.

Composition (ours, §11.2): detectron2's network is ResNet-FPN -> `SemSegFPNHead` (coarse logits at stride 4) +
`StandardPointHead`. Here the base method plays the coarse head: its `predict` logits, area-resized to the stride-4
grid (`H // 4` x `W // 4`, the native grid of `global` at downsample 4; area = the mean over each 4x4 block, what a
stride-4 cell stands for, where bilinear would alias a full-resolution base such as `local`). The refiner owns the
fine-grained features, PointRend's `p2` (§2.1): a timm ResNet + FPN top-down path (1x1 laterals, nearest x2, sum,
3x3 output conv, 256 channels, no norm, upstream names `fpn_lateral{2..5}` / `fpn_output2`) on the full-resolution
image padded with zeros to a multiple of 32 after normalisation (§3); only `fpn_output2` is built, since the point head
reads `p2` alone (`IN_FEATURES ["p2"]`) and p3-p6 fed only the coarse head the base replaces. Points are in [0, 1]²
of the image extent; `p2` of the padded image is sampled at the same points rescaled by image / padded size, so
padding never shifts a point (upstream samples the padded extent, §10.7: the same when the size divides by 32).

Point head (§2.3, `point_head.py:79-129`): fc1..fc3 = Conv1d(k 1) 256 wide + ReLU on cat[p2 at the points, coarse
logits at the points] (`coarse_pred_each_layer` False, the released semantic model), predictor Conv1d -> C; fc
init c2_msra_fill (kaiming normal, fan_out, ReLU gain; bias 0), predictor N(0, 0.001), bias 0.

Training (phase `refiner`, §4; the base frozen in eval): per image `train_num_points` (2048) points, 3x oversampled
uniform candidates, the 75 % most uncertain kept (uncertainty = -(top1 - top2) of the stride-4 coarse logits
bilinearly sampled at the candidates), the rest fresh uniform (`point_features.py:63-116`); labels sampled nearest at
the points (`semantic_seg.py:92-101`); point cross-entropy with the dataset's ignore index. The release also trains its
coarse head (CE on the x4 upsampled coarse logits) with the same loss sum; here the coarse net is the base, trained in
phase `base` with its own loss and frozen while the point head and the FPN learn. The backbone's BatchNorm trains
(timm, as mmseg's port) unless `freeze_bn` (detectron2's FrozenBN, §2.1, right with pretrained weights).

Inference (`semantic_seg.py:106-135`, §5): from the stride-4 coarse logits, `subdivision_steps` (2: stride 4 -> 1)
times: x2 bilinear (align_corners False), the `subdivision_num_points` (8192) most uncertain cells of the current map
re-predicted by the point head (fine features and the ORIGINAL coarse logits at the cell centres, §10.5) and scattered
in; then a bilinear resize to the image size (`sem_seg_postprocess`). Fine features are concatenated with `dim=1`
(upstream omits it at inference, §10.6: the same with one feature map).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Knob, MethodError, ParamCount, register_method
from methods.blocks.fpn import fpn_trunk
from methods.blocks.losses import resize_logits
from methods.blocks.refiner import BaseRefiner

COARSE_STRIDE = 4  # SemSegFPNHead's COMMON_STRIDE: the coarse logits and p2 (§2.2)
SIZE_DIVISIBILITY = 32  # the FPN pads its input to its coarsest stride (fpn.py:113, §3)


# ---------------------------------------------------------------------------------------------------------------
# point utilities (§2.4)

def point_sample(features: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Values of (N, C, H, W) `features` at (N, P, 2) points (x, y) in [0, 1]² -> (N, C, P): `grid_sample` with
    align_corners False and zero padding, as every upstream call (`point_features.py:19-42`)."""
    return F.grid_sample(features, 2.0 * coords[:, :, None] - 1.0, mode=mode, align_corners=False)[..., 0]


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) logits -> (N, 1, ...): top2 - top1, <= 0, largest where the two best logits are closest
    (`semantic_seg.py:19-33`; on logits, not probabilities, §10.3)."""
    top2 = torch.topk(logits, k=2, dim=1).values
    return (top2[:, 1] - top2[:, 0]).unsqueeze(1)


def uncertain_points_with_randomness(coarse: torch.Tensor, num_points: int, oversample_ratio: float,
                                     importance_ratio: float) -> torch.Tensor:
    """Training points (N, num_points, 2) (`point_features.py:63-116`): `int(num_points * oversample_ratio)` uniform
    candidates (one `torch.rand`), the `int(importance_ratio * num_points)` most uncertain of them by the coarse logits
    bilinearly sampled there (§10.4), then the rest uniform (a second `torch.rand`), in upstream's call order."""
    batch = coarse.shape[0]
    candidates = torch.rand(batch, int(num_points * oversample_ratio), 2, device=coarse.device)
    scores = uncertainty(point_sample(coarse, candidates))[:, 0]
    num_uncertain = int(importance_ratio * num_points)
    keep = torch.topk(scores, k=num_uncertain, dim=1).indices
    coords = torch.gather(candidates, 1, keep[..., None].expand(-1, -1, 2))
    if num_points > num_uncertain:
        coords = torch.cat([coords, torch.rand(batch, num_points - num_uncertain, 2, device=coarse.device)], dim=1)
    return coords


def uncertain_points_on_grid(uncertainty_map: torch.Tensor, num_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `min(H W, num_points)` most uncertain cells of an (N, 1, H, W) map: flat indices (N, P) and their cell
    centres (N, P, 2) in [0, 1]² (`point_features.py:119-143`)."""
    n, _, h, w = uncertainty_map.shape
    indices = torch.topk(uncertainty_map.view(n, h * w), k=min(h * w, num_points), dim=1).indices
    centres = torch.stack([((indices % w).float() + 0.5) / w, ((indices // w).float() + 0.5) / h], dim=2)
    return indices, centres


def subdivision_step(logits: torch.Tensor, num_points: int,
                     predict_points: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One inference step (`semantic_seg.py:108-134`): x2 bilinear, the most uncertain cells of the upsampled map
    re-predicted by `predict_points(centres (N, P, 2)) -> (N, C, P)` and scattered in. Returns (map, indices)."""
    logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
    n, c, h, w = logits.shape
    indices, centres = uncertain_points_on_grid(uncertainty(logits), num_points)
    point_logits = predict_points(centres).to(logits.dtype)
    refined = logits.reshape(n, c, h * w).scatter(2, indices[:, None].expand(-1, c, -1), point_logits)
    return refined.view(n, c, h, w), indices


# ---------------------------------------------------------------------------------------------------------------
# the refiner: p2 features and the point head

class StandardPointHead(nn.Module):
    """§2.3: cat[fine (in_channels), coarse (C)] -> `num_fc` x (Conv1d k 1, `fc_dim`, ReLU) -> predictor -> C;
    upstream module names (fc1.., predictor) so a detectron2 `point_head.*` state dict maps key for key."""

    def __init__(self, in_channels: int, num_classes: int, fc_dim: int = 256, num_fc: int = 3) -> None:
        super().__init__()
        self.num_fc = num_fc
        width = in_channels + num_classes
        for k in range(1, num_fc + 1):
            fc = nn.Conv1d(width, fc_dim, kernel_size=1)
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")  # fvcore c2_msra_fill
            nn.init.zeros_(fc.bias)
            self.add_module(f"fc{k}", fc)
            width = fc_dim
        self.predictor = nn.Conv1d(width, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fine, coarse], dim=1)
        for k in range(1, self.num_fc + 1):
            x = F.relu(getattr(self, f"fc{k}")(x))
        return self.predictor(x)


class PointRendRefiner(nn.Module):
    """ResNet trunk (timm, C2..C5) + detectron2's FPN top-down path to `p2` (§2.1) + the point head."""

    def __init__(self, num_classes: int, backbone: str, pretrained: bool | str, fpn_channels: int, fc_dim: int,
                 freeze_bn: bool) -> None:
        super().__init__()
        self.trunk = fpn_trunk(backbone, pretrained, "pointrend")
        if freeze_bn:
            from timm.layers import freeze_batch_norm_2d

            self.trunk = freeze_batch_norm_2d(self.trunk)
        for stage, channels in zip((2, 3, 4, 5), self.trunk.feature_info.channels(), strict=True):
            self.add_module(f"fpn_lateral{stage}", nn.Conv2d(channels, fpn_channels, 1))
        self.fpn_output2 = nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1)
        for name in ("fpn_lateral2", "fpn_lateral3", "fpn_lateral4", "fpn_lateral5", "fpn_output2"):
            conv = getattr(self, name)
            nn.init.kaiming_uniform_(conv.weight, a=1)  # fvcore c2_xavier_fill (fpn.py:85-86)
            nn.init.zeros_(conv.bias)
        self.point_head = StandardPointHead(fpn_channels, num_classes, fc_dim)

    def p2(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image (B, 3, H, W) -> (p2 of the zero-padded image, (W / W_pad, H / H_pad)): the factor that
        maps a point of the image extent onto the padded map."""
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % SIZE_DIVISIBILITY, -w % SIZE_DIVISIBILITY
        c2, c3, c4, c5 = self.trunk(F.pad(x, (0, pad_w, 0, pad_h)))
        top = self.fpn_lateral5(c5)
        for lateral, c in ((self.fpn_lateral4, c4), (self.fpn_lateral3, c3), (self.fpn_lateral2, c2)):
            top = lateral(c) + F.interpolate(top, scale_factor=2.0, mode="nearest")  # fpn.py:153
        scale = torch.tensor([w / (w + pad_w), h / (h + pad_h)], device=x.device)
        return self.fpn_output2(top), scale

    def point_logits(self, p2: torch.Tensor, scale: torch.Tensor, coarse: torch.Tensor,
                     coords: torch.Tensor) -> torch.Tensor:
        """Point-head logits (N, C, P) at image-extent points (N, P, 2)."""
        fine = point_sample(p2, coords * scale.to(coords.dtype))
        return self.point_head(fine, point_sample(coarse.to(fine.dtype), coords))


# ---------------------------------------------------------------------------------------------------------------
# the method

@register_method
class PointRend(BaseRefiner):
    name = "pointrend"
    description = ("PointRend: point head on ResNet-FPN p2 features re-predicting the most uncertain points of a "
                   "base method's stride-4 logits over 2 subdivision steps (base: in params; CVPR 2020)")
    knobs = (Knob("subdivision_num_points", sweep=(8192, 2048, 32768), label="points",
                  bounds=(0.0, float("inf")), help="cells re-predicted per subdivision step (detectron2: 8192)"),)
    published = {"PointRend": {}}
    # spec §7 at C = 7 (the official network, 47,564,878) less what the base replaces (the coarse head, 1,624,711) and
    # the FPN outputs p3-p5 only that head read (3 x 590,080); FrozenBN (freeze_bn) keeps BN affine out of the count
    param_counts = (
        ParamCount("spec §7: StandardPointHead 197,376 + 513 C; FPN laterals 984,064 + fpn_output2 590,080; "
                   "R101-FPN + point head 47,564,878 - 1,624,711 - 1,770,240",
                   named={"point_head": 197_376 + 513 * 7, "fpn": 984_064 + 590_080, "refiner": 44_169_927},
                   config={"base": "global", "backbone": "resnet101", "freeze_bn": True}),)

    def __init__(self, num_classes: int, ignore_index: int = 255, base: str = "global", base_model: dict | None = None,
                 backbone: str = "resnet101", pretrained: bool | str = False, freeze_bn: bool = False,
                 fpn_channels: int = 256, fc_dim: int = 256, train_num_points: int = 2048,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75, subdivision_steps: int = 2,
                 subdivision_num_points: int = 8192) -> None:
        super().__init__(num_classes, ignore_index, base, base_model)
        if oversample_ratio < 1:
            raise MethodError(f"pointrend: oversample_ratio must be >= 1 (official 3), got {oversample_ratio}")
        if not 0 <= importance_sample_ratio <= 1:
            raise MethodError("pointrend: importance_sample_ratio must lie in [0, 1] (official 0.75), "
                              f"got {importance_sample_ratio}")
        for key, value in (("train_num_points", train_num_points), ("subdivision_num_points", subdivision_num_points),
                           ("fpn_channels", fpn_channels), ("fc_dim", fc_dim)):
            if value < 1:
                raise MethodError(f"pointrend: {key} must be a positive integer, got {value}")
        if subdivision_steps < 0:
            raise MethodError(f"pointrend: subdivision_steps must be >= 0 (2: stride 4 to 1), got {subdivision_steps}")
        self.train_num_points, self.subdivision_steps = int(train_num_points), int(subdivision_steps)
        self.oversample_ratio, self.importance_sample_ratio = float(oversample_ratio), float(importance_sample_ratio)
        self.subdivision_num_points = int(subdivision_num_points)
        self.refiner = PointRendRefiner(num_classes, backbone, pretrained, int(fpn_channels), int(fc_dim),
                                        bool(freeze_bn))

    def parameter_counts(self) -> dict[str, int]:
        fpn = [m for n, m in self.refiner.named_children() if n.startswith("fpn_")]
        return {**super().parameter_counts(),
                "point_head": sum(p.numel() for p in self.refiner.point_head.parameters()),
                "fpn": sum(p.numel() for m in fpn for p in m.parameters())}

    def coarse_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The base's logits area-resized to the stride-4 grid (H // 4, W // 4), float32 (module docstring)."""
        h, w = images.shape[-2:]
        logits = self.base.predict(images).float()
        return F.interpolate(logits, size=(max(1, h // COARSE_STRIDE), max(1, w // COARSE_STRIDE)), mode="area")

    def refine_logits(self, coarse: torch.Tensor, p2: torch.Tensor,
                      scale: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Subdivision inference (§5 step 3) from stride-4 coarse logits and p2: (logits at stride
        4 / 2^steps, the re-predicted flat indices of each step)."""
        logits, chosen = coarse, []
        for _ in range(self.subdivision_steps):
            logits, indices = subdivision_step(logits, self.subdivision_num_points,
                                               lambda coords: self.refiner.point_logits(p2, scale, coarse, coords))
            chosen.append(indices)
        return logits, chosen

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        coarse = self.coarse_logits(images)
        p2, scale = self.refiner.p2(self.normalize(images))
        return resize_logits(self.refine_logits(coarse, p2, scale)[0], images.shape[-2:])

    def point_loss(self, coarse: torch.Tensor, p2: torch.Tensor, scale: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
        """§4: point cross-entropy at `train_num_points` uncertainty-sampled points per image, labels (B, H, W) of
        the image extent sampled nearest there (`semantic_seg.py:74-104`)."""
        with torch.no_grad():
            coords = uncertain_points_with_randomness(coarse, self.train_num_points, self.oversample_ratio,
                                                      self.importance_sample_ratio)
            targets = point_sample(labels[:, None].float(), coords, mode="nearest")[:, 0].long()
        point_logits = self.refiner.point_logits(p2, scale, coarse, coords).float()
        if not (targets != self.ignore_index).any():  # every point ignored: 0 with a graph, not NaN
            return point_logits.sum() * 0.0
        return F.cross_entropy(point_logits, targets, ignore_index=self.ignore_index)

    def refiner_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            coarse = self.coarse_logits(images)
        p2, scale = self.refiner.p2(self.normalize(images))
        return {"loss_point": self.point_loss(coarse, p2, scale, labels)}
