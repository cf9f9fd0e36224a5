"""Shared fixtures and helpers: a tiny prepared synthetic dataset, a throw-away MLflow store, tiny params,
the modules a call runs."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """Point MLflow at a fresh sqlite store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A 128-px synthetic dataset (6 train / 2 val / 2 test), prepared once per session."""
    from datasets.synthetic import prepare

    root = tmp_path_factory.mktemp("data")
    prepare(root / "synthetic", None, image_size=128, num_images=10, splits={"train": 6, "val": 2, "test": 2},
            seed=0, workers=1, progress=False)
    return root


def tiny_params(tmp_path: Path, data_root: Path, iterations: int = 20) -> Path:
    """A params.yaml for fast CPU runs on the tiny dataset, written into tmp_path."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["data_root"] = str(data_root)
    raw["checkpoint_root"] = str(tmp_path / "checkpoints")
    raw["results_root"] = str(tmp_path / "results")
    raw["datasets"]["synthetic"] = {"image_size": 128, "num_images": 10, "splits": {"train": 6, "val": 2, "test": 2},
                                    "seed": 0}
    raw["evaluate"]["num_visualizations"] = 1
    raw["schedules"]["smoke_adamw"]["amp"] = None  # fp32: tests compare runs bit for bit; bf16 has its own test
    for name in ("global", "local"):
        raw["methods"][name].setdefault("model", {})["channels"] = 32
        recipe = raw["methods"][name]["recipes"]["smoke"]
        recipe.update(iterations=iterations, batch_size=2, log_every=5)
    raw["methods"]["local"]["model"].update(window=64, overlap=16)
    raw["methods"]["local"]["recipes"]["smoke"]["crop_size"] = 64
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def copy_repo(tmp_path) -> Path:
    """The tracked files of the repository copied into a temporary folder."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    dest = tmp_path / "repo"
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def ran_modules(net: torch.nn.Module, fn) -> set[str]:
    """Names of the modules that execute during fn()."""
    ran, handles = set(), []
    for name, module in net.named_modules():
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: ran.add(name)))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return ran
