"""Regenerate tests/golden/cascadepsp.npz: the official CascadePSP inference (`segmentation-refinement` 0.6 on PyPI =
the folder `segmentation-refinement/` of hkchengrex/CascadePSP @ 481847c, MIT) run on our seeded refinement weights
(never part of the test run).

    pip download --no-deps --no-binary :all: segmentation-refinement==0.6 -d /tmp/cpsp && tar -xzf ... -C /tmp/cpsp
    python tests/golden/make_cascadepsp.py --upstream /tmp/cpsp/segmentation-refinement-0.6

What runs (spec cascadepsp.md §4): our `RefinementNet` gets `seed_weights`, is written with `save_official` (the
release's `module.`-prefixed DataParallel layout) and loaded as the pip `Refiner` does (key[7:], strict) into the
official `RefinementModule`; then the official `process_high_res_im` (global step + local crops) and
`process_im_single_pass` (global only, downscale and upscale paths) refine one binary mask of a seeded 160 x 200
image, normalised as `Refiner.refine` does (ToTensor, ImageNet mean/std; mask thresholded at 127 to +-1). L is
small (128; 256 for the upscale path) so that the local step's 8 crops fit a CPU. The script imports the package's
modules, not its `__init__` (which imports `requests` for the weight download).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from methods.cascadepsp import RefinementNet, crop_windows, refine_global_only, refine_high_res  # noqa: E402
from tests.golden.seeded import save_arrays, seed_weights, seeded_image  # noqa: E402

UPSTREAM = "hkchengrex/CascadePSP (segmentation-refinement 0.6)"
COMMIT = "481847c8f20d11e036c2b29d0be290aa8fa26071"
IMAGE_SEED = 11
HEIGHT, WIDTH = 160, 200
# name: (schedule, L, weight seed). Seed 6 puts every local crop's binarised global mask at 62-74 % foreground (all
# 8 crops refined); with seed 2020 every crop is under 10 % (all skipped: the output is the binarised global step)
CASES = {"high_res_l128": ("high_res", 128, 6), "high_res_l128_skipped": ("high_res", 128, 2020),
         "global_l128": ("global", 128, 6), "global_l256": ("global", 256, 6)}


def fixture_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8-valued RGB image (1, 3, H, W), binary mask (1, 1, H, W)): the mask is where the first channel is
    brighter than its median, a blobby region with about half the pixels."""
    image = seeded_image(IMAGE_SEED, HEIGHT, WIDTH)
    return image, (image[:, :1] > image[:, 0].median()).float()


def official_inputs(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Refiner.refine`'s transforms: ToTensor (/ 255) + Normalize(ImageNet); mask (x > 127) * 255 -> +-1."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (image / 255 - mean) / std, ((mask * 255 > 127).float() - 0.5) / 0.5


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_upstream(root: Path):
    """(pspnet module, eval_helper module) of an extracted segmentation-refinement 0.6; the package's __init__ is
    skipped (it imports requests for the weight download)."""
    package = root / "segmentation_refinement"
    if not (package / "eval_helper.py").is_file():
        sys.exit(f"{root} holds no segmentation_refinement/eval_helper.py: pass the extracted sdist folder")
    for name in ("segmentation_refinement", "segmentation_refinement.models", "segmentation_refinement.models.psp"):
        sys.modules.setdefault(name, type(sys)(name))
    sys.modules["segmentation_refinement.models.psp"].extractors = load_module(
        package / "models/psp/extractors.py", "segmentation_refinement.models.psp.extractors")
    pspnet = load_module(package / "models/psp/pspnet.py", "segmentation_refinement.models.psp.pspnet")
    return pspnet, load_module(package / "eval_helper.py", "segmentation_refinement.eval_helper")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, type=Path, help="the segmentation-refinement 0.6 folder")
    args = parser.parse_args()
    pspnet, helper = import_upstream(args.upstream)

    def pair(seed: int):
        ours = seed_weights(RefinementNet(), seed).eval()
        official = pspnet.RefinementModule()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model"
            torch.save({f"module.{k}": v for k, v in ours.state_dict().items()}, path)  # = CascadePSP.save_official
            official.load_state_dict({k[7:]: v for k, v in torch.load(path).items()})  # main.py L31-37
        return ours, official.eval()

    image, mask = fixture_inputs()
    im, seg = official_inputs(image, mask)
    arrays = {}
    with torch.inference_mode():
        for key, (kind, L, seed) in CASES.items():
            ours, official = pair(seed)
            run = helper.process_high_res_im if kind == "high_res" else helper.process_im_single_pass
            arrays[key] = run(official, im, seg, L)
            mine = (refine_high_res if kind == "high_res" else refine_global_only)(ours, im, seg, L)
            print(f"{key}: official range [{arrays[key].min():.4f}, {arrays[key].max():.4f}], "
                  f"max |ours - official| {(mine - arrays[key]).abs().max():.2e}, "
                  f"threshold-0.5 agreement {((mine > 0.5) == (arrays[key] > 0.5)).float().mean():.6f}")
        shares = {}
        for key in ("high_res_l128", "high_res_l128_skipped"):
            official = pair(CASES[key][2])[1]
            small = F.interpolate(helper.safe_forward(official, *(helper.resize_max_side(t, 128, "area")
                                                                  for t in (im, seg)))["pred_224"],
                                  size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False) > 0.5
            shares[key] = [round(small[..., sy:ey, sx:ex].float().mean().item(), 4)
                           for sy, ey, sx, ex in crop_windows(HEIGHT, WIDTH, 128)]
            print(f"{key}: local crops' foreground shares (0.1-0.9 are refined):", shares[key])
    meta = {"upstream": UPSTREAM, "commit": COMMIT, "image_seed": IMAGE_SEED, "height": HEIGHT, "width": WIDTH,
            "cases": {k: list(v) for k, v in CASES.items()}, "crop_shares": shares}
    print("wrote", save_arrays("cascadepsp", arrays, meta))


if __name__ == "__main__":
    main()
