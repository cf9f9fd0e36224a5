"""Checkpoints: atomic writes and rebuilding a trained model, shared by the stages that train and read them."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from methods import build_method
from pipelines.config import Config, ConfigError, full_model_config
from pipelines.paths import final_checkpoint


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temp file in the same folder, then rename: a crash never corrupts the last good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_trained(config: Config, dataset: str, method: str, overrides: dict | None = None,
                 device: torch.device | str = "cpu"):
    """Rebuild the trained model from its final checkpoint (the config it was trained with, plus
    runtime overrides such as RUE's K). Returns (model in eval mode, checkpoint, model config)."""
    path = final_checkpoint(config, dataset, method)
    if not path.is_file():
        raise ConfigError(f"no trained model at {path}; run `python bench.py train --dataset {dataset} "
                          f"--method {method}` (or `dvc repro`) first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model_cfg = full_model_config(checkpoint["method"], {**checkpoint["model_config"], **(overrides or {})})
    model = build_method(checkpoint["method"], checkpoint["num_classes"], ignore_index=checkpoint["ignore_index"],
                         **model_cfg)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint, model_cfg
