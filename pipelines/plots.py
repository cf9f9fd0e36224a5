"""Report plots in results/plots/: accuracy vs FPS (memory as marker size), accuracy vs FPS as a method's runtime
knob varies (RUE's K), latency / memory vs input megapixels, each evaluated method's confusion matrix (the same
drawing the evaluation logs to MLflow) and the training curves of each method from MLflow. Each plot function
returns the data it drew, so tests can count the points."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from methods import display_name, list_methods, method_class
from pipelines import published, tracking
from pipelines.config import Config, ConfigError
from pipelines.paths import metrics_file, size_sweep_stem

COLOURS = {"published": "tab:blue", "ours": "tab:red"}
TEXT_COLOURS = {"published": "#1b4f7a", "ours": "#9c1b1b"}  # labels a shade darker than their markers
MEMORY_KEY_MB = (250, 500, 1000, 2000, 4000, 8000, 16000)  # marker-size key: the values spanning a panel's range


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and not pd.isna(value) \
        else None


def our_points(ours: dict) -> list[dict]:
    """Our measured points (headline and FPS both measured) from report.our_results()."""
    out = []
    for (method, settings), row in sorted(ours["rows"].items(), key=published.row_order):
        miou, fps = _number(row["headline"]), _number(row["fps"])
        if miou is None or fps is None:
            continue
        low, high = (_number(v) for v in row.get("ci95", (None, None)))
        out.append({"label": published.settings_label(method, settings, display_name(method)), "miou": miou,
                    "fps": fps, "memory": _number(row["memory"]), "source": "ours",
                    "ci95": (low, high) if low is not None and high is not None else None})
    return out


def _metric_label(dataset: str) -> str:
    return f"{published.headline_label(dataset)} (%)"


def _size(memory: float | None) -> float:
    return 40.0 if memory is None else 20.0 + 120.0 * memory / 2000.0  # area ∝ MB; 2000 MB ≈ 140 pt²


def plot_name(point: dict) -> str:
    """The name a point is drawn with: a published row of a method we implement is named as ours are (the
    method's display name and knob values, e.g. published "RUE (K = 100%)" and ours both "rue K=1"), so the two can
    be matched by eye. A reconstruction's paper row keeps the paper's name: its display name would claim the
    published number is our reconstruction."""
    owner = point.get("owner") or published.row_owner({"method": point["label"]})[0]
    if point["source"] != "published" or owner is None:
        return point["label"]
    run, settings = owner
    if method_class(run).label:
        return point["label"]
    return published.settings_label(run, settings, display_name(run))


def _memory_key(values: list[float]) -> list[float]:
    """Up to three round memory values (MB) spanning the panel's range, for the marker-size key."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    inside = [v for v in MEMORY_KEY_MB if lo / 2 <= v <= hi * 2] or [min(MEMORY_KEY_MB, key=lambda v: abs(v - hi))]
    if len(inside) <= 3:
        return inside
    return [inside[0], inside[len(inside) // 2], inside[-1]]


def _boxes_overlap(a: tuple, b: tuple, pad: float = 0.0) -> bool:
    """Do two (x0, y0, x1, y1) display boxes overlap (closer than `pad` pixels)?"""
    return a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad


def _overlap_area(a: tuple, b: tuple) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _directions(count: int) -> list[tuple[float, float]]:
    """Unit vectors around a point, upper right first (where a reader looks for a label), then alternating."""
    angles = [math.pi / 4 + k * 2 * math.pi / count for k in range(count)]
    order = sorted(range(count), key=lambda k: min(k, count - k))
    return [(math.cos(angles[k]), math.sin(angles[k])) for k in order]


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], marker_sizes: list[float],
                 colours: list[str] | None = None, fontsize: float = 7) -> list:
    """Label each point without two labels overlapping: greedy placement on rings of growing radius around the
    point (nearest first), rejecting a spot whose text box overlaps a placed label, a marker or leaves the axes;
    a label moved away from its point gets a thin leader line. Call it after the layout is final (axes limits,
    scales, tight_layout): positions are computed in display pixels. Returns the text objects."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    ax.get_xlim(), ax.get_ylim()  # settle any pending autoscaling before reading the data transform
    px = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    frame = (frame.x0, frame.y0, frame.x1, frame.y1)
    xy = ax.transData.transform(np.asarray(points, dtype=float).reshape(-1, 2))
    # scatter size = area in pt²; a diamond reaches sqrt(2)/2 of its side from the centre, plus its edge line
    radii = [(math.sqrt(max(size, 1.0)) * 0.71 + 1.0) * px for size in marker_sizes]
    markers = [(x - r, y - r, x + r, y + r) for (x, y), r in zip(xy, radii, strict=True)]
    extents = []
    for label in labels:
        probe = ax.text(0, 0, label, fontsize=fontsize)
        box = probe.get_window_extent(renderer)
        extents.append((box.width, box.height))
        probe.remove()
    # the most crowded points choose first, while space near them is still free
    crowd = [sum(1 for other in xy if np.hypot(*(other - mine)) < 60 * px) for mine in xy]
    order = sorted(range(len(labels)), key=lambda i: (-crowd[i], -xy[i][1], xy[i][0]))
    placed: list[tuple] = []
    texts: list = [None] * len(labels)
    for i in order:
        (x, y), (w, h), r0 = xy[i], extents[i], radii[i] / px + 2.0
        candidates = []
        for ring, step in enumerate((0, 5, 11, 18, 26, 36, 48, 62, 78, 96, 118, 145)):
            for dx, dy in _directions(8 if ring < 3 else 16):
                off = ((r0 + step) * dx, (r0 + step) * dy)
                ax_, ay_ = x + off[0] * px, y + off[1] * px
                ha = "left" if dx > 0.3 else "right" if dx < -0.3 else "center"
                va = "bottom" if dy > 0.3 else "top" if dy < -0.3 else "center"
                x0 = ax_ if ha == "left" else ax_ - w if ha == "right" else ax_ - w / 2
                y0 = ay_ if va == "bottom" else ay_ - h if va == "top" else ay_ - h / 2
                candidates.append((ring, off, ha, va, (x0, y0, x0 + w, y0 + h)))

        def fits(box, *, inside: bool, clear_markers: bool) -> bool:
            if any(_boxes_overlap(box, other, pad=1.0) for other in placed):
                return False
            if inside and not (box[0] >= frame[0] and box[1] >= frame[1] and box[2] <= frame[2] and box[3] <= frame[3]):
                return False
            return not (clear_markers and any(_boxes_overlap(box, m) for m in markers))

        chosen = next((c for level in ((True, True), (True, False), (False, False)) for c in candidates
                       if fits(c[4], inside=level[0], clear_markers=level[1])), None)
        if chosen is None:  # nowhere free: the spot overlapping the placed labels least
            chosen = min(candidates, key=lambda c: sum(_overlap_area(c[4], other) for other in placed))
        ring, off, ha, va, box = chosen
        placed.append(box)
        colour = colours[i] if colours else "black"
        texts[i] = ax.annotate(labels[i], points[i], xytext=off, textcoords="offset points", ha=ha, va=va,
                               fontsize=fontsize, color=colour, annotation_clip=False)
        if ring > 0:  # moved away from its point: a leader line says which point it names
            ax.annotate("", points[i], xytext=off, textcoords="offset points", annotation_clip=False,
                        arrowprops=dict(arrowstyle="-", color=colour, lw=0.5, alpha=0.6, shrinkA=0,
                                        shrinkB=radii[i] / px))
    return texts


def accuracy_vs_fps(panels: dict[str, list[dict]], path: Path) -> dict[str, list[dict]]:
    """One panel per dataset: mIoU (%) vs FPS (log), marker area ∝ memory (MB) with a key; published = blue circles,
    ours = red diamonds; hollow markers where the memory is unknown. Labels never overlap (place_labels); a method
    we implement has the same name on its published and its own points (plot_name)."""
    fig, _ = accuracy_figure(panels)
    fig.savefig(path, dpi=fig.dpi)
    _plt().close(fig)
    return panels


def accuracy_figure(panels: dict[str, list[dict]]):
    """accuracy_vs_fps's figure and the label texts of each panel: (figure, {dataset: [Text, ...]})."""
    from matplotlib.lines import Line2D

    plt = _plt()
    names = list(panels)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(8.5 * cols, 6.2 * rows), squeeze=False, dpi=110)
    style = {"published": "o", "ours": "D"}
    drawn_axes = []
    for ax, dataset in zip(axes.flat, names, strict=False):
        handles = []
        for source in ("published", "ours"):
            pts = [p for p in panels[dataset] if p["source"] == source]
            for known in (True, False):
                sub = [p for p in pts if (p["memory"] is not None) == known]
                if not sub:
                    continue
                colour = COLOURS[source]
                ax.scatter([p["fps"] for p in sub], [p["miou"] for p in sub], s=[_size(p["memory"]) for p in sub],
                           marker=style[source], edgecolors=colour, linewidths=1.2,
                           facecolors=colour if known else "none", alpha=0.75)
                bars = [p for p in sub if p.get("ci95")]
                if bars:  # 95% bootstrap interval over the test images (pipelines/metrics.py)
                    below = [p["miou"] - p["ci95"][0] for p in bars]
                    above = [p["ci95"][1] - p["miou"] for p in bars]
                    ax.errorbar([p["fps"] for p in bars], [p["miou"] for p in bars], yerr=[below, above], fmt="none",
                                ecolor=colour, elinewidth=1.0, capsize=3, alpha=0.75)
                handles.append(Line2D([], [], linestyle="none", marker=style[source], markersize=6,
                                      markeredgecolor=colour, markerfacecolor=colour if known else "none",
                                      label=source + ("" if known else " (memory unknown)")))
        if any(p["fps"] > 0 for p in panels[dataset]):
            ax.set_xscale("log")
        ax.margins(x=0.12, y=0.1)  # room for labels of the outermost points
        ax.set_xlabel("FPS (images/s, batch 1; log scale)")
        ax.set_ylabel(_metric_label(dataset))
        ax.set_title(f"{dataset}: accuracy vs speed")
        ax.grid(alpha=0.3, which="both")
        if panels[dataset]:
            # one key (tight_layout keeps a single outside legend in the figure): sources, then marker sizes
            memory = _memory_key([p["memory"] for p in panels[dataset] if p["memory"] is not None])
            if memory:
                handles.append(Line2D([], [], linestyle="none", label="memory (marker area):"))
            handles += [Line2D([], [], linestyle="none", marker="o", markersize=math.sqrt(_size(mb)),
                               markerfacecolor="0.65", markeredgecolor="0.4", label=f"{mb:g} MB") for mb in memory]
            ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                      labelspacing=1.1, borderpad=0.8, handletextpad=0.9)
            drawn_axes.append((ax, dataset))
        else:
            ax.text(0.5, 0.5, "no points", transform=ax.transAxes, ha="center")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.text(0.01, 0.005, "Error bars: 95% bootstrap interval over the test images. Published FPS are not "
             "hardware-normalised and most likely at 0.8x input; published memory definitions differ "
             "(results/README.md).", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    texts = {}
    for ax, dataset in drawn_axes:  # after the layout: labels are placed in display space
        pts = panels[dataset]
        texts[dataset] = place_labels(ax, [(p["fps"], p["miou"]) for p in pts], [plot_name(p) for p in pts],
                                      [_size(p["memory"]) for p in pts], [TEXT_COLOURS[p["source"]] for p in pts])
    return fig, texts


def knob_sweeps(curves: dict[str, dict], path: Path) -> dict:
    """One panel per (dataset, method, knob): accuracy vs FPS as the knob varies. curves[title] = {"dataset": d,
    "knob": title of the knob, "published": [(value, FPS, mIoU), ...], "ours": [...]}."""
    plt = _plt()
    names = list(curves) or ["no runtime knob measured"]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, title in zip(axes.flat, names, strict=False):
        curve = curves.get(title, {})
        for source, (marker, colour) in {"published": ("o", "tab:blue"), "ours": ("D", "tab:red")}.items():
            pts = sorted(curve.get(source, []), key=lambda t: t[1])
            if not pts:
                continue
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=marker, color=colour,
                    label=source + (" (as published)" if source == "published" else ""))
            for value, fps, miou in pts:
                ax.annotate(f"{curve['knob']}={value:g}", (fps, miou), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color=colour)
        ax.set_xlabel("FPS (images/s, batch 1)")
        ax.set_ylabel(_metric_label(curve["dataset"]) if curve else "")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if curve:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return curves


def scaling(dataset: str, frames: dict[str, pd.DataFrame], path: Path) -> dict[str, dict[str, list]]:
    """Latency and peak memory vs input megapixels from results/measure/<dataset>/<method>_sweep.csv; memory is
    torch peak allocated where measured (GPU), else CPU RSS growth. OOM rows are marked on the x axis."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn: dict[str, dict[str, list]] = {}
    mem_label = set()
    for method, frame in sorted(frames.items()):
        ok = frame[frame["status"] == "ok"]
        lat = pd.to_numeric(ok["latency_ms_median"], errors="coerce")
        ax1.plot(ok["megapixels"], lat, "o-", label=display_name(method))
        key = "torch_max_allocated_mib"
        mem = pd.to_numeric(ok.get(key), errors="coerce") if key in ok else pd.Series(dtype=float)
        if mem.isna().all():
            key = "rss_peak_growth_mib"
            mem = pd.to_numeric(ok.get(key), errors="coerce") if key in ok else pd.Series(dtype=float)
        mem_label.add("torch peak allocated" if key == "torch_max_allocated_mib" else "CPU RSS growth")
        good = ~mem.isna()
        ax2.plot(ok["megapixels"][good], mem[good], "o-", label=display_name(method))
        drawn[method] = {"latency": list(zip(ok["megapixels"], lat, strict=True)),
                         "memory": list(zip(ok["megapixels"][good], mem[good], strict=True))}
        for _, row in frame[frame["status"] != "ok"].iterrows():
            for ax in (ax1, ax2):
                ax.axvline(row["megapixels"], color="red", linestyle=":", alpha=0.5)
            ax1.annotate(f"{method} {row['status']}", (row["megapixels"], 0.02), xycoords=("data", "axes fraction"),
                         color="red", fontsize=7, rotation=90)
    ax1.set(xlabel="input megapixels", ylabel="median latency (ms)", title=f"{dataset}: latency vs input size")
    ax2.set(xlabel="input megapixels", ylabel=f"peak memory, {' / '.join(sorted(mem_label)) or 'n/a'} (MiB)",
            title=f"{dataset}: memory vs input size")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if frames:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def row_normalised(matrix) -> np.ndarray:
    """Each ground-truth row as fractions of its pixels (rows: truth, columns: prediction); NaN for a class with
    no pixel in the split, which has no row to normalise."""
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / np.where(totals > 0, totals, 1), np.nan)


def confusion_figure(matrix, classes, title: str = ""):
    """The confusion matrix as a heatmap, row-normalised (each ground-truth class's pixels, in % per predicted
    class), class names on both axes, the percentage in each cell. One drawing for the evaluation's MLflow figure and
    the report's PNG. Returns a matplotlib Figure (no pyplot state: safe in any thread)."""
    from matplotlib.figure import Figure

    classes = list(classes)
    share = row_normalised(matrix) * 100
    n = len(classes)
    if share.shape != (n, n):
        raise ValueError(f"a {share.shape} confusion matrix for {n} classes")
    side = max(4.0, 0.55 * n + 2.2)
    fig = Figure(figsize=(side + 1.2, side), dpi=110, layout="constrained")  # room for long class names
    ax = fig.add_subplot()
    image = ax.imshow(np.nan_to_num(share, nan=0.0), cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), [name if not np.isnan(share[i]).all() else f"{name} (no pixels)"
                             for i, name in enumerate(classes)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    fontsize = 8 if n <= 10 else 6 if n <= 20 else 0
    for i in range(n):
        for j in range(n):
            if fontsize and not np.isnan(share[i, j]):
                ax.text(j, i, f"{share[i, j]:.0f}" if share[i, j] >= 9.5 or share[i, j] == 0 else f"{share[i, j]:.1f}",
                        ha="center", va="center", fontsize=fontsize,
                        color="white" if share[i, j] > 55 else "black")
    fig.colorbar(image, ax=ax, shrink=0.85, label="% of the ground-truth class's pixels")
    ax.set_title(title or "confusion matrix (row-normalised)", fontsize=9)
    return fig


def confusion_plots(config: Config, out_dir: Path) -> list[Path]:
    """results/plots/confusion_<dataset>_<method>.png for every benchmark method whose default evaluation file
    holds a confusion matrix (files written before evaluations recorded it are skipped)."""
    written = []
    for dataset in config.benchmark_datasets:
        for method in config.benchmark_methods:
            path = metrics_file(config, dataset, method)
            if not path.is_file():
                continue
            scores = json.loads(path.read_text())
            confusion = scores.get("confusion_matrix")
            if not confusion:
                continue
            fig = confusion_figure(confusion["matrix"], confusion["classes"],
                                   f"{display_name(method)} on {dataset}/{scores.get('split', '?')} "
                                   f"(row-normalised, %)")
            written.append(out_dir / f"confusion_{dataset}_{method}.png")
            fig.savefig(written[-1])
    return written


IGNORED_TRAIN_METRICS = ("lr", "final_loss")  # not loss terms


def training_curves(dataset: str, methods: list[str] | None = None,
                    params_hashes: dict[str, str] | None = None) -> dict[str, dict]:
    """Loss terms vs step of each method's latest finished training on a dataset, from MLflow: {method: {"run":
    run id, "phases": [(phase or "", {term: [(step, value), ...]}), ...]}}. A method with several phases (GLNet)
    has one entry per phase, in training order. Where `params_hashes` names a method's current configuration, its
    latest run of that configuration is taken (not, say, an ablation row's)."""
    runs = tracking.finished_runs(dataset, "train")
    if runs.empty:
        return {}
    parent_col = "tags.mlflow.parentRunId"
    parents = runs[runs[parent_col].isna()] if parent_col in runs else runs
    out = {}
    for method in methods if methods is not None else list(dict.fromkeys(parents["tags.method"])):
        mine = parents[parents["tags.method"] == method]
        wanted = (params_hashes or {}).get(method)
        if wanted and "tags.params_hash" in mine and (mine["tags.params_hash"] == wanted).any():
            mine = mine[mine["tags.params_hash"] == wanted]
        if mine.empty:
            continue
        run = mine.iloc[0]  # newest first
        children = runs[runs[parent_col] == run["run_id"]].sort_values("start_time") if parent_col in runs \
            else runs.iloc[0:0]
        phases = []
        for _, part in (children.iterrows() if not children.empty else [(None, run)]):
            terms = {}
            for column in part.index:
                if not column.startswith("metrics.train/") or pd.isna(part[column]):
                    continue
                key = column[len("metrics."):]
                term = key.rsplit("/", 1)[-1]
                if term not in IGNORED_TRAIN_METRICS:
                    terms[term] = tracking.metric_history(part["run_id"], key)
            phase = part.get("tags.phase", "")
            phases.append(("" if pd.isna(phase) else phase, terms))
        if any(terms for _, terms in phases):
            out[method] = {"run": run["run_id"], "phases": phases}
    return out


def training_plot(dataset: str, curves: dict[str, dict], path: Path) -> dict[str, dict]:
    """One panel per method: each loss term vs optimizer step; a multi-phase method's phases follow each other on
    the step axis, separated by dotted lines."""
    plt = _plt()
    names = list(curves) or ["no training run"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False, dpi=110)
    for ax, method in zip(axes.flat, names, strict=False):
        curve = curves.get(method)
        if curve is None:
            ax.text(0.5, 0.5, "no finished training run", transform=ax.transAxes, ha="center")
            continue
        offset, colours = 0, {}
        for index, (phase, terms) in enumerate(curve["phases"]):
            last = offset
            for term, points in sorted(terms.items(), key=lambda t: (t[0] != "loss", t[0])):
                if not points:
                    continue
                colour = colours.setdefault(term, f"C{len(colours)}")
                ax.plot([offset + step for step, _ in points], [value for _, value in points], color=colour,
                        linewidth=2.0 if term == "loss" else 1.0, marker="o" if len(points) <= 3 else None,
                        markersize=3, label=term if index == 0 or term not in
                        {t for _, ts in curve["phases"][:index] for t in ts} else None)
                last = max(last, offset + points[-1][0])
            if phase:
                ax.axvline(offset, color="0.5", linestyle=":", linewidth=0.8)
                ax.annotate(phase, (offset, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                            textcoords="offset points", fontsize=7, color="0.35")
            offset = last
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"{display_name(method)} (run {curve['run'][:8]})")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="term", title_fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{dataset}: training loss (total, bold) and its terms, latest finished training per method",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return curves


def _params_hashes(config: Config, dataset: str) -> dict[str, str]:
    hashes = {}
    for method in config.benchmark_methods:
        try:
            hashes[method] = config.params_hash(method, dataset)
        except ConfigError:  # no recipe for this dataset: any run of the method will do
            continue
    return hashes


def all_plots(config: Config) -> list[Path]:
    """Every report plot into results/plots/ (accuracy vs FPS, knob sweeps, latency/memory vs megapixels,
    confusion matrices, training curves)."""
    out_dir = config.results_root / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    with_tables = [spec["dataset"] for spec in published.tables().values()]
    datasets = list(dict.fromkeys([*with_tables, *config.benchmark_datasets]))
    ours = {d: published.with_sweeps(published.our_results(d), d, config) for d in datasets}
    panels = {d: published.points(d) + our_points(ours[d]) for d in datasets}
    panels = {d: pts for d, pts in panels.items() if pts}
    written = [out_dir / "accuracy_vs_fps.png"]
    accuracy_vs_fps(panels, written[0])
    written.append(out_dir / "knob_sweeps.png")
    knob_sweeps(knob_curves(datasets, ours), written[-1])
    for d in config.benchmark_datasets:
        frames = {}
        for method in config.benchmark_methods:
            path = size_sweep_stem(config, d, method).with_suffix(".csv")
            if path.is_file():
                frames[method] = pd.read_csv(path)
        if frames:
            written.append(out_dir / f"scaling_{d}.png")
            scaling(d, frames, written[-1])
    written += confusion_plots(config, out_dir)
    for d in config.benchmark_datasets:
        curves = training_curves(d, config.benchmark_methods, _params_hashes(config, d))
        if curves:
            written.append(out_dir / f"training_{d}.png")
            training_plot(d, curves, written[-1])
    return written


def knob_curves(datasets: list[str], ours: dict[str, dict]) -> dict[str, dict]:
    """For every method's runtime knob and dataset: the published points of the rows it declares and ours."""
    curves = {}
    for method in list_methods():
        cls = method_class(method)
        for knob in cls.knobs:
            rows = {row: settings.get(knob.name) for row, settings in cls.published.items()}
            for d in datasets:
                pub = [(rows[p["label"]], p["fps"], p["miou"]) for p in published.points(d)
                       if rows.get(p["label"]) is not None]
                mine = [(dict(s)[knob.name], _number(r["fps"]), _number(r["headline"]))
                        for (m, s), r in ours[d]["rows"].items() if m == method and knob.name in dict(s)
                        and _number(r["fps"]) is not None and _number(r["headline"]) is not None]
                if pub or mine:
                    curves[f"{d}: {display_name(method)} {knob.title} sweep"] = {
                        "dataset": d, "knob": knob.title, "published": sorted(set(pub)), "ours": mine}
    return curves
