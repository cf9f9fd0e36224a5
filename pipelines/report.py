"""Comparison tables built from MLflow, so `mlflow ui` and the tables always agree."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from datasets import get_dataset
from methods import display_name
from pipelines import tracking
from pipelines.ablation import VARIANT_PREFIX as ABLATION_VARIANT
from pipelines.ablation import scores_path
from pipelines.config import Config, ConfigError

FORMATS = {"terminal": "simple", "md": "github", "latex": "latex_booktabs", "csv": None}
SUFFIX = {"md": "md", "latex": "tex", "csv": "csv", "terminal": "txt"}


def stage_runs(dataset: str, stage: str) -> pd.DataFrame:
    """Every finished run of one stage on a dataset, newest first."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    experiment = mlflow.get_experiment_by_name(tracking.experiment_name(dataset))
    if experiment is None:
        return pd.DataFrame()
    runs = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], output_format="pandas")
    if not runs.empty:
        variant = runs["tags.variant"] if "tags.variant" in runs else pd.Series(index=runs.index, dtype=object)
        runs["variant"] = variant.fillna("default")
    return runs


def evaluation_runs(dataset: str) -> pd.DataFrame:
    return stage_runs(dataset, "evaluate")


def comparison_table(dataset: str, run_ids: list[str] | None = None, all_runs: bool = False,
                     methods: list[str] | None = None) -> pd.DataFrame:
    """One row per method and variant (e.g. RUE's K): its latest finished evaluation unless
    `run_ids`/`all_runs` say otherwise, joined with its latest measurement of the same variant. `methods`
    (registry names) keeps only those methods' rows."""
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
    if methods is not None:
        runs = runs[runs["tags.method"].isin(methods)]
        if runs.empty:
            raise ConfigError(f"no finished evaluation of {', '.join(methods)} on '{dataset}'; run `dvc repro`")
    if not run_ids and not all_runs:
        runs = runs.drop_duplicates(subset=["tags.method", "variant"], keep="first")
    measures = stage_runs(dataset, "measure")
    if not measures.empty:
        measures = measures.drop_duplicates(subset=["tags.method", "variant"], keep="first")
    rows = []
    for _, run in runs.iterrows():
        k = run_k(run)
        row = {"method": display_name(run["tags.method"]), "K": "" if k is None else k, "variant": run["variant"]}
        row[_headline_name(info.headline)] = _pct(run.get("metrics.headline"))
        if info.headline != "miou":
            row["mIoU"] = _pct(run.get("metrics.miou"))
        for name in info.class_names:
            row[f"IoU {name}"] = _pct(run.get(f"metrics.iou.{name}"))
        row.update(_measurement(measures, run["tags.method"], run["variant"]))
        row["params (M)"] = round(float(run.get("metrics.params_m")), 2)
        row["device"] = run.get("tags.env.device_name", "")
        row["run"] = run["run_id"][:8]
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["method", "variant"], kind="stable").reset_index(drop=True)
    if (table["variant"] == "default").all():
        table = table.drop(columns="variant")
    if (table["K"] == "").all():  # K only for methods with a runtime share of refined patches (RUE)
        table = table.drop(columns="K")
    return table


def run_k(run) -> float | None:
    """RUE's K of an evaluation/measure run: the `k<value>` variant tag of a sweep point, else the model
    config's `model.k` param (the default run); None for methods without K."""
    match = re.fullmatch(r"k([0-9.]+)", str(run.get("variant", run.get("tags.variant", "")) or ""))
    if match:
        return float(match.group(1))
    value = run.get("params.model.k")
    try:
        return None if value is None or pd.isna(value) else float(value)
    except (TypeError, ValueError):
        return None


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


def format_table(table: pd.DataFrame, fmt: str, numparse: bool = True) -> str:
    """`numparse=False` prints string cells exactly as given (the published tables' "+0.70", "73.30")."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.to_csv(index=False)
    return tabulate(table.values.tolist(), headers=list(table.columns), tablefmt=FORMATS[fmt],
                    floatfmt=".2f", missingval="n/a", disable_numparse=not numparse) + "\n"


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
    from pipelines import plots

    written = compare_tables(config)
    written += tables(config)
    written += plots.all_plots(config)
    written.append(write_readme(config, written))
    return written


# ---------------------------------------------------------------------------------------------------------
# The published tables in their published layout, ours beside them (`bench.py tables`).

PUBLISHED_ONLY = "published only"
TABLE_FORMATS = ("md", "csv", "latex")


def _measured_cell(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not pd.isna(value)


def our_results(dataset: str) -> dict:
    """Our latest numbers per (method, K) on a dataset from MLflow: the latest finished evaluation of each
    method and variant joined with the latest measurement of the same variant. K is None for methods without it.

    Returns {"runs": bool (any evaluation of the dataset), "rows": {(method, K): {...}}}."""
    evals = stage_runs(dataset, "evaluate")
    if evals.empty:
        return {"runs": False, "rows": {}}
    # ablation rows (`bench.py ablation`) are other configurations of a method, not its benchmark number
    evals = evals[~evals["variant"].str.startswith(ABLATION_VARIANT)]
    evals = evals.drop_duplicates(subset=["tags.method", "variant"], keep="first")
    measures = stage_runs(dataset, "measure")
    if not measures.empty:
        measures = measures.drop_duplicates(subset=["tags.method", "variant"], keep="first")
    rows: dict = {}
    for _, run in evals.iterrows():
        method, k = run["tags.method"], run_k(run)
        key = (method, k)
        if key in rows:  # the default run and a `k1` sweep point: keep the newer (runs are newest first)
            continue
        hit = measures[(measures["tags.method"] == method) & (measures["variant"] == run["variant"])] \
            if not measures.empty else measures
        meas = hit.iloc[0] if not hit.empty else None
        row = {"headline": _pct(run.get("metrics.headline")), "run": run["run_id"][:8],
               "commit": run.get("tags.git_commit", "") or "unknown", "profile": run.get("tags.profile", ""),
               "date": pd.Timestamp(run["start_time"]).strftime("%Y-%m-%d %H:%M UTC") if "start_time" in run else "",
               "device": run.get("tags.env.device_name", "") or ""}
        if meas is None:
            row.update(fps="not measured (no measure run)", memory="not measured (no measure run)",
                       nvml="not measured (no measure run)", scale="", precision="", measure_device="")
        else:
            for name, key_ in (("fps", "fps"), ("memory", "torch_max_allocated_mib"),
                               ("nvml", "nvml_process_peak_mib")):
                value = meas.get(f"metrics.{key_}")
                row[name] = float(value) if _measured_cell(value) else str(meas.get(f"tags.{key_}") or "unavailable")
            row.update(scale=meas.get("tags.scale", "") or "", precision=meas.get("tags.precision", "") or "",
                       measure_device=meas.get("tags.env.device_name", "") or "",
                       input_size=meas.get("tags.input_size", "") or "")
        rows[key] = row
    return {"runs": True, "rows": rows}


def _missing(dataset: str, ours: dict, method: str) -> str:
    return f"not measured (no {dataset} run)" if not ours["runs"] else f"not measured (no {method} run)"


def _pub(value: float | None, text: str | None, digits: int) -> str:
    if text:
        return text
    return "—" if value is None else f"{value:.{digits}f}"


def _mine(value, digits: int) -> str:
    return f"{value:.{digits}f}" if _measured_cell(value) else str(value)


def _diff(ours, published: float | None, digits: int) -> str:
    if not _measured_cell(ours):
        return ""
    if published is None:
        return "no published value"
    return f"{ours - published:+.{digits}f}"


def _triple(name: str, published, published_text, ours, digits: int) -> dict:
    return {f"{name} (published)": _pub(published, published_text, digits), f"{name} (ours)": _mine(ours, digits),
            f"{name} Δ (ours − published)": _diff(ours, published, digits)}


def _anchor_row(anchor, dataset: str, ours: dict, with_memory: bool = True) -> dict:
    row = {"method": anchor.method}
    if anchor.ours is None:
        mine = {"headline": PUBLISHED_ONLY, "fps": PUBLISHED_ONLY, "memory": PUBLISHED_ONLY}
    else:
        found = ours["rows"].get((anchor.ours, anchor.k))
        if found is None:
            miss = _missing(dataset, ours, anchor.ours if anchor.k is None else f"{anchor.ours} K={anchor.k:g}")
            mine = {"headline": miss, "fps": miss, "memory": miss}
        else:
            mine = found
    row.update(_triple(_headline_label(dataset), anchor.miou, anchor.miou_text, mine["headline"], 2))
    row.update(_triple("FPS", anchor.fps, anchor.fps_text, mine["fps"], 2))
    if with_memory:
        row.update(_triple("memory (MB)", anchor.memory_mb, None, mine["memory"], 0))
    row["ours"] = "" if anchor.ours is None else (anchor.ours if anchor.k is None else f"{anchor.ours} K={anchor.k:g}")
    row["provenance"] = anchor.provenance + (f"; {anchor.note}" if anchor.note else "")
    return row


def _headline_label(dataset: str) -> str:
    try:
        headline = get_dataset(dataset).info.headline
    except Exception:  # noqa: BLE001 - a dataset module not registered: the literature's name
        headline = "miou"
    return "mIoU" if headline == "miou" else f"IoU {headline.split(':', 1)[1]}"


def isdnet_table(dataset: str, ours: dict | None = None) -> pd.DataFrame:
    """ISDNet's comparison table (mIoU, FPS, memory) of a dataset, ours beside the published numbers."""
    from pipelines.anchors import ISDNET_TABLES

    ours = our_results(dataset) if ours is None else ours
    return pd.DataFrame([_anchor_row(a, dataset, ours) for a in ISDNET_TABLES[dataset]])


def rue_table(dataset: str, ours: dict | None = None, sweep_csv: Path | None = None) -> pd.DataFrame:
    """RUE's accuracy-vs-FPS comparison of a dataset (its figure's points, K = 100/75/50%), ours beside them;
    our K values the figure does not have (e.g. a K = 25% sweep point) are appended as rows of their own."""
    from pipelines.anchors import RUE_FIGURE

    ours = our_results(dataset) if ours is None else ours
    ours = _with_sweep_csv(ours, sweep_csv)
    rows = [_anchor_row(a, dataset, ours, with_memory=False) for a in RUE_FIGURE[dataset]]
    published_k = {a.k for a in RUE_FIGURE[dataset] if a.ours == "rue"}
    for (method, k), mine in sorted(ours["rows"].items(), key=lambda item: (item[0][0], -(item[0][1] or 0))):
        if method == "rue" and k is not None and k not in published_k:
            row = {"method": f"RUE (K = {100 * k:g}%)"}
            row.update(_triple(_headline_label(dataset), None, "not published", mine["headline"], 2))
            row.update(_triple("FPS", None, "not published", mine["fps"], 2))
            row.update(ours=f"rue K={k:g}", provenance="ours only (K sweep)")
            rows.append(row)
    return pd.DataFrame(rows)


def _with_sweep_csv(ours: dict, path: Path | None) -> dict:
    """Sweep points from results/sweeps/<dataset>/rue_k.csv where MLflow has none for that K."""
    if path is None or not Path(path).is_file():
        return ours
    table = pd.read_csv(path)
    rows = dict(ours["rows"])
    for _, point in table.iterrows():
        key = ("rue", float(point["K"]))
        if key not in rows:
            rows[key] = {"headline": float(point["headline"]), "fps": float(point["FPS"]), "memory": "not measured",
                         "nvml": "not measured", "run": "sweep csv", "commit": "", "profile": "", "date": "",
                         "device": str(point.get("device", "")), "scale": "", "precision": "", "measure_device": ""}
    return {"runs": ours["runs"] or bool(len(table)), "rows": rows}


def uhrsnet_ablation_table(dataset: str, scores_csv: Path) -> pd.DataFrame:
    """UHRSNet's ablation (Table III layout): published mIoU beside ours (mean over seeds) from `bench.py
    ablation`'s results/ablations/uhrsnet_<dataset>.csv when it exists, else "not measured"."""
    from methods.uhrsnet import ABLATION_ROWS
    from pipelines.anchors import UHRSNET_ABLATION, UHRSNET_ABLATION_PROVENANCE

    published = UHRSNET_ABLATION.get(dataset, {})
    stats = pd.DataFrame(columns=["mean", "std", "count"])
    if scores_csv.is_file():
        scores = pd.read_csv(scores_csv)
        if len(scores):  # one line per (row, seed): mean and sample std over the seeds
            stats = (100.0 * scores["miou"]).groupby(scores["row"]).agg(["mean", "std", "count"])
            if "miou_local_output" in scores:
                stats["local_output"] = (100.0 * scores["miou_local_output"]).groupby(scores["row"]).mean()
    rows = []
    for key, label, kwargs in ABLATION_ROWS:
        pub = published.get(key)
        if not scores_csv.is_file():
            mine = f"not measured (no {scores_csv.name})"
        else:
            mine = stats.loc[key, "mean"] if key in stats.index else "not measured (row not trained)"
        seeds = int(stats.loc[key, "count"]) if key in stats.index else 0
        rows.append({
            "configuration": label,
            "local branch": "x" if kwargs["branches"] in ("both", "local") else "",
            "LFF": "x" if kwargs["local_fusion"] else "",
            "global branch": "x" if kwargs["branches"] in ("both", "global") else "",
            "mIoU (published)": f'{pub[0]:.1f} ("global"), {pub[1]:.1f} ("local")' if pub else "—",
            "mIoU (ours)": _mine(mine, 2),
            "std over seeds (ours)": f"{stats.loc[key, 'std']:.2f}" if seeds > 1 else "",
            "mIoU of the local output (ours)": _local_output(stats, key),
            "seeds": seeds or "",
            "mIoU Δ (ours − published \"global\")": _diff(mine, pub[0] if pub else None, 2),
            "provenance": UHRSNET_ABLATION_PROVENANCE if pub else "not published per row",
        })
    return pd.DataFrame(rows)


def _local_output(stats: pd.DataFrame, key: str) -> str:
    """Mean over seeds of a two-branch row's local-branch mIoU (the paper's "local" number), else ''."""
    if key not in stats.index or "local_output" not in stats or pd.isna(stats.loc[key, "local_output"]):
        return ""
    return f"{stats.loc[key, 'local_output']:.2f}"


def _write(table: pd.DataFrame, stem: Path, title: str, notes: list[str]) -> list[Path]:
    paths = []
    for fmt in TABLE_FORMATS:
        path = stem.with_name(f"{stem.name}.{SUFFIX[fmt]}")
        text = format_table(table, fmt, numparse=False)
        if fmt == "md":
            text = f"# {title}\n\n{text}\n" + "".join(f"- {n}\n" for n in notes)
        path.write_text(text)
        paths.append(path)
    return paths


def ours_note(dataset: str, ours: dict) -> str:
    if not ours["runs"]:
        return f"Ours: no finished evaluation in MLflow experiment `{tracking.experiment_name(dataset)}`."
    parts = [f"{m}{'' if k is None else f' K={k:g}'}: run {r['run']}, commit {r['commit']}, {r['date']}, "
             f"{r['measure_device'] or r['device']}, "
             + (f"scale {r['scale']}, {r['precision']}" if r["scale"] else "no measure run")
             for (m, k), r in sorted(ours["rows"].items(), key=lambda i: (i[0][0], -(i[0][1] or 0)))]
    return "Ours (MLflow `" + tracking.experiment_name(dataset) + "`): " + "; ".join(parts) + "."


def tables(config: Config) -> list[Path]:
    """Regenerate the published tables into results/tables/paper_*: ISDNet's DeepGlobe / Inria / Cityscapes
    tables, RUE's accuracy-vs-FPS comparison per dataset (with the K sweep) and UHRSNet's DeepGlobe ablation."""
    from pipelines.anchors import ISDNET_TABLES, PROTOCOL_FLAGS, RUE_FIGURE, UHRSNET_ABLATION

    out_dir = config.results_root / "tables"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache: dict[str, dict] = {}
    ours = lambda d: cache.setdefault(d, our_results(d))  # noqa: E731
    flags = list(PROTOCOL_FLAGS[:3])
    written = []
    for dataset in ISDNET_TABLES:
        written += _write(isdnet_table(dataset, ours(dataset)), out_dir / f"paper_isdnet_{dataset}",
                          f"ISDNet (CVPR'22) {dataset} comparison: published vs ours",
                          [ours_note(dataset, ours(dataset)), "Memory (ours) = torch peak allocated, MiB.", *flags])
    for dataset in RUE_FIGURE:
        sweep_csv = config.results_root / "sweeps" / dataset / "rue_k.csv"
        written += _write(rue_table(dataset, ours(dataset), sweep_csv), out_dir / f"paper_rue_{dataset}",
                          f"RUE (CVPR'25) {dataset} accuracy vs FPS (figure readings): published vs ours",
                          [ours_note(dataset, ours(dataset)), PROTOCOL_FLAGS[3], *flags])
    for dataset in UHRSNET_ABLATION:
        scores = scores_path(config, "uhrsnet", dataset)
        written += _write(uhrsnet_ablation_table(dataset, scores), out_dir / f"paper_uhrsnet_ablation_{dataset}",
                          f"UHRSNet (ICPR'20) {dataset} ablation (Table III layout): published vs ours "
                          "(UHRSNet-style, reconstructed)",
                          [f"Ours from `python bench.py ablation --dataset {dataset}` "
                           f"({scores}).",
                           PROTOCOL_FLAGS[4]])
    return written


def write_readme(config: Config, written: list[Path]) -> Path:
    """results/README.md: each table and plot with the commit, date, device and protocol it came from,
    and the protocol differences from the papers."""
    from pipelines.anchors import PROTOCOL_FLAGS

    root = config.results_root
    lines = ["# Results", "", "Generated by `python bench.py report` (do not edit). Every number of ours comes from "
             f"the MLflow store `{tracking.tracking_uri()}`; published numbers come from pipelines/anchors.py "
             "(specs/anchors.md) with their provenance in each table.", "", "## Tables", "",
             "| file | what | ours from (run, commit, date, device, scale, precision) |", "| --- | --- | --- |"]
    seen = set()
    for path in written:
        if path.suffix != ".md" or "tables" not in path.parts or path in seen:
            continue
        seen.add(path)
        name = path.stem
        dataset = name.rsplit("_", 1)[-1]
        what = {"compare": "comparison of our methods", "paper_isdnet": "ISDNet's comparison table, ours beside it",
                "paper_rue": "RUE's accuracy-vs-FPS comparison (with the K sweep)",
                "paper_uhrsnet_ablation": "UHRSNet's ablation"}.get(name.rsplit("_", 1)[0], name)
        source = ours_note(dataset, our_results(dataset)) if not name.startswith("paper_uhrsnet") else \
            "results/ablations/uhrsnet_" + dataset + ".csv (`bench.py ablation`)"
        lines.append(f"| [{path.relative_to(root)}]({path.relative_to(root)}) (+ .csv, .tex) | {what} | "
                     f"{source.replace('|', '/')} |")
    plots = [p for p in written if p.suffix == ".png"]
    if plots:
        lines += ["", "## Plots", ""] + [f"- [{p.relative_to(root)}]({p.relative_to(root)})" for p in plots]
    lines += ["", "## Protocol differences from the papers", ""] + [f"- {flag}" for flag in PROTOCOL_FLAGS]
    path = root / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pct(value) -> float | None:
    return None if value is None or pd.isna(value) else round(100.0 * float(value), 2)
