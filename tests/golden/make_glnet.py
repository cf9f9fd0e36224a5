"""Regenerate tests/golden/glnet_mode{1,2,3}.npz: the official GLNet code (VITA-Group/GLNet @ 7b7bdee) run on our
seeded weights, end to end from the uint8 image (never part of the test run).

    git --git-dir=<mirror of VITA-Group/GLNet> archive 7b7bdee | tar -x -C /tmp/upstream/glnet
    python tests/golden/make_glnet.py --upstream /tmp/upstream/glnet

What runs (spec glnet.md §5.1, §8): our model at a small but faithful configuration (ResNet-50 trunks and 256-wide
FPN heads, the only ones upstream builds; global view and patches 128 px on a 300 x 260 image, so the 4 x 3 patches
overlap and the upstream coverage template differs from the exact count at the stride-4/8 levels) gets
`seed_weights`, is written with `save_official` and loaded by upstream's own `create_model_load_weights`; then
upstream's `Evaluator.eval_test` runs on the PIL image with `sub_batch_size` 6, as `eval_deep_globe.sh` (PIL
`resize(BILINEAR)` global view, `ToTensor()`, `global2patch` cropping, `patch2global` stitching). The logits are
captured around its calls: mode 1 the global output nearest-upsampled to the image as eval_test does before its
argmax; modes 2 and 3 the ensemble scores `patch2global` sums over the overlapping patches (raw sum, not an
average). Which released file each mode reads, all from the same `save_official` folder:
* mode 1 (`path_g`): the local2global file, whose non-"local" keys are our live global branch (what our
  phase-1 prediction runs);
* mode 2 (`path_g2l`, all keys): the local2global file (our live global base layers, local branch, ensemble);
* mode 3: `path_g` = the global file (our frozen stage-1 copy, `global_fixed`), `path_l2g` = the local2global file.

Runtime patches, only inside this process: `.cuda()` is the identity (CPU run), ImageNet downloads return nothing
(every weight is overwritten from the seeded files), and `cv2` (imported by helper.py, used only by an unused
function) is a stub module.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from methods.blocks.patches import PatchGrid  # noqa: E402
from methods.glnet import G2L, GLOBAL, GLNet  # noqa: E402
from tests.golden.seeded import save_fixture, seed_weights, seeded_image  # noqa: E402

UPSTREAM = "VITA-Group/GLNet"
COMMIT = "7b7bdee196e368a1f3a32c54b984915f8e397275"
NUM_CLASSES = 7
MODEL = {"backbone": "resnet50", "global_size": 128, "patch_size": 128}  # every other keyword: GLNet's default
WEIGHT_SEED, IMAGE_SEED = 2019, 7
HEIGHT, WIDTH = 300, 260
SUB_BATCH = 6  # eval_deep_globe.sh --sub_batch_size
STRIDE = 4
MODES = {1: ("glnet_mode1", GLOBAL), 2: ("glnet_mode2", G2L), 3: ("glnet_mode3", None)}


def import_upstream(root: Path):
    """helper.py of the checkout, on the CPU."""
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    import torch.utils.model_zoo as model_zoo

    model_zoo.load_url = lambda *args, **kwargs: {}  # resnet50(True): ImageNet weights, overwritten anyway
    sys.path.insert(0, str(root))
    import helper

    return helper


def check_keys(module: nn.Module, path: Path, local: bool) -> None:
    """Upstream loads with a filtered `state.update`, which skips unknown keys silently: make sure every tensor of
    its model that the mode uses came from our file."""
    ours = torch.load(path, weights_only=True)
    theirs = module.state_dict()
    wanted = {k for k in theirs if local or "local" not in k}
    unmatched = sorted(wanted - set(ours))
    extra = sorted(k for k in ours if (local or "local" not in k) and k not in theirs)
    shapes = sorted(k for k in wanted & set(ours) if ours[k].shape != theirs[k].shape)
    if unmatched or extra or shapes:
        raise SystemExit(f"{path.name} does not map onto upstream's fpn: missing {unmatched[:5]}, "
                         f"extra {extra[:5]}, shape {shapes[:5]}")
    for k in wanted:
        if not torch.equal(theirs[k], ours[k]):
            raise SystemExit(f"upstream did not load {k} from {path.name}")


def run_official(helper, mode: int, folder: Path, image: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
    """(official logits (1, C, H, W) float64, the argmax eval_test itself returned)."""
    l2g, glob = folder / "fpn_deepglobe_local2global.pth", folder / "fpn_deepglobe_global.pth"
    paths = {1: dict(path_g=l2g), 2: dict(path_g2l=l2g), 3: dict(path_g=glob, path_l2g=l2g)}[mode]
    model, global_fixed = helper.create_model_load_weights(NUM_CLASSES, mode, True, **{k: str(v) for k, v in
                                                                                       paths.items()})
    if mode == 1:
        check_keys(model, l2g, local=False)
    else:
        check_keys(model, l2g, local=True)
    if mode == 3:
        check_keys(global_fixed, glob, local=False)
    model.eval()  # train_deep_globe.py L115, before every evaluation
    size = (MODEL["global_size"],) * 2
    evaluator = helper.Evaluator(NUM_CLASSES, size, (MODEL["patch_size"],) * 2, SUB_BATCH, mode, test=False)

    captured = []
    if mode == 1:
        forward = model.forward

        def recording_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            captured.append(out[0].detach().clone())
            return out

        model.forward = recording_forward
    else:
        stitch = helper.patch2global

        def recording_stitch(*args, **kwargs):
            out = stitch(*args, **kwargs)
            captured.append(np.array(out))
            return out

        helper.patch2global = recording_stitch
    label = Image.fromarray(np.zeros((image.size[1], image.size[0]), np.uint8))
    try:
        with torch.no_grad():
            predictions, predictions_global, _ = evaluator.eval_test(
                {"image": [image], "label": [label], "id": ["seeded"]}, model, global_fixed)
    finally:
        if mode != 1:
            helper.patch2global = stitch
    if mode == 1:
        # eval_test: outputs_global (float64 zeros) += output; torch.Tensor(...) -> nearest to the image size
        (out,) = captured
        logits = F.interpolate(torch.Tensor(out.double().numpy()), size=image.size[::-1], mode="nearest")
        returned = predictions_global[0]
    else:
        local, ensemble = captured  # per image: patch2global(local patches), then patch2global(ensembles)
        logits = torch.from_numpy(ensemble)  # (1, C, H, W) float64: the sum over overlapping patches
        returned = predictions[0]
    if not np.array_equal(logits.argmax(1)[0].numpy(), returned):
        raise SystemExit(f"mode {mode}: the captured logits are not what eval_test took the argmax of")
    return logits.double(), returned


def ours_logits(model: GLNet, phase: str | None, image: torch.Tensor) -> torch.Tensor:
    """Our prediction in upstream's terms: averages times the patch count (upstream sums) for modes 2 and 3."""
    model.set_phase(phase)
    model.eval()
    logits = model.predict(image).double()
    if phase == GLOBAL:
        return logits
    grid = PatchGrid.build(image.shape[-2], image.shape[-1], model.patch_size, model.min_overlap)
    count = torch.zeros(1, 1, *image.shape[-2:], dtype=torch.float64)
    for t, left in grid.coords:
        count[..., t:t + grid.patch, left:left + grid.patch] += 1
    return logits * count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, required=True, help=f"checkout of {UPSTREAM} at {COMMIT[:7]}")
    parser.add_argument("--dry-run", action="store_true", help="print the comparison, write no fixture")
    args = parser.parse_args()
    torch.manual_seed(0)
    if (args.upstream / ".git").exists():  # a clone (a `git archive` extraction cannot be checked)
        head = subprocess.run(["git", "-C", str(args.upstream), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.stdout.strip() != COMMIT:
            raise SystemExit(f"{args.upstream} is at {head.stdout.strip()}, expected {COMMIT}")
    if not (args.upstream / "models" / "fpn_global_local_fmreg_ensemble.py").is_file():
        raise SystemExit(f"{args.upstream} is not a GLNet checkout")
    helper = import_upstream(args.upstream)

    ours = seed_weights(GLNet(num_classes=NUM_CLASSES, **MODEL), WEIGHT_SEED).eval()
    image = seeded_image(IMAGE_SEED, HEIGHT, WIDTH)
    pil = Image.fromarray(image[0].permute(1, 2, 0).numpy().astype(np.uint8))  # RGB, as Image.open of a .jpg
    variants = []
    for variant in ({"l2g_coverage": "exact"}, {"global_resize": "antialias"}):
        other = GLNet(num_classes=NUM_CLASSES, **MODEL, **variant)
        other.load_state_dict(ours.state_dict())
        variants.append((variant, other))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_official(tmp)
        for mode, (name, phase) in MODES.items():
            official, _ = run_official(helper, mode, Path(tmp), pil)
            mine = ours_logits(ours, phase, image)
            diff = (mine - official).abs().max().item()
            scale = official.abs().max().item()
            agree = (mine.argmax(1) == official.argmax(1)).double().mean().item()
            print(f"mode {mode} ({name}): max |ours - official| = {diff:.3g} (max |official| {scale:.3g}, "
                  f"relative {diff / scale:.2g}); argmax agreement {100 * agree:.4f}%")
            for variant, other in variants:
                alt = ours_logits(other, phase, image)
                print(f"    variant {variant}: max |variant - official| = {(alt - official).abs().max().item():.3g},"
                      f" argmax agreement {100 * (alt.argmax(1) == official.argmax(1)).double().mean().item():.4f}%")
            if not args.dry_run:
                meta = {"method": "glnet", "num_classes": NUM_CLASSES, "model": MODEL, "phase": phase,
                        "upstream_mode": mode, "weight_seed": WEIGHT_SEED, "image_seed": IMAGE_SEED,
                        "image_size": [HEIGHT, WIDTH], "upstream": UPSTREAM, "commit": COMMIT,
                        "sub_batch_size": SUB_BATCH, "pillow": Image.__version__,
                        "logits": "mode 1: global logits nearest-upsampled to the image; modes 2/3: ensemble logits "
                                  "nearest-upsampled x4 and summed over overlapping patches (patch2global)"}
                path = save_fixture(name, official, meta, stride=STRIDE)
                print(f"    wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
