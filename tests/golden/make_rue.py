"""Regenerate the RUE DeepGlobe golden fixtures from the official code (`Qinrong-NKU/RUE`):

- `rue_deepglobe_k1`: end-to-end logits of the DeepGlobe model (7 classes) with all 64 patches refined (K = 100%);
- `rue_deepglobe_k0.5`: the same weights and image with 32 of 64 patches (K = 50%).

The DeepGlobe head exists only at the first commit (`ad3097f:mmseg/models/decode_heads/isdhead_patch_deep.py`,
spec rue.md §0, §3.8: P = 8, entropy / 1.946, test-time class 0 - 1000); the rest of the tree is HEAD `ccbfce2`
(every other file used is identical at both commits). Upstream switches heads by editing
`decode_heads/__init__.py` and sets K by editing `select_num` in the head file's test branch (the only shipped
example: the deleted URUR head, 200 of 400; rue.md §6, §12.1 #12): this script does both at import time, on the
source text, without touching the files: the head is imported as `decode_heads.isdhead` and, for K < 100%, its
test-branch `select_num=64` reads `select_num=<K * 64>`. One process per K (the head registers itself once).

Our model (seeded weights, `seeded.seed_weights`) is written with `save_official`; the official model is built
from the DeepGlobe config as `tools/test.py` builds it, loads that checkpoint with `mmcv.runner.load_checkpoint`,
and runs upstream inference (`whole_inference`, rescale) on the image loaded and normalised by the config's own test
pipeline (BGR PNG -> Normalize to_rgb with RUE's DeepGlobe img_norm_cfg), minus the Resize to 2448 (the fixture
input is small; 512 = 8 patches of 64). Prints our-vs-official numbers, then writes the fixtures.

    <side venv>/bin/python tests/golden/make_rue.py --upstream /path/to/RUE@ccbfce2 \
        --deepglobe-head /path/to/RUE@ad3097f/mmseg/models/decode_heads/isdhead_patch_deep.py
"""
from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.golden import mmseg_side  # noqa: E402
from tests.golden.seeded import save_fixture, seed_weights, seeded_image  # noqa: E402

REPOSITORY = "Qinrong-NKU/RUE"
COMMIT = "ccbfce227bee663b18b10c72132739b7b8747908"
HEAD_COMMIT = "ad3097f15a4f4ca8a5935af95311c7665e578a21"
HEAD_PATH = "mmseg/models/decode_heads/isdhead_patch_deep.py"
HEAD_BLOB = "0afbf48517fcb79f088ec813fa993d0c41b1c680"
CONFIG = "configs/isdnet/isdnet_r18-d8_1224x1224_80k_DeepGlobe.py"
DATASET_CONFIG = "configs/_base_/datasets/deepglobe_1224x1224.py"
FILES = {  # git blob ids at COMMIT (identical at HEAD_COMMIT except the dataset config's val/test folders)
    "mmseg/models/decode_heads/stdc_head.py": "9cf0f058dfe97fb097d02d33a4463151c3f44ec0",
    "mmseg/models/decode_heads/aspp_refine_head.py": "6c5bcca5c39972b4b216d3a4530bc3541403e3fe",
    "mmseg/models/decode_heads/refine_decode_head.py": "a7c29e8ef277841812932beeb317d47d3abb4767",
    "mmseg/models/decode_heads/cascade_decode_head.py": "d02122ca0e68743b1bf7a893afae96042f23838c",
    "mmseg/models/decode_heads/fcn_head.py": "4ea3742f0b685ffc891d70db86cd6ea058283fd6",
    "mmseg/models/decode_heads/dysample.py": "8f821805804205e0c934c18b93f91437ddf381a3",
    "mmseg/models/segmentors/encoder_decoder_refine.py": "659c61a40dba5a2fcef16829a10e27a5067a4a66",
    "mmseg/models/segmentors/encoder_decoder.py": "04de3f4180810bf63c02548587b9226d6eae6b46",
    "mmseg/models/backbones/resnet.py": "7124b44878cd00cf0ddbae084f685dabc74e8f1d",
    CONFIG: "fa40b71a6a1fafbb0d3c134925fd089d6bad0284",
    DATASET_CONFIG: ("7e1e16d03f523aa7b0060c74b3837f7b54629ab7", "169107e92ea04ac42f8fe24b765e7b371d6b28b4"),
    "configs/_base_/models/isdnet_r50-d8.py": "b148e30d221b48e5b970299db1f128d63aefb944",
    "mmseg/datasets/pipelines/transforms.py": "c5e94a0f1423e20bc827aef1f947c8bcdcdf8c81",
    "mmseg/datasets/pipelines/loading.py": "fa9df247824ebb078a5e1e77a16a92f219c4266d",
    "mmseg/datasets/pipelines/test_time_aug.py": "473a12bc86b57e564c415ff8bdb1e431425370db",
}
# the DeepGlobe head's hard-coded constants (HEAD_PATH at HEAD_BLOB, rue.md §3.8), as our keywords
NUM_CLASSES = 7
HEAD = {"patch_num": 8, "select_num": 64, "entropy_divisor": 1.946, "suppress_class": 0, "suppress_value": 1000.0}
TEST_BRANCH = "        else:\n            patch_num=8\n            select_num=64\n"
KS = (1.0, 0.5)
WEIGHT_SEED = 1801
IMAGE_SEED = 1802
SIZE = 512  # P = 8 patches of 64 px; deep stream 128 px
STRIDE = 8  # the logits are a bilinear upsampling of the 64 x 64 O_S canvas


def fixture_name(k: float) -> str:
    return f"rue_deepglobe_k{k:g}"


def run_one(args, k: float) -> None:
    upstream = args.upstream.resolve()
    head_file = (args.deepglobe_head or upstream / HEAD_PATH).resolve()
    blobs = mmseg_side.check_files(upstream, FILES)
    blobs.update(mmseg_side.check_files(head_file.parent, {head_file.name: HEAD_BLOB}))
    select_num = round(k * HEAD["patch_num"] ** 2)
    edit = () if select_num == HEAD["select_num"] else (
        (TEST_BRANCH, TEST_BRANCH.replace("select_num=64", f"select_num={select_num}")),)
    mmseg_side.prepare(upstream, (mmseg_side.Redirect("mmseg.models.decode_heads.isdhead", head_file, edit),))
    import mmcv

    from methods import build_method
    from methods.rue import num_selected

    torch.set_grad_enabled(False)
    official, cfg = mmseg_side.build_official(upstream / CONFIG)
    norm = dict(cfg.img_norm_cfg)
    if not norm.get("to_rgb"):
        raise SystemExit(f"img_norm_cfg {norm}: expected to_rgb=True (mean/std in RGB order)")
    if num_selected(k, HEAD["patch_num"]) != select_num:
        raise SystemExit(f"K={k}: ours selects {num_selected(k, HEAD['patch_num'])}, upstream {select_num}")
    model = {"patch_num": HEAD["patch_num"], "entropy_divisor": HEAD["entropy_divisor"],
             "suppress_class": HEAD["suppress_class"], "pixel_mean": list(norm["mean"]),
             "pixel_std": list(norm["std"]), "k": k}
    ours = seed_weights(build_method("rue", NUM_CLASSES, **model), WEIGHT_SEED).eval()
    image = seeded_image(IMAGE_SEED, SIZE, SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "rue.pth"
        ours.save_official(str(checkpoint))
        # ISDHead's inherited conv_seg is never used by its forward (rue.md §3.7): ours has none
        left = mmseg_side.load_official_checkpoint(official, checkpoint, allowed_missing=("refine_head.conv_seg.",))
        img, img_metas, transforms = mmseg_side.pipeline_inputs(cfg, image, Path(tmp))
    # parameter counts of the official model (shared STDC aliases counted once), for methods/rue.py `param_counts`
    unused = sum(p.numel() for n, p in official.named_parameters() if n.startswith("refine_head.conv_seg."))
    training_only = sum(p.numel() for n, p in official.named_parameters() if n.startswith("auxiliary_head."))
    total = sum(p.numel() for p in official.parameters())
    print(f"official parameters: {total:,} in all, {total - unused:,} without the unused refine_head.conv_seg, "
          f"{total - unused - training_only:,} without the auxiliary head as well")
    print(f"K={k:g} ({select_num} of {HEAD['patch_num'] ** 2} patches); not in the checkpoint (unused upstream): "
          f"{left or 'none'}")
    gap = float((ours.normalize(image) - img).abs().max())
    print(f"input: max |our normalisation - upstream Normalize| = {gap:.3g}")

    # the patches upstream selects: its one torch.topk call, on U2 = sigmoid(Down beta) + Down eps
    calls = []
    topk = torch.topk

    def spy(scores, count, *rest, **kwargs):
        result = topk(scores, count, *rest, **kwargs)
        calls.append((scores.clone(), result.indices.clone()))
        return result

    torch.topk = spy
    try:
        official_out = mmseg_side.official_logits(official, img, img_metas)
    finally:
        torch.topk = topk
    scores, ids = calls[0]  # the whole_inference call (simple_test repeats it)
    ranked = scores[0].sort(descending=True).values
    margin = float(ranked[select_num - 1] - ranked[select_num]) if select_num < scores.shape[1] else math.inf
    our_ids = ours.run(ours.normalize(image), HEAD["patch_num"], select_num)["ids"]
    same_ids = sorted(our_ids[0].tolist()) == sorted(ids[0].tolist())
    print(f"selected patches: ours {'==' if same_ids else '!='} official; U2 margin between the {select_num}th and "
          f"the next patch: {margin:.3g}")
    parity = mmseg_side.compare(f"rue K={k:g} logits", ours.predict(image), official_out, HEAD["suppress_class"])
    parity.update(same_patches=same_ids, u2_margin=margin if math.isfinite(margin) else None)
    ours.set_normalization([0.0] * 3, [1.0] * 3)  # the very same normalised tensor: the network alone
    mmseg_side.compare(f"rue K={k:g} logits, same normalised input", ours.predict(img), official_out,
                       HEAD["suppress_class"])

    meta = {
        "upstream": {"repository": REPOSITORY, "commit": COMMIT, "config": CONFIG,
                     "head": {"commit": HEAD_COMMIT, "path": HEAD_PATH, "imported_as": "decode_heads.isdhead",
                              "test_select_num_edit": bool(edit)},
                     "files": blobs},
        "method": "rue", "num_classes": NUM_CLASSES, "model": model, "weight_seed": WEIGHT_SEED,
        "image_seed": IMAGE_SEED, "size": [SIZE, SIZE], "k": k,
        "head": dict(HEAD, select_num=select_num), "img_norm_cfg": norm,
        "selected_patches": sorted(ids[0].tolist()),
        "pipeline": ["LoadImageFromFile (PNG of the RGB image, read as BGR)",
                     f"MultiScaleFlipAug(flip=False): {transforms}",
                     "Resize to (2448, 2448) skipped: the fixture input is small"],
        "inference": "EncoderDecoderRefine.whole_inference(rescale=True): logits at the input size",
        "parity": parity,
        "environment": {"torch": torch.__version__, "mmcv": mmcv.__version__, "python": platform.python_version()},
    }
    if not args.dry_run:
        path = save_fixture(fixture_name(k), official_out, meta, stride=STRIDE)
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, required=True, help=f"{REPOSITORY} tree at {COMMIT[:7]}")
    parser.add_argument("--deepglobe-head", type=Path, default=None,
                        help=f"{HEAD_PATH} at {HEAD_COMMIT[:7]} (default: the same path under --upstream)")
    parser.add_argument("--k", type=float, default=None, help="one K only, in this process (default: each of "
                        f"{', '.join(f'{k:g}' for k in KS)} in its own process)")
    parser.add_argument("--dry-run", action="store_true", help="compare only, write no fixture")
    args = parser.parse_args()
    if args.k is not None:
        run_one(args, args.k)
        return
    for k in KS:
        command = [sys.executable, __file__, "--upstream", str(args.upstream), "--k", str(k)]
        if args.deepglobe_head:
            command += ["--deepglobe-head", str(args.deepglobe_head)]
        if args.dry_run:
            command.append("--dry-run")
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
