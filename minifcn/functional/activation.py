"""Activations: ReLU and dropout (element-wise and whole-channel).

Shape legend: N batch, C channels, H height, W width.
relu, dropout: x any shape -> y of x's shape. dropout2d: x (N, C, H, W) -> (N, C, H, W).

Both ops scale the incoming gradient by the very factor that scaled x:
ReLU by 1 where it let x through and 0 elsewhere, dropout by the kept
mask times 1 / (1 - p).
"""

import numbers

from minifcn.autograd import Function
from minifcn.backend import device_of, get_array_module, is_cuda, to_device
from minifcn.parallel import run_parallel, shares
from minifcn.tensor import Tensor


def relu_backward(grad_y, y, out=None):
    """grad_y (any) * (y > 0): the gradient passes where ReLU passed x (not at x == 0).

    The mask is written as 0.0 / 1.0 into ``out`` and then multiplied by grad_y, in
    place: the same bits as grad_y * (y > 0), in two plain passes. NumPy multiplies a
    float array by a bool one through its casting loop, 1.1-1.8x as slow in a training
    step's BatchNorms (bench/RESULTS.md, round 6).
    """
    xp = get_array_module(grad_y)
    if out is None:
        out = xp.empty(grad_y.shape, dtype=grad_y.dtype)
    elif xp.may_share_memory(out, grad_y):  # the mask would overwrite grad_y
        return xp.multiply(grad_y, y > 0, out=out)
    xp.greater(y, 0, out=out)
    return xp.multiply(out, grad_y, out=out)


def _in_shares(function, *arrays):
    """function(*arrays, out=out) into a new array ``out`` of arrays[0]'s shape, element-wise.

    Large C-contiguous arrays on the CPU are cut into one share of their elements per
    thread (minifcn.parallel.shares), each written by its thread: at 500x500 FCN's ReLUs
    pass over arrays of up to 125 MB, and two threads copy memory about 1.6x as fast.
    """
    xp = get_array_module(arrays[0])
    out = xp.empty(arrays[0].shape, dtype=arrays[0].dtype)
    pieces = shares(out.size, out.nbytes + sum(a.nbytes for a in arrays))
    if len(pieces) == 1 or is_cuda(out) or not all(a.flags.c_contiguous for a in arrays):
        return function(*arrays, out=out)
    flat_out, flat = out.reshape(-1), [a.reshape(-1) for a in arrays]
    run_parallel(lambda bounds: function(*(a[slice(*bounds)] for a in flat), out=flat_out[slice(*bounds)]),
                 pieces)
    return out


def relu_gradient(grad_y, y):
    """relu_backward on either device, into a new array: the CUDA kernel on the GPU, and
    on the CPU one share of a large array per thread. ReLU and batch_norm_relu use it."""
    if is_cuda(grad_y):
        from minifcn import cuda
        return cuda.relu_backward(grad_y, y)
    return _in_shares(relu_backward, grad_y, y)


def dropout_apply(x, keep_mask, scale):
    """x (any) * keep_mask (bool/uint8, x's shape) * scale; forward and backward alike.

    A dropped NaN stays NaN (NaN * 0), as in PyTorch: dropout must not hide a
    broken activation.
    """
    return x * keep_mask * scale


class ReLU(Function):
    """y = max(x, 0)."""

    def forward(self, x):
        xp = get_array_module(x)
        y = _in_shares(lambda part, out: xp.maximum(part, 0, out=out), x)  # NaN stays NaN, as torch.relu
        self.save_for_backward(y)  # y > 0 exactly where x > 0, and y is needed anyway
        return y

    def backward(self, grad_y):
        (y,) = self.saved
        return (relu_gradient(grad_y, y),)


def _draw_keep_mask(x, mask_shape, keep_prob, rng):
    """A bool mask of ``mask_shape``, True with probability ``keep_prob``, on x's device.

    rng None draws from the array module's global generator (numpy.random.seed or
    cupy.random.seed make it repeatable); a generator (numpy.random.Generator, or a
    CuPy one) draws from it and the mask is moved to x's device, so one seed gives
    the same mask on CPU and GPU.
    """
    xp = get_array_module(x)
    source = xp.random if rng is None else rng
    return to_device(source.random(mask_shape) < keep_prob, device_of(x))


def _dropout_apply(x, keep, scale):
    if is_cuda(x):
        from minifcn import cuda
        return cuda.dropout_apply(x, keep, scale)
    return dropout_apply(x, keep, scale)


class Dropout(Function):
    """y = x * keep / (1 - p), keep ~ Bernoulli(1 - p) per element, or per (n, c)
    channel when ``channelwise`` (nn.Dropout2d: a feature map is dropped whole)."""

    def __init__(self, p, rng=None, channelwise=False):
        self.p, self.rng, self.channelwise = p, rng, channelwise
        self.scale = 0.0 if p == 1 else 1.0 / (1.0 - p)  # p == 1: all zeros, not 0 * inf

    def forward(self, x):
        xp = get_array_module(x)
        mask_shape = x.shape[:2] + (1,) * (x.ndim - 2) if self.channelwise else x.shape
        keep = _draw_keep_mask(x, mask_shape, 1.0 - self.p, self.rng)
        keep = xp.broadcast_to(keep, x.shape)  # a view: one bool per channel in memory
        self.save_for_backward(keep)
        return _dropout_apply(x, keep, self.scale)

    def backward(self, grad_y):
        (keep,) = self.saved
        return (_dropout_apply(grad_y, keep, self.scale),)


def _check_probability(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
        raise ValueError(f"dropout probability p must be a number in [0, 1], got {p!r}")
    return float(p)


def relu(x):
    """max(x, 0) element-wise; x any shape."""
    return ReLU()(x)


def dropout(x, p=0.5, training=True, rng=None):
    """Zero each element of x with probability p and scale the rest by 1 / (1 - p),
    so the expected value is unchanged and evaluation needs no rescaling.

    x any shape. training=False (or p == 0) returns x itself, as PyTorch does.
    rng: None (the array module's global generator) or a random generator.
    """
    p = _check_probability(p)
    if not training or p == 0:
        return x if isinstance(x, Tensor) else Tensor(x)
    return Dropout(p, rng)(x)


def dropout2d(x, p=0.5, training=True, rng=None):
    """Zero whole channels: x (N, C, H, W), each x[n, c] kept with probability 1 - p
    and scaled by 1 / (1 - p). Neighbouring pixels of a feature map are strongly
    correlated, so dropping single pixels would barely regularise a conv net."""
    p = _check_probability(p)
    if len(x.shape) != 4:
        raise ValueError(f"dropout2d expects x of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not training or p == 0:
        return x if isinstance(x, Tensor) else Tensor(x)
    return Dropout(p, rng, channelwise=True)(x)
