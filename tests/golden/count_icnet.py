"""ICNet vs mmsegmentation 0.30.0 `icnet/icnet_r18-d8_832x832_160k_cityscapes.py` (7 classes): the reference's
parameter count, and logit parity (main and auxiliary heads) on seeded weights written by our `save_official`.
`--write` saves `tests/golden/icnet.npz` (`mmseg030.py` says how). Side venv only:

    /tmp/side/bin/python tests/golden/count_icnet.py [--write]
"""
from __future__ import annotations

from mmseg030 import main

if __name__ == "__main__":
    # 150 x 206: odd sides in every branch (the scale-0.5 resizes, the ceil-mode max-pool)
    main("icnet-global", "icnet/icnet_r18-d8_832x832_160k_cityscapes.py", "icnet", model={"downsample": 1},
         weight_seed=2201, image_seed=2202, size=(150, 206), stride=3)
