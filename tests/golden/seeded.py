"""Deterministic weights and inputs for golden-output tests, from numpy's PCG64 (stable across torch versions).

The regeneration scripts (`make_<method>.py`) and the tests call the same functions, so a fixture needs only the
seed: every floating tensor of our model's state dict is drawn by name in sorted order, BN statistics away from
(0, 1) so that a mis-mapped or skipped normalisation shows in the logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

GOLDEN_DIR = Path(__file__).resolve().parent


def seed_weights(model: nn.Module, seed: int) -> nn.Module:
    """Fill `model`'s floating parameters and buffers in place: conv/linear weights N(0, 1/fan_in), BN weights
    U(0.5, 1.5), biases and BN running means N(0, 0.1), running variances U(0.5, 2). Returns the model."""
    rng = np.random.Generator(np.random.PCG64(seed))
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            tensor = state[name]
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            shape = tuple(tensor.shape)
            if leaf == "running_var":
                values = rng.uniform(0.5, 2.0, shape)
            elif leaf == "running_mean" or leaf == "bias":
                values = rng.normal(0.0, 0.1, shape)
            elif tensor.dim() == 1:  # norm weights
                values = rng.uniform(0.5, 1.5, shape)
            else:
                fan_in = int(np.prod(shape[1:])) or 1
                values = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
            tensor.copy_(torch.from_numpy(values.astype(np.float32)))
    return model


def seeded_image(seed: int, height: int, width: int) -> torch.Tensor:
    """(1, 3, H, W) float tensor of uint8 RGB values: smooth blobs plus noise, so that content-dependent routing
    (RUE's top-K) has a clear ranking rather than ties."""
    rng = np.random.Generator(np.random.PCG64(seed))
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.zeros((3, height, width))
    for c in range(3):
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            image[c] += rng.uniform(60, 160) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    image += rng.normal(0, 12, image.shape)
    return torch.from_numpy(np.clip(np.round(image + 40), 0, 255).astype(np.float32))[None]


def save_fixture(name: str, logits: torch.Tensor, meta: dict, stride: int = 1) -> Path:
    """Write `<name>.npz`: the official logits (1, C, H, W) every `stride` pixels as float32, the argmax of the
    full logits as uint8, and `meta` (model keywords, seeds, input size, upstream commit) as JSON."""
    logits = logits.detach().float().cpu()
    path = GOLDEN_DIR / f"{name}.npz"
    np.savez_compressed(path, logits=logits[..., ::stride, ::stride].numpy(),
                        argmax=logits.argmax(1).to(torch.uint8).numpy(), stride=np.int64(stride),
                        meta=np.array(json.dumps(meta, sort_keys=True)))
    return path


def load_fixture(name: str) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """(logits every `stride` pixels, full argmax, stride, meta) of fixture `name`."""
    with np.load(GOLDEN_DIR / f"{name}.npz") as data:
        return data["logits"], data["argmax"], int(data["stride"]), json.loads(str(data["meta"]))


def save_arrays(name: str, arrays: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `<name>.npz` holding several official float tensors (e.g. intermediate feature maps) as float32 under
    their names, plus `meta` as JSON: the variant of `save_fixture` for outputs that are not logits."""
    path = GOLDEN_DIR / f"{name}.npz"
    if "meta" in arrays:
        raise ValueError("'meta' is reserved")
    np.savez_compressed(path, **{key: value.detach().float().cpu().numpy() for key, value in arrays.items()},
                        meta=np.array(json.dumps(meta, sort_keys=True)))
    return path


def load_arrays(name: str) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays by name, meta) of a fixture written by `save_arrays`."""
    with np.load(GOLDEN_DIR / f"{name}.npz") as data:
        return {key: data[key] for key in data.files if key != "meta"}, json.loads(str(data["meta"]))
