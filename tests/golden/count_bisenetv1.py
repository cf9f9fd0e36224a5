"""Reference parameter count and golden parity of `bisenetv1` against mmsegmentation 0.30's build of
`bisenetv1/bisenetv1_r18-d32_4x4_1024x1024_160k_cityscapes.py` with 7 classes (what it does: bisenet_parity.py).
Side environment only, never imported by the tests:

    /tmp/side/bin/python tests/golden/count_bisenetv1.py [--write]   # --write: tests/golden/bisenetv1.npz
"""
from bisenet_parity import check

if __name__ == "__main__":
    check("bisenetv1-global", "bisenetv1/bisenetv1_r18-d32_4x4_1024x1024_160k_cityscapes.py")
