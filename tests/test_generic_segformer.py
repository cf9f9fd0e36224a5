"""SegFormer-B0 (`methods/segformer.py`) in both inference modes: one training step, prediction at a size not divisible
by 32, the parameter count of mmseg 0.30's build, mmseg's initialisation and checkpoint layout (MiT keys converted
both ways), MiT-b0 ImageNet files in either layout, and golden logits of mmseg 0.30 itself on seeded weights
(`tests/golden/count_segformer.py` wrote `segformer.npz`; measured there: max |ours - mmseg| = 8.5e-7 of max |logit|
1.24, float rounding of nn.MultiheadAttention vs our q/kv attention)."""
from __future__ import annotations

import math

import pytest
import torch
from test_golden_mmseg import assert_logits_match
from torch import nn

from methods import MethodError, build_method, count_parameters, method_class
from methods.segformer import mit_to_mmseg
from tests.golden.seeded import load_fixture, seed_weights, seeded_image

SMALL = {"downsample": 4, "window": 128, "overlap": 32}


def build(run: str = "segformer-global", seed: int = 0, **model):
    torch.manual_seed(seed)
    return build_method(run, 7, **{**SMALL, **model})


@pytest.mark.parametrize("variant", ["global", "local"])
def test_one_training_step(variant):
    model = build(f"segformer-{variant}").train()
    assert model.aux_weights == ()
    size, batch = (256, 2) if variant == "global" else (64, 1)  # >= 4 tokens per stage: a lone one gives q no gradient
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 7, (batch, size, size))
    labels[:, :4] = 255
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_seg"} and torch.isfinite(terms["loss_seg"]) and terms["loss_seg"] > 0
    terms["loss_seg"].backward()
    # the first block has stochastic depth 0: never dropped (later ones may drop a whole sample's branch)
    for module in (model.backbone.patch_embed1, model.backbone.block1[0], model.backbone.patch_embed4,
                   model.backbone.norm4, model.decode_head.convs[3],
                   model.decode_head.fusion_conv, model.decode_head.conv_seg):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), module


@pytest.mark.parametrize("variant", ["global", "local"])
def test_predict_at_a_size_not_divisible_by_32(variant):
    model = build(f"segformer-{variant}").eval()
    with torch.inference_mode():
        logits = model.predict(torch.randint(0, 256, (1, 3, 200, 232), dtype=torch.uint8))
        assert logits.shape == (1, 7, 200, 232) and torch.isfinite(logits).all()
        out = model.network_outputs(torch.zeros(1, 3, 50, 58))
        assert len(out) == 1 and out[0].shape[-2:] == (13, 15)  # logits at 1/4 (ceil)


def test_parameter_count_is_mmsegs():
    declared = method_class("segformer").param_counts[0]
    assert declared.num_classes == 7 and "mmseg 0.30" in declared.source
    assert count_parameters(build(**declared.config)) == declared.total == 3_716_967


def test_mmseg_conventions_norms_and_init():
    model = build()
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 4 + 4 + 8 * 2 + 6 and all(m.eps == 1e-6 for m in norms)  # embeds, stages, blocks, reductions
    block = model.backbone.block1[0]
    # fc1 is a 1x1 conv upstream: N(0, sqrt(2 / fan_out))
    assert float(block.mlp.fc1.weight.detach().std()) == pytest.approx(math.sqrt(2 / 128), rel=0.1)
    bound = math.sqrt(6 / (4 * 32))  # xavier over nn.MultiheadAttention's (3C, C) in-projection
    assert block.attn.kv.weight.abs().max() <= bound and block.attn.kv.weight.abs().max() > 0.9 * bound
    assert float(model.decode_head.conv_seg.weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    assert model.decode_head.dropout.p == 0.1


def test_official_layout_round_trip(tmp_path):
    source = seed_weights(build(downsample=1), 5).eval()
    path = tmp_path / "official.pth"
    source.save_official(str(path))
    state = torch.load(path, weights_only=True)["state_dict"]
    assert {"backbone.layers.0.0.projection.weight", "backbone.layers.0.1.1.attn.attn.in_proj_weight",
            "backbone.layers.2.1.0.ffn.layers.4.weight", "backbone.layers.3.2.bias",
            "decode_head.fusion_conv.bn.running_var", "decode_head.conv_seg.bias"} <= set(state)
    assert state["backbone.layers.1.1.0.ffn.layers.0.weight"].shape == (256, 64, 1, 1)
    assert not any("block" in k or "patch_embed" in k for k in state)
    own = source.state_dict()  # where our tensors go (the reference reads these; count_segformer.py checks parity)
    in_proj = state["backbone.layers.2.1.1.attn.attn.in_proj_weight"]  # rows: q, k, v
    assert torch.equal(in_proj[:160], own["backbone.block3.1.attn.q.weight"])
    assert torch.equal(in_proj[160:], own["backbone.block3.1.attn.kv.weight"])  # kv rows: k, v
    assert torch.equal(state["backbone.layers.0.1.0.ffn.layers.0.weight"][:, :, 0, 0],
                       own["backbone.block1.0.mlp.fc1.weight"])
    assert torch.equal(state["backbone.layers.3.0.projection.weight"], own["backbone.patch_embed4.proj.weight"])
    assert torch.equal(state["backbone.layers.1.2.weight"], own["backbone.norm2.weight"])
    assert torch.equal(state["backbone.layers.1.1.0.attn.norm.bias"], own["backbone.block2.0.attn.norm.bias"])
    target = build(seed=1, downsample=1).eval()
    report = target.load_official(str(path))
    assert report.clean and len(report.loaded) == len(target.state_dict())
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
        state["decode_head.fuse_conv.conv.weight"] = state.pop("decode_head.fusion_conv.conv.weight")
    else:
        state["backbone.layers.0.1.0.attn.attn.in_proj_weight"] = torch.zeros(99, 32)
    torch.save({"state_dict": state}, path)
    with pytest.raises(MethodError) as info:
        model.load_official(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert ("decode_head.fuse_conv" if fault == "renamed" else "backbone.block1.0.attn.kv.weight") in message


def test_pretrained_encoder_from_a_file_in_either_layout(tmp_path):
    encoder = seed_weights(build(), 7).backbone.state_dict()
    files = {"smp": {**encoder, "head.weight": torch.zeros(1000, 256)},  # NVlabs file: its classifier is dropped
             "mmseg": {"state_dict": mit_to_mmseg(encoder)}}
    for layout, content in files.items():
        path = tmp_path / f"mit_b0_{layout}.pth"
        torch.save(content, path)
        loaded = build(pretrained=str(path)).backbone.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in encoder.items()), layout
    torch.save({"layers.0.0.projection.weight": torch.zeros(32, 3, 7, 7)}, path)
    with pytest.raises(MethodError, match=f"{path} is not a MiT-b0 checkpoint"):
        build(pretrained=str(path))


def test_logits_match_mmseg():
    meta = load_fixture("segformer")[3]
    model = seed_weights(build_method(meta["method"], 7, **meta["model"]), meta["weight_seed"]).eval()
    with torch.inference_mode():
        logits = model.predict(seeded_image(meta["image_seed"], *meta["size"]))
    assert_logits_match("segformer", logits)
