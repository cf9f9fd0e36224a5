"""Golden outputs of the official code: ISDNet (`cedricgsh/ISDNet` @ 7341335), its STDC shallow net, and RUE's
DeepGlobe model (`Qinrong-NKU/RUE` @ ccbfce2 with the ad3097f DeepGlobe head) at K = 100% and 50%.

Each fixture in tests/golden/ holds what the official code computed on a seeded input with seeded weights written
in its layout by our `save_official` (`tests/golden/make_isdnet.py`, `make_rue.py`; README there). Here our model is
rebuilt with the same seed and run through `predict` on the same uint8 image, end to end.

Tolerance. Both sides run float32 on CPU with the same weights: measured at generation, our logits differ from the
official ones by at most 2.5e-7 (ISDNet, max |logit| 0.32) and 2.3e-6 (RUE, max |logit| 2.2 over classes 1-6),
mostly from the normalisation's rounding (the networks alone agree to 0 and 9e-7). The bound is 1e-4 of the largest
official |logit| (over the classes that are not suppressed): 15-40x the float noise, and far below what any change
in the computation moves (the mutations tried when writing these tests moved logits by 1e-3 to 1 of that scale).
RUE subtracts 1000 from class 0 at test: there float32 holds 6e-5 steps, so a relative 1e-6 is added (a few ulps).
Argmax: identical on every pixel whose top-2 margin in our logits exceeds twice the bound (where logits within the
bound cannot order differently); the few pixels nearer a tie (42 of 262144 for ISDNet) are exempt.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods import build_method
from methods.rue import num_selected
from pipelines.config import load_config
from tests.golden.seeded import load_arrays, load_fixture, seed_weights, seeded_image

REL_ATOL = 1e-4  # of the largest |official logit| over the unsuppressed classes
RTOL = 1e-6  # float32 rounding of values near 1000 (RUE's suppressed class)
MAX_EXEMPT = 1e-3  # share of pixels allowed to be within the bound of a tie


def assert_logits_match(name: str, ours: torch.Tensor, suppressed: int | None = None) -> None:
    official, official_argmax, stride, _ = load_fixture(name)
    ours = ours.detach().float().numpy()
    assert ours.shape[:2] == official.shape[:2] and ours.shape[-2:] == official_argmax.shape[-2:], (
        f"{name}: our logits {ours.shape}, fixture {official.shape} every {stride} px of {official_argmax.shape}")
    kept = [c for c in range(official.shape[1]) if c != suppressed]
    atol = REL_ATOL * float(np.abs(official[:, kept]).max())
    sampled = ours[..., ::stride, ::stride]
    diff = np.abs(sampled - official)
    bad = diff > atol + RTOL * np.abs(official)
    if bad.any():
        _, c, y, x = np.unravel_index(np.argmax(diff - atol - RTOL * np.abs(official)), diff.shape)
        per_class = ", ".join(f"{k}: {diff[:, k].max():.3g}" for k in range(diff.shape[1]))
        pytest.fail(f"{name}: {int(bad.sum())} of {bad.size} logits differ from the official code's by more than "
                    f"{atol:.3g} (max |diff| per class: {per_class}); worst at class {c}, pixel ({y * stride}, "
                    f"{x * stride}): ours {sampled[0, c, y, x]:.6g}, official {official[0, c, y, x]:.6g}")
    top2 = np.sort(ours, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * atol
    assert decided.mean() >= 1 - MAX_EXEMPT, f"{name}: {int((~decided).sum())} pixels within {2 * atol:.3g} of a tie"
    wrong = (ours.argmax(1) != official_argmax) & decided
    assert not wrong.any(), (f"{name}: argmax differs from the official code's on {int(wrong.sum())} of "
                             f"{int(decided.sum())} pixels (first at {tuple(np.argwhere(wrong)[0][1:])})")


def normalisation_drift(model, meta: dict, where: str) -> list[str]:
    """Differences between the model's input normalisation and the upstream config's img_norm_cfg (RGB, to_rgb)."""
    norm = meta["img_norm_cfg"]
    assert norm["to_rgb"], "fixture normalised without to_rgb: its mean/std would be in BGR order"
    problems = []
    for key, upstream in (("pixel_mean", norm["mean"]), ("pixel_std", norm["std"])):
        ours = getattr(model, key).flatten().tolist()
        if not np.allclose(ours, upstream, rtol=0, atol=1e-4):
            problems.append(f"{where}.{key} gives {[round(v, 4) for v in ours]}, the official config's img_norm_cfg "
                            f"{key.split('_')[1]} is {upstream}")
    return problems


# ------------------------------------------------------------------------------------------------------------
# ISDNet and its shallow net


def isdnet_from(meta: dict):
    return seed_weights(build_method("isdnet", meta["num_classes"], **meta["model"]), meta["weight_seed"]).eval()


@torch.no_grad()
def test_isdnet_matches_official_logits():
    meta = load_fixture("isdnet")[3]
    model = isdnet_from(meta)
    # the project's ISDNet DeepGlobe keywords must not set another normalisation than the one the fixture used
    configured = build_method("isdnet", meta["num_classes"], **normalisation_keywords("isdnet", "deepglobe"))
    drift = normalisation_drift(model, meta, "isdnet code default")
    drift += normalisation_drift(configured, meta, "params.yaml methods.isdnet (deepglobe)")
    assert not drift, "ISDNet normalisation differs from the official DeepGlobe config: " + "; ".join(drift)
    assert_logits_match("isdnet", model.predict(seeded_image(meta["image_seed"], *meta["size"])))


@torch.no_grad()
def test_stdc_shallow_net_matches_official_features():
    arrays, meta = load_arrays("stdc")
    net = isdnet_from(meta).refine_head.stdc_net
    size = meta["stdc_size"]
    x = torch.cat([(seeded_image(seed, size, size) - 127.5) / 64.0 for seed in meta["stdc_seeds"]], dim=1)
    for name, ours in zip(("feat8", "feat16"), net(x), strict=True):
        official = arrays[name]
        assert tuple(ours.shape) == official.shape, f"stdc {name}: ours {tuple(ours.shape)}, official {official.shape}"
        atol = REL_ATOL * float(np.abs(official).max())
        diff = np.abs(ours.numpy() - official)
        assert diff.max() <= atol, (f"stdc {name}: max |ours - official| = {diff.max():.3g} > {atol:.3g}; worst "
                                    f"channel {np.unravel_index(diff.argmax(), diff.shape)[1]}")


def normalisation_keywords(method: str, dataset: str) -> dict:
    keywords = load_config().method_model(method, dataset)
    return {key: keywords[key] for key in ("pixel_mean", "pixel_std") if key in keywords}


# ------------------------------------------------------------------------------------------------------------
# RUE, DeepGlobe


@pytest.mark.parametrize("k", [1.0, 0.5], ids=["k1", "k0.5"])
@torch.no_grad()
def test_rue_deepglobe_matches_official_logits(k):
    name = f"rue_deepglobe_k{k:g}"
    meta = load_fixture(name)[3]
    assert meta["k"] == k
    # the project's DeepGlobe configuration (not the fixture's record of it), with the knob; the weights are seeded,
    # so no pretrained file is read
    keywords = load_config().method_model("rue", "deepglobe")
    keywords = {key: value for key, value in keywords.items() if key not in ("pretrained", "stdc_pretrained")}
    model = seed_weights(build_method("rue", meta["num_classes"], **keywords, k=k), meta["weight_seed"]).eval()

    head, where = meta["head"], "params.yaml methods.rue (deepglobe)"
    drift = normalisation_drift(model, meta, where)
    for ours, upstream, what in (
            (model.patch_num, head["patch_num"], "patch_num (test P)"),
            (num_selected(k, model.patch_num), head["select_num"], f"patches selected at k={k:g} (select_num)"),
            (model.entropy_divisor, head["entropy_divisor"], "entropy_divisor"),
            (model.suppress_class, head["suppress_class"], "suppress_class"),
            (model.down_ratio, 4, "down_ratio")):
        if not (ours == upstream or (isinstance(ours, float) and math.isclose(ours, upstream, abs_tol=1e-9))):
            drift.append(f"{where}: {what} is {ours}, the official DeepGlobe head has {upstream}")
    assert not drift, "RUE DeepGlobe settings differ from the official code's: " + "; ".join(drift)

    image = seeded_image(meta["image_seed"], *meta["size"])
    ids = model.run(model.normalize(image), model.patch_num, head["select_num"])["ids"]
    assert sorted(ids[0].tolist()) == meta["selected_patches"], (
        f"{name}: selected patches {sorted(ids[0].tolist())}, official {meta['selected_patches']} "
        f"(U2 margin at the cut: {meta['parity']['u2_margin']})")
    assert_logits_match(name, model.predict(image), suppressed=head["suppress_class"])
