"""The synthetic dataset: determinism, class make-up, fine-structure widths, prepared layout, parameter errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import synthetic
from datasets.base import DatasetError, DecodeCache, PreparedDataset, get_dataset, read_split
from datasets.synthetic import BARREN, FOREST, RANGELAND, URBAN, WATER, generate_image, prepare

LAND = (synthetic.AGRICULTURE, RANGELAND, FOREST, BARREN)


def _box_sum(mask: np.ndarray, k: int) -> np.ndarray:
    """Sum of each k x k window (top-left anchored), via an integral image."""
    c = np.pad(mask.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]


def _opening(mask: np.ndarray, k: int) -> np.ndarray:
    """Morphological opening by a k x k square: the pixels covered by some k x k window lying wholly in the mask."""
    full = _box_sum(mask, k) == k * k
    return _box_sum(np.pad(full, k - 1), k) > 0


def _kept(mask: np.ndarray, k: int) -> float:
    """Share of the mask's pixels that survive an opening by k x k (structures at least k px thick)."""
    return float(_opening(mask, k)[mask].sum() / max(1, mask.sum()))


@pytest.fixture(scope="module")
def labels_256() -> np.ndarray:
    return np.stack([generate_image(256, 0, i)[1] for i in range(6)])


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("*/*.png"))}


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    kw = dict(image_size=128, num_images=3, splits={"train": 2, "val": 1, "test": 0}, progress=False)
    prepare(tmp_path / "a", seed=5, workers=1, **kw)
    prepare(tmp_path / "b", seed=5, workers=2, **kw)
    prepare(tmp_path / "c", seed=6, workers=1, **kw)
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert len(a) == 6 and a.keys() == b.keys() == c.keys()
    assert a == b  # byte-identical, whatever the worker count
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))


def test_every_class_present_and_urban_water_are_fine(labels_256):
    counts = np.bincount(labels_256.ravel(), minlength=7) / labels_256.size
    assert (counts > 0.003).all(), counts  # all 7 classes, none negligible
    assert 0.02 < counts[URBAN] < 0.10, counts
    # Nearest 4x down- then up-sampling: thin classes lose a large share, large regions keep almost everything
    # (measured: urban keeps 0.62, thin water 0.61, land classes 0.94-0.96 for this seed).
    coarse = labels_256[:, ::4, ::4].repeat(4, 1).repeat(4, 2)
    kept = {c: float((coarse[labels_256 == c] == c).mean()) for c in range(7)}
    assert kept[URBAN] < 0.75, kept
    thin_water = np.stack([(lab == WATER) & ~_opening(lab == WATER, 9) for lab in labels_256])
    # Lakes are few and large on 256 px images, so the thin share varies (measured 0.33, 1.0, 0.86 for seeds 0-2).
    assert thin_water.sum() > 0.25 * (labels_256 == WATER).sum()
    assert (coarse[thin_water] == WATER).mean() < 0.75
    assert all(kept[c] > 0.85 for c in LAND), kept


def test_roads_buildings_rivers_are_2_to_8_px(monkeypatch):
    monkeypatch.setattr(synthetic, "LAKE_RATE", 0.0)  # without lakes, all water is river
    labels = [generate_image(384, 3, i)[1] for i in range(3)]
    for cls in (URBAN, WATER):
        masks = [lab == cls for lab in labels]
        assert all(m.any() for m in masks)
        # A 9x9 square fits only where two lines cross (junctions; measured 0-3% of the pixels over seeds 3-5),
        # while almost every pixel lies in some 2x2 square (nothing 1 px thin; measured 0.93-1.0).
        assert max(_kept(m, 9) for m in masks) < 0.05, cls
        assert min(_kept(m, 2) for m in masks) > 0.9, cls


def test_large_regions_and_lakes_at_1024():
    image, label = generate_image(1024, 0, 1)
    assert image.shape == (1024, 1024, 3) and image.dtype == np.uint8 and label.dtype == np.uint8
    water = label == WATER
    assert _kept(water, 9) > 0.5  # lakes: water is not only thin
    for c in LAND:
        assert _kept(label == c, 9) > 0.85
    # Classes differ in colour: mean RGB of forest is darker and greener than barren's.
    assert image[label == FOREST].mean() < image[label == BARREN].mean() - 60


def test_grass_class_comes_from_its_surroundings_not_its_look():
    """Pasture (grass in farmland: agriculture) and rangeland (grass in the wild) are drawn alike, so only context
    tells them apart; and zones span several regions, so the surroundings do carry that context."""
    pasture, rangeland, parcels, zone_agreement = [], [], [], []
    for index in range(3):
        image, label = generate_image(1024, 0, index)
        region, look_of, cls_of, farm = synthetic.land_cover(np.random.default_rng([0, index]), 1024)
        land = np.isin(label, LAND)  # not road, river, lake, building or no-data
        assert (label[land] == cls_of[region][land]).all()  # land_cover is the layout generate_image drew
        look = look_of[region]
        grass = land & (look == RANGELAND)
        assert (grass & (label == synthetic.AGRICULTURE)).mean() > 0.05 and (grass & (label == RANGELAND)).mean() > 0.05
        pasture.append(image[grass & (label == synthetic.AGRICULTURE)])
        rangeland.append(image[grass & (label == RANGELAND)])
        parcels.append(image[land & (look == synthetic.AGRICULTURE)])
        left, right = region[:, :-1], region[:, 1:]
        border = left != right
        zone_agreement.append((farm[left[border]] == farm[right[border]]).mean())
    pasture, rangeland, parcels = (np.concatenate(x).astype(np.float64) for x in (pasture, rangeland, parcels))
    # Measured: mean RGB differs by at most 5 levels between pasture and rangeland, 21 between pasture and parcels;
    # per-channel spread 12-15 for both grasses, 19-33 for parcels.
    assert np.abs(pasture.mean(0) - rangeland.mean(0)).max() < 8
    assert np.abs(pasture.mean(0) - parcels.mean(0)).max() > 15
    assert np.abs(pasture.std(0) - rangeland.std(0)).max() < 4 < (parcels.std(0) - pasture.std(0)).min()
    # Most region borders (measured 0.67-0.79) join regions of the same zone: neighbours predict the zone.
    assert min(zone_agreement) > 0.6


def test_prepared_layout_is_readable_and_stale_files_go(tmp_path):
    assert get_dataset("synthetic").info is synthetic.INFO
    out = tmp_path / "synthetic"
    prepare(out, image_size=96, num_images=6, splits={"train": 4, "val": 1, "test": 1}, workers=1, progress=False)
    summary = prepare(out, image_size=96, num_images=4, splits={"train": 2, "val": 1, "test": 1}, workers=1,
                      progress=False, force=True)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"syn_000{i}.png" for i in range(4)]
    assert len(list((out / "labels").iterdir())) == 4
    assert [read_split(out, s) for s in ("train", "val", "test")] == [["syn_0000", "syn_0001"], ["syn_0002"],
                                                                       ["syn_0003"]]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dataset"] == "synthetic" and meta["params"]["num_images"] == 4 and meta["params"]["seed"] == 0
    assert meta["info"]["class_names"][1] == "urban" and meta["info"]["native_size"] == [96, 96]
    assert sum(meta["class_pixels"]["train"].values()) == 2 * 96 * 96
    assert summary["splits"] == {"train": 2, "val": 1, "test": 1}
    assert abs(sum(summary["class_fractions"].values()) - 1) < 1e-3
    ds = PreparedDataset(out, "train")
    assert len(ds) == 2
    image, label, image_id = ds[1]
    assert image_id == "syn_0001"
    assert image.dtype == torch.uint8 and image.shape == (3, 96, 96)
    assert label.dtype == torch.int64 and label.shape == (96, 96) and int(label.max()) <= 6
    with Image.open(out / "labels" / "syn_0001.png") as lab:
        assert lab.mode == "L"


def test_decode_cache_serves_the_same_samples_within_its_budget(tmp_path, monkeypatch):
    out = tmp_path / "synthetic"
    prepare(out, image_size=64, num_images=4, splits={"train": 2, "val": 1, "test": 1}, workers=1, progress=False)
    reads = []
    original = PreparedDataset._read
    monkeypatch.setattr(PreparedDataset, "_read", lambda self, i: reads.append(i) or original(self, i))

    def darken(image, label):  # an in-place transform must not reach the cached arrays
        image //= 2
        label[:] = 0
        return image, label

    plain = [PreparedDataset(out, "train")[i] for i in (0, 1)]
    one_image = 64 * 64 * 3 + 64 * 64  # decoded RGB + label bytes
    cache = DecodeCache(max_mib=1.5 * one_image / 2**20)  # room for one of the two
    cached = PreparedDataset(out, "train", transform=darken, cache=cache)
    reads.clear()
    for _ in range(3):
        samples = [cached[i] for i in (0, 1)]
    assert reads == ["syn_0000", "syn_0001", "syn_0001", "syn_0001"]  # the first stays, the second does not fit
    assert cache.used == one_image
    for (image, label, _), (ref_image, _, _) in zip(samples, plain, strict=True):
        assert torch.equal(image, ref_image // 2) and int(label.max()) == 0


@pytest.mark.parametrize("kwargs, key", [
    (dict(num_images=5), "datasets.synthetic.splits"),
    (dict(splits={"train": 20, "val": 2, "dev": 2}), "datasets.synthetic.splits"),
    (dict(image_size=32), "datasets.synthetic.image_size"),
    (dict(num_images=0, splits={"train": 0}), "datasets.synthetic.num_images"),
    (dict(seed="zero"), "datasets.synthetic.seed"),
    (dict(source="raw/"), "--source"),
])
def test_bad_params_name_the_key(tmp_path, kwargs, key):
    source = kwargs.pop("source", None)
    with pytest.raises(DatasetError, match=key.replace(".", r"\.")):
        prepare(tmp_path, source, progress=False, **kwargs)
    assert not (tmp_path / "meta.json").exists()


def test_full_deepglobe_size_and_empty_splits(tmp_path):
    prepare(tmp_path, image_size=2448, num_images=1, splits={"train": 1, "val": 0, "test": 0}, workers=1,
            progress=False)
    assert read_split(tmp_path, "val") == [] and (tmp_path / "splits" / "test.txt").read_text() == ""
    image, label, _ = PreparedDataset(tmp_path, "train")[0]
    assert image.shape == (3, 2448, 2448) and label.shape == (2448, 2448)
    assert set(np.unique(label.numpy())) == set(range(7))
