"""Regenerate the ISDNet golden fixtures from the official code (`cedricgsh/ISDNet` @ 7341335):

- `isdnet`: end-to-end logits of the DeepGlobe model (7 classes) on a seeded 512x512 uint8 image;
- `stdc`: the shallow net's (ShallowNet, STDC1 stages 1-4 on 6 channels) feat8 and feat16 on a seeded 64x64 input,
  so that a broken STDC block shows directly.

Our model is built with seeded weights (`seeded.seed_weights`) and written with `save_official`; the official model
is built from the upstream DeepGlobe config as `tools/test.py` builds it, loads that checkpoint with
`mmcv.runner.load_checkpoint`, and runs upstream inference (`whole_inference`, rescale) on the image loaded and
normalised by the config's own test pipeline (BGR PNG -> Normalize to_rgb with the config's img_norm_cfg), minus the
Resize to 2448 (the fixture input is small). Prints our-vs-official numbers, then writes the fixtures.

    <side venv>/bin/python tests/golden/make_isdnet.py --upstream /path/to/ISDNet   # a tree at 7341335
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.golden import mmseg_side  # noqa: E402
from tests.golden.seeded import save_arrays, save_fixture, seed_weights, seeded_image  # noqa: E402

REPOSITORY = "cedricgsh/ISDNet"
COMMIT = "7341335677fd6201457b321e1e6368feb7ad647e"
CONFIG = "configs/isdnet/isdnet_r18-d8_1224x1224_80k_DeepGlobe.py"
FILES = {  # git blob ids at COMMIT of every upstream file the fixtures depend on
    "mmseg/models/decode_heads/isdhead.py": "0a1b80d4392f3de34e7396658ba17b12d047c109",
    "mmseg/models/decode_heads/stdc_head.py": "37ecb6a232fc5f49ce379d8fe7d2ceaec27239eb",
    "mmseg/models/decode_heads/aspp_refine_head.py": "ec3e00e6b71b0dd922f71867a2ecc517184c52d4",
    "mmseg/models/decode_heads/refine_decode_head.py": "fbc9577049fa0cbaa2f97d657b2f3c928cfdbe11",
    "mmseg/models/decode_heads/cascade_decode_head.py": "d02122ca0e68743b1bf7a893afae96042f23838c",
    "mmseg/models/decode_heads/aspp_head.py": "6332ab120ceb040f18ab962c74a97dd23bb17caa",
    "mmseg/models/decode_heads/fcn_head.py": "4ea3742f0b685ffc891d70db86cd6ea058283fd6",
    "mmseg/models/segmentors/encoder_decoder_refine.py": "68baf4f0f7b2608f8433a7f29917bb43e773ed84",
    "mmseg/models/segmentors/encoder_decoder.py": "04de3f4180810bf63c02548587b9226d6eae6b46",
    "mmseg/models/backbones/resnet.py": "f7238f02f65543d61ec937f28f164450253dfca2",
    CONFIG: "fbf8aa4f87d3615246be92c76fb9ae02fac05de8",
    "configs/_base_/datasets/deepglobe_1224x1224.py": "c360dd3874ffb52526a5e0b216e01ea78b64878f",
    "configs/_base_/models/isdnet_r50-d8.py": "e97a157e7c7210cd36279f839db7e5af5c211a4a",
    "mmseg/datasets/pipelines/transforms.py": "c5e94a0f1423e20bc827aef1f947c8bcdcdf8c81",
    "mmseg/datasets/pipelines/loading.py": "5af5613c0c93dd60c99f5cc0a7cd6a9d0bc7e1eb",
    "mmseg/datasets/pipelines/test_time_aug.py": "473a12bc86b57e564c415ff8bdb1e431425370db",
}

NUM_CLASSES = 7  # DeepGlobe config
MODEL = {}  # our constructor keywords besides num_classes: the code defaults are the DeepGlobe model
WEIGHT_SEED = 1701
IMAGE_SEED = 1702
SIZE = 512  # divisible by 32: no odd-size paths (Laplacian size fix, ceil strides)
STRIDE = 8  # the logits are a bilinear upsampling of the 1/8 map: every 8th pixel keeps the information
STDC_SEEDS = (1703, 1704)  # the two seeded images making the STDC fixture's 6-channel input
STDC_SIZE = 64


def stdc_input(seeds=STDC_SEEDS, size=STDC_SIZE) -> torch.Tensor:
    """(1, 6, size, size): two seeded images mapped to about [-2, 2] (the shallow input's own scale, normalised
    Laplacian residuals), independent of the Laplacian code so that only STDC is tested."""
    return torch.cat([(seeded_image(seed, size, size) - 127.5) / 64.0 for seed in seeds], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, required=True, help=f"{REPOSITORY} tree at {COMMIT[:7]}")
    parser.add_argument("--dry-run", action="store_true", help="compare only, write no fixture")
    args = parser.parse_args()
    upstream = args.upstream.resolve()
    blobs = mmseg_side.check_files(upstream, FILES)
    mmseg_side.prepare(upstream)
    # upstream builds the Laplacian kernel on CUDA (spec isdnet.md §9.1 #5): the default device, patched to CPU
    from mmseg.models.decode_heads import isdhead

    isdhead.Lap_Pyramid_Conv.gauss_kernel.__defaults__ = (torch.device("cpu"),)
    import mmcv

    from methods import build_method

    torch.set_grad_enabled(False)
    ours = seed_weights(build_method("isdnet", NUM_CLASSES, **MODEL), WEIGHT_SEED).eval()
    official, cfg = mmseg_side.build_official(upstream / CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "isdnet.pth"
        ours.save_official(str(checkpoint))
        left = mmseg_side.load_official_checkpoint(official, checkpoint)
        image = seeded_image(IMAGE_SEED, SIZE, SIZE)
        img, img_metas, transforms = mmseg_side.pipeline_inputs(cfg, image, Path(tmp))
    print(f"official model: {sum(p.numel() for p in official.parameters())} parameters; not in the checkpoint: "
          f"{left or 'none'}")
    norm = dict(cfg.img_norm_cfg)
    gap = float((ours.normalize(image) - img).abs().max())
    print(f"input: max |our normalisation - upstream Normalize| = {gap:.3g}")

    # end to end, from the uint8 image: ours normalises itself, upstream gets its pipeline's tensor
    official_out = mmseg_side.official_logits(official, img, img_metas)
    parity = mmseg_side.compare("isdnet logits", ours.predict(image), official_out)
    # the same on the very same normalised tensor (isolates the network from the normalisation)
    ours.set_normalization([0.0] * 3, [1.0] * 3)
    mmseg_side.compare("isdnet logits, same normalised input", ours.predict(img), official_out)

    x6 = stdc_input()
    feat8, feat16 = official.refine_head.stdc_net(x6)
    our8, our16 = ours.refine_head.stdc_net(x6)
    stdc_parity = {"feat8": mmseg_side.compare("stdc feat8", our8, feat8),
                   "feat16": mmseg_side.compare("stdc feat16", our16, feat16)}

    common = {
        "upstream": {"repository": REPOSITORY, "commit": COMMIT, "config": CONFIG, "files": blobs},
        "method": "isdnet", "num_classes": NUM_CLASSES, "model": MODEL, "weight_seed": WEIGHT_SEED,
        "environment": {"torch": torch.__version__, "mmcv": mmcv.__version__, "python": platform.python_version()},
    }
    meta = dict(common, image_seed=IMAGE_SEED, size=[SIZE, SIZE], img_norm_cfg=norm,
                pipeline=["LoadImageFromFile (PNG of the RGB image, read as BGR)",
                          f"MultiScaleFlipAug(flip=False): {transforms}",
                          "Resize to (2448, 2448) skipped: the fixture input is small"],
                inference="EncoderDecoderRefine.whole_inference(rescale=True): logits at the input size",
                parity=parity)
    stdc_meta = dict(common, stdc_seeds=list(STDC_SEEDS), stdc_size=STDC_SIZE,
                     input="cat[(seeded_image(s, size, size) - 127.5) / 64 for s in stdc_seeds] (6 channels)",
                     module="refine_head.stdc_net (ShallowNet(in_channels=6), forward -> feat8, feat16)",
                     parity=stdc_parity)
    if args.dry_run:
        return
    for path in (save_fixture("isdnet", official_out, meta, stride=STRIDE),
                 save_arrays("stdc", {"feat8": feat8, "feat16": feat16}, stdc_meta)):
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
