"""Convolution products on the GPU: the im2col / col2im kernels of kernels/conv.cu and
CuPy's matrix products, one sample at a time (the cols of a whole batch at 500x500
are gigabytes); outputs that read only padding are skipped (reference/windows.py).
Same signatures and results as minifcn.backend.reference.conv.
"""

from minifcn.backend.arrays import get_array_module
from minifcn.backend.cuda.primitives import col2im, im2col
from minifcn.backend.reference.conv import output_shape
from minifcn.backend.reference.windows import conv2d_backward_reaching_x, gather_reaching_x


def gather(x, weight2d, geometry):
    """W2d @ im2col(x): x (N, C, H, W), weight2d (C_out, C*kH*kW) -> (N, C_out, OH, OW)."""
    return gather_reaching_x(_gather, x, weight2d, geometry)


def _gather(x, weight2d, geometry):
    N, (OH, OW) = x.shape[0], output_shape(x.shape, *geometry)
    out = get_array_module(x).empty((N, weight2d.shape[0], OH, OW), dtype=x.dtype)
    for n in range(N):
        out[n] = (weight2d @ im2col(x[n:n + 1], *geometry)).reshape(-1, OH, OW)
    return out


def scatter(y, weight2d, x_shape, geometry):
    """col2im(W2d.T @ y): y (N, C_out, OH, OW), weight2d (C_out, C*kH*kW) -> x_shape."""
    x = get_array_module(y).empty(x_shape, dtype=y.dtype)
    for n in range(y.shape[0]):
        cols = weight2d.T @ y[n].reshape(y.shape[1], -1)
        x[n] = col2im(cols, (1,) + tuple(x_shape[1:]), *geometry)[0]
    return x


def window_products(x, grad, geometry):
    """g2d @ im2col(x).T: x (N, C, H, W), grad (N, C_g, OH, OW) -> (C_g, C*kH*kW)."""
    (kH, kW) = geometry[0]
    total = get_array_module(x).zeros((grad.shape[1], x.shape[1] * kH * kW), dtype=x.dtype)
    for n in range(x.shape[0]):
        total += grad[n].reshape(grad.shape[1], -1) @ im2col(x[n:n + 1], *geometry).T
    return total


def conv2d_backward(x, weight2d, grad_out, geometry, need_x=True, need_weight=True):
    """(grad_x, grad_weight2d) of conv2d: scatter(grad_out, W2d) and window_products(x, grad_out)."""
    return conv2d_backward_reaching_x(_conv2d_backward, x, weight2d, grad_out, geometry, need_x, need_weight)


def _conv2d_backward(x, weight2d, grad_out, geometry, need_x, need_weight):
    grad_x = scatter(grad_out, weight2d, x.shape, geometry) if need_x else None
    grad_weight2d = window_products(x, grad_out, geometry) if need_weight else None
    return grad_x, grad_weight2d


def conv_transpose2d_backward(x, weight2d, grad_out, geometry, need_x=True, need_weight=True):
    """(grad_x, grad_weight2d) of conv_transpose2d: gather(grad_out, W2d) and
    window_products(grad_out, x), from one im2col of each sample of grad_out."""
    if not (need_x or need_weight):
        return None, None
    xp = get_array_module(x)
    N, C = x.shape[:2]
    grad_x = xp.empty((N, weight2d.shape[0]) + tuple(x.shape[2:]), dtype=x.dtype) if need_x else None
    grad_weight2d = xp.zeros((C, weight2d.shape[1]), dtype=x.dtype) if need_weight else None
    for n in range(N):
        cols = im2col(grad_out[n:n + 1], *geometry)
        if need_x:
            grad_x[n] = (weight2d @ cols).reshape(grad_x.shape[1:])
        if need_weight:
            grad_weight2d += x[n].reshape(C, -1) @ cols.T
    return grad_x, grad_weight2d
