"""Per-pixel softmax cross-entropy, the readable reference.

Shape legend: N batch, K classes, H height, W width. For one pixel with
scores z (K,) and label t: loss = logsumexp(z) - z[t], and
d loss / d z = softmax(z) - onehot(t).
"""

import numpy

from minifcn.backend.arrays import get_array_module


def shift_by_max(x, axis):
    """x - max(x) along ``axis``, and that max (axis kept): every exp(shifted) is <= 1."""
    peak = x.max(axis=axis, keepdims=True)
    return x - peak, peak


def softmax_cross_entropy_forward(logits, target, ignore_index):
    """logits (N, K, H, W), target (N, H, W) int64 -> (pixel_loss, logsumexp), both (N, H, W).

    pixel_loss = logsumexp - logits[target], and 0 where target == ignore_index;
    NaN at a pixel whose K scores are not all finite, or whose label is neither
    ignore_index nor in [0, K) (the op rejects such labels before; this keeps the
    primitive from ever turning them into a finite loss).
    """
    xp = get_array_module(logits)
    shifted, peak = shift_by_max(logits, 1)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < logits.shape[1])
    label = xp.where(in_range, target, 0)  # a class index everywhere, so the gather stays in bounds
    picked = xp.take_along_axis(shifted, label[:, None], axis=1)[:, 0]
    log_sum = xp.log(xp.exp(shifted, out=shifted).sum(axis=1))  # shifted is spent: exp in place
    zero, nan = logits.dtype.type(0), logits.dtype.type(numpy.nan)
    # log_sum - shifted[target], not lse - logits[target]: both terms stay small, so a
    # float32 loss keeps its digits even when the scores are in the thousands
    pixel_loss = xp.where(valid, xp.where(in_range, log_sum - picked, nan), zero)
    # all K scores finite <=> their max and min are (a NaN makes both NaN): two reductions,
    # no (N, K, H, W) array of flags
    all_finite = xp.isfinite(peak[:, 0]) & xp.isfinite(logits.min(axis=1))
    pixel_loss = xp.where(all_finite, pixel_loss, nan)
    return pixel_loss, peak[:, 0] + log_sum


def softmax_cross_entropy_backward(logits, target, logsumexp, ignore_index, scale, out=None):
    """-> grad_logits (N, K, H, W) = (softmax(logits) - onehot(target)) * scale (into
    ``out`` when given); exactly 0 at ignored pixels, NaN at labels outside [0, K).

    scale: grad_out / n_valid ("mean") or grad_out ("sum"), a number or 0-d array.
    Computed as softmax * weight, and (softmax - 1) * weight at each pixel's label,
    where weight (N, H, W) is scale at labelled pixels and 0 at ignored ones: no
    (N, K, H, W) one-hot array.
    """
    xp = get_array_module(logits)
    grad = xp.subtract(logits, logsumexp[:, None], out=out)
    xp.exp(grad, out=grad)  # softmax(logits)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < logits.shape[1])
    zero, nan = logits.dtype.type(0), logits.dtype.type(numpy.nan)
    weight = xp.where(valid, xp.where(in_range, xp.asarray(scale, dtype=logits.dtype), nan), zero)
    label = xp.where(in_range, target, 0)[:, None]  # (N, 1, H, W), in bounds everywhere
    at_label = xp.take_along_axis(grad, label, axis=1)  # softmax at the label, before scaling
    grad *= weight[:, None]
    # (p - 1) * scale at the label; "+ 0" turns the -0 of ignored pixels (weight 0) into 0
    xp.put_along_axis(grad, label, (at_label - 1) * weight[:, None] + zero, axis=1)
    if not bool(xp.isfinite(logsumexp).all()):  # softmax * 0 is NaN where the scores are not finite
        grad[...] = xp.where(valid[:, None], grad, zero)
    return grad
