"""Resampling: bilinear and nearest-neighbour interpolation (F.interpolate).

Shape legend: N batch, C channels, H, W input height and width, OH, OW output.
x (N, C, H, W) -> y (N, C, OH, OW).

Both modes are linear in x and separable, so along each axis they are a
matrix with one row per output pixel and one column per input pixel:

    y = A_h @ x @ A_w^T          A_h (OH, H), A_w (OW, W)

Row o holds the weights of the input pixels that output o reads: two weights
summing to 1 for bilinear, a single 1 for nearest. The gradient of a linear
map is its transpose, so backward needs no bookkeeping of indices:

    grad_x = A_h^T @ grad_y @ A_w

The products run as BLAS matrix multiplies, several times faster than
gathering the two neighbours of every pixel. (A NaN in x therefore spreads to
its whole (n, c) map, 0 * NaN being NaN, where PyTorch keeps it local; a
non-finite input gives a non-finite output either way.)

Where an output pixel reads from follows PyTorch exactly (ratio = input
pixels per output pixel):
    bilinear, align_corners=True:   src = dst * (in - 1) / (out - 1)      (0 if out == 1)
    bilinear, align_corners=False:  src = max((dst + 0.5) * ratio - 0.5, 0)
    nearest:                        src = min(floor(dst * ratio), in - 1)
with ratio = in / out, except that when the caller gave a scale factor s,
PyTorch uses ratio = 1 / s (output size floor(in * s) makes in / out differ).
Like PyTorch, an axis whose size does not change is copied, and "nearest"
doubles an axis by repeating each pixel twice.
"""

import math
import numbers

import numpy

from minifcn.autograd import Function
from minifcn.backend import get_array_module, is_cuda

MODES = ("bilinear", "nearest")


def _source_ratio(in_size, out_size, scale):
    """Input pixels per output pixel (align_corners=False), as PyTorch computes it."""
    return 1.0 / scale if scale is not None else in_size / out_size


def _nearest_source(in_size, out_size, scale):
    """Index of the input pixel each output pixel copies (PyTorch's 'nearest')."""
    dst = numpy.arange(out_size)
    if out_size == 2 * in_size:  # PyTorch's special case (nearest_idx), even for a scale factor near 2 ...
        return dst // 2
    # ... otherwise it computes in float32 whatever the dtype of x, which decides
    # which pixel wins at exact ties (so here float32 and float64 pick the same pixels)
    ratio = numpy.float32(1.0 / scale) if scale is not None else numpy.float32(in_size) / numpy.float32(out_size)
    src = numpy.floor(dst.astype(numpy.float32) * ratio).astype(numpy.int64)
    return numpy.minimum(src, in_size - 1)


def interpolation_matrix(in_size, out_size, mode, align_corners=False, scale=None):
    """A (out_size, in_size) float64: output pixel o = sum_i A[o, i] * input pixel i."""
    if out_size == in_size:
        # PyTorch copies an axis whose size does not change, even when a scale factor
        # (1 <= s < 1 + 1/in) would otherwise shift its samples by 1/s
        return numpy.eye(in_size)
    dst = numpy.arange(out_size)
    matrix = numpy.zeros((out_size, in_size))
    if mode == "nearest":
        matrix[dst, _nearest_source(in_size, out_size, scale)] = 1.0
        return matrix
    if align_corners:  # the corner pixels of input and output coincide
        src = dst * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:  # pixel centres line up; clamp the half pixel before the first centre
        src = numpy.maximum((dst + 0.5) * _source_ratio(in_size, out_size, scale) - 0.5, 0.0)
    i0 = numpy.minimum(numpy.floor(src).astype(numpy.int64), in_size - 1)
    i1 = numpy.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    # add, not assign: on the last pixel i1 == i0 and the two weights add up to 1
    numpy.add.at(matrix, (dst, i0), 1.0 - w1)
    numpy.add.at(matrix, (dst, i1), w1)
    return matrix


def _axis_matrices(xp, in_size, out_size, mode, align_corners, scales, dtype):
    scales = scales if scales is not None else (None, None)
    return tuple(
        xp.asarray(interpolation_matrix(i, o, mode, align_corners, s), dtype=dtype)
        for i, o, s in zip(in_size, out_size, scales))


def interpolate_forward(x, size, mode, align_corners, scales=None):
    """x (N, C, H, W) -> y (N, C, OH, OW), size = (OH, OW).

    scales: the (h, w) scale factors the caller gave, or None; they set the source
    ratio to 1 / scale instead of in / out (PyTorch's rule; ignored with align_corners).
    """
    xp = get_array_module(x)
    a_h, a_w = _axis_matrices(xp, x.shape[2:], size, mode, align_corners, scales, x.dtype)
    return a_h @ x @ a_w.T


def interpolate_backward(grad_y, in_size, mode, align_corners, scales=None):
    """grad_y (N, C, OH, OW) -> grad_x (N, C, H, W), in_size = (H, W): the transpose."""
    xp = get_array_module(grad_y)
    a_h, a_w = _axis_matrices(xp, in_size, grad_y.shape[2:], mode, align_corners, scales, grad_y.dtype)
    return a_h.T @ grad_y @ a_w


class Interpolate(Function):
    def __init__(self, size, mode, align_corners, scales):
        self.size, self.mode, self.align_corners, self.scales = size, mode, align_corners, scales

    def forward(self, x):
        self.in_size = x.shape[2:]
        if is_cuda(x):
            from minifcn import cuda
            return cuda.interpolate_forward(x, self.size, self.mode, self.align_corners, scales=self.scales)
        return interpolate_forward(x, self.size, self.mode, self.align_corners, self.scales)

    def backward(self, grad_y):
        if is_cuda(grad_y):
            from minifcn import cuda
            return (cuda.interpolate_backward(grad_y, self.in_size, self.mode, self.align_corners,
                                              scales=self.scales),)
        return (interpolate_backward(grad_y, self.in_size, self.mode, self.align_corners, self.scales),)


def _pair(value, name):
    """An int/float or a pair of them -> a tuple of two (values are checked by the caller)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or a pair (h, w), got {value!r}")
        return tuple(value)
    return (value, value)


def _output_size(in_size, size, scale_factor):
    """(OH, OW) and the scales to pass on (None when the size was given)."""
    if (size is None) == (scale_factor is None):
        raise ValueError(f"interpolate needs exactly one of size and scale_factor, "
                         f"got size={size!r} and scale_factor={scale_factor!r}")
    if size is not None:
        size = _pair(size, "size")
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"size must be a positive int or a pair of them, got {size!r}")
        return tuple(int(s) for s in size), None
    scales = _pair(scale_factor, "scale_factor")
    if not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) and s > 0
               for s in scales):
        raise ValueError(f"scale_factor must be a positive finite number or a pair of them, "
                         f"got {scale_factor!r}")
    scales = tuple(float(s) for s in scales)
    out = tuple(math.floor(n * s) for n, s in zip(in_size, scales))
    if min(out) < 1:
        raise ValueError(f"scale_factor={scale_factor!r} shrinks an input of size {tuple(in_size)} "
                         f"to {out}; every output side needs at least one pixel")
    return out, scales


def interpolate(x, size=None, scale_factor=None, mode="bilinear", align_corners=False):
    """Resize x (N, C, H, W) to (N, C, OH, OW), as torch.nn.functional.interpolate.

    size: (OH, OW) or one int for both; or scale_factor s (or (sh, sw)), giving
    OH = floor(H * sh). mode "bilinear" or "nearest". align_corners=True makes the
    corner pixels of input and output coincide (bilinear only).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if align_corners is None:
        align_corners = False
    if mode == "nearest" and align_corners:
        raise ValueError("align_corners=True only applies to mode='bilinear'; "
                         "mode='nearest' needs align_corners False or None")
    if len(x.shape) != 4:
        raise ValueError(f"interpolate expects x of shape (N, C, H, W), got shape {tuple(x.shape)}")
    out_size, scales = _output_size(x.shape[2:], size, scale_factor)
    if align_corners:
        scales = None  # PyTorch ignores the scale factor when corners are aligned
    return Interpolate(out_size, mode, bool(align_corners), scales)(x)
