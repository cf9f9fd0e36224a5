"""DGF (methods/dgf.py, docs/specs/dgf.md): the guided filter against the official package's (tests/golden/dgf.npz,
written by tests/golden/make_dgf.py from guided-filter-pytorch 3.7.5: ours differed by <= 6e-15 in float64), border
windows, the learned guide, two different base methods end to end, and bad settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from methods import MethodError, build_method
from methods.dgf import box_mean, guided_filter
from tests.golden.make_dgf import CASES, inputs
from tests.golden.seeded import GOLDEN_DIR


def test_guided_filter_matches_the_official_package():
    with np.load(GOLDEN_DIR / "dgf.npz") as data:
        assert json.loads(str(data["meta"]))["cases"] == json.loads(json.dumps(CASES))
        for i, case in enumerate(CASES):
            guide, source = inputs(case)
            ours = guided_filter(guide, source, case["radius"], case["eps"]).numpy()
            official = data[f"case{i}"]
            assert np.abs(ours - official).max() <= 1e-4 * np.abs(official).max(), i


def test_box_means_use_the_clipped_window():
    x = torch.arange(49, dtype=torch.float64).view(1, 1, 7, 7)
    mean = box_mean(x, 2)
    assert mean[0, 0, 0, 0] == x[..., :3, :3].mean()  # a corner: (r + 1)² pixels, not zero padding
    assert mean[0, 0, 3, 3] == x[..., 1:6, 1:6].mean()


def test_filter_keeps_a_source_the_guide_explains_and_smooths_noise():
    guide = torch.linspace(0, 1, 40).repeat(1, 1, 40, 1)
    assert torch.allclose(guided_filter(guide, 3 * guide + 1, 4, 1e-6), 3 * guide + 1, atol=1e-4)
    noise = torch.randn(1, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    assert guided_filter(torch.zeros_like(noise), noise, 4, 1e-2).std() < 0.3 * noise.std()


@pytest.mark.parametrize("base", ["global", "local"])
def test_refines_any_one_phase_base_end_to_end(base):
    torch.manual_seed(0)
    model = build_method("dgf", 3, base=base, base_model={})
    assert model.parameter_counts()["refiner"] == 256 + 65 * 3
    images = torch.randint(0, 256, (2, 3, 96, 80), dtype=torch.uint8)
    labels = torch.randint(0, 3, (2, 96, 80))
    labels[:, :4] = 255
    model.eval()
    refined, plain = model.predict(images), model.base.predict(images)
    assert refined.shape == plain.shape == (2, 3, 96, 80) and not torch.allclose(refined, plain)
    model.train()
    model.set_phase("refiner")
    loss = sum(model.forward_train(images, labels).values())
    loss.backward()
    assert all(p.grad is None for p in model.base.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.refiner.parameters())
    assert not model.base.training  # frozen in eval mode while the guide trains


@pytest.mark.parametrize(("keywords", "message"), [({"radius": 0}, "radius must be"), ({"eps": 0.0}, "eps > 0"),
                                                   ({"base": "dgf"}, "another registered method"),
                                                   ({"base": "glnet"}, "trains in 3 phases")])
def test_bad_settings_are_one_line_errors(keywords, message):
    with pytest.raises(MethodError, match=message) as info:
        build_method("dgf", 3, **keywords)
    assert "\n" not in str(info.value)


def test_an_image_within_the_window_is_refused():
    with pytest.raises(MethodError, match="must exceed 2 \\* radius \\+ 1"):
        guided_filter(torch.zeros(1, 1, 9, 30), torch.zeros(1, 2, 9, 30), 4, 1e-2)


def test_the_release_snapshot_fills_the_guide_and_its_deeplab_is_skipped(tmp_path):
    """predict_dgf.py loads `MS_Deeplab`'s state dict: `Scale.*` (its DeepLab-ResNet-101) + `guided_map_conv1/2`."""
    torch.manual_seed(0)
    release = {"Scale.conv1.weight": torch.randn(64, 3, 7, 7), "Scale.layer5.conv2d_list.0.bias": torch.randn(21),
               "guided_map_conv1.weight": torch.randn(64, 3, 1, 1), "guided_map_conv1.bias": torch.randn(64),
               "guided_map_conv2.weight": torch.randn(21, 64, 1, 1), "guided_map_conv2.bias": torch.randn(21)}
    torch.save(release, tmp_path / "MS_DeepLab_resnet_trained_VOC.pth")
    model = build_method("dgf", 21, bgr_input=True)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    report = model.load_official(str(tmp_path / "MS_DeepLab_resnet_trained_VOC.pth"))
    assert sorted(report.skipped) == ["Scale.conv1.weight", "Scale.layer5.conv2d_list.0.bias"]
    assert torch.equal(model.refiner.conv2.weight, release["guided_map_conv2.weight"])
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in base_before.items())
    image = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)  # the guide reads B, G, R / 255 as upstream
    assert torch.allclose(model.network_input(image), image.flip(1).float() / 255)
    model.save_official(str(tmp_path / "ours.pth"))
    assert sorted(torch.load(tmp_path / "ours.pth")) == sorted(k for k in release if k.startswith("guided"))
    with pytest.raises(MethodError, match="MS_DeepLab_resnet_trained_VOC.pth does not match") as info:
        build_method("dgf", 7).load_official(str(tmp_path / "MS_DeepLab_resnet_trained_VOC.pth"))  # VOC's 21 classes
    assert "\n" not in str(info.value)
