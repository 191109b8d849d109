"""Outputs of a convolution that read only padding, for the fast backends to skip.

FCN pads conv1_1 by 100 so that every input size survives the pooling
(minifcn.models.geometry): on a 96x96 input four fifths of conv1_1's 216x216
outputs read nothing but zeros, so each of them is 0 (the op adds the bias).
The CPU and CUDA backends compute the others alone, from a window of x
zero-padded only as far as they read; the reference computes them all.
"""

from minifcn.backend.arrays import get_array_module
from minifcn.backend.reference.conv import output_shape

MAX_REACHED_FRACTION = 0.75  # when fewer outputs than this reach x, compute them alone


def _overlap(span, size):
    """Where rows span[0]..span[1]-1 meet rows 0..size-1: (slice of x, slice of the window)."""
    lo, hi = max(span[0], 0), min(span[1], size)
    return slice(lo, max(lo, hi)), slice(lo - span[0], max(lo, hi) - span[0])


def window(x, rows, cols):
    """x (N, C, H, W) -> its rows rows[0]..rows[1]-1 and columns cols[0]..cols[1]-1, 0 outside x
    (x itself when that is all of x)."""
    if (rows, cols) == ((0, x.shape[2]), (0, x.shape[3])):
        return x
    (x_rows, w_rows), (x_cols, w_cols) = _overlap(rows, x.shape[2]), _overlap(cols, x.shape[3])
    part = get_array_module(x).zeros(x.shape[:2] + (rows[1] - rows[0], cols[1] - cols[0]), dtype=x.dtype)
    part[:, :, w_rows, w_cols] = x[:, :, x_rows, x_cols]
    return part


def unwindow(grad_window, x_shape, rows, cols):
    """The adjoint of window: the gradient of the window -> the gradient of x (0 where unread)."""
    (x_rows, w_rows), (x_cols, w_cols) = _overlap(rows, x_shape[2]), _overlap(cols, x_shape[3])
    grad_x = get_array_module(grad_window).zeros(x_shape, dtype=grad_window.dtype)
    grad_x[:, :, x_rows, x_cols] = grad_window[:, :, w_rows, w_cols]
    return grad_x


def reach(x_shape, geometry, max_fraction=MAX_REACHED_FRACTION):
    """Which outputs of a convolution of x read any of x, when fewer than ``max_fraction`` of
    them do (else None): ((output rows), (output columns)) as slices, and ((x rows), (x columns))
    as (start, stop) pairs of the input they read, which run into the padding."""
    kernel_size, stride, padding, dilation = geometry
    out_size = output_shape(x_shape, *geometry)
    outputs, inputs = [], []
    for size, k, s, p, d, out in zip(x_shape[2:], kernel_size, stride, padding, dilation, out_size):
        first = max(0, -(-(p - d * (k - 1)) // s))  # the first window whose last tap reaches row 0
        last = min(out - 1, (size - 1 + p) // s)    # the last window whose first tap is in x
        outputs.append(slice(first, last + 1))
        inputs.append((first * s - p, last * s - p + d * (k - 1) + 1))
    reached = (outputs[0].stop - outputs[0].start) * (outputs[1].stop - outputs[1].start)
    if reached <= 0 or reached >= max_fraction * out_size[0] * out_size[1]:
        return None
    return tuple(outputs), tuple(inputs)


def _unpadded(geometry):
    kernel_size, stride, _, dilation = geometry
    return kernel_size, stride, (0, 0), dilation


def gather_reaching_x(gather, x, weight2d, geometry, max_fraction=MAX_REACHED_FRACTION):
    """gather(x, weight2d, geometry), computed only for the outputs that read x (0 elsewhere)."""
    reached = reach(x.shape, geometry, max_fraction)
    if reached is None:
        return gather(x, weight2d, geometry)
    out = get_array_module(x).zeros((x.shape[0], weight2d.shape[0]) + output_shape(x.shape, *geometry),
                                    dtype=x.dtype)
    out[(slice(None), slice(None)) + reached[0]] = gather(window(x, *reached[1]), weight2d, _unpadded(geometry))
    return out


def conv2d_backward_reaching_x(conv2d_backward, x, weight2d, grad_out, geometry, need_x, need_weight,
                               max_fraction=MAX_REACHED_FRACTION):
    """conv2d_backward(...), from the outputs that read x only: the others pass nothing back."""
    reached = reach(x.shape, geometry, max_fraction)
    if reached is None:
        return conv2d_backward(x, weight2d, grad_out, geometry, need_x, need_weight)
    xp = get_array_module(x)
    grad_read = xp.ascontiguousarray(grad_out[(slice(None), slice(None)) + reached[0]])
    grad_x, grad_weight2d = conv2d_backward(window(x, *reached[1]), weight2d, grad_read, _unpadded(geometry),
                                            need_x, need_weight)
    if grad_x is not None:
        grad_x = unwindow(grad_x, x.shape, *reached[1])
    return grad_x, grad_weight2d
