"""The typed shape of params.yaml: recipes, settings blocks and method keywords, checked with pydantic.

Every check raises `ConfigError` with the key that is wrong and what it must be; pipelines/config.py resolves the
configuration and calls these on every part of it.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    field_validator,
)


class ConfigError(ValueError):
    """params.yaml (or a --set override) is malformed; the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# recipes


@dataclass(frozen=True)
class Schedule:
    name: Literal["poly", "constant", "multistep"] = "poly"
    power: float = 0.9
    min_lr: float = 0.0
    milestones: tuple[int, ...] = ()  # multistep (torch MultiStepLR): lr x gamma at each of these iterations
    gamma: float = 0.1
    # mmcv's linear warm-up: the scheduled lr times 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6


@dataclass(frozen=True)
class Recipe:
    """One training recipe (a method x dataset x profile, or one phase of it)."""

    iterations: int
    batch_size: int
    lr: float
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Schedule = field(default_factory=Schedule)
    crop_size: int | tuple[int, int] | None = None  # None: whole image; [height, width] for a non-square crop
    resize_ratio: float | tuple[float, float] = 1.0  # [lo, hi]: a ratio drawn per sample (mmseg ratio_range)
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    rotate: dict | None = None  # {prob, degrees: [lo, hi]}: arbitrary-angle rotation, label padded with ignore
    photometric: bool = False
    cat_max_ratio: float | None = None
    amp: Literal["fp16", "bf16"] | None = None  # autocast; on CPU bf16 only
    amp_modules: list[str] | None = None  # autocast only inside these submodules (None: the whole forward)
    channels_last: bool = False  # NHWC memory format (oneDNN on CPU, cuDNN on CUDA: same math, faster kernels)
    checkpoint_every: int = 0  # 0: only at the end
    log_every: int = 10
    # mmcv paramwise custom_keys: {substring of a parameter name: {lr_mult, decay_mult}}, the longest match wins
    param_groups: dict[str, dict[Literal["lr_mult", "decay_mult"], float]] | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Recipe:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping of recipe fields, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown recipe key(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(known))}")
        missing = [k for k in ("iterations", "batch_size", "lr") if k not in raw]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        values = dict(raw)
        schedule = values.get("schedule") or {}
        if not isinstance(schedule, dict) or set(schedule) - {f.name for f in fields(Schedule)}:
            raise ConfigError(f"{where}.schedule must be a mapping with name/power/min_lr/warmup_iters/warmup_ratio/"
                              "milestones/gamma")
        values["schedule"] = schedule
        recipe = _typed(cls, values, where)
        recipe._check(where)
        return recipe

    def _check(self, where: str) -> None:
        for name in ("iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr must be a positive number, got {self.lr!r}")
        crop = (self.crop_size,) if isinstance(self.crop_size, int) else self.crop_size or ()
        if any(side < 8 for side in crop):
            raise ConfigError(f"{where}.crop_size must be null, an integer >= 8 or [height, width], got "
                              f"{self.crop_size!r}")
        ratios = self.resize_ratio if isinstance(self.resize_ratio, tuple) else (self.resize_ratio,)
        if any(r <= 0 for r in ratios) or ratios != tuple(sorted(ratios)):
            raise ConfigError(f"{where}.resize_ratio must be a positive number or [low, high] with low <= high, got "
                              f"{list(ratios) if len(ratios) > 1 else ratios[0]!r}")
        if self.schedule.warmup_iters < 0 or not 0 < self.schedule.warmup_ratio <= 1:
            raise ConfigError(f"{where}.schedule: warmup_iters must be >= 0 and warmup_ratio in (0, 1]")


RECIPE_FIELDS = frozenset(f.name for f in fields(Recipe))


@cache
def _adapter(kind) -> TypeAdapter:
    return TypeAdapter(kind)


def _typed(cls, values: dict, where: str):
    """`cls(**values)` with every field's type checked (pydantic, lax: 2 is a float, "two" is not an int)."""
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as exc:
        raise ConfigError(_pydantic_line(exc, where)) from None


# keys users reach for that are spelt otherwise here (DVC's stage matrix needs the further seeds as their own list)
SPELT_OTHERWISE = {"benchmark.seeds": "write the first seed as `seed: 0` (top level) and the others as "
                                      "`benchmark.extra_seeds: [1, 2]`"}


def _pydantic_line(exc: ValidationError, where: str) -> str:
    error = exc.errors()[0]
    loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
    key = f"{where}.{loc}" if where and loc else (where or loc)
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; {SPELT_OTHERWISE.get(key, 'remove or rename it')}"
    if error["type"] == "missing":
        return f"{key}: missing; add it"
    return f"{key}: {error['msg'][0].lower()}{error['msg'][1:]}, got {error.get('input')!r}"


# ---------------------------------------------------------------------------------------------------------------
# the shape of params.yaml


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Benchmark(_Block):
    datasets: list[str]
    methods: list[str]
    networks: list[str] = []  # generic networks, each run once per `inference` mode (`unet-global`, ...)
    inference: list[str] | None = None  # None: every variant of each network
    # more seeds of each of `methods`: each trains and evaluates again as `<method>@seed<N>` (its own checkpoint
    # folder, MLflow runs and DVC stages); tables show the mean and std over `seed` and these
    extra_seeds: list[NonNegativeInt] = []

    @field_validator("extra_seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"lists a seed twice: {seeds}; list distinct seeds, e.g. [1, 2]")
        return seeds


class Suite(_Block):
    methods: list[str]
    networks: list[str] = []


class TrainSettings(_Block):
    workers: NonNegativeInt = 0  # DataLoader workers
    cache_mib: NonNegativeFloat = 1024  # decoded training images kept in memory, per process (0: decode each time)
    nproc_per_node: PositiveInt = 1  # processes under torchrun
    batch_per_device: PositiveInt | None = None  # micro-batch per process; None: recipe batch / processes
    deterministic: bool = False


class EvaluateSettings(_Block):
    split: str = "test"
    num_visualizations: NonNegativeInt = 3
    tile_size: PositiveInt | None = None
    tile_overlap: NonNegativeInt = 256


def _per_device(kind):
    return kind | dict[str, kind]


class MeasureBlock(_Block):
    """Types only; pipelines/measure.py's MeasureSettings resolves per-device values and checks ranges."""

    device: str = "auto"
    warmup: _per_device(NonNegativeInt) = 2
    warmup_seconds: _per_device(NonNegativeFloat) = 0.0
    iterations: _per_device(PositiveInt) = 5
    min_seconds: _per_device(float) = 0.0
    source: Literal["real", "dummy"] = "real"
    max_images: PositiveInt = 4
    scale: PositiveFloat = 1.0
    amp: Literal["fp16", "bf16"] | None = None
    channels_last: bool = False
    cudnn_benchmark: bool = False
    poll_interval_ms: PositiveFloat = 10.0
    sweep: list[PositiveInt] = [1024, 2048, 2448, 4096, 5000, 8192]


class DatasetConventions(_Block):
    """What the method's upstream config fixes for one dataset, for every profile: input normalisation, head
    constants. `source` says where each value comes from (upstream file and commit), or that none exists."""

    source: str
    model: dict[str, Any] = {}


class MethodBlock(_Block):
    model: dict[str, Any] = {}
    datasets: dict[str, DatasetConventions] = {}
    recipes: dict[Literal["smoke", "paper"], dict[str, Any]] = {}


class Params(_Block):
    profile: Literal["smoke", "paper"]
    seed: int = 0
    data_root: str = "data"
    checkpoint_root: str = "checkpoints"
    results_root: str = "results"
    suites: dict[str, Suite] = {}  # named selections; `benchmark` merges one in (`<<: *core`)
    benchmark: Benchmark
    datasets: dict[str, dict[str, Any]]
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    measure: MeasureBlock = MeasureBlock()
    schedules: dict[str, dict[str, Any]] = {}
    methods: dict[str, MethodBlock]


TOP_LEVEL = tuple(Params.model_fields)


# ---------------------------------------------------------------------------------------------------------------
# model keywords: checked against the constructor


@cache
def constructor_keywords(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(defaults, type hints) of method `name`'s constructor keywords (num_classes and ignore_index aside),
    following `**kwargs` up to the parent that takes them (the DeepLabv3 baselines)."""
    from methods import UHRMethod, method_class
    from methods.base import NORMALIZATION_KEYWORDS

    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for klass in method_class(name).__mro__:
        if klass is UHRMethod or "__init__" not in vars(klass):
            continue
        init = vars(klass)["__init__"]
        signature = inspect.signature(init)
        try:
            types = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - unresolvable annotations: names are still checked
            types = {}
        for p in signature.parameters.values():
            if p.name in ("self", "num_classes", "ignore_index") or p.name in params \
                    or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            params[p.name], hints[p.name] = p, types.get(p.name, Any)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    # every method's input normalisation (build_method applies it), defaulting to the class's statistics
    klass = method_class(name)
    for key, value in zip(NORMALIZATION_KEYWORDS, klass.pixel_stats, strict=True):
        defaults[key], hints[key] = list(value), tuple[float, float, float]
    return defaults, hints


def check_model(method: str, model: dict, where: str) -> None:
    """Unknown keywords and wrong types are ConfigErrors naming `where.<key>`."""
    defaults, hints = constructor_keywords(method)
    unknown = sorted(set(model) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for method '{method}'; "
                          f"its keywords: {', '.join(sorted(hints))}")
    for key, value in model.items():
        try:
            _adapter(hints[key]).validate_python(value)
        except ValidationError:
            kind = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise ConfigError(f"{where}.{key} must be {kind}, got {value!r}") from None
        except Exception:  # noqa: BLE001,S110 - a type pydantic cannot check; the constructor will
            pass
