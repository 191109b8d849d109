"""Cropping, the readable reference: FCN's crop layer and its gradient.

Shape legend: N batch, C channels, H W input height and width.
"""

from minifcn.backend.arrays import get_array_module


def crop_forward(x, offset_h, offset_w, height, width):
    """x (N, C, H, W) -> x[:, :, offset_h:offset_h+height, offset_w:offset_w+width], contiguous."""
    xp = get_array_module(x)
    return xp.ascontiguousarray(x[:, :, offset_h:offset_h + height, offset_w:offset_w + width])


def crop_backward(grad_y, x_shape, offset_h, offset_w):
    """The window's gradient placed back into zeros of the input's shape."""
    xp = get_array_module(grad_y)
    grad_x = xp.zeros(x_shape, dtype=grad_y.dtype)
    height, width = grad_y.shape[2:]
    grad_x[:, :, offset_h:offset_h + height, offset_w:offset_w + width] = grad_y
    return grad_x
