"""UHRSNet-style (reconstructed): local feature fusion reads exactly a patch's existing grid neighbours,
both switches off give plain global / local branches, the ablation rows, and DeepGlobe-size shapes
(spec uhrsnet.md §4)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods import build_method, method_class
from methods.base import MethodError
from methods.blocks.patches import LogitStitcher, PatchGrid, cut_patches
from methods.uhrsnet import LocalFeatureFusion, UHRSNet, grid_neighbours

ABLATION_ROWS = UHRSNet.ablations

TINY = dict(backbone="resnet18", global_size=64, patch_size=64, min_overlap=16, patch_batch=4, head_width=16,
            fusion_channels=16, lff_channels=8, lff_margin=4, focal_gamma=0.0, fmreg=0.15)


def tiny(**kwargs) -> UHRSNet:
    torch.manual_seed(0)
    return UHRSNet(num_classes=5, **{**TINY, **kwargs})


def batch(b: int = 1, h: int = 160, w: int = 160):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (b, 3, h, w), generator=g).float(), torch.randint(0, 5, (b, h, w), generator=g))


def test_registered_with_alias():
    assert method_class("uhrnet") is method_class("uhrsnet") is UHRSNet
    assert "reconstructed" in UHRSNet.description
    with pytest.raises(MethodError, match="branches"):
        tiny(branches="neither")


@pytest.mark.parametrize(("index", "expected"), [
    (0, {1, 4, 5}),                       # top-left corner
    (3, {2, 6, 7}),                       # top-right corner
    (15, {10, 11, 14}),                   # bottom-right corner
    (1, {0, 2, 4, 5, 6}),                 # top edge
    (4, {0, 1, 5, 8, 9}),                 # left edge
    (5, {0, 1, 2, 4, 6, 8, 9, 10}),       # interior
])
def test_grid_neighbours_4x4(index, expected):
    assert set(grid_neighbours(4, 4, index)) == expected


def _lff_dependencies(grid: PatchGrid, margin: int, h: int = 8) -> dict[int, set[int]]:
    """For every patch i: the patches whose input ps3 changes patch i's LFF output (non-zero gradient)."""
    torch.manual_seed(0)
    lff = LocalFeatureFusion(channels=6, lff_channels=4, margin=margin).eval()  # BN on running stats
    torch.nn.init.normal_(lff.refine[-1].weight, std=0.1)  # the zero init would hide every dependency
    ps3 = torch.randn(len(grid), 6, h, h, requires_grad=True)
    out = lff(ps3, grid)
    deps = {}
    for i in range(len(grid)):
        (grad,) = torch.autograd.grad(out[i].square().sum(), ps3, retain_graph=True)
        deps[i] = {j for j in range(len(grid)) if grad[j].abs().sum() > 0}
    return deps


@pytest.mark.parametrize("margin", [0, 3, 12])  # 12 cells: the window reaches patches two steps away
def test_lff_reads_exactly_the_existing_neighbours(margin):
    grid = PatchGrid.build(112, 112, 32, min_overlap=8)  # 5x5 grid, stride 20 px, overlap 12 (h = 8 cells)
    assert grid.tops == grid.lefts == (0, 20, 40, 60, 80)
    deps = _lff_dependencies(grid, margin)
    for i in range(25):
        assert deps[i] == set(grid_neighbours(5, 5, i)) | {i}, i
    assert len(deps[0]) == 4 and len(deps[2]) == 6 and len(deps[12]) == 9  # corner, edge, interior


def test_lff_pastes_neighbours_at_their_offsets():
    grid = PatchGrid.build(80, 80, 32, min_overlap=8)  # 3x3 grid, stride 24 px = 6 cells at h = 8
    assert grid.tops == (0, 24, 48)
    lff = LocalFeatureFusion(channels=4, lff_channels=2, margin=2)
    messages = torch.zeros(9, 2, 8, 8)
    messages[5, 0, 0, 0] = 1.0  # right neighbour of the centre patch 4, its top-left cell
    win = lff.windows(messages, grid)[4]
    assert torch.nonzero(win[0]).tolist() == [[2, 2 + 6]]  # margin + offset of 24 px * 8 / 32
    count = win[-1]
    assert count[2, 2] == 3  # the patch's top-left cell: under its top-left, top and left neighbours
    assert count[2 + 4, 2 + 4] == 0  # its centre: the 8 px overlaps do not reach it
    corner = lff.windows(messages, grid)[0][-1]
    assert corner[:2].sum() == 0 and corner[:, :2].sum() == 0  # nothing beyond the image border


def test_lff_in_chunks_equals_all_at_once():
    torch.manual_seed(0)
    lff = LocalFeatureFusion(channels=6, lff_channels=4, margin=3).eval()
    torch.nn.init.normal_(lff.refine[-1].weight, std=0.1)
    grid, ps3 = PatchGrid.build(80, 80, 32, min_overlap=8), torch.randn(9, 6, 8, 8)
    torch.testing.assert_close(lff(ps3, grid, chunk=2), lff(ps3, grid))


@pytest.mark.parametrize("margin", [0, 2, 5, 12])
def test_lff_refinement_reaches_the_margin_and_crops_exactly(margin):
    """The centre-only last conv equals refining the whole window and cropping its centre, and a patch's border
    cell depends on the window's outermost margin cells (the neighbours' features are within reach)."""
    torch.manual_seed(0)
    lff = LocalFeatureFusion(channels=6, lff_channels=4, margin=margin).eval()
    torch.nn.init.normal_(lff.refine[-1].weight, std=0.1)
    h = 8
    ps3 = torch.randn(1, 6, h, h)
    windows = torch.randn(1, 9, h + 2 * margin, h + 2 * margin, requires_grad=True)
    out = lff._refine(ps3, windows)
    whole = lff.refine(windows)[:, :, margin:margin + h, margin:margin + h]
    torch.testing.assert_close(out, ps3 + whole)
    if margin:
        (grad,) = torch.autograd.grad(out[0, :, h // 2, 0].sum(), windows)  # left border cell, mid-height
        assert grad[0, :, :, 0].abs().sum() > 0  # the window's leftmost column: `margin` cells out


def test_lff_starts_as_identity():
    lff = LocalFeatureFusion(channels=6, lff_channels=4, margin=2).eval()
    ps3 = torch.randn(9, 6, 8, 8)
    assert torch.equal(lff(ps3, PatchGrid.build(80, 80, 32, min_overlap=8)), ps3)


def test_both_switches_off_is_plain_global_and_local_branches():
    model = tiny(global_local_fusion=False, local_fusion=False).eval()
    assert not hasattr(model, "fusion") and not hasattr(model, "lff")
    images, labels = batch()
    grid = model._grid(images)
    assert len(grid) == 9
    with torch.no_grad():
        patches = cut_patches(images, grid, range(len(grid)))
        local = model.fpn_local(model.resnet_local(model.normalize(patches))[::-1]).logits
        small = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        glob = model.fpn_global(model.resnet_global(model.normalize(small))[::-1])
        out = model.image_outputs(images, 0, grid, model.run_global(images), 4)
        torch.testing.assert_close(out["local"], local)
        torch.testing.assert_close(model.run_global(images).logits, glob.logits)
        crop = model.global_crops(glob.logits, 0, grid, local)
        torch.testing.assert_close(out["late"], (local + crop) / 2)
        stitch = LogitStitcher(grid, 5)
        stitch.add((local + crop) / 2, range(9))
        torch.testing.assert_close(model.predict(images), stitch.result())
        # the local branch never sees global features: changing the global trunk leaves it as it was
        for p in model.resnet_global.parameters():
            p.add_(1.0)
        torch.testing.assert_close(model.image_outputs(images, 0, grid, model.run_global(images), 9)["local"], local)
    model.train()
    assert set(model.forward_train(images, labels)) == {"loss_global", "loss_local"}


def test_full_model_trains_every_part_and_lff_adds_only_its_module():
    model = tiny().train()
    images, labels = batch(b=2, h=128, w=128)
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_global", "loss_local", "loss_fused", "loss_fmreg"}
    sum(terms.values()).backward()
    for name in ("resnet_global", "fpn_global", "resnet_local", "fpn_local", "fusion", "lff"):
        grads = [p.grad for p in model.get_submodule(name).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    plain = tiny(local_fusion=False)
    extra = {k for k in model.state_dict() if k not in plain.state_dict()}
    assert extra and all(k.startswith("lff.") for k in extra)


@pytest.mark.parametrize(("key", "outputs"), [
    ("local", {"loss_local"}), ("local_lff", {"loss_local"}), ("global", {"loss_global"}),
    ("global_local", {"loss_global", "loss_local", "loss_fused", "loss_fmreg"}),
    ("global_local_lff", {"loss_global", "loss_local", "loss_fused", "loss_fmreg"})])
def test_ablation_rows_are_five_configurations_of_one_model(key, outputs):
    kwargs = next(r.model for r in ABLATION_ROWS if r.key == key)
    model = build_method("uhrnet", 5, **{**TINY, **kwargs})
    images, labels = batch(h=96, w=96)
    assert set(model.forward_train(images, labels)) == outputs
    assert hasattr(model, "lff") == key.endswith("lff")
    assert hasattr(model, "resnet_global") == key.startswith("global")
    assert hasattr(model, "resnet_local") == (key != "global")
    assert model.eval().predict(images).shape == (1, 5, 96, 96)


def test_ablation_rows_share_initial_weights():
    """Under the same run seed every row builds the parts it shares with another row from identical
    weights, so the rows differ only by their switches (and the global RNG ends where it would anyway)."""
    models, after = {}, {}
    for key, kwargs in ((r.key, r.model) for r in ABLATION_ROWS):
        torch.manual_seed(7)
        models[key] = build_method("uhrsnet", 5, **{**TINY, **kwargs})
        after[key] = torch.rand(1)  # what the trainer would draw next
    full = models["global_local_lff"].state_dict()
    for key, model in models.items():
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, full[name]), (key, name)
        assert torch.equal(after[key], after["local"])
    torch.manual_seed(8)
    other = build_method("uhrsnet", 5, **{**TINY, **ABLATION_ROWS[0].model}).state_dict()
    assert not all(torch.equal(tensor, full[name]) for name, tensor in other.items())  # the seed still matters


def test_deepglobe_shapes_on_meta_device():
    """Default (paper) config at 2448x2448 on the meta device: GLNet's geometry, spec §4.2 shapes."""
    with torch.device("meta"):
        model = build_method("uhrsnet", 7).eval()
        image = torch.empty(1, 3, 2448, 2448)
    shapes = {}

    def hook(name):
        def record(module, inputs, output) -> None:
            shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))  # the last call

        return record

    model.fpn_global.classify.register_forward_hook(hook("global"))
    model.fpn_local.classify.register_forward_hook(hook("local"))
    model.fusion.register_forward_hook(hook("fusion"))
    model.lff.refine[0].register_forward_hook(hook("lff"))
    logits = model.predict(image)
    assert tuple(logits.shape) == (1, 7, 2448, 2448)
    assert shapes["global"] == ((1, 512, 127, 127), (1, 7, 127, 127))
    assert shapes["local"] == ((36, 512, 127, 127), (36, 7, 127, 127))  # 6x6 patches of 508
    assert shapes["fusion"] == ((6, 1024, 127, 127), (6, 7, 127, 127))  # [ps3_l, crop(ps3_g)], 6 patches a pass
    assert shapes["lff"][0] == (6, 2 * 128 + 1, 127 + 64, 127 + 64)  # margin 32 cells each side


def test_ablation_configs_and_table(tmp_path):
    from pipelines.ablation import ablation_rows, row_config, write_scores
    from pipelines.config import ConfigError, load_config

    config = load_config(overrides=[f"results_root={tmp_path}", f"checkpoint_root={tmp_path / 'ckpt'}"])
    rows = ablation_rows("uhrnet")
    assert [r.key for r in rows] == ["local", "local_lff", "global", "global_local", "global_local_lff"]
    roots = set()
    for row in rows:
        kwargs = row.model
        cfg = row_config(config, "uhrsnet", "synthetic", row, seed=3)
        assert cfg.seed == 3
        model = cfg.method_model("uhrsnet", "synthetic")
        assert {k: model[k] for k in kwargs} == kwargs and model["backbone"] == "resnet18"  # recipe model kept
        assert cfg.checkpoint_root.is_relative_to(tmp_path / "ckpt")
        roots.add(cfg.checkpoint_root)
    assert len(roots) == 5
    with pytest.raises(ConfigError, match="declares no ablation rows"):
        ablation_rows("glnet")
    result = lambda miou: {"miou": miou, "iou": {"urban": 0.25}, "profile": "smoke", "split": "test",  # noqa: E731
                           "mlflow_run_id": "abc"}
    md, csv_path = write_scores(config, "deepglobe", "uhrsnet", rows,
                                {("local", 0): result(0.5), ("global_local_lff", 0): result(0.6123)})
    assert md == tmp_path / "ablations" / "uhrsnet_deepglobe.md" and csv_path.suffix == ".csv"
    text = md.read_text()
    assert "reconstructed" in text and "61.23" in text and "| 72.0 " in text and "| 57.3 " in text and "69.4" in text
    assert "## UHRNet (ICPR'20) Table III" in text and "| both branches with local fusion " in text
    assert text.count("not measured (row not trained)") == 3
    assert csv_path.read_text().count("\n") == 3 and "iou.urban" in csv_path.read_text()


def test_secondary_output_is_the_local_branch_of_two_branch_rows():
    images, _ = batch(h=96, w=96)
    full = tiny().eval()
    assert [(o.name, o.kind) for o in full.outputs] == [("local", "logits")]
    grid = full._grid(images)
    with torch.no_grad():
        out = full.image_outputs(images, 0, grid, full.run_global(images), 4)
    stitch = LogitStitcher(grid, 5)
    stitch.add(out["local"], range(len(grid)))
    torch.testing.assert_close(full.predict_output(images, "local"), stitch.result())
    with pytest.raises(MethodError, match="no output 'late'"):
        full.predict_output(images, "late")
    assert tiny(branches="local").outputs == tiny(branches="global").outputs == ()
    with pytest.raises(MethodError, match="global-only"):
        tiny(branches="global").predict_output(images, "local")


def test_fusion_starts_as_the_late_average_of_the_branches():
    """Fusion on = the fusion-off model (late average of local and cropped global logits) + a learned correction
    that starts at zero."""
    images, _ = batch(h=96, w=96)
    fused, late = tiny().eval(), tiny(global_local_fusion=False).eval()
    late.load_state_dict(fused.state_dict(), strict=False)
    with torch.no_grad():
        grid = fused._grid(images)
        out = fused.image_outputs(images, 0, grid, fused.run_global(images), 2)
        plain = late.image_outputs(images, 0, grid, late.run_global(images), 2)
        torch.testing.assert_close(out["fused"], plain["late"])
        assert not torch.allclose(out["fused"], out["local"])
        torch.nn.init.normal_(fused.fusion[-1].weight)
        moved = fused.image_outputs(images, 0, grid, fused.run_global(images), 2)["fused"]
    assert not torch.allclose(moved, plain["late"])


def test_staged_training_freezes_the_global_branch_while_the_local_side_trains():
    from conftest import ran_modules

    model = tiny(staged=True)
    phases = {p.name: p for p in model.phases}
    assert list(phases) == ["global", "local"]
    assert phases["global"].trainable == ("resnet_global", "fpn_global") and phases["global"].recipe == "global"
    assert set(phases["local"].trainable) == {"resnet_local", "fpn_local", "lff", "fusion"}
    assert phases["local"].frozen_eval == ("resnet_global", "fpn_global") and phases["local"].recipe == "local"
    images, labels = batch(b=2, h=128, w=128)
    model.train()
    model.set_phase("global")
    ran = ran_modules(model, lambda: model.forward_train(images, labels))
    assert "resnet_global" in ran and not {"resnet_local", "fpn_local", "lff", "fusion"} & ran
    assert set(model.forward_train(images, labels)) == {"loss_global"}
    model.set_phase("local")
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_local", "loss_fused", "loss_fmreg"}
    sum(terms.values()).backward()
    assert all(p.grad is None for p in model.resnet_global.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())
    with pytest.raises(MethodError, match="unknown phase 'phase1'"):
        model.set_phase("phase1")
    assert [p.name for p in tiny().phases] == ["main"]  # joint by default (the paper recipe)


def test_staged_rows_train_each_branch_with_the_full_models_recipe_and_samples():
    """A one-branch row keeps only its branch's phase, with the full model's recipe key and sample stream."""
    full = {p.name: p for p in tiny(staged=True).phases}
    names = {}
    for key, kwargs in ((r.key, r.model) for r in ABLATION_ROWS):
        phases = tiny(staged=True, **kwargs).phases
        names[key] = [p.name for p in phases]
        for phase in phases:
            assert (phase.recipe, phase.data_stream) == (full[phase.name].recipe, full[phase.name].data_stream)
    assert names == {"local": ["local"], "local_lff": ["local"], "global": ["global"],
                     "global_local": ["global", "local"], "global_local_lff": ["global", "local"]}
    assert tiny(staged=True, branches="local").phases[0].frozen_eval == ()


def test_train_block_is_a_random_block_of_neighbours_in_whole_image_coordinates():
    from dataclasses import replace

    images, _ = batch(h=160, w=160)
    full = tiny()._grid(images)
    assert (len(full.tops), len(full.lefts)) == (3, 3)
    model = tiny(train_block=2)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        block = model._train_grid(images)
        assert (block.height, block.width, block.patch) == (full.height, full.width, full.patch)
        i, j = full.tops.index(block.tops[0]), full.lefts.index(block.lefts[0])
        assert block.tops == full.tops[i:i + 2] and block.lefts == full.lefts[j:j + 2]
        seen.add((i, j))
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert tiny(train_block=3)._train_grid(images) == full == tiny()._train_grid(images)
    for bad in (0, 1.5):
        with pytest.raises(MethodError, match="train_block"):
            tiny(train_block=bad)
    # A block's fused outputs are those of the same patches in the whole grid: the global crops keep their place.
    model = tiny(local_fusion=False).eval()
    torch.nn.init.normal_(model.fusion[-1].weight)  # make the fusion head use the global features
    block = replace(full, tops=full.tops[1:], lefts=full.lefts[:2])
    with torch.no_grad():
        g = model.run_global(images)
        whole = model.image_outputs(images, 0, full, g, 9)["fused"]
        part = model.image_outputs(images, 0, block, g, 4)["fused"]
    torch.testing.assert_close(part, whole[[3, 4, 6, 7]])
    assert not torch.allclose(part, whole[[0, 1, 3, 4]])


def test_ablation_command_end_to_end(tmp_path, tiny_synthetic, mlflow_store):
    """`bench.py ablation` on the tiny dataset: the chosen rows train and evaluate under their own roots and
    MLflow variants, the table lists every row, a second call reuses finished checkpoints, and the ablation
    runs never stand in for the method's benchmark number."""
    import mlflow
    import pandas as pd
    from click.testing import CliRunner
    from conftest import tiny_params

    from bench import cli
    from pipelines.config import load_config
    from pipelines.published import our_results

    params = tiny_params(tmp_path, tiny_synthetic)
    recipe = "methods.uhrsnet.recipes.smoke"
    sets = [f"{recipe}.{stage}.{key}" for stage in ("global", "local") for key in ("iterations=2", "log_every=1")]
    sets += [f"{recipe}.model.patch_size=32", f"{recipe}.model.min_overlap=8", f"{recipe}.model.lff_margin=2"]
    args = ["ablation", "--dataset", "synthetic", "--method", "uhrsnet", "--params", str(params),
            *[x for s in sets for x in ("--set", s)]]
    result = CliRunner().invoke(cli, [*args, "--row", "local", "--row", "global_local_lff"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "results" / "ablations"
    scores = pd.read_csv(out / "uhrsnet_synthetic.csv")
    assert list(scores["row"]) == ["local", "global_local_lff"] and scores["miou"].between(0, 1).all()
    assert {"iou.urban", "mlflow_run_id", "branches", "local_fusion"} <= set(scores.columns)
    # the two-branch row also scores its local branch alone (the paper's "local" number); local rows have none
    assert scores["miou_local_output"].between(0, 1).tolist() == [False, True]
    md = (out / "uhrsnet_synthetic.md").read_text()
    assert md.count("not measured (row not trained)") == 3 and "UHRSNet-style (reconstructed)" in md
    rows_root = tmp_path / "checkpoints" / "ablation" / "uhrsnet" / "synthetic"
    checkpoints = sorted(rows_root.glob("*/*/synthetic/uhrsnet"))
    assert [p.parts[-4:-2] for p in checkpoints] == [("global_local_lff", "seed0"), ("local", "seed0")]

    experiment = mlflow.get_experiment_by_name("uhrbench-synthetic")
    evaluations = mlflow.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    assert sorted(evaluations["tags.variant"]) == ["ablation-global_local_lff", "ablation-local"]
    full_run = evaluations[evaluations["tags.variant"] == "ablation-global_local_lff"].iloc[0]
    assert full_run["metrics.output.local.miou"] == pytest.approx(scores["miou_local_output"].iloc[1])
    assert our_results("synthetic")["rows"] == {}  # no ablation row passes for uhrsnet's benchmark number

    final = checkpoints[0] / "final.pt"
    stamp = final.stat().st_mtime_ns
    result = CliRunner().invoke(cli, [*args, "--row", "local", "--seeds", "0,1"])  # trains only local, seed 1
    assert result.exit_code == 0, result.output
    assert final.stat().st_mtime_ns == stamp
    scores = pd.read_csv(out / "uhrsnet_synthetic.csv")
    assert list(zip(scores["row"], scores["seed"], strict=True)) == [("local", 0), ("local", 1),
                                                                     ("global_local_lff", 0)]
    from pipelines.published import ablation_table

    table = ablation_table("uhrsnet", "synthetic", out / "uhrsnet_synthetic.csv", "Table III")
    table = table.set_index("configuration").rename(index={"only local branch w/o fusion": "local",
                                                            "both branches with local fusion": "global + local + LFF"})
    mean, std = 100 * scores["miou"][:2].mean(), 100 * scores["miou"][:2].std()
    assert (table.loc["local", "mIoU (ours)"], table.loc["local", "mIoU std over seeds (ours)"]) == (f"{mean:.2f}",
                                                                                              f"{std:.2f}")
    assert table.loc["local", "seeds"] == 2 and table.loc["global + local + LFF", "seeds"] == 1
    assert table.loc["local", "mIoU of the local output (ours)"] == ""
    assert table.loc["global + local + LFF", "mIoU of the local output (ours)"] == \
        f"{100 * scores['miou_local_output'].iloc[2]:.2f}"
    seed_runs = [torch.load(rows_root / "local" / f"seed{s}" / "synthetic" / "uhrsnet" / "final.pt",
                            weights_only=False)["model"] for s in (0, 1)]
    assert not torch.equal(seed_runs[0]["fpn_local.classify.weight"], seed_runs[1]["fpn_local.classify.weight"])
    assert CliRunner().invoke(cli, [*args, "--seeds", "0,0"]).output.strip().endswith("distinct integers, e.g. 0,1,2")
    from pipelines.report import tables

    skipped: list[str] = []
    written = tables(load_config(params), skipped=skipped)  # no deepglobe scores: that table is one line
    assert any(line.startswith("paper_uhrsnet_table3_deepglobe: not written") for line in skipped)
    written = tables(load_config(params), all_datasets=True)
    paper = next(p for p in written if p.name == "paper_uhrsnet_table3_deepglobe.md").read_text()
    assert "uhrsnet_deepglobe.csv" in paper
    ours = next(p for p in written if p.name == "paper_uhrsnet_table3_synthetic.md").read_text()
    assert "(published, deepglobe)" in ours and "compare the differences between rows" in ours
