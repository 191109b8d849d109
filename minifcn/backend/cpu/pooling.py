"""Max pooling in the fast CPU backend: windows that tile the plane, in two cheap passes.

Shape legend as in minifcn.backend.reference.pooling. When kernel == stride and
there is no padding (VGG's 2x2 pools), windows that do not overlap are
maximised along their rows, then down their columns, by strided views of x;
forward keeps which row and column won (a byte each, not an int64 index), and
backward writes the gradients back the same two ways, straight into strided
slices of grad_x, with no scatter. The winners are the reference's: the first
maximum in row-major order, or the last NaN. Other pools run the reference.
"""

from typing import NamedTuple

import numpy

from minifcn.arguments import pair
from minifcn.backend.arrays import get_array_module
from minifcn.backend.cpu import tuning
from minifcn.backend.cpu.threads import run_parallel, shares
from minifcn.backend.reference import pooling as reference
from minifcn.backend.reference.pooling import pool_output_size, rises


class TileWinners(NamedTuple):
    """Where the maxima of tiling windows came from: the winning row of each window (N, C, OH,
    OW) and the winning column of each window row (N, C, OH*kH, OW), both uint8."""
    row: object
    col: object
    kernel_size: tuple


def max_pool2d_forward(x, kernel_size, stride, padding, ceil_mode):
    """x (N, C, H, W) -> (out (N, C, OH, OW), argmax): the reference's argmax, or TileWinners."""
    kernel_size, stride, padding = (pair("kernel_size", kernel_size, 1), pair("stride", stride, 1),
                                    pair("padding", padding, 0))
    if kernel_size != stride or padding != (0, 0):
        return reference.max_pool2d_forward(x, kernel_size, stride, padding, ceil_mode)
    out_size = tuple(pool_output_size(size, k, k, 0, ceil_mode) for size, k in zip(x.shape[2:], kernel_size))
    out, row, col = _tiles_in_shares(x, kernel_size, out_size)
    return out, TileWinners(row, col, kernel_size)


def max_pool2d_backward(grad_out, argmax, x_shape):
    """grad_out (N, C, OH, OW) -> grad_x (N, C, H, W): each gradient to its window's maximum."""
    if not isinstance(argmax, TileWinners):
        return reference.max_pool2d_backward(grad_out, argmax, x_shape)
    return _tiles_backward_in_shares(grad_out, argmax.row, argmax.col, x_shape, argmax.kernel_size)


def _first_max(views, best=None, index=None):
    """Element-wise maximum of same-shape ``views``, and the index (uint8) of the view that
    holds it, by max_pool2d_forward's rule (``rises``): the first maximum, or the last NaN.
    Into ``best`` and ``index`` when given, else into new arrays."""
    xp = get_array_module(views[0])
    if index is None:
        index = xp.empty(views[0].shape, dtype=numpy.uint8)
    if len(views) == 1:  # a window one pixel wide
        index[...] = 0
        if best is None:
            return views[0].copy(), index
        best[...] = views[0]
        return best, index
    if len(views) == 2:  # VGG's 2x2 pools: the index is 1 exactly where the second view rose
        best = xp.maximum(views[0], views[1], out=best)
        rises(views[1], views[0], index.view(bool))
        return best, index
    index[...] = 0
    best = xp.maximum(views[0], views[1], out=best)  # from here on updated in place
    rose = xp.empty(best.shape, dtype=bool)
    for t in range(1, len(views)):
        rises(views[t], views[0] if t == 1 else best, rose)
        if t > 1:
            xp.maximum(best, views[t], out=best)
        # t exceeds every earlier index: this writes t exactly where the maximum rose
        # (several times faster than the masked assignment index[rose] = t)
        xp.maximum(index, rose.view(numpy.uint8) * numpy.uint8(t), out=index)
    return best, index


def max_pool2d_tiles_forward(x, kernel_size, out_size, outputs=None):
    """x (N, C, H, W) -> out (N, C, OH, OW), row (N, C, OH, OW), col (N, C, OH*kH, OW), both uint8,
    written into ``outputs`` = (out, row, col) when given.

    Windows that tile the plane, maximised in two cheap passes: along the rows of every
    window (col: the column j of the first maximum of each window row), then down the
    window (row: the row i holding the first maximum). The winner, tap i*kW + j with
    j = col[n, c, oy*kH + i, ox], is max_pool2d_forward's argmax: the first maximum in
    row-major order, or the last NaN.
    """
    xp = get_array_module(x)
    (kH, kW), (OH, OW) = kernel_size, out_size
    N, C, H, W = x.shape
    if OH * kH > H or OW * kW > W:  # ceil mode: the last windows overhang; the overhang is -inf
        padded = xp.full((N, C, OH * kH, OW * kW), -xp.inf, dtype=x.dtype)
        padded[:, :, :H, :W] = x
        x = padded
    x = x[:, :, :OH * kH, :OW * kW]  # floor mode leaves the last rows or columns out
    out, row, col = outputs if outputs is not None else (None, None, None)
    row_max, col = _first_max([x[:, :, :, j::kW] for j in range(kW)], index=col)  # (N, C, OH*kH, OW)
    out, row = _first_max([row_max[:, :, i::kH] for i in range(kH)], out, row)    # (N, C, OH, OW)
    return out, row, col


def max_pool2d_tiles_backward(grad_out, row, col, x_shape, kernel_size, grad_x=None):
    """grad_out, row (N, C, OH, OW), col (N, C, OH*kH, OW) -> grad_x (N, C, H, W) (into
    ``grad_x`` when given): each gradient down to its window's winning row, then along
    it to the winning column."""
    xp = get_array_module(grad_out)
    (kH, kW), (OH, OW) = kernel_size, grad_out.shape[2:]
    N, C, H, W = x_shape
    # A product with the 0/1 mask (a masked copy is several times slower); a non-finite
    # gradient then also reaches the window's other pixels, as NaN: non-finite either way.
    grad_rows = xp.empty((N, C, OH * kH, OW), dtype=grad_out.dtype)
    _route(grad_out, row, [grad_rows[:, :, i::kH] for i in range(kH)])
    left_out = OH * kH < H or OW * kW < W  # floor mode: rows or columns no window covers get 0
    overhang = OH * kH > H or OW * kW > W  # ceil mode: the last windows reach past the edge
    into = grad_x if grad_x is not None and not overhang else \
        xp.empty((N, C, max(H, OH * kH), max(W, OW * kW)), dtype=grad_out.dtype)
    if left_out:
        into[...] = 0
    _route(grad_rows, col, [into[:, :, :OH * kH, j:OW * kW:kW] for j in range(kW)])
    if overhang:  # drop it
        if grad_x is None:
            return xp.ascontiguousarray(into[:, :, :H, :W])
        grad_x[...] = into[:, :, :H, :W]
        return grad_x
    return into


def _route(grad, index, outs):
    """outs[t] = grad where index == t, else 0: each gradient to the view that won.

    With two views (2x2 pools) index is 0 or 1, so viewed as bool it is the mask of view 1,
    and view 0 gets the rest, grad - outs[1] (exact: g - g = 0, g - 0 = g): no comparisons.
    """
    xp = get_array_module(grad)
    if len(outs) == 2:
        xp.multiply(grad, index.view(bool), out=outs[1])
        xp.subtract(grad, outs[1], out=outs[0])
        return
    for t, out in enumerate(outs):
        xp.multiply(grad, index == t, out=out)


def _tiles_in_shares(x, kernel_size, out_size):
    """max_pool2d_tiles_forward, on large inputs with one share of the channels per thread
    (threads.shares): each channel is pooled on its own."""
    xp = get_array_module(x)
    pieces = shares(x.shape[1], tuning.POOL_PASSES * x.nbytes)
    if len(pieces) == 1:
        return max_pool2d_tiles_forward(x, kernel_size, out_size)
    N, C = x.shape[:2]
    (kH, _), (OH, OW) = kernel_size, out_size
    outputs = (xp.empty((N, C, OH, OW), dtype=x.dtype), xp.empty((N, C, OH, OW), dtype=numpy.uint8),
               xp.empty((N, C, OH * kH, OW), dtype=numpy.uint8))
    run_parallel(lambda c: max_pool2d_tiles_forward(x[:, slice(*c)], kernel_size, out_size,
                                                    tuple(a[:, slice(*c)] for a in outputs)), pieces)
    return outputs


def _tiles_backward_in_shares(grad_out, row, col, x_shape, kernel_size):
    """max_pool2d_tiles_backward, on large gradients with one share of the channels per thread."""
    N, C, H, W = x_shape
    pieces = shares(C, tuning.POOL_PASSES * N * C * H * W * grad_out.itemsize)
    if len(pieces) == 1:
        return max_pool2d_tiles_backward(grad_out, row, col, x_shape, kernel_size)
    grad_x = get_array_module(grad_out).empty(x_shape, dtype=grad_out.dtype)
    run_parallel(lambda c: max_pool2d_tiles_backward(
        grad_out[:, slice(*c)], row[:, slice(*c)], col[:, slice(*c)], (N, c[1] - c[0], H, W), kernel_size,
        grad_x[:, slice(*c)]), pieces)
    return grad_x
