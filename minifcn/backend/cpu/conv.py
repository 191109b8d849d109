"""Convolution primitives of the fast CPU backend: the same products as the reference
(minifcn.backend.reference.conv), computed without building cols whole.

Shape legend: N batch, C channels, H W input, OH OW output, kH kW kernel,
K = C*kH*kW; geometry = (kernel_size, stride, padding, dilation), all pairs.

- gather, W2d @ im2col(x): im2col in cache-sized blocks straight into BLAS
  (conv_blocks.py), shared among the threads; for a stride that divides the
  kernel and the padding (FCN's upsampling seen backwards), by tiles.
- scatter, col2im(W2d.T @ y): rewritten as a gather where that is exact: a 1x1
  kernel, the flipped kernel at stride 1, the "sub-pixel" split of a strided
  kernel; else matmul and col2im, by shares of the input channels.
- conv2d_backward at stride 1 takes both gradients from one im2col of grad_out.
- Outputs that read only padding (conv1_1 of the pad-100 net) are not computed
  (minifcn.backend.reference.windows).
"""

from minifcn.backend.arrays import get_array_module
from minifcn.backend.cpu import tuning
from minifcn.backend.cpu.conv_blocks import is_pointwise
from minifcn.backend.cpu.conv_products import im2col_products, quietly, threads_for
from minifcn.backend.cpu.threads import ranges, run_parallel
from minifcn.backend.reference.conv import channels_first, col2im, output_shape
from minifcn.backend.reference.windows import conv2d_backward_reaching_x, gather_reaching_x, window


def _gather(x, weight2d, geometry):
    """Every output pixel = weights . one window of x: im2col, then matmul.

    conv2d's forward, and conv_transpose2d's gradient wrt its input.
    x (N, C, H, W), weight2d (C_out, C*kH*kW) -> out (N, C_out, OH, OW)
    """
    if _tiles_pay(x, weight2d, geometry):
        return _gather_by_tiles(x, weight2d, geometry)
    return im2col_products(x, geometry, weight2d=weight2d)[0]


def _tiles_pay(x, weight2d, geometry):
    """Whether _gather_by_tiles applies (stride s > 1, kernel and padding multiples of s, no
    dilation) and beats im2col: its product's output, T*T values per output channel and tile,
    is smaller than the tiles themselves (FCN's upsampling, seen backwards: 21 classes, s = 8)."""
    (kH, kW), (sH, sW), (pH, pW), dilation = geometry
    if dilation != (1, 1) or (sH, sW) == (1, 1) or kH % sH or kW % sW or pH % sH or pW % sW:
        return False
    return weight2d.shape[0] * (kH // sH) * (kW // sW) < x.shape[1] * sH * sW


def _gather_by_tiles(x, weight2d, geometry):
    """_gather for a stride s that divides the kernel (k = T*s) and the padding (p = m*s), by tiles.

    Cut x into s x s tiles and stack each tile's pixels as channels ("space to depth"):
    tiles (N, C*s*s, R, Q), tile (Y, X) holding x[n, c, Y*s + u, X*s + v] as channel (c, u, v).
    Output pixel (y, x) reads the T x T tiles from (y - m, x - m) on, so with the kernel cut
    the same way, weight2d[o, (c, a*s + u, b*s + v)] -> taps[(a, b, o), (c, u, v)]:

        out[n, o, y, x] = sum over a, b < T of (taps @ tiles)[(a, b, o), y - m + a, x - m + b]

    one product for every tap offset (a, b), then T*T shifted sums: no im2col, whose columns
    would repeat every pixel of x T*T times.
    """
    (kH, kW), (sH, sW), (pH, pW), _ = geometry
    (TH, TW), (mH, mW) = (kH // sH, kW // sW), (pH // sH, pW // sW)
    N, C = x.shape[:2]
    C_out = weight2d.shape[0]
    OH, OW = output_shape(x.shape, *geometry)
    R, Q = OH + TH - 1, OW + TW - 1  # the tiles some output reads
    rows, cols = (-mH * sH, (R - mH) * sH), (-mW * sW, (Q - mW) * sW)
    tiles = window(x, rows, cols).reshape(N, C, R, sH, Q, sW).transpose(0, 1, 3, 5, 2, 4).reshape(N, C * sH * sW, R * Q)
    taps = weight2d.reshape(C_out, C, TH, sH, TW, sW).transpose(2, 4, 0, 1, 3, 5).reshape(TH * TW * C_out, -1)
    products = (taps @ tiles).reshape(N, TH, TW, C_out, R, Q)
    out = products[:, 0, 0, :, :OH, :OW].copy()
    for a in range(TH):
        for b in range(TW):
            if a or b:
                out += products[:, a, b, :, a:a + OH, b:b + OW]
    return out


def _scatter_col2im(y, weight2d, x_shape, geometry):
    """Every pixel of y adds weights * itself onto one window of x: one matmul, then col2im.

    y (N, C_out, OH, OW), weight2d (C_out, C*kH*kW) -> x (N, C, H, W)

    Each input channel c of x gets only the rows of cols of its own taps, so on the CPU
    the threads take a share of the channels each: fc6's input gradient (a 7x7 kernel
    on 512 channels, 4096 wide) is tens of GFLOP at 500x500, too much for one core.
    """
    xp = get_array_module(y)
    N, C = x_shape[:2]
    taps = weight2d.shape[1] // C
    y2d = channels_first(y)

    def scatter(channels):  # -> x[:, channels]
        c0, c1 = channels
        cols = weight2d[:, c0 * taps:c1 * taps].T @ y2d  # ((c1 - c0)*kH*kW, N*OH*OW)
        return col2im(cols, (N, c1 - c0) + tuple(x_shape[2:]), *geometry)

    threads = min(C, threads_for(flops=2 * weight2d.size * y2d.shape[1]))
    if threads == 1:
        return scatter((0, C))
    x = xp.empty(x_shape, dtype=y.dtype)

    def scatter_into_x(channels):
        x[:, slice(*channels)] = scatter(channels)

    run_parallel(quietly(scatter_into_x), ranges(C, threads))
    return x


def _scatter(y, weight, x_shape, geometry):
    """The transposed convolution of y: each of its pixels adds weight * itself onto a window.

    conv_transpose2d's forward, and conv2d's gradient wrt its input.
    y (N, C_out, OH, OW), weight (C_out, C, kH, kW) -> x (N, C, H, W) = x_shape

    The scatter (matmul, then col2im) is the definition. Most cases are
    rewritten exactly as a gather, which needs no col2im and multiplies in fewer,
    larger products:
    - 1x1 kernel: x = weight2d.T @ y, pixel by pixel.
    - stride 1: each x pixel sums one window of y: a convolution of y by the kernel
      flipped (``_flipped``).
    - stride s, kernel k a multiple of s (FCN's upsampling: k = 2s): split x into its
      s*s phases (x pixels with the same position mod s). Each phase is a convolution
      of y by a (k/s x k/s) sub-kernel; all phases are one convolution with C*s*s
      output channels, interleaved afterwards ("sub-pixel" convolution).
    """
    (kH, kW), (sH, sW), _, (dH, dW) = geometry
    C_out, C = weight.shape[:2]
    if is_pointwise(geometry):
        return _gather(y, weight.reshape(C_out, C).T, geometry)
    flipped = _flipped(y, weight, x_shape, geometry)
    if flipped is not None:
        return _gather(y, *flipped)
    # a gather reads C_out*k*k/s*s values per x pixel, the scatter C*k*k per y pixel
    cheap = C_out * x_shape[2] * x_shape[3] <= 2 * C * y.shape[2] * y.shape[3] * sH * sW
    if (dH, dW) == (1, 1) and kH % sH == 0 and kW % sW == 0 and cheap:
        return _sub_pixel(y, weight, x_shape, geometry)
    return _scatter_col2im(y, weight.reshape(C_out, -1), x_shape, geometry)


def _flipped(y, weight, x_shape, geometry):
    """Stride 1: x[q] = sum_i y[q + p - d*i] * weight[i], a convolution of y by the flipped
    kernel (C_out and C swapped), padded by d*(k-1) - p.

    -> (flipped weight2d (C, C_out*kH*kW), its geometry), or None where that does not
    apply (stride > 1, padding > d*(k-1)) or costs more than the scatter (y has far more
    channels than x, or far fewer pixels: fc6).
    """
    (kH, kW), stride, (pH, pW), (dH, dW) = geometry
    C_out, C = weight.shape[:2]
    flipped_geometry = ((kH, kW), (1, 1), (dH * (kH - 1) - pH, dW * (kW - 1) - pW), (dH, dW))
    if stride != (1, 1) or min(flipped_geometry[2]) < 0 or \
            output_shape(y.shape, *flipped_geometry) != tuple(x_shape[2:]) or \
            C_out * x_shape[2] * x_shape[3] > 2 * C * y.shape[2] * y.shape[3]:
        return None
    return weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(C, C_out * kH * kW), flipped_geometry


def _sub_pixel(y, weight, x_shape, geometry):
    """_scatter for a kernel that is a multiple of the stride, as one convolution.

    x[s*q + r - p] = sum_t y[q - t] * weight[s*t + r]  (t < T = k/s taps, phase r < s),
    a convolution of y padded by T-1 with the T taps of phase r reversed.
    """
    (kH, kW), (sH, sW), (pH, pW), _ = geometry
    C_out, C = weight.shape[:2]
    TH, TW = kH // sH, kW // sW
    # weight[o, c, s*t + r] -> sub[(c, rH, rW), (o, TH-1-tH, TW-1-tW)]
    taps = weight.reshape(C_out, C, TH, sH, TW, sW)[:, :, ::-1, :, ::-1, :]
    sub = taps.transpose(1, 3, 5, 0, 2, 4).reshape(C * sH * sW, C_out * TH * TW)
    phases = _gather(y, sub, ((TH, TW), (1, 1), (TH - 1, TW - 1), (1, 1)))  # (N, C*sH*sW, QH, QW)
    N, _, QH, QW = phases.shape
    # interleave: phase (rH, rW) of row q, column u is pixel (s*q + rH, s*u + rW) before the crop by p
    full = phases.reshape(N, C, sH, sW, QH, QW).transpose(0, 1, 4, 2, 5, 3).reshape(N, C, QH * sH, QW * sW)
    H, W = x_shape[2:]
    if (pH, pW) == (0, 0) and full.shape[2:] == (H, W):
        return full
    x = get_array_module(y).zeros(x_shape, dtype=y.dtype)  # what no phase reaches is 0
    h, w = min(H, QH * sH - pH), min(W, QW * sW - pW)
    x[:, :, :h, :w] = full[:, :, pH:pH + h, pW:pW + w]
    return x


# ---- the primitives (same signatures as minifcn.backend.reference.conv) ----------

def gather(x, weight2d, geometry):
    """W2d @ im2col(x): x (N, C, H, W), weight2d (C_out, C*kH*kW) -> (N, C_out, OH, OW)."""
    return gather_reaching_x(_gather, x, weight2d, geometry, tuning.MAX_REACHED_FRACTION)


def scatter(y, weight2d, x_shape, geometry):
    """col2im(W2d.T @ y): y (N, C_out, OH, OW), weight2d (C_out, C*kH*kW) -> x_shape."""
    (kH, kW) = geometry[0]
    weight = weight2d.reshape(weight2d.shape[0], x_shape[1], kH, kW)
    return _scatter(y, weight, x_shape, geometry)


def window_products(x, grad, geometry):
    """g2d @ im2col(x).T: x (N, C, H, W), grad (N, C_g, OH, OW) -> (C_g, C*kH*kW)."""
    return im2col_products(x, geometry, grad=grad)[1]


def conv2d_backward(x, weight2d, grad_out, geometry, need_x=True, need_weight=True):
    """(grad_x, grad_weight2d) of conv2d: scatter(grad_out, W2d) and window_products(x, grad_out)."""
    return conv2d_backward_reaching_x(_conv2d_backward, x, weight2d, grad_out, geometry, need_x, need_weight,
                                      tuning.MAX_REACHED_FRACTION)


def _conv2d_backward(x, weight2d, grad_out, geometry, need_x, need_weight):
    C_out, C, (kH, kW) = weight2d.shape[0], x.shape[1], geometry[0]
    weight = weight2d.reshape(C_out, C, kH, kW)
    flipped = _flipped(grad_out, weight, x.shape, geometry) if need_x and not is_pointwise(geometry) else None
    if flipped is not None:
        # Stride 1: grad_x is a convolution of grad_out (see _flipped), and its windows serve
        # the weight gradient too: x @ cols.T is grad_weight with its taps reversed. One im2col.
        grad_x, flipped_grad = im2col_products(grad_out, flipped[1], weight2d=flipped[0],
                                               grad=x if need_weight else None)
        grad_weight2d = None
        if need_weight:  # (C, C_out*kH*kW), taps reversed -> (C_out, C*kH*kW)
            flipped_grad = flipped_grad.reshape(C, C_out, kH, kW)[:, :, ::-1, ::-1]
            grad_weight2d = flipped_grad.transpose(1, 0, 2, 3).reshape(C_out, -1)
    else:
        grad_weight2d = window_products(x, grad_out, geometry) if need_weight else None
        grad_x = _scatter(grad_out, weight, x.shape, geometry) if need_x else None
    return grad_x, grad_weight2d


def conv_transpose2d_backward(x, weight2d, grad_out, geometry, need_x=True, need_weight=True):
    """(grad_x, grad_weight2d) of conv_transpose2d: gather(grad_out, W2d) and
    window_products(grad_out, x), both from one pass of im2col over grad_out."""
    if need_x and not need_weight:  # FCN's upsampling: frozen bilinear weights
        return _gather(grad_out, weight2d, geometry), None
    return im2col_products(grad_out, geometry, weight2d=weight2d if need_x else None,
                            grad=x if need_weight else None)
