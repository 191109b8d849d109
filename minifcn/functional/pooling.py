"""Max pooling: each output pixel is the largest value in one window of its plane.

Shape legend:
    N batch, C channels, H W input height and width, kH kW window height and
    width, OH OW output height and width. Hyper-parameters are pairs
    (height, width): kernel_size, stride, padding (on each side, as -inf).

Forward remembers where each maximum came from (``argmax``: in the reference,
a flat index iy*W + ix into the input plane, the first maximum in row-major
window order winning ties). Backward sends each output gradient to that one
input pixel; where windows overlap, a pixel can win several windows and its
gradients add up. The primitives are minifcn.backend's
``max_pool2d_forward`` (the maximum and its argmax) and ``max_pool2d_backward``
(the scatter of the gradients to the argmax).
"""

from minifcn.arguments import pair, show_pair
from minifcn.backend import primitives
from minifcn.backend.reference.pooling import pool_output_size
from minifcn.function import Function


class MaxPool2d(Function):
    """out[n, c, oy, ox] = max over the window at (oy*s - p, ox*s - p) of x[n, c], padding = -inf

    x (N, C, H, W) -> (N, C, OH, OW), OH = pool_output_size(H, kH, sH, pH, ceil_mode)
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        self.kernel_size = pair("max_pool2d: kernel_size", kernel_size, minimum=1)
        self.stride = self.kernel_size if stride is None else pair("max_pool2d: stride", stride, minimum=1)
        self.padding = pair("max_pool2d: padding", padding, minimum=0)
        self.ceil_mode = bool(ceil_mode)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"max_pool2d: padding {show_pair(self.padding)} must be at most half the "
                             f"kernel size {show_pair(self.kernel_size)}")

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"max_pool2d expects x of shape (N, C, H, W), got shape {x.shape}")
        out_size = [pool_output_size(size, k, s, p, self.ceil_mode) for size, k, s, p
                    in zip(x.shape[2:], self.kernel_size, self.stride, self.padding)]
        if min(out_size) < 1:
            raise ValueError(f"max_pool2d: kernel {self.kernel_size[0]}x{self.kernel_size[1]} is larger "
                             f"than the padded input {x.shape[2] + 2 * self.padding[0]}x"
                             f"{x.shape[3] + 2 * self.padding[1]}")
        self.x_shape = x.shape
        self.backend = primitives(x)  # backward must read the argmax in the form this backend wrote it
        # the largest value of each window, and where in x it was
        out, argmax = self.backend.max_pool2d_forward(x, self.kernel_size, self.stride, self.padding,
                                                      self.ceil_mode)
        self.save_for_backward(argmax)
        return out

    def backward(self, grad_out):
        (argmax,) = self.saved
        # each output gradient added to the pixel that won its window: a scatter-add to argmax
        return (self.backend.max_pool2d_backward(grad_out, argmax, self.x_shape),)


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False):
    """Max pooling (PyTorch semantics); stride defaults to kernel_size; ints or pairs.

    x (N, C, H, W) -> (N, C, OH, OW)
    """
    return MaxPool2d(kernel_size, stride, padding, ceil_mode)(x)


__all__ = ["MaxPool2d", "max_pool2d", "pool_output_size"]
