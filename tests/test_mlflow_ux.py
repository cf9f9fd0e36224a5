"""What a new user sees in MLflow: experiments that open on their runs, runs named and described, the dataset each
run read, the confusion heatmap, system metrics while training, KILLED runs on Ctrl-C or SIGTERM, and no store
created (nor MLflow's INFO lines printed) by a command that only reads."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import tiny_params
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _inputs(run) -> dict[str, object]:
    """context -> the logged dataset of a run's inputs."""
    return {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
            for d in run.inputs.dataset_inputs}


def test_train_and_evaluate_runs_for_a_cv_user(tmp_path, tiny_synthetic, mlflow_store, monkeypatch):
    from pipelines.evaluate import evaluate
    from pipelines.train import train

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")  # a few samples in a short run
    config = load_config(tiny_params(tmp_path, tiny_synthetic, iterations=5))
    train(config, "synthetic", "local", device="cpu")
    result = evaluate(config, "synthetic", "local", device="cpu")

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("uhrbench-synthetic")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    assert "bench.py compare --dataset synthetic" in experiment.tags["mlflow.note.content"]
    (trained,) = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    (scored,) = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")

    assert trained.info.run_name == "local · train · synthetic"
    assert scored.info.run_name == "local · evaluate · synthetic"
    note = trained.data.tags["mlflow.note.content"]
    assert note.startswith("Training of local on synthetic (train split): profile smoke, device cpu (")
    assert "\n" not in note
    assert scored.data.tags["mlflow.note.content"].startswith(
        "Evaluation of local on synthetic (test split): profile smoke, device cpu (")

    root = tiny_synthetic / "synthetic"
    for run, context, split, images in ((trained, "training", "train", 6), (scored, "evaluation", "test", 2)):
        (dataset,) = _inputs(run).values()
        assert list(_inputs(run)) == [context]
        assert dataset.name == f"synthetic-{split}" and dataset.digest == tracking.dataset_digest(root, split)
        assert json.loads(dataset.source)["uri"] == str(root.resolve())
        assert json.loads(dataset.profile) == {"dataset": "synthetic", "split": split, "images": images,
                                               "path": str(root.resolve())}

    # CPU and memory use sampled while training, not while evaluating
    assert any(key.startswith("system/cpu_utilization") for key in trained.data.metrics)
    assert not any(key.startswith("system/") for key in scored.data.metrics)

    # the confusion matrix as a picture beside its JSON, and in the result file the report draws it from
    artifacts = {a.path for a in client.list_artifacts(scored.info.run_id)}
    assert {"confusion_matrix.json", "confusion_matrix.png", "predictions"} <= artifacts
    png = Path(mlflow.artifacts.download_artifacts(f"{scored.info.artifact_uri}/confusion_matrix.png",
                                                   dst_path=str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results" / "metrics" / "synthetic" / "local.json").read_text())
    assert saved["confusion_matrix"]["classes"][1] == "urban"
    assert sum(map(sum, saved["confusion_matrix"]["matrix"])) == saved["pixels"] == result["pixels"]


def test_dataset_digest_follows_the_data(tmp_path, tiny_synthetic):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_synthetic / "synthetic", root)
    first = tracking.dataset_digest(root, "test")
    assert first == tracking.dataset_digest(tiny_synthetic / "synthetic", "test")  # not the path: the content
    assert tracking.dataset_digest(root, "val") != first
    test_id = (root / "splits" / "test.txt").read_text().split()[0]
    with open(root / "labels" / f"{test_id}.png", "ab") as handle:  # an edited label file
        handle.write(b"\0")
    assert tracking.dataset_digest(root, "test") != first


def test_names_and_descriptions_of_variants_and_phases():
    assert tracking.default_run_name("rue", "evaluate", "deepglobe", "k0.5") == "rue · evaluate · deepglobe · k0.5"
    assert tracking.default_run_name("rue", "evaluate", "deepglobe", "default") == "rue · evaluate · deepglobe"
    assert tracking.default_run_name("glnet", "train", "inria", phase="global") == \
        "glnet · train · inria · phase global"
    assert tracking.default_run_name("uhrsnet", "measure", "synthetic") == \
        "uhrsnet [UHRSNet-style (reconstructed)] · measure · synthetic"
    text = tracking.run_description("rue", "measure", "deepglobe", "paper",
                                    {"variant": "k0.5", "env.device": "cuda", "env.device_name": "NVIDIA H200"})
    assert text == "Speed and memory measurement of rue on deepglobe: variant k0.5, profile paper, device cuda " \
                   "(NVIDIA H200)."


def test_existing_experiment_gets_the_kind_tag_and_keeps_its_note(mlflow_store):
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("uhrbench-inria", tags={"mlflow.note.content": "my own note"})
    assert tracking.ensure_experiment("inria") == exp
    tags = client.get_experiment(exp).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"] == "my own note"


def test_keyboard_interrupt_ends_the_run_killed_and_errors_failed(mlflow_store):
    client = MlflowClient(mlflow_store)
    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run("synthetic", "global", "evaluate", "smoke") as run:
            raise KeyboardInterrupt
    assert client.get_run(run.id).info.status == "KILLED"
    with pytest.raises(RuntimeError):
        with tracking.tracked_run("synthetic", "global", "evaluate", "smoke") as run:
            raise RuntimeError("boom")
    assert client.get_run(run.id).info.status == "FAILED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the SIGTERM handler is only held while a run is open


def test_sigterm_ends_the_run_killed(mlflow_store, tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(REPO)!r})\nfrom pipelines import tracking\n"
                      "with tracking.tracked_run('synthetic', 'global', 'measure', 'smoke') as run:\n"
                      "    print(run.id, flush=True)\n    time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        run_id = process.stdout.readline().strip()
        assert run_id, process.stderr.read()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert MlflowClient(mlflow_store).get_run(run_id).info.status == "KILLED"


def test_reading_a_missing_store_neither_creates_it_nor_prints_mlflow_lines(tmp_path, monkeypatch):
    db = tmp_path / "fresh" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert tracking.finished_runs("synthetic", "evaluate").empty
    assert not db.exists() and not db.parent.exists()

    # `bench.py compare` on a fresh clone: one line, no store, no traceback
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "bench.py"), "compare", "--dataset", "synthetic"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "no finished evaluation of dataset 'synthetic'" in out.stderr
    assert "Traceback" not in out.stderr and "INFO" not in out.stderr + out.stdout
    assert not db.exists()

    # a command that writes creates the store without MLflow's or alembic's INFO lines
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                          "from pipelines import tracking; tracking.ensure_experiment('synthetic')"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert db.exists() and "INFO" not in out.stderr + out.stdout
    assert tracking.finished_runs("synthetic", "evaluate").empty  # exists now, still no runs


def test_ui_link_opens_the_runs_table(tmp_path, monkeypatch):
    """MLflow 3.17's UI follows a per-browser GenAI / model-training switch, not the experiment's kind tag: the link
    selects model training."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert tracking.ui_url("synthetic") == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    assert not db.exists()
    experiment = tracking.ensure_experiment("synthetic")
    assert tracking.ui_url("synthetic", "http://host:5001/") == \
        f"http://host:5001/#/experiments/{experiment}?workflowType=machine_learning"
