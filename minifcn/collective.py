"""Sums over the replicas of a data-parallel training step (minifcn.replicas).

When several processes each train on a share of one batch, most of the step
needs nothing from the others: a convolution of one image does not look at
another. BatchNorm does. In training it normalises with the mean and variance
of the whole batch, so every replica must see the per-channel sums of every
share (PyTorch calls this synchronised BatchNorm). An op asks for such a sum
with ``sum_over_replicas``; outside a data-parallel step, or on the GPU, there
is one replica and the vectors come back unchanged (the very same arrays, so
the single-process results do not change by a bit).

Every replica must ask for the same sums in the same order: they run the same
model on the same graph, so they do.
"""

import contextlib

import numpy as np

_exchange = None  # the replica group's exchange while this process runs its share of a step


@contextlib.contextmanager
def exchanging_through(exchange):
    """Within the block, sum_over_replicas goes through ``exchange``: an object whose
    ``all_sum(vector)`` returns the float64 sum of every replica's ``vector`` (the same
    length in each), the same bits in every replica."""
    global _exchange
    if _exchange is not None:
        raise RuntimeError("a data-parallel step is already running in this process")
    _exchange = exchange
    try:
        yield
    finally:
        _exchange = None


def in_data_parallel_step():
    return _exchange is not None


def sum_over_replicas(*vectors):
    """Each vector (a 1-D array, or a number) summed over the replicas of the step, in its
    own dtype; with one replica, the vectors themselves. One exchange for all of them."""
    if _exchange is None:
        return vectors
    flat = [np.asarray(v) for v in vectors]
    totals = _exchange.all_sum(np.concatenate([v.astype(np.float64).ravel() for v in flat]))
    bounds = np.cumsum([0] + [v.size for v in flat])
    return tuple(totals[lo:hi].reshape(v.shape).astype(v.dtype)
                 for v, lo, hi in zip(flat, bounds, bounds[1:]))
