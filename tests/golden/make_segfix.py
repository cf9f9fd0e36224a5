"""Regenerate tests/golden/segfix.npz from the OFFICIAL SegFix code, openseg-group/openseg.pytorch @ aefc755 (MIT), on
seeded inputs (never part of the test run). Run in a side venv with torch, scipy and yacs:

    git --git-dir=<mirror> archive HEAD lib scripts/cityscapes/segfix.py | tar -x -C /tmp/openseg_src
    OPENSEG=/tmp/openseg_src /tmp/side/bin/python tests/golden/make_segfix.py

The release's scripts run shell commands and `os.chdir` at import, so the functions are taken from the source with
`ast` and executed alone (their module globals stubbed where they read files):
(a) `shift` (scripts/cityscapes/segfix.py:59-79) on seeded label maps and offsets in {-2, 0, 2}^2 reaching past every
    border, with `grid_sample` forced to align_corners=True (PyTorch 0.4.1's behaviour, spec §10 trap 1; the count of
    pixels the modern default align_corners=False changes is printed and stored as `shift_default_changed`);
(b) the ground-truth generator's `process` (lib/datasets/preprocess/cityscapes/dt_offset_generator.py:57-110) on a
    synthetic Cityscapes labelId map (three classes, one under 100 px, ignored pixels), then the loader's angle
    (offset_loader.py:50-56) and `DTOffsetHelper.distance_to_mask_label` / `angle_to_direction_label` /
    `label_to_vector` (lib/utils/helpers/offset_helper.py) as the loss calls them;
(c) the window starts of `_decide_intersection` (segmentor/tester_offset.py:354-369);
(d) openseg's `HighResolutionNet(MODEL_CONFIGS['hrnet48'], bn_type='torchbn', bn_momentum=0.1)` + the SegFix heads
    (segfix.py:40-73; BN + leaky ReLU 0.01 as InPlaceABN's default, spec §3) with OUR seeded weights written by
    `save_official` and read back by name, on a 64x64 seeded image: boundary and direction logits at stride 4.
It prints ours against the official outputs (what was checked: exact equality for (a)-(c), max |diff| for (d)).
"""
from __future__ import annotations

import ast
import contextlib
import io as std_io
import json
import os
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.golden.seeded import GOLDEN_DIR, seed_weights, seeded_image  # noqa: E402

UPSTREAM = "openseg-group/openseg.pytorch@aefc755"
SHIFT_CASES = [{"seed": 1, "size": (23, 31), "classes": 5}, {"seed": 2, "size": (40, 17), "classes": 3}]
GT_SIZE = (48, 64)
WINDOW_CASES = [(1024, 512), (2048, 512), (600, 512), (513, 512), (700, 256)]
NET_SEED, IMAGE_SEED, NET_SIZE = 11, 12, 64
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12)  # trainIds 0, 1, 2, 3


def shift_inputs(case: dict) -> tuple[np.ndarray, np.ndarray]:
    """A blocky label map (uint8) and offsets (2, H, W) float32 in {-2, 0, 2}: unit directions x 2, 0 on ~half."""
    rng = np.random.Generator(np.random.PCG64(case["seed"]))
    h, w = case["size"]
    coarse = rng.integers(0, case["classes"], ((h + 3) // 4, (w + 3) // 4))
    labels = np.kron(coarse, np.ones((4, 4), dtype=np.int64))[:h, :w].astype(np.uint8)
    offsets = rng.integers(-1, 2, (2, h, w)) * 2 * (rng.random((h, w)) < 0.5)
    offsets[:, 0, :] = -2  # the first row and column look outside: clamped
    offsets[:, :, 0] = -2
    return labels, offsets.astype(np.float32)


def gt_label_ids() -> np.ndarray:
    """A Cityscapes labelId map: class 7 on the left, 8 in a disc, 11 on the right, 12 in a 9x9 square (81 px, under
    the 100 px rule), labelId 0 (ignored) in a band."""
    h, w = GT_SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    ids = np.where(xx < 30, 7, 11).astype(np.uint8)
    ids[(yy - 20) ** 2 + (xx - 28) ** 2 <= 100] = 8
    ids[34:43, 46:55] = 12
    ids[44:47, 5:25] = 0
    return ids


def train_ids(ids: np.ndarray) -> np.ndarray:
    out = np.full(ids.shape, 255, dtype=np.int64)
    for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS):
        out[ids == label_id] = train_id
    return out


def _names(node: ast.stmt) -> set[str]:
    """What a top-level statement defines: a function's or class's name, an assignment's target names."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else []
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _extract(path: Path, names: set[str]) -> str:
    """Source of the top-level functions, classes and assignments named `names` in `path`, in file order."""
    source = path.read_text()
    return "\n\n".join(ast.get_source_segment(source, node) for node in ast.parse(source).body if _names(node) & names)


def _method(path: Path, cls: str, name: str) -> str:
    """Source of method `name` of class `cls` in `path`, dedented to a plain function."""
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return textwrap.dedent(ast.get_source_segment(source, item))
    raise LookupError(f"{cls}.{name} not in {path}")


def official_shift(root: Path, labels: np.ndarray, offsets: np.ndarray, align_corners: bool) -> np.ndarray:
    import torch.nn.functional as F

    shim = types.SimpleNamespace(grid_sample=lambda *a, **k: F.grid_sample(*a, **k, align_corners=align_corners))
    scope = {"torch": torch, "np": np, "F": shim}
    exec(_extract(root / "scripts/cityscapes/segfix.py", {"gen_coord_map", "shift"}), scope)  # noqa: S102
    return scope["shift"](labels, offsets)


def official_ground_truth(root: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    from scipy.ndimage import distance_transform_edt

    saved = {}
    image = types.SimpleNamespace(open=lambda path: types.SimpleNamespace(convert=lambda mode: ids))
    matio = types.SimpleNamespace(savemat=lambda path, d, **k: saved.update(d), loadmat=lambda path: saved)
    scope = {"torch": torch, "np": np, "Image": image, "io": matio, "osp": os.path,
             "distance_transform_edt": distance_transform_edt, "args": types.SimpleNamespace(metric="euc"),
             "ksize": 5}
    source = root / "lib/datasets/preprocess/cityscapes/dt_offset_generator.py"
    exec(_extract(source, {"sobel_kernel", "label_list", "_encode_label", "process"}), scope)  # noqa: S102
    exec("sobel_x, sobel_y = (sobel_kernel((ksize, ksize), i) for i in (0, 1))\n"  # noqa: S102
         "sobel_ker = torch.cat([sobel_y, sobel_x], dim=0).view(2, 1, ksize, ksize).float()", scope)  # L119-120
    with contextlib.redirect_stdout(std_io.StringIO()):
        scope["process"](("in", "out", "x.png"))
    depth, dir_deg = saved["depth"], saved["dir_deg"]
    angle = saved["deg_reduce"] * dir_deg.astype(np.float64) - 180  # offset_loader.py:48-56

    helper_scope = {"torch": torch, "np": np, "os": os, "F": torch.nn.functional,
                    "Log": types.SimpleNamespace(info=lambda *a, **k: None)}
    exec(_extract(root / "lib/utils/helpers/offset_helper.py",  # noqa: S102
                  {"ori_scales", "DTOffsetConfig", "label_to_vector_mapping", "vector_to_label_mapping",
                   "Sobel", "DTOffsetHelper"}), helper_scope)
    helper = helper_scope["DTOffsetHelper"]
    seg = torch.from_numpy(train_ids(ids))
    seg[seg == 255] = -1  # the loss sees ignore as -1
    boundary = helper.distance_to_mask_label(torch.from_numpy(depth.astype(np.int64)), seg, return_tensor=True)
    direction = helper.angle_to_direction_label(torch.from_numpy(angle), seg_label_map=seg, return_tensor=True)
    vectors = helper.label_to_vector(torch.arange(8).view(1, 1, 8))[0, :, 0].T  # (8, 2): (dh, dw)
    return {"gt_depth": depth, "gt_dir_deg": dir_deg, "gt_boundary": boundary.numpy().astype(np.int8),
            "gt_direction": direction.numpy().astype(np.int8), "direction_vectors": vectors.numpy().astype(np.int8)}


def official_windows(root: Path) -> list[list[int]]:
    scope: dict = {}
    exec(_method(root / "segmentor/tester_offset.py", "Tester", "_decide_intersection"), scope)  # noqa: S102
    return [scope["_decide_intersection"](None, length, crop) for length, crop in WINDOW_CASES]


def net_inputs() -> tuple[torch.nn.Module, torch.Tensor]:
    """Our W48 SegFix network with seeded weights, and the normalised seeded image it reads."""
    from methods import build_method

    model = build_method("segfix", 7, base="global", backbone="hrnet48").eval()
    seed_weights(model.refiner, NET_SEED)
    return model, model.network_input(seeded_image(IMAGE_SEED, NET_SIZE, NET_SIZE))


def official_network(root: Path, ours: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from torch import nn

    sys.path.insert(0, str(root))
    from lib.models.backbones.hrnet.hrnet_backbone import HighResolutionNet
    from lib.models.backbones.hrnet.hrnet_config import MODEL_CONFIGS

    class Official(nn.Module):  # segfix.py:25-89 with torchbn, the heads' activation InPlaceABN's leaky ReLU 0.01
        def __init__(self) -> None:
            super().__init__()
            self.backbone = HighResolutionNet(MODEL_CONFIGS["hrnet48"], bn_type="torchbn", bn_momentum=0.1)

            def head(k: int) -> nn.Sequential:
                return nn.Sequential(nn.Conv2d(720, 256, 1, bias=False),
                                     nn.Sequential(nn.BatchNorm2d(256), nn.LeakyReLU(0.01)),
                                     nn.Conv2d(256, k, 1, bias=False))
            self.dir_head, self.mask_head = head(8), head(2)

        def forward(self, x_):
            x = self.backbone(x_)
            h, w = x[0].shape[-2:]
            x = [x[0], *(nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=True)
                         for t in x[1:])]
            feats = torch.cat(x, 1)
            return self.mask_head(feats), self.dir_head(feats)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "segfix.pth")
        ours.save_official(path)
        state = torch.load(path, weights_only=True)["state_dict"]
    state = {k[len("module."):]: v for k, v in state.items()}
    for head in ("mask_head", "dir_head"):  # torchbn names the head's BN `1.0`, InPlaceABN `1`
        state = {k.replace(f"{head}.1.", f"{head}.1.0."): v for k, v in state.items()}
    net = Official().eval()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    with torch.no_grad():
        return net(x)


def main() -> None:
    from methods.segfix import distance_and_angle, gather_shift, window_starts

    root = Path(os.environ.get("OPENSEG", "/tmp/openseg_src"))
    arrays: dict[str, np.ndarray] = {}
    for i, case in enumerate(SHIFT_CASES):
        labels, offsets = shift_inputs(case)
        official = official_shift(root, labels, offsets, align_corners=True)
        modern = official_shift(root, labels, offsets, align_corners=False)
        scores = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), case["classes"]).permute(2, 0, 1)
        ours = gather_shift(scores[None].float(), torch.from_numpy(offsets).long()[None]).argmax(1)[0].numpy()
        print(f"shift case {i}: ours == official: {np.array_equal(ours, official)}; the align_corners=False "
              f"default changes {(modern != official).sum()} of {official.size} pixels")
        arrays[f"shift{i}"] = official
        arrays[f"shift_default_changed{i}"] = np.int64((modern != official).sum())

    gt = official_ground_truth(root, gt_label_ids())
    depth, angle = distance_and_angle(train_ids(gt_label_ids()), 19)
    print("ground truth: depth equal", np.array_equal(depth, gt["gt_depth"]), "| angle equal",
          np.array_equal(angle, 2.0 * gt["gt_dir_deg"] - 180))
    arrays.update(gt)

    windows = official_windows(root)
    print("window starts equal:", windows == [window_starts(n, c, int(c / 3)) for n, c in WINDOW_CASES])

    model, x = net_inputs()
    official_mask, official_dir = official_network(root, model, x)
    with torch.no_grad():
        ours_mask, ours_dir = model.refiner(x)
    for name, a, b in (("mask", ours_mask, official_mask), ("direction", ours_dir, official_dir)):
        print(f"network {name} logits: max |ours - official| = {(a - b).abs().max().item():.3g} "
              f"(scale {b.abs().max().item():.3g})")
    arrays["net_mask"], arrays["net_dir"] = official_mask[0].numpy(), official_dir[0].numpy()

    meta = {"upstream": UPSTREAM, "shift_cases": SHIFT_CASES, "gt_size": GT_SIZE, "windows": WINDOW_CASES,
            "window_starts": windows, "net": {"seed": NET_SEED, "image_seed": IMAGE_SEED, "size": NET_SIZE,
                                              "backbone": "hrnet48"}}
    path = GOLDEN_DIR / "segfix.npz"
    np.savez_compressed(path, **arrays, meta=np.array(json.dumps(meta)))
    print("wrote", path.relative_to(REPO), f"({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
