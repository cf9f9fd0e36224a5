"""ICNet (`methods/icnet.py`): the PSPNet tests (`tests/test_generic_pspnet.py`, which says what they check) with the
`name` fixture overridden. Golden logits: `tests/golden/count_icnet.py` wrote `tests/golden/icnet.npz` on a 150 x 206
image (odd sides in every branch); measured there: max |ours - mmseg 0.30| = 7.2e-7 of max |logit| 1.6, and at most
3e-7 on the two auxiliary heads (`tests/golden/icnet_aux.npz`).
"""
from __future__ import annotations

import pytest
from test_generic_pspnet import (  # noqa: F401  (collected here, with this module's `name`)
    test_a_checkpoint_that_does_not_fit_is_one_clear_error,
    test_global_inference_sees_the_image_downsampled,
    test_logits_match_mmseg,
    test_official_layout_round_trip,
    test_one_training_step_with_the_auxiliary_heads,
    test_parameter_count_is_mmsegs,
    test_predict_at_a_size_not_divisible_by_32,
)


@pytest.fixture
def name() -> str:
    return "icnet"
