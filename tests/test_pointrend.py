"""PointRend (methods/pointrend.py, docs/specs/pointrend.md): the subdivision inference, the point head and the
training sampler against detectron2's own head (tests/golden/pointrend.npz, written by tests/golden/make_pointrend.py:
same chosen cells, final logits within 1e-5), the point utilities by hand, two different base methods end to end,
and bad settings."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods import MethodError, build_method
from methods.pointrend import (
    StandardPointHead,
    point_sample,
    subdivision_step,
    uncertain_points_on_grid,
    uncertain_points_with_randomness,
    uncertainty,
)
from tests.golden.make_pointrend import CASES, inputs, ours
from tests.golden.seeded import GOLDEN_DIR

SMALL = {"backbone": "resnet18", "fpn_channels": 32, "fc_dim": 32}  # a CPU-sized refiner for the end-to-end tests


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN_DIR / "pointrend.npz") as data:
        assert json.loads(str(data["meta"]))["cases"] == json.loads(json.dumps(CASES))
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("index", range(len(CASES)))
def test_subdivision_matches_detectron2(golden, index):
    case = CASES[index]
    coarse, p2, labels, probes = inputs(case)
    model = ours(case)
    with torch.no_grad():
        logits, chosen = model.refine_logits(coarse, p2, torch.ones(2))
        probe = model.refiner.point_head(point_sample(p2, probes), point_sample(coarse, probes))
    for step, indices in enumerate(chosen):
        assert np.array_equal(indices.numpy(), golden[f"case{index}_step{step}_indices"]), step
    assert np.abs(probe.numpy() - golden[f"case{index}_probe_logits"]).max() <= 1e-6
    assert np.abs(logits.numpy() - golden[f"case{index}_final"]).max() <= 1e-5


@pytest.mark.parametrize("index", range(len(CASES)))
def test_training_points_and_loss_match_detectron2(golden, index):
    case = CASES[index]
    coarse, p2, labels, _ = inputs(case)
    model = ours(case)
    torch.manual_seed(case["seed"])  # the generator seeded the official call the same way: same two torch.rand
    coords = uncertain_points_with_randomness(coarse, case["train_points"], 3, 0.75)
    assert np.array_equal(coords.numpy(), golden[f"case{index}_train_coords"])
    torch.manual_seed(case["seed"])
    with torch.no_grad():
        loss = model.point_loss(coarse, p2, torch.ones(2), labels)
    assert abs(loss.item() - float(golden[f"case{index}_point_loss"])) <= 1e-6


def test_point_sample_is_bilinear_on_pixel_centres_and_nearest_for_labels():
    grid = torch.arange(20, dtype=torch.float64).view(1, 1, 4, 5) ** 1.5
    x, y = 0.43, 0.61  # continuous pixel position (x W - 0.5, y H - 0.5): interior
    px, py = x * 5 - 0.5, y * 4 - 0.5
    x0, y0 = int(px), int(py)
    fx, fy = px - x0, py - y0
    g = grid[0, 0]
    manual = ((1 - fx) * (1 - fy) * g[y0, x0] + fx * (1 - fy) * g[y0, x0 + 1] + (1 - fx) * fy * g[y0 + 1, x0]
              + fx * fy * g[y0 + 1, x0 + 1])
    coords = torch.tensor([[[x, y]]], dtype=torch.float64)
    assert torch.allclose(point_sample(grid, coords)[0, 0, 0], manual)
    # nearest: the value of the pixel the point falls in
    assert point_sample(grid, coords, mode="nearest")[0, 0, 0] == g[int(y * 4), int(x * 5)]


def test_uncertainty_is_the_negative_top2_margin():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, -1.0, -4.0]]).T.reshape(1, 3, 1, 2)
    assert torch.equal(uncertainty(logits).flatten(), torch.tensor([-0.5, -1.0]))


def test_grid_points_are_the_top_k_uncertain_cells_at_their_centres():
    h, w = 5, 7
    scores = torch.randperm(h * w, generator=torch.Generator().manual_seed(0)).float().view(1, 1, h, w)
    indices, centres = uncertain_points_on_grid(scores, 6)
    assert sorted(scores.flatten()[indices[0]].tolist()) == list(range(h * w - 6, h * w))
    for i, (cx, cy) in zip(indices[0].tolist(), centres[0].tolist(), strict=True):
        assert cx == pytest.approx((i % w + 0.5) / w) and cy == pytest.approx((i // w + 0.5) / h)
    assert uncertain_points_on_grid(scores, 1000)[0].shape == (1, h * w)  # at most every cell


def test_point_head_init_is_upstreams():
    torch.manual_seed(0)
    head = StandardPointHead(256, 19)
    assert [tuple(m.weight.shape) for m in (head.fc1, head.fc2, head.fc3, head.predictor)] == [
        (256, 275, 1), (256, 256, 1), (256, 256, 1), (19, 256, 1)]  # coarse_pred_each_layer False (§2.3)
    for fc in (head.fc1, head.fc2, head.fc3):  # c2_msra_fill: kaiming normal, fan_out = 256
        assert fc.weight.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.02) and not fc.bias.any()
    assert head.predictor.weight.std().item() == pytest.approx(0.001, rel=0.05) and not head.predictor.bias.any()


def test_one_subdivision_step_replaces_exactly_the_chosen_cells():
    coarse = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    seen = []

    def predict_points(coords):
        seen.append(coords)
        return torch.full((2, 4, coords.shape[1]), 100.0)

    refined, indices = subdivision_step(coarse, 7, predict_points)
    upsampled = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
    expected = uncertain_points_on_grid(uncertainty(upsampled), 7)
    assert torch.equal(indices, expected[0]) and torch.equal(seen[0], expected[1])
    flat, base = refined.flatten(2), upsampled.flatten(2)
    replaced = torch.zeros_like(flat, dtype=torch.bool)
    replaced.scatter_(2, indices[:, None].expand(-1, 4, -1), True)
    assert torch.all(flat[replaced] == 100.0) and torch.equal(flat[~replaced], base[~replaced])
    assert replaced[:, 0].sum(1).tolist() == [7, 7]


def test_training_sampler_keeps_the_most_uncertain_candidates_then_adds_uniform_points():
    coarse = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    candidates, fresh = torch.rand(2, 60, 2), torch.rand(2, 5, 2)
    torch.manual_seed(5)
    coords = uncertain_points_with_randomness(coarse, 20, 3, 0.75)
    assert coords.shape == (2, 20, 2)
    scores = uncertainty(point_sample(coarse, candidates))[:, 0]
    for b in range(2):
        best = candidates[b, scores[b].topk(15).indices]
        assert {tuple(p) for p in coords[b, :15].tolist()} == {tuple(p) for p in best.tolist()}
    assert torch.equal(coords[:, 15:], fresh)
    torch.manual_seed(5)
    _, uniform = torch.rand(2, 20, 2), torch.rand(2, 20, 2)
    torch.manual_seed(5)  # importance 0: the candidates are still drawn (upstream's call order), then 20 fresh ones
    assert torch.equal(uncertain_points_with_randomness(coarse, 20, 1, 0.0), uniform)


@pytest.mark.parametrize("base", ["global", "local"])
def test_refines_any_one_phase_base_end_to_end(base):
    torch.manual_seed(0)
    model = build_method("pointrend", 3, base=base, base_model={}, subdivision_num_points=256, **SMALL)
    assert model.parameter_counts()["point_head"] == 3 * (32 * 32 + 32) + 32 * 3 + 32 * 3 + 3
    images = torch.randint(0, 256, (2, 3, 96, 80), dtype=torch.uint8)
    labels = torch.randint(0, 3, (2, 96, 80))
    labels[:, :4] = 255
    model.eval()
    refined, plain = model.predict(images), model.base.predict(images)
    assert refined.shape == plain.shape == (2, 3, 96, 80) and not torch.allclose(refined, plain)
    model.train()
    model.set_phase("refiner")
    loss = sum(model.forward_train(images, labels).values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in model.base.parameters())
    head = list(model.refiner.point_head.parameters()) + list(model.refiner.fpn_output2.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    assert not model.base.training  # frozen in eval mode while the point head trains


def test_no_steps_is_the_coarse_map_and_steps_change_only_uncertain_cells():
    torch.manual_seed(0)
    model = build_method("pointrend", 3, subdivision_steps=0, subdivision_num_points=64, **SMALL).eval()
    images = torch.randint(0, 256, (1, 3, 64, 48), dtype=torch.uint8)
    coarse = model.coarse_logits(images)
    assert coarse.shape == (1, 3, 16, 12)
    plain = F.interpolate(coarse, size=(64, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(model.predict(images), plain)
    model.subdivision_steps = 2  # 16 x 12 -> 64 x 48: the image size, so the final resize is the identity
    with torch.no_grad():
        p2, scale = model.refiner.p2(model.normalize(images))
        logits, chosen = model.refine_logits(coarse, p2, scale)
    assert logits.shape == (1, 3, 64, 48) and [c.shape[1] for c in chosen] == [64, 64]
    assert torch.equal(model.predict(images), logits)


def test_padding_to_32_keeps_points_on_the_image():
    model = build_method("pointrend", 3, **SMALL)
    p2, scale = model.refiner.p2(torch.zeros(1, 3, 100, 70))
    assert p2.shape[-2:] == (32, 24) and torch.allclose(scale, torch.tensor([70 / 96, 100 / 128]))


def test_all_ignored_points_give_zero_not_nan():
    torch.manual_seed(0)
    model = build_method("pointrend", 3, train_num_points=32, **SMALL).train()
    model.set_phase("refiner")
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    loss = model.forward_train(images, torch.full((1, 64, 64), 255))["loss_point"]
    assert loss.item() == 0.0
    loss.backward()


@pytest.mark.parametrize(("keywords", "message"), [
    ({"oversample_ratio": 0.5}, "oversample_ratio must be >= 1"),
    ({"importance_sample_ratio": 1.5}, "importance_sample_ratio must lie in"),
    ({"train_num_points": 0}, "train_num_points must be a positive integer"),
    ({"subdivision_num_points": 0}, "subdivision_num_points must be a positive integer"),
    ({"fpn_channels": 0}, "fpn_channels must be a positive integer"),
    ({"subdivision_steps": -1}, "subdivision_steps must be >= 0"),
    ({"backbone": "no_such_net"}, "unknown timm backbone"),
    ({"base": "pointrend"}, "another registered method"),
    ({"base": "glnet"}, "trains in 3 phases")])
def test_bad_settings_are_one_line_errors(keywords, message):
    with pytest.raises(MethodError, match=message) as info:
        build_method("pointrend", 3, **{**SMALL, **keywords})
    assert "\n" not in str(info.value)


# -- detectron2's checkpoint layout (§7, §10 trap 10) ----------------------------------------------------------------

MSRA = {"backbone": "resnet50", "fpn_channels": 32, "fc_dim": 32, "freeze_bn": True, "stride_in_1x1": True}


def msra(seed: int = 0, **keywords):
    torch.manual_seed(seed)
    return build_method("pointrend", 3, subdivision_num_points=64, **{**MSRA, **keywords}).eval()


def one_line_error(call, *fragments):
    with pytest.raises(MethodError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def perturb_norms(model):
    """Random FrozenBN statistics and scales (timm zero-inits each block's last BN scale, which would hide the
    residual branches, and with them the stride and most of the mapping)."""
    with torch.no_grad():
        for name, value in [*model.refiner.named_buffers(), *model.refiner.named_parameters()]:
            if name.endswith("running_mean") or (name.endswith(".bias") and value.dim() == 1):
                value.uniform_(-0.3, 0.3)
            elif name.endswith("running_var") or ("bn" in name or "downsample.1" in name) and name.endswith("weight"):
                value.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A release-like model (norms perturbed, so a dropped or swapped buffer shows) and its .pkl."""
    model = perturb_norms(msra(0, bgr_input=True))
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    model.save_official(str(path))
    return model, path


def test_official_round_trip_gives_identical_predictions(saved):
    source, path = saved
    target = msra(1, bgr_input=True)
    report = target.load_official(str(path))
    assert report.clean and not report.skipped and len(report.loaded) == len(target.refiner.state_dict())
    target.base.load_state_dict(source.base.state_dict())  # the base is not in the file: trained here
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    assert torch.equal(target.predict(images), source.predict(images))


def test_saved_file_has_detectron2_names_and_numpy_arrays(saved):
    source, path = saved
    with open(path, "rb") as handle:
        data = pickle.load(handle)
    assert "__author__" in data and data["stride_in_1x1"] is True  # __author__: detectron2 takes the names as they are
    model = data["model"]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in model.values())
    trunk = source.refiner.trunk
    expected = {"backbone.bottom_up.stem.conv1.weight": trunk.conv1.weight,
                "backbone.bottom_up.stem.conv1.norm.running_mean": trunk.bn1.running_mean,
                "backbone.bottom_up.res3.0.conv1.weight": trunk.layer2[0].conv1.weight,
                "backbone.bottom_up.res3.0.conv2.norm.running_var": trunk.layer2[0].bn2.running_var,
                "backbone.bottom_up.res3.0.conv3.norm.running_var": trunk.layer2[0].bn3.running_var,
                "backbone.bottom_up.res3.0.shortcut.norm.running_var": trunk.layer2[0].downsample[1].running_var,
                "backbone.bottom_up.res5.2.conv3.weight": trunk.layer4[2].conv3.weight,
                "backbone.fpn_lateral2.bias": source.refiner.fpn_lateral2.bias,
                "backbone.fpn_output2.weight": source.refiner.fpn_output2.weight,
                "sem_seg_head.point_head.predictor.weight": source.refiner.point_head.predictor.weight}
    for name, tensor in expected.items():
        assert np.array_equal(model[name], tensor.detach().numpy()), name
    assert not any("num_batches_tracked" in k or "coarse_sem_seg_head" in k for k in model)
    # the release's layout (spec §7): one shortcut per stage, on block 0; 3 convs per bottleneck
    assert sorted(k for k in model if "shortcut.weight" in k) == [
        f"backbone.bottom_up.res{s}.0.shortcut.weight" for s in (2, 3, 4, 5)]


def test_a_numpy_1_python_2_style_pickle_loads(saved, tmp_path):
    """The release was pickled by numpy 1.x (`numpy.core.multiarray`) at protocol 2; numpy 2 names it `numpy._core`."""
    source, path = saved
    with open(path, "rb") as handle:
        data = pickle.load(handle)
    old = pickle.dumps(data, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in old
    (tmp_path / "old.pkl").write_bytes(old)
    target = msra(1)
    assert target.load_official(str(tmp_path / "old.pkl")).clean
    assert torch.equal(target.refiner.trunk.layer3[4].bn2.running_var, source.refiner.trunk.layer3[4].bn2.running_var)


def test_release_extras_in_a_pth_are_reported_skipped(saved, tmp_path):
    source, path = saved
    with open(path, "rb") as handle:
        model = {k: torch.from_numpy(v) for k, v in pickle.load(handle)["model"].items()}
    extras = {"sem_seg_head.coarse_sem_seg_head.predictor.weight": torch.zeros(3, 128, 1, 1),
              "sem_seg_head.coarse_sem_seg_head.p5.0.norm.weight": torch.ones(128),
              "backbone.fpn_output3.weight": torch.zeros(32, 32, 3, 3)}
    pth = tmp_path / "model_final.pth"
    torch.save({"model": {**model, **extras}, "iteration": 65000}, pth)  # detectron2's own torch.save layout
    target = msra(1)  # a .pth says nothing of the stride: detectron2's default, the MSRA layout
    report = target.load_official(str(pth))
    assert report.clean and report.skipped == sorted(extras)
    assert torch.equal(target.refiner.point_head.fc2.weight, source.refiner.point_head.fc2.weight)


def test_stride_in_1x1_moves_the_stride_and_changes_the_function():
    moved, plain = perturb_norms(msra(0)), msra(0, stride_in_1x1=False)
    for layer in ("layer2", "layer3", "layer4"):
        block, reference = getattr(moved.refiner.trunk, layer)[0], getattr(plain.refiner.trunk, layer)[0]
        assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1) and block.conv2.padding == (1, 1)
        assert reference.conv1.stride == (1, 1) and reference.conv2.stride == (2, 2)
    assert moved.refiner.trunk.layer1[0].conv1.stride == (1, 1)  # res2 keeps stride 1
    plain.load_state_dict(moved.state_dict())  # the same weights, the stride elsewhere
    x = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        (a, scale_a), (b, scale_b) = moved.refiner.p2(x), plain.refiner.p2(x)
    assert a.shape == b.shape == (1, 32, 24, 32) and torch.equal(scale_a, scale_b)
    assert not torch.allclose(a, b, atol=1e-3)
    one_line_error(lambda: build_method("pointrend", 3, **{**SMALL, "stride_in_1x1": True}), "resnet18",
                   "bottleneck")
    one_line_error(lambda: build_method("pointrend", 3, **{**MSRA, "pretrained": True}), "stride_in_1x1")


def test_msra_weights_do_not_load_into_the_timm_layout(saved, tmp_path):
    _, path = saved
    plain = msra(1, stride_in_1x1=False)
    one_line_error(lambda: plain.load_official(str(path)), str(path), "stride_in_1x1: true", "trap 10")
    timm_file = tmp_path / "timm_layout.pkl"
    plain.save_official(str(timm_file))  # the file records stride_in_1x1 False: loads back into its own layout
    assert msra(2, stride_in_1x1=False).load_official(str(timm_file)).clean
    one_line_error(lambda: msra(2).load_official(str(timm_file)), str(timm_file), "stride_in_1x1: false")


def test_mismatched_files_are_one_line_errors_naming_the_file(saved, tmp_path):
    _, path = saved
    with open(path, "rb") as handle:
        data = pickle.load(handle)
    cases = {"unexpected": {**data["model"], "backbone.fpn_lateral6.weight": np.zeros((32, 2048, 1, 1), np.float32)},
             "mismatched": {**data["model"],
                            "sem_seg_head.point_head.predictor.weight": np.zeros((19, 32, 1), np.float32)},
             "missing": {k: v for k, v in data["model"].items() if k != "backbone.bottom_up.res4.5.conv2.weight"}}
    names = {"unexpected": "backbone.fpn_lateral6.weight", "mismatched": "refiner.point_head.predictor.weight",
             "missing": "refiner.trunk.layer3.5.conv2.weight"}
    for kind, model in cases.items():
        bad = tmp_path / f"{kind}.pkl"
        with open(bad, "wb") as handle:
            pickle.dump({**data, "model": model}, handle)
        target = msra(1)
        before = target.refiner.point_head.fc1.weight.clone()
        one_line_error(lambda target=target, bad=bad: target.load_official(str(bad)), str(bad), kind, names[kind])
        assert torch.equal(target.refiner.point_head.fc1.weight, before)  # nothing loaded


def test_unreadable_and_planted_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    planted, caffe2 = tmp_path / "planted.pkl", tmp_path / "caffe2.pkl"
    with open(planted, "wb") as handle:
        pickle.dump({"model": {"x": Payload()}, "__author__": "x"}, handle)
    with open(caffe2, "wb") as handle:
        pickle.dump({"blobs": {"res2_0_branch2a_w": np.zeros(1, np.float32)}}, handle)
    one_line_error(lambda: msra().load_official(str(planted)), str(planted), "not a numpy array")
    assert not marker.exists()
    one_line_error(lambda: msra().load_official(str(caffe2)), str(caffe2))


def test_bgr_input_feeds_blue_first():
    model = msra(0, bgr_input=True)
    model.set_normalization([103.530, 116.280, 123.675], [1, 1, 1])  # detectron2's PIXEL_MEAN (B, G, R) verbatim
    images = torch.zeros(1, 3, 2, 2)
    images[:, 2] = 200  # blue
    x = model.network_input(images)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([200 - 103.530, -116.280, -123.675]))
