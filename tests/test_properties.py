"""Property-based tests: every op against its loop-level reference over random
shapes and hyper-parameters, and image/label alignment through every
augmentation, for sizes and seeds drawn by hypothesis.

The hand-picked cases in test_conv.py, test_pooling.py, ... name the awkward
corners; here hypothesis looks for the ones nobody thought of. Each drawn case
runs in float64 (tight tolerance) or float32 (looser), forward and backward.
The backward references are the adjoint identities the ops are built on:
conv2d's input gradient is a transposed convolution and vice versa, a weight
gradient is "input @ im2col(...).T", max pooling sends each gradient to its
argmax.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loop_reference as ref
from loop_reference_misc import (batch_norm_loop, interpolate_backward_loop, interpolate_loop,
                                 relu_loop, softmax_cross_entropy_loop)

import minifcn as mf
import minifcn.functional as F
from minifcn.data import transforms as T
from minifcn.data.loader import DataLoader
from minifcn.data.voc import voc_palette
from minifcn.backend.reference.conv import col2im, im2col
from minifcn.backend.reference.pooling import max_pool2d_forward
from minifcn.backend.reference.shape import crop_backward, crop_forward

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([np.float32, np.float64])
TOLERANCE = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def _close(actual, expected, dtype, what):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               err_msg=what, **TOLERANCE[dtype])


def _normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _grads(fn, arrays, grad_out_seed=7):
    """Run fn on Tensors made from ``arrays`` (None stays None), backward a random
    output weighting; returns (output array, grad_out, [grad per input])."""
    tensors = [None if a is None else mf.Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    grad_out = np.random.default_rng(grad_out_seed).standard_normal(out.shape).astype(out.dtype)
    out.backward(grad_out)
    return out.data, grad_out, [None if t is None else t.grad for t in tensors]


def _channels_first(a):
    """(N, C, H, W) -> (C, N*H*W), the layout of a row of im2col's columns."""
    return a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)


# ---- convolution -------------------------------------------------------------------

@st.composite
def conv_cases(draw):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # the smallest input whose padded size still holds one dilated kernel, and a little more
    size = [max(1, d[a] * (k[a] - 1) + 1 - 2 * p[a]) + draw(st.integers(0, 4)) for a in (0, 1)]
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3))) + tuple(size)
    return dict(shape=shape, c_out=draw(st.integers(1, 3)), kernel=k, stride=s, padding=p, dilation=d,
                bias=draw(st.booleans()), dtype=draw(DTYPES), seed=draw(st.integers(0, 2**16)))


@PROPERTY
@given(conv_cases())
def test_conv2d_matches_loop_reference_forward_and_backward(case):
    rng = np.random.default_rng(case["seed"])
    dtype, (N, C, H, W) = case["dtype"], case["shape"]
    k, s, p, d = case["kernel"], case["stride"], case["padding"], case["dilation"]
    x = _normal(rng, (N, C, H, W), dtype)
    weight = _normal(rng, (case["c_out"], C) + k, dtype)
    bias = _normal(rng, (case["c_out"],), dtype) if case["bias"] else None

    out, g, (gx, gw, gb) = _grads(lambda x, w, b: F.conv2d(x, w, b, stride=s, padding=p, dilation=d),
                                  [x, weight, bias])
    assert out.dtype == dtype
    _close(out, ref.conv2d(x, weight, bias, s, p, d), dtype, "conv2d forward")

    # d/dx: the transposed convolution of g with the same weights; output_padding
    # picks the input size among the s that map onto the same output size
    output_padding = tuple(size + 2 * p_ - d_ * (k_ - 1) - 1 - (o - 1) * s_ for size, o, k_, s_, p_, d_
                           in zip((H, W), out.shape[2:], k, s, p, d))
    _close(gx, ref.conv_transpose2d(g, weight, None, s, p, output_padding, d), dtype, "conv2d grad x")
    cols = ref.im2col(x, k, s, p, d)
    _close(gw, (_channels_first(g) @ cols.T).reshape(weight.shape), dtype, "conv2d grad weight")
    if bias is not None:
        _close(gb, g.sum(axis=(0, 2, 3)), dtype, "conv2d grad bias")


@st.composite
def conv_transpose_cases(draw):
    case = draw(conv_cases())
    s, d = case["stride"], case["dilation"]
    # output_padding must be below stride or dilation (PyTorch's rule)
    case["output_padding"] = tuple(draw(st.integers(0, max(s_, d_) - 1)) for s_, d_ in zip(s, d))
    case["shape"] = case["shape"][:2] + (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return case


@PROPERTY
@given(conv_transpose_cases())
def test_conv_transpose2d_matches_loop_reference_forward_and_backward(case):
    rng = np.random.default_rng(case["seed"])
    dtype, (N, C, H, W) = case["dtype"], case["shape"]
    k, s, p, d, op = case["kernel"], case["stride"], case["padding"], case["dilation"], case["output_padding"]
    OH, OW = ((n - 1) * s_ - 2 * p_ + d_ * (k_ - 1) + o_ + 1 for n, k_, s_, p_, d_, o_ in zip((H, W), k, s, p, d, op))
    if min(OH, OW) < 1:  # padding larger than the transposed output: an error, tested elsewhere
        with pytest.raises(ValueError, match="not positive"):
            F.conv_transpose2d(np.zeros((N, C, H, W), dtype), np.zeros((C, 1) + k, dtype), stride=s, padding=p,
                               output_padding=op, dilation=d)
        return
    x = _normal(rng, (N, C, H, W), dtype)
    weight = _normal(rng, (C, case["c_out"]) + k, dtype)
    bias = _normal(rng, (case["c_out"],), dtype) if case["bias"] else None

    out, g, (gx, gw, gb) = _grads(lambda x, w, b: F.conv_transpose2d(
        x, w, b, stride=s, padding=p, output_padding=op, dilation=d), [x, weight, bias])
    assert out.shape == (N, case["c_out"], OH, OW) and out.dtype == dtype
    _close(out, ref.conv_transpose2d(x, weight, bias, s, p, op, d), dtype, "conv_transpose2d forward")

    # d/dx: a convolution of g with the same weights (cut to x's size: an output_padding
    # >= stride gives g more windows than x has pixels)
    _close(gx, ref.conv2d(g, weight, None, s, p, d)[:, :, :H, :W], dtype, "conv_transpose2d grad x")
    cols = ref.im2col(g, k, s, p, d)                     # (C_out*kH*kW, N*OH'*OW')
    covered = ((OH + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1, (OW + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)
    x_full = np.zeros((N, C) + covered, dtype)
    x_full[:, :, :H, :W] = x
    _close(gw, (_channels_first(x_full) @ cols.T).reshape(weight.shape), dtype, "conv_transpose2d grad weight")
    if bias is not None:
        _close(gb, g.sum(axis=(0, 2, 3)), dtype, "conv_transpose2d grad bias")


@PROPERTY
@given(conv_cases())
def test_im2col_matches_loop_and_col2im_is_its_adjoint(case):
    rng = np.random.default_rng(case["seed"])
    dtype, geometry = case["dtype"], (case["kernel"], case["stride"], case["padding"], case["dilation"])
    x = _normal(rng, case["shape"], dtype)
    cols = im2col(x, *geometry)
    np.testing.assert_array_equal(cols, ref.im2col(x, *geometry))  # a copy: bit-exact
    c = _normal(rng, cols.shape, dtype)
    # <im2col(x), c> == <x, col2im(c)>
    _close(np.vdot(cols, c), np.vdot(x, col2im(c, x.shape, *geometry)), dtype, "adjoint")


# ---- pooling ------------------------------------------------------------------------

@st.composite
def pool_cases(draw):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = tuple(draw(st.integers(0, k_ // 2)) for k_ in k)
    size = [max(1, k_ - 2 * p_) + draw(st.integers(0, 5)) for k_, p_ in zip(k, p)]
    return dict(shape=(draw(st.integers(1, 2)), draw(st.integers(1, 2)), *size), kernel=k, stride=s, padding=p,
                ceil_mode=draw(st.booleans()), dtype=draw(DTYPES), ties=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@PROPERTY
@given(pool_cases())
def test_max_pool2d_matches_loop_reference_values_argmax_and_gradient(case):
    rng = np.random.default_rng(case["seed"])
    dtype, k, s, p, ceil = case["dtype"], case["kernel"], case["stride"], case["padding"], case["ceil_mode"]
    # with ties, many equal values: the first maximum in row-major window order must win
    x = (rng.integers(0, 3, case["shape"]) if case["ties"] else rng.standard_normal(case["shape"])).astype(dtype)
    expected, expected_argmax = ref.max_pool2d(x, k, s, p, ceil)
    out, argmax = max_pool2d_forward(x, k, s, p, ceil)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(argmax, expected_argmax)

    y, g, (gx,) = _grads(lambda x: F.max_pool2d(x, k, stride=s, padding=p, ceil_mode=ceil), [x])
    np.testing.assert_array_equal(y, expected)
    N, C, H, W = x.shape
    grad = np.zeros((N, C, H * W), dtype)
    for n in range(N):
        for c in range(C):
            np.add.at(grad[n, c], expected_argmax[n, c].ravel(), g[n, c].ravel())
    _close(gx, grad.reshape(x.shape), dtype, "max_pool2d grad")


# ---- element-wise, resampling, normalisation, loss, crop ------------------------------

small_shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))


@PROPERTY
@given(small_shapes, DTYPES, st.integers(0, 2**16))
def test_relu_matches_loop_reference(shape, dtype, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    x.flat[0] = 0.0  # the kink: gradient 0 there, as in PyTorch
    y, g, (gx,) = _grads(F.relu, [x])
    np.testing.assert_array_equal(y, relu_loop(x))
    np.testing.assert_array_equal(gx, g * (x > 0))


@st.composite
def interpolate_cases(draw):
    mode = draw(st.sampled_from(["bilinear", "nearest"]))
    align = mode == "bilinear" and draw(st.booleans())
    in_size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    if draw(st.booleans()):
        size, scale = (draw(st.integers(1, 9)), draw(st.integers(1, 9))), None
    else:
        scale = draw(st.sampled_from([0.5, 0.75, 1.5, 2.0, 2.5, 3.0]))
        if min(int(n * scale) for n in in_size) < 1:
            scale = 2.0
        size = None
    return dict(shape=(draw(st.integers(1, 2)), draw(st.integers(1, 2))) + in_size, size=size, scale=scale,
                mode=mode, align_corners=align, dtype=draw(DTYPES), seed=draw(st.integers(0, 2**16)))


@PROPERTY
@given(interpolate_cases())
def test_interpolate_matches_loop_reference_forward_and_backward(case):
    rng = np.random.default_rng(case["seed"])
    dtype, mode, align = case["dtype"], case["mode"], case["align_corners"]
    x = _normal(rng, case["shape"], dtype)
    y, g, (gx,) = _grads(lambda x: F.interpolate(x, size=case["size"], scale_factor=case["scale"], mode=mode,
                                                 align_corners=align), [x])
    assert y.dtype == dtype
    scales = None if case["scale"] is None or align else (case["scale"], case["scale"])
    out_size = y.shape[2:]
    if case["size"] is not None:
        assert out_size == case["size"]
    else:
        assert out_size == tuple(int(np.floor(n * case["scale"])) for n in x.shape[2:])
    _close(y, interpolate_loop(x, out_size, mode, align, scales), dtype, "interpolate forward")
    _close(gx, interpolate_backward_loop(g, x.shape[2:], mode, align, scales), dtype, "interpolate backward")


@PROPERTY
@given(small_shapes, st.booleans(), st.booleans(), st.floats(0.0, 1.0), st.sampled_from([1e-5, 1e-3, 0.5]),
       DTYPES, st.integers(0, 2**16))
def test_batch_norm_matches_loop_reference(shape, training, affine, momentum, eps, dtype, seed):
    N, C, H, W = shape
    if training and N * H * W < 2:
        shape = (2, C, H, W)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    mean, var = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2.0, C).astype(dtype)
    weight = rng.standard_normal(C).astype(dtype) if affine else None
    bias = rng.standard_normal(C).astype(dtype) if affine else None
    running_mean, running_var = mean.copy(), var.copy()
    y = F.batch_norm(mf.Tensor(x), running_mean, running_var, None if weight is None else mf.Tensor(weight),
                     None if bias is None else mf.Tensor(bias), training=training, momentum=momentum, eps=eps)
    expected, expected_mean, expected_var = batch_norm_loop(x, mean, var, weight, bias, training, momentum, eps)
    loose = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(y.data, expected, **loose)
    np.testing.assert_allclose(running_mean, expected_mean, **loose)
    np.testing.assert_allclose(running_var, expected_var, **loose)


@PROPERTY
@given(st.tuples(st.integers(1, 2), st.integers(2, 5), st.integers(1, 4), st.integers(1, 4)),
       st.floats(0.0, 1.0), st.sampled_from(["mean", "sum"]), DTYPES, st.integers(0, 2**16))
def test_softmax_cross_entropy_matches_loop_reference(shape, ignored, reduction, dtype, seed):
    N, K, H, W = shape
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape) * 4).astype(dtype)
    target = rng.integers(0, K, (N, H, W))
    target[rng.random((N, H, W)) < ignored] = 255
    loss, _, (grad,) = _grads(lambda z: F.softmax_cross_entropy(z, target, reduction=reduction), [logits])
    expected_loss, expected_grad = softmax_cross_entropy_loop(logits, target, 255, reduction)
    assert loss.shape == () and loss.dtype == dtype
    _close(loss, expected_loss, dtype, "loss")
    # backward of loss with d loss = g (a random scalar): g times the reference gradient
    g = np.random.default_rng(7).standard_normal(()).astype(dtype)
    _close(grad, g * expected_grad, dtype, "loss gradient")


@PROPERTY
@given(small_shapes, st.data(), DTYPES)
def test_crop_matches_slicing_and_backward_places_the_window(shape, data, dtype):
    N, C, H, W = shape
    top, left = data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1))
    height, width = data.draw(st.integers(1, H - top)), data.draw(st.integers(1, W - left))
    x = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
    y = crop_forward(x, top, left, height, width)
    for n, c, i, j in np.ndindex(y.shape):
        assert y[n, c, i, j] == x[n, c, top + i, left + j]
    grad = crop_backward(y, x.shape, top, left)
    assert grad.sum() == y.sum() and (grad[:, :, top:top + height, left:left + width] == y).all()


# ---- the data pipeline: image and label stay aligned ---------------------------------

PALETTE = voc_palette()
FILL = np.rint(np.asarray(T.MEAN_RGB_255)).astype(np.uint8)  # what RandomCrop pads a uint8 image with


def _blocky_sample(rng, height, width, block):
    """A label of random classes in block x block squares and the image that paints
    each class in its VOC colour: every pixel's colour says which label it must have."""
    blocks = rng.integers(0, 21, (-(-height // block), -(-width // block)))
    label = np.kron(blocks, np.ones((block, block), np.int64))[:height, :width].astype(np.uint8)
    return PALETTE[label], label


def _colour_of(label):
    """The colour each pixel must have: its class colour, or the padding fill where ignored."""
    return np.where((label == 255)[..., None], FILL, PALETTE[np.minimum(label, 20)])


def _constant_neighbourhood(label, radius):
    """True where every label within ``radius`` pixels equals the centre (away from edges)."""
    H, W = label.shape
    ok = np.zeros(label.shape, bool)
    ok[radius:H - radius, radius:W - radius] = True
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = np.roll(label, (dy, dx), axis=(0, 1))
            ok &= shifted == label
    return ok


@st.composite
def pipelines(draw):
    crop = draw(st.integers(8, 48)), draw(st.integers(8, 48))
    low = draw(st.sampled_from([0.5, 0.75, 1.0, 1.25]))
    interpolation = draw(st.sampled_from(["nearest", "bilinear"]))
    steps = [T.RandomScale((low, low * draw(st.sampled_from([1.0, 1.5, 2.0]))), interpolation),
             T.RandomCrop(crop), T.RandomHorizontalFlip(draw(st.sampled_from([0.0, 0.5, 1.0])))]
    order = draw(st.permutations(range(3)))
    chosen = [steps[i] for i in order if draw(st.booleans())]
    return chosen, interpolation


@settings(max_examples=150, deadline=None)
@given(st.integers(16, 64), st.integers(16, 64), st.integers(3, 9), pipelines(),
       st.sampled_from(T.Normalize.MODES), st.integers(0, 2**32 - 1))
def test_every_augmentation_keeps_image_and_label_aligned(height, width, block, pipeline, mode, seed):
    steps, interpolation = pipeline
    image, label = _blocky_sample(np.random.default_rng(seed), height, width, block)
    normalize = T.Normalize(mode)
    x, out_label = T.Compose(steps + [normalize])(image, label, np.random.default_rng(seed))
    assert x.dtype == np.float32 and x.shape == (3,) + out_label.shape and out_label.dtype == np.uint8
    if steps and isinstance(steps[-1], T.RandomCrop):  # (a scale after the crop changes the size)
        assert out_label.shape == steps[-1].size
    out_image = normalize.denormalize(x)
    expected = _colour_of(out_label)
    if interpolation == "nearest" or not any(isinstance(s, T.RandomScale) for s in steps):
        # nearest neighbour for both: every pixel, exactly
        np.testing.assert_array_equal(out_image, expected)
    else:
        # bilinear images blur across class borders: check where the label is locally constant
        inside = _constant_neighbourhood(out_label, radius=2)
        diff = np.abs(out_image.astype(int) - expected.astype(int)).max(axis=-1)
        assert (diff[inside] <= 2).all(), f"misaligned at {np.argwhere(inside & (diff > 2))[:5]}"
    # a flipped, cropped or scaled label keeps only labels that were there, plus the padding
    assert set(np.unique(out_label)) <= set(np.unique(label)) | {255}


class _BlockyDataset:
    def __init__(self, size, seed):
        self.size, self.seed = size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        return _blocky_sample(rng, int(rng.integers(16, 40)), int(rng.integers(16, 40)), int(rng.integers(3, 8)))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(8, 32), st.integers(0, 2**16))
def test_loader_batches_keep_image_and_label_aligned(size, batch_size, crop, seed):
    normalize = T.Normalize("caffe")
    loader = DataLoader(_BlockyDataset(size, seed), batch_size=batch_size, seed=seed,
                        transform=T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(crop), normalize]))
    seen = 0
    for images, labels in loader:
        assert images.shape == (len(labels), 3, crop, crop) and labels.dtype == np.int64
        for x, label in zip(images, labels):
            np.testing.assert_array_equal(normalize.denormalize(x), _colour_of(label.astype(np.uint8)))
        seen += len(labels)
    assert seen == size
