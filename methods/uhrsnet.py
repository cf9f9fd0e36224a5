"""UHRSNet-style (reconstructed): Shan et al., "UHRSNet: A Semantic Segmentation Network Specifically
for Ultra-High-Resolution Images", ICPR 2020. Facts cite docs/specs/uhrsnet.md (§N).

THIS IS A RECONSTRUCTION, NOT UHRSNet's CODE. No code of UHRSNet exists anywhere (§0) and the paper body
has not been checked; all that is known is its two claimed contributions (§1) and its headline DeepGlobe
numbers (72.0 "global" / 71.4 "local" mIoU, its own protocol). Everything below that is not one of those
two sentences is our choice, made to stay comparable with GLNet (the method UHRSNet improves on, §2) and
built from GLNet's pieces (`methods/blocks/patches.py`, `methods/blocks/fpn.py`, `methods/blocks/losses.py`):

1. One-time global-local fusion (contribution 1, §4.2) [recon]: a global ResNet + plain FPN on the whole
   image resized to `global_size`, a local ResNet + plain FPN on `patch_size` patches (GLNet's grid, overlap
   >= `min_overlap`). The branches never share features inside their FPNs (GLNet does it at every layer,
   both ways). Fusion happens once: each patch's footprint is cropped from the global ps3, resized to the
   local ps3 and concatenated: [ps3_l, crop(ps3_g)] -> 3x3 conv -> BN -> ReLU -> 1x1 conv (GLNet's
   ensemble head promoted to the only fusion point), added as a residual correction to the average of the
   local logits and the cropped global logits; its last conv starts at zero, so the fused output starts as
   the fusion-off model's (the two branches' late average) and a short schedule cannot leave it below that.
   (A correction of the local logits alone, tried first, stayed near the local branch after a CPU-length
   schedule: 61.9 vs 65.2 mIoU for the plain late average of the same weights, synthetic data.)
   Switch: `global_local_fusion`.
2. Local feature fusion, LFF (contribution 2, §4.3 reading (a)) [recon]: each patch's ps3 receives its
   grid neighbours' features. Every patch's ps3 is projected (1x1 conv) to `lff_channels` "messages"; for a
   patch, the messages of its existing 3x3 grid neighbours (3 at a corner, 5 on an edge, 8 inside; never
   the patch itself, never a patch further away) are pasted at their true offsets into a window = the
   patch footprint plus `lff_margin` feature cells each side (overlaps averaged, coverage counted in
   feature space), concatenated with the patch's own message and the coverage mask, and refined by
   3x3 conv -> BN -> ReLU -> dilated 3x3 conv -> BN -> ReLU -> dilated 3x3 conv (dilations chosen so the
   patch border sees the whole margin); the window centre is added to ps3 as a residual. The last conv
   starts at zero, so LFF starts as the identity. Neighbours are not detached: gradients flow through all
   patches of an image. Switch: `local_fusion`.

Other choices of ours: every part (global branch, local branch, LFF, fusion head) is initialised from its own
seed derived from the run's, so the ablation rows start the parts they share from identical weights and differ
only by their switches. Training (§4.4) is joint by default: loss = focal(global logits, GT at stride 4 of the
global input) + focal(local logits) + focal(fused logits) + `fmreg` x MSE(ps3_l, crop(ps3_g) detached), each
term present only when its branch/head exists. `staged` uses §4.4's two-stage fallback instead: the global
branch first (its own recipe, e.g. many cheap whole-image steps), then the local branch, LFF and fusion head
with the global branch frozen; the smoke recipe does this because a joint schedule short enough for a CPU
never lets the global branch learn context (e.g. pasture vs rangeland on the synthetic data). `train_block`
(optional) trains the local side on a random k x k block of neighbouring patches of each whole image instead
of all patches, while the global branch still sees the whole image (training on crops would show it only the
crop, less context than at test time). `focal_gamma` 0 makes the focal loss cross-entropy (smoke recipe).
ImageNet input normalisation (GLNet feeds [0, 1]). BN + ReLU in the fusion and LFF heads (GLNet's FPN has none;
kept there). Patch logits are upsampled nearest and averaged over overlaps (GLNet convention,
argmax-equal to its sum). `global_scale` (optional) sizes the global input as a fraction of the input instead
of a fixed `global_size`, so a model trained on crops sees the global view at the test-time scale.

Ablation (the paper's Table III layout; `bench.py ablation`): `branches` (local / global / both) with the two
switches gives the five rows: only local branch w/o (local feature) fusion, only local branch with fusion, only
global branch, both branches w/o local fusion (the one-time global-local fusion only), both with local fusion.
With both switches off and both branches, the model is two plain independent branches whose logits are averaged
per patch ("late averaging", also ours).
"""
from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Ablation, MethodError, Output, Phase, UHRMethod, register_method
from methods.blocks.fpn import WIDTH, GlobalFPN, HeadOutput, fpn_trunk, frozen_bn_stats, ps3_channels, resize_like
from methods.blocks.losses import focal_loss, nearest_labels
from methods.blocks.patches import LogitStitcher, PatchGrid, crop_boxes, cut_patches

BRANCHES = ("both", "local", "global")


@contextlib.contextmanager
def part_seed(base: int, part: str) -> Iterator[None]:
    """Build one part from its own seed (run seed x part name), leaving the global RNG as it was, so every
    ablation row starts the parts it shares with another row from identical weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((base + zlib.crc32(part.encode())) % 2**63)
        yield


def grid_neighbours(rows: int, cols: int, index: int) -> list[int]:
    """Row-major indices of the existing 3x3-grid neighbours of patch `index` (itself excluded)."""
    r, c = divmod(index, cols)
    return [(r + dr) * cols + (c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
            if (dr or dc) and 0 <= r + dr < rows and 0 <= c + dc < cols]


class LocalFeatureFusion(nn.Module):
    """LFF (module docstring, item 2): neighbour messages pasted around each patch, refined, added back. The
    refinement's dilations grow with the margin so that its receptive field reaches the window edge from the
    patch border (3x3 convs at dilation 1 would see 2 cells of the neighbours however wide the margin)."""

    def __init__(self, channels: int, lff_channels: int, margin: int) -> None:
        super().__init__()
        if margin < 0:
            raise MethodError(f"uhrsnet: lff_margin must be >= 0 feature cells, got {margin}")
        self.margin = margin
        middle = max(1, (margin - 1) // 3)
        self.last_dilation = max(1, margin - 1 - middle)  # reach per side: 1 + middle + last >= margin
        self.message = nn.Conv2d(channels, lff_channels, 1)
        self.refine = nn.Sequential(
            nn.Conv2d(2 * lff_channels + 1, lff_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(lff_channels), nn.ReLU(inplace=True),
            nn.Conv2d(lff_channels, lff_channels, 3, padding=middle, dilation=middle, bias=False),
            nn.BatchNorm2d(lff_channels), nn.ReLU(inplace=True),
            nn.Conv2d(lff_channels, channels, 3, padding=self.last_dilation, dilation=self.last_dilation))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def windows(self, messages: torch.Tensor, grid: PatchGrid, indices: Sequence[int] | None = None) -> torch.Tensor:
        """(n, c, h, w) messages of all n patches of one image -> (k, 2c + 1, h + 2m, w + 2m) for the k patches
        `indices` (default all): the pasted
        neighbour messages (averaged where they overlap), the patch's own message in the centre, and
        the neighbour coverage count."""
        n, ch, h, w = messages.shape
        m = self.margin
        rows, cols = len(grid.tops), len(grid.lefts)
        coords = grid.coords
        sy, sx = h / grid.patch, w / grid.patch  # feature cells per pixel
        out = []
        for i in range(n) if indices is None else indices:
            canvas = messages.new_zeros(ch, h + 2 * m, w + 2 * m)
            count = messages.new_zeros(1, h + 2 * m, w + 2 * m)
            for j in grid_neighbours(rows, cols, i):
                y = round((coords[j][0] - coords[i][0]) * sy) + m
                x = round((coords[j][1] - coords[i][1]) * sx) + m
                y0, x0 = max(y, 0), max(x, 0)
                y1, x1 = min(y + h, h + 2 * m), min(x + w, w + 2 * m)
                if y1 <= y0 or x1 <= x0:
                    continue
                canvas[:, y0:y1, x0:x1] = canvas[:, y0:y1, x0:x1] + messages[j, :, y0 - y:y1 - y, x0 - x:x1 - x]
                count[:, y0:y1, x0:x1] += 1
            own = F.pad(messages[i], (m, m, m, m))
            out.append(torch.cat([canvas / count.clamp_min(1), own, count], dim=0))
        return torch.stack(out)

    def forward(self, ps3: torch.Tensor, grid: PatchGrid, chunk: int | None = None) -> torch.Tensor:
        """ps3 of all patches of one image (n, C, h, w), row-major -> refined ps3, same shape. `chunk` bounds
        how many windows are alive at once (inference); the messages of all patches are kept."""
        messages = self.message(ps3)
        n = ps3.shape[0]
        return torch.cat([self._refine(ps3[idx[0]:idx[-1] + 1], self.windows(messages, grid, idx))
                          for idx in _chunks(n, chunk or n)])

    def _refine(self, ps3: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        m, d, (h, w) = self.margin, self.last_dilation, ps3.shape[-2:]
        hidden = self.refine[:-1](windows)
        # the last conv only where the centre needs it: same values as convolving the window, then cropping
        if d > m:
            hidden, m = F.pad(hidden, (d - m,) * 4), d
        last = self.refine[-1]
        return ps3 + F.conv2d(hidden[:, :, m - d:m + h + d, m - d:m + w + d], last.weight, last.bias, dilation=d)


@register_method(aliases=("uhrnet",))
class UHRSNet(UHRMethod):
    name = "uhrsnet"
    label = "UHRSNet-style (reconstructed)"  # spec uhrsnet.md: never "UHRSNet" alone
    # the paper's Table II row (its "local" column: our `local` output; "global": the final prediction)
    published = {"UHRNet": {}}
    description = ("UHRSNet-style (reconstructed; no public code): global + local ResNet FPN branches, one-time "
                   "global-local fusion, local feature fusion across neighbouring patches (ICPR 2020)")

    def __init__(self, num_classes: int, backbone: str = "resnet50", pretrained: bool | str = False,
                 branches: str = "both", global_local_fusion: bool = True, local_fusion: bool = True,
                 global_size: int = 508, global_scale: float | None = None, patch_size: int = 508,
                 min_overlap: int = 50, patch_batch: int = 6, head_width: int = WIDTH, fusion_channels: int = 256,
                 lff_channels: int = 128, lff_margin: int = 32, focal_gamma: float = 3.0, fmreg: float = 0.15,
                 grad_checkpoint: bool = False, staged: bool = False, train_block: int | None = None,
                 ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        if branches not in BRANCHES:
            raise MethodError(f"uhrsnet: branches must be one of {', '.join(BRANCHES)}, got '{branches}'")
        if min(global_size, patch_size, patch_batch, fusion_channels, lff_channels) < 1:
            raise MethodError("uhrsnet: sizes, patch_batch and channel counts must be >= 1")
        if head_width < 2 or head_width % 2:
            raise MethodError(f"uhrsnet: head_width must be an even number >= 2, got {head_width}")
        if train_block is not None and (not isinstance(train_block, int) or train_block < 1):
            raise MethodError(f"uhrsnet: train_block must be a whole number of patches >= 1 or null, got "
                              f"{train_block!r}")
        if global_scale is not None and not 0 < global_scale <= 1:
            raise MethodError(f"uhrsnet: global_scale must be in (0, 1] or null, got {global_scale}")
        self.branches = branches
        self.use_global, self.use_local = branches in ("both", "global"), branches in ("both", "local")
        self.global_local_fusion = bool(global_local_fusion) and branches == "both"
        self.local_fusion = bool(local_fusion) and self.use_local
        self.global_size, self.global_scale = global_size, global_scale
        self.patch_size, self.min_overlap, self.patch_batch = patch_size, min_overlap, patch_batch
        self.focal_gamma, self.fmreg, self.grad_checkpoint = focal_gamma, fmreg, grad_checkpoint
        self.staged, self.train_block = bool(staged), train_block
        self.ps3_channels = ps3_channels(head_width)
        base = int(torch.randint(2**62, (), device="cpu"))  # one draw from the run's RNG in every configuration
        if self.use_global:
            with part_seed(base, "global"):
                self.resnet_global = fpn_trunk(backbone, pretrained, "uhrsnet")
                self.fpn_global = GlobalFPN(self.resnet_global.feature_info.channels(), num_classes, ext=False,
                                            width=head_width)
        if self.use_local:
            with part_seed(base, "local"):
                self.resnet_local = fpn_trunk(backbone, pretrained, "uhrsnet")
                self.fpn_local = GlobalFPN(self.resnet_local.feature_info.channels(), num_classes, ext=False,
                                           width=head_width)  # a plain FPN: no global features inside it
        if self.local_fusion:
            with part_seed(base, "lff"):
                self.lff = LocalFeatureFusion(self.ps3_channels, lff_channels, lff_margin)
        if self.global_local_fusion:
            with part_seed(base, "fusion"):
                self.fusion = nn.Sequential(
                    nn.Conv2d(2 * self.ps3_channels, fusion_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(fusion_channels), nn.ReLU(inplace=True),
                    nn.Conv2d(fusion_channels, num_classes, 1))
            nn.init.zeros_(self.fusion[-1].weight)
            nn.init.zeros_(self.fusion[-1].bias)

    # ---- building blocks ----------------------------------------------------------------------------

    def _global_input(self, images: torch.Tensor) -> torch.Tensor:
        """The whole input resized (antialiased bilinear) to global_size² or by global_scale, normalised."""
        h, w = images.shape[-2:]
        if self.global_scale is not None:
            size = (max(32, round(h * self.global_scale)), max(32, round(w * self.global_scale)))
        else:
            size = (self.global_size, self.global_size)
        x = images.to(self.pixel_mean.dtype)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.normalize(x)

    def _grid(self, images: torch.Tensor) -> PatchGrid:
        return PatchGrid.build(images.shape[-2], images.shape[-1], self.patch_size, self.min_overlap)

    def run_global(self, images: torch.Tensor) -> HeadOutput:
        """Plain global branch on the resized whole image: logits and ps3 at stride 4 of the global input."""
        return self.fpn_global(self.resnet_global(self._global_input(images))[::-1])

    def _local_chunk(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fpn_local(self.resnet_local(self.normalize(patches))[::-1])
        return out.ps3, out.logits

    def run_local(self, image: torch.Tensor, grid: PatchGrid, chunk: int) -> torch.Tensor:
        """Plain local branch on every patch of one image (1, 3, H, W): ps3 of all patches (n, C, h, w)."""
        maps = []
        for idx in _chunks(len(grid), chunk):
            patches = cut_patches(image, grid, idx)
            if self.grad_checkpoint and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                ps3 = checkpoint(lambda p: self._local_chunk(p)[0], patches, use_reentrant=False,
                                 context_fn=lambda: (contextlib.nullcontext(), frozen_bn_stats(self.resnet_local)))
            else:
                ps3 = self._local_chunk(patches)[0]
            maps.append(ps3)
        return torch.cat(maps)

    def global_crops(self, fmap: torch.Tensor, image: int, grid: PatchGrid, like: torch.Tensor) -> torch.Tensor:
        """Every patch footprint cut from image `image`'s global map, resized to the local map size."""
        return resize_like(crop_boxes(fmap[image:image + 1], grid.boxes(*fmap.shape[-2:])), like)

    def image_outputs(self, images: torch.Tensor, image: int, grid: PatchGrid, g: HeadOutput | None,
                      chunk: int) -> dict[str, torch.Tensor]:
        """Per-patch outputs of image `image` (all patches, row-major, stride 4 of the patch): `local`
        logits (after LFF when on), `fused` logits (one-time fusion) or `late` (mean of local and the
        cropped global logits, fusion off), and `ps3_local` / `ps3_global_crop` for the feature loss."""
        ps3_l = self.run_local(images[image:image + 1], grid, chunk)
        if self.local_fusion:
            ps3_l = self.lff(ps3_l, grid, chunk)
        out = {"ps3_local": ps3_l, "local": self.fpn_local.classify(ps3_l)}
        if g is not None:
            crop = self.global_crops(g.ps3, image, grid, ps3_l)
            out["ps3_global_crop"] = crop
            late = (out["local"] + self.global_crops(g.logits, image, grid, ps3_l)) / 2
            if self.global_local_fusion:
                # residual: the fusion head corrects the late average of the two branches (zero-initialised, so
                # the fused output starts as the fusion-off model's)
                out["fused"] = late + torch.cat([
                    self.fusion(torch.cat([ps3_l[idx[0]:idx[-1] + 1], crop[idx[0]:idx[-1] + 1]], dim=1))
                    for idx in _chunks(len(grid), chunk)])
            else:
                out["late"] = late
        return out

    def _focal(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, nearest_labels(labels, logits.shape[-2:]), self.focal_gamma, self.ignore_index)

    # ---- training ----------------------------------------------------------------------------------

    @property
    def phases(self) -> list[Phase]:
        """Joint: one phase. Staged (spec §4.4's two-stage fallback): phase `global` trains the global branch
        (recipe key `global`), then phase `local` trains the local branch, LFF and fusion head with the global
        branch frozen in eval mode (recipe key `local`). A one-branch configuration keeps only its branch's
        phase, with the same recipe and sample order as in the full model, so ablation rows stay comparable."""
        if not self.staged:
            return [Phase("main")]
        global_parts = ("resnet_global", "fpn_global")
        local_parts = ("resnet_local", "fpn_local", *(("lff",) if self.local_fusion else ()),
                       *(("fusion",) if self.global_local_fusion else ()))
        phases = [Phase("global", global_parts, "global", data_stream=0)] if self.use_global else []
        if self.use_local:
            phases.append(Phase("local", local_parts, "local", global_parts if self.use_global else (),
                                data_stream=1))
        return phases

    def _train_grid(self, images: torch.Tensor) -> PatchGrid:
        """The patches trained on: all, or a random `train_block` x `train_block` block of neighbouring patches
        (the same block for the whole batch). The block keeps whole-image coordinates, so the global branch
        still sees the whole image and its crops land where they would at test time."""
        grid = self._grid(images)
        k = self.train_block
        if k is None or (k >= len(grid.tops) and k >= len(grid.lefts)):
            return grid
        r0 = int(torch.randint(max(1, len(grid.tops) - k + 1), ()))
        c0 = int(torch.randint(max(1, len(grid.lefts) - k + 1), ()))
        return replace(grid, tops=grid.tops[r0:r0 + k], lefts=grid.lefts[c0:c0 + k])

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses of the current phase (module docstring). Per-patch terms are means over all patches."""
        terms: dict[str, torch.Tensor] = {}
        train_local = self.use_local and self.phase != "global"
        train_global = self.use_global and self.phase != "local"
        g = None
        if train_global:
            g = self.run_global(images)
            terms["loss_global"] = self._focal(g.logits, labels)
        elif self.use_global:
            with torch.no_grad():  # staged phase `local`: the frozen global branch only supplies features
                g = self.run_global(images)
        if not train_local:
            return terms
        grid = self._train_grid(images)
        per_image: dict[str, list[torch.Tensor]] = {}
        for i in range(images.shape[0]):
            out = self.image_outputs(images, i, grid, g, len(grid))
            targets = cut_patches(labels[i:i + 1], grid, range(len(grid)))
            per_image.setdefault("loss_local", []).append(self._focal(out["local"], targets))
            if "fused" in out:
                per_image.setdefault("loss_fused", []).append(self._focal(out["fused"], targets))
            if "fused" in out and self.fmreg:
                mse = F.mse_loss(out["ps3_local"], out["ps3_global_crop"].detach())
                per_image.setdefault("loss_fmreg", []).append(self.fmreg * mse)
        terms.update({k: torch.stack(v).mean() for k, v in per_image.items()})
        return terms

    # ---- inference ---------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, H, W): global only -> global logits upsampled bilinear; otherwise per-patch logits
        (fused, late-averaged, or local) upsampled nearest and averaged over patch overlaps."""
        return torch.cat([self._predict_one(images[i:i + 1]) for i in range(images.shape[0])])

    def _predict_one(self, image: torch.Tensor, output: str | None = None) -> torch.Tensor:
        g = self.run_global(image) if self.use_global else None
        if not self.use_local:
            return F.interpolate(g.logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        grid = self._grid(image)
        out = self.image_outputs(image, 0, grid, g, self.patch_batch)
        key = output or next(k for k in ("fused", "late", "local") if k in out)
        if key not in out:
            raise MethodError(f"uhrsnet: this configuration has no output '{key}' (it has: "
                              f"{', '.join(k for k in ('fused', 'late', 'local') if k in out)})")
        stitch = LogitStitcher(grid, self.num_classes, device=image.device)
        stitch.add(out[key], range(len(grid)))
        return stitch.result()

    @property
    def outputs(self) -> tuple[Output, ...]:
        """With both branches, the local branch's own prediction: the paper's "local" number (§4.6)."""
        if self.use_global and self.use_local:
            return (Output("local", "logits", "the local branch alone (after LFF), the paper's \"local\" number"),)
        return ()

    @torch.no_grad()
    def predict_output(self, images: torch.Tensor, output: str) -> torch.Tensor:
        """One named output at input size: 'local' (the paper's "local" number, §4.6), 'fused' or 'late'."""
        if not self.use_local:
            raise MethodError(f"uhrsnet: the global-only configuration has no output '{output}'")
        return torch.cat([self._predict_one(images[i:i + 1], output) for i in range(images.shape[0])])


def _chunks(n: int, size: int) -> Iterator[list[int]]:
    for start in range(0, n, size):
        yield list(range(start, min(start + size, n)))


def ablation_row(key: str, label: str, branches: str, local_fusion: bool) -> Ablation:
    """One row of the paper's Table III (labelled as the paper prints it): its switches as model keywords."""
    return Ablation(key, label, {"branches": branches, "local_fusion": local_fusion,
                                 "global_local_fusion": branches == "both"}, table="Table III")


# The five rows of the paper's ablation (Table III layout; `bench.py ablation --method uhrsnet`).
UHRSNet.ablations = (
    ablation_row("local", "only local branch w/o fusion", "local", False),
    ablation_row("local_lff", "only local branch with fusion", "local", True),
    ablation_row("global", "only global branch", "global", False),
    ablation_row("global_local", "both branches w/o local fusion", "both", False),
    ablation_row("global_local_lff", "both branches with local fusion", "both", True),
)
