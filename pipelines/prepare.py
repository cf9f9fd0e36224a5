"""Prepare stage: obtain, verify and convert a dataset into the prepared layout."""
from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

from datasets import get_dataset
from pipelines.config import Config, ConfigError


def prepare(config: Config, dataset: str, source: str | None = None, progress: bool = True, force: bool = False,
            allow_incomplete: bool = False) -> dict:
    """`source`, `force` and `allow_incomplete` come from the CLI or, failing that, from the datasets.<name> block."""
    entry = get_dataset(dataset)
    out_dir = config.data_root / dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    params = config.dataset_params(dataset)
    param_source = params.pop("source", None)
    if not source and param_source:  # a relative path in params.yaml is relative to the repository, like data_root
        source = str(config.root / Path(param_source).expanduser())
    flags = {"force": bool(params.pop("force", False)) or force,
             "allow_incomplete": bool(params.pop("allow_incomplete", False)) or allow_incomplete}
    accepted = inspect.signature(entry.prepare).parameters
    params.update({k: v for k, v in flags.items() if k in accepted})
    source_path = Path(source).expanduser() if source else None
    # --force over a prepared dataset: build and verify beside it, swap only on success (never lose the good one)
    staging = out_dir.with_name(f".{out_dir.name}.staging") if flags["force"] and (out_dir / "meta.json").exists() \
        else None
    target = staging or out_dir
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        summary = entry.prepare(target, source_path, progress=progress, **params)
    except TypeError as exc:  # an unknown key in the params block reaches the signature
        raise ConfigError(f"datasets.{dataset} in params.yaml: {exc}; remove or rename that key") from None
    finally:
        if staging is not None and not (staging / "meta.json").exists():
            shutil.rmtree(staging, ignore_errors=True)  # failed: the prepared dataset is untouched
    if staging is not None:
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    return {"path": str(out_dir), "images": sum(1 for _ in (out_dir / "images").iterdir()), **summary}
