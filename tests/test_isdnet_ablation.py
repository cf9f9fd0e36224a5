"""ISDNet's ablation switches (paper Tables 5-7, `ISDNet.ablations`): every declared row builds, trains with exactly
its loss terms and gradients on every parameter (DDP without an unused-parameter search), predicts at input size,
and each switch demonstrably changes what runs. The defaults stay today's model (tests/test_isdnet.py and the golden
test hold them to the official code)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ran_modules

from methods.base import MethodError
from methods.blocks.isd import RelationAwareFusion, laplacian_input
from methods.isdnet import ISDNet

NUM_CLASSES = 5
FULL = {"decode.loss_seg", "refine.loss_seg", "aux_1.loss_seg", "aux_2.loss_seg", "aux_3.recon_losses",
        "aux_4.fa_loss", "aux.loss_seg"}
NO_SR = FULL - {"aux_3.recon_losses", "aux_4.fa_loss"}
DEEP = {"decode.loss_seg", "aux.loss_seg"}
SHALLOW = {"refine.loss_seg", "aux_2.loss_seg"}
EXPECTED_TERMS = {
    "deep_quarter": DEEP, "deep_full": DEEP, "shallow_quarter": SHALLOW, "shallow_full": SHALLOW,
    "deep_shallow_add": NO_SR,
    "add": FULL, "add_cw": FULL, "cat": FULL, "cat_cw": FULL, "add_cw_ms": FULL, "isdnet": FULL,
    "baseline": NO_SR, "sr": FULL - {"aux_4.fa_loss"}, "sr_sd": FULL,
}
ROWS = {row.key: row for row in ISDNet.ablations}  # "isdnet" is declared twice with the same model


def images(b: int = 2, h: int = 64, w: int = 64, seed: int = 0, low: int = 0, high: int = 256) -> torch.Tensor:
    return torch.randint(low, high, (b, 3, h, w), generator=torch.Generator().manual_seed(seed)).float()


def labels(b: int = 2, h: int = 64, w: int = 64) -> torch.Tensor:
    y = torch.randint(0, NUM_CLASSES, (b, h, w), generator=torch.Generator().manual_seed(1))
    y[:, :4] = 255
    return y


def build(**model) -> ISDNet:
    torch.manual_seed(0)
    return ISDNet(NUM_CLASSES, **model)


def stdc_inputs(net: ISDNet, fn) -> list[torch.Tensor]:
    """The tensors the shallow STDC trunk receives during fn()."""
    seen: list[torch.Tensor] = []
    handle = net.refine_head.stdc_net.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        fn()
    finally:
        handle.remove()
    return seen


# ---------------------------------------------------------------------------------------------------------------
# the declared rows


def test_declared_rows_follow_the_paper_tables():
    by_table: dict[str, list[str]] = {}
    for row in ISDNet.ablations:
        by_table.setdefault(row.table, []).append(row.key)
    assert by_table == {
        "Table 5": ["deep_quarter", "deep_full", "shallow_quarter", "shallow_full", "deep_shallow_add"],
        "Table 6": ["add", "add_cw", "cat", "cat_cw", "add_cw_ms", "isdnet"],
        "Table 7": ["baseline", "sr", "sr_sd", "isdnet"],
    }
    columns = {"Table 5": {"D", "S", "input"}, "Table 6": {"ADD", "CAT", "CW", "M_s", "M_d"},
               "Table 7": {"baseline", "L_SR", "L_SD", "H (Laplacian input)"}}
    for row in ISDNet.ablations:
        assert set(row.marks) == columns[row.table], row.key
        assert yaml.safe_load(yaml.safe_dump(row.model)) == row.model, row.key  # YAML / --set friendly
    full = [row for row in ISDNet.ablations if row.key == "isdnet"]
    assert [(r.table, r.model, r.label) for r in full] == [
        ("Table 6", {}, "ADD + CW + M_s + M_d"), ("Table 7", {}, "baseline + L_SR + L_SD + H")]
    marks = {(r.table, r.key): r.marks for r in ISDNet.ablations}
    assert marks["Table 5", "deep_shallow_add"] == {"D": True, "S": True, "input": "D at 1/4, S at full"}
    assert marks["Table 5", "shallow_quarter"] == {"D": False, "S": True, "input": "1/4 scale"}
    assert marks["Table 6", "cat_cw"] == {"ADD": False, "CAT": True, "CW": True, "M_s": "-", "M_d": "-"}
    assert marks["Table 6", "add_cw_ms"] == {"ADD": True, "CAT": False, "CW": True, "M_s": True, "M_d": False}
    assert marks["Table 7", "sr"] == {"baseline": True, "L_SR": True, "L_SD": False, "H (Laplacian input)": False}
    assert ROWS["add_cw_ms"].label == "ADD + CW + M_s" and ROWS["deep_quarter"].label == "D only, 1/4 scale"
    assert set(EXPECTED_TERMS) == set(ROWS)


@pytest.mark.parametrize("key", sorted(ROWS))
def test_row_trains_every_parameter_and_predicts(key):
    net = build(**ROWS[key].model).train()
    terms = net.forward_train(images(), labels())
    assert set(terms) == EXPECTED_TERMS[key]
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values()), terms
    sum(terms.values()).backward()
    # every parameter is in the training graph: DDP needs no find_unused_parameters, nothing sits untrained
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    net.eval()
    with torch.no_grad():
        logits = net.predict(images(1, 64, 48))
    assert logits.shape == (1, NUM_CLASSES, 64, 48) and torch.isfinite(logits).all()


def test_default_row_is_todays_model():
    def seven(**model) -> ISDNet:  # the spec's parameter count is for 7 classes
        torch.manual_seed(0)
        return ISDNet(7, **model)

    today = seven()
    row = seven(**ROWS["isdnet"].model)
    explicit = seven(branches="both", shallow_input="laplacian", shallow_scale=1.0, fusion="add",
                     channel_weights=True, relation=["shallow", "deep"], recon_weight=0.1, fa_weight=1.0, down_ratio=4)
    for other in (row, explicit):
        assert list(other.state_dict()) == list(today.state_dict())
        assert sum(p.numel() for p in other.parameters()) == sum(p.numel() for p in today.parameters()) == 17_780_554
    x = images(1)
    with torch.no_grad():
        assert torch.equal(explicit.eval().predict(x), today.eval().predict(x))


# ---------------------------------------------------------------------------------------------------------------
# RAF switches (Table 6)


def raf_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 256, 16, 16, generator=g), torch.randn(2, 128, 8, 8, generator=g)


def fuse_by_hand(raf: RelationAwareFusion, s_feat: torch.Tensor, c_feat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    c_feat = raf.context_head(F.interpolate(c_feat, size=s_feat.shape[-2:], mode="bilinear", align_corners=False))
    fused = s_feat + c_feat if raf.fusion == "add" else raf.cat_conv(torch.cat([s_feat, c_feat], dim=1))
    return s_feat, c_feat, raf.smooth(fused)


def relation_matrix(s_att: torch.Tensor, c_att: torch.Tensor) -> torch.Tensor:
    return torch.bmm(s_att.view(2, 16, 8), c_att.view(2, 16, 8).transpose(1, 2)).view(2, -1)


@torch.no_grad()
def test_without_channel_weights_nothing_is_gated():
    torch.manual_seed(0)
    raf = RelationAwareFusion(128, 256, channel_weights=False, relation=[]).eval()
    names = {n for n, _ in raf.named_modules()} | {n for n, _ in raf.named_parameters()}
    assert not any(part in n for n in names for part in ("conv_1x1", "mlp", "g1", "g2"))
    spatial, context = raf_inputs()
    expected = fuse_by_hand(raf, raf.spatial_att.conv_bn_relu(spatial), raf.context_att.conv_bn_relu(context))
    for got, want in zip(raf(spatial, context), expected, strict=True):
        assert torch.equal(got, want)  # plain projections: any sigmoid gate (all < 1) would change them
    net = build(channel_weights=False, relation=[])
    assert not any("conv_1x1" in k or "mlp" in k for k in net.state_dict())


@torch.no_grad()
def test_channel_weights_gate_both_branches():
    torch.manual_seed(0)
    raf = RelationAwareFusion(128, 256, channel_weights=True, relation=[]).eval()
    assert not hasattr(raf, "g1") and not hasattr(raf, "g2") and not hasattr(raf, "spatial_mlp")
    spatial, context = raf_inputs()
    (s_feat, s_att), (c_feat, c_att) = raf.spatial_att(spatial), raf.context_att(context)
    expected = fuse_by_hand(raf, s_feat * torch.sigmoid(s_att), c_feat * torch.sigmoid(c_att))
    out = raf(spatial, context)
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want)
    for att in (raf.spatial_att, raf.context_att):
        before = raf(spatial, context)[2]
        att.conv_1x1.conv.weight.mul_(3.0)
        assert not torch.allclose(raf(spatial, context)[2], before)


@torch.no_grad()
@pytest.mark.parametrize("side", ["shallow", "deep"])
def test_relation_term_only_on_the_named_gate(side):
    torch.manual_seed(0)
    raf = RelationAwareFusion(128, 256, relation=[side]).eval()
    used, unused = (("g1", "spatial_mlp"), ("g2", "context_mlp"))[:: 1 if side == "shallow" else -1]
    assert all(hasattr(raf, n) for n in used) and not any(hasattr(raf, n) for n in unused)
    getattr(raf, used[0]).fill_(5.0)  # zero at init; large here so the term matters
    for p in getattr(raf, used[1]).parameters():
        p.mul_(10.0)
    spatial, context = raf_inputs()
    (s_feat, s_att), (c_feat, c_att) = raf.spatial_att(spatial), raf.context_att(context)
    term = 5.0 * F.relu(getattr(raf, used[1])(relation_matrix(s_att, c_att))).view(2, 128, 1, 1)
    plain = fuse_by_hand(raf, s_feat * torch.sigmoid(s_att), c_feat * torch.sigmoid(c_att))
    if side == "shallow":
        expected = fuse_by_hand(raf, s_feat * torch.sigmoid(s_att + term), c_feat * torch.sigmoid(c_att))
    else:
        expected = fuse_by_hand(raf, s_feat * torch.sigmoid(s_att), c_feat * torch.sigmoid(c_att + term))
    out = raf(spatial, context)
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want)
    changed = 0 if side == "shallow" else 1  # the gated branch differs from plain attention, the other does not
    assert not torch.allclose(out[changed], plain[changed]) and torch.allclose(out[1 - changed], plain[1 - changed])


@torch.no_grad()
def test_cat_fusion_concatenates_then_projects():
    torch.manual_seed(0)
    add = RelationAwareFusion(128, 256).eval()
    cat = RelationAwareFusion(128, 256, fusion="cat").eval()
    assert not hasattr(add, "cat_conv")
    assert (cat.cat_conv.conv.in_channels, cat.cat_conv.conv.out_channels, cat.cat_conv.conv.kernel_size) == \
        (256, 128, (1, 1))
    missing = cat.load_state_dict(add.state_dict(), strict=False).missing_keys
    assert all(k.startswith("cat_conv.") for k in missing) and missing
    spatial, context = raf_inputs()
    s, c, out = cat(spatial, context)
    torch.testing.assert_close(out, cat.smooth(cat.cat_conv(torch.cat([s, c], dim=1))))
    assert not torch.allclose(out, add(spatial, context)[2])
    net = build(fusion="cat")
    assert {"refine_head.fuse8.cat_conv.conv.weight", "refine_head.fuse16.cat_conv.conv.weight"} <= \
        set(net.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# shallow input, scales, branches, losses (Tables 5 and 7)


@torch.no_grad()
def test_rgb_shallow_input_feeds_stdc_the_normalised_image():
    lap, rgb = build().eval(), build(shallow_input="rgb").eval()
    assert lap.refine_head.stdc_net.features[0].conv.in_channels == 6
    assert rgb.refine_head.stdc_net.features[0].conv.in_channels == 3
    x = images(1, low=40, high=200)
    shifted = x + 30.0  # a constant shift: every Laplacian residual of it is zero
    seen_rgb = stdc_inputs(rgb, lambda: [rgb.predict(x), rgb.predict(shifted)])
    seen_lap = stdc_inputs(lap, lambda: [lap.predict(x), lap.predict(shifted)])
    assert torch.equal(seen_rgb[0], rgb.normalize(x))
    assert (seen_rgb[1] - seen_rgb[0]).abs().min() > 0.4  # 30 / std
    torch.testing.assert_close(seen_lap[1], seen_lap[0], atol=1e-4, rtol=0)


@torch.no_grad()
def test_sr_target_comes_from_the_laplacian_even_with_rgb_input():
    net = build(**ROWS["sr"].model).eval()
    x = net.normalize(images())
    _, deep_feat, _ = net._deep(x)
    out = net.refine_head(x, deep_feat, train=True)
    assert torch.equal(out["sr_target"], laplacian_input(net.refine_head.laplacian(x))[1])
    assert "sr_out" in out and "sr_feat" in out


@pytest.mark.parametrize("branches", ["both", "shallow"])
def test_shallow_scale_resizes_the_stdc_input(branches):
    losses = {} if branches == "both" else {"recon_weight": 0.0, "fa_weight": 0.0}
    for scale, side in ((1.0, 64), (0.25, 16)):
        net = build(branches=branches, shallow_scale=scale, **losses).eval()
        with torch.no_grad():
            seen = stdc_inputs(net, lambda n=net: n.predict(images(1)))
        assert seen[0].shape[-2:] == (side, side)
    quarter = build(branches=branches, shallow_scale=0.25, **losses).train()
    assert set(quarter.forward_train(images(), labels())) >= {"refine.loss_seg", "aux_2.loss_seg"}


@torch.no_grad()
def test_deep_only_predicts_the_deep_logits():
    net = build(**ROWS["deep_full"].model).eval()
    assert not hasattr(net, "refine_head") and not any(k.startswith("refine_head") for k in net.state_dict())
    x = images(1)
    ran = ran_modules(net, lambda: net.predict(x))
    assert not any(name.startswith("refine_head") for name in ran) and "decode_head.classifier" in ran
    expected = F.interpolate(net._deep(net.normalize(x))[2], size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(net.predict(x), expected)
    for row, side in (("deep_full", 64), ("deep_quarter", 16)):  # down_ratio: the deep branch's input scale
        model = build(**ROWS[row].model).eval()
        sizes: list[torch.Size] = []
        handle = model.backbone.conv1.register_forward_pre_hook(
            lambda m, args, sizes=sizes: sizes.append(args[0].shape[-2:]))
        model.predict(x)
        handle.remove()
        assert sizes == [(side, side)]


@torch.no_grad()
def test_shallow_only_has_no_deep_branch():
    net = build(**ROWS["shallow_full"].model).eval()
    assert not any(k.startswith(("backbone", "decode_head", "auxiliary_head")) for k in net.state_dict())
    assert not hasattr(net.refine_head, "fuse8") and not hasattr(net.refine_head, "sr_decoder")
    ran = ran_modules(net, lambda: net.predict(images(1)))
    assert {"refine_head.stdc_net", "refine_head.project8", "refine_head.conv_seg"} <= ran
    assert "refine_head.aux_head16" not in ran


def test_sr_decoder_only_with_sr_losses():
    off = build(recon_weight=0.0, fa_weight=0.0)
    assert not hasattr(off.refine_head, "sr_decoder")
    assert not any("sr_decoder" in k for k in off.state_dict())
    sr_only = build(fa_weight=0.0).train()
    calls: list[int] = []
    sr_only.refine_head.sr_decoder.register_forward_hook(lambda m, i, o: calls.append(1))
    terms = sr_only.forward_train(images(), labels())
    assert calls == [1] and "aux_3.recon_losses" in terms and "aux_4.fa_loss" not in terms
    with torch.no_grad():
        sr_only.eval().predict(images(1))
    assert calls == [1]  # training only


# ---------------------------------------------------------------------------------------------------------------
# bad values


@pytest.mark.parametrize(("model", "message"), [
    ({"branches": "middle"}, r"branches must be one of both, deep, shallow, got 'middle'"),
    ({"fusion": "mul"}, r"fusion must be one of add, cat, got 'mul'"),
    ({"shallow_input": "hsv"}, r"shallow_input must be one of laplacian, rgb"),
    ({"relation": ["x"]}, r"relation entries must be drawn from \['shallow', 'deep'\], got \['x'\]"),
    ({"relation": "shallow"}, r"relation must be a list"),
    ({"channel_weights": False}, r"channel_weights: false removes; set relation: \[\] as well"),
    ({"channel_weights": False, "relation": ["deep"]}, r"relation \['deep'\]"),
    ({"shallow_scale": 0.0}, r"shallow_scale must be a number in \(0, 1\]"),
    ({"shallow_scale": 2}, r"shallow_scale must be a number in \(0, 1\]"),
    ({"branches": "deep"}, r"branches='deep' trains L_SEG \+ L_AUX only"),
    ({"branches": "shallow", "recon_weight": 0.0}, r"branches='shallow' trains L_SEG \+ L_AUX only"),
    ({"recon_weight": 0.0}, r"fa_weight > 0 \(L_SD\) distils the SR decoder's features"),
    ({"recon_weight": -0.1}, r"recon_weight must be >= 0"),
])
def test_bad_values_raise_one_clear_line(model, message):
    with pytest.raises(MethodError, match=message) as info:
        ISDNet(NUM_CLASSES, **model)
    assert "\n" not in str(info.value) and str(info.value).startswith("isdnet: ")


def test_ablation_command_trains_measures_and_writes_tables_5_to_7(tmp_path, tiny_synthetic, mlflow_store):
    """`bench.py ablation --dataset synthetic --method isdnet` on the tiny dataset: the chosen rows train, evaluate
    and are timed (Tables 5 and 6 publish FPS), the full model shared by Tables 6 and 7 trains once, and the
    written tables put the paper's DeepGlobe numbers beside ours."""
    import pandas as pd
    from click.testing import CliRunner
    from conftest import tiny_params

    from bench import cli

    params = tiny_params(tmp_path, tiny_synthetic)
    sets = ["methods.isdnet.recipes.smoke.iterations=2", "methods.isdnet.recipes.smoke.crop_size=64",
            "measure.iterations.cpu=1", "measure.max_images=1"]
    args = ["ablation", "--dataset", "synthetic", "--method", "isdnet", "--params", str(params),
            *[x for s in sets for x in ("--set", s)], "--row", "deep_quarter", "--row", "isdnet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "results" / "ablations"
    scores = pd.read_csv(out / "isdnet_synthetic.csv")
    assert list(scores["row"]) == ["deep_quarter", "isdnet"]  # `isdnet` once, though two tables print it
    assert scores["miou"].between(0, 1).all() and (scores["fps"] > 0).all()
    md = (out / "isdnet_synthetic.md").read_text()
    for title in ("Table 5: branches and scales", "Table 6: fusion", "Table 7: losses and shallow input"):
        assert f"## ISDNet (CVPR'22) {title}" in md
    assert "mIoU (published, deepglobe)" in md and "| 61.40 " in md and "| 73.30 " in md
    # untrained rows x published quantities: Table 5 4 x (mIoU, FPS), Table 6 5 x (+ memory), Table 7 3 x mIoU
    assert md.count("not measured (row not trained)") == 4 * 2 + 5 * 3 + 3 * 1
