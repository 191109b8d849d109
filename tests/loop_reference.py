"""Slow, obviously correct loop-level references that the fast ops are tested against.

Each function takes and returns NumPy arrays and is written straight from the
definition of its op, one output (or input) element at a time, sharing no
code with minifcn. Use them on tiny shapes only.
"""

import math

import numpy as np


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def im2col(x, kernel_size, stride=1, padding=0, dilation=1):
    """x (N, C, H, W) -> cols (C*kH*kW, N*OH*OW), the contract's layout, element by element."""
    (kH, kW), (sH, sW), (pH, pW), (dH, dW) = map(_pair, (kernel_size, stride, padding, dilation))
    N, C, H, W = x.shape
    OH = (H + 2 * pH - dH * (kH - 1) - 1) // sH + 1
    OW = (W + 2 * pW - dW * (kW - 1) - 1) // sW + 1
    cols = np.zeros((C * kH * kW, N * OH * OW), dtype=x.dtype)
    for c in range(C):
        for i in range(kH):
            for j in range(kW):
                for n in range(N):
                    for oy in range(OH):
                        for ox in range(OW):
                            y, x_ = oy * sH - pH + i * dH, ox * sW - pW + j * dW
                            if 0 <= y < H and 0 <= x_ < W:
                                cols[(c * kH + i) * kW + j, (n * OH + oy) * OW + ox] = x[n, c, y, x_]
    return cols


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """out[n, o, oy, ox] = bias[o] + sum_{c,i,j} weight[o, c, i, j] * x[n, c, oy*s - p + i*d, ox*s - p + j*d]

    x (N, C_in, H, W), weight (C_out, C_in, kH, kW) -> (N, C_out, OH, OW); outside x counts as 0.
    """
    (sH, sW), (pH, pW), (dH, dW) = map(_pair, (stride, padding, dilation))
    N, C_in, H, W = x.shape
    C_out, _, kH, kW = weight.shape
    OH = (H + 2 * pH - dH * (kH - 1) - 1) // sH + 1
    OW = (W + 2 * pW - dW * (kW - 1) - 1) // sW + 1
    out = np.zeros((N, C_out, OH, OW), dtype=x.dtype)
    for n in range(N):
        for o in range(C_out):
            for oy in range(OH):
                for ox in range(OW):
                    total = 0.0 if bias is None else bias[o]
                    for c in range(C_in):
                        for i in range(kH):
                            for j in range(kW):
                                y, x_ = oy * sH - pH + i * dH, ox * sW - pW + j * dW
                                if 0 <= y < H and 0 <= x_ < W:
                                    total += weight[o, c, i, j] * x[n, c, y, x_]
                    out[n, o, oy, ox] = total
    return out


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1):
    """Scatter form: each input pixel x[n, c, iy, ix] adds x * weight[c, o, i, j] onto
    out[n, o, iy*s - p + i*d, ix*s - p + j*d] (dropped when outside the output).

    x (N, C_in, H, W), weight (C_in, C_out, kH, kW) -> (N, C_out, OH, OW),
    OH = (H - 1)*s - 2p + d*(kH - 1) + output_padding + 1.
    """
    (sH, sW), (pH, pW), (oH, oW), (dH, dW) = map(_pair, (stride, padding, output_padding, dilation))
    N, C_in, H, W = x.shape
    _, C_out, kH, kW = weight.shape
    OH = (H - 1) * sH - 2 * pH + dH * (kH - 1) + oH + 1
    OW = (W - 1) * sW - 2 * pW + dW * (kW - 1) + oW + 1
    out = np.zeros((N, C_out, OH, OW), dtype=x.dtype)
    for n in range(N):
        for c in range(C_in):
            for iy in range(H):
                for ix in range(W):
                    for o in range(C_out):
                        for i in range(kH):
                            for j in range(kW):
                                y, x_ = iy * sH - pH + i * dH, ix * sW - pW + j * dW
                                if 0 <= y < OH and 0 <= x_ < OW:
                                    out[n, o, y, x_] += x[n, c, iy, ix] * weight[c, o, i, j]
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False):
    """-> (out, argmax): the max of each window and its flat index iy*W + ix in the input plane.

    Windows start at (oy*s - p, ox*s - p); cells outside the input are skipped (padding is
    -inf); the first maximum in row-major order wins. Output size as PyTorch: ceil mode
    rounds up, but a window must start inside the input or its left padding.
    """
    kH, kW = _pair(kernel_size)
    sH, sW = _pair(kernel_size if stride is None else stride)
    pH, pW = _pair(padding)
    N, C, H, W = x.shape
    rounding = math.ceil if ceil_mode else math.floor

    def out_size(size, k, s, p):
        o = rounding((size + 2 * p - k) / s) + 1
        if ceil_mode and (o - 1) * s >= size + p:
            o -= 1
        return o

    OH, OW = out_size(H, kH, sH, pH), out_size(W, kW, sW, pW)
    out = np.zeros((N, C, OH, OW), dtype=x.dtype)
    argmax = np.zeros((N, C, OH, OW), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for oy in range(OH):
                for ox in range(OW):
                    best, where = None, None
                    for i in range(kH):
                        for j in range(kW):
                            y, x_ = oy * sH - pH + i, ox * sW - pW + j
                            if 0 <= y < H and 0 <= x_ < W and (best is None or x[n, c, y, x_] > best):
                                best, where = x[n, c, y, x_], y * W + x_
                    out[n, c, oy, ox], argmax[n, c, oy, ox] = best, where
    return out, argmax
