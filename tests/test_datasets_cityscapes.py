"""Cityscapes: login + download of the two packages -> verify -> extract -> labelIds to trainIds, offline."""
from __future__ import annotations

import json

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
