"""ReLU, dropout and dropout2d: against loop references, gradient checks, and PyTorch's rules."""

import re

import numpy as np
import pytest
from conftest import GPU
from loop_reference_misc import relu_loop

import minifcn as mf
from minifcn.backend import to_numpy
from minifcn.backend import cpu, reference
from minifcn.backend.cpu import tuning
from minifcn.functional.activation import dropout, dropout2d, relu


def normal(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def away_from_zero(shape, seed=0):
    """float64 values with |x| >= 0.1, so finite differences never straddle ReLU's kink."""
    x = normal(shape, seed)
    return np.where(np.abs(x) < 0.1, np.sign(x) * 0.1 + x, x)


# ---- ReLU ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 5, 4), (1, 1, 1, 1), ()], ids=["1d", "nchw", "one", "0d"])
def test_relu_matches_loop(backend, shape, dtype):
    x = normal(shape, dtype=dtype)
    y = relu(mf.Tensor(x))
    assert y.dtype == dtype
    np.testing.assert_array_equal(y.data, relu_loop(x))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5)], ids=["1d", "nchw"])
def test_relu_gradcheck(backend, shape):
    assert mf.gradcheck(relu, [mf.Tensor(away_from_zero(shape), requires_grad=True)])


def test_relu_gradient_is_zero_at_zero(backend):
    # PyTorch's convention: the kink at 0 passes no gradient
    x = mf.Tensor(np.array([-1.0, 0.0, 2.0], np.float32), requires_grad=True)
    relu(x).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 1.0])
    assert x.grad.dtype == np.float32


def test_relu_keeps_nan(backend):
    np.testing.assert_array_equal(relu(mf.Tensor(np.array([np.nan, -np.inf, np.inf]))).data,
                                  [np.nan, 0.0, np.inf])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 * inf, on purpose
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("primitives", [reference, cpu], ids=["reference", "cpu"])
def test_relu_backward_is_the_mask_product_bit_for_bit(primitives, dtype):
    """grad_y * (y > 0), non-finite values and signs of zero included (0 * inf is NaN)."""
    y = np.array([0.0, 1.0, 2.0, np.nan, np.inf, 0.0, 3.0, 0.0], dtype)
    grad_y = np.array([1.0, -2.0, np.inf, 5.0, 6.0, np.nan, -0.0, -np.inf], dtype)
    expected = grad_y * (y > 0)
    out = primitives.relu_backward(grad_y, y)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.5", None, True],
                         ids=["negative", "above-one", "nan", "string", "none", "bool"])
@pytest.mark.parametrize("fn", [dropout, dropout2d], ids=["dropout", "dropout2d"])
def test_dropout_rejects_a_bad_probability(fn, p):
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got " + re.escape(repr(p))):
        fn(mf.Tensor(np.ones((1, 2, 2, 2))), p)


@pytest.mark.parametrize("fn", [dropout, dropout2d], ids=["dropout", "dropout2d"])
def test_dropout_identity_in_eval_or_p_zero(fn):
    x = mf.Tensor(normal((2, 3, 4, 4)), requires_grad=True)
    assert fn(x, 0.5, training=False) is x
    assert fn(x, 0.0) is x
    assert isinstance(fn(np.ones((1, 1, 2, 2)), 0.5, training=False), mf.Tensor)


@pytest.mark.parametrize("fn", [dropout, dropout2d], ids=["dropout", "dropout2d"])
def test_dropout_p_one_zeroes_everything(fn):
    x = mf.Tensor(normal((2, 3, 4, 4), dtype=np.float32), requires_grad=True)
    y = fn(x, 1.0)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y.data, 0)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, 0)


def test_dropout_keeps_nan_where_it_drops(backend):
    # x * mask * scale, as PyTorch: a dropped NaN is still NaN (0 * NaN), never hidden
    y = dropout(mf.Tensor(np.full(20, np.nan)), 1.0)
    assert np.isnan(y.data).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(p):
    x = np.ones(200_000, np.float32)
    y = dropout(mf.Tensor(x), p, rng=np.random.default_rng(0)).data
    assert y.dtype == np.float32
    kept = y != 0
    assert abs(kept.mean() - (1 - p)) < 0.01  # about 4 standard deviations
    np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.05  # the expected value is unchanged


def test_dropout_gradient_uses_the_same_mask(backend):
    x = mf.Tensor(normal((4, 5, 6), dtype=np.float32), requires_grad=True)
    y = dropout(x, 0.3, rng=np.random.default_rng(1))
    g = normal((4, 5, 6), 2, np.float32)
    y.backward(g)
    keep = y.data != 0
    np.testing.assert_allclose(x.grad, np.where(keep, g / 0.7, 0), rtol=1e-6)
    np.testing.assert_allclose(y.data, np.where(keep, x.data / 0.7, 0), rtol=1e-6)


@pytest.mark.parametrize("fn", [dropout, dropout2d], ids=["dropout", "dropout2d"])
def test_dropout_gradcheck(backend, fn):
    # a fresh generator with one seed per call: every evaluation drops the same elements
    x = mf.Tensor(normal((2, 4, 3, 3)), requires_grad=True)
    assert mf.gradcheck(lambda x: fn(x, 0.4, rng=np.random.default_rng(3)), x)


def test_dropout_repeatable():
    x = mf.Tensor(np.ones((8, 8)))
    first = dropout(x, 0.5, rng=np.random.default_rng(5)).data
    np.testing.assert_array_equal(first, dropout(x, 0.5, rng=np.random.default_rng(5)).data)
    np.random.seed(7)  # rng=None draws from the array module's global generator
    second = dropout(x, 0.5).data
    np.random.seed(7)
    np.testing.assert_array_equal(second, dropout(x, 0.5).data)
    assert not np.array_equal(first, dropout(x, 0.5, rng=np.random.default_rng(6)).data)


@pytest.mark.parametrize("primitives", [reference, cpu], ids=["reference", "cpu"])
def test_dropout_apply_primitive(primitives):
    x, keep = normal((3, 4)), np.random.default_rng(1).random((3, 4)) < 0.5
    np.testing.assert_array_equal(primitives.dropout_apply(x, keep, 2.0), x * keep * 2.0)
    np.testing.assert_array_equal(primitives.dropout_apply(x, keep.astype(np.uint8), 2.0), x * keep * 2.0)


# ---- dropout2d -----------------------------------------------------------------------------

def test_dropout2d_drops_whole_channels(backend):
    x = mf.Tensor(normal((16, 32, 5, 3), dtype=np.float32), requires_grad=True)
    y = dropout2d(x, 0.25, rng=np.random.default_rng(0))
    assert y.dtype == np.float32
    kept = (y.data != 0).reshape(16, 32, -1)
    assert (kept.all(axis=2) | ~kept.any(axis=2)).all()  # a channel is kept or dropped whole
    assert abs(kept[:, :, 0].mean() - 0.75) < 0.06
    channel_kept = kept.all(axis=2)[:, :, None, None]
    np.testing.assert_allclose(y.data, np.where(channel_kept, x.data / 0.75, 0), rtol=1e-6)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, np.where(channel_kept, 1 / 0.75, 0) * np.ones((5, 3)), rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (1, 2, 3, 4, 5)], ids=["2d", "3d", "5d"])
def test_dropout2d_needs_nchw(shape):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*" + re.escape(str(shape))):
        dropout2d(mf.Tensor(np.ones(shape)), 0.5)


# ---- devices -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("fn", [dropout, dropout2d], ids=["dropout", "dropout2d"])
def test_ops_on_device_match_cpu(device, fn):
    x, g = normal((2, 3, 4, 5), dtype=np.float32), normal((2, 3, 4, 5), 1, np.float32)

    def run(where):
        leaf = mf.Tensor(x, requires_grad=True)  # on the CPU; .to() carries the gradient back
        y = fn(relu(leaf.to(where)), 0.3, rng=np.random.default_rng(0))  # same mask on any device
        y.backward(mf.Tensor(g).to(where).data)
        return to_numpy(y.data), leaf.grad

    (y_cpu, grad_cpu), (y_dev, grad_dev) = run("cpu"), run(device)
    np.testing.assert_allclose(y_dev, y_cpu, rtol=1e-6)
    np.testing.assert_allclose(grad_dev, grad_cpu, rtol=1e-6)


@pytest.mark.parametrize("count", [2, 3])
def test_relu_shared_among_threads(monkeypatch, threads, count):
    """Large arrays are cut into one share of the elements per thread: the same result, bit for
    bit; a non-contiguous input stays in one thread."""
    x = np.random.default_rng(9).standard_normal((3, 5, 7, 11)).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, np.nan, -0.0]
    g = np.random.default_rng(10).standard_normal(x.shape).astype(np.float32)
    results = []
    for threshold, thread_count in ((1 << 60, 1), (0, count)):
        monkeypatch.setattr(tuning, "MIN_SHARED_BYTES", threshold)
        threads(thread_count)
        for array in (x, np.asfortranarray(x)):
            tensor = mf.Tensor(array, requires_grad=True)
            out = mf.functional.relu(tensor)
            out.backward(g)
            results.append((out.data, tensor.grad))
    for one, two in zip(results[:2], results[2:]):
        for a, b in zip(one, two):
            np.testing.assert_array_equal(a, b)
