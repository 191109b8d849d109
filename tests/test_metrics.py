"""Tests for minifcn.metrics against hand-computed cases and the FCN score.py formulas."""

import math

import numpy as np
import pytest

from minifcn.metrics import SegmentationMetrics, boundary_mask, confusion_matrix

# Six pixels, one ignored. Valid (true, predicted) pairs:
# (0,0) (0,1) (1,1) (1,1) (2,0)  -> confusion [[1,1,0],[0,2,0],[1,0,0]]
TARGET = np.array([[0, 0, 1], [1, 2, 255]])
PRED = np.array([[0, 1, 1], [1, 0, 2]])
CONFUSION = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TARGET, num_classes=3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, CONFUSION)


def test_confusion_matrix_all_ignored_and_custom_ignore_index():
    np.testing.assert_array_equal(confusion_matrix(PRED, np.full_like(TARGET, 255), 3), np.zeros((3, 3)))
    target = np.where(TARGET == 255, 0, TARGET)
    target[0, 0] = 7
    cm = confusion_matrix(PRED, target, 3, ignore_index=7)
    assert cm.sum() == 5 and cm[0, 2] == 1


@pytest.mark.parametrize("pred, target, pattern", [
    (PRED[:, :2], TARGET, "same shape"),
    (PRED, np.where(TARGET == 2, 3, TARGET), r"target holds class values \[3\]"),
    (np.where(PRED == 2, -1, PRED), TARGET, r"pred holds class values \[-1\]"),
], ids=["shape-mismatch", "target-out-of-range", "pred-negative"])
def test_confusion_matrix_rejects_bad_input(pred, target, pattern):
    with pytest.raises(ValueError, match=pattern):
        confusion_matrix(pred, target, 3)


def test_confusion_matrix_type_errors():
    with pytest.raises(TypeError, match="pred must hold integer class indices, got dtype float64"):
        confusion_matrix(PRED.astype(float), TARGET, 3)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(PRED, TARGET, 0)


def test_metrics_by_hand():
    metrics = SegmentationMetrics(3)
    metrics.update(PRED, TARGET)
    assert metrics.pixel_accuracy() == pytest.approx(3 / 5)
    np.testing.assert_allclose(metrics.per_class_accuracy(), [1 / 2, 1, 0])
    assert metrics.mean_accuracy() == pytest.approx(0.5)
    np.testing.assert_allclose(metrics.per_class_iu(), [1 / 3, 2 / 3, 0])
    assert metrics.mean_iu() == pytest.approx(1 / 3)
    assert metrics.frequency_weighted_iu() == pytest.approx(0.4 * 1 / 3 + 0.4 * 2 / 3)


def test_class_absent_from_truth_and_prediction_is_left_out():
    metrics = SegmentationMetrics(4)          # class 3 appears nowhere
    metrics.update(PRED, TARGET)
    iu = metrics.per_class_iu()
    assert math.isnan(iu[3]) and math.isnan(metrics.per_class_accuracy()[3])
    assert metrics.mean_iu() == pytest.approx(1 / 3)
    assert metrics.mean_accuracy() == pytest.approx(0.5)
    assert metrics.frequency_weighted_iu() == pytest.approx(0.4)


def test_class_predicted_but_absent_from_truth_counts_as_zero_iu():
    metrics = SegmentationMetrics(3)
    metrics.update(np.array([[0, 2]]), np.array([[0, 0]]))
    np.testing.assert_allclose(metrics.per_class_iu()[[0, 2]], [0.5, 0.0])
    assert math.isnan(metrics.per_class_iu()[1])
    assert metrics.mean_iu() == pytest.approx(0.25)
    assert metrics.mean_accuracy() == pytest.approx(0.5)     # only class 0 is in the truth


def test_perfect_prediction():
    target = np.random.default_rng(0).integers(0, 5, (2, 8, 9))
    metrics = SegmentationMetrics(5)
    metrics.update(target, target)
    summary = metrics.summary()
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iu", "frequency_weighted_iu"):
        assert summary[key] == pytest.approx(1.0)
    assert summary["per_class_iu"] == [1.0] * 5


def score_py_reference(hist):
    """The four numbers of score.py in the FCN repository (shelhamer/fcn.berkeleyvision.org)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.diag(hist).sum() / hist.sum()
        acc_cls = np.nanmean(np.diag(hist) / hist.sum(1))
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        mean_iu = np.nanmean(iu)
        freq = hist.sum(1) / hist.sum()
        fwavacc = (freq[freq > 0] * iu[freq > 0]).sum()
    return acc, acc_cls, mean_iu, fwavacc


def test_accumulation_matches_score_py_on_random_batches():
    rng = np.random.default_rng(1)
    metrics = SegmentationMetrics(6)
    total = np.zeros((6, 6), dtype=np.int64)
    for _ in range(4):
        target = rng.integers(0, 5, (2, 10, 12))          # class 5 never true ...
        target[rng.random(target.shape) < 0.1] = 255
        guess = rng.integers(0, 6, target.shape)
        pred = np.where((rng.random(target.shape) < 0.6) & (target != 255), target, guess)   # 60% right
        metrics.update(pred, target)
        valid = target != 255                            # score.py's fast_hist, written out
        total += np.bincount(6 * target[valid] + pred[valid], minlength=36).reshape(6, 6)
    np.testing.assert_array_equal(metrics.confusion, total)
    ours = (metrics.pixel_accuracy(), metrics.mean_accuracy(), metrics.mean_iu(),
            metrics.frequency_weighted_iu())
    np.testing.assert_allclose(ours, score_py_reference(total))


def test_update_with_scores_takes_the_argmax():
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    target = rng.integers(0, 4, (2, 5, 6))
    from_scores, from_labels = SegmentationMetrics(4), SegmentationMetrics(4)
    from_scores.update(scores, target)
    from_labels.update(scores.argmax(axis=1), target)
    np.testing.assert_array_equal(from_scores.confusion, from_labels.confusion)
    single = SegmentationMetrics(4)
    single.update(scores[0], target[0])                  # (K, H, W) with (H, W)
    assert single.confusion.sum() == 30
    with pytest.raises(ValueError, match="with 3 classes on axis -3"):
        SegmentationMetrics(3).update(scores, target)
    with pytest.raises(ValueError, match="must be float scores"):       # a batch of label maps, not scores
        SegmentationMetrics(4).update(target[:, :4], target[0, :4])


def test_update_with_mask_and_reset():
    metrics = SegmentationMetrics(3)
    mask = np.array([[True, False, True], [True, True, True]])
    metrics.update(PRED, TARGET, mask=mask)
    assert metrics.confusion.sum() == 4 and metrics.confusion[0, 1] == 0
    with pytest.raises(ValueError, match="mask must have the target's shape"):
        metrics.update(PRED, TARGET, mask=mask[:1])
    metrics.reset()
    assert metrics.confusion.sum() == 0
    assert all(math.isnan(v) for k, v in metrics.summary().items() if k != "per_class_iu")


def test_metrics_accept_objects_with_get_or_numpy():
    class Device:                                        # stands in for a CuPy array
        def __init__(self, array):
            self.array, self.shape = array, array.shape

        def get(self):
            return self.array

    class Tensorish:                                     # stands in for a minifcn Tensor
        def __init__(self, array):
            self.array = array

        def numpy(self):
            return self.array

    metrics = SegmentationMetrics(3)
    metrics.update(Device(PRED), Tensorish(TARGET))
    np.testing.assert_array_equal(metrics.confusion, CONFUSION)


def test_segmentation_metrics_rejects_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        SegmentationMetrics(0)


def test_boundary_mask_by_hand():
    label = np.zeros((4, 6), dtype=np.uint8)
    label[:, 3:] = 1
    expected1 = np.zeros((4, 6), dtype=bool)
    expected1[:, 2:4] = True
    np.testing.assert_array_equal(boundary_mask(label, 1), expected1)
    expected2 = np.zeros((4, 6), dtype=bool)
    expected2[:, 1:5] = True
    np.testing.assert_array_equal(boundary_mask(label, 2), expected2)
    assert boundary_mask(label, 3).all()


def test_boundary_mask_corner_batch_and_ignore_value():
    label = np.zeros((2, 5, 5), dtype=np.int64)
    label[0, 2, 2] = 255                                 # a single ignored pixel is a change of value
    mask = boundary_mask(label, 1)
    assert mask.shape == (2, 5, 5) and not mask[1].any()
    expected = np.zeros((5, 5), dtype=bool)
    expected[1:4, 1:4] = True
    np.testing.assert_array_equal(mask[0], expected)
    assert not boundary_mask(np.ones((3, 3), dtype=np.uint8), 1).any()   # image edges are not boundaries


def test_boundary_mean_iu_only_scores_near_edges():
    target = np.zeros((8, 8), dtype=np.int64)
    target[2:6, 2:6] = 1
    pred = np.zeros_like(target)                          # misses the whole square
    pred[3:5, 3:5] = 1                                    # except its 2x2 centre
    near = SegmentationMetrics(2)
    near.update(pred, target, mask=boundary_mask(target, 1))
    assert near.confusion[1, 1] == 0                       # the centre is not near the edge
    assert near.confusion[1, 0] == 12 and near.confusion[0, 0] == 20


def test_boundary_mask_errors():
    with pytest.raises(ValueError, match="width must be a positive int"):
        boundary_mask(np.zeros((3, 3), dtype=np.uint8), 0)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\)"):
        boundary_mask(np.zeros(3, dtype=np.uint8), 1)
