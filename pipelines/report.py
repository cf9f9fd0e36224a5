"""Comparison tables built from MLflow, so `mlflow ui` and the tables always agree, and the whole report: the
comparison, the papers' tables with ours beside them (pipelines/published.py), plots and results/README.md."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from datasets import get_dataset
from methods import display_name
from pipelines import plots, published, tracking
from pipelines.config import Config, ConfigError
from pipelines.metrics import headline_class, paired_difference
from pipelines.paths import ablation_scores, measure_file, metrics_file
from pipelines.tables import SUFFIX, format_table, interval_cell, write_table


def comparison_table(dataset: str, run_ids: list[str] | None = None, all_runs: bool = False,
                     methods: list[str] | None = None, per_class: bool = False) -> pd.DataFrame:
    """One row per method and variant (e.g. RUE's K): its latest finished evaluation unless
    `run_ids`/`all_runs` say otherwise, joined with its latest measurement of the same variant. `methods`
    (registry names) keeps only those methods' rows. Each declared runtime knob gets a column. Compact: accuracy,
    then speed, memory and cost; `per_class` adds every class's IoU and the other measured columns at the end."""
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
    # one row per method and variant: the latest run of each seed, averaged (one run per row when runs are chosen)
    groups = [runs.loc[[index]] for index in runs.index] if run_ids or all_runs else published.seed_groups(runs)
    several_seeds = any(len(group) > 1 for group in groups)
    measures = tracking.finished_runs(dataset, "measure")
    knob_titles = {}
    for method in runs["tags.method"].unique():
        knob_titles.update({k.name: k.title for k in published.knobs_of(method)})
    rows = []
    for group in groups:
        run = group.iloc[0]
        settings = dict(published.run_settings(run, run["tags.method"]))
        row = {"method": display_name(run["tags.method"]),
               **{title: settings.get(name, "") for name, title in knob_titles.items()}, "variant": run["variant"]}
        mean, std = published.seed_mean(group, "headline")
        row[_headline_name(info.headline)] = mean
        if several_seeds:
            row["std (seeds)"] = "" if std is None else std
            row["seeds"] = len(group)
        row["95% CI"] = interval_cell(*published.seed_interval(group, dataset))
        if info.headline != "miou":
            row["mIoU"] = published.seed_mean(group, "miou")[0]
        measured = _measurement(measures, run)
        row.update({name: measured[name] for name in COMPACT})
        row["params (M)"] = round(float(run.get("metrics.params_m")), 2)
        row["device"] = run.get("tags.env.device_name", "")
        row["run"] = run["run_id"][:8]
        if per_class:
            row.update({f"IoU {name}": published.seed_mean(group, f"iou.{name}")[0] for name in info.class_names})
            row.update({name: value for name, value in measured.items() if name not in COMPACT})
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["method", "variant"], kind="stable").reset_index(drop=True)
    if (table["variant"] == "default").all():
        table = table.drop(columns="variant")
    return table


# measured columns: name -> MLflow metric of the measure run ("peak memory" is filled by _peak_memory)
MEASURED = {"FPS": "fps", "latency p50 (ms)": "latency_ms_median", "latency p90 (ms)": "latency_ms_p90",
            "NVML peak (MiB)": "nvml_process_peak_mib", "torch peak alloc (MiB)": "torch_max_allocated_mib",
            "CPU RSS growth (MiB)": "rss_peak_growth_mib", "GMACs": "gmacs"}
COMPACT = ("FPS", "latency p50 (ms)", "peak memory (MiB)", "GMACs")
INTERVAL_NOTE = ("95% CI: bootstrap interval of the headline over the test images (1000 resamples of the per-image "
                 "confusion matrices, scored at dataset level; with several seeds, of their mean; n/a: evaluated "
                 "before per-image matrices were saved, evaluate again); significance_<dataset>.md compares methods "
                 "pairwise.")
SIGNIFICANCE_NOTE = ("Paired bootstrap over the test images (1000 resamples, the same images for A and B, each "
                     "resample scored at dataset level from summed confusion matrices): a difference is significant "
                     "when its 95% interval excludes 0. It says whether the test set separates the two trained models; "
                     "seed-to-seed variation of training is not in it.")
PEAK_MEMORY_NOTE = ("peak memory: the NVML per-process peak on a GPU (CUDA context included), the process RSS growth "
                    "on a CPU; latency p50 = median of the timed batch-1 calls, FPS = 1 / p50.")


def _measurement(measures: pd.DataFrame, evaluation) -> dict:
    """The measured columns of an evaluation's model (its latest measurement of the same variant and profile); a
    cell without a measurement says so, nothing is filled in."""
    run = published.matching_measure(measures, evaluation["tags.method"], evaluation["variant"],
                                     published.tag(evaluation, "profile"))
    if run is None:
        return {**{name: "not measured" for name in (*MEASURED, *COMPACT)}, "precision": "", "input size": ""}
    out = {}
    for name, key in MEASURED.items():
        value = run.get(f"metrics.{key}")
        out[name] = round(float(value), 2) if value is not None and not pd.isna(value) else run.get(
            f"tags.{key}", "unavailable")
    out["peak memory (MiB)"] = _peak_memory(out)
    out["precision"] = run.get("tags.precision", "")
    out["input size"] = run.get("tags.input_size", "")
    return out


def _peak_memory(measured: dict):
    for name in ("NVML peak (MiB)", "CPU RSS growth (MiB)"):
        if isinstance(measured[name], float):
            return measured[name]
    return measured["NVML peak (MiB)"]


def significance_table(dataset: str, methods: list[str] | None = None) -> pd.DataFrame:
    """Every pair of methods (each one's latest default evaluation per seed) scored on the same test images: the
    headline difference (of the means over seeds), its 95% paired-bootstrap interval (the same image resamples for
    both), and whether the interval excludes zero. Pairs without per-image matrices, or on other images, say so."""
    info = get_dataset(dataset).info
    runs = tracking.finished_runs(dataset, "evaluate")
    if runs.empty:
        return pd.DataFrame()
    runs = runs[runs["variant"] == "default"]
    if methods is not None:
        runs = runs[runs["tags.method"].isin(methods)]
    seeds = {group.iloc[0]["tags.method"]: published.per_image_matrices(list(group["run_id"]))
             for group in published.seed_groups(runs)}
    rows = []
    names = sorted(seeds, key=display_name)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            row = {"A": display_name(a), "B": display_name(b), "seeds (A, B)": ""}
            images = {ids for side in (a, b) for ids, _ in (seeds[side] or [])}
            if seeds[a] is None or seeds[b] is None:
                row.update({"Δ (A − B)": "", "95% CI of Δ": "no per-image matrices: evaluate again",
                            "significant": ""})
            elif len(images) != 1:
                row.update({"Δ (A − B)": "", "95% CI of Δ": "evaluated on different images", "significant": ""})
            else:
                diff = paired_difference([m for _, m in seeds[a]], [m for _, m in seeds[b]], info.counted_classes,
                                         headline_class(info))
                row.update({"seeds (A, B)": f"{len(seeds[a])}, {len(seeds[b])}",
                            "Δ (A − B)": f"{100 * diff['difference']:+.2f}",
                            "95% CI of Δ": f"{100 * diff['low']:+.2f} to {100 * diff['high']:+.2f}",
                            "significant": "yes" if diff["significant"] else "no"})
            rows.append(row)
    return pd.DataFrame(rows)


def _headline_name(headline: str) -> str:
    return "mIoU" if headline == "miou" else f"IoU {headline.split(':', 1)[1]} (headline)"


def compare_tables(config: Config) -> list[Path]:
    """Write every benchmark dataset's comparison table in md, csv and latex to results/tables/."""
    out_dir = config.results_root / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in config.benchmark_datasets:
        compact = comparison_table(dataset, methods=config.benchmark_methods)
        full = comparison_table(dataset, methods=config.benchmark_methods, per_class=True)
        for fmt, table in (("md", compact), ("latex", compact), ("csv", full)):  # csv: every column
            path = out_dir / f"compare_{dataset}.{SUFFIX[fmt]}"
            text = format_table(table, fmt)
            notes = f"\n- {INTERVAL_NOTE}\n- {PEAK_MEMORY_NOTE}\n- Per-class IoU: compare_{dataset}.csv.\n"
            path.write_text(text + (notes if fmt == "md" else ""))
            written.append(path)
        significance = significance_table(dataset, config.benchmark_methods)
        if not significance.empty:
            written += write_table(significance, out_dir / f"significance_{dataset}",
                                   f"{dataset}: which differences are real ({published.headline_label(dataset)})",
                                   [SIGNIFICANCE_NOTE])
    return written


def report(config: Config) -> list[Path]:
    """The whole report: comparison tables, the published tables with our numbers beside them, the plots
    and results/README.md listing where each table came from."""
    written = compare_tables(config)
    written.append(write_summary(config))
    skipped: list[str] = []
    written += tables(config, skipped=skipped)
    written += plots.all_plots(config)
    written.append(write_readme(config, written, skipped))
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


def tables(config: Config, all_datasets: bool = False, skipped: list[str] | None = None) -> list[Path]:
    """Regenerate the published tables into results/tables/: every table of docs/published/tables.yaml, ours beside
    it (with knob sweeps), and each method's ablation tables with `bench.py ablation`'s scores. Only for datasets
    with runs of ours (ablations: with scores) unless `all_datasets`; `skipped` collects one line per table left
    out."""
    out_dir = config.results_root / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache: dict[str, dict] = {}
    skipped = [] if skipped is None else skipped

    def ours(dataset: str) -> dict:
        if dataset not in cache:
            cache[dataset] = published.with_sweeps(published.our_results(dataset), dataset, config)
        return cache[dataset]

    by_source: dict[str, dict] = {}

    def sources(dataset: str) -> dict:
        if dataset not in by_source:
            by_source[dataset] = {source: published.our_results(dataset, source) for source in published.SOURCES}
        return by_source[dataset]

    written = []
    for table_id, spec in published.tables().items():
        dataset = spec["dataset"]
        if not (all_datasets or ours(dataset)["runs"]):
            skipped.append(f"{table_id}: not written, no {dataset} run of ours (`bench.py tables --all` writes it "
                           "with the published numbers only)")
            continue
        notes = [published.ours_note(dataset, ours(dataset)), *published.table_notes(spec)]
        written += write_table(published.published_table(table_id, ours(dataset)), out_dir / table_id,
                               spec["title"], notes)
        # the same rows by source: published, official weights, paper recipe, smoke (four rows per anchor)
        written += write_table(published.sources_table(table_id, sources(dataset)),
                               out_dir / f"{table_id}{published.SOURCES_SUFFIX}", published.sources_title(spec),
                               [published.SOURCES_NOTE, *published.table_notes(spec)])
    for method, table, dataset in ablation_outputs(config):
        scores = ablation_scores(config, method, dataset)
        name = f"{published.ablation_id(method, table)}_{dataset}"
        if not (all_datasets or scores.is_file()):
            skipped.append(f"{name}: not written, no `bench.py ablation --dataset {dataset} --method {method}` "
                           "scores (`bench.py tables --all` writes it with the published numbers only)")
            continue
        written += write_table(published.ablation_table(method, dataset, scores, table), out_dir / name,
                               published.ablation_title(method, table),
                               [f"Ours from `python bench.py ablation --dataset {dataset} --method {method}` "
                                f"({_relative(config, scores)}).", *published.ablation_notes(method, table, dataset)])
    return written


def display_uri(uri: str) -> str:
    """A tracking URI as written into results: a store inside the repository without the clone's absolute path."""
    from pipelines.config import REPO_ROOT

    prefix = f"sqlite:///{REPO_ROOT}/"
    return "sqlite:///" + uri[len(prefix):] + " (repository root)" if uri.startswith(prefix) else uri


def _relative(config: Config, path: Path) -> str:
    """A results path as users see it: relative to the results root's parent (no clone path in notes)."""
    try:
        return str(path.relative_to(config.results_root.parent))
    except ValueError:
        return str(path)


def summary_text(config: Config) -> str:
    """What the report stage prints at the end of `dvc repro`: each benchmark dataset's compact comparison."""
    parts = []
    for dataset in config.benchmark_datasets:
        table = comparison_table(dataset, methods=config.benchmark_methods)
        parts.append(f"{dataset} ({published.headline_label(dataset)} on the `{config.section('evaluate')['split']}` "
                     f"split, profile `{config.profile}`):\n{format_table(table, 'terminal')}")
    return "\n".join(parts) + f"{PEAK_MEMORY_NOTE}\nPer-class IoU: `bench.py compare --dataset D --per-class`."


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


def write_readme(config: Config, written: list[Path], skipped: list[str] = ()) -> Path:
    """results/README.md: each table and plot with the commit, date, device and protocol it came from,
    and the protocol differences from the papers."""
    root = config.results_root
    specs = published.tables()
    lines = ["# Results", "", "Generated by `python bench.py report` (do not edit). Every number of ours comes from "
             f"the MLflow store `{display_uri(tracking.tracking_uri())}`; published numbers come from "
             "docs/published/tables.yaml with their provenance in each table.", "", "## Tables", "",
             "| file | what | ours from (run, commit, date, device, scale, precision) |", "| --- | --- | --- |"]
    seen = set()
    for path in written:
        if path.suffix != ".md" or "tables" not in path.parts or path in seen:
            continue
        seen.add(path)
        name = path.stem
        spec_id = name.removesuffix(published.SOURCES_SUFFIX)
        dataset = specs[spec_id]["dataset"] if spec_id in specs else name.rsplit("_", 1)[-1]
        if name in specs:
            what = specs[name]["title"]
            source = published.ours_note(dataset, published.our_results(dataset))
        elif spec_id in specs:
            what = published.sources_title(specs[spec_id])
            source = "provenance in each row"
        elif name.startswith("compare_"):
            what, source = "comparison of our methods", published.ours_note(dataset, published.our_results(dataset))
        elif name.startswith("significance_"):
            what = "which differences between our methods are real (paired bootstrap over test images)"
            source = published.ours_note(dataset, published.our_results(dataset))
        else:  # an ablation table: <ablation id>_<dataset>
            method, table = next((m, t) for m, t, d in ablation_outputs(config)
                                 if name == f"{published.ablation_id(m, t)}_{d}")
            what = f"{display_name(method)}'s ablation" + (f", {table}" if table else "")
            source = f"{ablation_scores(config, method, dataset).relative_to(root)} (`bench.py ablation`)"
        lines.append(f"| [{path.relative_to(root)}]({path.relative_to(root)}) (+ .csv, .tex) | {what} | "
                     f"{source.replace('|', '/')} |")
    if skipped:
        lines += ["", "Not written:", ""] + [f"- {line}" for line in skipped]
    plots = [p for p in written if p.suffix == ".png"]
    if plots:
        lines += ["", "## Plots", ""] + [f"- [{p.relative_to(root)}]({p.relative_to(root)})" for p in plots]
    lines += ["", "## Protocol differences from the papers", ""] + [
        f"- {note}" for note in published.protocol_notes().values()]
    path = root / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
