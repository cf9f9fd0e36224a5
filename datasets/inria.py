"""Inria Aerial Image Labeling (IGARSS 2017): 180 labelled 5000x5000 RGB tiles, buildings vs background.

Provenance (docs/specs/datasets.md section 2): public download, five 7-Zip volumes
`https://files.inria.fr/aerialimagelabeling/aerialimagelabeling.7z.001`...`.005` (parts 1-4 of 4,294,967,296 B, part
5 of 3,777,396,691 B, from a third-party script that checks byte counts); they hold `NEW2-AerialImageDataset.zip`
(md5 4b1acfe84ae9961edc1a6049f940380f, torchgeo `InriaAerialImageLabeling.md5`), which holds
`AerialImageDataset/train/{images,gt}/<city><n>.tif`. Ground truth is 0/255 and becomes 0/1 here. Split 126/27/27 from
FCtL `txt_1` (`datasets/splits/inria_*.txt`). The literature's Inria number is the building IoU (FCtL `iou[1:]`,
n_class 2); the 2-class mIoU is reported next to it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from datasets import download as dl
from datasets.base import SPLITS, DatasetError, DatasetInfo, register_dataset

BASE_URL = "https://files.inria.fr/aerialimagelabeling"
PARTS = tuple(f"aerialimagelabeling.7z.{i:03d}" for i in range(1, 6))
PART_SIZES = (4294967296, 4294967296, 4294967296, 4294967296, 3777396691)
INNER_ZIP = "NEW2-AerialImageDataset.zip"
ZIP_MD5 = "4b1acfe84ae9961edc1a6049f940380f"
TILE_SIZE = 5000

INFO = DatasetInfo(
    name="inria",
    description="Inria Aerial Image Labeling: 180 labelled 5000x5000 tiles, building/background, FCtL split 126/27/27",
    class_names=("background", "building"),
    palette=((0, 0, 0), (255, 255, 255)),
    native_size=(TILE_SIZE, TILE_SIZE),
    counted_classes=(0, 1),  # the 2-class mIoU, reported next to the headline
    headline="iou:building",  # the literature's Inria "mIoU" is the building IoU
)

_CITY_ID = re.compile(r"^(austin|chicago|kitsap|tyrol-w|vienna)\d+$")


def _wanted(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 3 and parts[-3] == "train" and parts[-2] in ("images", "gt") and parts[-1].endswith(".tif")


def find_tiles(root: Path) -> dict[str, dict[str, Path]]:
    """id -> {'image': train/images/<id>.tif, 'mask': train/gt/<id>.tif} anywhere under root."""
    entries = []
    for folder, _dirs, files in sorted(os.walk(root)):
        folder_path = Path(folder)
        if folder_path.name not in ("images", "gt"):
            continue
        kind = "image" if folder_path.name == "images" else "mask"
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in (".tif", ".tiff") and _CITY_ID.match(stem):
                entries.append((stem, kind, folder_path / name))
    return dl.tile_index(entries, Path(root))


def download_parts(raw: Path, *, base_url: str = BASE_URL, part_sizes=PART_SIZES, verify_tls: bool = True,
                   progress: bool = True) -> Path:
    """The five volumes in `raw` (finished ones are kept). verify_tls=False accepts a bad certificate on
    files.inria.fr (upstream scripts use `wget --no-check-certificate`); the inner zip's md5 still guards integrity."""
    sizes = list(part_sizes) if part_sizes else [None] * len(PARTS)
    open_url = None
    if not verify_tls:
        import ssl
        import urllib.request

        open_url = dl.opener(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
    for name, size in zip(PARTS, sizes, strict=True):
        try:
            dl.download(f"{base_url.rstrip('/')}/{name}", raw / name, size=size, progress=progress, open_url=open_url)
        except DatasetError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise DatasetError(f"{exc}; files.inria.fr's TLS certificate was not accepted: set "
                                   "datasets.inria.verify_tls=false (the archive is still md5-checked)") from None
            raise
    return raw / PARTS[0]


def inner_zip(archive: Path, raw: Path, zip_md5: str | None, progress: bool, problems: list[str]) -> Path:
    """Extract NEW2-AerialImageDataset.zip from the (multi-part) 7z, once per archive content (a marker holds the
    7z's checksum, so another --source is extracted anew); check its md5."""
    target = raw / INNER_ZIP
    marker = raw / f"{INNER_ZIP}.source.json"
    stamp = {"archive": archive.name, "md5": dl.archive_md5(archive, progress)}
    if not target.is_file() or not marker.is_file() or json.loads(marker.read_text() or "{}") != stamp:
        target.unlink(missing_ok=True)
        tmp = raw / "inner.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        files = dl.safe_extract(archive, tmp, select=lambda n: n.endswith(".zip"), progress=progress)
        if not files:
            raise DatasetError(f"{archive.name} holds no zip (expected {INNER_ZIP}); check the archive")
        os.replace(files[0], target)
        shutil.rmtree(tmp, ignore_errors=True)
        marker.write_text(json.dumps(stamp))
    if zip_md5:
        got = dl.file_md5(target, progress)
        if got != zip_md5.lower():
            problems.append(f"{target.name}: md5 {got}, expected {zip_md5}")
    return target


def _convert(job: tuple[str, str, str, str]) -> dict:
    tile, image_path, mask_path, out_dir = job
    current = mask_path  # the file a failure is reported against
    try:
        gt = dl.read_label(mask_path, ("L", "1"), "an 8-bit single-channel 0/255 TIFF (Inria's official gt)")
        if gt.dtype == bool:  # bilevel TIFF: True = building
            gt = gt.astype(np.uint8) * np.uint8(255)
        label = (gt >= 128).view(np.uint8)
        off = int(np.count_nonzero((gt != 0) & (gt != 255)))
        current = image_path
        with Image.open(image_path) as img:
            if img.size != (gt.shape[1], gt.shape[0]):
                return {"id": tile, "error": f"{Path(image_path).name}: {img.size[0]}x{img.size[1]} but its gt is "
                                             f"{gt.shape[1]}x{gt.shape[0]}"}
            dl.save_png(img.convert("RGB"), Path(out_dir) / "images" / f"{tile}.png")
        dl.save_png(Image.fromarray(label, mode="L"), Path(out_dir) / "labels" / f"{tile}.png")
        building = int(np.count_nonzero(label))
        return {"id": tile, "error": None, "off_values": off, "counts": [label.size - building, building]}
    except Exception as exc:  # noqa: BLE001  (reported by file name)
        if dl.fatal_write_error(exc):
            raise
        return {"id": tile, "error": f"{Path(current).name}: cannot be converted ({exc})"}


def prepare(out_dir: Path, source: Path | None = None, *, force: bool = False, allow_incomplete: bool = False,
            tile_size: int | None = TILE_SIZE, split_lists=None, workers: int = 2, progress: bool = True,
            raw_root: str | None = None, base_url: str = BASE_URL, part_sizes=PART_SIZES,
            zip_md5: str | None = ZIP_MD5, verify_tls: bool = True) -> dict:
    """Obtain (the public 7z volumes or --source), verify, convert 0/255 gt to 0/1 into the prepared layout.

    --source may be the first 7z volume (`*.7z.001`, the others next to it), a single .7z, the inner zip, or a folder.
    `tile_size`, `split_lists`, `part_sizes` (None: unchecked) and `zip_md5` (None: unchecked) are overridable for
    fixtures; the defaults are the real values.
    """
    out_dir = Path(out_dir)
    dl.guard_output(out_dir, INFO.name, force)
    raw = dl.raw_dir(out_dir, INFO.name, raw_root)
    lists = dl.load_split_lists(INFO.name, split_lists)
    problems: list[str] = []

    if source is None:
        first = download_parts(raw, base_url=base_url, part_sizes=part_sizes, verify_tls=verify_tls,
                               progress=progress)
        zipped = inner_zip(first, raw, zip_md5, progress, problems)
        if problems:  # a downloaded archive must match its checksum
            zipped.unlink()
            raise DatasetError(f"{problems[0]}: the downloaded 7z volumes are corrupt; delete "
                               f"{raw / 'aerialimagelabeling.7z.*'} and re-run to download them again")
        root = dl.extract_once(zipped, raw / "extracted", select=_wanted, progress=progress)
    else:
        src = dl.source_path(source, INFO.name)
        if src.is_dir():
            root = src
        else:
            zipped = inner_zip(src, raw, zip_md5, progress, problems) if dl.is_7z(src) else src
            if not dl.is_7z(src) and zip_md5 and src.name == INNER_ZIP:
                got = dl.file_md5(src, progress)
                if got != zip_md5.lower():
                    problems.append(f"{src.name}: md5 {got}, expected {zip_md5}")
            root = dl.extract_once(zipped, raw / f"extracted-{zipped.name}", select=_wanted, progress=progress)

    tiles = find_tiles(root)
    expected = [(split, tile) for split in SPLITS for tile in lists[split]]
    good: set[str] = set()
    hw = (tile_size, tile_size) if tile_size else None
    for split, tile in expected:
        found = dl.pair_problems(tiles.get(tile, {}), {
            kind: (f"{where}/{tile}.tif: missing (id '{tile}' is in the {split} split list)", f"{where}/")
            for kind, where in (("image", "train/images"), ("mask", "train/gt"))}, hw)
        problems += found
        if not found:
            good.add(tile)
    dl.check_problems(INFO.name, problems, Path(source) if source else root, allow_incomplete, raw)

    jobs = [(t, str(tiles[t]["image"]), str(tiles[t]["mask"]), str(out_dir)) for _, t in expected if t in good]
    done = dl.convert_tiles(_convert, jobs, workers, INFO.name, progress, out_dir, Path(source) if source else root,
                            allow_incomplete, raw)

    off_values = {f"gt/{t}.tif": r["off_values"] for t, r in done.items() if r["off_values"]}
    if off_values:
        named = ", ".join(f"{k} ({v} px)" for k, v in list(off_values.items())[:5])
        dl.info(f"inria: gt pixels other than 0/255 (thresholded at 128) in {len(off_values)} file(s): {named}"
                + (" ..." if len(off_values) > 5 else "") + "; all counts in meta.json")
    splits = {s: [t for t in lists[s] if t in done] for s in SPLITS}
    missing = {s: [t for t in lists[s] if t not in done] for s in SPLITS}
    class_pixels = dl.class_pixel_totals(done, splits, INFO.class_names)
    meta = {"source": str(source) if source else public_source(base_url), "tile_size": tile_size,
            "complete": not any(missing.values()), "splits": {s: len(v) for s, v in splits.items()},
            "missing": missing, "off_values": off_values, "class_pixels": class_pixels}
    dl.finish(out_dir, INFO.name, INFO.to_dict(), splits, meta)
    if any(missing.values()):
        dl.info(f"inria: prepared {len(done)} of {len(expected)} tiles; missing ids are listed in meta.json")
    return {"dataset": INFO.name, "out_dir": str(out_dir), "num_images": len(done), "splits": meta["splits"],
            "missing": sum(map(len, missing.values())), "off_values": off_values}


def public_source(base_url: str) -> str:
    return dl.public_url(f"{base_url.rstrip('/')}/{PARTS[0]}")


register_dataset(INFO, prepare)
