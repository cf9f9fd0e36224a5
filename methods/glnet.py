"""GLNet (Chen et al., CVPR 2019): a global ResNet-50 + FPN branch on the downsampled image and a
local one on full-resolution patches, exchanging features inside their FPN heads, trained in three
phases. Facts cite docs/specs/glnet.md (§N); upstream is VITA-Group/GLNet @ 7b7bdee.

The defaults reproduce the release's inference (tests/test_golden_glnet.py checks the logits of modes 1-3
against the official code on the same weights): the global view is Pillow's bilinear resize of the uint8
image, bit for bit (`global_resize="pil"`, methods/blocks/resize.py; §4.3, §5.1), and the local-to-global
canvases are divided by upstream's coverage template, the full-resolution patch-count map bilinearly
downsampled to each feature map (`l2g_coverage="upstream"`; §3.5).

Labelled variants, never the default (keywords, e.g. params.yaml `methods.glnet.model`):
* `l2g_coverage="exact"`: divide by the coverage counted in feature space instead (§10.1 #9: upstream's
  template is off by up to 3x at 6% of the stride-4/8 positions); it changes the refined global branch
  and so ~0.2% of the final pixels at DeepGlobe scale.
* `global_resize="antialias"`: torch's antialiased bilinear resize rounded to uint8 (±1 against Pillow on
  ~10% of the values).

Deviations from the release, all on purpose (§10.1): the module is stateless (each image's global
context is passed explicitly, so batches of any size and multi-GPU work); patch logits are averaged
over overlaps (argmax-equivalent to upstream's sum); inference keeps only per-patch logits, never
per-patch features.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from methods.base import MethodError, ParamCount, Phase, UHRMethod, count_parameters, register_method
from methods.blocks.fpn import (
    WIDTH,
    GlobalFPN,
    HeadOutput,
    LocalFPN,
    Pyramid,
    fpn_trunk,
    frozen_bn_stats,
    ps3_channels,
    resize_like,
)
from methods.blocks.losses import focal_loss, nearest_labels
from methods.blocks.patches import LogitStitcher, PatchGrid, crop_boxes, cut_patches
from methods.blocks.resize import pil_bilinear_resize

# ---------------------------------------------------------------------------------------------------
# Local-to-global merge (§3.5); the patch grid itself is methods/blocks/patches.py


class FeatureCanvas:
    """Local-to-global merge of one image (§3.5): every patch map is resized to its box in the global
    map, summed into a zero canvas, and the sum divided by the coverage at the end: upstream's template
    (`coverage="upstream"`) or the count of boxes at each position (`"exact"`)."""

    def __init__(self, like: Pyramid, grid: PatchGrid, coverage: str = "upstream") -> None:
        self.grid, self.coverage = grid, coverage
        self.sums = [torch.zeros_like(m[:1]) for m in like.maps()]

    def add(self, local: Pyramid, indices: Sequence[int]) -> None:
        for canvas, maps in zip(self.sums, local.maps(), strict=True):
            boxes = self.grid.boxes(*canvas.shape[-2:])
            resized = F.interpolate(maps, size=boxes[0][2:], mode="bilinear", align_corners=False)  # boxes share h, w
            for i, j in enumerate(indices):
                y, x, h, w = boxes[j]
                canvas[:, :, y:y + h, x:x + w] += resized[i:i + 1]

    def result(self) -> Pyramid:
        out = []
        for canvas in self.sums:
            size, dev = canvas.shape[-2:], canvas.device
            if self.coverage == "upstream":
                count = self.grid.upstream_coverage(*size, device=dev)
            else:
                count = self.grid.coverage(*size, device=dev).clamp_min(1)  # uncovered stays 0
            out.append(canvas / count)
        return Pyramid.from_maps(out)


# ---------------------------------------------------------------------------------------------------
# The method

GLOBAL, G2L, L2G = "global", "global2local", "local2global"
L2G_COVERAGES = ("upstream", "exact")  # the first is the default (module docstring)
GLOBAL_RESIZES = ("pil", "antialias")
RELEASE_FILES = {G2L: "fpn_deepglobe_global2local.pth", L2G: "fpn_deepglobe_local2global.pth",
                 GLOBAL: "fpn_deepglobe_global.pth"}  # §8; l2g before global: "global.pth" ends both


def _prefixed(module: str, names: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{module}.{n}" for n in names)


@register_method
class GLNet(UHRMethod):
    name = "glnet"
    description = ("GLNet: global + local ResNet-50 FPN branches sharing features, 3-phase training (CVPR 2019); "
                   "inference as the release (labelled variants: l2g_coverage=exact, global_resize=antialias)")
    published = {"GLNet": {}}
    # upstream feeds torchvision's ToTensor() output (x / 255, no mean subtraction; §3.1)
    pixel_stats = ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))
    # spec §7: the upstream `fpn` module's tensors, and the parameters inference uses (7 classes)
    param_counts = (ParamCount("spec §7", named={"checkpoint": 79_200_917, "inference": 102_741_212}),)

    def __init__(self, num_classes: int, backbone: str = "resnet50", pretrained: bool | str = False,
                 global_size: int = 508, patch_size: int = 508, min_overlap: int = 50, patch_batch: int = 6,
                 train_patch_batch: int = 6, fmreg: float = 0.15, focal_gamma: float = 3.0,
                 l2g_coverage: str = "upstream", global_resize: str = "pil", grad_checkpoint: bool = True,
                 offload_features: bool = False, head_width: int = WIDTH, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        if l2g_coverage not in L2G_COVERAGES:
            raise MethodError(f"glnet: l2g_coverage must be one of {', '.join(L2G_COVERAGES)}, "
                              f"got '{l2g_coverage}'")
        if global_resize not in GLOBAL_RESIZES:
            raise MethodError(f"glnet: global_resize must be one of {', '.join(GLOBAL_RESIZES)}, "
                              f"got '{global_resize}'")
        if min(global_size, patch_size, patch_batch, train_patch_batch) < 1:
            raise MethodError("glnet: global_size, patch_size, patch_batch and train_patch_batch must be >= 1")
        if head_width < 2 or head_width % 2:
            raise MethodError(f"glnet: head_width must be an even number >= 2 (upstream 256), got {head_width}")
        self.global_size, self.patch_size, self.min_overlap = global_size, patch_size, min_overlap
        self.patch_batch, self.train_patch_batch = patch_batch, train_patch_batch
        self.fmreg, self.focal_gamma = fmreg, focal_gamma
        self.l2g_coverage, self.global_resize = l2g_coverage, global_resize
        self.grad_checkpoint, self.offload_features = grad_checkpoint, offload_features

        # Upstream attribute names (§8), so a released state dict maps key for key.
        self.resnet_global = fpn_trunk(backbone, pretrained, "glnet")
        self.resnet_local = fpn_trunk(backbone, pretrained, "glnet")
        channels = self.resnet_global.feature_info.channels()  # c2..c5
        self.fpn_global = GlobalFPN(channels, num_classes, ext=True, width=head_width)
        self.fpn_local = LocalFPN(channels, num_classes, width=head_width)
        self.ps3_channels = ps3_channels(head_width)
        self.ensemble_conv = nn.Conv2d(2 * self.ps3_channels, num_classes, kernel_size=3, padding=1)
        nn.init.normal_(self.ensemble_conv.weight, mean=0.0, std=0.01)  # bias keeps torch's default (§3.6)
        # The frozen stage-1 global branch that feeds the local branch in phase 3 and at inference
        # (upstream's second `fpn` instance `global_fixed`; §3.5, §10.1 #10). Filled by set_phase(L2G).
        self.global_fixed = nn.ModuleDict({"resnet_global": fpn_trunk(backbone, False, "glnet"),
                                           "fpn_global": GlobalFPN(channels, num_classes, ext=False,
                                                                   width=head_width)})
        self.global_fixed.requires_grad_(False)
        self.register_buffer("global_fixed_ready", torch.tensor(False))

    # ---- phases -----------------------------------------------------------------------------------

    @property
    def phases(self) -> list[Phase]:
        """§4.1. Trainable lists name only layers that receive gradients (upstream also put the unused
        base FPN layers into the stage-3 optimiser and `ensemble_conv` into stage 1's; no effect)."""
        base = _prefixed("fpn_global", GlobalFPN.path_names(ext=False))
        ext = _prefixed("fpn_global", GlobalFPN.path_names(ext=True))
        return [
            Phase(GLOBAL, ("resnet_global", *base), "phase1", ("resnet_local", "fpn_local", "global_fixed")),
            Phase(G2L, ("resnet_local", "fpn_local", "ensemble_conv"), "phase2",
                  ("resnet_global", "fpn_global", "global_fixed")),
            Phase(L2G, ("resnet_global", *ext, "ensemble_conv"), "phase3",
                  ("resnet_local", "fpn_local", "global_fixed")),
        ]

    def set_phase(self, name: str | None) -> None:
        """Select what forward_train trains and what predict runs; None = final inference. Entering
        phase 3 snapshots the (stage-1) global branch into `global_fixed` unless a checkpoint already
        filled it; entering phase 1 invalidates that snapshot."""
        super().set_phase(name)
        if name == GLOBAL:
            self.global_fixed_ready.fill_(False)
        if name == L2G and not bool(self.global_fixed_ready):
            self._snapshot_global()

    def _snapshot_global(self) -> None:
        self.global_fixed["resnet_global"].load_state_dict(self.resnet_global.state_dict())
        fixed = self.global_fixed["fpn_global"]
        fixed.load_state_dict({k: v for k, v in self.fpn_global.state_dict().items() if k in fixed.state_dict()})
        self.global_fixed_ready.fill_(True)

    def frozen_modules(self) -> tuple[str, ...]:
        # outside the phases (final inference) the frozen stage-1 copy stays frozen too
        return super().frozen_modules() if self.phase is not None else ("global_fixed",)

    def parameter_counts(self) -> dict[str, int]:
        """`checkpoint`: the upstream `fpn` module (what a released file holds, §7); `inference`: the
        weights final inference uses (frozen stage-1 global, local, refined global, ensemble);
        `total`: this module (checkpoint + the frozen copy)."""
        ext = sum(count_parameters(self.fpn_global.get_submodule(n)) for n in GlobalFPN.path_names(ext=True))
        used = [self.global_fixed, self.resnet_local, self.fpn_local, self.resnet_global, self.ensemble_conv]
        return {"checkpoint": count_parameters(self) - count_parameters(self.global_fixed),
                "inference": sum(count_parameters(m) for m in used) + ext,
                "total": count_parameters(self)}

    # ---- building blocks ----------------------------------------------------------------------------

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        """0-255 RGB -> network input: (x - pixel_mean) / pixel_std, by default x / 255 as upstream's ToTensor()
        (§3.1); pixel_mean = pixel_std = 127.5 is its pre-1bd67ff Normalize(0.5, 0.5) (§10.1 #5)."""
        return self.normalize(images)

    def _global_input(self, images: torch.Tensor) -> torch.Tensor:
        """The whole image resized to global_size² as upstream's PIL `resize((s, s), BILINEAR)` of the uint8
        image (§4.3, §5.1), for training and inference alike: Pillow's result exactly by default; torch's
        antialiased bilinear rounded to uint8 with `global_resize="antialias"`."""
        size = (self.global_size, self.global_size)
        x = images.to(self.pixel_mean.dtype)
        if tuple(x.shape[-2:]) != size:
            if self.global_resize == "pil":
                x = pil_bilinear_resize(x, size)
            else:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
                x = x.round().clamp(0, 255)
        return self._to_input(x)

    def _grid(self, images: torch.Tensor) -> PatchGrid:
        return PatchGrid.build(images.shape[-2], images.shape[-1], self.patch_size, self.min_overlap)

    _cut = staticmethod(cut_patches)  # patches `indices` of one image or label map, stacked on dim 0

    @staticmethod
    def _chunks(n: int, size: int) -> Iterator[list[int]]:
        for start in range(0, n, size):
            yield list(range(start, min(start + size, n)))

    @staticmethod
    def _run_global(trunk: nn.Module, head: GlobalFPN, x: torch.Tensor, local: Pyramid | None = None) -> HeadOutput:
        return head(trunk(x)[::-1], local)

    def _g2l_source(self) -> tuple[nn.Module, GlobalFPN]:
        """Phase 2 reads the live (frozen) stage-1 global branch; phase 3 and final inference read the
        frozen copy, since the live one is being refined (§3.5)."""
        if self.phase in (GLOBAL, G2L):
            return self.resnet_global, self.fpn_global
        return self.global_fixed["resnet_global"], self.global_fixed["fpn_global"]

    def _local(self, patches: torch.Tensor, g: Pyramid, image: int, grid: PatchGrid,
               indices: Sequence[int]) -> HeadOutput:
        """Local branch on normalised patches with the matching crops of image `image`'s global maps."""
        def crop(fmap):
            boxes = grid.boxes(*fmap.shape[-2:])
            return crop_boxes(fmap[image:image + 1], [boxes[j] for j in indices])

        return self.fpn_local(self.resnet_local(patches)[::-1], g.apply(crop))

    def _global_crops(self, ps3_g: torch.Tensor, image: int, grid: PatchGrid, indices: Sequence[int],
                      like: torch.Tensor) -> torch.Tensor:
        """crop↑ of §3.6: the patches' boxes in the global ps3, resized to the local ps3 size."""
        boxes = grid.boxes(*ps3_g.shape[-2:])
        return resize_like(crop_boxes(ps3_g[image:image + 1], [boxes[j] for j in indices]), like)

    def _ensemble_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`ensemble_conv` split into its local and global input halves: conv(cat(a, b)) equals
        conv_a(a) + conv_b(b) (zero padding is per channel), so inference can keep the local half's
        num_classes-channel output per patch instead of its 512-channel ps3."""
        w, n = self.ensemble_conv.weight, self.ps3_channels
        return w[:, :n], w[:, n:]

    def _checkpointed(self, fn, *args, module: nn.Module | None = None):
        """fn(*args), recomputed in backward when grad_checkpoint is set (one patch batch's activations
        alive at a time); BN statistics in `module` are updated once."""
        if not (self.grad_checkpoint and torch.is_grad_enabled()):
            return fn(*args)
        recompute = (lambda: frozen_bn_stats(module)) if module is not None else contextlib.nullcontext
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), recompute()))

    # ---- training (§4.3) ----------------------------------------------------------------------------

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-resolution images (B, 3, H, W) 0-255 and labels (B, H, W) -> the phase's loss terms,
        already weighted. Losses are at stride 4 against PIL-nearest-downsampled labels (§4.3); per-patch
        terms are sums over the patch batches of `train_patch_batch` patches of each one's mean, like
        upstream's per-sub-batch backward with one optimiser step per batch."""
        if self.phase is None:
            raise MethodError("glnet: call set_phase(<phase name>) before forward_train")
        if self.phase == GLOBAL:
            return self._train_global(images, labels)
        if self.phase == G2L:
            return self._train_g2l(images, labels)
        return self._train_l2g(images, labels)

    def _focal(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, nearest_labels(labels, logits.shape[-2:]), self.focal_gamma, self.ignore_index)

    def _train_global(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self._run_global(self.resnet_global, self.fpn_global, self._global_input(images))
        return {"loss_global": self._focal(out.logits, labels)}

    def _train_g2l(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Phase 2: frozen global branch (eval, no grad) once per batch; local branch + ensemble per
        patch batch: focal(local) + focal(ensemble) + fmreg * MSE(ps3_l, crop↑(ps3_g)) (§3.6)."""
        with torch.no_grad():
            g = self._run_global(self.resnet_global, self.fpn_global, self._global_input(images))
        grid, terms = self._grid(images), []
        for i in range(images.shape[0]):
            for idx in self._chunks(len(grid), self.train_patch_batch):
                patches = self._to_input(self._cut(images[i:i + 1], grid, idx))
                targets = self._cut(labels[i:i + 1], grid, idx)
                terms.append(self._checkpointed(self._g2l_step, patches, targets, g, i, grid, idx,
                                                module=self.resnet_local))
        local, ensemble, mse = (torch.stack(t).sum() for t in zip(*terms, strict=True))
        return {"loss_local": local, "loss_ensemble": ensemble, "loss_fmreg": self.fmreg * mse}

    def _g2l_step(self, patches, targets, g: HeadOutput, image: int, grid: PatchGrid, idx):
        out = self._local(patches, g.pyramid, image, grid, idx)
        f_g = self._global_crops(g.ps3, image, grid, idx, out.ps3)
        ensemble = self.ensemble_conv(torch.cat([out.ps3, f_g], dim=1))
        return self._focal(out.logits, targets), self._focal(ensemble, targets), F.mse_loss(out.ps3, f_g)

    def _train_l2g(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Phase 3: frozen stage-1 global -> frozen local branch (no grad) -> canvases of its maps and
        the per-patch ps3; refined global branch on the canvases, focal(global) + Σ focal(ensemble)."""
        x_glb, grid = self._global_input(images), self._grid(images)
        stored, canvases = [], []
        with torch.no_grad():
            g = self._run_global(*self._g2l_source(), x_glb)
            for i in range(images.shape[0]):
                canvas = FeatureCanvas(g.pyramid, grid, self.l2g_coverage)
                for idx in self._chunks(len(grid), self.train_patch_batch):
                    out = self._local(self._to_input(self._cut(images[i:i + 1], grid, idx)), g.pyramid, i, grid, idx)
                    canvas.add(out.pyramid, idx)
                    stored.append((i, idx, out.ps3.cpu() if self.offload_features else out.ps3))
                canvases.append(canvas.result().maps())
        local = Pyramid.from_maps([torch.cat(level) for level in zip(*canvases, strict=True)])
        refined = self._run_global(self.resnet_global, self.fpn_global, x_glb, local)
        ensemble = [self._checkpointed(self._l2g_step, ps3_l, refined.ps3, self._cut(labels[i:i + 1], grid, idx),
                                       i, grid, idx)
                    for i, idx, ps3_l in stored]
        return {"loss_global": self._focal(refined.logits, labels), "loss_ensemble": torch.stack(ensemble).sum()}

    def _l2g_step(self, ps3_l, ps3_g, targets, image: int, grid: PatchGrid, idx):
        ps3_l = ps3_l.to(ps3_g.device)
        f_g = self._global_crops(ps3_g, image, grid, idx, ps3_l)
        return self._focal(self.ensemble_conv(torch.cat([ps3_l, f_g], dim=1)), targets)

    # ---- inference (§5.1) ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, H, W). Final inference (phase None or phase 3): frozen stage-1 global ->
        local branch over the patch grid in batches of `patch_batch` -> refined global on the merged
        local maps -> per-patch ensemble, averaged over overlaps. In phase 1 / 2 the prediction of that
        phase (global only, nearest-upsampled; ensemble against the live global) for validation."""
        return torch.cat([self._predict_one(images[i:i + 1]) for i in range(images.shape[0])])

    def _predict_one(self, image: torch.Tensor) -> torch.Tensor:
        x_glb = self._global_input(image)
        if self.phase == GLOBAL:
            logits = self._run_global(self.resnet_global, self.fpn_global, x_glb).logits
            return F.interpolate(logits, size=image.shape[-2:], mode="nearest")
        grid = self._grid(image)
        g = self._run_global(*self._g2l_source(), x_glb)
        stitch = LogitStitcher(grid, self.num_classes, device=image.device)
        chunks = list(self._chunks(len(grid), self.patch_batch))
        if self.phase == G2L:
            for idx in chunks:
                out = self._local(self._to_input(self._cut(image, grid, idx)), g.pyramid, 0, grid, idx)
                f_g = self._global_crops(g.ps3, 0, grid, idx, out.ps3)
                stitch.add(self.ensemble_conv(torch.cat([out.ps3, f_g], dim=1)), idx)
            return stitch.result()
        # Final: the refined global needs every patch first, so keep only the local half of the
        # ensemble conv per patch (num_classes channels, not ps3's 512) until it is ready.
        w_local, w_global = self._ensemble_halves()
        canvas, partial = FeatureCanvas(g.pyramid, grid, self.l2g_coverage), []
        for idx in chunks:
            out = self._local(self._to_input(self._cut(image, grid, idx)), g.pyramid, 0, grid, idx)
            canvas.add(out.pyramid, idx)
            partial.append(F.conv2d(out.ps3, w_local, padding=1))
        refined = self._run_global(self.resnet_global, self.fpn_global, x_glb, canvas.result())
        for idx, part in zip(chunks, partial, strict=True):
            f_g = self._global_crops(refined.ps3, 0, grid, idx, part)
            stitch.add(part + F.conv2d(f_g, w_global, self.ensemble_conv.bias, padding=1), idx)
        return stitch.result()

    # ---- released checkpoints (§8) ------------------------------------------------------------------

    def save_official(self, path: str) -> None:
        """This model as the released files (§8) in folder `path`, which `load_official(path)` reads back: the
        stage-1 global file (its non-local keys from `global_fixed`) and the local2global file (the final model),
        both DataParallel `fpn` state dicts with `module.` keys."""
        os.makedirs(path, exist_ok=True)
        main = {k: v for k, v in self.state_dict().items() if not k.startswith("global_fixed")}
        stage1 = {**main, **{k: v for k, v in self.global_fixed.state_dict().items()}}
        torch.save({f"module.{k}": v for k, v in stage1.items()}, os.path.join(path, RELEASE_FILES[GLOBAL]))
        torch.save({f"module.{k}": v for k, v in main.items()}, os.path.join(path, RELEASE_FILES[L2G]))

    def load_official(self, path: str, phase: str | None = None) -> None:
        """Load released GLNet weights (a DataParallel `fpn` state dict, keys `module.<ours>`).

        `path` is a file, whose phase is `phase` or read from its name (…global.pth, …global2local.pth,
        …local2global.pth), or a folder holding the released global and local2global files (the final
        model). As upstream (§8): the global file gives the non-"local" keys; global2local and
        local2global give all keys. The global and global2local files also fill `global_fixed`; a
        local2global file needs it filled first. Missing, unexpected or mis-shaped keys raise
        MethodError; only BN `num_batches_tracked` may be absent (pre-0.4.1 files; unused).
        Afterwards predict runs that phase's inference (final for local2global)."""
        if os.path.isdir(path):
            files = [os.path.join(path, RELEASE_FILES[p]) for p in (GLOBAL, L2G)]
            absent = [f for f in files if not os.path.isfile(f)]
            if absent:
                raise MethodError(f"glnet: {path} lacks {', '.join(absent)} (the released files, spec §8)")
            self.load_official(files[0], GLOBAL)
            self.load_official(files[1], L2G)
            return
        if phase is None:
            name = os.path.basename(path)
            phase = next((p for p, f in RELEASE_FILES.items() if name.endswith(f.removeprefix("fpn_deepglobe_"))),
                         None)
            if phase is None:
                raise MethodError(f"glnet: cannot tell the phase of '{path}' from its name; "
                                  f"pass phase= one of {GLOBAL}, {G2L}, {L2G}")
        if phase not in RELEASE_FILES:
            raise MethodError(f"glnet: unknown phase '{phase}'; use {GLOBAL}, {G2L} or {L2G}")
        if phase == L2G and not bool(self.global_fixed_ready):
            raise MethodError(f"glnet: {path} holds the refined global branch, not the stage-1 one that feeds "
                              "the local branch; load the released global (or global2local) file first, or pass "
                              "the folder holding all of them")
        source = self._read_release(path)
        ours = [k for k in self.state_dict() if not k.startswith("global_fixed")]
        if phase == GLOBAL:
            ours = [k for k in ours if "local" not in k]
        mapping = {k: k for k in ours}
        if phase in (GLOBAL, G2L):
            for key in self.global_fixed.state_dict():
                mapping[f"global_fixed.{key}"] = key  # global_fixed.<resnet_global|fpn_global>.x <- same key
        skipped = {k for k in source if "local" in k} if phase == GLOBAL else set()
        self._copy_mapped(source, mapping, skipped, path)
        if phase in (GLOBAL, G2L):
            self.global_fixed_ready.fill_(True)
        self.phase = None if phase == L2G else phase
        self.train(self.training)

    @staticmethod
    def _read_release(path: str) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise MethodError(f"glnet: cannot read checkpoint {path} ({exc.__class__.__name__}: {exc})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MethodError(f"glnet: {path} is not a state dict of tensors (expected upstream's model.state_dict())")
        return {k.removeprefix("module."): v for k, v in state.items()}

    def _copy_mapped(self, source: dict[str, torch.Tensor], mapping: dict[str, str], skipped: set[str],
                     path: str) -> None:
        """Copy source[mapping[k]] into our tensor k for every k; all-or-nothing, every mismatch named."""
        ours = self.state_dict()
        missing = sorted(s for k, s in mapping.items()
                         if s not in source and not k.endswith("num_batches_tracked"))
        used = set(mapping.values())
        unexpected = sorted(k for k in source if k not in used and k not in skipped)
        shapes = sorted(f"{s} {tuple(source[s].shape)} -> {k} {tuple(ours[k].shape)}" for k, s in mapping.items()
                        if s in source and source[s].shape != ours[k].shape)
        problems = [f"{label} ({len(keys)}): {', '.join(keys)}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                    if keys]
        if problems:
            raise MethodError(f"glnet: {path} does not match this model (backbone / num_classes?): "
                              + "; ".join(problems))
        with torch.no_grad():
            for k, s in mapping.items():
                if s in source:
                    ours[k].copy_(source[s])
