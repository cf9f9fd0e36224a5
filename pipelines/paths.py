"""Where each stage reads and writes, in one place (checkpoints, result files), so no stage imports another's."""
from __future__ import annotations

from pathlib import Path

from pipelines.config import Config


def checkpoint_dir(config: Config, dataset: str, method: str) -> Path:
    return config.checkpoint_root / dataset / method


def final_checkpoint(config: Config, dataset: str, method: str) -> Path:
    return checkpoint_dir(config, dataset, method) / "final.pt"


def _suffixed(name: str, variant: str) -> str:
    return f"{name}__{variant}" if variant else name


def metrics_file(config: Config, dataset: str, method: str, variant: str = "") -> Path:
    """Evaluation scores; the default variant's file is DVC's metric."""
    return config.results_root / "metrics" / dataset / f"{_suffixed(method, variant)}.json"


def per_image_file(config: Config, dataset: str, method: str, variant: str = "") -> Path:
    """The evaluation's per-image confusion matrices (npz), beside its scores."""
    return config.results_root / "metrics" / dataset / f"{_suffixed(method, variant)}.per_image.npz"


def measure_file(config: Config, dataset: str, method: str, variant: str = "") -> Path:
    return config.results_root / "measure" / dataset / f"{_suffixed(method, variant)}.json"


def size_sweep_stem(config: Config, dataset: str, method: str, variant: str = "") -> Path:
    """Latency / memory vs input size (+ .csv, .png)."""
    return config.results_root / "measure" / dataset / f"{_suffixed(method, variant)}_sweep"


def knob_sweep_stem(config: Config, dataset: str, method: str, knob: str) -> Path:
    """Accuracy vs speed as a runtime knob varies (+ .csv, .md, .png)."""
    return config.results_root / "sweeps" / dataset / f"{method}_{knob}"


def ablation_scores(config: Config, method: str, dataset: str) -> Path:
    """`bench.py ablation`'s scores (+ .md): outside results/tables, which the report stage owns and clears."""
    return config.results_root / "ablations" / f"{method}_{dataset}.csv"


def ablation_roots(config: Config, method: str, dataset: str, row: str, seed: int) -> tuple[Path, Path]:
    """(checkpoint root, results root) of one ablation row and seed: nothing of the main run is overwritten."""
    base = Path("ablation") / method / dataset / row / f"seed{seed}"
    return config.checkpoint_root / base, config.results_root / base
