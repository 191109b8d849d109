"""ReLU in the fast CPU backend: large arrays in one share per thread.

At 500x500 FCN's ReLUs pass over arrays of a hundred MB and more, and two
threads copy memory faster than one. Each share is element-wise, so the bits do
not depend on the split.
"""

import numpy

from minifcn.backend.cpu.threads import run_parallel, shares


def in_shares(function, *arrays):
    """function(*arrays, out=out) into a new array ``out`` of arrays[0]'s shape, element-wise;
    large C-contiguous arrays are cut into one share of their elements per thread."""
    out = numpy.empty(arrays[0].shape, dtype=arrays[0].dtype)
    pieces = shares(out.size, out.nbytes + sum(a.nbytes for a in arrays))
    if len(pieces) == 1 or not all(a.flags.c_contiguous for a in arrays):
        return function(*arrays, out=out)
    flat_out, flat = out.reshape(-1), [a.reshape(-1) for a in arrays]
    run_parallel(lambda bounds: function(*(a[slice(*bounds)] for a in flat), out=flat_out[slice(*bounds)]),
                 pieces)
    return out


def _relu_into(x, out):
    return numpy.maximum(x, 0, out=out)  # NaN stays NaN, as torch.relu


def _relu_backward_into(grad_y, y, out):
    """grad_y * (y > 0) as two plain passes: the mask written as 0.0 / 1.0 into ``out``, then
    multiplied in place. NumPy multiplies floats by bools through a slower casting loop."""
    numpy.greater(y, 0, out=out)
    return numpy.multiply(out, grad_y, out=out)


def relu(x):
    """max(x, 0)."""
    return in_shares(_relu_into, x)


def relu_backward(grad_y, y):
    """grad_y * (y > 0)."""
    return in_shares(_relu_backward_into, grad_y, y)
