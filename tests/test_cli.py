"""The CLI: discovery commands and one-line errors (never a traceback)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO, tiny_params

from bench import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_list_shows_methods_and_datasets():
    result = run("list")
    assert result.exit_code == 0
    assert "global" in result.output and "local" in result.output and "synthetic" in result.output


def test_env_reports_device_and_versions():
    result = run("env")
    assert result.exit_code == 0
    for key in ("device", "torch", "timm", "git_commit", "cpu_model", "mlflow_tracking_uri"):
        assert key in result.output


def test_unknown_method(tmp_path, tiny_synthetic):
    params = tiny_params(tmp_path, tiny_synthetic)
    assert_one_line_error(run("train", "--dataset", "synthetic", "--method", "nope", "--params", str(params)),
                          "unknown method 'nope'", "bench.py list")


def test_unknown_dataset(tmp_path, tiny_synthetic):
    params = tiny_params(tmp_path, tiny_synthetic)
    assert_one_line_error(run("prepare", "--dataset", "nope", "--params", str(params)), "unknown dataset 'nope'")


def test_missing_prepared_dataset(tmp_path):
    params = tiny_params(tmp_path, tmp_path / "empty")
    assert_one_line_error(run("train", "--dataset", "synthetic", "--method", "global", "--params", str(params)),
                          "bench.py prepare --dataset synthetic")


@pytest.mark.parametrize("text, fragment", [
    ("profile: smoke\nbenchmark: [unclosed\n", "not valid YAML at line"),
    ("- a list\n", "mapping at top level"),
    ("profile: smoke\n", "missing the top-level key"),
])
def test_malformed_params(tmp_path, text, fragment):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert_one_line_error(run("train", "--dataset", "synthetic", "--method", "global", "--params", str(path)),
                          fragment)


def test_bad_recipe_value(tmp_path, tiny_synthetic):
    params = tiny_params(tmp_path, tiny_synthetic)
    raw = yaml.safe_load(Path(params).read_text())
    raw["methods"]["global"]["recipes"]["smoke"]["optimizer"] = "lbfgs"
    Path(params).write_text(yaml.safe_dump(raw))
    assert_one_line_error(run("train", "--dataset", "synthetic", "--method", "global", "--params", str(params)),
                          "methods.global.recipes.smoke.optimizer")


def test_set_override_reaches_the_model_config(tmp_path, tiny_synthetic):
    from pipelines.config import load_config

    params = tiny_params(tmp_path, tiny_synthetic)
    config = load_config(params, ["local.window=96", "profile=smoke", "methods.local.model.window_batch=2",
                                  "global.downsample=2"])
    assert config.method_model("local")["window"] == 96
    assert config.model_overrides("local") == {"window": 96, "window_batch": 2}


def test_real_process_prints_one_line(tmp_path):
    # through a real interpreter too: the exit code and stderr a shell user sees
    out = subprocess.run([sys.executable, "bench.py", "compare", "--dataset", "nope"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: unknown dataset 'nope'; registered datasets: ")
    assert "synthetic" in lines[0] and lines[0].endswith("(see `python bench.py list`)")
