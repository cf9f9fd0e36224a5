"""Generic segmentation networks run the two ways the UHR papers' tables run them (their "Global inference" and
"Local inference" rows), shared by every generic-network method (U-Net, FCN-8s, PSPNet, BiSeNet, ...).

- `inference: global`: train and test on the whole image downsampled `downsample` times (antialiased bilinear, a
  faithful low-resolution view); logits are upsampled back to full size. `downsample: 1` is "full scale".
- `inference: local`: train on the recipe's full-resolution crops, test by sliding windows of `window` px with
  `overlap`, logits averaged where windows overlap (mmseg `slide` inference).

A subclass builds its network and implements `network_outputs(x)` (normalised images -> main logits at any stride,
then the auxiliary logits its training uses) and declares `aux_weights` (mmseg's `auxiliary_head` loss weights).
Every generic method has the variants `global` and `local` (run ids `<method>-global`, `<method>-local`).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import MethodError, UHRMethod, Variant
from methods.blocks.losses import resize_logits, segmentation_ce
from methods.blocks.windows import sliding_window_logits

INFERENCE_MODES = ("global", "local")


class GenericSegmenter(UHRMethod):
    """Base of the generic networks: the inference mode, downsampling and sliding window live here once."""

    aux_weights: ClassVar[tuple[float, ...]] = ()  # loss weight of each auxiliary output, in network_outputs order
    # the training loss of every output: plain CE (mean over labelled pixels); networks following an mmseg config
    # use mmseg's (`mmseg_cross_entropy`, the mean over all pixels, as mmseg 0.x's avg_non_ignore=False)
    loss: ClassVar = staticmethod(segmentation_ce)
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
        self.inference, self.downsample = inference, downsample
        self.window, self.overlap, self.window_batch = window, overlap, window_batch

    def network_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images -> [main logits, *auxiliary logits] (the auxiliary ones in training mode only, so that
        `predict` times nothing it does not need), each at any stride (resized by the caller)."""
        raise NotImplementedError

    def network_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.network_outputs(x)[0]

    def _view(self, images: torch.Tensor) -> torch.Tensor:
        """What the network sees: normalised, and downsampled under global inference."""
        x = self.normalize(images)
        if self.inference == "global" and self.downsample > 1:
            size = (max(1, x.shape[-2] // self.downsample), max(1, x.shape[-1] // self.downsample))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x

    def forward_train(self, images, labels):
        # global: the whole (recipe-cropped) image downsampled; local: the recipe's crops as they are. Logits are
        # upsampled to the full-resolution labels, so both modes learn the same target.
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
        if self.inference == "local":
            return sliding_window_logits(self._window_logits, self.normalize(images), self.num_classes,
                                         self.window, self.window - self.overlap, self.window_batch)
        return resize_logits(self.network_logits(self._view(images)), images.shape[-2:])
