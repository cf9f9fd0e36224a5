"""SegFix (methods/segfix.py, docs/specs/segfix.md) against the official openseg.pytorch code (tests/golden/segfix.npz,
written by tests/golden/make_segfix.py: `shift`, the ground-truth generator, the window starts and HRNet-W48 + heads
all matched ours exactly), the ground truth on a hand-made map, the refinement of a corrupted base prediction, two
different base methods end to end, the loss's predicted-boundary mask, checkpoints and bad settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods import MethodError, build_method
from methods.segfix import (
    DIRECTION_VECTORS,
    IGNORE,
    balanced_cross_entropy,
    boundary_target,
    direction_class,
    distance_and_angle,
    gather_shift,
    window_starts,
)
from tests.golden.make_segfix import SHIFT_CASES, WINDOW_CASES, gt_label_ids, net_inputs, shift_inputs, train_ids
from tests.golden.seeded import GOLDEN_DIR, seed_weights


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN_DIR / "segfix.npz") as data:
        return {key: data[key] for key in data.files}, json.loads(str(data["meta"]))


def small(num_classes: int = 3, **keywords):
    torch.manual_seed(0)
    return build_method("segfix", num_classes, backbone="hrnet18_small_v2", crop=64, stride=32, **keywords)


def test_gather_equals_the_official_shift_with_align_corners(golden):
    arrays, meta = golden
    assert meta["shift_cases"] == json.loads(json.dumps(SHIFT_CASES))
    for i, case in enumerate(SHIFT_CASES):
        labels, offsets = shift_inputs(case)
        scores = F.one_hot(torch.from_numpy(labels).long(), case["classes"]).permute(2, 0, 1)[None].float()
        ours = gather_shift(scores, torch.from_numpy(offsets).long()[None]).argmax(1)[0].numpy()
        assert np.array_equal(ours, arrays[f"shift{i}"]), i
        assert arrays[f"shift_default_changed{i}"] > 0  # the trap the exact gather avoids (spec §10.1)


def test_gather_clamps_at_the_border_and_reads_the_unmodified_map():
    scores = torch.arange(12.0).view(1, 1, 3, 4)
    offsets = torch.zeros(1, 2, 3, 4, dtype=torch.long)
    offsets[0, :, 0, 0] = torch.tensor([-2, -2])  # outside the top-left corner: clamped to (0, 0)
    offsets[0, :, 2, 3] = torch.tensor([2, 2])  # outside the bottom-right: (2, 3)
    offsets[0, :, 1, 1] = torch.tensor([0, 1])  # reads (1, 2) ...
    offsets[0, :, 1, 2] = torch.tensor([0, 1])  # ... which itself moves: the read still sees the original
    out = gather_shift(scores, offsets)[0, 0]
    assert out[0, 0] == 0 and out[2, 3] == 11 and out[1, 1] == 6 and out[1, 2] == 7
    assert out[0, 1] == 1  # zero offset: unchanged


def test_ground_truth_matches_the_official_generator(golden):
    arrays, _ = golden
    labels = train_ids(gt_label_ids())
    depth, angle = distance_and_angle(labels, 19)
    assert np.array_equal(depth, arrays["gt_depth"])
    assert np.array_equal(angle, 2.0 * arrays["gt_dir_deg"] - 180)
    valid = torch.from_numpy(labels != 255)
    boundary = boundary_target(torch.from_numpy(depth).long(), valid, 5)
    assert np.array_equal(boundary.numpy(), arrays["gt_boundary"])
    direction = torch.where(valid, direction_class(torch.from_numpy(angle)), IGNORE)
    assert np.array_equal(direction.numpy(), arrays["gt_direction"])
    assert np.array_equal(np.array(DIRECTION_VECTORS), arrays["direction_vectors"])


def test_window_starts_match_the_official_tester(golden):
    _, meta = golden
    assert meta["window_starts"] == [window_starts(n, c, int(c / 3)) for n, c in WINDOW_CASES]
    assert window_starts(1024, 512, 170) == [0, 170, 340, 510, 512]  # spec §5.2
    assert window_starts(300, 512, 170) == [0]  # a side within one window: one pass


def test_hrnet48_and_heads_match_the_official_network(golden):
    arrays, _ = golden
    model, x = net_inputs()
    with torch.no_grad():
        mask, direction = model.refiner(x)
    for ours, official in ((mask[0], arrays["net_mask"]), (direction[0], arrays["net_dir"])):
        assert ours.shape == official.shape == (ours.shape[0], 16, 16)  # output stride 4
        assert np.abs(ours.numpy() - official).max() <= 1e-5 * np.abs(official).max()


def hand_made_labels() -> np.ndarray:
    """30 x 40: class 0 left of x = 20, class 1 right, a 5x5 class-2 square (25 px, under the 100 px rule) inside
    class 0, an ignored band at the bottom."""
    labels = np.zeros((30, 40), dtype=np.int64)
    labels[:, 20:] = 1
    labels[18:23, 3:8] = 2
    labels[27:, :] = 255
    return labels


def test_ground_truth_is_float32_inside_a_bf16_training_step():
    labels = hand_made_labels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        depth, angle = distance_and_angle(labels, 3)
    assert all(np.array_equal(a, b) for a, b in zip((depth, angle), distance_and_angle(labels, 3), strict=True))


def test_ground_truth_on_a_hand_made_map():
    labels = hand_made_labels()
    depth, angle = distance_and_angle(labels, 3)
    valid = torch.from_numpy(labels != 255)
    boundary = boundary_target(torch.from_numpy(depth).long(), valid, 5)[15]
    direction = direction_class(torch.from_numpy(angle))
    # a 5 px band either side of the class edge (depth = distance to the other class: 20 - x, x - 19)
    assert boundary[15:25].tolist() == [1] * 10 and boundary[14] == 0 and boundary[25] == 0
    assert depth[15, 14] == 6 and depth[15, 19] == 1 and depth[15, 20] == 1
    # directions point into the own segment: class 0 left (0, -1) = class 0, class 1 right (0, 1) = class 4
    assert direction[15, 16:20].tolist() == [0] * 4 and direction[15, 20:24].tolist() == [4] * 4
    # the image border is no edge: the top row, far from the class edge, is interior
    assert depth[0, 12] == 8 and boundary_target(torch.from_numpy(depth).long(), valid, 5)[0, 12] == 0
    # a class under 100 px has no distance (all boundary) and a zero gradient (angle 0: direction class 4)
    assert (depth[18:23, 3:8] == 0).all() and (direction[18:23, 3:8] == 4).all()
    assert (boundary_target(torch.from_numpy(depth).long(), valid, 5)[27:] == IGNORE).all()


def test_boundary_pixels_take_the_interior_label_and_the_interior_is_kept():
    """An oracle SegFix (the ground truth's boundary and directions) over a base whose class edge sits 1 px too far
    left: the boundary pixels the base got wrong read the label 2 px into their own segment; interior pixels and
    correct boundary pixels keep the base's label."""
    model = small(3).eval()
    truth = torch.from_numpy(hand_made_labels()).clamp(max=1)  # no ignore, no small class
    truth[18:23, 3:8] = 0
    wrong = truth.clone()
    wrong[:, 19] = 1  # the base's edge at x = 19
    depth, angle = distance_and_angle(truth.numpy(), 3)
    oracle_prob = torch.from_numpy(depth <= 5).float()[None]
    oracle_logits = F.one_hot(direction_class(torch.from_numpy(angle)), 8).permute(2, 0, 1)[None].float()
    model.boundary_and_directions = lambda images: (oracle_prob, oracle_logits)
    model.base.predict = lambda images: F.one_hot(wrong, 3).permute(2, 0, 1)[None].float()
    refined = model.predict(torch.zeros(1, 3, 30, 40, dtype=torch.uint8)).argmax(1)[0]
    assert torch.equal(refined[:, 19], truth[:, 19])  # relabelled from x = 17
    assert torch.equal(refined, truth)
    interior = torch.from_numpy(depth > 5)
    assert torch.equal(refined[interior], wrong[interior])


def _force_boundary(model, boundary: bool) -> None:
    """Make the mask head predict boundary everywhere (or nowhere): its features are leaky-ReLU'd, mostly positive."""
    with torch.no_grad():
        weight = model.refiner.mask_head[2].weight
        weight.zero_()
        weight[1 if boundary else 0] = 1.0


@pytest.mark.parametrize("base", ["global", "local"])
def test_refines_two_different_bases_end_to_end(base):
    model = small(3, base=base, base_model={})
    images = torch.randint(0, 256, (2, 3, 96, 80), dtype=torch.uint8)  # 96 > crop 64: three windows per column
    labels = torch.zeros(2, 96, 80, dtype=torch.long)
    labels[:, :, 40:] = 1
    labels[:, 60:, :] = 2
    labels[:, :4] = 255
    model.eval()
    _force_boundary(model, True)
    refined, plain = model.predict(images), model.base.predict(images)
    assert refined.shape == plain.shape == (2, 3, 96, 80)
    assert not torch.equal(refined, plain)  # boundary pixels moved
    assert set(refined.unique().tolist()) <= set(plain.unique().tolist())  # a gather: no new values
    model.train()
    model.set_phase("refiner")
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_mask", "loss_direction"} and all(torch.isfinite(t) and t > 0 for t in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in model.base.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.refiner.parameters())
    assert not model.base.training  # frozen in eval mode while SegFix trains


def test_directions_are_supervised_on_predicted_boundary_only():
    model = small(3).train()
    model.set_phase("refiner")
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    _force_boundary(model, False)
    terms = model.forward_train(images, labels)
    assert terms["loss_direction"] == 0 and terms["loss_mask"] > 0
    terms["loss_direction"].backward()
    assert model.refiner.dir_head[2].weight.grad.abs().sum() == 0


def test_balanced_cross_entropy_weights_by_the_batch_frequency():
    logits = torch.randn(1, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[[0, 0, 0], [1, IGNORE, IGNORE]]])
    expected = F.cross_entropy(logits, target, weight=torch.tensor([0.25, 0.75]), ignore_index=IGNORE)
    assert torch.allclose(balanced_cross_entropy(logits, target, 2), expected)
    one_class = torch.zeros(1, 2, 3, dtype=torch.long)  # the release's weight 0 -> NaN; ours plain CE
    assert torch.allclose(balanced_cross_entropy(logits, one_class, 2), F.cross_entropy(logits, one_class))


def test_knob_sweeps_may_pass_whole_floats():
    assert small(3, shift=3.0).shift == 3 and isinstance(small(3, shift=3.0).shift, int)


def test_bgr_input_feeds_blue_first_with_the_same_statistics():
    images = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    model = small(3, bgr_input=True)
    assert torch.equal(model.network_input(images), model.normalize(images.flip(1)))


def test_official_layout_round_trips_with_both_head_namings(tmp_path):
    source = small(3)
    seed_weights(source.refiner, 3)  # BN statistics away from (0, 1): a dropped or swapped mapping shows
    path = tmp_path / "segfix.pth"
    source.save_official(str(path))
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"config_dict", "state_dict"}
    keys = saved["state_dict"]
    assert "module.mask_head.1.weight" in keys and "module.backbone.stage4.0.fuse_layers.0.1.0.weight" in keys
    assert not any(k.endswith("num_batches_tracked") for k in keys)
    torchbn = {k.replace("mask_head.1.", "mask_head.1.0.").replace("dir_head.1.", "dir_head.1.0."): v
               for k, v in keys.items()}
    torch.save({"state_dict": torchbn}, tmp_path / "torchbn.pth")
    for file in (path, tmp_path / "torchbn.pth"):
        target = small(3)
        report = target.load_official(str(file))
        assert report.clean
        assert all(torch.equal(v, target.refiner.state_dict()[k]) for k, v in source.refiner.state_dict().items())


def test_imagenet_hrnet_weights_load_by_name(tmp_path):
    source = small(3)
    seed_weights(source.refiner.backbone, 5)
    torch.save(source.refiner.backbone.state_dict(), tmp_path / "hrnet.pth")
    target = small(3, pretrained=str(tmp_path / "hrnet.pth"))
    assert all(torch.equal(v, target.refiner.backbone.state_dict()[k])
               for k, v in source.refiner.backbone.state_dict().items())


@pytest.mark.parametrize(("keywords", "message"), [
    ({"pretrained": "/nonexistent/hrnet.pth"}, "pretrained: ImageNet HRNet file"),
    ({"backbone": "hrnet2x20"}, "backbone must be one of"), ({"max_distance": -1}, "max_distance must be"),
    ({"shift": 0}, "shift must be"), ({"shift": 1.5}, "shift must be"), ({"crop": 16}, "crop must be"),
    ({"stride": 0}, "stride must be"), ({"crop": 64, "stride": 65}, "stride must be"), ({"crop": "512"}, "crop must"),
    ({"base": "segfix"}, "another registered method"), ({"base": "glnet"}, "trains in 3 phases")])
def test_bad_settings_are_one_line_errors(keywords, message):
    with pytest.raises(MethodError, match=message) as info:
        build_method("segfix", 3, **{"backbone": "hrnet18_small_v2", **keywords})
    assert "\n" not in str(info.value)
