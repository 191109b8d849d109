"""Convolution and transposed convolution: the two layers an FCN is made of.

Shape legend:
    N batch, C channels (C_in into a layer, C_out out of it),
    H W input height and width, OH OW output height and width,
    kH kW kernel height and width, K = C * kH * kW (one flattened window).
All hyper-parameters here are pairs (for height, width): kernel, stride,
padding (zeros added on each side), dilation (the gap between kernel taps).

im2col turns a convolution into one matrix product. Every output pixel is
the weights dotted with one window of the input, so copy every window into
a column and multiply once:

    cols = im2col(x)                         (C_in*kH*kW, N*OH*OW)
    out  = W.reshape(C_out, -1) @ cols       (C_out, N*OH*OW) -> (N, C_out, OH, OW)

col2im is the adjoint of im2col: it adds every column back onto the window
it came from, summing where windows overlap. Read the product backwards and
you get the transposed convolution ("deconvolution", FCN's upsampling layer):
every input pixel scatters the weights, scaled by itself, onto a window.

    cols = W.reshape(C_in, -1).T @ x2d       (C_out*kH*kW, N*H*W)
    out  = col2im(cols)                      (N, C_out, OH, OW)

The two ops are therefore a pair, and the code says so: ``_gather``
(im2col + matmul) is conv2d's forward and conv_transpose2d's input
gradient; ``_scatter`` (matmul + col2im) is conv_transpose2d's forward and
conv2d's input gradient. Both weight gradients are "input 2-D @ cols.T".

How the CPU runs them fast: cols is never built whole (``_column_blocks``
fills it a few output rows at a time, a block small enough to stay in cache,
straight into the matrix products; for VGG's same-size 3x3 convolutions it
copies them from x itself, in long runs, with no padded copy of x), the
blocks are shared among the CPU threads (minifcn.parallel), and most scatters
are computed as an equivalent gather, without col2im (``_scatter``: the
flipped kernel at stride 1, the "sub-pixel" split of FCN's strided
upsampling). ``im2col`` and ``col2im`` below stay the reference that
the CUDA kernels and the tests check against.
"""

import functools
import numbers

import numpy

from minifcn.autograd import Function
from minifcn.backend import get_array_module, is_cuda
from minifcn.functional.reduction import channel_sum
from minifcn.parallel import get_num_threads, ranges, run_parallel, split


# ---- argument helpers --------------------------------------------------------

def _pair(value, name, minimum):
    """An int or a pair of ints as a (height, width) tuple of ints >= ``minimum``."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be {'positive' if minimum == 1 else 'non-negative'}, got {value!r}")
    return tuple(int(v) for v in pair)


def _show(pair):
    """(3, 3) -> '3', (3, 1) -> '(3, 1)': how error messages print a pair."""
    return str(pair[0]) if pair[0] == pair[1] else str(tuple(pair))


def _geometry(kernel_size, stride, padding, dilation):
    """The four hyper-parameters of a convolution as checked pairs."""
    return (_pair(kernel_size, "kernel_size", 1), _pair(stride, "stride", 1),
            _pair(padding, "padding", 0), _pair(dilation, "dilation", 1))


def conv_output_size(size, kernel, stride, padding, dilation):
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _output_shape(x_shape, kernel_size, stride, padding, dilation):
    """(OH, OW) of a convolution of an (N, C, H, W) input."""
    return tuple(conv_output_size(x_shape[2 + a], kernel_size[a], stride[a], padding[a], dilation[a])
                 for a in (0, 1))


# ---- im2col / col2im: the NumPy reference each CUDA kernel must equal ---------

def _overlap(span, size):
    """Where rows span[0]..span[1]-1 meet rows 0..size-1: (slice of x, slice of the window)."""
    lo, hi = max(span[0], 0), min(span[1], size)
    return slice(lo, max(lo, hi)), slice(lo - span[0], max(lo, hi) - span[0])


def _window(x, rows, cols):
    """x (N, C, H, W) -> its rows rows[0]..rows[1]-1 and columns cols[0]..cols[1]-1, 0 outside x
    (x itself when that is all of x)."""
    if (rows, cols) == ((0, x.shape[2]), (0, x.shape[3])):
        return x
    (x_rows, w_rows), (x_cols, w_cols) = _overlap(rows, x.shape[2]), _overlap(cols, x.shape[3])
    window = get_array_module(x).zeros(x.shape[:2] + (rows[1] - rows[0], cols[1] - cols[0]), dtype=x.dtype)
    window[:, :, w_rows, w_cols] = x[:, :, x_rows, x_cols]
    return window


def _unwindow(grad_window, x_shape, rows, cols):
    """The adjoint of _window: the gradient of the window -> the gradient of x (0 where unread)."""
    (x_rows, w_rows), (x_cols, w_cols) = _overlap(rows, x_shape[2]), _overlap(cols, x_shape[3])
    grad_x = get_array_module(grad_window).zeros(x_shape, dtype=grad_window.dtype)
    grad_x[:, :, x_rows, x_cols] = grad_window[:, :, w_rows, w_cols]
    return grad_x


def _zero_padded(x, padding):
    """x (N, C, H, W) with a zero border: (N, C, H + 2pH, W + 2pW); x itself without padding."""
    (pH, pW) = padding
    H, W = x.shape[2:]
    return _window(x, (-pH, H + pH), (-pW, W + pW))


def im2col(x, kernel_size, stride, padding, dilation):
    """x (N, C, H, W) -> cols (C*kH*kW, N*OH*OW), every input window a column.

    cols[(c*kH + i)*kW + j, (n*OH + oy)*OW + ox] = x[n, c, oy*sH - pH + i*dH, ox*sW - pW + j*dW]
    (0 where that falls in the padding). A strided *view* of the padded input
    already has these six axes; the final reshape is the one copy (none when the
    view happens to be contiguous, e.g. a 1x1 kernel: then cols shares x's memory).
    """
    xp = get_array_module(x)
    kernel_size, stride, padding, dilation = _geometry(kernel_size, stride, padding, dilation)
    (kH, kW), (sH, sW), (dH, dW) = kernel_size, stride, dilation
    N, C = x.shape[:2]
    OH, OW = _output_shape(x.shape, kernel_size, stride, padding, dilation)
    padded = _zero_padded(x, padding)
    bN, bC, bH, bW = padded.strides  # bytes between neighbours along each axis
    windows = xp.lib.stride_tricks.as_strided(
        padded, shape=(C, kH, kW, N, OH, OW),
        strides=(bC, dH * bH, dW * bW, bN, sH * bH, sW * bW))
    return windows.reshape(C * kH * kW, N * OH * OW)


def col2im(cols, x_shape, kernel_size, stride, padding, dilation):
    """cols (C*kH*kW, N*OH*OW) -> x (N, C, H, W), the exact adjoint of im2col.

    Each kernel tap (i, j) owns one (N, C, OH, OW) slab of cols, which lands on
    a strided grid of the padded input; taps whose grids overlap add up.
    """
    xp = get_array_module(cols)
    kernel_size, stride, padding, dilation = _geometry(kernel_size, stride, padding, dilation)
    (kH, kW), (sH, sW), (pH, pW), (dH, dW) = kernel_size, stride, padding, dilation
    N, C, H, W = x_shape
    OH, OW = _output_shape(x_shape, kernel_size, stride, padding, dilation)
    padded = xp.zeros((N, C, H + 2 * pH, W + 2 * pW), dtype=cols.dtype)
    taps = cols.reshape(C, kH, kW, N, OH, OW)
    for i in range(kH):
        for j in range(kW):
            grid = padded[:, :, i * dH:i * dH + sH * OH:sH, j * dW:j * dW + sW * OW:sW]
            grid += taps[:, i, j].transpose(1, 0, 2, 3)
    if pH or pW:
        return xp.ascontiguousarray(padded[:, :, pH:pH + H, pW:pW + W])
    return padded


def _im2col(x, *geometry):
    if is_cuda(x):
        from minifcn import cuda
        return cuda.im2col(x, *geometry)
    return im2col(x, *geometry)


def _col2im(cols, x_shape, *geometry):
    if is_cuda(cols):
        from minifcn import cuda
        return cuda.col2im(cols, x_shape, *geometry)
    return col2im(cols, x_shape, *geometry)


# ---- the pair: gather (conv) and scatter (transposed conv) ---------------------
# geometry = (kernel_size, stride, padding, dilation), all pairs
#
# On the CPU nothing builds the whole of cols: for conv1_2 of a 500x500 FCN it is
# 1.1 GB, nine times the layer's input. ``_column_blocks`` fills a small buffer with
# the columns of a few output rows at a time, and each block goes straight into
# BLAS: ``weight2d @ cols`` into the output rows, ``grad2d @ cols.T`` into the weight
# gradient. For the thin early layers, where copies cost the most next to the
# arithmetic, a block fits in the core's L2 cache, so the product reads the columns
# from cache, not from memory: at 1 thread this alone made the 3x3 convolutions of
# a training step about 1.35x faster. The blocks are independent, so the CPU threads
# (minifcn.parallel) take a run of blocks each, with their own buffers.
#
# Each block's products are one NumPy call over a stack of narrower products
# (``_runs``): OpenBLAS multiplies thin matrices (8 channels, K = 72) up to 2x faster
# when a product has at most about a million multiply-adds, where it skips packing
# them, and a block as large as the cache allows means fewer NumPy calls. Fewer calls
# matter most with two threads: a thread gets the GIL back after each call only
# once the other lets go of it (bench/RESULTS.md, round 5).

_BLOCK_BYTES = 1536 << 10    # one block of cols: three quarters of a 2 MiB L2 cache, ...
_MIN_BLOCK_COLUMNS = 1024    # ... but wide enough that summing the weight gradient's blocks is cheap
_MAX_BLOCK_COLUMNS = 16384   # ... and for thin layers (conv1_1: K = 27) not past the L2 either
_PRODUCT_MACS = 1 << 20      # a thin layer's products are cut into runs of about this many multiply-
_MIN_PRODUCT_COLUMNS = 384   # ... adds, if that makes runs this wide (one BLAS call each, no packing)
_THIN_GRADIENT_CHANNELS = 128  # weight gradients with at most this many rows are computed transposed
_MIN_CHANNELS_PER_THREAD = 16  # threads share output channels only if each gets at least this many
_MAX_PARTIAL_BYTES = 16 << 20  # a larger weight gradient is split by channels, not summed per thread
_MIN_FLOPS_PER_THREAD = 35e6   # below this much work a thread costs more than it saves


def _threads_for(x, flops):
    """How many CPU threads a product of ``flops`` on ``x`` is worth: in a training step a
    worker starts about 0.14 ms after the hand-off and the caller gets its result back 0.06 ms
    after it ends (bench/RESULTS.md, round 5), so small convolutions run in the caller (and
    the GPU's in one)."""
    if is_cuda(x):
        return 1
    return min(get_num_threads(), max(1, int(flops / max(_MIN_FLOPS_PER_THREAD, 1))))


def _quietly(function):
    """``function`` with NumPy's overflow and invalid-value reports off, for work in threads.

    An overflow shows as inf or NaN in the result, which detect_anomaly and the trainer
    report by op. BLAS's float flags would add a warning that appears or not depending on
    the thread that ran the block (NumPy's error state is per thread).
    """
    def quiet(piece):
        with numpy.errstate(over="ignore", invalid="ignore"):
            return function(piece)
    return quiet


def _channels_first(a):
    """(N, C, H, W) -> (C, N*H*W), the layout of a row of cols; free when N == 1."""
    N, C, H, W = a.shape
    if N == 1:
        return a.reshape(C, H * W)
    return a.transpose(1, 0, 2, 3).reshape(C, N * H * W)


def _is_pointwise(geometry):
    """A 1x1 kernel at stride 1 without padding: every window is one pixel, cols is x itself."""
    kernel_size, stride, padding, _ = geometry
    return kernel_size == (1, 1) and stride == (1, 1) and padding == (0, 0)


@functools.lru_cache(maxsize=None)
def _product_parts(columns, macs_per_column, macs, min_columns):
    """Into how many equal runs to cut a block of ``columns`` columns for its products: runs of
    about ``macs`` (_PRODUCT_MACS) multiply-adds, for thin layers, where such a run is at least
    ``min_columns`` (_MIN_PRODUCT_COLUMNS) wide; 1 for the others, or when no whole number of
    runs comes near that."""
    width = max(macs // macs_per_column, 1)
    if width < min_columns:  # a wide layer: OpenBLAS packs its products anyway
        return 1
    fewest = -(-columns // width)
    return next((parts for parts in range(fewest, min(2 * fewest, columns) + 1) if columns % parts == 0), 1)


def _runs(a, parts):
    """a (R, L) -> view (parts, R, L // parts): its columns cut into ``parts`` runs, a stack
    of matrices that one matmul call multiplies one by one (splitting an axis is a view)."""
    R, L = a.shape
    return a.reshape(R, parts, L // parts).transpose(1, 0, 2)


def _blocks(x, geometry, threads=1):
    """The blocks of im2col(x): a list of (n, r0, r1), output rows r0..r1-1 of sample n.

    A block holds about _BLOCK_BYTES of columns, but at least _MIN_BLOCK_COLUMNS
    (which decides for layers with K > ~128) and at most _MAX_BLOCK_COLUMNS. There
    are a multiple of ``threads`` blocks, of near-equal heights, when that is
    possible, so that no thread that takes a run of them waits for the others.
    """
    N, C = x.shape[:2]
    (kH, kW) = geometry[0]
    OH, OW = _output_shape(x.shape, *geometry)
    if _is_pointwise(geometry) or is_cuda(x):  # one block per sample
        return [(n, 0, OH) for n in range(N)]
    K = C * kH * kW
    rows = max(_BLOCK_BYTES // (K * OW * x.itemsize), -(-_MIN_BLOCK_COLUMNS // OW), 1)
    rows = min(OH, rows, max(_MAX_BLOCK_COLUMNS // OW, 1))
    per_sample = -(-OH // rows)
    while (N * per_sample) % threads and per_sample < OH:
        per_sample += 1
    bounds = [OH * k // per_sample for k in range(per_sample + 1)]  # near-equal heights
    return [(n, r0, r1) for n in range(N) for r0, r1 in zip(bounds, bounds[1:])]


def _column_blocks(x, padded, geometry, blocks):
    """Yield (n, columns, cols) with cols = im2col(x[n:n+1])[:, columns], for each of ``blocks``.

    x (N, C, H, W), padded = _zero_padded(x, padding) (None for a same-size convolution)
    -> cols (C*kH*kW, len(columns)); blocks from ``_blocks``. The cols of one block are
    only valid until the next is asked for (one buffer per call, so each thread that
    calls this has its own).
    """
    xp = get_array_module(x)
    (kH, kW), (sH, sW), _, (dH, dW) = geometry
    N, C, H, W = x.shape
    OH, OW = _output_shape(x.shape, *geometry)
    if _is_pointwise(geometry):  # 1x1: the columns are the pixels of x, no copy
        for n, _, _ in blocks:
            yield n, slice(None), x[n].reshape(C, H * W)
        return
    if is_cuda(x):  # the GPU has the memory and the im2col kernel: one block per sample
        for n, _, _ in blocks:
            yield n, slice(None), _im2col(x[n:n + 1], *geometry)
        return
    if padded is None:  # a same-size convolution
        yield from _same_size_column_blocks(x, geometry, blocks)
        return
    K = C * kH * kW
    buffer = xp.empty(K * max((r1 - r0 for _, r0, r1 in blocks), default=0) * OW, dtype=x.dtype)
    bN, bC, bH, bW = padded.strides
    windows = xp.lib.stride_tricks.as_strided(  # (N, C, kH, kW, OH, OW), a view of every window
        padded, shape=(N, C, kH, kW, OH, OW), strides=(bN, bC, dH * bH, dW * bW, sH * bH, sW * bW))
    for n, r0, r1 in blocks:
        cols = buffer[:K * (r1 - r0) * OW].reshape(C, kH, kW, r1 - r0, OW)
        xp.copyto(cols, windows[n, :, :, :, r0:r1])
        yield n, slice(r0 * OW, r1 * OW), cols.reshape(K, (r1 - r0) * OW)


def _is_same_size(x_shape, geometry):
    """Stride 1, padding d*(k-1)/2 on both axes (VGG's 3x3 convolutions, padding 1):
    the output has x's height and width, and im2col needs no padded copy of x."""
    (kH, kW), stride, (pH, pW), (dH, dW) = geometry
    return stride == (1, 1) and 2 * pH == dH * (kH - 1) and 2 * pW == dW * (kW - 1) and pW < x_shape[3]


def _same_size_column_blocks(x, geometry, blocks):
    """_column_blocks for a same-size convolution (``_is_same_size``), from x itself.

    Flatten each channel of x row by row. Output pixel (r, q) is flat index
    p = r*W + q, and its kernel tap (i, j) reads input pixel (r + dy, q + dx),
    dy = i*dH - pH, dx = j*dW - pW: flat index p + dy*W + dx. So over a block of
    output rows, the row of cols for tap (c, i, j) is one contiguous run of x's
    channel c, and all of cols is one copy from a strided view, with runs as long
    as the block (im2col of a padded x copies runs of one row). Two kinds of
    entries come out wrong and are put right:
    - at the left and right edges a run wraps round to the neighbouring row, where
      the padding should be: those entries (|dx| columns of each tap) are zeroed;
    - rows above and below the image: a block at the top or bottom reads from a
      small slab, its input rows with zero rows around them.
    """
    assert _is_same_size(x.shape, geometry) and x.flags.c_contiguous, "the views below read x's memory"
    xp = get_array_module(x)
    (kH, kW), _, (pH, pW), (dH, dW) = geometry
    N, C, H, W = x.shape
    K = C * kH * kW
    spare = 1 if pW else 0  # the row before and after a block's rows, that wrapped runs touch
    reach = (kH - 1) * dH * W + (kW - 1) * dW  # from the first tap's read to the last one's

    def taps(rows):
        """rows (..., C, S), a channel's flattened rows each -> view (..., C, kH, kW, S - reach),
        [..., c, i, j, t] = rows[..., c, i*dH*W + j*dW + t]: the runs of every tap (none if
        S <= reach: an image shorter than the kernel has only blocks that read the slab)."""
        e = rows.itemsize
        return xp.lib.stride_tricks.as_strided(
            rows, shape=rows.shape[:-1] + (kH, kW, max(rows.shape[-1] - reach, 0)),
            strides=rows.strides[:-1] + (dH * W * e, dW * e, e))

    most_rows = max((r1 - r0 for _, r0, r1 in blocks), default=0)
    buffer = xp.empty(K * most_rows * W, dtype=x.dtype)
    from_x = taps(x.reshape(N, C, H * W))
    slab = xp.zeros((C, most_rows + 2 * pH + 2 * spare, W), dtype=x.dtype)
    from_slab = taps(slab.reshape(C, -1))
    wrapped = {}  # block height -> views of the wrapped entries of cols, to zero

    for n, r0, r1 in blocks:
        rows, length = r1 - r0, (r1 - r0) * W
        cols = buffer[:K * length].reshape(C, kH, kW, length)
        top, bottom = r0 - pH - spare, r1 + pH + spare  # the input rows the block touches
        if top >= 0 and bottom <= H:
            start = (r0 - pH) * W - pW  # tap (0, 0) of output pixel (r0, 0)
            xp.copyto(cols, from_x[n, :, :, :, start:start + length])
        else:
            lo, hi = max(top, 0), min(bottom, H)
            slab[:, :lo - top] = 0
            slab[:, lo - top:hi - top] = x[n, :, lo:hi]
            slab[:, hi - top:bottom - top] = 0
            start = spare * W - pW
            xp.copyto(cols, from_slab[:, :, :, start:start + length])
        if rows not in wrapped:
            grid = cols.reshape(C, kH, kW, rows, W)
            wrapped[rows] = [grid[:, :, j, :, :pW - j * dW] if j * dW < pW  # dx < 0: the first -dx columns
                             else grid[:, :, j, :, W + pW - j * dW:]        # dx > 0: the last dx
                             for j in range(kW) if j * dW != pW]
        for entries in wrapped[rows]:
            entries.fill(0)
        yield n, slice(r0 * W, r1 * W), cols.reshape(K, length)


def _im2col_products(x, geometry, weight2d=None, grad=None):
    """The two products of cols = im2col(x) that convolutions need, from one pass of im2col.

    out         = weight2d @ cols   x (N, C, H, W), weight2d (C_out, K) -> (N, C_out, OH, OW)
    grad_weight = grad2d @ cols.T   grad (N, C_g, OH, OW)               -> (C_g, K)
    Either is None when its operand is; given both, C_out == C_g. K = C*kH*kW.

    The CPU threads share the work in one of two ways. Usually each takes a run of
    blocks: it writes its own columns of ``out`` and sums its own ``grad_weight``,
    and the sums are added at the end. When there are fewer blocks than threads
    (fc6 on one image is a single block), or a copy of ``grad_weight`` per thread
    would be large (fc6's is 411 MB), each thread takes a share of the output
    channels instead, for every block: its rows of ``out`` and of ``grad_weight``.
    """
    if weight2d is None and grad is None:  # only a bias gradient was needed
        return None, None
    xp = get_array_module(x)
    N = x.shape[0]
    OH, OW = _output_shape(x.shape, *geometry)
    if weight2d is not None:
        out = xp.empty((N, weight2d.shape[0], OH, OW), dtype=x.dtype)
        out2d = out.reshape(N, weight2d.shape[0], OH * OW)
    if grad is not None:
        grad2d = grad.reshape(N, grad.shape[1], OH * OW)
    channels = weight2d.shape[0] if weight2d is not None else grad.shape[1]

    if is_cuda(x):
        padded = None  # the GPU's im2col pads
    elif _is_same_size(x.shape, geometry):
        padded = None  # a same-size convolution reads x itself: once contiguous, for every thread
        x = xp.ascontiguousarray(x)
    else:
        padded = _zero_padded(x, geometry[2])

    # The weight gradient of a thin layer (few gradient channels) is a long, thin product,
    # which BLAS runs up to 2x faster as its transpose, cols @ grad2d.T; transposing the small
    # result back costs nothing. For wide layers both orientations run alike, and the
    # transpose of a large result (fc6's 411 MB) would not be free.
    transposed = grad is not None and grad.shape[1] <= _THIN_GRADIENT_CHANNELS
    K = x.shape[1] * geometry[0][0] * geometry[0][1]
    macs_per_column = K * channels
    on_gpu = is_cuda(x)  # one block per sample there, its products uncut

    def products(piece):
        """The products over some blocks for some output channels (``channel_slice``); returns
        the weight gradient's sum over those blocks, also written to ``destination`` if given."""
        blocks, channel_slice, destination = piece
        total = partial = None
        for n, columns, cols in _column_blocks(x, padded, geometry, blocks):
            parts = 1 if on_gpu else _product_parts(cols.shape[1], macs_per_column,
                                                    _PRODUCT_MACS, _MIN_PRODUCT_COLUMNS)
            if weight2d is not None:
                xp.matmul(weight2d[channel_slice], _runs(cols, parts),
                          out=_runs(out2d[n, channel_slice, columns], parts))
            if grad is not None:
                g = _runs(grad2d[n, channel_slice, columns], parts)
                a, b = (_runs(cols, parts), g.transpose(0, 2, 1)) if transposed else \
                    (g, _runs(cols, parts).transpose(0, 2, 1))
                if parts == 1 and total is None:  # straight into place when it can be: fc6's is 411 MB
                    total = xp.matmul(a[0], b[0], out=None if transposed else destination)
                    continue
                partial = xp.matmul(a, b, out=partial if partial is not None and len(partial) == parts else None)
                if total is None:  # blocks have hundreds of columns or more: these sums cost little
                    total = partial.sum(axis=0)
                else:
                    total += partial[0] if parts == 1 else partial.sum(axis=0)
        if total is not None and transposed:
            total = total.T
        if destination is not None and total is not destination:
            destination[...] = total
        return total

    products_asked = (weight2d is not None) + (grad is not None)
    threads = _threads_for(x, flops=2 * products_asked * channels * K * N * OH * OW)
    blocks = _blocks(x, geometry)
    grad_weight = None
    if threads == 1:  # NumPy's float warnings (or errors, under numpy.seterr) as for any op
        grad_weight = products((blocks, slice(None), None))
    elif channels >= _MIN_CHANNELS_PER_THREAD * threads and (
            len(blocks) < threads or grad is not None and channels * K * x.itemsize > _MAX_PARTIAL_BYTES):
        if grad is not None:
            grad_weight = xp.empty((channels, K), dtype=x.dtype)
        run_parallel(_quietly(products),
                     [(blocks, slice(lo, hi), None if grad is None else grad_weight[lo:hi])
                      for lo, hi in ranges(channels, threads)])
    else:
        runs = split(_blocks(x, geometry, threads), threads)
        parts = run_parallel(_quietly(products), [(run, slice(None), None) for run in runs])
        if grad is not None:
            grad_weight = parts[0]
            for part in parts[1:]:
                grad_weight += part
    if grad_weight is not None:
        grad_weight = xp.ascontiguousarray(grad_weight)
    return (out if weight2d is not None else None), grad_weight


def _gather(x, weight2d, geometry):
    """Every output pixel = weights . one window of x: im2col, then matmul.

    conv2d's forward, and conv_transpose2d's gradient wrt its input.
    x (N, C, H, W), weight2d (C_out, C*kH*kW) -> out (N, C_out, OH, OW)
    """
    if _tiles_pay(x, weight2d, geometry):
        return _gather_by_tiles(x, weight2d, geometry)
    return _im2col_products(x, geometry, weight2d=weight2d)[0]


def _tiles_pay(x, weight2d, geometry):
    """Whether _gather_by_tiles applies (stride s > 1, kernel and padding multiples of s, no
    dilation) and beats im2col: its product's output, T*T values per output channel and tile,
    is smaller than the tiles themselves (FCN's upsampling, seen backwards: 21 classes, s = 8)."""
    (kH, kW), (sH, sW), (pH, pW), dilation = geometry
    if is_cuda(x) or dilation != (1, 1) or (sH, sW) == (1, 1) or kH % sH or kW % sW or pH % sH or pW % sW:
        return False
    return weight2d.shape[0] * (kH // sH) * (kW // sW) < x.shape[1] * sH * sW


def _gather_by_tiles(x, weight2d, geometry):
    """_gather for a stride s that divides the kernel (k = T*s) and the padding (p = m*s), by tiles.

    Cut x into s x s tiles and stack each tile's pixels as channels ("space to depth"):
    tiles (N, C*s*s, R, Q), tile (Y, X) holding x[n, c, Y*s + u, X*s + v] as channel (c, u, v).
    Output pixel (y, x) reads the T x T tiles from (y - m, x - m) on, so with the kernel cut
    the same way, weight2d[o, (c, a*s + u, b*s + v)] -> taps[(a, b, o), (c, u, v)]:

        out[n, o, y, x] = sum over a, b < T of (taps @ tiles)[(a, b, o), y - m + a, x - m + b]

    one product for every tap offset (a, b), then T*T shifted sums: no im2col, whose columns
    would repeat every pixel of x T*T times.
    """
    (kH, kW), (sH, sW), (pH, pW), _ = geometry
    (TH, TW), (mH, mW) = (kH // sH, kW // sW), (pH // sH, pW // sW)
    N, C = x.shape[:2]
    C_out = weight2d.shape[0]
    OH, OW = _output_shape(x.shape, *geometry)
    R, Q = OH + TH - 1, OW + TW - 1  # the tiles some output reads
    rows, cols = (-mH * sH, (R - mH) * sH), (-mW * sW, (Q - mW) * sW)
    tiles = _window(x, rows, cols).reshape(N, C, R, sH, Q, sW).transpose(0, 1, 3, 5, 2, 4).reshape(N, C * sH * sW, R * Q)
    taps = weight2d.reshape(C_out, C, TH, sH, TW, sW).transpose(2, 4, 0, 1, 3, 5).reshape(TH * TW * C_out, -1)
    products = (taps @ tiles).reshape(N, TH, TW, C_out, R, Q)
    out = products[:, 0, 0, :, :OH, :OW].copy()
    for a in range(TH):
        for b in range(TW):
            if a or b:
                out += products[:, a, b, :, a:a + OH, b:b + OW]
    return out


def _scatter_col2im(y, weight2d, x_shape, geometry):
    """Every pixel of y adds weights * itself onto one window of x: one matmul, then col2im.

    y (N, C_out, OH, OW), weight2d (C_out, C*kH*kW) -> x (N, C, H, W)

    Each input channel c of x gets only the rows of cols of its own taps, so on the CPU
    the threads take a share of the channels each: fc6's input gradient (a 7x7 kernel
    on 512 channels, 4096 wide) is 52 GFLOP at 500x500, too much for one core.
    """
    xp = get_array_module(y)
    N, C = x_shape[:2]
    taps = weight2d.shape[1] // C
    y2d = _channels_first(y)

    def scatter(channels):  # -> x[:, channels]
        c0, c1 = channels
        cols = weight2d[:, c0 * taps:c1 * taps].T @ y2d  # ((c1 - c0)*kH*kW, N*OH*OW)
        return _col2im(cols, (N, c1 - c0) + tuple(x_shape[2:]), *geometry)

    threads = min(C, _threads_for(y, flops=2 * weight2d.size * y2d.shape[1]))
    if threads == 1:
        return scatter((0, C))
    x = xp.empty(x_shape, dtype=y.dtype)

    def scatter_into_x(channels):
        x[:, slice(*channels)] = scatter(channels)

    run_parallel(_quietly(scatter_into_x), ranges(C, threads))
    return x


def _scatter(y, weight, x_shape, geometry):
    """The transposed convolution of y: each of its pixels adds weight * itself onto a window.

    conv_transpose2d's forward, and conv2d's gradient wrt its input.
    y (N, C_out, OH, OW), weight (C_out, C, kH, kW) -> x (N, C, H, W) = x_shape

    The scatter (matmul, then col2im) is the definition. On the CPU most cases are
    rewritten exactly as a gather, which needs no col2im and multiplies in fewer,
    larger products:
    - 1x1 kernel: x = weight2d.T @ y, pixel by pixel.
    - stride 1: each x pixel sums one window of y: a convolution of y by the kernel
      flipped (``_flipped``).
    - stride s, kernel k a multiple of s (FCN's upsampling: k = 2s): split x into its
      s*s phases (x pixels with the same position mod s). Each phase is a convolution
      of y by a (k/s x k/s) sub-kernel; all phases are one convolution with C*s*s
      output channels, interleaved afterwards ("sub-pixel" convolution).
    """
    (kH, kW), (sH, sW), _, (dH, dW) = geometry
    C_out, C = weight.shape[:2]
    if not is_cuda(y):
        if _is_pointwise(geometry):
            return _gather(y, weight.reshape(C_out, C).T, geometry)
        flipped = _flipped(y, weight, x_shape, geometry)
        if flipped is not None:
            return _gather(y, *flipped)
        # a gather reads C_out*k*k/s*s values per x pixel, the scatter C*k*k per y pixel
        cheap = C_out * x_shape[2] * x_shape[3] <= 2 * C * y.shape[2] * y.shape[3] * sH * sW
        if (dH, dW) == (1, 1) and kH % sH == 0 and kW % sW == 0 and cheap:
            return _sub_pixel(y, weight, x_shape, geometry)
    return _scatter_col2im(y, weight.reshape(C_out, -1), x_shape, geometry)


def _flipped(y, weight, x_shape, geometry):
    """Stride 1: x[q] = sum_i y[q + p - d*i] * weight[i], a convolution of y by the flipped
    kernel (C_out and C swapped), padded by d*(k-1) - p.

    -> (flipped weight2d (C, C_out*kH*kW), its geometry), or None where that does not
    apply (stride > 1, padding > d*(k-1)) or costs more than the scatter (y has far more
    channels than x, or far fewer pixels: fc6).
    """
    (kH, kW), stride, (pH, pW), (dH, dW) = geometry
    C_out, C = weight.shape[:2]
    flipped_geometry = ((kH, kW), (1, 1), (dH * (kH - 1) - pH, dW * (kW - 1) - pW), (dH, dW))
    if stride != (1, 1) or min(flipped_geometry[2]) < 0 or \
            _output_shape(y.shape, *flipped_geometry) != tuple(x_shape[2:]) or \
            C_out * x_shape[2] * x_shape[3] > 2 * C * y.shape[2] * y.shape[3]:
        return None
    return weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(C, C_out * kH * kW), flipped_geometry


def _sub_pixel(y, weight, x_shape, geometry):
    """_scatter for a kernel that is a multiple of the stride, as one convolution.

    x[s*q + r - p] = sum_t y[q - t] * weight[s*t + r]  (t < T = k/s taps, phase r < s),
    a convolution of y padded by T-1 with the T taps of phase r reversed.
    """
    (kH, kW), (sH, sW), (pH, pW), _ = geometry
    C_out, C = weight.shape[:2]
    TH, TW = kH // sH, kW // sW
    # weight[o, c, s*t + r] -> sub[(c, rH, rW), (o, TH-1-tH, TW-1-tW)]
    taps = weight.reshape(C_out, C, TH, sH, TW, sW)[:, :, ::-1, :, ::-1, :]
    sub = taps.transpose(1, 3, 5, 0, 2, 4).reshape(C * sH * sW, C_out * TH * TW)
    phases = _gather(y, sub, ((TH, TW), (1, 1), (TH - 1, TW - 1), (1, 1)))  # (N, C*sH*sW, QH, QW)
    N, _, QH, QW = phases.shape
    # interleave: phase (rH, rW) of row q, column u is pixel (s*q + rH, s*u + rW) before the crop by p
    full = phases.reshape(N, C, sH, sW, QH, QW).transpose(0, 1, 4, 2, 5, 3).reshape(N, C, QH * sH, QW * sW)
    H, W = x_shape[2:]
    if (pH, pW) == (0, 0) and full.shape[2:] == (H, W):
        return full
    x = get_array_module(y).zeros(x_shape, dtype=y.dtype)  # what no phase reaches is 0
    h, w = min(H, QH * sH - pH), min(W, QW * sW - pW)
    x[:, :, :h, :w] = full[:, :, pH:pH + h, pW:pW + w]
    return x


# ---- outputs that see only padding ----------------------------------------------
# FCN pads conv1_1 by 100 so that every input size survives the pooling (geometry.py):
# on a 96x96 input, four fifths of conv1_1's 216x216 outputs read nothing but padding,
# and each of them is just the bias. Conv2d computes the others alone, from a window of
# x zero-padded only as far as they read, and fills the rest with the bias.

_MAX_REACHED_FRACTION = 0.75  # below this share of outputs reaching x, compute them alone


def _reach(x_shape, geometry):
    """Which outputs of a convolution of x read any of x, when far from all do (else None):
    ((output rows), (output columns)) as slices, and ((x rows), (x columns)) as (start, stop)
    pairs of the input they read, which run into the padding (start < 0, stop > H)."""
    kernel_size, stride, padding, dilation = geometry
    out_size = _output_shape(x_shape, *geometry)
    outputs, inputs = [], []
    for size, k, s, p, d, out in zip(x_shape[2:], kernel_size, stride, padding, dilation, out_size):
        first = max(0, -(-(p - d * (k - 1)) // s))  # the first window whose last tap reaches row 0
        last = min(out - 1, (size - 1 + p) // s)    # the last window whose first tap is in x
        outputs.append(slice(first, last + 1))
        inputs.append((first * s - p, last * s - p + d * (k - 1) + 1))
    reached = (outputs[0].stop - outputs[0].start) * (outputs[1].stop - outputs[1].start)
    if reached <= 0 or reached >= _MAX_REACHED_FRACTION * out_size[0] * out_size[1]:
        return None
    return tuple(outputs), tuple(inputs)


def _check_inputs(op, x, weight, bias, weight_layout, in_axis, out_axis):
    """Shapes and dtypes of (x, weight, bias); ``in_axis``/``out_axis`` index weight's channels."""
    if x.ndim != 4:
        raise ValueError(f"{op} expects x of shape (N, C_in, H, W), got shape {x.shape}")
    if weight.ndim != 4 or min(weight.shape[2:]) < 1:
        raise ValueError(f"{op} expects weight of shape {weight_layout}, got shape {weight.shape}")
    if x.shape[1] != weight.shape[in_axis]:
        raise ValueError(f"{op}: x of shape {x.shape} has {x.shape[1]} channels but weight of shape "
                         f"{weight.shape} {weight_layout} expects C_in = {weight.shape[in_axis]}")
    if bias is not None and bias.shape != (weight.shape[out_axis],):
        raise ValueError(f"{op} expects bias of shape ({weight.shape[out_axis]},) for weight of "
                         f"shape {weight.shape}, got shape {bias.shape}")
    dtypes = sorted({str(a.dtype) for a in (x, weight, bias) if a is not None})
    if len(dtypes) > 1:
        raise TypeError(f"{op}: x, weight and bias must share one dtype, got {' and '.join(dtypes)}")


def _add_bias(out, bias):
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


# ---- the ops ------------------------------------------------------------------

class Conv2d(Function):
    """out[n, o, oy, ox] = bias[o] + sum_{c,i,j} weight[o, c, i, j] * x[n, c, oy*s - p + i*d, ox*s - p + j*d]

    x (N, C_in, H, W), weight (C_out, C_in, kH, kW), bias (C_out,) or None -> (N, C_out, OH, OW)
    with OH = (H + 2p - d*(kH - 1) - 1) // s + 1 (conv_output_size).
    """

    def __init__(self, stride=1, padding=0, dilation=1):
        self.stride = _pair(stride, "conv2d: stride", minimum=1)
        self.padding = _pair(padding, "conv2d: padding", minimum=0)
        self.dilation = _pair(dilation, "conv2d: dilation", minimum=1)

    def forward(self, x, weight, bias):
        _check_inputs("conv2d", x, weight, bias, "(C_out, C_in, kH, kW)", in_axis=1, out_axis=0)
        kernel_size = weight.shape[2:]
        padded = [size + 2 * p for size, p in zip(x.shape[2:], self.padding)]
        if any(d * (k - 1) + 1 > size for k, d, size in zip(kernel_size, self.dilation, padded)):
            raise ValueError(f"conv2d: kernel {kernel_size[0]}x{kernel_size[1]} with dilation "
                             f"{_show(self.dilation)} is larger than the padded input "
                             f"{padded[0]}x{padded[1]}")
        self.geometry = (kernel_size, self.stride, self.padding, self.dilation)
        self.has_bias = bias is not None
        self.x_shape = x.shape
        self.out_shape = (x.shape[0], weight.shape[0]) + _output_shape(x.shape, *self.geometry)
        self.reach = _reach(x.shape, self.geometry)
        if self.reach is not None:  # most outputs see only padding: compute the others alone
            x, self.geometry = _window(x, *self.reach[1]), (kernel_size, self.stride, (0, 0), self.dilation)
        # Keep x, not cols: cols is kH*kW times larger than x (gigabytes over a VGG
        # at 500x500), while x is kept by the graph anyway. Backward redoes im2col.
        self.save_for_backward(x, weight)
        out = _add_bias(_gather(x, weight.reshape(weight.shape[0], -1), self.geometry), bias)
        if self.reach is None:
            return out
        everywhere = get_array_module(x).empty(self.out_shape, dtype=x.dtype)
        everywhere[...] = 0 if bias is None else bias.reshape(1, -1, 1, 1)  # what padding alone gives
        everywhere[(slice(None), slice(None)) + self.reach[0]] = out
        return everywhere

    def backward(self, grad_out):
        x, weight = self.saved  # x is the window of the input that reaches the outputs, if any
        need_x, need_weight, need_bias = getattr(self, "needs_input_grad", (True, True, True))
        grad_x = grad_weight = grad_bias = None
        if self.has_bias and need_bias:
            grad_bias = channel_sum(grad_out)
        if self.reach is not None:  # only the outputs that reach the input pass gradients back
            grad_out = get_array_module(grad_out).ascontiguousarray(
                grad_out[(slice(None), slice(None)) + self.reach[0]])
        shared = need_x and not is_cuda(x) and not _is_pointwise(self.geometry)  # 1x1 needs no im2col at all
        flipped = _flipped(grad_out, weight, x.shape, self.geometry) if shared else None
        if flipped is not None:
            # Stride 1: grad_x is a convolution of grad_out (see _flipped), and its windows
            # serve the weight gradient too: x @ cols.T is grad_weight, flipped. One im2col.
            grad_x, flipped_grad = _im2col_products(grad_out, flipped[1], weight2d=flipped[0],
                                                    grad=x if need_weight else None)
            if need_weight:  # (C, C_out*kH*kW) with taps reversed -> (C_out, C, kH, kW)
                C_out, C, kH, kW = weight.shape
                flipped_grad = flipped_grad.reshape(C, C_out, kH, kW)[:, :, ::-1, ::-1]
                grad_weight = flipped_grad.transpose(1, 0, 2, 3).copy()
        else:
            if need_weight:  # d out / d weight: grad_out times the windows of x
                grad_weight = _im2col_products(x, self.geometry, grad=grad_out)[1].reshape(weight.shape)
            if need_x:  # d out / d x is a transposed convolution of grad_out with the same weights
                grad_x = _scatter(grad_out, weight, x.shape, self.geometry)
        if grad_x is not None and self.reach is not None:
            grad_x = _unwindow(grad_x, self.x_shape, *self.reach[1])
        return grad_x, grad_weight, grad_bias


class ConvTranspose2d(Function):
    """out[n, o, iy*s - p + i*d, ix*s - p + j*d] += x[n, c, iy, ix] * weight[c, o, i, j], plus bias[o]

    The adjoint of Conv2d: it is conv2d's gradient wrt its input, used forwards.
    x (N, C_in, H, W), weight (C_in, C_out, kH, kW), bias (C_out,) or None -> (N, C_out, OH, OW)
    with OH = (H - 1)*s - 2p + d*(kH - 1) + output_padding + 1, as in PyTorch. A stride-s conv2d
    maps s different input sizes to H; output_padding (extra rows at the bottom, columns at the
    right) picks which of them this op, its adjoint, produces.
    """

    def __init__(self, stride=1, padding=0, output_padding=0, dilation=1):
        self.stride = _pair(stride, "conv_transpose2d: stride", minimum=1)
        self.padding = _pair(padding, "conv_transpose2d: padding", minimum=0)
        self.output_padding = _pair(output_padding, "conv_transpose2d: output_padding", minimum=0)
        self.dilation = _pair(dilation, "conv_transpose2d: dilation", minimum=1)
        if any(op >= s and op >= d for op, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise ValueError(f"conv_transpose2d: output_padding {_show(self.output_padding)} must be "
                             f"smaller than stride {_show(self.stride)} or dilation {_show(self.dilation)}")

    def forward(self, x, weight, bias):
        _check_inputs("conv_transpose2d", x, weight, bias, "(C_in, C_out, kH, kW)", in_axis=0, out_axis=1)
        N, C_in, H, W = x.shape
        kernel_size = weight.shape[2:]
        OH, OW = ((size - 1) * s - 2 * p + d * (k - 1) + op + 1 for size, k, s, p, d, op in zip(
            (H, W), kernel_size, self.stride, self.padding, self.dilation, self.output_padding))
        if OH < 1 or OW < 1:
            raise ValueError(f"conv_transpose2d: output size {OH}x{OW} is not positive (input {H}x{W}, "
                             f"kernel {kernel_size[0]}x{kernel_size[1]}, stride {_show(self.stride)}, "
                             f"padding {_show(self.padding)})")
        self.geometry = (kernel_size, self.stride, self.padding, self.dilation)
        self.has_bias = bias is not None
        self.x_shape = x.shape
        out_shape = (N, weight.shape[1], OH, OW)
        # An output_padding >= stride (allowed when < dilation) gives the output more
        # conv windows than x has pixels: treat x as zero-padded at the bottom/right.
        covered = _output_shape(out_shape, *self.geometry)
        if covered != (H, W):
            x_full = get_array_module(x).zeros((N, C_in) + covered, dtype=x.dtype)
            x_full[:, :, :H, :W] = x
            x = x_full
        self.save_for_backward(x, weight)
        out = _scatter(x, weight, out_shape, self.geometry)
        return _add_bias(out, bias)

    def backward(self, grad_out):
        x, weight = self.saved
        need_x, need_weight, need_bias = getattr(self, "needs_input_grad", (True, True, True))
        # d out / d x is a convolution of grad_out with the same weights, d out / d weight
        # x times the windows of grad_out: both from one pass of im2col over grad_out
        weight2d = weight.reshape(weight.shape[0], -1)
        if need_x and not need_weight:  # FCN's upsampling: frozen bilinear weights
            grad_x, grad_weight = _gather(grad_out, weight2d, self.geometry), None
        else:
            grad_x, grad_weight = _im2col_products(grad_out, self.geometry, weight2d=weight2d if need_x else None,
                                                   grad=x if need_weight else None)
        if need_weight:
            grad_weight = grad_weight.reshape(weight.shape)
        H, W = self.x_shape[2:]
        if need_x and grad_x.shape != self.x_shape:  # drop the windows of the zero padding added in forward
            grad_x = get_array_module(grad_x).ascontiguousarray(grad_x[:, :, :H, :W])
        grad_bias = channel_sum(grad_out) if self.has_bias and need_bias else None
        return grad_x, grad_weight, grad_bias


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation, as in PyTorch); stride, padding, dilation: int or pair.

    x (N, C_in, H, W), weight (C_out, C_in, kH, kW), bias (C_out,) or None -> (N, C_out, OH, OW)
    """
    return Conv2d(stride, padding, dilation)(x, weight, bias)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1):
    """2-D transposed convolution, the gradient of conv2d wrt its input; ints or pairs.

    x (N, C_in, H, W), weight (C_in, C_out, kH, kW), bias (C_out,) or None -> (N, C_out, OH, OW)
    """
    return ConvTranspose2d(stride, padding, output_padding, dilation)(x, weight, bias)
