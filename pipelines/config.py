"""params.yaml: loading, the one override order, and validation of the whole resolved configuration.

Override order, lowest first, applied identically by every command (README, "Configuration"):
1. the method's constructor defaults (code);
2. `methods.<m>.model`;
3. `methods.<m>.datasets.<dataset>.model`: the upstream config's conventions for that dataset (input normalisation,
   head constants), for every profile, with their `source`;
4. `methods.<m>.recipes.<profile>.model` (the profile's recipe for every dataset);
5. `methods.<m>.recipes.<profile>.datasets.<dataset>.model`;
6. `--set <m>.<key>=value` (same as `--set methods.<m>.model.<key>=value`): always wins.
Recipes merge the same way (profile fields < dataset fields); `use: <name>` (or a list of names) pulls in the named
blocks of `schedules:` first, so a shared schedule is written once. Every other `--set a.b=c` edits that path of
params.yaml before anything is resolved. Errors are `ConfigError`s naming the key and the fix; the CLI prints them
as one line.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.schema import (
    RECIPE_FIELDS,
    TOP_LEVEL,
    ConfigError,
    Params,
    Recipe,
    _pydantic_line,
    check_model,
    constructor_keywords,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
PROFILES = ("smoke", "paper")
OVERRIDE_ORDER = ("code defaults", "methods.<m>.model", "methods.<m>.datasets.<dataset>.model",
                  "recipes.<profile>.model", "recipes.<profile>.datasets.<dataset>.model", "--set")


# ---------------------------------------------------------------------------------------------------------------
# merging


def deep_merge(base: dict, delta: dict) -> dict:
    """`delta` over `base`; mappings merge key by key, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand_uses(block: dict, schedules: dict, where: str, seen: tuple[str, ...] = ()) -> dict:
    """`use: name` / `use: [a, b]`: the named `schedules:` blocks (themselves expanded) under the block's own keys."""
    block = dict(block)
    names = block.pop("use", None)
    if names is None:
        return block
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}.use must be a schedule name or a list of names, got {names!r}")
    merged: dict = {}
    for name in names:
        if name not in schedules:
            raise ConfigError(f"{where}.use: unknown schedule '{name}'; defined in schedules: "
                              f"{', '.join(sorted(schedules)) or 'none'}")
        if name in seen:
            raise ConfigError(f"schedules.{name} uses itself (through {' -> '.join(seen)})")
        merged = deep_merge(merged, expand_uses(schedules[name], schedules, f"schedules.{name}", (*seen, name)))
    return deep_merge(merged, block)


def full_model_config(method: str, model: dict) -> dict:
    """`model` over the constructor's defaults, and a variant's keywords over both: every keyword the method is
    built with."""
    from methods import split_variant

    defaults, _ = constructor_keywords(method)
    variant = split_variant(method)[1]
    return {**copy.deepcopy(defaults), **model, **(copy.deepcopy(variant.model) if variant else {})}


def base_and_variant(run: str) -> tuple[str, str | None]:
    """A run -> (the method whose params block it reads, the variant whose recipe part it adds, or None)."""
    from methods import split_variant

    try:
        base, variant = split_variant(run)
    except ValueError:  # not registered: params and validation name the problem
        return run, None
    return base, (variant.name if variant else None)


# ---------------------------------------------------------------------------------------------------------------
# the configuration


@dataclass
class Config:
    """The parsed params.yaml plus the `--set` model overrides, resolved on demand in the documented order."""

    raw: dict
    path: Path
    model_sets: dict[str, dict] = field(default_factory=dict)  # --set <m>.<key>=v, the last word

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def profile(self) -> str:
        return self.raw["profile"]

    @property
    def seed(self) -> int:
        return int(self.raw.get("seed", 0))

    def for_run(self, run: str) -> Config:
        """The configuration a run trains with: `<method>@seed<N>` sets the seed to N (benchmark.extra_seeds)."""
        from methods.base import split_seed

        seed = split_seed(run)[1]
        if seed is None or seed == self.seed:
            return self
        # validated already; only the seed differs (re-validating would refuse it as listed in extra_seeds)
        return Config(raw={**self.raw, "seed": seed}, path=self.path, model_sets=self.model_sets)

    def _path(self, key: str, default: str) -> Path:
        return (self.root / self.raw.get(key, default)).resolve()

    @property
    def data_root(self) -> Path:
        return self._path("data_root", "data")

    @property
    def checkpoint_root(self) -> Path:
        return self._path("checkpoint_root", "checkpoints")

    @property
    def results_root(self) -> Path:
        return self._path("results_root", "results")

    @property
    def benchmark_datasets(self) -> list[str]:
        return list(self.raw["benchmark"]["datasets"])

    @property
    def benchmark_methods(self) -> list[str]:
        """Every run of the benchmark: `benchmark.methods`, then each network of `benchmark.networks` in each
        `benchmark.inference` mode (`unet-global`, `unet-local`), as dvc.yaml fans them out."""
        from methods import method_class

        bench = self.raw["benchmark"]
        return [*bench["methods"], *(f"{network}-{mode}" for network in bench.get("networks") or []
                                     for mode in bench.get("inference")
                                     or [v.name for v in method_class(network).variants])]

    def section(self, name: str) -> dict:
        """A settings block with every default filled in (train, evaluate, measure)."""
        block = Params.model_fields[name].annotation
        return block(**(self.raw.get(name) or {})).model_dump()

    def dataset_params(self, dataset: str) -> dict:
        params = (self.raw.get("datasets") or {}).get(dataset)
        if params is None:
            raise ConfigError(f"params.yaml has no datasets.{dataset} block; add one (see README, 'Adding a dataset')")
        return dict(params)

    def method_block(self, method: str) -> dict:
        method = base_and_variant(method)[0]
        block = (self.raw.get("methods") or {}).get(method)
        if block is None:
            raise ConfigError(f"params.yaml has no methods.{method} block; add one with its `recipes` "
                              "(see README, 'Adding a method')")
        return block

    def _profile_recipe(self, method: str, dataset: str) -> tuple[dict | None, str]:
        """The raw recipe of (method, dataset) under the current profile, `use:` expanded, dataset over profile;
        a variant run's `variants.<variant>` part over that."""
        method, variant = base_and_variant(method)
        where = f"methods.{method}.recipes.{self.profile}"
        block = (self.method_block(method).get("recipes") or {}).get(self.profile)
        if block is None:
            return None, where
        if not isinstance(block, dict):
            raise ConfigError(f"{where} must be a mapping of recipe fields")
        per_dataset = block.get("datasets")
        if per_dataset is not None and not isinstance(per_dataset, dict):
            raise ConfigError(f"{where}.datasets must map dataset names to recipe fields")
        common = {k: v for k, v in block.items() if k != "datasets"}
        # without `datasets:` the profile's recipe serves every dataset; with it, the listed ones (sharing `common`)
        specific = None if per_dataset is None else per_dataset.get(dataset)
        if per_dataset is not None and specific is None:
            return None, f"{where}.datasets.{dataset}"
        if specific is not None and not isinstance(specific, dict):
            raise ConfigError(f"{where}.datasets.{dataset} must be a mapping of recipe fields")
        schedules = self.raw.get("schedules") or {}
        recipe = deep_merge(self._expand(common, schedules, where),
                            self._expand(specific or {}, schedules, f"{where}.datasets.{dataset}"))
        parts = recipe.pop("variants", None) or {}
        if not isinstance(parts, dict):
            raise ConfigError(f"{where}.variants must map variant names to recipe fields")
        if variant is not None and parts.get(variant):
            recipe = deep_merge(recipe, parts[variant])
            where += f" (+ variants.{variant})"
        return recipe, where + (f" (+ datasets.{dataset})" if specific is not None else "")

    @staticmethod
    def _expand(block: dict, schedules: dict, where: str) -> dict:
        """`use:` at the recipe level and inside each phase."""
        out = expand_uses(block, schedules, where)
        return {k: expand_uses(v, schedules, f"{where}.{k}") if isinstance(v, dict) and k not in RECIPE_FIELDS
                and k != "model" else v for k, v in out.items()}

    def conventions(self, method: str, dataset: str) -> dict:
        """`methods.<m>.datasets.<dataset>`: {source, model} of the upstream config for that dataset; a method
        and dataset without an entry follow the method's defaults, which the source then says."""
        method = base_and_variant(method)[0]
        entry = (self.method_block(method).get("datasets") or {}).get(dataset)
        if entry is None:
            return {"source": f"none: methods.{method}.datasets has no '{dataset}' entry (the method's defaults)",
                    "model": {}}
        return {"source": entry["source"], "model": copy.deepcopy(entry.get("model") or {})}

    def method_model(self, method: str, dataset: str | None = None) -> dict:
        """Constructor keywords set in params (levels 2-6 of the override order; code defaults not included)."""
        model = copy.deepcopy(self.method_block(method).get("model") or {})
        if dataset is not None:
            model = deep_merge(model, self.conventions(method, dataset)["model"])
            recipe, _ = self._profile_recipe(method, dataset)
            model = deep_merge(model, (recipe or {}).get("model") or {})
        return deep_merge(model, self.model_overrides(method))

    def model_overrides(self, method: str) -> dict:
        """The `--set` keywords of one method, every variant's too (applied on top of a trained checkpoint's
        configuration as well)."""
        return copy.deepcopy(self.model_sets.get(base_and_variant(method)[0], {}))

    def recipe_dict(self, method: str, dataset: str) -> dict:
        recipe, where = self._profile_recipe(method, dataset)
        if recipe is None:
            raise ConfigError(f"no recipe at {where} for profile '{self.profile}'; add one to params.yaml or "
                              f"drop '{dataset}' from benchmark.datasets")
        return recipe

    def recipe(self, method: str, dataset: str, phase_key: str | None = None) -> Recipe:
        """The typed recipe; a phase's is the recipe's common fields under the phase's own."""
        raw = self.recipe_dict(method, dataset)
        where = f"methods.{method}.recipes.{self.profile}"
        common = {k: v for k, v in raw.items() if k in RECIPE_FIELDS}
        phases = {k: v for k, v in raw.items() if k not in RECIPE_FIELDS and k != "model"}
        if phase_key is not None:
            if phase_key not in phases:
                raise ConfigError(f"{where} has no '{phase_key}' phase recipe for {dataset}")
            return Recipe.from_dict(deep_merge(common, phases[phase_key]), f"{where}.{phase_key}")
        return Recipe.from_dict({k: v for k, v in raw.items() if k != "model"}, where)

    def phase_keys(self, method: str, dataset: str) -> list[str]:
        return [k for k in self.recipe_dict(method, dataset) if k not in RECIPE_FIELDS and k != "model"]

    def params_hash(self, method: str, dataset: str) -> str:
        """Hash of what defines a (method, dataset) run; joins MLflow rows back to dvc.lock and checkpoints."""
        recipe, _ = self._profile_recipe(method, dataset)
        blob = {"profile": self.profile, "seed": self.seed, "model": self.method_model(method, dataset),
                "recipe": {k: v for k, v in (recipe or {}).items() if k != "model"},
                "dataset": self.dataset_params(dataset)}
        return hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def with_changes(self, raw_sets: list[str] = (), model_sets: dict[str, dict] | None = None) -> Config:
        """A copy with more `--set path=value` edits and model keywords (validated)."""
        raw = apply_overrides(self.raw, list(raw_sets))
        sets = copy.deepcopy(self.model_sets)
        for method, values in (model_sets or {}).items():
            sets[method] = {**sets.get(method, {}), **values}
        out = Config(raw=raw, path=self.path, model_sets=sets)
        validate(out)
        return out

    def resolved(self, method: str, dataset: str, trained: tuple[dict, str] | None = None) -> dict:
        """What each stage will use for (method, dataset), every default filled in (`bench.py config`). `trained`:
        (model config, source) of an existing trained checkpoint, which evaluation and measurement rebuild."""
        from methods import resolve_method_name

        method = resolve_method_name(method)
        if self.for_run(method) is not self:
            return self.for_run(method).resolved(method, dataset, trained)
        model = full_model_config(method, self.method_model(method, dataset))
        stored, source = trained or (model, "the model training will produce")
        trained = {**full_model_config(method, stored), **self.model_overrides(method)}
        source += ", then --set"
        phase_keys = self.phase_keys(method, dataset)
        if phase_keys:
            recipe = {key: _plain(self.recipe(method, dataset, key)) for key in phase_keys}
        else:
            recipe = _plain(self.recipe(method, dataset))
        return {
            "method": method, "dataset": dataset, "profile": self.profile, "seed": self.seed,
            "override_order": " < ".join(OVERRIDE_ORDER),
            "paths": {"data": str(self.data_root / dataset), "checkpoint": str(self.checkpoint_root / dataset / method),
                      "results": str(self.results_root)},
            "dataset_params": self.dataset_params(dataset),
            "conventions": self.conventions(method, dataset),
            "train": {"model": model, "recipe": recipe, "settings": self.section("train"),
                      "params_hash": self.params_hash(method, dataset)},
            "evaluate": {"model": trained, "settings": self.section("evaluate"), "model_from": source},
            "measure": {"model": trained, "settings": self.section("measure"), "model_from": source},
        }


def _plain(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


# ---------------------------------------------------------------------------------------------------------------
# --set


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_overrides(overrides: list[str], method_names: set[str]) -> tuple[list[str], dict[str, dict]]:
    """(`path=value` edits of params.yaml, {method: {keyword: value}} model overrides). `<m>.<key>=v` and
    `methods.<m>.model.<key>=v` are the same model override; a top-level key that does not exist is an error."""
    raw_sets: list[str] = []
    model_sets: dict[str, dict] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set '{item}' must look like key.path=value")
        if parts[0] in method_names and parts[0] not in TOP_LEVEL and len(parts) == 2:
            model_sets.setdefault(parts[0], {})[parts[1]] = _parse_value(value)
        elif parts[:1] == ["methods"] and len(parts) == 4 and parts[2] == "model":
            model_sets.setdefault(parts[1], {})[parts[3]] = _parse_value(value)
        elif parts[0] not in TOP_LEVEL:
            hint = " (a method keyword is <method>.<key>)" if len(parts) == 2 else ""
            raise ConfigError(f"--set '{item}': unknown top-level key '{parts[0]}'{hint}; "
                              f"known: {', '.join(TOP_LEVEL)}, or a method name")
        else:
            raw_sets.append(item)
    return raw_sets, model_sets


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key.path=value` edits of the raw params (intermediate mappings are created)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _parse_value(value)
    return raw


def variant_label(overrides: dict | None) -> str:
    """'' without runtime overrides, else e.g. 'k0.5': names result files and MLflow runs of a
    variant so they never overwrite the default (DVC-tracked) ones."""
    if not overrides:
        return ""
    return "_".join(f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}"
                    for key, value in sorted(overrides.items()))


# ---------------------------------------------------------------------------------------------------------------
# loading and validation


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Parse params.yaml, apply the --set overrides and validate everything; any problem is a one-line ConfigError."""
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

    raw_sets, model_sets = split_overrides(list(overrides or []), set(list_methods()))
    config = Config(raw=apply_overrides(raw, raw_sets), path=path.resolve(), model_sets=model_sets)
    validate(config)
    return config


def validate(config: Config) -> None:
    """The whole configuration, before any work: the shape and types of every block (pydantic), registered
    dataset and method names, every method's model keywords against its constructor, every recipe present."""
    from datasets import list_datasets
    from methods import list_methods, method_class, resolve_method_name

    raw = config.raw
    for key in ("profile", "benchmark", "datasets", "methods"):
        if key not in raw:
            raise ConfigError(f"{config.path} is missing the top-level key '{key}'; "
                              "see the README's 'Configuration' section")
    try:
        Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_pydantic_line(exc, "") + f" (in {config.path.name} or a --set)") from None
    if config.seed in (raw["benchmark"].get("extra_seeds") or []):
        raise ConfigError(f"benchmark.extra_seeds lists {config.seed}, the seed every run already trains with "
                          f"(`seed`); list only other seeds (in {config.path.name} or a --set)")
    known_datasets = list_datasets()
    for name in raw["benchmark"]["datasets"]:
        if name not in known_datasets:
            raise ConfigError(f"benchmark.datasets: unknown dataset '{name}'; registered: {', '.join(known_datasets)}")
        config.dataset_params(name)
    for name in raw["benchmark"]["methods"]:
        try:
            resolve_method_name(name)
        except ValueError as exc:
            raise ConfigError(f"benchmark.methods: {exc}") from None
        if method_class(name).variants:  # dvc.yaml's per-module dependency needs the module name
            raise ConfigError(f"benchmark.methods: '{name}' is a generic network; list "
                              f"'{method_class(name).name}' in benchmark.networks (run in each benchmark.inference "
                              "mode)")
        config.method_block(name)
    for name in raw["benchmark"].get("networks") or []:
        variants = [v.name for v in method_class(name).variants] if name in list_methods() else []
        if not variants:
            raise ConfigError(f"benchmark.networks: '{name}' is not a generic network (one with global/local "
                              f"variants); list UHR methods in benchmark.methods")
        for mode in raw["benchmark"].get("inference") or []:
            if mode not in variants:
                raise ConfigError(f"benchmark.inference: '{mode}' is not a variant of {name} ({', '.join(variants)})")
        config.method_block(name)
    registered = set(list_methods())
    for name in config.model_sets:
        if name not in registered:
            raise ConfigError(f"--set {name}.*: unknown method '{name}'")
    datasets = sorted(set(raw["datasets"]) | set(known_datasets))
    for name, block in raw["methods"].items():
        if name not in registered:
            raise ConfigError(f"methods.{name}: no registered method of that name; registered: "
                              f"{', '.join(sorted(registered))}")
        check_model(name, block.get("model") or {}, f"methods.{name}.model")
        for dataset, entry in (block.get("datasets") or {}).items():
            if dataset not in known_datasets:
                raise ConfigError(f"methods.{name}.datasets.{dataset}: unknown dataset; registered: "
                                  f"{', '.join(known_datasets)}")
            check_model(name, entry.get("model") or {}, f"methods.{name}.datasets.{dataset}.model")
        check_model(name, config.model_sets.get(name, {}), f"--set {name}")
        runs = [f"{name}-{v.name}" for v in method_class(name).variants] or [name]
        for profile in block.get("recipes") or {}:
            for dataset in datasets:
                probe = config if profile == config.profile else Config(
                    raw={**raw, "profile": profile}, path=config.path, model_sets=config.model_sets)
                for run in runs:
                    recipe, where = probe._profile_recipe(run, dataset)
                    if recipe is None:
                        continue
                    check_model(name, recipe.get("model") or {}, f"{where}.model")
                    keys = probe.phase_keys(run, dataset)
                    for key in keys or [None]:
                        probe.recipe(run, dataset, key)

