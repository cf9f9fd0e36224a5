"""STDC-Seg (`methods/stdc.py`) in both inference modes: training with the two FCN auxiliary heads and the STDCHead
Detail Aggregation loss (batch 1 included: the pooled BNs must not raise), prediction at a size not divisible by 32,
the parameter count of mmseg 0.30's build, the mmseg checkpoint layout, and golden outputs of mmseg 0.30 itself
(`tests/golden/count_stdc.py` wrote `stdc_seg.npz` and `stdc_seg_detail.npz`; measured there: logits, training
outputs and boundary targets identical to mmseg's, detail losses within 1e-7)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_golden_mmseg import assert_logits_match

import methods.stdc as stdc
from methods import MethodError, build_method, count_parameters, method_class
from tests.golden.seeded import load_arrays, load_fixture, seed_weights, seeded_image

SMALL = {"downsample": 4, "window": 128, "overlap": 32}
TERMS = {"loss_seg", "loss_aux0", "loss_aux1", "loss_detail_bce", "loss_detail_dice"}


def build(run: str = "stdc-global", seed: int = 0, **model):
    torch.manual_seed(seed)
    return build_method(run, 7, **{**SMALL, **model})


@pytest.mark.parametrize("variant", ["global", "local"])
def test_one_training_step_with_auxiliary_and_detail_heads(variant, monkeypatch):
    model = build(f"stdc-{variant}").train()
    assert model.aux_weights == (1.0, 1.0) and model.detail_weights == (1.0, 1.0)
    size, batch = (128, 2) if variant == "global" else (64, 1)  # batch 1: ARM / conv_avg BNs on 1x1 maps
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 7, (batch, size, size))
    labels[:, :4] = 255
    seen = []
    targets = stdc.boundary_targets
    monkeypatch.setattr(stdc, "boundary_targets", lambda y, t: seen.append(tuple(y.shape)) or targets(y, t))
    terms = model.forward_train(images, labels)
    assert set(terms) == TERMS
    assert all(t.dim() == 0 and torch.isfinite(t) and t > 0 for t in terms.values()), terms
    # detail targets from the labels at the resolution the network sees (global: 1/4)
    assert seen == [(batch, size // 4, size // 4) if variant == "global" else (batch, size, size)]
    sum(terms.values()).backward()
    for module in (model.backbone.backbone, model.backbone.ffm, model.decode_head, *model.auxiliary_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_boundary_targets_mark_class_edges():
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    assert stdc.boundary_targets(labels).sum() == 0
    labels[:, :, 16:] = 3
    edges = stdc.boundary_targets(labels)[0]
    # the positive side of the step (the Laplacian is clamped at 0); upstream's zero padding also marks the borders
    # of the non-zero class (rows 0-1 via the stride-2/4 levels, the last column)
    assert edges[2:-2, 16:18].all() and not edges[:, :16].any() and not edges[2:-2, 18:-1].any()


@pytest.mark.parametrize("variant", ["global", "local"])
def test_predict_at_a_size_not_divisible_by_32(variant):
    model = build(f"stdc-{variant}").eval()
    with torch.inference_mode():
        logits = model.predict(torch.randint(0, 256, (1, 3, 200, 232), dtype=torch.uint8))
        assert logits.shape == (1, 7, 200, 232) and torch.isfinite(logits).all()
        assert len(model.network_outputs(torch.zeros(1, 3, 50, 58))) == 1  # no auxiliary heads at inference


def test_parameter_count_is_mmsegs():
    declared = method_class("stdc").param_counts[0]
    assert declared.num_classes == 7 and "8,568,378" in declared.source
    assert count_parameters(build(**declared.config)) == declared.total == 8_568_378 - 3  # less the constant kernel


def test_mmseg_initialisation():
    model = build()
    with torch.no_grad():
        conv = model.backbone.arms[0].conv_layer.conv.weight  # ConvModule: kaiming-normal, fan_out, relu
        assert float(conv.std()) == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.05)
        assert float(model.decode_head.classifier.weight.std()) == pytest.approx(0.01, rel=0.1)
        # a list of auxiliary heads is never initialised by mmseg: PyTorch's default, U(+-1/sqrt(fan_in))
        for head in model.auxiliary_head:
            weight = head.classifier.weight
            bound = 1 / math.sqrt(weight.shape[1])
            assert float(weight.abs().max()) <= bound and float(weight.std()) > 0.8 * bound / math.sqrt(3)


def test_official_layout_round_trip(tmp_path):
    source = seed_weights(build(downsample=1), 5).eval()
    path = tmp_path / "official.pth"
    source.save_official(str(path))
    state = torch.load(path, weights_only=True)["state_dict"]
    assert {"backbone.backbone.stages.0.conv.weight", "backbone.backbone.stages.4.0.downsample.bn.running_var",
            "backbone.backbone.stages.3.1.layers.3.conv.weight", "backbone.arms.0.atten_conv_layer.1.bn.weight",
            "backbone.ffm.attention.2.conv.weight", "decode_head.conv_seg.weight",
            "auxiliary_head.2.conv_seg.bias", "auxiliary_head.2.fusion_kernel"} <= set(state)
    assert not any("features" in k or "classifier" in k or "conv_list" in k for k in state)
    own = source.state_dict()  # where our tensors go (the reference reads these names; count_stdc.py checks parity)
    for ours, theirs in (("backbone.backbone.features.1.conv.weight", "backbone.backbone.stages.1.conv.weight"),
                         ("backbone.backbone.features.2.avd_layer.0.weight",
                          "backbone.backbone.stages.2.0.downsample.conv.weight"),
                         ("backbone.backbone.features.5.conv_list.3.bn.running_mean",
                          "backbone.backbone.stages.3.1.layers.3.bn.running_mean"),
                         ("backbone.backbone.features.6.avd_layer.1.weight",
                          "backbone.backbone.stages.4.0.downsample.bn.weight"),
                         ("auxiliary_head.1.classifier.weight", "auxiliary_head.1.conv_seg.weight")):
        assert torch.equal(own[ours], state[theirs]), theirs
    target = build(seed=1, downsample=1).eval()
    report = target.load_official(str(path))
    assert report.clean and len(report.loaded) == len(target.state_dict()) == len(state) - 2
    assert sorted(report.skipped) == ["auxiliary_head.2.fusion_kernel", "auxiliary_head.2.laplacian_kernel"]
    image = seeded_image(3, 72, 88)
    with torch.no_grad():
        assert torch.equal(source.predict(image), target.predict(image))
        assert not torch.equal(build(seed=1, downsample=1).eval().predict(image), target.predict(image))


@pytest.mark.parametrize("fault", ["renamed", "reshaped"])
def test_a_checkpoint_that_does_not_fit_is_one_clear_error(tmp_path, fault):
    model = build()
    path = tmp_path / f"{fault}.pth"
    model.save_official(str(path))
    state = torch.load(path, weights_only=True)["state_dict"]
    if fault == "renamed":
        state["backbone.backbone.stages.2.0.layer.0.conv.weight"] = state.pop(
            "backbone.backbone.stages.2.0.layers.0.conv.weight")
    else:
        state["auxiliary_head.1.conv_seg.weight"] = torch.zeros(9, 64, 1, 1)
    torch.save({"state_dict": state}, path)
    with pytest.raises(MethodError) as info:
        model.load_official(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert ("stages.2.0.layer.0" if fault == "renamed" else "auxiliary_head.1.classifier.weight") in message


def test_pretrained_must_be_a_file():
    with pytest.raises(MethodError, match="STDCNet813M_73.91.tar"):
        build(pretrained=True)


def test_logits_match_mmseg():
    meta = load_fixture("stdc_seg")[3]
    model = seed_weights(build_method(meta["method"], 7, **meta["model"]), meta["weight_seed"]).eval()
    with torch.inference_mode():
        logits = model.predict(seeded_image(meta["image_seed"], *meta["size"]))
    assert_logits_match("stdc_seg", logits)


def test_detail_loss_matches_mmseg():
    arrays, meta = load_arrays("stdc_seg_detail")
    labels = torch.from_numpy(arrays["labels"]).long()
    assert (labels == 255).any()  # ignored pixels enter the Laplacian as 255, as upstream
    targets = stdc.boundary_targets(labels)
    np.testing.assert_array_equal(targets.numpy(), arrays["targets"])
    bce, dice = stdc.detail_losses(torch.from_numpy(arrays["logits"]), targets)
    assert float(bce) == pytest.approx(meta["detail_loss"]["bce"], rel=1e-5)
    assert float(dice) == pytest.approx(meta["detail_loss"]["dice"], rel=1e-5)
