"""softmax_cross_entropy (and softmax, log_softmax): loop references, gradient checks,
ignored pixels, non-finite scores, and argument errors."""

import math
import re
import warnings

import numpy as np
import pytest
from conftest import GPU
from loop_reference_misc import softmax_cross_entropy_loop

import minifcn as mf
from minifcn.backend.cpu import tuning
from minifcn.backend.reference.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from minifcn.functional.loss import log_softmax, softmax, softmax_cross_entropy


def normal(shape, seed=0, dtype=np.float64, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def labels(shape, classes, seed=1, ignored=0.0, ignore_index=255):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, classes, shape)
    target[rng.random(shape) < ignored] = ignore_index
    return target


# (N, K, H, W, target maker, ignore_index)
CASES = [
    pytest.param(2, 5, 3, 4, lambda s, k: labels(s, k), 255, id="batch-2"),
    pytest.param(1, 3, 5, 7, lambda s, k: labels(s, k, ignored=0.3), 255, id="some-ignored"),
    pytest.param(2, 4, 3, 3, lambda s, k: 2 * labels(s, (k + 1) // 2), 255, id="class-absent"),
    pytest.param(1, 21, 2, 3, lambda s, k: labels(s, k, ignored=0.3, ignore_index=-100), -100,
                 id="voc-ignore-minus-100"),
    pytest.param(2, 3, 2, 2, lambda s, k: np.full(s, 255), 255, id="every-pixel-ignored"),
    pytest.param(1, 1, 2, 3, lambda s, k: np.zeros(s, np.int64), 255, id="one-class"),
    pytest.param(1, 4, 1, 1, lambda s, k: np.array([[[3]]]), 255, id="one-pixel"),
    pytest.param(2, 3, 3, 2, lambda s, k: labels(s, k, ignored=0.4, ignore_index=0), 0, id="ignore-a-real-class"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n, k, h, w, make_target, ignore_index", CASES)
def test_loss_and_gradient_match_loop(backend, n, k, h, w, make_target, ignore_index, reduction, dtype):
    logits = normal((n, k, h, w), dtype=dtype, scale=2.0)
    target = make_target((n, h, w), k)
    expected_loss, expected_grad = softmax_cross_entropy_loop(logits, target, ignore_index, reduction)
    x = mf.Tensor(logits, requires_grad=True)
    loss = softmax_cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction)
    assert loss.shape == () and loss.dtype == dtype
    loss.backward()
    assert x.grad.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(loss.item(), expected_loss, **tolerance)
    np.testing.assert_allclose(x.grad, expected_grad, **tolerance)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n, k, h, w, make_target, ignore_index", CASES)
def test_gradcheck(backend, n, k, h, w, make_target, ignore_index, reduction):
    target = make_target((n, h, w), k)
    x = mf.Tensor(normal((n, k, h, w), scale=2.0), requires_grad=True)
    assert mf.gradcheck(lambda x: softmax_cross_entropy(x, target, ignore_index, reduction), [x])


def test_every_pixel_ignored_gives_zero_not_nan(backend):
    # PyTorch returns nan here; a batch with no labelled pixel carries no information,
    # so it should neither move the weights nor poison a running average of the loss
    x = mf.Tensor(normal((2, 3, 4, 4), dtype=np.float32), requires_grad=True)
    loss = softmax_cross_entropy(x, np.full((2, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    np.testing.assert_array_equal(x.grad, 0)


def test_mean_divides_by_labelled_pixels_only():
    logits = normal((1, 3, 2, 2))
    target = np.array([[[0, 255], [255, 2]]])
    total = softmax_cross_entropy(mf.Tensor(logits), target, reduction="sum").item()
    assert math.isclose(softmax_cross_entropy(mf.Tensor(logits), target).item(), total / 2, rel_tol=1e-12)


def test_ignored_pixels_get_exactly_zero_gradient(backend):
    x = mf.Tensor(normal((2, 4, 3, 3)), requires_grad=True)
    target = labels((2, 3, 3), 4, ignored=0.5)
    softmax_cross_entropy(x, target).backward()
    ignored = np.broadcast_to((target == 255)[:, None], x.shape)
    assert (x.grad[ignored] == 0).all() and (x.grad[~ignored] != 0).all()


@pytest.mark.parametrize("dtype, big", [(np.float32, 1e4), (np.float64, 1e8)], ids=["float32", "float64"])
def test_huge_logits_do_not_overflow(backend, dtype, big):
    logits = normal((1, 3, 2, 2), dtype=dtype)
    target = labels((1, 2, 2), 3)
    shifted = logits + dtype(big)  # the loss ignores a constant added to every class
    x = mf.Tensor(shifted, requires_grad=True)
    loss = softmax_cross_entropy(x, target)
    loss.backward()
    # the reference sees the same rounded scores, shifted back exactly in float64
    expected, expected_grad = softmax_cross_entropy_loop(shifted.astype(np.float64) - big, target)
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-6 if dtype == np.float32 else 1e-12)
    # The backward's softmax is exp(z - logsumexp), the logsumexp stored in the scores' dtype:
    # its rounding, up to half a unit in the last place of the scores, is the gradient's
    # relative error (5e-4 in float32 at 1e4). One unit is the tolerance.
    assert x.grad.dtype == dtype
    np.testing.assert_allclose(x.grad, expected_grad, rtol=float(np.spacing(dtype(big))), atol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf, on purpose
@pytest.mark.parametrize("value, where", [
    (np.nan, "labelled"), (np.nan, "ignored"), (np.inf, "labelled"), (np.inf, "ignored"),
    (-np.inf, "target-class"), (-np.inf, "other-class"), (-np.inf, "ignored"),
], ids=["nan", "nan-ignored-pixel", "inf", "inf-ignored-pixel", "minus-inf-target", "minus-inf-other-class",
        "minus-inf-ignored-pixel"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_non_finite_logits_give_a_non_finite_loss(backend, value, where, reduction):
    logits = normal((1, 3, 2, 2), dtype=np.float32)
    target = np.array([[[0, 1], [2, 255]]])
    if where == "ignored":
        logits[0, 1, 1, 1] = value
    elif where == "other-class":
        logits[0, 2, 0, 0] = value  # pixel (0, 0) is labelled 0
    else:
        logits[0, 0, 0, 0] = value
    assert not math.isfinite(softmax_cross_entropy(mf.Tensor(logits), target, reduction=reduction).item())


def test_all_ignored_with_nan_is_still_nan(backend):
    logits = normal((1, 2, 2, 2))
    logits[0, 0, 1, 0] = np.nan
    assert math.isnan(softmax_cross_entropy(mf.Tensor(logits), np.full((1, 2, 2), 255)).item())


def test_accepted_target_forms():
    logits = mf.Tensor(normal((2, 3, 2, 2)))
    target = labels((2, 2, 2), 3)
    expected = softmax_cross_entropy(logits, target).item()
    for form in (target.astype(np.uint8), target.astype(np.int32), target.tolist(),
                 mf.Tensor(target, dtype=np.int64)):
        assert softmax_cross_entropy(logits, form).item() == expected


def test_uint8_labels_with_void_255(backend):
    logits = mf.Tensor(normal((1, 21, 3, 3)))
    target = labels((1, 3, 3), 21, ignored=0.3).astype(np.uint8)
    expected, _ = softmax_cross_entropy_loop(logits.data, target)
    assert math.isclose(softmax_cross_entropy(logits, target).item(), expected, rel_tol=1e-12)


# ---- primitives ------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf, on purpose
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("poison", [False, True])
def test_rows_shared_among_threads_give_the_same_bits(monkeypatch, threads, count, poison):
    """Large logits are cut into one share of their rows per thread: loss and gradient are
    the same, bit for bit (7 rows: unequal shares; with and without a non-finite score)."""
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((2, 4, 7, 5)).astype(np.float32) * 3
    target = rng.integers(0, 4, (2, 7, 5))
    target[0, :2] = 255
    if poison:
        logits[1, 2, 5, 1] = np.inf
    results = []
    for threshold, thread_count in ((1 << 60, 1), (0, count)):
        monkeypatch.setattr(tuning, "MIN_SHARED_BYTES", threshold)
        threads(thread_count)
        tensor = mf.Tensor(logits, requires_grad=True)
        loss = softmax_cross_entropy(tensor, target)
        loss.backward()
        results.append((loss.data, tensor.grad))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def test_logits_one_pixel_wide_are_not_cut(monkeypatch, threads):
    """A share of one row of a one-pixel-wide image would sum its scores in another order."""
    logits = np.random.default_rng(5).standard_normal((1, 16, 2, 1)).astype(np.float32) * 3
    target = np.zeros((1, 2, 1), np.int64)
    monkeypatch.setattr(tuning, "MIN_SHARED_BYTES", 0)
    threads(2)
    shared = softmax_cross_entropy(mf.Tensor(logits), target, reduction="sum").item()
    threads(1)
    assert shared == softmax_cross_entropy(mf.Tensor(logits), target, reduction="sum").item()


def test_shared_rows_keep_the_callers_float_error_settings(monkeypatch, threads):
    logits = np.zeros((1, 3, 4, 2), np.float32)
    logits[0, 0, 3, 0] = np.inf  # inf - inf in the second share's rows
    target = np.zeros((1, 4, 2), np.int64)
    monkeypatch.setattr(tuning, "MIN_SHARED_BYTES", 0)
    threads(2)
    with np.errstate(invalid="raise"), pytest.raises(FloatingPointError):
        softmax_cross_entropy(mf.Tensor(logits), target)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not math.isfinite(softmax_cross_entropy(mf.Tensor(logits), target).item())


def test_forward_primitive():
    logits, target = normal((2, 4, 3, 3), dtype=np.float32), labels((2, 3, 3), 4, ignored=0.3)
    pixel_loss, lse = softmax_cross_entropy_forward(logits, target, 255)
    assert pixel_loss.shape == lse.shape == (2, 3, 3)
    assert pixel_loss.dtype == lse.dtype == np.float32
    np.testing.assert_allclose(lse, np.log(np.exp(logits.astype(np.float64)).sum(axis=1)), rtol=1e-6)
    assert (pixel_loss[target == 255] == 0).all() and (pixel_loss[target != 255] > 0).all()


def test_backward_primitive():
    logits, target = normal((2, 4, 3, 3)), labels((2, 3, 3), 4, ignored=0.3)
    _, lse = softmax_cross_entropy_forward(logits, target, 255)
    grad = softmax_cross_entropy_backward(logits, target, lse, 255, 0.25)
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    onehot = np.arange(4)[None, :, None, None] == target[:, None]
    np.testing.assert_allclose(grad, np.where((target != 255)[:, None], (prob - onehot) * 0.25, 0), rtol=1e-12)


def test_primitives_turn_a_bad_label_into_nan():
    # the op rejects such labels first; the primitives never make them a finite loss
    logits = normal((1, 3, 2, 2))
    target = np.array([[[0, 3], [-2, 255]]])
    pixel_loss, lse = softmax_cross_entropy_forward(logits, target, 255)
    assert np.isfinite(pixel_loss[0, 0, 0]) and pixel_loss[0, 1, 1] == 0
    assert np.isnan(pixel_loss[0, 0, 1]) and np.isnan(pixel_loss[0, 1, 0])
    grad = softmax_cross_entropy_backward(logits, target, lse, 255, 1.0)
    assert np.isnan(grad[0, :, 0, 1]).all() and np.isnan(grad[0, :, 1, 0]).all()
    assert (grad[0, :, 1, 1] == 0).all()


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("logits_shape, target, kwargs, error, pattern", [
    ((1, 3, 2, 2), np.zeros((1, 2, 2), np.float32), {}, TypeError,
     "target must hold integer class labels, got dtype float32"),
    ((1, 3, 2, 2), mf.Tensor(np.zeros((1, 2, 2), np.int64)), {}, TypeError,
     "got dtype float32 (a Tensor made from labels is float32"),
    ((1, 3, 2, 2), np.zeros((1, 2, 2), bool), {}, TypeError, "got dtype bool"),
    ((2, 3, 4, 5), np.zeros((2, 5, 4), np.int64), {}, ValueError,
     "target has shape (2, 5, 4), expected (N, H, W) = (2, 4, 5) to match logits of shape (2, 3, 4, 5)"),
    ((2, 3, 4, 5), np.zeros((4, 5), np.int64), {}, ValueError,
     "target has shape (4, 5), expected (N, H, W) = (2, 4, 5)"),
    ((1, 3, 2, 2), np.array([[[0, 7], [1, 7]]]), {}, ValueError,
     "target holds label 7 (2 pixels out of range); "
     "labels must lie in [0, 3) for 3 classes, or equal ignore_index=255"),
    ((1, 3, 2, 2), np.array([[[0, -1], [1, 2]]]), {}, ValueError, "target holds label -1 (1 pixels out of range)"),
    ((1, 3, 2, 2), np.array([[[0, 3], [1, 2]]]), {}, ValueError, "target holds label 3"),
    ((1, 3, 2, 2), np.array([[[0, 255], [1, 2]]]), dict(ignore_index=-100), ValueError, "target holds label 255"),
    ((1, 3, 2, 2), np.zeros((1, 2, 2), np.int64), dict(reduction="none"), ValueError,
     "reduction must be one of ('mean', 'sum'), got 'none'"),
    ((1, 3, 2, 2), np.zeros((1, 2, 2), np.int64), dict(ignore_index=2.5), TypeError,
     "ignore_index must be an int, got 2.5"),
    ((3, 2, 2), np.zeros((1, 2, 2), np.int64), {}, ValueError,
     "logits must have shape (N, K, H, W), got shape (3, 2, 2)"),
], ids=["float-target", "float-tensor-target", "bool-target", "swapped-shape", "missing-batch", "label-too-big",
        "label-negative", "label-equal-to-k", "void-not-ignored", "unknown-reduction", "float-ignore-index",
        "logits-3d"])
def test_argument_errors(logits_shape, target, kwargs, error, pattern):
    with pytest.raises(error, match=re.escape(pattern)):
        softmax_cross_entropy(mf.Tensor(np.zeros(logits_shape)), target, **kwargs)


def test_integer_logits_rejected():
    with pytest.raises(TypeError, match="logits must be a float tensor, got dtype int64"):
        softmax_cross_entropy(np.zeros((1, 3, 2, 2), np.int64), np.zeros((1, 2, 2), np.int64))


# ---- softmax and log_softmax -----------------------------------------------------------------

@pytest.mark.parametrize("axis", [1, -1, 0], ids=["classes", "last", "first"])
def test_softmax_and_log_softmax(axis):
    x = normal((2, 4, 3, 5), scale=3.0)
    expected = np.exp(x) / np.exp(x).sum(axis=axis, keepdims=True)
    np.testing.assert_allclose(softmax(mf.Tensor(x), axis).data, expected, rtol=1e-12)
    np.testing.assert_allclose(log_softmax(mf.Tensor(x), axis).data, np.log(expected), rtol=1e-12, atol=1e-12)
    assert mf.gradcheck(lambda x: softmax(x, axis), [mf.Tensor(x, requires_grad=True)])
    assert mf.gradcheck(lambda x: log_softmax(x, axis), [mf.Tensor(x, requires_grad=True)])


def test_softmax_is_stable_and_keeps_float32():
    x = mf.Tensor(np.array([[1e4, 1e4 - 1.0, -1e4]], np.float32))
    p, log_p = softmax(x, axis=1).data, log_softmax(x, axis=1).data
    assert p.dtype == log_p.dtype == np.float32
    np.testing.assert_allclose(p, [[1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0]], rtol=1e-6)
    np.testing.assert_allclose(log_p[0, :2], [-np.log1p(np.exp(-1)), -1 - np.log1p(np.exp(-1))], rtol=1e-6)
    assert log_p[0, 2] == np.float32(-2e4 - np.log1p(np.exp(-1)))


def test_log_softmax_feeds_the_loss():
    # the loss equals the negative mean of the log-probabilities of the labelled classes
    x, target = normal((2, 3, 2, 2)), labels((2, 2, 2), 3)
    picked = np.take_along_axis(log_softmax(mf.Tensor(x)).data, target[:, None], axis=1)
    assert math.isclose(softmax_cross_entropy(mf.Tensor(x), target).item(), -picked.mean(), rel_tol=1e-12)


@pytest.mark.parametrize("axis", [4, -5, 1.0, None], ids=["too-big", "too-negative", "float", "none"])
def test_softmax_axis_errors(axis):
    message = f"axis must be an int in [-4, 4) for a tensor with 4 dims, got {axis!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        softmax(mf.Tensor(np.ones((1, 2, 3, 4))), axis)


# ---- devices ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", [0.3, 1.0], ids=["some-ignored", "all-ignored"])
def test_on_device_matches_cpu(device, reduction, ignored):
    logits, target, results = normal((2, 5, 3, 4), dtype=np.float32), labels((2, 3, 4), 5, ignored=ignored), []
    for where in ("cpu", device):
        leaf = mf.Tensor(logits, requires_grad=True)
        loss = softmax_cross_entropy(leaf.to(where), target, reduction=reduction)  # NumPy labels move along
        loss.backward()
        results.append((loss.item(), leaf.grad))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
