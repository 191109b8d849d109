"""The Tensor: a backend array, its gradient, and the op that made it.

A Tensor wraps a NumPy (CPU) or CuPy (GPU) array in ``.data``. When it
``requires_grad``, ops record themselves on their outputs (``creator``), and
``backward()`` fills ``.grad`` of every leaf tensor it depends on.

Its operators (``+ - * / @ **``, ``.sum()``, ``.reshape()``, ``.to()``, ...)
are ops, so they are defined with the ops, in minifcn/functional/operators.py,
which sets them on the class: the Tensor itself needs no op to exist.
"""

import numpy

from minifcn import backend
from minifcn.autograd import run_backward

_KEPT_DTYPES = (numpy.float32, numpy.float64)


def _as_array(data, dtype):
    """The backend array for ``data``: float32/float64 arrays keep their dtype,
    everything else becomes float32 unless ``dtype`` says otherwise."""
    if isinstance(data, Tensor):
        data = data.data
    if data is None:  # numpy would turn None into NaN: a silent wrong value
        raise TypeError("a Tensor needs numbers or an array of numbers, got None")
    is_array = backend.is_cuda(data) or isinstance(data, numpy.ndarray)
    xp = backend.get_array_module(data)
    if dtype is None:  # lists and Python numbers would become float64: they get float32 too
        dtype = data.dtype if is_array and data.dtype in _KEPT_DTYPES else numpy.float32
    try:
        return xp.asarray(data, dtype=dtype)
    except (TypeError, ValueError) as err:  # strings, ragged lists, objects, unknown dtypes
        raise type(err)(f"cannot make a {getattr(dtype, '__name__', dtype)} Tensor from "
                        f"{type(data).__name__} {data!r:.60}: {err}") from None


class Tensor:
    # Makes `numpy_array * tensor` call Tensor.__rmul__ instead of NumPy looping over us.
    __array_priority__ = 1000

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        self.grad = None
        self.creator = None
        self.requires_grad = False
        self.requires_grad_(requires_grad)

    @classmethod
    def from_array(cls, array, requires_grad=False):
        """Wrap an op's output as is (no dtype conversion)."""
        tensor = cls.__new__(cls)
        tensor.data, tensor.grad, tensor.creator = array, None, None
        tensor.requires_grad = requires_grad
        return tensor

    def requires_grad_(self, requires_grad=True):
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"requires_grad needs a float tensor, got dtype {self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        return self

    # ---- what it is -------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    dtype = property(lambda self: self.data.dtype)
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self.creator is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device!r}{grad})"

    def numpy(self):
        """A NumPy copy of the data, whatever the device."""
        return backend.to_numpy(self.data).copy()

    def item(self):
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return backend.to_numpy(self.data).reshape(()).item()

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor.from_array(self.data)

    # ---- autograd ---------------------------------------------------------
    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into ``.grad`` of every leaf that requires grad."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input had requires_grad=True, or it was made under no_grad())")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.shape != ():
                raise RuntimeError(f"backward() without a gradient needs a scalar (shape ()), "
                                   f"got shape {self.shape}; pass grad= or reduce with .sum()")
            grad = xp.ones((), dtype=self.dtype)
        else:
            grad = _as_array(grad, self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"grad has shape {grad.shape}, expected {self.shape}")
        run_backward(self, grad)

    def zero_grad(self):
        self.grad = None
