"""K sweep: accuracy against speed as a method's runtime share of refined patches varies (RUE's K).

For each K the trained model is evaluated and measured with `k` overridden (a labelled variant, so
the default results stay untouched); the table (md, csv) and the accuracy-vs-FPS curve (png, as
in the upstream README's figure) go to `results/sweeps/<dataset>/` and to one MLflow run.
"""
from __future__ import annotations

import pandas as pd
from tabulate import tabulate

from methods import resolve_method_name
from pipelines import tracking
from pipelines.config import Config, ConfigError
from pipelines.evaluate import evaluate
from pipelines.measure import measure


def parse_ks(text: str) -> list[float]:
    try:
        ks = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--k '{text}' must be comma-separated numbers in (0, 1], e.g. 1.0,0.75,0.5,0.25") from None
    if not ks or any(not 0 < k <= 1 for k in ks):
        raise ConfigError(f"--k '{text}': every K must lie in (0, 1]")
    return ks


def sweep(config: Config, dataset: str, method: str, ks: list[float], device: str = "auto") -> pd.DataFrame:
    method = resolve_method_name(method)
    if "k" not in config.method_model(method, dataset):
        raise ConfigError(f"method '{method}' has no runtime K (no `k` in methods.{method}.model); "
                          "the sweep applies to RUE-like methods")
    rows = []
    for k in ks:
        accuracy = evaluate(config, dataset, method, device=device, overrides={"k": k})
        speed = measure(config, dataset, method, device=None if device == "auto" else device, overrides={"k": k})
        rows.append({"K": k, "mIoU": 100 * accuracy["miou"], "headline": 100 * accuracy["headline_value"],
                     "FPS": speed["fps"], "latency p50 (ms)": speed["latency_ms_median"],
                     "latency p90 (ms)": speed["latency_ms_p90"], "GMACs": speed.get("gmacs"),
                     "device": speed["device_name"], "input": speed["input_size"]})
    table = pd.DataFrame(rows)
    out_dir = config.results_root / "sweeps" / dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{method}_k"
    table.to_csv(f"{stem}.csv", index=False)
    with open(f"{stem}.md", "w") as handle:
        handle.write(tabulate(table.values.tolist(), headers=list(table.columns), tablefmt="github",
                              floatfmt=".2f") + "\n")
    plot(table, f"{stem}.png", method, dataset)
    with tracking.tracked_run(dataset, method, "sweep", config.profile, config.params_hash(method, dataset)):
        import mlflow

        for row in rows:
            step = round(100 * row["K"])
            mlflow.log_metrics({"miou": row["mIoU"], "fps": row["FPS"], "latency_ms_median": row["latency p50 (ms)"]},
                               step=step)
        for ext in ("csv", "md", "png"):
            mlflow.log_artifact(f"{stem}.{ext}")
    return table


def plot(table: pd.DataFrame, path: str, method: str, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    ax.plot(table["FPS"], table["mIoU"], marker="o")
    for _, row in table.iterrows():
        ax.annotate(f"K={row['K']:g}", (row["FPS"], row["mIoU"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(f"FPS (images/s, batch 1, {table['input'].iloc[0]}, {table['device'].iloc[0]})")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"{method} on {dataset}: accuracy vs speed as K varies")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
