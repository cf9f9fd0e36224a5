"""The first hour of a new user: `list`, `env --no-torch` and every `--help` answer without importing torch, and the
torch-free catalogue they print cannot drift from the imported registries."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

import bench
import datasets
import methods
from methods.base import _ALIASES, _REGISTRY
from pipelines import discovery, tracking
from pipelines.discovery import CatalogError, MethodEntry, dataset_catalog, method_catalog

HEAVY = ("torch", "torchvision", "timm", "numpy", "pandas", "mlflow")


def heavy_imports(*args: str) -> set[str]:
    """Top-level heavy packages `python -X importtime bench.py ARGS` imports (exit code 0 asserted)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "bench.py", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    modules = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return {m.split(".")[0] for m in modules} & set(HEAVY)


def registry_drift() -> list[str]:
    """Where the torch-free catalogue and the imported registries disagree (empty: they agree)."""
    imported = {name: MethodEntry(name, cls.description, cls.label,
                                  tuple(sorted(a for a, target in _ALIASES.items() if target == name)))
                for name, cls in _REGISTRY.items()}
    static = {name: MethodEntry(e.name, e.description, e.label, tuple(sorted(e.aliases)))
              for name, e in method_catalog().items()}
    drift = [f"method {n}: source {static.get(n)} != registry {imported.get(n)}"
             for n in sorted(set(imported) | set(static)) if static.get(n) != imported.get(n)]
    static_data, imported_data = dataset_catalog(), datasets.list_datasets()
    drift += [f"dataset {n}: source {static_data.get(n)!r} != registry {imported_data.get(n)!r}"
              for n in sorted(set(static_data) | set(imported_data)) if static_data.get(n) != imported_data.get(n)]
    return drift


def test_list_imports_no_torch_and_prints_the_registry():
    assert heavy_imports("list") == set()
    out = subprocess.run([sys.executable, "bench.py", "list"], cwd=REPO, capture_output=True, text=True, timeout=120)
    expected = ["methods:", *(f"  {n:<10} {t}" for n, t in methods.list_methods().items()),
                "datasets:", *(f"  {n:<10} {t}" for n, t in datasets.list_datasets().items())]
    assert out.stdout.splitlines() == expected
    assert "UHRSNet-style (reconstructed" in out.stdout  # a reconstruction still says so


def test_help_imports_no_torch():
    """Top-level and every command's --help, in one process: click answers them before any command body runs."""
    script = ("import json, sys\nfrom click.testing import CliRunner\nfrom bench import cli\n"
              "codes = [CliRunner().invoke(cli, args).exit_code for args in "
              "[['--help'], *([name, '--help'] for name in cli.commands)]]\n"
              "print(json.dumps([codes, sorted({m.split('.')[0] for m in sys.modules})]))")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    codes, loaded = json.loads(out.stdout)
    assert codes == [0] * (len(bench.cli.commands) + 1)
    assert set(loaded) & set(HEAVY) == set()
    assert heavy_imports("--help") == set()


def test_env_no_torch_imports_no_torch_and_agrees_with_tracking(monkeypatch):
    assert heavy_imports("env", "--no-torch") == set()
    info = discovery.environment_info()
    # torch's version read from its files without importing it equals the imported one's
    assert info["torch"] == tracking.torch.__version__
    assert info["cuda_compiled"] == (tracking.torch.version.cuda or "none")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert discovery.environment_info()["mlflow_tracking_uri"] == "sqlite:////elsewhere/mlflow.db"
    assert discovery.package_version("no-such-package-uhrbench") == "not installed"
    result = CliRunner().invoke(bench.cli, ["env", "--no-torch", "--device", "cpu"])
    assert result.exit_code == 1 and "drop --no-torch" in result.output and "Traceback" not in result.output


def test_catalogue_equals_the_imported_registry():
    assert registry_drift() == []
    assert method_catalog()["uhrsnet"].aliases == ("uhrnet",)


def test_drift_is_caught(monkeypatch):
    monkeypatch.setattr(_REGISTRY["global"], "description", "changed at import time")
    monkeypatch.setitem(_ALIASES, "glob", "global")
    assert [line.split(":")[0] for line in registry_drift()] == ["method global"]


def _toy_methods(folder: Path, body: str) -> Path:
    folder.mkdir()
    (folder / "toy.py").write_text("from methods.base import UHRMethod, register_method\n\n\n" + body)
    (folder / "_private.py").write_text("@register_method\nclass Hidden:\n    name = 'hidden'\n")
    return folder


def test_catalogue_reads_a_new_method(tmp_path):
    folder = _toy_methods(tmp_path / "m", '@base.register_method(aliases=("t", "tt"))\nclass Toy(UHRMethod):\n'
                                          '    name = "toy"\n    label: str = "Toy (reconstructed)"\n'
                                          '    description = ("one conv "\n                   "per image")\n')
    assert method_catalog(folder) == {"toy": MethodEntry("toy", "one conv per image", "Toy (reconstructed)",
                                                         ("t", "tt"))}


@pytest.mark.parametrize("body, fragment", [
    ('@register_method\nclass Toy(UHRMethod):\n    name = "toy"\n', "sets no `description`"),
    ('@register_method\nclass Toy(UHRMethod):\n    name = "toy"\n    description = f"{name}"\n', "not a literal"),
])
def test_unreadable_method_falls_back_to_the_registry(tmp_path, monkeypatch, body, fragment):
    folder = _toy_methods(tmp_path / "m", body)
    with pytest.raises(CatalogError, match=fragment):
        method_catalog(folder)
    monkeypatch.setattr(discovery, "method_catalog", lambda: method_catalog(folder))
    result = CliRunner().invoke(bench.cli, ["list"])
    assert result.exit_code == 0, result.output
    assert "toy" not in result.output and all(name in result.output for name in methods.list_methods())


def test_catalogue_reads_datasets_as_registered(tmp_path):
    (tmp_path / "a.py").write_text('INFO = DatasetInfo(name="a", description="first", class_names=())\n'
                                   'register_dataset(INFO, prepare)\n')
    (tmp_path / "b.py").write_text('base.register_dataset(DatasetInfo("b", "second"), prepare)\n')
    assert dataset_catalog(tmp_path) == {"a": "first", "b": "second"}
    (tmp_path / "c.py").write_text("register_dataset(make_info(), prepare)\n")
    with pytest.raises(CatalogError):
        dataset_catalog(tmp_path)


def test_user_errors_name_the_real_classes():
    """The wrapper finds user errors by (module, class) without importing them; each pair must still be right."""
    for module, name in bench.USER_ERRORS:
        assert issubclass(getattr(importlib.import_module(module), name), Exception)
    from pipelines.config import ConfigError
    from pipelines.train import TrainingError

    assert {ConfigError, TrainingError, methods.MethodError, datasets.DatasetError} <= set(bench.user_errors())


def test_closed_pipe_is_quiet():
    """`bench.py list | head -1`: a reader that went away is no error (exit 0, nothing on stderr)."""
    proc = subprocess.Popen([sys.executable, "bench.py", "list"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == ""
