"""Convolution primitives, the readable reference: im2col, col2im and the products on them.

Shape legend: N batch, C channels (C_out out of a layer), H W input height and
width, OH OW output height and width, kH kW kernel height and width,
K = C*kH*kW (one flattened window). ``geometry`` is (kernel_size, stride,
padding, dilation), each a (height, width) pair of ints.

im2col copies every window of x into a column, so that a convolution is one
matrix product; col2im is its adjoint, adding each column back onto the
window it came from:

    gather(x, W2d)          = W2d @ im2col(x)             conv2d forward
    scatter(y, W2d)         = col2im(W2d.T @ y)           conv_transpose2d forward
    window_products(x, g)   = g @ im2col(x).T             both weight gradients

The backends (minifcn.backend.cpu, minifcn.backend.cuda) compute the same
products faster; these are what they are tested against.
"""

from minifcn.arguments import pair
from minifcn.backend.arrays import get_array_module


def checked_geometry(kernel_size, stride, padding, dilation):
    """The four hyper-parameters of a convolution as (height, width) pairs of ints."""
    return (pair("kernel_size", kernel_size, 1), pair("stride", stride, 1), pair("padding", padding, 0),
            pair("dilation", dilation, 1))


def conv_output_size(size, kernel, stride, padding, dilation):
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def output_shape(x_shape, kernel_size, stride, padding, dilation):
    """(OH, OW) of a convolution of an (N, C, H, W) input."""
    return tuple(conv_output_size(x_shape[2 + a], kernel_size[a], stride[a], padding[a], dilation[a])
                 for a in (0, 1))


def channels_first(a):
    """(N, C, H, W) -> (C, N*H*W), the layout of a row of cols."""
    N, C, H, W = a.shape
    return a.transpose(1, 0, 2, 3).reshape(C, N * H * W)


def batch_first(a2d, N, H, W):
    """(C, N*H*W) -> (N, C, H, W), the inverse of channels_first."""
    return get_array_module(a2d).ascontiguousarray(a2d.reshape(a2d.shape[0], N, H, W).transpose(1, 0, 2, 3))


def zero_padded(x, padding):
    """x (N, C, H, W) with a zero border: (N, C, H + 2pH, W + 2pW); x itself without padding."""
    pH, pW = padding
    if (pH, pW) == (0, 0):
        return x
    N, C, H, W = x.shape
    padded = get_array_module(x).zeros((N, C, H + 2 * pH, W + 2 * pW), dtype=x.dtype)
    padded[:, :, pH:pH + H, pW:pW + W] = x
    return padded


def im2col(x, kernel_size, stride, padding, dilation):
    """x (N, C, H, W) -> cols (C*kH*kW, N*OH*OW), every input window a column.

    cols[(c*kH + i)*kW + j, (n*OH + oy)*OW + ox] = x[n, c, oy*sH - pH + i*dH, ox*sW - pW + j*dW]
    (0 where that falls in the padding). A strided *view* of the padded input
    already has these six axes; the final reshape is the one copy.
    """
    xp = get_array_module(x)
    kernel_size, stride, padding, dilation = checked_geometry(kernel_size, stride, padding, dilation)
    (kH, kW), (sH, sW), (dH, dW) = kernel_size, stride, dilation
    N, C = x.shape[:2]
    OH, OW = output_shape(x.shape, kernel_size, stride, padding, dilation)
    padded = zero_padded(x, padding)
    bN, bC, bH, bW = padded.strides  # bytes between neighbours along each axis
    windows = xp.lib.stride_tricks.as_strided(
        padded, shape=(C, kH, kW, N, OH, OW),
        strides=(bC, dH * bH, dW * bW, bN, sH * bH, sW * bW))
    return windows.reshape(C * kH * kW, N * OH * OW)


def col2im(cols, x_shape, kernel_size, stride, padding, dilation):
    """cols (C*kH*kW, N*OH*OW) -> x (N, C, H, W), the exact adjoint of im2col.

    Each kernel tap (i, j) owns one (N, C, OH, OW) slab of cols, which lands on
    a strided grid of the padded input; taps whose grids overlap add up.
    """
    xp = get_array_module(cols)
    kernel_size, stride, padding, dilation = checked_geometry(kernel_size, stride, padding, dilation)
    (kH, kW), (sH, sW), (pH, pW), (dH, dW) = kernel_size, stride, padding, dilation
    N, C, H, W = x_shape
    OH, OW = output_shape(x_shape, kernel_size, stride, padding, dilation)
    padded = xp.zeros((N, C, H + 2 * pH, W + 2 * pW), dtype=cols.dtype)
    taps = cols.reshape(C, kH, kW, N, OH, OW)
    for i in range(kH):
        for j in range(kW):
            grid = padded[:, :, i * dH:i * dH + sH * OH:sH, j * dW:j * dW + sW * OW:sW]
            grid += taps[:, i, j].transpose(1, 0, 2, 3)
    return xp.ascontiguousarray(padded[:, :, pH:pH + H, pW:pW + W])


def gather(x, weight2d, geometry):
    """Every output pixel is the weights dotted with one window of x: W2d @ im2col(x).

    x (N, C, H, W), weight2d (C_out, C*kH*kW) -> (N, C_out, OH, OW)
    """
    OH, OW = output_shape(x.shape, *geometry)
    return batch_first(weight2d @ im2col(x, *geometry), x.shape[0], OH, OW)


def scatter(y, weight2d, x_shape, geometry):
    """Every pixel of y adds the weights, scaled by itself, onto one window: col2im(W2d.T @ y).

    y (N, C_out, OH, OW), weight2d (C_out, C*kH*kW) -> (N, C, H, W) = x_shape
    """
    return col2im(weight2d.T @ channels_first(y), x_shape, *geometry)


def window_products(x, grad, geometry):
    """Each gradient pixel times the window of x it belongs to: g2d @ im2col(x).T.

    x (N, C, H, W), grad (N, C_g, OH, OW) -> (C_g, C*kH*kW)
    """
    return channels_first(grad) @ im2col(x, *geometry).T


def conv2d_backward(x, weight2d, grad_out, geometry, need_x=True, need_weight=True):
    """conv2d's two gradients: grad_x = scatter(grad_out, W2d) (a transposed convolution),
    grad_weight2d = window_products(x, grad_out); None where not needed."""
    grad_x = scatter(grad_out, weight2d, x.shape, geometry) if need_x else None
    grad_weight2d = window_products(x, grad_out, geometry) if need_weight else None
    return grad_x, grad_weight2d


def conv_transpose2d_backward(x, weight2d, grad_out, geometry, need_x=True, need_weight=True):
    """conv_transpose2d's two gradients: grad_x = gather(grad_out, W2d) (a convolution),
    grad_weight2d = window_products(grad_out, x); None where not needed."""
    grad_x = gather(grad_out, weight2d, geometry) if need_x else None
    grad_weight2d = window_products(grad_out, x, geometry) if need_weight else None
    return grad_x, grad_weight2d
