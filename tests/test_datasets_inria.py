"""Inria Aerial: five-part 7z over HTTP -> inner zip -> verify -> prepare (0/255 -> 0/1), offline."""
from __future__ import annotations

import json

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
