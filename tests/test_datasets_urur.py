"""URUR: no direct download (--source required, the error says where to get it); a local copy is converted."""
from __future__ import annotations

import zipfile
from pathlib import Path

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


def test_convert_label_index_values_above_7_become_ignore():
    index = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 254, 255, 7, 7, 0, 0]], np.uint8)
    before = index.copy()
    label, off = urur.convert_label(index)
    assert label.dtype == np.uint8 and off == 4
    assert label.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [255, 255, 255, 255, 7, 7, 0, 0]]
    assert np.array_equal(index, before)  # the caller's array is left alone


def test_convert_label_rgb_every_palette_colour_and_off_palette_ones():
    """All 8 README colours map to their class (first and last of the sorted palette included); colours below,
    between and above the palette's become ignore and are counted."""
    palette = [list(c) for c in urur.INFO.palette]
    off_colours = [[255, 255, 255], [255, 255, 101], [0, 0, 1], [1, 2, 3], [230, 230, 231]]
    rgb = np.array([palette + off_colours], np.uint8)
    label, off = urur.convert_label(rgb)
    assert label.dtype == np.uint8 and label.shape == (1, 13)
    assert label.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 255, 255, 255, 255, 255]] and off == 5


# --- _convert, one tile in-process: the labels, counts and error messages prepare() relies on ---------------------

def _urur_job(tmp_path, label, image, tile="city_0001"):
    src, out = tmp_path / "src", tmp_path / "out"
    for folder in (src / "imgs", src / "labels", out / "images", out / "labels"):
        folder.mkdir(parents=True, exist_ok=True)
    label_path, image_path = src / "labels" / f"{tile}.png", src / "imgs" / f"{tile}.jpg"
    (label if isinstance(label, Image.Image) else Image.fromarray(label)).save(label_path, format="PNG")
    if isinstance(image, bytes):
        image_path.write_bytes(image)
    else:
        image.save(image_path, format="JPEG" if image.mode in ("RGB", "L") else "PNG")
    return (tile, str(image_path), str(label_path), str(out)), out


def test_convert_tile_rgb_colour_label(tmp_path):
    """An RGB label is mapped by the README palette on a non-square tile (2 high, 4 wide); the off-palette pixel is
    ignore (255) and counted; counts are the 8 classes then ignore; a greyscale image is stored as RGB."""
    rgb = np.array([[[0, 0, 0], [230, 230, 230], [240, 100, 80], [240, 100, 80]],
                    [[255, 255, 100], [9, 9, 9], [0, 0, 0], [0, 0, 0]]], np.uint8)
    grey = Image.fromarray(np.array([[0, 40, 80, 120], [160, 200, 240, 255]], np.uint8))  # mode L
    job, out = _urur_job(tmp_path, rgb, grey)
    assert urur._convert(job) == {"id": "city_0001", "error": None, "off": 1, "counts": [3, 1, 0, 0, 0, 1, 0, 2, 1]}
    with Image.open(out / "labels" / "city_0001.png") as lab:
        assert lab.mode == "L" and np.asarray(lab).tolist() == [[0, 1, 7, 7], [5, 255, 0, 0]]
    with Image.open(out / "images" / "city_0001.png") as img, Image.open(job[1]) as src:
        assert img.mode == "RGB" and img.size == (4, 2)
        assert np.array_equal(np.asarray(img), np.asarray(src.convert("RGB")))


@pytest.mark.parametrize("mode", ["L", "P"])
def test_convert_tile_index_label(tmp_path, mode):
    """A single-channel index label (greyscale or palette PNG) is taken as class ids 0-7; above 7 -> ignore."""
    index = Image.fromarray(np.array([[0, 3, 7], [12, 6, 6]], np.uint8))
    if mode == "P":
        index = index.convert("P")
        index.putpalette(np.asarray(urur.INFO.palette + ((0, 0, 0),) * 248, np.uint8).ravel().tolist())
    job, out = _urur_job(tmp_path, index, Image.new("RGB", (3, 2)))
    with Image.open(job[2]) as check:
        assert check.mode == mode and np.asarray(check).tolist() == [[0, 3, 7], [12, 6, 6]]
    assert urur._convert(job) == {"id": "city_0001", "error": None, "off": 1, "counts": [1, 0, 0, 1, 0, 0, 2, 1, 1]}
    with Image.open(out / "labels" / "city_0001.png") as lab:
        assert np.asarray(lab).tolist() == [[0, 3, 7], [255, 6, 6]]


def test_convert_tile_size_mismatch_names_the_image_and_both_sizes(tmp_path):
    job, out = _urur_job(tmp_path, np.zeros((2, 4), np.uint8), Image.new("RGB", (5, 7)))
    assert urur._convert(job) == {"id": "city_0001", "error": "city_0001.jpg: 5x7 but its label is 4x2"}
    assert not any(out.rglob("*.png"))


@pytest.mark.parametrize("mode, text", [("RGBA", "RGB with alpha (RGBA)"), ("I;16", "16-bit (I;16)"),
                                        ("1", "1-bit (1)")])
def test_convert_tile_refuses_a_label_not_in_an_accepted_format(tmp_path, mode, text):
    job, out = _urur_job(tmp_path, Image.new(mode, (4, 2)), Image.new("RGB", (4, 2)))
    assert urur._convert(job) == {
        "id": "city_0001", "error": f"city_0001.png: cannot be converted (city_0001.png: {text} label file, expected "
                                    "an 8-bit RGB colour or single-channel index PNG)"}
    assert not any(out.rglob("*.png"))


def test_convert_tile_unreadable_files_are_reported_against_that_file(tmp_path):
    job, _ = _urur_job(tmp_path, np.zeros((2, 4), np.uint8), b"not an image")
    result = urur._convert(job)
    assert set(result) == {"id", "error"} and result["id"] == "city_0001"
    assert result["error"].startswith("city_0001.jpg: cannot be converted (")
    Path(job[2]).write_bytes(b"not a png")  # now the label is the first bad file
    result = urur._convert(job)
    assert set(result) == {"id", "error"} and result["id"] == "city_0001"
    assert result["error"].startswith("city_0001.png: cannot be converted (")


def test_convert_tile_full_disk_stops_the_run_instead_of_blaming_the_tile(tmp_path, monkeypatch):
    import errno

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    job, _ = _urur_job(tmp_path, np.zeros((2, 4), np.uint8), Image.new("RGB", (4, 2)))
    monkeypatch.setattr(urur.dl, "save_png", full)
    with pytest.raises(OSError) as err:
        urur._convert(job)
    assert err.value.errno == errno.ENOSPC
