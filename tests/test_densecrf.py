"""DenseCRF (methods/densecrf.py, docs/specs/densecrf.md): one mean-field step against the hand-worked example of §4
(exact dense kernels, both normalisations), the permutohedral lattice against the exact kernels, Q against the
compiled pydensecrf (tests/golden/densecrf.npz, written by tests/golden/make_densecrf.py: ours within 1.3e-6 of it),
mean-field invariants and behaviour, two base methods end to end, and bad settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from methods import MethodError, build_method
from methods.densecrf import FullyConnectedCRF, PermutohedralLattice, mean_field, pixel_features, unary_from_logits
from tests.golden.make_densecrf import CASES, ITERATIONS, STRIDE, inputs
from tests.golden.seeded import GOLDEN_DIR, seeded_image


def dense_kernel(features: torch.Tensor):
    """The exact Gaussian kernel K[i, j] = exp(-½|f_i - f_j|²), self term included, as a filter (O(N²): tests only)."""
    features = features.double()
    kernel = torch.exp(-0.5 * torch.cdist(features, features) ** 2)
    return lambda values: kernel @ values.to(kernel.dtype)


def hand_example_kernels() -> list:
    """§4: pixels (i, 0), grey levels 10, 20, 200; (w1, θα, θβ) = (4, 2, 50), (w2, θγ) = (3, 1)."""
    x = torch.arange(3, dtype=torch.float64)[:, None]
    grey = torch.tensor([10.0, 20.0, 200.0], dtype=torch.float64)[:, None].expand(3, 3)
    appearance = torch.cat([x / 2, torch.zeros_like(x), grey / 50], 1)
    smoothness = torch.cat([x, torch.zeros_like(x)], 1)
    return [(4.0, dense_kernel(appearance)), (3.0, dense_kernel(smoothness))]


HAND_UNARY = -torch.log(torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]], dtype=torch.float64))


@pytest.mark.parametrize(("normalization", "one_step", "ten_steps"),
                         [("per_pixel", (0.990154, 0.623254, 0.007829), (0.999832, 0.992622, 0.002982)),
                          ("symmetric", (0.990381, 0.628152, 0.008014), (0.999811, 0.992621, 0.002646))])
def test_one_mean_field_step_matches_the_hand_worked_example(normalization, one_step, ten_steps):
    kernels = hand_example_kernels()
    q1 = torch.softmax(mean_field(HAND_UNARY, kernels, 1, normalization), 1)
    assert torch.allclose(q1[:, 0], torch.tensor(one_step, dtype=torch.float64), atol=1e-6, rtol=0)
    q10 = torch.softmax(mean_field(HAND_UNARY, kernels, 10, normalization), 1)
    assert torch.allclose(q10[:, 0], torch.tensor(ten_steps, dtype=torch.float64), atol=1e-6, rtol=0)
    assert q10.argmax(1).tolist() == [0, 0, 1]  # pixel 1 joins pixel 0, whose colour it shares


@pytest.mark.parametrize(("theta_xy", "theta_rgb", "max_error"), [(3.0, None, 0.03), (1.0, None, 0.06),
                                                                  (8.0, 10.0, 0.35)])
def test_lattice_approximates_the_exact_kernel(theta_xy, theta_rgb, max_error):
    """Per-pixel normalised filtering of class probabilities on a 32 x 32 image. Measured: max |lattice - exact|
    0.014 / 0.044 / 0.28 (mean 0.003 / 0.007 / 0.024) against a filtering effect |K̄Q - Q| of 0.28 / 0.24 / 0.22 on
    average: the lattice is an approximation (spec §3), tight for the 2-D smoothness kernel, coarse in 5-D."""
    features = pixel_features(seeded_image(5, 32, 32)[0], theta_xy, theta_rgb)
    probabilities = torch.softmax(2 * torch.randn(len(features), 3, generator=torch.Generator().manual_seed(1)), 1)
    exact_filter, lattice = dense_kernel(features), PermutohedralLattice(features)
    ones = torch.ones(len(features), 1)
    exact = exact_filter(probabilities) / exact_filter(ones)
    approximate = (lattice.filter(probabilities) / lattice.filter(ones)).double()
    error = (approximate - exact).abs()
    assert error.max() < max_error
    assert error.mean() < 0.15 * (exact - probabilities.double()).abs().mean()


def test_matches_the_compiled_pydensecrf(device: str = "cpu"):
    with np.load(GOLDEN_DIR / "densecrf.npz") as data:
        meta = json.loads(str(data["meta"]))
        assert meta["cases"] == json.loads(json.dumps(CASES)) and meta["stride"] == STRIDE
        for i, case in enumerate(CASES):
            image, logits = inputs(case)
            for n in ITERATIONS:
                crf = FullyConnectedCRF(*case["params"], iterations=n, normalization=case["normalization"],
                                        probability_clip=1e-5)
                ours = crf.refine_one(image.to(device), logits.to(device)).exp()[:, ::STRIDE, ::STRIDE].cpu().numpy()
                assert np.abs(ours - data[f"case{i}_iter{n}"]).max() < 5e-6, (i, n)


@pytest.mark.gpu
def test_the_cuda_lattice_matches_the_compiled_pydensecrf():
    """The same golden on the GPU: the lattice's splat / blur / slice kernels in CUDA, not only on the CPU."""
    test_matches_the_compiled_pydensecrf("cuda")


def test_lattice_copies_the_sse_padding_of_the_reference():
    """47 x 61 pixels (N % 4 = 3): the SSE init pads with zero features and inserts their simplex into the lattice
    (permutohedral.cpp:L191-196); golden case 3 needs it. A zero-feature pixel added by hand yields the same lattice."""
    features = pixel_features(seeded_image(3, 47, 61)[0], 50.0, 3.0)
    with_zero_pixel = torch.cat([features, features.new_zeros(1, 5)])  # 2868 pixels: no padding of its own
    assert PermutohedralLattice(features).num_vertices == PermutohedralLattice(with_zero_pixel).num_vertices
    whole = features[:-3]  # 2864 pixels: a multiple of 4, no padding; the zero simplex is not among its vertices
    with_zero_block = torch.cat([whole, 0 * whole[:4]])
    assert PermutohedralLattice(whole).num_vertices < PermutohedralLattice(with_zero_block).num_vertices


def crf(**overrides) -> FullyConnectedCRF:
    settings = {"appearance_weight": 4.0, "theta_alpha": 67.0, "theta_beta": 3.0, "smoothness_weight": 3.0,
                "theta_gamma": 1.0, "iterations": 10, "normalization": "symmetric", "probability_clip": 1e-5}
    return FullyConnectedCRF(**{**settings, **overrides})


def test_marginals_sum_to_one_and_zero_iterations_return_the_unary_softmax():
    image, logits = inputs(CASES[2])
    q = crf().refine_one(image, logits).exp()
    assert torch.allclose(q.sum(0), torch.ones(q.shape[1:]), atol=1e-5)
    q0 = crf(iterations=0).refine_one(image, logits).exp()
    clipped = torch.softmax(logits, 0).clamp(1e-5, 1.0)
    assert torch.allclose(q0, clipped / clipped.sum(0), atol=1e-6)  # softmax(-U): the clipped P, renormalised
    unclipped = crf(iterations=0, probability_clip=None).refine_one(image, logits)
    assert torch.allclose(unclipped, torch.log_softmax(logits, 0), atol=1e-5)
    unary = unary_from_logits(logits.reshape(5, -1), None)
    assert torch.allclose(unary, -torch.log_softmax(logits, 0).reshape(5, -1).t())


def test_a_flat_image_with_uniform_unaries_stays_uniform():
    image = torch.full((3, 20, 24), 90.0)
    for normalization in ("symmetric", "per_pixel"):
        q = crf(normalization=normalization).refine_one(image, torch.zeros(4, 20, 24)).exp()
        assert torch.allclose(q, torch.full_like(q, 0.25), atol=1e-6)


def test_removes_an_isolated_wrong_pixel_and_keeps_a_coloured_region():
    image = torch.full((3, 24, 24), 60.0)
    image[:, 4:12, 4:12] = 200.0  # a bright square the base labels class 1
    logits = torch.zeros(2, 24, 24)
    logits[0] = 1.0  # background: class 0 at softmax 0.73
    logits[:, 4:12, 4:12] = torch.tensor([0.0, 1.0])[:, None, None]
    logits[:, 18, 18] = torch.tensor([0.0, 1.0])  # one wrong pixel on the flat background
    assert logits.argmax(0)[18, 18] == 1
    labels = crf().refine_one(image, logits).argmax(0)
    assert labels[18, 18] == 0  # smoothed away: it looks like its neighbours
    assert (labels[4:12, 4:12] == 1).all() and labels.sum() == 64  # the square follows the image edge


@pytest.mark.parametrize("base", ["global", "local"])
def test_refines_two_base_methods_end_to_end(base):
    torch.manual_seed(0)
    model = build_method("densecrf", 3, base=base, iterations=3)
    assert model.parameter_counts()["refiner"] == 0 and [p.name for p in model.phases] == ["base"]
    images = torch.randint(0, 256, (2, 3, 64, 72), dtype=torch.uint8)
    model.eval()
    refined, plain = model.predict(images), model.base.predict(images)
    assert refined.shape == plain.shape == (2, 3, 64, 72) and torch.isfinite(refined).all()
    assert not torch.allclose(refined.softmax(1), plain.softmax(1), atol=1e-3)
    alone = model.refiner.refine_one(images[1].float(), plain[1])  # batch items are refined independently
    assert torch.allclose(refined[1], alone, atol=1e-5)
    model.train()
    model.set_phase("base")
    labels = torch.randint(0, 3, (2, 64, 72))
    labels[:, :4] = 255
    sum(model.forward_train(images, labels).values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.base.parameters())


@pytest.mark.parametrize(("keywords", "message"), [
    ({"theta_alpha": -1.0}, "theta_alpha must be > 0"), ({"theta_beta": 0.0}, "theta_beta must be > 0"),
    ({"theta_gamma": -2.0}, "theta_gamma must be > 0"), ({"appearance_weight": -1.0}, "must be >= 0"),
    ({"iterations": -1}, "iterations must be a whole number >= 0"), ({"iterations": 2.5}, "whole number"),
    ({"normalization": "before"}, "normalization must be one of symmetric, per_pixel"),
    ({"probability_clip": 0.0}, "probability_clip must lie in"),
    ({"base": "densecrf"}, "another registered method"), ({"base": "glnet"}, "trains in 3 phases")])
def test_bad_settings_are_one_line_errors(keywords, message):
    with pytest.raises(MethodError, match=message) as info:
        build_method("densecrf", 3, **keywords)
    assert "\n" not in str(info.value)


def test_knob_values_arrive_as_floats():
    assert build_method("densecrf", 3, iterations=5.0).refiner.iterations == 5
