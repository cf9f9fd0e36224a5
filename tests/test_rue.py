"""RUE against docs/specs/rue.md: Estimator, Selector (top-K, ties, batches, non-divisible sizes), Ensembler,
Complementer, runtime K, parameter counts, the release's state-dict layout and the recipes in params.yaml."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ran_modules

from methods.base import MethodError, build_method
from methods.blocks.mmseg import mmseg_cross_entropy
from methods.rue import (
    RUE,
    complementer_weight,
    cut_patches,
    entropy_map,
    num_selected,
    pixel_uncertainty,
    select_patches,
    shallow_size,
    useg_loss,
)

LOSS_KEYS = {"decode.loss_seg", "refine.loss_seg", "aux.loss_seg"}


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(seed)).float()


def up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def model() -> RUE:
    torch.manual_seed(0)
    net = RUE(num_classes=7, patch_num=4).eval()
    with torch.no_grad():  # non-trivial maps: beta centred with std ~2, O_D far from uniform
        net.decode_head.conv_seg.weight.mul_(300.0)
        conv_out = net.refine_head.score_head.conv_out
        beta = net._estimate(net._deep(net.normalize(images(2, 128, 128))))[0]
        scale = 2.0 / beta.std()
        conv_out.weight.mul_(scale)
        conv_out.bias.copy_(scale * (conv_out.bias - beta.mean()))
    return net


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return images(2, 128, 128)


@pytest.fixture(scope="module")
def full_run(model, batch):
    with torch.no_grad():
        return model.run(model.normalize(batch), 4, 16)


@pytest.fixture(scope="module")
def half_run(model, batch):
    with torch.no_grad():
        return model.run(model.normalize(batch), 4, 6)


def shallow_batch_sizes(net: RUE, fn) -> list[int]:
    sizes = []
    handle = net.refine_head.stdc_net.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    try:
        fn()
    finally:
        handle.remove()
    return sizes


# -- interface ---------------------------------------------------------------------------------------------------


def test_registered_and_config_errors():
    net = build_method("rue", num_classes=2, patch_num=4, k=0.5)
    assert isinstance(net, RUE) and net.k == 0.5
    with pytest.raises(MethodError, match="bad config"):
        build_method("rue", num_classes=2, not_a_kwarg=1)
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(MethodError, match="k"):
            RUE(num_classes=2, k=bad)
    with pytest.raises(MethodError, match="entropy_divisor"):  # Inria's 0.7 on 7 classes: upstream defect #3
        RUE(num_classes=7, entropy_divisor=0.7)
    assert RUE(num_classes=2, entropy_divisor=0.7).entropy_divisor == 0.7
    # plain BN only (no SyncBN hard-coded, defect #9)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())


def test_num_selected():
    assert [num_selected(k, 8) for k in (1.0, 0.75, 0.5, 0.25)] == [64, 48, 32, 16]
    assert [num_selected(k, 20) for k in (1.0, 0.75, 0.5)] == [400, 300, 200]
    assert num_selected(0.3, 10) == 30 and num_selected(1e-6, 4) == 1
    # fractional counts round up (§13.8): 0.6 * 9 = 5.4 -> 6, 0.1 * 64 = 6.4 -> 7, 0.33 * 16 = 5.28 -> 6
    assert [num_selected(0.6, 3), num_selected(0.1, 8), num_selected(0.33, 4)] == [6, 7, 6]


def test_k_is_a_runtime_attribute(model, batch):
    """K changes on a built model without rebuilding; predict sends ceil(k P^2) patches per image."""
    try:
        for k, per_image in ((1.0, 16), (0.5, 8), (0.25, 4)):
            model.k = k
            with torch.no_grad():
                sizes = shallow_batch_sizes(model, lambda: model.predict(batch))
            assert sizes == [2 * per_image]
        with pytest.raises(MethodError):
            model.k = 0
    finally:
        model.k = 1.0


def test_predict_shape_and_class_suppression(batch):
    torch.manual_seed(0)
    net = RUE(num_classes=3, patch_num=4, suppress_class=0).eval()
    with torch.no_grad():
        net.refine_head.conv_seg_aux_16.conv_out.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
        logits = net.predict(batch)
    assert logits.shape == (2, 3, 128, 128)
    assert not (logits.argmax(1) == 0).any()


# -- Estimator ---------------------------------------------------------------------------------------------------


def test_estimator_matches_spec(model, batch, full_run):
    out = full_run
    # eps = entropy(O_D) / ln C
    expected = torch.distributions.Categorical(logits=out["deep_logits"].permute(0, 2, 3, 1)).entropy()
    torch.testing.assert_close(out["eps"][:, 0], expected / math.log(7), atol=1e-5, rtol=1e-5)
    # beta from |F_D2 - conv(Up F_D1)|, 1x1 conv on [mean, max], at F_D2 resolution
    head = model.refine_head.score_head
    d2, d1 = out["stages"][0], out["stages"][1]
    with torch.no_grad():
        r = (d2 - head.conv_bn_relu(up(d1, d2.shape[-2:]))).abs()
        beta = head.conv_out(torch.cat([r.mean(1, keepdim=True), r.max(1, keepdim=True).values], 1))
    assert out["beta"].shape == (2, 1, 8, 8)  # 128 / 4 (LR) / 4 (layer1)
    torch.testing.assert_close(out["beta"], beta)
    # U2 on the P x P grid: bilinear point sampling, plain sum; U1 = mean of the two terms, sigmoid after Up
    u2 = torch.sigmoid(up(out["beta"], (4, 4))) + up(out["eps"], (4, 4))
    torch.testing.assert_close(out["u2"], u2.flatten(1))
    s = out["u1"].shape[-2:]
    torch.testing.assert_close(out["u1"], 0.5 * (torch.sigmoid(up(out["beta"], s)) + up(out["eps"], s)))


def test_u1_in_unit_interval(model, batch, full_run):
    assert full_run["u1"].min() >= 0 and full_run["u1"].max() <= 1
    assert float(full_run["u1"].std()) > 1e-3  # not a constant map
    u1 = model.uncertainty_map(batch)
    assert u1.shape == (2, 1, 128, 128) and u1.min() >= 0 and u1.max() <= 1
    # extreme inputs: saturated beta, maximal entropy (uniform O_D over C classes)
    beta = torch.tensor([-1e4, 0.0, 1e4]).view(1, 1, 1, 3)
    eps = entropy_map(torch.zeros(1, 7, 1, 3), math.log(7))
    torch.testing.assert_close(eps, torch.ones(1, 1, 1, 3))
    u1 = pixel_uncertainty(beta, eps, (4, 12))
    assert u1.min() >= 0.5 and u1.max() <= 1.0 and u1.max() == 1.0


def test_uncertainty_map_matches_the_ensembler_canvas(model, batch, full_run):
    """uncertainty_map = U1 of the test-time canvas, bilinearly resized to the input."""
    assert full_run["u1"].shape[-1] == 4 * shallow_size(32)
    torch.testing.assert_close(model.uncertainty_map(batch), up(full_run["u1"], (128, 128)).clamp(0, 1))


def test_epsilon_is_detached():
    torch.manual_seed(0)
    net = RUE(num_classes=7, patch_num=4, train_patch_num=2).train()
    labels = torch.randint(0, 7, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    out = net.run(net.normalize(images(2, 64, 64)), 2, 4)
    assert not out["eps"].requires_grad and out["beta"].requires_grad
    # O_D reaches the refine loss only through eps: no gradient may reach its classifier from there
    useg_loss(out["logits"], out["u1"], labels, gamma=6.0).backward()
    assert net.decode_head.conv_seg.weight.grad is None
    # while beta learns through the (non-detached) blend
    assert net.refine_head.score_head.conv_out.weight.grad.abs().sum() > 0


# -- Selector and Ensembler --------------------------------------------------------------------------------------


def explicit_logits(net: RUE, x: torch.Tensor, patch_num: int) -> torch.Tensor:
    """O_S with every patch, computed tile by tile with no Selector at all."""
    deep = net._deep(x)
    beta, eps = net._estimate(deep)
    p = x.shape[-1] // patch_num
    head = net.refine_head
    rows = [torch.cat([head.shallow(x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]) for c in range(patch_num)], 3)
            for r in range(patch_num)]
    shallow = torch.cat(rows, 2)
    size = shallow.shape[-2:]
    u1 = 0.5 * (torch.sigmoid(up(beta, size)) + up(entropy_map(deep["deep_logits"], net.entropy_divisor), size))
    deep_canvas = up(head.reduce3(deep["deep_feat"]), size)
    return head.conv_seg_aux_16((1 - u1) * deep_canvas + u1 * shallow)


def test_full_k_selects_every_patch_and_equals_full_grid(model, batch, full_run):
    assert all(sorted(row.tolist()) == list(range(16)) for row in full_run["ids"])
    with torch.no_grad():
        expected = explicit_logits(model, model.normalize(batch), 4)
        torch.testing.assert_close(full_run["logits"], expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model.predict(batch), up(expected, (128, 128)), atol=2e-5, rtol=1e-4)


def test_partial_k_takes_top_k_and_keeps_deep_features_elsewhere(model, batch, half_run):
    out, k, s = half_run, 6, half_run["shallow"].shape[-1]
    x = model.normalize(batch)
    for b in range(2):
        scores = out["u2"][b].tolist()
        ranked = sorted(range(16), key=lambda i: (-scores[i], i))
        assert out["ids"][b].tolist() == ranked[:k]
        for idx in range(16):
            r, c = divmod(idx, 4)
            tile = (b, slice(None), slice(r * s, (r + 1) * s), slice(c * s, (c + 1) * s))
            deep_tile, u1 = out["deep_canvas"][tile], out["u1"][tile]
            if idx in ranked[:k]:
                with torch.no_grad():
                    fs = model.refine_head.shallow(x[b:b + 1, :, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32])[0]
                torch.testing.assert_close(out["fused"][tile], (1 - u1) * deep_tile + u1 * fs, atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(out["fused"][tile], deep_tile)
    assert len(set(out["ids"][0].tolist()) ^ set(out["ids"][1].tolist())) > 0  # the two images differ


def test_ties_are_deterministic():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    for _ in range(3):
        assert select_patches(scores, 4).tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]


def test_batch_keeps_each_images_patches(model):
    """Batched inference (different selections per image) equals per-image inference; patches stay in order."""
    x = images(3, 128, 128, seed=5)
    ids = torch.tensor([[0, 5], [15, 1], [7, 7]])
    patches = cut_patches(x, 4, ids)
    assert patches.shape == (6, 3, 32, 32)
    for b in range(3):
        for j in range(2):
            r, c = divmod(int(ids[b, j]), 4)
            assert torch.equal(patches[2 * b + j], x[b, :, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32])
    try:
        model.k = 0.5
        with torch.no_grad():
            together = model.predict(x)
            alone = torch.cat([model.predict(x[b:b + 1]) for b in range(3)])
        torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-4)
    finally:
        model.k = 1.0


def test_non_divisible_sizes_drop_the_remainder(model):
    """p = H // P (and W // P): the shallow stream sees the top-left P*p region only (upstream unfold); the output
    still covers the whole input (the deep canvas is resized from the whole image, §3.6 edge note)."""
    x = images(1, 131, 134, seed=3)
    with torch.no_grad():
        out = model.run(model.normalize(x), 4, 16)
        assert model.predict(x).shape == (1, 7, 131, 134)
        assert out["shallow"].shape[-2:] == (shallow_size(32), shallow_size(33))
        changed = x.clone()
        changed[:, :, 128:, :] = 0
        changed[:, :, :, 132:] = 255
        again = model.run(model.normalize(changed), 4, 16)
    assert torch.equal(out["shallow"], again["shallow"])
    with pytest.raises(MethodError, match="too small"):
        cut_patches(x[:, :, :3], 4, torch.zeros(1, 1, dtype=torch.long))


# -- Complementer and training -----------------------------------------------------------------------------------


def test_complementer_weight_and_loss():
    u1 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    torch.testing.assert_close(complementer_weight(u1, 6.0), (1 + u1.detach()) ** 6)
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    labels = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(2))
    labels[:, :4] = 255
    loss = useg_loss(logits, u1, labels, gamma=6.0)
    ce = F.cross_entropy(up(logits, (16, 16)), labels, ignore_index=255, reduction="none")
    expected = (ce * up((1 + u1.detach()) ** 6, (16, 16))[:, 0]).sum() / labels.numel()  # all pixels count
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert u1.grad is None  # the weight is detached
    # zero uncertainty and gamma 1 -> plain mmseg CE
    torch.testing.assert_close(useg_loss(logits, torch.zeros_like(u1), labels, 1.0),
                               mmseg_cross_entropy(logits, labels))


def test_forward_train_losses_and_train_grid():
    torch.manual_seed(0)
    net = RUE(num_classes=7, patch_num=8, train_patch_num=2, aux_weight=0.4).train()
    labels = torch.randint(0, 7, (2, 64, 64), generator=torch.Generator().manual_seed(0))
    labels[:, :8] = 255
    terms = {}
    sizes = shallow_batch_sizes(net, lambda: terms.update(net.forward_train(images(2, 64, 64), labels)))
    assert sizes == [2 * 4]  # train P = 2, all patches (train_k = 1), both images in one forward
    assert set(terms) == LOSS_KEYS and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []  # every parameter trains (no find_unused_parameters needed)


# -- parameter counts --------------------------------------------------------------------------------------------


def test_parameter_counts(model, batch):
    """The spec gives no parameter figures; the head counts are derived by hand from §3 and the whole is pinned."""
    ran = ran_modules(model, lambda: model.predict(batch[:1]))
    inference = sum(p.numel() for name, m in model.named_modules() if name in ran for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    dappm = 6 * 2 * 512 + 4 * 2 * 128 + 2 * 640 + 5 * 512 * 128 + 4 * 128 * 128 * 9 + 640 * 128 + 512 * 128
    assert count(model.decode_head.dappm) == dappm == 1_073_408
    assert count(model.refine_head.score_head) == 128 * 64 * 9 + 2 * 64 + 2 + 1
    assert count(model.refine_head.reduce1) + count(model.refine_head.reduce2) + count(model.refine_head.reduce3) \
        == (512 + 256 + 128) * 64 + 3 * 2 * 64
    assert count(model.refine_head.conv_seg_aux_16) == 64 * 32 * 9 + 2 * 32 + 32 * 7 + 7
    assert count(model.auxiliary_head) == 256 * 64 * 9 + 2 * 64 + 64 * 7 + 7
    assert total - inference == count(model.auxiliary_head)  # the FCN aux head is the only training-only part
    assert (total, inference) == (13_846_520, 13_698_481)  # 7 classes: 13.85 M total, 13.70 M inference path


# -- official layout ---------------------------------------------------------------------------------------------


def to_official(state: dict) -> dict:
    """Our keys -> the release's (§11), including the STDC x2/x4/x8/x16 aliases and the unused conv_seg."""
    stem = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.",
            "conv1.6.": "stem.6.", "bn1.": "stem.7."}
    out = {}
    for key, value in state.items():
        new = key
        if key.startswith("backbone."):
            rest = key[len("backbone."):]
            for ours, theirs in stem.items():
                if rest.startswith(ours):
                    new = "backbone." + theirs + rest[len(ours):]
        elif key.startswith("auxiliary_head.classifier."):
            new = key.replace("classifier.", "conv_seg.")
        elif key.startswith("refine_head.stdc_net.features."):
            block = int(key.split(".")[3])
            alias = {0: "x2", 1: "x4", 2: "x8", 3: "x8", 4: "x16", 5: "x16"}[block]
            out[key.replace("features.", f"{alias}.0.")] = value
        out[new] = value
    out["refine_head.conv_seg.weight"] = torch.zeros(7, 128, 1, 1)
    return out


def test_load_official(tmp_path):
    torch.manual_seed(1)
    source = RUE(num_classes=7)
    path = tmp_path / "rue_official.pth"
    torch.save({"state_dict": to_official(source.state_dict()), "meta": {}}, path)
    torch.manual_seed(2)
    target = RUE(num_classes=7)
    report = target.load_official(str(path))
    assert report.clean and report.skipped == ["refine_head.conv_seg.weight"]
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    broken = to_official(source.state_dict())
    broken["refine_head.extra.weight"] = torch.zeros(1)
    del broken["decode_head.dappm.scale0.2.weight"]
    torch.save(broken, path)
    with pytest.raises(MethodError, match=r"refine_head\.extra\.weight") as info:
        target.load_official(str(path))
    assert "decode_head.dappm.scale0.2.weight" in str(info.value)


# -- params.yaml -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "dataset", "classes", "expected"), [
    ("smoke", "synthetic", 7, (8, 4, math.log(7), 1.0, None)),
    ("paper", "deepglobe", 7, (8, 8, 1.946, 1.0, 0)),
    ("paper", "inria", 2, (20, 10, 0.7, 6.0, None)),
])
def test_recipes(profile, dataset, classes, expected):
    from pipelines.config import load_config

    config = load_config(overrides=[f"profile={profile}"])
    config.recipe("rue", dataset)  # validates the recipe keys
    model_cfg = {**config.method_model("rue", dataset), "pretrained": False}
    net = build_method("rue", classes, **model_cfg)
    patch_num, train_patch_num, divisor, gamma, suppress = expected
    assert (net.patch_num, net.train_patch_num, net.gamma, net.suppress_class) == (patch_num, train_patch_num,
                                                                                  gamma, suppress)
    assert net.entropy_divisor == pytest.approx(divisor)
    assert net.k == 1.0 and net.train_k == 1.0
    assert build_method("rue", classes, **{**model_cfg, "k": 0.5}).k == 0.5  # evaluate's `--set rue.k=0.5`


def test_loss_weights_are_the_specs():
    """§4: deep CE x 1, USEG x 1 with gamma from the config, FCN auxiliary CE x 0.4; recomputed by hand from the same
    forward pass (eval mode: deterministic), the USEG weight (1 + U1)^gamma written out."""
    torch.manual_seed(0)
    net = build_method("rue", 7, patch_num=4, gamma=2.0).eval()
    x_img = images(2, 128, 128)
    labels = torch.randint(0, 7, (2, 128, 128), generator=torch.Generator().manual_seed(1))
    labels[:, :8] = 255
    with torch.no_grad():
        terms = net.forward_train(x_img, labels)
        out = net.run(net.normalize(x_img), 4, 16)
        logits = F.interpolate(out["logits"], size=(128, 128), mode="bilinear", align_corners=False)
        u1 = F.interpolate(out["u1"], size=(128, 128), mode="bilinear", align_corners=False)[:, 0]
        ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
        useg = ((1 + u1) ** 2.0 * ce).mean()  # mean over all pixels, ignored ones count 0
        expected = {"decode.loss_seg": mmseg_cross_entropy(out["deep_logits"], labels, 255),
                    "refine.loss_seg": useg,
                    "aux.loss_seg": 0.4 * mmseg_cross_entropy(net.auxiliary_head(out["stages"][2]), labels, 255)}
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-5), key
