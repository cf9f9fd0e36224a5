"""PPN-style (reconstructed): Wu, Lei, Lin, Li, Qu and Xie, "Patch Proposal Network for Fast Semantic Segmentation
of High-Resolution Images", AAAI 2020. Facts cite docs/specs/ppn.md (§N).

THIS IS A RECONSTRUCTION, NOT PPN's CODE. No code or checkpoint of PPN was ever released (§0) and the paper body
has not been checked; all that is known is its abstract and the caption of its architecture figure (§1): a global
branch ("G-branch") and the patch proposal network (PPN) read the downsampled image, PPN is a classification network
that tells the critical patches from the trivial ones, a refinement branch ("R-branch") refines the critical patches
only, and a feature fusion block fuses its results with the global branch's output. Everything below that is not one
of those sentences is our choice, made to stay comparable with GLNet and the UHRSNet-style reconstruction and built
from the same pieces (`methods/blocks/patches.py`, `methods/blocks/fpn.py`, `methods/blocks/losses.py`):

1. G-branch [recon]: a ResNet + plain FPN (GLNet's global branch without its local-to-global layers) on the whole
   image resized (antialiased bilinear) to `global_size`², logits and the 4-level `ps3` map at stride 4 of that view.
2. Patches [recon]: GLNet's grid of `patch_size` patches at native resolution, overlap >= `min_overlap`, last
   row/column flush with the border (6 x 6 = 36 on DeepGlobe at 508).
3. PPN [recon]: one small classifier per patch on the downsampled view: the patch's footprint box cut out of the
   G-branch's `ps3` and softmax (both detached: PPN is trained by its own loss only) -> 3x3 conv -> BN -> ReLU ->
   stride-2 3x3 conv -> BN -> ReLU -> global average pool -> linear -> one "critical" logit.
4. The classifier's ground truth [recon]: the share of a patch's valid pixels the G-branch gets wrong, measured at
   the G-branch's own resolution (labels nearest-downsampled, patch boxes as in item 3). `critical_error` null (our
   default) uses that share as a soft binary-cross-entropy target (the probability that a pixel of the patch is
   misclassified, which ranks patches); a number makes hard labels, critical = share > `critical_error`. The term
   is weighted by `proposal_weight`.
5. Selection at inference [recon]: the `k = max(1, round(refine_ratio x n))` patches with the highest PPN logits
   (ties: the lower row-major index), a fixed number per image so the cost is predictable. `refine_ratio` is the
   runtime knob (`bench.py sweep`).
6. Selection in training [recon]: the R-branch and fusion block train on the `max(1, round(train_ratio x n))`
   patches the G-branch really gets most wrong (item 4's share; ties by index), `train_ratio` defaulting to
   `refine_ratio`: they learn on the patches PPN is trained to propose, however far PPN itself has got. The other
   patches never reach the R-branch ("alleviates the training burden", §1).
7. R-branch [recon]: a second ResNet + plain FPN on the selected full-resolution patches; no global features inside.
8. Feature fusion block [recon]: [R-branch `ps3`, the patch's box cut from the G-branch `ps3` resized to it] -> 3x3
   conv -> BN -> ReLU -> 1x1 conv, added as a residual to the average of the R-branch logits and the cropped G-branch
   logits; the last conv starts at zero, so the fused patch starts as that late average (the UHRSNet-style
   reconstruction's one-time fusion, for the same reason: a short schedule cannot leave it below the average).
9. Output [recon]: the G-branch logits upsampled bilinearly to the input size, replaced inside the selected patches
   by their fused logits (stride 4, upsampled nearest, averaged where selected patches overlap; GLNet's convention).
   Outside the selected patches the prediction is exactly the G-branch's.
10. Losses [recon]: focal (`focal_gamma`, GLNet's 3; 0 = cross-entropy) on the G-branch logits against labels
   nearest-downsampled to stride 4 of the global view, and on the R-branch's own logits and the fused logits of the
   trained patches; plus item 4's binary cross-entropy. Each term is the mean over images of per-image means.
11. Training [recon]: joint (one phase) by default; `staged` trains the G-branch alone first (phase and recipe key
   `global`), then the R-branch, fusion block and PPN with the G-branch frozen in eval mode (`refine`), so PPN
   learns the errors of the final G-branch.

Other choices of ours: ResNet-50 and GLNet's 256-wide FPN heads by default (GLNet's and UHRSNet-style's backbone,
so that one backbone serves the comparison); ImageNet input normalisation (GLNet feeds [0, 1]); BN + ReLU in the
PPN and fusion heads (GLNet's FPN has none; kept there); `grad_checkpoint` recomputes the R-branch trunk in the
backward pass. No checkpoint layout exists to load (`load_official` says so).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Knob, MethodError, Phase, UHRMethod, register_method
from methods.blocks.fpn import WIDTH, GlobalFPN, HeadOutput, fpn_trunk, frozen_bn_stats, ps3_channels, resize_like
from methods.blocks.losses import focal_loss, nearest_labels
from methods.blocks.patches import Box, LogitStitcher, PatchGrid, crop_boxes, cut_patches

GLOBAL_PARTS = ("resnet_global", "fpn_global")
REFINE_PARTS = ("resnet_local", "fpn_local", "fusion", "proposal")


def check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise MethodError(f"ppn: {name} (share of the patches the R-branch refines) must be in (0, 1], got {value!r}")
    return float(value)


def patch_count(ratio: float, n: int) -> int:
    """How many of n patches a share selects: round(ratio x n), at least one."""
    return min(n, max(1, round(ratio * n)))


def top_patches(scores: torch.Tensor, k: int) -> list[int]:
    """Row-major indices of the k highest scores (ties: the lower index first), in ascending order."""
    order = torch.sort(scores.detach().float().cpu(), descending=True, stable=True).indices
    return sorted(order[:k].tolist())


class ProposalHead(nn.Module):
    """PPN (module docstring, item 3): (n, C, h, w) patch boxes of the downsampled view -> (n,) critical logits."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True))
        self.score = nn.Linear(channels, 1)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(boxes).mean(dim=(2, 3))).squeeze(1)


@register_method
class PPN(UHRMethod):
    name = "ppn"
    label = "PPN-style (reconstructed)"  # spec ppn.md: never "PPN" alone
    published = {"PPN": {}}  # ISDNet's Table 1 row (the PPN paper's own DeepGlobe number, spec §1)
    description = ("PPN-style (reconstructed; no public code): ResNet FPN global branch, a patch proposal classifier "
                   "picking the patches a local FPN branch refines and fuses with the global output (AAAI 2020)")
    knobs = (Knob("refine_ratio", sweep=(0.25, 0.5, 1.0, 0.125), label="refined share", bounds=(0.0, 1.0),
                  help="share of the patches PPN proposes for the R-branch at inference (round(share x n), >= 1)"),)

    def __init__(self, num_classes: int, backbone: str = "resnet50", pretrained: bool | str = False,
                 global_size: int = 508, patch_size: int = 508, min_overlap: int = 50, refine_ratio: float = 0.25,
                 train_ratio: float | None = None, patch_batch: int = 6, head_width: int = WIDTH,
                 fusion_channels: int = 256, proposal_channels: int = 128, critical_error: float | None = None,
                 proposal_weight: float = 1.0, focal_gamma: float = 3.0, staged: bool = False,
                 grad_checkpoint: bool = False, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        if min(global_size, patch_size, patch_batch, fusion_channels, proposal_channels) < 1:
            raise MethodError("ppn: global_size, patch_size, patch_batch and channel counts must be >= 1")
        if not 0 <= min_overlap < patch_size:
            raise MethodError(f"ppn: min_overlap must be in [0, patch_size), got {min_overlap}")
        if head_width < 2 or head_width % 2:
            raise MethodError(f"ppn: head_width must be an even number >= 2, got {head_width}")
        if critical_error is not None and not 0.0 <= critical_error < 1.0:
            raise MethodError(f"ppn: critical_error must be in [0, 1) (a share of wrong pixels) or null, "
                              f"got {critical_error}")
        if proposal_weight < 0:
            raise MethodError(f"ppn: proposal_weight must be >= 0, got {proposal_weight}")
        self.refine_ratio = refine_ratio  # validated by the property
        self.train_ratio = check_ratio("train_ratio", refine_ratio if train_ratio is None else train_ratio)
        self.global_size, self.patch_size, self.min_overlap = global_size, patch_size, min_overlap
        self.patch_batch, self.focal_gamma, self.grad_checkpoint = patch_batch, focal_gamma, bool(grad_checkpoint)
        self.critical_error, self.proposal_weight, self.staged = critical_error, proposal_weight, bool(staged)
        channels = ps3_channels(head_width)
        self.resnet_global = fpn_trunk(backbone, pretrained, "ppn")
        self.fpn_global = GlobalFPN(self.resnet_global.feature_info.channels(), num_classes, ext=False,
                                    width=head_width)
        self.resnet_local = fpn_trunk(backbone, pretrained, "ppn")
        self.fpn_local = GlobalFPN(self.resnet_local.feature_info.channels(), num_classes, ext=False,
                                   width=head_width)  # a plain FPN: no global features inside it
        self.proposal = ProposalHead(channels + num_classes, proposal_channels)
        self.fusion = nn.Sequential(
            nn.Conv2d(2 * channels, fusion_channels, 3, padding=1, bias=False), nn.BatchNorm2d(fusion_channels),
            nn.ReLU(inplace=True), nn.Conv2d(fusion_channels, num_classes, 1))
        nn.init.zeros_(self.fusion[-1].weight)
        nn.init.zeros_(self.fusion[-1].bias)

    @property
    def refine_ratio(self) -> float:
        """Share of the patches refined at inference (the knob); settable on a built model."""
        return self._refine_ratio

    @refine_ratio.setter
    def refine_ratio(self, value: float) -> None:
        self._refine_ratio = check_ratio("refine_ratio", value)

    def load_official(self, path: str):
        raise MethodError(f"ppn: no official PPN code or checkpoint was ever released (spec ppn.md §0), so there is "
                          f"no layout to load {path} from; train this reconstruction with `bench.py train`")

    # ---- building blocks ----------------------------------------------------------------------------

    def grid(self, images: torch.Tensor) -> PatchGrid:
        h, w = images.shape[-2:]
        if min(h, w) < self.patch_size:
            raise MethodError(f"ppn: image side {min(h, w)} is smaller than patch_size {self.patch_size}; "
                              "lower patch_size")
        return PatchGrid.build(h, w, self.patch_size, self.min_overlap)

    @staticmethod
    def boxes(grid: PatchGrid, fmap: torch.Tensor) -> list[Box]:
        """Every patch's footprint in a map of the whole (downsampled) image."""
        boxes = grid.boxes(*fmap.shape[-2:])
        if boxes[0][2] < 1 or boxes[0][3] < 1:
            raise MethodError(f"ppn: a {grid.patch} px patch covers less than one cell of the {tuple(fmap.shape[-2:])} "
                              "global map; raise global_size or patch_size")
        return boxes

    def run_global(self, images: torch.Tensor) -> HeadOutput:
        """G-branch (item 1): logits and ps3 at stride 4 of the whole image resized to global_size²."""
        x = images.to(self.pixel_mean.dtype)
        size = (self.global_size, self.global_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.fpn_global(self.resnet_global(self.normalize(x))[::-1])

    def proposal_logits(self, g: HeadOutput, image: int, grid: PatchGrid) -> torch.Tensor:
        """PPN (item 3): one critical logit per patch of image `image`, row-major (n,)."""
        boxes = self.boxes(grid, g.ps3)
        ps3 = crop_boxes(g.ps3[image:image + 1].detach(), boxes)
        probs = crop_boxes(g.logits[image:image + 1].detach().float().softmax(dim=1).to(ps3.dtype), boxes)
        return self.proposal(torch.cat([ps3, probs], dim=1))

    def global_error(self, g: HeadOutput, labels: torch.Tensor, image: int, grid: PatchGrid) -> torch.Tensor:
        """Item 4: per patch, the share of valid pixels the G-branch gets wrong at its own resolution (n,)."""
        logits = g.logits[image:image + 1].detach()
        target = nearest_labels(labels[image:image + 1], logits.shape[-2:])[0]
        valid = target != self.ignore_index
        wrong = (logits[0].argmax(dim=0) != target) & valid
        return torch.stack([wrong[y:y + h, x:x + w].sum() / valid[y:y + h, x:x + w].sum().clamp_min(1)
                            for y, x, h, w in self.boxes(grid, logits)]).float()

    def proposal_target(self, error: torch.Tensor) -> torch.Tensor:
        """Item 4: the classifier's target, the error share itself (soft) or critical = share > critical_error."""
        return error if self.critical_error is None else (error > self.critical_error).float()

    def select(self, g: HeadOutput, image: int, grid: PatchGrid) -> list[int]:
        """Item 5: the patches PPN proposes for image `image` (ascending row-major indices)."""
        return top_patches(self.proposal_logits(g, image, grid), patch_count(self.refine_ratio, len(grid)))

    def _local(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fpn_local(self.resnet_local(self.normalize(patches))[::-1])
        return out.ps3, out.logits

    def refine(self, images: torch.Tensor, image: int, grid: PatchGrid, g: HeadOutput, indices: list[int],
               chunk: int) -> dict[str, torch.Tensor]:
        """R-branch and fusion block (items 7-8) on patches `indices` of image `image`, `chunk` patches a pass:
        `local` (the R-branch's own logits) and `fused` logits, (k, C, h, w) at stride 4 of the patch."""
        boxes = self.boxes(grid, g.ps3)
        local, fused = [], []
        for start in range(0, len(indices), chunk):
            idx = indices[start:start + chunk]
            patches = cut_patches(images[image:image + 1], grid, idx)
            if self.grad_checkpoint and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                ps3, logits = checkpoint(self._local, patches, use_reentrant=False, context_fn=lambda: (
                    contextlib.nullcontext(), frozen_bn_stats(self.resnet_local)))
            else:
                ps3, logits = self._local(patches)
            own = [boxes[j] for j in idx]
            crop_ps3 = resize_like(crop_boxes(g.ps3[image:image + 1], own), ps3)
            crop_logits = resize_like(crop_boxes(g.logits[image:image + 1], own), ps3)
            local.append(logits)
            fused.append((logits + crop_logits) / 2 + self.fusion(torch.cat([ps3, crop_ps3], dim=1)))
        return {"local": torch.cat(local), "fused": torch.cat(fused)}

    def _focal(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, nearest_labels(labels, logits.shape[-2:]), self.focal_gamma, self.ignore_index)

    # ---- training ----------------------------------------------------------------------------------

    @property
    def phases(self) -> list[Phase]:
        """Joint: one phase. Staged (item 11): `global` trains the G-branch, then `refine` trains the R-branch,
        fusion block and PPN with the G-branch frozen in eval mode."""
        if not self.staged:
            return [Phase("main")]
        return [Phase("global", GLOBAL_PARTS, "global"), Phase("refine", REFINE_PARTS, "refine", GLOBAL_PARTS)]

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses of the current phase (items 4, 6, 10)."""
        terms: dict[str, torch.Tensor] = {}
        if self.phase != "refine":
            g = self.run_global(images)
            terms["loss_global"] = self._focal(g.logits, labels)
            if self.phase == "global":
                return terms
        else:
            with torch.no_grad():  # the frozen G-branch only supplies features and errors
                g = self.run_global(images)
        grid = self.grid(images)
        k = patch_count(self.train_ratio, len(grid))
        per_image: dict[str, list[torch.Tensor]] = {}
        for i in range(images.shape[0]):
            error = self.global_error(g, labels, i, grid)
            if self.proposal_weight:
                logits = self.proposal_logits(g, i, grid).float()
                bce = F.binary_cross_entropy_with_logits(logits, self.proposal_target(error))
                per_image.setdefault("loss_proposal", []).append(self.proposal_weight * bce)
            chosen = top_patches(error, k)
            out = self.refine(images, i, grid, g, chosen, len(chosen))
            targets = cut_patches(labels[i:i + 1], grid, chosen)
            per_image.setdefault("loss_local", []).append(self._focal(out["local"], targets))
            per_image.setdefault("loss_fused", []).append(self._focal(out["fused"], targets))
        terms.update({key: torch.stack(values).mean() for key, values in per_image.items()})
        return terms

    # ---- inference ---------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, H, W) (item 9): the G-branch's, with the proposed patches replaced by their fused logits."""
        return torch.cat([self._predict_one(images[i:i + 1]) for i in range(images.shape[0])])

    def _predict_one(self, image: torch.Tensor) -> torch.Tensor:
        g = self.run_global(image)
        grid = self.grid(image)
        chosen = self.select(g, 0, grid)
        fused = self.refine(image, 0, grid, g, chosen, self.patch_batch)["fused"]
        stitch = LogitStitcher(grid, self.num_classes, device=image.device)
        stitch.add(fused, chosen)
        count = torch.zeros(1, 1, grid.height, grid.width, device=image.device)
        p = grid.patch
        for top, left in (grid.coords[j] for j in chosen):
            count[..., top:top + p, left:left + p] += 1
        base = F.interpolate(g.logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return torch.where(count > 0, stitch.total / count.clamp_min(1), base.to(stitch.total.dtype))
