"""Comparison tables built from MLflow, so `mlflow ui` and the tables always agree, and the whole report: the
comparison, the papers' tables with ours beside them (pipelines/published.py), plots and results/README.md."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from datasets import get_dataset
from methods import display_name
from pipelines import plots, published, tracking
from pipelines.config import Config, ConfigError
from pipelines.paths import ablation_scores, measure_file, metrics_file
from pipelines.tables import SUFFIX, format_table, pct, write_table


def comparison_table(dataset: str, run_ids: list[str] | None = None, all_runs: bool = False,
                     methods: list[str] | None = None) -> pd.DataFrame:
    """One row per method and variant (e.g. RUE's K): its latest finished evaluation unless
    `run_ids`/`all_runs` say otherwise, joined with its latest measurement of the same variant. `methods`
    (registry names) keeps only those methods' rows. Each declared runtime knob gets a column."""
    info = get_dataset(dataset).info
    runs = tracking.finished_runs(dataset, "evaluate")
    if runs.empty:
        raise ConfigError(f"no finished evaluation of dataset '{dataset}' in {tracking.tracking_uri()}; "
                          f"run `python bench.py evaluate --dataset {dataset} --method <m>` or `dvc repro`")
    if run_ids:
        missing = sorted(set(run_ids) - set(runs["run_id"]))
        if missing:
            raise ConfigError(f"run id(s) {', '.join(missing)} are not finished evaluations of '{dataset}'")
        runs = runs[runs["run_id"].isin(run_ids)]
    if methods is not None:
        runs = runs[runs["tags.method"].isin(methods)]
        if runs.empty:
            raise ConfigError(f"no finished evaluation of {', '.join(methods)} on '{dataset}'; run `dvc repro`")
    if not run_ids and not all_runs:
        runs = runs.drop_duplicates(subset=["tags.method", "variant"], keep="first")
    measures = tracking.finished_runs(dataset, "measure")
    if not measures.empty:
        measures = measures.drop_duplicates(subset=["tags.method", "variant"], keep="first")
    knob_titles = {}
    for method in runs["tags.method"].unique():
        knob_titles.update({k.name: k.title for k in published.knobs_of(method)})
    rows = []
    for _, run in runs.iterrows():
        settings = dict(published.run_settings(run, run["tags.method"]))
        row = {"method": display_name(run["tags.method"]),
               **{title: settings.get(name, "") for name, title in knob_titles.items()}, "variant": run["variant"]}
        row[_headline_name(info.headline)] = pct(run.get("metrics.headline"))
        if info.headline != "miou":
            row["mIoU"] = pct(run.get("metrics.miou"))
        for name in info.class_names:
            row[f"IoU {name}"] = pct(run.get(f"metrics.iou.{name}"))
        row.update(_measurement(measures, run["tags.method"], run["variant"]))
        row["params (M)"] = round(float(run.get("metrics.params_m")), 2)
        row["device"] = run.get("tags.env.device_name", "")
        row["run"] = run["run_id"][:8]
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["method", "variant"], kind="stable").reset_index(drop=True)
    if (table["variant"] == "default").all():
        table = table.drop(columns="variant")
    return table


MEASURED = {"FPS": "fps", "latency p50 (ms)": "latency_ms_median", "latency p90 (ms)": "latency_ms_p90",
            "NVML peak (MB)": "nvml_process_peak_mib", "torch peak alloc (MB)": "torch_max_allocated_mib",
            "CPU RSS growth (MB)": "rss_peak_growth_mib", "GMACs": "gmacs"}


def _measurement(measures: pd.DataFrame, method: str, variant: str) -> dict:
    """The measured columns; a cell without a measurement says so, nothing is filled in."""
    hit = measures[(measures["tags.method"] == method) & (measures["variant"] == variant)] if not measures.empty \
        else measures
    if hit.empty:
        return {**{name: "not measured" for name in MEASURED}, "precision": "", "input size": ""}
    run = hit.iloc[0]
    out = {}
    for name, key in MEASURED.items():
        value = run.get(f"metrics.{key}")
        out[name] = round(float(value), 2) if value is not None and not pd.isna(value) else run.get(
            f"tags.{key}", "unavailable")
    out["precision"] = run.get("tags.precision", "")
    out["input size"] = run.get("tags.input_size", "")
    return out


def _headline_name(headline: str) -> str:
    return "mIoU" if headline == "miou" else f"IoU {headline.split(':', 1)[1]} (headline)"


def compare_tables(config: Config) -> list[Path]:
    """Write every benchmark dataset's comparison table in md, csv and latex to results/tables/."""
    out_dir = config.results_root / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in config.benchmark_datasets:
        table = comparison_table(dataset, methods=config.benchmark_methods)
        for fmt in ("md", "csv", "latex"):
            path = out_dir / f"compare_{dataset}.{SUFFIX[fmt]}"
            path.write_text(format_table(table, fmt))
            written.append(path)
    return written


def report(config: Config) -> list[Path]:
    """The whole report: comparison tables, the published tables with our numbers beside them, the plots
    and results/README.md listing where each table came from."""
    written = compare_tables(config)
    written.append(write_summary(config))
    written += tables(config)
    written += plots.all_plots(config)
    written.append(write_readme(config, written))
    return written


def write_summary(config: Config) -> Path:
    """results/summary.json, DVC's metric: per benchmark dataset and method, the headline (%) and FPS of the
    default result files, so `dvc exp show` and `dvc metrics diff` list two numbers per method, not hundreds."""
    import json

    summary: dict = {}
    for dataset in config.benchmark_datasets:
        for method in config.benchmark_methods:
            scores, speed = metrics_file(config, dataset, method), measure_file(config, dataset, method)
            entry = {}
            if scores.is_file():
                entry["headline"] = round(100 * json.loads(scores.read_text())["headline_value"], 2)
            if speed.is_file():
                fps = json.loads(speed.read_text()).get("fps")
                if isinstance(fps, (int, float)):
                    entry["fps"] = round(fps, 3)
            if entry:
                summary.setdefault(dataset, {})[method] = entry
    path = config.results_root / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def tables(config: Config) -> list[Path]:
    """Regenerate the published tables into results/tables/paper_*: every table of docs/published/tables.yaml, ours
    beside it (with knob sweeps), and each method's published ablation with `bench.py ablation`'s scores."""
    out_dir = config.results_root / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache: dict[str, dict] = {}

    def ours(dataset: str) -> dict:
        if dataset not in cache:
            cache[dataset] = published.with_sweeps(published.our_results(dataset), dataset, config)
        return cache[dataset]

    written = []
    for table_id, spec in published.tables().items():
        dataset = spec["dataset"]
        notes = [published.ours_note(dataset, ours(dataset)), *published.table_notes(spec)]
        written += write_table(published.published_table(table_id, ours(dataset)), out_dir / table_id,
                               spec["title"], notes)
    for method, table, dataset in ablation_outputs(config):
        scores = ablation_scores(config, method, dataset)
        written += write_table(published.ablation_table(method, dataset, scores, table),
                               out_dir / f"{published.ablation_id(method, table)}_{dataset}",
                               published.ablation_title(method, table),
                               [f"Ours from `python bench.py ablation --dataset {dataset} --method {method}` "
                                f"({scores}).", *published.ablation_notes(method, table, dataset)])
    return written


def ablation_outputs(config: Config) -> list[tuple[str, str, str]]:
    """(method, table, dataset) of every ablation table to write: each method's tables on the dataset its paper
    published them for, and on every dataset `bench.py ablation` has scores for."""
    from datasets import list_datasets
    from methods import list_methods, method_class

    out = []
    for method in list_methods():
        if not method_class(method).ablations:
            continue
        paper_dataset = published.published_ablations().get(method, {}).get("dataset")
        datasets = [d for d in list_datasets() if d == paper_dataset or ablation_scores(config, method, d).is_file()]
        out += [(method, table, d) for table, _ in published.ablation_tables(method) for d in datasets]
    return out


def write_readme(config: Config, written: list[Path]) -> Path:
    """results/README.md: each table and plot with the commit, date, device and protocol it came from,
    and the protocol differences from the papers."""
    root = config.results_root
    specs = published.tables()
    lines = ["# Results", "", "Generated by `python bench.py report` (do not edit). Every number of ours comes from "
             f"the MLflow store `{tracking.tracking_uri()}`; published numbers come from docs/published/tables.yaml "
             "with their provenance in each table.", "", "## Tables", "",
             "| file | what | ours from (run, commit, date, device, scale, precision) |", "| --- | --- | --- |"]
    seen = set()
    for path in written:
        if path.suffix != ".md" or "tables" not in path.parts or path in seen:
            continue
        seen.add(path)
        name = path.stem
        dataset = specs[name]["dataset"] if name in specs else name.rsplit("_", 1)[-1]
        if name in specs:
            what = specs[name]["title"]
            source = published.ours_note(dataset, published.our_results(dataset))
        elif name.startswith("compare_"):
            what, source = "comparison of our methods", published.ours_note(dataset, published.our_results(dataset))
        else:  # an ablation table: <ablation id>_<dataset>
            method, table = next((m, t) for m, t, d in ablation_outputs(config)
                                 if name == f"{published.ablation_id(m, t)}_{d}")
            what = f"{display_name(method)}'s ablation" + (f", {table}" if table else "")
            source = f"{ablation_scores(config, method, dataset).relative_to(root)} (`bench.py ablation`)"
        lines.append(f"| [{path.relative_to(root)}]({path.relative_to(root)}) (+ .csv, .tex) | {what} | "
                     f"{source.replace('|', '/')} |")
    plots = [p for p in written if p.suffix == ".png"]
    if plots:
        lines += ["", "## Plots", ""] + [f"- [{p.relative_to(root)}]({p.relative_to(root)})" for p in plots]
    lines += ["", "## Protocol differences from the papers", ""] + [
        f"- {note}" for note in published.protocol_notes().values()]
    path = root / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
