"""Reference parameter count and golden parity of `deeplabv3` against mmsegmentation 0.30's own build of
`deeplabv3/deeplabv3_r18-d8_512x1024_80k_cityscapes.py` with 7 classes. Run in the side environment of
tests/golden/README.md with `pip install --no-deps mmsegmentation==0.30.0` (never imported by the tests):

    /tmp/side/bin/python tests/golden/count_deeplabv3.py

Prints the reference counts (total, without the auxiliary head), then draws seeded weights in OUR model
(`seeded.seed_weights`: BN statistics too, so that a mapping error shows), writes them in mmseg's layout with
`save_official`, loads that file into the reference, compares the two models' eval logits on a seeded image and
writes the reference's logits to `deeplabv3.npz` (tests/test_golden_generic.py).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]
from mmseg_side import _Stub, bn_config  # noqa: E402  (the side venv has a `tests` package of its own)
from seeded import save_fixture, seed_weights, seeded_image  # noqa: E402

CONFIG = "deeplabv3/deeplabv3_r18-d8_512x1024_80k_cityscapes.py"


def reference(num_classes: int = 7):
    sys.modules["mmcv.ops"] = _Stub("mmcv.ops")
    import mmcv
    import mmseg
    from mmseg.models import build_segmentor

    mmcv.ops = sys.modules["mmcv.ops"]
    torch.nn.SyncBatchNorm = torch.nn.BatchNorm2d
    cfg = mmcv.Config.fromfile(str(Path(mmseg.__file__).parent / ".mim" / "configs" / CONFIG))
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    bn_config(cfg._cfg_dict)
    for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
        head.num_classes = num_classes
    model = build_segmentor(cfg.model)
    model.init_weights()
    return model.eval()


def main() -> None:
    from methods import build_method, count_parameters

    theirs = reference()
    total = count_parameters(theirs)
    print(f"mmseg 0.30 {CONFIG}, 7 classes: {total:,} parameters, "
          f"{total - count_parameters(theirs.auxiliary_head):,} without the auxiliary head")
    ours = seed_weights(build_method("deeplabv3-global", 7, downsample=1).eval(), seed=0)
    print(f"ours: {count_parameters(ours):,}")
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_official(f"{tmp}/ckpt.pth")
        state = torch.load(f"{tmp}/ckpt.pth", weights_only=True)["state_dict"]
        missing, unexpected = theirs.load_state_dict(state, strict=False)
        print("reference load: missing", missing, "unexpected", unexpected)
    image = seeded_image(1, 96, 128)
    with torch.no_grad():
        mine = ours.predict(image)
        x = ours.normalize(image)  # the reference's data pipeline normalises outside the model
        ref = theirs.encode_decode(x, [{"img_shape": (96, 128, 3), "ori_shape": (96, 128, 3), "pad_shape": (96, 128, 3),
                                        "flip": False}])
    print(f"max |logit difference| {(mine - ref).abs().max().item():.2e}, "
          f"argmax agreement {(mine.argmax(1) == ref.argmax(1)).float().mean().item():.4f}")
    meta = {"model": {"downsample": 1}, "weights_seed": 0, "image_seed": 1, "size": [96, 128],
            "reference": f"mmsegmentation 0.30.0 {CONFIG}"}
    print("wrote", save_fixture("deeplabv3", ref, meta, stride=2))


if __name__ == "__main__":
    main()
