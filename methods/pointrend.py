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

Official checkpoint (§7, `load_official` / `save_official`): detectron2's released semantic model
(`model_final_cf6ac1.pkl`, R-101 FPN Cityscapes, 19 classes) is a pickle of `{"model": {name: numpy array},
"__author__": ...}` (`detection_checkpoint.py:70-77`), read here with an unpickler that admits numpy arrays only; a
`.pth` / `torch.save` file `{"model": {name: tensor}}` is read as well (by content, not by suffix). Its `backbone.*`
and `sem_seg_head.point_head.*` load into `refiner` (`bottom_up.stem.conv1` -> conv1/bn1, `res2..5.i` ->
`layer1..4.i` with `convK` -> convK/bnK and `shortcut` -> downsample.0/.1, FrozenBN buffers -> our BN's); the
release's coarse head `sem_seg_head.coarse_sem_seg_head.*` (the base replaces it), the p3-p5 outputs
`backbone.fpn_output3..5` (ours builds only p2) and `pixel_mean/std` are reported `skipped`; any other missing,
unexpected or mis-shaped key is a one-line error. The release is the MSRA layout (trap 10): stride 2 on the 1x1
`conv1` of the first block of res3-res5 (STRIDE_IN_1X1) where timm puts it on the 3x3, and BGR input with mean
[103.530, 116.280, 123.675], std 1 (§3). Loading it into timm's layout would run and be silently wrong, so it loads
only into a model built with `stride_in_1x1: true` (which moves that stride; a bottleneck ResNet only), and runs as
released with, in the model's params: `backbone: resnet101, stride_in_1x1: true, freeze_bn: true, bgr_input: true,
pixel_mean: [103.530, 116.280, 123.675], pixel_std: [1, 1, 1]` (with `bgr_input` the statistics apply to the
channels the network reads, B, G, R: detectron2's PIXEL_MEAN verbatim), 19 classes. `save_official` writes that
`.pkl` layout (with `"stride_in_1x1"` recording where the stride sits; a file without it is detectron2's default,
True), so a model trained here runs in detectron2 and round trips exactly.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Knob, LoadReport, MethodError, ParamCount, register_method
from methods.blocks.backbones import read_state_dict
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


def move_stride_to_1x1(trunk: nn.Module, backbone: str) -> None:
    """detectron2's STRIDE_IN_1X1 (MSRA layout, §2.1, `resnet.py:148-156`): the stride 2 of the first bottleneck of
    layer2..layer4 moves from the 3x3 `conv2` (timm, torchvision) to the 1x1 `conv1`. A 1x1 conv with stride 2 and no
    padding samples the same ceil(H / 2) positions as the 3x3 with padding 1, so the shapes stay; `conv2` keeps its
    padding 1 and dilation 1 and now preserves the size."""
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(trunk, name)[0]
        conv1, conv2 = block.conv1, block.conv2
        if not hasattr(block, "conv3") or conv1.kernel_size != (1, 1) or conv2.stride != (2, 2) \
                or conv2.dilation != (1, 1) or not isinstance(getattr(block, "aa", nn.Identity()), nn.Identity):
            raise MethodError(f"pointrend: stride_in_1x1 needs a plain bottleneck ResNet (resnet50/101/152) whose "
                              f"{name}[0] has stride 2 on its 3x3 conv; backbone '{backbone}' has not")
        conv1.stride, conv2.stride = (2, 2), (1, 1)


class PointRendRefiner(nn.Module):
    """ResNet trunk (timm, C2..C5) + detectron2's FPN top-down path to `p2` (§2.1) + the point head."""

    def __init__(self, num_classes: int, backbone: str, pretrained: bool | str, fpn_channels: int, fc_dim: int,
                 freeze_bn: bool, stride_in_1x1: bool = False) -> None:
        super().__init__()
        self.trunk = fpn_trunk(backbone, pretrained, "pointrend")
        if stride_in_1x1:
            move_stride_to_1x1(self.trunk, backbone)
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
# detectron2's checkpoint layout (§7)

RELEASE_AUTHOR = "uhrbench pointrend.save_official"  # "__author__": detectron2 then reads the names as they are
# release keys ours does not hold, reported as skipped: the coarse head the base replaces, the p3-p5 outputs only
# that head read, and the normalisation buffers older detectron2 files carry (its own loader ignores them)
SKIPPED = re.compile(r"^(sem_seg_head\.coarse_sem_seg_head\.|backbone\.fpn_output[3-6]\.|pixel_(mean|std)$)")
_D2_TO_OURS = (  # (detectron2 pattern, ours), on the names under `refiner.`; res{s} <-> layer{s - 1}
    (r"backbone\.bottom_up\.stem\.conv1\.weight", "trunk.conv1.weight"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", r"trunk.bn1.\1"),
    (r"backbone\.bottom_up\.res(?P<s>[2-5])\.(\d+)\.conv(\d)\.weight", r"trunk.layer{s}.\2.conv\3.weight"),
    (r"backbone\.bottom_up\.res(?P<s>[2-5])\.(\d+)\.conv(\d)\.norm\.(\w+)", r"trunk.layer{s}.\2.bn\3.\4"),
    (r"backbone\.bottom_up\.res(?P<s>[2-5])\.(\d+)\.shortcut\.weight", r"trunk.layer{s}.\2.downsample.0.weight"),
    (r"backbone\.bottom_up\.res(?P<s>[2-5])\.(\d+)\.shortcut\.norm\.(\w+)", r"trunk.layer{s}.\2.downsample.1.\3"),
    (r"backbone\.(fpn_lateral[2-5]|fpn_output2)\.(weight|bias)", r"\1.\2"),
    (r"sem_seg_head\.point_head\.(\w+\.\w+)", r"point_head.\1"),
)
_OURS_TO_D2 = (
    (r"trunk\.conv1\.weight", "backbone.bottom_up.stem.conv1.weight"),
    (r"trunk\.bn1\.(\w+)", r"backbone.bottom_up.stem.conv1.norm.\1"),
    (r"trunk\.layer(?P<s>[1-4])\.(\d+)\.conv(\d)\.weight", r"backbone.bottom_up.res{s}.\2.conv\3.weight"),
    (r"trunk\.layer(?P<s>[1-4])\.(\d+)\.bn(\d)\.(\w+)", r"backbone.bottom_up.res{s}.\2.conv\3.norm.\4"),
    (r"trunk\.layer(?P<s>[1-4])\.(\d+)\.downsample\.0\.weight", r"backbone.bottom_up.res{s}.\2.shortcut.weight"),
    (r"trunk\.layer(?P<s>[1-4])\.(\d+)\.downsample\.1\.(\w+)", r"backbone.bottom_up.res{s}.\2.shortcut.norm.\3"),
    (r"(fpn_lateral[2-5]|fpn_output2)\.(weight|bias)", r"backbone.\1.\2"),
    (r"point_head\.(\w+\.\w+)", r"sem_seg_head.point_head.\1"),
)


def _rename(key: str, table: tuple[tuple[str, str], ...], stage_shift: int) -> str | None:
    """`key` renamed by the first full match in `table` ({s}: the stage number shifted by `stage_shift`); None if
    no pattern matches."""
    for pattern, template in table:
        match = re.fullmatch(pattern, key)
        if match:
            stage = match.groupdict().get("s")
            return match.expand(template.replace("{s}", str(int(stage) + stage_shift)) if stage else template)
    return None


def detectron2_to_ours(key: str) -> str | None:
    """A detectron2 name -> ours under `refiner.` (None: not a name of ours)."""
    return _rename(key, _D2_TO_OURS, -1)


def ours_to_detectron2(key: str) -> str | None:
    """Ours (under `refiner.`) -> detectron2's name (None: not in its layout)."""
    return _rename(key, _OURS_TO_D2, 1)


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays (a detectron2 / Detectron model-zoo `.pkl`) and nothing else: any other
    global is refused, so a planted file cannot run code."""

    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
               ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        module = re.sub(r"^numpy\.core\b", "numpy._core", module)  # pickled by numpy 1.x
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not a numpy array")
        return super().find_class(module, name)


def read_detectron2_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state {name: tensor}, the file's other top-level entries) of a detectron2 checkpoint: a zip `torch.save`
    file (`.pth`, `{"model": ...}` or a bare state dict, via `read_state_dict`) or a pickle of numpy arrays
    (`.pkl`, `{"model": ..., "__author__": ...}`; one without `__author__` holds Caffe2 names, refused)."""
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError:
        is_zip = False
    if is_zip:  # `save_official` writes .pkl only: a .pth carries no stride_in_1x1 entry
        return read_state_dict(path), {}
    try:
        with open(path, "rb") as handle:
            raw = _NumpyUnpickler(handle, encoding="latin1").load()
    except OSError as exc:
        raise MethodError(f"pointrend: cannot read checkpoint '{path}': {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure gets the same advice
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise MethodError(f"pointrend: cannot read '{path}' as a detectron2 checkpoint (a .pkl of numpy arrays or a "
                          f"torch.save .pth): {first}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or not raw["model"]:
        raise MethodError(f"pointrend: '{path}' holds no `model` dict of arrays (detectron2's .pkl layout)")
    if "__author__" not in raw:
        raise MethodError(f"pointrend: '{path}' has no `__author__`: a Caffe2 / Detectron1 file with Caffe2 names, "
                          "not a detectron2 model-zoo file; convert it with detectron2 first")
    state = {}
    for key, value in raw["model"].items():
        if not isinstance(value, np.ndarray):
            raise MethodError(f"pointrend: '{path}' entry '{key}' is {type(value).__name__}, not a numpy array")
        state[key] = torch.from_numpy(np.ascontiguousarray(value))
    return state, {k: v for k, v in raw.items() if k != "model"}


# ---------------------------------------------------------------------------------------------------------------
# the method

@register_method
class PointRend(BaseRefiner):
    name = "pointrend"
    description = ("PointRend: point head on ResNet-FPN p2 features re-predicting the most uncertain points of a "
                   "base method's stride-4 logits over 2 subdivision steps (base: in params; CVPR 2020)")
    official_scope = "refiner."  # the released file holds the point head and its features; the base trains here
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
                 subdivision_num_points: int = 8192, stride_in_1x1: bool = False, bgr_input: bool = False) -> None:
        super().__init__(num_classes, ignore_index, base, base_model)
        if stride_in_1x1 and pretrained:
            raise MethodError("pointrend: stride_in_1x1 is the MSRA layout of detectron2's weights (load_official); "
                              "timm's ImageNet weights (pretrained) put the stride on the 3x3: use one or the other")
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
        self.stride_in_1x1, self.bgr_input = bool(stride_in_1x1), bool(bgr_input)
        self.refiner = PointRendRefiner(num_classes, backbone, pretrained, int(fpn_channels), int(fc_dim),
                                        bool(freeze_bn), self.stride_in_1x1)

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
        p2, scale = self.refiner.p2(self.network_input(images))
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
        p2, scale = self.refiner.p2(self.network_input(images))
        return {"loss_point": self.point_loss(coarse, p2, scale, labels)}

    # ---- official checkpoints (§7) ------------------------------------------------------------------------------

    def load_official(self, path: str, strict: bool = True, stride_in_1x1: bool | None = None) -> LoadReport:
        """detectron2's semantic PointRend checkpoint (`.pkl` or `.pth`, module docstring) into `refiner`; the base
        keeps its own weights. The release's coarse head and p3-p5 outputs are `skipped`. `stride_in_1x1`: where the
        file's ResNet has its stride, when the file does not say (None: the file's `stride_in_1x1` entry, else
        detectron2's default True, the release's); it must match this model's (trap 10)."""
        state, extra = read_detectron2_checkpoint(path)
        assumed = stride_in_1x1 is None and "stride_in_1x1" not in extra
        if stride_in_1x1 is None:
            stride_in_1x1 = bool(extra.get("stride_in_1x1", True))
        if stride_in_1x1 != self.stride_in_1x1:
            where = ("the 1x1 conv1 (MSRA layout, detectron2 STRIDE_IN_1X1 True)", "the 3x3 conv2")
            hint = "; the file does not say: detectron2's default assumed" if assumed else ""
            raise MethodError(f"pointrend: {path} has the res3-res5 stride on {where[not stride_in_1x1]}{hint}, this "
                              f"model on {where[not self.stride_in_1x1]}: build it with stride_in_1x1: "
                              f"{str(stride_in_1x1).lower()} (spec §10 trap 10: it would run, silently wrong)")
        mapped, skipped = {}, []
        for key, value in state.items():
            if SKIPPED.match(key):
                skipped.append(key)
                continue
            ours = detectron2_to_ours(key)
            mapped[key if ours is None else self.official_scope + ours] = value  # unmapped: `unexpected`, by name
        for key, value in self.state_dict().items():  # FrozenBN keeps no batch counter: ours stay as they are
            if key.startswith(self.official_scope) and key.endswith("num_batches_tracked") and key not in mapped:
                mapped[key] = value
        report = self.load_mapped_state(mapped, path, strict, self.official_scope)
        report.skipped = sorted(skipped)
        return report

    def save_official(self, path: str) -> None:
        """`refiner` as detectron2's `.pkl`: `{"model": {name: float32 numpy array}, "__author__", "stride_in_1x1"}`
        (no BN counters: FrozenBN has none); the release's coarse head and p3-p5 outputs are absent (not ours)."""
        model = {}
        for key, value in self.refiner.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            name = ours_to_detectron2(key)
            if name is None:
                raise MethodError(f"pointrend: '{key}' has no detectron2 name (backbone not a timm ResNet?); "
                                  f"cannot write {path}")
            model[name] = value.detach().cpu().float().numpy()
        with open(path, "wb") as handle:
            pickle.dump({"model": model, "__author__": RELEASE_AUTHOR, "stride_in_1x1": self.stride_in_1x1}, handle)
