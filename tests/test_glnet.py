"""GLNet: patch geometry against the spec's tables, the three training phases, stitching, the global view's
Pillow-exact resize, released checkpoint layout and parameter counts (spec glnet.md §3.4, §3.9, §4.3, §7, §8).
Parity of the whole forward pass with the official code: tests/test_golden_glnet.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from methods import build_method, list_methods
from methods.base import MethodError
from methods.blocks.fpn import Pyramid
from methods.blocks.losses import focal_loss
from methods.blocks.patches import LogitStitcher, PatchGrid, grid_starts
from methods.blocks.resize import pil_bilinear_resize, pillow_vertical_first
from methods.glnet import G2L, GLOBAL, L2G, FeatureCanvas, GLNet

TINY = dict(backbone="resnet18", global_size=64, patch_size=64, min_overlap=16, patch_batch=3, train_patch_batch=2,
            head_width=32)


def tiny(**kwargs) -> GLNet:
    torch.manual_seed(0)
    return GLNet(num_classes=5, **{**TINY, **kwargs})


def batch(b: int = 1, h: int = 96, w: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (b, 3, h, w), generator=g).float(),
            torch.randint(0, 5, (b, h, w), generator=g))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def train_step(model: GLNet, phase_name: str, images, labels) -> None:
    """What pipelines/train.py does for one iteration."""
    phase = next(p for p in model.phases if p.name == phase_name)
    model.set_phase(phase.name)
    trainable = {id(p) for p in model.phase_parameters(phase)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.Adam(model.phase_parameters(phase), lr=1e-3, weight_decay=5e-4)
    model.train()
    for name in phase.frozen_eval:
        model.get_submodule(name).eval()
    sum(model.forward_train(images, labels).values()).backward()
    optimizer.step()


# ---- geometry ----------------------------------------------------------------------------------------


def test_deepglobe_patch_grid_matches_spec():
    grid = PatchGrid.build(2448, 2448, 508)
    assert len(grid) == 36
    assert grid.tops == grid.lefts == (0, 388, 776, 1164, 1552, 1940)  # stride 388, last flush
    assert grid.coords[:2] == [(0, 0), (0, 388)]  # row-major
    # §3.4 table: crop size and origins per pyramid level
    for size, h, origins in ((127, 26, [0, 20, 40, 60, 81, 101]), (64, 13, [0, 10, 20, 30, 41, 51]),
                             (32, 7, [0, 5, 10, 15, 20, 25]), (16, 3, [0, 3, 5, 8, 10, 13])):
        boxes = grid.boxes(size, size)
        assert {b[2] for b in boxes} == {b[3] for b in boxes} == {h}
        assert [b[0] for b in boxes[::6]] == origins


@pytest.mark.parametrize("side,count", [(5000, 11), (5120, 12), (2048, 5), (1024, 3), (508, 1)])
def test_grid_sizes_of_other_datasets(side, count):
    starts = grid_starts(side, 508)
    assert len(starts) == count and starts[-1] == side - 508
    if count > 1:
        assert 508 - (side - 508) / (count - 1) >= 50  # §3.9 overlap rule


def test_grid_rejects_image_smaller_than_patch():
    with pytest.raises(MethodError, match="smaller than patch_size"):
        grid_starts(300, 508)


def test_stitching_all_ones_returns_ones():
    grid = PatchGrid.build(200, 300, 64, min_overlap=10)
    stitch = LogitStitcher(grid, num_classes=3)
    for start in range(0, len(grid), 4):
        idx = list(range(start, min(start + 4, len(grid))))
        stitch.add(torch.ones(len(idx), 3, 16, 16), idx)
    assert torch.equal(stitch.result(), torch.ones(1, 3, 200, 300))


def test_feature_canvas_averages_with_exact_coverage():
    grid = PatchGrid.build(2448, 2448, 508)
    like = Pyramid.from_maps([torch.zeros(1, 2, s, s) for s in (16, 32, 64, 127)] * 4)
    canvas = FeatureCanvas(like, grid, coverage="exact")
    canvas.add(Pyramid.from_maps([torch.ones(len(grid), 2, s, s) for s in (4, 8, 16, 32)] * 4), range(len(grid)))
    for m in canvas.result().maps():
        assert torch.allclose(m, torch.ones_like(m))


def test_upstream_coverage_is_the_downsampled_pixel_template():
    """The default (upstream) divisor: exact where boxes align with the pixel grid (§3.5: 32² and 16² at
    DeepGlobe scale), off where the rounded boxes and the bilinear template disagree (127², 64²)."""
    grid = PatchGrid.build(2448, 2448, 508)
    like = Pyramid.from_maps([torch.zeros(1, 1, s, s) for s in (16, 32, 64, 127)] * 4)
    canvas = FeatureCanvas(like, grid)
    assert canvas.coverage == "upstream"
    canvas.add(Pyramid.from_maps([torch.ones(len(grid), 1, s, s) for s in (4, 8, 16, 32)] * 4), range(len(grid)))
    for m in canvas.result().maps()[:4]:  # c5, c4, c3, c2
        exact = torch.allclose(m, torch.ones_like(m), atol=1e-5)
        assert exact == (m.shape[-1] in (16, 32)), m.shape


def test_focal_loss_matches_formula_and_ignores():
    logits, labels = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))
    p = logits.softmax(1).gather(1, labels[:, None])[:, 0]
    assert torch.allclose(focal_loss(logits, labels, 3.0, 255), (-(1 - p) ** 3 * p.log()).mean())
    labels[0] = 255
    assert torch.allclose(focal_loss(logits, labels, 3.0, 255), (-(1 - p[1]) ** 3 * p[1].log()).mean())


# ---- the global view: Pillow's bilinear resize, exactly (§4.3, §5.1) -----------------------------------


def pillow_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Reference: Image.resize((w, h), BILINEAR) of each uint8 RGB image of a (B, 3, H, W) batch."""
    out = [np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy().astype(np.uint8)).resize(size[::-1],
                                                                                          Image.BILINEAR))
           for img in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("src,dst", [
    ((300, 260), (128, 128)),  # non-integer downscale of a non-square image (the golden test's global view)
    ((1224, 1224), (508, 508)),  # DeepGlobe's ratio at half size
    ((512, 1024), (508, 508)),  # Cityscapes' shape: width shrinks more
    ((256, 256), (64, 64)),  # integer factor
    ((37, 50), (128, 90)),  # upscale
    ((100, 200), (333, 77)),  # one axis up, the other down
    ((100, 200), (100, 77)), ((100, 200), (333, 200)),  # one axis kept (Pillow skips that pass)
    ((513, 97), (17, 120)),  # height shrinks far more: Pillow >= 13 runs the vertical pass first
    ((611, 733), (7, 5)), ((5, 3), (1, 1)),  # extreme factors
])
def test_pil_bilinear_resize_is_pillow_exactly(src, dst):
    g = torch.Generator().manual_seed(src[0] * 1000 + dst[1])
    images = torch.randint(0, 256, (2, 3, *src), generator=g).float()
    images[1, :, : src[0] // 2] = images[1, :, : src[0] // 2].clamp(0, 1) * 255  # saturated edges: clipping
    ours = pil_bilinear_resize(images, dst)
    assert ours.dtype == images.dtype and ours.shape == (2, 3, *dst)
    assert torch.equal(ours, pillow_resize(images, dst))


def test_pil_bilinear_resize_random_sizes_and_dtypes():
    """Both pass orders of Pillow 13 (vertical first iff the height shrinks by more than twice as many pixels as
    the width) on random small sizes; uint8 and float64 inputs alike."""
    rng = np.random.default_rng(0)
    orders = set()
    for _ in range(60):
        (h, w), (oh, ow) = rng.integers(1, 48, 2), rng.integers(1, 48, 2)
        images = torch.from_numpy(rng.integers(0, 256, (1, 3, h, w), dtype=np.uint8))
        expected = pillow_resize(images, (int(oh), int(ow)))
        orders.add(pillow_vertical_first((h, w), (oh, ow)))
        assert torch.equal(pil_bilinear_resize(images, (oh, ow)).float(), expected), ((h, w), (oh, ow))
        assert torch.equal(pil_bilinear_resize(images.double(), (oh, ow)).float(), expected)
    assert orders == {True, False}


@pytest.mark.gpu
def test_pil_bilinear_resize_on_cuda():
    # the same integers on any device, in both pass orders (Pillow parity itself is the CPU tests' job: they need
    # the pinned Pillow 13, and a GPU machine's own Pillow may be older)
    images = torch.randint(0, 256, (2, 3, 611, 517), generator=torch.Generator().manual_seed(0)).float()
    for size in ((508, 508), (97, 301)):
        for vertical_first in (True, False):
            on_cuda = pil_bilinear_resize(images.cuda(), size, vertical_first).cpu()
            assert torch.equal(on_cuda, pil_bilinear_resize(images, size, vertical_first)), (size, vertical_first)


def test_global_view_is_pillow_resize_by_default():
    images = batch(2, 96, 112)[0]
    model = tiny()
    assert (model.global_resize, model.l2g_coverage) == ("pil", "upstream")
    expected = pillow_resize(images, (64, 64)) / 255  # then ToTensor()
    assert torch.equal(model._global_input(images), expected)
    antialias = tiny(global_resize="antialias")._global_input(images)
    assert 0 < (antialias != expected).float().mean() < 0.5
    assert (antialias - expected).abs().max() * 255 <= 1 + 1e-4  # one grey level at most


@pytest.mark.parametrize("keyword", ["l2g_coverage", "global_resize"])
def test_unknown_variant_names_are_refused(keyword):
    with pytest.raises(MethodError, match=keyword):
        tiny(**{keyword: "nearest"})


# ---- phases ------------------------------------------------------------------------------------------


def test_registered_and_built_from_config():
    assert "glnet" in list_methods()
    model = build_method("glnet", 5, **TINY)
    assert [p.recipe for p in model.phases] == ["phase1", "phase2", "phase3"]
    with pytest.raises(MethodError, match="set_phase"):
        model.forward_train(*batch())


def test_phase2_trains_only_local_branch_and_ensemble():
    model, (images, labels) = tiny(), batch()
    before = snapshot(model)
    train_step(model, G2L, images, labels)
    diff = changed(before, model)
    assert not {k for k in diff if k.startswith(("resnet_global", "fpn_global", "global_fixed"))}
    assert any(k.startswith("resnet_local") for k in diff) and any(k.startswith("fpn_local") for k in diff)
    assert "ensemble_conv.weight" in diff


def test_phase3_trains_only_refined_global_and_ensemble():
    model, (images, labels) = tiny(), batch()
    model.set_phase(L2G)
    assert bool(model.global_fixed_ready)  # phase 3 snapshots the stage-1 global
    before = snapshot(model)
    train_step(model, L2G, images, labels)
    diff = changed(before, model)
    assert not {k for k in diff if k.startswith(("resnet_local", "fpn_local", "global_fixed"))}
    base_only = {f"fpn_global.{n}.weight" for n in model.fpn_global.path_names(ext=False) if n != "classify"}
    assert not diff & base_only  # unused in phase 3
    assert {"fpn_global.smooth.weight", "fpn_global.toplayer_ext.weight", "fpn_global.classify.weight",
            "ensemble_conv.weight", "resnet_global.conv1.weight"} <= diff


def test_phase1_trains_only_global_branch():
    model, (images, labels) = tiny(), batch()
    before = snapshot(model)
    train_step(model, GLOBAL, images, labels)
    diff = changed(before, model)
    assert diff and all(k.startswith(("resnet_global", "fpn_global")) for k in diff)
    assert not any("_ext" in k for k in diff)


def test_grad_checkpoint_is_exact_and_updates_bn_once():
    images, labels = batch()
    results = []
    for flag in (False, True):
        model = tiny(grad_checkpoint=flag)
        model.set_phase(G2L)
        model.train()
        terms = model.forward_train(images, labels)
        sum(terms.values()).backward()
        results.append((terms, model.resnet_local.layer1[0].conv1.weight.grad.clone(),
                        model.resnet_local.bn1.running_mean.clone()))
    (t0, g0, bn0), (t1, g1, bn1) = results
    assert all(torch.allclose(t0[k], t1[k]) for k in t0)
    assert torch.allclose(g0, g1, atol=1e-6) and torch.allclose(bn0, bn1)


@pytest.mark.parametrize("phase", [GLOBAL, G2L, None])
def test_predict_shape(phase):
    model = tiny()
    model.phase = phase
    out = model.eval().predict(batch(2, 96, 112)[0])
    assert out.shape == (2, 5, 96, 112) and torch.isfinite(out).all()


# ---- released checkpoints and sizes ------------------------------------------------------------------


def upstream_files(model: GLNet, folder) -> None:
    """Write the released layout (§8): full `fpn` state dicts under DataParallel's `module.` prefix."""
    main = {k: v for k, v in model.state_dict().items() if not k.startswith("global_fixed")}
    stage1 = {**main, **{k.removeprefix("global_fixed."): v for k, v in model.global_fixed.state_dict().items()}}
    torch.save({f"module.{k}": v for k, v in stage1.items()}, folder / "fpn_deepglobe_global.pth")
    torch.save({f"module.{k}": v for k, v in main.items()}, folder / "fpn_deepglobe_local2global.pth")


def test_load_official_reproduces_logits(tmp_path):
    source = tiny()
    source.global_fixed["fpn_global"].smooth4_2.bias.data.fill_(0.5)  # the stage-1 copy feeds the local branch
    source.global_fixed_ready.fill_(True)
    upstream_files(source, tmp_path)
    target = tiny()
    target.load_official(str(tmp_path))
    images = batch(1, 96, 96)[0]
    assert target.phase is None
    assert torch.equal(target.eval().predict(images), source.eval().predict(images))


def test_load_official_names_bad_keys(tmp_path):
    upstream_files(tiny(), tmp_path)
    path = tmp_path / "fpn_deepglobe_local2global.pth"
    state = torch.load(path)
    state["module.extra.weight"] = state.pop("module.ensemble_conv.bias")
    torch.save(state, path)
    model = tiny()
    with pytest.raises(MethodError, match="load the released global"):
        model.load_official(str(path))  # the stage-1 global must come first
    model.load_official(str(tmp_path / "fpn_deepglobe_global.pth"))
    assert model.phase == GLOBAL
    with pytest.raises(MethodError, match=r"missing \(1\): ensemble_conv.bias.*unexpected \(1\): extra.weight"):
        model.load_official(str(path))


def test_parameter_counts_match_spec():
    model = GLNet(num_classes=7, backbone="resnet50")
    counts = model.parameter_counts()
    assert counts["checkpoint"] == 79_200_917  # the upstream `fpn` module (§7)
    assert counts["inference"] == 102_741_212  # stage-1 global + local + refined global + ensemble
    assert [sum(p.numel() for p in model.phase_parameters(ph)) for ph in model.phases] == [
        28_064_839, 37_370_446, 37_370_446]


def test_patch_grid_coverage_counts_boxes_per_position():
    from methods.blocks.patches import PatchGrid

    grid = PatchGrid.build(100, 60, 40, min_overlap=10)  # 3 x 2 patches
    count = grid.coverage(25, 15)  # a quarter-resolution map
    assert count.shape == (1, 1, 25, 15) and count.dtype == torch.float32
    expected = torch.zeros(25, 15)
    for y, x, h, w in grid.boxes(25, 15):
        expected[y:y + h, x:x + w] += 1
    assert torch.equal(count[0, 0], expected) and count.min() >= 1 and count.max() > 1


def test_grid_starts_fewest_patches_with_the_overlap():
    from methods.blocks.patches import PatchGrid, grid_starts

    assert grid_starts(2448, 508) == [0, 388, 776, 1164, 1552, 1940]  # spec §3.9, DeepGlobe, default overlap 50
    assert PatchGrid.build(2448, 2448, 508).tops == (0, 388, 776, 1164, 1552, 1940)
    assert grid_starts(600, 508) == [0, 92] and grid_starts(599, 508) == [0, 91]  # overlap 416 / 417 >= 50
    assert grid_starts(900, 508, 116) == [0, 392]  # overlap exactly 116 is enough
    assert grid_starts(600, 508, 0) == [0, 92] and grid_starts(508, 508, 0) == [0]
    assert grid_starts(1100, 508, 0) == [0, 296, 592]
    assert grid_starts(600, 508, 507) == list(range(93))  # overlap 507: steps of one pixel
    for overlap in (508, -1):
        with pytest.raises(MethodError, match=rf"min_overlap must be in \[0, patch_size\), got {overlap}"):
            grid_starts(600, 508, overlap)


def test_cut_patches_and_boxes_are_the_grid_crops():
    from methods.blocks.patches import PatchGrid, crop_boxes, cut_patches

    grid = PatchGrid.build(100, 60, 40, min_overlap=10)
    image = torch.arange(2 * 100 * 60, dtype=torch.float32).view(1, 2, 100, 60)
    patches = cut_patches(image, grid, [0, 5])
    assert patches.shape == (2, 2, 40, 40)
    for i, j in enumerate([0, 5]):
        t, left = grid.coords[j]
        assert torch.equal(patches[i], image[0, :, t:t + 40, left:left + 40])
    labels = cut_patches(image[:, 0], grid, [3])  # a label map (1, H, W)
    assert labels.shape == (1, 40, 40)
    # boxes on a coarse map stay inside it: the last of 3 patches of 100 on a 200 side, on an 11-px map
    coarse = PatchGrid.build(200, 200, 100, min_overlap=10)
    assert coarse.tops == (0, 50, 100)
    assert all(y + h <= 11 and x + w <= 11 for y, x, h, w in coarse.boxes(11, 11))
    fmap = torch.randn(1, 3, 11, 11)
    crops = crop_boxes(fmap, coarse.boxes(11, 11))
    assert crops.shape == (9, 3, 6, 6)


def test_logit_stitcher_averages_nearest_upsampled_patch_logits():
    from methods.blocks.patches import LogitStitcher, PatchGrid

    grid = PatchGrid.build(60, 40, 40, min_overlap=10)  # 2 x 1 patches, rows 20-40 covered twice
    stitcher = LogitStitcher(grid, 2)
    logits = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]] * 2, [[[5.0, 6.0], [7.0, 8.0]]] * 2])  # (2, 2, 2, 2)
    stitcher.add(logits, [0, 1])
    out = stitcher.result()
    assert out.shape == (1, 2, 60, 40) and out.dtype == torch.float32
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, 0, 39] == 2.0  # nearest: blocks of 20 px
    assert out[0, 0, 25, 0] == pytest.approx((3.0 + 5.0) / 2)  # overlap: the mean of both patches
    assert out[0, 0, 59, 39] == 8.0
