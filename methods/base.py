"""The common method interface (`UHRMethod`) and the method registry.

Every method is an `nn.Module` that takes uint8-range RGB images (B, 3, H, W) and does its own
normalisation, so timing `predict` times everything inference needs and nothing else.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


class MethodError(ValueError):
    """A method cannot be built or loaded as asked; the message names the fix."""


# ImageNet statistics on the 0-255 scale (the mmseg / timm convention all upstream methods use).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Phase:
    """One training phase: which submodules it trains (None = all) and which recipe it reads.

    `recipe` names a key inside the method x dataset recipe; None means the recipe itself.
    """

    name: str
    trainable: tuple[str, ...] | None = None
    recipe: str | None = None
    frozen_eval: tuple[str, ...] = field(default_factory=tuple)


class UHRMethod(nn.Module):
    """Base class of every method. Subclasses set `name`, `description` and implement
    `forward_train` and `predict`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        if num_classes < 2:
            raise MethodError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-255 float) RGB -> ImageNet-normalised float."""
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named, already-weighted loss terms; the trainer sums them."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, H, W) at the input resolution. Exactly what is timed."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)

    @property
    def phases(self) -> list[Phase]:
        return [Phase("main")]

    def phase_parameters(self, phase: Phase) -> Iterator[nn.Parameter]:
        if phase.trainable is None:
            yield from self.parameters()
            return
        for prefix in phase.trainable:
            yield from self.get_submodule(prefix).parameters()

    def load_official(self, path: str) -> None:
        raise MethodError(f"method '{self.name}' has no official checkpoint layout to load ({path})")


MethodFactory = Callable[..., UHRMethod]
_REGISTRY: dict[str, type[UHRMethod]] = {}
_ALIASES: dict[str, str] = {}


def register_method(cls: type[UHRMethod] | None = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator: `@register_method` or `@register_method(aliases=("x",))`."""

    def wrap(klass: type[UHRMethod]) -> type[UHRMethod]:
        if not klass.name:
            raise MethodError(f"{klass.__qualname__} has no `name`")
        if klass.name in _REGISTRY and _REGISTRY[klass.name] is not klass:
            raise MethodError(f"method name '{klass.name}' is registered twice")
        _REGISTRY[klass.name] = klass
        for alias in aliases:
            _ALIASES[alias] = klass.name
        return klass

    return wrap(cls) if cls is not None else wrap


def resolve_method_name(name: str) -> str:
    if name in _REGISTRY:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    known = ", ".join(sorted(_REGISTRY))
    raise MethodError(f"unknown method '{name}'; registered methods: {known} (see `python bench.py list`)")


def method_class(name: str) -> type[UHRMethod]:
    return _REGISTRY[resolve_method_name(name)]


def build_method(name: str, num_classes: int, **cfg) -> UHRMethod:
    """Build a registered method; unknown config keys are an error, never silently ignored."""
    cls = method_class(name)
    try:
        return cls(num_classes=num_classes, **cfg)
    except TypeError as exc:
        raise MethodError(f"method '{cls.name}': bad config ({exc}); check methods.{cls.name}.model in params.yaml") from exc


def list_methods() -> dict[str, str]:
    return {name: cls.description for name, cls in sorted(_REGISTRY.items())}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
