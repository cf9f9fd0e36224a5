"""Regenerate tests/golden/densecrf.npz: the official DenseCRF (pip `pydensecrf2` 1.1, whose C++ and Cython sources
are byte-identical to lucasb-eyer/pydensecrf @ 2723c7f, spec densecrf.md §6) on seeded images and logits (never part
of the test run).

    pip install pydensecrf2==1.1      # in a side venv; an sdist, needs a C++ compiler (x86 builds take the SSE path)
    python tests/golden/make_densecrf.py

Each case: `DenseCRF2D(W, H, C)`, `setUnaryEnergy(unary_from_softmax(P))` with P the float32 softmax of the seeded
logits, `addPairwiseGaussian(sxy=θγ, compat=w2)`, `addPairwiseBilateral(sxy=θα, srgb=θβ, rgbim, compat=w1)` with the
case's normalisation, then Q = `inference(n)` for n = 0, 1, 5, stored every 2nd pixel in both directions (size).
Cases: DeepLab-v2's parameters (4, 67, 3, 3, 1) with C = 3, symmetric and per pixel (NORMALIZE_AFTER); pydensecrf's
example (10, 80, 13, 3, 3) with C = 5; DeepLab-v1's vgg128_noup (5, 50, 3, 3, 3) on 47 x 61 (N not a multiple of 4:
the SSE lattice inserts its zero-feature padding, which ours copies; no effect on Q was measurable in any case
tried). tests/test_densecrf.py measures ours against it: max |Q_ours - Q_official| 1.2e-6 (float32, 5 iterations).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.golden.seeded import GOLDEN_DIR, seeded_image  # noqa: E402

ITERATIONS = (0, 1, 5)
STRIDE = 2
DEEPLAB_V2 = (4.0, 67.0, 3.0, 3.0, 1.0)  # (w1, θα, θβ, w2, θγ), spec §5
CASES = [{"seed": 1, "size": (48, 64), "classes": 3, "params": DEEPLAB_V2, "normalization": "symmetric"},
         {"seed": 1, "size": (48, 64), "classes": 3, "params": DEEPLAB_V2, "normalization": "per_pixel"},
         {"seed": 2, "size": (48, 64), "classes": 5, "params": (10.0, 80.0, 13.0, 3.0, 3.0),
          "normalization": "symmetric"},
         {"seed": 3, "size": (47, 61), "classes": 5, "params": (5.0, 50.0, 3.0, 3.0, 3.0),
          "normalization": "symmetric"}]


def inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (3, H, W) float of uint8 values, logits (C, H, W) float32): noise plus a class ramp, so that some
    probabilities fall under pydensecrf's 1e-5 clip and the kernels have edges to follow."""
    h, w = case["size"]
    image = seeded_image(case["seed"], h, w)[0]
    rng = np.random.Generator(np.random.PCG64(100 + case["seed"]))
    logits = rng.normal(0.0, 2.5, (case["classes"], h, w)) + np.linspace(-2, 2, w) * np.arange(case["classes"])[:, None,
                                                                                                                None]
    return image, torch.from_numpy(logits.astype(np.float32))


def main() -> None:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    arrays = {}
    for i, case in enumerate(CASES):
        image, logits = inputs(case)
        (h, w), classes = case["size"], case["classes"]
        w1, theta_alpha, theta_beta, w2, theta_gamma = case["params"]
        normalization = {"symmetric": dcrf.NORMALIZE_SYMMETRIC,
                         "per_pixel": dcrf.NORMALIZE_AFTER}[case["normalization"]]
        rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy().astype(np.uint8))
        unary = np.ascontiguousarray(unary_from_softmax(torch.softmax(logits, 0).numpy()))
        for n in ITERATIONS:
            crf = dcrf.DenseCRF2D(w, h, classes)
            crf.setUnaryEnergy(unary)
            crf.addPairwiseGaussian(sxy=theta_gamma, compat=w2, normalization=normalization)
            crf.addPairwiseBilateral(sxy=theta_alpha, srgb=theta_beta, rgbim=rgb, compat=w1,
                                     normalization=normalization)
            q = np.array(crf.inference(n)).reshape(classes, h, w)
            arrays[f"case{i}_iter{n}"] = q[:, ::STRIDE, ::STRIDE].astype(np.float32)
            print(f"case {i} n={n}: Q range [{q.min():.3g}, {q.max():.3g}], argmax changed from n=0 on "
                  f"{(q.argmax(0) != unary.argmin(0).reshape(h, w)).mean():.1%} of pixels")
    path = GOLDEN_DIR / "densecrf.npz"
    np.savez_compressed(path, **arrays, meta=np.array(json.dumps(
        {"cases": CASES, "iterations": ITERATIONS, "stride": STRIDE, "package": "pydensecrf2 1.1",
         "upstream": "lucasb-eyer/pydensecrf@2723c7f"})))
    print("wrote", path.relative_to(REPO), f"({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
