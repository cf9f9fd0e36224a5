"""Regenerate tests/golden/magnet.npz and magnet_cityscapes.npz: the official MagNet inference
(`VinAIResearch/MagNet` @ 7f5b876, `test.py`) on a seeded image with seeded weights written by our `save_official`.

The official code runs unmodified from the checkout given by `--upstream` (AGPL-3.0: nothing of it is copied here);
this script only patches, in memory: the ImageNet download in `ResnetFPN()` (pretrained off; the checkpoint
overwrites every tensor), the numpy aliases removed in numpy 1.24 (`np.float`, `np.int`, `np.bool`), and captures
the final cumulative probability map by wrapping `test.py`'s `F.interpolate` (its last call resizes that map to
the label size, an identity here). Needs OpenCV (the official data path resizes with cv2) in a side environment:

    python -m venv /tmp/side && echo "$PWD/.venv/lib/python3.11/site-packages" \
        > /tmp/side/lib/python3.11/site-packages/project.pth
    /tmp/side/bin/pip install opencv-python-headless tqdm
    PYTHONPATH=$PWD /tmp/side/bin/python tests/golden/make_magnet.py --upstream <MagNet checkout at 7f5b876> \
        [--case deepglobe|cityscapes|all]

deepglobe (magnet.npz): DeepGlobe's schedule scaled to a 240 px image (native_size 240: scales 60, 120, 240, crop 60,
network input 50, ~ upstream's 612 -> 508), `--model fpn`, all tiles, n_points 0.75, median kernel 11, sub-batch 1.
About 30 s on CPU.

cityscapes (magnet_cityscapes.npz): upstream's Cityscapes flags (`--model hrnet18+ocr`, 19 classes, three refiner
files, smooth kernel 5, all tiles) on a 64x128 image, i.e. the 1024x2048 schedule divided by 16: scales 128-64,
64-32, 32-16, 16-8 (W-H), crop = input 16x8, 1 + 4 + 16 + 64 tiles; n_points 128 = 32768 / 16², the release's share
of each scale (25 %, 6.25 %, 1.56 %). Our side is `MagNet.CITYSCAPES` with only n_points changed (native 1024x2048
scales the crop and input by itself). About 20 s on CPU.
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
    "magnet/model/hrnet_ocr/__init__.py": "b9091d18e0b5f099120d7ecf29308ff640ed1e66",
    "magnet/model/hrnet_ocr/config.py": "b62461d0d766bc907beaf8bde6b8aef5feb4230f",
    "magnet/model/hrnet_ocr/module.py": "719c193b1eecc86776544b26f01800195a5d7114",
    "magnet/dataset/cityscapes.py": "74af5f52485cc31029bdaffb01f7b1d433f0da3b",
}
MODEL = {"native_size": 240, "crop_size": 60, "input_size": 50, "sub_batch_size": 1}
SIZE, WEIGHT_SEED, IMAGE_SEED, STRIDE = 240, 11, 12, 2
FLAGS = {"n_points": 0.75, "n_patches": -1, "smooth_kernel": 11}
# Cityscapes: the release's keywords (methods.magnet.MagNet.CITYSCAPES, lists as JSON keeps them) on a 64x128 image
CS_SIZE, CS_DIVISOR, CS_WEIGHT_SEED, CS_IMAGE_SEED, CS_STRIDE = (64, 128), 16, 21, 22, 2
CS_FLAGS = {"n_points": 32768 // CS_DIVISOR ** 2, "n_patches": -1, "smooth_kernel": 5}


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
                  model: dict = MODEL, flags: dict = FLAGS, cityscapes: dict | None = None
                  ) -> tuple[types.ModuleType, list[torch.Tensor]]:
    """Upstream `test.py`, imported, set up to run `main()` on `image` (H x W x 3 uint8 RGB, written to `work` as a PNG
    with an all-class-0 label): `sys.argv` holds DeepGlobe's schedule scaled to `size` (scales size/4, size/2, size)
    with `model`'s crop and input sizes, `flags` and the weight files in `weights`; with `cityscapes` (the keywords of
    our Cityscapes model, `MagNet.CITYSCAPES` style) upstream's Cityscapes command instead, at the image's size
    (`size` unused). Returns the module and the list that collects every output of its `F.interpolate`: the last one
    of a run is the final map resized to the label size."""
    import cv2

    import_upstream(upstream)
    import test as official  # upstream test.py

    cv2.imwrite(str(work / "img.png"), image[:, :, ::-1])  # RGB -> BGR file; upstream converts back
    # an all-zero label (Cityscapes: labelId 7, road, since an all-ignored label breaks upstream's metric)
    label = np.zeros_like(image) if cityscapes is None else np.full(image.shape[:2], 7, np.uint8)
    cv2.imwrite(str(work / "mask.png"), label)
    (work / "list.txt").write_text("img.png\tmask.png\n")
    calls: list[torch.Tensor] = []

    def interpolate(*args, **kwargs):
        out = torch.nn.functional.interpolate(*args, **kwargs)
        calls.append(out)
        return out

    official.F = types.SimpleNamespace(interpolate=interpolate)
    if cityscapes is None:
        scales = ",".join(f"{s}-{s}" for s in (size // 4, size // 2, size))
        crop, inp = [str(model["crop_size"])] * 2, [str(model["input_size"])] * 2
        files = ["--model", "fpn", "--num_classes", "7", "--pretrained", str(weights / "deepglobe_fpn.pth"),
                 "--pretrained_refinement", str(weights / "deepglobe_refinement.pth")]
        dataset = "deepglobe"
    else:
        from methods import build_method

        ours = build_method("magnet", 19, **cityscapes)
        height, width = image.shape[:2]
        sizes, crop_hw, inp_hw, _ = ours.schedule(height, width)
        scales = ",".join(f"{w}-{h}" for h, w in sizes)
        crop, inp = [str(v) for v in crop_hw[::-1]], [str(v) for v in inp_hw[::-1]]  # upstream: W H
        backbone_file, refiner_files = ours.release_files()
        files = ["--model", "hrnet18+ocr", "--num_classes", "19", "--pretrained", str(weights / backbone_file),
                 "--pretrained_refinement", *(str(weights / f) for f in refiner_files)]
        dataset = "cityscapes"
    sys.argv = ["test.py", "--dataset", dataset, "--root", str(work), "--datalist", str(work / "list.txt"),
                "--scales", scales, "--crop_size", *crop, "--input_size", *inp, "--num_workers", "0", *files,
                "--sub_batch_size", str(model["sub_batch_size"]), "--n_points", str(flags["n_points"]),
                "--n_patches", str(flags["n_patches"]), "--smooth_kernel", str(flags["smooth_kernel"])]
    return official, calls


def official_probabilities(upstream: Path, weights: Path, image: np.ndarray, work: Path,
                           cityscapes: dict | None = None) -> torch.Tensor:
    if cityscapes is None:
        official, calls = official_test(upstream, weights, image, work)
    else:
        official, calls = official_test(upstream, weights, image, work, model=cityscapes, flags=CS_FLAGS,
                                        cityscapes=cityscapes)
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
    from magnet.model.hrnet_ocr import HRNetW18_OCR
    from magnet.model.refinement import RefinementMagNet

    c = ours.num_classes
    backbone_file, refiner_files = ours.release_files()
    net = HRNetW18_OCR(c) if ours.hrnet else ResnetFPN(c)
    net.load_state_dict(torch.load(weights / backbone_file))
    pairs = [(ours.backbone, net)]
    for i, name in enumerate(refiner_files):
        ref = RefinementMagNet(c, use_bn=True)
        ref.load_state_dict(torch.load(weights / name))
        pairs.append((ours._refiner_module(i), ref))
    for mine, theirs in pairs:
        a, b = mine.state_dict(), theirs.state_dict()
        assert set(a) == set(b), sorted(set(a) ^ set(b))[:8]
        assert all(torch.equal(a[k].float(), b[k].float()) for k in a)


def cityscapes_model() -> dict:
    """Our keywords of the Cityscapes case: the release's, n_points scaled to the image, sub-batch 1."""
    from methods.magnet import MagNet

    config = {k: list(v) if isinstance(v, tuple) else v for k, v in MagNet.CITYSCAPES.items()}
    return {**config, "n_points": CS_FLAGS["n_points"], "sub_batch_size": 1}


def generate(upstream: Path, case: str) -> None:
    cityscapes = cityscapes_model() if case == "cityscapes" else None
    config, classes = (cityscapes, 19) if cityscapes else (MODEL, 7)
    seed, image_seed = (CS_WEIGHT_SEED, CS_IMAGE_SEED) if cityscapes else (WEIGHT_SEED, IMAGE_SEED)
    size = CS_SIZE if cityscapes else (SIZE, SIZE)
    model = seed_weights(build_method("magnet", classes, **config), seed).eval()
    image = seeded_image(image_seed, *size)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model.save_official(str(work / "weights"))
        check_loaded(upstream, work / "weights", model)
        rgb = image[0].permute(1, 2, 0).numpy().astype(np.uint8)
        os.chdir(tmp)
        try:
            official = official_probabilities(upstream, work / "weights", rgb, work, cityscapes)
        finally:
            os.chdir(cwd)
    with torch.no_grad():
        ours = model.probabilities(image)
    diff = float((ours - official).abs().max())
    agree = float((ours.argmax(1) == official.argmax(1)).float().mean())
    print(f"{case}: max |ours - official| {diff:.3g} (largest {float(official.abs().max()):.3g}); "
          f"argmax agreement {agree:.6f}")
    meta = {"model": config, "num_classes": classes, "weight_seed": seed, "image_seed": image_seed,
            "image_size": list(size), "flags": CS_FLAGS if cityscapes else FLAGS, "upstream": "VinAIResearch/MagNet",
            "commit": COMMIT, "output": "final cumulative probability map (test.py), float32",
            "generation": {"max_abs_diff": diff, "argmax_agreement": agree}}
    name = "magnet_cityscapes" if cityscapes else "magnet"
    print("wrote", save_fixture(name, official, meta, stride=CS_STRIDE if cityscapes else STRIDE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, type=Path, help="MagNet checkout at 7f5b876")
    parser.add_argument("--case", choices=("deepglobe", "cityscapes", "all"), default="all")
    args = parser.parse_args()
    check_blobs(args.upstream)
    torch.set_num_threads(2)
    for case in ("deepglobe", "cityscapes") if args.case == "all" else (args.case,):
        generate(args.upstream, case)


if __name__ == "__main__":
    main()
