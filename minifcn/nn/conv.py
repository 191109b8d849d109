"""Convolution layers: Conv2d and its adjoint, ConvTranspose2d (FCN's upsampling layer).

Weights are He-uniform initialised (suits the ReLU that follows), biases zero.
FCN overrides the upsampling layers with ``init.bilinear_`` and the score
layers with ``init.zeros_``.
"""

import numpy

from minifcn.functional.conv import conv2d, conv_transpose2d
from minifcn.nn import init
from minifcn.arguments import check_int, pair
from minifcn.nn.module import Module, Parameter


def _conv_repr(layer, defaults):
    """"3, 64, kernel_size=(3, 3), stride=(1, 1)", settings left at their default omitted."""
    text = f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, stride={layer.stride}"
    for name, default in defaults:
        if getattr(layer, name) != default:
            text += f", {name}={getattr(layer, name)}"
    return text + ("" if layer.bias is not None else ", bias=False")


class Conv2d(Module):
    """y = conv2d(x, weight, bias): x (N, C_in, H, W) -> (N, C_out, OH, OW).

    weight (C_out, C_in, kH, kW), bias (C_out,).
    OH = (H + 2*padding - dilation*(kH-1) - 1) // stride + 1, and likewise OW.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True, dtype=numpy.float32):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, 1)
        self.out_channels = check_int("out_channels", out_channels, 1)
        self.kernel_size = pair("kernel_size", kernel_size, 1)
        self.stride = pair("stride", stride, 1)
        self.padding = pair("padding", padding, 0)
        self.dilation = pair("dilation", dilation, 1)
        self.weight = Parameter(numpy.zeros((self.out_channels, self.in_channels, *self.kernel_size), dtype))
        init.kaiming_uniform_(self.weight)
        self.register_parameter("bias", Parameter(numpy.zeros(self.out_channels, dtype)) if bias else None)

    def forward(self, x):
        return conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                      dilation=self.dilation)

    def extra_repr(self):
        return _conv_repr(self, [("padding", (0, 0)), ("dilation", (1, 1))])


class ConvTranspose2d(Module):
    """y = conv_transpose2d(x, weight, bias): x (N, C_in, H, W) -> (N, C_out, OH, OW).

    weight (C_in, C_out, kH, kW), bias (C_out,).
    OH = (H - 1)*stride - 2*padding + dilation*(kH - 1) + output_padding + 1, and likewise OW.
    It is the gradient of a Conv2d with the same settings: each input pixel
    "stamps" the kernel, scaled by its value, onto the output every
    ``stride`` pixels.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 bias=True, dilation=1, dtype=numpy.float32):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, 1)
        self.out_channels = check_int("out_channels", out_channels, 1)
        self.kernel_size = pair("kernel_size", kernel_size, 1)
        self.stride = pair("stride", stride, 1)
        self.padding = pair("padding", padding, 0)
        self.output_padding = pair("output_padding", output_padding, 0)
        self.dilation = pair("dilation", dilation, 1)
        if any(op >= s and op >= d for op, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise ValueError(f"output_padding must be smaller than stride or dilation, got output_padding="
                             f"{self.output_padding}, stride={self.stride}, dilation={self.dilation}")
        self.weight = Parameter(numpy.zeros((self.in_channels, self.out_channels, *self.kernel_size), dtype))
        # One output pixel sees about C_in * kH * kW / (sH * sW) input values.
        fan = self.in_channels * self.kernel_size[0] * self.kernel_size[1] / (self.stride[0] * self.stride[1])
        init.kaiming_uniform_(self.weight, fan=max(fan, 1.0))
        self.register_parameter("bias", Parameter(numpy.zeros(self.out_channels, dtype)) if bias else None)

    def forward(self, x):
        return conv_transpose2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                                output_padding=self.output_padding, dilation=self.dilation)

    def extra_repr(self):
        return _conv_repr(self, [("padding", (0, 0)), ("output_padding", (0, 0)), ("dilation", (1, 1))])
