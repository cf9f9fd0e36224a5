"""Run an mmsegmentation-0.16 fork (ISDNet, RUE) on CPU, for the `make_<method>.py` regeneration scripts only:
never imported by the tests, and never run in the project venv (it needs mmcv 1.4.0, see README.md).

Everything that makes the 2021-era code run on today's CPU-only torch is done here at run time, without touching
the upstream files: `mmcv.ops` (compiled ops; only imported by heads we do not build) and the stray `topk` import
of RUE are stubbed, `nn.SyncBatchNorm` becomes `nn.BatchNorm2d` (identical in eval mode and state-dict layout),
`.cuda()` is a no-op, and the upstream files used are checked against their git blob ids at the pinned commit.
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

STDC_FILE = "STDCNet813M_73.91.tar"  # loaded by ShallowNet from the working directory at construction


def git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_files(root: Path, expected: dict[str, str | tuple[str, ...]]) -> dict[str, str]:
    """Git blob id of each file under `root`; SystemExit naming every file that differs from `expected`."""
    found, bad = {}, []
    for rel, want in expected.items():
        path = root / rel
        if not path.is_file():
            bad.append(f"{rel}: missing")
            continue
        found[rel] = git_blob_id(path)
        allowed = (want,) if isinstance(want, str) else want
        if found[rel] not in allowed:
            bad.append(f"{rel}: blob {found[rel]}, expected {' or '.join(allowed)}")
    if bad:
        raise SystemExit(f"{root} is not the pinned upstream tree:\n  " + "\n  ".join(bad))
    return found


class _Stub(types.ModuleType):
    """A module whose every attribute is a placeholder that fails only if it is actually used."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is stubbed out (mmcv built without ops)")

        return unavailable


class Redirect(importlib.abc.MetaPathFinder):
    """Import module `fullname` from another file (e.g. RUE's DeepGlobe head as `...decode_heads.isdhead`), with
    optional exact text substitutions applied to its source (how upstream sets K: by editing the head file)."""

    def __init__(self, fullname: str, path: Path, substitutions: tuple[tuple[str, str], ...] = ()) -> None:
        self.fullname, self.path, self.substitutions = fullname, Path(path), substitutions

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.fullname:
            return None
        source = self.path.read_text()
        for old, new in self.substitutions:
            if source.count(old) != 1:
                raise SystemExit(f"{self.path}: expected exactly one occurrence of {old!r}")
            source = source.replace(old, new)
        loader = _SourceLoader(source, str(self.path))
        return importlib.util.spec_from_loader(fullname, loader, origin=str(self.path))


class _SourceLoader(importlib.abc.Loader):
    def __init__(self, source: str, origin: str) -> None:
        self.source, self.origin = source, origin

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__file__ = self.origin
        exec(compile(self.source, self.origin, "exec"), module.__dict__)


def prepare(upstream: Path, redirects: tuple[Redirect, ...] = ()) -> None:
    """Make `import mmseg` load the upstream tree and run on CPU (module docstring)."""
    for name in ("mmcv.ops", "topk"):
        sys.modules[name] = _Stub(name)
    import mmcv

    mmcv.ops = sys.modules["mmcv.ops"]
    nn.SyncBatchNorm = nn.BatchNorm2d
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    sys.meta_path[:0] = list(redirects)
    sys.path.insert(0, str(upstream))
    import mmseg

    if not str(Path(mmseg.__file__).resolve()).startswith(str(upstream.resolve())):
        raise SystemExit(f"imported mmseg from {mmseg.__file__}, not from {upstream}")


def bn_config(cfg) -> None:
    """SyncBN -> BN in every norm_cfg of an mmcv Config (in place)."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if key == "norm_cfg" and isinstance(value, dict) and value.get("type") == "SyncBN":
                value["type"] = "BN"
            else:
                bn_config(value)
    elif isinstance(cfg, list):
        for item in cfg:
            bn_config(item)


def build_official(config: Path):
    """The segmentor as `tools/test.py` builds it (pretrained=None, test_mode), with BN for SyncBN; ShallowNet's
    constructor-time STDC ImageNet load reads an empty placeholder (every tensor is overwritten by the checkpoint
    afterwards). Returns (model in eval mode, Config)."""
    from mmcv import Config
    from mmseg.models import build_segmentor

    cfg = Config.fromfile(str(config))
    cfg.model.pretrained = None
    cfg.data.test.test_mode = True
    bn_config(cfg._cfg_dict)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"state_dict": {}}, Path(tmp) / STDC_FILE)
        os.chdir(tmp)
        try:
            model = build_segmentor(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
        finally:
            os.chdir(cwd)
    return model.eval(), cfg


STDC_ALIASES = ("refine_head.stdc_net.x2.", "refine_head.stdc_net.x4.", "refine_head.stdc_net.x8.",
                "refine_head.stdc_net.x16.")


def load_official_checkpoint(model, path: Path, allowed_missing: tuple[str, ...] = ()) -> list[str]:
    """`mmcv.runner.load_checkpoint(model, path, map_location='cpu')` as `tools/test.py`, then check that every
    checkpoint tensor was used and every model tensor came from the checkpoint, except the STDC x2/x4/x8/x16
    aliases (the same modules as `features.*`) and `allowed_missing` prefixes (unused upstream modules). Returns
    the keys left at their constructor values."""
    from mmcv.runner import load_checkpoint

    load_checkpoint(model, str(path), map_location="cpu")
    saved = torch.load(path, map_location="cpu")["state_dict"]
    own = model.state_dict()
    unexpected = sorted(set(saved) - set(own))
    missing = sorted(k for k in set(own) - set(saved) if not k.startswith(STDC_ALIASES))
    if unexpected or any(not k.startswith(allowed_missing) for k in missing):
        raise SystemExit(f"checkpoint does not fit the official model: unexpected {unexpected}, missing {missing}")
    for key, value in saved.items():
        if not torch.equal(own[key], value):
            raise SystemExit(f"{key}: not loaded")
    for key in own:
        if key.startswith(STDC_ALIASES):  # x8.0.<i>.* is features.<i>.* (a slice keeps the names)
            parts = key.split(".")
            block, rest = int(parts[4]), ".".join(parts[5:])
            if not torch.equal(own[key], saved[f"refine_head.stdc_net.features.{block}.{rest}"]):
                raise SystemExit(f"{key}: alias of features.{block} does not hold the loaded tensor")
    return missing


def pipeline_inputs(cfg, image_rgb: torch.Tensor, workdir: Path):
    """The config's test pipeline on `image_rgb` (1, 3, H, W, uint8 values) saved as a PNG and loaded by
    `LoadImageFromFile` (BGR), without the `Resize` to the dataset scale (the fixture input is small): Normalize with
    the config's img_norm_cfg (to_rgb), ImageToTensor, Collect. Returns (img (1, 3, H, W), img_metas, the
    transforms run)."""
    import cv2
    from mmseg.datasets.pipelines import Compose

    pipeline = [dict(step) for step in cfg.data.test.pipeline]
    if [s["type"] for s in pipeline] != ["LoadImageFromFile", "MultiScaleFlipAug"]:
        raise SystemExit(f"unexpected test pipeline {pipeline}")
    height, width = image_rgb.shape[-2:]
    aug = pipeline[1]
    aug["transforms"] = [dict(t) for t in aug["transforms"] if t["type"] != "Resize"]
    aug["img_scale"] = (width, height)
    aug["flip"] = False
    path = workdir / "image.png"
    rgb = image_rgb[0].permute(1, 2, 0).numpy().astype(np.uint8)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1])):
        raise SystemExit(f"could not write {path}")
    data = Compose(pipeline)(dict(img_info=dict(filename=str(path)), img_prefix=None))
    img, meta = data["img"][0][None], data["img_metas"][0].data
    return img, [meta], [t["type"] for t in aug["transforms"]]


@torch.no_grad()
def official_logits(model, img, img_metas) -> torch.Tensor:
    """Upstream whole-image inference: `whole_inference(rescale=True)` (encode_decode + resize to ori_shape), the
    logits `inference` would softmax; checked against the argmax of `forward(return_loss=False)` (simple_test)."""
    if model.test_cfg.mode != "whole":
        raise SystemExit(f"test_cfg.mode is {model.test_cfg.mode}, expected whole")
    logits = model.whole_inference(img, img_metas, rescale=True)
    pred = model(img=[img], img_metas=[img_metas], return_loss=False)[0]
    if not np.array_equal(pred, logits.argmax(1)[0].numpy()):
        raise SystemExit("simple_test's prediction differs from the argmax of whole_inference's logits")
    return logits


def compare(name: str, ours: torch.Tensor, official: torch.Tensor, suppressed: int | None = None) -> dict:
    """Print and return our-vs-official max abs difference and argmax agreement; with `suppressed` (a class whose
    logit had 1000 subtracted) the difference and scale are also given over the other classes."""
    ours, official = ours.detach().float(), official.detach().float()
    if ours.shape != official.shape:
        raise SystemExit(f"{name}: our output {tuple(ours.shape)} vs official {tuple(official.shape)}")
    result = {"max_abs_diff": float((ours - official).abs().max()),
              "argmax_agreement": float((ours.argmax(1) == official.argmax(1)).float().mean()),
              "official_max_abs": float(official.abs().max())}
    top2 = official.topk(2, dim=1).values
    result["min_top2_margin"] = float((top2[:, 0] - top2[:, 1]).min())  # how close the official argmax is to a tie
    line = (f"{name}: max |ours - official| = {result['max_abs_diff']:.3g} (official max |logit| "
            f"{result['official_max_abs']:.3g})")
    if suppressed is not None:
        keep = [c for c in range(official.shape[1]) if c != suppressed]
        result["max_abs_diff_unsuppressed"] = float((ours[:, keep] - official[:, keep]).abs().max())
        result["official_max_abs_unsuppressed"] = float(official[:, keep].abs().max())
        line += (f"; without class {suppressed}: {result['max_abs_diff_unsuppressed']:.3g} (max |logit| "
                 f"{result['official_max_abs_unsuppressed']:.3g})")
    print(f"{line}; argmax agreement {100 * result['argmax_agreement']:.4f}% of {official[:, 0].numel()} pixels "
          f"(smallest official top-2 margin {result['min_top2_margin']:.3g})")
    return result
