"""Bilinear and nearest resampling, the readable reference: two matrix products.

Shape legend: N batch, C channels, H W input, OH OW output height and width.
Along each axis resampling is a matrix A (out, in), so y = A_h @ x @ A_w^T and
its gradient is the transpose, grad_x = A_h^T @ grad_y @ A_w. Where each output
pixel reads from follows PyTorch exactly (see minifcn.functional.resample).

The products run as BLAS matrix multiplies, faster on a CPU than gathering the
two neighbours of every pixel. A NaN in x therefore spreads to its whole (n, c)
map here (0 * NaN is NaN), where PyTorch and the CUDA kernel, which gather,
keep it local; a non-finite input gives a non-finite output either way.
"""

import numpy

from minifcn.backend.arrays import get_array_module


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
