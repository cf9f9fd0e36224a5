"""SegNet (methods/segnet.py): both inference variants train and predict, the parameter count of the official
segnet_train.prototxt, unpooling with the encoder's max-pool indices at odd sizes, the prototxt's init, the
checkpoint layout (encoder in torchvision vgg16_bn keys) and torchvision ImageNet weights from a file. There is no
official PyTorch SegNet to compare logits with (tests/golden/count_segnet.py checks the layer shapes)."""
from __future__ import annotations

import math
import re

import pytest
import torch

import methods.segnet as segnet
from methods import MethodError, build_method

LOCAL = {"window": 48, "overlap": 16}  # 2 x 3 windows at SIZE
SIZE = (72, 88)  # divisible by neither 32 nor 16; a quarter of it (global) pools through odd sizes


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"global": build_method("segnet-global", 7), "local": build_method("segnet-local", 7, **LOCAL)}


def test_parameter_count_is_the_prototxt_one(models):
    declared = segnet.SegNet.param_counts[0]
    assert declared.total == 29_447_047  # segnet_train.prototxt with 7 classes (count_segnet.py)
    assert sum(p.numel() for p in models["global"].parameters()) == declared.total
    assert models["global"].conv1_1_D.weight.shape == (7, 64, 3, 3)


@pytest.mark.parametrize("variant", ["global", "local"])
def test_trains_one_step_and_predicts_at_any_size(models, variant):
    model = models[variant].train()
    size = (96, 120) if variant == "global" else (40, 56)  # global sees it / 4; local sees the crop itself
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    labels = torch.randint(0, 7, (2, *size))
    labels[:, :4] = 255
    model.zero_grad(set_to_none=True)
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_seg"} and torch.isfinite(terms["loss_seg"])
    terms["loss_seg"].backward()
    assert model.features[0].weight.grad.abs().sum() > 0 and model.conv1_1_D.weight.grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        logits = model.predict(torch.randint(0, 256, (1, 3, *SIZE), dtype=torch.uint8))
    assert logits.shape == (1, 7, *SIZE) and torch.isfinite(logits).all()


def test_decoder_unpools_with_the_pooling_indices_to_the_pre_pool_size(models):
    model = models["global"].eval()
    pre_pool, unpooled = [], []
    hooks = [m.register_forward_hook(lambda m, i, o: pre_pool.append(i[0].shape[-2:]))
             for m in model.features if isinstance(m, torch.nn.MaxPool2d)]
    hooks += [stage.register_forward_pre_hook(lambda m, i: unpooled.append(i[0].clone())) for stage in model.decoder]
    try:
        with torch.inference_mode():
            out = model.network_outputs(torch.randn(1, 3, 45, 61))[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert out.shape == (1, 7, 45, 61)
    assert [tuple(u.shape[-2:]) for u in unpooled] == [tuple(s) for s in reversed(pre_pool)]
    assert tuple(pre_pool[-1]) == (3, 4)  # 45 x 61 -> 23 x 31 -> 12 x 16 -> 6 x 8 -> 3 x 4: caffe rounds up
    for u in unpooled:  # max-unpooling: at most one value in each 2 x 2 pooling window, the rest zeros
        h, w = u.shape[-2:]
        padded = torch.nn.functional.pad(u.ne(0).float(), (0, w % 2, 0, h % 2))
        assert torch.nn.functional.avg_pool2d(padded, 2).mul(4).max() <= 1
        assert u.ne(0).any()


def test_init_is_the_prototxt_fillers():
    torch.manual_seed(0)
    model = build_method("segnet-global", 7)
    conv = model.decoder[1].conv4_1_D  # msra: N(0, 2 / fan_in), fan_in 512 x 9 (fan_out 256 x 9)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)
    assert torch.all(model.features[1].bias == 0.001) and torch.all(model.decoder[4].conv1_2_D_bn.weight == 1)
    assert torch.all(model.conv1_1_D.bias == 0)


def test_round_trip_in_torchvision_encoder_layout(models, tmp_path):
    source, target = models["global"].eval(), models["local"].eval()
    with torch.no_grad():
        for bn in (source.features[41], source.decoder[2].conv3_1_D_bn):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "segnet.pth"
    source.save_official(str(path))
    saved = torch.load(path, weights_only=True)
    assert saved["features.40.weight"].shape == (512, 512, 3, 3)  # torchvision vgg16_bn: conv5_3, then its BN
    assert saved["features.41.running_var"].shape == (512,) and "decoder.0.conv5_3_D.weight" in saved
    assert target.load_official(str(path)).clean
    x = torch.randn(1, 3, 37, 45)
    with torch.inference_mode():
        assert torch.equal(source.network_outputs(x)[0], target.network_outputs(x)[0])


def test_a_wrong_checkpoint_is_one_clear_error(models, tmp_path):
    model = models["local"]
    state = dict(model.state_dict())
    renamed = dict(state)
    renamed["decoder.0.conv5_9_D.weight"] = renamed.pop("decoder.0.conv5_3_D.weight")
    shaped = dict(state, **{"conv1_1_D.weight": torch.zeros(11, 64, 3, 3)})  # the release's 11 CamVid classes
    for name, bad in (("renamed", renamed), ("shaped", shaped)):
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        with pytest.raises(MethodError, match=re.escape(str(path))) as info:
            model.load_official(str(path))
        assert "\n" not in str(info.value) and ("conv5_9_D" in str(info.value) or "conv1_1_D" in str(info.value))


def test_imagenet_encoder_from_a_torchvision_vgg16_bn_file(models, tmp_path):
    features = {f"features.{k}": torch.full_like(v, 0.5) if v.is_floating_point() else v
                for k, v in models["local"].features.state_dict().items()}
    path = tmp_path / "vgg16_bn.pth"
    torch.save(dict(features, **{"classifier.6.weight": torch.zeros(1000, 8)}), path)
    model = build_method("segnet-global", 7, pretrained=str(path))
    assert torch.all(model.features[40].weight == 0.5) and torch.all(model.features[41].running_var == 0.5)
    assert not torch.all(model.decoder[0].conv5_3_D.weight == 0.5)  # the decoder keeps its own init
    del features["features.41.running_var"]
    torch.save(features, path)
    with pytest.raises(MethodError, match=re.escape(str(path))):
        build_method("segnet-global", 7, pretrained=str(path))
