"""im2col in cache-sized blocks, for the fast CPU backend's convolutions (conv.py).

Shape legend as in minifcn.backend.reference.conv: N batch, C channels, H W
input, OH OW output, kH kW kernel, K = C*kH*kW rows of cols.

Nothing builds the whole of cols: for conv1_2 of a 500x500 FCN it is 1.1 GB,
nine times the layer's input. ``column_blocks`` fills a small buffer with the
columns of a few output rows at a time, and each block goes straight into
BLAS: ``weight2d @ cols`` into the output rows, ``grad2d @ cols.T`` into the
weight gradient. For thin layers a block fits in the core's L2 cache, so the
product reads its columns from cache, not from memory. The blocks are
independent, so threads can take a run of blocks each, with their own buffers.

Each block's products are one NumPy call over a stack of narrower products
(``as_runs``): OpenBLAS multiplies thin matrices (8 channels, K = 72) faster when
a product is small enough that it skips packing them, and fewer, larger
NumPy calls hand the GIL between threads less often.
"""

import functools

from minifcn.backend.arrays import get_array_module
from minifcn.backend.cpu import tuning
from minifcn.backend.reference.conv import output_shape


def is_pointwise(geometry):
    """A 1x1 kernel at stride 1 without padding: every window is one pixel, cols is x itself."""
    kernel_size, stride, padding, _ = geometry
    return kernel_size == (1, 1) and stride == (1, 1) and padding == (0, 0)


@functools.lru_cache(maxsize=None)
def product_parts(columns, macs_per_column, macs, min_columns):
    """Into how many equal runs to cut a block of ``columns`` columns for its products: runs of
    about ``macs`` (tuning.PRODUCT_MACS) multiply-adds, for thin layers, where such a run is at least
    ``min_columns`` (tuning.MIN_PRODUCT_COLUMNS) wide; 1 for the others, or when no whole number of
    runs comes near that."""
    width = max(macs // macs_per_column, 1)
    if width < min_columns:  # a wide layer: OpenBLAS packs its products anyway
        return 1
    fewest = -(-columns // width)
    return next((parts for parts in range(fewest, min(2 * fewest, columns) + 1) if columns % parts == 0), 1)


def as_runs(a, parts):
    """a (R, L) -> view (parts, R, L // parts): its columns cut into ``parts`` runs, a stack
    of matrices that one matmul call multiplies one by one (splitting an axis is a view)."""
    R, L = a.shape
    return a.reshape(R, parts, L // parts).transpose(1, 0, 2)


def block_rows(x, geometry, threads=1):
    """The blocks of im2col(x): a list of (n, r0, r1), output rows r0..r1-1 of sample n.

    A block holds about tuning.BLOCK_BYTES of columns, but at least tuning.MIN_BLOCK_COLUMNS
    (which decides for layers with K > ~128) and at most tuning.MAX_BLOCK_COLUMNS. There
    are a multiple of ``threads`` blocks, of near-equal heights, when that is
    possible, so that no thread that takes a run of them waits for the others.
    """
    N, C = x.shape[:2]
    (kH, kW) = geometry[0]
    OH, OW = output_shape(x.shape, *geometry)
    if is_pointwise(geometry):  # one block per sample
        return [(n, 0, OH) for n in range(N)]
    K = C * kH * kW
    rows = max(tuning.BLOCK_BYTES // (K * OW * x.itemsize), -(-tuning.MIN_BLOCK_COLUMNS // OW), 1)
    rows = min(OH, rows, max(tuning.MAX_BLOCK_COLUMNS // OW, 1))
    per_sample = -(-OH // rows)
    while (N * per_sample) % threads and per_sample < OH:
        per_sample += 1
    bounds = [OH * k // per_sample for k in range(per_sample + 1)]  # near-equal heights
    return [(n, r0, r1) for n in range(N) for r0, r1 in zip(bounds, bounds[1:])]


def column_blocks(x, padded, geometry, blocks):
    """Yield (n, columns, cols) with cols = im2col(x[n:n+1])[:, columns], for each of ``blocks``.

    x (N, C, H, W), padded = zero_padded(x, padding) (None for a same-size convolution)
    -> cols (C*kH*kW, len(columns)); blocks from ``block_rows``. The cols of one block are
    only valid until the next is asked for (one buffer per call, so each thread that
    calls this has its own).
    """
    xp = get_array_module(x)
    (kH, kW), (sH, sW), _, (dH, dW) = geometry
    N, C, H, W = x.shape
    OH, OW = output_shape(x.shape, *geometry)
    if is_pointwise(geometry):  # 1x1: the columns are the pixels of x, no copy
        for n, _, _ in blocks:
            yield n, slice(None), x[n].reshape(C, H * W)
        return
    if padded is None:  # a same-size convolution
        yield from same_size_column_blocks(x, geometry, blocks)
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


def is_same_size(x_shape, geometry):
    """Stride 1, padding d*(k-1)/2 on both axes (VGG's 3x3 convolutions, padding 1):
    the output has x's height and width, and im2col needs no padded copy of x."""
    (kH, kW), stride, (pH, pW), (dH, dW) = geometry
    return stride == (1, 1) and 2 * pH == dH * (kH - 1) and 2 * pW == dW * (kW - 1) and pW < x_shape[3]


def same_size_column_blocks(x, geometry, blocks):
    """column_blocks for a same-size convolution (``is_same_size``), from x itself.

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
    assert is_same_size(x.shape, geometry) and x.flags.c_contiguous, "the views below read x's memory"
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

