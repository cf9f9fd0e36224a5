"""Generic segmentation networks run the two ways the UHR papers' tables run them (their "Global inference" and
"Local inference" rows), shared by every generic-network method (U-Net, FCN-8s, PSPNet, BiSeNet, ...).

- `inference: global`: train and test on the whole image downsampled `downsample` times (antialiased bilinear, a
  faithful low-resolution view); logits are upsampled back to full size. `downsample: 1` is "full scale".
- `inference: local`: train on the recipe's full-resolution crops, test by sliding windows of `window` px with
  `overlap`, logits averaged where windows overlap (mmseg `slide` inference).
- `inference: isd` (networks that declare `isd_channels`): the network is the deep branch of the ISD framework
  (ISDNet's Table 4, "PSPNet + ISD"): it sees the image nearest-downsampled `downsample` times, as ISDNet's deep
  branch, and ISDNet's shallow branch (STDC on the full-resolution Laplacian residuals, Relation-Aware Fusion, the
  training-only SR decoder; `methods/blocks/isd.py`) refines its features. Losses: the network's own (main and
  auxiliary) plus ISDNet's (fused and auxiliary CE, L_SR 0.1, L_SD 1.0). RECONSTRUCTED: the official code names
  a `RefinePSPHead` / `RefineSegformerHead` for these rows but does not define them (docs/generic-networks.md);
  ours hands the decode head's last features (before dropout and classifier) to the ISD head, as ISDNet's ASPP
  head does.

A subclass builds its network and implements `network_outputs(x)` (normalised images -> main logits at any stride,
then the auxiliary logits its training uses) and declares `aux_weights` (mmseg's `auxiliary_head` loss weights).
Every generic method has the variants `global` and `local` (run ids `<method>-global`, `<method>-local`); a network
whose paper rows need them adds `SCALE_VARIANTS` (`half`, `quarter`: global inference at 1/2 and 1/4 of full
resolution, ISDNet Table 4's "1/2 scale" / "1/4 scale") and `ISD_VARIANT` (`isd`).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import MethodError, UHRMethod, Variant
from methods.blocks.isd import ISDHead, isd_loss_terms
from methods.blocks.losses import resize_logits, segmentation_ce
from methods.blocks.mmseg import init_conv_modules, init_conv_seg
from methods.blocks.stdc import init_stdc
from methods.blocks.windows import sliding_window_logits

INFERENCE_MODES = ("global", "local", "isd")
# the scales are absolute (the whole image at 1/2, 1/4 of full resolution), whatever `downsample` a dataset sets
SCALE_VARIANTS = (
    Variant("half", {"inference": "global", "downsample": 2}, "whole image at 1/2 resolution ('1/2 scale')"),
    Variant("quarter", {"inference": "global", "downsample": 4}, "whole image at 1/4 resolution ('1/4 scale')"),
)
# ISDNet's deep branch sees the image at 1/4 (its down_ratio)
ISD_VARIANT = Variant("isd", {"inference": "isd", "downsample": 4},
                      "deep branch of the ISD framework at 1/4 + ISDNet's shallow branch ('+ ISD', reconstructed)")
ISD_LOSS_WEIGHTS = {"recon": 0.1, "fa": 1.0}  # ISDNet's L_SR and L_SD weights (its defaults)


class GenericSegmenter(UHRMethod):
    """Base of the generic networks: the inference mode, downsampling and sliding window live here once."""

    aux_weights: ClassVar[tuple[float, ...]] = ()  # loss weight of each auxiliary output, in network_outputs order
    # the training loss of every output: plain CE (mean over labelled pixels); networks following an mmseg config
    # use mmseg's (`mmseg_cross_entropy`, the mean over all pixels, as mmseg 0.x's avg_non_ignore=False)
    loss: ClassVar = staticmethod(segmentation_ce)
    isd_channels: ClassVar[int | None] = None  # width of `network_features`' features; None: no `isd` inference
    variants: ClassVar[tuple[Variant, ...]] = (
        Variant("global", {"inference": "global"}, "whole image, downsampled ('Global inference')"),
        Variant("local", {"inference": "local"}, "full-resolution sliding window ('Local inference')"),
    )

    def __init__(self, num_classes: int, inference: str = "global", downsample: int = 4, window: int = 512,
                 overlap: int = 128, window_batch: int = 4, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        if inference not in INFERENCE_MODES:
            raise MethodError(f"{self.name}: inference must be global or local, got '{inference}'")
        if downsample < 1:
            raise MethodError(f"{self.name}: downsample must be >= 1, got {downsample}")
        if not 0 <= overlap < window:
            raise MethodError(f"{self.name}: overlap must be in [0, window), got overlap={overlap}, window={window}")
        if inference == "isd" and self.isd_channels is None:
            raise MethodError(f"{self.name}: inference isd needs a network that hands its features to the ISD head "
                              "(`isd_channels`); use global or local")
        self.inference, self.downsample = inference, downsample
        self.window, self.overlap, self.window_batch = window, overlap, window_batch

    def build_isd_head(self) -> None:
        """ISDNet's shallow branch and fusion on this network's features (call at the end of `__init__`), initialised
        as ISDNet initialises it without pretrained files."""
        if self.inference != "isd":
            return
        self.isd_head = ISDHead(self.num_classes, 128, deep_channels=self.isd_channels)
        init_conv_modules(self.isd_head)
        init_conv_seg(self.isd_head.conv_seg)
        init_stdc(self.isd_head.stdc_net)

    def network_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the decode head's features before dropout and classifier, [main logits, *auxiliary logits] as
        `network_outputs`); networks with `isd_channels` implement it."""
        raise NotImplementedError

    def network_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images -> [main logits, *auxiliary logits] (the auxiliary ones in training mode only, so that
        `predict` times nothing it does not need), each at any stride (resized by the caller)."""
        raise NotImplementedError

    def network_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.network_outputs(x)[0]

    def _view(self, images: torch.Tensor) -> torch.Tensor:
        """What the network sees: normalised, and downsampled under global inference."""
        x = self.normalize(images)
        if self.inference == "isd":
            return x
        if self.inference == "global" and self.downsample > 1:
            size = (max(1, x.shape[-2] // self.downsample), max(1, x.shape[-1] // self.downsample))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x

    def _isd(self, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
        """ISD inference on normalised full-resolution images: (deep features, the network's outputs, the ISD head's
        outputs). The deep branch sees the image nearest-downsampled as ISDNet's (== x[..., ::4, ::4])."""
        size = (max(1, x.shape[-2] // self.downsample), max(1, x.shape[-1] // self.downsample))
        features, outputs = self.network_features(F.interpolate(x, size=size, mode="nearest"))
        return features, outputs, self.isd_head(x, features, train=train)

    def forward_train(self, images, labels):
        # global: the whole (recipe-cropped) image downsampled; local: the recipe's crops as they are. Logits are
        # upsampled to the full-resolution labels, so both modes learn the same target.
        if self.inference == "isd":
            features, outputs, out = self._isd(self._view(images), train=True)
            terms = self.segmentation_terms(outputs, labels)
            ce = lambda logits: self.loss(logits, labels, self.ignore_index)  # noqa: E731
            return {**terms, **isd_loss_terms(out, features, ce, ISD_LOSS_WEIGHTS["recon"], ISD_LOSS_WEIGHTS["fa"])}
        return self.segmentation_terms(self.network_outputs(self._view(images)), labels)

    def segmentation_terms(self, outputs: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted loss of the main and each auxiliary output (a network with more terms adds its own)."""
        terms = {"loss_seg": self.loss(outputs[0], labels, self.ignore_index)}
        if self.training and len(outputs) - 1 != len(self.aux_weights):
            raise MethodError(f"{self.name}: {len(outputs) - 1} auxiliary outputs but {len(self.aux_weights)} weights")
        for i, (logits, weight) in enumerate(zip(outputs[1:], self.aux_weights, strict=False)):
            if weight:
                terms[f"loss_aux{i}"] = weight * self.loss(logits, labels, self.ignore_index)
        return terms

    def _window_logits(self, crops: torch.Tensor) -> torch.Tensor:
        return resize_logits(self.network_logits(crops), crops.shape[-2:])

    def predict(self, images):
        if self.inference == "isd":  # the network's own classifier runs and is discarded, as in ISDNet
            return resize_logits(self._isd(self._view(images), train=False)[2]["logits"], images.shape[-2:])
        if self.inference == "local":
            return sliding_window_logits(self._window_logits, self.normalize(images), self.num_classes,
                                         self.window, self.window - self.overlap, self.window_batch)
        return resize_logits(self.network_logits(self._view(images)), images.shape[-2:])
