"""FCtL (Li, Yang, Liu, Yu, He, "From Contexts to Locality: Ultra-high Resolution Image Segmentation via
Locality-aware Contextual Correlation", ICCV 2021). Facts cite docs/specs/fctl.md (§N); upstream is liqiokkk/FCtL
@ 6fdb0c0 (MIT), read for facts and written anew.

Every patch of GLNet's grid (methods/blocks/patches.py) is segmented by an FCN-8s (VGG-16; the FCN-8s layers are
shared with the generic `fcn8s`, methods/blocks/fcn8.py) whose pool5 is corrected by locality-aware contextual
correlation with two larger context crops around the patch: 2x and 3x the patch side, zero-padded at the image
border, downsized to the patch size with Pillow's bilinear resize and encoded by VGG-16 trunks frozen from the two
single-context models B10 and B15 (§2, §3). Three non-local correlations (patch with medium context, patch with
large context, patch with itself) are fused by per-channel gates (§2.2). Patch logits are averaged over overlaps.
The input is x / 255, no mean subtraction (upstream's ToTensor(), §3.1).

Training is upstream's four scripts as phases (§4): `fcn` (train_pre.sh, patch only), `medium` (train_B10.sh:
context 2x, one trunk for patch and context, one correlation), `large` (train_B15.sh: context 3x), each of the two
starting from the `fcn` weights, and `all` (train.sh: the final network initialised from B10, the B10 and B15 trunks
frozen). The module holds the three networks of the release: `main` (all.pth), `medium` (B10.pth), `large`
(B15.pth); inference uses `main` and the trunks of the other two.

Test-time augmentation (§5.2) is the knob `tta`: 0 (default) predicts once, as ISDNet's tables report FCtL ("without
TTA"); 1 averages the 8 flips x 90-degree rotations of the release's test.sh, as FCtL's own paper reports.
Deviations from the release (§7): patch logits and TTA views are averaged, not summed (same argmax); rotations of
non-square images keep the whole image (Pillow's rotate without expand crops them; the release only ran squares);
the ignore index is honoured by the loss.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from methods.base import Knob, MethodError, ParamCount, Phase, UHRMethod, count_parameters, register_method
from methods.blocks.backbones import read_state_dict
from methods.blocks.fcn8 import FCN8Layers
from methods.blocks.losses import focal_loss
from methods.blocks.patches import LogitStitcher, PatchGrid, cut_patches
from methods.blocks.resize import pil_bilinear_resize

FCN, MEDIUM, LARGE, ALL = "fcn", "medium", "large", "all"
RELEASE_FILES = {ALL: "all.epoch.pth", MEDIUM: "B10.epoch.pth", LARGE: "B15.epoch.pth"}  # README "test"
NETWORKS = {ALL: "main", MEDIUM: "medium", LARGE: "large"}
STARTED = {"medium": 0, "large": 1, "main": 2}  # index in the `started` buffer
# upstream FCN8 names of our layers (§6): trunk split at pool3 / pool4, fc6-fc7-score in one Sequential
_HEAD_NAMES = {"fc6": "output.0", "fc7": "output.3", "score_fr": "output.6", "score_pool4": "adj_pool4",
               "score_pool3": "adj_pool3", "upscore2": "up_output", "upscore_pool4": "up_pool4_out",
               "upscore8": "up_final", "attention": "big_attention"}
_TRUNK_SPLITS = ((0, "pool3"), (17, "pool4"), (24, "pool5"))  # features index where each upstream Sequential starts


class ContextCorrelation(nn.Module):
    """Locality-aware contextual correlation (§2.1) and adaptive fusion (§2.2); upstream `_FCtL`, attribute names
    kept. With one context y: x + gamma * NL(x -> y). With two (y, z): x + sum_i w_i * gamma_i * NL_i, the three
    non-local terms being patch->medium, patch->large and patch->patch, and w (per channel and position) a softmax
    over the three sigmoid gates computed from all three terms. The gammas start at 0, so the block starts as the
    identity."""

    def __init__(self, channels: int = 512) -> None:
        super().__init__()
        self.channels, inner = channels, channels  # upstream FCtL(512, 512), the gates hard-coded at 512
        for suffix in ("", "_1", "_2"):
            setattr(self, f"conv_value{suffix}", nn.Conv2d(channels, channels, 1, bias=False))
            setattr(self, f"conv_query{suffix}", nn.Conv2d(channels, inner, 1))
            setattr(self, f"conv_key{suffix}", nn.Conv2d(channels, inner, 1))
        for i in (1, 2, 3):
            setattr(self, f"in_{i}", nn.Conv2d(channels, channels, 1))
            setattr(self, f"out_{i}", nn.Conv2d(channels, channels, 1))
        self.trans = nn.Conv2d(3 * channels, 3 * channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.gamma_1 = nn.Parameter(torch.zeros(1))
        self.gamma_2 = nn.Parameter(torch.zeros(1))
        for m in self.modules():  # upstream reset_parameters: every conv N(0, 0.01), biases 0
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _non_local(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """gamma * softmax_j(q_i . k_j) v_j: each position of the patch attends over every position of the source."""
        b, _, h, w = query.shape
        sim = torch.bmm(query.flatten(2).transpose(1, 2), key.flatten(2)).softmax(dim=2)
        return gamma * torch.bmm(sim, value.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        medium = self._non_local(self.conv_query(x), self.conv_key(y), self.conv_value(y), self.gamma)
        if z is None:
            return x + medium
        large = self._non_local(self.conv_query_1(x), self.conv_key_1(z), self.conv_value_1(z), self.gamma_1)
        local = self._non_local(self.conv_query_2(x), self.conv_key_2(x), self.conv_value_2(x), self.gamma_2)
        gates = self.trans(torch.cat([self.in_1(medium), self.in_2(large), self.in_3(local)], dim=1))
        gates = torch.stack([torch.sigmoid(getattr(self, f"out_{i + 1}")(g))
                             for i, g in enumerate(gates.split(self.channels, dim=1))]).softmax(dim=0)
        return x + gates[0] * medium + gates[1] * large + gates[2] * local


class FCtLNetwork(FCN8Layers, nn.Module):
    """Upstream `FCN8` (§2.3): FCN-8s whose pool5 passes through the correlation block when contexts are given, and
    whose pool4 / pool3 skips are scaled by 0.01 / 0.0001 before scoring (the `voc-fcn8s-atonce` scaling)."""

    SKIP_SCALES = (0.01, 0.0001)

    def __init__(self, num_classes: int, fc_channels: int, dropout: float, pretrained: bool | str,
                 width: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.build_fcn8(num_classes, fc_channels, dropout, pretrained, "fctl", width)
        self.init_fcn8(zero_scores=False)  # upstream keeps torch's default init of its score layers
        self.attention = ContextCorrelation(self.fc6.in_channels)
        if pretrained:
            self.load_imagenet_fcn8(pretrained)

    def pool5(self, x: torch.Tensor) -> torch.Tensor:
        """upstream `MiniFCN8`: the padded VGG-16 trunk up to pool5 (what a context crop is encoded to)."""
        return self.fcn8_trunk(x)[2]

    def forward(self, x: torch.Tensor, contexts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        pool3, pool4, pool5 = self.fcn8_trunk(x)
        if contexts:
            pool5 = self.attention(pool5, *contexts)
        return self.fcn8_decode(pool3, pool4, pool5, x.shape[-2:], self.SKIP_SCALES)


def context_crops(image: torch.Tensor, grid: PatchGrid, indices: Sequence[int], factor: float) -> torch.Tensor:
    """Upstream `global2bigpatch` (§3.3) for patches `indices` of one image (1, 3, H, W) 0-255: the window of side
    int(p * factor) starting int(p * (factor - 1) / 2) above and left of each patch (centred on it), zeros outside the
    image, resized to p x p with Pillow's bilinear filter (as upstream resizes the PIL crop)."""
    p = grid.patch
    size, pad = int(p * factor), int(p * (factor - 1) / 2)
    h, w = image.shape[-2:]
    crops = image.new_zeros(len(indices), image.shape[1], size, size)
    for n, j in enumerate(indices):
        top, left = grid.coords[j]
        y0, x0 = top - pad, left - pad
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + size, h), min(x0 + size, w)
        crops[n, :, ys - y0:ye - y0, xs - x0:xe - x0] = image[0, :, ys:ye, xs:xe]
    return pil_bilinear_resize(crops, (p, p))


def _chunks(n: int, size: int) -> Iterator[list[int]]:
    for start in range(0, n, size):
        yield list(range(start, min(start + size, n)))


@register_method
class FCtL(UHRMethod):
    name = "fctl"
    description = ("FCtL: FCN-8s patches with locality-aware contextual correlation over 2x and 3x context crops "
                   "(ICCV 2021); 4 training phases as the release; knob tta (8-view test-time augmentation)")
    ddp_find_unused_parameters = True  # phases fcn/medium/large leave the two-context layers unused
    knobs = (Knob("tta", sweep=(0.0, 1.0), label="TTA", bounds=(-1.0, 1.0),
                  help="1: average the release's 8 flip x rotation views; 0: one view (ISDNet's tables)"),)
    published = {"FCtL (official checkpoint, no TTA)": {"tta": 0.0}, "FCtL (no TTA)": {"tta": 0.0},
                 "FCtL": {"tta": 1.0}}
    pixel_stats = ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))  # ToTensor() only (§3.1)
    # upstream's modules at 6fdb0c0, counted by tests/golden/make_fctl.py: FCN8(7, mode=2) (B10, B15) and mode=3
    # (all) 264,250,720 each, MiniFCN8 138,357,544; each holds torchvision's 1000-class VGG classifier as `self.vgg`
    # (123,642,856, never run), which ours does not build
    param_counts = (ParamCount("liqiokkk/FCtL@6fdb0c0 models/fcn.py FCN8 264,250,720 and MiniFCN8 138,357,544 "
                               "(7 classes) less the unused vgg.classifier 123,642,856; spec §6",
                               named={"medium": 140_607_864, "large": 140_607_864, "main": 140_607_864,
                                      "inference": 140_607_864 + 2 * 14_714_688}),)

    def __init__(self, num_classes: int, pretrained: bool | str = False, patch_size: int = 508,
                 min_overlap: int = 50, contexts: Sequence[float] = (2.0, 3.0), patch_batch: int = 16,
                 train_patch_batch: int = 4, fc_channels: int = 4096, width: float = 1.0, dropout: float = 0.5,
                 focal_gamma: float = 3.0,
                 tta: float = 0.0, pretrain_fcn: bool = True, grad_checkpoint: bool = True,
                 ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        if float(tta) not in (0.0, 1.0):
            raise MethodError(f"fctl: tta must be 0 (one view) or 1 (the release's 8 views), got {tta}")
        if len(contexts) != 2 or min(contexts) <= 1:
            raise MethodError(f"fctl: contexts must be two factors > 1 (medium, large; the release's 2 and 3), "
                              f"got {list(contexts)}")
        if min(patch_size, patch_batch, train_patch_batch) < 1:
            raise MethodError("fctl: patch_size, patch_batch and train_patch_batch must be >= 1")
        self.patch_size, self.min_overlap = patch_size, min_overlap
        self.contexts = tuple(float(c) for c in contexts)
        self.patch_batch, self.train_patch_batch = patch_batch, train_patch_batch
        self.focal_gamma, self.tta, self.pretrain_fcn = focal_gamma, bool(tta), pretrain_fcn
        self.grad_checkpoint = grad_checkpoint
        # `fc_channels` and `width` (VGG-16's 4096 and 1) narrow the networks for smoke runs and tests only
        self.main, self.medium, self.large = (FCtLNetwork(num_classes, fc_channels, dropout, pretrained, width)
                                              for _ in range(3))
        # which networks hold their phase's starting weights already (so a resumed phase does not restart them)
        self.register_buffer("started", torch.zeros(3, dtype=torch.bool))

    # ---- phases (§4) ---------------------------------------------------------------------------------

    @property
    def phases(self) -> list[Phase]:
        phases = [Phase(MEDIUM, ("medium",), MEDIUM, ("main", "large")),
                  Phase(LARGE, ("large",), LARGE, ("main", "medium")),
                  Phase(ALL, ("main",), ALL, ("medium", "large"))]
        return ([Phase(FCN, ("main",), FCN, ("medium", "large"))] if self.pretrain_fcn else []) + phases

    def set_phase(self, name: str | None) -> None:
        """Entering `medium` / `large` copies the `fcn` weights into that network (train_B10/B15.sh --pre_path
        Bfcn), entering `all` copies B10 into `main` (train.sh --pre_path B10), each once: a resumed phase keeps its
        weights. Entering `fcn` starts over."""
        super().set_phase(name)
        if name == FCN:
            self.started.zero_()
        for phase, target, source in ((MEDIUM, "medium", "main"), (LARGE, "large", "main"), (ALL, "main", "medium")):
            if name == phase and not bool(self.started[STARTED[target]]):
                getattr(self, target).load_state_dict(getattr(self, source).state_dict())
                self.started[STARTED[target]] = True

    def phase_parameters(self, phase: Phase) -> Iterator[nn.Parameter]:
        fixed = set().union(*(net.fixed_parameters() for net in (self.main, self.medium, self.large)))
        return (p for p in super().phase_parameters(phase) if id(p) not in fixed)

    def parameter_counts(self) -> dict[str, int]:
        """Each network (a release file's weights, less upstream's unused VGG classifier) and what inference runs:
        `main` plus the trunks of `medium` and `large`."""
        counts = {key: count_parameters(getattr(self, key)) for key in ("main", "medium", "large")}
        counts["inference"] = counts["main"] + count_parameters(self.medium.features) + count_parameters(
            self.large.features)
        counts["total"] = count_parameters(self)
        return counts

    # ---- the networks of each phase --------------------------------------------------------------------

    def _grid(self, images: torch.Tensor) -> PatchGrid:
        return PatchGrid.build(images.shape[-2], images.shape[-1], self.patch_size, self.min_overlap)

    def _patch_logits(self, image: torch.Tensor, grid: PatchGrid, idx: Sequence[int]) -> torch.Tensor:
        """The phase's network on patches `idx` of one image (0-255): fcn alone; medium / large with their own trunk
        on their context (mode 2); all (and final inference) with the frozen medium and large trunks (mode 3)."""
        patches = self.normalize(cut_patches(image, grid, idx))
        crop = lambda factor: self.normalize(context_crops(image, grid, idx, factor))  # noqa: E731
        if self.phase == FCN:
            return self.main(patches)
        if self.phase in (MEDIUM, LARGE):
            net = self.medium if self.phase == MEDIUM else self.large
            return net(patches, [net.pool5(crop(self.contexts[self.phase == LARGE]))])
        with torch.no_grad():
            contexts = [self.medium.pool5(crop(self.contexts[0])), self.large.pool5(crop(self.contexts[1]))]
        return self.main(patches, contexts)

    # ---- training (§4) -------------------------------------------------------------------------------

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Whole images (B, 3, H, W) 0-255 and labels (B, H, W) -> the focal loss (gamma 3) of every patch of the grid,
        summed over batches of `train_patch_batch` patches of the mean over each (upstream backpropagates each
        sub-batch and steps once per batch). With grad_checkpoint, one sub-batch's activations live at a time."""
        if self.phase is None:
            raise MethodError(f"fctl: call set_phase(<phase>) before forward_train; phases: "
                              f"{', '.join(p.name for p in self.phases)}")
        terms, grid = [], self._grid(images)
        for i in range(images.shape[0]):
            for idx in _chunks(len(grid), self.train_patch_batch):
                targets = cut_patches(labels[i:i + 1], grid, idx)
                step = lambda image, targets, idx=idx: focal_loss(  # noqa: E731
                    self._patch_logits(image, grid, idx), targets, self.focal_gamma, self.ignore_index)
                if self.grad_checkpoint and torch.is_grad_enabled():
                    terms.append(checkpoint(step, images[i:i + 1], targets, use_reentrant=False))
                else:
                    terms.append(step(images[i:i + 1], targets))
        return {"loss_focal": torch.stack(terms).sum()}

    # ---- inference (§5) ------------------------------------------------------------------------------

    def views(self) -> list[tuple[bool, int]]:
        """(horizontal flip, quarter turns counter-clockwise) of each test view: the release's 8 with tta (flip
        applied first), else the image as it is."""
        return [(flip, k) for flip in (False, True) for k in range(4)] if self.tta else [(False, 0)]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, H, W): per view, the phase's network over the patch grid in batches of `patch_batch`,
        averaged over overlaps and mapped back; then averaged over the views."""
        out = []
        for i in range(images.shape[0]):
            image, total = images[i:i + 1], 0
            for flip, turns in self.views():
                view = torch.rot90(image.flip(-1) if flip else image, turns, dims=(-2, -1))
                logits = torch.rot90(self.stitched(view), -turns, dims=(-2, -1))
                total = total + (logits.flip(-1) if flip else logits)
            out.append(total / len(self.views()))
        return torch.cat(out)

    def stitched(self, image: torch.Tensor) -> torch.Tensor:
        """One view (1, 3, H, W): patch logits averaged over the overlaps of the grid."""
        grid = self._grid(image)
        stitch = LogitStitcher(grid, self.num_classes, device=image.device)
        for idx in _chunks(len(grid), self.patch_batch):
            stitch.add(self._patch_logits(image, grid, idx).float(), idx)
        return stitch.result()

    # ---- released checkpoints (§6) --------------------------------------------------------------------

    def _official_names(self, network: str) -> dict[str, str]:
        """Our key in `network` -> the upstream FCN8 key (without DataParallel's `module.`)."""
        names = {}
        for key in getattr(self, network).state_dict():
            head, _, rest = key.partition(".")
            if head == "features":
                index, leaf = rest.split(".", 1)
                start, part = next((s, n) for s, n in reversed(_TRUNK_SPLITS) if int(index) >= s)
                names[key] = f"{part}.{int(index) - start}.{leaf}"
            elif head in _HEAD_NAMES:
                names[key] = f"{_HEAD_NAMES[head]}.{rest}"
        return names

    def save_official(self, path: str) -> None:
        """The three released files (all, B10, B15 .epoch.pth) in folder `path`, DataParallel FCN8 state dicts with
        upstream's aliases of the trunk (`vgg.features.*`; B10/B15 also `big_pool*`, the same tensors in mode 2).
        Upstream's unused `vgg.classifier` is not written (its loader keeps what a file lacks)."""
        os.makedirs(path, exist_ok=True)
        for phase, network in NETWORKS.items():
            state = getattr(self, network).state_dict()
            out = {f"module.{theirs}": state[ours] for ours, theirs in self._official_names(network).items()}
            for key, value in state.items():
                if key.startswith("features."):
                    out[f"module.vgg.{key}"] = value
                    if phase != ALL:
                        out["module.big_" + self._official_names(network)[key]] = value
            torch.save(out, os.path.join(path, RELEASE_FILES[phase]))

    def load_official(self, path: str, network: str | None = None) -> None:
        """Released weights: a folder holding all.epoch.pth, B10.epoch.pth and B15.epoch.pth (the final model), or one
        file into `network` ("main", "medium", "large"; read from a name containing all / B10 / B15 otherwise).
        Trunk aliases (`vgg.features`, `big_pool*`) and the unused `vgg.classifier` are skipped; any other missing,
        unexpected or mis-shaped key raises and nothing is loaded."""
        if os.path.isdir(path):
            files = {net: os.path.join(path, RELEASE_FILES[phase]) for phase, net in NETWORKS.items()}
            absent = [f for f in files.values() if not os.path.isfile(f)]
            if absent:
                raise MethodError(f"fctl: {path} lacks {', '.join(absent)} (the release's three files, spec §6)")
            for net, file in files.items():
                self.load_official(file, net)
            self.phase = None
            return
        if network is None:
            base = os.path.basename(path)
            network = next((net for tag, net in (("B10", "medium"), ("B15", "large"), ("all", "main")) if tag in base),
                           None)
            if network is None:
                raise MethodError(f"fctl: cannot tell which network '{path}' holds from its name; pass "
                                  "network='main' (all.pth), 'medium' (B10.pth) or 'large' (B15.pth)")
        if network not in NETWORKS.values():
            raise MethodError(f"fctl: network must be main, medium or large, got '{network}'")
        source = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
        source = {k: v for k, v in source.items() if not k.startswith(("vgg.", "big_pool"))}
        names = self._official_names(network)
        mapped = {f"{network}.{ours}": source[theirs] for ours, theirs in names.items() if theirs in source}
        unexpected = {f"{k} (not FCtL's FCN8)": v for k, v in source.items() if k not in set(names.values())}
        self.load_mapped_state({**mapped, **unexpected}, path, scope=f"{network}.")
        self.started[STARTED[network]] = True
