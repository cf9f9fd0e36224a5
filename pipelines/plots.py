"""Report plots in results/plots/: accuracy vs FPS (memory as marker size), accuracy vs FPS as a method's runtime
knob varies (RUE's K), and latency / memory vs input megapixels. Each plot function returns the data it drew, so
tests can count the points."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from methods import display_name, list_methods, method_class
from pipelines import published
from pipelines.config import Config
from pipelines.paths import size_sweep_stem


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and not pd.isna(value) \
        else None


def published_points(dataset: str) -> list[dict]:
    """Every published (mIoU, FPS, memory) point of a dataset (pipelines/published.py `points`)."""
    return published.points(dataset)


def our_points(ours: dict) -> list[dict]:
    """Our measured points (headline and FPS both measured) from report.our_results()."""
    out = []
    for (method, settings), row in sorted(ours["rows"].items(), key=published.row_order):
        miou, fps = _number(row["headline"]), _number(row["fps"])
        if miou is None or fps is None:
            continue
        out.append({"label": published.settings_label(method, settings, display_name(method)), "miou": miou,
                    "fps": fps, "memory": _number(row["memory"]), "source": "ours"})
    return out


def _metric_label(dataset: str) -> str:
    return f"{published.headline_label(dataset)} (%)"


def _size(memory: float | None) -> float:
    return 40.0 if memory is None else 20.0 + 120.0 * memory / 2000.0  # area ∝ MB; 2000 MB ≈ 140 pt²


def accuracy_vs_fps(panels: dict[str, list[dict]], path: Path) -> dict[str, list[dict]]:
    """One panel per dataset: mIoU (%) vs FPS (log), marker area ∝ memory (MB); published = blue circles,
    ours = red diamonds; hollow markers where the memory is unknown."""
    plt = _plt()
    names = list(panels)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 5 * rows), squeeze=False)
    style = {"published": dict(marker="o", color="tab:blue"), "ours": dict(marker="D", color="tab:red")}
    for ax, dataset in zip(axes.flat, names, strict=False):
        for source in ("published", "ours"):
            pts = [p for p in panels[dataset] if p["source"] == source]
            for known in (True, False):
                sub = [p for p in pts if (p["memory"] is not None) == known]
                if not sub:
                    continue
                colour = style[source]["color"]
                ax.scatter([p["fps"] for p in sub], [p["miou"] for p in sub], s=[_size(p["memory"]) for p in sub],
                           marker=style[source]["marker"], edgecolors=colour, linewidths=1.2,
                           facecolors=colour if known else "none", alpha=0.75,
                           label=f"{source}" + ("" if known else " (memory unknown)"))
            for p in pts:
                ax.annotate(p["label"], (p["fps"], p["miou"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if any(p["fps"] > 0 for p in panels[dataset]):
            ax.set_xscale("log")
        ax.set_xlabel("FPS (images/s, batch 1; log scale)")
        ax.set_ylabel(_metric_label(dataset))
        ax.set_title(f"{dataset}: accuracy vs speed (marker area ∝ memory, MB)")
        ax.grid(alpha=0.3, which="both")
        if panels[dataset]:
            ax.legend(fontsize=7, loc="lower right", markerscale=0.7)
        else:
            ax.text(0.5, 0.5, "no points", transform=ax.transAxes, ha="center")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.text(0.01, 0.005, "Published FPS are not hardware-normalised and most likely at 0.8x input; "
             "published memory definitions differ (results/README.md).", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return panels


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


def all_plots(config: Config) -> list[Path]:
    """Every report plot into results/plots/ (accuracy vs FPS, knob sweeps, latency/memory vs megapixels)."""
    out_dir = config.results_root / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    with_tables = [spec["dataset"] for spec in published.tables().values()]
    datasets = list(dict.fromkeys([*with_tables, *config.benchmark_datasets]))
    ours = {d: published.with_sweeps(published.our_results(d), d, config) for d in datasets}
    panels = {d: published_points(d) + our_points(ours[d]) for d in datasets}
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
    return written


def knob_curves(datasets: list[str], ours: dict[str, dict]) -> dict[str, dict]:
    """For every method's runtime knob and dataset: the published points of the rows it declares and ours."""
    curves = {}
    for method in list_methods():
        cls = method_class(method)
        for knob in cls.knobs:
            rows = {row: dict(settings).get(knob.name) for row, settings in cls.published.items()}
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
