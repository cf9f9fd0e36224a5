"""Report plots in results/plots/: accuracy vs FPS (memory as marker size), RUE's K-sweep curves, and latency /
memory vs input megapixels. Each plot function returns the data it drew, so tests can count the points."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from methods import display_name
from pipelines.config import Config

PUBLISHED_DATASETS = ("deepglobe", "inria", "cityscapes", "urur")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and not pd.isna(value) \
        else None


def published_points(dataset: str) -> list[dict]:
    """Every published (mIoU, FPS, memory) point of a dataset, one per method name (ISDNet's table and RUE's
    figure merged; the row with an FPS wins). Rows without a numeric FPS (e.g. "< 1") cannot be drawn."""
    from pipelines.anchors import ISDNET_TABLES, RUE_FIGURE

    points: dict[str, dict] = {}
    for anchor in (*ISDNET_TABLES.get(dataset, ()), *RUE_FIGURE.get(dataset, ())):
        if anchor.fps is None or anchor.miou is None:
            continue
        points[anchor.method] = {"label": anchor.method, "miou": anchor.miou, "fps": anchor.fps,
                                 "memory": anchor.memory_mb, "source": "published"}
    return list(points.values())


def our_points(ours: dict) -> list[dict]:
    """Our measured points (headline and FPS both measured) from report.our_results()."""
    out = []
    for (method, k), row in sorted(ours["rows"].items(), key=lambda i: (i[0][0], -(i[0][1] or 0))):
        miou, fps = _number(row["headline"]), _number(row["fps"])
        if miou is None or fps is None:
            continue
        name = display_name(method)
        out.append({"label": name if k is None else f"{name} K={k:g}", "miou": miou, "fps": fps,
                    "memory": _number(row["memory"]), "source": "ours"})
    return out


def _metric_label(dataset: str) -> str:
    from pipelines.report import _headline_label

    return f"{_headline_label(dataset)} (%)"


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


def k_sweep(curves: dict[str, dict[str, list[tuple[float, float, float]]]], path: Path) -> dict:
    """Per dataset, mIoU vs FPS as K varies; curves[dataset][source] = [(K, FPS, mIoU), ...]."""
    plt = _plt()
    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, dataset in zip(axes.flat, names, strict=False):
        for source, (marker, colour) in {"published": ("o", "tab:blue"), "ours": ("D", "tab:red")}.items():
            pts = sorted(curves[dataset].get(source, []), key=lambda t: t[1])
            if not pts:
                continue
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=marker, color=colour,
                    label=f"RUE {source}" + (" (figure readings)" if source == "published" else ""))
            for k, fps, miou in pts:
                ax.annotate(f"K={100 * k:g}%", (fps, miou), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=colour)
        ax.set_xlabel("FPS (images/s, batch 1)")
        ax.set_ylabel(_metric_label(dataset))
        ax.set_title(f"{dataset}: RUE K sweep")
        ax.grid(alpha=0.3)
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
    """Every report plot into results/plots/ (accuracy vs FPS, K sweep, latency/memory vs megapixels)."""
    from pipelines.anchors import RUE_FIGURE
    from pipelines.report import _with_sweep_csv, our_results

    out_dir = config.results_root / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = list(dict.fromkeys([*PUBLISHED_DATASETS, *config.benchmark_datasets]))
    ours = {d: our_results(d) for d in datasets}
    panels = {d: published_points(d) + our_points(ours[d]) for d in datasets}
    panels = {d: pts for d, pts in panels.items() if pts}
    written = [out_dir / "accuracy_vs_fps.png"]
    accuracy_vs_fps(panels, written[0])

    curves = {}
    for d in dict.fromkeys([*RUE_FIGURE, *config.benchmark_datasets]):
        mine = _with_sweep_csv(ours[d] if d in ours else our_results(d),
                               config.results_root / "sweeps" / d / "rue_k.csv")
        pub = [(a.k, a.fps, a.miou) for a in RUE_FIGURE.get(d, ()) if a.ours == "rue" and a.k is not None]
        our = [(k, _number(r["fps"]), _number(r["headline"])) for (m, k), r in mine["rows"].items()
               if m == "rue" and k is not None and _number(r["fps"]) is not None and _number(r["headline"]) is not None]
        if pub or our:
            curves[d] = {"published": pub, "ours": our}
    written.append(out_dir / "k_sweep.png")
    k_sweep(curves, written[-1])

    for d in config.benchmark_datasets:
        folder = config.results_root / "measure" / d
        frames = {p.name[:-len("_sweep.csv")]: pd.read_csv(p) for p in sorted(folder.glob("*_sweep.csv"))}
        if frames:
            written.append(out_dir / f"scaling_{d}.png")
            scaling(d, frames, written[-1])
    return written
