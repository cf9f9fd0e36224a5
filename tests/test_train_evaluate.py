"""Training, evaluation and MLflow logging on the tiny synthetic dataset."""
import json

import mlflow
import pytest
import torch
from conftest import tiny_params

from pipelines.config import ConfigError, Recipe, load_config
from pipelines.evaluate import evaluate
from pipelines.train import build_scheduler, train


def test_poly_schedule_matches_mmseg_formula():
    recipe = Recipe.from_dict({"iterations": 100, "batch_size": 1, "lr": 0.01,
                               "schedule": {"name": "poly", "power": 0.9, "min_lr": 1e-4}}, "r")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = build_scheduler(recipe, optimizer)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    expected = (0.01 - 1e-4) * (1 - 50 / 100) ** 0.9 + 1e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_short_training_run_loss_falls_and_is_tracked(tmp_path, tiny_synthetic, mlflow_store):
    config = load_config(tiny_params(tmp_path, tiny_synthetic, iterations=60))
    path = train(config, "synthetic", "local")
    checkpoint = torch.load(path, weights_only=False)
    losses = checkpoint["loss_history"]["main"]
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"

    # the run is in the MLflow store, tagged and with the logged loss curve
    client = mlflow.tracking.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("uhrbench-synthetic")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["method"] == "local" and run.data.tags["profile"] == "smoke"
    assert run.data.tags["git_commit"] and run.data.tags["params_hash"] == config.params_hash("local", "synthetic")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(5, 61, 5))
    assert run.data.params["model.window"] == "64"

    result = evaluate(config, "synthetic", "local")
    saved = json.loads((tmp_path / "results" / "metrics" / "synthetic" / "local.json").read_text())
    assert saved["miou"] == pytest.approx(result["miou"])
    assert set(saved["iou"]) == {"unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren"}
    assert saved["counted_classes"] == ["urban", "agriculture", "rangeland", "forest", "water", "barren"]
    assert saved["pixels"] == 2 * 128 * 128

    evaluation = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")[0]
    assert evaluation.data.metrics["miou"] == pytest.approx(result["miou"])
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"confusion_matrix.json", "predictions", "local.json"} <= artifacts
    matrix = mlflow.artifacts.load_dict(f"{evaluation.info.artifact_uri}/confusion_matrix.json")["matrix"]
    assert sum(map(sum, matrix)) == 2 * 128 * 128
    panels = client.list_artifacts(evaluation.info.run_id, "predictions")
    assert len(panels) == 1 and panels[0].path.endswith(".png")


def test_training_is_seeded(tmp_path, tiny_synthetic, mlflow_store):
    params = tiny_params(tmp_path, tiny_synthetic, iterations=3)
    first = torch.load(train(load_config(params), "synthetic", "global"), weights_only=False)
    second = torch.load(train(load_config(params), "synthetic", "global"), weights_only=False)
    assert first["loss_history"] == second["loss_history"]


def test_evaluate_without_checkpoint_names_the_fix(tmp_path, tiny_synthetic):
    config = load_config(tiny_params(tmp_path, tiny_synthetic))
    with pytest.raises(ConfigError, match="bench.py train --dataset synthetic --method global"):
        evaluate(config, "synthetic", "global")


def test_missing_prepared_dataset_names_the_fix(tmp_path):
    from datasets import DatasetError

    config = load_config(tiny_params(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="bench.py prepare --dataset synthetic"):
        train(config, "synthetic", "global")
