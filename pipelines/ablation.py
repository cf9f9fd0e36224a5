"""Ablation stage: the rows a method declares (`ablations`) trained and evaluated with the ordinary train /
evaluate (/ measure) stages, written in the papers' layouts with the published numbers beside ours (UHRSNet's
Table III, ISDNet's Tables 5-7): results/ablations/<method>_<dataset>.{csv,md} (the csv holds our scores;
`bench.py tables` reads it).

Each row is the same params.yaml with the row's model keywords as `--set` overrides (the last word in the override
order), its own checkpoint and results folders under `ablation/`, and MLflow runs labelled `variant=ablation-<row>`,
so nothing of the main run is overwritten or mistaken for it. A row whose final checkpoint already matches its
parameters is not trained again. With several seeds every row is trained once per seed and the table gives mean and
standard deviation: on a smoke budget the rows differ by about as much as two seeds of one row do.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from methods import Ablation, display_name, method_class, resolve_method_name
from pipelines.checkpoints import CheckpointError, load_checkpoint
from pipelines.config import Config, ConfigError
from pipelines.paths import ablation_roots, ablation_scores, final_checkpoint
from pipelines.published import (
    ABLATION_VARIANT,
    ablation_notes,
    ablation_table,
    ablation_tables,
    ablation_title,
)
from pipelines.tables import format_table


def ablation_rows(method: str) -> tuple[Ablation, ...]:
    method = resolve_method_name(method)
    rows = method_class(method).ablations
    if not rows:
        raise ConfigError(f"method '{method}' declares no ablation rows (`ablations` in methods/{method}.py)")
    return rows


def row_config(config: Config, method: str, dataset: str, row: Ablation, seed: int) -> Config:
    """The params of one row and seed: the row's model keywords over everything, own checkpoint / results roots."""
    checkpoints, results = ablation_roots(config, method, dataset, row.key, seed)
    return config.with_changes([f"seed={seed}", f"checkpoint_root={checkpoints}", f"results_root={results}"],
                               {method: dict(row.model)})


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (distinct integers, order kept)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds '{text}' must be comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds '{text}' must list distinct integers, e.g. 0,1,2")
    return seeds


def ablation(config: Config, dataset: str, method: str, device: str = "auto", rows: list[str] | None = None,
             train_only: bool = False, seeds: list[int] | None = None, measure_speed: bool | None = None) -> list[Path]:
    """Train and evaluate every row (or those in `rows`) for every seed (default: params' seed), then write the
    scores of all (row, seed) pairs with a finished checkpoint and the tables. A row printed in several tables is
    trained once. `measure_speed` (default: when a published table of the method has FPS or memory) also measures
    each row's latency and memory with the measure stage's settings. Returns the written paths (none with
    train_only)."""
    from pipelines.evaluate import evaluate
    from pipelines.measure import measure
    from pipelines.train import train

    method = resolve_method_name(method)
    all_rows = unique_rows(ablation_rows(method))
    unknown = sorted(set(rows or []) - {r.key for r in all_rows})
    if unknown:
        raise ConfigError(f"unknown ablation row(s) {', '.join(unknown)}; rows: {', '.join(r.key for r in all_rows)}")
    if measure_speed is None:
        measure_speed = any({"fps", "memory"} & set(spec.get("columns", [])) for _, spec in ablation_tables(method))
    results: dict[tuple[str, int], dict] = {}
    for row in all_rows:
        for seed in seeds or [config.seed]:
            cfg = row_config(config, method, dataset, row, seed)
            final = final_checkpoint(cfg, dataset, method)
            if rows is None or row.key in rows:
                if not _up_to_date(final, cfg.params_hash(method, dataset)):
                    train(cfg, dataset, method, device)
                if train_only:
                    continue
            elif train_only or not final.is_file():
                continue
            variant = f"{ABLATION_VARIANT}{row.key}"
            results[row.key, seed] = evaluate(cfg, dataset, method, device=device, variant=variant)
            if measure_speed:
                results[row.key, seed]["speed"] = measure(cfg, dataset, method, device=device, variant=variant)
    if train_only:
        return []
    return write_scores(config, dataset, method, all_rows, results)


def unique_rows(rows: tuple[Ablation, ...]) -> list[Ablation]:
    """Each row key once (a row printed in two tables is declared twice with the same model)."""
    seen: dict[str, Ablation] = {}
    for row in rows:
        if row.key in seen and seen[row.key].model != row.model:
            raise ConfigError(f"ablation row '{row.key}' is declared twice with different models")
        seen.setdefault(row.key, row)
    return list(seen.values())


def _up_to_date(final: Path, params_hash: str) -> bool:
    if not final.is_file():
        return False
    try:
        return load_checkpoint(final).get("params_hash") == params_hash
    except CheckpointError:
        return False  # unreadable: trained again (training writes a new final.pt)


def _speed(result: dict) -> dict:
    speed = result.get("speed") or {}
    fps, memory = speed.get("fps"), speed.get("torch_max_allocated_mib")  # memory: CUDA only, as the papers'
    return {"fps": fps if isinstance(fps, (int, float)) else None,
            "memory": memory if isinstance(memory, (int, float)) else None,
            "measure_device": speed.get("device_name", ""), "input_size": speed.get("input_size", "")}


def write_scores(config: Config, dataset: str, method: str, rows: list[Ablation],
                 results: dict[tuple[str, int], dict]) -> list[Path]:
    """results/ablations/<method>_<dataset>.csv (one line per evaluated row and seed: switches, mIoU, the mIoU of
    each secondary output, FPS and memory when measured, per-class IoU, MLflow run) and .md (each of the paper's
    tables in its layout, published beside ours)."""
    lines = []
    for row in rows:
        for (key, seed), r in sorted(results.items()):
            if key != row.key:
                continue
            outputs = {f"miou_{name}_output": s["miou"] for name, s in r.get("outputs", {}).items()}
            speed = _speed(r) if "speed" in r else {}
            lines.append({"row": key, "configuration": row.label, **row.model, "seed": seed, "miou": r["miou"],
                          **outputs, **speed, **{f"iou.{name}": v for name, v in r["iou"].items()},
                          "profile": r["profile"], "split": r["split"], "mlflow_run_id": r["mlflow_run_id"]})
    csv_path = ablation_scores(config, method, dataset)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(lines).to_csv(csv_path, index=False)
    split = config.section("evaluate")["split"]
    text = [f"# {display_name(method)}: ablation on {dataset}\n",
            f"Ours: profile `{config.profile}`, mIoU over the dataset's counted classes from one confusion matrix over "
            f"the `{split}` split; every row trained with the same recipe and seeds (methods/{method}.py); FPS and "
            f"memory (torch peak allocated, MiB; CUDA only) from the measure stage's settings. "
            f"Per-class IoU and MLflow runs: {csv_path.name}.\n"]
    for table, _ in ablation_tables(method):
        frame = ablation_table(method, dataset, csv_path, table)
        text += [f"## {ablation_title(method, table)}\n", format_table(frame, "md", numparse=False)]
        text += [f"- {note}" for note in ablation_notes(method, table, dataset)] + [""]
    md_path = csv_path.with_suffix(".md")
    md_path.write_text("\n".join(text) + "\n")
    return [md_path, csv_path]
