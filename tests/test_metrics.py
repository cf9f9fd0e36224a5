"""The confusion-matrix metric against hand-computed examples."""
import math

import pytest
import torch

from pipelines.metrics import ConfusionMatrix, segmentation_scores

CLASSES = ("unknown", "a", "b")


def test_confusion_matrix_counts_and_ignore():
    cm = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([[0, 1, 1, 2], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 2, 2], [2, 1, 0, 1]])
    cm.update(pred, target)
    # rows = truth, columns = prediction; the two ignored pixels are not counted at all
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 2]]
    assert cm.matrix.dtype == torch.int64


def test_rows_are_truth_and_columns_prediction():
    """An asymmetric example: a transposed matrix (or swapped arguments) gives other rows and other per-class
    accuracies (recall = diagonal / row sum)."""
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([1, 1, 1, 2]), torch.tensor([0, 0, 1, 2]))  # (prediction, target)
    assert cm.matrix.tolist() == [[0, 2, 0], [0, 1, 0], [0, 0, 1]]
    s = segmentation_scores(cm.matrix, CLASSES, (1, 2))
    assert s["accuracy"]["unknown"] == 0.0 and s["accuracy"]["a"] == 1.0
    assert s["iou"]["a"] == pytest.approx(1 / 3)  # 1 / (row 1 + column 3 - 1)


def test_scores_hand_computed_with_excluded_class():
    matrix = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 1, 2]])
    s = segmentation_scores(matrix, CLASSES, counted_classes=(1, 2))
    # IoU_a = 1 / (2 + 2 - 1) = 1/3; IoU_b = 2 / (3 + 3 - 2) = 1/2; unknown (IoU 1) left out of the mean
    assert s["iou"]["unknown"] == pytest.approx(1.0)
    assert s["iou"]["a"] == pytest.approx(1 / 3)
    assert s["iou"]["b"] == pytest.approx(1 / 2)
    assert s["miou"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert s["pixel_accuracy"] == pytest.approx(4 / 6)
    assert s["accuracy"]["b"] == pytest.approx(2 / 3)


def test_unknown_pixels_still_penalise_counted_classes():
    # 'unknown' truth predicted as 'a' is a false positive of 'a' even though unknown is not averaged
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 2]))
    s = segmentation_scores(cm.matrix, CLASSES, (1, 2))
    assert s["iou"]["a"] == pytest.approx(1 / 2)
    assert s["miou"] == pytest.approx((0.5 + 1.0) / 2)


def test_absent_class_is_nan_and_skipped():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
    s = segmentation_scores(cm.matrix, CLASSES, (1, 2))
    assert s["iou"]["b"] is None
    assert s["miou"] == pytest.approx(1.0)
    empty = segmentation_scores(torch.zeros(3, 3, dtype=torch.int64), CLASSES, (1, 2))
    assert math.isnan(empty["miou"])


def test_accumulates_beyond_float32_exactness():
    # 2^24 + 1 pixels of one class: a float32 histogram would round this count
    cm = ConfusionMatrix(2)
    n = 2 ** 24 + 1
    cm.update(torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8))
    cm.update(torch.ones(1, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8))
    assert cm.matrix[0, 0].item() == n
    assert cm.matrix[0, 1].item() == 1


def test_out_of_range_label_is_an_error():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="label value 7"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(torch.zeros(2, 2), torch.zeros(2, 3))


def test_default_ignore_is_255_and_a_label_equal_to_num_classes_is_refused():
    from datasets.base import DatasetError

    cm = ConfusionMatrix(3)  # default ignore index: 255, the prepared layout's
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 255, 255]))
    assert cm.matrix.sum().item() == 1
    with pytest.raises(DatasetError, match="label value 3 is neither a class id < 3"):
        cm.update(torch.tensor([0, 1]), torch.tensor([1, 3]))  # 3 = num_classes: one past the last class


def test_scores_report_pixels_counted_classes_and_absent_class_accuracy():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([1, 1, 2]), torch.tensor([1, 1, 1]))  # no pixel of 'unknown' or 'b' in the truth
    s = segmentation_scores(cm.matrix, CLASSES, (1, 2))
    assert s["pixels"] == 3 and s["counted_classes"] == ["a", "b"]
    assert s["accuracy"]["unknown"] is None and s["accuracy"]["b"] is None  # recall undefined, never 0
    assert s["accuracy"]["a"] == pytest.approx(2 / 3)


def test_all_reduce_is_a_no_op_without_a_process_group():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([1, 1]))
    cm.all_reduce()
    assert cm.matrix.tolist() == [[0, 0], [1, 1]]


@pytest.mark.gpu
def test_matrix_lives_on_the_asked_device_and_takes_cpu_maps():
    cm = ConfusionMatrix(3, device="cuda")
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))  # CPU maps are moved to the matrix's device
    assert cm.matrix.device.type == "cuda" and cm.matrix.cpu().tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
