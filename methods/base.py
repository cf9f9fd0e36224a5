"""The common method interface (`UHRMethod`) and the method registry.

Every method is an `nn.Module` that takes uint8-range RGB images (B, 3, H, W) and does its own
normalisation, so timing `predict` times everything inference needs and nothing else.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


class MethodError(ValueError):
    """A method cannot be built or loaded as asked; the message names the fix."""


@dataclass
class LoadReport:
    """What `load_official` did: keys loaded, and keys it could not place (by name)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ours, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # checkpoint's, no counterpart here
    mismatched: list[str] = field(default_factory=list)  # same name, different shape
    skipped: list[str] = field(default_factory=list)  # checkpoint keys deliberately not used

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 20) -> str:
        parts = []
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name} ({len(keys)}): {', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''}")
        return "; ".join(parts) or f"all {len(self.loaded)} tensors loaded"


# ImageNet statistics on the 0-255 scale (the mmseg / timm convention most upstream configs use).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# Input normalisation is a keyword of every method (build_method applies it), because upstream configs set it per
# dataset (RUE's DeepGlobe statistics): params.yaml `methods.<m>.datasets.<d>.model` holds those, with provenance.
NORMALIZATION_KEYWORDS = ("pixel_mean", "pixel_std")


@dataclass(frozen=True)
class Knob:
    """A runtime setting: a constructor keyword that changes inference on a trained model without retraining
    (RUE's share of refined patches `k`). `sweep` holds the values `bench.py sweep` tries by default; `label`
    names it in tables ("K")."""

    name: str
    sweep: tuple[float, ...]
    label: str = ""
    help: str = ""
    bounds: tuple[float, float] | None = None  # (low, high): a value must satisfy low < value <= high

    def check(self, value: float) -> None:
        if self.bounds is not None and not self.bounds[0] < value <= self.bounds[1]:
            raise MethodError(f"{self.name} must lie in ({self.bounds[0]:g}, {self.bounds[1]:g}], got {value:g}")

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Output:
    """A secondary output of a configuration, scored or logged by evaluation beside `predict`'s:
    kind `logits` is scored like the main prediction (UHRSNet's local-branch number); kind `uncertainty` is a
    map in [0, 1] summarised on fine-structure vs region pixels and drawn as a panel (RUE's U1)."""

    name: str
    kind: str
    help: str = ""


@dataclass(frozen=True)
class Ablation:
    """One row of a method's ablation table: a key (file and run names), the row as the paper prints it, and
    the constructor keywords that make it."""

    key: str
    label: str
    model: dict
    # table column -> True (printed ✓), False (blank) or the cell's text (e.g. {"input": "1/4 scale"})
    marks: dict = field(default_factory=dict)
    # which of the paper's ablation tables prints this row ("" when the method has one); a row in several tables
    # is declared once per table with the same key and model and is trained once
    table: str = ""


@dataclass(frozen=True)
class Variant:
    """A configuration trained, evaluated and reported as its own run, `<method>-<name>` (the generic networks'
    `unet-global` and `unet-local`): its constructor keywords override the params block's, which must not
    contradict them."""

    name: str
    model: dict
    help: str = ""


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts a spec gives for one configuration: `total` (every parameter) and `inference` (the modules
    `predict` runs); None where the source gives none. The contract test builds the configuration and counts."""

    source: str
    total: int | None = None
    inference: int | None = None
    named: dict = field(default_factory=dict)  # checked against the method's own `parameter_counts()` breakdown
    num_classes: int = 7
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    """One training phase: which submodules it trains (None = all) and which recipe it reads.

    `recipe` names a key inside the method x dataset recipe; None means the recipe itself. `data_stream` picks
    the training-sample order (None: the phase's position), so that configurations with fewer phases can still
    see the same samples in the phases they share.
    """

    name: str
    trainable: tuple[str, ...] | None = None
    recipe: str | None = None
    frozen_eval: tuple[str, ...] = field(default_factory=tuple)
    data_stream: int | None = None


class UHRMethod(nn.Module):
    """Base class of every method. Subclasses set `name`, `description` and implement
    `forward_train` and `predict`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    label: ClassVar[str] = ""  # how tables, plots and logs must also name it (a reconstruction says so)
    # DDP must search for unused parameters when a forward pass may skip some (e.g. content-dependent routing)
    ddp_find_unused_parameters: ClassVar[bool] = False
    # What the pipelines need to know about a method, declared here and read generically (README, "Adding a method").
    knobs: ClassVar[tuple[Knob, ...]] = ()  # runtime settings and their sweeps
    ablations: ClassVar[tuple[Ablation, ...]] = ()  # rows of the paper's ablation table
    variants: ClassVar[tuple[Variant, ...]] = ()  # configurations run as their own runs, `<name>-<variant>`
    # published rows this method fills: row in docs/published/tables.yaml -> the knob settings of that row. The row
    # is its name ("GLNet"), its group and name ("Local inference: UNet") or its name and column ("UNet [local]");
    # a `variant` entry in the settings says which variant's run fills it.
    published: ClassVar[dict[str, dict]] = {}
    param_counts: ClassVar[tuple[ParamCount, ...]] = ()  # from the spec, checked by tests/test_contract.py
    # the state-dict prefix the upstream checkpoint layout holds ("": the whole model; a refiner's file holds the
    # refiner, not the base method it is composed with)
    official_scope: ClassVar[str] = ""
    # default input normalisation (mean, std) per RGB channel on the 0-255 scale: x -> (x - mean) / std
    pixel_stats: ClassVar[tuple[tuple[float, ...], tuple[float, ...]]] = (IMAGENET_MEAN, IMAGENET_STD)

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        if num_classes < 2:
            raise MethodError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.phase: str | None = None  # the training phase forward_train runs (set_phase)
        self.register_buffer("pixel_mean", torch.tensor(self.pixel_stats[0]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.pixel_stats[1]).view(1, 3, 1, 1), persistent=False)

    def set_normalization(self, mean=None, std=None) -> None:
        """Per-channel RGB statistics on the 0-255 scale (None keeps the current ones)."""
        for name, values in (("pixel_mean", mean), ("pixel_std", std)):
            if values is None:
                continue
            values = [float(v) for v in values]
            if len(values) != 3 or (name == "pixel_std" and min(values) <= 0):
                raise MethodError(f"{self.name}: {name} must be 3 numbers (RGB, 0-255 scale)"
                                  f"{', all positive' if name == 'pixel_std' else ''}, got {values}")
            getattr(self, name).copy_(torch.tensor(values).view(1, 3, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-255 float) RGB -> (x - pixel_mean) / pixel_std."""
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
    def outputs(self) -> tuple[Output, ...]:
        """Secondary outputs of this configuration (UHRSNet's "local" number, RUE's uncertainty), each computed by
        `predict_output` and handled by evaluation according to its kind."""
        return ()

    def predict_output(self, images: torch.Tensor, output: str) -> torch.Tensor:
        """One of `outputs` at the input resolution: logits (B, C, H, W) or a map (B, 1, H, W)."""
        raise MethodError(f"method '{self.name}' has no output '{output}'")

    def predict_tiled(self, images: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """`predict` tile by tile (overlapping tiles, logits averaged) for images too large for one
        pass; peak memory then scales with the tile, plus the full-size logit canvas."""
        from methods.blocks.windows import sliding_window_logits

        if images.shape[-2] <= tile and images.shape[-1] <= tile:
            return self.predict(images)
        if not 0 <= overlap < tile:
            raise MethodError(f"tile overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
        return sliding_window_logits(self.predict, images, self.num_classes, tile, tile - overlap, batch=1)

    @property
    def phases(self) -> list[Phase]:
        return [Phase("main")]

    def set_phase(self, name: str | None) -> None:
        """Select the training phase forward_train runs (the trainer calls it before each phase)."""
        known = [p.name for p in self.phases]
        if name is not None and name not in known:
            raise MethodError(f"{self.name}: unknown phase '{name}'; phases: {', '.join(known)}")
        self.phase = name
        self.train(self.training)  # re-apply the phase's frozen_eval

    def frozen_modules(self) -> tuple[str, ...]:
        """Submodules kept in eval mode while the model trains: the current phase's `frozen_eval`."""
        return {p.name: p.frozen_eval for p in self.phases}.get(self.phase, ())

    def train(self, mode: bool = True) -> UHRMethod:
        """nn.Module.train, except that the frozen submodules (frozen_modules) stay in eval mode (their BN
        statistics and dropout do not move), however often the trainer or an evaluation switches modes."""
        super().train(mode)
        for name in self.frozen_modules() if mode else ():
            self.get_submodule(name).eval()
        return self

    def phase_parameters(self, phase: Phase) -> Iterator[nn.Parameter]:
        if phase.trainable is None:
            yield from self.parameters()
            return
        for prefix in phase.trainable:
            yield from self.get_submodule(prefix).parameters()

    def load_official(self, path: str) -> LoadReport:
        raise MethodError(f"method '{self.name}' has no official checkpoint layout to load ({path})")

    def save_official(self, path: str) -> None:
        """Write this model's weights in the upstream checkpoint layout `load_official` reads (to run them in the
        official code, e.g. for parity checks). Methods with an upstream layout override both."""
        raise MethodError(f"method '{self.name}' has no official checkpoint layout to write ({path})")

    def load_mapped_state(self, state: dict[str, torch.Tensor], path: str, strict: bool = True,
                          scope: str = "") -> LoadReport:
        """Load a checkpoint already mapped onto our key names. Every key that cannot be placed is named:
        with `strict` any missing, unexpected or mis-shaped key raises and nothing is loaded; otherwise
        the matching tensors load and the report lists the rest. `scope`: the file holds only the keys under
        this prefix (one part of the model, e.g. `refiner.`); the rest of the model is left as it is."""
        own = {k: v for k, v in self.state_dict().items() if k.startswith(scope)}
        report = LoadReport()
        for key, value in state.items():
            if key not in own:
                report.unexpected.append(key)
            elif own[key].shape != value.shape:
                report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
            else:
                report.loaded.append(key)
        report.missing = sorted(k for k in own if k not in state)
        if strict and not report.clean:
            part = f" {scope.rstrip('.')}" if scope else ""
            raise MethodError(f"{self.name}: {path} does not match the {self.name}{part} checkpoint layout: "
                              f"{report.summary()} (use load_official(path, strict=False) to load the rest)")
        self.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
        return report


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


SEED_SUFFIX = re.compile(r"@seed(\d+)$")  # `<run>@seed<N>`: the same run trained with seed N (benchmark.extra_seeds)


def split_seed(name: str) -> tuple[str, int | None]:
    """'glnet@seed2' -> ('glnet', 2); 'glnet' -> ('glnet', None)."""
    match = SEED_SUFFIX.search(name)
    return (name[:match.start()], int(match.group(1))) if match else (name, None)


def split_variant(name: str) -> tuple[str, Variant | None]:
    """'unet-local' -> ('unet', its Variant); 'isdnet' -> ('isdnet', None); aliases resolved; a seed suffix
    ('unet-local@seed1') is left out."""
    name = split_seed(name)[0]
    if name in _REGISTRY:
        return name, None
    if name in _ALIASES:
        return _ALIASES[name], None
    base, _, wanted = name.rpartition("-")
    base = _ALIASES.get(base, base)
    for variant in getattr(_REGISTRY.get(base), "variants", ()):
        if variant.name == wanted:
            return base, variant
    known = ", ".join(sorted(run_names()))
    raise MethodError(f"unknown method '{name}'; registered methods: {known} (see `python bench.py list`)")


def resolve_method_name(name: str) -> str:
    """The canonical run name: a registered name, or `<method>-<variant>` for a variant (aliases resolved), with its
    seed suffix `@seed<N>` if it has one."""
    base, variant = split_variant(name)
    seed = split_seed(name)[1]
    return (base if variant is None else f"{base}-{variant.name}") + ("" if seed is None else f"@seed{seed}")


def method_class(name: str) -> type[UHRMethod]:
    return _REGISTRY[split_variant(name)[0]]


def run_names() -> list[str]:
    """Every name `train`/`evaluate` accept: each method, and each variant of a method with variants."""
    return sorted(name for base, cls in _REGISTRY.items()
                  for name in ([f"{base}-{v.name}" for v in cls.variants] if cls.variants else [base]))


def display_name(name: str) -> str:
    """A method as tables, plots and logs show it: the registry name, plus its `label` where it has one
    (uhrsnet -> 'uhrsnet [UHRSNet-style (reconstructed)]'). Names no longer registered are shown as they are."""
    try:
        label = method_class(name).label
    except MethodError:
        return name
    return f"{name} [{label}]" if label else name


def build_method(name: str, num_classes: int, **cfg) -> UHRMethod:
    """Build a registered method; unknown config keys are an error, never silently ignored."""
    cls = method_class(name)
    variant = split_variant(name)[1]
    if variant is None and cls.variants:
        runs = ", ".join(f"{cls.name}-{v.name}" for v in cls.variants)
        raise MethodError(f"method '{cls.name}' runs as one of its variants: {runs}")
    if variant is not None:
        clash = {k: cfg[k] for k, v in variant.model.items() if k in cfg and cfg[k] != v}
        if clash:
            raise MethodError(f"{name}: the variant sets {variant.model}; remove {clash} from its params block "
                              f"or run another variant")
        cfg = {**cfg, **variant.model}
    stats = {key: cfg.pop(key) for key in NORMALIZATION_KEYWORDS if key in cfg}
    try:
        model = cls(num_classes=num_classes, **cfg)
    except TypeError as exc:
        raise MethodError(f"method '{cls.name}': bad config ({exc}); "
                          f"check methods.{cls.name}.model in params.yaml") from exc
    model.set_normalization(stats.get("pixel_mean"), stats.get("pixel_std"))
    return model


def list_methods() -> dict[str, str]:
    return {name: cls.description for name, cls in sorted(_REGISTRY.items())}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
