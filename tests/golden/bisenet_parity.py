"""Reference parameter count and golden parity of a BiSeNet (`count_bisenetv1.py`, `count_bisenetv2.py`) against
mmsegmentation 0.30's own build of its config with 7 classes. Side environment only (mmseg 0.30 + mmcv 1.4.0
without ops, tests/golden/README.md); never imported by the tests.

`check` prints the reference count, draws seeded weights in OUR model (`seeded.seed_weights`: BN statistics away
from (0, 1), so a mapping error shows), writes them in mmseg's layout with `save_official`, loads that file into the
reference with mmcv's `load_checkpoint` (strict, every tensor checked), compares eval logits on a seeded image of a
size that divides by nothing useful (the decode head through `encode_decode`, each auxiliary head on its backbone
output), and with `--write` saves the reference's logits as `tests/golden/<run name>.npz`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]
from mmseg_side import _Stub, bn_config, compare  # noqa: E402  (the side venv has a `tests` package of its own)
from seeded import save_fixture, seed_weights, seeded_image  # noqa: E402

NUM_CLASSES = 7
WEIGHT_SEED, IMAGE_SEED = 2101, 2102
HEIGHT, WIDTH = 100, 140  # not divisible by 8 or 32: the ceil-mode strides and the resizes to odd sizes
STRIDE = 2  # fixture logits every 2nd pixel


def reference(config: str):
    """mmseg 0.30 `build_segmentor` of `config` (BN for SyncBN, `num_classes` 7) in eval mode; not initialised (every
    tensor is overwritten from our checkpoint)."""
    sys.modules["mmcv.ops"] = _Stub("mmcv.ops")
    import mmcv
    import mmseg
    from mmseg.models import build_segmentor

    mmcv.ops = sys.modules["mmcv.ops"]
    torch.nn.SyncBatchNorm = torch.nn.BatchNorm2d
    cfg = mmcv.Config.fromfile(str(Path(mmseg.__file__).parent / ".mim" / "configs" / config))
    bn_config(cfg._cfg_dict)
    for head in (cfg.model.decode_head, *cfg.model.auxiliary_head):
        head.num_classes = NUM_CLASSES
    model = build_segmentor(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    return model.eval(), cfg


def check(run: str, config: str) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write tests/golden/{run.split('-')[0]}.npz")
    args = parser.parse_args()

    from mmcv.runner import load_checkpoint

    from methods import build_method, count_parameters

    theirs, cfg = reference(config)
    print(f"mmseg 0.30 {config}, {NUM_CLASSES} classes: {count_parameters(theirs):,} parameters")
    model = {"downsample": 1}  # global inference on the image as it is = mmseg's whole inference
    ours = seed_weights(build_method(run, NUM_CLASSES, **model), WEIGHT_SEED).eval()
    print(f"ours ({run}): {count_parameters(ours):,} parameters")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "official.pth"
        ours.save_official(str(path))
        load_checkpoint(theirs, str(path), map_location="cpu", strict=True)
        saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    own = theirs.state_dict()
    if set(own) != set(saved) or any(not torch.equal(own[k], v) for k, v in saved.items()):
        raise SystemExit("the reference did not take every tensor of our checkpoint")

    norm = cfg.img_norm_cfg
    assert norm.to_rgb and torch.allclose(ours.pixel_mean.flatten(), torch.tensor(norm.mean)) and \
        torch.allclose(ours.pixel_std.flatten(), torch.tensor(norm.std)), "normalisation differs from img_norm_cfg"
    image = seeded_image(IMAGE_SEED, HEIGHT, WIDTH)
    with torch.no_grad():
        mine = ours.predict(image)
        x = ours.normalize(image)  # the reference's data pipeline normalises outside the model (same statistics)
        official = theirs.encode_decode(x, [{}])
        result = compare(f"{run} logits", mine, official)
        ours_feats, their_feats = ours.backbone(x), theirs.backbone(x)
        for i, (head, index) in enumerate(zip(ours.auxiliary_head, ours.aux_inputs, strict=True)):
            compare(f"auxiliary head {i} (backbone output {index})", head(ours_feats[index]),
                    theirs.auxiliary_head[i](list(their_feats)))
    if args.write:
        meta = {"run": run, "model": model, "num_classes": NUM_CLASSES, "weight_seed": WEIGHT_SEED,
                "image_seed": IMAGE_SEED, "size": [HEIGHT, WIDTH], "upstream": f"mmsegmentation 0.30.0 {config}",
                "img_norm_cfg": {"mean": list(norm.mean), "std": list(norm.std), "to_rgb": bool(norm.to_rgb)},
                "max_abs_diff": result["max_abs_diff"]}
        print("wrote", save_fixture(run.split("-")[0], official, meta, stride=STRIDE))
