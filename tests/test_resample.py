"""interpolate (bilinear and nearest): values pinned against PyTorch, loop references,
gradient checks, and argument errors."""

import re

import numpy as np
import pytest
from conftest import GPU
from loop_reference_misc import interpolate_backward_loop, interpolate_loop

import minifcn as mf
from minifcn.backend import to_numpy
from minifcn.backend.reference.resample import interpolate_backward, interpolate_forward, interpolation_matrix
from minifcn.functional.resample import interpolate


def normal(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---- pinned values ---------------------------------------------------------------------------
# Printed by torch 2.13 (CPU) for F.interpolate(torch.arange(12.).reshape(1, 1, 3, 4), **kwargs),
# so the meaning of every mode is fixed independently of the code and the loop reference.

PINNED = [
    pytest.param(dict(size=(5, 3), mode="bilinear", align_corners=False), [
        [0.166667, 1.5, 2.833333], [1.766667, 3.1, 4.433333], [4.166667, 5.5, 6.833333],
        [6.566667, 7.9, 9.233333], [8.166667, 9.5, 10.833333]], id="bilinear-size"),
    pytest.param(dict(size=(5, 3), mode="bilinear", align_corners=True), [
        [0.0, 1.5, 3.0], [2.0, 3.5, 5.0], [4.0, 5.5, 7.0], [6.0, 7.5, 9.0], [8.0, 9.5, 11.0]],
        id="bilinear-size-corners"),
    pytest.param(dict(size=(5, 3), mode="nearest"), [
        [0, 1, 2], [0, 1, 2], [4, 5, 6], [4, 5, 6], [8, 9, 10]], id="nearest-size"),
    pytest.param(dict(scale_factor=1.7, mode="bilinear"), [
        [0.0, 0.382353, 0.970588, 1.558824, 2.147059, 2.735294],
        [1.529412, 1.911765, 2.5, 3.088235, 3.676471, 4.264706],
        [3.882353, 4.264706, 4.852941, 5.441176, 6.029412, 6.617647],
        [6.235294, 6.617647, 7.205882, 7.794118, 8.382353, 8.970588],
        [8.0, 8.382353, 8.970588, 9.558824, 10.147059, 10.735294]], id="bilinear-scale-1.7"),
    pytest.param(dict(scale_factor=1.7, mode="nearest"), [
        [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [4, 4, 5, 5, 6, 6], [4, 4, 5, 5, 6, 6],
        [8, 8, 9, 9, 10, 10]], id="nearest-scale-1.7"),
    pytest.param(dict(scale_factor=(0.5, 1.5), mode="bilinear"),
                 [[2.0, 2.5, 3.166667, 3.833333, 4.5, 5.0]], id="bilinear-scale-pair"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kwargs, expected", PINNED)
def test_matches_pytorch_values(backend, kwargs, expected, dtype):
    x = mf.Tensor(np.arange(12, dtype=dtype).reshape(1, 1, 3, 4))
    y = interpolate(x, **kwargs)
    assert y.dtype == dtype
    np.testing.assert_allclose(y.data[0, 0], expected, atol=2e-6)


# ---- against the loop reference ----------------------------------------------------------------

# (in (H, W), size or None, scale_factor or None)
GEOMETRIES = [
    pytest.param((3, 5), (7, 9), None, id="up-odd"),
    pytest.param((8, 6), (3, 4), None, id="down"),
    pytest.param((5, 7), (5, 7), None, id="same-size"),
    pytest.param((4, 4), (32, 32), None, id="fcn-8x-up"),
    pytest.param((1, 1), (3, 2), None, id="from-1x1"),
    pytest.param((4, 5), (1, 1), None, id="to-1x1"),
    pytest.param((5, 6), (10, 3), None, id="up-one-axis-down-the-other"),
    pytest.param((5, 6), None, 1.7, id="scale-non-integer"),
    pytest.param((7, 5), None, (0.6, 2.5), id="scale-pair-down-up"),
    pytest.param((6, 4), None, 2.0, id="scale-2"),
    pytest.param((9, 10), None, 1.05, id="scale-keeps-size"),  # PyTorch copies the unchanged axis
    pytest.param((6, 7), None, 0.5, id="scale-half"),
]
MODES = [pytest.param("bilinear", False, id="bilinear"), pytest.param("bilinear", True, id="bilinear-corners"),
         pytest.param("nearest", False, id="nearest")]


def _call(x, size, scale, mode, align_corners):
    return interpolate(x, size=size, scale_factor=scale, mode=mode, align_corners=align_corners)


def _reference_scales(scale, align_corners):
    if scale is None or align_corners:
        return None
    return scale if isinstance(scale, tuple) else (scale, scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode, align_corners", MODES)
@pytest.mark.parametrize("in_size, size, scale", GEOMETRIES)
def test_forward_matches_loop(backend, in_size, size, scale, mode, align_corners, dtype):
    x = normal((2, 3) + in_size, dtype=dtype)
    y = _call(mf.Tensor(x), size, scale, mode, align_corners)
    assert y.dtype == dtype
    expected = interpolate_loop(x, y.shape[2:], mode, align_corners, _reference_scales(scale, align_corners))
    if size is not None:
        assert y.shape[2:] == size
    np.testing.assert_allclose(y.data, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode, align_corners", MODES)
@pytest.mark.parametrize("in_size, size, scale", GEOMETRIES)
def test_backward_primitive_matches_loop(in_size, size, scale, mode, align_corners):
    scales = _reference_scales(scale, align_corners)
    out_size = size if size is not None else tuple(
        int(np.floor(n * s)) for n, s in zip(in_size, scale if isinstance(scale, tuple) else (scale, scale)))
    grad_y = normal((2, 3) + out_size, 1)
    np.testing.assert_allclose(interpolate_backward(grad_y, in_size, mode, align_corners, scales),
                               interpolate_backward_loop(grad_y, in_size, mode, align_corners, scales),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode, align_corners", MODES)
@pytest.mark.parametrize("in_size, size, scale", GEOMETRIES)
def test_gradcheck(backend, in_size, size, scale, mode, align_corners):
    x = mf.Tensor(normal((2, 2) + in_size), requires_grad=True)
    assert mf.gradcheck(lambda x: _call(x, size, scale, mode, align_corners), [x])


def test_float32_gradient_stays_float32(backend):
    x = mf.Tensor(normal((1, 2, 3, 4), dtype=np.float32), requires_grad=True)
    interpolate(x, size=(7, 5)).sum().backward()
    assert x.grad.dtype == np.float32


def test_primitives_are_adjoint():
    # <A x, g> == <x, A^T g>: the backward is the exact transpose of the forward
    x, g = normal((2, 3, 5, 4)), normal((2, 3, 9, 7), 1)
    for mode, corners in [("bilinear", False), ("bilinear", True), ("nearest", False)]:
        lhs = (interpolate_forward(x, (9, 7), mode, corners) * g).sum()
        rhs = (x * interpolate_backward(g, (5, 4), mode, corners)).sum()
        assert abs(lhs - rhs) < 1e-10


# ---- properties of the interpolation matrix --------------------------------------------------

@pytest.mark.parametrize("mode, align_corners", MODES)
def test_rows_are_convex_weights(mode, align_corners):
    # every output pixel is a weighted average of input pixels: a constant image stays constant
    for in_size in range(1, 12):
        for out_size in range(1, 25):
            a = interpolation_matrix(in_size, out_size, mode, align_corners)
            assert a.shape == (out_size, in_size)
            assert (a >= 0).all()
            np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-12)


def test_align_corners_keeps_the_corners(backend):
    x = normal((1, 1, 4, 6))
    y = interpolate(mf.Tensor(x), size=(9, 11), align_corners=True).data
    np.testing.assert_allclose(y[0, 0, [0, 0, -1, -1], [0, -1, 0, -1]], x[0, 0, [0, 0, -1, -1], [0, -1, 0, -1]])


def test_nearest_labels_stay_labels(backend):
    labels = np.random.default_rng(0).integers(0, 21, (1, 1, 5, 7)).astype(np.float32)
    y = interpolate(mf.Tensor(labels), size=(13, 9), mode="nearest").data
    assert set(np.unique(y)) <= set(np.unique(labels))


def test_align_corners_none_means_false():
    x = mf.Tensor(normal((1, 2, 3, 4)))
    np.testing.assert_array_equal(interpolate(x, size=(5, 5), align_corners=None).data,
                                  interpolate(x, size=(5, 5), align_corners=False).data)
    np.testing.assert_array_equal(interpolate(x, size=(5, 5), mode="nearest", align_corners=None).data,
                                  interpolate(x, size=(5, 5), mode="nearest").data)


def test_size_int_means_both_sides():
    x = mf.Tensor(normal((1, 2, 3, 4)))
    np.testing.assert_array_equal(interpolate(x, size=6).data, interpolate(x, size=(6, 6)).data)


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(), ValueError, "exactly one of size and scale_factor, got size=None and scale_factor=None"),
    (dict(size=4, scale_factor=2), ValueError, "exactly one of size and scale_factor, got size=4 and scale_factor=2"),
    (dict(size=4, mode="bicubic"), ValueError, "mode must be one of ('bilinear', 'nearest'), got 'bicubic'"),
    (dict(size=4, mode="nearest", align_corners=True), ValueError,
     "align_corners=True only applies to mode='bilinear'"),
    (dict(size=0), ValueError, "size must be a positive int or a pair of them, got (0, 0)"),
    (dict(size=(3, -1)), ValueError, "size must be a positive int or a pair of them, got (3, -1)"),
    (dict(size=3.0), ValueError, "size must be a positive int or a pair of them, got (3.0, 3.0)"),
    (dict(size=(2, 3, 4)), ValueError, "size must be a number or a pair (h, w), got (2, 3, 4)"),
    (dict(scale_factor=0), ValueError, "scale_factor must be a positive finite number or a pair of them, got 0"),
    (dict(scale_factor=-2.0), ValueError, "got -2.0"),
    (dict(scale_factor=float("inf")), ValueError, "got inf"),
    (dict(scale_factor=float("nan")), ValueError, "got nan"),
    (dict(scale_factor="2"), ValueError, "got '2'"),
    (dict(scale_factor=0.2), ValueError, "scale_factor=0.2 shrinks an input of size (3, 4) to (0, 0)"),
], ids=["neither", "both", "unknown-mode", "nearest-corners", "size-zero", "size-negative", "size-float",
        "size-triple", "scale-zero", "scale-negative", "scale-inf", "scale-nan", "scale-string", "scale-to-nothing"])
def test_argument_errors(kwargs, error, pattern):
    with pytest.raises(error, match=re.escape(pattern)):
        interpolate(mf.Tensor(np.ones((1, 1, 3, 4))), **kwargs)


@pytest.mark.parametrize("shape", [(3, 4), (1, 3, 4), (1, 1, 1, 3, 4)], ids=["2d", "3d", "5d"])
def test_needs_nchw(shape):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\), got shape " + re.escape(str(shape))):
        interpolate(mf.Tensor(np.ones(shape)), size=2)


# ---- devices ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("mode, align_corners", MODES)
@pytest.mark.parametrize("size, scale", [((7, 9), None), (None, 1.7), (None, 1.05)],
                         ids=["size", "scale", "keeps-size"])
def test_on_device_matches_cpu(device, mode, align_corners, size, scale):
    x, results = normal((2, 3, 5, 6), dtype=np.float32), []
    for where in ("cpu", device):
        leaf = mf.Tensor(x, requires_grad=True)
        y = _call(leaf.to(where), size, scale, mode, align_corners)
        (y * y).sum().backward()
        results.append((to_numpy(y.data), leaf.grad))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)
