"""Regenerate tests/golden/dgf.npz: the official guided filter (pip `guided-filter-pytorch` 3.7.5, byte-identical to
wuhuikai/DeepGuidedFilter @ 0caaf2d `GuidedFilter_PyTorch/guided_filter_pytorch/guided_filter.py`) on seeded tensors
(never part of the test run).

    pip install guided-filter-pytorch==3.7.5     # in a side venv; pure Python
    python tests/golden/make_dgf.py

Cases: a learned-guide-shaped guide (one channel per class) and a single-channel guide, r = 4 and eps = 1e-2 (the
segmentation setting, spec dgf.md §2.5) and r = 2 / eps = 1e-4, on odd sizes so every border window is clipped.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from methods.dgf import guided_filter  # noqa: E402
from tests.golden.seeded import GOLDEN_DIR  # noqa: E402

CASES = [{"seed": 1, "channels": (7, 7), "size": (37, 29), "radius": 4, "eps": 1e-2},
         {"seed": 2, "channels": (1, 3), "size": (23, 41), "radius": 2, "eps": 1e-4}]


def inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.Generator(np.random.PCG64(case["seed"]))
    (gc, sc), (h, w) = case["channels"], case["size"]
    guide = rng.normal(0.0, 1.0, (1, gc, h, w)) + np.linspace(0, 2, w)  # a ramp, so windows differ
    source = rng.normal(0.0, 3.0, (1, sc, h, w))
    return torch.from_numpy(guide.astype(np.float32)), torch.from_numpy(source.astype(np.float32))


def main() -> None:
    from guided_filter_pytorch.guided_filter import GuidedFilter

    arrays = {}
    for i, case in enumerate(CASES):
        guide, source = inputs(case)
        with torch.no_grad():
            official = GuidedFilter(case["radius"], case["eps"])(guide.double(), source.double())
            ours = guided_filter(guide.double(), source.double(), case["radius"], case["eps"])
        print(f"case {i}: max |ours - official| = {(ours - official).abs().max().item():.3g} (float64)")
        arrays[f"case{i}"] = official.float().numpy()
    np.savez_compressed(GOLDEN_DIR / "dgf.npz", **arrays, meta=np.array(json.dumps(
        {"cases": CASES, "package": "guided-filter-pytorch 3.7.5", "upstream": "wuhuikai/DeepGuidedFilter@0caaf2d"})))
    print("wrote", (GOLDEN_DIR / "dgf.npz").relative_to(REPO))


if __name__ == "__main__":
    main()
