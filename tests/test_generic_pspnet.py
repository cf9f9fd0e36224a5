"""PSPNet (`methods/pspnet.py`) in both inference modes: training with its auxiliary head (and a one-image batch,
where the pyramid's 1x1 pool must not raise), prediction at a size not divisible by 32, `downsample` (ISDNet's
"PSPNet (1/2 scale)" rows), the parameter count of mmseg 0.30's build, the mmseg checkpoint layout, and golden logits
of mmseg 0.30 itself on seeded weights (`tests/golden/count_pspnet.py` wrote `tests/golden/pspnet.npz`; measured
there: max |ours - mmseg| = 6.6e-7 of max |logit| 0.71, and 6.7e-7 on the auxiliary head, kept in
`tests/golden/pspnet_aux.npz`).

`tests/test_generic_icnet.py` runs these same tests on ICNet by overriding the `name` fixture.
"""
from __future__ import annotations

import pytest
import torch
from test_golden_mmseg import REL_ATOL, assert_logits_match

from methods import MethodError, build_method, count_parameters, method_class
from tests.golden.seeded import load_arrays, load_fixture, seed_weights, seeded_image

SMALL = {"downsample": 4, "window": 64, "overlap": 16}  # global: 1/4 of the image; local: 64-px windows
# per network: the loss weights of mmseg's auxiliary heads, and a few keys of its checkpoint layout
EXPECTED = {
    "pspnet": {"aux_weights": (0.4,),
               "keys": {"backbone.stem.7.running_var", "decode_head.psp_modules.0.1.bn.weight",
                        "decode_head.bottleneck.conv.weight", "decode_head.conv_seg.weight",
                        "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.bias"},
               "aux_classifier": "auxiliary_head.conv_seg.weight"},
    "icnet": {"aux_weights": (0.4, 0.4),
              "keys": {"backbone.backbone.stem.7.running_var", "backbone.backbone.layer4.1.conv2.weight",
                       "backbone.psp_modules.3.1.conv.weight", "backbone.psp_bottleneck.bn.weight",
                       "backbone.conv_sub1.2.conv.weight", "neck.cff_12.conv_low.bn.running_mean",
                       "decode_head.conv_seg.weight", "auxiliary_head.1.conv_seg.bias"},
              "aux_classifier": "auxiliary_head.1.conv_seg.weight"},
}


@pytest.fixture
def name() -> str:
    return "pspnet"


def build(run: str, seed: int = 0, **model):
    torch.manual_seed(seed)
    return build_method(run, 7, **{**SMALL, **model})


def _heads(model) -> list:
    aux = model.auxiliary_head
    return [model.decode_head, *(aux if isinstance(aux, torch.nn.ModuleList) else [aux])]


@pytest.mark.parametrize("variant", ["global", "local"])
def test_one_training_step_with_the_auxiliary_heads(name, variant):
    model = build(f"{name}-{variant}").train()
    assert model.aux_weights == EXPECTED[name]["aux_weights"]
    size = 128 if variant == "global" else 64  # global sees 32 px, local a 64-px crop
    batch = 2 if variant == "global" else 1  # batch 1: the pyramid's 1x1-pool BN must not raise
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 7, (batch, size, size))
    labels[:, :4] = 255
    terms = model.forward_train(images, labels)
    assert sorted(terms) == sorted(["loss_seg"] + [f"loss_aux{i}" for i in range(len(model.aux_weights))])
    assert all(t.dim() == 0 and torch.isfinite(t) and t > 0 for t in terms.values()), terms
    sum(terms.values()).backward()
    for module in (model.backbone, *_heads(model)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("variant", ["global", "local"])
def test_predict_at_a_size_not_divisible_by_32(name, variant):
    model = build(f"{name}-{variant}").eval()
    size = (200, 232) if variant == "global" else (100, 140)  # local: 2 x 3 windows (the D8 trunk is slow on CPU)
    with torch.inference_mode():
        logits = model.predict(torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8))
        assert logits.shape == (1, 7, *size) and torch.isfinite(logits).all()
        assert len(model.network_outputs(torch.zeros(1, 3, 50, 58))) == 1  # no auxiliary heads at inference


def test_global_inference_sees_the_image_downsampled(name):
    model = build(f"{name}-global").eval()
    seen = []
    outputs = model.network_outputs
    model.network_outputs = lambda x: seen.append(tuple(x.shape[-2:])) or outputs(x)
    with torch.inference_mode():
        for downsample in (1, 2):  # full scale, and ISDNet's "PSPNet (1/2 scale)"
            model.downsample = downsample
            assert model.predict(torch.randint(0, 256, (1, 3, 96, 130), dtype=torch.uint8)).shape == (1, 7, 96, 130)
    assert seen == [(96, 130), (48, 65)]


def test_parameter_count_is_mmsegs(name):
    declared = method_class(name).param_counts[0]
    assert declared.num_classes == 7 and "mmseg 0.30.0" in declared.source
    assert count_parameters(build(f"{name}-global", **declared.config)) == declared.total


def test_official_layout_round_trip(name, tmp_path):
    source = seed_weights(build(f"{name}-global", downsample=1), 5).eval()
    path = tmp_path / "official.pth"
    source.save_official(str(path))
    state = torch.load(path, weights_only=True)["state_dict"]
    assert EXPECTED[name]["keys"] <= set(state)
    assert not any("classifier" in k or "conv1.0." in k for k in state)  # mmseg's names, not our heads' or timm's stem
    target = build(f"{name}-global", seed=1, downsample=1).eval()
    image = seeded_image(3, 72, 88)
    with torch.no_grad():
        before = target.predict(image)
        report = target.load_official(str(path))
        assert report.clean and len(report.loaded) == len(state) == len(target.state_dict())
        after = target.predict(image)
        assert torch.equal(after, source.predict(image)) and not torch.equal(after, before)


@pytest.mark.parametrize("fault", ["renamed", "reshaped"])
def test_a_checkpoint_that_does_not_fit_is_one_clear_error(name, tmp_path, fault):
    model = build(f"{name}-global")
    path = tmp_path / f"{fault}.pth"
    model.save_official(str(path))
    state = torch.load(path, weights_only=True)["state_dict"]
    aux = EXPECTED[name]["aux_classifier"]
    if fault == "renamed":
        state["decode_head.conv_sg.weight"] = state.pop("decode_head.conv_seg.weight")
    else:
        state[aux] = torch.zeros(9, *state[aux].shape[1:])
    torch.save({"state_dict": state}, path)
    with pytest.raises(MethodError) as error:
        model.load_official(str(path))
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert ("conv_sg" in message) if fault == "renamed" else (aux.replace("conv_seg", "classifier") in message)


def test_logits_match_mmseg(name):
    _, _, _, meta = load_fixture(name)
    model = seed_weights(build_method(meta["run"], meta["num_classes"], **meta["model"]), meta["weight_seed"]).eval()
    assert model.pixel_mean.flatten().tolist() == pytest.approx(meta["img_norm_cfg"]["mean"])
    assert model.pixel_std.flatten().tolist() == pytest.approx(meta["img_norm_cfg"]["std"])
    image = seeded_image(meta["image_seed"], *meta["size"])
    with torch.no_grad():
        assert_logits_match(name, model.predict(image))
        # the auxiliary heads (training-only outputs) on the same image: the top-level flag alone asks for them,
        # BN and dropout stay in eval mode as in the reference run
        model.training = True
        aux = model.network_outputs(model.normalize(image))[1:]
    reference, _ = load_arrays(f"{name}_aux")
    assert len(aux) == len(reference) == len(model.aux_weights)
    for i, logits in enumerate(aux):
        official = torch.from_numpy(reference[f"aux{i}"])
        assert logits.shape == official.shape, f"auxiliary head {i}: {tuple(logits.shape)} vs {tuple(official.shape)}"
        bound = REL_ATOL * float(official.abs().max())
        assert (logits - official).abs().max() <= bound, f"auxiliary head {i} differs from mmseg's by > {bound:.3g}"
