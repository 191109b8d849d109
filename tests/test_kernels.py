"""Every CUDA kernel in kernels/*.cu against its NumPy reference.

Each test calls a wrapper of minifcn.backend.cuda (im2col, max_pool2d_forward, ...)
and the NumPy primitive of the same name, on awkward shapes, in float32 and
float64, and compares them elementwise (|kernel - numpy| <= atol + rtol*|numpy|,
printing the first mismatches on failure). Where the kernel runs is the
`device` parameter:

    cpu-emulated        NumPy arrays: the kernel source compiled by g++ and run
                        thread by thread (minifcn.backend.cuda.cpu_emulation), no GPU needed
    cpu-emulated-tiny   the same with a single block of 7 threads, so every
                        grid-stride loop goes round many times
    cuda                CuPy arrays on a real GPU (marked `cuda`; skipped without one)

Then the kernel files themselves: they compile to PTX with nvcc and with
NVRTC (what CuPy runs), each kernel in them is named in the loader's table,
and each has a test here.
"""

import re
import subprocess
import sys

import numpy as np
import pytest

import kernel_harness
from minifcn.backend import cuda, to_device, to_numpy
from minifcn.backend.cuda import cpu_emulation, loader, primitives
from minifcn.backend.reference import conv, elementwise, loss, pooling, resample, shape

DTYPES = [np.float32, np.float64]
TOLERANCE = {np.float32: dict(atol=2e-5, rtol=2e-5), np.float64: dict(atol=1e-12, rtol=1e-11)}

DEVICES = [
    "cpu-emulated",
    "cpu-emulated-tiny",
    pytest.param("cuda", marks=pytest.mark.cuda),
]

# Which kernels each test exercises; test_every_kernel_has_a_test checks the list is complete.
TESTED_KERNELS = set()


def covers(*kernel_names):
    """Record that the decorated test runs these kernels."""
    def record(test):
        TESTED_KERNELS.update(kernel_names)
        return test
    return record


@pytest.fixture
def device(request, monkeypatch):
    """Where the kernel runs; returns a function that moves a NumPy array there."""
    name = request.param
    if name.startswith("cpu-emulated"):
        if cpu_emulation.compiler() is None:
            pytest.skip("emulating the kernels on the CPU needs g++ (or $CXX)")
        if name == "cpu-emulated-tiny":
            monkeypatch.setattr(primitives, "BLOCK_SIZE", 7)
            monkeypatch.setattr(primitives, "MAX_BLOCKS", 1)
        return lambda a: a
    return lambda a: to_device(a, "cuda")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES, indirect=True)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def assert_close(actual, expected, what, atol=0.0, rtol=0.0):
    """Kernel output equals the NumPy reference within atol + rtol*|expected|.

    Shapes and dtypes must agree; NaN must meet NaN, inf the same inf.
    On failure, the first mismatching indices and both values are printed.
    """
    actual, expected = to_numpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, NumPy {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, NumPy {expected.dtype}"
    if actual.dtype.kind == "f":
        close = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
        with np.errstate(invalid="ignore"):
            close |= np.abs(actual - expected) <= atol + rtol * np.abs(expected)
    else:
        close = actual == expected
    if not close.all():
        bad = np.argwhere(~close)
        lines = [f"{what}: {len(bad)} of {actual.size} elements differ "
                 f"(atol={atol}, rtol={rtol}); the first ones:"]
        for index in bad[:8]:
            index = tuple(int(i) for i in index)
            lines.append(f"  at {index}: kernel {actual[index]!r}, NumPy {expected[index]!r}")
        pytest.fail("\n".join(lines))


def _normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ---- conv.cu -------------------------------------------------------------------------

# (N, C, H, W, kernel, stride, padding, dilation), named by what is awkward about them
CONV_CASES = [
    pytest.param(2, 3, 7, 6, 3, 1, 1, 1, id="3x3-pad1-odd-sizes"),
    pytest.param(1, 2, 8, 7, 2, 3, 0, 1, id="stride-gt-kernel"),
    pytest.param(2, 2, 9, 8, (3, 2), (2, 1), (2, 1), (2, 3), id="pairs-with-dilation"),
    pytest.param(1, 2, 3, 4, 1, 1, 2, 1, id="padding-gt-kernel"),
    pytest.param(3, 4, 5, 3, 1, 1, 0, 1, id="1x1"),
    pytest.param(1, 1, 3, 3, 3, 1, 0, 1, id="kernel-equals-input"),
    pytest.param(2, 3, 10, 9, 4, 2, 1, 1, id="4x4-stride2-overlapping"),
    pytest.param(1, 2, 32, 40, 16, 8, 4, 1, id="fcn-upscore8-16x16-stride8"),
]


def _geometry(kernel, stride, padding, dilation):
    return tuple(v if isinstance(v, tuple) else (v, v) for v in (kernel, stride, padding, dilation))


@covers("im2col")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, H, W, kernel, stride, padding, dilation", CONV_CASES)
def test_im2col(device, dtype, rng, N, C, H, W, kernel, stride, padding, dilation):
    x = _normal(rng, (N, C, H, W), dtype)
    geometry = _geometry(kernel, stride, padding, dilation)
    assert_close(cuda.im2col(device(x), *geometry), conv.im2col(x, *geometry), "im2col")


@covers("col2im")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, H, W, kernel, stride, padding, dilation", CONV_CASES)
def test_col2im(device, dtype, rng, N, C, H, W, kernel, stride, padding, dilation):
    geometry = _geometry(kernel, stride, padding, dilation)
    (kH, kW) = geometry[0]
    OH = conv.conv_output_size(H, kH, geometry[1][0], geometry[2][0], geometry[3][0])
    OW = conv.conv_output_size(W, kW, geometry[1][1], geometry[2][1], geometry[3][1])
    cols = _normal(rng, (C * kH * kW, N * OH * OW), dtype)  # any cols, not only im2col's
    x_shape = (N, C, H, W)
    assert_close(cuda.col2im(device(cols), x_shape, *geometry),
                 conv.col2im(cols, x_shape, *geometry), "col2im", **TOLERANCE[dtype])


# ---- pooling.cu ----------------------------------------------------------------------

def _pool_input(rng, shape, values, dtype):
    x = rng.standard_normal(shape)
    if values == "ties":  # few distinct values: the first maximum must win
        x = rng.integers(0, 3, shape).astype(float)
    elif values == "nan":
        x[rng.random(shape) < 0.1] = np.nan
    elif values == "minus-inf":  # whole windows of -inf, next to the -inf padding
        x[rng.random(shape) < 0.7] = -np.inf
    return x.astype(dtype)


# (N, C, H, W, kernel, stride, padding, ceil_mode, values)
POOL_CASES = [
    pytest.param(2, 3, 8, 8, 2, 2, 0, False, "normal", id="vgg-2x2"),
    pytest.param(1, 2, 7, 9, 3, 2, 1, False, "normal", id="3x3-stride2-pad1"),
    pytest.param(2, 2, 7, 6, 2, 2, 0, True, "normal", id="ceil-partial-windows"),
    pytest.param(1, 2, 5, 5, 2, 2, 1, True, "normal", id="ceil-drops-window-in-padding"),
    pytest.param(1, 2, 6, 5, 3, 1, 1, False, "ties", id="overlapping-ties"),
    pytest.param(2, 1, 5, 7, (3, 2), (1, 2), (1, 1), True, "normal", id="pairs-ceil"),
    pytest.param(1, 2, 9, 8, 3, 2, 1, True, "nan", id="nan-propagates"),
    pytest.param(1, 2, 6, 7, 3, 2, 1, True, "minus-inf", id="minus-inf-windows"),
    pytest.param(1, 1, 3, 3, 3, 3, 0, False, "normal", id="one-window"),
]


@covers("max_pool2d_forward")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, H, W, kernel, stride, padding, ceil_mode, values", POOL_CASES)
def test_max_pool2d_forward(device, dtype, rng, N, C, H, W, kernel, stride, padding, ceil_mode,
                            values):
    x = _pool_input(rng, (N, C, H, W), values, dtype)
    out, argmax = cuda.max_pool2d_forward(device(x), kernel, stride, padding, ceil_mode)
    expected_out, expected_argmax = pooling.max_pool2d_forward(x, kernel, stride, padding,
                                                               ceil_mode)
    assert_close(out, expected_out, "max_pool2d_forward out")
    if values == "nan":
        # A window holding a NaN points at its last NaN (PyTorch's rule), found pixel by pixel.
        last_nan = _last_nan_of_each_window(x, kernel, stride, padding, expected_out.shape)
        has_nan = last_nan >= 0
        assert has_nan.any() and (~has_nan).any()
        np.testing.assert_array_equal(np.isnan(expected_out), has_nan)
        expected_argmax = np.where(has_nan, last_nan, expected_argmax)
    assert_close(argmax, expected_argmax, "max_pool2d_forward argmax")


def _last_nan_of_each_window(x, kernel, stride, padding, out_shape):
    """(N, C, OH, OW): the flat index iy*W + ix of the last NaN in each window, in row-major
    window order; -1 where the window holds none."""
    (kH, kW), (sH, sW), (pH, pW) = (v if isinstance(v, tuple) else (v, v) for v in (kernel, stride, padding))
    H, W = x.shape[2:]
    last = np.full(out_shape, -1, dtype=np.int64)
    for n, c, oy, ox in np.ndindex(*out_shape):
        for i in range(kH):
            for j in range(kW):
                y, x_ = oy * sH - pH + i, ox * sW - pW + j
                if 0 <= y < H and 0 <= x_ < W and np.isnan(x[n, c, y, x_]):
                    last[n, c, oy, ox] = y * W + x_
    return last


@covers("max_pool2d_backward")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, H, W, kernel, stride, padding, ceil_mode, values", POOL_CASES)
def test_max_pool2d_backward(device, dtype, rng, N, C, H, W, kernel, stride, padding, ceil_mode,
                             values):
    x = _pool_input(rng, (N, C, H, W), "normal" if values == "nan" else values, dtype)
    out, argmax = pooling.max_pool2d_forward(x, kernel, stride, padding, ceil_mode)
    grad_out = _normal(rng, out.shape, dtype)
    assert_close(cuda.max_pool2d_backward(device(grad_out), device(argmax), x.shape),
                 pooling.max_pool2d_backward(grad_out, argmax, x.shape),
                 "max_pool2d_backward", **TOLERANCE[dtype])


# ---- resample.cu ---------------------------------------------------------------------

# (N, C, H, W, OH, OW, mode, align_corners, scales): scales are the factors a caller gave
RESAMPLE_CASES = [
    pytest.param(1, 2, 9, 10, 9, 10, "bilinear", False, (1.05, 1.05), id="bilinear-same-size-with-scale"),
    pytest.param(2, 3, 5, 7, 11, 16, "bilinear", False, None, id="bilinear-up"),
    pytest.param(2, 3, 5, 7, 11, 16, "bilinear", True, None, id="bilinear-up-corners"),
    pytest.param(1, 2, 9, 8, 4, 3, "bilinear", False, None, id="bilinear-down"),
    pytest.param(1, 2, 9, 8, 4, 3, "bilinear", True, None, id="bilinear-down-corners"),
    pytest.param(1, 2, 4, 5, 1, 1, "bilinear", True, None, id="bilinear-to-1x1-corners"),
    pytest.param(1, 2, 4, 5, 1, 1, "bilinear", False, None, id="bilinear-to-1x1"),
    pytest.param(1, 1, 1, 1, 3, 4, "bilinear", False, None, id="bilinear-from-1x1"),
    pytest.param(2, 2, 5, 6, 8, 3, "bilinear", False, (1.7, 0.6), id="bilinear-scale-factor"),
    pytest.param(1, 3, 4, 4, 32, 32, "bilinear", False, None, id="bilinear-fcn-8x"),
    pytest.param(1, 2, 5, 7, 10, 14, "nearest", False, None, id="nearest-2x"),
    pytest.param(1, 2, 5, 7, 5, 7, "nearest", False, None, id="nearest-same-size"),
    pytest.param(2, 2, 3, 7, 7, 3, "nearest", False, None, id="nearest-odd-ratios"),
    pytest.param(1, 2, 14, 10, 20, 7, "nearest", False, None, id="nearest-ratio-0.7"),
    pytest.param(1, 2, 5, 6, 5, 9, "nearest", False, (1.1, 1.6), id="nearest-scale-factor"),
]


@covers("bilinear_forward", "nearest_forward")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, H, W, OH, OW, mode, align_corners, scales", RESAMPLE_CASES)
def test_interpolate_forward(device, dtype, rng, N, C, H, W, OH, OW, mode, align_corners, scales):
    x = _normal(rng, (N, C, H, W), dtype)
    size = (OH, OW)
    assert_close(cuda.interpolate_forward(device(x), size, mode, align_corners, scales),
                 resample.interpolate_forward(x, size, mode, align_corners, scales),
                 f"interpolate_forward ({mode})", **TOLERANCE[dtype])


@covers("bilinear_backward", "nearest_backward")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, H, W, OH, OW, mode, align_corners, scales", RESAMPLE_CASES)
def test_interpolate_backward(device, dtype, rng, N, C, H, W, OH, OW, mode, align_corners, scales):
    grad_y = _normal(rng, (N, C, OH, OW), dtype)
    in_size = (H, W)
    assert_close(cuda.interpolate_backward(device(grad_y), in_size, mode, align_corners, scales),
                 resample.interpolate_backward(grad_y, in_size, mode, align_corners, scales),
                 f"interpolate_backward ({mode})", **TOLERANCE[dtype])


# ---- loss.cu -------------------------------------------------------------------------

def _labels(rng, N, K, H, W, labels, ignore_index):
    target = rng.integers(0, K, (N, H, W))
    if labels == "some-ignored":
        target[rng.random((N, H, W)) < 0.3] = ignore_index
    elif labels == "class-absent":  # only even classes appear
        target = 2 * rng.integers(0, (K + 1) // 2, (N, H, W))
    elif labels == "all-ignored":
        target[:] = ignore_index
    elif labels == "out-of-range":  # the op rejects these; the kernel must still give NaN
        target.reshape(-1)[::4], target.reshape(-1)[1::5] = K, -2
    return target.astype(np.int64)


def _logits(rng, shape, logits, dtype):
    x = rng.standard_normal(shape)
    if logits == "huge":  # exp would overflow without the max shifted out
        x *= 300.0
    elif logits == "non-finite":  # NaN, +inf and -inf at some pixels, ignored ones included
        flat = x.reshape(-1)
        flat[::7], flat[3::11], flat[5::13] = np.nan, np.inf, -np.inf
    return x.astype(dtype)


# (N, K, H, W, labels, ignore_index, logits)
LOSS_CASES = [
    pytest.param(2, 5, 3, 4, "some-ignored", 255, "normal", id="some-ignored"),
    pytest.param(1, 3, 4, 5, "class-absent", 255, "normal", id="class-absent"),
    pytest.param(2, 4, 3, 3, "all-ignored", 255, "normal", id="all-ignored"),
    pytest.param(1, 21, 5, 3, "some-ignored", -1, "normal", id="voc-21-classes-ignore-minus-1"),
    pytest.param(2, 3, 2, 3, "some-ignored", 255, "huge", id="huge-logits-no-overflow"),
    pytest.param(2, 4, 5, 3, "some-ignored", 255, "non-finite", id="non-finite-logits"),
    pytest.param(1, 1, 2, 3, "none-ignored", 255, "normal", id="one-class"),
    pytest.param(2, 3, 4, 3, "out-of-range", 255, "normal", id="labels-out-of-range"),
]


@covers("softmax_cross_entropy_forward")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, H, W, labels, ignore_index, logits", LOSS_CASES)
def test_softmax_cross_entropy_forward(device, dtype, rng, N, K, H, W, labels, ignore_index,
                                       logits):
    logits = _logits(rng, (N, K, H, W), logits, dtype)
    target = _labels(rng, N, K, H, W, labels, ignore_index)
    pixel_loss, logsumexp = cuda.softmax_cross_entropy_forward(device(logits), device(target),
                                                               ignore_index)
    with np.errstate(invalid="ignore"):  # inf - inf in the non-finite case, as intended
        expected_loss, expected_lse = loss.softmax_cross_entropy_forward(logits, target,
                                                                         ignore_index)
    assert_close(pixel_loss, expected_loss, "pixel_loss", **TOLERANCE[dtype])
    assert_close(logsumexp, expected_lse, "logsumexp", **TOLERANCE[dtype])


@covers("softmax_cross_entropy_backward")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, H, W, labels, ignore_index, logits", LOSS_CASES)
def test_softmax_cross_entropy_backward(device, dtype, rng, N, K, H, W, labels, ignore_index,
                                        logits):
    logits = _logits(rng, (N, K, H, W), logits, dtype)
    target = _labels(rng, N, K, H, W, labels, ignore_index)
    scale = 0.37
    with np.errstate(invalid="ignore"):  # inf - inf in the non-finite case, as intended
        _, logsumexp = loss.softmax_cross_entropy_forward(logits, target, ignore_index)
        expected = loss.softmax_cross_entropy_backward(logits, target, logsumexp, ignore_index,
                                                       scale)
    assert_close(cuda.softmax_cross_entropy_backward(device(logits), device(target),
                                                     device(logsumexp), ignore_index, scale),
                 expected, "grad_logits", **TOLERANCE[dtype])


# ---- crop.cu -------------------------------------------------------------------------

# (N, C, H, W, offset_h, offset_w, height, width)
CROP_CASES = [
    pytest.param(2, 3, 7, 9, 1, 2, 4, 5, id="inner-window"),
    pytest.param(1, 2, 5, 6, 0, 0, 5, 6, id="whole-input"),
    pytest.param(1, 1, 6, 5, 5, 4, 1, 1, id="last-pixel"),
    pytest.param(2, 2, 40, 38, 19, 19, 8, 6, id="fcn-offset-19"),
]


@covers("crop_forward")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, H, W, offset_h, offset_w, height, width", CROP_CASES)
def test_crop_forward(device, dtype, rng, N, C, H, W, offset_h, offset_w, height, width):
    x = _normal(rng, (N, C, H, W), dtype)
    assert_close(cuda.crop_forward(device(x), offset_h, offset_w, height, width),
                 shape.crop_forward(x, offset_h, offset_w, height, width), "crop_forward")


@covers("crop_backward")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, H, W, offset_h, offset_w, height, width", CROP_CASES)
def test_crop_backward(device, dtype, rng, N, C, H, W, offset_h, offset_w, height, width):
    grad_y = _normal(rng, (N, C, height, width), dtype)
    assert_close(cuda.crop_backward(device(grad_y), (N, C, H, W), offset_h, offset_w),
                 shape.crop_backward(grad_y, (N, C, H, W), offset_h, offset_w), "crop_backward")


# ---- elementwise.cu ------------------------------------------------------------------

ELEMENTWISE_SHAPES = [pytest.param((2, 3, 5, 7), id="odd-4d"), pytest.param((1,), id="one-element"),
                      pytest.param((3000,), id="many-blocks")]


@covers("relu_backward")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
def test_relu_backward(device, dtype, rng, shape):
    y = np.maximum(rng.standard_normal(shape), 0).astype(dtype)  # zeros where ReLU cut
    grad_y = _normal(rng, shape, dtype)
    grad_y.flat[::5] = np.nan  # non-finite gradients must spread as they do in NumPy
    grad_y.flat[1::7] = np.inf
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as intended
        expected = elementwise.relu_backward(grad_y, y)
    assert_close(cuda.relu_backward(device(grad_y), device(y)), expected, "relu_backward")


@covers("dropout_apply")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", [bool, np.uint8])
@pytest.mark.parametrize("p", [0.3, 1.0])
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
def test_dropout_apply(device, dtype, rng, mask_dtype, p, shape):
    x = _normal(rng, shape, dtype)
    keep_mask = (rng.random(shape) >= p).astype(mask_dtype)
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    assert_close(cuda.dropout_apply(device(x), device(keep_mask), scale),
                 elementwise.dropout_apply(x, keep_mask, scale), "dropout_apply", **TOLERANCE[dtype])


@covers("sgd_update")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 5e-4), (0.0, 0.0), (0.99, 0.0)])
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
def test_sgd_update_(device, dtype, rng, momentum, weight_decay, shape):
    param, velocity = _normal(rng, shape, dtype), _normal(rng, shape, dtype)
    on_device = [device(param.copy()), device(velocity.copy())]
    for _ in range(3):  # a few steps, so the velocity carries over
        grad = _normal(rng, shape, dtype)
        assert cuda.sgd_update_(on_device[0], device(grad), on_device[1], 0.01, momentum,
                                weight_decay) is None
        elementwise.sgd_update_(param, grad, velocity, 0.01, momentum, weight_decay)
    assert_close(on_device[0], param, "param", **TOLERANCE[dtype])
    assert_close(on_device[1], velocity, "velocity", **TOLERANCE[dtype])


@covers("adam_update")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES)
def test_adam_update_(device, dtype, rng, weight_decay, shape):
    param = _normal(rng, shape, dtype)
    m, v = np.zeros(shape, dtype), np.zeros(shape, dtype)
    on_device = [device(a.copy()) for a in (param, m, v)]
    for step in range(1, 4):  # the bias corrections change with the step
        grad = _normal(rng, shape, dtype)
        args = (1e-3, 0.9, 0.999, 1e-8, weight_decay, step)
        assert cuda.adam_update_(*on_device[:1], device(grad), *on_device[1:], *args) is None
        elementwise.adam_update_(param, grad, m, v, *args)
    for name, actual, expected in zip(("param", "m", "v"), on_device, (param, m, v)):
        assert_close(actual, expected, name, **TOLERANCE[dtype])


# ---- wrapper argument checks ---------------------------------------------------------

def test_wrappers_reject_bad_arguments(device, rng):
    x = _normal(rng, (1, 2, 4, 4), np.float64)
    with pytest.raises(TypeError, match="float32 or float64"):
        cuda.im2col(device(x.astype(np.int32)), 3, 1, 1, 1)
    with pytest.raises(ValueError, match="at most half the kernel"):
        cuda.max_pool2d_forward(device(x), 2, 2, 2, False)
    with pytest.raises(ValueError, match="mode"):
        cuda.interpolate_forward(device(x), (3, 3), "bicubic", False)
    with pytest.raises(ValueError, match="does not fit"):
        cuda.crop_forward(device(x), 1, 1, 4, 2)
    with pytest.raises(TypeError, match="must match"):
        cuda.relu_backward(device(x), device(x.astype(np.float32)))
    with pytest.raises(TypeError, match="integer"):
        cuda.softmax_cross_entropy_forward(device(x), device(np.zeros((1, 4, 4))), 255)
    param = device(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="in place"):
        cuda.sgd_update_(param.T, param, param, 0.1, 0.0, 0.0)


def test_emulator_checks_every_argument_against_the_kernel_signature():
    if cpu_emulation.compiler() is None:
        pytest.skip("emulating the kernels on the CPU needs g++ (or $CXX)")
    relu = cpu_emulation.cpu_module("elementwise").get_function("relu_backward<float>")
    assert relu.parameters == [(True, "f", 4), (True, "f", 4), (True, "f", 4), (False, "i", 8)]
    a = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="kind 'f' of 4 bytes"):
        relu(1, 4, (a, a.astype(np.float64), a, np.int64(4)))  # float64 array for float*
    with pytest.raises(TypeError, match="NumPy scalar"):
        relu(1, 4, (a, a, a, 4))  # a Python int has no C type
    with pytest.raises(TypeError, match="kind 'i' of 8 bytes"):
        relu(1, 4, (a, a, a, np.int32(4)))  # int32 where the kernel takes long long
    with pytest.raises(TypeError, match="takes 4 arguments"):
        relu(1, 4, (a, a, a))


# ---- the kernel files ----------------------------------------------------------------

KERNEL_FILES = sorted(loader.KERNELS)


def _kernels_in_source(family):
    """Names of the __global__ kernels defined in kernels/<family>.cu."""
    return re.findall(r"__global__\s+void\s+(\w+)\s*\(", loader.kernel_source(family))


def test_kernel_table_matches_the_sources():
    """loader.KERNELS names every .cu file and, in order, every kernel in it."""
    on_disk = sorted(p.stem for p in loader.kernels_dir().glob("*.cu"))
    assert on_disk == KERNEL_FILES
    for family in KERNEL_FILES:
        assert tuple(_kernels_in_source(family)) == loader.KERNELS[family], family
        source = loader.kernel_source(family)
        assert '#ifndef __CUDACC__\n#include "cuda_cpu_shim.h"\n#endif' in source, \
            f"{family}.cu must include the CPU shim only outside CUDA compilers"
        assert re.search(r"^#include <", source, re.M) is None, \
            f"{family}.cu includes a system header, which NVRTC (CuPy) cannot find"


def test_every_kernel_has_a_test():
    every_kernel = {name for family in KERNEL_FILES for name in _kernels_in_source(family)}
    assert every_kernel - TESTED_KERNELS == set(), "kernels without a test"
    assert TESTED_KERNELS - every_kernel == set(), "tests of kernels that do not exist"


@pytest.fixture(scope="module")
def nvcc_ptx(tmp_path_factory):
    """Every .cu file compiled to PTX by nvcc, in parallel: {family: (exit code, output, ptx)}."""
    if kernel_harness.nvcc() is None:
        pytest.skip("nvcc not found on PATH")
    work_dir = tmp_path_factory.mktemp("ptx")
    started = {family: kernel_harness.start_nvcc_ptx(family, work_dir) for family in KERNEL_FILES}
    results = {}
    for family, (process, ptx) in started.items():
        output, _ = process.communicate()
        results[family] = (process.returncode, output, ptx.read_text() if ptx.exists() else "")
    return results


@pytest.mark.parametrize("family", KERNEL_FILES)
def test_compiles_to_ptx_with_nvcc(nvcc_ptx, family):
    returncode, output, ptx = nvcc_ptx[family]
    assert returncode == 0, f"nvcc failed on {family}.cu:\n{output}"
    assert ptx.count(".entry") == len(loader.kernel_expressions(family))


@pytest.mark.parametrize("family", KERNEL_FILES)
def test_compiles_with_nvrtc_as_cupy_does(family):
    if kernel_harness.nvrtc() is None:
        pytest.skip("NVRTC not found (CUDA toolkit lib64, or pip install nvidia-cuda-nvrtc)")
    ok, log, lowered = kernel_harness.nvrtc_compile(family)
    assert ok, f"NVRTC failed on {family}.cu:\n{log}"
    assert sorted(lowered) == sorted(loader.kernel_expressions(family))


def test_importing_minifcn_cuda_does_not_import_cupy():
    code = "import sys, minifcn.backend.cuda; assert 'cupy' not in sys.modules, 'cupy was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_dir_can_be_overridden(monkeypatch, tmp_path):
    (tmp_path / "conv.cu").write_text("// stand-in\n")
    monkeypatch.setenv(loader.KERNELS_DIR_ENV, str(tmp_path))
    loader.kernels_dir.cache_clear()
    try:
        assert loader.kernels_dir() == tmp_path
        monkeypatch.setenv(loader.KERNELS_DIR_ENV, str(tmp_path / "missing"))
        loader.kernels_dir.cache_clear()
        with pytest.raises(FileNotFoundError, match=loader.KERNELS_DIR_ENV):
            loader.kernels_dir()
    finally:
        monkeypatch.delenv(loader.KERNELS_DIR_ENV)
        loader.kernels_dir.cache_clear()
    assert (loader.kernels_dir() / "conv.cu").is_file()
