"""Report plots a reader can use: the confusion heatmap, labels that never overlap, a key for marker sizes, one name
per method on published and own points, training curves read from MLflow, and the report writing the new PNGs."""
from __future__ import annotations

import itertools
import json
import time

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines import plots
from pipelines import published as published_module
from pipelines.config import load_config

PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = ("unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren")


def _text_boxes(fig, texts):
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts]


def _overlapping(boxes) -> list[tuple[int, int]]:
    return [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2) if a.overlaps(b)]


def test_confusion_heatmap_is_row_normalised_with_class_names():
    matrix = [[8, 2, 0], [0, 0, 0], [1, 1, 2]]  # rows: ground truth; class "b" has no pixel
    share = plots.row_normalised(matrix)
    assert share[0].tolist() == [0.8, 0.2, 0.0] and share[2].tolist() == [0.25, 0.25, 0.5]
    assert np.isnan(share[1]).all()  # nothing to normalise: not drawn as 0% correct

    fig = plots.confusion_figure(matrix, ["a", "b", "c"], "m on d/test")
    ax = fig.axes[0]
    drawn = np.asarray(ax.images[0].get_array())
    assert drawn.tolist() == [[80.0, 20.0, 0.0], [0.0, 0.0, 0.0], [25.0, 25.0, 50.0]]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b (no pixels)", "c"]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "ground-truth class"
    cells = sorted(t.get_text() for t in ax.texts)
    assert cells == sorted(["80", "20", "0", "25", "25", "50"])  # every row sums to 100 %; no cell in the empty row
    assert ax.get_title() == "m on d/test"
    with pytest.raises(ValueError, match="3 classes"):
        plots.confusion_figure([[1, 2], [3, 4]], ["a", "b", "c"])


def test_labels_of_a_crowded_panel_do_not_overlap():
    plt = plots._plt()
    rng = np.random.default_rng(0)
    # 30 points, 24 of them in a small cluster (as published methods crowd around 20-40 FPS and 70-76 mIoU)
    xs = np.concatenate([rng.uniform(20, 40, 24), rng.uniform(0.1, 100, 6)])
    ys = np.concatenate([rng.uniform(70, 76, 24), rng.uniform(45, 80, 6)])
    labels = [f"Method-{i} (variant {i % 3})" for i in range(30)]
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    ax.scatter(xs, ys, s=60)
    ax.set_xscale("log")
    ax.margins(0.12)
    fig.tight_layout()
    texts = plots.place_labels(ax, list(zip(xs, ys, strict=True)), labels, [60.0] * 30)
    assert [t.get_text() for t in texts] == labels
    assert [tuple(t.xy) for t in texts] == list(zip(xs, ys, strict=True))  # each label names its own point
    assert _overlapping(_text_boxes(fig, texts)) == []
    plt.close(fig)

    # without placement (every label at the same offset, as before) the same panel is unreadable
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    ax.scatter(xs, ys, s=60)
    ax.set_xscale("log")
    naive = [ax.annotate(label, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
             for x, y, label in zip(xs, ys, labels, strict=True)]
    fig.tight_layout()
    assert len(_overlapping(_text_boxes(fig, naive))) > 10
    plt.close(fig)


def test_accuracy_panel_labels_key_and_names():
    published = published_module.points("deepglobe")
    ours = [{"label": "isdnet", "miou": 74.0, "fps": 30.0, "memory": 2000.0, "source": "ours"},
            {"label": "rue K=1", "miou": 76.0, "fps": 40.0, "memory": 1500.0, "source": "ours"},
            {"label": "rue K=0.25", "miou": 72.0, "fps": 70.0, "memory": 1400.0, "source": "ours"},
            {"label": "glnet", "miou": 70.0, "fps": 0.2, "memory": None, "source": "ours"}]
    fig, texts = plots.accuracy_figure({"deepglobe": published + ours, "inria": published_module.points("inria")})
    try:
        for dataset, drawn in texts.items():
            assert _overlapping(_text_boxes(fig, drawn)) == [], dataset
        names = [t.get_text() for t in texts["deepglobe"]]
        # a method we implement has one name on its published and on its own points
        assert names.count("isdnet") == 2 and names.count("rue K=1") == 2 and names.count("glnet") == 2
        assert "ISDNet" not in names and "RUE (K = 100%)" not in names and "F2Net" in names
        legend = fig.axes[0].get_legend()
        entries = [t.get_text() for t in legend.get_texts()]
        assert entries[:4] == ["published", "published (memory unknown)", "ours", "ours (memory unknown)"]
        assert "memory (marker area):" in entries and any(e.endswith(" MB") for e in entries)
        sizes = [h.get_markersize() for h, e in zip(legend.legend_handles, entries, strict=True) if e.endswith(" MB")]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes) >= 2  # larger memory, larger marker
    finally:
        plots._plt().close(fig)


def test_plot_names_follow_display_names():
    def name(label, source="published"):
        return plots.plot_name({"label": label, "source": source})

    assert name("ISDNet") == "isdnet" and name("GLNet") == "glnet"
    assert name("RUE (K = 100%)") == "rue K=1" and name("RUE (K = 50%)") == "rue K=0.5"
    assert name("UHRNet") == "UHRNet"  # our uhrsnet is a reconstruction: the paper's point keeps the paper's name
    assert name("F2Net") == "F2Net" and name("isdnet", "ours") == "isdnet"
    # a name printed under two groups is named as the variant that fills it
    points = {p["label"]: p for p in published_module.points("deepglobe")}
    assert plots.plot_name(points["UNet (local inference)"]) == "unet-local"
    assert plots.plot_name(points["UNet (global inference)"]) == "unet-global"


def _train_run(client, exp, method, metrics: dict[str, list[tuple[int, float]]], tags=None, parent=None,
               finished=True):
    run = client.create_run(exp, tags={"method": method, "stage": "train", **(tags or {}),
                                       **({"mlflow.parentRunId": parent} if parent else {})})
    for key, points in metrics.items():
        for step, value in points:
            client.log_metric(run.info.run_id, key, value, step=step)
    if finished:
        client.set_terminated(run.info.run_id)
    time.sleep(0.01)  # distinct start times: "latest" is well defined
    return run.info.run_id


@pytest.fixture
def train_store(mlflow_store):
    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("uhrbench-synthetic")
    _train_run(client, exp, "global", {"train/loss": [(5, 9.0), (10, 8.0)]})  # older: superseded
    newest = _train_run(client, exp, "global", {"train/loss": [(5, 2.0), (10, 1.5)],
                                                "train/decode": [(5, 1.8), (10, 1.4)],
                                                "train/lr": [(5, 0.01), (10, 0.005)], "train/final_loss": [(0, 1.5)]})
    _train_run(client, exp, "global", {"train/loss": [(5, 7.0)]}, finished=False)  # still running: not used
    wanted = _train_run(client, exp, "local", {"train/loss": [(5, 3.0)]}, tags={"params_hash": "wanted"})
    _train_run(client, exp, "local", {"train/loss": [(5, 4.0)]}, tags={"params_hash": "ablation"})
    parent = _train_run(client, exp, "glnet", {"train/final_loss": [(0, 0.5)]})
    _train_run(client, exp, "glnet", {"train/global/loss": [(1, 3.0), (2, 2.5)]}, tags={"phase": "global"},
               parent=parent)
    _train_run(client, exp, "glnet", {"train/global2local/loss": [(1, 2.0)], "train/global2local/aux": [(1, 0.4)]},
               tags={"phase": "global2local"}, parent=parent)
    return {"newest": newest, "wanted": wanted, "parent": parent}


def test_training_curves_read_from_mlflow(train_store):
    curves = plots.training_curves("synthetic", ["global", "local", "glnet", "rue"], {"local": "wanted"})
    assert list(curves) == ["global", "local", "glnet"]  # rue never trained: no panel
    assert curves["global"]["run"] == train_store["newest"]
    assert curves["global"]["phases"] == [("", {"loss": [(5, 2.0), (10, 1.5)], "decode": [(5, 1.8), (10, 1.4)]})]
    assert curves["local"]["run"] == train_store["wanted"]  # the configuration asked for, not the newer ablation run
    assert curves["local"]["phases"] == [("", {"loss": [(5, 3.0)]})]
    assert curves["glnet"]["run"] == train_store["parent"]
    assert curves["glnet"]["phases"] == [("global", {"loss": [(1, 3.0), (2, 2.5)]}),
                                         ("global2local", {"loss": [(1, 2.0)], "aux": [(1, 0.4)]})]
    assert plots.training_curves("synthetic", ["local"])["local"]["phases"] == [("", {"loss": [(5, 4.0)]})]
    assert plots.training_curves("deepglobe") == {}


def test_report_writes_confusion_and_training_pngs(train_store, tmp_path):
    from pipelines.report import report

    config = load_config(None, [f"results_root={tmp_path / 'results'}", "benchmark.datasets=[synthetic]",
                                "benchmark.methods=[global,local,glnet]"])
    # an evaluation's result file (what evaluate writes), and one from before evaluations kept the matrix
    folder = tmp_path / "results" / "metrics" / "synthetic"
    folder.mkdir(parents=True)
    matrix = (np.eye(7, dtype=int) * 90 + 10).tolist()
    (folder / "global.json").write_text(json.dumps({"split": "test", "headline_value": 0.5, "confusion_matrix": {
        "classes": list(CLASSES), "rows": "ground truth", "columns": "prediction", "matrix": matrix}}))
    (folder / "local.json").write_text(json.dumps({"split": "test", "headline_value": 0.4}))
    client = MlflowClient()
    exp = client.get_experiment_by_name("uhrbench-synthetic").experiment_id
    for method, value in (("global", 0.5), ("local", 0.4), ("glnet", 0.3)):  # the comparison table needs these
        run = client.create_run(exp, tags={"method": method, "stage": "evaluate", "profile": "smoke"})
        for key in ("headline", "miou", "params_m"):
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    written = report(config)
    plots_dir = tmp_path / "results" / "plots"
    new = sorted(p.name for p in plots_dir.iterdir() if p.name.startswith(("confusion_", "training_")))
    assert new == ["confusion_synthetic_global.png", "training_synthetic.png"]
    for name in new:
        assert (plots_dir / name).read_bytes()[:8] == PNG
        assert plots_dir / name in written
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "plots/confusion_synthetic_global.png" in readme and "plots/training_synthetic.png" in readme
