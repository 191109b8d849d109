"""The Tensor's operators and methods, which are ops: set on the class here.

``x + y`` calls Tensor.__add__, which is the op ``add``. The ops need the
Tensor class, so the Tensor cannot import them; instead importing the ops
(minifcn.functional, which ``import minifcn`` does) gives the class its
operators, as DeZero's ``setup_variable`` does.
"""

from minifcn.backend import check_device
from minifcn.functional import activation, arithmetic, reduction, shape
from minifcn.tensor import Tensor


def to(self, device):
    """This tensor on ``device`` ("cpu" or "cuda"); gradients flow back across."""
    check_device(device)
    return self if device == self.device else arithmetic.to_device_op(self, device)


def tensor_sum(self, axis=None, keepdims=False):
    """The sum over ``axis`` (None: every axis)."""
    return reduction.sum(self, axis, keepdims)


def tensor_mean(self, axis=None, keepdims=False):
    """The mean over ``axis`` (None: every axis)."""
    return reduction.mean(self, axis, keepdims)


def tensor_reshape(self, *sizes):
    """The same values in a new shape (a tuple, or the sizes as arguments)."""
    return shape.reshape(self, sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes)


def tensor_transpose(self, *axes):
    """The axes permuted (none given: reversed)."""
    return shape.transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else (axes or None))


OPERATORS = {
    "__add__": lambda self, other: arithmetic.add(self, other),
    "__radd__": lambda self, other: arithmetic.add(other, self),
    "__sub__": lambda self, other: arithmetic.sub(self, other),
    "__rsub__": lambda self, other: arithmetic.sub(other, self),
    "__mul__": lambda self, other: arithmetic.mul(self, other),
    "__rmul__": lambda self, other: arithmetic.mul(other, self),
    "__truediv__": lambda self, other: arithmetic.div(self, other),
    "__rtruediv__": lambda self, other: arithmetic.div(other, self),
    "__pow__": lambda self, exponent: arithmetic.pow(self, exponent),
    "__rpow__": lambda self, base: arithmetic.pow(base, self),
    "__matmul__": lambda self, other: arithmetic.matmul(self, other),
    "__rmatmul__": lambda self, other: arithmetic.matmul(other, self),
    "__neg__": lambda self: arithmetic.neg(self),
    "__getitem__": lambda self, index: shape.getitem(self, index),
}
"""Python's operators: each calls the op of the same meaning (minifcn.functional)."""

METHODS = {
    "sum": tensor_sum, "mean": tensor_mean, "reshape": tensor_reshape, "transpose": tensor_transpose,
    "T": property(lambda self: shape.transpose(self, None), doc="The axes reversed."),
    "exp": arithmetic.exp, "log": arithmetic.log, "relu": activation.relu, "to": to,
}

for _name, _function in {**OPERATORS, **METHODS}.items():
    setattr(Tensor, _name, _function)
