"""Per-channel sums and maps, the readable reference: what BatchNorm is written on.

Shape legend: N batch, C channels, L = H*W values of one channel in one image.
An (N, C, H, W) array is viewed as (N, C, L) (``per_channel``); a per-channel
vector is (C,).
"""

from minifcn.backend.arrays import get_array_module


def per_channel(x):
    """x (N, C, ...) as (N, C, L): each (n, c) row is one channel of one image."""
    N, C = x.shape[:2]
    return x.reshape(N, C, x.size // max(N * C, 1))


def _column(vector, dtype):
    """(C,) -> (1, C, 1) in ``dtype``, to broadcast against an (N, C, L) array."""
    return vector.astype(dtype, copy=False).reshape(1, -1, 1)


def channel_sum(x):
    """x (N, C, ...) -> (C,): the sum of each channel over the batch and the pixels."""
    return per_channel(x).sum(axis=(0, 2))


def channel_dot(a, b):
    """a, b (N, C, ...) -> (C,): the sum of a * b over each channel."""
    return (per_channel(a) * per_channel(b)).sum(axis=(0, 2))


def channel_affine(x3, scale=None, shift=None, relu=False, out=None):
    """x3 (N, C, L) -> x3 * scale[c] + shift[c] (either may be None), then max(., 0) if
    ``relu``; into ``out`` when given (it may be x3 itself)."""
    xp = get_array_module(x3)
    y = x3
    if scale is not None:
        y = out = xp.multiply(y, _column(scale, x3.dtype), out=out)
    if shift is not None:
        y = out = xp.add(y, _column(shift, x3.dtype), out=out)
    if relu:
        y = xp.maximum(y, 0, out=out)  # NaN stays NaN, as torch.relu
    if y is x3:  # nothing to compute: a copy
        return x3.copy() if out is None else xp.copyto(out, x3) or out
    return y
