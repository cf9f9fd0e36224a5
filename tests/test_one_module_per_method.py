"""The house rule that keeps the benchmark growable: a method is one module plus one params block, and no pipeline
or CLI code names a method."""
from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from methods.base import _ALIASES, _REGISTRY

TOY_MODULE = '''"""Toy: one 3x3 conv on the downsampled image (a method added by one module and one params block)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Knob, Output, UHRMethod, register_method


@register_method
class Toy(UHRMethod):
    name = "toy"
    description = "one 3x3 conv on the downsampled image"
    knobs = (Knob("scale", sweep=(1.0, 0.5), bounds=(0.0, 1.0), help="input scale at inference"),)

    def __init__(self, num_classes: int, width: int = 8, scale: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        self.scale = scale
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, num_classes, 1))

    @property
    def outputs(self):
        return (Output("confidence", "uncertainty", "1 - max softmax"),)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.normalize(images), scale_factor=self.scale / 4, mode="bilinear")
        return F.interpolate(self.net(x), size=images.shape[-2:], mode="bilinear")

    def forward_train(self, images, labels):
        return {"loss_seg": F.cross_entropy(self._logits(images), labels, ignore_index=self.ignore_index)}

    def predict(self, images):
        return self._logits(images)

    def predict_output(self, images, output):
        return 1 - self._logits(images).softmax(1).amax(1, keepdim=True)
'''

TOY_PARAMS = '''
  toy:
    model: {width: 4}
    recipes:
      smoke: {use: smoke_adamw, iterations: 3, batch_size: 2, crop_size: 64}
'''


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_new_method_needs_one_module_and_one_params_block(copy_repo, tmp_path):
    repo = copy_repo
    before = _digests(repo)
    (repo / "methods" / "toy.py").write_text(TOY_MODULE)
    params = repo / "params.yaml"
    assert params.read_text().rstrip().splitlines()[-1].startswith("  "), "methods: must stay the last block"
    params.write_text(params.read_text().rstrip("\n") + "\n" + TOY_PARAMS)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tiny = ["--set", "datasets.synthetic.image_size=128", "--set", "datasets.synthetic.num_images=6",
            "--set", "datasets.synthetic.splits={train: 2, val: 2, test: 2}"]

    def bench(*args: str) -> str:
        out = subprocess.run([sys.executable, "bench.py", *args], cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    assert "toy" in bench("list")
    bench("prepare", "--dataset", "synthetic", *tiny)
    bench("train", "--dataset", "synthetic", "--method", "toy")
    assert "toy on synthetic/test: mIoU" in bench("evaluate", "--dataset", "synthetic", "--method", "toy")
    assert "toy on synthetic" in bench("measure", "--dataset", "synthetic", "--method", "toy")
    swept = bench("sweep", "--dataset", "synthetic", "--method", "toy")  # the declared knob and its values
    assert "scale" in swept and "0.5" in swept
    table = bench("compare", "--dataset", "synthetic")
    assert "toy" in table and "scale" in table
    config = bench("config", "--dataset", "synthetic", "--method", "toy", "--set", "toy.width=6")
    assert "width: 6" in config
    assert (repo / "results" / "metrics" / "synthetic" / "toy.json").is_file()
    assert (repo / "results" / "sweeps" / "synthetic" / "toy_scale.csv").is_file()

    after = _digests(repo)
    edited = {name for name in before if after.get(name) != before[name]}
    assert edited == {"params.yaml"}  # and the new module: nothing else of the repository changed


def _string_constants(path: Path):
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_pipeline_or_cli_code_names_a_method():
    names = set(_REGISTRY) | set(_ALIASES)
    found = []
    for path in [REPO / "bench.py", *sorted((REPO / "pipelines").glob("*.py"))]:
        for line, text in _string_constants(path):
            words = text.replace(".", " ").replace("_", " ").replace("/", " ").split()
            if text in names or any(w in names - {"global", "local"} for w in words):
                found.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert found == []


def test_pipeline_modules_import_each_other_without_a_cycle():
    """Stages share code through their own modules (paths, checkpoints, tables, published), never through each
    other in a circle; function-level imports count too."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "pipelines").glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipelines":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipelines."):
                deps.add(node.module.split(".")[1])
        graph[path.stem] = deps - {path.stem}

    def visit(node: str, trail: tuple[str, ...]) -> None:
        assert node not in trail, " -> ".join((*trail, node))
        for dep in graph.get(node, ()):
            visit(dep, (*trail, node))

    for module in graph:
        visit(module, ())
