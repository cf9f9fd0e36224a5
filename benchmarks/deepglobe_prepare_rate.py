"""Measure DeepGlobe preparation speed (tiles/s) on generated full-size 2448x2448 tiles.

Builds N `<id>_sat.jpg` / `<id>_mask.png` pairs in the official layout from the synthetic generator (realistic texture,
so JPEG decoding and PNG encoding cost what they cost on real tiles), then times `datasets.deepglobe.prepare` with
`--source <folder>` (verify + convert, nothing downloaded).

    python benchmarks/deepglobe_prepare_rate.py --tiles 16 --workers 2
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from datasets import deepglobe  # noqa: E402
from datasets.base import colorize  # noqa: E402
from datasets.synthetic import generate_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--distinct", type=int, default=2, help="distinct generated tiles (copied to --tiles ids)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dg-rate-"))
    src = work / "land-train"
    src.mkdir()
    for k in range(args.distinct):
        image, label = generate_image(2448, 0, k)
        Image.fromarray(image).save(src / f"gen{k}_sat.jpg", quality=95)
        Image.fromarray(colorize(label, deepglobe.INFO.palette)).save(src / f"gen{k}_mask.png")
    ids = [f"{100000 + i}" for i in range(args.tiles)]
    for i, tile in enumerate(ids):
        k = i % args.distinct
        shutil.copyfile(src / f"gen{k}_sat.jpg", src / f"{tile}_sat.jpg")
        shutil.copyfile(src / f"gen{k}_mask.png", src / f"{tile}_mask.png")
    def cpu() -> float:
        return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    start, cpu0 = time.perf_counter(), cpu()
    deepglobe.prepare(work / "data" / "deepglobe", src, split_lists={"train": ids}, workers=args.workers,
                      progress=True)
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu0
    per_tile = cpu_seconds / args.tiles
    print(f"{args.tiles} tiles of 2448x2448 in {seconds:.1f} s with {args.workers} worker(s): "
          f"{args.tiles / seconds:.2f} tiles/s wall; {per_tile:.2f} CPU-s per tile, i.e. "
          f"{args.workers / per_tile:.2f} tiles/s on {args.workers} uncontended cores (load now: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
