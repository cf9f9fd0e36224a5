"""Knob sweep: accuracy against speed as one of a method's declared runtime knobs varies (RUE's K).

For each value the trained model is evaluated and measured with the knob overridden (a labelled variant, so
the default results stay untouched); the table (md, csv) and the accuracy-vs-FPS curve (png) go to
`results/sweeps/<dataset>/<method>_<knob>.*` and to one MLflow run.
"""
from __future__ import annotations

import pandas as pd

from methods import method_class, resolve_method_name
from pipelines import tracking
from pipelines.config import Config, ConfigError
from pipelines.evaluate import evaluate
from pipelines.measure import measure
from pipelines.paths import knob_sweep_stem
from pipelines.tables import format_table


def choose_knob(method: str, name: str | None):
    """The method's declared knob `name` (default: its first)."""
    knobs = method_class(method).knobs
    if not knobs:
        raise ConfigError(f"method '{method}' declares no runtime knob to sweep (`knobs` in methods/{method}.py)")
    if name is None:
        return knobs[0]
    for knob in knobs:
        if knob.name == name:
            return knob
    raise ConfigError(f"method '{method}' has no runtime knob '{name}'; its knobs: "
                      f"{', '.join(k.name for k in knobs)}")


def parse_values(text: str | None, knob) -> list[float]:
    """'1,0.5' -> [1.0, 0.5]; None -> the knob's declared sweep."""
    if text is None:
        return list(knob.sweep)
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--values '{text}' must be comma-separated numbers, e.g. "
                          f"{','.join(f'{v:g}' for v in knob.sweep)}") from None
    if not values:
        raise ConfigError(f"--values '{text}' names no value")
    for value in values:
        try:
            knob.check(value)
        except ValueError as exc:
            raise ConfigError(f"--values '{text}': {exc}") from None
    return values


def sweep(config: Config, dataset: str, method: str, values: list[float] | None = None, device: str = "auto",
          knob: str | None = None) -> pd.DataFrame:
    method = resolve_method_name(method)
    chosen = choose_knob(method, knob)
    values = list(chosen.sweep) if values is None else values
    rows = []
    for value in values:
        accuracy = evaluate(config, dataset, method, device=device, overrides={chosen.name: value})
        speed = measure(config, dataset, method, device=None if device == "auto" else device,
                        overrides={chosen.name: value})
        rows.append({chosen.title: value, "mIoU": 100 * accuracy["miou"], "headline": 100 * accuracy["headline_value"],
                     "FPS": speed["fps"], "latency p50 (ms)": speed["latency_ms_median"],
                     "latency p90 (ms)": speed["latency_ms_p90"], "GMACs": speed.get("gmacs"),
                     "device": speed["device_name"], "input": speed["input_size"]})
    table = pd.DataFrame(rows)
    stem = knob_sweep_stem(config, dataset, method, chosen.name)
    stem.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(stem.with_suffix(".csv"), index=False)
    stem.with_suffix(".md").write_text(format_table(table, "md"))
    plot(table, stem.with_suffix(".png"), method, dataset, chosen.title)
    with tracking.tracked_run(dataset, method, "sweep", config.profile, config.params_hash(method, dataset),
                              tags={"knob": chosen.name}) as run:
        for row in rows:
            run.metrics({"miou": row["mIoU"], "fps": row["FPS"], "latency_ms_median": row["latency p50 (ms)"]},
                        step=round(100 * row[chosen.title]))
        for ext in (".csv", ".md", ".png"):
            run.artifact(stem.with_suffix(ext))
    return table


def plot(table: pd.DataFrame, path, method: str, dataset: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    ax.plot(table["FPS"], table["mIoU"], marker="o")
    for _, row in table.iterrows():
        ax.annotate(f"{title}={row[title]:g}", (row["FPS"], row["mIoU"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(f"FPS (images/s, batch 1, {table['input'].iloc[0]}, {table['device'].iloc[0]})")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"{method} on {dataset}: accuracy vs speed as {title} varies")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
