"""MagNet (Huynh et al., "Progressive Semantic Segmentation", CVPR 2021): a segmentation backbone run on tiles of an
image pyramid and a small refinement module that fuses each tile's prediction with the cumulative one; stage by
stage, the pixels where the cumulative map is uncertain and the refined one confident are replaced. Facts cite
docs/specs/magnet.md (§N); upstream is VinAIResearch/MagNet @ 7f5b876 (AGPL-3.0: studied, never copied).

The default is the DeepGlobe release (§2.1, §4, §7.4): ResNet-50-FPN backbone, scales 612², 1224², 2448², crop 612,
network input 508, n_points 0.75, median kernel 11, one refiner shared by both refinement stages.

Sizes on any input. `scales` are fractions of the input (0.25, 0.5, 1.0); `crop_size`, `input_size` and the 10-px
tile margin are pixels at `native_size` (2448, DeepGlobe's side) and are scaled per axis by input / native_size
(rounded), so a 2448² image runs exactly upstream's 612/1224/2448, 612 -> 508 schedule and a 1224² image runs
306/612/1224, 306 -> 254. The first scale must equal the crop (one tile: the stage-0 whole view, §2.4).

Knobs (same trained weights, §4.6): `n_points` (a fraction <= 1 of the scale map's pixels, times the share of tiles
refined; > 1 an absolute count, §4.4) and `n_patches` (None or 0: every tile; MagNet-Fast: n_points 0.9,
n_patches 3).

Upstream defects (§8.1), reproduced by default, corrected with `fast_selection="corrected"`: in MagNet-Fast the
release keeps the tiles of *lowest* mean uncertainty (D1: ascending sort) and zeroes the certainty *inside* the
refined tiles (D2); corrected keeps the most uncertain tiles and zeroes it outside them. Full MagNet is the same
either way. Deviations on purpose: overlapping tiles (non-native sizes only; never in the release) are averaged
instead of overwritten (D5); the refiner is trained with its inputs in the inference order [scale-specific,
cumulative] (D3; upstream's train.py swaps them); the backbone's training crop is drawn at random, not the top-left
tile (D6); no ImageNet download in the constructor (D8, `pretrained`); strict checkpoint loading (D10).

The uint8 resizes are OpenCV's INTER_LINEAR (methods/blocks/cv2_resize.py; its scalar path: OpenCV's SIMD path may
differ by one grey level on tiles resized by a non-integer factor). `predict` returns log-probabilities (the
cumulative map is a probability map, §4.1); `probabilities` returns the map itself.

Cityscapes (§2.2, §4, §7.4): `backbone="hrnet18_ocr"` (upstream's `--model hrnet18+ocr`, also accepted) is
HRNetV2-W18-Small-v2 with a stride-1 stem and the OCR head (methods/blocks/hrnet.py; align_corners=True throughout; the
network's output is the logit mix (out + 0.4 aux) / 1.4, training weighs CE(out) + 0.4 CE(aux), §5.1, without
upstream's Cityscapes class weights). `MagNet.CITYSCAPES` holds the release's test flags as our keywords: native size
1024x2048, scales 1/8, 1/4, 1/2, 1 (256x128, 512x256, 1024x512, 2048x1024), crop = network input = 128x256 (tiles
are fed as they are), n_points 32768 (absolute, at any input size), median kernel 5, and `refiners=3`: one refiner
per refinement stage (the release's `cityscapes_refinement_{512,1024,2048}.pth`; stage s runs refiner
min(refiners, s) - 1 as upstream's test.py). Each of several refiners is trained on pairs of its own stage's scale
(upstream does not document how its three were trained, §5.2).
"""
from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from methods.base import Knob, LoadReport, MethodError, ParamCount, Phase, UHRMethod, count_parameters, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.cv2_resize import cv2_linear_resize, nearest_resize
from methods.blocks.fpn import WIDTH, GlobalFPN, fpn_trunk
from methods.blocks.hrnet import AUX_WEIGHT, Bottleneck, HRNetOCR, load_imagenet

BACKBONE, REFINER = "backbone", "refiner"
FAST_SELECTIONS = ("upstream", "corrected")
RELEASE_FILES = {BACKBONE: "deepglobe_fpn.pth", REFINER: "deepglobe_refinement.pth"}  # §5.3
HRNET = "hrnet18_ocr"  # also upstream's spelling "hrnet18+ocr"
CITYSCAPES_FILES = {BACKBONE: "cityscapes_hrnet.pth", REFINER: "cityscapes_refinement.pth"}  # + _<width> when 3
BN_MOMENTUM = 0.01  # upstream base.py BN_MOMENTUM (bottlenecks, refiner)
MARGIN = 10  # interior margin of a stitched tile, pixels at the native size (§4.3)


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, int | float) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise MethodError(f"magnet: {what} must be a positive int or [h, w], got {value!r}")
    return pair


# ---------------------------------------------------------------------------------------------------
# Networks (§2.1, §3)


class FPNBackbone(GlobalFPN):
    """Upstream `ResnetFPN` (§2.1): a torchvision-layout ResNet (`resnet_backbone.*`) and GLNet's linear FPN head
    (`toplayer`, `latlayer1-3`, `smooth{1-4}_{1,2}`, `classify`: same names and order), logits resized to the input.
    Head convs keep PyTorch's default init; BN momentum 0.01 in the bottlenecks, 0.1 in the stem and shortcuts."""

    def __init__(self, num_classes: int, backbone: str = "resnet50", pretrained: bool | str = False,
                 width: int = WIDTH) -> None:
        trunk = fpn_trunk(backbone, pretrained, "magnet")
        super().__init__(trunk.feature_info.channels(), num_classes, ext=False, width=width)
        for m in self.children():
            m.reset_parameters()  # GlobalFPN draws GLNet's N(0, 0.01); MagNet keeps the default
        self.resnet_backbone = trunk
        for name, m in trunk.named_modules():
            if name.startswith("layer") and isinstance(m, nn.BatchNorm2d) and "downsample" not in name:
                m.momentum = BN_MOMENTUM

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(self.resnet_backbone(x)[::-1])
        return F.interpolate(out.logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class Refiner(nn.Module):
    """`RefinementMagNet(C, use_bn=True)` (§3): BN on the 2C-channel input, two 3x3 conv-BN-ReLU (64), two
    bottlenecks (64 -> 128, 128 -> 128), a bias-free 1x1 classifier. Input order [scale-specific, cumulative]."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(2 * num_classes, momentum=BN_MOMENTUM)
        self.conv1 = nn.Conv2d(2 * num_classes, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.residual = nn.Sequential(Bottleneck(64, 32), Bottleneck(128, 32))  # the first with a 1x1 + BN shortcut
        self.seg_conv = nn.Conv2d(128, num_classes, 1, bias=False)

    def forward(self, scale_specific: torch.Tensor, cumulative: torch.Tensor) -> torch.Tensor:
        x = self.bn0(torch.cat([scale_specific, cumulative], dim=1))
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.seg_conv(self.residual(x))


# ---------------------------------------------------------------------------------------------------
# Geometry (§2.4, §4.2-4.5)


def patch_boxes(scale: tuple[int, int], crop: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Upstream's tile grid of a (h, w) scale map: (x0, y0, x1, y1) pixel boxes, x outer, y inner (column-major),
    n = ceil(side / crop), step = int(crop - (n * crop - side) / max(n - 1, 1)) (§2.4)."""
    (sh, sw), (ch, cw) = scale, crop
    if ch > sh or cw > sw:
        raise MethodError(f"magnet: crop {ch}x{cw} is larger than the scale {sh}x{sw}")
    nx, ny = math.ceil(sw / cw), math.ceil(sh / ch)
    step_x = int(cw - (nx * cw - sw) / max(nx - 1, 1.0))
    step_y = int(ch - (ny * ch - sh) / max(ny - 1, 1.0))
    return [(x * step_x, y * step_y, x * step_x + cw, y * step_y + ch) for x in range(nx) for y in range(ny)]


def margin(probs: torch.Tensor) -> torch.Tensor:
    """p(1) - p(2), the top-2 difference per pixel (B, 1, H, W): upstream's certainty (§4.2)."""
    top2 = torch.topk(probs, k=2, dim=1)[0]
    return (top2[:, 0] - top2[:, 1]).unsqueeze(1)


def median_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """k x k median with zero padding (upstream MedianBlur, §4.4); (B, 1, H, W)."""
    b, c, h, w = x.shape
    cols = F.unfold(x.reshape(b * c, 1, h, w), k, padding=(k - 1) // 2)
    return torch.median(cols, dim=1)[0].view(b, c, h, w)


def points_to_refine(n_points: float, scale: tuple[int, int], refined: int, total: int) -> int:
    """k of §4.4: a fraction <= 1 of the scale map's pixels times refined/total tiles; > 1 an absolute count capped
    at that share (an int, D12)."""
    pixels = scale[0] * scale[1]
    if n_points > 1.0:
        return int(min(int(n_points), pixels * refined / total))
    return int(pixels * n_points * refined / total)


def top_points(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest values of a (1, 1, H, W) score, flattened (topk unsorted, as upstream)."""
    flat = score.view(1, -1)
    k = min(k, flat.shape[1])
    if k == flat.shape[1]:
        return torch.arange(k, device=score.device).view(1, -1)
    return torch.topk(flat, k=k, dim=1, sorted=False)[1]


def sample_at_pixels(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Values (1, C, k) of a (1, C, H, W) map at flat pixel indices, read as upstream does (§4.5): bilinear
    grid_sample at the normalised pixel centres (equal to the pixels up to float rounding of the coordinates)."""
    _, _, h, w = maps.shape
    h_step, w_step = 1.0 / float(h), 1.0 / float(w)
    coords = torch.zeros(1, index.shape[1], 2, dtype=torch.float, device=maps.device)
    coords[:, :, 0] = w_step / 2.0 + (index % w).to(torch.float) * w_step
    coords[:, :, 1] = h_step / 2.0 + (index // w).to(torch.float) * h_step
    return F.grid_sample(maps, (2.0 * coords - 1.0).unsqueeze(2), align_corners=False).squeeze(3)


def ohem_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, thresh: float = 0.7,
            min_kept: int = 100_000) -> torch.Tensor:
    """Upstream OhemCrossEntropy (§5.2): mean CE over the valid pixels whose true-class probability is below
    max(the min_kept-th smallest such probability, thresh)."""
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none").view(-1)
    valid = labels.view(-1) != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    prob = F.softmax(logits.detach(), dim=1).gather(1, torch.where(labels == ignore_index, 0, labels).unsqueeze(1))
    prob, order = prob.view(-1)[valid].sort()
    threshold = max(float(prob[min(max(1, min_kept), prob.numel() - 1)]), thresh)
    kept = losses[valid][order][prob < threshold]
    return kept.mean() if kept.numel() else logits.sum() * 0.0


# ---------------------------------------------------------------------------------------------------
# The method


@register_method
class MagNet(UHRMethod):
    name = "magnet"
    description = ("MagNet: ResNet-50-FPN on a 3-scale tile pyramid + refinement module, progressive top-k point "
                   "replacement (CVPR 2021); knobs n_points / n_patches (MagNet-Fast: 0.9 / 3)")
    knobs = (Knob("n_points", sweep=(0.75, 0.9, 0.5, 0.25), label="points", bounds=(0.0, float("inf")),
                  help="pixels replaced per stage: a fraction (<= 1) of the scale map times the share of tiles "
                       "refined, or an absolute count (> 1)"),
             Knob("n_patches", sweep=(0, 3, 8), label="patches",
                  help="tiles refined per stage (0: all); MagNet-Fast uses 3"))
    published = {"MagNet": {}, "MagNet-Fast": {"n_points": 0.9, "n_patches": 3}}
    # upstream's Cityscapes test flags (scripts/cityscapes/test_magnet.sh, spec §7.4) as our keywords
    CITYSCAPES = {"backbone": HRNET, "native_size": (1024, 2048), "scales": (0.125, 0.25, 0.5, 1.0),
                  "crop_size": (128, 256), "input_size": (128, 256), "n_points": 32768, "smooth_kernel": 5,
                  "refiners": 3}
    param_counts = (  # spec §3.1, §9 items 1-2
        ParamCount("spec §3.1 (DeepGlobe, 7 classes)", total=28_152_931,
                   named={"backbone": 28_064_839, "refiner": 88_092}),
        ParamCount("spec §3.1 (refiner, 19 classes)", named={"refiner": 103_500}, num_classes=19),
        ParamCount("spec §3.1 (Cityscapes HRNet-W18-Small-v2 + OCR, three refiners, 19 classes)", total=6_689_778,
                   named={"backbone": 6_379_278, "refiner": 3 * 103_500, "hrnet": 3_860_720,
                          "conv3x3_ocr": 1_245_696, "ocr_distri_head": 1_184_256, "aux_head": 78_859,
                          "cls_head": 9_747}, num_classes=19, config=CITYSCAPES),
    )

    def __init__(self, num_classes: int, backbone: str = "resnet50", pretrained: bool | str = False,
                 head_width: int = WIDTH, native_size: int | tuple[int, int] = 2448,
                 scales: tuple[float, ...] = (0.25, 0.5, 1.0), crop_size: int | tuple[int, int] = 612,
                 input_size: int | tuple[int, int] = 508, n_points: float = 0.75, n_patches: int | None = None,
                 smooth_kernel: int = 11, fast_selection: str = "upstream", sub_batch_size: int = 4,
                 ohem_thresh: float = 0.7, ohem_min_kept: int = 100_000, ignore_index: int = 255,
                 refiners: int = 1) -> None:
        super().__init__(num_classes, ignore_index)
        backbone = HRNET if backbone == "hrnet18+ocr" else backbone
        if backbone.startswith("hrnet") and backbone != HRNET:
            raise MethodError(f"magnet: backbone '{backbone}' is not upstream's; the HRNet backbone is '{HRNET}' "
                              "(W18-Small-v2 + OCR, spec §2.2)")
        if fast_selection not in FAST_SELECTIONS:
            raise MethodError(f"magnet: fast_selection must be one of {', '.join(FAST_SELECTIONS)}, "
                              f"got '{fast_selection}'")
        scales = tuple(float(s) for s in scales)
        if len(scales) < 2 or any(b <= a for a, b in zip(scales, scales[1:], strict=False)) or scales[0] <= 0:
            raise MethodError(f"magnet: scales must be >= 2 increasing positive fractions of the input, got {scales}")
        if smooth_kernel < 1 or smooth_kernel % 2 == 0:
            raise MethodError(f"magnet: smooth_kernel must be odd (D11), got {smooth_kernel}")
        if n_points <= 0:
            raise MethodError(f"magnet: n_points must be > 0, got {n_points}")
        if n_patches is not None and int(n_patches) < 0:
            raise MethodError(f"magnet: n_patches must be None, 0 (all tiles) or a positive count, got {n_patches}")
        if sub_batch_size < 1:
            raise MethodError("magnet: sub_batch_size must be >= 1")
        if refiners not in (1, len(scales) - 1):
            raise MethodError(f"magnet: refiners must be 1 (shared by every stage) or one per refinement stage "
                              f"({len(scales) - 1}), got {refiners}")
        self.native = _pair(native_size, "native_size")
        self.crop, self.input = _pair(crop_size, "crop_size"), _pair(input_size, "input_size")
        if any(abs(scales[0] * n - c) > 0.5 for n, c in zip(self.native, self.crop, strict=True)):
            raise MethodError(f"magnet: the first scale ({scales[0]} x native {self.native}) must equal the crop "
                              f"{self.crop}: stage 0 is one tile (D11)")
        self.scales = scales
        self.n_points, self.n_patches = float(n_points), (int(n_patches) if n_patches else 0)
        self.smooth_kernel, self.fast_selection, self.sub_batch_size = smooth_kernel, fast_selection, sub_batch_size
        self.ohem_thresh, self.ohem_min_kept = ohem_thresh, ohem_min_kept
        self.hrnet = backbone == HRNET
        if self.hrnet:
            self.backbone = HRNetOCR(num_classes)
            if pretrained:
                try:
                    load_imagenet(self.backbone, pretrained)
                except (ValueError, OSError, RuntimeError) as exc:
                    raise MethodError(f"magnet: cannot initialise {HRNET} from ImageNet weights: {exc}") from exc
        else:
            self.backbone = FPNBackbone(num_classes, backbone, pretrained, head_width)
        # one refiner: `refiner.*` (the DeepGlobe layout); several: `refiner.<i>.*`, one per stage (Cityscapes)
        self.refiner = Refiner(num_classes) if refiners == 1 else nn.ModuleList(
            Refiner(num_classes) for _ in range(refiners))

    def stage_refiner(self, stage: int) -> Refiner:
        """The refiner of refinement stage `stage` (1, 2, ...): upstream's refiners[min(len, stage) - 1]."""
        if isinstance(self.refiner, nn.ModuleList):
            return self.refiner[min(len(self.refiner), stage) - 1]
        return self.refiner

    def release_files(self) -> tuple[str, list[str]]:
        """The released file names (§5.3): backbone, then the refiners in stage order: one shared refiner
        `<dataset>_refinement.pth`, several `<dataset>_refinement_<scale width at the native size>.pth`."""
        files = CITYSCAPES_FILES if self.hrnet else RELEASE_FILES
        if not isinstance(self.refiner, nn.ModuleList):
            return files[BACKBONE], [files[REFINER]]
        widths = [round(self.native[1] * s) for s in self.scales[1:]]
        return files[BACKBONE], [files[REFINER].replace(".pth", f"_{w}.pth") for w in widths]

    # ---- sizes ----------------------------------------------------------------------------------------

    def schedule(self, height: int, width: int) -> tuple[list[tuple[int, int]], tuple[int, int], tuple[int, int], int]:
        """(scale sizes (h, w), crop (h, w), network input (h, w), tile margin) for an input of (height, width)."""
        rh, rw = height / self.native[0], width / self.native[1]
        scales = [(max(1, round(height * s)), max(1, round(width * s))) for s in self.scales]
        crop = (max(1, round(self.crop[0] * rh)), max(1, round(self.crop[1] * rw)))
        inp = (max(1, round(self.input[0] * rh)), max(1, round(self.input[1] * rw)))
        scales[0] = crop  # equal at the native size; guards rounding elsewhere
        return scales, crop, inp, round(MARGIN * min(rh, rw))

    # ---- phases -------------------------------------------------------------------------------------

    @property
    def phases(self) -> list[Phase]:
        """Backbone (segmentation loss on random crops, §5.1), then the refiner with the backbone frozen (§5.2)."""
        return [Phase(BACKBONE, (BACKBONE,), BACKBONE, (REFINER,)),
                Phase(REFINER, (REFINER,), REFINER, (BACKBONE,))]

    def parameter_counts(self) -> dict[str, int]:
        counts = {"backbone": count_parameters(self.backbone), "refiner": count_parameters(self.refiner),
                  "total": count_parameters(self)}
        return {**counts, **self.backbone.parameter_counts()} if self.hrnet else counts

    # ---- input ----------------------------------------------------------------------------------------

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB -> ToTensor (x / 255) then Normalize(mean, std) as upstream (§2.3), in float32; the 0-1 statistics
        are pixel_mean / 255 rounded to 6 decimals (123.675 -> 0.485 exactly as upstream's float32 constant)."""
        mean = (torch.round(self.pixel_mean.double() / 255.0 * 1e6) / 1e6).float()
        std = (torch.round(self.pixel_std.double() / 255.0 * 1e6) / 1e6).float()
        return (images.float() / 255.0 - mean) / std

    def _tiles(self, image: torch.Tensor, scale: tuple[int, int], boxes, inp: tuple[int, int]) -> torch.Tensor:
        """The image resized to a scale, cut into its tiles, each resized to the network input (uint8 values)."""
        scaled = cv2_linear_resize(image, scale)
        return torch.cat([cv2_linear_resize(scaled[..., y0:y1, x0:x1], inp) for x0, y0, x1, y1 in boxes])

    def _batched(self, fn, *tensors: torch.Tensor) -> torch.Tensor:
        n, b = tensors[0].shape[0], self.sub_batch_size
        return torch.cat([fn(*(t[i:i + b] for t in tensors)) for i in range(0, n, b)])

    def _backbone_probs(self, tiles: torch.Tensor) -> torch.Tensor:
        return self._batched(lambda t: torch.softmax(self.backbone(self._to_input(t)), dim=1), tiles)

    # ---- inference (§4) -----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, C, H, W) of the final cumulative map."""
        return self.probabilities(images).clamp_min(torch.finfo(torch.float32).tiny).log()

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """The final cumulative probability map (B, C, H, W), image by image."""
        return torch.cat([self._progressive(images[i:i + 1].float())[-1] for i in range(images.shape[0])])

    @torch.no_grad()
    def _progressive(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The cumulative map after each stage (stage 0 at the network input size, then at each scale)."""
        scales, crop, inp, margin_px = self.schedule(*image.shape[-2:])
        p = self._backbone_probs(self._tiles(image, scales[0], patch_boxes(scales[0], crop)[:1], inp))
        maps = [p]
        for stage, scale in enumerate(scales[1:], start=1):
            p = self._stage(image, p, scale, crop, inp, margin_px, stage)
            maps.append(p)
        if tuple(maps[-1].shape[-2:]) != tuple(image.shape[-2:]):
            maps[-1] = F.interpolate(maps[-1], size=image.shape[-2:], mode="bilinear", align_corners=False)
        return maps

    def _stage(self, image: torch.Tensor, p: torch.Tensor, scale: tuple[int, int], crop: tuple[int, int],
               inp: tuple[int, int], margin_px: int, stage: int = 1) -> torch.Tensor:
        """Refinement stage `stage` (§4.1; 1 = the first after the coarse pass): the new cumulative map at `scale`."""
        boxes = patch_boxes(scale, crop)
        h, w = scale
        p = F.interpolate(p, size=scale, mode="bilinear", align_corners=False)
        # float32 ratios scaled in float32, as upstream's get_patch_coords tensor (§4.1)
        ratios = torch.tensor([(x0 / w, y0 / h, x1 / w, y1 / h) for x0, y0, x1, y1 in boxes], dtype=torch.float32)
        coords = ratios.clone()
        coords[:, 0::2] = coords[:, 0::2] * w
        coords[:, 1::2] = coords[:, 1::2] * h
        coords = coords.to(p)
        uncertainty = 1.0 - margin(p)
        selected = torch.arange(len(boxes))
        if self.n_patches:
            tile_u = roi_align(uncertainty, [coords], output_size=inp).mean((1, 2, 3))
            order = torch.sort(tile_u, descending=self.fast_selection == "corrected")[1]
            selected = order[: self.n_patches].cpu()
        tiles = self._tiles(image, scale, [boxes[i] for i in selected.tolist()], inp)
        scale_specific = self._backbone_probs(tiles)
        cumulative = roi_align(p, [coords[selected.to(coords.device)]], output_size=inp)
        refiner = self.stage_refiner(stage)
        refined = self._batched(lambda a, b: torch.softmax(refiner(a, b), dim=1), scale_specific, cumulative)
        rmap, inner = self._stitch(refined, ratios[selected], scale, margin_px)
        certainty = margin(rmap)
        if self.n_patches:  # D2: upstream zeroes inside the refined tiles; corrected: outside them
            certainty[:, :, inner if self.fast_selection == "upstream" else ~inner] = 0.0
        score = certainty * uncertainty
        score = F.interpolate(score, size=inp)  # legacy nearest, as upstream
        score = F.interpolate(median_blur(score, self.smooth_kernel), size=scale)
        k = points_to_refine(self.n_points, scale, len(selected), len(boxes))
        index = top_points(score, k)
        values = sample_at_pixels(rmap, index)
        if self.n_patches:  # only points inside the refined tiles' interiors
            keep = sample_at_pixels(inner.to(rmap.dtype)[None, None], index)[0, 0].bool()
            index, values = index[:, keep], values[:, :, keep]
        c = p.shape[1]
        return p.reshape(1, c, h * w).scatter(2, index.unsqueeze(1).expand(-1, c, -1), values).view(1, c, h, w)

    @staticmethod
    def _stitch(tiles: torch.Tensor, ratios: torch.Tensor, scale: tuple[int, int],
                margin_px: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream `ensemble` (§4.3): tiles resized (bilinear) to the first box's size and placed at their boxes
        (corners round(ratio * size)); zeros where no tile lies; `inner` = box interiors shrunk by the margin.
        Overlapping tiles are averaged (D5; upstream overwrites, never the case in its settings)."""
        h, w = scale
        size = torch.tensor([w, h, w, h], dtype=torch.float32)
        corners = [tuple(int(v) for v in (r * size).round().tolist()) for r in ratios]  # float32, half to even
        x0, y0, x1, y1 = corners[0]
        tiles = F.interpolate(tiles, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        canvas = tiles.new_zeros(1, tiles.shape[1], h, w)
        cover = tiles.new_zeros(1, 1, h, w)
        inner = torch.zeros(h, w, dtype=torch.bool, device=tiles.device)
        for tile, (x0, y0, x1, y1) in zip(tiles, corners, strict=True):
            canvas[:, :, y0:y1, x0:x1] += tile
            cover[:, :, y0:y1, x0:x1] += 1
            inner[y0 + margin_px:y1 - margin_px, x0 + margin_px:x1 - margin_px] = True
        if cover.max() > 1:
            canvas = canvas / cover.clamp_min(1)
        return canvas, inner

    # ---- training (§5) ------------------------------------------------------------------------------

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.phase is None:
            raise MethodError("magnet: call set_phase('backbone' or 'refiner') before forward_train")
        if self.phase == BACKBONE:
            return self._train_backbone(images, labels)
        return self._train_refiner(images, labels)

    def _random_crop(self, image: torch.Tensor, label: torch.Tensor, crop: tuple[int, int]):
        h, w = image.shape[-2:]
        y = random.randrange(max(1, h - crop[0] + 1))
        x = random.randrange(max(1, w - crop[1] + 1))
        return image[..., y:y + crop[0], x:x + crop[1]], label[..., y:y + crop[0], x:x + crop[1]]

    def _train_backbone(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Upstream's backbone trainer (§5.1): per image a crop side drawn from the scales (612/1224/2448 of 2448,
        i.e. the scale fractions of the image), a random crop of it (D6 fixed), resized to the network input
        (image linear, label nearest); cross-entropy."""
        _, _, inp, _ = self.schedule(*images.shape[-2:])
        xs, ys = [], []
        for image, label in zip(images, labels, strict=True):
            frac = random.choice(self.scales)
            crop = (max(1, round(image.shape[-2] * frac)), max(1, round(image.shape[-1] * frac)))
            img, lab = self._random_crop(image.float(), label, crop)
            xs.append(cv2_linear_resize(img, inp))
            ys.append(nearest_resize(lab, inp))
        x, target = self._to_input(torch.stack(xs)), torch.stack(ys).long()
        if self.hrnet:  # HRNet-OCR: CE(out) + 0.4 CE(aux) (§5.1; upstream's Cityscapes class weights left out)
            out, aux = self.backbone(x, with_aux=True)
            return {"loss_seg": F.cross_entropy(out, target, ignore_index=self.ignore_index),
                    "loss_aux": AUX_WEIGHT * F.cross_entropy(aux, target, ignore_index=self.ignore_index)}
        return {"loss_seg": F.cross_entropy(self.backbone(x), target, ignore_index=self.ignore_index)}

    def _train_refiner(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Upstream's `RandomPair` + train.py step (§5.2): coarse = whole image at the input size; a random crop of
        a random finer scale at the input size; the frozen backbone's softmax on both; the coarse one cropped by
        roi_align at the crop's box; OHEM cross-entropy of the refiner on [fine, coarse crop] (D3: inference
        order) against the crop's label. With one refiner per stage, each pair trains the refiner of its scale."""
        scales, crop, inp, _ = self.schedule(*images.shape[-2:])
        coarse, fine, fine_labels, boxes, stages = [], [], [], [], []
        for image, label in zip(images, labels, strict=True):
            image = image.float()
            coarse.append(cv2_linear_resize(image, inp))
            stages.append(random.randrange(1, len(scales)))
            sh, sw = scales[stages[-1]]
            scaled, scaled_label = cv2_linear_resize(image, (sh, sw)), nearest_resize(label, (sh, sw))
            y = random.randrange(max(1, sh - crop[0]))  # numpy randint(0, max): upper bound exclusive (D12)
            x = random.randrange(max(1, sw - crop[1]))
            fine.append(cv2_linear_resize(scaled[..., y:y + crop[0], x:x + crop[1]], inp))
            fine_labels.append(nearest_resize(scaled_label[..., y:y + crop[0], x:x + crop[1]], inp))
            x0, y0 = x / sw * inp[1], y / sh * inp[0]
            boxes.append([x0, y0, x0 + crop[1] / sw * inp[1], y0 + crop[0] / sh * inp[0]])
        with torch.no_grad():
            pc = torch.softmax(self.backbone(self._to_input(torch.stack(coarse))), dim=1)
            pf = torch.softmax(self.backbone(self._to_input(torch.stack(fine))), dim=1)
            rois = torch.tensor(boxes, dtype=pc.dtype, device=pc.device)
            pc_crop = roi_align(pc, list(rois.unsqueeze(1)), output_size=inp)
        if isinstance(self.refiner, nn.ModuleList):  # group the pairs by their stage's refiner, keep the order
            logits = pf.new_empty(pf.shape)
            for stage in sorted(set(stages)):
                rows = torch.tensor([i for i, s in enumerate(stages) if s == stage], device=pf.device)
                logits = logits.index_copy(0, rows, self.stage_refiner(stage)(pf[rows], pc_crop[rows]))
        else:
            logits = self.refiner(pf, pc_crop)
        target = torch.stack(fine_labels).long()
        return {"loss_refine": ohem_ce(logits.float(), target, self.ignore_index, self.ohem_thresh,
                                       self.ohem_min_kept)}

    # ---- released checkpoints (§5.3, §6) ------------------------------------------------------------

    def save_official(self, path: str) -> None:
        """The released layout in folder `path` (§5.3): the backbone's state dict under upstream's names
        (`deepglobe_fpn.pth` / `cityscapes_hrnet.pth`) and each refiner's plain state dict (`deepglobe_refinement.pth`;
        Cityscapes `cityscapes_refinement_{512,1024,2048}.pth`, one per stage)."""
        os.makedirs(path, exist_ok=True)
        backbone_file, refiner_files = self.release_files()
        torch.save(self.backbone.state_dict(), os.path.join(path, backbone_file))
        for i, name in enumerate(refiner_files):
            torch.save(self._refiner_module(i).state_dict(), os.path.join(path, name))

    def _refiner_module(self, index: int) -> Refiner:
        return self.refiner[index] if isinstance(self.refiner, nn.ModuleList) else self.refiner

    def load_official(self, path: str, strict: bool = True, refiner: int | None = None) -> LoadReport:
        """Released weights: a folder holding the released files (`release_files()`: DeepGlobe `deepglobe_fpn.pth` +
        `deepglobe_refinement.pth`; Cityscapes `cityscapes_hrnet.pth` + `cityscapes_refinement_{512,1024,2048}.pth`),
        or one file (a backbone or a refiner, told apart by its keys). A lone refiner file goes to refiner number
        `refiner` (0-based) when there are several, else to the one its released name says. Backbone keys lose every
        `model.` (upstream's override) and the trainer's `loss.*` buffers are skipped; a refiner is a plain state
        dict (§6). Strict by default: any missing, unexpected or mis-shaped key raises MethodError naming the file,
        and nothing of it is loaded."""
        backbone_file, refiner_files = self.release_files()
        if os.path.isdir(path):
            files = [os.path.join(path, name) for name in (backbone_file, *refiner_files)]
            absent = [f for f in files if not os.path.isfile(f)]
            if absent:
                raise MethodError(f"magnet: {path} lacks {', '.join(absent)} (the released files, spec §5.3)")
            reports = [self.load_official(files[0], strict)]
            reports += [self.load_official(f, strict, refiner=i) for i, f in enumerate(files[1:])]
            return LoadReport(*(sum((getattr(r, n) for r in reports), []) for n in
                                ("loaded", "missing", "unexpected", "mismatched", "skipped")))
        state = read_state_dict(path)
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MethodError(f"magnet: {path} is not a state dict of tensors (upstream's model.state_dict())")
        skipped = []
        if "seg_conv.weight" in state:  # a refiner
            prefix = f"{REFINER}."
            if isinstance(self.refiner, nn.ModuleList):
                name = os.path.basename(path)
                index = refiner if refiner is not None else (refiner_files.index(name) if name in refiner_files
                                                             else None)
                if index is None or not 0 <= index < len(self.refiner):
                    raise MethodError(f"magnet: {path} is a refiner, and this model has {len(self.refiner)} (one per "
                                      f"stage): load the folder, name the file as released "
                                      f"({', '.join(refiner_files)}) or pass refiner=<0..{len(self.refiner) - 1}>")
                prefix = f"{REFINER}.{index}."
        else:
            prefix = f"{BACKBONE}."
            skipped = [k for k in state if k.startswith("loss.") or k.startswith("model.loss.")]
            state = {k.replace("model.", ""): v for k, v in state.items() if k not in skipped}
        report = self.load_mapped_state({prefix + k: v for k, v in state.items()}, path, strict, prefix)
        report.skipped = skipped
        return report
