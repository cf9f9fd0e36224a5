"""Golden outputs of the reference implementations of the generic networks: mmsegmentation 0.30 building the
config each module follows, with seeded weights written in mmseg's layout by our `save_official`
(`tests/golden/count_<network>.py`, run in the side environment of tests/golden/README.md). Same tolerance rule as
tests/test_golden_mmseg.py (at generation our logits matched the reference's to 0 for DeepLabv3)."""
from __future__ import annotations

import torch
from test_golden_mmseg import assert_logits_match

from methods import build_method
from tests.golden.seeded import load_fixture, seed_weights, seeded_image


def test_deeplabv3_matches_mmseg():
    meta = load_fixture("deeplabv3")[3]
    model = seed_weights(build_method("deeplabv3-global", 7, **meta["model"]).eval(), seed=meta["weights_seed"])
    with torch.inference_mode():
        logits = model.predict(seeded_image(meta["image_seed"], *meta["size"]))
    assert_logits_match("deeplabv3", logits)
