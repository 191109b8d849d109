"""Softmax cross-entropy in the fast CPU backend: large logits in one share of rows per thread.

Every pixel's loss and gradient are its own, so the results are the same, bit
for bit, however the rows are cut. Not for images one pixel wide: there a share
of one row would sum its K scores in another order (NumPy sums the innermost
axis pairwise).
"""

import numpy

from minifcn.backend.cpu.threads import run_parallel, shares
from minifcn.backend.reference import loss as reference


def _row_shares(logits):
    if logits.shape[3] < 2:
        return [(0, logits.shape[2])]
    return shares(logits.shape[2], 2 * logits.nbytes)  # the logits, and their shifted copy


def softmax_cross_entropy_forward(logits, target, ignore_index):
    """logits (N, K, H, W), target (N, H, W) -> (pixel_loss, logsumexp), both (N, H, W)."""
    rows = _row_shares(logits)
    if len(rows) == 1:
        return reference.softmax_cross_entropy_forward(logits, target, ignore_index)
    parts = run_parallel(lambda r: reference.softmax_cross_entropy_forward(
        logits[:, :, slice(*r)], target[:, slice(*r)], ignore_index), rows)
    return tuple(numpy.concatenate([part[k] for part in parts], axis=1) for k in (0, 1))


def softmax_cross_entropy_backward(logits, target, logsumexp, ignore_index, scale):
    """-> grad_logits (N, K, H, W) = (softmax(logits) - onehot(target)) * scale."""
    rows = _row_shares(logits)
    if len(rows) == 1:
        return reference.softmax_cross_entropy_backward(logits, target, logsumexp, ignore_index, scale)
    grad = numpy.empty_like(logits)
    run_parallel(lambda r: reference.softmax_cross_entropy_backward(
        logits[:, :, slice(*r)], target[:, slice(*r)], logsumexp[:, slice(*r)], ignore_index, scale,
        out=grad[:, :, slice(*r)]), rows)
    return grad
