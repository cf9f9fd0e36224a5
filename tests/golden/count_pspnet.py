"""PSPNet vs mmsegmentation 0.30.0 `pspnet/pspnet_r18-d8_512x1024_80k_cityscapes.py` (7 classes): the reference's
parameter count, and logit parity (main and auxiliary heads) on seeded weights written by our `save_official`.
`--write` saves `tests/golden/pspnet.npz` (`mmseg030.py` says how). Side venv only:

    /tmp/side/bin/python tests/golden/count_pspnet.py [--write]
"""
from __future__ import annotations

from mmseg030 import main

if __name__ == "__main__":
    # 150 x 206: odd sides at every stride (the ceil/floor paths), pooled 6 x 6 from a 19 x 26 map; weight seed 2103:
    # 5 classes in the argmax, 0.04% of pixels near a tie (with 2101, 0.18%: over the check's 0.1% allowance)
    main("pspnet-global", "pspnet/pspnet_r18-d8_512x1024_80k_cityscapes.py", "pspnet", model={"downsample": 1},
         weight_seed=2103, image_seed=2102, size=(150, 206), stride=3)
