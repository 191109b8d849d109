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

from minifcn.backend import device_of, get_array_module, primitives, to_device
from minifcn.backend.reference.loss import shift_by_max
from minifcn.function import Function
from minifcn.tensor import Tensor

REDUCTIONS = ("mean", "sum")


class SoftmaxCrossEntropy(Function):
    """loss = mean or sum over labelled pixels of logsumexp(logits) - logits[target]."""

    def __init__(self, target, ignore_index, reduction):
        self.target, self.ignore_index, self.reduction = target, ignore_index, reduction

    def forward(self, logits):
        xp = get_array_module(logits)
        target, self.target = self.target, None  # kept in saved from here on, released with it
        # per pixel: logsumexp(scores) - scores[label], and 0 at ignored pixels
        pixel_loss, lse = primitives(logits).softmax_cross_entropy_forward(logits, target, self.ignore_index)
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
        # per pixel: (softmax(scores) - onehot(label)) * scale, and 0 at ignored pixels
        return (primitives(logits).softmax_cross_entropy_backward(logits, target, lse, self.ignore_index, scale),)


class LogSoftmax(Function):
    """y = x - logsumexp(x); grad_x = grad_y - softmax(x) * sum(grad_y) along the axis."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = get_array_module(x)
        shifted, _ = shift_by_max(x, self.axis)
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
        shifted, _ = shift_by_max(x, self.axis)
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
