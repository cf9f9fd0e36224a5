"""Report tables and plots from an MLflow store built with known runs (no training)."""
from __future__ import annotations

import time

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import ConfigError, load_config

CLASSES = ("unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren")  # synthetic == DeepGlobe


def _run(client, exp, method, stage, metrics, tags=None, params=None, variant="default"):
    run = client.create_run(exp, tags={"method": method, "stage": stage, "variant": variant, "profile": "smoke",
                                       "git_commit": "abc1234", "env.device_name": "Test GPU", **(tags or {})})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    time.sleep(0.01)  # distinct start times: "latest" is well defined
    return run.info.run_id


def _evaluate(client, exp, method, headline, variant="default", k=None):
    metrics = {"headline": headline, "miou": headline, "params_m": 12.3456}
    metrics.update({f"iou.{name}": headline for name in CLASSES[1:]})
    return _run(client, exp, method, "evaluate", metrics, params={"model.k": k} if k is not None else {},
                variant=variant)


def _measure(client, exp, method, fps, mem, variant="default"):
    return _run(client, exp, method, "measure",
                {"fps": fps, "latency_ms_median": 1000 / fps, "latency_ms_p90": 1100 / fps,
                 "nvml_process_peak_mib": mem + 300, "torch_max_allocated_mib": mem, "gmacs": 100.0},
                tags={"precision": "fp32", "input_size": "2448x2448", "scale": "1.0",
                      "rss_peak_growth_mib": "unavailable"}, variant=variant)


@pytest.fixture
def store(mlflow_store):
    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("uhrbench-deepglobe")
    _evaluate(client, exp, "isdnet", 0.70)  # older, superseded
    _evaluate(client, exp, "isdnet", 0.74)
    _measure(client, exp, "isdnet", 30.0, 2000.0)
    _evaluate(client, exp, "rue", 0.76, k=1.0)
    _measure(client, exp, "rue", 40.0, 1500.0)
    _evaluate(client, exp, "rue", 0.72, variant="k0.25", k=1.0)
    _measure(client, exp, "rue", 70.0, 1400.0, variant="k0.25")
    _evaluate(client, exp, "glnet", 0.65)  # evaluated, never measured
    _evaluate(client, exp, "uhrsnet", 0.66)  # a method with a display label
    return client


def _config(tmp_path, datasets=("deepglobe",)):
    return load_config(None, [f"results_root={tmp_path / 'results'}",
                              f"benchmark.datasets=[{','.join(datasets)}]"])


def test_compare_table_shows_k_and_not_measured(store):
    from pipelines.report import comparison_table
    from pipelines.tables import format_table

    table = comparison_table("deepglobe", methods=["glnet", "isdnet", "rue"])
    assert list(table["method"]) == ["glnet", "isdnet", "rue", "rue"]
    assert list(table.columns[:3]) == ["method", "K", "variant"]
    rue = table[table["method"] == "rue"]
    assert list(rue["K"]) == [1.0, 0.25] and list(rue["variant"]) == ["default", "k0.25"]
    assert list(rue["FPS"]) == [40.0, 70.0]
    glnet = table.iloc[0]
    assert glnet["K"] == "" and glnet["FPS"] == "not measured" and glnet["mIoU"] == 65.0
    isdnet = table.iloc[1]
    assert isdnet["mIoU"] == 74.0 and isdnet["peak memory (MiB)"] == 2300.0 and isdnet["params (M)"] == 12.35
    assert list(table.columns) == ["method", "K", "variant", "mIoU", "95% CI", "FPS", "latency p50 (ms)",
                                   "peak memory (MiB)", "GMACs", "params (M)", "device", "run"]  # no per-class IoU
    assert glnet["95% CI"] == "n/a"  # a run from before per-image matrices were saved
    md = format_table(table, "md")
    assert "| rue      | 0.25 | k0.25" in md and "| glnet    |      | default" in md
    assert max(len(line) for line in md.splitlines()) < 175  # a terminal of 175 columns shows it unwrapped
    full = comparison_table("deepglobe", methods=["glnet", "isdnet", "rue"], per_class=True)
    csv = format_table(full, "csv").splitlines()
    assert csv[0].startswith("method,K,variant,mIoU,95% CI,FPS,latency p50 (ms),peak memory (MiB),GMACs,params (M),"
                             "device,run,IoU unknown,IoU urban")
    assert csv[1].startswith("glnet,,default,65.0,n/a,not measured")
    isd = full.iloc[1]
    assert isd["torch peak alloc (MiB)"] == 2000.0 and isd["NVML peak (MiB)"] == 2300.0
    assert isd["CPU RSS growth (MiB)"] == "unavailable"
    assert "\\begin{tabular}" in format_table(table, "latex")
    # filtering is by registry name; the table shows a method's label beside it
    labelled = comparison_table("deepglobe", methods=["uhrsnet"])
    assert list(labelled["method"]) == ["uhrsnet [UHRSNet-style (reconstructed)]"]
    with pytest.raises(ConfigError, match="no finished evaluation of local"):
        comparison_table("deepglobe", methods=["local"])


def test_isdnet_table_published_vs_ours(store):
    from pipelines.published import published_table
    from pipelines.tables import format_table

    table = published_table("paper_isdnet_deepglobe")
    assert list(table.columns[:2]) == ["group", "method"] and len(table) == 16
    rows = table.set_index(["group", "method"])
    isd = rows.loc[("UHR methods", "ISDNet")]
    assert (isd["mIoU (published)"], isd["mIoU (ours)"],
            isd["mIoU Δ (ours − published)"]) == ("73.30", "74.00", "+0.70")
    assert (isd["FPS (published)"], isd["FPS (ours)"], isd["FPS Δ (ours − published)"]) == ("27.70", "30.00", "+2.30")
    assert (isd["memory (MB) (published)"], isd["memory (MB) (ours)"],
            isd["memory (MB) Δ (ours − published)"]) == ("1948", "2000", "+52")
    gl = rows.loc[("UHR methods", "GLNet")]
    assert gl["mIoU (ours)"] == "65.00" and gl["mIoU Δ (ours − published)"] == "-6.60"
    assert gl["FPS (ours)"] == "not measured (no measure run)" and gl["FPS Δ (ours − published)"] == ""
    fcn = rows.loc[("Local inference", "FCN-8s")]
    assert fcn["mIoU (ours)"] == fcn["FPS (ours)"] == fcn["memory (MB) (ours)"] == "not measured (no fcn8s-local run)"
    assert rows.loc[("UHR methods", "PointRend"), "mIoU (ours)"] == "not measured (no pointrend run)"
    fast = rows.loc[("UHR methods", "MagNet-Fast"), "mIoU (ours)"]  # a knob setting of the magnet run
    assert fast == "not measured (no magnet patches=3 points=0.9 run)"
    assert (fcn["mIoU (published)"], fcn["FPS (published)"]) == ("62.43", "4.55")  # ISDNet's, not a later copy
    assert rows.loc[("Global inference", "UNet"), "mIoU (published)"] == "50.11"
    # no inria run at all
    inria = published_table("paper_isdnet_inria").set_index("method")
    assert inria.loc["ISDNet", "IoU building (published)"] == "74.23"  # Inria's headline: building IoU
    assert inria.loc["ISDNet", "IoU building (ours)"] == "not measured (no inria run)"
    assert inria.loc["ISDNet", "IoU building Δ (ours − published)"] == ""
    assert inria.loc["FCtL (no TTA)", "FPS (ours)"] == "not measured (no inria run)"
    lines = format_table(published_table("paper_isdnet_deepglobe"), "csv").splitlines()
    assert lines[-1] == "UHR methods,ISDNet,73.30,74.00,+0.70,27.70,30.00,+2.30,1948,2000,+52,isdnet,"


def test_sources_table_four_rows_per_anchor_with_provenance(store):
    """Under each published row: the official weights, the paper recipe and the smoke run, never mixed: each with
    its own accuracy, its own profile's speed, and where it came from; a missing cell says why."""
    from pipelines.published import published_table, sources_table

    client = store
    exp = client.get_experiment_by_name("uhrbench-deepglobe").experiment_id
    data = {"dataset_digest": "d1g35t01"}
    _run(client, exp, "isdnet", "evaluate", {"headline": 0.71, "miou": 0.71},
         tags={"profile": "paper", "git_commit": "fedcba9", **data})
    _run(client, exp, "isdnet", "measure", {"fps": 25.0, "torch_max_allocated_mib": 1900.0},
         tags={"profile": "paper", "precision": "fp16", "scale": "1.0", "input_size": "2448x2448"})
    _run(client, exp, "isdnet", "evaluate", {"headline": 0.7331, "miou": 0.7331}, variant="official",
         tags={"weights": "isdnet_deepglobe.pth", **data})  # newest: must not stand in for a retrained number
    table = sources_table("paper_isdnet_deepglobe")
    isd = table[table["method"] == "ISDNet"].set_index("source")
    assert list(isd.index) == ["published", "official weights, our harness", "retrained, paper recipe", "smoke run"]
    assert list(isd["mIoU"]) == ["73.30", "73.31", "71.00", "74.00"]
    assert list(isd["mIoU Δ (ours − published)"]) == ["", "+0.01", "-2.30", "+0.70"]
    # official weights are timed by the model of their own profile (smoke here), paper by the paper measurement
    assert list(isd["FPS"]) == ["27.70", "30.00", "25.00", "30.00"]
    assert isd.loc["published", "provenance"] == "ISDNet (CVPR 2022) Table 1"
    official = isd.loc["official weights, our harness", "provenance"]
    assert "weights isdnet_deepglobe.pth" in official and "data d1g35t01" in official and "Test GPU" in official
    paper = isd.loc["retrained, paper recipe", "provenance"]
    assert "commit fedcba9" in paper and "fp16" in paper and "scale 1.0" in paper and "2448x2448" in paper
    assert "data unknown" in isd.loc["smoke run", "provenance"]  # a run from before digests were tagged
    glnet = table[table["method"] == "GLNet"].set_index("source")
    assert glnet.loc["official weights, our harness", "mIoU"] == "not evaluated (no `evaluate --weights` run)"
    assert glnet.loc["retrained, paper recipe", "mIoU"] == "not run (no `paper` profile run)"
    assert glnet.loc["smoke run", "FPS"] == "not measured (no measure run)"
    assert glnet.loc["smoke run", "provenance"].endswith("; no measure run")
    # a published row no method of ours fills keeps its published row only
    literature = sources_table("literature_deepglobe")
    assert list(literature[literature["method"].str.startswith("WSDNet")]["source"]) == ["published"]
    # the compact table shows the newest harness-trained number (the paper recipe), with that recipe's speed
    compact = published_table("paper_isdnet_deepglobe").set_index("method")
    assert (compact.loc["ISDNet", "mIoU (ours)"], compact.loc["ISDNet", "FPS (ours)"]) == ("71.00", "25.00")
    # so does the comparison table; the official weights are its own variant, timed by the smoke model
    from pipelines.report import comparison_table

    compare = comparison_table("deepglobe", methods=["isdnet"]).set_index("variant")
    assert (compare.loc["default", "mIoU"], compare.loc["default", "FPS"]) == (71.0, 25.0)
    assert (compare.loc["official", "mIoU"], compare.loc["official", "FPS"]) == (73.31, 30.0)


def test_papers_tables_show_the_std_over_seeds(store):
    from pipelines.published import published_table, sources_table

    client = store
    exp = client.get_experiment_by_name("uhrbench-deepglobe").experiment_id
    _evaluate(client, exp, "isdnet@seed1", 0.72)  # with the fixture's 0.74: mean 73.00, sample std 1.41
    row = published_table("paper_isdnet_deepglobe").set_index("method").loc["ISDNet"]
    assert (row["mIoU (ours)"], row["mIoU std over seeds (ours)"], row["seeds (ours)"]) == ("73.00", "1.41", 2)
    smoke = sources_table("paper_isdnet_deepglobe").set_index(["method", "source"]).loc[("ISDNet", "smoke run")]
    assert (smoke["mIoU"], smoke["std over seeds"], smoke["seeds"]) == ("73.00", "1.41", 2)
    # a paper-recipe seed is its own group: never averaged with the smoke seeds
    _run(client, exp, "isdnet@seed2", "evaluate", {"headline": 0.50, "miou": 0.50}, tags={"profile": "paper"})
    smoke = sources_table("paper_isdnet_deepglobe").set_index(["method", "source"]).loc[("ISDNet", "smoke run")]
    assert smoke["mIoU"] == "73.00"
    assert published_table("paper_isdnet_deepglobe").set_index("method").loc["ISDNet", "mIoU (ours)"] == "50.00"


def test_uhrnet_local_and_global_columns(store):
    """UHRNet's Table II: "global" from our final prediction, "local" from the method's `local` output."""
    from pipelines.published import our_results, published_table

    ours = our_results("deepglobe")
    key = ("uhrsnet", ())
    ours["rows"][key]["outputs"] = {"local": 61.5}
    table = published_table("paper_uhrsnet_deepglobe", ours).set_index("method")
    assert list(table.index) == ["ICNet", "UNet", "PSPNet", "SegNet", "FCN-8s", "DeepLabv3+", "GLNet", "UHRNet"]
    uhr = table.loc["UHRNet"]
    assert (uhr["mIoU local (published)"], uhr["mIoU local (ours)"], uhr["mIoU local Δ (ours − published)"]) == \
        ("71.4", "61.50", "-9.90")
    assert (uhr["mIoU global (published)"], uhr["mIoU global (ours)"]) == ("72.0", "66.00")
    assert table.loc["GLNet", "mIoU local (ours)"] == "not measured (glnet has no `local` output)"
    assert table.loc["GLNet", "mIoU global (ours)"] == "65.00"


def test_uhrsnet_output_read_from_mlflow(mlflow_store):
    from pipelines.published import our_results

    mlflow.set_tracking_uri(mlflow_store)
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("uhrbench-deepglobe")
    _run(client, exp, "uhrsnet", "evaluate", {"headline": 0.7, "output.local.miou": 0.6512, "params_m": 1.0})
    assert our_results("deepglobe")["rows"][("uhrsnet", ())]["outputs"] == {"local": 65.12}


def test_literature_table_includes_k_sweep(store, tmp_path):
    from pipelines.published import our_results, published_table, with_sweeps

    table = published_table("literature_deepglobe").set_index("method")
    assert table.loc["RUE (K = 100%)", "mIoU (published)"] == "75.1 [fig]"
    assert table.loc["RUE (K = 100%)", "mIoU (ours)"] == "76.00"
    assert table.loc["RUE (K = 100%)", "FPS Δ (ours − published)"] == "-4.40"
    assert table.loc["RUE (K = 50%)", "mIoU (ours)"] == "not measured (no rue K=0.5 run)"
    extra = table.loc["rue K=0.25"]  # a sweep point the figure does not have
    assert (extra["mIoU (published)"], extra["mIoU (ours)"], extra["FPS (ours)"]) == ("not published", "72.00", "70.00")
    assert extra["note"] == "ours only (K sweep)"
    assert table.loc["WSDNet", "mIoU (ours)"] == "published only"
    assert published_table("literature_urur").loc[0, "mIoU (ours)"] == "not measured (no urur run)"
    # a sweep csv (`bench.py sweep`) adds the K the store does not have
    sweep = tmp_path / "results" / "sweeps" / "deepglobe" / "rue_k.csv"
    sweep.parent.mkdir(parents=True)
    pd.DataFrame([{"K": 0.5, "mIoU": 73.0, "headline": 73.0, "FPS": 55.0, "device": "Test GPU"}]).to_csv(sweep,
                                                                                                         index=False)
    ours = with_sweeps(our_results("deepglobe"), "deepglobe", _config(tmp_path))
    with_csv = published_table("literature_deepglobe", ours).set_index("method")
    assert with_csv.loc["RUE (K = 50%)", "mIoU (ours)"] == "73.00"
    assert with_csv.loc["RUE (K = 50%)", "mIoU Δ (ours − published)"] == "-0.70"


def test_uhrsnet_ablation_table(tmp_path):
    from pipelines.published import ablation_table

    missing = ablation_table("uhrsnet", "deepglobe", tmp_path / "uhrsnet_deepglobe.csv", "Table III")
    assert len(missing) == 5 and set(missing["mIoU (ours)"]) == {"not measured (no uhrsnet_deepglobe.csv)"}
    assert list(missing["mIoU (published)"]) == ["57.3", "63.1", "66.4", "70.9", "72.0"]
    csv = tmp_path / "uhrsnet_deepglobe.csv"
    csv.write_text("row,configuration,miou,iou.urban\nlocal,local,0.605,0.1\n"
                   "global_local_lff,global + local + LFF,0.7025,0.2\n")
    table = ablation_table("uhrsnet", "deepglobe", csv, "Table III")
    assert table.iloc[0]["configuration"] == "only local branch w/o fusion"
    assert list(table["mIoU (ours)"]) == ["60.50", "not measured (row not trained)", "not measured (row not trained)",
                                          "not measured (row not trained)", "70.25"]
    assert table.iloc[-1]["mIoU Δ (ours − published)"] == "-1.75"
    assert table.iloc[0]["mIoU Δ (ours − published)"] == "+3.20"
    elsewhere = ablation_table("uhrsnet", "synthetic", csv, "Table III")
    assert "mIoU (published, deepglobe)" in elsewhere.columns  # the paper's numbers say where they were measured


def test_tables_command_writes_every_format(store, tmp_path):
    from click.testing import CliRunner

    from bench import cli

    params = tmp_path / "params.yaml"
    params.write_text((__import__("pathlib").Path(__file__).parent.parent / "params.yaml").read_text()
                      .replace("results_root: results", f"results_root: {tmp_path / 'results'}"))
    result = CliRunner().invoke(cli, ["tables", "--params", str(params)])
    assert result.exit_code == 0, result.output
    # only deepglobe was run: the other datasets' tables are one line each, not files of "not measured"
    assert "paper_isdnet_inria: not written, no inria run of ours" in result.output
    assert "wrote" in result.output and "paper_isdnet_deepglobe.md" in result.output
    out = tmp_path / "results" / "tables"
    assert not (out / "paper_isdnet_inria.md").exists()
    result = CliRunner().invoke(cli, ["tables", "--all", "--params", str(params)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    for stem in ("paper_isdnet_deepglobe", "paper_isdnet_inria", "paper_isdnet_cityscapes",
                 "paper_isdnet_cityscapes_branches", "paper_uhrsnet_deepglobe", "literature_deepglobe",
                 "literature_inria", "literature_cityscapes", "literature_urur", "paper_uhrsnet_table3_deepglobe"):
        assert {f"{stem}.md", f"{stem}.csv", f"{stem}.tex"} <= set(names)
        if not stem.endswith("table3_deepglobe"):  # each published table also by source (not the ablations)
            assert {f"{stem}_sources.md", f"{stem}_sources.csv", f"{stem}_sources.tex"} <= set(names)
    sources = (out / "paper_isdnet_deepglobe_sources.md").read_text()
    assert "| retrained, paper recipe " in sources and "not run (no `paper` profile run)" in sources
    assert all(line.count("|") == sources.splitlines()[2].count("|") for line in sources.splitlines()
               if line.startswith("|"))  # no cell splits a markdown row
    md = (out / "paper_isdnet_deepglobe.md").read_text()
    assert md.startswith("# ISDNet (CVPR'22) Table 1: DeepGlobe test")
    assert "| ISDNet " in md and "| 73.30 " in md and "| +0.70 " in md and "(no pointrend run)" in md
    assert "run " in md and "commit abc1234" in md and "Test GPU" in md and "0.8x" in md
    assert "Published: ISDNet, CVPR 2022: RTX 2080Ti" in md
    tex = (out / "paper_isdnet_cityscapes.tex").read_text()
    assert "\\begin{tabular}" in tex and "not measured (no cityscapes run)" in tex
    assert pd.read_csv(out / "literature_inria.csv").shape == (16, 13)
    assert "[table] BPT (AAAI'25)" in (out / "literature_inria.md").read_text()  # the key of the source tags


def test_plots_points_and_png(store, tmp_path):
    from pipelines import plots
    from pipelines import published as published_module
    from pipelines.published import our_results

    ours = our_results("deepglobe")
    mine = plots.our_points(ours)
    assert [p["label"] for p in mine] == ["isdnet", "rue K=1", "rue K=0.25"]  # glnet has no FPS: not drawn
    published = published_module.points("deepglobe")
    # ISDNet's Table 1 first (every row has an FPS; a name it prints twice is labelled by its group), then the
    # literature's methods it lacks (WSDNet, SGHRQ, RUE x3 from RUE's figure, F2Net); the figure's GLNet "< 1"
    # does not replace the table's 0.17
    table1 = ["UNet (local inference)", "FCN-8s (local inference)", "DeepLabv3+ (local inference)",
              "UNet (global inference)", "FCN-8s (global inference)", "DeepLabv3+ (global inference)", "BiSeNetV1",
              "STDC", "GLNet", "CascadePSP", "PPN", "PointRend", "MagNet", "MagNet-Fast",
              "FCtL (official checkpoint, no TTA)", "ISDNet"]
    assert [p["label"] for p in published] == table1 + ["WSDNet", "SGHRQ", "RUE (K = 100%)", "RUE (K = 75%)",
                                                        "RUE (K = 50%)", "F2Net"]
    assert next(p for p in published if p["label"] == "GLNet")["fps"] == 0.17
    path = tmp_path / "acc.png"
    drawn = plots.accuracy_vs_fps({"deepglobe": published + mine, "inria": published_module.points("inria")}, path)
    assert len(drawn["deepglobe"]) == 25 and len(drawn["inria"]) == 13
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_writes_tables_plots_readme(store, tmp_path):
    from pipelines.report import report

    config = _config(tmp_path)
    sweep = tmp_path / "results" / "measure" / "deepglobe"
    sweep.mkdir(parents=True)
    pd.DataFrame({"size": [1024, 2048, 4096], "megapixels": [1.048576, 4.194304, 16.777216],
                  "status": ["ok", "ok", "OOM"], "latency_ms_median": [10.0, 40.0, None],
                  "torch_max_allocated_mib": [100.0, 400.0, None]}).to_csv(sweep / "isdnet_sweep.csv", index=False)
    written = report(config)
    root = tmp_path / "results"
    assert (root / "tables" / "compare_deepglobe.md").is_file()
    assert "| isdnet " in (root / "tables" / "compare_deepglobe.md").read_text()
    pngs = sorted(p.name for p in (root / "plots").iterdir())
    assert pngs == ["accuracy_vs_fps.png", "knob_sweeps.png", "scaling_deepglobe.png"]
    for name in pngs:
        assert (root / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (root / "README.md").read_text()
    assert root / "README.md" in written
    assert "tables/paper_isdnet_deepglobe.md" in readme and "tables/compare_deepglobe.md" in readme
    assert "commit abc1234" in readme and "Test GPU" in readme and "0.8x" in readme
    assert "max_memory_allocated" in readme and "building IoU" in readme
    assert "plots/knob_sweeps.png" in readme
    assert "- paper_isdnet_inria: not written, no inria run of ours" in readme  # said in one line
    from pipelines.config import REPO_ROOT

    assert str(REPO_ROOT) not in readme  # no clone path in what users read
    from pipelines.report import summary_text

    text = summary_text(config)
    assert text.startswith("deepglobe (mIoU on the `test` split, profile `smoke`):") and "isdnet" in text
    assert "IoU urban" not in text and "peak memory" in text


def test_scaling_and_k_sweep_data(tmp_path):
    from pipelines import plots

    frame = pd.DataFrame({"size": [1024, 2048, 4096], "megapixels": [1.0, 4.0, 16.0], "status": ["ok", "ok", "OOM"],
                          "latency_ms_median": [10.0, 40.0, None], "torch_max_allocated_mib": ["unavailable"] * 3,
                          "rss_peak_growth_mib": [50.0, 200.0, None]})
    drawn = plots.scaling("synthetic", {"global": frame}, tmp_path / "s.png")
    assert drawn["global"]["latency"] == [(1.0, 10.0), (4.0, 40.0)]
    assert drawn["global"]["memory"] == [(1.0, 50.0), (4.0, 200.0)]
    curves = plots.knob_sweeps({"deepglobe: rue K sweep": {
        "dataset": "deepglobe", "knob": "K", "published": [(1.0, 44.4, 75.1), (0.5, 57.0, 73.7)],
        "ours": [(1.0, 40.0, 76.0)]}}, tmp_path / "k.png")
    assert len(curves["deepglobe: rue K sweep"]["published"]) == 2
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


def test_knob_values_are_read_from_variant_tags_even_with_underscores_in_knob_names():
    from pipelines.config import variant_label
    from pipelines.published import run_settings

    tag = variant_label({"n_points": 0.9, "n_patches": 3})
    assert tag == "n_patches3_n_points0.9"
    assert dict(run_settings({"variant": tag}, "magnet")) == {"n_points": 0.9, "n_patches": 3.0}
    assert dict(run_settings({"variant": "k0.5"}, "rue")) == {"k": 0.5}
    # no tag: the logged model config
    assert dict(run_settings({"variant": "", "params.model.n_points": "0.75"}, "magnet")) == {"n_points": 0.75}
