"""Comparison tables built from MLflow, so `mlflow ui` and the tables always agree."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from tabulate import tabulate

from datasets import get_dataset
from pipelines import tracking
from pipelines.config import Config, ConfigError

FORMATS = {"terminal": "simple", "md": "github", "latex": "latex_booktabs", "csv": None}
SUFFIX = {"md": "md", "latex": "tex", "csv": "csv", "terminal": "txt"}


def evaluation_runs(dataset: str) -> pd.DataFrame:
    """Every finished evaluate run of a dataset, newest first."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    experiment = mlflow.get_experiment_by_name(tracking.experiment_name(dataset))
    if experiment is None:
        return pd.DataFrame()
    return mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string="tags.stage = 'evaluate' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], output_format="pandas")


def comparison_table(dataset: str, run_ids: list[str] | None = None, all_runs: bool = False) -> pd.DataFrame:
    """One row per method (its latest finished evaluation unless `run_ids`/`all_runs` say otherwise)."""
    info = get_dataset(dataset).info
    runs = evaluation_runs(dataset)
    if runs.empty:
        raise ConfigError(f"no finished evaluation of dataset '{dataset}' in {tracking.tracking_uri()}; "
                          f"run `python bench.py evaluate --dataset {dataset} --method <m>` or `dvc repro`")
    if run_ids:
        missing = sorted(set(run_ids) - set(runs["run_id"]))
        if missing:
            raise ConfigError(f"run id(s) {', '.join(missing)} are not finished evaluations of '{dataset}'")
        runs = runs[runs["run_id"].isin(run_ids)]
    elif not all_runs:
        runs = runs.drop_duplicates(subset="tags.method", keep="first")
    rows = []
    for _, run in runs.iterrows():
        row = {"method": run["tags.method"], "mIoU": _pct(run.get("metrics.miou"))}
        if info.headline != "miou":
            row[info.headline] = _pct(run.get("metrics.headline"))
        for name in info.class_names:
            row[f"IoU {name}"] = _pct(run.get(f"metrics.iou.{name}"))
        row["params (M)"] = round(float(run.get("metrics.params_m")), 2)
        row["device"] = run.get("tags.env.device_name", "")
        row["run"] = run["run_id"][:8]
        rows.append(row)
    return pd.DataFrame(rows).sort_values("method", kind="stable").reset_index(drop=True)


def format_table(table: pd.DataFrame, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.to_csv(index=False)
    return tabulate(table.values.tolist(), headers=list(table.columns), tablefmt=FORMATS[fmt],
                    floatfmt=".2f", missingval="n/a") + "\n"


def report(config: Config) -> list[Path]:
    """Write every benchmark dataset's comparison table in md, csv and latex to results/tables/."""
    out_dir = config.results_root / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in config.benchmark_datasets:
        table = comparison_table(dataset)
        table = table[table["method"].isin(config.benchmark_methods)]
        for fmt in ("md", "csv", "latex"):
            path = out_dir / f"compare_{dataset}.{SUFFIX[fmt]}"
            path.write_text(format_table(table, fmt))
            written.append(path)
    return written


def _pct(value) -> float | None:
    return None if value is None or pd.isna(value) else round(100.0 * float(value), 2)
