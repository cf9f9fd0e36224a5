#!/usr/bin/env python
"""CPU latency of our refinement schedule against the official code's on the same input and weights, in one run:
CascadePSP's `process_high_res_im` (`segmentation-refinement` 0.6, MIT; give its extracted sdist with `--upstream`),
or MagNet's inference (`VinAIResearch/MagNet` @ 7f5b876, AGPL-3.0, run from its checkout given with `--upstream`).
Calls alternate (official, ours, official, ...) after one warm-up call each; the medians and their ratio are printed.
The target is ours / official <= 1.0.

    python benchmarks/official_latency.py --upstream /tmp/cpsp/segmentation-refinement-0.6 [--size 512 --L 256]
    PYTHONPATH=$PWD /tmp/side/bin/python benchmarks/official_latency.py --method magnet \
        --upstream /tmp/upstream/magnet [--size 1224]

MagNet needs OpenCV (the side environment of tests/golden/make_magnet.py). Its per-image work is inline in upstream
`test.py`'s `main()`, so that runs whole, with make_magnet.py's run-time patches, on a PNG of the seeded image and
weight files our `save_official` wrote; the official time is test.py's own bracket (`total_time` ... `execution_time`):
the coarse-to-fine loop from the loaded, already tiled and normalised patches to the final cumulative map, so reading,
tiling and model construction are left out. Ours is `model.probabilities(image)` from the uint8 image, its tiling
(resize, crop, normalise) included. DeepGlobe's schedule scaled from 2448 to `--size` (1224: scales 306, 612, 1224,
crop 306, input 254), all tiles refined, n_points 0.75, median kernel 11, sub-batch 1 as upstream's test script.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from methods import build_method  # noqa: E402
from methods.cascadepsp import RefinementNet, refine_high_res  # noqa: E402
from tests.golden import make_cascadepsp as make  # noqa: E402
from tests.golden import make_magnet  # noqa: E402
from tests.golden.seeded import seed_weights, seeded_image  # noqa: E402


def alternate(runs: dict, repeats: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each run returns (output, seconds): one warm-up call each, then `repeats` rounds in turn; outputs of the
    warm-up, median seconds."""
    outputs = {k: fn()[0] for k, fn in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(fn()[1])
    return outputs, {k: statistics.median(v) for k, v in times.items()}


def timed(fn):
    def run():
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0
    return run


def cascadepsp(args: argparse.Namespace) -> None:
    size = args.size or 512
    pspnet, helper = make.import_upstream(args.upstream)
    ours = seed_weights(RefinementNet(), 6).eval()
    official = pspnet.RefinementModule()
    official.load_state_dict(ours.state_dict())
    official.eval()
    image = seeded_image(make.IMAGE_SEED, size, size)
    im, seg = make.official_inputs(image, (image[:, :1] > image[:, 0].median()).float())
    runs = {"official": timed(lambda: helper.process_high_res_im(official, im, seg, args.L)),
            "ours": timed(lambda: refine_high_res(ours, im, seg, args.L))}
    with torch.inference_mode():
        outputs, median = alternate(runs, args.repeats)
    print(f"CascadePSP high-res refinement, {size}² image, L {args.L}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}: official {median['official']:.2f} s, ours {median['ours']:.2f} s "
          f"(median of {args.repeats}); ours / official = {median['ours'] / median['official']:.3f}; "
          f"max |difference| {(outputs['ours'] - outputs['official']).abs().max():.1e}")


class _Quiet:
    """Upstream test.py's progress bar, silenced."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def magnet(args: argparse.Namespace) -> None:
    size = args.size or 1224
    if size % 4:
        raise SystemExit("--size must be a multiple of 4 for MagNet (scales size/4, size/2, size)")
    make_magnet.check_blobs(args.upstream)
    config = {"native_size": size, "crop_size": size // 4, "input_size": round(size * 508 / 2448),
              "sub_batch_size": 1}
    model = seed_weights(build_method("magnet", 7, **config), make_magnet.WEIGHT_SEED).eval()
    image = seeded_image(make_magnet.IMAGE_SEED, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model.save_official(str(work / "weights"))
        make_magnet.check_loaded(args.upstream, work / "weights", model)
        rgb = image[0].permute(1, 2, 0).numpy().astype(np.uint8)
        official, calls = make_magnet.official_test(args.upstream, work / "weights", rgb, work, size, config,
                                                    make_magnet.FLAGS)
        stamps: list[float] = []
        official.time = types.SimpleNamespace(time=lambda: stamps.append(time.perf_counter()) or stamps[-1])
        official.tqdm = _Quiet

        def run_official():
            calls.clear()
            with np.errstate(invalid="ignore"):  # its IoU of the all-zero dummy label divides 0 by 0
                official.main()  # parses sys.argv, builds the loader and the models, then times its per-image loop
            return calls[-1], stamps[-1] - stamps[-2]

        runs = {"official": run_official, "ours": timed(lambda: model.probabilities(image))}
        outputs, median = alternate(runs, args.repeats)
    print(f"MagNet inference, {size}² image, scales {size // 4}/{size // 2}/{size}, crop {config['crop_size']}, "
          f"input {config['input_size']}, all tiles, n_points {make_magnet.FLAGS['n_points']}, sub-batch 1, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}: official {median['official']:.2f} s, "
          f"ours {median['ours']:.2f} s (median of {args.repeats}); "
          f"ours / official = {median['ours'] / median['official']:.3f}; "
          f"max |difference| {(outputs['ours'] - outputs['official']).abs().max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("cascadepsp", "magnet"), default="cascadepsp")
    parser.add_argument("--upstream", required=True, type=Path,
                        help="the segmentation-refinement 0.6 folder, or the MagNet checkout at 7f5b876")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512 CascadePSP, 1224 MagNet)")
    parser.add_argument("--L", type=int, default=256, help="CascadePSP's L")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    {"cascadepsp": cascadepsp, "magnet": magnet}[args.method](args)


if __name__ == "__main__":
    main()
