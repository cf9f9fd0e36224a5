"""FCN-8s (methods/fcn8s.py): both inference variants train and predict, the parameter count of the official
voc-fcn8s, the torchfcn checkpoint layout, the fixed bilinear upsampling, and golden parity with torchfcn's FCN8s
(`tests/golden/fcn8s.npz`, written by tests/golden/count_fcn8s.py: torchfcn 1.9.7's logits on our seeded weights,
which matched ours exactly at generation)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import methods.blocks.fcn8 as fcn8_block
import methods.fcn8s as fcn8s
from methods import MethodError, build_method
from methods.base import Phase
from methods.blocks.fcn8 import UPSAMPLING, bilinear_kernel
from tests.golden.seeded import load_fixture, seed_weights, seeded_image

# narrow fc6 / fc7 keep the tests quick (the golden fixture was made at this width too); the release's is 4096
NARROW = {"fc_channels": 64}
# conv1_1's 100-px padding makes every window cost >= (200 + window)^2 px of VGG: one padded window at the test size
# (the sliding itself is the base class's, tested there)
LOCAL = {"window": 96, "overlap": 32}
SIZE = (72, 88)  # divisible by neither 32 nor 16


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"global": build_method("fcn8s-global", 7, **NARROW),
            "local": build_method("fcn8s-local", 7, **NARROW, **LOCAL)}


def test_parameter_count_is_the_official_one():
    declared = fcn8s.FCN8s.param_counts[0]
    assert declared.total == 134_308_725  # voc-fcn8s train.prototxt with 7 classes = torchfcn FCN8s(n_class=7)
    model = build_method("fcn8s-global", 7, **declared.config)
    assert sum(p.numel() for p in model.parameters()) == declared.total
    assert model.fc6.weight.shape == (4096, 512, 7, 7) and model.features[0].padding == (100, 100)
    with pytest.raises(MethodError, match="fc_channels 4096"):
        build_method("fcn8s-global", 7, pretrained=True, **NARROW)


@pytest.mark.parametrize("variant", ["global", "local"])
def test_trains_one_step_and_predicts_at_any_size(models, variant):
    model = models[variant].train()
    size = (96, 120) if variant == "global" else (24, 36)  # global sees it / 4; local sees the crop itself
    images = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
    labels = torch.randint(0, 7, (1, *size))
    labels[:, :4] = 255
    model.zero_grad(set_to_none=True)
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_seg"} and torch.isfinite(terms["loss_seg"])
    terms["loss_seg"].backward()
    assert model.score_fr.weight.grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        logits = model.predict(torch.randint(0, 256, (1, 3, *SIZE), dtype=torch.uint8))
    assert logits.shape == (1, 7, *SIZE) and torch.isfinite(logits).all()


def test_upsampling_is_fixed_bilinear(models):
    model = models["global"]
    trained = {id(p) for p in model.phase_parameters(Phase("main"))}
    for name in UPSAMPLING:
        weight = getattr(model, name).weight
        assert id(weight) not in trained and not weight.requires_grad
    assert len(trained) == sum(1 for _ in model.parameters()) - 3
    kernel = bilinear_kernel(2, 4)
    assert kernel[0, 1].abs().sum() == 0 and kernel[1, 0].abs().sum() == 0  # class i -> class i only
    assert torch.allclose(kernel[0, 0, 1], torch.tensor([0.1875, 0.5625, 0.5625, 0.1875]))  # caffe upsample_filt
    # a constant map stays constant inside the upsampled interior
    up = torch.nn.functional.conv_transpose2d(torch.ones(1, 2, 5, 5), bilinear_kernel(2, 16), stride=8)
    assert torch.allclose(up[..., 8:-8, 8:-8], torch.ones(()))


def test_matches_torchfcn_golden_logits(models):
    official, official_argmax, stride, meta = load_fixture("fcn8s")
    assert meta["model"] == NARROW
    model = seed_weights(models["global"], meta["weight_seed"]).eval()
    with torch.inference_mode():
        ours = model.network_outputs(model.normalize(seeded_image(meta["image_seed"], *meta["size"])))[0]
    assert ours.shape[-2:] == official_argmax.shape[-2:]
    diff = np.abs(ours[..., ::stride, ::stride].numpy() - official).max()
    assert diff <= 1e-4 * np.abs(official).max(), f"max |ours - torchfcn| = {diff:.3g}"


def test_torchfcn_layout_round_trip(models, tmp_path):
    source, target = models["global"].eval(), models["local"].eval()
    with torch.no_grad():
        source.score_pool3.bias.uniform_(-1, 1)  # nonzero everywhere the round trip could drop
    path = tmp_path / "fcn8s.pth"
    source.save_official(str(path))
    saved = torch.load(path, weights_only=True)
    assert "conv1_1.weight" in saved and "conv5_3.bias" in saved and "upscore8.weight" in saved
    assert not any(k.startswith("features.") for k in saved)
    assert torch.equal(saved["conv1_2.weight"], source.features[2].weight)  # torchvision index -> caffe name
    assert torch.equal(saved["conv5_3.bias"], source.features[28].bias)
    torch.save({"model_state_dict": saved, "epoch": 3}, tmp_path / "trainer.pth")  # torchfcn's trainer checkpoint
    for checkpoint in (path, tmp_path / "trainer.pth"):
        with torch.no_grad():
            target.score_pool3.bias.zero_()
        assert target.load_official(str(checkpoint)).clean
        x = torch.randn(1, 3, 37, 45)
        with torch.inference_mode():
            assert torch.equal(source.network_outputs(x)[0], target.network_outputs(x)[0])


def test_a_wrong_checkpoint_is_one_clear_error(models, tmp_path):
    model = models["local"]
    state = {k: v.clone() for k, v in torch.load(_saved(model, tmp_path), weights_only=True).items()}
    renamed = dict(state)
    renamed["conv9_9.weight"] = renamed.pop("conv1_1.weight")
    shaped = dict(state, **{"score_fr.weight": torch.zeros(21, 64, 1, 1)})  # a 21-class VOC checkpoint
    for name, bad in (("renamed", renamed), ("shaped", shaped)):
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        with pytest.raises(MethodError, match=re.escape(str(path))) as info:
            model.load_official(str(path))
        assert "\n" not in str(info.value) and ("conv9_9" in str(info.value) or "score_fr" in str(info.value))
    with pytest.raises(MethodError, match="does not exist"):
        model.load_official(str(tmp_path / "missing.pth"))


def _saved(model, tmp_path):
    path = tmp_path / "good.pth"
    model.save_official(str(path))
    return path


def test_imagenet_vgg16_goes_to_trunk_and_fc6_fc7(models, monkeypatch, tmp_path):
    model, width = models["local"], NARROW["fc_channels"]  # torchvision's has 4096 rows where this has 64
    features = {f"features.{k}": torch.full_like(v, 0.25) for k, v in model.features.state_dict().items()}
    fc6 = torch.arange(width * 25088, dtype=torch.float32).view(width, 25088)  # torchvision's classifier.0
    state = dict(features, **{"classifier.0.weight": fc6, "classifier.0.bias": torch.ones(width),
                              "classifier.3.weight": torch.eye(width), "classifier.3.bias": torch.zeros(width),
                              "classifier.6.weight": torch.zeros(1000, width), "classifier.6.bias": torch.zeros(1000)})
    monkeypatch.setattr(fcn8_block, "torchvision_vgg16_state", lambda pretrained, batch_norm: state)
    model.load_imagenet_fcn8(True)
    assert torch.equal(model.features[28].weight, torch.full((512, 512, 3, 3), 0.25))  # conv5_3
    assert model.fc6.weight[1, 2, 3, 4] == 25088 + 2 * 49 + 3 * 7 + 4  # (out, channel, row, column) of pool5
    assert torch.equal(model.fc7.weight[:, :, 0, 0], torch.eye(width))
    assert torch.equal(model.fc6.bias, torch.ones(width))
    del state["classifier.0.weight"]
    with pytest.raises(MethodError, match="classifier.0.weight"):
        model.load_imagenet_fcn8(True)
