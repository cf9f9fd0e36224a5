"""URUR: no direct download (--source required, the error says where to get it); a local copy is converted."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
from datasets_fixtures import png_bytes
from PIL import Image

from datasets import urur
from datasets.base import DatasetError, PreparedDataset, get_dataset


def test_source_is_required_and_says_where_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as err:
        urur.prepare(tmp_path / "data" / "urur", None)
    assert "pan.baidu.com/s/14mUaovxu0ha1skWm57pf1A" in str(err.value) and "--source" in str(err.value)
    info = get_dataset("urur").info
    assert info.num_classes == 8 and info.counted_classes == tuple(range(8)) and info.headline == "miou"


def test_convert_label_index_and_rgb():
    label, off = urur.convert_label(np.array([[0, 7, 9]], np.uint8))
    assert label.tolist() == [[0, 7, 255]] and off == 1
    rgb = np.array([[[230, 230, 230], [240, 100, 80], [1, 2, 3]]], np.uint8)
    label, off = urur.convert_label(rgb)
    assert label.tolist() == [[1, 7, 255]] and off == 1


def test_rue_layout_archive(tmp_path):
    rng = np.random.default_rng(0)
    archive = tmp_path / "URUR.zip"
    expected = {}
    with zipfile.ZipFile(archive, "w") as zf:
        for split, n in (("train", 2), ("val", 1), ("test", 1)):
            for i in range(n):
                name = f"{split}_{i}"
                label = rng.integers(0, 8, (40, 40)).astype(np.uint8)
                if name == "train_1":
                    label[0, 0] = 12
                image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                zf.writestr(f"URUR/imgs/{split}/{name}.png", png_bytes(image))
                zf.writestr(f"URUR/labels/{split}/{name}.png", png_bytes(label))
                expected[name] = np.where(label > 7, 255, label)
    out = tmp_path / "data" / "urur"
    with pytest.raises(DatasetError, match=r"train: 2 images found, expected 2157"):
        urur.prepare(out, archive, tile_size=40, progress=False, workers=1)
    summary = urur.prepare(out, archive, tile_size=40, expected_counts={"train": 2, "val": 1, "test": 1},
                           progress=False, workers=1)
    assert summary["splits"] == {"train": 2, "val": 1, "test": 1} and summary["off_class_pixels"] == {"train_1": 1}
    for name, label in expected.items():
        assert np.array_equal(np.asarray(Image.open(out / "labels" / f"{name}.png")), label)
    assert PreparedDataset(out, "test").ids == ["test_0"]
