"""URUR (Ji et al., CVPR 2023): 3008 ultra-high-resolution images (5120x5120) from 63 cities, 8 classes.

Provenance (docs/specs/datasets.md section 4): the only source is Baidu Pan
https://pan.baidu.com/s/14mUaovxu0ha1skWm57pf1A (password 75x6), per the `jankyee/URUR` README; there is no direct
download, checksum, size or licence, so `--source` is required. The official train/val/test split is defined by the
archive's folders (2157/280/571 per the paper, unverified: checked by default, overridable with `expected_counts`).
Class order and palette follow the URUR README (others = 0 ... road = 7; RUE lists "others" last, which only changes
per-class reporting). Labels are index PNGs 0-7 (RUE loads them as-is); an RGB label is mapped by the README palette.
Values outside 0-7 / off-palette colours become ignore (255) and are reported by file name. Metric: 8-class mIoU.

Layouts recognised under the source (an archive or a folder): `<imgs|images|image|img>/<split>/*` +
`<labels|label|gt|masks|mask|annotations>/<split>/*` (RUE), or `<split>/<image dir>/*` + `<split>/<label dir>/*`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from datasets import download as dl
from datasets.base import SPLITS, DatasetError, DatasetInfo, register_dataset

BAIDU_URL = "https://pan.baidu.com/s/14mUaovxu0ha1skWm57pf1A"
EXPECTED_COUNTS = {"train": 2157, "val": 280, "test": 571}  # URUR paper, unverified
TILE_SIZE = 5120

INFO = DatasetInfo(
    name="urur",
    description="URUR (CVPR 2023): 3008 images of 5120x5120, 8 classes; --source required (Baidu Pan only)",
    class_names=("others", "building", "farmland", "greenhouse", "woodland", "bareland", "water", "road"),
    palette=((0, 0, 0), (230, 230, 230), (95, 163, 7), (100, 100, 100), (200, 230, 160), (255, 255, 100),
             (150, 200, 250), (240, 100, 80)),
    native_size=(TILE_SIZE, TILE_SIZE),
    counted_classes=tuple(range(8)),
    headline="miou",
)

_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}
_IMAGE_DIRS = {"imgs", "images", "image", "img"}
_LABEL_DIRS = {"labels", "label", "gt", "masks", "mask", "annotations", "ann", "ann_dir"}
_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
_SUFFIX = re.compile(r"_(sat|img|image|label|labels|mask|gt)$", re.IGNORECASE)


def _classify(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """(split, 'image'|'label') from the two folders above a file, or None."""
    if len(parts) < 3 or os.path.splitext(parts[-1])[1].lower() not in _EXTS:
        return None
    a, b = parts[-3].lower(), parts[-2].lower()
    for split_dir, kind_dir in ((b, a), (a, b)):
        if split_dir in _SPLIT_NAMES and (kind_dir in _IMAGE_DIRS or kind_dir in _LABEL_DIRS):
            return _SPLIT_NAMES[split_dir], "image" if kind_dir in _IMAGE_DIRS else "label"
    return None


def _wanted(name: str) -> bool:
    return _classify(tuple(name.split("/"))) is not None


def find_pairs(root: Path) -> dict[str, dict[str, dict[str, Path]]]:
    entries: dict[str, list] = {s: [] for s in SPLITS}
    for folder, _dirs, files in sorted(os.walk(root)):
        rel = Path(folder).relative_to(root).parts
        for name in sorted(files):
            hit = _classify(("", "", *rel, name)[-3:])
            if hit:
                split, kind = hit
                entries[split].append((_SUFFIX.sub("", os.path.splitext(name)[0]), kind, Path(folder) / name))
    return {split: dl.tile_index(found, Path(root)) for split, found in entries.items()}


_PALETTE = np.asarray(INFO.palette, np.int32)
_KEYS = (_PALETTE[:, 0] << 16) | (_PALETTE[:, 1] << 8) | _PALETTE[:, 2]
_ORDER = np.argsort(_KEYS)
_SORTED = _KEYS[_ORDER]


def convert_label(array: np.ndarray) -> tuple[np.ndarray, int]:
    """Index (H, W) or RGB (H, W, 3) label -> class ids 0-7, 255 for anything else; returns the count of those."""
    if array.ndim == 2:
        label = array.astype(np.uint8, copy=True)
        bad = label > 7
    else:
        key = (array[..., 0].astype(np.int32) << 16) | (array[..., 1].astype(np.int32) << 8) | array[..., 2]
        index = np.clip(np.searchsorted(_SORTED, key), 0, len(_SORTED) - 1)
        hit = _SORTED[index] == key
        label = np.where(hit, _ORDER[index], 255).astype(np.uint8)
        bad = ~hit
    label[bad] = 255
    return label, int(np.count_nonzero(bad))


def _convert(job: tuple[str, str, str, str]) -> dict:
    tile, image_path, label_path, out_dir = job
    current = label_path  # the file a failure is reported against
    try:
        raw = dl.read_label(label_path, ("RGB", "L", "P"), "an 8-bit RGB colour or single-channel index PNG")
        label, off = convert_label(raw)
        current = image_path
        with Image.open(image_path) as img:
            if img.size != (label.shape[1], label.shape[0]):
                return {"id": tile, "error": f"{Path(image_path).name}: {img.size[0]}x{img.size[1]} but its label "
                                             f"is {label.shape[1]}x{label.shape[0]}"}
            dl.write_image_png(img, image_path, Path(out_dir) / "images" / f"{tile}.png")
        dl.save_png(Image.fromarray(label, mode="L"), Path(out_dir) / "labels" / f"{tile}.png")
        counts = np.bincount(label.ravel(), minlength=256)
        return {"id": tile, "error": None, "off": off, "counts": [int(c) for c in counts[:8]] + [int(counts[255])]}
    except Exception as exc:  # noqa: BLE001
        if dl.fatal_write_error(exc):
            raise
        return {"id": tile, "error": f"{Path(current).name}: cannot be converted ({exc})"}


def prepare(out_dir: Path, source: Path | None = None, *, force: bool = False, allow_incomplete: bool = False,
            expected_counts=None, tile_size: int | None = TILE_SIZE, workers: int = 2, progress: bool = True,
            raw_root: str | None = None) -> dict:
    """Verify and convert a local URUR copy (archive or folder) into the prepared layout; --source is required."""
    if source is None:
        raise DatasetError(f"URUR has no direct download: get it from Baidu Pan {BAIDU_URL} (password 75x6, see "
                           "github.com/jankyee/URUR), then run `python bench.py prepare --dataset urur --source PATH` "
                           "(the archive or the extracted folder) or set datasets.urur.source in params.yaml")
    out_dir = Path(out_dir)
    expected_counts = dict(EXPECTED_COUNTS if expected_counts is None else expected_counts)
    src = dl.source_path(source, INFO.name)
    dl.guard_output(out_dir, INFO.name, force)
    raw = dl.raw_dir(out_dir, INFO.name, raw_root)
    root = src if src.is_dir() else dl.extract_once(src, raw / f"extracted-{src.name}", select=_wanted,
                                                     progress=progress)
    pairs = find_pairs(root)
    hw = (tile_size, tile_size) if tile_size else None
    counts, problems, good = [], [], {}
    for split in SPLITS:
        ok = []
        for tile, files in sorted(pairs[split].items()):
            found = dl.pair_problems(files, {
                kind: (f"{split}/{files[other].name if other in files else tile}: its {kind} is missing", f"{split}/")
                for kind, other in (("image", "label"), ("label", "image"))}, hw)
            problems += found
            if not found:
                ok.append(tile)
        good[split] = ok
        want = expected_counts.get(split)
        if want is not None and len(pairs[split]) != want:
            counts.append(f"{split}: {len(pairs[split])} images found, expected {want} (paper counts, unverified: "
                          "set datasets.urur.expected_counts if your copy differs)")
    dl.check_problems(INFO.name, counts + problems, src, allow_incomplete, raw)

    jobs = [(t, str(pairs[s][t]["image"]), str(pairs[s][t]["label"]), str(out_dir)) for s in SPLITS for t in good[s]]
    done = dl.convert_tiles(_convert, jobs, workers, INFO.name, progress, out_dir, src, allow_incomplete, raw)
    off = {f"{t}": r["off"] for t, r in done.items() if r["off"]}
    if off:
        named = ", ".join(f"{k} ({v} px)" for k, v in list(off.items())[:5])
        dl.info(f"urur: label pixels outside the 8 classes set to ignore (255) in {len(off)} file(s): {named}"
                + (" ..." if len(off) > 5 else "") + "; all counts in meta.json")
    splits = {s: [t for t in good[s] if t in done] for s in SPLITS}
    names = [*INFO.class_names, "ignore"]
    class_pixels = dl.class_pixel_totals(done, splits, names)
    meta = {"source": str(source), "tile_size": tile_size, "expected_counts": expected_counts,
            "complete": not counts and not problems and len(done) == len(jobs),
            "splits": {s: len(v) for s, v in splits.items()},
            "off_class_pixels": off, "class_pixels": class_pixels}
    dl.finish(out_dir, INFO.name, INFO.to_dict(), splits, meta)
    return {"dataset": INFO.name, "out_dir": str(out_dir), "num_images": len(done), "splits": meta["splits"],
            "off_class_pixels": off}


register_dataset(INFO, prepare)
