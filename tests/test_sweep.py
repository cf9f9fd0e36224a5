"""The knob sweep: evaluate + measure a trained RUE at several K; table, plot, MLflow; defaults untouched."""
import json

import mlflow
import pandas as pd
import pytest
from conftest import tiny_params
from PIL import Image

from pipelines.config import ConfigError, load_config
from pipelines.sweep import choose_knob, parse_values, sweep
from pipelines.train import train

RUE_TINY = ["methods.rue.recipes.smoke.iterations=2", "methods.rue.recipes.smoke.crop_size=64",
            "methods.rue.recipes.smoke.model.patch_num=2", "methods.rue.recipes.smoke.model.train_patch_num=2",
            "measure.warmup.cpu=0", "measure.iterations.cpu=1", "measure.max_images=1"]


def test_parse_values():
    k = choose_knob("rue", None)
    assert k.name == "k" and parse_values("1.0,0.75, 0.5", k) == [1.0, 0.75, 0.5]
    assert parse_values(None, k) == [1.0, 0.75, 0.5, 0.25]  # the knob's declared sweep
    for bad in ("", "0,1", "1.5", "a,b"):
        with pytest.raises(ConfigError):
            parse_values(bad, k)
    with pytest.raises(ConfigError, match="no runtime knob 'p'"):
        choose_knob("rue", "p")


def test_method_without_knob_is_refused(tmp_path, tiny_synthetic):
    config = load_config(tiny_params(tmp_path, tiny_synthetic))
    with pytest.raises(ConfigError, match="declares no runtime knob"):
        sweep(config, "synthetic", "global", [1.0])


def test_sweep_writes_table_plot_and_mlflow(tmp_path, tiny_synthetic, mlflow_store):
    config = load_config(tiny_params(tmp_path, tiny_synthetic), RUE_TINY)
    train(config, "synthetic", "rue")
    table = sweep(config, "synthetic", "rue", [1.0, 0.5])
    assert list(table["K"]) == [1.0, 0.5]
    assert table["mIoU"].between(0, 100).all() and (table["FPS"] > 0).all()

    out = tmp_path / "results" / "sweeps" / "synthetic"
    assert pd.read_csv(out / "rue_k.csv")["K"].tolist() == [1.0, 0.5]
    with Image.open(out / "rue_k.png") as png:
        assert png.format == "PNG" and png.width > 100
    # the variants are labelled files; the default (DVC-tracked) results are not overwritten
    metrics = tmp_path / "results" / "metrics" / "synthetic"
    assert sorted(p.name for p in metrics.iterdir()) == ["rue__k0.5.json", "rue__k0.5.per_image.npz", "rue__k1.json",
                                                         "rue__k1.per_image.npz"]
    scored = json.loads((metrics / "rue__k1.json").read_text())  # RUE's declared uncertainty output, summarised
    assert 0 <= scored["uncertainty_fine_mean"] <= 1 and 0 <= scored["uncertainty_region_mean"] <= 1
    measured = tmp_path / "results" / "measure" / "synthetic"
    assert sorted(p.name for p in measured.iterdir() if p.suffix == ".json") == ["rue__k0.5.json", "rue__k1.json"]

    client = mlflow.tracking.MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("uhrbench-synthetic")
    run = client.search_runs([experiment.experiment_id], "tags.stage = 'sweep'")[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "miou")] == [100, 50]
    evaluations = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    assert sorted(r.data.tags["variant"] for r in evaluations) == ["k0.5", "k1"]
