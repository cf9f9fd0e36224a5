"""Regenerate tests/golden/magnet.npz: the official MagNet inference (`VinAIResearch/MagNet` @ 7f5b876, `test.py`)
on a seeded 240x240 image with seeded weights written by our `save_official`.

The official code runs unmodified from the checkout given by `--upstream` (AGPL-3.0: nothing of it is copied here);
this script only patches, in memory: the ImageNet download in `ResnetFPN()` (pretrained off; the checkpoint
overwrites every tensor), the numpy aliases removed in numpy 1.24 (`np.float`, `np.int`, `np.bool`), and captures
the final cumulative probability map by wrapping `test.py`'s `F.interpolate` (its last call resizes that map to
the label size, an identity here). Needs OpenCV (the official data path resizes with cv2) in a side environment:

    python -m venv /tmp/side && echo "$PWD/.venv/lib/python3.11/site-packages" \
        > /tmp/side/lib/python3.11/site-packages/project.pth
    /tmp/side/bin/pip install opencv-python-headless tqdm
    PYTHONPATH=$PWD /tmp/side/bin/python tests/golden/make_magnet.py --upstream <MagNet checkout at 7f5b876>

Setting: DeepGlobe's schedule scaled to a 240 px image (native_size 240: scales 60, 120, 240, crop 60, network
input 50, ~ upstream's 612 -> 508), all tiles, n_points 0.75, median kernel 11, sub-batch 1. About 30 s on CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from methods import build_method  # noqa: E402
from tests.golden.seeded import save_fixture, seed_weights, seeded_image  # noqa: E402

COMMIT = "7f5b8760cb471230402015d80117559de0e38600"
# git blob ids at 7f5b876 of the files whose behaviour the fixture pins
BLOBS = {
    "test.py": "4af2f4cb1951b25245dceb67a407a669a78b8078",
    "magnet/utils/geometry.py": "5bb4a012005d749359bf98f028362bb853cfecb3",
    "magnet/model/refinement.py": "e86ef8332ef5b763c9ae28ce80b01a41047e2d9e",
    "magnet/model/fpn.py": "e968aa2e69aef1aacf32a1a68b0f7a8b3d0da9ce",
}
MODEL = {"native_size": 240, "crop_size": 60, "input_size": 50, "sub_batch_size": 1}
SIZE, WEIGHT_SEED, IMAGE_SEED, STRIDE = 240, 11, 12, 2
FLAGS = {"n_points": 0.75, "n_patches": -1, "smooth_kernel": 11}


def blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def import_upstream(upstream: Path) -> None:
    """Upstream importable, with the run-time patches: numpy aliases, no ImageNet download (spec §8.1 D8, D9)."""
    if str(upstream) in sys.path:
        return
    for alias, kind in (("float", float), ("int", int), ("bool", bool)):
        if alias not in np.__dict__:
            setattr(np, alias, kind)
    sys.path.insert(0, str(upstream))
    import magnet.model.fpn as fpn

    original = fpn.resnet50
    fpn.resnet50 = lambda pretrained=False, **kw: original(False, **kw)


def official_test(upstream: Path, weights: Path, image: np.ndarray, work: Path, size: int = SIZE,
                  model: dict = MODEL, flags: dict = FLAGS) -> tuple[types.ModuleType, list[torch.Tensor]]:
    """Upstream `test.py`, imported, set up to run `main()` on `image` (H x W x 3 uint8 RGB, written to `work` as a PNG
    with an all-zero label): `sys.argv` holds DeepGlobe's schedule scaled to `size` (scales size/4, size/2, size) with
    `model`'s crop and input sizes, `flags` and the weight files in `weights`. Returns the module and the list that
    collects every output of its `F.interpolate`: the last one of a run is the final map resized to the label size."""
    import cv2

    import_upstream(upstream)
    import test as official  # upstream test.py

    cv2.imwrite(str(work / "img.png"), image[:, :, ::-1])  # RGB -> BGR file; upstream converts back
    cv2.imwrite(str(work / "mask.png"), np.zeros_like(image))
    (work / "list.txt").write_text("img.png\tmask.png\n")
    calls: list[torch.Tensor] = []

    def interpolate(*args, **kwargs):
        out = torch.nn.functional.interpolate(*args, **kwargs)
        calls.append(out)
        return out

    official.F = types.SimpleNamespace(interpolate=interpolate)
    scales = ",".join(f"{s}-{s}" for s in (size // 4, size // 2, size))
    sys.argv = ["test.py", "--dataset", "deepglobe", "--root", str(work), "--datalist", str(work / "list.txt"),
                "--scales", scales, "--crop_size", *[str(model["crop_size"])] * 2,
                "--input_size", *[str(model["input_size"])] * 2, "--num_workers", "0", "--model", "fpn",
                "--num_classes", "7", "--pretrained", str(weights / "deepglobe_fpn.pth"),
                "--pretrained_refinement", str(weights / "deepglobe_refinement.pth"),
                "--sub_batch_size", str(model["sub_batch_size"]), "--n_points", str(flags["n_points"]),
                "--n_patches", str(flags["n_patches"]), "--smooth_kernel", str(flags["smooth_kernel"])]
    return official, calls


def official_probabilities(upstream: Path, weights: Path, image: np.ndarray, work: Path) -> torch.Tensor:
    official, calls = official_test(upstream, weights, image, work)
    official.main()
    return calls[-1]  # the final map, resized to the label size (identity)


def check_blobs(upstream: Path) -> None:
    for name, expected in BLOBS.items():
        if blob_id(upstream / name) != expected:
            raise SystemExit(f"{upstream / name} is not the file at {COMMIT[:7]} (blob {expected})")


def check_loaded(upstream: Path, weights: Path, ours) -> None:
    """Upstream loads with strict=False: make sure every tensor it built came from our files."""
    import_upstream(upstream)
    from magnet.model.fpn import ResnetFPN
    from magnet.model.refinement import RefinementMagNet

    net, ref = ResnetFPN(7), RefinementMagNet(7, use_bn=True)
    net.load_state_dict(torch.load(weights / "deepglobe_fpn.pth"))
    ref.load_state_dict(torch.load(weights / "deepglobe_refinement.pth"))
    for mine, theirs in ((ours.backbone, net), (ours.refiner, ref)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert set(a) == set(b), sorted(set(a) ^ set(b))[:8]
        assert all(torch.equal(a[k].float(), b[k].float()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, type=Path, help="MagNet checkout at 7f5b876")
    args = parser.parse_args()
    check_blobs(args.upstream)
    torch.set_num_threads(2)
    model = seed_weights(build_method("magnet", 7, **MODEL), WEIGHT_SEED).eval()
    image = seeded_image(IMAGE_SEED, SIZE, SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model.save_official(str(work / "weights"))
        check_loaded(args.upstream, work / "weights", model)
        rgb = image[0].permute(1, 2, 0).numpy().astype(np.uint8)
        os.chdir(tmp)
        official = official_probabilities(args.upstream, work / "weights", rgb, work)
    with torch.no_grad():
        ours = model.probabilities(image)
    diff = float((ours - official).abs().max())
    agree = float((ours.argmax(1) == official.argmax(1)).float().mean())
    print(f"max |ours - official| {diff:.3g} (largest {float(official.abs().max()):.3g}); argmax agreement {agree:.6f}")
    meta = {"model": MODEL, "num_classes": 7, "weight_seed": WEIGHT_SEED, "image_seed": IMAGE_SEED,
            "image_size": [SIZE, SIZE], "flags": FLAGS, "upstream": "VinAIResearch/MagNet", "commit": COMMIT,
            "output": "final cumulative probability map (test.py), float32",
            "generation": {"max_abs_diff": diff, "argmax_agreement": agree}}
    print("wrote", save_fixture("magnet", official, meta, stride=STRIDE))


if __name__ == "__main__":
    main()
