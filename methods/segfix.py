"""SegFix (Yuan, Xie, Chen, Wang, "SegFix: Model-Agnostic Boundary Refinement for Segmentation", ECCV 2020) as a
refiner over any registered one-phase base method (`base:` in params). Facts cite docs/specs/segfix.md (§N); upstream
is openseg-group/openseg.pytorch @ aefc755 (MIT; read for facts, written anew). tests/golden/make_segfix.py runs the
official `shift` and ground-truth generator against ours.

- Network (§3, `lib/models/nets/segfix.py:25-89`): an HRNet backbone (methods/blocks/hrnet.py; `hrnet48` = openseg's
  HRNet-W48: stride-2 stem, output stride 4, BN momentum 0.1) whose branches are resized to branch 0 (bilinear,
  align_corners=True) and concatenated, then two heads 1x1 conv (no bias) -> BN + leaky ReLU 0.01 (the release's
  InPlaceABN default, §3) -> 1x1 conv (no bias): `mask_head` (2: boundary logits) and `dir_head` (8 directions).
  65,697,344 parameters for W48 (§7). Plain BN instead of InPlaceABNSync (§11.3).
- Ground truth (§2, `dt_offset_generator.py:57-99`, `offset_helper.py:267-344`): per class with >= 100 pixels, the
  Euclidean distance transform (scipy; the array border is not an edge) and its 5x5 "Sobel" gradient, pointing into
  the segment; stored as uint8 depth and a 2-degree angle exactly as the release does. Boundary = depth <= 5 px
  (`max_distance`), directions = 8 sectors of 45 degrees. DEVIATION (§11.6): computed on the training crop the trainer
  hands to `refiner_loss` (after its flips), not on the full label then cropped: distances near crop edges differ.
- Loss (§4, `loss_helper.py:191-250`): class-balanced CE on the boundary (weights 1 - class frequency in the batch)
  + class-balanced CE on directions, supervised only where the model itself predicts boundary (P > 0.5); the ignore
  index is honoured in both. DEVIATION: where a batch holds a single target class the release's weights are all 0
  for it and its loss is NaN; ours then weighs every class 1 (and a batch with no predicted boundary gives a zero
  direction loss instead of NaN).
- Inference (§5, `tester_offset.py:193-205, 264-371`): `crop` x `crop` windows at `stride` (official 512 / 170, the
  last window shifted to the border; a side no longer than `crop` is one window), softmax boundary probabilities and
  raw direction logits upsampled (align_corners=True) to the window and averaged where windows overlap; boundary =
  P > 0.5, d = unit vector of argmax direction (`label_to_vector`), 0 elsewhere.
- Refinement (§6, `scripts/cityscapes/segfix.py:64-79`): the base's class scores at image size GATHERED at
  p + `shift` * d(p) (clamped at the border, all reads from the unmodified base map): an exact integer gather, so the
  argmax equals the release's shifted label map under align_corners=True (the release calls `grid_sample` with the
  PyTorch >= 1.3 default align_corners=False, which mixes neighbouring labels: §10 trap 1; ours does not).
- Training (§11.1): phase `base` trains the base with its own recipe, phase `refiner` the SegFix network (the base is
  never read: SegFix sees only the image). Input: RGB with ImageNet statistics; `bgr_input=True` feeds B, G, R with the
  same (RGB-ordered) statistics as the release does (§4, trap 5), for its weights (`load_official`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import nn

from methods.base import Knob, LoadReport, MethodError, ParamCount, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.hrnet import W18, W18_SMALL_V2, W48, HRNet, load_imagenet
from methods.blocks.refiner import BaseRefiner

# name -> (stages, layer1 bottlenecks, timm ImageNet model); all at openseg's stride-2 stem and BN momentum 0.1 (§3)
BACKBONES = {"hrnet48": (W48, 4, "hrnet_w48"), "hrnet18": (W18, 4, "hrnet_w18"),
             "hrnet18_small_v2": (W18_SMALL_V2, 2, "hrnet_w18_small_v2")}
HEAD_WIDTH = 256  # segfix.py:38
NUM_DIRECTIONS = 8  # dt_num_classes (§2)
MIN_CLASS_PIXELS = 100  # dt_offset_generator.py:70-71: smaller classes get no distance (all "boundary")
MAX_DEPTH = 250  # dt_offset_generator.py:89: the uint8 cap
SOBEL_SIZE = 5  # dt_offset_generator.py:117 (--ksize 5)
DEG_REDUCE = 2  # dt_offset_generator.py:92: angles stored in 2-degree steps
IGNORE = -1  # the release's ignore value of its boundary and direction targets
# offset_helper.py:76-79: (dh, dw) of direction class k; class k covers angles (-180 + 45 k -+ 22.5]
DIRECTION_VECTORS = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))


# ---------------------------------------------------------------------------------------------------------------
# ground truth (§2)

def _sobel_kernel(size: int = SOBEL_SIZE) -> torch.Tensor:
    """dt_offset_generator.py:28-45, 119-120: K_x[j, i] = i'/(i'^2 + j'^2), K_y = j'/(...) about the centre (0 there),
    stacked (y, x) as a (2, 1, k, k) conv weight."""
    r = (size - 1) // 2
    j, i = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    norm = i * i + j * j
    norm[r, r] = 1.0
    ky, kx = j / norm, i / norm
    return torch.from_numpy(np.stack([ky, kx])[:, None]).float()


def distance_and_angle(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One label map (H, W) -> (depth uint8, angle in degrees) as the release stores and reloads them (§2.1-2.5):
    depth = the distance of a pixel to the nearest pixel outside its class (floor, capped at 250; 0 for ignored pixels
    and classes with < 100 pixels), angle in [-180, 180] in 2-degree steps of the distance's gradient (pointing into
    the segment; 0 where the gradient vanishes). Labels outside 0..num_classes - 1 (ignore) are nobody's class."""
    depth = np.zeros(labels.shape, dtype=np.float32)
    gradient = np.zeros((*labels.shape, 2), dtype=np.float32)  # (dy, dx)
    kernel = _sobel_kernel()
    for c in range(num_classes):
        inside = labels == c
        if inside.sum() < MIN_CLASS_PIXELS:
            continue
        depth_c = distance_transform_edt(inside)
        depth += depth_c.astype(np.float32)
        with torch.autocast("cpu", enabled=False):  # float32 as the release, also inside a bf16 training step
            grad_c = F.conv2d(torch.from_numpy(depth_c).float()[None, None], kernel, padding=SOBEL_SIZE // 2)
        grad_c = grad_c[0].permute(1, 2, 0).numpy()
        grad_c[~inside] = 0  # dt_offset_generator.py:85: each class keeps its own gradient
        gradient += grad_c
    depth = np.minimum(depth, MAX_DEPTH).astype(np.uint8)
    degrees = (np.degrees(np.arctan2(gradient[..., 0], gradient[..., 1])) + 180) / DEG_REDUCE
    angle = DEG_REDUCE * degrees.astype(np.uint8).astype(np.float64) - 180  # offset_loader.py:50-56
    return depth, angle


def boundary_target(depth: torch.Tensor, valid: torch.Tensor, max_distance: int) -> torch.Tensor:
    """offset_helper.py:267-287: 1 where 0 <= depth <= max_distance, else 0; IGNORE where the label is ignored."""
    target = (depth <= max_distance).long()
    return torch.where(valid, target, torch.full_like(target, IGNORE))


def direction_class(angle: torch.Tensor) -> torch.Tensor:
    """offset_helper.py:315-344 (`align_angle`, 8 classes): class 0 for angle <= -157.5 or > 157.5, class k for
    -180 + 45 k - 22.5 < angle <= -180 + 45 k + 22.5."""
    step = 360 / NUM_DIRECTIONS
    classes = torch.zeros(angle.shape, dtype=torch.long, device=angle.device)
    for k in range(1, NUM_DIRECTIONS):
        middle = -180 + step * k
        classes[(angle > middle - step / 2) & (angle <= middle + step / 2)] = k
    return classes


def direction_vectors(classes: torch.Tensor) -> torch.Tensor:
    """offset_helper.py:250-264 (`label_to_vector`): direction classes (B, H, W) -> (B, 2, H, W) long (dh, dw)."""
    table = torch.tensor(DIRECTION_VECTORS, dtype=torch.long, device=classes.device)
    return table[classes].permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------------
# the label shift (§6)

def gather_shift(scores: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[b, :, y, x] = scores[b, :, clamp(y + dh), clamp(x + dw)] for integer offsets (B, 2, H, W) = (dh, dw):
    scripts/cityscapes/segfix.py:64-79 `shift` with align_corners=True and border padding, on every class score
    instead of the label map (so argmax commutes with it), read from the unmodified input (§10 trap 10)."""
    b, c, h, w = scores.shape
    rows = torch.arange(h, device=scores.device).view(1, h, 1)
    cols = torch.arange(w, device=scores.device).view(1, 1, w)
    y = (rows + offsets[:, 0]).clamp(0, h - 1)
    x = (cols + offsets[:, 1]).clamp(0, w - 1)
    index = (y * w + x).view(b, 1, h * w).expand(b, c, h * w)
    return scores.flatten(2).gather(2, index).view(b, c, h, w)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """tester_offset.py:354-369 (`_decide_intersection`): 0, stride, ... while a window fits, plus a last one at
    length - crop when the image is not covered; a side no longer than `crop` is one window (the release pads)."""
    if length <= crop:
        return [0]
    starts = [stride * i for i in range((length - crop) // stride + 1)]
    if length - starts[-1] > crop:
        starts.append(length - crop)
    return starts


# ---------------------------------------------------------------------------------------------------------------
# the network (§3)

class BNLeakyReLU(nn.BatchNorm2d):
    """The heads' `BNReLU(256, bn_type='inplace_abn')` = InPlaceABNSync with its default leaky ReLU, slope 0.01
    (module_helper.py:59-70); one module, so the state-dict names are the release's (`mask_head.1.weight`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(super().forward(x), 0.01)


def _head(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, HEAD_WIDTH, 1, bias=False), BNLeakyReLU(HEAD_WIDTH),
                         nn.Conv2d(HEAD_WIDTH, out_channels, 1, bias=False))


class SegFixNet(nn.Module):
    """`SegFix_HRNet` (segfix.py:25-89): (boundary logits (B, 2, h, w), direction logits (B, 8, h, w)) at the
    backbone's output stride."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        stages, layer1_blocks, _ = BACKBONES[backbone]
        self.backbone = HRNet(stages, layer1_blocks=layer1_blocks, stem_stride=2, bn_momentum=0.1)
        self.dir_head = _head(self.backbone.out_channels, NUM_DIRECTIONS)
        self.mask_head = _head(self.backbone.out_channels, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone.features(x)
        return self.mask_head(feats), self.dir_head(feats)


def balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """loss_helper.py:202-226, 238-240: CE with class weights 1 - (share of the class among the non-ignored targets of
    the batch). A batch with one target class (the release: weight 0, NaN) weighs every class 1; a batch without
    targets gives 0 (the release: NaN), keeping the graph."""
    kept = target[target != IGNORE]
    if kept.numel() == 0:
        return logits.sum() * 0.0
    counts = torch.bincount(kept, minlength=num_classes).float()
    weights = 1 - counts / counts.sum()
    if int((counts > 0).sum()) == 1:
        weights = torch.ones_like(weights)
    return F.cross_entropy(logits, target, weight=weights.to(logits.dtype), ignore_index=IGNORE)


def _whole(name: str, value: float, low: int, high: int | None, official: int) -> int:
    """A setting that must be a whole number in [low, high] (knob sweeps pass floats such as 2.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < low or \
            (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise MethodError(f"segfix: {name} must be a whole number of pixels {bounds} (official {official}), "
                          f"got {value}")
    return int(value)


@register_method
class SegFix(BaseRefiner):
    name = "segfix"
    description = ("SegFix: boundary and direction branches (HRNet) that relabel a base method's boundary pixels "
                   "from interior ones (base: in params; ECCV 2020)")
    published = {"SegFix": {}}
    official_scope = "refiner."  # the released file holds the SegFix network; the base trains here
    knobs = (Knob("shift", (1, 2, 3, 4), label="shift (px)", bounds=(0, 64),
                  help="pixels a boundary pixel looks along its direction (official --scale 2)"),)
    param_counts = (ParamCount("spec §7: HRNet-W48 65,325,120 + heads 372,224 (openseg @aefc755)",
                               named={"refiner": 65_697_344, "backbone": 65_325_120, "mask_head": 185_344,
                                      "dir_head": 186_880},
                               config={"base": "global", "backbone": "hrnet48"}),)

    def __init__(self, num_classes: int, ignore_index: int = 255, base: str = "global", base_model: dict | None = None,
                 backbone: str = "hrnet48", max_distance: int = 5, shift: int = 2, crop: int = 512, stride: int = 170,
                 bgr_input: bool = False, pretrained: bool | str = False) -> None:
        super().__init__(num_classes, ignore_index, base, base_model)
        if backbone not in BACKBONES:
            raise MethodError(f"segfix: backbone must be one of {', '.join(BACKBONES)} (official hrnet48), "
                              f"got '{backbone}'")
        max_distance = _whole("max_distance", max_distance, 0, MAX_DEPTH - 1, 5)
        shift = _whole("shift", shift, 1, 64, 2)
        crop = _whole("crop", crop, 32, None, 512)
        stride = _whole("stride", stride, 1, crop, 170)  # at most crop: windows must touch
        self.backbone_name, self.max_distance, self.shift = backbone, max_distance, shift
        self.crop, self.stride, self.bgr_input = crop, stride, bool(bgr_input)
        self.refiner = SegFixNet(backbone)
        if pretrained:
            try:
                load_imagenet(self.refiner.backbone, pretrained, BACKBONES[backbone][2])
            except ValueError as exc:
                raise MethodError(f"segfix: pretrained: {exc}; pass an HRNet ImageNet file of {backbone}") from exc

    def parameter_counts(self) -> dict[str, int]:
        parts = {name: sum(p.numel() for p in getattr(self.refiner, name).parameters())
                 for name in ("backbone", "mask_head", "dir_head")}
        return {**super().parameter_counts(), **parts}

    # ---- inference (§5, §6) -------------------------------------------------------------------------------------

    def boundary_and_directions(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(boundary) (B, H, W), direction logits (B, 8, H, W)) at the image size, averaged over the windows."""
        b, _, h, w = images.shape
        prob = images.new_zeros((b, h, w), dtype=torch.float32)
        logits = images.new_zeros((b, NUM_DIRECTIONS, h, w), dtype=torch.float32)
        count = images.new_zeros((h, w), dtype=torch.float32)
        for y in window_starts(h, self.crop, self.stride):
            for x in window_starts(w, self.crop, self.stride):
                window = images[..., y:y + self.crop, x:x + self.crop]
                size = window.shape[-2:]
                mask, direction = self.refiner(self.network_input(window))
                mask = F.interpolate(F.softmax(mask.float(), 1), size=size, mode="bilinear", align_corners=True)
                direction = F.interpolate(direction.float(), size=size, mode="bilinear", align_corners=True)
                prob[..., y:y + size[0], x:x + size[1]] += mask[:, 1]
                logits[..., y:y + size[0], x:x + size[1]] += direction
                count[y:y + size[0], x:x + size[1]] += 1
        return prob / count, logits / count

    def offsets(self, images: torch.Tensor) -> torch.Tensor:
        """Unit offsets (B, 2, H, W) long, (dh, dw), zero off the predicted boundary (tester_offset.py:193-205)."""
        prob, logits = self.boundary_and_directions(images)
        return direction_vectors(logits.argmax(1)) * (prob > 0.5)[:, None]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        scores = self.base.predict(images)
        return gather_shift(scores, self.offsets(images) * self.shift)

    # ---- training (§2, §4) --------------------------------------------------------------------------------------

    def targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(boundary target (B, H, W), direction class (B, H, W)) of the labels, IGNORE where the label is ignored;
        the direction class is defined everywhere else (the loss keeps it on predicted boundary only)."""
        depths, angles = zip(*(distance_and_angle(lab, self.num_classes) for lab in labels.cpu().numpy()),
                             strict=True)
        depth = torch.from_numpy(np.stack(depths)).to(labels.device).long()
        angle = torch.from_numpy(np.stack(angles)).to(labels.device)
        valid = (labels >= 0) & (labels < self.num_classes) & (labels != self.ignore_index)
        direction = direction_class(angle)
        return boundary_target(depth, valid, self.max_distance), torch.where(valid, direction,
                                                                             torch.full_like(direction, IGNORE))

    def refiner_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        boundary, direction = self.targets(labels)
        mask, dir_logits = self.refiner(self.network_input(images))
        size = labels.shape[-2:]
        mask = F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=True)
        dir_logits = F.interpolate(dir_logits.float(), size=size, mode="bilinear", align_corners=True)
        predicted_boundary = F.softmax(mask.detach(), 1)[:, 1] > 0.5
        direction = torch.where(predicted_boundary, direction, torch.full_like(direction, IGNORE))
        return {"loss_mask": balanced_cross_entropy(mask, boundary, 2),
                "loss_direction": balanced_cross_entropy(dir_logits, direction, NUM_DIRECTIONS)}

    # ---- official checkpoints (§7) ------------------------------------------------------------------------------

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """A released file (`{'config_dict', 'state_dict'}`, `module.` keys; InPlaceABN: no `num_batches_tracked`;
        a `torchbn` build's heads `*_head.1.0.*` also read) into `refiner`; the base keeps its own weights. The
        released weights expect `bgr_input=True` (§4)."""
        state = {}
        for key, value in read_state_dict(path).items():
            for head in ("mask_head", "dir_head"):
                key = key.replace(f"{head}.1.0.", f"{head}.1.")
            state[f"refiner.{key}"] = value
        own = self.state_dict()
        for key in own:  # InPlaceABN keeps no batch counter: ours stay as they are
            if key.startswith(self.official_scope) and key.endswith("num_batches_tracked") and key not in state:
                state[key] = own[key]
        return self.load_mapped_state(state, path, strict, self.official_scope)

    def save_official(self, path: str) -> None:
        """`refiner` in the release's layout: `{'config_dict', 'state_dict'}` with `module.` keys, no BN counters
        (module_runner.py:164-167)."""
        state = {f"module.{k}": v for k, v in self.refiner.state_dict().items()
                 if not k.endswith("num_batches_tracked")}
        config = {"network": {"backbone": self.backbone_name, "model_name": "segfix_hrnet", "bn_type": "inplace_abn"}}
        torch.save({"config_dict": config, "state_dict": state}, path)
