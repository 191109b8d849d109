"""BatchNorm's per-channel primitives in the fast CPU backend.

- Sums over a channel as BLAS products, (N, C, L) @ (L,) and (1, L) @ (L, 1)
  row by row: BLAS reads each row once and sums it in blocks, several times as
  fast as NumPy's sum over axes (0, 2), and as accurate.
- Per-channel maps with NumPy's ufunc buffer at 64 elements: a pass between an
  (N, C, L) array and a (1, C, 1) column with rows shorter than the default
  8192-element buffer goes through NumPy's buffered loop, several times as slow
  as a plain pass at 54x54 or 27x27 pixels; with a small buffer it is as fast.
- Large maps in one share of the channels per thread.
"""

import contextlib

import numpy

from minifcn.backend.cpu import tuning
from minifcn.backend.cpu.threads import run_parallel, shares
from minifcn.backend.reference import normalization as reference
from minifcn.backend.reference.normalization import per_channel


@contextlib.contextmanager
def _small_ufunc_buffer():
    """NumPy's ufunc buffer at 64 elements inside the block (per thread, restored on leaving)."""
    previous = numpy.setbufsize(64)
    try:
        yield
    finally:
        numpy.setbufsize(previous)


def _channel_shares(function, rows, *others):
    """function(rows, *others) -> (C,), over one share of the channels per thread for a large x."""
    pieces = shares(rows.shape[1], rows.nbytes * (1 + len(others)))
    if len(pieces) == 1:
        return function(rows, *others)
    parts = run_parallel(lambda c: function(*(a[:, slice(*c)] for a in (rows,) + others)), pieces)
    return numpy.concatenate(parts)


def _sum_of_rows(rows):
    return (rows @ numpy.ones(rows.shape[2], dtype=rows.dtype)).sum(axis=0)


def _dot_of_rows(a3, b3):
    return (a3[:, :, None, :] @ b3[:, :, :, None])[:, :, 0, 0].sum(axis=0)


def channel_sum(x):
    """x (N, C, ...) -> (C,): the sum of each channel."""
    return _channel_shares(_sum_of_rows, per_channel(x))


def channel_dot(a, b):
    """a, b (N, C, ...) -> (C,): the sum of a * b over each channel, without an a * b array."""
    return _channel_shares(_dot_of_rows, per_channel(a), per_channel(b))


def channel_affine(x3, scale=None, shift=None, relu=False, out=None):
    """x3 (N, C, L) -> x3 * scale[c] + shift[c], then max(., 0) if ``relu``; into ``out``."""
    if out is None:
        out = numpy.empty_like(x3)
    pieces = shares(x3.shape[1], tuning.BATCH_NORM_PASSES * x3.nbytes)

    def affine(channels):
        c = slice(*channels)
        with _small_ufunc_buffer():
            reference.channel_affine(x3[:, c], None if scale is None else scale[c],
                                     None if shift is None else shift[c], relu, out[:, c])

    run_parallel(affine, pieces)
    return out
