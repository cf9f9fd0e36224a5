"""Published numbers (docs/published/tables.yaml) beside ours from MLflow: the papers' tables in their layout.

Which published rows a method of ours fills, with which runtime knob settings, the method declares (`published`);
its ablation rows likewise (`ablations`). Nothing here names a method.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

import pandas as pd
import yaml

from methods import display_name, list_methods, method_class
from methods.base import MethodError
from pipelines import tracking
from pipelines.config import REPO_ROOT
from pipelines.tables import measured, pct, published_cell, triple

DATA = REPO_ROOT / "docs" / "published" / "tables.yaml"
PUBLISHED_ONLY = "published only"
ABLATION_VARIANT = "ablation-"  # variant tag prefix of `bench.py ablation` runs: not a method's benchmark number

Settings = tuple[tuple[str, float], ...]  # a run's runtime knob values, e.g. (("k", 0.5),)


@cache
def data() -> dict:
    return yaml.safe_load(DATA.read_text())


def protocol_notes() -> dict[str, str]:
    return dict(data()["protocol_notes"])


def tables() -> dict[str, dict]:
    return dict(data()["tables"])


def published_ablations() -> dict[str, dict[str, dict]]:
    """{method: {dataset: {title, provenance, notes, rows: {row key: {miou, miou_text}}}}}."""
    return dict(data().get("ablations") or {})


def note_texts(keys: list[str]) -> list[str]:
    notes = protocol_notes()
    return [notes.get(key, key) for key in keys]


def knobs_of(method: str):
    try:
        return method_class(method).knobs
    except MethodError:  # a method no longer registered: its runs have no knobs
        return ()


def run_settings(run, method: str) -> Settings:
    """A run's knob values: from its variant tag (`k0.5`, a sweep point) or else its logged model config."""
    variant = str(run.get("variant", run.get("tags.variant", "")) or "")
    values = []
    for knob in knobs_of(method):
        value = None
        for part in variant.split("_"):
            if part.startswith(knob.name):
                try:
                    value = float(part[len(knob.name):])
                except ValueError:
                    continue
        if value is None:
            logged = run.get(f"params.model.{knob.name}")
            try:
                value = None if logged is None or pd.isna(logged) else float(logged)
            except (TypeError, ValueError):
                value = None
        if value is not None:
            values.append((knob.name, value))
    return tuple(values)


def settings_label(method: str, settings: Settings, name: str | None = None) -> str:
    """'rue K=0.5': the method (or `name`) and its knob values as tables name them."""
    titles = {k.name: k.title for k in knobs_of(method)}
    return " ".join([name or method, *(f"{titles.get(key, key)}={value:g}" for key, value in settings)])


def row_order(item) -> tuple:
    (method, settings), _ = item
    return method, tuple(-value for _, value in settings)


@cache
def _owners() -> dict[str, tuple[str, Settings]]:
    """Published row name -> (our method, knob settings) as the methods declare."""
    owners = {}
    for name in list_methods():
        for row, settings in method_class(name).published.items():
            owners[row] = (name, tuple(sorted((k, float(v)) for k, v in settings.items())))
    return owners


def our_results(dataset: str) -> dict:
    """Our latest numbers per (method, knob settings) on a dataset from MLflow: the latest finished evaluation of
    each method and variant joined with the latest measurement of the same variant.

    Returns {"runs": bool (any evaluation of the dataset), "rows": {(method, settings): {...}}}."""
    evals = tracking.finished_runs(dataset, "evaluate")
    if evals.empty:
        return {"runs": False, "rows": {}}
    evals = evals[~evals["variant"].str.startswith(ABLATION_VARIANT)]
    evals = evals.drop_duplicates(subset=["tags.method", "variant"], keep="first")
    measures = tracking.finished_runs(dataset, "measure")
    if not measures.empty:
        measures = measures.drop_duplicates(subset=["tags.method", "variant"], keep="first")
    rows: dict = {}
    for _, run in evals.iterrows():
        method = run["tags.method"]
        key = (method, run_settings(run, method))
        if key in rows:  # the default run and a sweep point of the same value: keep the newer (newest first)
            continue
        hit = measures[(measures["tags.method"] == method) & (measures["variant"] == run["variant"])] \
            if not measures.empty else measures
        meas = hit.iloc[0] if not hit.empty else None
        row = {"headline": pct(run.get("metrics.headline")), "run": run["run_id"][:8],
               "commit": run.get("tags.git_commit", "") or "unknown", "profile": run.get("tags.profile", ""),
               "date": pd.Timestamp(run["start_time"]).strftime("%Y-%m-%d %H:%M UTC") if "start_time" in run else "",
               "device": run.get("tags.env.device_name", "") or ""}
        if meas is None:
            row.update(fps="not measured (no measure run)", memory="not measured (no measure run)",
                       nvml="not measured (no measure run)", scale="", precision="", measure_device="")
        else:
            for name, metric in (("fps", "fps"), ("memory", "torch_max_allocated_mib"),
                                 ("nvml", "nvml_process_peak_mib")):
                value = meas.get(f"metrics.{metric}")
                row[name] = float(value) if measured(value) else str(meas.get(f"tags.{metric}") or "unavailable")
            row.update(scale=meas.get("tags.scale", "") or "", precision=meas.get("tags.precision", "") or "",
                       measure_device=meas.get("tags.env.device_name", "") or "",
                       input_size=meas.get("tags.input_size", "") or "")
        rows[key] = row
    return {"runs": True, "rows": rows}


def with_sweeps(ours: dict, dataset: str, config) -> dict:
    """Add the points of `bench.py sweep`'s csv files (results/sweeps/<dataset>/<method>_<knob>.csv) that MLflow
    has no run for."""
    from pipelines.paths import knob_sweep_stem

    rows = dict(ours["rows"])
    found = False
    for method in list_methods():
        for knob in method_class(method).knobs:
            path = knob_sweep_stem(config, dataset, method, knob.name).with_suffix(".csv")
            if not path.is_file():
                continue
            table = pd.read_csv(path)
            found = found or bool(len(table))
            for _, point in table.iterrows():
                key = (method, ((knob.name, float(point[knob.title])),))
                if key not in rows:
                    rows[key] = {"headline": float(point["headline"]), "fps": float(point["FPS"]),
                                 "memory": "not measured", "nvml": "not measured", "run": "sweep csv", "commit": "",
                                 "profile": "", "date": "", "device": str(point.get("device", "")), "scale": "",
                                 "precision": "", "measure_device": ""}
    return {"runs": ours["runs"] or found, "rows": rows}


def headline_label(dataset: str) -> str:
    from datasets import get_dataset

    try:
        headline = get_dataset(dataset).info.headline
    except Exception:  # noqa: BLE001 - a dataset module not registered: the literature's name
        headline = "miou"
    return "mIoU" if headline == "miou" else f"IoU {headline.split(':', 1)[1]}"


def _missing(dataset: str, ours: dict, label: str) -> str:
    return f"not measured (no {dataset} run)" if not ours["runs"] else f"not measured (no {label} run)"


def _published_row(row: dict, dataset: str, ours: dict, columns: list[str]) -> dict:
    out = {"method": row["method"]}
    owner = _owners().get(row["method"])
    if owner is None:
        mine = {"headline": PUBLISHED_ONLY, "fps": PUBLISHED_ONLY, "memory": PUBLISHED_ONLY}
    else:
        mine = ours["rows"].get(owner)
        if mine is None:
            miss = _missing(dataset, ours, settings_label(*owner))
            mine = {"headline": miss, "fps": miss, "memory": miss}
    out.update(triple(headline_label(dataset), row.get("miou"), row.get("miou_text"), mine["headline"], 2))
    if "fps" in columns:
        out.update(triple("FPS", row.get("fps"), row.get("fps_text"), mine["fps"], 2))
    if "memory" in columns:
        out.update(triple("memory (MB)", row.get("memory_mb"), None, mine["memory"], 0))
    out["ours"] = "" if owner is None else settings_label(*owner)
    out["provenance"] = row.get("provenance", "") + (f"; {row['note']}" if row.get("note") else "")
    return out


def published_table(table_id: str, ours: dict | None = None) -> pd.DataFrame:
    """A published table (docs/published/tables.yaml) with our numbers and the differences beside each cell. A table
    with `sweep_rows` also lists our knob settings that it has no row for (e.g. a K = 25% sweep point)."""
    spec = tables()[table_id]
    dataset, columns = spec["dataset"], spec["columns"]
    ours = our_results(dataset) if ours is None else ours
    rows = [_published_row(row, dataset, ours, columns) for row in spec["rows"]]
    if spec.get("sweep_rows"):
        owned = {_owners()[r["method"]] for r in spec["rows"] if r["method"] in _owners()}
        methods = {m for m, settings in owned if settings}
        for (method, settings), mine in sorted(ours["rows"].items(), key=row_order):
            if method in methods and settings and (method, settings) not in owned:
                titles = ", ".join(k.title for k in knobs_of(method))
                row = {"method": settings_label(method, settings)}
                row.update(triple(headline_label(dataset), None, "not published", mine["headline"], 2))
                row.update(triple("FPS", None, "not published", mine["fps"], 2))
                row.update(ours=settings_label(method, settings), provenance=f"ours only ({titles} sweep)")
                rows.append(row)
    return pd.DataFrame(rows)


def ours_note(dataset: str, ours: dict) -> str:
    if not ours["runs"]:
        return f"Ours: no finished evaluation in MLflow experiment `{tracking.experiment_name(dataset)}`."
    parts = [f"{settings_label(m, s)}: run {r['run']}, commit {r['commit']}, {r['date']}, "
             f"{r['measure_device'] or r['device']}, "
             + (f"scale {r['scale']}, {r['precision']}" if r["scale"] else "no measure run")
             for (m, s), r in sorted(ours["rows"].items(), key=row_order)]
    return "Ours (MLflow `" + tracking.experiment_name(dataset) + "`): " + "; ".join(parts) + "."


def ablation_table(method: str, dataset: str, scores_csv: Path) -> pd.DataFrame:
    """A method's ablation rows (its `ablations`, in the paper's layout: each row's marks as x) with the published
    mIoU beside ours (mean and std over seeds) from `bench.py ablation`'s scores csv, else "not measured"."""
    published = published_ablations().get(method, {}).get(dataset, {})
    stats = pd.DataFrame(columns=["mean", "std", "count"])
    outputs: list[str] = []
    if scores_csv.is_file():
        scores = pd.read_csv(scores_csv)
        if len(scores):  # one line per (row, seed): mean and sample std over the seeds
            stats = (100.0 * scores["miou"]).groupby(scores["row"]).agg(["mean", "std", "count"])
            outputs = [c[len("miou_"):-len("_output")] for c in scores.columns
                       if c.startswith("miou_") and c.endswith("_output")]
            for name in outputs:
                stats[f"output {name}"] = (100.0 * scores[f"miou_{name}_output"]).groupby(scores["row"]).mean()
    rows = []
    for ablation in method_class(method).ablations:
        key = ablation.key
        pub = (published.get("rows") or {}).get(key)
        if not scores_csv.is_file():
            mine = f"not measured (no {scores_csv.name})"
        else:
            mine = stats.loc[key, "mean"] if key in stats.index else "not measured (row not trained)"
        seeds = int(stats.loc[key, "count"]) if key in stats.index else 0
        row = {"configuration": ablation.label, **{col: "x" if on else "" for col, on in ablation.marks.items()},
               "mIoU (published)": published_cell(pub.get("miou"), pub.get("miou_text"), 1) if pub else "—",
               "mIoU (ours)": mine if isinstance(mine, str) else f"{mine:.2f}",
               "std over seeds (ours)": f"{stats.loc[key, 'std']:.2f}" if seeds > 1 else ""}
        for name in outputs:
            value = stats.loc[key, f"output {name}"] if key in stats.index else None
            row[f"mIoU of the {name} output (ours)"] = "" if value is None or pd.isna(value) else f"{value:.2f}"
        row["seeds"] = seeds or ""
        row["mIoU Δ (ours − published)"] = "" if isinstance(mine, str) else (
            f"{mine - pub['miou']:+.2f}" if pub else "no published value")
        row["provenance"] = published.get("provenance", "") if pub else "not published per row"
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_title(method: str, dataset: str) -> str:
    spec = published_ablations().get(method, {}).get(dataset, {})
    return spec.get("title") or f"{display_name(method)} ablation on {dataset}"
