"""conv2d and conv_transpose2d: against loop references on every backend, gradient checks,
the im2col/col2im adjoint pair, every way the fast CPU backend cuts the work, and every
argument error."""

import numpy as np
import pytest

import minifcn as mf
from minifcn.backend import to_device, to_numpy
from minifcn.arguments import pair
from minifcn.backend.cpu import conv as cpu_conv, conv_blocks, tuning
from minifcn.backend.reference import windows
from minifcn.backend.reference.conv import col2im, conv_output_size, im2col
from minifcn.functional.conv import conv2d, conv_transpose2d
import loop_reference as ref
from conftest import BACKENDS, DEVICES


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _tensors(*arrays):
    return [mf.Tensor(a, requires_grad=True) for a in arrays]


# (N, C_in, H, W, C_out, kernel, stride, padding, dilation), named by what is awkward about it
CONV_CASES = [
    pytest.param(1, 2, 5, 5, 3, 3, 1, 0, 1, id="3x3-valid"),
    pytest.param(2, 3, 7, 5, 2, 3, 1, 1, 1, id="odd-sizes-batch2"),
    pytest.param(2, 2, 7, 6, 3, 3, 2, 1, 1, id="stride2"),
    pytest.param(1, 2, 8, 7, 2, 2, 3, 0, 1, id="stride-gt-kernel"),
    pytest.param(1, 2, 4, 5, 2, 3, 1, 2, 1, id="padding-gt-half-kernel"),
    pytest.param(2, 1, 3, 3, 2, 2, 1, 3, 1, id="padding-gt-kernel"),
    pytest.param(1, 2, 7, 8, 2, 3, 1, 2, 2, id="dilation2"),
    pytest.param(2, 2, 7, 6, 2, (3, 2), (1, 2), (1, 0), (2, 1), id="pairs-everywhere"),
    pytest.param(1, 3, 4, 5, 2, (2, 3), 1, 0, 1, id="non-square-kernel"),
    pytest.param(1, 4, 3, 5, 3, 1, 1, 0, 1, id="1x1"),
    pytest.param(3, 4, 3, 2, 3, 1, 1, 0, 1, id="1x1-batch3"),
    pytest.param(2, 2, 5, 4, 3, 1, 2, 1, 1, id="1x1-stride2-padded"),
    pytest.param(2, 2, 3, 3, 2, 3, 1, 0, 1, id="kernel-equals-input"),
    # same size (stride 1, padding d*(k-1)/2): im2col reads x itself, without a padded copy
    pytest.param(2, 2, 9, 6, 3, (3, 5), 1, (1, 2), 1, id="same-size-3x5"),
    pytest.param(1, 2, 8, 3, 2, (5, 1), 1, (2, 0), 1, id="same-size-5x1"),
    pytest.param(2, 3, 5, 2, 2, 3, 1, 1, 1, id="same-size-narrower-than-kernel"),
    pytest.param(1, 2, 11, 9, 2, 3, 1, (2, 3), (2, 3), id="same-size-dilated"),
    # padding so wide that most outputs read only padding (FCN's conv1_1): computed apart
    pytest.param(1, 3, 4, 5, 2, 3, 1, 6, 1, id="fcn-pad-conv1_1"),
    pytest.param(1, 2, 7, 8, 2, 2, 3, 5, 1, id="wide-pad-stride3-rows-unread"),
    pytest.param(2, 2, 5, 4, 2, 3, 2, 7, 2, id="wide-pad-dilated-stride2"),
    pytest.param(1, 2, 6, 3, 2, (3, 1), 1, (1, 6), 1, id="wide-pad-one-axis"),
    pytest.param(1, 1, 1, 1, 2, 1, 2, 1, 1, id="no-output-reads-x"),
    # stride dividing kernel and padding, few output channels: gathered by tiles, no im2col
    pytest.param(2, 3, 9, 8, 2, 4, 2, 2, 1, id="tiles-k4-s2-p2"),
    pytest.param(1, 4, 10, 7, 1, (6, 3), 3, (3, 0), 1, id="tiles-k6x3-s3"),
]

# (N, C_in, H, W, C_out, kernel, stride, padding, output_padding, dilation)
TRANSPOSE_CASES = [
    pytest.param(1, 2, 3, 4, 3, 3, 1, 0, 0, 1, id="3x3"),
    pytest.param(2, 3, 3, 2, 2, 4, 2, 0, 0, 1, id="fcn-upscore2-batch2"),
    pytest.param(1, 2, 3, 3, 2, 4, 2, 1, 0, 1, id="stride2-padding1"),
    pytest.param(2, 2, 3, 4, 2, 3, 2, 1, 1, 1, id="output-padding"),
    pytest.param(1, 2, 3, 2, 2, 3, (3, 2), 0, (2, 1), 1, id="output-padding-pairs"),
    pytest.param(1, 2, 3, 3, 2, 3, 1, 1, 1, 2, id="output-padding-below-dilation"),
    pytest.param(1, 2, 4, 3, 2, 3, 1, 2, 0, 1, id="padding-crops-output"),
    pytest.param(1, 2, 3, 3, 2, 2, 3, 0, 0, 1, id="stride-gt-kernel"),
    pytest.param(2, 2, 3, 4, 2, 3, 2, 1, 0, 2, id="dilation2"),
    pytest.param(1, 3, 3, 4, 2, (2, 3), (2, 1), (0, 1), 0, 1, id="non-square-kernel"),
    pytest.param(3, 4, 2, 3, 3, 1, 1, 0, 0, 1, id="1x1-batch3"),
    pytest.param(1, 2, 5, 4, 3, 1, 1, 0, 0, 1, id="1x1"),
    # FCN's upsampling with more output than input channels: its input gradient is gathered by tiles
    pytest.param(2, 2, 3, 4, 3, 4, 2, 0, 0, 1, id="upsampling-tiles"),
    pytest.param(1, 2, 3, 3, 3, 4, 2, 2, 0, 1, id="upsampling-tiles-padding2"),
    pytest.param(1, 1, 3, 2, 3, (4, 6), (2, 3), 0, 1, 1, id="upsampling-tiles-output-padding"),
]


def _conv_arrays(rng, N, C, H, W, C_out, kernel, transpose=False):
    kH, kW = _pair(kernel)
    x = rng.standard_normal((N, C, H, W))
    weight = rng.standard_normal((C, C_out, kH, kW) if transpose else (C_out, C, kH, kW))
    return x, weight, rng.standard_normal(C_out)


# ---- im2col / col2im -----------------------------------------------------------

def test_conv_output_size():
    assert conv_output_size(5, 3, 1, 0, 1) == 3
    assert conv_output_size(7, 3, 2, 1, 1) == 4
    assert conv_output_size(7, 3, 1, 2, 2) == 7
    assert conv_output_size(8, 2, 3, 0, 1) == 3


@pytest.mark.parametrize("N, C, H, W, C_out, kernel, stride, padding, dilation", CONV_CASES)
def test_im2col_matches_loop_reference(N, C, H, W, C_out, kernel, stride, padding, dilation):
    x = np.random.default_rng(0).standard_normal((N, C, H, W))
    geometry = [_pair(v) for v in (kernel, stride, padding, dilation)]
    cols = im2col(x, *geometry)
    np.testing.assert_array_equal(cols, ref.im2col(x, kernel, stride, padding, dilation))


@pytest.mark.parametrize("N, C, H, W, C_out, kernel, stride, padding, dilation", CONV_CASES)
def test_col2im_is_adjoint_of_im2col(N, C, H, W, C_out, kernel, stride, padding, dilation):
    """<im2col(x), c> == <x, col2im(c)> for every x and c: col2im is im2col's transpose."""
    rng = np.random.default_rng(1)
    geometry = [_pair(v) for v in (kernel, stride, padding, dilation)]
    x = rng.standard_normal((N, C, H, W))
    c = rng.standard_normal(im2col(x, *geometry).shape)
    back = col2im(c, x.shape, *geometry)
    assert back.shape == x.shape
    np.testing.assert_allclose(np.sum(im2col(x, *geometry) * c), np.sum(x * back), rtol=1e-12)


def test_col2im_sums_overlapping_windows():
    """3x3 windows at stride 1 over a 4x4 input: each pixel is counted once per window holding it."""
    geometry = [(3, 3), (1, 1), (0, 0), (1, 1)]
    counts = col2im(np.ones((9, 4)), (1, 1, 4, 4), *geometry)[0, 0]
    np.testing.assert_array_equal(counts, [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]])


# ---- conv2d ------------------------------------------------------------------

@pytest.mark.parametrize("N, C, H, W, C_out, kernel, stride, padding, dilation", CONV_CASES)
def test_conv2d_matches_loop_reference(backend, N, C, H, W, C_out, kernel, stride, padding, dilation):
    x, weight, bias = _conv_arrays(np.random.default_rng(2), N, C, H, W, C_out, kernel)
    out = conv2d(mf.Tensor(x), mf.Tensor(weight), mf.Tensor(bias), stride, padding, dilation)
    expected = ref.conv2d(x, weight, bias, stride, padding, dilation)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.data, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("N, C, H, W, C_out, kernel, stride, padding, dilation", CONV_CASES)
def test_conv2d_gradcheck(backend, N, C, H, W, C_out, kernel, stride, padding, dilation):
    inputs = _tensors(*_conv_arrays(np.random.default_rng(3), N, C, H, W, C_out, kernel))
    assert mf.gradcheck(lambda x, w, b: conv2d(x, w, b, stride, padding, dilation), inputs)


WIDE_PADDING = ["padding-gt-kernel", "fcn-pad-conv1_1", "wide-pad-stride3-rows-unread",
                "wide-pad-dilated-stride2", "wide-pad-one-axis"]


@pytest.mark.parametrize("N, C, H, W, C_out, kernel, stride, padding, dilation",
                         [case for case in CONV_CASES if case.id in WIDE_PADDING])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fast", ["cpu", pytest.param("cuda", marks=BACKENDS[2].marks)])
def test_outputs_that_see_only_padding_are_computed_apart(fast, N, C, H, W, C_out, kernel, stride,
                                                          padding, dilation, with_bias):
    """Where most outputs read nothing but padding, the fast backends compute the others from a
    window of x and leave the rest to the bias: the same values and gradients as the reference,
    which computes every output."""
    x, weight, bias = _conv_arrays(np.random.default_rng(17), N, C, H, W, C_out, kernel)
    bias = bias if with_bias else None
    geometry = tuple(pair("geometry", v, 0) for v in (kernel, stride, padding, dilation))
    assert windows.reach(x.shape, geometry) is not None  # the case takes that path
    results = []
    for name in (fast, "reference"):
        with mf.backend.using(name):
            tensors = _tensors(*(a for a in (x, weight, bias) if a is not None))
            out = conv2d(tensors[0], tensors[1], tensors[2] if with_bias else None, stride, padding, dilation)
            out.backward(np.random.default_rng(18).standard_normal(out.shape))
        results.append([out.data] + [t.grad for t in tensors])
    for apart, whole in zip(*results):
        np.testing.assert_allclose(apart, whole, rtol=1e-12, atol=1e-12)


def test_conv2d_without_bias_gradcheck(backend):
    x, weight, _ = _conv_arrays(np.random.default_rng(4), 2, 2, 5, 4, 3, 3)
    out = conv2d(mf.Tensor(x), mf.Tensor(weight), None, 1, 1)
    np.testing.assert_allclose(out.data, ref.conv2d(x, weight, None, 1, 1), rtol=1e-10, atol=1e-12)
    assert mf.gradcheck(lambda x, w: conv2d(x, w, None, 1, 1), _tensors(x, weight))


@pytest.mark.parametrize("N, C, H, W, C_out, kernel, stride, padding, dilation", CONV_CASES)
def test_conv_transpose2d_is_the_gradient_of_conv2d(backend, N, C, H, W, C_out, kernel, stride, padding, dilation):
    """d conv2d(x, w) / dx applied to g == conv_transpose2d(g, w), the output_padding
    choosing the one of the input sizes that a strided conv maps to the same output."""
    x, weight, _ = _conv_arrays(np.random.default_rng(5), N, C, H, W, C_out, kernel)
    x = mf.Tensor(x, requires_grad=True)
    out = conv2d(x, mf.Tensor(weight), None, stride, padding, dilation)
    g = np.random.default_rng(6).standard_normal(out.shape)
    out.backward(g)
    (kH, kW), (sH, sW), (pH, pW), (dH, dW) = map(_pair, (kernel, stride, padding, dilation))
    output_padding = ((H + 2 * pH - dH * (kH - 1) - 1) % sH, (W + 2 * pW - dW * (kW - 1) - 1) % sW)
    back = conv_transpose2d(mf.Tensor(g), mf.Tensor(weight), None, stride, padding, output_padding, dilation)
    np.testing.assert_allclose(back.data, x.grad, rtol=1e-10, atol=1e-12)


# how the fast CPU backend may cut cols: its tuning constants, and the thread count
WHOLE = dict(BLOCK_BYTES=1 << 30, MIN_BLOCK_COLUMNS=1 << 30, MAX_BLOCK_COLUMNS=1 << 30)
ROWS = dict(BLOCK_BYTES=1, MIN_BLOCK_COLUMNS=1, MAX_BLOCK_COLUMNS=1)
NEVER, ALWAYS = 1 << 30, 0
BLOCKINGS = [
    # one block per sample, one thread, thin (transposed) weight gradients
    dict(WHOLE, threads=1, THIN_GRADIENT_CHANNELS=NEVER),
    # one row per block, untransposed products
    dict(ROWS, threads=1, THIN_GRADIENT_CHANNELS=ALWAYS),
    # one row per block, runs of blocks shared by two threads
    dict(ROWS, threads=2, THIN_GRADIENT_CHANNELS=NEVER, MIN_CHANNELS_PER_THREAD=1),
    # three threads, often more threads than blocks
    dict(ROWS, MAX_BLOCK_COLUMNS=2, threads=3, MIN_CHANNELS_PER_THREAD=NEVER),
    # fewer blocks than threads: split by output channels, transposed or not
    dict(WHOLE, threads=3, THIN_GRADIENT_CHANNELS=ALWAYS, MIN_CHANNELS_PER_THREAD=1),
    dict(WHOLE, threads=2, THIN_GRADIENT_CHANNELS=NEVER, MIN_CHANNELS_PER_THREAD=1),
    # many blocks split by output channels (a large weight gradient), partial sums per thread
    dict(ROWS, threads=2, MIN_CHANNELS_PER_THREAD=1, MAX_PARTIAL_BYTES=ALWAYS),
    # each block's products cut into a stack of narrower ones, one column wide
    dict(WHOLE, threads=1, PRODUCT_MACS=1, MIN_PRODUCT_COLUMNS=0, THIN_GRADIENT_CHANNELS=NEVER),
    dict(WHOLE, threads=2, PRODUCT_MACS=1, MIN_PRODUCT_COLUMNS=0, THIN_GRADIENT_CHANNELS=ALWAYS),
    dict(ROWS, MAX_BLOCK_COLUMNS=6, threads=2, PRODUCT_MACS=1, MIN_PRODUCT_COLUMNS=0,
         MIN_CHANNELS_PER_THREAD=1, MAX_PARTIAL_BYTES=ALWAYS),
]


@pytest.mark.parametrize("columns", [1, 7, 12, 1728, 5184, 5400, 10007])
@pytest.mark.parametrize("macs_per_column, macs, min_columns", [(576, 1 << 20, 512), (1152, 1 << 20, 512),
                                                               (36864, 1 << 20, 512), (1, 1, 1)])
def test_products_are_cut_into_equal_runs_near_the_target(columns, macs_per_column, macs, min_columns):
    parts = conv_blocks.product_parts(columns, macs_per_column, macs, min_columns)
    assert columns % parts == 0
    target = max(macs // macs_per_column, 1)
    width = columns // parts
    if target < min_columns:  # a wide layer: never cut
        assert parts == 1
    assert parts == 1 or target // 2 <= width <= target  # never much narrower than asked
    a = np.arange(3 * columns).reshape(3, columns)
    runs = conv_blocks.as_runs(a, parts)
    assert runs.shape == (parts, 3, width) and np.shares_memory(runs, a)
    np.testing.assert_array_equal(np.concatenate(list(runs), axis=1), a)


@pytest.mark.parametrize("N, C, H, W, C_out, kernel, stride, padding, dilation", CONV_CASES)
def test_conv2d_by_row_blocks(monkeypatch, threads, N, C, H, W, C_out, kernel, stride, padding, dilation):
    """The CPU path fills cols a few output rows at a time, in threads; every way of cutting
    the work must give the same output and gradients (padding rows, halos, the last short
    block, threads with no block, the weight gradient summed over threads or split by output
    channel, and transposed)."""
    x, weight, bias = _conv_arrays(np.random.default_rng(12), N, C, H, W, C_out, kernel)
    expected = ref.conv2d(x, weight, bias, stride, padding, dilation)
    g = np.random.default_rng(13).standard_normal(expected.shape)
    results = []
    monkeypatch.setattr(tuning, "MIN_FLOPS_PER_THREAD", 0)  # these convolutions are tiny
    defaults = {name: getattr(tuning, name) for blocking in BLOCKINGS for name in blocking if name != "threads"}
    for blocking in BLOCKINGS:
        for name, value in dict(defaults, **blocking).items():  # each blocking from the defaults
            if name == "threads":
                threads(value)
            else:
                monkeypatch.setattr(tuning, name, value)
        tensors = _tensors(x, weight, bias)
        out = conv2d(*tensors, stride, padding, dilation)
        np.testing.assert_allclose(out.data, expected, rtol=1e-10, atol=1e-12)
        out.backward(g)
        results.append([t.grad for t in tensors])
    for other in results[1:]:
        for one, two in zip(results[0], other):
            np.testing.assert_allclose(one, two, rtol=1e-10, atol=1e-12)


SAME_SIZE_CASES = [  # (C, H, W, kernel, padding, dilation), stride 1, padding d*(k-1)/2
    pytest.param(2, 7, 5, (3, 3), (1, 1), (1, 1), id="3x3"),
    pytest.param(1, 9, 6, (3, 5), (1, 2), (1, 1), id="3x5"),
    pytest.param(2, 8, 3, (5, 1), (2, 0), (1, 1), id="5x1-no-wrap"),
    pytest.param(1, 4, 2, (3, 3), (1, 1), (1, 1), id="narrower-than-kernel"),
    pytest.param(2, 11, 9, (3, 3), (2, 3), (2, 3), id="dilated"),
    pytest.param(1, 3, 4, (7, 3), (3, 1), (1, 1), id="padding-taller-than-image"),
]


@pytest.mark.parametrize("C, H, W, kernel, padding, dilation", SAME_SIZE_CASES)
@pytest.mark.parametrize("rows_per_block", [1, 2, 3, 100])
def test_same_size_blocks_equal_im2col(C, H, W, kernel, padding, dilation, rows_per_block):
    """Blocks read from x itself (runs that wrap at the edges, slabs at the top and bottom)
    hold exactly the columns of im2col, whatever rows a block covers."""
    N = 2
    x = np.random.default_rng(16).standard_normal((N, C, H, W)) + 1  # no zero where padding should be
    geometry = (kernel, (1, 1), padding, dilation)
    assert conv_blocks.is_same_size(x.shape, geometry)
    blocks = [(n, r0, min(r0 + rows_per_block, H)) for n in range(N) for r0 in range(0, H, rows_per_block)]
    expected = [im2col(x[n:n + 1], *geometry) for n in range(N)]
    seen = 0
    for (n, r0, r1), (m, columns, cols) in zip(blocks, conv_blocks.column_blocks(x, None, geometry, blocks)):
        assert m == n and columns == slice(r0 * W, r1 * W)
        np.testing.assert_array_equal(cols, expected[n][:, columns])
        seen += 1
    assert seen == len(blocks)


@pytest.mark.parametrize("count", [1, 2])
def test_same_size_convolution_of_a_non_contiguous_input(monkeypatch, threads, count):
    """The views read x's memory row by row: a strided x is made contiguous first, once."""
    monkeypatch.setattr(tuning, "MIN_FLOPS_PER_THREAD", 0)
    threads(count)
    x, weight, _ = _conv_arrays(np.random.default_rng(17), 2, 3, 9, 7, 4, 3)
    strided = np.asfortranarray(x)
    out = conv2d(mf.Tensor(strided), mf.Tensor(weight), None, 1, 1)
    np.testing.assert_allclose(out.data, ref.conv2d(x, weight, None, 1, 1), rtol=1e-10, atol=1e-12)


def test_a_transposed_convolution_with_only_a_bias_to_learn(backend):
    """Frozen upsampling weights and an input that needs no gradient: only the bias gets one."""
    x = mf.Tensor(np.ones((1, 2, 3, 3)))
    weight, bias = mf.Tensor(np.ones((2, 3, 4, 4))), mf.Tensor(np.zeros(3), requires_grad=True)
    out = conv_transpose2d(x, weight, bias, stride=2)
    out.backward(np.ones(out.shape))
    np.testing.assert_array_equal(bias.grad, [64.0, 64.0, 64.0])  # one per output pixel, 8x8
    assert x.grad is None and weight.grad is None


def test_an_empty_batch_gives_an_empty_output(backend):
    x = mf.Tensor(np.zeros((0, 2, 6, 6), np.float32))
    assert conv2d(x, mf.Tensor(np.zeros((4, 2, 3, 3), np.float32)), padding=1).shape == (0, 4, 6, 6)


def test_gradients_nobody_needs_are_not_computed(backend):
    """conv1_1's input is the image: it gets no gradient, and the weight's is unchanged by that;
    a frozen weight gets none either."""
    x, weight, bias = _conv_arrays(np.random.default_rng(14), 1, 3, 6, 5, 4, 3)
    g = np.random.default_rng(15).standard_normal((1, 4, 6, 5))
    everything = _tensors(x, weight, bias)
    conv2d(*everything, 1, 1).backward(g)
    image, w, b = mf.Tensor(x), *_tensors(weight, bias)
    conv2d(image, w, b, 1, 1).backward(g)
    assert image.grad is None
    np.testing.assert_allclose(w.grad, everything[1].grad, rtol=1e-12)
    np.testing.assert_allclose(b.grad, everything[2].grad, rtol=1e-12)
    x_tensor, frozen = mf.Tensor(x, requires_grad=True), mf.Tensor(weight)
    conv2d(x_tensor, frozen, None, 1, 1).backward(g)
    assert frozen.grad is None
    np.testing.assert_allclose(x_tensor.grad, everything[0].grad, rtol=1e-12)


# ---- conv_transpose2d ------------------------------------------------------------

@pytest.mark.parametrize("N, C, H, W, C_out, kernel, stride, padding, output_padding, dilation",
                         TRANSPOSE_CASES)
def test_conv_transpose2d_matches_loop_reference(backend, N, C, H, W, C_out, kernel, stride, padding,
                                                 output_padding, dilation):
    x, weight, bias = _conv_arrays(np.random.default_rng(7), N, C, H, W, C_out, kernel, transpose=True)
    out = conv_transpose2d(mf.Tensor(x), mf.Tensor(weight), mf.Tensor(bias), stride, padding,
                           output_padding, dilation)
    expected = ref.conv_transpose2d(x, weight, bias, stride, padding, output_padding, dilation)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.data, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("N, C, H, W, C_out, kernel, stride, padding, output_padding, dilation",
                         TRANSPOSE_CASES)
def test_conv_transpose2d_gradcheck(backend, N, C, H, W, C_out, kernel, stride, padding, output_padding, dilation):
    arrays = _conv_arrays(np.random.default_rng(8), N, C, H, W, C_out, kernel, transpose=True)
    assert mf.gradcheck(
        lambda x, w, b: conv_transpose2d(x, w, b, stride, padding, output_padding, dilation),
        _tensors(*arrays))


@pytest.mark.parametrize("N, C, H, W, C_out, kernel, stride, padding, output_padding, dilation",
                         [case for case in TRANSPOSE_CASES if case.id.startswith("upsampling-tiles")])
def test_conv_transpose2d_input_gradient_by_tiles(N, C, H, W, C_out, kernel, stride, padding, output_padding,
                                                 dilation):
    """With its weights frozen (FCN's bilinear upsampling), conv_transpose2d's input gradient is
    gathered by tiles (space to depth, one product, shifted sums): gradcheck it that way."""
    x, weight, bias = _conv_arrays(np.random.default_rng(19), N, C, H, W, C_out, kernel, transpose=True)
    geometry = tuple(pair("geometry", v, 0) for v in (kernel, stride, padding, dilation))
    assert cpu_conv._tiles_pay(np.zeros((N, C_out, 1, 1)), weight.reshape(C, -1), geometry)
    frozen = mf.Tensor(weight)
    assert mf.gradcheck(lambda x, b: conv_transpose2d(x, frozen, b, stride, padding, output_padding, dilation),
                        _tensors(x, bias))


def test_conv_transpose2d_fcn_bilinear_upsampling(backend):
    """FCN's upsampling layer: stride 2, a 4x4 bilinear kernel per channel, cropped by 1,
    doubles a constant map into the same constant (away from the border)."""
    f = np.array([0.25, 0.75, 0.75, 0.25])
    weight = np.zeros((2, 2, 4, 4))
    weight[0, 0] = weight[1, 1] = np.outer(f, f)
    out = conv_transpose2d(mf.Tensor(np.full((1, 2, 3, 3), 5.0)), mf.Tensor(weight), stride=2, padding=1)
    assert out.shape == (1, 2, 6, 6)
    np.testing.assert_allclose(out.data[:, :, 1:-1, 1:-1], 5.0)


# ---- dtype and devices -----------------------------------------------------------

@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_float32_stays_float32(backend, op):
    transpose = op == "conv_transpose2d"
    arrays = _conv_arrays(np.random.default_rng(9), 2, 3, 6, 5, 4, 3, transpose)
    tensors = _tensors(*(a.astype(np.float32) for a in arrays))
    out = (conv_transpose2d if transpose else conv2d)(*tensors, stride=2, padding=1)
    out.sum().backward()
    assert out.dtype == np.float32
    assert [t.grad.dtype for t in tensors] == [np.float32] * 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_conv_on_device_matches_loop_reference(device, op):
    """The forward against the loop reference; the gradients, along a random weighting of the
    outputs, against the reference backend in float64 (itself gradient-checked)."""
    rng = np.random.default_rng(10)
    transpose = op == "conv_transpose2d"
    x, weight, bias = (a.astype(np.float32) for a in _conv_arrays(rng, 2, 3, 6, 5, 4, 3, transpose))
    if transpose:
        def call(*tensors):
            return conv_transpose2d(*tensors, stride=2, padding=1, output_padding=1)
        expected = ref.conv_transpose2d(x, weight, bias, 2, 1, 1)
    else:
        def call(*tensors):
            return conv2d(*tensors, stride=2, padding=1)
        expected = ref.conv2d(x, weight, bias, 2, 1)
    tensors = [mf.Tensor(to_device(a, device), requires_grad=True) for a in (x, weight, bias)]
    out = call(*tensors)
    assert out.device == device and out.dtype == np.float32
    np.testing.assert_allclose(to_numpy(out.data), expected, rtol=1e-4, atol=1e-4)
    weighting = rng.standard_normal(out.shape)
    out.backward(to_device(weighting.astype(np.float32), device))
    with mf.backend.using("reference"):
        leaves = [mf.Tensor(a.astype(np.float64), requires_grad=True) for a in (x, weight, bias)]
        call(*leaves).backward(weighting)
    for name, tensor, leaf in zip(("x", "weight", "bias"), tensors, leaves):
        assert tensor.grad.dtype == np.float32 and tensor.grad.shape == tensor.shape, name
        np.testing.assert_allclose(to_numpy(tensor.grad), leaf.grad, rtol=1e-4, atol=1e-4, err_msg=name)


def test_non_contiguous_input(backend):
    x, weight, bias = _conv_arrays(np.random.default_rng(11), 2, 3, 6, 5, 4, 3)
    x_view = x.transpose(0, 1, 3, 2)  # a strided view, not a copy
    out = conv2d(mf.Tensor(x_view), mf.Tensor(weight), mf.Tensor(bias), stride=2)
    np.testing.assert_allclose(out.data, ref.conv2d(x_view, weight, bias, 2), rtol=1e-10, atol=1e-12)


# ---- argument errors ---------------------------------------------------------------

def _conv_call(x_shape=(1, 3, 5, 5), w_shape=(4, 3, 3, 3), bias_shape=None, transpose=False, dtype=np.float64,
               **kwargs):
    x = mf.Tensor(np.zeros(x_shape, dtype))
    weight = mf.Tensor(np.zeros(w_shape, np.float64))
    bias = None if bias_shape is None else mf.Tensor(np.zeros(bias_shape, np.float64))
    return (conv_transpose2d if transpose else conv2d)(x, weight, bias, **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    pytest.param(dict(x_shape=(3, 5, 5)), ValueError,
                 r"conv2d expects x of shape \(N, C_in, H, W\), got shape \(3, 5, 5\)", id="x-3d"),
    pytest.param(dict(w_shape=(4, 3, 3)), ValueError,
                 r"conv2d expects weight of shape \(C_out, C_in, kH, kW\), got shape \(4, 3, 3\)",
                 id="weight-3d"),
    pytest.param(dict(w_shape=(4, 2, 3, 3)), ValueError,
                 r"x of shape \(1, 3, 5, 5\) has 3 channels but weight of shape \(4, 2, 3, 3\)",
                 id="channel-mismatch"),
    pytest.param(dict(bias_shape=(3,)), ValueError,
                 r"conv2d expects bias of shape \(4,\) .* got shape \(3,\)", id="bias-shape"),
    pytest.param(dict(dtype=np.float32), TypeError,
                 r"x, weight and bias must share one dtype, got float32 and float64", id="dtype-mismatch"),
    pytest.param(dict(stride=0), ValueError, r"conv2d: stride must be >= 1, got 0", id="stride-0"),
    pytest.param(dict(stride=(1, -2)), ValueError, r"stride must be >= 1, got \(1, -2\)",
                 id="stride-negative"),
    pytest.param(dict(dilation=0), ValueError, r"conv2d: dilation must be >= 1, got 0", id="dilation-0"),
    pytest.param(dict(padding=-1), ValueError, r"conv2d: padding must be >= 0, got -1",
                 id="padding-negative"),
    pytest.param(dict(stride=1.5), TypeError, r"stride must be an int or a pair of ints, got 1.5",
                 id="stride-float"),
    pytest.param(dict(padding=(1, 1, 1)), TypeError, r"padding must be an int or a pair of ints",
                 id="padding-triple"),
    pytest.param(dict(w_shape=(4, 3, 7, 7)), ValueError,
                 r"conv2d: kernel 7x7 with dilation 1 is larger than the padded input 5x5",
                 id="kernel-larger-than-input"),
    pytest.param(dict(x_shape=(1, 3, 6, 6), dilation=3), ValueError,
                 r"kernel 3x3 with dilation 3 is larger than the padded input 6x6",
                 id="dilated-kernel-too-large"),
    pytest.param(dict(w_shape=(4, 3, 1, 9), padding=(0, 1)), ValueError,
                 r"kernel 1x9 with dilation 1 is larger than the padded input 5x7", id="kernel-too-wide"),
])
def test_conv2d_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        _conv_call(**kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    pytest.param(dict(x_shape=(1, 4, 5, 5), w_shape=(3, 4, 3, 3)), ValueError,
                 r"conv_transpose2d: x of shape \(1, 4, 5, 5\) has 4 channels but weight of shape "
                 r"\(3, 4, 3, 3\) \(C_in, C_out, kH, kW\) expects C_in = 3", id="channel-mismatch"),
    pytest.param(dict(bias_shape=(3,)), ValueError, r"conv_transpose2d expects bias of shape \(4,\)",
                 id="bias-shape"),
    pytest.param(dict(stride=2, output_padding=2), ValueError,
                 r"output_padding 2 must be smaller than stride 2 or dilation 1",
                 id="output-padding-ge-stride"),
    pytest.param(dict(output_padding=(0, 1)), ValueError,
                 r"output_padding \(0, 1\) must be smaller than stride 1 or dilation 1",
                 id="output-padding-stride1"),
    pytest.param(dict(output_padding=-1), ValueError, r"output_padding must be >= 0, got -1",
                 id="output-padding-negative"),
    pytest.param(dict(stride=0), ValueError, r"conv_transpose2d: stride must be >= 1", id="stride-0"),
    pytest.param(dict(x_shape=(1, 3, 1, 1), w_shape=(3, 4, 1, 1), padding=1), ValueError,
                 r"conv_transpose2d: output size -1x-1 is not positive", id="output-not-positive"),
])
def test_conv_transpose2d_argument_errors(kwargs, error, message):
    kwargs.setdefault("w_shape", (3, 4, 3, 3))
    with pytest.raises(error, match=message):
        _conv_call(transpose=True, **kwargs)
