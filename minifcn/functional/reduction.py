"""Sums and means over axes.

Shapes: x any; ``axis`` None (all axes, result shape ()), an int or a tuple.
Backward spreads the output gradient back over the reduced axes: every
summed element moved the sum one-for-one (and 1/count for the mean).
"""

from minifcn.function import Function
from minifcn.backend import get_array_module


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
