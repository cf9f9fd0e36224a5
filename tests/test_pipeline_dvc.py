"""The DVC pipeline end to end, on tiny params, in a temporary copy of the repository."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

pytestmark = pytest.mark.slow


def shrink(params: Path) -> None:
    raw = yaml.safe_load(params.read_text())
    raw["datasets"]["synthetic"] = {"image_size": 96, "num_images": 6, "splits": {"train": 2, "val": 2, "test": 2},
                                    "seed": 0}
    raw["evaluate"]["num_visualizations"] = 1
    for name in raw["benchmark"]["methods"]:
        recipe = raw["methods"][name]["recipes"]["smoke"]
        phases = [v for k, v in recipe.items() if isinstance(v, dict) and k != "model"] or [recipe]
        for phase in phases:
            phase.update(iterations=2, batch_size=2, log_every=1)
        if recipe.get("crop_size"):
            recipe["crop_size"] = 64
    raw["benchmark"]["networks"] = ["unet"]  # the generic stages too, in both inference modes
    raw["schedules"]["generic_smoke"].update(iterations=2, log_every=1, model={"window": 48, "overlap": 16})
    raw["schedules"]["generic_smoke"]["variants"]["local"].update(crop_size=64, batch_size=2)
    for name in ("global", "local"):
        raw["methods"][name].setdefault("model", {})["channels"] = 16
    raw["methods"]["local"]["model"].update(window=48, overlap=16)
    if "glnet" in raw["methods"]:
        raw["methods"]["glnet"]["recipes"]["smoke"]["model"].update(global_size=64, patch_size=48, min_overlap=8)
    if "uhrsnet" in raw["methods"]:
        raw["methods"]["uhrsnet"]["recipes"]["smoke"]["model"].update(patch_size=32, min_overlap=8, lff_margin=2)
    if "rue" in raw["methods"]:
        raw["methods"]["rue"]["recipes"]["smoke"].setdefault("model", {}).update(patch_num=2, train_patch_num=2)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def dvc(repo: Path, env: dict, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_dvc_repro_end_to_end(copy_repo, tmp_path):
    repo = copy_repo
    shrink(repo / "params.yaml")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)

    first = dvc(repo, env, "repro")
    methods = yaml.safe_load((repo / "params.yaml").read_text())["benchmark"]["methods"]
    for method in methods:
        assert f"Running stage 'train@synthetic-{method}'" in first
    for mode in ("global", "local"):
        assert f"Running stage 'train_generic@synthetic-unet-{mode}'" in first
    methods = [*methods, "unet-global", "unet-local"]  # runs, as every later stage names them
    for method in methods:
        metrics = json.loads((repo / "results" / "metrics" / "synthetic" / f"{method}.json").read_text())
        assert 0.0 <= metrics["miou"] <= 1.0 and metrics["images"] == 2
    summary = json.loads((repo / "results" / "summary.json").read_text())  # DVC's one compact metric file
    assert set(summary["synthetic"]) == set(methods)
    assert all(set(v) == {"headline", "fps"} for v in summary["synthetic"].values())
    table = (repo / "results" / "tables" / "compare_synthetic.md").read_text()
    assert all(f"| {m} " in table for m in methods)
    assert (repo / "results" / "tables" / "compare_synthetic.csv").is_file()
    assert "\\begin{tabular}" in (repo / "results" / "tables" / "compare_synthetic.tex").read_text()

    # the database is outside DVC's reach: not an output, and every stage logged to it
    assert "mlflow.db" not in (repo / "dvc.lock").read_text()
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["uhrbench-synthetic"])
    tracked = [name for name in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
               if name not in ("prepare", "report") and not name.endswith(("_generic", "_seed"))]  # no extra seeds
    stages = {f"{stage}@synthetic-{m}" for stage in tracked for m in methods[:-2]}
    stages |= {f"{stage}_generic@synthetic-{m}" for stage in tracked for m in methods[-2:]}
    assert set(runs["tags.dvc_stage"]) == stages
    assert (runs["status"] == "FINISHED").all()

    # nothing changed: nothing runs
    second = dvc(repo, env, "repro")
    assert "Running stage" not in second

    # one method's params changed: only that method's stages (and the report) run again
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["methods"]["local"]["recipes"]["smoke"]["lr"] = 0.002
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    third = dvc(repo, env, "repro")
    ran = sorted(line.split("'")[1] for line in third.splitlines() if line.startswith("Running stage"))
    assert ran == sorted(["report"] + [f"{stage}@synthetic-local" for stage in tracked])

    # one method's module edited: only that method retrains (its evaluation follows where the weights changed)
    edited = methods[-3]
    with open(repo / "methods" / f"{edited}.py", "a") as handle:
        handle.write("\n# edited\n")
    fourth = dvc(repo, env, "repro")
    ran = {line.split("'")[1] for line in fourth.splitlines() if line.startswith("Running stage")}
    assert f"train@synthetic-{edited}" in ran
    assert ran <= {"report"} | {f"{stage}@synthetic-{edited}" for stage in tracked}

    # a generic network's module edited: its runs in both inference modes retrain, nothing else
    with open(repo / "methods" / "unet.py", "a") as handle:
        handle.write("\n# edited\n")
    fifth = dvc(repo, env, "repro")
    ran = {line.split("'")[1] for line in fifth.splitlines() if line.startswith("Running stage")}
    assert {"train_generic@synthetic-unet-global", "train_generic@synthetic-unet-local"} <= ran
    assert ran <= {"report"} | {f"{stage}_generic@synthetic-unet-{mode}" for stage in tracked
                                for mode in ("global", "local")}

    # more seeds: each method once more per seed as `<method>@seed<N>`, into its own folder; seed 0's runs stay done
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["benchmark"]["extra_seeds"] = [1]
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    listed = dvc(repo, env, "stage", "list", "--name-only").split()
    assert {f"{stage}_seed@synthetic-{m}-1" for stage in ("train", "evaluate") for m in methods[:-2]} <= set(listed)
    assert {f"{stage}_generic_seed@synthetic-unet-{mode}-1" for stage in ("train", "evaluate")
            for mode in ("global", "local")} <= set(listed)  # the generic networks' seeds too
    sixth = dvc(repo, env, "repro", "evaluate_seed@synthetic-global-1")
    ran = {line.split("'")[1] for line in sixth.splitlines() if line.startswith("Running stage")}
    assert ran == {"train_seed@synthetic-global-1", "evaluate_seed@synthetic-global-1"}
    checkpoint = torch.load(repo / "checkpoints" / "synthetic" / "global@seed1" / "final.pt", weights_only=False)
    assert checkpoint["seed"] == 1
    assert (repo / "results" / "metrics" / "synthetic" / "global@seed1.per_image.npz").is_file()
