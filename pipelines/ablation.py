"""Ablation stage: the five configurations of UHRSNet-style (reconstructed) trained and evaluated with the
ordinary train / evaluate stages, written as the paper's Table III layout with the published numbers beside
ours: results/ablations/<method>_<dataset>.{csv,md} (the csv holds our scores; `bench.py tables` reads it).

Each configuration is the same params.yaml with model overrides at the recipe level (they win over the
recipe's own `model:` block), its own checkpoint and results folders under `ablation/`, and MLflow runs
labelled `variant=ablation-<row>`, so nothing of the main run is overwritten or mistaken for it. A
configuration whose final checkpoint already matches its parameters is not trained again. With several
seeds every row is trained once per seed and the table gives mean and standard deviation: on a smoke budget
the rows differ by about as much as two seeds of one row do. Ablation outputs live outside results/tables,
which DVC's report stage owns and clears.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from methods import list_methods, resolve_method_name
from pipelines.config import Config, ConfigError, apply_overrides, validate

VARIANT_PREFIX = "ablation-"


def ablation_rows(method: str) -> list[tuple[str, str, dict]]:
    method = resolve_method_name(method)
    if method != "uhrsnet":
        raise ConfigError(f"`ablation` is defined for uhrsnet only, got '{method}'")
    from methods.uhrsnet import ABLATION_ROWS

    return [(key, label, dict(kwargs)) for key, label, kwargs in ABLATION_ROWS]


def row_config(config: Config, method: str, dataset: str, key: str, kwargs: dict, seed: int) -> Config:
    """The params of one configuration and seed: model switches at the recipe level, own checkpoint / results
    roots."""
    where = f"methods.{method}.recipes.{config.profile}.{dataset}.model"
    base = Path("ablation") / method / dataset / key / f"seed{seed}"
    overrides = [f"{where}.{name}={str(value).lower() if isinstance(value, bool) else value}"
                 for name, value in kwargs.items()]
    overrides += [f"seed={seed}", f"checkpoint_root={config.checkpoint_root / base}",
                  f"results_root={config.results_root / base}"]
    out = Config(raw=apply_overrides(config.raw, overrides, set(list_methods())), path=config.path)
    validate(out)
    return out


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (distinct integers, order kept)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds '{text}' must be comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds '{text}' must list distinct integers, e.g. 0,1,2")
    return seeds


def scores_path(config: Config, method: str, dataset: str) -> Path:
    return config.results_root / "ablations" / f"{method}_{dataset}.csv"


def ablation(config: Config, dataset: str, method: str = "uhrsnet", device: str = "auto",
             rows: list[str] | None = None, train_only: bool = False, seeds: list[int] | None = None) -> list[Path]:
    """Train and evaluate every configuration (or those in `rows`) for every seed (default: params' seed), then
    write the scores of all (row, seed) pairs with a finished checkpoint and the Table III layout. Returns the
    written paths (none with train_only)."""
    from pipelines.evaluate import evaluate
    from pipelines.train import checkpoint_dir, train

    method = resolve_method_name(method)
    all_rows = ablation_rows(method)
    unknown = sorted(set(rows or []) - {k for k, _, _ in all_rows})
    if unknown:
        raise ConfigError(f"unknown ablation row(s) {', '.join(unknown)}; rows: "
                          f"{', '.join(k for k, _, _ in all_rows)}")
    results: dict[tuple[str, int], dict] = {}
    for key, _label, kwargs in all_rows:
        for seed in seeds or [config.seed]:
            cfg = row_config(config, method, dataset, key, kwargs, seed)
            final = checkpoint_dir(cfg, dataset, method) / "final.pt"
            if rows is None or key in rows:
                if not _up_to_date(final, cfg.params_hash(method, dataset)):
                    train(cfg, dataset, method, device)
                if train_only:
                    continue
            elif train_only or not final.is_file():
                continue
            results[key, seed] = evaluate(cfg, dataset, method, device=device, variant=f"{VARIANT_PREFIX}{key}")
    if train_only:
        return []
    return write_scores(config, dataset, method, all_rows, results)


def _up_to_date(final: Path, params_hash: str) -> bool:
    if not final.is_file():
        return False
    return torch.load(final, map_location="cpu", weights_only=False).get("params_hash") == params_hash


def write_scores(config: Config, dataset: str, method: str, rows, results: dict[tuple[str, int], dict]
                 ) -> list[Path]:
    """results/ablations/<method>_<dataset>.csv (one line per evaluated row and seed: switches, mIoU, per-class
    IoU, MLflow run) and .md (the Table III layout, published beside ours)."""
    from pipelines.anchors import PROTOCOL_FLAGS
    from pipelines.report import format_table, uhrsnet_ablation_table

    lines = []
    for key, label, kwargs in rows:
        for (row, seed), r in sorted(results.items()):
            if row != key:
                continue
            local_output = r.get("outputs", {}).get("local", {}).get("miou")  # both branches: the "local" number
            lines.append({"row": key, "configuration": label, **kwargs, "seed": seed, "miou": r["miou"],
                          "miou_local_output": local_output,
                          **{f"iou.{name}": v for name, v in r["iou"].items()},
                          "profile": r["profile"], "split": r["split"], "mlflow_run_id": r["mlflow_run_id"]})
    csv_path = scores_path(config, method, dataset)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(lines).to_csv(csv_path, index=False)
    table = uhrsnet_ablation_table(dataset, csv_path)
    split = config.section("evaluate").get("split", "test")
    md_path = csv_path.with_suffix(".md")
    md_path.write_text(
        f"# UHRSNet-style (reconstructed) ablation on {dataset} (Table III layout)\n\n"
        f"{format_table(table, 'md', numparse=False)}\n\n"
        f"Ours: profile `{config.profile}`, mIoU over the dataset's counted classes from one confusion matrix over the "
        f"`{split}` split; every row trained with the same recipe and seeds, starting shared parts from the same "
        "weights (methods/uhrsnet.py: a reconstruction, not the authors' code). Per-class IoU and MLflow runs: "
        f"{csv_path.name}.\n\n{PROTOCOL_FLAGS[4]}\n")
    return [md_path, csv_path]
