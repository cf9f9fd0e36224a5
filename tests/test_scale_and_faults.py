"""Training at scale and surviving faults: DDP on CPU (gloo), exact resume after SIGKILL, atomic
checkpoints, and tiled evaluation of an 8192x8192 image."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, tiny_params
from PIL import Image

from pipelines import train as train_module
from pipelines.checkpoints import CheckpointError, save_checkpoint
from pipelines.config import load_config
from pipelines.paths import checkpoint_dir

pytestmark = pytest.mark.slow


def bench(*args, env=None, nproc: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(REPO / "bench.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def env(mlflow_store):
    return dict(os.environ, OMP_NUM_THREADS="1")


def three_image_dataset(root: Path) -> Path:
    """An odd number of test images, so a padded sampler would double-count one of them."""
    from datasets.synthetic import prepare

    prepare(root / "synthetic", None, image_size=96, num_images=7, splits={"train": 4, "val": 0, "test": 3},
            seed=1, workers=1, progress=False)
    return root


def test_ddp_gloo_train_and_evaluate_match_single_process(tmp_path, env):
    data = three_image_dataset(tmp_path / "data")
    params = tiny_params(tmp_path, data, iterations=2)
    raw = yaml.safe_load(params.read_text())
    raw["datasets"]["synthetic"] = {"image_size": 96, "num_images": 7, "splits": {"train": 4, "val": 0, "test": 3}}
    params.write_text(yaml.safe_dump(raw))
    common = ["--dataset", "synthetic", "--method", "local", "--params", str(params)]

    # `--nproc 2` relaunches under torchrun: two gloo processes, global batch 2 = 1 per process
    trained = bench("train", *common, "--nproc", "2", env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "synthetic" / "local" / "final.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["loss_history"]["main"]) == 2

    metrics = tmp_path / "results" / "metrics" / "synthetic" / "local.json"
    single = bench("evaluate", *common, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    one = json.loads(metrics.read_text())
    double = bench("evaluate", *common, env=env, nproc=2)
    assert double.returncode == 0, double.stderr[-2000:]
    two = json.loads(metrics.read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert one["pixels"] == two["pixels"] == 3 * 96 * 96  # every test pixel exactly once
    assert one["iou"] == two["iou"] and one["pixel_accuracy"] == two["pixel_accuracy"]


def test_ddp_training_equals_one_process_with_the_same_global_batch(tmp_path, tiny_synthetic, env):
    """Two gloo processes with one image each == one process with both (same samples, gradients averaged), to
    float tolerance; and a per-rank statistic (RUE's uncertainty means) is reduced over the ranks."""
    from ddp_worker import map_values, train_local, untrained_local

    from pipelines.distributed import DistContext
    from pipelines.evaluate import MapStats

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, str(REPO / "tests" / "ddp_worker.py"), str(tiny_synthetic), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp_weights.pt", weights_only=True)
    torch.set_num_threads(1)
    single = train_local(tiny_synthetic, 2, DistContext())
    initial = untrained_local().state_dict()
    for key, value in single.items():
        assert torch.allclose(ddp[key], value, atol=1e-5, rtol=1e-4), key
    # the steps moved the weights far more than DDP and one process differ (a rank training alone would not)
    step = torch.cat([(single[k] - initial[k]).flatten() for k in single]).norm()
    gap = torch.cat([(ddp[k] - single[k]).flatten() for k in single]).norm()
    assert step > 1e-2 and gap < 1e-3 * step, (float(step), float(gap))

    reference = MapStats("u1", (1, 2))
    for rank in (0, 1):
        reference.update(*map_values(rank))
    reduced = json.loads((tmp_path / "ddp_map.json").read_text())
    assert reduced["counts"] == reference.counts
    for key, value in reference.summary().items():
        assert reduced["summary"][key] == pytest.approx(value, rel=1e-12), key


def resume_params(tmp_path: Path, data: Path) -> Path:
    params = tiny_params(tmp_path, data, iterations=24)
    raw = yaml.safe_load(params.read_text())
    raw["train"]["deterministic"] = True
    raw["methods"]["global"]["recipes"]["smoke"].update(checkpoint_every=4, log_every=4)
    params.write_text(yaml.safe_dump(raw))
    return params


def killed_at(checkpoint: int, params: Path, method: str, env, nproc: int = 1) -> subprocess.CompletedProcess:
    """`bench.py train` SIGKILLed right after writing its `checkpoint`-th last.pt (tests/kill_after.py)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, str(REPO / "tests" / "kill_after.py"), str(checkpoint),
                           "train", "--dataset", "synthetic", "--method", method, "--params", str(params)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def check_resume_is_exact(tmp_path: Path, make_params, method: str, kill_at: int, env, nproc: int = 1) -> dict:
    """Train uninterrupted; train again killed after the `kill_at`-th checkpoint, resume; the final weights and
    loss histories must be bit-identical. Returns the interrupted checkpoint."""
    reference_dir, crash_dir = tmp_path / "reference", tmp_path / "crash"
    reference_dir.mkdir()
    crash_dir.mkdir()
    args = ["train", "--dataset", "synthetic", "--method", method, "--params"]
    done = bench(*args, str(make_params(reference_dir)), env=env, nproc=nproc)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = torch.load(reference_dir / "checkpoints" / "synthetic" / method / "final.pt", weights_only=False)

    crash_params = make_params(crash_dir)
    out_dir = crash_dir / "checkpoints" / "synthetic" / method
    killed = killed_at(kill_at, crash_params, method, env, nproc)
    assert killed.returncode != 0 and not (out_dir / "final.pt").exists(), killed.stderr[-2000:]
    interrupted = torch.load(out_dir / "last.pt", weights_only=False)

    resumed = bench(*args, str(crash_params), env=env, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out_dir / 'last.pt'}" in resumed.stderr
    final = torch.load(out_dir / "final.pt", weights_only=False)
    assert final["loss_history"] == reference["loss_history"]
    for key, value in reference["model"].items():
        assert torch.equal(final["model"][key], value), key
    assert final["mlflow_run_id"] == interrupted["mlflow_run_ids"]["main"]  # the same MLflow run goes on
    return interrupted


def test_sigkilled_training_resumes_to_identical_weights(tmp_path, tiny_synthetic, env):
    interrupted = check_resume_is_exact(tmp_path, lambda d: resume_params(d, tiny_synthetic), "global", 2, env)
    assert interrupted["position"]["iteration"] == 8  # killed right after the second checkpoint (every 4)

    # and the metrics of the two runs are the same
    metrics = {}
    for name in ("reference", "crash"):
        folder = tmp_path / name
        result = bench("evaluate", "--dataset", "synthetic", "--method", "global", "--params",
                       str(folder / "params.yaml"), env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        metrics[name] = json.loads((folder / "results" / "metrics" / "synthetic" / "global.json").read_text())
    assert metrics["reference"]["iou"] == metrics["crash"]["iou"]


def glnet_resume_params(tmp_path: Path, data: Path) -> Path:
    params = tiny_params(tmp_path, data)
    raw = yaml.safe_load(params.read_text())
    raw["train"]["deterministic"] = True
    recipe = raw["methods"]["glnet"]["recipes"]["smoke"]
    recipe.update(checkpoint_every=1)
    recipe["model"].update(global_size=64, patch_size=64, min_overlap=16, patch_batch=4)
    for phase in ("phase1", "phase2", "phase3"):
        recipe[phase].update(iterations=3, batch_size=2, log_every=1)
    params.write_text(yaml.safe_dump(raw))
    return params


def test_multi_phase_training_resumes_to_identical_weights(tmp_path, tiny_synthetic, env):
    """GLNet killed in its second phase (checkpoints after steps 1 and 2 of each 3-step phase: the 3rd is phase 2,
    step 1) resumes there, with phase 1's result and the optimizer state of phase 2, to the same weights."""
    interrupted = check_resume_is_exact(tmp_path, lambda d: glnet_resume_params(d, tiny_synthetic), "glnet", 3, env)
    assert interrupted["phase"] == "global2local" and interrupted["position"]["iteration"] == 1


def test_ddp_training_resumes_to_identical_weights(tmp_path, tiny_synthetic, env):
    """Two gloo processes, rank 0 killed after the second checkpoint: the resumed DDP run ends bit-identical to an
    uninterrupted DDP run."""
    interrupted = check_resume_is_exact(tmp_path, lambda d: resume_params(d, tiny_synthetic), "global", 2, env,
                                        nproc=2)
    assert interrupted["world_size"] == 2 and interrupted["position"]["iteration"] == 8


def test_other_configuration_does_not_resume(tmp_path, tiny_synthetic, mlflow_store):
    params = resume_params(tmp_path, tiny_synthetic)
    stale = tmp_path / "checkpoints" / "synthetic" / "global" / "last.pt"
    save_checkpoint(stale, {"params_hash": "something-else", "world_size": 1})
    config = load_config(params, ["methods.global.recipes.smoke.iterations=2"])
    final = torch.load(train_module.train(config, "synthetic", "global"), weights_only=False)
    assert len(final["loss_history"]["main"]) == 2 and not stale.exists()


def test_crash_during_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"iteration": 4, "weights": torch.ones(3)})

    def dies_half_way(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(train_module.torch, "save", dies_half_way)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*last.pt: disk full"):
        save_checkpoint(path, {"iteration": 8, "weights": torch.zeros(3)})
    monkeypatch.undo()
    kept = torch.load(path, weights_only=False)
    assert kept["iteration"] == 4 and torch.equal(kept["weights"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_tiled_evaluation_of_an_8192_image_stays_within_ram(tmp_path, tiny_synthetic, env):
    # one 8192x8192 test image (a 1024 synthetic tile repeated 8x8), a trained global model, tiled inference
    from datasets.base import write_split
    from datasets.synthetic import generate_image

    root = tmp_path / "data" / "synthetic"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image, label = generate_image(1024, 3, 0)
    Image.fromarray(np.tile(image, (8, 8, 1))).save(root / "images" / "huge.png", compress_level=1)
    Image.fromarray(np.tile(label, (8, 8))).save(root / "labels" / "huge.png", compress_level=1)
    for split in ("train", "val"):
        write_split(root, split, [])
    write_split(root, "test", ["huge"])
    (root / "meta.json").write_text(json.dumps({"dataset": "synthetic"}))

    params = tiny_params(tmp_path, tmp_path / "data")
    config = load_config(params)
    model_dir = checkpoint_dir(config, "synthetic", "global")
    (tmp_path / "train").mkdir()
    source = tiny_params(tmp_path / "train", tiny_synthetic, iterations=2)
    env = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    trained = bench("train", "--dataset", "synthetic", "--method", "global", "--params", str(source), env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    model_dir.mkdir(parents=True)
    os.replace(tmp_path / "train" / "checkpoints" / "synthetic" / "global" / "final.pt", model_dir / "final.pt")

    probe = (f"import resource, runpy, sys; sys.argv = ['bench.py', 'evaluate', '--dataset', 'synthetic', "
             f"'--method', 'global', '--params', {str(params)!r}, '--set', 'evaluate.tile_size=2048', "
             f"'--set', 'evaluate.tile_overlap=128'];\n"
             "try:\n    runpy.run_path('bench.py', run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_gb = int(result.stdout.split("PEAK_KB")[1]) / 2**20
    metrics = json.loads((tmp_path / "results" / "metrics" / "synthetic" / "global.json").read_text())
    assert metrics["pixels"] == 8192 * 8192 and metrics["tile"] == "2048/128"
    assert peak_gb < 8, f"peak RSS {peak_gb:.1f} GB"
