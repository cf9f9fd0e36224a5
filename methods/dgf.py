"""Deep Guided Filter (Wu, Zheng, Zhang, Huang, "Fast End-to-End Trainable Guided Filter", CVPR 2018) as the UHR
tables' "DGF" refiner, composed with any registered one-phase base method (`base:` in params). Facts cite
docs/specs/dgf.md (§N); upstream is wuhuikai/DeepGuidedFilter @ 0caaf2d (no licence file: read for facts, written anew)
and its pip package `guided-filter-pytorch` 3.7.5 (tests/golden/make_dgf.py checks ours against it).

The official segmentation form (§3.1): the base's logits at the image size are filtered by a full-resolution guided
filter (`GuidedFilter(r=4, eps=1e-2)`, §2.2) whose guide is learned from the image: 1x1 conv 3 -> 64, ReLU, 1x1 conv
64 -> C, one guide channel per class; the output is refined logits. Box means are over the window clipped at the
image border (upstream's cumsum form, here `avg_pool2d` without padding counts: the same means, better rounding).

Ours (§7): the base is trained first with its own loss (phase `base`), then the guide with the base frozen (phase
`refiner`, cross-entropy on the refined logits, ignore index honoured; upstream fine-tunes the whole DeepLab and maps
void to background). The guide reads RGB / 255 (upstream BGR / 255: `bgr_input=True` for its VOC weights, which
`load_official` reads into the guide). `radius` and `eps` keep the official 4 and 1e-2 (knobs of the constructor);
MagNet's table, which ISDNet copies, does not say which DGF it ran (§4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import LoadReport, MethodError, ParamCount, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.refiner import BaseRefiner


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1)² window clipped at the border (upstream BoxFilter(r)(x) / N), same size as x."""
    return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)


def guided_filter(guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Upstream `GuidedFilter(r, eps)(x=guide, y=source)` (§2.2): per window y ~ A x + b with
    A = cov(x, y) / (var(x) + eps), b = mean(y) - A mean(x); output mean(A) x + mean(b). The guide has one channel or
    as many as the source."""
    h, w = source.shape[-2:]
    if min(h, w) <= 2 * radius + 1:
        raise MethodError(f"dgf: the image ({h}x{w}) must exceed 2 * radius + 1 = {2 * radius + 1} on both sides")
    mean_x, mean_y = box_mean(guide, radius), box_mean(source, radius)
    cov_xy = box_mean(guide * source, radius) - mean_x * mean_y
    var_x = box_mean(guide * guide, radius) - mean_x * mean_x
    a = cov_xy / (var_x + eps)
    b = mean_y - a * mean_x
    return box_mean(a, radius) * guide + box_mean(b, radius)


class LearnedGuide(nn.Module):
    """Upstream `guided_map_conv1` / `guided_map_conv2` (§3.1): 1x1 conv 3 -> 64, ReLU, 1x1 conv 64 -> C."""

    def __init__(self, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, image01: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(image01)))


@register_method
class DGF(BaseRefiner):
    name = "dgf"
    description = ("DGF: full-resolution guided filter with a learned guide over a base method's logits "
                   "(base: in params; CVPR 2018)")
    published = {"DGF": {}}
    pixel_stats = ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))  # the guide reads image / 255 (§3.2)
    param_counts = (ParamCount("spec §3.1: 256 + 65 C guide parameters", named={"refiner": 256 + 65 * 7},
                               config={"base": "global"}),)
    # the release's VOC snapshot holds its DeepLab-ResNet-101 (`Scale.*`) and the guide; the base trains here
    official_scope = "refiner."

    def __init__(self, num_classes: int, ignore_index: int = 255, base: str = "global", base_model: dict | None = None,
                 radius: int = 4, eps: float = 1e-2, bgr_input: bool = False) -> None:
        super().__init__(num_classes, ignore_index, base, base_model)
        if radius < 1 or eps <= 0:
            raise MethodError(f"dgf: radius must be >= 1 and eps > 0 (official 4 and 1e-2), got {radius} and {eps}")
        self.radius, self.eps, self.bgr_input = int(radius), float(eps), bool(bgr_input)
        self.refiner = LearnedGuide(num_classes)

    def load_official(self, path: str, strict: bool = True) -> LoadReport:
        """The release's snapshot (`MS_Deeplab`'s state dict, predict_dgf.py:35-36; VOC, 21 classes, guide read from
        BGR / 255: `bgr_input=True`): `guided_map_conv1/2` -> the learned guide; its DeepLab (`Scale.*`) is reported
        skipped, our base keeps its own weights."""
        state, skipped = {}, []
        for key, value in read_state_dict(path).items():
            if key.startswith("Scale."):
                skipped.append(key)
            else:  # anything else unexpected is named by load_mapped_state
                state[key.replace("guided_map_conv", "refiner.conv", 1)] = value
        report = self.load_mapped_state(state, path, strict, self.official_scope)
        report.skipped += skipped
        return report

    def save_official(self, path: str) -> None:
        """The guide in the release's names (`guided_map_conv1/2`); no DeepLab, which is our base's business."""
        state = self.refiner.state_dict()
        torch.save({key.replace("conv", "guided_map_conv", 1): value for key, value in state.items()}, path)

    def refine(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Base logits (B, C, H, W) at the image size -> refined logits, filtered in float32."""
        guide = self.refiner(self.network_input(images))
        return guided_filter(guide.float(), logits.float(), self.radius, self.eps)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.refine(images, self.base.predict(images))

    def refiner_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logits = self.base.predict(images)
        return {"loss_ce": F.cross_entropy(self.refine(images, logits), labels.long(),
                                           ignore_index=self.ignore_index)}
