"""Max pooling, the readable reference: each output is the largest value of one window.

Shape legend: N batch, C channels, H W input height and width, kH kW window
height and width, OH OW output height and width. kernel_size, stride and
padding (on each side, as -inf) are (height, width) pairs of ints.

Forward remembers where each maximum came from: ``argmax``, a flat index
iy*W + ix into the (unpadded) H x W input plane, the first maximum in
row-major window order winning ties. Backward sends each output gradient
to that one input pixel; where windows overlap, a pixel can win several
windows and its gradients add up.
"""

import numpy

from minifcn.arguments import pair
from minifcn.backend.arrays import get_array_module


def pool_output_size(size, kernel, stride, padding, ceil_mode):
    """Output length along one axis, exactly as PyTorch: ceil mode rounds up, but
    the last window must start inside the input or its left padding."""
    span = size + 2 * padding - (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def max_pool2d_forward(x, kernel_size, stride, padding, ceil_mode):
    """x (N, C, H, W) -> out (N, C, OH, OW), argmax int64 (N, C, OH, OW).

    One pass per kernel tap t = i*kW + j: the tap's strided (N, C, OH, OW) view
    of the padded input is merged into the running maximum, and ``tap``
    remembers which t holds it. Then argmax = window corner + offset of tap.
    """
    xp = get_array_module(x)
    (kH, kW), (sH, sW), (pH, pW) = (pair("kernel_size", kernel_size, 1), pair("stride", stride, 1),
                                    pair("padding", padding, 0))
    N, C, H, W = x.shape
    OH, OW = pool_output_size(H, kH, sH, pH, ceil_mode), pool_output_size(W, kW, sW, pW, ceil_mode)
    # rows and columns the windows reach (in ceil mode the last ones may overhang the padding)
    Hp, Wp = max(H + 2 * pH, (OH - 1) * sH + kH), max(W + 2 * pW, (OW - 1) * sW + kW)
    if (pH, pW) == (0, 0) and (Hp, Wp) == (H, W):
        padded = x  # no copy, e.g. kernel == stride dividing the input (VGG's 2x2 pools)
    else:
        padded = xp.full((N, C, Hp, Wp), -xp.inf, dtype=x.dtype)
        padded[:, :, pH:pH + H, pW:pW + W] = x

    def window_tap(i, j):  # padded x at (oy*s + i, ox*s + j) for every (n, c, oy, ox)
        return padded[:, :, i:i + sH * (OH - 1) + 1:sH, j:j + sW * (OW - 1) + 1:sW]

    out = window_tap(0, 0).copy()
    tap = xp.zeros(out.shape, dtype=numpy.int64)
    for t in range(1, kH * kW):
        candidate = window_tap(*divmod(t, kW))
        tap[rises(candidate, out)] = t              # where this tap takes the maximum
        out = xp.maximum(out, candidate)            # NaN propagates, as in PyTorch

    tap_offset = (xp.arange(kH).reshape(kH, 1) * W + xp.arange(kW)).reshape(-1)   # i*W + j
    corner_y, corner_x = xp.arange(OH) * sH - pH, xp.arange(OW) * sW - pW
    argmax = tap_offset[tap] + (corner_y.reshape(OH, 1) * W + corner_x)
    if pH or pW:
        # A window of nothing but -inf keeps its first tap, which may be padding. PyTorch
        # names the first pixel of the window inside the input: its corner, clamped.
        clamped = xp.maximum(corner_y, 0).reshape(OH, 1) * W + xp.maximum(corner_x, 0)
        argmax = xp.where(xp.isneginf(out), clamped, argmax)
    return out, argmax


def max_pool2d_backward(grad_out, argmax, x_shape):
    """grad_out (N, C, OH, OW), argmax (N, C, OH, OW) -> grad_x (N, C, H, W):
    each output gradient added to the input pixel its window's maximum came from."""
    xp = get_array_module(grad_out)
    N, C, H, W = x_shape
    grad_x = xp.zeros(N * C * H * W, dtype=grad_out.dtype)
    plane_start = (xp.arange(N * C) * (H * W)).reshape(N * C, 1)
    flat = (argmax.reshape(N * C, -1) + plane_start).reshape(-1)
    xp.add.at(grad_x, flat, grad_out.reshape(-1))  # add, not assign: a pixel may win several windows
    return grad_x.reshape(x_shape)


def rises(candidate, best, rose=None):
    """Where ``candidate`` takes the argmax from ``best`` (into ``rose`` when given): strictly
    larger (so the first maximum wins ties), or NaN (so a NaN window points at its last NaN, a
    real pixel, as the CUDA kernel and PyTorch do, never at the -inf padding)."""
    xp = get_array_module(candidate)
    rose = xp.greater(candidate, best, out=rose)
    rose |= xp.isnan(candidate)
    return rose
