"""PPN-style (reconstructed): the proposal picks exactly the configured number of patches and only those reach the
R-branch, the prediction is the global branch's outside them, the classifier's targets are the global branch's
errors, training reaches every part, staged phases, bad settings, determinism and DeepGlobe-size shapes
(spec ppn.md §3)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods import build_method, display_name, method_class
from methods.base import MethodError
from methods.blocks.fpn import HeadOutput
from methods.blocks.patches import LogitStitcher, cut_patches
from methods.ppn import PPN, patch_count, top_patches

TINY = dict(backbone="resnet18", global_size=64, patch_size=64, min_overlap=16, patch_batch=4, head_width=16,
            fusion_channels=16, proposal_channels=8, focal_gamma=0.0)


def tiny(seed: int = 0, **kwargs) -> PPN:
    torch.manual_seed(seed)
    return PPN(num_classes=5, **{**TINY, **kwargs})


def batch(b: int = 1, h: int = 160, w: int = 160):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (b, 3, h, w), generator=g).float(), torch.randint(0, 5, (b, h, w), generator=g))


def local_inputs(model: PPN, fn) -> list[torch.Tensor]:
    """The patch batches the R-branch trunk receives while fn() runs."""
    seen = []
    handle = model.resnet_local.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        fn()
    finally:
        handle.remove()
    return seen


def test_registered_and_labelled_as_a_reconstruction():
    assert method_class("ppn") is PPN
    assert "reconstructed" in PPN.label and "reconstructed" in PPN.description
    assert display_name("ppn") == "ppn [PPN-style (reconstructed)]"
    assert PPN.published == {"PPN": {}} and [k.name for k in PPN.knobs] == ["refine_ratio"]
    with pytest.raises(MethodError, match="no official PPN code or checkpoint"):
        tiny().load_official("anything.pth")


@pytest.mark.parametrize(("ratio", "n", "k"), [(0.25, 36, 9), (0.01, 36, 1), (1.0, 36, 36), (0.5, 9, 4),
                                               (0.99, 9, 9), (1 / 9, 9, 1)])
def test_patch_count(ratio, n, k):
    assert patch_count(ratio, n) == k


def test_top_patches_breaks_ties_by_index_and_returns_ascending():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.5, -1.0])
    assert top_patches(scores, 1) == [1]
    assert top_patches(scores, 2) == [1, 3]
    assert top_patches(scores, 3) == [1, 2, 3]  # 0.5 twice: index 2 before 4
    assert top_patches(scores, 6) == list(range(6))


@pytest.mark.parametrize("k", [1, 3, 9])
def test_prediction_refines_exactly_the_proposed_patches_and_is_global_elsewhere(k):
    model = tiny(refine_ratio=k / 9).eval()
    images, _ = batch()
    grid = model.grid(images)
    assert len(grid) == 9  # 3 x 3 patches of 64 px, stride 48
    with torch.no_grad():
        g = model.run_global(images)
        scores = model.proposal_logits(g, 0, grid)
    assert len(set(scores.tolist())) == 9  # distinct scores: the choice below is PPN's, not a tie-break
    expected = sorted(torch.argsort(scores, descending=True)[:k].tolist())
    assert model.select(g, 0, grid) == expected

    seen = local_inputs(model, lambda: model.predict(images))
    assert sum(x.shape[0] for x in seen) == k  # the R-branch ran on k patches, in chunks of patch_batch
    assert all(x.shape[0] <= model.patch_batch for x in seen)
    torch.testing.assert_close(torch.cat(seen), model.normalize(cut_patches(images, grid, expected)))

    logits = model.predict(images)
    assert logits.shape == (1, 5, 160, 160)
    base = F.interpolate(g.logits, size=(160, 160), mode="bilinear", align_corners=False)
    covered = torch.zeros(160, 160, dtype=torch.bool)
    for top, left in (grid.coords[j] for j in expected):
        covered[top:top + 64, left:left + 64] = True
    assert torch.equal(logits[..., ~covered], base[..., ~covered])  # untouched outside the proposals
    with torch.no_grad():
        fused = model.refine(images, 0, grid, g, expected, 9)["fused"]
    stitch = LogitStitcher(grid, 5)
    stitch.add(fused, expected)
    count = torch.zeros(1, 1, 160, 160)
    for top, left in (grid.coords[j] for j in expected):
        count[..., top:top + 64, left:left + 64] += 1
    torch.testing.assert_close(logits[..., covered], (stitch.total / count.clamp_min(1))[..., covered])
    assert not torch.allclose(logits[..., covered], base[..., covered])


def test_chunking_and_batching_do_not_change_the_prediction():
    images, _ = batch(b=2)
    one = tiny(patch_batch=1, refine_ratio=0.5).eval()
    many = tiny(patch_batch=9, refine_ratio=0.5).eval()
    both = one.predict(images)
    torch.testing.assert_close(both, many.predict(images))
    torch.testing.assert_close(both[1:], one.predict(images[1:]))


def test_fusion_starts_as_the_late_average_of_the_two_branches():
    model = tiny().eval()
    images, _ = batch()
    grid = model.grid(images)
    chosen = [0, 4, 8]
    with torch.no_grad():
        g = model.run_global(images)
        out = model.refine(images, 0, grid, g, chosen, 2)
        crops = torch.cat([g.logits[..., y:y + h, x:x + w] for y, x, h, w in (model.boxes(grid, g.logits)[j]
                                                                                for j in chosen)])
        crops = F.interpolate(crops, size=out["local"].shape[-2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(out["fused"], (out["local"] + crops) / 2)
        torch.nn.init.normal_(model.fusion[-1].weight)
        moved = model.refine(images, 0, grid, g, chosen, 2)["fused"]
    assert not torch.allclose(moved, out["fused"])


def test_global_error_is_the_share_of_wrong_valid_pixels_per_patch():
    model = tiny()
    labels = torch.zeros(1, 160, 160, dtype=torch.long)
    labels[:, :64, :64] = 1          # patch 0 exactly: all wrong for a G-branch that says class 0 everywhere
    labels[:, 96:, 96:] = 255        # patch 8: nothing valid -> 0
    logits = torch.zeros(1, 5, 40, 40)  # stride 4 of a 160 px global view; boxes 16 cells, origins 0 / 12 / 24
    logits[:, 0] = 1.0
    g = HeadOutput(logits, torch.zeros(1, 8, 40, 40), None)
    grid = model.grid(labels[:, None])
    error = model.global_error(g, labels, 0, grid)
    # centre patch: 4 x 4 wrong cells of 16 x 16, of which its 4 x 4 corner inside patch 8 is ignored
    assert error.tolist() == pytest.approx([1.0, 0.25, 0.0, 0.25, 16 / 240, 0.0, 0.0, 0.0, 0.0])
    assert model.proposal_target(error) is error  # soft targets by default
    hard = tiny(critical_error=0.1).proposal_target(error)
    assert hard.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_training_refines_the_patches_the_global_branch_gets_most_wrong():
    model = tiny(train_ratio=2 / 9).train()
    images, labels = batch(b=2)
    grid = model.grid(images)
    seen = local_inputs(model, lambda: model.forward_train(images, labels))
    assert [x.shape[0] for x in seen] == [2, 2]  # one pass per image, 2 of 9 patches each
    with torch.no_grad():
        g = model.run_global(images)  # train-mode BN: the same batch statistics as inside forward_train
    for i, patches in enumerate(seen):
        worst = top_patches(model.global_error(g, labels, i, grid), 2)
        torch.testing.assert_close(patches, model.normalize(cut_patches(images[i:i + 1], grid, worst)))


def test_joint_losses_are_finite_and_reach_every_part():
    model = tiny().train()
    images, labels = batch(b=2, h=128, w=128)
    labels[:, :8] = 255
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_global", "loss_proposal", "loss_local", "loss_fused"}
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    terms["loss_proposal"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.resnet_global.parameters())  # PPN reads detached features
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.proposal.parameters())
    model.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    for name in ("resnet_global", "fpn_global", "resnet_local", "fpn_local", "fusion", "proposal"):
        grads = [p.grad for p in model.get_submodule(name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert "loss_proposal" not in tiny(proposal_weight=0.0).train().forward_train(images, labels)


def test_staged_phases_train_the_global_branch_then_the_rest_with_it_frozen():
    from conftest import ran_modules

    model = tiny(staged=True).train()
    phases = {p.name: p for p in model.phases}
    assert list(phases) == ["global", "refine"]
    assert phases["global"].trainable == ("resnet_global", "fpn_global") and phases["global"].recipe == "global"
    assert set(phases["refine"].trainable) == {"resnet_local", "fpn_local", "fusion", "proposal"}
    assert phases["refine"].frozen_eval == ("resnet_global", "fpn_global") and phases["refine"].recipe == "refine"
    images, labels = batch(b=2, h=128, w=128)
    model.set_phase("global")
    ran = ran_modules(model, lambda: model.forward_train(images, labels))
    assert "resnet_global" in ran and not {"resnet_local", "fpn_local", "fusion", "proposal"} & ran
    assert set(model.forward_train(images, labels)) == {"loss_global"}
    model.set_phase("refine")
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_proposal", "loss_local", "loss_fused"}
    sum(terms.values()).backward()
    assert all(p.grad is None for p in model.resnet_global.parameters())
    for name in ("resnet_local", "fusion", "proposal"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.get_submodule(name).parameters())
    assert [p.name for p in tiny().phases] == ["main"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"refine_ratio": 0}, "refine_ratio .* must be in \\(0, 1\\], got 0"),
    ({"refine_ratio": 1.5}, "refine_ratio"),
    ({"refine_ratio": True}, "refine_ratio"),
    ({"train_ratio": -0.1}, "train_ratio"),
    ({"critical_error": 1.0}, "critical_error"),
    ({"proposal_weight": -1.0}, "proposal_weight"),
    ({"head_width": 3}, "head_width"),
    ({"min_overlap": 64}, "min_overlap"),
    ({"not_a_keyword": 1}, "bad config"),
])
def test_bad_settings_are_one_clear_line(kwargs, match):
    with pytest.raises(MethodError, match=match) as info:
        build_method("ppn", 5, **{**TINY, **kwargs})
    assert "\n" not in str(info.value)


def test_bad_knob_and_image_sizes_are_one_clear_line():
    knob = PPN.knobs[0]
    for value in (0.0, 1.5):
        with pytest.raises(MethodError, match="refine_ratio"):
            knob.check(value)
    for value in knob.sweep:
        knob.check(value)
    model = tiny()
    with pytest.raises(MethodError, match="refine_ratio"):
        model.refine_ratio = 0.0
    model.refine_ratio = 1.0  # a knob set on a built model
    assert model.refine_ratio == 1.0
    with pytest.raises(MethodError, match="image side 48 is smaller than patch_size 64") as info:
        model.eval().predict(torch.zeros(1, 3, 48, 200))
    assert "\n" not in str(info.value)
    with pytest.raises(MethodError, match="raise global_size"):
        tiny(global_size=4).eval().predict(torch.zeros(1, 3, 640, 640))


def test_deterministic_for_a_seed():
    images, labels = batch(b=2, h=128, w=128)
    a, b = tiny(seed=3), tiny(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.proposal.score.weight, tiny(seed=4).proposal.score.weight)
    la, lb = a.train().forward_train(images, labels), b.train().forward_train(images, labels)
    assert all(torch.equal(la[k], lb[k]) for k in la)
    a.eval()
    assert torch.equal(a.predict(images), a.predict(images))


def test_deepglobe_shapes_on_meta_device(monkeypatch):
    """Default (paper) config at 2448 x 2448: GLNet's 6 x 6 grid of 508, 26-cell boxes in the 127² global map, 9 of
    36 patches refined in passes of 6. (Which 9 is data-dependent; meta tensors have no values, so take the first.)"""
    monkeypatch.setattr("methods.ppn.top_patches", lambda scores, k: list(range(k)))
    with torch.device("meta"):
        model = build_method("ppn", 7).eval()
        image = torch.empty(1, 3, 2448, 2448)
    shapes = {}

    def hook(name):
        def record(module, inputs, output) -> None:
            shapes.setdefault(name, []).append((tuple(inputs[0].shape), tuple(output.shape)))

        return record

    model.fpn_global.classify.register_forward_hook(hook("global"))
    model.proposal.register_forward_hook(hook("proposal"))
    model.fpn_local.classify.register_forward_hook(hook("local"))
    model.fusion.register_forward_hook(hook("fusion"))
    assert tuple(model.predict(image).shape) == (1, 7, 2448, 2448)
    assert shapes["global"] == [((1, 512, 127, 127), (1, 7, 127, 127))]
    assert shapes["proposal"] == [((36, 512 + 7, 26, 26), (36,))]
    assert shapes["local"] == [((6, 512, 127, 127), (6, 7, 127, 127)), ((3, 512, 127, 127), (3, 7, 127, 127))]
    assert [s[0] for s in shapes["fusion"]] == [(6, 1024, 127, 127), (3, 1024, 127, 127)]


def test_gradient_checkpointing_changes_nothing_but_memory():
    images, labels = batch(b=1, h=128, w=128)
    results = []
    for flag in (False, True):
        model = tiny(seed=5, grad_checkpoint=flag).train()
        terms = model.forward_train(images, labels)
        sum(terms.values()).backward()
        bn = next(m for m in model.resnet_local.modules() if isinstance(m, torch.nn.BatchNorm2d))
        results.append((terms, model.resnet_local.conv1.weight.grad, bn.running_mean.clone()))
    (plain, grad, stats), (ckpt, grad_c, stats_c) = results
    for key in plain:
        torch.testing.assert_close(plain[key], ckpt[key])
    torch.testing.assert_close(grad, grad_c)
    torch.testing.assert_close(stats, stats_c)  # BN statistics updated once, not again by the recomputation
