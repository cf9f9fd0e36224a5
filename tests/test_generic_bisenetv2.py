"""BiSeNetV2 (`methods/bisenetv2.py`): the BiSeNetV1 tests (`tests/test_generic_bisenetv1.py`, which says what they
check) with the `name` fixture overridden. Golden logits: `tests/golden/count_bisenetv2.py` wrote
`tests/golden/bisenetv2.npz`; measured there: max |ours - mmseg 0.30| = 0 on the decode and all four auxiliary heads.
"""
from __future__ import annotations

import pytest
from test_generic_bisenetv1 import (  # noqa: F401  (collected here, with this module's `name`)
    test_a_checkpoint_that_does_not_fit_is_one_clear_error,
    test_logits_match_mmseg,
    test_official_layout_round_trip,
    test_one_training_step_with_the_auxiliary_heads,
    test_parameter_count_is_mmsegs,
    test_predict_at_a_size_not_divisible_by_32,
)


@pytest.fixture
def name() -> str:
    return "bisenetv2"
