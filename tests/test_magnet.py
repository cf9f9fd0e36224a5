"""MagNet (methods/magnet.py) against docs/specs/magnet.md: refiner layout, tile grid, point counts, the merge rule,
MagNet-Fast's tile choice, training phases, the released checkpoint layout, OpenCV's uint8 resize; the Cityscapes
HRNet-W18-Small-v2 + OCR backbone (methods/blocks/hrnet.py) with its three refiners."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods.blocks.hrnet as hrnet
import methods.magnet as mg
from methods import build_method
from methods.base import MethodError, count_parameters
from methods.blocks.cv2_resize import cv2_linear_resize, nearest_resize
from tests.golden.seeded import seed_weights

SMALL = dict(backbone="resnet18", head_width=32, native_size=256, crop_size=64, input_size=48, smooth_kernel=5)


def small(**kw) -> mg.MagNet:
    torch.manual_seed(0)
    return build_method("magnet", 7, **{**SMALL, **kw}).eval()


def test_refiner_layout_and_counts():
    for c, params in ((7, 88_092), (19, 103_500)):  # spec §3.1: 1284 C + 79,104
        ref = mg.Refiner(c)
        assert count_parameters(ref) == params == 1284 * c + 79_104
        assert len(ref.state_dict()) == 60 and ref.seg_conv.bias is None
        assert ref.conv1.weight.shape == (64, 2 * c, 3, 3)
        assert ref.residual[0].downsample[0].weight.shape == (128, 64, 1, 1) and ref.residual[1].downsample is None
    out = mg.Refiner(7).eval()(torch.rand(2, 7, 20, 30), torch.rand(2, 7, 20, 30))
    assert out.shape == (2, 7, 20, 30)


def test_refiner_input_order_is_scale_specific_then_cumulative():
    ref = mg.Refiner(3).eval()
    with torch.no_grad():
        ref.conv1.weight[:, 3:] = 0  # only the first argument can reach the output now
    a, b = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(ref(a, b), ref(a, torch.rand_like(b)))
        assert not torch.allclose(ref(a, b), ref(torch.rand_like(a), b))


def test_patch_grid_is_upstreams_column_major_grid():
    boxes = mg.patch_boxes((1224, 1224), (612, 612))
    assert boxes == [(0, 0, 612, 612), (0, 612, 612, 1224), (612, 0, 1224, 612), (612, 612, 1224, 1224)]
    big = mg.patch_boxes((2448, 2448), (612, 612))
    assert len(big) == 16 and sorted({b[0] for b in big}) == [0, 612, 1224, 1836]
    assert len(mg.patch_boxes((1024, 2048), (128, 256))) == 64
    assert mg.patch_boxes((131, 131), (66, 66))[-1] == (65, 65, 131, 131)  # truncated step: 1 px overlap


def test_schedule_is_upstreams_at_the_native_size_and_scales_elsewhere():
    model = build_method("magnet", 7)
    assert model.schedule(2448, 2448) == ([(612, 612), (1224, 1224), (2448, 2448)], (612, 612), (508, 508), 10)
    assert model.schedule(1224, 1224) == ([(306, 306), (612, 612), (1224, 1224)], (306, 306), (254, 254), 5)
    with pytest.raises(MethodError, match="first scale"):
        build_method("magnet", 7, scales=(0.5, 1.0))


def test_margin_and_point_counts():
    assert float(mg.margin(torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1))) == pytest.approx(0.2)
    assert mg.points_to_refine(0.75, (1224, 1224), 4, 4) == 1_123_632  # spec §4.4
    assert mg.points_to_refine(0.75, (2448, 2448), 16, 16) == 4_494_528
    assert mg.points_to_refine(0.9, (1224, 1224), 3, 4) == mg.points_to_refine(0.9, (2448, 2448), 3, 16) == 1_011_268
    assert [mg.points_to_refine(32768, (h, 2 * h), n, n) for h, n in ((256, 4), (512, 16), (1024, 64))] == [32768] * 3
    assert mg.points_to_refine(0.9, (512, 1024), 4, 16) == 117_964
    assert mg.points_to_refine(1e9, (10, 10), 1, 4) == 25  # absolute count capped at the refined share


def test_median_blur_zero_pads_and_takes_the_median():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    out = mg.median_blur(x, 3)
    assert out[0, 0, 2, 2] == 12 and out[0, 0, 0, 0] == 0  # corner: 4 values and 5 zeros
    assert torch.equal(mg.median_blur(x, 1), x)


def test_sample_at_pixels_reads_the_pixels():
    maps = torch.rand(1, 3, 37, 53)
    index = torch.tensor([[0, 52, 53 * 36, 37 * 53 - 1, 400]])
    expected = maps.view(1, 3, -1)[:, :, index[0]]
    assert torch.allclose(mg.sample_at_pixels(maps, index), expected, atol=1e-5)


class Recorder:
    """Wraps module-level helpers of methods.magnet to see what a stage computed."""

    def __init__(self, monkeypatch):
        self.scores, self.indices, self.maps, self.boxes = [], [], [], []
        top, stitch, tiles = mg.top_points, mg.MagNet._stitch, mg.MagNet._tiles

        def top_points(score, k):
            self.scores.append(score.clone())
            out = top(score, k)
            self.indices.append(out)
            return out

        def _stitch(tiles_, ratios, scale, margin_px):
            out = stitch(tiles_, ratios, scale, margin_px)
            self.maps.append(out)
            return out

        def _tiles(model, image, scale, boxes, inp):
            self.boxes.append(list(boxes))
            return tiles(model, image, scale, boxes, inp)

        monkeypatch.setattr(mg, "top_points", top_points)
        monkeypatch.setattr(mg.MagNet, "_stitch", staticmethod(_stitch))
        monkeypatch.setattr(mg.MagNet, "_tiles", _tiles)


@pytest.mark.parametrize("n_points", [0.75, 0.3, 1000])
def test_stage_replaces_exactly_the_top_k_points_and_nothing_else(monkeypatch, n_points):
    model = small(n_points=n_points)
    image = torch.randint(0, 256, (1, 3, 256, 256)).float()
    p = torch.softmax(torch.randn(1, 7, 64, 64), dim=1)
    rec = Recorder(monkeypatch)
    with torch.no_grad():
        out = model._stage(image, p, (128, 128), (64, 64), (48, 48), 2)
    before = F.interpolate(p, size=(128, 128), mode="bilinear", align_corners=False)
    changed = (out != before).any(1).view(-1)
    k = mg.points_to_refine(n_points, (128, 128), 4, 4)
    assert int(changed.sum()) == k == rec.indices[0].shape[1]  # exactly k pixels written (spec §9 item 8)
    chosen = torch.zeros_like(changed)
    chosen[rec.indices[0][0]] = True
    assert torch.equal(changed, chosen)
    score = rec.scores[0].view(-1)
    assert score[chosen].min() >= score[~chosen].max()  # the top k of the smoothed score
    rmap = rec.maps[0][0].view(1, 7, -1)
    assert torch.allclose(out.view(1, 7, -1)[..., chosen], rmap[..., chosen], atol=1e-5)  # replaced by the refined
    assert torch.equal(out.view(1, 7, -1)[..., ~chosen], before.view(1, 7, -1)[..., ~chosen])  # the rest untouched


def _quadrant_map(margins: list[float], size: int = 128) -> torch.Tensor:
    """(1, 7, size, size) probabilities whose top-2 margin is margins[i] on tile i of the 2x2 column-major grid."""
    p = torch.zeros(1, 7, size, size)
    h = size // 2
    for i, m in enumerate(margins):
        x, y = divmod(i, 2)
        first = (1 + m) / 2
        p[0, :, y * h:(y + 1) * h, x * h:(x + 1) * h] = ((1 - first - (first - m)) / 5)
        p[0, 0, y * h:(y + 1) * h, x * h:(x + 1) * h] = first
        p[0, 1, y * h:(y + 1) * h, x * h:(x + 1) * h] = first - m
    return p


@pytest.mark.parametrize("selection,expected", [("upstream", [1, 3]), ("corrected", [2, 0])])
def test_fast_tile_choice(monkeypatch, selection, expected):
    """Upstream sorts the tiles by mean uncertainty ascending and keeps the first (D1: the most certain ones);
    corrected keeps the most uncertain. Replaced points lie inside the kept tiles' interiors only."""
    model = small(n_patches=2, n_points=0.9, fast_selection=selection)
    image = torch.randint(0, 256, (1, 3, 256, 256)).float()
    p = _quadrant_map([0.1, 0.9, 0.05, 0.6])  # uncertainty 0.9, 0.1, 0.95, 0.4
    rec = Recorder(monkeypatch)
    with torch.no_grad():
        out = model._stage(image, p, (128, 128), (64, 64), (48, 48), 4)
    grid = mg.patch_boxes((128, 128), (64, 64))
    assert rec.boxes[0] == [grid[i] for i in expected]
    changed = (out != p).any(1)[0]
    inner = torch.zeros(128, 128, dtype=torch.bool)
    for i in expected:
        x0, y0, x1, y1 = grid[i]
        inner[y0 + 4:y1 - 4, x0 + 4:x1 - 4] = True
    assert changed.any() and not (changed & ~inner).any()
    assert int(changed.sum()) <= mg.points_to_refine(0.9, (128, 128), 2, 4)


def test_n_patches_zero_means_every_tile(monkeypatch):
    rec = Recorder(monkeypatch)
    model = small(n_patches=0)
    with torch.no_grad():
        model._stage(torch.zeros(1, 3, 256, 256), _quadrant_map([0.1, 0.2, 0.3, 0.4]), (128, 128), (64, 64),
                     (48, 48), 4)
    assert rec.boxes[0] == mg.patch_boxes((128, 128), (64, 64))


def test_predict_gives_log_probabilities_of_the_last_stage():
    model = small()
    image = torch.randint(0, 256, (1, 3, 256, 200), dtype=torch.uint8)
    with torch.no_grad():
        stages = model._progressive(image.float())
        logits = model.predict(image)
    assert [tuple(s.shape[-2:]) for s in stages] == [(48, 38), (128, 100), (256, 200)]
    assert logits.shape == (1, 7, 256, 200)
    assert torch.allclose(logits.exp().sum(1), torch.ones(1, 256, 200), atol=1e-5)
    assert torch.allclose(logits.exp(), stages[-1], atol=1e-6)


def test_input_normalisation_is_totensor_then_normalize():
    model = small()
    x = torch.arange(256.0).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.equal(model._to_input(x), (x / 255.0 - mean) / std)


def test_phases_train_their_part_only():
    model = small().train()
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    labels = torch.randint(0, 7, (2, 256, 256))
    assert [p.name for p in model.phases] == ["backbone", "refiner"]
    model.set_phase("refiner")
    assert not model.backbone.training and model.refiner.training
    terms = model.forward_train(images, labels)
    sum(terms.values()).backward()
    assert set(terms) == {"loss_refine"} and torch.isfinite(terms["loss_refine"])
    assert all(p.grad is None for p in model.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.refiner.parameters())
    model.zero_grad(set_to_none=True)
    model.set_phase("backbone")
    terms = model.forward_train(images, labels)
    sum(terms.values()).backward()
    assert set(terms) == {"loss_seg"} and all(p.grad is None for p in model.refiner.parameters())


def test_ohem_keeps_the_hard_pixels():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0] = torch.tensor([4.0, 0.0, -4.0, 2.0])  # p(class 0) = 0.98, 0.5, 0.018, 0.88
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    ce = F.cross_entropy(logits, labels, reduction="none").view(-1)
    assert torch.isclose(mg.ohem_ce(logits, labels, 255, 0.7, 1), ce[[1, 2]].mean())  # p < 0.7
    assert torch.isclose(mg.ohem_ce(logits, labels, 255, 0.7, 3), ce[[1, 2, 3]].mean())  # threshold p(3rd) 0.98


def test_load_official_round_trip_in_the_released_layout(tmp_path):
    source = small()
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    # the backbone trainer's best.pth: `model.` keys plus the loss's class weights (spec §6)
    trainer = {f"model.{k}": v for k, v in source.backbone.state_dict().items()}
    trainer["loss.criterion.weight"] = torch.ones(7)
    torch.save(trainer, tmp_path / "best.pth")
    torch.save(source.refiner.state_dict(), tmp_path / "epoch49.pth")
    target = small()
    torch.manual_seed(3)
    target.refiner = mg.Refiner(7)
    report = target.load_official(str(tmp_path / "best.pth"))
    assert report.clean and report.skipped == ["loss.criterion.weight"]
    target.load_official(str(tmp_path / "epoch49.pth"))
    theirs = target.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in source.state_dict().items())
    source.save_official(str(tmp_path / "release"))
    assert sorted(p.name for p in (tmp_path / "release").iterdir()) == ["deepglobe_fpn.pth",
                                                                         "deepglobe_refinement.pth"]


def test_bad_checkpoints_are_one_line_errors_naming_the_file(tmp_path):
    model = small()
    state = model.refiner.state_dict()
    del state["bn0.running_mean"]
    torch.save(state, tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save(build_method("magnet", 7, **{**SMALL, "backbone": "resnet34"}).backbone.state_dict(),
               tmp_path / "r34.pth")
    for name in ("partial.pth", "junk.pth", "r34.pth", "absent.pth"):
        with pytest.raises(MethodError) as err:
            model.load_official(str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    before = model.refiner.bn0.running_var.clone()
    with pytest.raises(MethodError, match="missing"):
        model.load_official(str(tmp_path / "partial.pth"))
    assert torch.equal(model.refiner.bn0.running_var, before)  # strict: nothing loaded


# ---- Cityscapes: HRNetV2-W18-Small-v2 + OCR, three refiners (spec §2.2, §3.1, §4.1, §6, §7.4) ----------------------

OCR = "ocr_distri_head.object_context_block"
SPEC_PREFIXES = {  # spec §6, the HRNet-W18s-OCR row
    "conv1", "bn1", "conv2", "bn2", "layer1.0", "layer1.1", "transition1.0", "transition1.1", "stage2.0",
    "transition2.2", "stage3.0", "stage3.1", "stage3.2", "transition3.3", "stage4.0", "stage4.1", "conv3x3_ocr.0",
    "conv3x3_ocr.1", *(f"{OCR}.{f}.{i}" for f in ("f_pixel", "f_object") for i in ("0", "1.0", "2", "3.0")),
    *(f"{OCR}.{f}.{i}" for f in ("f_down", "f_up") for i in ("0", "1.0")), "ocr_distri_head.conv_bn_dropout.0",
    "ocr_distri_head.conv_bn_dropout.1.0", "cls_head", "aux_head.0", "aux_head.1", "aux_head.3"}


def _prefix(key: str) -> str:
    parts = key.split(".")
    for depth in (5, 4, 3, 2, 1):  # the longest spec prefix the key starts with
        if ".".join(parts[:depth]) in SPEC_PREFIXES:
            return ".".join(parts[:depth])
    return key


def cityscapes(**kw) -> mg.MagNet:
    """The release's Cityscapes configuration (19 classes); on a 64x128 image tiles are 8x16 (native / 16)."""
    torch.manual_seed(0)
    return build_method("magnet", 19, **{**mg.MagNet.CITYSCAPES, **kw}).eval()


def test_hrnet_ocr_counts_and_key_layout():
    net = hrnet.HRNetOCR(19)
    assert count_parameters(net) == 6_379_278  # spec §3.1 and its breakdown
    assert net.parameter_counts() == {"hrnet": 3_860_720, "conv3x3_ocr": 1_245_696, "ocr_distri_head": 1_184_256,
                                      "aux_head": 78_859, "cls_head": 9_747}
    state = net.state_dict()
    assert len(state) == 924 and {_prefix(k) for k in state} == SPEC_PREFIXES
    assert state["transition1.1.0.0.weight"].shape == (36, 256, 3, 3)
    assert state["stage4.1.fuse_layers.3.0.2.0.weight"].shape == (144, 18, 3, 3)  # 3 strided convs from branch 0
    assert state["stage2.0.fuse_layers.0.1.0.weight"].shape == (18, 36, 1, 1)
    assert net.conv1.stride == net.conv2.stride == (1, 1)  # the stride-1 stem (full_os)
    assert net.bn1.momentum == 0.01 and net.aux_head[1].momentum == net.conv3x3_ocr[1].momentum == 0.1


def test_hrnet_ocr_output_is_the_aux_blend_at_the_input_size():
    torch.manual_seed(0)
    net = seed_weights(hrnet.HRNetOCR(19), 5).eval()
    x = torch.randn(2, 3, 16, 32)
    with torch.no_grad():
        feats = net.features(x)
        out, aux = net(x, with_aux=True)
        mixed = net(x)
    assert feats.shape == (2, 270, 16, 32)  # four branches at the input resolution (stride-1 stem)
    assert out.shape == aux.shape == mixed.shape == (2, 19, 16, 32)
    assert not torch.allclose(out, aux, atol=1e-3)
    assert torch.allclose(mixed, (out + 0.4 * aux) / 1.4, atol=1e-6)
    with torch.no_grad():  # the OCR gather is per image: a batch gives each image's own output
        assert torch.allclose(net(x[1:]), mixed[1:], atol=1e-4)


def test_cityscapes_configuration_is_the_release_schedule():
    model = cityscapes()
    assert model.schedule(1024, 2048) == ([(128, 256), (256, 512), (512, 1024), (1024, 2048)], (128, 256),
                                          (128, 256), 10)
    assert [len(mg.patch_boxes(s, (128, 256))) for s in model.schedule(1024, 2048)[0]] == [1, 4, 16, 64]
    assert model.smooth_kernel == 5 and model.n_points == 32768 and len(model.refiner) == 3
    assert model.release_files() == ("cityscapes_hrnet.pth", ["cityscapes_refinement_512.pth",
                                                              "cityscapes_refinement_1024.pth",
                                                              "cityscapes_refinement_2048.pth"])
    assert model.parameter_counts()["total"] == 6_689_778  # spec §3.1, whole system
    assert build_method("magnet", 19, backbone="hrnet18+ocr").hrnet  # upstream's spelling
    for bad in ({"backbone": "hrnet48_ocr"}, {"refiners": 2}):
        with pytest.raises(MethodError) as err:
            cityscapes(**bad)
        assert "\n" not in str(err.value)


def test_each_stage_runs_its_own_refiner():
    model = cityscapes(n_points=128)
    calls = []
    for i, ref in enumerate(model.refiner):
        ref.register_forward_hook(lambda m, a, o, i=i: calls.append((i, tuple(o.shape[-2:]))))
    with torch.no_grad():
        out = model.predict(torch.randint(0, 256, (1, 3, 64, 128), dtype=torch.uint8))
    assert out.shape == (1, 19, 64, 128)
    # sub-batches of 4 tiles of 8x16: stage 1 (4 tiles) refiner 0, stage 2 (16) refiner 1, stage 3 (64) refiner 2
    assert calls == [(0, (8, 16))] + [(1, (8, 16))] * 4 + [(2, (8, 16))] * 16


def test_cityscapes_phases_train_the_aux_output_and_the_drawn_stages_refiners():
    model = cityscapes().train()
    images = torch.randint(0, 256, (3, 3, 64, 128), dtype=torch.uint8)
    labels = torch.randint(0, 19, (3, 64, 128))
    model.set_phase("backbone")
    terms = model.forward_train(images, labels)
    assert set(terms) == {"loss_seg", "loss_aux"}
    terms["loss_aux"].backward()
    assert model.backbone.aux_head[3].weight.grad.abs().sum() > 0 and model.backbone.cls_head.weight.grad is None
    model.zero_grad(set_to_none=True)
    model.set_phase("refiner")
    stages = iter([1, 3, 3])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mg.random, "randrange", lambda *a: next(stages) if len(a) == 2 else 0)
        terms = model.forward_train(images, labels)
    sum(terms.values()).backward()
    got = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters()) for r in model.refiner]
    assert got == [True, False, True]


def test_cityscapes_release_round_trip_and_one_line_errors(tmp_path):
    source = seed_weights(cityscapes(), 3)
    source.save_official(str(tmp_path / "release"))
    names = sorted(p.name for p in (tmp_path / "release").iterdir())
    assert names == ["cityscapes_hrnet.pth", "cityscapes_refinement_1024.pth", "cityscapes_refinement_2048.pth",
                     "cityscapes_refinement_512.pth"]
    backbone = torch.load(tmp_path / "release" / "cityscapes_hrnet.pth")
    assert len(backbone) == 924 and {_prefix(k) for k in backbone} == SPEC_PREFIXES
    target = cityscapes()
    report = target.load_official(str(tmp_path / "release"))
    assert report.clean and len(report.loaded) == 924 + 3 * 60
    theirs = target.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in source.state_dict().items())
    # the trainer's best.pth (`model.` keys, loss weights) and a lone refiner file go where they are told
    trainer = {f"model.{k}": v for k, v in source.backbone.state_dict().items()}
    trainer["loss.criterion.weight"] = torch.ones(19)
    torch.save(trainer, tmp_path / "best.pth")
    torch.save(source.refiner[2].state_dict(), tmp_path / "epoch49.pth")
    fresh = cityscapes()
    assert fresh.load_official(str(tmp_path / "best.pth")).skipped == ["loss.criterion.weight"]
    before = fresh.refiner[1].state_dict()
    fresh.load_official(str(tmp_path / "epoch49.pth"), refiner=0)
    assert torch.equal(fresh.refiner[0].conv1.weight, source.refiner[2].conv1.weight)
    assert all(torch.equal(v, fresh.refiner[1].state_dict()[k]) for k, v in before.items())
    torch.save(small().backbone.state_dict(), tmp_path / "fpn.pth")  # a DeepGlobe backbone
    torch.save(hrnet.HRNetOCR(7).state_dict(), tmp_path / "hrnet7.pth")  # 7 classes
    for name, kw, message in (("fpn.pth", {}, "unexpected"), ("hrnet7.pth", {}, "cls_head.weight"),
                              ("epoch49.pth", {}, "refiner=")):
        with pytest.raises(MethodError, match=message) as err:
            fresh.load_official(str(tmp_path / name), **kw)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "release" / "cityscapes_refinement_1024.pth").unlink()
    with pytest.raises(MethodError, match="cityscapes_refinement_1024.pth"):
        fresh.load_official(str(tmp_path / "release"))


def test_hrnet_imagenet_file_merges_by_name(tmp_path):
    donor = seed_weights(hrnet.HRNetOCR(19), 4)
    state = {f"model.{k}".replace("aux_head", "last_layer"): v for k, v in donor.state_dict().items()
             if not k.startswith(("cls_head", "conv3x3_ocr", "ocr_"))}
    torch.save(state, tmp_path / "hrnet_w18_v2_imagenet.pth")
    model = cityscapes(pretrained=str(tmp_path / "hrnet_w18_v2_imagenet.pth"))
    assert torch.equal(model.backbone.stage4[1].branches[3][1].conv2.weight,
                       donor.stage4[1].branches[3][1].conv2.weight)
    assert torch.equal(model.backbone.aux_head[0].weight, donor.aux_head[0].weight)
    assert not torch.equal(model.backbone.cls_head.weight, donor.cls_head.weight)
    with pytest.raises(MethodError, match="does not exist"):
        cityscapes(pretrained=str(tmp_path / "absent.pth"))


def test_cv2_resize_integer_downscales_and_reference_values():
    x = torch.randint(0, 256, (1, 3, 16, 16)).float()
    half = cv2_linear_resize(x, (8, 8))  # OpenCV's INTER_AREA fast path: (a + b + c + d + 2) >> 2
    blocks = x.view(1, 3, 8, 2, 8, 2).sum((3, 5))
    assert torch.equal(half, torch.div(blocks + 2, 4, rounding_mode="floor"))
    quarter = cv2_linear_resize(x, (4, 4))  # bilinear taps 4i + 1, 4i + 2 at 1/2 each
    sub = x[..., 1::4, :][..., :, 1::4] + x[..., 1::4, :][..., :, 2::4] + x[..., 2::4, :][..., :, 1::4] \
        + x[..., 2::4, :][..., :, 2::4]
    assert torch.equal(quarter, torch.div(sub + 2, 4, rounding_mode="floor"))
    assert torch.equal(cv2_linear_resize(x, (16, 16)), x)
    # cv2.resize(a, (5, 3), interpolation=cv2.INTER_LINEAR) of a = (np.arange(42) * 37 % 256).reshape(6, 7), OpenCV 5.1
    a = torch.from_numpy((np.arange(42) * 37 % 256).reshape(1, 1, 6, 7)).float()
    assert cv2_linear_resize(a, (3, 5)).view(3, 5).long().tolist() == CV2_REFERENCE
    labels = torch.arange(16).view(1, 4, 4)
    assert nearest_resize(labels, (2, 2)).tolist() == [[[0, 2], [8, 10]]]


CV2_REFERENCE = [[9, 61, 113, 164, 216], [15, 67, 119, 170, 222], [21, 73, 125, 176, 228]]
