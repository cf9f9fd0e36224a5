"""Load and validate params.yaml: the one place every knob lives.

Errors are `ConfigError`s naming the key and the fix; the CLI prints them as one line.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
PROFILES = ("smoke", "paper")


class ConfigError(ValueError):
    """params.yaml (or a --set override) is malformed; the message names the key and the fix."""


@dataclass(frozen=True)
class Schedule:
    name: str = "poly"
    power: float = 0.9
    min_lr: float = 0.0


@dataclass(frozen=True)
class Recipe:
    """One training recipe (a method x dataset x profile, or one phase of it)."""

    iterations: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Schedule = field(default_factory=Schedule)
    crop_size: int | None = None  # None: whole image
    resize_ratio: float = 1.0
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    rotate: dict | None = None  # {prob, degrees: [lo, hi]}: arbitrary-angle rotation, label padded with ignore
    photometric: bool = False
    cat_max_ratio: float | None = None
    amp: str | None = None  # None, "fp16" or "bf16" (CUDA only)
    channels_last: bool = False  # NHWC memory format (CUDA only)
    checkpoint_every: int = 0  # 0: only at the end
    log_every: int = 10

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
        if not isinstance(schedule, dict) or set(schedule) - {"name", "power", "min_lr"}:
            raise ConfigError(f"{where}.schedule must be a mapping with name/power/min_lr")
        values["schedule"] = Schedule(**schedule)
        recipe = cls(**values)
        recipe._check(where)
        return recipe

    def _check(self, where: str) -> None:
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"{where}.optimizer must be sgd, adam or adamw, got '{self.optimizer}'")
        if self.schedule.name not in ("poly", "constant"):
            raise ConfigError(f"{where}.schedule.name must be poly or constant, got '{self.schedule.name}'")
        if self.amp not in (None, "fp16", "bf16"):
            raise ConfigError(f"{where}.amp must be null, fp16 or bf16, got '{self.amp}'")
        for name in ("iterations", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ConfigError(f"{where}.lr must be a positive number, got {self.lr!r}")
        if self.crop_size is not None and (not isinstance(self.crop_size, int) or self.crop_size < 8):
            raise ConfigError(f"{where}.crop_size must be null or an integer >= 8, got {self.crop_size!r}")


@dataclass
class Config:
    """The parsed params.yaml."""

    raw: dict
    path: Path

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def profile(self) -> str:
        return self.raw["profile"]

    @property
    def seed(self) -> int:
        return int(self.raw.get("seed", 0))

    @property
    def data_root(self) -> Path:
        return (self.root / self.raw.get("data_root", "data")).resolve()

    @property
    def checkpoint_root(self) -> Path:
        return (self.root / self.raw.get("checkpoint_root", "checkpoints")).resolve()

    @property
    def results_root(self) -> Path:
        return (self.root / self.raw.get("results_root", "results")).resolve()

    @property
    def benchmark_datasets(self) -> list[str]:
        return list(self.raw["benchmark"]["datasets"])

    @property
    def benchmark_methods(self) -> list[str]:
        return list(self.raw["benchmark"]["methods"])

    def section(self, name: str) -> dict:
        return dict(self.raw.get(name) or {})

    def dataset_params(self, dataset: str) -> dict:
        params = (self.raw.get("datasets") or {}).get(dataset)
        if params is None:
            raise ConfigError(f"params.yaml has no datasets.{dataset} block; add one (see README, 'Datasets')")
        return dict(params)

    def method_block(self, method: str) -> dict:
        block = (self.raw.get("methods") or {}).get(method)
        if block is None:
            raise ConfigError(f"params.yaml has no methods.{method} block; add one with `model` and `recipes`")
        return block

    def method_model(self, method: str, dataset: str | None = None) -> dict:
        """Constructor kwargs: `methods.<m>.model`, updated by the `model` block of the
        (profile, dataset) recipe when there is one (e.g. a smaller trunk or window for smoke runs)."""
        model = copy.deepcopy(self.method_block(method).get("model") or {})
        if dataset is not None:
            raw = self._raw_recipe(method, dataset, required=False) or {}
            model.update(copy.deepcopy(raw.get("model") or {}))
        return model

    def _raw_recipe(self, method: str, dataset: str, required: bool = True) -> dict | None:
        where = f"methods.{method}.recipes.{self.profile}.{dataset}"
        recipes = (self.method_block(method).get("recipes") or {}).get(self.profile) or {}
        raw = recipes.get(dataset)
        if raw is None and required:
            raise ConfigError(f"no recipe at {where}; add one to params.yaml or drop '{dataset}' "
                              f"from benchmark.datasets for profile '{self.profile}'")
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping of recipe fields")
        return raw

    def recipe(self, method: str, dataset: str, phase_key: str | None = None) -> Recipe:
        where = f"methods.{method}.recipes.{self.profile}.{dataset}"
        raw = {k: v for k, v in self._raw_recipe(method, dataset).items() if k != "model"}
        if phase_key is not None:
            if phase_key not in raw:
                raise ConfigError(f"{where} has no '{phase_key}' phase recipe")
            return Recipe.from_dict(raw[phase_key], f"{where}.{phase_key}")
        return Recipe.from_dict(raw, where)

    def params_hash(self, method: str, dataset: str) -> str:
        """Hash of what defines a (method, dataset) run; joins MLflow rows back to dvc.lock."""
        blob = {"profile": self.profile, "seed": self.seed, "method": self.method_block(method),
                "dataset": self.dataset_params(dataset)}
        return hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str], method_names: set[str]) -> dict:
    """`key.path=value` overrides. `<method>.<key>=v` is short for `methods.<method>.model.<key>=v`."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must look like key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] in method_names and parts[0] not in raw:
            parts = ["methods", parts[0], "model", *parts[1:]]
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _parse_value(value)
    return raw


def model_overrides(overrides: list[str], method: str) -> dict:
    """The `--set` overrides aimed at one method's model, as constructor kwargs (runtime knobs such
    as RUE's K applied on top of the configuration a checkpoint was trained with)."""
    out = {}
    for item in overrides:
        key, _, value = item.partition("=")
        for prefix in (f"{method}.", f"methods.{method}.model."):
            if key.startswith(prefix) and "." not in key[len(prefix):]:
                out[key[len(prefix):]] = _parse_value(value)
    return out


def variant_label(overrides: dict | None) -> str:
    """'' without runtime overrides, else e.g. 'k0.5': names result files and MLflow runs of a
    variant so they never overwrite the default (DVC-tracked) ones."""
    if not overrides:
        return ""
    return "_".join(f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}"
                    for key, value in sorted(overrides.items()))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Parse and validate params.yaml; any problem is a one-line ConfigError."""
    path = Path(path) if path else DEFAULT_PARAMS
    if not path.is_file():
        raise ConfigError(f"parameter file {path} not found; run from the repository root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix the syntax there") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at top level (profile, benchmark, datasets, methods)")
    from methods import list_methods  # the registry decides which names are real

    if overrides:
        raw = apply_overrides(raw, overrides, set(list_methods()))
    config = Config(raw=raw, path=path.resolve())
    validate(config)
    return config


def validate(config: Config) -> None:
    from datasets import list_datasets
    from methods import list_methods, resolve_method_name

    raw = config.raw
    for key in ("profile", "benchmark", "datasets", "methods"):
        if key not in raw:
            raise ConfigError(f"{config.path} is missing the top-level key '{key}'; "
                              "see the README's params.yaml section")
    if raw["profile"] not in PROFILES:
        raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, got '{raw['profile']}'")
    bench = raw["benchmark"]
    if not isinstance(bench, dict) or not isinstance(bench.get("datasets"), list) or not isinstance(
            bench.get("methods"), list):
        raise ConfigError("benchmark must have list entries `datasets: [...]` and `methods: [...]`")
    known_datasets = list_datasets()
    for name in bench["datasets"]:
        if name not in known_datasets:
            raise ConfigError(f"benchmark.datasets: unknown dataset '{name}'; registered: {', '.join(known_datasets)}")
        config.dataset_params(name)
    list_methods()
    for name in bench["methods"]:
        try:
            resolve_method_name(name)
        except ValueError as exc:
            raise ConfigError(f"benchmark.methods: {exc}") from None
        block = config.method_block(name)
        if not isinstance(block, dict) or not isinstance(block.get("model", {}), dict):
            raise ConfigError(f"methods.{name} must be a mapping with a `model` mapping and `recipes`")
