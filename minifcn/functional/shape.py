"""Ops that move elements without changing them: reshape, transpose,
indexing, the FCN crop layer, and concatenation.

Shape legend: N batch, C channels, H height, W width.
Each backward puts every gradient element back where its value came from.
"""

from minifcn.function import Function
from minifcn.backend import get_array_module, primitives
from minifcn.tensor import Tensor


class Reshape(Function):
    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.x_shape = x.shape
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise ValueError(f"cannot reshape a tensor of shape {x.shape} ({x.size} elements) "
                             f"to {self.shape}") from None

    def backward(self, grad_y):
        return (grad_y.reshape(self.x_shape),)


class Transpose(Function):
    def __init__(self, axes=None):
        self.axes = None if axes is None else tuple(axes)

    def forward(self, x):
        axes = self.axes if self.axes is not None else tuple(reversed(range(x.ndim)))
        if any(not -x.ndim <= a < x.ndim for a in axes) or sorted(a % x.ndim for a in axes) != list(range(x.ndim)):
            raise ValueError(f"axes must be a permutation of 0..{x.ndim - 1}, got {axes}")
        axes = [a % x.ndim for a in axes]
        self.inverse = tuple(sorted(range(x.ndim), key=axes.__getitem__))
        return x.transpose(axes)

    def backward(self, grad_y):
        return (grad_y.transpose(self.inverse),)


class GetItem(Function):
    """y = x[index] for any NumPy index (slices, integers, integer/boolean arrays)."""

    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.x_shape, self.dtype = x.shape, x.dtype
        return x[self.index]

    def backward(self, grad_y):
        xp = get_array_module(grad_y)
        grad_x = xp.zeros(self.x_shape, dtype=self.dtype)
        # add.at, not assignment: an advanced index may pick one element twice
        xp.add.at(grad_x, self.index, grad_y)
        return (grad_x,)


class Crop(Function):
    """The FCN crop layer: cut an (height, width) window at (offset_h, offset_w).

    In the FCN nets the offsets come from the geometry of the layers
    (see minifcn.models.geometry), aligning an upsampled map with its target.
    """

    def __init__(self, offset, size):
        self.offset_h, self.offset_w = offset
        self.height, self.width = size

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"crop expects x of shape (N, C, H, W), got {x.shape}")
        _, _, H, W = x.shape
        if (min(self.offset_h, self.offset_w) < 0 or self.offset_h + self.height > H
                or self.offset_w + self.width > W or min(self.height, self.width) < 1):
            raise ValueError(
                f"crop window at offset ({self.offset_h}, {self.offset_w}) of size "
                f"({self.height}, {self.width}) does not fit in an input of size ({H}, {W})")
        self.x_shape = x.shape
        return primitives(x).crop_forward(x, self.offset_h, self.offset_w, self.height, self.width)

    def backward(self, grad_y):
        return (primitives(grad_y).crop_backward(grad_y, self.x_shape, self.offset_h, self.offset_w),)


class Concat(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        xp = get_array_module(xs[0])
        self.sizes = [x.shape[self.axis] for x in xs]
        try:
            return xp.concatenate(xs, axis=self.axis)
        except ValueError:
            raise ValueError(f"concat along axis {self.axis} needs equal sizes on the other axes, "
                             f"got shapes {[x.shape for x in xs]}") from None

    def backward(self, grad_y):
        xp = get_array_module(grad_y)
        boundaries, total = [], 0
        for size in self.sizes[:-1]:
            total += size
            boundaries.append(total)
        return tuple(xp.split(grad_y, boundaries, axis=self.axis))


def reshape(x, shape):
    return Reshape(shape)(x)


def transpose(x, axes=None):
    return Transpose(axes)(x)


def getitem(x, index):
    if isinstance(index, Tensor):  # an integer Tensor indexes like its array
        index = index.data
    return GetItem(index)(x)


def crop(x, offset, size):
    """x (N, C, H, W) -> (N, C, size[0], size[1]), the window starting at ``offset``."""
    return Crop(offset, size)(x)


def concat(tensors, axis=1):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concat needs at least one tensor, got an empty list")
    return Concat(axis)(*tensors)
