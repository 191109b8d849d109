"""Max pooling: each output pixel is the largest value in one window of its plane.

Shape legend:
    N batch, C channels, H W input height and width, kH kW window height and
    width, OH OW output height and width. Hyper-parameters are pairs
    (height, width): kernel_size, stride, padding (on each side, as -inf).

Forward remembers where each maximum came from: ``argmax``, a flat index
iy*W + ix into the (unpadded) H x W input plane, the first maximum in
row-major window order winning ties. Backward sends each output gradient
to that one input pixel; where windows overlap, a pixel can win several
windows and its gradients add up.

When the windows tile the plane (kernel == stride, no padding: VGG's 2x2
pools), the CPU takes a shortcut with the same results: windows that do not
overlap are maximised along their rows, then down their columns, by strided
views of x; forward keeps which row and column won (a byte each, not an
int64 index), and backward writes the gradients back the same two ways,
straight into strided slices of grad_x, with no scatter.
"""

import numpy

from minifcn.autograd import Function
from minifcn.backend import get_array_module, is_cuda
from minifcn.functional.conv import _pair, _show
from minifcn.parallel import run_parallel, shares


def pool_output_size(size, kernel, stride, padding, ceil_mode):
    """Output length along one axis, exactly as PyTorch: ceil mode rounds up, but
    the last window must start inside the input or its left padding."""
    span = size + 2 * padding - (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


# ---- the NumPy reference each CUDA kernel must equal --------------------------

def max_pool2d_forward(x, kernel_size, stride, padding, ceil_mode):
    """x (N, C, H, W) -> out (N, C, OH, OW), argmax int64 (N, C, OH, OW).

    One pass per kernel tap t = i*kW + j: the tap's strided (N, C, OH, OW) view
    of the padded input is merged into the running maximum, and ``tap``
    remembers which t holds it. Then argmax = window corner + offset of tap.
    """
    xp = get_array_module(x)
    (kH, kW), (sH, sW), (pH, pW) = (_pair(kernel_size, "kernel_size", 1), _pair(stride, "stride", 1),
                                    _pair(padding, "padding", 0))
    N, C, H, W = x.shape
    OH, OW = pool_output_size(H, kH, sH, pH, ceil_mode), pool_output_size(W, kW, sW, pW, ceil_mode)
    # rows and columns the windows reach (in ceil mode the last ones may overhang the padding)
    Hp, Wp = max(H + 2 * pH, (OH - 1) * sH + kH), max(W + 2 * pW, (OW - 1) * sW + kW)
    if (pH, pW) == (0, 0) and (Hp, Wp) == (H, W):
        padded = x  # no copy, e.g. kernel == stride dividing the input (VGG's 2x2 pools)
    else:
        padded = xp.full((N, C, Hp, Wp), -xp.inf, dtype=x.dtype)
        padded[:, :, pH:pH + H, pW:pW + W] = x

    def window_tap(i, j):  # padded x at (oy*s + i, ox*s + j) for every (n, c, oy, ox)
        return padded[:, :, i:i + sH * (OH - 1) + 1:sH, j:j + sW * (OW - 1) + 1:sW]

    out = window_tap(0, 0).copy()
    merged = xp.empty_like(out)
    rose = xp.empty(out.shape, dtype=bool)
    tap_type = numpy.min_scalar_type(kH * kW - 1).type
    tap = xp.zeros(out.shape, dtype=tap_type)
    for t in range(1, kH * kW):
        candidate = window_tap(*divmod(t, kW))
        xp.maximum(out, candidate, out=merged)  # NaN propagates, as in PyTorch
        _rises(candidate, out, rose)
        out, merged = merged, out
        # t exceeds every earlier tap, so this writes t exactly where the maximum rose
        # (the masked assignment tap[rose] = t does the same, several times slower).
        xp.maximum(tap, rose * tap_type(t), out=tap)

    tap_offset = (xp.arange(kH).reshape(kH, 1) * W + xp.arange(kW)).reshape(-1)   # i*W + j
    corner_y, corner_x = xp.arange(OH) * sH - pH, xp.arange(OW) * sW - pW
    argmax = tap_offset[tap] + (corner_y.reshape(OH, 1) * W + corner_x)
    if pH or pW:
        # A window of nothing but -inf keeps its first tap, which may be padding. PyTorch
        # names the first pixel of the window inside the input: its corner, clamped.
        clamped = xp.maximum(corner_y, 0).reshape(OH, 1) * W + xp.maximum(corner_x, 0)
        argmax = xp.where(xp.isneginf(out), clamped, argmax)
    return out, argmax


def max_pool2d_backward(grad_out, argmax, x_shape):
    """grad_out (N, C, OH, OW), argmax (N, C, OH, OW) -> grad_x (N, C, H, W):
    each output gradient added to the input pixel its window's maximum came from."""
    xp = get_array_module(grad_out)
    N, C, H, W = x_shape
    grad_x = xp.zeros(N * C * H * W, dtype=grad_out.dtype)
    plane_start = (xp.arange(N * C) * (H * W)).reshape(N * C, 1)
    flat = (argmax.reshape(N * C, -1) + plane_start).reshape(-1)
    xp.add.at(grad_x, flat, grad_out.reshape(-1))  # add, not assign: a pixel may win several windows
    return grad_x.reshape(x_shape)


def _rises(candidate, best, rose):
    """rose = where ``candidate`` takes the argmax from ``best``: strictly larger (so the
    first maximum wins ties), or NaN (so a NaN window points at its last NaN, a real
    pixel, as the CUDA kernel and PyTorch do, never at the -inf padding)."""
    xp = get_array_module(candidate)
    xp.greater(candidate, best, out=rose)
    rose |= xp.isnan(candidate)


# ---- windows that tile the plane: kernel == stride, no padding ----------------

def _first_max(views, best=None, index=None):
    """Element-wise maximum of same-shape ``views``, and the index (uint8) of the view that
    holds it, by max_pool2d_forward's rule (``_rises``): the first maximum, or the last NaN.
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
        _rises(views[1], views[0], index.view(bool))
        return best, index
    index[...] = 0
    best = xp.maximum(views[0], views[1], out=best)  # from here on updated in place
    rose = xp.empty(best.shape, dtype=bool)
    for t in range(1, len(views)):
        _rises(views[t], views[0] if t == 1 else best, rose)
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


# Reads and writes of x-sized arrays in a tiled pool, forward or backward, roughly (each
# stage makes several passes, the first over all of x): with MIN_SHARED_BYTES, pools of x
# from 2.7 MB on are shared among the threads (the 2x8x216x216 ones of the default step).
_PASSES = 6


def _tiles_in_shares(x, kernel_size, out_size):
    """max_pool2d_tiles_forward, on large inputs with one share of the channels per thread
    (minifcn.parallel.shares): each channel is pooled on its own."""
    xp = get_array_module(x)
    pieces = shares(x.shape[1], _PASSES * x.nbytes)
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
    pieces = shares(C, _PASSES * N * C * H * W * grad_out.itemsize)
    if len(pieces) == 1:
        return max_pool2d_tiles_backward(grad_out, row, col, x_shape, kernel_size)
    grad_x = get_array_module(grad_out).empty(x_shape, dtype=grad_out.dtype)
    run_parallel(lambda c: max_pool2d_tiles_backward(
        grad_out[:, slice(*c)], row[:, slice(*c)], col[:, slice(*c)], (N, c[1] - c[0], H, W), kernel_size,
        grad_x[:, slice(*c)]), pieces)
    return grad_x


# ---- the op -------------------------------------------------------------------

class MaxPool2d(Function):
    """out[n, c, oy, ox] = max over the window at (oy*s - p, ox*s - p) of x[n, c], padding = -inf

    x (N, C, H, W) -> (N, C, OH, OW), OH = pool_output_size(H, kH, sH, pH, ceil_mode)
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        self.kernel_size = _pair(kernel_size, "max_pool2d: kernel_size", minimum=1)
        self.stride = self.kernel_size if stride is None else _pair(stride, "max_pool2d: stride", minimum=1)
        self.padding = _pair(padding, "max_pool2d: padding", minimum=0)
        self.ceil_mode = bool(ceil_mode)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"max_pool2d: padding {_show(self.padding)} must be at most half the "
                             f"kernel size {_show(self.kernel_size)}")

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"max_pool2d expects x of shape (N, C, H, W), got shape {x.shape}")
        out_size = [pool_output_size(size, k, s, p, self.ceil_mode) for size, k, s, p
                    in zip(x.shape[2:], self.kernel_size, self.stride, self.padding)]
        if min(out_size) < 1:
            raise ValueError(f"max_pool2d: kernel {self.kernel_size[0]}x{self.kernel_size[1]} is larger "
                             f"than the padded input {x.shape[2] + 2 * self.padding[0]}x"
                             f"{x.shape[3] + 2 * self.padding[1]}")
        self.x_shape = x.shape
        self.tiled = not is_cuda(x) and self.kernel_size == self.stride and self.padding == (0, 0)
        if self.tiled:
            out, row, col = _tiles_in_shares(x, self.kernel_size, tuple(out_size))
            self.save_for_backward(row, col)
            return out
        args = (x, self.kernel_size, self.stride, self.padding, self.ceil_mode)
        if is_cuda(x):
            from minifcn import cuda
            out, argmax = cuda.max_pool2d_forward(*args)
        else:
            out, argmax = max_pool2d_forward(*args)
        self.save_for_backward(argmax)
        return out

    def backward(self, grad_out):
        if self.tiled:
            row, col = self.saved
            return (_tiles_backward_in_shares(grad_out, row, col, self.x_shape, self.kernel_size),)
        (argmax,) = self.saved
        if is_cuda(grad_out):
            from minifcn import cuda
            return (cuda.max_pool2d_backward(grad_out, argmax, self.x_shape),)
        return (max_pool2d_backward(grad_out, argmax, self.x_shape),)


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False):
    """Max pooling (PyTorch semantics); stride defaults to kernel_size; ints or pairs.

    x (N, C, H, W) -> (N, C, OH, OW)
    """
    return MaxPool2d(kernel_size, stride, padding, ceil_mode)(x)
