"""Max pooling layer."""

from minifcn.functional.pooling import max_pool2d
from minifcn.arguments import pair
from minifcn.nn.module import Module


class MaxPool2d(Module):
    """y = max over each kernel_size window: x (N, C, H, W) -> (N, C, OH, OW).

    stride defaults to kernel_size. With ceil_mode the last, partial window
    is kept (FCN's VGG pools use kernel 2, stride 2, ceil_mode=True, as Caffe does).
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        self.kernel_size = pair("kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else pair("stride", stride, 1)
        self.padding = pair("padding", padding, 0)
        self.ceil_mode = bool(ceil_mode)

    def forward(self, x):
        return max_pool2d(x, self.kernel_size, stride=self.stride, padding=self.padding, ceil_mode=self.ceil_mode)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}")
