"""PointRend (methods/pointrend.py, docs/specs/pointrend.md): the subdivision inference, the point head and the
training sampler against detectron2's own head (tests/golden/pointrend.npz, written by tests/golden/make_pointrend.py:
same chosen cells, final logits within 1e-5), the point utilities by hand, two different base methods end to end,
and bad settings."""
from __future__ import annotations

import json

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
