"""Cityscapes: login + download of the two packages -> verify -> extract -> labelIds to trainIds, offline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets_fixtures import ServerState, cityscapes_zips, md5, serve
from PIL import Image

from datasets import cityscapes
from datasets.base import DatasetError, PreparedDataset, get_dataset

TRAIN = ["aachen_000000_000019", "bochum_000000_000313", "aachen_000001_000019"]
VAL = ["frankfurt_000000_000294"]


def test_label_mapping_and_info():
    lut = cityscapes.LABEL_TO_TRAIN
    assert lut[7] == 0 and lut[26] == 13 and lut[33] == 18 and lut[0] == 255 and lut[34] == 255
    assert sorted(set(lut.tolist())) == [*range(19), 255]
    info = get_dataset("cityscapes").info
    assert info.num_classes == 19 and info.counted_classes == tuple(range(19)) and info.native_size == (1024, 2048)


def test_download_route_end_to_end(tmp_path, monkeypatch):
    gt, left, labels = cityscapes_zips(tmp_path / "upstream", TRAIN, VAL)
    monkeypatch.setenv("CITYSCAPES_USERNAME", "carol")
    monkeypatch.setenv("CITYSCAPES_PASSWORD", "pa55word!")
    files = {"/file-handling/?packageID=1": gt.read_bytes(), "/file-handling/?packageID=3": left.read_bytes(),
             "/md5-sum/?packageID=1": f"{md5(gt.read_bytes())}  gtFine_trainvaltest.zip".encode(),
             "/md5-sum/?packageID=3": f"{md5(left.read_bytes())}  leftImg8bit_trainvaltest.zip".encode()}
    state = ServerState(files=files, login=("carol", "pa55word!"), cookie_paths=set(files))
    out = tmp_path / "data" / "cityscapes"
    with serve(state) as url:
        summary = cityscapes.prepare(out, None, expected_counts={"train": 3, "val": 1}, image_size=(32, 64),
                                     workers=2, progress=False, base_url=url)
    assert summary["splits"] == {"train": 3, "val": 1, "test": 1}
    for tile in TRAIN + VAL:
        got = np.asarray(Image.open(out / "labels" / f"{tile}.png"))
        assert np.array_equal(got, cityscapes.LABEL_TO_TRAIN[labels[tile]])
        assert set(np.unique(got).tolist()) <= {*range(19), 255}
    assert (out / "splits" / "test.txt").read_text() == (out / "splits" / "val.txt").read_text() == f"{VAL[0]}\n"
    image, label, _ = PreparedDataset(out, "train")[0]
    assert image.shape == (3, 32, 64) and label.shape == (32, 64)
    for path in [*out.rglob("*.json"), *out.rglob("*.txt"), *(tmp_path / "data" / "raw").rglob("*.json")]:
        assert "pa55word" not in path.read_text()
    unzipped = tmp_path / "data" / "raw" / "cityscapes" / "unzipped" / "gtFine_trainvaltest" / "gtFine"
    assert (unzipped / "train").is_dir() and not (unzipped / "test").exists()  # the test split is not extracted


def test_wrong_password_and_missing_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    monkeypatch.delenv("CITYSCAPES_PASSWORD", raising=False)
    with pytest.raises(DatasetError, match="set CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD"):
        cityscapes.prepare(tmp_path / "data" / "cityscapes", None, progress=False)
    monkeypatch.setenv("CITYSCAPES_USERNAME", "carol")
    monkeypatch.setenv("CITYSCAPES_PASSWORD", "wrong-secret")
    with serve(ServerState(login=("carol", "right"))) as url, pytest.raises(DatasetError) as err:
        cityscapes.prepare(tmp_path / "data" / "cityscapes", None, progress=False, base_url=url)
    assert "login failed" in str(err.value) and "wrong-secret" not in str(err.value)


def test_source_folder_counts_and_sizes(tmp_path):
    gt, left, _ = cityscapes_zips(tmp_path / "src", TRAIN, VAL)
    out = tmp_path / "data" / "cityscapes"
    with pytest.raises(DatasetError) as err:
        cityscapes.prepare(out, tmp_path / "src", progress=False, workers=1)
    assert "train: 3 image/label pairs found" in str(err.value) and "expected 2975" in str(err.value)
    report = (tmp_path / "data" / "raw" / "cityscapes" / "problems.txt").read_text()
    assert "train/aachen_000000_000019_leftImg8bit.png: 64x32, expected 2048x1024\n" in report
    summary = cityscapes.prepare(out, tmp_path / "src", progress=False, workers=1, image_size=(32, 64),
                                 allow_incomplete=True)
    assert summary["num_images"] == 4
    meta = json.loads((out / "meta.json").read_text())
    assert not meta["complete"] and meta["test_split"].startswith("val")


# --- _convert, one tile in-process: the labels, counts and error messages prepare() relies on ---------------------

TILE = "aachen_000000_000019"


def _cs_job(tmp_path, label, image):
    src, out = tmp_path / "src", tmp_path / "out"
    for folder in (src, out / "images", out / "labels"):
        folder.mkdir(parents=True, exist_ok=True)
    label_path, image_path = src / f"{TILE}_gtFine_labelIds.png", src / f"{TILE}_leftImg8bit.png"
    (label if isinstance(label, Image.Image) else Image.fromarray(label)).save(label_path, format="PNG")
    if isinstance(image, bytes):
        image_path.write_bytes(image)
    else:
        image.save(image_path, format="PNG")
    return (TILE, str(image_path), str(label_path), str(out)), out


def _counts(per_train_id: dict[int, int], ignore: int = 0) -> list[int]:
    """The `counts` a converted tile reports: pixels of trainIds 0..18, then of ignore (255)."""
    return [per_train_id.get(i, 0) for i in range(19)] + [ignore]


def test_convert_tile_maps_label_ids_to_train_ids_and_counts_them(tmp_path):
    """labelIds -> trainIds (road 7 -> 0, car 26 -> 13, bicycle 33 -> 18; unlabeled 0 and any id above 33 -> ignore
    255) on a non-square tile; the RGB image is kept pixel for pixel."""
    label_ids = np.array([[7, 7, 26, 33], [0, 255, 26, 26]], np.uint8)  # 2 high, 4 wide
    image = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(2, 4, 3))
    job, out = _cs_job(tmp_path, label_ids, image)
    assert cityscapes._convert(job) == {"id": TILE, "error": None, "counts": _counts({0: 2, 13: 3, 18: 1}, ignore=2)}
    with Image.open(out / "labels" / f"{TILE}.png") as lab:
        assert lab.mode == "L" and np.asarray(lab).tolist() == [[0, 0, 13, 18], [255, 255, 13, 13]]
    with Image.open(out / "images" / f"{TILE}.png") as img:
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(image))


def test_convert_tile_accepts_a_palette_label_ids_png_without_ignore_pixels(tmp_path):
    """A labelIds PNG saved in palette mode (P) holds the same ids; a tile with no ignore pixel counts 0 ignore."""
    label_ids = Image.fromarray(np.array([[7, 8, 11], [33, 33, 7]], np.uint8)).convert("P")
    label_ids.putpalette([v for i in range(256) for v in (i, i, i)])
    assert label_ids.mode == "P"
    job, out = _cs_job(tmp_path, label_ids, Image.new("RGB", (3, 2)))
    with Image.open(job[2]) as check:
        assert check.mode == "P" and np.asarray(check).tolist() == [[7, 8, 11], [33, 33, 7]]
    assert cityscapes._convert(job) == {"id": TILE, "error": None, "counts": _counts({0: 2, 1: 1, 2: 1, 18: 2})}
    with Image.open(out / "labels" / f"{TILE}.png") as lab:
        assert np.asarray(lab).tolist() == [[0, 1, 2], [18, 18, 0]]


def test_convert_tile_size_mismatch_names_the_image_and_both_sizes(tmp_path):
    job, out = _cs_job(tmp_path, np.full((2, 4), 7, np.uint8), Image.new("RGB", (5, 7)))
    assert cityscapes._convert(job) == {"id": TILE, "error": f"{TILE}_leftImg8bit.png: 5x7 but its label is 4x2"}
    assert not any(out.rglob("*.png"))


@pytest.mark.parametrize("mode, text", [("RGB", "8-bit RGB (RGB)"), ("I;16", "16-bit (I;16)"),
                                        ("RGBA", "RGB with alpha (RGBA)")])
def test_convert_tile_refuses_a_label_not_in_the_official_format(tmp_path, mode, text):
    """e.g. the *_gtFine_color.png content or a 16-bit PNG in place of labelIds: refused, naming file and format."""
    job, out = _cs_job(tmp_path, Image.new(mode, (4, 2)), Image.new("RGB", (4, 2)))
    name = f"{TILE}_gtFine_labelIds.png"
    assert cityscapes._convert(job) == {
        "id": TILE, "error": f"{name}: cannot be converted ({name}: {text} label file, expected an 8-bit "
                             "single-channel *_gtFine_labelIds.png)"}
    assert not any(out.rglob("*.png"))


def test_convert_tile_unreadable_files_are_reported_against_that_file(tmp_path):
    job, _ = _cs_job(tmp_path, np.full((2, 4), 7, np.uint8), b"not a png")
    result = cityscapes._convert(job)
    assert set(result) == {"id", "error"} and result["id"] == TILE
    assert result["error"].startswith(f"{TILE}_leftImg8bit.png: cannot be converted (")
    Path(job[2]).write_bytes(b"not a png either")  # now the label is the first bad file
    result = cityscapes._convert(job)
    assert set(result) == {"id", "error"} and result["id"] == TILE
    assert result["error"].startswith(f"{TILE}_gtFine_labelIds.png: cannot be converted (")


def test_convert_tile_full_disk_stops_the_run_instead_of_blaming_the_tile(tmp_path, monkeypatch):
    import errno

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    job, _ = _cs_job(tmp_path, np.full((2, 4), 7, np.uint8), Image.new("RGB", (4, 2)))
    monkeypatch.setattr(cityscapes.dl, "save_png", full)
    with pytest.raises(OSError) as err:
        cityscapes._convert(job)
    assert err.value.errno == errno.ENOSPC
