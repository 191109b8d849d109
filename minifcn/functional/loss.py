"""Per-pixel softmax cross-entropy (the FCN training loss), softmax and log-softmax.

Shape legend: N batch, K classes, H height, W width.
softmax_cross_entropy: logits (N, K, H, W) float, target (N, H, W) integer labels -> loss ().
softmax, log_softmax: x any shape, normalised along ``axis`` (default 1, the classes).

For one pixel with scores z (K,) and label t:

    loss = -log softmax(z)[t] = logsumexp(z) - z[t]
    d loss / d z = softmax(z) - onehot(t)

logsumexp(z) = max(z) + log(sum(exp(z - max(z)))): shifting by the maximum keeps
exp from overflowing and changes nothing else. Pixels labelled ``ignore_index``
(255, the "void" border of PASCAL VOC) add nothing, and "mean" divides by the
number of labelled pixels, not by N*H*W.

Two decisions differ from torch.nn.functional.cross_entropy:
- every pixel ignored with "mean": the loss is 0 with a zero gradient, not NaN.
  Such a batch (a crop of pure "void") holds no labelled pixel and so no
  information; it should neither move the weights nor poison a running loss.
- a pixel whose scores are not all finite makes the loss NaN, even when the
  pixel is ignored or the infinity is a -inf at another class: a NaN or
  infinity reaching the loss must never come out as a finite number.
"""

import numbers

import numpy

from minifcn.autograd import Function
from minifcn.backend import device_of, get_array_module, is_cuda, to_device
from minifcn.parallel import run_parallel, shares
from minifcn.tensor import Tensor

REDUCTIONS = ("mean", "sum")


def _shift_by_max(x, axis):
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
    shifted, peak = _shift_by_max(logits, 1)
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


def softmax_cross_entropy_backward(logits, target, lse, ignore_index, scale, out=None):
    """-> grad_logits (N, K, H, W) = (softmax(logits) - onehot(target)) * scale (into
    ``out`` when given); exactly 0 at ignored pixels, NaN at labels outside [0, K).

    scale: grad_out / n_valid ("mean") or grad_out ("sum"), a number or 0-d array.
    Computed as softmax * weight, and (softmax - 1) * weight at each pixel's label,
    where weight (N, H, W) is scale at labelled pixels and 0 at ignored ones: no
    (N, K, H, W) one-hot array.
    """
    xp = get_array_module(logits)
    grad = xp.subtract(logits, lse[:, None], out=out)
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
    if not bool(xp.isfinite(lse).all()):  # softmax * 0 is NaN where the scores are not finite
        grad[...] = xp.where(valid[:, None], grad, zero)
    return grad


# On the CPU, large logits are cut into one share of their rows per thread
# (minifcn.parallel.shares): every pixel's loss and gradient are its own, so the
# results are the same, bit for bit, however the rows are cut. Not for images one
# pixel wide: there a share of one row would sum its K scores in another order
# (NumPy sums the innermost axis pairwise).

def _row_shares(logits):
    if logits.shape[3] < 2:
        return [(0, logits.shape[2])]
    return shares(logits.shape[2], 2 * logits.nbytes)  # the logits, and their shifted copy


def _forward_in_shares(logits, target, ignore_index):
    rows = _row_shares(logits)
    if len(rows) == 1:
        return softmax_cross_entropy_forward(logits, target, ignore_index)
    parts = run_parallel(lambda r: softmax_cross_entropy_forward(
        logits[:, :, slice(*r)], target[:, slice(*r)], ignore_index), rows)
    return tuple(numpy.concatenate([part[k] for part in parts], axis=1) for k in (0, 1))


def _backward_in_shares(logits, target, lse, ignore_index, scale):
    rows = _row_shares(logits)
    if len(rows) == 1:
        return softmax_cross_entropy_backward(logits, target, lse, ignore_index, scale)
    grad = numpy.empty_like(logits)
    run_parallel(lambda r: softmax_cross_entropy_backward(
        logits[:, :, slice(*r)], target[:, slice(*r)], lse[:, slice(*r)], ignore_index, scale,
        out=grad[:, :, slice(*r)]), rows)
    return grad


class SoftmaxCrossEntropy(Function):
    """loss = mean or sum over labelled pixels of logsumexp(logits) - logits[target]."""

    def __init__(self, target, ignore_index, reduction):
        self.target, self.ignore_index, self.reduction = target, ignore_index, reduction

    def forward(self, logits):
        xp = get_array_module(logits)
        target, self.target = self.target, None  # kept in saved from here on, released with it
        if is_cuda(logits):
            from minifcn import cuda
            pixel_loss, lse = cuda.softmax_cross_entropy_forward(logits, target, self.ignore_index)
        else:
            pixel_loss, lse = _forward_in_shares(logits, target, self.ignore_index)
        loss = pixel_loss.sum()
        if self.reduction == "mean":
            # at least 1, so that a batch with no labelled pixel gives 0 / 1 = 0, not 0 / 0
            self.count = xp.maximum((target != self.ignore_index).sum(), 1).astype(logits.dtype)
            loss = loss / self.count
        self.save_for_backward(logits, target, lse)
        return loss

    def backward(self, grad_loss):
        logits, target, lse = self.saved
        scale = grad_loss / self.count if self.reduction == "mean" else grad_loss
        if is_cuda(logits):
            from minifcn import cuda
            return (cuda.softmax_cross_entropy_backward(logits, target, lse, self.ignore_index, scale),)
        return (_backward_in_shares(logits, target, lse, self.ignore_index, scale),)


class LogSoftmax(Function):
    """y = x - logsumexp(x); grad_x = grad_y - softmax(x) * sum(grad_y) along the axis."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        shifted, _ = _shift_by_max(x, self.axis)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=self.axis, keepdims=True))
        self.save_for_backward(y)
        return y

    def backward(self, grad_y):
        (y,) = self.saved
        xp = get_array_module(y)
        return (grad_y - xp.exp(y) * grad_y.sum(axis=self.axis, keepdims=True),)


class Softmax(Function):
    """y = exp(x) / sum(exp(x)); grad_x = y * (grad_y - sum(grad_y * y)) along the axis."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        shifted, _ = _shift_by_max(x, self.axis)
        e = get_array_module(x).exp(shifted)
        y = e / e.sum(axis=self.axis, keepdims=True)
        self.save_for_backward(y)
        return y

    def backward(self, grad_y):
        (y,) = self.saved
        return (y * (grad_y - (grad_y * y).sum(axis=self.axis, keepdims=True)),)


def _check_axis(axis, ndim):
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an int in [{-ndim}, {ndim}) for a tensor with {ndim} dims, got {axis!r}")
    return int(axis) % ndim


def log_softmax(x, axis=1):
    """log of softmax(x) along ``axis`` (default 1: the classes of (N, K, H, W) scores)."""
    return LogSoftmax(_check_axis(axis, len(x.shape)))(x)


def softmax(x, axis=1):
    """exp(x) / sum(exp(x)) along ``axis`` (default 1: per-pixel class probabilities)."""
    return Softmax(_check_axis(axis, len(x.shape)))(x)


def _check_target(target, logits):
    """target as an int64 array on the logits' device, after every check the loss needs."""
    if isinstance(target, Tensor):
        target = target.data
    elif not hasattr(target, "dtype"):
        target = numpy.asarray(target)
    if target.dtype.kind not in "iu":
        raise TypeError(
            f"target must hold integer class labels, got dtype {target.dtype} (a Tensor made from "
            "labels is float32: pass the integer array itself, or Tensor(labels, dtype='int64'))")
    n, k, h, w = logits.shape
    if tuple(target.shape) != (n, h, w):
        raise ValueError(f"target has shape {tuple(target.shape)}, expected (N, H, W) = {(n, h, w)} "
                         f"to match logits of shape {tuple(logits.shape)}")
    logits_array = logits.data if isinstance(logits, Tensor) else logits
    return to_device(target, device_of(logits_array)).astype("int64", copy=False)


def softmax_cross_entropy(logits, target, ignore_index=255, reduction="mean"):
    """Cross-entropy of per-pixel softmax scores against integer labels.

    logits (N, K, H, W) float Tensor; target (N, H, W) integer array (or a Tensor
    holding integers); labels must lie in [0, K) or equal ignore_index.
    reduction "mean" (over labelled pixels; 0 when there are none) or "sum".
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if len(logits.shape) != 4:
        raise ValueError(f"logits must have shape (N, K, H, W), got shape {tuple(logits.shape)}")
    if logits.dtype.kind != "f":
        raise TypeError(f"logits must be a float tensor, got dtype {logits.dtype}")
    target = _check_target(target, logits)
    classes = logits.shape[1]
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        raise ValueError(
            f"target holds label {int(target[bad][0])} ({int(bad.sum())} pixels out of range); "
            f"labels must lie in [0, {classes}) for {classes} classes, or equal ignore_index={ignore_index}")
    return SoftmaxCrossEntropy(target, int(ignore_index), reduction)(logits)
