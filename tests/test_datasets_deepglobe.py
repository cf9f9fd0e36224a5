"""DeepGlobe: Kaggle download -> verify -> extract -> prepare, offline against a local server and fixture archives."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from datasets_fixtures import ServerState, deepglobe_zip, serve
from PIL import Image

from datasets import deepglobe
from datasets.base import DatasetError, PreparedDataset, get_dataset

SPLITS = {"train": ["100694", "102122", "10452"], "val": ["107781"], "test": ["114577"]}  # real GLNet ids
IDS = [i for ids in SPLITS.values() for i in ids]


def _check_prepared(root, expected):
    ds = PreparedDataset(root, "train")
    assert ds.ids == SPLITS["train"]
    image, label, tile = ds[0]
    assert image.shape == (3, 64, 64) and tile == "100694"
    for t in IDS:
        got = np.asarray(Image.open(root / "labels" / f"{t}.png"))
        assert np.array_equal(got, expected[t]), t
    assert (root / "splits" / "test.txt").read_text() == "114577\n"


def test_info_metric_convention():
    info = get_dataset("deepglobe").info
    assert info.counted_classes == (1, 2, 3, 4, 5, 6) and info.class_names[0] == "unknown"
    assert info.headline == "miou" and info.native_size == (2448, 2448)
    lists = {s: (deepglobe.dl.SPLITS_DIR / f"deepglobe_{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert [len(v) for v in lists.values()] == [454, 207, 142] and len(set().union(*lists.values())) == 803


def test_convert_mask_thresholds_and_counts_off_palette():
    mask = np.array([[[0, 255, 255], [100, 250, 120], [250, 5, 3], [255, 255, 255]]], np.uint8)
    label, off, ignored = deepglobe.convert_mask(mask)
    assert label.tolist() == [[1, 4, 255, 6]] and off == 2 and ignored == 1


def test_kaggle_route_end_to_end(tmp_path, monkeypatch):
    archive = tmp_path / "kaggle.zip"
    expected = deepglobe_zip(archive, IDS, layout="kaggle")
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cr3t-key")
    token = "Basic " + base64.b64encode(b"alice:s3cr3t-key").decode()
    api = "/api/v1/datasets/download/balraj98/deepglobe-land-cover-classification-dataset"
    state = ServerState(require={api: ("Authorization", token)})
    with serve(state) as url:
        storage = url.replace("127.0.0.1", "localhost") + "/bucket/archive.zip?X-Goog-Signature=abc"
        state.redirects[api] = storage
        state.files["/bucket/archive.zip?X-Goog-Signature=abc"] = archive.read_bytes()
        out = tmp_path / "data" / "deepglobe"
        summary = deepglobe.prepare(out, None, tile_size=64, split_lists=SPLITS, workers=2, progress=False,
                                    kaggle_api=f"{url}/api/v1")
    assert summary["num_images"] == 5 and summary["missing"] == 0
    _check_prepared(out, expected)
    raw = tmp_path / "data" / "raw" / "deepglobe"
    assert (raw / "deepglobe-land-cover-classification-dataset.zip").is_file()
    assert not any("valid" in str(p) for p in raw.rglob("*"))  # unlabelled folders not extracted
    assert all("Authorization" not in h for _, p, h in state.log if p.startswith("/bucket"))
    for path in [*out.rglob("*.json"), *out.rglob("*.txt"), *raw.rglob("*.json")]:
        assert "s3cr3t" not in path.read_text()


def test_missing_kaggle_credentials_say_how_to_fix(tmp_path, monkeypatch):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DatasetError) as err:
        deepglobe.prepare(tmp_path / "data" / "deepglobe", None, split_lists=SPLITS, progress=False)
    message = str(err.value)
    assert "KAGGLE_USERNAME" in message and "KAGGLE_KEY" in message and str(tmp_path / ".kaggle" / "kaggle.json") in \
        message and "--source" in message
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "bob", "key": "k"}))
    assert deepglobe.kaggle_credentials() == ("bob", "k")


def test_source_problems_reported_by_file_name(tmp_path, capsys):
    archive = tmp_path / "land-train.zip"
    expected = deepglobe_zip(archive, IDS, layout="official", wrong_size="102122", off_palette="10452")
    out = tmp_path / "data" / "deepglobe"
    with pytest.raises(DatasetError) as err:
        deepglobe.prepare(out, archive, tile_size=64, split_lists=SPLITS, workers=1, progress=False)
    assert "102122_sat.jpg: 32x32, expected 64x64" in str(err.value) and "--allow-incomplete" in str(err.value)
    assert not (out / "meta.json").exists()

    summary = deepglobe.prepare(out, archive, tile_size=64, split_lists=SPLITS, workers=1, progress=False,
                                allow_incomplete=True)
    assert summary["num_images"] == 4 and summary["off_palette"] == {"10452_mask.png": 2}
    assert "10452_mask.png (2 px)" in capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["missing"]["train"] == ["102122"] and not meta["complete"]
    assert meta["off_palette_pixels"] == {"10452_mask.png": 2}
    assert np.array_equal(np.asarray(Image.open(out / "labels" / "10452.png")), expected["10452"])
    assert (out / "splits" / "train.txt").read_text() == "100694\n10452\n"


def test_missing_split_id_and_overwrite_guard(tmp_path):
    source = tmp_path / "src"
    archive = tmp_path / "a.zip"
    deepglobe_zip(archive, IDS[:-1], layout="kaggle")  # 114577 (test split) absent
    deepglobe.dl.safe_extract(archive, source, progress=False)
    out = tmp_path / "data" / "deepglobe"
    with pytest.raises(DatasetError, match=r"114577_sat.jpg: missing \(id '114577' is in the test split list\)"):
        deepglobe.prepare(out, source, tile_size=64, split_lists=SPLITS, workers=1, progress=False)
    deepglobe.prepare(out, source, tile_size=64, split_lists=SPLITS, workers=1, progress=False, allow_incomplete=True)
    assert (out / "splits" / "test.txt").read_text() == ""
    with pytest.raises(DatasetError, match="already holds a prepared deepglobe dataset; pass --force"):
        deepglobe.prepare(out, source, tile_size=64, split_lists=SPLITS, workers=1, progress=False,
                          allow_incomplete=True)
    deepglobe.prepare(out, source, tile_size=64, split_lists={"train": IDS[:2]}, workers=1, progress=False,
                      force=True)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["100694.png", "102122.png"]


def test_cli_prepare_with_source_force_and_allow_incomplete(tmp_path):
    import yaml
    from click.testing import CliRunner
    from conftest import REPO

    from bench import cli

    archive = tmp_path / "land-train.zip"
    deepglobe_zip(archive, IDS[:2], layout="official")
    lists = tmp_path / "lists"
    lists.mkdir()
    for split in ("train", "val", "test"):
        (lists / f"deepglobe_{split}.txt").write_text("".join(f"{i}\n" for i in SPLITS[split]))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data_root"] = str(tmp_path / "data")
    raw["datasets"]["deepglobe"].update(tile_size=64, split_lists=str(lists), workers=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    run = CliRunner().invoke
    base = ["prepare", "--dataset", "deepglobe", "--params", str(params), "--source", str(archive)]
    result = run(cli, base)
    assert result.exit_code == 1 and "10452_sat.jpg: missing" in result.output and "--allow-incomplete" in \
        result.output
    result = run(cli, [*base, "--allow-incomplete"])
    assert result.exit_code == 0, result.output
    assert "prepared deepglobe: 2 images" in result.output
    result = run(cli, [*base, "--allow-incomplete"])
    assert result.exit_code == 1 and "pass --force" in result.output
    result = run(cli, [*base, "--allow-incomplete", "--force"])
    assert result.exit_code == 0, result.output


def test_convert_mask_threshold_is_at_128_inclusive():
    """The DeepGlobe convention (specs datasets): a channel counts as on from 128 up. JPEG-ish values at the edge,
    127 and 128, must fall on either side of it."""
    mask = np.array([[[0, 128, 128], [0, 127, 127], [128, 128, 0], [127, 127, 0], [0, 0, 128], [0, 0, 127]]],
                    np.uint8)
    label, off, _ = deepglobe.convert_mask(mask)
    assert label.tolist() == [[1, 0, 2, 0, 5, 0]]  # urban, -, agriculture, -, water, - (127s are off: unknown)
    assert off == 6  # none of them is an exact palette colour


# --- _convert, one tile in-process: the labels, counts and error messages prepare() relies on ---------------------

def _dg_job(tmp_path, mask, image, tile="100694"):
    """A DeepGlobe job tuple for `mask` (array or PIL image) and `image` (PIL image or raw bytes)."""
    src, out = tmp_path / "src", tmp_path / "out"
    for folder in (src, out / "images", out / "labels"):
        folder.mkdir(parents=True, exist_ok=True)
    mask_path, image_path = src / f"{tile}_mask.png", src / f"{tile}_sat.jpg"
    (mask if isinstance(mask, Image.Image) else Image.fromarray(mask)).save(mask_path, format="PNG")
    if isinstance(image, bytes):
        image_path.write_bytes(image)
    else:
        image.save(image_path, format="JPEG")
    return (tile, str(image_path), str(mask_path), str(out)), out


def test_convert_tile_writes_rgb_image_and_class_ids_and_returns_exact_counts(tmp_path):
    """A non-square 2x4 tile (width 4) with a greyscale JPEG: the image is written as RGB, the mask as an 8-bit id
    PNG; the result carries the off-palette count (red included), the ignore count and per-class pixel counts."""
    mask = np.array([[[0, 255, 255], [0, 255, 255], [255, 255, 0], [250, 10, 5]],   # urban urban agri red->255
                     [[100, 250, 120], [255, 255, 255], [0, 0, 255], [0, 0, 0]]],  # forest(off) barren water unk
                    np.uint8)
    grey = Image.fromarray(np.array([[0, 40, 80, 120], [160, 200, 240, 255]], np.uint8))  # mode L
    job, out = _dg_job(tmp_path, mask, grey)
    result = deepglobe._convert(job)
    assert result == {"id": "100694", "error": None, "off_palette": 2, "ignored": 1,
                      "counts": [1, 2, 1, 0, 1, 1, 1, 1]}  # unknown..barren, then ignore (255)
    with Image.open(out / "labels" / "100694.png") as lab:
        assert lab.mode == "L" and lab.size == (4, 2)
        assert np.asarray(lab).tolist() == [[1, 1, 2, 255], [4, 6, 5, 0]]
    with Image.open(out / "images" / "100694.png") as img, Image.open(job[1]) as src:
        assert img.mode == "RGB" and img.size == (4, 2)  # a greyscale JPEG is stored as RGB
        assert np.array_equal(np.asarray(img), np.asarray(src.convert("RGB")))


def test_convert_tile_size_mismatch_names_the_image_and_both_sizes(tmp_path):
    mask = np.zeros((2, 4, 3), np.uint8)  # 4 wide, 2 high
    job, out = _dg_job(tmp_path, mask, Image.new("RGB", (5, 7)))
    assert deepglobe._convert(job) == {"id": "100694", "error": "100694_sat.jpg: 5x7 but its mask is 4x2"}
    assert not any(out.rglob("*.png"))


@pytest.mark.parametrize("mode, text", [("L", "8-bit greyscale (L)"), ("RGBA", "RGB with alpha (RGBA)"),
                                        ("P", "8-bit palette (P)")])
def test_convert_tile_refuses_a_mask_not_in_the_official_format(tmp_path, mode, text):
    """A mask that is not 8-bit RGB is never converted: the error names the mask file and the expected format."""
    mask = Image.new(mode, (4, 2))
    job, out = _dg_job(tmp_path, mask, Image.new("RGB", (4, 2)))
    assert deepglobe._convert(job) == {
        "id": "100694", "error": f"100694_mask.png: cannot be converted (100694_mask.png: {text} label file, "
                                 "expected an 8-bit RGB PNG (DeepGlobe's official masks))"}
    assert not any(out.rglob("*.png"))


def test_convert_tile_unreadable_files_are_reported_against_that_file(tmp_path):
    job, _ = _dg_job(tmp_path, np.zeros((2, 4, 3), np.uint8), b"not a jpeg at all")
    result = deepglobe._convert(job)
    assert set(result) == {"id", "error"} and result["id"] == "100694"
    assert result["error"].startswith("100694_sat.jpg: cannot be converted (")
    Path(job[2]).write_bytes(b"truncated png")  # now the mask is the first bad file
    result = deepglobe._convert(job)
    assert set(result) == {"id", "error"} and result["id"] == "100694"
    assert result["error"].startswith("100694_mask.png: cannot be converted (")


def test_convert_tile_full_disk_stops_the_run_instead_of_blaming_the_tile(tmp_path, monkeypatch):
    import errno

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    job, _ = _dg_job(tmp_path, np.zeros((2, 4, 3), np.uint8), Image.new("RGB", (4, 2)))
    monkeypatch.setattr(deepglobe.dl, "save_png", full)
    with pytest.raises(OSError) as err:
        deepglobe._convert(job)
    assert err.value.errno == errno.ENOSPC
