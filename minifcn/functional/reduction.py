"""Sums and means over axes.

Shapes: x any; ``axis`` None (all axes, result shape ()), an int or a tuple.
Backward spreads the output gradient back over the reduced axes: every
summed element moved the sum one-for-one (and 1/count for the mean).
"""

import contextlib

import numpy

from minifcn.autograd import Function
from minifcn.backend import get_array_module


def per_channel(x):
    """x (N, C, ...) as (N, C, L), L = H*W: each (n, c) row is contiguous, so sums run fast."""
    N, C = x.shape[:2]
    return x.reshape(N, C, x.size // max(N * C, 1))


@contextlib.contextmanager
def per_channel_passes(xp):
    """A with-block for element-wise passes between (N, C, L) arrays and per-channel
    (1, C, 1) columns (BatchNorm's), on the CPU with NumPy's ufunc buffer at 64 elements.

    NumPy runs such a pass, with rows shorter than its 8192-element buffer, through its
    buffered loop: 2.5-3x as slow as a plain pass at 54x54 and 27x27, while with a small
    buffer it is as fast as one (bench/RESULTS.md, round 6). A pass that casts (a bool
    mask times floats) gets slower with a small buffer instead, so none belongs inside.
    The buffer size is per thread, and restored on leaving.
    """
    if xp is not numpy:
        yield
        return
    previous = numpy.setbufsize(64)
    try:
        yield
    finally:
        numpy.setbufsize(previous)


def channel_sum(x):
    """x (N, C, ...) or its (N, C, L) view -> (C,): the sum of each channel (a plain array op).

    As a product with a vector of ones, (N, C, L) @ (L,): BLAS reads each row once and
    sums it in blocks, 2-4x as fast as x.sum(axis=(0, 2, 3)) over a convolution's output
    and as accurate (NumPy's pairwise sum over the last axis is blocked alike).
    """
    rows = per_channel(x)
    return (rows @ get_array_module(x).ones(rows.shape[2], dtype=x.dtype)).sum(axis=0)


def _normalize_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dims")
    if len({a % max(ndim, 1) for a in axes}) != len(axes):
        raise ValueError(f"axis {axis} names an axis twice")
    return tuple(sorted(a % ndim for a in axes)) if ndim else ()


def _expand_back(grad, x_shape, axes, keepdims):
    """Broadcast a reduced gradient back to the input's shape (a real copy)."""
    xp = get_array_module(grad)
    if not keepdims:
        grad = grad.reshape([1 if i in axes else n for i, n in enumerate(x_shape)])
    return xp.broadcast_to(grad, x_shape).copy()  # not ascontiguousarray: it turns shape () into (1,)


class Sum(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.x_shape = x.shape
        self.axes = _normalize_axes(self.axis, x.ndim)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, grad_y):
        return (_expand_back(grad_y, self.x_shape, self.axes, self.keepdims),)


class Mean(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.x_shape = x.shape
        self.axes = _normalize_axes(self.axis, x.ndim)
        self.count = 1
        for a in self.axes:
            self.count *= x.shape[a]
        return x.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, grad_y):
        grad = _expand_back(grad_y, self.x_shape, self.axes, self.keepdims)
        return (grad / grad.dtype.type(self.count),)


def sum(x, axis=None, keepdims=False):  # noqa: A001 - the familiar name
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims=False):
    return Mean(axis, keepdims)(x)
