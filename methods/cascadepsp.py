"""CascadePSP (Cheng et al., CVPR 2020): a class-agnostic refinement module that refines one binary mask of an
image with a global step (the whole image at long side L) and a local step (L x L full-resolution crops), composed
here with any registered method as its base segmentation (`base:` in params). Re-implementation of the official
release `hkchengrex/CascadePSP` @ 481847c (MIT) as specified in `docs/specs/cascadepsp.md` ("§" below).

- Refinement network (§2): PSPNet on a dilated ResNet-50 (output stride 8, 6 input channels [RGB, seg, a, b]) with a
  1/2/3/6 pyramid pooling module and three pre-activation decoder blocks; one call runs the 3-pass cascade (§2.5).
  Module names are the release's (`feats`, `psp`, `up_1..3`, `final_28/56/11/21`) under `refiner.`, so the
  released file (a DataParallel state dict, `module.` prefix) loads by renaming the prefix alone. 67,683,433
  parameters, as the official model (§2.7).
- Inference (§4): the pip package's schedule (`segmentation-refinement` 0.6 = the release's `process_high_res_im`
  with stride L // 2; `fast` = its global-only `process_im_single_pass`), binary mask in, foreground probability
  out, bit for bit the same operations (tests/test_golden_cascadepsp.py).
- Semantic use (§5.3, OUR choice: the UHR papers that report CascadePSP rows published no code, §8): each class the
  base predicts on at least `min_area` pixels is refined as its own binary mask over the whole image; a pixel takes
  the class of the largest refined probability, unless no refined class exceeds 0.5 there (the floor of the
  release's ADE20K merge, §5.1), where it keeps the base label. Two-class datasets refine class 1 and threshold at
  0.5. `predict` returns those scores: refined probabilities, plus 1 on the base label where the floor keeps it.
- Training (§6): phase `base` trains the base method with its own loss; phase `refiner` trains the refinement
  network on crops of the same training set, one random class per sample, its mask perturbed by random rectangular
  dilations and erosions until IoU < U[0.8, 1) (§6.3 step 6; the contour subsampling before it needs OpenCV and is
  left out, and the structuring elements are rectangles only: ours), with the release's six-output loss (§6.4).
  The release trains on saliency and few-shot sets (§6.1); `load_official` loads those weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from methods.base import LoadReport, MethodError, ParamCount, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.refiner import BaseRefiner

PADDING = 16  # local step: trimmed from each crop side that is not on the image border (§4.3)
FOREGROUND_SHARE = (0.1, 0.9)  # local step: crops whose binarised global mask is outside this are skipped
# §6.4: (BCE, L1, MSE) weights per output; the Sobel-gradient L1 on the final output has weight 5
LOSS_WEIGHTS = {"out_224": (0.0, 1.0, 1.0), "out_28": (1.0, 0.0, 0.0), "out_56": (0.5, 0.25, 0.25),
                "out_28_2": (1.0, 0.0, 0.0), "out_28_3": (1.0, 0.0, 0.0), "out_56_2": (0.5, 0.25, 0.25)}
GRAD_WEIGHT = 5.0


# ---------------------------------------------------------------------------------------------------------------
# the refinement network (§2)

class DilatedResNet50(ResNet):
    """§2.1: torchvision's ResNet-50 layout (stride on the 3x3) with a 6-channel stem, layer3 dilated 2 and layer4
    dilated 4 at stride 1, the first block of each undilated; returns (layer4, conv1 output before BN, layer1)."""

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3], replace_stride_with_dilation=[False, True, True])
        self.conv1 = nn.Conv2d(6, 64, kernel_size=7, stride=2, padding=3, bias=False)
        first = self.layer4[0].conv2  # torchvision gives it the previous layer's dilation (2); the release has 1
        first.dilation, first.padding = (1, 1), (1, 1)
        del self.fc, self.avgpool
        for m in self.modules():  # §2.8: N(0, sqrt(2 / (k * k * out))), BN 1 / 0 (torchvision's kaiming fan_out)
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / n) ** 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_1 = self.conv1(x)
        x_2 = self.layer1(self.maxpool(self.relu(self.bn1(x_1))))
        return self.layer4(self.layer3(self.layer2(x_2))), x_1, x_2


class PSPModule(nn.Module):
    """§2.2: pooled 1x1 convs (no bias, norm or activation), concatenated [1, 2, 3, 6, input], 1x1 + ReLU."""

    def __init__(self, features: int = 2048, out_features: int = 1024, sizes=(1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(features, features, 1, bias=False))
                                    for s in sizes)
        self.bottleneck = nn.Conv2d(features * (len(sizes) + 1), out_features, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        size = feats.shape[-2:]
        priors = [F.interpolate(stage(feats), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return F.relu(self.bottleneck(torch.cat([*priors, feats], 1)))


def _pre_activation(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1))


class PSPUpsample(nn.Module):
    """§2.3: x2 bilinear, conv(cat[x, skip]) + 1x1 shortcut(x), then a second pre-activation residual."""

    def __init__(self, x_channels: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _pre_activation(in_channels, out_channels)
        self.conv2 = _pre_activation(out_channels, out_channels)
        self.shortcut = nn.Conv2d(x_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        p = self.conv(torch.cat([x, skip], 1)) + self.shortcut(x)
        return p + self.conv2(p)


def _head(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, 32, 1), nn.ReLU(), nn.Conv2d(32, 1, 1))


def _up(logits: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(logits, scale_factor=factor, mode="bilinear", align_corners=False)


class RefinementNet(nn.Module):
    """The release's `RefinementModule` (§2.4-2.5). `forward(x, seg, inter_s8, inter_s4)`: x the normalised RGB
    image, seg the mask in [-1, 1], sides multiples of 8; with `inter_s8` given pass 1 is skipped (it replaces
    tanh(OS8)), with `inter_s4` too pass 2 is. Returns logits `out_*` and probabilities `pred_*` at input size."""

    def __init__(self) -> None:
        super().__init__()
        self.feats = DilatedResNet50()
        self.psp = PSPModule(2048, 1024, (1, 2, 3, 6))
        self.up_1 = PSPUpsample(1024, 1024 + 256, 512)
        self.up_2 = PSPUpsample(512, 512 + 64, 256)
        self.up_3 = PSPUpsample(256, 256 + 3, 32)
        self.final_28 = _head(1024)
        self.final_56 = _head(512)
        self.final_11 = nn.Conv2d(32 + 3, 32, 1)
        self.final_21 = nn.Conv2d(32, 1, 1)

    def _trunk(self, x, seg, a, b):
        f, f_1, f_2 = self.feats(torch.cat([x, seg, a, b], 1))
        return self.psp(f), f_1, f_2

    def forward(self, x: torch.Tensor, seg: torch.Tensor, inter_s8: torch.Tensor | None = None,
                inter_s4: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if inter_s8 is None:  # pass 1: OS8
            p, _, _ = self._trunk(x, seg, seg, seg)
            out["out_28"] = _up(self.final_28(p), 8)
            inter_s8 = torch.tanh(out["out_28"])
        if inter_s4 is None:  # pass 2: OS8 and OS4
            p, _, f_2 = self._trunk(x, seg, inter_s8, inter_s8)
            out["out_28_2"] = _up(self.final_28(p), 8)
            out["out_56"] = _up(self.final_56(self.up_1(p, f_2)), 4)
            inter_s8, inter_s4 = torch.tanh(out["out_28_2"]), torch.tanh(out["out_56"])
        p, f_1, f_2 = self._trunk(x, seg, inter_s8, inter_s4)  # pass 3: every stride, the final OS1
        out["out_28_3"] = _up(self.final_28(p), 8)
        p = self.up_1(p, f_2)
        out["out_56_2"] = _up(self.final_56(p), 4)
        p = self.up_3(self.up_2(p, f_1), x)
        out["out_224"] = self.final_21(F.relu(self.final_11(torch.cat([p, x], 1))))
        out.update({"pred" + k[3:]: torch.sigmoid(v) for k, v in list(out.items())})
        return out


# ---------------------------------------------------------------------------------------------------------------
# inference schedule (§4, the pip package's)

def resize_max_side(t: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """§4.2: scale so the long side becomes `size` (floor), by the scale factor, as upstream calls interpolate."""
    ratio = size / max(t.shape[-2:])
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(t, scale_factor=ratio, mode=mode, align_corners=False)
    return F.interpolate(t, scale_factor=ratio, mode=mode)


def safe_forward(net: RefinementNet, im: torch.Tensor, seg: torch.Tensor, inter_s8: torch.Tensor | None = None,
                 inter_s4: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """§4.1: pad both sides to (n // 8 + 1) * 8 when either is not a multiple of 8 (image 0, masks -1, bottom and
    right), run, crop back; the three probabilities the schedule reads."""
    h, w = seg.shape[-2:]
    if h % 8 or w % 8:
        size = ((h // 8 + 1) * 8, (w // 8 + 1) * 8)

        def pad(t, value):
            return F.pad(t, (0, size[1] - w, 0, size[0] - h), value=value) if t is not None else None

        im, seg, inter_s8, inter_s4 = pad(im, 0.0), pad(seg, -1.0), pad(inter_s8, -1.0), pad(inter_s4, -1.0)
    out = net(im, seg, inter_s8, inter_s4)
    return {k: out[k][..., :h, :w] for k in ("pred_224", "pred_28_3", "pred_56_2")}


def refine_global_only(net: RefinementNet, im: torch.Tensor, seg: torch.Tensor, L: int) -> torch.Tensor:
    """§4.4, pip's `process_im_single_pass`: the image at long side L, one 3-pass call, back to the input size."""
    h, w = im.shape[-2:]
    if max(h, w) < L:
        im, seg = resize_max_side(im, L, "bicubic"), resize_max_side(seg, L, "bilinear")
    elif max(h, w) > L:
        im, seg = resize_max_side(im, L, "area"), resize_max_side(seg, L, "area")
    pred = safe_forward(net, im, seg)["pred_224"]
    if max(h, w) < L:
        return F.interpolate(pred, size=(h, w), mode="area")
    if max(h, w) > L:
        return F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=True)
    return pred


def crop_windows(h: int, w: int, L: int) -> list[tuple[int, int, int, int]]:
    """§4.3: (start_y, end_y, start_x, end_x) of the local step's crops in upstream's order (x outer), step
    L // 2 - 32, the last crop shifted back inside, duplicates dropped."""
    step = L // 2 - 2 * PADDING
    if step <= 0:
        raise MethodError(f"cascadepsp: L must exceed {4 * PADDING} (the local step moves by L // 2 - 32), got {L}")
    seen, out = set(), []
    for xi in range(w // step + 1):
        for yi in range(h // step + 1):
            sx, sy = xi * step, yi * step
            ex, ey = sx + L, sy + L
            if ey > h:
                ey, sy = h, h - L
            if ex > w:
                ex, sx = w, w - L
            sx, sy, ex, ey = max(0, sx), max(0, sy), min(w, ex), min(h, ey)
            if sy * w + sx not in seen:
                seen.add(sy * w + sx)
                out.append((sy, ey, sx, ex))
    return out


def refine_high_res(net: RefinementNet, im: torch.Tensor, seg: torch.Tensor, L: int) -> torch.Tensor:
    """§4.2-4.3, pip's `process_high_res_im`: the global step at long side L, then passes 2-3 on the L x L crops of
    the full-resolution image whose binarised global mask is 10-90 % foreground, trimmed and averaged."""
    h, w = seg.shape[-2:]
    if max(h, w) > L:
        small = safe_forward(net, resize_max_side(im, L, "area"), resize_max_side(seg, L, "area"))
    elif max(h, w) < L:
        small = safe_forward(net, resize_max_side(im, L, "bicubic"), resize_max_side(seg, L, "bilinear"))
    else:
        small = safe_forward(net, im, seg)
    r_224 = (F.interpolate(small["pred_224"], size=(h, w), mode="bilinear", align_corners=False) > 0.5).to(im.dtype)
    r_224 = r_224 * 2 - 1
    r_56 = F.interpolate(small["pred_56_2"], size=(h, w), mode="bilinear", align_corners=False) * 2 - 1
    combined, weight = torch.zeros_like(seg), torch.zeros_like(seg)
    for sy, ey, sx, ex in crop_windows(h, w, L):
        share = (r_224[..., sy:ey, sx:ex] > 0).to(im.dtype).mean()
        if share > FOREGROUND_SHARE[1] or share < FOREGROUND_SHARE[0]:
            continue
        pred = safe_forward(net, im[..., sy:ey, sx:ex], r_224[..., sy:ey, sx:ex], r_56[..., sy:ey, sx:ex])["pred_224"]
        py0, px0, py1, px1 = 0, 0, L, L  # the crop's own coordinates (upstream slices by L even for short crops)
        if sx != 0:
            sx, px0 = sx + PADDING, PADDING
        if sy != 0:
            sy, py0 = sy + PADDING, PADDING
        if ex != w:
            ex, px1 = ex - PADDING, L - PADDING
        if ey != h:
            ey, py1 = ey - PADDING, L - PADDING
        combined[..., sy:ey, sx:ex] += pred[..., py0:py1, px0:px1]
        weight[..., sy:ey, sx:ex] += 1
    pred = torch.where(weight == 0, r_224 / 2 + 0.5, combined / weight)
    return F.interpolate(pred, size=(h, w), mode="bilinear", align_corners=True)  # pip's last line (an identity)


# ---------------------------------------------------------------------------------------------------------------
# training pairs (§6.3, reduced: see the module docstring)

def _morph(mask: torch.Tensor, size: int, dilate: bool) -> torch.Tensor:
    pad = (size // 2, size - 1 - size // 2, size // 2, size - 1 - size // 2)
    if dilate:
        return F.max_pool2d(F.pad(mask, pad, value=0.0), size, stride=1)
    return -F.max_pool2d(F.pad(-mask, pad, value=-1.0), size, stride=1)


def perturb_mask(gt: torch.Tensor, iou_target: float, generator: torch.Generator | None = None,
                 max_rounds: int = 250) -> torch.Tensor:
    """A binary (H, W) mask degraded by rounds of 4 random rectangles, each dilated or eroded (p = 0.5) with a
    random 3-9 px square element, until IoU with `gt` falls below `iou_target` (§6.3 step 6)."""
    seg = gt.float()[None, None].clone()
    target = gt.bool()
    h, w = gt.shape

    def draw(high: int, low: int = 0) -> int:
        return int(torch.randint(low, high, (), generator=generator))

    for _ in range(max_rounds):
        for _ in range(4):
            lx, ly = draw(w), draw(h)
            lw, lh = draw(w + 1, lx + 1), draw(h + 1, ly + 1)
            size = draw(10, 3)
            dilate = draw(2) == 0
            box = seg[..., ly:lh, lx:lw]
            seg[..., ly:lh, lx:lw] = _morph(box, size, dilate)
        now = seg[0, 0] > 0.5
        union = (now | target).sum()
        if union == 0 or (now & target).sum() / union < iou_target:
            break
    return seg[0, 0] > 0.5


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """§6.4 (`models/sobel_op.py`): 3x3 mean (zeros counted), Sobel / 4 in x and y, sqrt(gx^2 + gy^2 + eps)."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype) / 4
    x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    gx = F.conv2d(x, kx[None, None], padding=1)
    gy = F.conv2d(x, kx.T[None, None], padding=1)
    return torch.sqrt(gx * gx + gy * gy + eps)


def refinement_loss(out: dict[str, torch.Tensor], gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """§6.4: BCE against gt > 0.5, L1 and MSE of the probabilities, per output with the release's weights, and the
    Sobel-gradient L1 of the final output (x 5)."""
    terms = {}
    for key, (bce, l1, mse) in LOSS_WEIGHTS.items():
        if key not in out:
            continue
        logits, prob = out[key], torch.sigmoid(out[key])
        total = logits.new_zeros(())
        if bce:
            total = total + bce * F.binary_cross_entropy_with_logits(logits, (gt > 0.5).to(logits.dtype))
        if l1:
            total = total + l1 * F.l1_loss(prob, gt) + mse * F.mse_loss(prob, gt)
        terms[f"loss_{key}"] = total
    terms["loss_grad"] = GRAD_WEIGHT * F.l1_loss(sobel_magnitude(torch.sigmoid(out["out_224"])), sobel_magnitude(gt))
    return terms


# ---------------------------------------------------------------------------------------------------------------

@register_method
class CascadePSP(BaseRefiner):
    name = "cascadepsp"
    description = ("CascadePSP: a class-agnostic ResNet-50 PSPNet refiner (3-pass cascade, global + local steps) "
                   "applied per class to a base method's prediction (base: in params; CVPR 2020)")
    published = {"CascadePSP": {}}
    official_scope = "refiner."  # the released file holds the refinement network; the base trains here
    param_counts = (ParamCount("spec §2.7, official RefinementModule @481847c", named={"refiner": 67_683_433},
                               config={"base": "global"}),)

    def __init__(self, num_classes: int, ignore_index: int = 255, base: str = "global", base_model: dict | None = None,
                 L: int = 900, fast: bool = False, min_area: int = 1024, iou_range: tuple[float, float] = (0.8, 1.0),
                 pretrained: bool | str = False) -> None:
        super().__init__(num_classes, ignore_index, base, base_model)
        if L <= 4 * PADDING:
            raise MethodError(f"cascadepsp: L must exceed {4 * PADDING}, got {L}")
        self.L, self.fast, self.min_area = int(L), bool(fast), int(min_area)
        self.iou_range = (float(iou_range[0]), float(iou_range[1]))
        self.refiner = RefinementNet()
        if pretrained:
            self._load_imagenet(pretrained)

    def _load_imagenet(self, pretrained: bool | str) -> None:
        """§2.8: torchvision's ResNet-50 (IMAGENET1K_V1 = resnet50-19c8e357) into `feats`, conv1's three extra
        input channels zero."""
        if isinstance(pretrained, str):
            state = read_state_dict(pretrained)
        else:
            from torchvision.models import ResNet50_Weights

            state = ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        state["conv1.weight"] = torch.cat([state["conv1.weight"], torch.zeros_like(state["conv1.weight"])], 1)
        self.refiner.feats.load_state_dict(state)

    # ---- inference --------------------------------------------------------------------------------------------

    def refine_mask(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One binary mask (1, 1, H, W) of a normalised image (1, 3, H, W) -> foreground probability (1, 1, H, W)."""
        seg = mask.to(image.dtype) * 2 - 1
        if self.fast:
            return refine_global_only(self.refiner, image, seg, self.L)
        return refine_high_res(self.refiner, image, seg, self.L)

    def merge(self, labels: torch.Tensor, refined: dict[int, torch.Tensor]) -> torch.Tensor:
        """Class scores (C, H, W) from the base labels (H, W) and the refined probabilities {class: (H, W)}."""
        scores = torch.zeros(self.num_classes, *labels.shape, device=labels.device)
        for c, q in refined.items():
            scores[c] = q
        if self.num_classes == 2:  # one refined foreground class, thresholded at 0.5
            q = refined.get(1, (labels == 1).float())
            return torch.stack([1 - q, q])
        floor = scores.max(0).values <= 0.5
        scores.scatter_add_(0, labels[None], floor[None].float())
        return scores

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        labels = self.base.predict(images).argmax(1)
        x = self.normalize(images)
        out = []
        for b in range(images.shape[0]):
            counts = torch.bincount(labels[b].flatten(), minlength=self.num_classes)
            classes = [1] if self.num_classes == 2 else range(self.num_classes)
            refined = {c: self.refine_mask(x[b:b + 1], (labels[b] == c)[None, None])[0, 0]
                       for c in classes if counts[c] >= max(self.min_area, 1)}
            out.append(self.merge(labels[b], refined))
        return torch.stack(out)

    # ---- training ---------------------------------------------------------------------------------------------

    def refiner_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """§6: a random present class's mask, perturbed to a random IoU, refined back to the ground truth."""
        x = self.normalize(images)
        segs, gts = [], []
        for b in range(images.shape[0]):
            valid = labels[b][labels[b] != self.ignore_index]
            present = valid.unique() if valid.numel() else torch.zeros(1, dtype=labels.dtype, device=labels.device)
            c = present[torch.randint(len(present), ())]
            gt = (labels[b] == c)
            iou = float(torch.empty(()).uniform_(*self.iou_range))
            segs.append(perturb_mask(gt.cpu(), iou).to(x.device))
            gts.append(gt)
        seg = torch.stack(segs)[:, None].to(x.dtype) * 2 - 1
        gt = torch.stack(gts)[:, None].to(x.dtype)
        return refinement_loss(self.refiner(x, seg), gt)

    # ---- official checkpoints (§7) ----------------------------------------------------------------------------

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """The released refinement weights (a DataParallel state dict: `module.` + the release's names; the prefix
        is optional) into `refiner`; the base keeps its own weights."""
        return self.load_mapped_state({f"refiner.{k}": v for k, v in read_state_dict(path).items()}, path, strict,
                                      self.official_scope)

    def save_official(self, path: str) -> None:
        """`refiner` in the release's layout (`module.`-prefixed keys, as train.py saved it)."""
        torch.save({f"module.{k}": v for k, v in self.refiner.state_dict().items()}, path)
