"""Intervals over test images: the per-image confusion matrices `evaluate` saves, the bootstrap interval of the
headline, the paired comparison of two methods, and where they appear (comparison table, significance table, plot).
Checked against plain numpy loops over the saved matrices, not against the code's own shortcuts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_params

from pipelines.config import ConfigError, load_config
from pipelines.evaluate import evaluate
from pipelines.metrics import (
    bootstrap_scores,
    bootstrap_weights,
    headline_from_matrices,
    paired_difference,
    percentile_interval,
    segmentation_scores,
)
from pipelines.train import train

COUNTED = (1, 2, 3, 4, 5, 6)


def _random_matrices(n: int, classes: int = 7, seed: int = 0, absent: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrices = rng.integers(0, 50, size=(n, classes, classes)) + np.eye(classes, dtype=np.int64) * 200
    if absent is not None:  # a class nobody has nor predicts: IoU NaN, left out of the mean
        matrices[:, absent, :] = 0
        matrices[:, :, absent] = 0
    return matrices.astype(np.int64)


def _loop_interval(per_image: np.ndarray, score) -> tuple[float, float]:
    """The bootstrap written out: 1000 draws of n images with replacement (seed 0), each resample's matrices summed
    and scored, the 2.5 and 97.5 percentiles."""
    draws = np.random.default_rng(0).integers(0, len(per_image), size=(1000, len(per_image)))
    samples = [score(per_image[row].sum(0)) for row in draws]
    return tuple(np.percentile(samples, [2.5, 97.5]))


def _miou(matrix: np.ndarray) -> float:
    return segmentation_scores(torch.from_numpy(matrix), [str(c) for c in range(7)], COUNTED)["miou"]


@pytest.mark.parametrize("absent", [None, 3])
def test_headline_of_a_matrix_is_the_dataset_level_score(absent):
    matrices = _random_matrices(5, absent=absent)
    ours = headline_from_matrices(matrices, COUNTED)
    assert ours == pytest.approx([_miou(m) for m in matrices], abs=1e-12)
    iou_water = headline_from_matrices(matrices, COUNTED, headline_class=5)
    reference = [segmentation_scores(torch.from_numpy(m), [str(c) for c in range(7)], COUNTED)["iou"]["5"]
                 for m in matrices]
    assert iou_water == pytest.approx(reference, abs=1e-12)


def test_bootstrap_interval_equals_the_written_out_loop():
    per_image = _random_matrices(12, seed=1)
    low, high = percentile_interval(bootstrap_scores(per_image, COUNTED))
    assert (low, high) == pytest.approx(_loop_interval(per_image, _miou), abs=1e-12)
    assert low < _miou(per_image.sum(0)) < high
    assert bootstrap_weights(12).sum(1).tolist() == [12] * 1000  # n draws per resample


def test_paired_difference_of_a_model_with_itself_is_zero_and_of_a_better_one_significant():
    a = _random_matrices(20, seed=2)
    same = paired_difference(a, a.copy(), COUNTED)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "significant": False}
    better = a.copy()
    for m in better:  # move a tenth of every class's errors onto the diagonal, on every image
        off = m - np.diag(np.diag(m))
        moved = off // 10
        m -= moved
        m[np.diag_indices(7)] += moved.sum(1)
    result = paired_difference(better, a, COUNTED)
    assert result["difference"] == pytest.approx(_miou(better.sum(0)) - _miou(a.sum(0)))
    assert result["significant"] and 0 < result["low"] < result["difference"] < result["high"]
    # the paired interval is narrower than the two unpaired intervals would suggest
    unpaired = np.subtract(percentile_interval(bootstrap_scores(better, COUNTED)),
                           percentile_interval(bootstrap_scores(a, COUNTED))[::-1])
    assert result["high"] - result["low"] < unpaired[1] - unpaired[0]
    with pytest.raises(ValueError, match="differ in shape"):
        paired_difference(a, a[:5], COUNTED)


def test_evaluate_saves_per_image_matrices_and_the_tables_show_intervals(tmp_path, tiny_synthetic, mlflow_store):
    from matplotlib.container import ErrorbarContainer

    from pipelines.plots import accuracy_figure, our_points
    from pipelines.published import our_results
    from pipelines.report import comparison_table, significance_table

    params = tiny_params(tmp_path, tiny_synthetic, iterations=3)
    config = load_config(params)
    results = {}
    for method in ("global", "local"):
        train(config, "synthetic", method)
        results[method] = evaluate(config, "synthetic", method)
    folder = tmp_path / "results" / "metrics" / "synthetic"
    saved = {}
    for method in ("global", "local"):
        with np.load(folder / f"{method}.per_image.npz") as data:
            saved[method] = data["matrices"]
            assert data["ids"].tolist() == sorted(data["ids"].tolist()) and len(data["ids"]) == 2
        scores = json.loads((folder / f"{method}.json").read_text())
        assert saved[method].sum(0).tolist() == scores["confusion_matrix"]["matrix"]
        low, high = _loop_interval(saved[method], _miou)
        assert scores["headline_ci95"] == pytest.approx([low, high], abs=1e-12)

    table = comparison_table("synthetic").set_index("method")
    low, high = _loop_interval(saved["global"], _miou)
    assert table.loc["global", "95% CI"] == f"{100 * low:.2f}–{100 * high:.2f}"

    pairs = significance_table("synthetic")
    assert len(pairs) == 1
    row = pairs.iloc[0]
    sign = 1 if row["A"] == "global" else -1
    observed = sign * (results["global"]["headline_value"] - results["local"]["headline_value"])
    assert row["Δ (A − B)"] == f"{100 * observed:+.2f}"
    assert row["significant"] in ("yes", "no")

    rows = {method: row for (method, _), row in our_results("synthetic")["rows"].items()}
    assert rows["global"]["ci95"] == pytest.approx((round(100 * low, 2), round(100 * high, 2)))
    rows["global"].update(fps=2.0, memory=100.0)  # as a measure run would add: the plot draws its interval
    points = our_points({"rows": {("global", ()): rows["global"]}})
    figure, _ = accuracy_figure({"synthetic": points})
    bars = [c for c in figure.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    segment = bars[0].lines[2][0].get_segments()[0]
    assert segment[:, 1] == pytest.approx([rows["global"]["ci95"][0], rows["global"]["ci95"][1]])


def test_two_seeds_give_the_tables_mean_std_and_the_interval_of_their_mean(tmp_path, tiny_synthetic, mlflow_store):
    """The bar of the seeds issue: a tiny method trained with two seeds; the comparison table's mean, std and
    interval are recomputed here from the saved per-image matrices with numpy."""
    from pipelines.report import comparison_table, significance_table

    config = load_config(tiny_params(tmp_path, tiny_synthetic, iterations=3))
    runs = {}
    for name in ("global", "global@seed1", "local"):
        checkpoint = torch.load(train(config, "synthetic", name), weights_only=False)
        runs[name] = (checkpoint["seed"], evaluate(config, "synthetic", name))
    assert runs["global"][0] == 0 and runs["global@seed1"][0] == 1
    assert (tmp_path / "checkpoints" / "synthetic" / "global@seed1" / "final.pt").is_file()
    folder = tmp_path / "results" / "metrics" / "synthetic"
    matrices = [np.load(folder / f"{name}.per_image.npz")["matrices"] for name in ("global", "global@seed1")]
    headlines = [_miou(m.sum(0)) for m in matrices]
    assert headlines[0] != headlines[1]  # the seeds trained different models

    table = comparison_table("synthetic").set_index("method")
    assert table.loc["global", "seeds"] == 2 and table.loc["local", "seeds"] == 1
    assert table.loc["global", "mIoU"] == pytest.approx(round(100 * np.mean(headlines), 2))
    assert table.loc["global", "std (seeds)"] == pytest.approx(round(100 * np.std(headlines, ddof=1), 2))
    assert table.loc["local", "std (seeds)"] == ""
    draws = np.random.default_rng(0).integers(0, 2, size=(1000, 2))
    samples = [np.mean([_miou(m[row].sum(0)) for m in matrices]) for row in draws]
    low, high = np.percentile(samples, [2.5, 97.5])
    assert table.loc["global", "95% CI"] == f"{round(100 * low, 2):.2f}–{round(100 * high, 2):.2f}"

    pair = significance_table("synthetic").iloc[0]
    assert pair["seeds (A, B)"] == "2, 1"
    local = _miou(np.load(folder / "local.per_image.npz")["matrices"].sum(0))
    assert pair["Δ (A − B)"] == f"{100 * (np.mean(headlines) - local):+.2f}"


@pytest.mark.parametrize(("setting", "message"), [
    ("benchmark.extra_seeds=[0]", "lists 0, the seed every run already trains with"),
    ("benchmark.extra_seeds=[1,1]", "lists a seed twice"),
    ("benchmark.extra_seeds=[-1]", "extra_seeds"),
    ("benchmark.seeds=[0,1,2]", "benchmark.seeds: unknown key; write the first seed as `seed: 0`"),
])
def test_bad_extra_seeds_are_one_line_errors(setting, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [setting])
    assert "\n" not in str(info.value)


def test_a_run_of_an_extra_seed_trains_with_it():
    config = load_config(None, ["benchmark.extra_seeds=[1, 2]"])
    assert config.for_run("glnet@seed2").seed == 2 and config.for_run("glnet").seed == config.seed
    assert config.for_run("glnet@seed2").params_hash("glnet", "synthetic") != config.params_hash("glnet", "synthetic")
    assert config.resolved("glnet@seed2", "synthetic")["seed"] == 2


def test_the_same_weights_in_the_official_layout_score_the_same(tmp_path, tiny_synthetic, mlflow_store):
    """`evaluate --weights FILE` (the official layout, `load_official`) and the evaluation of our own checkpoint
    of the same weights give the same scores, image by image."""
    from click.testing import CliRunner

    from bench import cli
    from pipelines.checkpoints import load_trained

    params = tiny_params(tmp_path, tiny_synthetic, iterations=2)
    shrink = ["schedules.generic_smoke.iterations=2"]  # segformer-b0 (mmseg's layout), the smallest with one
    config = load_config(params, shrink)
    train(config, "synthetic", "segformer-global")
    ours = evaluate(config, "synthetic", "segformer-global")
    model, _, _ = load_trained(config, "synthetic", "segformer-global", None, torch.device("cpu"))
    model.save_official(str(tmp_path / "release.pth"))
    out = CliRunner().invoke(cli, ["evaluate", "--dataset", "synthetic", "--method", "segformer-global", "--params",
                                   str(params), "--set", shrink[0], "--weights", str(tmp_path / "release.pth")])
    assert out.exit_code == 0, out.output
    folder = tmp_path / "results" / "metrics" / "synthetic"
    official = json.loads((folder / "segformer-global__official.json").read_text())
    assert official["miou"] == ours["miou"] and official["weights"] == str((tmp_path / "release.pth").resolve())
    assert (np.load(folder / "segformer-global__official.per_image.npz")["matrices"]
            == np.load(folder / "segformer-global.per_image.npz")["matrices"]).all()
    # the papers' tables keep the two apart: the official weights in their own row, with the file and the data digest
    from pipelines import tracking
    from pipelines.published import our_results

    official_run = tracking.finished_runs("synthetic", "evaluate").iloc[0]
    assert official_run["tags.weights"] == "release.pth" and official_run["variant"] == "official"
    assert official_run["tags.dataset_digest"] == tracking.dataset_digest(config.data_root / "synthetic", "test")
    rows = {source: our_results("synthetic", source)["rows"] for source in ("official", "smoke")}
    assert [r["source"] for r in rows["official"].values()] == ["official"]
    assert [r["source"] for r in rows["smoke"].values()] == ["smoke"]
    assert next(iter(rows["official"].values()))["weights"] == "release.pth"
