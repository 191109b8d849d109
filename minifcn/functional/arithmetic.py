"""Elementwise arithmetic with NumPy broadcasting, and matrix multiply.

Shapes: any; binary ops broadcast as NumPy does. The gradient of a
broadcast input is the output gradient summed over the broadcast axes
(``sum_to``): every copy of a broadcast element contributed to the loss.
"""

import numpy

from minifcn.function import Function
from minifcn.backend import get_array_module, to_device
from minifcn.tensor import Tensor


def sum_to(grad, shape):
    """Sum ``grad`` down to ``shape``, undoing NumPy broadcasting."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, size in enumerate(shape) if size == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


def as_tensor_like(value, reference):
    """A Python number or array as a Tensor with ``reference``'s dtype and device,
    so that ``x * 0.5`` stays float32 and lives where ``x`` lives."""
    if isinstance(value, Tensor):
        return value
    xp = get_array_module(reference.data)
    array = xp.asarray(to_device(value, reference.device) if hasattr(value, "shape") else value)
    if array.dtype.kind in "biuf":
        array = array.astype(reference.dtype, copy=False)
    return Tensor.from_array(array)


def _binary_operands(x, y):
    if isinstance(x, Tensor):
        return x, as_tensor_like(y, x)
    if isinstance(y, Tensor):
        return as_tensor_like(x, y), y
    return Tensor(x), Tensor(y)


def _elementwise_operands(op, x, y):
    """The two operands as Tensors, after checking that their shapes broadcast."""
    x, y = _binary_operands(x, y)
    try:
        numpy.broadcast_shapes(x.shape, y.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {x.shape} and {y.shape} cannot be broadcast together") from None
    return x, y


class Add(Function):
    def forward(self, x, y):
        self.shapes = x.shape, y.shape
        return x + y

    def backward(self, grad_z):
        x_shape, y_shape = self.shapes
        return sum_to(grad_z, x_shape), sum_to(grad_z, y_shape)


class Sub(Function):
    def forward(self, x, y):
        self.shapes = x.shape, y.shape
        return x - y

    def backward(self, grad_z):
        x_shape, y_shape = self.shapes
        return sum_to(grad_z, x_shape), sum_to(-grad_z, y_shape)


class Mul(Function):
    def forward(self, x, y):
        self.save_for_backward(x, y)
        return x * y

    def backward(self, grad_z):
        x, y = self.saved
        return sum_to(grad_z * y, x.shape), sum_to(grad_z * x, y.shape)


class Div(Function):
    def forward(self, x, y):
        self.save_for_backward(x, y)
        return x / y

    def backward(self, grad_z):
        x, y = self.saved
        grad_x = grad_z / y
        return sum_to(grad_x, x.shape), sum_to(-grad_x * x / y, y.shape)


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, grad_z):
        return (-grad_z,)


class Pow(Function):
    """z = x ** y; d/dx = y x^(y-1), d/dy = x^y log x (only where x > 0)."""

    def forward(self, x, y):
        z = x ** y
        self.save_for_backward(x, y, z)
        return z

    def backward(self, grad_z):
        x, y, z = self.saved
        xp = get_array_module(x)
        grad_x = grad_z * y * x ** (y - 1)
        safe_log = xp.log(xp.where(x > 0, x, 1))  # x^y log x -> 0 as x -> 0+; undefined for x < 0
        grad_y = grad_z * z * safe_log
        return sum_to(grad_x, x.shape), sum_to(grad_y, y.shape)


class Exp(Function):
    def forward(self, x):
        z = get_array_module(x).exp(x)
        self.save_for_backward(z)
        return z

    def backward(self, grad_z):
        (z,) = self.saved
        return (grad_z * z,)


class Log(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return get_array_module(x).log(x)

    def backward(self, grad_z):
        (x,) = self.saved
        return (grad_z / x,)


class MatMul(Function):
    """z = x @ y for x (..., M, K), y (..., K, N) -> (..., M, N), batch axes broadcast."""

    def forward(self, x, y):
        if x.ndim < 2 or y.ndim < 2:
            raise ValueError(f"matmul needs operands with at least 2 dims, got shapes {x.shape} and {y.shape}")
        if x.shape[-1] != y.shape[-2]:
            raise ValueError(f"matmul: x of shape {x.shape} has {x.shape[-1]} columns but y of shape "
                             f"{y.shape} has {y.shape[-2]} rows")
        self.save_for_backward(x, y)
        return x @ y

    def backward(self, grad_z):
        x, y = self.saved
        grad_x = grad_z @ y.swapaxes(-1, -2)
        grad_y = x.swapaxes(-1, -2) @ grad_z
        return sum_to(grad_x, x.shape), sum_to(grad_y, y.shape)


class ToDevice(Function):
    """Copy to another device; the gradient is copied back."""

    def __init__(self, device):
        self.device = device

    def forward(self, x):
        self.source_device = "cuda" if type(x).__module__.startswith("cupy") else "cpu"
        return to_device(x, self.device)

    def backward(self, grad_z):
        return (to_device(grad_z, self.source_device),)


def add(x, y):
    return Add()(*_elementwise_operands("add", x, y))


def sub(x, y):
    return Sub()(*_elementwise_operands("sub", x, y))


def mul(x, y):
    return Mul()(*_elementwise_operands("mul", x, y))


def div(x, y):
    return Div()(*_elementwise_operands("div", x, y))


def neg(x):
    return Neg()(x)


def pow(x, y):  # noqa: A001 - mirrors the operator's name, as torch.pow does
    return Pow()(*_elementwise_operands("pow", x, y))


def exp(x):
    return Exp()(x)


def log(x):
    return Log()(x)


def matmul(x, y):
    return MatMul()(*_binary_operands(x, y))


def to_device_op(x, device):
    return ToDevice(device)(x)
