"""The Tensor's operators and methods, which are ops: set on the class here.

``x + y`` calls Tensor.__add__, which is the op ``add``. The ops need the
Tensor class, so the Tensor cannot import them; instead importing the ops
(minifcn.functional, which ``import minifcn`` does) gives the class its
operators, as DeZero's ``setup_variable`` does.
"""

from minifcn.backend import check_device
from minifcn.functional.activation import relu
from minifcn.functional.arithmetic import add, div, exp, log, matmul, mul, neg, pow, sub, to_device_op
from minifcn.functional.reduction import mean, sum
from minifcn.functional.shape import getitem, reshape, transpose
from minifcn.tensor import Tensor


def _to(self, device):
    """This tensor on ``device`` ("cpu" or "cuda"); gradients flow back across."""
    check_device(device)
    return self if device == self.device else to_device_op(self, device)


def _reshape(self, *shape):
    return reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)


def _transpose(self, *axes):
    return transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else (axes or None))


OPERATORS = {
    "__add__": lambda self, other: add(self, other),
    "__radd__": lambda self, other: add(other, self),
    "__sub__": lambda self, other: sub(self, other),
    "__rsub__": lambda self, other: sub(other, self),
    "__mul__": lambda self, other: mul(self, other),
    "__rmul__": lambda self, other: mul(other, self),
    "__truediv__": lambda self, other: div(self, other),
    "__rtruediv__": lambda self, other: div(other, self),
    "__pow__": lambda self, exponent: pow(self, exponent),
    "__rpow__": lambda self, base: pow(base, self),
    "__matmul__": lambda self, other: matmul(self, other),
    "__rmatmul__": lambda self, other: matmul(other, self),
    "__neg__": lambda self: neg(self),
    "__getitem__": lambda self, index: getitem(self, index),
    "sum": lambda self, axis=None, keepdims=False: sum(self, axis, keepdims),
    "mean": lambda self, axis=None, keepdims=False: mean(self, axis, keepdims),
    "exp": lambda self: exp(self),
    "log": lambda self: log(self),
    "relu": lambda self: relu(self),
    "reshape": _reshape,
    "transpose": _transpose,
    "T": property(lambda self: transpose(self, None)),
    "to": _to,
}

for _name, _method in OPERATORS.items():
    setattr(Tensor, _name, _method)
