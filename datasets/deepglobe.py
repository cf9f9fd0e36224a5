"""DeepGlobe Land Cover Classification (CVPR 2018 workshop): 803 labelled 2448x2448 RGB tiles, 7 classes.

Provenance (docs/specs/datasets.md section 1): only the 803 `land-train` tiles have masks; the UHR literature
splits them 454/207/142 with GLNet's lists (`datasets/splits/deepglobe_*.txt`; "455" in papers is a typo). Masks are
RGB PNGs; class ids follow GLNet/ISDNet/RUE (unknown = 0 ... barren = 6, *not* torchgeo's order). The headline is mIoU
over the 6 classes without "unknown" (GLNet `iou[1:]`); unknown is still trained and kept in the confusion matrix.

Obtaining it: `--source` (the Kaggle zip, the official `land-train.zip`, or an extracted folder), or, without it, the
Kaggle copy `balraj98/deepglobe-land-cover-classification-dataset` through Kaggle's REST API (the endpoint the
`kaggle` client calls, `GET /api/v1/datasets/download/<owner>/<slug>` with HTTP basic auth) using the user's own
token: KAGGLE_USERNAME/KAGGLE_KEY or kaggle.json. Kaggle publishes no checksum; the archive's md5 is recorded in
meta.json (set `archive_md5` to enforce one).

Mask conversion: each channel thresholded at 128, the 7 palette colours mapped to ids; pixels that were not exactly a
palette colour are counted per file and reported (never silently mapped); the one thresholded colour outside the
palette, red (255, 0, 0), becomes ignore (255) and is reported too.
"""
from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from datasets import download as dl
from datasets.base import SPLITS, DatasetError, DatasetInfo, register_dataset

KAGGLE_API = "https://www.kaggle.com/api/v1"
KAGGLE_DATASET = "balraj98/deepglobe-land-cover-classification-dataset"
TILE_SIZE = 2448
NUM_LABELLED = 803

INFO = DatasetInfo(
    name="deepglobe",
    description="DeepGlobe Land Cover 2018: 803 labelled 2448x2448 tiles, 7 classes, GLNet split 454/207/142",
    class_names=("unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren"),
    palette=((0, 0, 0), (0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255)),
    native_size=(TILE_SIZE, TILE_SIZE),
    counted_classes=(1, 2, 3, 4, 5, 6),  # mIoU without "unknown" (GLNet / FCtL `iou[1:]`)
    headline="miou",
)

# code = 4*R + 2*G + B of the channels thresholded at 128 -> class id (255: red, not a DeepGlobe colour)
_LUT = np.full(8, 255, np.uint8)
for _cls, (_r, _g, _b) in enumerate(INFO.palette):
    _LUT[4 * (_r >= 128) + 2 * (_g >= 128) + (_b >= 128)] = _cls

_NAME = re.compile(r"^(?P<id>.+)_(?P<kind>sat\.jpg|mask\.png)$")


def kaggle_credentials() -> tuple[str, str]:
    """(username, key) the way the kaggle client finds them; DatasetError with the fix when there are none."""
    user, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if user and key:
        return user, key
    config_dir = os.environ.get("KAGGLE_CONFIG_DIR")
    candidates = [Path(config_dir) / "kaggle.json"] if config_dir else [
        Path.home() / ".kaggle" / "kaggle.json", Path.home() / ".config" / "kaggle" / "kaggle.json"]
    for path in candidates:
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return str(data["username"]), str(data["key"])
            except (ValueError, KeyError, TypeError):
                raise DatasetError(f"{path} is not a valid kaggle.json (needs \"username\" and \"key\"); download "
                                   "a new "
                                   "token from kaggle.com > Settings > API > Create New Token") from None
    where = candidates[0]
    raise DatasetError("downloading DeepGlobe needs a Kaggle API token: set KAGGLE_USERNAME and KAGGLE_KEY, or save "
                       f"kaggle.json (kaggle.com > Settings > API > Create New Token) as {where} (chmod 600); or pass "
                       "--source with the downloaded archive or folder")


def download_kaggle(raw: Path, *, api: str = KAGGLE_API, dataset: str = KAGGLE_DATASET, progress: bool = True) -> Path:
    """The Kaggle archive in `raw`; a finished earlier download is reused (files get their final name only once
    complete), so re-running after `dvc repro` deleted the prepared folder needs neither network nor token."""
    dest = raw / f"{dataset.split('/')[-1]}.zip"
    if dest.is_file():
        return dest
    user, key = kaggle_credentials()
    token = base64.b64encode(f"{user}:{key}".encode()).decode()
    url = f"{api.rstrip('/')}/datasets/download/{dataset}"
    try:
        return dl.download(url, dest, headers={"Authorization": f"Basic {token}"}, progress=progress)
    except dl.DownloadAuthError as exc:
        raise DatasetError(f"{exc}; Kaggle rejected the token from KAGGLE_USERNAME/KAGGLE_KEY or kaggle.json "
                           f"(create a new one), or the dataset {dataset} needs its rules accepted on kaggle.com"
                           ) from None


def _wanted(name: str) -> bool:
    """Archive entries worth extracting: labelled-tile images and masks (not the unlabelled valid/test folders)."""
    parts = name.split("/")
    return bool(_NAME.match(parts[-1])) and not ({"valid", "test"} & set(parts[:-1]))


def find_tiles(root: Path) -> dict[str, dict[str, Path]]:
    """id -> {'image': *_sat.jpg, 'mask': *_mask.png} found anywhere under root (folders without masks ignored)."""
    entries = []
    for folder, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            match = _NAME.match(name)
            if match:
                entries.append((match["id"], "image" if match["kind"] == "sat.jpg" else "mask", Path(folder) / name))
    return dl.tile_index(entries, Path(root))


def convert_mask(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """RGB mask -> (class ids, off-palette pixel count, pixels set to ignore)."""
    bits = mask >= 128
    code = (bits[..., 0].view(np.uint8) << 2) | (bits[..., 1].view(np.uint8) << 1) | bits[..., 2].view(np.uint8)
    label = _LUT[code]
    exact = np.all(mask == bits.view(np.uint8) * np.uint8(255), axis=2)
    ignore = label == 255
    return label, int(np.count_nonzero(~exact | ignore)), int(np.count_nonzero(ignore))


def _convert(job: tuple[str, str, str, str]) -> dict:
    tile, image_path, mask_path, out_dir = job
    current = mask_path  # the file a failure is reported against
    try:
        mask = dl.read_label(mask_path, ("RGB",), "an 8-bit RGB PNG (DeepGlobe's official masks)")
        label, off, ignored = convert_mask(mask)
        current = image_path
        with Image.open(image_path) as img:
            if img.size != (mask.shape[1], mask.shape[0]):
                return {"id": tile, "error": f"{Path(image_path).name}: {img.size[0]}x{img.size[1]} but its mask "
                                             f"is {mask.shape[1]}x{mask.shape[0]}"}
            dl.save_png(img.convert("RGB"), Path(out_dir) / "images" / f"{tile}.png")
        dl.save_png(Image.fromarray(label, mode="L"), Path(out_dir) / "labels" / f"{tile}.png")
        counts = np.bincount(label.ravel(), minlength=256)
        return {"id": tile, "error": None, "off_palette": off, "ignored": ignored,
                "counts": [int(c) for c in counts[:len(INFO.class_names)]] + [int(counts[255])]}
    except Exception as exc:  # noqa: BLE001  (reported by file name, never a worker traceback)
        if dl.fatal_write_error(exc):
            raise
        return {"id": tile, "error": f"{Path(current).name}: cannot be converted ({exc})"}


def prepare(out_dir: Path, source: Path | None = None, *, force: bool = False, allow_incomplete: bool = False,
            tile_size: int | None = TILE_SIZE, split_lists=None, workers: int = 2, progress: bool = True,
            raw_root: str | None = None, kaggle_api: str = KAGGLE_API, kaggle_dataset: str = KAGGLE_DATASET,
            archive_md5: str | None = None) -> dict:
    """Obtain (Kaggle or --source), verify (ids of the split lists, sizes), convert into the prepared layout.

    `tile_size` (None: any) and `split_lists` (a mapping split -> ids, or a folder of <name>_<split>.txt) exist so
    tests can use small fixtures; the defaults are the real 803 tiles of 2448x2448 and GLNet's lists.
    """
    out_dir = Path(out_dir)
    dl.guard_output(out_dir, INFO.name, force)
    raw = dl.raw_dir(out_dir, INFO.name, raw_root)
    lists = dl.load_split_lists(INFO.name, split_lists)
    problems: list[str] = []

    archive = None
    if source is None:
        archive = download_kaggle(raw, api=kaggle_api, dataset=kaggle_dataset, progress=progress)
        root = dl.extract_once(archive, raw / "extracted", select=_wanted, progress=progress)
    else:
        src = dl.source_path(source, INFO.name)
        if src.is_dir():
            root = src
        else:
            archive = src
            root = dl.extract_once(src, raw / f"extracted-{src.name}", select=_wanted, progress=progress)
    archive_sum = None
    if archive is not None:
        archive_sum = dl.file_md5(archive, progress)
        if archive_md5 and archive_sum != archive_md5.lower():
            problems.append(f"{archive.name}: md5 {archive_sum}, expected {archive_md5}")

    tiles = find_tiles(root)
    expected = [(split, tile) for split in SPLITS for tile in lists[split]]
    expected_ids = {tile for _, tile in expected}
    good: set[str] = set()
    hw = (tile_size, tile_size) if tile_size else None
    for split, tile in expected:
        found = dl.pair_problems(tiles.get(tile, {}), {
            kind: (f"{tile}{suffix}: missing (id '{tile}' is in the {split} split list)", "")
            for kind, suffix in (("image", "_sat.jpg"), ("mask", "_mask.png"))}, hw)
        problems += found
        if not found:
            good.add(tile)
    extra = sorted(t for t, f in tiles.items() if t not in expected_ids and "mask" in f)
    if extra:
        dl.info(f"deepglobe: {len(extra)} labelled tile(s) in no split list are ignored: {', '.join(extra[:5])}"
                + (" ..." if len(extra) > 5 else ""))
    dl.check_problems(INFO.name, problems, Path(source) if source else root, allow_incomplete, raw)

    jobs = [(t, str(tiles[t]["image"]), str(tiles[t]["mask"]), str(out_dir)) for _, t in expected if t in good]
    done = dl.convert_tiles(_convert, jobs, workers, INFO.name, progress, out_dir, Path(source) if source else root,
                            allow_incomplete, raw)

    off_palette = {f"{t}_mask.png": r["off_palette"] for t, r in done.items() if r["off_palette"]}
    if off_palette:
        total = sum(off_palette.values())
        named = ", ".join(f"{k} ({v} px)" for k, v in list(off_palette.items())[:5])
        dl.info(f"deepglobe: {total} off-palette mask pixel(s) in {len(off_palette)} file(s), thresholded at 128 "
                f"(red -> ignore 255): {named}" + (" ..." if len(off_palette) > 5 else "")
                + "; all counts in meta.json")
    splits = {s: [t for t in lists[s] if t in done] for s in SPLITS}
    missing = {s: [t for t in lists[s] if t not in done] for s in SPLITS}
    names = [*INFO.class_names, "ignore"]
    class_pixels = dl.class_pixel_totals(done, splits, names)
    meta = {"source": str(source) if source else f"kaggle:{kaggle_dataset}", "archive_md5": archive_sum,
            "tile_size": tile_size, "complete": not any(missing.values()),
            "splits": {s: len(v) for s, v in splits.items()}, "missing": missing,
            "off_palette_pixels": off_palette, "class_pixels": class_pixels}
    dl.finish(out_dir, INFO.name, INFO.to_dict(), splits, meta)
    if any(missing.values()):
        dl.info(f"deepglobe: prepared {len(done)} of {len(expected)} tiles; missing ids are listed in meta.json")
    return {"dataset": INFO.name, "out_dir": str(out_dir), "num_images": len(done),
            "splits": meta["splits"], "missing": sum(map(len, missing.values())), "off_palette": off_palette}


register_dataset(INFO, prepare)
