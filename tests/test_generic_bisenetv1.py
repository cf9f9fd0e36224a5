"""BiSeNetV1 (`methods/bisenetv1.py`) in both inference modes: training with its auxiliary heads, prediction at a size
not divisible by 32, the parameter count of mmseg 0.30's build, the mmseg checkpoint layout, and golden logits of
mmseg 0.30 itself on seeded weights (`tests/golden/count_bisenetv1.py` wrote `tests/golden/bisenetv1.npz`; measured
there: max |ours - mmseg| = 0 on every logit of the decode and both auxiliary heads).

`tests/test_generic_bisenetv2.py` runs these same tests on BiSeNetV2 by overriding the `name` fixture.
"""
from __future__ import annotations

import pytest
import torch
from test_golden_mmseg import assert_logits_match

from methods import MethodError, build_method, count_parameters, method_class
from tests.golden.seeded import load_fixture, seed_weights, seeded_image

SMALL = {"downsample": 4, "window": 128, "overlap": 16}  # global: 1/4 of the image; local: 128-px windows


@pytest.fixture
def name() -> str:
    return "bisenetv1"


def build(run: str, seed: int = 0, **model):
    torch.manual_seed(seed)
    return build_method(run, 7, **{**SMALL, **model})


@pytest.mark.parametrize("variant", ["global", "local"])
def test_one_training_step_with_the_auxiliary_heads(name, variant):
    model = build(f"{name}-{variant}").train()
    n_aux = len(model.aux_weights)
    assert n_aux == len(model.auxiliary_head) and all(w == 1.0 for w in model.aux_weights)
    size = 64 if variant == "global" else 48  # global sees 16 px, local a 48-px crop
    batch = 2 if variant == "global" else 1  # batch 1: the pooled BNs must not raise
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 7, (batch, size, size))
    labels[:, :4] = 255
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_seg", *(f"loss_aux{i}" for i in range(n_aux))}
    assert all(t.dim() == 0 and torch.isfinite(t) and t > 0 for t in terms.values()), terms
    sum(terms.values()).backward()
    for module in (model.backbone, model.decode_head, *model.auxiliary_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("variant", ["global", "local"])
def test_predict_at_a_size_not_divisible_by_32(name, variant):
    model = build(f"{name}-{variant}").eval()
    with torch.inference_mode():
        logits = model.predict(torch.randint(0, 256, (1, 3, 200, 232), dtype=torch.uint8))
        assert logits.shape == (1, 7, 200, 232) and torch.isfinite(logits).all()
        assert len(model.network_outputs(torch.zeros(1, 3, 50, 58))) == 1  # no auxiliary heads at inference


def test_parameter_count_is_mmsegs(name):
    declared = method_class(name).param_counts[0]
    assert declared.num_classes == 7 and "mmseg 0.30.0" in declared.source
    assert count_parameters(build(f"{name}-global", **declared.config)) == declared.total


def _seeded(name: str):
    return seed_weights(build(f"{name}-global", downsample=1), 5).eval()


def test_official_layout_round_trip(name, tmp_path):
    source = _seeded(name)
    path = tmp_path / "official.pth"
    source.save_official(str(path))
    state = torch.load(path, weights_only=True)["state_dict"]
    assert {"decode_head.conv_seg.weight", "auxiliary_head.0.conv_seg.bias", "backbone.spatial_path.layer1.conv.weight"
            if name == "bisenetv1" else "backbone.bga.conv.bn.running_var"} <= set(state)
    assert not any("classifier" in k for k in state)
    target = build(f"{name}-global", seed=1, downsample=1).eval()
    image = seeded_image(3, 72, 88)
    with torch.no_grad():
        before = target.predict(image)
        report = target.load_official(str(path))
        assert report.clean and len(report.loaded) == len(state)
        after = target.predict(image)
    assert torch.equal(after, source.predict(image)) and not torch.allclose(after, before)


@pytest.mark.parametrize("fault", ["renamed", "reshaped"])
def test_a_checkpoint_that_does_not_fit_is_one_clear_error(name, tmp_path, fault):
    model = build(f"{name}-global")
    path = tmp_path / f"{fault}.pth"
    model.save_official(str(path))
    state = torch.load(path, weights_only=True)["state_dict"]
    if fault == "renamed":
        state["decode_head.conv_sg.weight"] = state.pop("decode_head.conv_seg.weight")
    else:
        state["auxiliary_head.0.conv_seg.weight"] = torch.zeros(9, *state["auxiliary_head.0.conv_seg.weight"].shape[1:])
    torch.save({"state_dict": state}, path)
    with pytest.raises(MethodError) as error:
        model.load_official(str(path))
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert ("conv_sg" in message) if fault == "renamed" else ("auxiliary_head.0.classifier.weight" in message)


def test_logits_match_mmseg(name):
    _, _, _, meta = load_fixture(name)
    model = seed_weights(build_method(meta["run"], meta["num_classes"], **meta["model"]), meta["weight_seed"]).eval()
    assert model.pixel_mean.flatten().tolist() == pytest.approx(meta["img_norm_cfg"]["mean"])
    assert model.pixel_std.flatten().tolist() == pytest.approx(meta["img_norm_cfg"]["std"])
    with torch.no_grad():
        assert_logits_match(name, model.predict(seeded_image(meta["image_seed"], *meta["size"])))
