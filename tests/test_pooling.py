"""max_pool2d: against the loop reference (values and argmax), gradient checks,
ties, ceil mode, -inf windows, and every argument error."""

import numpy as np
import pytest

import minifcn as mf
from minifcn.backend import to_device, to_numpy
from minifcn.backend.cpu import tuning
from minifcn.backend.cpu.pooling import max_pool2d_tiles_backward, max_pool2d_tiles_forward
from minifcn.backend.reference.pooling import max_pool2d_backward, max_pool2d_forward, pool_output_size
from minifcn.functional.pooling import max_pool2d
import loop_reference as ref
from conftest import DEVICES


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _distinct(rng, shape):
    """Values at least 0.01 apart, so that finite differences never flip a maximum."""
    return rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 + 0.5


# (N, C, H, W, kernel, stride, padding, ceil_mode), named by what is awkward about it
POOL_CASES = [
    pytest.param(2, 3, 6, 4, 2, 2, 0, False, id="2x2-fast-path-batch2"),
    pytest.param(1, 2, 7, 5, 2, 2, 0, False, id="odd-sizes-floor-drops-last-row"),
    pytest.param(1, 2, 7, 5, 2, 2, 0, True, id="ceil-partial-last-window"),
    pytest.param(2, 2, 7, 7, 3, 2, 1, True, id="3x3-stride2-pad1-ceil"),
    pytest.param(1, 2, 5, 6, 2, 2, 1, True, id="ceil-last-window-dropped"),
    pytest.param(1, 2, 8, 7, 2, 3, 0, False, id="stride-gt-kernel"),
    pytest.param(1, 2, 8, 7, 2, 3, 0, True, id="stride-gt-kernel-ceil"),
    pytest.param(2, 1, 5, 4, 3, 1, 1, False, id="overlapping-stride1"),
    pytest.param(1, 2, 6, 5, (3, 2), (2, 1), (1, 0), False, id="non-square"),
    pytest.param(1, 2, 3, 4, (3, 4), 1, 0, False, id="kernel-equals-input"),
    pytest.param(1, 1, 1, 1, 2, 2, 1, True, id="1x1-input-padded"),
]


@pytest.mark.parametrize("N, C, H, W, kernel, stride, padding, ceil_mode", POOL_CASES)
def test_max_pool2d_matches_loop_reference(backend, N, C, H, W, kernel, stride, padding, ceil_mode):
    x = np.random.default_rng(0).standard_normal((N, C, H, W))
    out, argmax = max_pool2d_forward(x, _pair(kernel), _pair(stride), _pair(padding), ceil_mode)
    ref_out, ref_argmax = ref.max_pool2d(x, kernel, stride, padding, ceil_mode)
    assert out.shape == ref_out.shape and argmax.dtype == np.int64
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)
    np.testing.assert_array_equal(max_pool2d(mf.Tensor(x), kernel, stride, padding, ceil_mode).data, ref_out)


@pytest.mark.parametrize("N, C, H, W, kernel, stride, padding, ceil_mode", POOL_CASES)
def test_max_pool2d_gradcheck(backend, N, C, H, W, kernel, stride, padding, ceil_mode):
    x = mf.Tensor(_distinct(np.random.default_rng(1), (N, C, H, W)), requires_grad=True)
    assert mf.gradcheck(lambda x: max_pool2d(x, kernel, stride, padding, ceil_mode), [x])


@pytest.mark.parametrize("kernel, stride, padding", [
    pytest.param(2, 2, 0, id="2x2"),
    pytest.param(3, 1, 1, id="overlapping"),
    pytest.param(3, 2, 1, id="3x3-stride2"),
])
def test_ties_first_maximum_wins_and_gets_the_gradient(backend, kernel, stride, padding):
    x = np.random.default_rng(2).integers(0, 3, size=(2, 2, 6, 5)).astype(np.float64)
    x[0, 0] = 1.0  # a whole plateau
    tensor = mf.Tensor(x, requires_grad=True)
    out = max_pool2d(tensor, kernel, stride, padding, ceil_mode=True)
    ref_out, ref_argmax = ref.max_pool2d(x, kernel, stride, padding, ceil_mode=True)
    np.testing.assert_array_equal(out.data, ref_out)
    g = np.random.default_rng(3).standard_normal(out.shape)
    out.backward(g)
    expected = np.zeros_like(x)
    for (n, c, oy, ox), where in np.ndenumerate(ref_argmax):
        expected[n, c, where // x.shape[3], where % x.shape[3]] += g[n, c, oy, ox]
    np.testing.assert_allclose(tensor.grad, expected, rtol=1e-12)


@pytest.mark.parametrize("H, W, kernel, ceil_mode", [
    pytest.param(6, 4, 2, False, id="2x2-even"),
    pytest.param(7, 5, 2, True, id="2x2-ceil-overhang"),
    pytest.param(7, 5, 2, False, id="2x2-floor-drops-last"),
    pytest.param(7, 8, (3, 2), True, id="3x2-ceil"),
    pytest.param(1, 1, 2, True, id="1x1-input"),
    pytest.param(6, 5, (3, 1), False, id="one-column-windows"),
])
def test_tiled_fast_path_equals_the_reference(H, W, kernel, ceil_mode):
    """kernel == stride: the CPU shortcut gives the reference's maxima, ties, -inf windows and gradients."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, size=(2, 3, H, W)).astype(np.float32)  # many ties
    x[0, 0] = -np.inf
    x[1, 1, ::2, ::3] = np.nan  # windows with one or several NaNs
    k = _pair(kernel)
    out, argmax = max_pool2d_forward(x, k, k, (0, 0), ceil_mode)
    fast, row, col = max_pool2d_tiles_forward(x, k, out.shape[2:])
    np.testing.assert_array_equal(fast, out)  # NaN where the reference has NaN
    assert row.dtype == col.dtype == np.uint8 and fast.dtype == np.float32
    g = rng.standard_normal(out.shape).astype(np.float32)
    np.testing.assert_array_equal(max_pool2d_tiles_backward(g, row, col, x.shape, k),
                                  max_pool2d_backward(g, argmax, x.shape))


@pytest.mark.parametrize("H, W, kernel, ceil_mode", [
    pytest.param(6, 4, 2, False, id="2x2-even"),
    pytest.param(7, 5, 2, True, id="2x2-ceil-overhang"),
    pytest.param(7, 5, 2, False, id="2x2-floor-drops-last"),
])
@pytest.mark.parametrize("count", [2, 3])
def test_tiled_pooling_shared_by_channels_among_threads(monkeypatch, threads, H, W, kernel, ceil_mode, count):
    """Large inputs are pooled one share of the channels per thread: the same maxima, winners
    and gradients, bit for bit, as in one thread (5 channels: shares of unequal size)."""
    rng = np.random.default_rng(8)
    x = rng.integers(0, 3, size=(2, 5, H, W)).astype(np.float32)
    x[1, 2, ::2, ::3] = np.nan
    results = []
    for threshold, thread_count in ((1 << 60, 1), (0, count)):
        monkeypatch.setattr(tuning, "MIN_SHARED_BYTES", threshold)
        threads(thread_count)
        tensor = mf.Tensor(x, requires_grad=True)
        out = max_pool2d(tensor, kernel, ceil_mode=ceil_mode)
        out.backward(np.arange(out.size, dtype=np.float32).reshape(out.shape))
        results.append((out.data, tensor.grad))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def test_overlapping_windows_add_their_gradients(backend):
    """One peak in the middle wins all nine 3x3 windows at stride 1: it gets all nine gradients."""
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 2, 2] = 1.0
    grad = max_pool2d_backward(np.ones((1, 1, 3, 3)), np.full((1, 1, 3, 3), 12), x.shape)
    assert grad[0, 0, 2, 2] == 9.0 and grad.sum() == 9.0
    out, argmax = max_pool2d_forward(x, (3, 3), (1, 1), (0, 0), False)
    np.testing.assert_array_equal(argmax, np.full((1, 1, 3, 3), 12))


@pytest.mark.parametrize("padding", [0, 1])
def test_windows_of_minus_infinity_point_inside_the_input(backend, padding):
    """All -inf windows report their first pixel inside the input (as PyTorch), never the padding."""
    x = np.full((1, 1, 5, 6), -np.inf)
    x[0, 0, 3, 4] = 1.0
    out, argmax = max_pool2d_forward(x, (3, 3), (2, 2), (padding, padding), True)
    ref_out, ref_argmax = ref.max_pool2d(x, 3, 2, padding, True)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)
    assert argmax.min() >= 0 and argmax.max() < 30


def test_non_contiguous_input(backend):
    x = np.random.default_rng(6).standard_normal((2, 3, 7, 6)).transpose(0, 1, 3, 2)
    out, argmax = max_pool2d_forward(x, (3, 3), (2, 2), (1, 1), True)
    ref_out, ref_argmax = ref.max_pool2d(x, 3, 2, 1, True)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)


@pytest.mark.parametrize("size, kernel, stride, padding, ceil_mode, expected", [
    (7, 2, 2, 0, False, 3), (7, 2, 2, 0, True, 4), (5, 2, 2, 1, True, 3), (5, 2, 2, 1, False, 3),
    (6, 3, 2, 1, True, 4), (1, 2, 2, 1, True, 1), (8, 2, 3, 0, True, 3),
])
def test_pool_output_size_follows_pytorch(size, kernel, stride, padding, ceil_mode, expected):
    assert pool_output_size(size, kernel, stride, padding, ceil_mode) == expected


def test_stride_defaults_to_kernel_size():
    x = mf.Tensor(np.random.default_rng(4).standard_normal((1, 2, 6, 6)))
    np.testing.assert_array_equal(max_pool2d(x, 3).data, max_pool2d(x, 3, 3).data)
    assert max_pool2d(x, 3).shape == (1, 2, 2, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_stays_float32(device):
    x = np.random.default_rng(5).standard_normal((2, 3, 7, 6)).astype(np.float32)
    tensor = mf.Tensor(to_device(x, device), requires_grad=True)
    out = max_pool2d(tensor, 3, 2, 1, ceil_mode=True)
    assert out.dtype == np.float32 and out.device == device
    np.testing.assert_array_equal(to_numpy(out.data), ref.max_pool2d(x, 3, 2, 1, True)[0])
    out.sum().backward()
    assert tensor.grad.dtype == np.float32


@pytest.mark.parametrize("args, kwargs, error, message", [
    pytest.param(((3, 5, 5), 2), {}, ValueError,
                 r"max_pool2d expects x of shape \(N, C, H, W\), got shape \(3, 5, 5\)", id="x-3d"),
    pytest.param(((1, 1, 5, 5), 0), {}, ValueError, r"max_pool2d: kernel_size must be >= 1, got 0",
                 id="kernel-0"),
    pytest.param(((1, 1, 5, 5), 2), dict(stride=0), ValueError, r"max_pool2d: stride must be >= 1, got 0",
                 id="stride-0"),
    pytest.param(((1, 1, 5, 5), 2), dict(padding=-1), ValueError,
                 r"max_pool2d: padding must be >= 0, got -1", id="padding-negative"),
    pytest.param(((1, 1, 5, 5), 3), dict(padding=2), ValueError,
                 r"max_pool2d: padding 2 must be at most half the kernel size 3",
                 id="padding-gt-half-kernel"),
    pytest.param(((1, 1, 5, 5), (2, 4)), dict(padding=(1, 3)), ValueError,
                 r"padding \(1, 3\) must be at most half the kernel size \(2, 4\)", id="padding-pairs"),
    pytest.param(((1, 1, 2, 2), 3), {}, ValueError,
                 r"max_pool2d: kernel 3x3 is larger than the padded input 2x2",
                 id="kernel-larger-than-input"),
    pytest.param(((1, 1, 5, 5), 2.5), {}, TypeError, r"kernel_size must be an int or a pair of ints, got 2.5",
                 id="kernel-float"),
])
def test_max_pool2d_argument_errors(args, kwargs, error, message):
    shape, kernel = args
    with pytest.raises(error, match=message):
        max_pool2d(mf.Tensor(np.zeros(shape)), kernel, **kwargs)
