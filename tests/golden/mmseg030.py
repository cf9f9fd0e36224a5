"""Reference parameter counts and golden outputs of networks re-implemented from mmsegmentation 0.30.0 configs
(PSPNet, ICNet), shared by their `count_<name>.py` scripts. Never imported by the tests.

Runs in the side venv with mmsegmentation 0.30.0 and mmcv 1.4.0 without compiled ops, which also sees the project's
packages (`/tmp/side/bin/python tests/golden/count_pspnet.py`; README.md for building one). The reference is
mmseg's own model built from the installed config (`mmseg/.mim/configs`), with BN for SyncBN and 7 classes.

What a script checks: the reference's parameter count against ours; then our model with seeded weights
(`seeded.seed_weights`), written by our `save_official`, loaded into the reference by `mmcv.runner.load_checkpoint`
(every tensor used, none left over), and both run on a seeded uint8 image: ours through `predict` (global inference at
full scale), the reference through its config's test pipeline and `whole_inference`. The auxiliary heads are
compared on the same input too. With `--write` (and parity) the reference logits become `tests/golden/<name>.npz`,
its auxiliary heads' logits `tests/golden/<name>_aux.npz`.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
# the side venv has a site-packages `tests` package that shadows ours: import the golden helpers as `golden`
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from golden import mmseg_side  # noqa: E402
from golden.seeded import save_arrays, save_fixture, seed_weights, seeded_image  # noqa: E402

MMSEG_VERSION = "0.30.0"
REL_TOL = 1e-4  # parity: max |ours - reference| within this share of the largest reference |logit|


def prepare() -> Path:
    """Import mmseg 0.30.0 on CPU without mmcv's compiled ops; returns its configs folder."""
    sys.modules["mmcv.ops"] = mmseg_side._Stub("mmcv.ops")
    import mmcv

    mmcv.ops = sys.modules["mmcv.ops"]
    nn.SyncBatchNorm = nn.BatchNorm2d
    import mmseg

    if mmseg.__version__ != MMSEG_VERSION:
        raise SystemExit(f"mmseg {mmseg.__version__} found, the references are mmseg {MMSEG_VERSION}")
    return Path(mmseg.__file__).parent / ".mim" / "configs"


def _set_num_classes(node, num_classes: int) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "num_classes":
                node[key] = num_classes
            else:
                _set_num_classes(value, num_classes)
    elif isinstance(node, list):
        for item in node:
            _set_num_classes(item, num_classes)


def build_reference(configs: Path, config: str, num_classes: int):
    """mmseg's segmentor from `config` with BN and `num_classes`, as `tools/test.py` builds it (no init_weights: the
    checkpoint sets every tensor); eval mode."""
    from mmcv import Config
    from mmseg.models import build_segmentor

    cfg = Config.fromfile(str(configs / config))
    cfg.model.pretrained = None
    cfg.data.test.test_mode = True
    mmseg_side.bn_config(cfg._cfg_dict)
    _set_num_classes(cfg.model, num_classes)
    model = build_segmentor(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    return model.eval(), cfg


@torch.no_grad()
def main(run: str, config: str, fixture: str, *, model: dict, weight_seed: int, image_seed: int,
         size: tuple[int, int], stride: int, num_classes: int = 7) -> None:
    parser = argparse.ArgumentParser(description=f"{run} vs mmseg {MMSEG_VERSION} {config}")
    parser.add_argument("--write", action="store_true", help=f"write tests/golden/{fixture}.npz (needs parity)")
    args = parser.parse_args()
    configs = prepare()
    import mmcv

    from methods import build_method, count_parameters

    official, cfg = build_reference(configs, config, num_classes)
    ours = seed_weights(build_method(run, num_classes, **model), weight_seed).eval()
    n_ref, n_ours = count_parameters(official), count_parameters(ours)
    print(f"parameters, {num_classes} classes: reference {n_ref:,} ({config}), ours {n_ours:,} "
          f"({100 * (n_ours - n_ref) / n_ref:+.3f}%)")

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / f"{fixture}.pth"
        ours.save_official(str(checkpoint))
        mmseg_side.load_official_checkpoint(official, checkpoint)  # every tensor placed, none left over
        image = seeded_image(image_seed, *size)
        img, img_metas, transforms = mmseg_side.pipeline_inputs(cfg, image, Path(tmp))
    reference = mmseg_side.official_logits(official, img, img_metas)
    result = mmseg_side.compare(f"{run} logits", ours.predict(image), reference)

    # auxiliary heads on the same features: ours in eval mode with only the top-level training flag set, so that
    # network_outputs also returns its auxiliary logits (BN statistics and dropout stay in eval mode)
    feats = official.extract_feat(img)
    heads = official.auxiliary_head if isinstance(official.auxiliary_head, nn.ModuleList) else \
        [official.auxiliary_head]
    ours.training = True
    aux = ours.network_outputs(ours.normalize(image))[1:]
    ours.training = False
    if len(aux) != len(heads):
        raise SystemExit(f"{len(aux)} auxiliary outputs, the reference has {len(heads)} auxiliary heads")
    reference_aux = [head(feats) for head in heads]
    aux_results = [mmseg_side.compare(f"{run} auxiliary head {i}", mine, theirs)
                   for i, (mine, theirs) in enumerate(zip(aux, reference_aux, strict=True))]

    worst = max(r["max_abs_diff"] / r["official_max_abs"] for r in [result, *aux_results])
    print(f"parity: worst max |diff| / max |reference logit| = {worst:.3g} (bound {REL_TOL:g})")
    if not args.write:
        return
    if worst > REL_TOL:
        raise SystemExit("no parity: fixture not written")
    meta = {"reference": {"package": f"mmsegmentation {MMSEG_VERSION}", "config": config,
                          "config_blob": mmseg_side.git_blob_id(configs / config)},
            "run": run, "num_classes": num_classes, "model": model, "weight_seed": weight_seed,
            "image_seed": image_seed, "size": list(size), "img_norm_cfg": dict(cfg.img_norm_cfg),
            "pipeline": ["LoadImageFromFile (PNG of the RGB image, read as BGR)",
                         f"MultiScaleFlipAug(flip=False): {transforms}"],
            "parity": {"logits": result, "aux": aux_results},
            "environment": {"torch": torch.__version__, "mmcv": mmcv.__version__,
                            "python": platform.python_version()}}
    print(f"wrote {save_fixture(fixture, reference, meta, stride)}")
    # the auxiliary heads' logits at their own (1/8, 1/16) resolution: a few kB, kept whole
    aux_meta = {"of": fixture, "input": "the fixture's image, normalised, through each auxiliary head at its stride"}
    print(f"wrote {save_arrays(f'{fixture}_aux', {f'aux{i}': t for i, t in enumerate(reference_aux)}, aux_meta)}")
