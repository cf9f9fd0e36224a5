"""Cityscapes (gtFine): 2975 train / 500 val street scenes of 2048x1024, 19 trainIds, ignore 255.

Provenance (docs/specs/datasets.md section 3): packages `gtFine_trainvaltest.zip` (packageID 1) and
`leftImg8bit_trainvaltest.zip` (packageID 3) from cityscapes-dataset.com, behind a login. The download follows what
`cityscapesscripts`' `csDownload` does (`cityscapesscripts/download/downloader.py`): POST the login form to `/login`
(success = redirect), GET `/file-handling/?packageID=<id>` with the session cookie, check the md5 served by
`/md5-sum/?packageID=<id>`. It is done here with urllib so the download streams with resume and retries, and because
`csDownload` prompts for credentials and offers to store them unencrypted; credentials come from
CITYSCAPES_USERNAME / CITYSCAPES_PASSWORD and are only ever sent in the login form.

labelIds -> trainIds follows `cityscapesscripts/helpers/labels.py` (19 classes; every other id -> 255). Test labels
are not public: the benchmark reports val, so the prepared `test` split lists the val images (meta.json says so).
"""
from __future__ import annotations

import os
import re
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import numpy as np
from PIL import Image

from datasets import download as dl
from datasets.base import DatasetError, DatasetInfo, register_dataset

BASE_URL = "https://www.cityscapes-dataset.com"
PACKAGES = {"gtFine_trainvaltest.zip": 1, "leftImg8bit_trainvaltest.zip": 3}
EXPECTED_COUNTS = {"train": 2975, "val": 500}
IMAGE_HW = (1024, 2048)

# (labelId, trainId, name, colour) for the 19 evaluated classes (cityscapesscripts helpers/labels.py)
_CLASSES = (
    (7, 0, "road", (128, 64, 128)), (8, 1, "sidewalk", (244, 35, 232)), (11, 2, "building", (70, 70, 70)),
    (12, 3, "wall", (102, 102, 156)), (13, 4, "fence", (190, 153, 153)), (17, 5, "pole", (153, 153, 153)),
    (19, 6, "traffic light", (250, 170, 30)), (20, 7, "traffic sign", (220, 220, 0)),
    (21, 8, "vegetation", (107, 142, 35)), (22, 9, "terrain", (152, 251, 152)), (23, 10, "sky", (70, 130, 180)),
    (24, 11, "person", (220, 20, 60)), (25, 12, "rider", (255, 0, 0)), (26, 13, "car", (0, 0, 142)),
    (27, 14, "truck", (0, 0, 70)), (28, 15, "bus", (0, 60, 100)), (31, 16, "train", (0, 80, 100)),
    (32, 17, "motorcycle", (0, 0, 230)), (33, 18, "bicycle", (119, 11, 32)),
)
LABEL_TO_TRAIN = np.full(256, 255, np.uint8)
for _label_id, _train_id, _, _ in _CLASSES:
    LABEL_TO_TRAIN[_label_id] = _train_id

INFO = DatasetInfo(
    name="cityscapes",
    description="Cityscapes gtFine: 2975 train / 500 val images of 2048x1024, 19 classes (test split = val)",
    class_names=tuple(c[2] for c in _CLASSES),
    palette=tuple(c[3] for c in _CLASSES),
    native_size=IMAGE_HW,
    counted_classes=tuple(range(19)),
    headline="miou",
)

_IMAGE = re.compile(r"^(?P<id>.+)_leftImg8bit\.png$")
_LABEL = re.compile(r"^(?P<id>.+)_gtFine_labelIds\.png$")


def credentials() -> tuple[str, str]:
    user, password = os.environ.get("CITYSCAPES_USERNAME"), os.environ.get("CITYSCAPES_PASSWORD")
    if not user or not password:
        raise DatasetError("downloading Cityscapes needs an account: register at https://www.cityscapes-dataset.com, "
                           "then set CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD; or pass --source with a folder "
                           "holding "
                           "gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip (or their extracted folders)")
    return user, password


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the login's redirect is the success signal; see it as an HTTPError 302


def login(base_url: str = BASE_URL) -> urllib.request.OpenerDirector:
    """An opener holding a logged-in session cookie. The password goes only into the POST body."""
    user, password = credentials()
    jar = CookieJar()
    cookies = urllib.request.HTTPCookieProcessor(jar)
    base = base_url.rstrip("/")
    try:
        with urllib.request.build_opener(cookies).open(f"{base}/login", timeout=60):
            pass
        body = urllib.parse.urlencode({"username": user, "password": password, "submit": "Login"}).encode()
        with urllib.request.build_opener(cookies, _NoRedirect()).open(f"{base}/login", data=body, timeout=60):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code in (301, 302, 303):
            return dl.opener(cookies)
        raise DatasetError(f"Cityscapes login at {dl.public_url(base)}/login failed (HTTP {exc.code}); try again "
                           "later or pass --source") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetError(f"cannot reach {dl.public_url(base)} ({exc}); check the network or pass --source") from None
    raise DatasetError("Cityscapes login failed for the account in CITYSCAPES_USERNAME; check CITYSCAPES_USERNAME and "
                       "CITYSCAPES_PASSWORD (and that the account is activated)")


def download_packages(raw: Path, base_url: str = BASE_URL, progress: bool = True) -> list[Path]:
    """Both packages in `raw`; packages downloaded (and md5-checked) earlier are reused without logging in."""
    done = [raw / name for name in PACKAGES]
    if all(path.is_file() for path in done):
        return done
    session = login(base_url)
    base = base_url.rstrip("/")
    paths = []
    for name, package in PACKAGES.items():
        try:
            with session.open(f"{base}/md5-sum/?packageID={package}", timeout=60) as response:
                text = response.read().decode("utf-8", "replace").split()
        except (urllib.error.URLError, OSError) as exc:
            raise DatasetError(f"cannot fetch the md5 of {name} from {dl.public_url(base)}/md5-sum/ ({exc})") from None
        md5 = text[0] if text and re.fullmatch(r"[0-9a-fA-F]{32}", text[0]) else None
        if md5 is None:
            raise DatasetError(f"{dl.public_url(base)}/md5-sum/?packageID={package} did not return an md5 for {name}; "
                               "the session may have expired, re-run")
        paths.append(dl.download(f"{base}/file-handling/?packageID={package}", raw / name, md5=md5,
                                 open_url=session, progress=progress))
    return paths


def _wanted(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 4 and parts[-3] in ("train", "val") and bool(_IMAGE.match(parts[-1]) or
                                                                       _LABEL.match(parts[-1]))


def find_pairs(root: Path) -> dict[str, dict[str, dict[str, Path]]]:
    """split -> id -> {'image', 'label'} from leftImg8bit/<split>/<city>/ and gtFine/<split>/<city>/."""
    entries: dict[str, list] = {s: [] for s in ("train", "val")}
    for folder, _dirs, files in sorted(os.walk(root)):
        path = Path(folder)
        if path.parent.name not in entries or path.parent.parent.name not in ("leftImg8bit", "gtFine"):
            continue
        for name in sorted(files):
            match = _IMAGE.match(name) or _LABEL.match(name)
            if match:
                kind = "image" if name.endswith("_leftImg8bit.png") else "label"
                entries[path.parent.name].append((match["id"], kind, path / name))
    return {split: dl.tile_index(found, Path(root)) for split, found in entries.items()}


def _convert(job: tuple[str, str, str, str]) -> dict:
    tile, image_path, label_path, out_dir = job
    current = label_path  # the file a failure is reported against
    try:
        label_ids = dl.read_label(label_path, ("L", "P"), "an 8-bit single-channel *_gtFine_labelIds.png")
        label = LABEL_TO_TRAIN[label_ids]
        current = image_path
        with Image.open(image_path) as img:
            if img.size != (label.shape[1], label.shape[0]):
                return {"id": tile, "error": f"{Path(image_path).name}: {img.size[0]}x{img.size[1]} but its label "
                                             f"is {label.shape[1]}x{label.shape[0]}"}
            dl.write_image_png(img, image_path, Path(out_dir) / "images" / f"{tile}.png")
        dl.save_png(Image.fromarray(label, mode="L"), Path(out_dir) / "labels" / f"{tile}.png")
        counts = np.bincount(label.ravel(), minlength=256)
        return {"id": tile, "error": None, "counts": [int(c) for c in counts[:19]] + [int(counts[255])]}
    except Exception as exc:  # noqa: BLE001
        if dl.fatal_write_error(exc):
            raise
        return {"id": tile, "error": f"{Path(current).name}: cannot be converted ({exc})"}


def _find_zips(folder: Path) -> list[Path]:
    return [folder / name for name in PACKAGES if (folder / name).is_file()]


def prepare(out_dir: Path, source: Path | None = None, *, force: bool = False, allow_incomplete: bool = False,
            expected_counts=None, image_size=IMAGE_HW, workers: int = 2, progress: bool = True,
            raw_root: str | None = None, base_url: str = BASE_URL) -> dict:
    """Obtain (login + download, or --source), verify counts and sizes, labelIds -> trainIds into the prepared layout.

    `expected_counts` ({train: 2975, val: 500} by default) and `image_size` ([H, W], None: any) exist for fixtures.
    """
    out_dir = Path(out_dir)
    expected_counts = dict(EXPECTED_COUNTS if expected_counts is None else expected_counts)
    dl.guard_output(out_dir, INFO.name, force)
    raw = dl.raw_dir(out_dir, INFO.name, raw_root)
    problems: list[str] = []

    if source is None:
        zips = download_packages(raw, base_url, progress)
    else:
        src = dl.source_path(source, INFO.name)
        folder = src if src.is_dir() else src.parent
        zips = _find_zips(folder)
        if src.is_file() and src not in zips:
            zips.append(src)
        if not zips and src.is_file():
            raise DatasetError(f"--source {src}: pass a folder holding {' and '.join(PACKAGES)}, or the "
                               "extracted folder")
    if zips:
        names = {z.name for z in zips}
        for name in PACKAGES:
            if name not in names:
                problems.append(f"{name}: missing next to {zips[0].name}")
        root = raw / "unzipped"  # (not the older shared `extracted/`, whose copies would count as duplicates)
        for archive in zips:  # one folder each: extract_once empties its folder for a changed archive
            dl.extract_once(archive, root / archive.stem, select=_wanted, progress=progress)
    else:
        root = src

    pairs = find_pairs(root)
    hw = tuple(image_size) if image_size else None
    good: dict[str, list[str]] = {}
    counts: list[str] = []
    for split in ("train", "val"):
        ok = []
        for tile, files in sorted(pairs[split].items()):
            found = dl.pair_problems(files, {
                "image": (f"{split}/{tile}_leftImg8bit.png: missing (its label is there)", f"{split}/"),
                "label": (f"{split}/{tile}_gtFine_labelIds.png: missing (its image is there)", f"{split}/")}, hw)
            problems += found
            if not found:
                ok.append(tile)
        good[split] = ok
        want = expected_counts.get(split)
        if want is not None and len(pairs[split]) != want:
            counts.append(f"{split}: {len(pairs[split])} image/label pairs found under leftImg8bit/{split} and "
                            f"gtFine/{split}, expected {want}")
    problems = counts + problems  # the counts first: they are what the one-line message shows
    dl.check_problems(INFO.name, problems, Path(source) if source else root, allow_incomplete, raw)

    jobs = [(t, str(pairs[s][t]["image"]), str(pairs[s][t]["label"]), str(out_dir)) for s in ("train", "val")
            for t in good[s]]
    done = dl.convert_tiles(_convert, jobs, workers, INFO.name, progress, out_dir, Path(source) if source else root,
                            allow_incomplete, raw)
    splits = {s: [t for t in good[s] if t in done] for s in ("train", "val")}
    splits["test"] = list(splits["val"])  # test labels are not public: the benchmark reports val
    names = [*INFO.class_names, "ignore"]
    class_pixels = dl.class_pixel_totals(done, {s: splits[s] for s in ("train", "val")}, names)
    complete = all(len(splits[s]) == expected_counts.get(s, len(splits[s])) for s in ("train", "val"))
    meta = {"source": str(source) if source else f"{dl.public_url(base_url)} (packages {list(PACKAGES)})",
            "test_split": "val (Cityscapes test labels are not public; results are val results)",
            "complete": complete, "splits": {s: len(v) for s, v in splits.items()},
            "expected_counts": expected_counts, "class_pixels": class_pixels}
    dl.finish(out_dir, INFO.name, INFO.to_dict(), splits, meta)
    return {"dataset": INFO.name, "out_dir": str(out_dir), "num_images": len(done), "splits": meta["splits"]}


register_dataset(INFO, prepare)
