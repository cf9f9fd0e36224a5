"""Generic networks as variants: one definition, runs `<network>-global` and `<network>-local`, through the same
config, pipeline and published tables as every method (methods/blocks/generic.py)."""
from __future__ import annotations

import pytest
import torch

from methods import MethodError, build_method, resolve_method_name, run_names, split_variant
from pipelines import published
from pipelines.config import ConfigError, load_config

SMALL = {"window": 64, "overlap": 16, "window_batch": 4}


def test_variants_are_runs_and_the_bare_network_is_not():
    assert {"unet-global", "unet-local", "deeplabv3plus-global", "deeplabv3plus-local"} <= set(run_names())
    assert "unet" not in run_names() and "isdnet" in run_names()
    assert split_variant("unet-local")[1].model == {"inference": "local"}
    assert resolve_method_name("unet-local") == "unet-local"
    with pytest.raises(MethodError, match="runs as one of its variants: unet-global, unet-local"):
        build_method("unet", 7)
    with pytest.raises(MethodError, match="unknown method 'unet-middle'.*unet-global"):
        build_method("unet-middle", 7)
    with pytest.raises(MethodError, match=r"unet-global: the variant sets \{'inference': 'global'\}; remove"):
        build_method("unet-global", 7, inference="local")


def test_global_sees_the_downsampled_image_and_local_slides_windows():
    seen = {}
    for run in ("unet-global", "unet-local"):
        torch.manual_seed(0)
        model = build_method(run, 7, downsample=4, **SMALL).eval()
        sizes = []
        model.network.register_forward_pre_hook(lambda m, args, s=sizes: s.append(tuple(args[0].shape)))
        with torch.inference_mode():
            logits = model.predict(torch.randint(0, 256, (1, 3, 130, 150), dtype=torch.uint8))
        assert logits.shape == (1, 7, 130, 150)
        seen[run] = sizes
    assert seen["unet-global"] == [(1, 3, 32, 64)]  # 130 x 150 / 4 = 32 x 37, padded to a multiple of 32
    assert len(seen["unet-local"]) == 3 and all(s[-2:] == (64, 64) for s in seen["unet-local"])  # 3 x 3 windows


def test_params_expand_networks_into_runs_with_their_variant_recipe():
    config = load_config(None, ["benchmark.networks=[unet,deeplabv3plus]", "benchmark.inference=[local]"])
    assert config.benchmark_methods[-2:] == ["unet-local", "deeplabv3plus-local"]
    assert config.recipe("unet-local", "synthetic").crop_size == 256
    assert config.recipe("unet-global", "synthetic").crop_size is None
    assert config.resolved("deeplabv3plus-local", "synthetic")["train"]["model"]["inference"] == "local"
    assert config.resolved("deeplabv3plus-local", "synthetic")["paths"]["checkpoint"].endswith(
        "synthetic/deeplabv3plus-local")


@pytest.mark.parametrize(("override", "message"), [
    ("benchmark.methods=[unet]", "'unet' is a generic network; list 'unet' in benchmark.networks"),
    ("benchmark.methods=[unet-global]", "'unet-global' is a generic network; list 'unet' in benchmark.networks"),
    ("benchmark.networks=[isdnet]", "'isdnet' is not a generic network"),
    ("benchmark.networks=[unet]", None),
])
def test_misplaced_networks_get_one_line(override, message):
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_unknown_inference_mode_names_the_variants():
    with pytest.raises(ConfigError, match="'tiled' is not a variant of unet \\(global, local\\)"):
        load_config(None, ["benchmark.networks=[unet]", "benchmark.inference=[tiled]"])


def _ours(rows: dict) -> dict:
    return {"runs": True, "rows": {(run, ()): {"headline": miou, "fps": 2.0, "memory": 100.0, "outputs": {}}
                                   for run, miou in rows.items()}}


def test_paper_rows_of_both_modes_are_filled_by_their_variant():
    """ISDNet Table 1 prints UNet under Local and under Global inference; each cell comes from its own run."""
    table = published.published_table("paper_isdnet_deepglobe", _ours({"unet-local": 41.0, "unet-global": 52.0}))
    unet = table[table["method"] == "UNet"].set_index("group")
    mine = [c for c in table.columns if c.startswith("mIoU") and "ours" in c][0]
    assert float(unet.loc["Local inference", mine]) == 41.0 and float(unet.loc["Global inference", mine]) == 52.0
    assert unet.loc["Local inference", "ours"] == "unet-local"
    deeplab = table[table["method"] == "DeepLabv3+"].set_index("group")
    assert deeplab.loc["Global inference", mine] == "not measured (no deeplabv3plus-global run)"


def test_uhrnet_local_and_global_columns_come_from_the_two_runs():
    table = published.published_table("paper_uhrsnet_deepglobe", _ours({"unet-local": 30.0, "unet-global": 40.0}))
    row = table[table["method"] == "UNet"].iloc[0]
    local = [c for c in table.columns if c.startswith("mIoU local") and "ours" in c][0]
    glob = [c for c in table.columns if c.startswith("mIoU global") and "ours" in c][0]
    assert (float(row[local]), float(row[glob])) == (30.0, 40.0)
    assert row["ours"] == "unet-local, unet-global"


# The systems no registered method implements yet (each a later issue); every other row of the papers' own tables
# is filled by one of ours, or says why not ("not measured (no <dataset> run)").
NOT_IMPLEMENTED = {
    "paper_isdnet_deepglobe": set(),
    "paper_isdnet_inria": set(),
    "paper_isdnet_cityscapes": set(),
    "paper_isdnet_cityscapes_branches": set(),
    "paper_uhrsnet_deepglobe": set(),
}


@pytest.mark.parametrize("table_id", sorted(NOT_IMPLEMENTED))
def test_only_unimplemented_systems_stay_published_only(table_id):
    table = published.published_table(table_id, {"runs": True, "rows": {}})
    mine = [c for c in table.columns if c.endswith("(ours)")]
    only = set(table[table[mine].eq(published.PUBLISHED_ONLY).any(axis=1)]["method"])
    assert only == NOT_IMPLEMENTED[table_id]
    filled = table[~table["method"].isin(only)]
    assert filled[mine].map(lambda v: str(v).startswith("not measured (no ")).all().all()


@pytest.mark.parametrize(("run", "divisor"), [("unet-global", 32), ("deeplabv3plus-global", 16)])
def test_smp_networks_pad_and_crop_rather_than_stretch(run, divisor):
    """smp needs sides divisible by its output stride: the input is zero-padded (the mean colour after
    normalisation) and the logits cropped back, so a pixel's logit is the network's at that pixel."""
    torch.manual_seed(0)
    model = build_method(run, 7, downsample=1, encoder="resnet18").eval()
    image = torch.randint(0, 256, (1, 3, 70, 90), dtype=torch.uint8)
    padded = torch.nn.functional.pad(model.normalize(image), (0, -90 % divisor, 0, -70 % divisor))
    with torch.inference_mode():
        expected = model.network(padded)[..., :70, :90]
        assert torch.allclose(model.predict(image), expected, atol=1e-5)


def test_segformer_paper_recipe_sets_mmsegs_per_parameter_lr_and_decay():
    """mmseg's paramwise_cfg on our module names: the head at 10x lr, every LayerNorm without weight decay."""
    from pipelines.train import param_groups

    recipe = load_config(None, ["profile=paper"]).recipe("segformer-global", "cityscapes")
    model = build_method("segformer-global", 19)
    settings = {id(p): (g["lr"], g["weight_decay"]) for g in param_groups(recipe, model.named_parameters())
                for p in g["params"]}
    named = dict(model.named_parameters())
    assert settings[id(named["decode_head.conv_seg.weight"])] == (pytest.approx(6e-4), 0.01)
    assert settings[id(named["decode_head.fusion_conv.bn.weight"])] == (pytest.approx(6e-4), 0.01)
    norms = [n for n in named if n.startswith("backbone.") and "norm" in n]
    assert len(norms) > 20 and all(settings[id(named[n])] == (pytest.approx(6e-5), 0.0) for n in norms)
    assert settings[id(named["backbone.block1.0.attn.q.weight"])] == (pytest.approx(6e-5), 0.01)
