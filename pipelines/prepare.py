"""Prepare stage: obtain, verify and convert a dataset into the prepared layout."""
from __future__ import annotations

from pathlib import Path

from datasets import get_dataset
from pipelines.config import Config, ConfigError


def prepare(config: Config, dataset: str, source: str | None = None, progress: bool = True) -> dict:
    entry = get_dataset(dataset)
    out_dir = config.data_root / dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        summary = entry.prepare(out_dir, Path(source) if source else None, progress=progress,
                                **config.dataset_params(dataset))
    except TypeError as exc:  # an unknown key in the params block reaches the signature
        raise ConfigError(f"datasets.{dataset} in params.yaml: {exc}; remove or rename that key") from None
    return {"path": str(out_dir), "images": sum(1 for _ in (out_dir / "images").iterdir()), **summary}
