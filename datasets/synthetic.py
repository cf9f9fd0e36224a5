"""Synthetic UHR land cover imitating DeepGlobe (same classes, ids and palette), generated deterministically.

Why it looks the way it does: UHR methods beat plain downsampling on DeepGlobe because of fine content, and beat
plain sliding windows because of context; all three kinds of content are here.
- Large textured regions (agriculture parcels, rangeland, forest, barren, some lakes) that a downsampled view still
  classifies.
- Thin roads and rivers (2-8 px) and small buildings (3-8 px) that a 4x-downsampled view cannot resolve.
- Grass whose class depends on the land use around it, as in DeepGlobe's definitions: inside farmland it is pasture
  (agriculture), in the wild it is rangeland. Both are drawn with the same texture, so a window that sees only grass
  cannot tell them apart; the farmland/wild zones are smooth and span several regions (~650 px), so a view of the
  surroundings (striped parcels nearby, or forest and barren land) can.
Region sizes are in absolute pixels, so a 2448 image looks like a 1024 one with more regions.
Each image depends only on (seed, index): any worker count gives byte-identical files.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from datasets.base import SPLITS, DatasetError, DatasetInfo, register_dataset, write_split
from datasets.download import guard_output

GENERATOR_VERSION = 2  # bump when the images change, so cached prepared data is recognisably stale
UNKNOWN, URBAN, AGRICULTURE, RANGELAND, FOREST, WATER, BARREN = range(7)
LAKE_RATE = 2.5  # expected lakes per 1024x1024 of area (tests set it to 0 to measure river widths)
DEFAULT_SPLITS: Mapping[str, int] = MappingProxyType({"train": 16, "val": 4, "test": 4})

INFO = DatasetInfo(
    name="synthetic",
    description="Generated DeepGlobe-like land cover: regions, context-dependent grass, 2-8 px roads/rivers/buildings",
    class_names=("unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren"),
    palette=((0, 0, 0), (0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255)),
    native_size=(1024, 1024),
    counted_classes=(1, 2, 3, 4, 5, 6),  # unknown is trained but left out of the mean (DeepGlobe convention)
    headline="miou",
    fine_classes=(URBAN, WATER),
)

_LAND = np.array([AGRICULTURE, RANGELAND, FOREST, BARREN])
# A region's look is the texture it is drawn with, named by the class that owns it in the wild; in farmland the
# rangeland look (grass) is pasture and is labelled agriculture. Shares: agriculture ~0.43, rangeland ~0.22,
# forest ~0.22, barren ~0.13 of the land.
_FARM_LOOKS, _FARM_P = np.array([AGRICULTURE, RANGELAND, FOREST]), np.array([0.5, 0.35, 0.15])
_WILD_LOOKS, _WILD_P = np.array([RANGELAND, FOREST, BARREN]), np.array([0.45, 0.3, 0.25])
ZONE_CELLS = 6.0  # farmland/wild zones: smooth noise over the region grid with features of ~6 regions
_CROPS = np.array([[188, 172, 98], [96, 128, 62], [142, 116, 80], [152, 160, 92], [112, 92, 62], [170, 150, 110]],
                  np.float32)
_ROOFS = np.array([[0, 0, 0], [168, 78, 58], [192, 190, 184], [118, 120, 130], [216, 210, 198], [142, 98, 72]],
                  np.float32)


def _noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Smooth value noise in about [-1, 1] with features of ~scale px (random coarse grid, bicubic upsampling)."""
    gh, gw = int(h / scale) + 4, int(w / scale) + 4
    grid = Image.fromarray(rng.uniform(-1, 1, (gh, gw)).astype(np.float32))
    return np.asarray(grid.resize((w, h), Image.BICUBIC, box=(1, 1, 1 + w / scale, 1 + h / scale)))


def _voronoi(rng: np.random.Generator, s: int, cell: float, wy: np.ndarray, wx: np.ndarray):
    """Nearest seed of a jittered grid at warped coords; searching the 3x3 neighbouring cells keeps it O(9 HW)."""
    g = int(s / cell) + 5  # two cells of margin each side: warped coordinates leave the image
    sy = ((np.arange(g)[:, None] - 2 + rng.uniform(0.1, 0.9, (g, g))) * cell).astype(np.float32)
    sx = ((np.arange(g)[None, :] - 2 + rng.uniform(0.1, 0.9, (g, g))) * cell).astype(np.float32)
    ci = np.clip(np.floor(wy / cell).astype(np.int32) + 2, 1, g - 2)
    cj = np.clip(np.floor(wx / cell).astype(np.int32) + 2, 1, g - 2)
    best = np.full(wy.shape, np.inf, np.float32)
    idx = np.zeros(wy.shape, np.int32)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            ii, jj = ci + di, cj + dj
            d = (sy[ii, jj] - wy) ** 2 + (sx[ii, jj] - wx) ** 2
            closer = d < best
            best = np.where(closer, d, best)
            idx = np.where(closer, ii * g + jj, idx)
    return idx, sy.ravel(), sx.ravel()


def _walk(rng: np.random.Generator, s: int, start, heading: float, step: float, length: float, wiggle: float,
          keep: float = 0.97) -> np.ndarray:
    """Smooth polyline: the heading deviation is an AR(1) process, so curves meander but keep a direction."""
    dev, headings = 0.0, []
    for k in rng.normal(0, wiggle, max(2, int(length / step))):
        dev = keep * dev + k
        headings.append(heading + dev)
    h = np.array(headings)
    pts = np.asarray(start, np.float64) + np.cumsum(step * np.stack([np.cos(h), np.sin(h)], 1), 0)
    pts = np.vstack([start, pts])
    out = (pts < -20).any(1) | (pts > s + 20).any(1)  # stop once well outside the image
    return pts[: int(np.argmax(out)) + 1] if out.any() else pts


def _border_start(rng: np.random.Generator, s: int):
    """A point on the border and a heading into the image, towards a random interior point."""
    t, side = rng.uniform(0, s), rng.integers(4)
    p = [(t, 0.0), (t, float(s)), (0.0, t), (float(s), t)][side]
    q = rng.uniform(0.25 * s, 0.75 * s, 2)
    return np.array(p), float(np.arctan2(q[1] - p[1], q[0] - p[0]))


def _buildings(rng: np.random.Generator, draw: ImageDraw.ImageDraw, road: np.ndarray, width: int) -> None:
    """Clusters of 3-8 px roofs lining a road, set back 2-4 px and spaced so that they rarely touch."""
    seg = np.diff(road, axis=0)
    arc = np.concatenate([[0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))])
    if arc[-1] < 30:
        return
    for _ in range(rng.poisson(arc[-1] / 220) + 1):
        t = rng.uniform(0, arc[-1]) + np.arange(rng.integers(5, 30)) * 11.0
        t = t[t < arc[-1]]
        x, y = np.interp(t, arc, road[:, 0]), np.interp(t, arc, road[:, 1])
        i = np.clip(np.searchsorted(arc, t) - 1, 0, len(seg) - 1)
        tang = seg[i] / np.maximum(np.hypot(seg[i, 0], seg[i, 1]), 1e-6)[:, None]
        for p, u in zip(np.stack([x, y], 1), tang, strict=True):
            n = np.array([-u[1], u[0]])
            for side in (-1, 1):
                off = width / 2 + rng.uniform(2, 4)
                for _row in range(1 + (rng.random() < 0.4)):
                    if rng.random() > 0.75:
                        break
                    a, b = rng.uniform(3, 7, 2)
                    c = p + side * n * (off + b / 2)
                    corners = [c + sa * a / 2 * u + sb * b / 2 * n for sa, sb in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
                    draw.polygon([tuple(q) for q in corners], fill=int(rng.integers(1, len(_ROOFS))))
                    off += b + 3


def land_cover(rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Region map (s, s) and per-region look, class and farmland flag; generate_image draws it first from its rng.

    Regions are noise-warped Voronoi cells of ~220 px (fewer, smaller cells on tiny images), computed at half
    resolution for speed (the 2 px steps vanish under the warp and the optical blur). A region's look is the texture
    it is drawn with; its class is the look's, except that grass in farmland is pasture, i.e. agriculture.
    """
    cell, h = min(220.0, s / 3), (s + 1) // 2
    y2, x2 = (np.mgrid[0:h, 0:h].astype(np.float32) * 2 + 0.5)
    warp = [cell * 0.3 * (_noise(rng, h, h, cell / 3) + 0.35 * _noise(rng, h, h, cell / 12)) for _ in range(2)]
    region, sy, sx = _voronoi(rng, s, cell, y2 + warp[0], x2 + warp[1])
    region = region.repeat(2, 0).repeat(2, 1)[:s, :s]
    n = len(sy)
    g = int(round(np.sqrt(n)))
    zone = _noise(rng, g, g, ZONE_CELLS).ravel()  # one value per region seed, smooth across neighbouring seeds
    inside = np.flatnonzero((sy > 0) & (sy < s) & (sx > 0) & (sx < s))
    farm = zone > np.median(zone[inside])  # half the visible regions are farmland, half wild
    look_of = np.where(farm, rng.choice(_FARM_LOOKS, size=n, p=_FARM_P), rng.choice(_WILD_LOOKS, size=n, p=_WILD_P))
    # Every image shows parcels and pasture in farmland, rangeland, barren and forest in the wild.
    for where, looks in ((farm, (AGRICULTURE, RANGELAND)), (~farm, (RANGELAND, BARREN, FOREST))):
        cand = inside[where[inside]]
        pick = rng.choice(cand, min(len(looks), len(cand)), replace=False)
        look_of[pick] = looks[: len(pick)]
    cls_of = np.where(farm & (look_of == RANGELAND), AGRICULTURE, look_of)
    return region, look_of, cls_of, farm


def generate_image(image_size: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its label (H, W) uint8 with ids 0..6; depends only on (size, seed, index)."""
    rng = np.random.default_rng([seed, index])
    s = image_size
    region, look_of, cls_of, _farm = land_cover(rng, s)
    n = len(look_of)
    label = cls_of[region].astype(np.uint8)
    look = look_of[region]
    tint = (rng.uniform(0.88, 1.12, (n, 1)) * rng.uniform(0.96, 1.04, (n, 3))).astype(np.float32)

    fine, mid, low = (_noise(rng, s, s, k).ravel() for k in (3, 12, 60))
    grain = rng.uniform(-1, 1, s * s).astype(np.float32)
    theta, pw, ph = rng.uniform(0, np.pi, n), *rng.uniform(40, 120, (2, n))
    reg, rgb = region.ravel(), np.empty((s * s, 3), np.float32)
    for c in _LAND:  # each texture is computed on its own pixels only
        i = np.flatnonzero(look.ravel() == c)
        r = reg[i]
        if c == AGRICULTURE:
            # Rotated rectangular parcels per region, each with a crop colour and row stripes; a hash of
            # (region, parcel) picks the parcel's look, so there is no per-parcel Python loop.
            y, x = np.divmod(i, s)
            u = x * np.cos(theta[r]) + y * np.sin(theta[r])
            v = y * np.cos(theta[r]) - x * np.sin(theta[r])
            key = (r.astype(np.int64) * 73856093) ^ (np.floor(u / pw[r]).astype(np.int64) * 19349663) ^ (
                np.floor(v / ph[r]).astype(np.int64) * 83492791)
            key = (key ^ (key >> 13)) & 0xFFFFFF
            stripe = np.sin(2 * np.pi * np.where(key & 8, u, v) / (4.0 + (key >> 4) % 8)) * (0.05 + 0.03 * (
                (key >> 8) % 4))
            margin = ((u % pw[r]) < 2) | ((v % ph[r]) < 2)  # darker field margins
            col = _CROPS[key % len(_CROPS)] * ((1 + stripe + 0.04 * mid[i]) * np.where(margin, 0.8, 1.0))[:, None]
        elif c == FOREST:  # dark green, blobby crowns
            col = np.array([38, 78, 44], np.float32) * (0.78 + 0.3 * fine[i] + 0.2 * mid[i])[:, None]
        elif c == RANGELAND:  # light olive, low-frequency variation only
            col = np.array([152, 148, 104], np.float32) * (1 + 0.1 * low[i] + 0.05 * mid[i])[:, None]
        else:  # barren: bright beige-grey with fine grain
            col = np.array([208, 196, 174], np.float32) * (1 + 0.05 * low[i])[:, None] + (
                9 * grain[i] + 6 * fine[i])[:, None]
        rgb[i] = col * tint[r]
    rgb, fine, mid = rgb.reshape(s, s, 3), fine.reshape(s, s), mid.reshape(s, s)

    # Water: a few warped-blob lakes (so water is not only thin), then 2-8 px meandering rivers.
    lakes = np.zeros((s, s), bool)
    for _ in range(rng.poisson(LAKE_RATE * (s / 1024) ** 2)):
        lo = min(40.0, s / 8)  # small test images still get proportionate lakes
        r = rng.uniform(lo, max(lo + 1, min(130.0, s / 4)))
        cy, cx = rng.uniform(0, s, 2)
        y0, y1, x0, x1 = int(max(0, cy - 1.6 * r)), int(min(s, cy + 1.6 * r)), int(max(0, cx - 1.6 * r)), int(
            min(s, cx + 1.6 * r))
        if y1 - y0 < 2 or x1 - x0 < 2:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d = np.hypot(yy - cy, xx - cx) / r
        lakes[y0:y1, x0:x1] |= d + 0.35 * _noise(rng, y1 - y0, x1 - x0, r / 2) < 1
    rivers = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(rivers)
    for _ in range(1 + rng.poisson(0.8 * s / 1024)):
        start, heading = _border_start(rng, s)
        line = _walk(rng, s, start, heading, 6.0, 2.5 * s, 0.09, keep=0.95)
        draw.line([tuple(p) for p in line], fill=1, width=int(rng.integers(2, 9)), joint="curve")
    water = lakes | np.asarray(rivers, bool)
    rgb[water] = np.array([34, 66, 84], np.float32) * (1 + 0.06 * mid[water])[:, None]
    label[water] = WATER

    # Urban: main roads crossing the image, branch roads off them, buildings lining both (mostly thin/small).
    roads, roofs = Image.new("L", (s, s), 0), Image.new("L", (s, s), 0)
    rdraw, bdraw = ImageDraw.Draw(roads), ImageDraw.Draw(roofs)
    mains = []
    for _ in range(max(1, rng.poisson(2.2 * s / 1024))):
        start, heading = _border_start(rng, s)
        mains.append((_walk(rng, s, start, heading, 16.0, 2.5 * s, 0.02), int(rng.integers(5, 9))))
    network = list(mains)
    for _ in range(rng.poisson(14 * (s / 1024) ** 2) + 1):
        main, _w = mains[rng.integers(len(mains))]
        j = rng.integers(len(main) - 1)
        d = main[j + 1] - main[j]
        heading = np.arctan2(d[1], d[0]) + rng.choice([-1, 1]) * np.pi / 2 + rng.normal(0, 0.2)
        network.append((_walk(rng, s, main[j], heading, 12.0, rng.uniform(80, 420), 0.04), int(rng.integers(2, 5))))
    for line, width in network:
        rdraw.line([tuple(p) for p in line], fill=1, width=width, joint="curve")
        _buildings(rng, bdraw, line, width)
    road = np.asarray(roads, bool) & ~lakes  # bridges over rivers, but no roads across lakes
    roof = np.asarray(roofs) * ~water  # no houses on water
    rgb[road] = np.array([122, 120, 117], np.float32) * (1 + 0.05 * fine[road])[:, None]
    rgb[roof > 0] = _ROOFS[roof[roof > 0]]
    label[road | (roof > 0)] = URBAN

    # No-data corner wedge, as on real scene edges: the unknown class.
    wedge = Image.new("L", (s, s), 0)
    a, b = rng.uniform(0.04, 0.18, 2) * s
    cx, cy = [(0, 0), (s, 0), (0, s), (s, s)][rng.integers(4)]
    ImageDraw.Draw(wedge).polygon([(cx, cy), (abs(cx - a), cy), (cx, abs(cy - b))], fill=1)
    nodata = np.asarray(wedge, bool)
    rgb[nodata] = 6 + 3 * fine[nodata, None]
    label[nodata] = UNKNOWN

    # Sensor look: slight global illumination gradient, optical blur, per-pixel noise.
    g = rng.uniform(-np.pi, np.pi)
    ramp = (np.arange(s, dtype=np.float32) / s - 0.5)
    rgb *= (1 + rng.uniform(0.04, 0.12) * (ramp[None, :] * np.cos(g) + ramp[:, None] * np.sin(g)))[..., None]
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(0.5))
    rgb = np.asarray(img, np.float32) + 3 * rng.standard_normal((s, s, 3), dtype=np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), label


def _save_png(img: Image.Image, path: Path) -> None:
    """Write then rename, so a crash never leaves a truncated PNG under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG", compress_level=3)
    os.replace(tmp, path)


def _write_one(job: tuple[Path, int, int, int]) -> np.ndarray:
    out_dir, index, image_size, seed = job
    image, label = generate_image(image_size, seed, index)
    _save_png(Image.fromarray(image), out_dir / "images" / f"syn_{index:04d}.png")
    _save_png(Image.fromarray(label, mode="L"), out_dir / "labels" / f"syn_{index:04d}.png")
    return np.bincount(label.ravel(), minlength=len(INFO.class_names))


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _validate(source: Path | None, image_size: int, num_images: int, splits: Mapping[str, int], seed: int) -> None:
    key = "datasets.synthetic"
    if source is not None:
        raise DatasetError("the synthetic dataset is generated, it has no --source; drop --source for it")
    if not _is_int(image_size) or image_size < 64:
        raise DatasetError(f"{key}.image_size must be an integer >= 64, got {image_size!r}; fix it in params.yaml")
    if not _is_int(num_images) or num_images < 1:
        raise DatasetError(f"{key}.num_images must be an integer >= 1, got {num_images!r}; fix it in params.yaml")
    if not _is_int(seed):
        raise DatasetError(f"{key}.seed must be an integer, got {seed!r}; fix it in params.yaml")
    if not isinstance(splits, Mapping) or not splits:
        raise DatasetError(f"{key}.splits must map split names to sizes, e.g. {{train: 16, val: 4, test: 4}}")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise DatasetError(f"{key}.splits: unknown split name(s) {', '.join(map(str, unknown))}; "
                           f"use {', '.join(SPLITS)} in params.yaml")
    if not all(_is_int(n) and n >= 0 for n in splits.values()):
        raise DatasetError(f"{key}.splits sizes must be integers >= 0, got {dict(splits)}; fix them in params.yaml")
    if sum(splits.values()) != num_images:
        raise DatasetError(f"{key}.splits sizes {dict(splits)} sum to {sum(splits.values())} but {key}.num_images "
                           f"is {num_images}; make them agree in params.yaml")


def prepare(out_dir: Path, source: Path | None = None, *, image_size: int = 1024, num_images: int = 24,
            splits: Mapping[str, int] = DEFAULT_SPLITS, seed: int = 0, workers: int = 2,
            progress: bool = True, force: bool = False) -> dict:
    """Generate the dataset into the prepared layout (datasets/base.py); returns counts and class fractions.

    Splits are assigned in id order (train, then val, then test). An existing prepared dataset is overwritten only
    with `force`; meta.json is written last, so an interrupted run never looks prepared.
    """
    _validate(source, image_size, num_images, splits, seed)
    out_dir = Path(out_dir)
    guard_output(out_dir, INFO.name, force)

    jobs = [(out_dir, i, int(image_size), int(seed)) for i in range(num_images)]
    workers = max(1, min(int(workers), num_images))
    with multiprocessing.get_context().Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(_write_one, jobs) if pool else map(_write_one, jobs)  # imap keeps id order
        counts = list(tqdm(results, total=num_images, desc="synthetic", unit="img", disable=not progress))

    ids = [f"syn_{i:04d}" for i in range(num_images)]
    class_pixels, start = {}, 0
    for split in SPLITS:
        n = int(splits.get(split, 0))
        write_split(out_dir, split, ids[start:start + n])
        total = np.sum(counts[start:start + n], axis=0) if n else np.zeros(len(INFO.class_names), np.int64)
        class_pixels[split] = dict(zip(INFO.class_names, map(int, total), strict=True))
        start += n

    everything = np.sum(counts, axis=0)
    fractions = dict(zip(INFO.class_names, (everything / everything.sum()).round(5).tolist(), strict=True))
    info = INFO.to_dict() | {"native_size": [int(image_size), int(image_size)]}
    params = {"image_size": int(image_size), "num_images": int(num_images), "splits": {k: int(splits.get(k, 0))
              for k in SPLITS}, "seed": int(seed), "generator_version": GENERATOR_VERSION}
    meta = {"dataset": INFO.name, "info": info, "params": params, "class_pixels": class_pixels,
            "class_fractions": fractions}
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out_dir / "meta.json")
    return {"dataset": INFO.name, "out_dir": str(out_dir), "num_images": int(num_images),
            "image_size": int(image_size), "splits": params["splits"], "class_fractions": fractions}


register_dataset(INFO, prepare)
