"""SegFormer-B0 (`methods/segformer.py`) against mmsegmentation 0.30 (`segformer/segformer_mit-b0_8x1_1024x1024_160k_
cityscapes.py`): parameter count, golden parity and the `segformer` fixture. Run with the side venv (mmseg 0.30,
mmcv 1.4.0 without compiled ops), never by the tests:

    /tmp/side/bin/python tests/golden/count_segformer.py [--dry-run]

It builds the reference from the config (num_classes=7, BN, no pretrained file) and counts its parameters, writes
our seeded weights (`seeded.seed_weights`) with `save_official` (MiT keys converted to mmseg's: q/kv joined into
in_proj, FFN Linear weights as 1x1 convs), loads them with `mmcv.runner.load_checkpoint` (every tensor used, every
reference tensor set) and compares whole-image logits (`encode_decode`) on the same normalised seeded image, then
writes `segformer.npz`.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
CONFIG = "segformer/segformer_mit-b0_8x1_1024x1024_160k_cityscapes.py"
NUM_CLASSES = 7
MODEL = {"inference": "global", "downsample": 1}  # whole-image inference at the input resolution, as `encode_decode`
WEIGHT_SEED, IMAGE_SEED = 2202, 2204  # a pair whose logits have no pixel within the test tolerance of a tie
SIZE = (100, 132)  # not divisible by 32: exercises the ceil strides of the patch embeddings
STRIDE = 2


def _load(name: str):
    """tests/golden/<name>.py by path (the side venv holds an unrelated `tests` package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "golden" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mmseg_side, seeded = _load("mmseg_side"), _load("seeded")


def build_reference():
    """The mmseg 0.30 segmentor from CONFIG with num_classes=7 and BN (mmcv.ops stubbed, no pretrained file)."""
    sys.modules["mmcv.ops"] = mmseg_side._Stub("mmcv.ops")
    import mmcv

    mmcv.ops = sys.modules["mmcv.ops"]
    nn.SyncBatchNorm = nn.BatchNorm2d
    import mmseg
    from mmcv import Config
    from mmseg.models import build_segmentor

    cfg = Config.fromfile(str(Path(mmseg.__file__).parent / ".mim" / "configs" / CONFIG))
    cfg.model.pretrained = None
    cfg.model.backbone.pop("init_cfg", None)
    mmseg_side.bn_config(cfg._cfg_dict)
    cfg.model.decode_head.num_classes = NUM_CLASSES
    return build_segmentor(cfg.model), {"mmseg": mmseg.__version__, "mmcv": mmcv.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="compare only, write no fixture")
    args = parser.parse_args()
    reference, versions = build_reference()
    from mmcv.runner import load_checkpoint

    from methods import build_method

    ours = seeded.seed_weights(build_method("segformer-global", NUM_CLASSES, **MODEL), WEIGHT_SEED).eval()
    ref_total = sum(p.numel() for p in reference.parameters())
    our_total = sum(p.numel() for p in ours.parameters())
    print(f"parameters: reference {ref_total:,}, ours {our_total:,} "
          f"({100 * (our_total - ref_total) / ref_total:+.5f}%)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "segformer.pth"
        ours.save_official(str(path))
        load_checkpoint(reference, str(path), map_location="cpu", strict=True)
        saved = torch.load(path)["state_dict"]
    own = reference.state_dict()
    if set(saved) != set(own) or any(not torch.equal(own[k], v) for k, v in saved.items()):
        raise SystemExit("the checkpoint does not set exactly the reference's tensors")

    with torch.no_grad():
        reference.eval()
        image = seeded.seeded_image(IMAGE_SEED, *SIZE)
        official = reference.encode_decode(ours.normalize(image), [{}])
        parity = mmseg_side.compare("segformer logits", ours.predict(image), official)
    meta = {"reference": f"mmsegmentation {versions['mmseg']} {CONFIG} (num_classes={NUM_CLASSES}, BN)",
            "reference_parameters": ref_total, "method": "segformer-global", "num_classes": NUM_CLASSES,
            "model": MODEL, "weight_seed": WEIGHT_SEED, "image_seed": IMAGE_SEED, "size": list(SIZE),
            "inference": "EncoderDecoder.encode_decode on ours.normalize(image)", "parity": parity,
            "environment": dict(versions, torch=torch.__version__, python=platform.python_version())}
    if args.dry_run:
        return
    path = seeded.save_fixture("segformer", official, meta, stride=STRIDE)
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
