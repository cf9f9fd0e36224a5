"""Refiners composed with a base method (`base:` in params; DESIGN: "one base + refiner pipeline, timed end to end"):
the base is any registered one-phase method, built here from its name and keywords. Phase `base` trains it with its
own loss; phase `refiner` trains the refiner (`self.refiner`) with the base frozen in eval mode, and is left out when
the refiner has no parameters (DenseCRF)."""
from __future__ import annotations

import torch

from methods.base import MethodError, Phase, UHRMethod, build_method

BASE, REFINER = "base", "refiner"


class BaseRefiner(UHRMethod):
    """Subclasses build `self.refiner` and implement `predict`, and `refiner_loss` when the refiner has parameters
    (one without trains in phase `base` only)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, base: str = "global",
                 base_model: dict | None = None) -> None:
        super().__init__(num_classes, ignore_index)
        if base == self.name:
            raise MethodError(f"{self.name}: base must be another registered method")
        self.base = build_method(base, num_classes, ignore_index=ignore_index, **(base_model or {}))
        if len(self.base.phases) != 1:
            raise MethodError(f"{self.name}: base '{base}' trains in {len(self.base.phases)} phases; choose a base "
                              "that trains in one (train multi-phase methods on their own)")
        self.base_name = base

    @property
    def phases(self) -> list[Phase]:
        base = Phase(BASE, ("base",), BASE, ("refiner",))
        if not any(True for _ in self.refiner.parameters()):
            return [base]  # a training-free refiner (DenseCRF): only the base trains
        return [base, Phase(REFINER, ("refiner",), REFINER, ("base",))]

    bgr_input = False  # set by refiners whose released weights read B, G, R (SegFix, detectron2's PointRend)

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised pixels in the channel order the refiner's network reads: B, G, R with `bgr_input` (releases
        trained on OpenCV-loaded images; the statistics then apply to those channels), else R, G, B."""
        return self.normalize(images.flip(1) if self.bgr_input else images)

    def parameter_counts(self) -> dict[str, int]:
        return {"refiner": sum(p.numel() for p in self.refiner.parameters()),
                "base": sum(p.numel() for p in self.base.parameters())}

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.phase is None:
            raise MethodError(f"{self.name}: call set_phase('{BASE}' or '{REFINER}') before forward_train")
        if self.phase == BASE:
            return self.base.forward_train(images, labels)
        return self.refiner_loss(images, labels)

    def refiner_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError
