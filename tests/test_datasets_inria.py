"""Inria Aerial: five-part 7z over HTTP -> inner zip -> verify -> prepare (0/255 -> 0/1), offline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets_fixtures import ServerState, inria_7z_parts, inria_inner_zip, md5, serve
from PIL import Image

from datasets import inria
from datasets.base import DatasetError, PreparedDataset, get_dataset

SPLITS = {"train": ["austin10", "chicago1"], "val": ["tyrol-w2"], "test": ["vienna3"]}  # real FCtL ids
IDS = [i for ids in SPLITS.values() for i in ids]


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(inria.dl, "RETRY_BACKOFF", 0.01)


def test_info_metric_convention():
    info = get_dataset("inria").info
    assert info.headline == "iou:building" and info.counted_classes == (0, 1)
    assert info.class_names == ("background", "building") and info.native_size == (5000, 5000)
    lists = {s: (inria.dl.SPLITS_DIR / f"inria_{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert [len(v) for v in lists.values()] == [126, 27, 27] and len(set().union(*lists.values())) == 180


def test_download_route_multipart_7z_end_to_end(tmp_path):
    inner, expected = inria_inner_zip(IDS)
    parts = inria_7z_parts(tmp_path / "upstream", inner)
    state = ServerState(files={f"/aerial/{p.name}": p.read_bytes() for p in parts},
                        cut_once={f"/aerial/{parts[2].name}": 100})  # part 3 drops mid-way, then resumes
    out = tmp_path / "data" / "inria"
    with serve(state) as url:
        summary = inria.prepare(out, None, tile_size=48, split_lists=SPLITS, workers=2, progress=False,
                                base_url=f"{url}/aerial", part_sizes=[p.stat().st_size for p in parts],
                                zip_md5=md5(inner))
    assert summary["num_images"] == 4 and summary["missing"] == 0
    assert [h.get("Range") for _, p, h in state.log if p.endswith(".003")] == [None, "bytes=100-"]
    for tile in IDS:
        label = np.asarray(Image.open(out / "labels" / f"{tile}.png"))
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        assert np.array_equal(label, expected[tile])
    ds = PreparedDataset(out, "val")
    image, label, tile = ds[0]
    assert image.shape == (3, 48, 48) and tile == "tyrol-w2" and int(label.max()) <= 1
    raw = tmp_path / "data" / "raw" / "inria"
    assert (raw / "NEW2-AerialImageDataset.zip").is_file() and not (raw / "extracted" / "AerialImageDataset" /
                                                                     "test").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["info"]["headline"] == "iou:building" and meta["complete"]


def test_wrong_part_size_rejected_without_partial_file(tmp_path):
    inner, _ = inria_inner_zip(IDS[:1])
    parts = inria_7z_parts(tmp_path / "upstream", inner)
    state = ServerState(files={f"/aerial/{p.name}": p.read_bytes() for p in parts})
    sizes = [p.stat().st_size for p in parts]
    sizes[0] += 1
    with serve(state) as url, pytest.raises(DatasetError, match=r"checksum failed for aerialimagelabeling.7z.001"):
        inria.prepare(tmp_path / "data" / "inria", None, base_url=f"{url}/aerial", part_sizes=sizes, progress=False)
    assert not list((tmp_path / "data" / "raw" / "inria").glob("*.part"))


def test_source_zip_wrong_size_and_bad_md5(tmp_path):
    inner, _ = inria_inner_zip(IDS)
    zpath = tmp_path / "NEW2-AerialImageDataset.zip"
    zpath.write_bytes(inner)
    out = tmp_path / "data" / "inria"
    with pytest.raises(DatasetError) as err:
        inria.prepare(out, zpath, tile_size=64, split_lists=SPLITS, progress=False)
    message = str(err.value)
    assert "NEW2-AerialImageDataset.zip: md5" in message and "train/images/austin10.tif: 48x48, expected 64x64" in \
        message
    summary = inria.prepare(out, zpath, tile_size=48, split_lists=SPLITS, progress=False, workers=1,
                            allow_incomplete=True)  # the md5 differs (fixture), tolerated with --allow-incomplete
    assert summary["num_images"] == 4


def test_corrupt_download_rejected_by_inner_md5(tmp_path):
    inner, _ = inria_inner_zip(IDS[:1])
    parts = inria_7z_parts(tmp_path / "upstream", inner)
    state = ServerState(files={f"/aerial/{p.name}": p.read_bytes() for p in parts})
    with serve(state) as url, pytest.raises(DatasetError) as err:
        inria.prepare(tmp_path / "data" / "inria", None, base_url=f"{url}/aerial", part_sizes=None, zip_md5="0" * 32,
                      progress=False)
    assert "NEW2-AerialImageDataset.zip: md5" in str(err.value) and "corrupt" in str(err.value)
    assert not (tmp_path / "data" / "raw" / "inria" / "NEW2-AerialImageDataset.zip").exists()


# --- _convert, one tile in-process: the labels, counts and error messages prepare() relies on ---------------------

def _inria_job(tmp_path, gt, image, tile="austin1"):
    """A job in Inria's layout: train/images/<id>.tif and train/gt/<id>.tif (the same file name in both)."""
    src, out = tmp_path / "train", tmp_path / "out"
    for folder in (src / "images", src / "gt", out / "images", out / "labels"):
        folder.mkdir(parents=True, exist_ok=True)
    gt_path, image_path = src / "gt" / f"{tile}.tif", src / "images" / f"{tile}.tif"
    (gt if isinstance(gt, Image.Image) else Image.fromarray(gt)).save(gt_path, format="TIFF")
    if isinstance(image, bytes):
        image_path.write_bytes(image)
    else:
        image.save(image_path, format="TIFF")
    return (tile, str(image_path), str(gt_path), str(out)), out


def test_convert_tile_thresholds_greyscale_gt_at_128_and_counts_off_values(tmp_path):
    """gt 0/255 -> 0/1, thresholded at 128 inclusive (127 background, 128 building); values other than 0/255 are
    counted; counts are [background, building]. A non-square tile with a greyscale image (written as RGB)."""
    gt = np.array([[0, 127, 128, 255], [255, 255, 255, 0]], np.uint8)  # 2 high, 4 wide
    grey = Image.fromarray(np.array([[0, 40, 80, 120], [160, 200, 240, 255]], np.uint8))  # mode L
    job, out = _inria_job(tmp_path, gt, grey)
    assert inria._convert(job) == {"id": "austin1", "error": None, "off_values": 2, "counts": [3, 5]}
    with Image.open(out / "labels" / "austin1.png") as lab:
        assert lab.mode == "L" and np.asarray(lab).tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    with Image.open(out / "images" / "austin1.png") as img:
        assert img.mode == "RGB" and img.size == (4, 2)
        assert np.array_equal(np.asarray(img)[..., 0], np.asarray(grey)) and np.ptp(np.asarray(img), axis=2).max() == 0


def test_convert_tile_off_values_count_every_value_other_than_0_and_255(tmp_path):
    gt = np.array([[0, 0, 1, 127, 128, 254, 255, 255, 255]], np.uint8)
    job, out = _inria_job(tmp_path, gt, Image.new("RGB", (9, 1)))
    assert inria._convert(job) == {"id": "austin1", "error": None, "off_values": 4, "counts": [4, 5]}
    with Image.open(out / "labels" / "austin1.png") as lab:
        assert np.asarray(lab).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1]]


def test_convert_tile_accepts_a_bilevel_gt(tmp_path):
    """A 1-bit ("1" mode) gt TIFF is the same 0/255 mask packed: True = building, nothing off-value."""
    bits = np.array([[True, False, True], [False, False, True]])
    gt = Image.fromarray(bits)
    assert gt.mode == "1"
    job, out = _inria_job(tmp_path, gt, Image.new("RGB", (3, 2)))
    assert inria._convert(job) == {"id": "austin1", "error": None, "off_values": 0, "counts": [3, 3]}
    with Image.open(out / "labels" / "austin1.png") as lab:
        assert lab.mode == "L" and np.asarray(lab).tolist() == [[1, 0, 1], [0, 0, 1]]


def test_convert_tile_size_mismatch_names_the_image_and_both_sizes(tmp_path):
    job, out = _inria_job(tmp_path, np.zeros((2, 4), np.uint8), Image.new("RGB", (5, 7)))
    assert inria._convert(job) == {"id": "austin1", "error": "austin1.tif: 5x7 but its gt is 4x2"}
    assert not any(out.rglob("*.png"))


@pytest.mark.parametrize("mode, text", [("RGB", "8-bit RGB (RGB)"), ("I;16", "16-bit (I;16)"),
                                        ("LA", "greyscale with alpha (LA)")])
def test_convert_tile_refuses_a_gt_not_in_the_official_format(tmp_path, mode, text):
    job, out = _inria_job(tmp_path, Image.new(mode, (4, 2)), Image.new("RGB", (4, 2)))
    assert inria._convert(job) == {
        "id": "austin1", "error": f"austin1.tif: cannot be converted (austin1.tif: {text} label file, expected an "
                                  "8-bit single-channel 0/255 TIFF (Inria's official gt))"}
    assert not any(out.rglob("*.png"))


def test_convert_tile_unreadable_files_are_reported_against_that_file(tmp_path):
    job, _ = _inria_job(tmp_path, np.zeros((2, 4), np.uint8), b"not a tiff")
    result = inria._convert(job)
    assert set(result) == {"id", "error"} and result["id"] == "austin1"
    assert result["error"].startswith("austin1.tif: cannot be converted (")
    Path(job[2]).write_bytes(b"not a tiff either")  # now the gt is the first bad file
    result = inria._convert(job)
    assert set(result) == {"id", "error"} and result["id"] == "austin1"
    assert result["error"].startswith("austin1.tif: cannot be converted (")


def test_convert_tile_full_disk_stops_the_run_instead_of_blaming_the_tile(tmp_path, monkeypatch):
    import errno

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    job, _ = _inria_job(tmp_path, np.zeros((2, 4), np.uint8), Image.new("RGB", (4, 2)))
    monkeypatch.setattr(inria.dl, "save_png", full)
    with pytest.raises(OSError) as err:
        inria._convert(job)
    assert err.value.errno == errno.ENOSPC
