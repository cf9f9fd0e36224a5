"""Regenerate tests/golden/pointrend.npz: detectron2's own PointRend semantic head (`PointRendSemSegHead` with its
`StandardPointHead`, `point_features.py`, `calculate_uncertainty`; detectron2 @ 02b5c4e, projects/PointRend) run on
CPU on seeded coarse logits and p2 features (never part of the test run). The coarse head's `layers` is replaced by
the seeded coarse logits (in the method the base supplies them); the point head gets our seeded weights, key for key.

    git --git-dir=<detectron2 mirror> archive 02b5c4e detectron2 projects/PointRend | tar -x -C /tmp/d2src
    pip install fvcore iopath yacs omegaconf pycocotools   # in the side venv; detectron2 runs uncompiled here
    PYTHONPATH=/tmp/d2src:/tmp/d2src/projects/PointRend python tests/golden/make_pointrend.py

Stored per case: the official subdivision output at stride 1 (before the final resize), the cell indices each step
re-predicted, the point head's output at seeded points, the training sampler's points and the point loss after
`torch.manual_seed(seed)` (same torch, so the same two `torch.rand` calls). Last run (torch 2.14.1, float32): stride-1
logits ours vs official max |diff| 9.5e-7 / 8.1e-7 (cases 0 / 1); chosen indices of both steps, point-head output at the
probes and training points identical, point loss equal to 7 decimals (spec pointrend.md §12).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.golden.seeded import GOLDEN_DIR, seed_weights  # noqa: E402

# coarse: the stride-4 grid (p2 the same size); points: SUBDIVISION_NUM_POINTS; train_points: TRAIN_NUM_POINTS
CASES = [{"seed": 1, "batch": 2, "classes": 5, "coarse": (8, 12), "fine_channels": 32, "points": 60,
          "train_points": 64},
         {"seed": 2, "batch": 1, "classes": 3, "coarse": (7, 9), "fine_channels": 16, "points": 40,
          "train_points": 50}]
UPSTREAM = "facebookresearch/detectron2@02b5c4e projects/PointRend"


def inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coarse logits (B, C, h, w), p2 (B, F, h, w), labels (B, 4h, 4w) with some 255, probe points (B, 30, 2))."""
    rng = np.random.Generator(np.random.PCG64(case["seed"]))
    b, c, f, (h, w) = case["batch"], case["classes"], case["fine_channels"], case["coarse"]
    ramp = np.linspace(-2.0, 2.0, w) * rng.normal(0.0, 1.0, (1, c, 1, 1))  # class fronts, so margins vary smoothly
    coarse = rng.normal(0.0, 1.0, (b, c, h, w)) + ramp
    p2 = rng.normal(0.0, 1.0, (b, f, h, w))
    labels = rng.integers(0, c, (b, 4 * h, 4 * w))
    labels[rng.uniform(size=labels.shape) < 0.1] = 255
    probes = rng.uniform(0.0, 1.0, (b, 30, 2))
    return (torch.from_numpy(coarse.astype(np.float32)), torch.from_numpy(p2.astype(np.float32)),
            torch.from_numpy(labels), torch.from_numpy(probes.astype(np.float32)))


def ours(case: dict):
    """Our PointRend with the case's settings and the seeded point head (base `global`, a small trunk: unused)."""
    from methods import build_method

    model = build_method("pointrend", case["classes"], backbone="resnet18", fpn_channels=case["fine_channels"],
                         subdivision_num_points=case["points"], train_num_points=case["train_points"])
    seed_weights(model.refiner.point_head, case["seed"])
    return model.eval()


def official_head(case: dict, point_head_state: dict, coarse: torch.Tensor):
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from point_rend import add_pointrend_config
    from point_rend.semantic_seg import PointRendSemSegHead

    cfg = get_cfg()
    add_pointrend_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = cfg.MODEL.POINT_HEAD.NUM_CLASSES = case["classes"]
    cfg.MODEL.POINT_HEAD.update(FC_DIM=256, NUM_FC=3, IN_FEATURES=["p2"], TRAIN_NUM_POINTS=case["train_points"],
                                SUBDIVISION_STEPS=2, SUBDIVISION_NUM_POINTS=case["points"],
                                COARSE_SEM_SEG_HEAD_NAME="SemSegFPNHead", COARSE_PRED_EACH_LAYER=False)
    shapes = {f"p{k}": ShapeSpec(channels=case["fine_channels"], stride=2 ** k) for k in (2, 3, 4, 5)}
    head = PointRendSemSegHead(cfg, shapes)
    head.point_head.load_state_dict(point_head_state)
    head.coarse_sem_seg_head.layers = lambda features: coarse  # the base's role
    return head


def main() -> None:
    import point_rend.semantic_seg as semantic_seg
    from point_rend.point_features import point_sample as official_point_sample

    from methods.pointrend import point_sample

    arrays, recorded = {}, {}

    def record(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            recorded.setdefault(name, []).append(out)
            return out
        return wrapped

    semantic_seg.get_uncertain_point_coords_on_grid = record("grid", semantic_seg.get_uncertain_point_coords_on_grid)
    semantic_seg.get_uncertain_point_coords_with_randomness = record(
        "train", semantic_seg.get_uncertain_point_coords_with_randomness)
    for i, case in enumerate(CASES):
        recorded.clear()
        coarse, p2, labels, probes = inputs(case)
        model = ours(case)
        head = official_head(case, model.refiner.point_head.state_dict(), coarse)
        with torch.no_grad():
            head.eval()
            official, _ = head({"p2": p2})
            probe_logits = head.point_head(official_point_sample(p2, probes, align_corners=False),
                                           official_point_sample(coarse, probes, align_corners=False))
            scale = torch.ones(2)
            mine, chosen = model.refine_logits(coarse, p2, scale)
            mine_probe = model.refiner.point_head(point_sample(p2, probes), point_sample(coarse, probes))
            head.train()
            torch.manual_seed(case["seed"])
            _, losses = head({"p2": p2}, labels)
            torch.manual_seed(case["seed"])
            mine_loss = model.point_loss(coarse, p2, scale, labels)
        train_coords = recorded["train"][0]
        steps = [indices for indices, _ in recorded["grid"]]
        print(f"case {i}: final |diff| {(mine - official).abs().max().item():.3g}, probe |diff| "
              f"{(mine_probe - probe_logits).abs().max().item():.3g}, indices equal "
              f"{[bool(torch.equal(a, b)) for a, b in zip(chosen, steps, strict=True)]}, loss "
              f"{mine_loss.item():.7f} vs {losses['loss_sem_seg_point'].item():.7f}")
        arrays.update({f"case{i}_final": official, f"case{i}_probe_logits": probe_logits,
                       f"case{i}_train_coords": train_coords, f"case{i}_point_loss": losses["loss_sem_seg_point"]})
        arrays.update({f"case{i}_step{k}_indices": idx.to(torch.int32) for k, idx in enumerate(steps)})
    path = GOLDEN_DIR / "pointrend.npz"
    np.savez_compressed(path, **{k: v.numpy() for k, v in arrays.items()},
                        meta=np.array(json.dumps({"cases": CASES, "upstream": UPSTREAM, "torch": torch.__version__})))
    print("wrote", path.relative_to(REPO), path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
