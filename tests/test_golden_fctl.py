"""Golden outputs of the official FCtL code (`liqiokkk/FCtL` @ 6fdb0c0): the B10 and B15 networks (one context), the
final network (both contexts, frozen B10/B15 trunks) and the test-time augmentation, against upstream's own
`Evaluator.eval_test` on the same seeded weights (tests/golden/make_fctl.py wrote the fixtures; it also checked the
final network with TTA, and upstream's parameter counts).

Each fixture holds what upstream computed from a seeded uint8 image (its PIL context crops and resize, ToTensor, patch
grid, stitching and TTA all its own): the logits summed over overlapping patches and views. Ours average, so they are
multiplied by the patch count and the number of views before comparing.

Tolerance. Both sides run float32 on CPU; at generation ours differed by at most 9.3e-8 (relative 1.6e-7 of the
largest |official logit|). The bound, 5e-6 relative, is 30x that noise. Dropping the correlation block moves the final
network's logits by 3.5e-2 relative; the contexts' content matters less (test_a_wrong_context_crop_is_caught).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from methods import build_method
from methods.blocks.patches import PatchGrid
from methods.fctl import FCtL
from tests.golden.seeded import load_fixture, seed_weights, seeded_image

FIXTURES = ("fctl_fcn_tta", "fctl_medium", "fctl_large", "fctl_all")
REL_ATOL = 5e-6


@pytest.fixture(scope="module")
def seeded() -> FCtL:
    _, _, _, meta = load_fixture(FIXTURES[0])
    return seed_weights(build_method("fctl", meta["num_classes"], **meta["model"]), meta["weight_seed"]).eval()


@torch.no_grad()
def official_terms(model: FCtL, meta: dict) -> torch.Tensor:
    model.tta = meta["tta"]
    model.started.fill_(True)  # seeded networks stand for trained ones: entering a phase must not copy weights
    model.set_phase(meta["phase"])
    model.eval()
    image = seeded_image(meta["image_seed"], *meta["image_size"])
    grid = PatchGrid.build(*meta["image_size"], model.patch_size, model.min_overlap)
    count = torch.zeros(1, 1, *meta["image_size"], dtype=torch.float64)
    for top, left in grid.coords:
        count[..., top:top + grid.patch, left:left + grid.patch] += 1
    return model.predict(image).double() * count * len(model.views())


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_the_official_code(seeded, name):
    official, official_argmax, stride, meta = load_fixture(name)
    ours = official_terms(seeded, meta).float().numpy()
    atol = REL_ATOL * float(np.abs(official).max())
    assert np.abs(ours[..., ::stride, ::stride] - official).max() <= atol, name
    assert (ours.argmax(1) == official_argmax).all(), name


@pytest.mark.parametrize("mistake", ["swapped factors", "window at the patch corner"])
def test_a_wrong_context_crop_is_caught(seeded, monkeypatch, mistake):
    """The bound sees context crops of the wrong size or position (few pool5 cells of a padded patch hold content,
    so the contexts move these seeded logits by only ~1e-4 and ~3e-5 of their largest value)."""
    import methods.fctl as fctl

    official, _, stride, meta = load_fixture("fctl_all")
    original = fctl.context_crops

    def wrong(image, grid, idx, factor):
        if mistake == "swapped factors":
            return original(image, grid, idx, 5.0 - factor)
        pad = int(grid.patch * (factor - 1) / 2)
        return original(torch.roll(image, (pad, pad), dims=(-2, -1)), grid, idx, factor)

    monkeypatch.setattr(fctl, "context_crops", wrong)
    ours = official_terms(seeded, meta).float().numpy()
    assert np.abs(ours[..., ::stride, ::stride] - official).max() > REL_ATOL * np.abs(official).max()
