"""Regenerate tests/golden/fctl_{fcn,medium,large,all,all_tta}.npz: the official FCtL code (liqiokkk/FCtL @ 6fdb0c0)
run on our seeded weights, end to end from the uint8 image (never part of the test run), and print upstream's
parameter counts.

    git --git-dir=<mirror of liqiokkk/FCtL> archive 6fdb0c0 | tar -x -C /tmp/upstream/fctl
    python tests/golden/make_fctl.py --upstream /tmp/upstream/fctl      # a venv with OpenCV (helper.py imports it)

What runs (docs/specs/fctl.md §3, §5, §6): our model (VGG-16 trunks, patches of 128 px, fc6/fc7 narrowed to FC
channels on both sides: upstream's `output` convolutions are swapped for narrower ones after its __init__, its
forward unchanged) gets `seed_weights`, is written with `save_official` (all / B10 / B15 .epoch.pth) and loaded by
upstream's own `create_model_load_weights`; then upstream's `Evaluator.eval_test` runs on the PIL image with
`sub_batch_size` 16 as test.sh (`global2patch` / `global2bigpatch` cropping, PIL resize of the context crops,
`ToTensor()`, `patch2global` stitching). The logits are captured around `patch2global` (the sum over overlapping
patches of each view) and mapped back as eval_test does. Fixtures:
* fcn_tta: mode 1 (train_pre.sh's network) from all.epoch.pth (its mode-1 keys), our phase `fcn`, with test.sh's 8
  views (the view logic is the same in every mode; mode 1 is the cheapest);
* medium / large: mode 2 from B10 (context10 2) / B15 (context10 3), our phases `medium` / `large`;
* all: mode 3 (all + the B10 and B15 trunks) without TTA (val=True); all_tta (mode 3 with the 8 views) is compared
  and printed, not written.
The TTA image is square (the release rotates PIL images without expanding them) and its grid symmetric, so our
average over views times the patch count times 8 is upstream's sum.

Runtime patches, only inside this process: `.cuda()` is the identity (CPU run), torchvision's VGG-16 is built
without ImageNet weights (every weight is overwritten from the seeded files).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from methods.blocks.patches import PatchGrid  # noqa: E402
from methods.fctl import ALL, FCN, LARGE, MEDIUM, FCtL  # noqa: E402
from tests.golden.seeded import save_fixture, seed_weights, seeded_image  # noqa: E402

UPSTREAM = "liqiokkk/FCtL"
COMMIT = "6fdb0c02f22efbf267781857c9ee7f7ebc951974"
NUM_CLASSES = 7
FC = 64  # fc6 / fc7 width of the fixtures (4096 in the release: --fc 4096 checks that too, writes nothing)
WEIGHT_SEED, IMAGE_SEED = 2021, 8
SIZE, TTA_SIZE = (200, 180), (200, 200)  # 2 x 2 patches of 128 overlapping in both axes (VGG-16 runs are slow)
SUB_BATCH = 16  # test.sh --sub_batch_size
STRIDE = 4
# name -> (upstream mode, context10, files, our phase, tta)
RUNS = {"fctl_fcn_tta": (1, 2, ("all",), FCN, True), "fctl_medium": (2, 2, ("B10",), MEDIUM, False),
        "fctl_large": (2, 3, ("B15",), LARGE, False), "fctl_all": (3, 2, ("all", "B10", "B15"), ALL, False),
        "fctl_all_tta": (3, 2, ("all", "B10", "B15"), ALL, True)}
PRINT_ONLY = {"fctl_all_tta"}  # checked at generation; the tests cover TTA with the cheaper fctl_fcn_tta


def import_upstream(root: Path, fc: int):
    """helper.py of the checkout on the CPU, its FCN8 with `output` convs fc wide."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(root))
    import models.fcn as fcn
    import torchvision

    vgg16 = torchvision.models.vgg16
    fcn.models.vgg16 = lambda pretrained=True: vgg16(weights=None)  # fcn.models is torchvision.models
    original = fcn.FCN8.__init__

    def narrow_init(self, num_classes, *args, **kwargs):
        original(self, num_classes, *args, **kwargs)
        if fc != 4096:
            self.output[0], self.output[3] = nn.Conv2d(512, fc, 7), nn.Conv2d(fc, fc, 1)
            self.output[6] = nn.Conv2d(fc, num_classes, 1)

    fcn.FCN8.__init__ = narrow_init
    fcn.FCN8.release_init = original  # for upstream_counts
    import helper

    return helper, fcn


def upstream_counts(fcn) -> dict[str, int]:
    """Parameters of upstream's networks at the release's width (7 classes), as `sum(p.numel())` counts them."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    fcn.FCN8.__init__ = fcn.FCN8.release_init
    return {"FCN8 mode 2 (B10, B15)": count(fcn.FCN8(NUM_CLASSES, 2)), "FCN8 mode 3 (all)": count(fcn.FCN8(
        NUM_CLASSES, 3)), "MiniFCN8": count(fcn.MiniFCN8(NUM_CLASSES)),
        "vgg16 classifier (unused)": count(fcn.models.vgg16(False).classifier)}


def check_loaded(module: nn.Module, path: Path) -> None:
    """Upstream loads with a filtered `state.update`, which skips unknown keys silently: every tensor of its model
    except the unused VGG classifier must have come from our file."""
    ours = torch.load(path, weights_only=True)
    theirs = module.state_dict()
    unmatched = sorted(k for k in theirs if k not in ours and ".vgg.classifier." not in k)
    if unmatched:
        raise SystemExit(f"{path.name} lacks upstream's {unmatched[:5]}")
    for k in theirs:
        if k in ours and not torch.equal(theirs[k], ours[k]):
            raise SystemExit(f"upstream did not load {k} from {path.name}")


def run_official(helper, name: str, folder: Path, image: Image.Image) -> torch.Tensor:
    """Official logits (1, C, H, W) float64: the views' patch2global sums mapped back and summed, as eval_test."""
    mode, context10, files, _, tta = RUNS[name]
    paths = [str(folder / f"{f}.epoch.pth") for f in files]
    unused = "./saved_models_1/"  # what train_deep_globe.py passes for "no file" (os.path.join(model_path, ""))
    pre, g10, g15 = paths if mode == 3 else (paths[0], unused, unused)
    model, g10_model, g15_model = helper.create_model_load_weights(NUM_CLASSES, pre, g10, g15, mode)
    check_loaded(model, Path(pre))
    for fixed, path in ((g10_model, g10), (g15_model, g15)):
        if fixed is not None and path != unused:
            check_loaded(fixed, Path(path))
    model.eval()
    patch = (128, 128)
    evaluator = helper.Evaluator(NUM_CLASSES, patch, patch, SUB_BATCH, mode, not tta, 2, context10, 3)
    views, stitch = [], helper.patch2global

    def recording_stitch(*args, **kwargs):
        out = stitch(*args, **kwargs)
        views.append(np.array(out))
        return out

    helper.patch2global = recording_stitch
    label = Image.fromarray(np.zeros((image.size[1], image.size[0]), np.uint8))
    try:
        with torch.no_grad():
            (returned,) = evaluator.eval_test({"image": [image], "label": [label], "id": ["seeded"]}, model,
                                              g10_model, g15_model)
    finally:
        helper.patch2global = stitch
    total = 0
    for (flip, angle), view in zip([(f, a) for f in evaluator.flip_range for a in evaluator.rotate_range], views,
                                   strict=True):
        back = np.rot90(view, k=angle, axes=(3, 2))  # eval_test's mapping back
        total = total + (np.flip(back, axis=3) if flip else back)
    logits = torch.from_numpy(np.ascontiguousarray(total))
    if not np.array_equal(logits.argmax(1)[0].numpy(), returned):
        raise SystemExit(f"{name}: the captured logits are not what eval_test took the argmax of")
    return logits


def ours_logits(model: FCtL, name: str, image: torch.Tensor) -> torch.Tensor:
    """Our prediction in upstream's terms: averages times the patch count (and the number of views)."""
    _, _, _, phase, tta = RUNS[name]
    model.tta = tta
    model.started.fill_(True)  # the seeded networks stand for trained ones: entering a phase must not re-seed them
    model.set_phase(phase)
    model.eval()
    grid = PatchGrid.build(image.shape[-2], image.shape[-1], model.patch_size, model.min_overlap)
    count = torch.zeros(1, 1, *image.shape[-2:], dtype=torch.float64)
    for t, left in grid.coords:
        count[..., t:t + grid.patch, left:left + grid.patch] += 1
    if tta and not all(torch.equal(count, torch.rot90(count.flip(-1) if f else count, k, dims=(-2, -1)))
                       for f, k in model.views()):
        raise SystemExit("the TTA image's patch grid is not symmetric; pick another size")
    return model.predict(image).double() * count * len(model.views())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, required=True, help=f"checkout of {UPSTREAM} at {COMMIT[:7]}")
    parser.add_argument("--fc", type=int, default=FC, help="fc6/fc7 width (not FC: compare only, write nothing)")
    parser.add_argument("--dry-run", action="store_true", help="print the comparison, write no fixture")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="these fixtures only")
    args = parser.parse_args()
    torch.manual_seed(0)
    if (args.upstream / ".git").exists():
        head = subprocess.run(["git", "-C", str(args.upstream), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.stdout.strip() != COMMIT:
            raise SystemExit(f"{args.upstream} is at {head.stdout.strip()}, expected {COMMIT}")
    if not (args.upstream / "models" / "FCtL.py").is_file():
        raise SystemExit(f"{args.upstream} is not an FCtL checkout")
    helper, fcn = import_upstream(args.upstream, args.fc)
    write = not args.dry_run and args.fc == FC
    model = {"patch_size": 128, "fc_channels": args.fc, "patch_batch": SUB_BATCH}
    ours = seed_weights(FCtL(num_classes=NUM_CLASSES, **model), WEIGHT_SEED).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_official(tmp)
        for name, (mode, context10, _files, phase, tta) in RUNS.items():
            if args.only and name not in args.only:
                continue
            size = TTA_SIZE if tta else SIZE
            image = seeded_image(IMAGE_SEED, *size)
            pil = Image.fromarray(image[0].permute(1, 2, 0).numpy().astype(np.uint8))
            official = run_official(helper, name, Path(tmp), pil)
            mine = ours_logits(ours, name, image)
            diff, scale = (mine - official).abs().max().item(), official.abs().max().item()
            agree = (mine.argmax(1) == official.argmax(1)).double().mean().item()
            print(f"{name} (mode {mode}, context10 {context10}, tta {tta}): max |ours - official| = {diff:.3g} "
                  f"(max |official| {scale:.3g}, relative {diff / scale:.2g}); argmax agreement {100 * agree:.4f}%")
            if write and name not in PRINT_ONLY:
                meta = {"method": "fctl", "num_classes": NUM_CLASSES, "model": model, "phase": phase, "tta": tta,
                        "upstream_mode": mode, "context10": context10, "weight_seed": WEIGHT_SEED,
                        "image_seed": IMAGE_SEED, "image_size": list(size), "upstream": UPSTREAM, "commit": COMMIT,
                        "sub_batch_size": SUB_BATCH, "pillow": Image.__version__,
                        "logits": "patch logits summed over overlapping patches (patch2global), summed over views"}
                path = save_fixture(name, official, meta, stride=STRIDE)
                print(f"    wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KB)")
    print("upstream parameters (7 classes, release width):", upstream_counts(fcn))


if __name__ == "__main__":
    main()
