"""Convolution and transposed convolution: the two layers an FCN is made of.

Shape legend:
    N batch, C channels (C_in into a layer, C_out out of it),
    H W input height and width, OH OW output height and width,
    kH kW kernel height and width, K = C * kH * kW (one flattened window).
All hyper-parameters here are pairs (for height, width): kernel, stride,
padding (zeros added on each side), dilation (the gap between kernel taps).

im2col turns a convolution into one matrix product. Every output pixel is
the weights dotted with one window of the input, so copy every window into
a column and multiply once:

    cols = im2col(x)                         (C_in*kH*kW, N*OH*OW)
    out  = W2d @ cols                        (C_out, N*OH*OW) -> (N, C_out, OH, OW)

col2im is the adjoint of im2col: it adds every column back onto the window
it came from, summing where windows overlap. Read the product backwards and
you get the transposed convolution ("deconvolution", FCN's upsampling layer):
every input pixel scatters the weights, scaled by itself, onto a window.

    out  = col2im(W2d.T @ x2d)               (N, C_out, OH, OW)

So the two ops are a pair, built on three primitives (minifcn.backend):

    gather(x, W2d)          = W2d @ im2col(x)       conv2d forward, conv_transpose2d's grad_x
    scatter(y, W2d)         = col2im(W2d.T @ y)     conv_transpose2d forward, conv2d's grad_x
    window_products(x, g)   = g @ im2col(x).T       the weight gradient of both

The backend computes them (``primitives(x)``): the readable NumPy reference,
the fast CPU backend or the CUDA kernels, all with the same results.
"""

from minifcn.arguments import pair, show_pair
from minifcn.backend import get_array_module, primitives
from minifcn.backend.reference.conv import conv_output_size, output_shape
from minifcn.function import Function


def _check_inputs(op, x, weight, bias, weight_layout, in_axis, out_axis):
    """Shapes and dtypes of (x, weight, bias); ``in_axis``/``out_axis`` index weight's channels."""
    if x.ndim != 4:
        raise ValueError(f"{op} expects x of shape (N, C_in, H, W), got shape {x.shape}")
    if weight.ndim != 4 or min(weight.shape[2:]) < 1:
        raise ValueError(f"{op} expects weight of shape {weight_layout}, got shape {weight.shape}")
    if x.shape[1] != weight.shape[in_axis]:
        raise ValueError(f"{op}: x of shape {x.shape} has {x.shape[1]} channels but weight of shape "
                         f"{weight.shape} {weight_layout} expects C_in = {weight.shape[in_axis]}")
    if bias is not None and bias.shape != (weight.shape[out_axis],):
        raise ValueError(f"{op} expects bias of shape ({weight.shape[out_axis]},) for weight of "
                         f"shape {weight.shape}, got shape {bias.shape}")
    dtypes = sorted({str(a.dtype) for a in (x, weight, bias) if a is not None})
    if len(dtypes) > 1:
        raise TypeError(f"{op}: x, weight and bias must share one dtype, got {' and '.join(dtypes)}")


def _add_bias(out, bias):
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


class Conv2d(Function):
    """out[n, o, oy, ox] = bias[o] + sum_{c,i,j} weight[o, c, i, j] * x[n, c, oy*s - p + i*d, ox*s - p + j*d]

    x (N, C_in, H, W), weight (C_out, C_in, kH, kW), bias (C_out,) or None -> (N, C_out, OH, OW)
    with OH = (H + 2p - d*(kH - 1) - 1) // s + 1 (conv_output_size).
    """

    def __init__(self, stride=1, padding=0, dilation=1):
        self.stride = pair("conv2d: stride", stride, minimum=1)
        self.padding = pair("conv2d: padding", padding, minimum=0)
        self.dilation = pair("conv2d: dilation", dilation, minimum=1)

    def forward(self, x, weight, bias):
        _check_inputs("conv2d", x, weight, bias, "(C_out, C_in, kH, kW)", in_axis=1, out_axis=0)
        kernel_size = weight.shape[2:]
        padded = [size + 2 * p for size, p in zip(x.shape[2:], self.padding)]
        if any(d * (k - 1) + 1 > size for k, d, size in zip(kernel_size, self.dilation, padded)):
            raise ValueError(f"conv2d: kernel {kernel_size[0]}x{kernel_size[1]} with dilation "
                             f"{show_pair(self.dilation)} is larger than the padded input "
                             f"{padded[0]}x{padded[1]}")
        self.geometry = (kernel_size, self.stride, self.padding, self.dilation)
        self.has_bias = bias is not None
        # Keep x, not cols: cols is kH*kW times larger than x, and x is kept by the graph anyway.
        self.save_for_backward(x, weight)
        out = primitives(x).gather(x, weight.reshape(weight.shape[0], -1), self.geometry)  # W2d @ im2col(x)
        return _add_bias(out, bias)

    def backward(self, grad_out):
        x, weight = self.saved
        need_x, need_weight, need_bias = getattr(self, "needs_input_grad", (True, True, True))
        # grad_x = scatter(grad_out, W2d): each output gradient back through the window it read;
        # grad_W = window_products(x, grad_out): each output gradient times that window of x
        grad_x, grad_weight2d = primitives(x).conv2d_backward(
            x, weight.reshape(weight.shape[0], -1), grad_out, self.geometry, need_x, need_weight)
        grad_weight = None if grad_weight2d is None else grad_weight2d.reshape(weight.shape)
        grad_bias = primitives(x).channel_sum(grad_out) if self.has_bias and need_bias else None
        return grad_x, grad_weight, grad_bias


class ConvTranspose2d(Function):
    """out[n, o, iy*s - p + i*d, ix*s - p + j*d] += x[n, c, iy, ix] * weight[c, o, i, j], plus bias[o]

    The adjoint of Conv2d: it is conv2d's gradient wrt its input, used forwards.
    x (N, C_in, H, W), weight (C_in, C_out, kH, kW), bias (C_out,) or None -> (N, C_out, OH, OW)
    with OH = (H - 1)*s - 2p + d*(kH - 1) + output_padding + 1, as in PyTorch. A stride-s conv2d
    maps s different input sizes to H; output_padding (extra rows at the bottom, columns at the
    right) picks which of them this op, its adjoint, produces.
    """

    def __init__(self, stride=1, padding=0, output_padding=0, dilation=1):
        self.stride = pair("conv_transpose2d: stride", stride, minimum=1)
        self.padding = pair("conv_transpose2d: padding", padding, minimum=0)
        self.output_padding = pair("conv_transpose2d: output_padding", output_padding, minimum=0)
        self.dilation = pair("conv_transpose2d: dilation", dilation, minimum=1)
        if any(op >= s and op >= d for op, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise ValueError(f"conv_transpose2d: output_padding {show_pair(self.output_padding)} must be "
                             f"smaller than stride {show_pair(self.stride)} or dilation "
                             f"{show_pair(self.dilation)}")

    def forward(self, x, weight, bias):
        _check_inputs("conv_transpose2d", x, weight, bias, "(C_in, C_out, kH, kW)", in_axis=0, out_axis=1)
        N, C_in, H, W = x.shape
        kernel_size = weight.shape[2:]
        OH, OW = ((size - 1) * s - 2 * p + d * (k - 1) + op + 1 for size, k, s, p, d, op in zip(
            (H, W), kernel_size, self.stride, self.padding, self.dilation, self.output_padding))
        if OH < 1 or OW < 1:
            raise ValueError(f"conv_transpose2d: output size {OH}x{OW} is not positive (input {H}x{W}, "
                             f"kernel {kernel_size[0]}x{kernel_size[1]}, stride {show_pair(self.stride)}, "
                             f"padding {show_pair(self.padding)})")
        self.geometry = (kernel_size, self.stride, self.padding, self.dilation)
        self.has_bias = bias is not None
        self.x_shape = x.shape
        out_shape = (N, weight.shape[1], OH, OW)
        # An output_padding >= stride (allowed when < dilation) gives the output more
        # conv windows than x has pixels: treat x as zero-padded at the bottom/right.
        covered = output_shape(out_shape, *self.geometry)
        if covered != (H, W):
            x_full = get_array_module(x).zeros((N, C_in) + covered, dtype=x.dtype)
            x_full[:, :, :H, :W] = x
            x = x_full
        self.save_for_backward(x, weight)
        out = primitives(x).scatter(x, weight.reshape(C_in, -1), out_shape, self.geometry)  # col2im(W2d.T @ x)
        return _add_bias(out, bias)

    def backward(self, grad_out):
        x, weight = self.saved
        need_x, need_weight, need_bias = getattr(self, "needs_input_grad", (True, True, True))
        # grad_x = gather(grad_out, W2d): a convolution of grad_out with the same weights;
        # grad_W = window_products(grad_out, x): each input pixel times the window it wrote
        grad_x, grad_weight2d = primitives(x).conv_transpose2d_backward(
            x, weight.reshape(weight.shape[0], -1), grad_out, self.geometry, need_x, need_weight)
        grad_weight = None if grad_weight2d is None else grad_weight2d.reshape(weight.shape)
        H, W = self.x_shape[2:]
        if grad_x is not None and grad_x.shape != self.x_shape:  # drop the zero padding added in forward
            grad_x = grad_x[:, :, :H, :W].copy()
        grad_bias = primitives(x).channel_sum(grad_out) if self.has_bias and need_bias else None
        return grad_x, grad_weight, grad_bias


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation, as in PyTorch); stride, padding, dilation: int or pair.

    x (N, C_in, H, W), weight (C_out, C_in, kH, kW), bias (C_out,) or None -> (N, C_out, OH, OW)
    """
    return Conv2d(stride, padding, dilation)(x, weight, bias)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1):
    """2-D transposed convolution, the gradient of conv2d wrt its input; ints or pairs.

    x (N, C_in, H, W), weight (C_in, C_out, kH, kW), bias (C_out,) or None -> (N, C_out, OH, OW)
    """
    return ConvTranspose2d(stride, padding, output_padding, dilation)(x, weight, bias)


__all__ = ["Conv2d", "ConvTranspose2d", "conv2d", "conv_transpose2d", "conv_output_size"]
