"""Bad inputs and faults a user can cause: each ends in one clear line, loses nothing and writes nothing wrong.
One test per case, named after what it tries."""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal

import mlflow
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import tiny_params
from PIL import Image

from bench import cli, os_error_line
from pipelines import train as train_module
from pipelines.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from pipelines.config import load_config
from pipelines.paths import checkpoint_dir, metrics_file


def run(*args):
    return CliRunner().invoke(cli, list(args))


def one_line(result, *fragments):
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in re.split(r"[\r\n]", result.output) if line.strip() and "/s]" not in line]  # no bars
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def params_with(tmp_path, data, iterations=4, **recipe):
    params = tiny_params(tmp_path, data, iterations=iterations)
    raw = yaml.safe_load(params.read_text())
    raw["methods"]["global"]["recipes"]["smoke"].update(recipe)
    params.write_text(yaml.safe_dump(raw))
    return params


# -- checkpoints --------------------------------------------------------------------------------------------------


def test_planted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "final.pt"
    with open(path, "wb") as handle:
        pickle.dump({"model": Payload()}, handle)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_trained_checkpoints_load_with_weights_only(tmp_path, tiny_synthetic, mlflow_store):
    config = load_config(params_with(tmp_path, tiny_synthetic, iterations=4, checkpoint_every=2))
    train_module.train(config, "synthetic", "global")
    folder = checkpoint_dir(config, "synthetic", "global")
    state = torch.load(folder / "final.pt", weights_only=True)  # plain types only
    assert state["method"] == "global" and isinstance(state["model"], dict)


def test_corrupt_final_checkpoint_names_file_and_fix(tmp_path, tiny_synthetic, mlflow_store):
    params = tiny_params(tmp_path, tiny_synthetic)
    final = checkpoint_dir(load_config(params), "synthetic", "global") / "final.pt"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"PK\x03\x04 truncated")
    line = one_line(run("evaluate", "--dataset", "synthetic", "--method", "global", "--params", str(params)),
                    str(final), "delete it and train again")
    assert "Error" in line


def test_truncated_last_checkpoint_does_not_block_training(tmp_path, tiny_synthetic, mlflow_store, capsys):
    config = load_config(params_with(tmp_path, tiny_synthetic, iterations=2))
    last = checkpoint_dir(config, "synthetic", "global") / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"\x80\x04 half a checkpoint")
    final = train_module.train(config, "synthetic", "global")
    assert final.is_file() and not last.exists()
    assert last.with_name("last.pt.corrupt").read_bytes() == b"\x80\x04 half a checkpoint"  # set aside, not deleted
    assert "starting afresh" in capsys.readouterr().err


def test_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"

    def full(obj, target, *args, **kwargs):
        open(target, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="free disk space"):
        save_checkpoint(path, {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_filesystem_errors_are_one_line_with_the_file():
    assert "free disk space" in os_error_line(OSError(errno.ENOSPC, "No space left on device", "/data/x.png"))
    line = os_error_line(OSError(errno.EROFS, "Read-only file system", "/ro/results"))
    assert "/ro/results" in line and "make it writable" in line
    assert "does not exist" in os_error_line(FileNotFoundError(errno.ENOENT, "No such file", "/nope"))


# -- runs ---------------------------------------------------------------------------------------------------------


def test_second_train_of_the_same_folder_stops_with_a_message(tmp_path, tiny_synthetic, mlflow_store):
    from filelock import FileLock

    params = tiny_params(tmp_path, tiny_synthetic)
    folder = checkpoint_dir(load_config(params), "synthetic", "global")
    folder.parent.mkdir(parents=True)
    with FileLock(folder.parent / ".global.train.lock"):  # the first run holds it
        one_line(run("train", "--dataset", "synthetic", "--method", "global", "--params", str(params)),
                 "another `bench.py train` is writing", str(folder))
    assert not (folder / "final.pt").exists()


def test_sigterm_stops_after_a_checkpoint_ends_the_run_killed_and_says_where_it_resumes(
        tmp_path, tiny_synthetic, mlflow_store, monkeypatch):
    config = load_config(params_with(tmp_path, tiny_synthetic, iterations=6))
    samples = train_module.SeededSamples.__getitem__
    sent = []

    def signal_once(self, index):  # a SIGTERM arrives during the first step (deterministic, no timing)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return samples(self, index)

    monkeypatch.setattr(train_module.SeededSamples, "__getitem__", signal_once)
    with pytest.raises(train_module.TrainingInterrupted, match=r"iteration 1\).*resumes from .*last.pt.*iteration 1"):
        train_module.train(config, "synthetic", "global")
    folder = checkpoint_dir(config, "synthetic", "global")
    assert load_checkpoint(folder / "last.pt")["position"]["iteration"] == 1 and not (folder / "final.pt").exists()
    runs = mlflow.search_runs(experiment_names=["uhrbench-synthetic"])
    assert list(runs["status"]) == ["KILLED"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again

    monkeypatch.setattr(train_module.SeededSamples, "__getitem__", samples)
    final = train_module.train(config, "synthetic", "global")  # resumes in the same run and finishes it
    assert len(load_checkpoint(final)["loss_history"]["main"]) == 6
    runs = mlflow.search_runs(experiment_names=["uhrbench-synthetic"])
    assert list(runs["status"]) == ["FINISHED"]


def test_resume_after_the_mlflow_store_was_lost_continues_in_a_new_run(
        tmp_path, tiny_synthetic, mlflow_store, monkeypatch, capsys):
    config = load_config(params_with(tmp_path, tiny_synthetic, iterations=4))
    monkeypatch.setattr(train_module, "stop_on_signals", _stop_at_once)
    with pytest.raises(train_module.TrainingInterrupted):
        train_module.train(config, "synthetic", "global")
    lost = load_checkpoint(checkpoint_dir(config, "synthetic", "global") / "last.pt")["mlflow_run_ids"]["main"]
    monkeypatch.undo()
    new_store = f"sqlite:///{tmp_path / 'new-mlflow.db'}"  # mlflow.db deleted: a fresh store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_store)
    final = train_module.train(config, "synthetic", "global")
    assert "is not in" in capsys.readouterr().err
    mlflow.set_tracking_uri(new_store)
    runs = mlflow.search_runs(experiment_names=["uhrbench-synthetic"])
    assert len(runs) == 1 and runs["tags.lost_run_id"][0] == lost and runs["status"][0] == "FINISHED"
    assert len(load_checkpoint(final)["loss_history"]["main"]) == 4


class _stop_at_once:  # noqa: N801 - stands in for the context manager
    def __enter__(self):
        return {"stop": True}

    def __exit__(self, *exc):
        return False


def test_every_smoke_recipe_checkpoints_during_training():
    config = load_config()
    for method in config.benchmark_methods:
        keys = config.phase_keys(method, "synthetic") or [None]
        for key in keys:
            recipe = config.recipe(method, "synthetic", key)
            assert 0 < recipe.checkpoint_every <= 50, (method, key)  # at most ~1.5 min of CPU work lost


# -- data ---------------------------------------------------------------------------------------------------------


def test_split_with_only_ignored_labels_is_an_error_not_nan(tmp_path, tiny_synthetic, mlflow_store):
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data)
    params = tiny_params(tmp_path, data, iterations=2)
    config = load_config(params)
    train_module.train(config, "synthetic", "global")
    for name in (data / "synthetic" / "splits" / "test.txt").read_text().split():
        path = data / "synthetic" / "labels" / f"{name}.png"
        Image.fromarray(np.full_like(np.array(Image.open(path)), 255)).save(path)
    one_line(run("evaluate", "--dataset", "synthetic", "--method", "global", "--params", str(params)),
             "no labelled pixel", "labels")
    assert not metrics_file(config, "synthetic", "global").exists()


def test_synthetic_prepare_refuses_to_overwrite_without_force(tmp_path):
    params = tiny_params(tmp_path, tmp_path / "data")
    sets = ["--set", "datasets.synthetic.image_size=64", "--set", "datasets.synthetic.num_images=3",
            "--set", "datasets.synthetic.splits={train: 1, val: 1, test: 1}"]
    assert run("prepare", "--dataset", "synthetic", "--params", str(params), *sets).exit_code == 0
    before = (tmp_path / "data" / "synthetic" / "images" / "syn_0000.png").read_bytes()
    one_line(run("prepare", "--dataset", "synthetic", "--params", str(params), "--set",
                 "datasets.synthetic.image_size=96"), "already holds a prepared synthetic dataset", "--force")
    assert (tmp_path / "data" / "synthetic" / "images" / "syn_0000.png").read_bytes() == before


def test_prepare_force_keeps_the_good_dataset_when_the_new_one_fails(tmp_path, monkeypatch):
    from datasets import synthetic

    params = tiny_params(tmp_path, tmp_path / "data")
    sets = ["--set", "datasets.synthetic.image_size=64", "--set", "datasets.synthetic.num_images=3",
            "--set", "datasets.synthetic.splits={train: 1, val: 1, test: 1}", "--set", "datasets.synthetic.workers=1"]
    assert run("prepare", "--dataset", "synthetic", "--params", str(params), *sets).exit_code == 0
    out = tmp_path / "data" / "synthetic"
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}

    def broken(job):
        raise OSError(errno.ENOSPC, "No space left on device", str(job[0] / "images" / "syn_0000.png"))

    monkeypatch.setattr(synthetic, "_write_one", broken)
    one_line(run("prepare", "--dataset", "synthetic", "--force", "--params", str(params), *sets), "free disk space")
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == before
    assert json.loads((out / "meta.json").read_text())["dataset"] == "synthetic"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["synthetic"]  # no staging folder left


# -- the CLI ------------------------------------------------------------------------------------------------------


def test_unexpected_error_is_one_line_with_the_log_and_debug_shows_it(monkeypatch, tmp_path):
    import bench
    import pipelines.checkpoints

    monkeypatch.setattr(bench, "__file__", str(tmp_path / "bench.py"))  # the log goes to tmp_path/logs

    def boom(*args, **kwargs):
        raise ZeroDivisionError("an internal bug")

    monkeypatch.setattr(pipelines.checkpoints, "describe", boom)
    line = one_line(run("config", "--dataset", "synthetic", "--method", "global"),
                    "internal error (ZeroDivisionError: an internal bug)", "--debug")
    log = line.split("traceback is in ")[1].split(",")[0]
    assert "ZeroDivisionError" in open(log).read() and log.startswith(str(tmp_path / "logs"))
    debug = CliRunner().invoke(cli, ["--debug", "config", "--dataset", "synthetic", "--method", "global"])
    assert isinstance(debug.exception, ZeroDivisionError)


# -- raw data -----------------------------------------------------------------------------------------------------

DG_SPLITS = {"train": ["100694", "102122"], "val": ["107781"], "test": ["114577"]}
DG_IDS = [i for ids in DG_SPLITS.values() for i in ids]
INRIA_SPLITS = {"train": ["austin1", "austin2"], "val": ["chicago1"], "test": ["kitsap1"]}


def _deepglobe(out, source, **kw):
    from datasets import deepglobe

    return deepglobe.prepare(out, source, tile_size=64, split_lists=DG_SPLITS, workers=1, progress=False, **kw)


def _rewrite_zip(src, dst, change):
    """Copy a zip, letting change(name, data) return new bytes (None drops the entry) and add entries."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = change(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item.filename, data)


def test_changed_archive_of_the_same_name_is_extracted_afresh(tmp_path):
    from datasets_fixtures import deepglobe_zip

    source = tmp_path / "src" / "deepglobe.zip"
    source.parent.mkdir()
    deepglobe_zip(source, DG_IDS)
    out = tmp_path / "data" / "deepglobe"
    _deepglobe(out, source)
    # the same name, now without one tile: no stale extraction fills the gap, the tile is reported missing
    smaller = tmp_path / "smaller.zip"
    _rewrite_zip(source, smaller, lambda name, data: None if name.startswith("train/102122") else data)
    os.replace(smaller, source)
    from datasets.base import DatasetError

    with pytest.raises(DatasetError, match=r"102122_sat.jpg: missing"):
        _deepglobe(out, source, force=True)
    extracted = tmp_path / "data" / "raw" / "deepglobe" / f"extracted-{source.name}"
    assert not list(extracted.rglob("102122_*"))


def test_duplicate_tile_ids_in_a_source_are_refused_with_the_list(tmp_path):
    from datasets_fixtures import deepglobe_zip

    from datasets.base import DatasetError

    source = tmp_path / "deepglobe.zip"
    deepglobe_zip(source, DG_IDS)
    folder = tmp_path / "extracted"
    import zipfile

    zipfile.ZipFile(source).extractall(folder)
    (folder / "aaa_backup").mkdir()
    shutil.copy(folder / "train" / "100694_sat.jpg", folder / "aaa_backup" / "100694_sat.jpg")
    with pytest.raises(DatasetError, match=r"holds 1 tile\(s\) twice: aaa_backup/100694_sat.jpg and "
                                           r"train/100694_sat.jpg; keep one copy"):
        _deepglobe(tmp_path / "data" / "deepglobe", folder)


@pytest.mark.parametrize(("mode", "described"), [("L", "8-bit greyscale (L)"), ("RGBA", "RGB with alpha (RGBA)"),
                                                  ("I;16", "16-bit (I;16)")])
def test_mask_in_another_format_is_an_error_naming_file_and_expected(tmp_path, mode, described):
    from datasets_fixtures import deepglobe_zip

    from datasets.base import DatasetError

    source = tmp_path / "deepglobe.zip"
    deepglobe_zip(source, DG_IDS)
    folder = tmp_path / "extracted"
    import zipfile

    zipfile.ZipFile(source).extractall(folder)
    mask = folder / "train" / "100694_mask.png"
    rgb = np.asarray(Image.open(mask))
    image = {"L": lambda: Image.fromarray(rgb[..., 0]), "RGBA": lambda: Image.fromarray(
        np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])),
        "I;16": lambda: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)}[mode]()
    image.save(mask)
    with pytest.raises(DatasetError, match=rf"100694_mask.png: {re.escape(described)} label file, expected an "
                                           r"8-bit RGB PNG"):
        _deepglobe(tmp_path / "data" / "deepglobe", folder)


def test_truncated_image_is_reported_as_the_image_not_its_mask(tmp_path):
    from datasets_fixtures import deepglobe_zip

    from datasets.base import DatasetError

    source = tmp_path / "deepglobe.zip"
    deepglobe_zip(source, DG_IDS)
    folder = tmp_path / "extracted"
    import zipfile

    zipfile.ZipFile(source).extractall(folder)
    image = folder / "train" / "102122_sat.jpg"
    image.write_bytes(image.read_bytes()[:400])
    with pytest.raises(DatasetError) as info:
        _deepglobe(tmp_path / "data" / "deepglobe", folder)
    assert "102122_sat.jpg" in str(info.value) and "102122_mask.png" not in str(info.value)


def test_missing_7z_volume_is_one_line_naming_the_volumes(tmp_path):
    from datasets_fixtures import inria_7z_parts, inria_inner_zip

    from datasets import inria

    inner, _ = inria_inner_zip([i for ids in INRIA_SPLITS.values() for i in ids])
    parts = inria_7z_parts(tmp_path / "src", inner)
    parts[2].unlink()
    params = tiny_params(tmp_path, tmp_path / "data")
    line = one_line(run("prepare", "--dataset", "inria", "--source", str(parts[0]), "--params", str(params)),
                    "aerialimagelabeling.7z.001 cannot be read", "a 7z volume is missing or truncated",
                    "download the volumes again")
    assert "7z.003" not in line.split("present:")[1]
    assert inria.INNER_ZIP  # the module under test


def test_inner_zip_is_extracted_again_for_another_source(tmp_path):
    from datasets_fixtures import inria_7z_parts, inria_inner_zip

    from datasets import inria

    ids = [i for ids in INRIA_SPLITS.values() for i in ids]
    first, _ = inria_inner_zip(ids, seed=0)
    second, _ = inria_inner_zip(ids, seed=1)
    raw = tmp_path / "raw"
    raw.mkdir()
    got = []
    for n, inner in enumerate((first, second)):
        parts = inria_7z_parts(tmp_path / f"src{n}", inner)
        got.append(inria.inner_zip(parts[0], raw, None, False, []).read_bytes())
    assert got == [first, second]


def test_source_that_is_a_link_to_a_device_says_so(tmp_path):
    link = tmp_path / "source.zip"
    link.symlink_to("/dev/null")
    params = tiny_params(tmp_path, tmp_path / "data")
    one_line(run("prepare", "--dataset", "deepglobe", "--source", str(link), "--params", str(params)),
             "is not a regular file or folder", "behind a symbolic link")


def test_label_id_outside_the_class_range_is_one_line(tmp_path, tiny_synthetic, mlflow_store):
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data)
    params = tiny_params(tmp_path, data, iterations=2)
    train_module.train(load_config(params), "synthetic", "global")
    name = (data / "synthetic" / "splits" / "test.txt").read_text().split()[0]
    path = data / "synthetic" / "labels" / f"{name}.png"
    label = np.array(Image.open(path))
    label[0, 0] = 9
    Image.fromarray(label).save(path)
    one_line(run("evaluate", "--dataset", "synthetic", "--method", "global", "--params", str(params)),
             "label value 9 is neither a class id", "re-run prepare")


def test_full_disk_while_converting_is_one_line_not_blamed_on_a_source_file(tmp_path, monkeypatch):
    from datasets_fixtures import deepglobe_zip

    source = tmp_path / "deepglobe.zip"
    deepglobe_zip(source, DG_IDS)

    def full(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError) as info:  # stops the run; the CLI prints it as one line (os_error_line)
        _deepglobe(tmp_path / "data" / "deepglobe", source)
    assert info.value.errno == errno.ENOSPC and "free disk space" in os_error_line(info.value)
    assert not list((tmp_path / "data").rglob("*.tmp"))


def test_checkpointing_during_training_does_not_change_the_result(tmp_path, tiny_synthetic, mlflow_store):
    finals = []
    for every in (0, 1):
        folder = tmp_path / f"every{every}"
        folder.mkdir()
        params = params_with(folder, tiny_synthetic, iterations=3, checkpoint_every=every)
        raw = yaml.safe_load(params.read_text())
        raw["train"]["deterministic"] = True
        params.write_text(yaml.safe_dump(raw))
        finals.append(load_checkpoint(train_module.train(load_config(params), "synthetic", "global"))["model"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert not torch.are_deterministic_algorithms_enabled()  # training left no global switch on behind it
