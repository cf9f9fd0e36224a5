"""CascadePSP (methods/cascadepsp.py, docs/specs/cascadepsp.md): the refinement network, the pip schedule's
geometry and rules, the per-class merge, training terms and the release's checkpoint layout. Parity with the
official code: tests/test_golden_cascadepsp.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from methods import MethodError, build_method
from methods.cascadepsp import (
    LOSS_WEIGHTS,
    RefinementNet,
    crop_windows,
    perturb_mask,
    refine_global_only,
    refine_high_res,
    refinement_loss,
    safe_forward,
    sobel_magnitude,
)


def tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    return build_method("cascadepsp", 7, base_model={"backbone": "resnet18d", "channels": 32}, **kw).eval()


class StubNet(nn.Module):
    """Records each call's inputs; pred_224 / pred_56_2 from `fill(h, w, global_call)`."""

    def __init__(self, fill):
        super().__init__()
        self.fill, self.calls = fill, []

    def forward(self, x, seg, inter_s8=None, inter_s4=None):
        self.calls.append((tuple(x.shape[-2:]), inter_s8 is not None, inter_s4 is not None))
        p = self.fill(*x.shape[-2:], inter_s8 is None)
        return {"pred_224": p, "pred_28_3": p, "pred_56_2": p}


# ---- network ---------------------------------------------------------------------------------------------------

def test_network_is_the_release_one():
    net = RefinementNet()
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 67_683_433 and len(state) == 426  # spec §2.7
    assert state["feats.conv1.weight"].shape == (64, 6, 7, 7)
    assert state["psp.bottleneck.weight"].shape == (1024, 10240, 1, 1)
    assert state["up_1.conv.0.weight"].shape == (1280,) and state["final_11.weight"].shape == (32, 35, 1, 1)
    assert [b.conv2.dilation[0] for b in net.feats.layer3] == [1, 2, 2, 2, 2, 2]  # §2.1: first block undilated
    assert [b.conv2.dilation[0] for b in net.feats.layer4] == [1, 4, 4]
    assert [b.conv2.stride[0] for b in net.feats.layer2] == [2, 1, 1, 1]
    assert all(b.conv2.stride[0] == 1 for layer in (net.feats.layer3, net.feats.layer4) for b in layer)


def test_cascade_passes_and_output_sizes():
    torch.manual_seed(0)
    net = RefinementNet().eval()
    x, seg = torch.randn(1, 3, 32, 40), torch.ones(1, 1, 32, 40)
    with torch.inference_mode():
        full = net(x, seg)
        local = net(x, seg, inter_s8=torch.zeros(1, 1, 32, 40))
    assert {"out_28", "out_28_2", "out_56", "out_28_3", "out_56_2", "out_224"} <= set(full)
    assert all(v.shape == (1, 1, 32, 40) for v in full.values())
    assert "out_28" not in local and "out_56" in local  # inter_s8 given: pass 1 skipped (the local step)
    assert torch.allclose(full["pred_224"], torch.sigmoid(full["out_224"]))


def test_safe_forward_pads_both_sides_when_either_is_off_by_eight():
    net = StubNet(lambda h, w, g: torch.zeros(1, 1, h, w))
    out = safe_forward(net, torch.zeros(1, 3, 12, 16), torch.zeros(1, 1, 12, 16))
    assert net.calls[0][0] == (16, 24)  # 16 is a multiple of 8 and still gets +8 (§4.1)
    assert out["pred_224"].shape == (1, 1, 12, 16)
    safe_forward(net, torch.zeros(1, 3, 16, 24), torch.zeros(1, 1, 16, 24))
    assert net.calls[1][0] == (16, 24)


# ---- schedule ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, count, starts", [
    (2448, 2448, 25, [0, 418, 836, 1254, 1548]),
    (5000, 5000, 121, None),
    (1024, 2048, 8, [0, 418, 836, 1148]),
    (5120, 5120, 144, None),
])
def test_local_crops_of_the_benchmark_sizes(h, w, count, starts):
    crops = crop_windows(h, w, 900)  # spec §4.6
    assert len(crops) == count and all(ey - sy == 900 and ex - sx == 900 for sy, ey, sx, ex in crops)
    if starts:
        assert sorted({c[2] for c in crops}) == starts
    assert max(c[2] for c in crops) == w - 900


def test_l_too_small_for_the_local_step_is_one_line():
    with pytest.raises(MethodError, match="L must exceed 64"):
        crop_windows(100, 100, 64)
    with pytest.raises(MethodError, match="L must exceed 64"):
        build_method("cascadepsp", 7, L=64)


def test_uninteresting_crops_are_skipped_and_fall_back_to_the_binarised_global_mask():
    full = StubNet(lambda h, w, g: torch.full((1, 1, h, w), 0.95))  # global mask all foreground: every crop > 90 %
    out = refine_high_res(full, torch.zeros(1, 3, 300, 300), torch.ones(1, 1, 300, 300), 128)
    assert len(full.calls) == 1 and torch.equal(out, torch.ones_like(out))

    def half(h, w, is_global):  # the global step: left half foreground; each crop then predicts 0.25
        p = torch.full((1, 1, h, w), 0.25)
        if is_global:
            p[..., : w // 2] = 0.9
        return p

    mixed = StubNet(half)
    out = refine_high_res(mixed, torch.zeros(1, 3, 128, 300), torch.ones(1, 1, 128, 300), 128)
    refined = [c for c in mixed.calls[1:]]
    assert refined and all(c[1] and not c[2] for c in refined)  # local crops: passes 2-3 (inter_s8 given)
    assert len(refined) < len(crop_windows(128, 300, 128))  # the all-foreground / all-background crops skipped
    assert out[..., :, 0].eq(1).all() and out[..., :, -1].eq(0).all()  # outer edges: no refined crop covers them
    assert (out == 0.25).any()  # where crops were averaged


def test_global_only_resizes_to_long_side_l_and_back():
    net = StubNet(lambda h, w, g: torch.full((1, 1, h, w), 0.7))
    out = refine_global_only(net, torch.zeros(1, 3, 100, 190), torch.zeros(1, 1, 100, 190), 128)
    assert out.shape[-2:] == (100, 190) and torch.allclose(out, torch.full_like(out, 0.7))
    assert net.calls[0][0] == (72, 136)  # 67 x 128 (floor of 100 * 128 / 190), padded to multiples of 8


# ---- per-class use -----------------------------------------------------------------------------------------------

def test_merge_takes_the_largest_refined_probability_over_the_floor_else_the_base_label():
    model = tiny()
    labels = torch.tensor([[0, 0, 1, 2]])
    q_a = torch.tensor([[0.7, 0.4, 0.2, 0.1]])
    q_b = torch.tensor([[0.6, 0.3, 0.45, 0.05]])
    scores = model.merge(labels, {3: q_a, 4: q_b})
    assert scores.argmax(0).tolist() == [[3, 0, 1, 2]]  # 0.7 > 0.6 > 0.5; elsewhere nothing beats 0.5
    binary = build_method("cascadepsp", 2, base_model={"backbone": "resnet18d", "channels": 32})
    out = binary.merge(torch.tensor([[0, 1]]), {1: torch.tensor([[0.6, 0.4]])})
    assert out.argmax(0).tolist() == [[1, 0]]  # two classes: class 1 refined, thresholded at 0.5


def test_predict_refines_each_present_class_of_the_base_prediction(monkeypatch):
    model = tiny(fast=True, L=72, min_area=1)
    image = torch.randint(0, 256, (1, 3, 40, 48), dtype=torch.uint8)
    with torch.inference_mode():
        base = model.base.predict(image).argmax(1)
        seen = []
        original = model.refine_mask

        def spy(x, mask):
            seen.append(mask.clone())
            return original(x, mask)

        monkeypatch.setattr(model, "refine_mask", spy)
        scores = model.predict(image)
    assert scores.shape == (1, 7, 40, 48)
    present = base.unique().tolist()
    assert len(seen) == len(present)
    assert [bool(m.any()) for m in seen] == [True] * len(present)
    assert sorted(int(base[0][m[0, 0]].unique()) for m in seen) == present


def test_classes_under_min_area_are_not_refined():
    model = tiny(fast=True, L=72, min_area=10 ** 9)
    image = torch.randint(0, 256, (1, 3, 40, 48), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(model.predict(image).argmax(1), model.base.predict(image).argmax(1))


def test_bad_bases_are_one_line():
    with pytest.raises(MethodError, match="another registered method"):
        build_method("cascadepsp", 7, base="cascadepsp")
    with pytest.raises(MethodError, match="trains in 3 phases"):
        build_method("cascadepsp", 7, base="glnet")
    with pytest.raises(MethodError, match="unknown method"):
        build_method("cascadepsp", 7, base="nosuch")


# ---- training ----------------------------------------------------------------------------------------------------

def test_perturbed_masks_fall_under_the_iou_target():
    gen = torch.Generator().manual_seed(0)
    gt = torch.zeros(64, 64, dtype=torch.bool)
    gt[16:48, 10:40] = True
    for target in (0.95, 0.85):
        seg = perturb_mask(gt, target, gen)
        iou = (seg & gt).sum() / (seg | gt).sum()
        assert 0.3 < iou < target
    assert not perturb_mask(torch.zeros(8, 8, dtype=torch.bool), 0.9, gen).any()  # nothing to degrade: stops


def test_sobel_and_loss_terms():
    flat = sobel_magnitude(torch.ones(1, 1, 8, 8))
    assert torch.allclose(flat[..., 2:-2, 2:-2], torch.full((4, 4), 1e-2))  # sqrt(eps) where nothing changes
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1
    assert sobel_magnitude(step)[..., 4, 3:5].min() > 0.3
    out = {k: torch.zeros(1, 1, 8, 8) for k in LOSS_WEIGHTS}
    gt = torch.ones(1, 1, 8, 8)
    terms = refinement_loss(out, gt)
    assert set(terms) == {f"loss_{k}" for k in LOSS_WEIGHTS} | {"loss_grad"}
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(1), torch.ones(1))
    assert torch.isclose(terms["loss_out_28"], bce)  # BCE only, weight 1
    assert torch.isclose(terms["loss_out_224"], torch.tensor(0.5 + 0.25))  # L1 0.5 + MSE 0.25, weights 1 and 1
    assert torch.isclose(terms["loss_out_56"], 0.5 * bce + 0.25 * 0.5 + 0.25 * 0.25)


def test_phases_train_the_base_then_the_refiner():
    model = tiny().train()
    with pytest.raises(MethodError, match="set_phase"):
        model.forward_train(torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long))
    images = torch.randint(0, 256, (2, 3, 48, 48)).float()
    labels = torch.randint(0, 7, (2, 48, 48))
    model.set_phase("base")
    assert set(model.forward_train(images, labels)) == set(model.base.forward_train(images, labels))
    model.set_phase("refiner")
    torch.manual_seed(0)
    terms = model.forward_train(images, labels)
    assert "loss_grad" in terms and len(terms) == 7 and all(torch.isfinite(t) for t in terms.values())
    sum(terms.values()).backward()
    assert model.refiner.feats.conv1.weight.grad is not None
    assert all(p.grad is None for p in model.base.parameters())


# ---- checkpoints -------------------------------------------------------------------------------------------------

def test_official_layout_round_trip_and_bad_files(tmp_path):
    source = tiny()
    path = tmp_path / "model"
    source.save_official(str(path))
    saved = torch.load(path)
    assert len(saved) == 426 and all(k.startswith("module.") for k in saved)  # DataParallel layout (§7)
    target = tiny()
    torch.manual_seed(1)
    target.refiner.final_21.weight.data.normal_()
    next(target.base.parameters()).data.normal_()  # differs from the source's base: must stay as it is
    base_before = {k: v.clone() for k, v in target.base.state_dict().items()}
    report = target.load_official(str(path))
    assert len(report.loaded) == 426 and report.clean
    assert all(torch.equal(a, b) for a, b in zip(target.refiner.state_dict().values(),
                                                 source.refiner.state_dict().values(), strict=True))
    assert all(torch.equal(v, target.base.state_dict()[k]) for k, v in base_before.items())  # base untouched
    bare = tmp_path / "bare"
    torch.save({k[len("module."):]: v for k, v in saved.items()}, bare)  # a re-saved file without the prefix
    assert tiny().load_official(str(bare)).clean
    wrong = dict(saved)
    wrong["module.feats.conv1.weight"] = torch.zeros(64, 3, 7, 7)  # an RGB-only stem
    torch.save(wrong, tmp_path / "rgb")
    with pytest.raises(MethodError, match="feats.conv1.weight"):
        tiny().load_official(str(tmp_path / "rgb"))
    with pytest.raises(MethodError, match="does not exist"):
        tiny().load_official(str(tmp_path / "missing"))
