"""Checkpoints: atomic writes, safe loading and rebuilding a trained model, shared by the stages that use them.

Checkpoints hold plain tensors, numbers, strings and containers only, so they load with `weights_only=True`: a
planted file cannot run code. A file that cannot be read (truncated, corrupt, not ours) is a `CheckpointError`
naming the file and the fix, never a traceback.
"""
from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path

import torch

from methods import build_method
from pipelines.config import Config, ConfigError, full_model_config
from pipelines.paths import final_checkpoint


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file and the fix."""


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temp file in the same folder, then rename: a crash never corrupts the last good one, and a failed
    write (full disk, read-only folder) leaves no temp file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        fix = "free disk space" if exc.errno == errno.ENOSPC else "make the folder writable or set checkpoint_root"
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}; {fix} "
                              "(the previous checkpoint, if any, is intact)") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint written by `save_checkpoint`, loaded with weights_only=True (no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason}); delete it and train again") from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a uhrbench checkpoint (no {', '.join(missing)}); delete it or move it "
                              "out of the checkpoint folder, and train again")
    return state


def load_trained(config: Config, dataset: str, method: str, overrides: dict | None = None,
                 device: torch.device | str = "cpu"):
    """Rebuild the trained model from its final checkpoint (the config it was trained with, plus
    runtime overrides such as RUE's K). Returns (model in eval mode, checkpoint, model config)."""
    path = final_checkpoint(config, dataset, method)
    if not path.is_file():
        raise ConfigError(f"no trained model at {path}; run `python bench.py train --dataset {dataset} "
                          f"--method {method}` (or `dvc repro`) first")
    checkpoint = load_checkpoint(path, ("method", "model", "model_config", "num_classes", "ignore_index"))
    model_cfg = full_model_config(checkpoint["method"], {**checkpoint["model_config"], **(overrides or {})})
    model = build_method(checkpoint["method"], checkpoint["num_classes"], ignore_index=checkpoint["ignore_index"],
                         **model_cfg)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {checkpoint['method']} as configured "
                              f"({str(exc).splitlines()[0][:160]}); delete it and train again") from None
    return model.to(device).eval(), checkpoint, model_cfg


def load_official_model(config: Config, dataset: str, method: str, path: str | Path, overrides: dict | None = None,
                        device: torch.device | str = "cpu"):
    """A checkpoint of an upstream release (the official code's file layout) in our model, built with the
    configuration of (method, dataset) (its upstream conventions, `methods.<m>.datasets.<d>`, included) plus the
    `--set` keywords; no ImageNet initialisation is fetched, the checkpoint replaces it. Returns what `load_trained`
    returns; the checkpoint part records where the weights came from."""
    from datasets import get_dataset

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no official checkpoint at {path}; pass the file (or folder) the upstream release provides")
    info = get_dataset(dataset).info
    model_cfg = full_model_config(method, {**config.method_model(method, dataset), **(overrides or {})})
    for key in model_cfg:  # `pretrained`, `<part>_pretrained`: initialisations the checkpoint overwrites
        if key == "pretrained" or key.endswith("_pretrained"):
            model_cfg[key] = False
    model = build_method(method, info.num_classes, ignore_index=info.ignore_index, **model_cfg)
    model.load_official(str(path))
    checkpoint = {"profile": config.profile, "params_hash": config.params_hash(method, dataset),
                  "mlflow_run_id": "", "official_checkpoint": str(path.resolve())}
    return model.to(device).eval(), checkpoint, model_cfg


def describe(config: Config, dataset: str, method: str) -> str:
    """`bench.py config`: the resolved configuration as YAML, with the override order it came from; evaluation and
    measurement show the trained checkpoint's model where one exists."""
    import yaml

    from datasets import get_dataset
    from methods import resolve_method_name

    get_dataset(dataset)
    method = resolve_method_name(method)
    final = final_checkpoint(config, dataset, method)
    trained = (load_checkpoint(final, ("model_config",))["model_config"], str(final)) if final.is_file() else None

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    resolved = plain(config.resolved(method, dataset, trained))
    header = (f"# uhrbench configuration of {method} on {dataset}, profile {config.profile}, from {config.path}\n"
              f"# override order (lowest first): {resolved.pop('override_order')}\n")
    return header + yaml.safe_dump(resolved, sort_keys=False, width=120, default_flow_style=None)
