"""Slow loop-level references for activation, resample, normalization and loss ops.

Each one is written pixel by pixel from the definition (for interpolate, from
PyTorch's C++ rules: UpSample.h nearest_idx and compute_source_index_and_lambda),
independently of the vectorised code in minifcn.functional, which is tested
against them on small inputs. Only for tests: they are far too slow to train with.
"""

import math

import numpy


def relu_loop(x):
    y = numpy.array(x, copy=True)
    for i in numpy.ndindex(x.shape):
        y[i] = x[i] if x[i] > 0 else 0
    return y


def _nearest_index(dst, in_size, out_size, scale):
    if out_size == in_size:
        return dst
    if out_size == 2 * in_size:
        return dst >> 1
    ratio = numpy.float32(1.0 / scale) if scale is not None else numpy.float32(in_size) / numpy.float32(out_size)
    return min(int(math.floor(numpy.float32(dst) * ratio)), in_size - 1)


def _linear_taps(dst, in_size, out_size, align_corners, scale):
    """(i0, i1, w0, w1): output pixel dst = w0 * in[i0] + w1 * in[i1] along one axis."""
    if out_size == in_size:
        return dst, dst, 1.0, 0.0
    if align_corners:
        ratio = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = ratio * dst
    else:
        ratio = 1.0 / scale if scale is not None else in_size / out_size
        src = max(ratio * (dst + 0.5) - 0.5, 0.0)
    i0 = int(src)  # src >= 0, so truncation is floor
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    w1 = src - i0
    return i0, i1, 1.0 - w1, w1


def _taps(dst, in_size, out_size, mode, align_corners, scale):
    if mode == "nearest":
        return [(_nearest_index(dst, in_size, out_size, scale), 1.0)]
    i0, i1, w0, w1 = _linear_taps(dst, in_size, out_size, align_corners, scale)
    return [(i0, w0), (i1, w1)]


def interpolate_loop(x, size, mode, align_corners=False, scales=None):
    """x (N, C, H, W) -> (N, C, OH, OW), one output pixel at a time (float64 arithmetic)."""
    n_batch, channels, height, width = x.shape
    out_h, out_w = size
    scale_h, scale_w = scales if scales is not None else (None, None)
    y = numpy.zeros((n_batch, channels, out_h, out_w), dtype=x.dtype)
    for n in range(n_batch):
        for c in range(channels):
            for oy in range(out_h):
                for ox in range(out_w):
                    total = 0.0
                    for iy, wy in _taps(oy, height, out_h, mode, align_corners, scale_h):
                        for ix, wx in _taps(ox, width, out_w, mode, align_corners, scale_w):
                            total += wy * wx * float(x[n, c, iy, ix])
                    y[n, c, oy, ox] = total
    return y


def interpolate_backward_loop(grad_y, in_size, mode, align_corners=False, scales=None):
    """Scatter each output gradient back onto the input pixels it was read from."""
    n_batch, channels, out_h, out_w = grad_y.shape
    height, width = in_size
    scale_h, scale_w = scales if scales is not None else (None, None)
    grad_x = numpy.zeros((n_batch, channels, height, width), dtype=numpy.float64)
    for n in range(n_batch):
        for c in range(channels):
            for oy in range(out_h):
                for ox in range(out_w):
                    for iy, wy in _taps(oy, height, out_h, mode, align_corners, scale_h):
                        for ix, wx in _taps(ox, width, out_w, mode, align_corners, scale_w):
                            grad_x[n, c, iy, ix] += wy * wx * float(grad_y[n, c, oy, ox])
    return grad_x.astype(grad_y.dtype)


def batch_norm_loop(x, running_mean, running_var, weight, bias, training, momentum=0.1, eps=1e-5):
    """-> (y, new_running_mean, new_running_var), one channel at a time in float64."""
    _, channels = x.shape[:2]
    y = numpy.zeros_like(x)
    new_mean = None if running_mean is None else numpy.array(running_mean, dtype=numpy.float64)
    new_var = None if running_var is None else numpy.array(running_var, dtype=numpy.float64)
    for c in range(channels):
        values = [float(v) for v in x[:, c].reshape(-1)]
        count = len(values)
        if training:
            mean = sum(values) / count
            var = sum((v - mean) ** 2 for v in values) / count
            if new_mean is not None:
                new_mean[c] = (1 - momentum) * new_mean[c] + momentum * mean
                new_var[c] = (1 - momentum) * new_var[c] + momentum * var * count / (count - 1)
        else:
            mean, var = float(running_mean[c]), float(running_var[c])
        gamma = 1.0 if weight is None else float(weight[c])
        beta = 0.0 if bias is None else float(bias[c])
        for i in numpy.ndindex(x[:, c].shape):
            index = (i[0], c) + i[1:]
            y[index] = gamma * (float(x[index]) - mean) / math.sqrt(var + eps) + beta
    return y, new_mean, new_var


def softmax_cross_entropy_loop(logits, target, ignore_index=255, reduction="mean"):
    """Loss as a float, and grad_logits (N, K, H, W) for d loss / d loss = 1, pixel by pixel."""
    n_batch, classes, height, width = logits.shape
    total, count = 0.0, 0
    grad = numpy.zeros(logits.shape, dtype=numpy.float64)
    for n in range(n_batch):
        for i in range(height):
            for j in range(width):
                label = int(target[n, i, j])
                if label == ignore_index:
                    continue
                scores = [float(logits[n, k, i, j]) for k in range(classes)]
                peak = max(scores)
                lse = peak + math.log(sum(math.exp(s - peak) for s in scores))
                total += lse - scores[label]
                count += 1
                for k in range(classes):
                    grad[n, k, i, j] = math.exp(scores[k] - lse) - (1.0 if k == label else 0.0)
    if reduction == "mean":
        divisor = max(count, 1)
        total, grad = total / divisor, grad / divisor
    return total, grad.astype(logits.dtype)
