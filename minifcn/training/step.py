"""One training step, as the textbook writes it: forward, loss, backward, update.

    optimizer.zero_grad()
    loss = pixel_loss(model, images, labels, reduction="sum")   # forward and loss
    loss.backward()                                             # backward
    (sum the gradients over the ranks, divide by the labelled pixels)
    optimizer.step()                                            # update

On several processes (minifcn.distributed) each rank holds a share of the batch: it sums its
pixels' losses, the ranks add up their gradients in one call, and dividing by the whole
batch's labelled pixels gives the gradient of the batch's mean loss. On one process the sum
over the ranks is the number itself.
"""

import math
from typing import NamedTuple

import numpy as np

from minifcn import functional as F
from minifcn.backend import get_array_module, is_cuda, to_device
from minifcn.tensor import Tensor

IGNORE = 255  # label of the pixels no loss is taken on (VOC's border band)


def pixel_loss(model, images, labels, device="cpu", reduction="mean"):
    """Forward and loss: softmax cross-entropy of the model's scores over the labelled pixels."""
    scores = model(Tensor(to_device(images, device)))
    return F.softmax_cross_entropy(scores, to_device(labels, device), reduction=reduction)


def all_finite(arrays):
    """True when no array holds NaN or infinity (one device sync for the lot)."""
    arrays = list(arrays)
    if not arrays:
        return True
    xp = get_array_module(arrays[0])
    if is_cuda(arrays[0]):  # one concatenation and one check beat a pair of kernels per array
        return bool(xp.isfinite(xp.concatenate([a.ravel() for a in arrays])).all())
    return all(bool(xp.isfinite(a).all()) for a in arrays)


class StepResult(NamedTuple):
    loss: float     # the batch's mean loss over its labelled pixels
    updated: bool   # False: the loss or a gradient was not finite, and the weights were left alone
    stop: bool      # some rank asked to stop after this step (Ctrl-C)


def train_step(model, optimizer, gradients, group, images, labels, device="cpu", stop=False):
    """One step on this rank's share (images, labels) of a batch.

    gradients: a GradientSum (minifcn.distributed.gradients) of the optimiser's parameters; group: the
    ranks sharing the batch. ``stop`` travels with the sums, so every rank learns that any
    one of them asked to stop. The update is left out when the loss or a gradient is not
    finite: a NaN never reaches the weights, and the caller decides what then.
    """
    optimizer.zero_grad()
    loss = pixel_loss(model, images, labels, device, reduction="sum")  # forward and loss
    loss_sum = loss.item()
    if math.isfinite(loss_sum) or group.size > 1:  # every rank must take part in BatchNorm's sums
        loss.backward()                                                 # backward
    labelled = int(np.count_nonzero(labels != IGNORE))
    loss_sum, labelled, stop = gradients.sum_over(group, loss_sum, labelled, stop)  # over the ranks
    scale = 1.0 / max(labelled, 1)  # the batch's mean loss, and its gradient
    loss_value = loss_sum * scale
    gradients.scale(scale)
    updated = math.isfinite(loss_value) and all_finite(p.grad for p in optimizer.params if p.grad is not None)
    if updated:
        optimizer.step()                                                # update
    return StepResult(loss_value, updated, bool(stop))
