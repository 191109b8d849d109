"""The two products of im2col(x) that convolutions need, in blocks and threads (fast CPU backend).

    out         = weight2d @ cols    (conv2d's forward, conv_transpose2d's grad_x)
    grad_weight = grad2d @ cols.T    (both weight gradients)

cols is never built whole: conv_blocks.py fills it a few output rows at a time.
"""

import numpy

from minifcn.backend.arrays import get_array_module
from minifcn.backend.cpu import tuning
from minifcn.backend.cpu.conv_blocks import as_runs, block_rows, column_blocks, is_same_size, product_parts
from minifcn.backend.cpu.threads import get_num_threads, ranges, run_parallel, split
from minifcn.backend.reference.conv import output_shape, zero_padded


def threads_for(flops):
    """How many threads a product of ``flops`` is worth: handing work to a thread and
    getting it back has a fixed cost, so small convolutions run in the caller."""
    return min(get_num_threads(), max(1, int(flops / max(tuning.MIN_FLOPS_PER_THREAD, 1))))


def quietly(function):
    """``function`` with NumPy's overflow and invalid-value reports off, for work in threads:
    an overflow shows as inf or NaN in the result, which the trainer reports by op, while
    NumPy's warning would depend on which thread ran the block (its error state is per thread)."""
    def quiet(piece):
        with numpy.errstate(over="ignore", invalid="ignore"):
            return function(piece)
    return quiet


def im2col_products(x, geometry, weight2d=None, grad=None):
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
    OH, OW = output_shape(x.shape, *geometry)
    if weight2d is not None:
        out = xp.empty((N, weight2d.shape[0], OH, OW), dtype=x.dtype)
        out2d = out.reshape(N, weight2d.shape[0], OH * OW)
    if grad is not None:
        grad2d = grad.reshape(N, grad.shape[1], OH * OW)
    channels = weight2d.shape[0] if weight2d is not None else grad.shape[1]

    if is_same_size(x.shape, geometry):
        padded = None  # a same-size convolution reads x itself: once contiguous, for every thread
        x = xp.ascontiguousarray(x)
    else:
        padded = zero_padded(x, geometry[2])

    # The weight gradient of a thin layer (few gradient channels) is a long, thin product,
    # which BLAS runs faster as its transpose, cols @ grad2d.T; transposing the small
    # result back costs nothing. For wide layers both orientations run alike, and the
    # transpose of a large result (fc6's 411 MB) would not be free.
    transposed = grad is not None and grad.shape[1] <= tuning.THIN_GRADIENT_CHANNELS
    K = x.shape[1] * geometry[0][0] * geometry[0][1]
    macs_per_column = K * channels

    def products(piece):
        """The products over some blocks for some output channels (``channel_slice``); returns
        the weight gradient's sum over those blocks, also written to ``destination`` if given."""
        blocks, channel_slice, destination = piece
        total = partial = None
        for n, columns, cols in column_blocks(x, padded, geometry, blocks):
            parts = product_parts(cols.shape[1], macs_per_column, tuning.PRODUCT_MACS,
                                  tuning.MIN_PRODUCT_COLUMNS)
            if weight2d is not None:
                xp.matmul(weight2d[channel_slice], as_runs(cols, parts),
                          out=as_runs(out2d[n, channel_slice, columns], parts))
            if grad is not None:
                g = as_runs(grad2d[n, channel_slice, columns], parts)
                a, b = (as_runs(cols, parts), g.transpose(0, 2, 1)) if transposed else \
                    (g, as_runs(cols, parts).transpose(0, 2, 1))
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
    threads = threads_for(flops=2 * products_asked * channels * K * N * OH * OW)
    blocks = block_rows(x, geometry)
    grad_weight = None
    if threads == 1:  # NumPy's float warnings (or errors, under numpy.seterr) as for any op
        grad_weight = products((blocks, slice(None), None))
    elif channels >= tuning.MIN_CHANNELS_PER_THREAD * threads and (
            len(blocks) < threads or grad is not None and channels * K * x.itemsize > tuning.MAX_PARTIAL_BYTES):
        if grad is not None:
            grad_weight = xp.empty((channels, K), dtype=x.dtype)
        run_parallel(quietly(products),
                     [(blocks, slice(lo, hi), None if grad is None else grad_weight[lo:hi])
                      for lo, hi in ranges(channels, threads)])
    else:
        runs = split(block_rows(x, geometry, threads), threads)
        parts = run_parallel(quietly(products), [(run, slice(None), None) for run in runs])
        if grad is not None:
            grad_weight = parts[0]
            for part in parts[1:]:
                grad_weight += part
    if grad_weight is not None:
        grad_weight = xp.ascontiguousarray(grad_weight)
    return (out if weight2d is not None else None), grad_weight
