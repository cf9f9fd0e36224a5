"""STDC-Seg (`methods/stdc.py`) against mmsegmentation 0.30's STDC1 (`stdc/stdc1_512x1024_80k_cityscapes.py`):
parameter count, golden parity and the `stdc_seg` fixture. Run with the side venv (mmseg 0.30, mmcv 1.4.0 without
compiled ops), never by the tests:

    /tmp/side/bin/python tests/golden/count_stdc.py [--dry-run]

1. builds the reference from the config (num_classes=7, BN) and counts its parameters;
2. writes our seeded weights (`seeded.seed_weights`) with `save_official`, loads them into the reference with
   `mmcv.runner.load_checkpoint` (every tensor must be used and every reference tensor set, the two constant
   STDCHead kernels aside) and compares whole-image inference logits (`encode_decode`) on the same normalised
   seeded image;
3. compares the training-mode outputs (decode, both FCN auxiliary heads, the STDCHead detail logits; dropout off,
   BN on batch statistics, batch of 2);
4. compares the Detail Aggregation loss (boundary targets, BCE, Dice) on seeded detail logits and labels with an
   ignored region, against `STDCHead.losses`;
then writes `stdc_seg.npz` (the reference logits every STRIDE pixels and their argmax; named so as not to clash with
ISDNet's `stdc.npz`) and `stdc_seg_detail.npz` (the detail-loss inputs and the reference's boundary targets; the
reference losses are in `meta`).
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
CONFIG = "stdc/stdc1_512x1024_80k_cityscapes.py"
NUM_CLASSES = 7
MODEL = {"inference": "global", "downsample": 1}  # whole-image inference at the input resolution, as `encode_decode`
WEIGHT_SEED, IMAGE_SEEDS, LOSS_SEED = 2101, (2102, 2103), 2104
SIZE = (96, 136)  # not divisible by 32: exercises the ceil strides and the context path's resizes
STRIDE = 2
LOSS_SIZE = (64, 80)


def _load(name: str):
    """tests/golden/<name>.py by path (the side venv holds an unrelated `tests` package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "golden" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mmseg_side, seeded = _load("mmseg_side"), _load("seeded")


def build_reference():
    """The mmseg 0.30 segmentor from CONFIG with num_classes=7 and BN (mmcv.ops stubbed)."""
    sys.modules["mmcv.ops"] = mmseg_side._Stub("mmcv.ops")
    import mmcv

    mmcv.ops = sys.modules["mmcv.ops"]
    nn.SyncBatchNorm = nn.BatchNorm2d
    import mmseg
    from mmcv import Config
    from mmseg.models import build_segmentor

    cfg = Config.fromfile(str(Path(mmseg.__file__).parent / ".mim" / "configs" / CONFIG))
    cfg.model.pretrained = None
    mmseg_side.bn_config(cfg._cfg_dict)
    cfg.model.decode_head.num_classes = NUM_CLASSES
    for head in cfg.model.auxiliary_head[:2]:  # the third is STDCHead: 2 classes (boundary / not)
        head.num_classes = NUM_CLASSES
    return build_segmentor(cfg.model), {"mmseg": mmseg.__version__, "mmcv": mmcv.__version__}


def detail_inputs(seed: int = LOSS_SEED, size=LOSS_SIZE):
    """Seeded (2, 2, h/8, w/8) detail logits and (2, h, w) labels: 8x8-px class blocks with an ignored (255) band."""
    rng = np.random.Generator(np.random.PCG64(seed))
    logits = torch.from_numpy(rng.normal(0, 2, (2, 2, size[0] // 8, size[1] // 8)).astype(np.float32))
    blocks = rng.integers(0, NUM_CLASSES, (2, size[0] // 8, size[1] // 8))
    labels = np.kron(blocks, np.ones((8, 8), dtype=np.int64))
    labels[:, 10:17, 20:45] = 255
    return logits, torch.from_numpy(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="compare only, write no fixture")
    args = parser.parse_args()
    reference, versions = build_reference()
    from mmcv.runner import load_checkpoint
    from mmseg.models.decode_heads import decode_head

    from methods import build_method
    from methods.stdc import boundary_targets, detail_losses

    ours = seeded.seed_weights(build_method("stdc-global", NUM_CLASSES, **MODEL), WEIGHT_SEED)
    ref_total = sum(p.numel() for p in reference.parameters())
    our_total = sum(p.numel() for p in ours.parameters())
    print(f"parameters: reference {ref_total:,}, ours {our_total:,} "
          f"({100 * (our_total - ref_total) / ref_total:+.5f}%)")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stdc.pth"
        ours.save_official(str(path))
        load_checkpoint(reference, str(path), map_location="cpu", strict=True)
        saved = torch.load(path)["state_dict"]
    own = reference.state_dict()
    if set(saved) != set(own) or any(not torch.equal(own[k], v) for k, v in saved.items()):
        raise SystemExit("the checkpoint does not set exactly the reference's tensors")

    parity = {}
    with torch.no_grad():
        ours.eval(), reference.eval()
        images = torch.cat([seeded.seeded_image(s, *SIZE) for s in IMAGE_SEEDS])
        x = ours.normalize(images)
        official = reference.encode_decode(x[:1], [{}])
        parity["logits"] = mmseg_side.compare("stdc logits", ours.predict(images[:1]), official)

        ours.train(), reference.train()
        for module in [*ours.modules(), *reference.modules()]:
            if isinstance(module, nn.Dropout2d):
                module.p = 0.0
        feats = reference.extract_feat(x)
        main_ref = torch.nn.functional.interpolate(reference.decode_head(feats), size=x.shape[-2:],
                                                   mode="bilinear", align_corners=True)
        outputs, detail = ours._forward(x)
        names = ("train decode", "train aux 1/8", "train aux 1/16")
        refs = (main_ref, reference.auxiliary_head[0](feats), reference.auxiliary_head[1](feats))
        for name, mine, theirs in zip(names, outputs, refs, strict=True):
            parity[name] = mmseg_side.compare(name, mine, theirs)
        parity["train detail"] = mmseg_side.compare("train detail", detail, reference.auxiliary_head[2](feats))

        logits, labels = detail_inputs()
        captured = {}
        base_losses = decode_head.BaseDecodeHead.losses

        def capture(self, seg_logit, seg_label):
            captured["targets"] = seg_label[:, 0].clone()
            return base_losses(self, seg_logit, seg_label)

        decode_head.BaseDecodeHead.losses = capture
        try:
            ref_loss = reference.auxiliary_head[2].losses(logits, labels[:, None])
        finally:
            decode_head.BaseDecodeHead.losses = base_losses
        targets = boundary_targets(labels)
        bce, dice = detail_losses(logits, targets)
        loss = {"bce": float(ref_loss["loss_ce"]), "dice": float(ref_loss["loss_dice"])}
        print(f"detail targets: {int((targets != captured['targets']).sum())} of {targets.numel()} pixels differ "
              f"({int(captured['targets'].sum())} boundary pixels); loss ours (bce {float(bce):.7g}, dice "
              f"{float(dice):.7g}) vs reference (bce {loss['bce']:.7g}, dice {loss['dice']:.7g})")

    meta = {"reference": f"mmsegmentation {versions['mmseg']} {CONFIG} (num_classes={NUM_CLASSES}, BN)",
            "reference_parameters": ref_total, "method": "stdc-global", "num_classes": NUM_CLASSES, "model": MODEL,
            "weight_seed": WEIGHT_SEED, "image_seed": IMAGE_SEEDS[0], "size": list(SIZE),
            "inference": "EncoderDecoder.encode_decode on ours.normalize(image)", "loss_seed": LOSS_SEED,
            "loss_size": list(LOSS_SIZE), "detail_loss": loss, "parity": parity,
            "environment": dict(versions, torch=torch.__version__, python=platform.python_version())}
    if args.dry_run:
        return
    for path in (seeded.save_fixture("stdc_seg", official, meta, stride=STRIDE),
                 seeded.save_arrays("stdc_seg_detail", {"logits": logits, "labels": labels.to(torch.uint8),
                                                        "targets": captured["targets"].to(torch.uint8)}, meta)):
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KiB)")

if __name__ == "__main__":
    main()
