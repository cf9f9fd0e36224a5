"""Published numbers (docs/published/tables.yaml) beside ours from MLflow: the papers' tables in their layout.

Which published rows a method of ours fills, with which runtime knob settings, the method declares (`published`);
its ablation rows likewise (`ablations`). Nothing here names a method.
"""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pandas as pd
import yaml

from methods import display_name, list_methods, method_class
from methods.base import MethodError
from pipelines import tracking
from pipelines.config import REPO_ROOT
from pipelines.tables import difference, interval_cell, measured, our_cell, pct, published_cell, triple

DATA = REPO_ROOT / "docs" / "published" / "tables.yaml"
PUBLISHED_ONLY = "published only"
SOURCES_SUFFIX = "_sources"  # file stem suffix of a published table by source (sources_table)
ABLATION_VARIANT = "ablation-"  # variant tag prefix of `bench.py ablation` runs: not a method's benchmark number

Settings = tuple[tuple[str, float], ...]  # a run's runtime knob values, e.g. (("k", 0.5),)
CELL = re.compile(r"^\s*(-?\d+(?:\.\d+)?)(?:\s|$)")  # a published cell's number, as printed
SOURCE = re.compile(r"\[([^\]]+)\]\s*$")  # a literature cell's source tag


@cache
def data() -> dict:
    return yaml.safe_load(DATA.read_text())


def protocol_notes() -> dict[str, str]:
    return dict(data()["protocol_notes"])


def tables() -> dict[str, dict]:
    return dict(data()["tables"])


def published_ablations() -> dict[str, dict]:
    """{method: {paper, dataset, tables: {table name: {id, title, source, columns, notes, rows: {row key: cells}}}}}."""
    return dict(data().get("ablations") or {})


def note_texts(keys: list[str]) -> list[str]:
    notes = protocol_notes()
    return [notes.get(key, key) for key in keys]


def knobs_of(method: str):
    try:
        return method_class(method).knobs
    except MethodError:  # a method no longer registered: its runs have no knobs
        return ()


def seed_groups(runs: pd.DataFrame) -> list[pd.DataFrame]:
    """The latest finished run of each seed, grouped per (method, variant), newest group first: one group is one
    row of a table, its runs the seeds averaged there (tracking.finished_runs adds `seed`)."""
    if runs.empty:
        return []
    profile = runs["tags.profile"].fillna("") if "tags.profile" in runs else pd.Series("", index=runs.index)
    groups = []
    for _, newest in runs.drop_duplicates(subset=["tags.method", "variant"], keep="first").iterrows():
        # the seeds of the newest run's profile only: a smoke seed is never averaged with a paper-recipe seed
        same = (runs["tags.method"] == newest["tags.method"]) & (runs["variant"] == newest["variant"]) \
            & (profile == profile[newest.name])
        groups.append(runs[same].drop_duplicates(subset=["seed"], keep="first"))
    return groups


def seed_mean(group: pd.DataFrame, metric: str) -> tuple[float | None, float | None]:
    """(mean, sample std) of one metric over a group's seeds, in %; std None with one seed."""
    values = [100.0 * float(v) for v in group.get(f"metrics.{metric}", pd.Series(dtype=float)) if measured(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = float(pd.Series(values).std(ddof=1)) if len(values) > 1 else None
    return round(mean, 2), (None if std is None else round(std, 2))


PER_IMAGE_SUFFIX = ".per_image.npz"  # evaluate's per-image confusion matrices (an artifact of each evaluation)


def per_image_matrices(run_ids: list[str]) -> list[tuple[tuple[str, ...], object]] | None:
    """(image ids, (N, C, C) matrices) of each evaluation run, None when one of them has no per-image artifact."""
    import tempfile

    import numpy as np

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in run_ids:
            path = tracking.download_artifact(run_id, PER_IMAGE_SUFFIX, Path(tmp) / run_id)
            if path is None:
                return None
            with np.load(path) as data:
                out.append((tuple(data["ids"].tolist()), data["matrices"]))
    return out


def seed_interval(group: pd.DataFrame, dataset: str) -> tuple[float | None, float | None]:
    """The 95% bootstrap interval (in %) over the test images of the group's headline: its run's logged interval
    with one seed; with several, the interval of the mean over seeds, each resample of the images scoring every
    seed's model on the same images (pipelines/metrics.py)."""
    if len(group) == 1:
        run = group.iloc[0]
        return pct(run.get("metrics.headline_ci_low")), pct(run.get("metrics.headline_ci_high"))
    from datasets import get_dataset
    from pipelines.metrics import headline_class, seeds_interval

    matrices = per_image_matrices(list(group["run_id"]))
    if matrices is None or len({ids for ids, _ in matrices}) != 1:
        return None, None
    info = get_dataset(dataset).info
    low, high = seeds_interval([m for _, m in matrices], info.counted_classes, headline_class(info))
    return pct(low), pct(high)


# Where a number of ours comes from: the rows of a sources table under each published row, in this order
SOURCES = {"official": "official weights, our harness", "paper": "retrained, paper recipe", "smoke": "smoke run"}
NO_RUN = {"official": "not evaluated (no `evaluate --weights` run)", "paper": "not run (no `paper` profile run)",
          "smoke": "not run (no `smoke` profile run)"}


def run_source(run) -> str:
    """`official` for an evaluation of an upstream release's weights (`evaluate --weights`); else the profile whose
    recipe our harness trained the model with (`paper`, `smoke`)."""
    if str(run.get("variant", "") or "").partition("_")[0] == tracking.OFFICIAL_VARIANT:
        return "official"
    return str(run.get("tags.profile", "") or "unknown")


def measured_variant(variant: str) -> str:
    """The measurement variant that times an evaluation's variant: weights do not change the network, so an
    official-weights evaluation ("official", "official_k0.5") is timed by the measurement of the same settings."""
    head, _, rest = variant.partition("_")
    return (rest or "default") if head == tracking.OFFICIAL_VARIANT else variant


def tag(run, name: str) -> str:
    """A run's tag as text; "" where the run has none (MLflow's frame holds NaN there)."""
    value = run.get(f"tags.{name}")
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def matching_measure(measures: pd.DataFrame, method: str, variant: str, profile: str):
    """The latest measurement of a method's variant under the same profile (the same network), or None: a smoke
    model's speed never stands beside a paper-recipe accuracy."""
    if measures.empty:
        return None
    hit = measures[(measures["tags.method"] == method) & (measures["variant"] == measured_variant(variant))]
    if "tags.profile" in hit:
        hit = hit[hit["tags.profile"] == profile]
    return hit.iloc[0] if not hit.empty else None


def run_settings(run, method: str) -> Settings:
    """A run's knob values: from its variant tag (`k0.5`, a sweep point) or else its logged model config."""
    variant = str(run.get("variant", run.get("tags.variant", "")) or "")
    values = []
    for knob in knobs_of(method):
        value = None
        # `variant_label` joins `<name><value>` with "_", and knob names may hold "_" themselves (MagNet's n_points)
        for match in re.finditer(rf"(?:^|_){re.escape(knob.name)}([-+0-9.eE]+)(?=_|$)", variant):
            try:
                value = float(match.group(1))
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
    """Published row key ("GLNet", "Local inference: UNet", "UNet [local]") -> (our run, knob settings) as the
    methods declare; a `variant` in the settings names the run (`unet-local`)."""
    owners = {}
    for name in list_methods():
        for row, settings in method_class(name).published.items():
            knobs = {k: v for k, v in settings.items() if k != "variant"}
            run = f"{name}-{settings['variant']}" if "variant" in settings else name
            owners[row] = (run, tuple(sorted((k, float(v)) for k, v in knobs.items())))
    return owners


def row_owner(row: dict, column: dict | None = None) -> tuple[tuple[str, Settings] | None, bool]:
    """(our run and settings that fill a published row's cell, whether they were named for that column): the most
    specific declaration wins, "UNet [local]" over "Local inference: UNet" over "UNet"."""
    owners = _owners()
    if column is not None and f"{row['method']} [{column['key']}]" in owners:
        return owners[f"{row['method']} [{column['key']}]"], True
    if "group" in row and f"{row['group']}: {row['method']}" in owners:
        return owners[f"{row['group']}: {row['method']}"], False
    return owners.get(row["method"]), False


def our_results(dataset: str, source: str | None = None) -> dict:
    """Our latest numbers per (method, knob settings) on a dataset from MLflow: the latest finished evaluation of
    each method and variant (mean over its seeds) joined with the latest measurement of the same variant and
    profile. `source` (a key of SOURCES) keeps only the evaluations of that source; without it, only models our
    harness trained (an official checkpoint's number never stands in for a retrained one).

    Returns {"runs": bool (any evaluation of the dataset), "rows": {(method, settings): {...}}}."""
    evals = tracking.finished_runs(dataset, "evaluate")
    if evals.empty:
        return {"runs": False, "rows": {}}
    evals = evals[~evals["variant"].str.startswith(ABLATION_VARIANT)]
    sources = pd.Series([run_source(run) for _, run in evals.iterrows()], index=evals.index, dtype=object)
    evals = evals[sources == source] if source else evals[sources != "official"]
    measures = tracking.finished_runs(dataset, "measure")
    rows: dict = {}
    for group in seed_groups(evals):
        run = group.iloc[0]
        method = run["tags.method"]
        key = (method, run_settings(run, method))
        if key in rows:  # the default run and a sweep point of the same value: keep the newer (newest first)
            continue
        meas = matching_measure(measures, method, run["variant"], tag(run, "profile"))
        headline, std = seed_mean(group, "headline")
        row = {"headline": headline, "headline_std": std, "seeds": len(group), "run": run["run_id"][:8],
               "ci95": seed_interval(group, dataset), "source": run_source(run),
               "commit": run.get("tags.git_commit", "") or "unknown", "profile": run.get("tags.profile", ""),
               "date": pd.Timestamp(run["start_time"]).strftime("%Y-%m-%d %H:%M UTC") if "start_time" in run else "",
               "device": run.get("tags.env.device_name", "") or "",
               "data": tag(run, tracking.DATA_DIGEST_TAG), "weights": tag(run, "weights"),
               "outputs": {key[len("metrics.output."):-len(".miou")]: pct(run[key]) for key in run.index
                           if key.startswith("metrics.output.") and key.endswith(".miou") and not pd.isna(run[key])}}
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
                       input_size=meas.get("tags.input_size", "") or "", measure_run=meas["run_id"][:8],
                       measure_commit=tag(meas, "git_commit") or "unknown")
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


def cell_value(text) -> float | None:
    """The number of a published cell as printed ("73.30", "74.1 [table]"); None for "< 1", "-" or no cell."""
    if text is None:
        return None
    match = CELL.match(str(text))
    return float(match.group(1)) if match else None


def cell_source(text: str) -> str | None:
    """The source tag of a literature cell ("74.1 [table]" -> "table")."""
    match = SOURCE.search(str(text))
    return match.group(1) if match else None


def columns_of(spec: dict, dataset: str) -> list[dict]:
    """A table's published quantities as {key, title, ours, output, digits}: `miou`, `fps`, `memory`, or a mapping
    (UHRNet's `local` / `global` mIoU columns; `output` names the secondary output of ours that fills it)."""
    out = []
    for column in spec["columns"]:
        column = {"key": column} if isinstance(column, str) else dict(column)
        key = column["key"]
        default = {"fps": ("FPS", "fps", 2), "memory": ("memory (MB)", "memory", 0)}.get(
            key, (headline_label(dataset), "headline", 2))
        column.setdefault("title", default[0])
        column.setdefault("ours", default[1])
        column.setdefault("digits", default[2])
        out.append(column)
    return out


def _missing(dataset: str, ours: dict, label: str) -> str:
    return f"not measured (no {dataset} run)" if not ours["runs"] else f"not measured (no {label} run)"


def _our_cell(mine: dict, column: dict, owner: tuple[str, Settings], for_column: bool = False):
    if column.get("output") and not for_column:  # a run declared for this very column fills it with its headline
        value = mine.get("outputs", {}).get(column["output"])
        missing = f"not measured ({settings_label(*owner)} has no `{column['output']}` output)"
        return value if value is not None else missing
    return mine[column["ours"]]


def _published_row(row: dict, dataset: str, ours: dict, columns: list[dict]) -> dict:
    out = {"group": row["group"]} if "group" in row else {}
    out["method"] = row["method"]
    if "venue" in row:
        out["published in"] = row["venue"]
    labels = []
    for column in columns:
        owner, for_column = row_owner(row, column)
        mine = None if owner is None else ours["rows"].get(owner)
        if owner is None:
            cell = PUBLISHED_ONLY
        elif mine is None:
            cell = _missing(dataset, ours, settings_label(*owner))
        else:
            cell = _our_cell(mine, column, owner, for_column)
        if owner is not None and settings_label(*owner) not in labels:
            labels.append(settings_label(*owner))
        text = row.get(column["key"])
        out.update(triple(column["title"], cell_value(text), text if text is not None else None, cell,
                          column["digits"]))
    if any(mine["seeds"] > 1 for mine in ours["rows"].values() if "seeds" in mine):
        owner = row_owner(row)[0]
        mine = None if owner is None else ours["rows"].get(owner)
        std = None if mine is None else mine.get("headline_std")
        out[f"{headline_label(dataset)} std over seeds (ours)"] = "" if std is None else f"{std:.2f}"
        out["seeds (ours)"] = "" if mine is None else mine.get("seeds", "")
    out["ours"] = ", ".join(labels)
    out["note"] = row.get("note", "")
    return out


def published_table(table_id: str, ours: dict | None = None) -> pd.DataFrame:
    """A published table (docs/published/tables.yaml) with our numbers and the differences beside each cell. A table
    with `sweep_rows` also lists our knob settings that it has no row for (e.g. a K = 25% sweep point)."""
    spec = tables()[table_id]
    dataset = spec["dataset"]
    columns = columns_of(spec, dataset)
    ours = our_results(dataset) if ours is None else ours
    rows = [_published_row(row, dataset, ours, columns) for row in spec["rows"]]
    if spec.get("sweep_rows"):
        owned = {row_owner(r)[0] for r in spec["rows"] if row_owner(r)[0] is not None}
        methods = {m for m, settings in owned if settings}
        for (method, settings), mine in sorted(ours["rows"].items(), key=row_order):
            if method in methods and settings and (method, settings) not in owned:
                titles = ", ".join(k.title for k in knobs_of(method))
                row = {"method": settings_label(method, settings)}
                if any("venue" in r for r in spec["rows"]):
                    row["published in"] = ""
                for column in columns:
                    cell = _our_cell(mine, column, (method, settings))
                    row.update(triple(column["title"], None, "not published", cell, column["digits"]))
                row.update(ours=settings_label(method, settings), note=f"ours only ({titles} sweep)")
                rows.append(row)
    return pd.DataFrame(rows)


def provenance(mine: dict) -> str:
    """Where one row of ours came from: the evaluation (run, commit, device, precision, prepared-data digest, the
    official weights file) and the measurement (run, commit, device, precision, scale, input size)."""
    accuracy = [f"eval {mine['run']}", f"commit {mine['commit']}", mine["device"] or "device unknown", "fp32",
                f"data {mine.get('data') or 'unknown'}"]
    if mine.get("weights"):
        accuracy.append(f"weights {mine['weights']}")
    if not mine.get("measure_run"):
        return ", ".join(accuracy) + "; no measure run"
    speed = [f"measure {mine['measure_run']}", f"commit {mine['measure_commit']}", mine["measure_device"],
             mine["precision"], f"scale {mine['scale']}" if mine["scale"] else "", mine.get("input_size", "")]
    return ", ".join(accuracy) + "; " + ", ".join(p for p in speed if p)  # no "|": markdown tables split on it


def sources_table(table_id: str, results: dict[str, dict] | None = None) -> pd.DataFrame:
    """A published table with up to four rows per published row: the published numbers, then ours by source
    (SOURCES: the official weights evaluated by our harness, retrained with the paper recipe, the smoke run), each
    with its differences, seeds, 95% interval and provenance. A cell without data says why; a published row no
    method of ours fills keeps its published row only."""
    spec = tables()[table_id]
    dataset = spec["dataset"]
    columns = columns_of(spec, dataset)
    results = {source: our_results(dataset, source) for source in SOURCES} if results is None else results
    rows = []
    for row in spec["rows"]:
        base = ({"group": row["group"]} if "group" in row else {}) | {"method": row["method"]}
        published_row = {**base, "source": "published"}
        for column in columns:
            text = row.get(column["key"])
            published_row[column["title"]] = published_cell(cell_value(text), text, column["digits"])
            published_row[f"{column['title']} Δ (ours − published)"] = ""
        published_row.update({"std over seeds": "", "seeds": "", "95% CI": "",
                              "provenance": " ".join(p for p in (spec.get("paper", ""), spec.get("table", ""),
                                                                 row.get("note", "")) if p) or "literature"})
        rows.append(published_row)
        owners = [row_owner(row, column) for column in columns]
        if all(owner is None for owner, _ in owners):
            continue
        for source, label in SOURCES.items():
            out, first = {**base, "source": label}, None
            for column, (owner, for_column) in zip(columns, owners, strict=True):
                mine = None if owner is None else results[source]["rows"].get(owner)
                if owner is None:
                    cell = PUBLISHED_ONLY
                elif mine is None:
                    cell = NO_RUN.get(source, f"not run (no {source} run)")
                else:
                    cell, first = _our_cell(mine, column, owner, for_column), first or mine
                out[column["title"]] = our_cell(cell, column["digits"])
                out[f"{column['title']} Δ (ours − published)"] = difference(cell, cell_value(row.get(column["key"])),
                                                                           column["digits"])
            std = None if first is None else first.get("headline_std")
            out.update({"std over seeds": "" if std is None else f"{std:.2f}",
                        "seeds": "" if first is None else first.get("seeds", ""),
                        "95% CI": "" if first is None else interval_cell(*first.get("ci95", (None, None))),
                        "provenance": "" if first is None else provenance(first)})
            rows.append(out)
    return pd.DataFrame(rows)


def sources_title(spec: dict) -> str:
    return f"{spec['title']}: published, official weights, paper recipe and smoke run"


SOURCES_NOTE = ("Rows per published row: the published numbers; the release's official weights evaluated by our "
                "harness (`bench.py evaluate --weights FILE`); our harness's retraining with the paper recipe "
                "(profile `paper`); the smoke run (profile `smoke`). Ours: mean over seeds, the std over seeds and "
                "the 95% bootstrap interval over test images. Provenance: the evaluation (run, commit, device, "
                "precision, prepared-data digest, weights file), then the measurement (run, commit, device, "
                "precision, scale, input size).")


def table_notes(spec: dict) -> list[str]:
    """The lines under a table: where its published numbers come from, then the protocol notes it names."""
    return ([f"Published: {spec['source']}."] if spec.get("source") else []) + note_texts(spec.get("notes", []))


def points(dataset: str) -> list[dict]:
    """Every published (mIoU, FPS, memory) point of a dataset, one per method name: the papers' own tables first,
    then the literature for methods they lack. Rows without a numeric mIoU and FPS (e.g. "< 1") cannot be drawn."""
    found: dict[str, dict] = {}
    specs = sorted(tables().values(), key=lambda spec: spec.get("kind") == "literature")
    for spec in specs:
        if spec["dataset"] != dataset or not {"miou", "fps"} <= {c["key"] for c in columns_of(spec, dataset)}:
            continue
        names = [row["method"] for row in spec["rows"]]
        for row in spec["rows"]:
            miou, fps = cell_value(row.get("miou")), cell_value(row.get("fps"))
            # a name the table prints twice (UNet under local and global inference) is labelled by its group
            label = f"{row['method']} ({row['group'].lower()})" if names.count(row["method"]) > 1 else row["method"]
            if miou is None or fps is None or label in found:
                continue
            found[label] = {"label": label, "miou": miou, "fps": fps, "memory": cell_value(row.get("memory")),
                            "source": "published", "owner": row_owner(row)[0]}
    return list(found.values())


def ours_note(dataset: str, ours: dict) -> str:
    if not ours["runs"]:
        return f"Ours: no finished evaluation in MLflow experiment `{tracking.experiment_name(dataset)}`."
    parts = [f"{settings_label(m, s)}: run {r['run']} (profile {r['profile'] or 'unknown'}), commit {r['commit']}, "
             f"{r['date']}, "
             f"{r['measure_device'] or r['device']}, "
             + (f"scale {r['scale']}, {r['precision']}" if r["scale"] else "no measure run")
             for (m, s), r in sorted(ours["rows"].items(), key=row_order)]
    return "Ours (MLflow `" + tracking.experiment_name(dataset) + "`): " + "; ".join(parts) + "."


def ablation_tables(method: str) -> list[tuple[str, dict]]:
    """The ablation tables a method's rows are printed in, in declaration order, each with its published spec
    (docs/published/tables.yaml `ablations`; {} when none is published)."""
    published = published_ablations().get(method, {})
    names = list(dict.fromkeys(row.table for row in method_class(method).ablations))
    return [(name, (published.get("tables") or {}).get(name, {})) for name in names]


def ablation_id(method: str, table: str) -> str:
    """File stem of a published ablation table ("paper_isdnet_table5"); `<method>_ablation` when unpublished."""
    spec = dict(ablation_tables(method)).get(table, {})
    return spec.get("id") or f"{method}_ablation" + (f"_{re.sub(r'[^a-z0-9]+', '', table.lower())}" if table else "")


def _mark(value) -> str:
    return "✓" if value is True else "" if value is False else str(value)


ABLATION_OURS = {"miou": "miou", "fps": "fps", "memory": "memory"}  # column key -> scores csv column


def ablation_table(method: str, dataset: str, scores_csv: Path, table: str = "") -> pd.DataFrame:
    """One of a method's ablation tables (its `ablations` with `table`, in the paper's layout: each row's marks)
    with the published numbers beside ours (mean over seeds; std of the mIoU) from `bench.py ablation`'s scores
    csv, else "not measured". Published numbers measured on another dataset say which in the column title."""
    meta = published_ablations().get(method, {})
    spec = dict(ablation_tables(method)).get(table, {})
    pub_dataset = meta.get("dataset", dataset)
    where = "" if pub_dataset == dataset else f", {pub_dataset}"
    columns = columns_of({"columns": spec.get("columns", ["miou"])}, pub_dataset)
    scores = pd.read_csv(scores_csv) if scores_csv.is_file() else pd.DataFrame()
    trained = set(scores["row"]) if len(scores) else set()
    outputs = [c[len("miou_"):-len("_output")] for c in scores.columns
               if c.startswith("miou_") and c.endswith("_output")]
    rows = []
    for ablation in (r for r in method_class(method).ablations if r.table == table):
        key = ablation.key
        pub = (spec.get("rows") or {}).get(key, {})
        mine = scores[scores["row"] == key] if key in trained else None
        row = {"configuration": ablation.label, **{col: _mark(on) for col, on in ablation.marks.items()}}
        for column in columns:
            name = column["title"] if column["key"] != "miou" else "mIoU"
            source = ABLATION_OURS[column["key"]]
            if not scores_csv.is_file():
                ours = f"not measured (no {scores_csv.name})"
            elif mine is None:
                ours = "not measured (row not trained)"
            elif source not in mine or mine[source].isna().all():
                ours = "not measured (no measurement)"
            else:
                ours = float(mine[source].mean()) * (100.0 if column["key"] == "miou" else 1.0)
            text = pub.get(column["key"])
            row[f"{name} (published{where})"] = "—" if text is None else str(text)
            row[f"{name} (ours)"] = our_cell(ours, column["digits"])
            row[f"{name} Δ (ours − published)"] = difference(ours, cell_value(text), column["digits"])
        seeds = 0 if mine is None else len(mine)
        row["mIoU std over seeds (ours)"] = f"{100.0 * mine['miou'].std():.2f}" if seeds > 1 else ""
        for name in outputs:
            value = None if mine is None else mine[f"miou_{name}_output"].mean()
            row[f"mIoU of the {name} output (ours)"] = "" if value is None or pd.isna(value) else f"{100 * value:.2f}"
        row["seeds"] = seeds or ""
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_title(method: str, table: str) -> str:
    spec = dict(ablation_tables(method)).get(table, {})
    return spec.get("title") or f"{display_name(method)} ablation" + (f" ({table})" if table else "")


def ablation_notes(method: str, table: str, dataset: str) -> list[str]:
    meta = published_ablations().get(method, {})
    spec = dict(ablation_tables(method)).get(table, {})
    lines = table_notes(spec)
    if spec and meta.get("dataset") and meta["dataset"] != dataset:
        lines.insert(0, f"The published numbers are {meta['paper']}'s on {meta['dataset']}; ours are on {dataset}: "
                        "compare the differences between rows, not the values.")
    return lines
