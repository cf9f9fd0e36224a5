"""The dataset contract, the dataset registry and the prepared-layout reader.

Prepared layout (what every dataset's `prepare` writes, whatever its raw format):

    <data_root>/<name>/
        images/<id>.png      RGB uint8
        labels/<id>.png      single-channel uint8 class ids, 255 = ignore
        splits/<split>.txt   one id per line
        meta.json            dataset name, classes, palette, how it was made
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """Bad or missing data; the message names the file and the fix."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset declares about itself (README "Adding a dataset")."""

    name: str
    description: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    native_size: tuple[int, int]  # (H, W)
    counted_classes: tuple[int, ...]  # classes averaged in the headline mIoU
    headline: str = "miou"  # "miou", or "iou:<class name>" (Inria: building IoU)
    ignore_index: int = IGNORE_INDEX
    fine_classes: tuple[int, ...] = field(default_factory=tuple)  # thin/small-structure classes, if known

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return asdict(self)


PrepareFn = Callable[..., dict]


@dataclass(frozen=True)
class DatasetEntry:
    info: DatasetInfo
    prepare: PrepareFn  # prepare(out_dir: Path, source: Path | None, **params) -> summary dict


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(info: DatasetInfo, prepare: PrepareFn) -> None:
    if info.name in _REGISTRY:
        raise DatasetError(f"dataset name '{info.name}' is registered twice")
    _REGISTRY[info.name] = DatasetEntry(info, prepare)


def get_dataset(name: str) -> DatasetEntry:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise DatasetError(f"unknown dataset '{name}'; registered datasets: {known} (see `python bench.py list`)")
    return _REGISTRY[name]


def list_datasets() -> dict[str, str]:
    return {name: entry.info.description for name, entry in sorted(_REGISTRY.items())}


def write_split(out_dir: Path, split: str, ids: list[str]) -> None:
    path = out_dir / "splits" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def read_split(root: Path, split: str) -> list[str]:
    path = root / "splits" / f"{split}.txt"
    if not path.is_file():
        raise DatasetError(f"split list {path} is missing; re-run `python bench.py prepare --dataset {root.name}`")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); a missing or undecodable file names itself."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image {path} is missing; re-run prepare for this dataset") from None
    except OSError as exc:
        raise DatasetError(f"image {path} cannot be decoded ({exc}); replace the file and re-run prepare") from exc


def load_label(path: Path) -> np.ndarray:
    """Class-id label (H, W) uint8."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise DatasetError(f"label {path} has mode {img.mode}, expected single-channel class ids; "
                                   "re-run prepare to convert it")
            return np.asarray(img)
    except FileNotFoundError:
        raise DatasetError(f"label {path} is missing; re-run prepare for this dataset") from None
    except DatasetError:
        raise
    except OSError as exc:
        raise DatasetError(f"label {path} cannot be decoded ({exc}); replace the file and re-run prepare") from exc


def read_meta(root: Path) -> dict:
    path = root / "meta.json"
    if not path.is_file():
        raise DatasetError(f"prepared dataset not found at {root} (no meta.json); "
                           f"run `python bench.py prepare --dataset {root.name}` first")
    return json.loads(path.read_text())


class DecodeCache:
    """Decoded (image, label) arrays kept in memory up to `max_mib`, filled until full and never evicted: a 1024 px
    PNG takes ~40 ms to decode, a tenth of a smoke training step, and every epoch decodes the same files again. One
    cache per process (each DataLoader worker fills its own)."""

    def __init__(self, max_mib: float) -> None:
        self.budget, self.used = int(max_mib * 2**20), 0
        self.items: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, key: str, load: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if key in self.items:
            return self.items[key]
        value = load()
        size = sum(a.nbytes for a in value)
        if self.used + size <= self.budget:
            self.items[key] = value
            self.used += size
        return value


class PreparedDataset(torch.utils.data.Dataset):
    """Reads one split of a prepared dataset. Yields (image uint8 3xHxW, label int64 HxW, id).

    `transform(image, label) -> (image, label)` works on those tensors (training augmentation); `cache` keeps the
    decoded files (training reads each many times).
    """

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None,
                 cache: DecodeCache | None = None) -> None:
        self.root = Path(root)
        self.meta = read_meta(self.root)
        if split not in SPLITS:
            raise DatasetError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
        self.split = split
        self.ids = read_split(self.root, split)
        if not self.ids:
            raise DatasetError(f"split {split} of {self.root} is empty; check the split sizes in params.yaml")
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        return (load_image(self.root / "images" / f"{image_id}.png"),
                load_label(self.root / "labels" / f"{image_id}.png"))

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        if self.cache is None:
            image, label = self._read(image_id)
        else:  # the arrays are copied below (transpose, astype), so a transform cannot alter the cached ones
            image, label = self.cache.get(f"{self.root}/{image_id}", lambda: self._read(image_id))
        if image.shape[:2] != label.shape:
            raise DatasetError(f"size mismatch for '{image_id}' in {self.root}: image {image.shape[1]}x"
                               f"{image.shape[0]}, label {label.shape[1]}x{label.shape[0]}; re-run prepare")
        image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        label_t = torch.from_numpy(label.astype(np.int64))
        if self.transform is not None:
            image_t, label_t = self.transform(image_t, label_t)
        return image_t, label_t, image_id


def colorize(label: np.ndarray, palette: tuple[tuple[int, int, int], ...], ignore_color=(128, 128, 128)) -> np.ndarray:
    """Class-id map -> RGB using the dataset palette (ignore and out-of-range ids in grey)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = ignore_color
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[label]
