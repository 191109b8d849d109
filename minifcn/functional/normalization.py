"""Batch normalisation (F.batch_norm), per channel.

Shape legend: N batch, C channels, H height, W width.
x (N, C, H, W) (or any (N, C, ...)); running_mean, running_var, weight, bias (C,)
-> y of x's shape. Statistics of a channel run over its n = N*H*W values.

    x_hat = (x - mean) / sqrt(var + eps)        y = weight * x_hat + bias

batch_norm_relu is relu(batch_norm(...)) as one op, as every BatchNorm of
a VGG or ResNet is followed by a ReLU: the ReLU happens in place on y, and
its mask is applied to the incoming gradient first (bench/RESULTS.md, round 4).

Training normalises with the batch's own mean and biased variance and moves
the running statistics towards them (the variance unbiased, n / (n - 1),
as PyTorch does). Evaluation normalises with the running statistics, so y is
then a fixed affine map of x and its gradient a plain per-channel scale.
"""

import numbers

import numpy

from minifcn.autograd import Function
from minifcn.backend import device_of, get_array_module, is_cuda
from minifcn.functional.activation import relu_backward, relu_gradient
from minifcn.functional.reduction import channel_sum, per_channel, per_channel_passes
from minifcn.parallel import run_parallel, shares
from minifcn.tensor import Tensor


def _channel_dot(a3, b3):
    """(N, C, L), (N, C, L) -> (C,): sum of a * b over each channel, without an a * b array.

    Row by row as (1, L) @ (L, 1) products: BLAS sums in blocks, about as accurate as
    NumPy's pairwise sum (einsum here sums one element after another, and in float32
    over 500,000 values lost two more digits).
    """
    return (a3[:, :, None, :] @ b3[:, :, :, None])[:, :, 0, 0].sum(axis=0)


def _column(vector, dtype):
    """(C,) -> (1, C, 1) in x's dtype, to broadcast against an (N, C, L) array."""
    return vector.astype(dtype, copy=False).reshape(1, -1, 1)


def _joined(parts):
    """The per-share results of run_parallel, [(a, b, ...) per share] -> (a, b, ...) over all
    channels (each a (C,) vector)."""
    if len(parts) == 1:
        return parts[0]
    return tuple(get_array_module(values[0]).concatenate(values) for values in zip(*parts))


def _channels(vector, share):
    """vector (C,) or None -> its entries for the channels ``share`` = (start, stop)."""
    return None if vector is None else vector[share[0]:share[1]]


def _as_they_are(*sums):
    """The batch's per-channel sums are this x's own (nn.SyncBatchNorm2d adds other processes')."""
    return sums


def _forward_channels(x3, weight, bias, running, eps, relu, centred, y, batch_sums=_as_they_are):
    """BatchNorm's forward over some channels: x3 (N, c, L) -> centred and y, written in place.

    running: None in training (normalise with the batch's own statistics), else the
    (mean, var) to normalise with. Returns (mean, var, inv_std, count), each (c,); count is
    the batch's number of values per channel, the same for every channel.
    batch_sums turns sums over x into sums over the whole batch: two calls, as the variance
    needs the batch's mean first.
    """
    xp = get_array_module(x3)
    n = x3.shape[0] * x3.shape[2]  # values per channel: this share's, then (training) the batch's
    with per_channel_passes(xp):
        if running is None:
            total, n = batch_sums(channel_sum(x3), n)
            n = int(n)  # a Python int: no float64 promotion
            mean = total / n
        else:
            mean = running[0].astype(x3.dtype, copy=False)
        xp.subtract(x3, _column(mean, x3.dtype), out=centred)  # first: var without cancellation
        if running is None:
            (squares,) = batch_sums(_channel_dot(centred, centred))
            var = squares / n
        else:
            var = running[1].astype(x3.dtype, copy=False)
        inv_std = (1.0 / xp.sqrt(var + eps)).astype(x3.dtype, copy=False)
        # y = weight * x_hat + bias with x_hat = centred * inv_std, in two passes: x_hat
        # itself is not stored (backward takes it from centred), which saves a third pass
        scale = inv_std if weight is None else inv_std * weight
        xp.multiply(centred, _column(scale, x3.dtype), out=y)
        if bias is not None:
            y += _column(bias, x3.dtype)
        if relu:  # NaN stays NaN, as torch.relu
            xp.maximum(y, 0, out=y)
    count = numpy.full(mean.shape, n)  # on the host even for the GPU: reading it costs no sync
    return mean, var, inv_std, count


def _backward_channels(g, relu_output, centred, inv_std, weight, training, grad_x,
                       batch_sums=_as_they_are):
    """BatchNorm's backward over some channels: g (N, c, L) -> grad_x, written in place
    (g may be grad_x itself). relu_output: y of batch_norm_relu, whose mask g gets first,
    or None. Returns (grad_weight, grad_bias), each (c,): x's part of them (processes that
    share a batch add up their parameter gradients after backward)."""
    if relu_output is not None:
        relu_backward(g, relu_output, out=grad_x)
        g = grad_x
    xp = get_array_module(g)
    with per_channel_passes(xp):
        grad_bias = channel_sum(g)
        grad_weight = _channel_dot(g, centred) * inv_std  # sum(g * x_hat)
        scale = inv_std if weight is None else inv_std * weight  # dy/dx_hat * dx_hat/dx, per channel
        xp.multiply(g, _column(scale, g.dtype), out=grad_x)
        if training:
            # the batch mean and var depend on every x of the channel too, which adds
            # two terms: grad_x = scale * (g - avg(g) - x_hat * avg(g * x_hat)), the
            # averages over the whole batch
            sum_g, sum_g_x_hat, n = batch_sums(grad_bias, grad_weight, g.shape[0] * g.shape[2])
            n = int(n)
            # centred is BatchNorm's own and backward runs once: it takes the product in place
            grad_x -= xp.multiply(centred, _column(scale * sum_g_x_hat * inv_std / n, g.dtype), out=centred)
            grad_x -= _column(scale * sum_g / n, g.dtype)
    return grad_weight, grad_bias


class BatchNorm(Function):
    """y = weight * (x - mean) / sqrt(var + eps) + bias; weight and bias may be None.

    Every pass below touches each element once or twice: a BatchNorm after
    each convolution of a training step sees as many values as the convolution,
    so its passes over memory, not its arithmetic, are its cost. Channels are
    normalised independently, so on the CPU a large x is cut into one share of
    its channels per thread (minifcn.parallel.shares), each share doing every
    pass over its own channels.
    """

    _PASSES_FORWARD, _PASSES_BACKWARD = 6, 10  # reads and writes of an x-sized array, roughly
    batch_sums = staticmethod(_as_they_are)    # the batch is x (a subclass may say otherwise)

    def __init__(self, running_mean, running_var, training, momentum, eps, relu=False):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps
        self.relu = relu  # then y = max(y, 0), in place

    def _shares(self, x, passes):
        return [(0, x.shape[1])] if is_cuda(x) else shares(x.shape[1], passes * x.nbytes)

    def forward(self, x, weight, bias):
        xp = get_array_module(x)
        x3 = per_channel(x)
        centred, y = xp.empty_like(x3), xp.empty_like(x3)
        running = None if self.training else (self.running_mean, self.running_var)

        def forward_share(share):
            c = slice(*share)
            return _forward_channels(x3[:, c], _channels(weight, share), _channels(bias, share),
                                     None if running is None else [_channels(r, share) for r in running],
                                     self.eps, self.relu, centred[:, c], y[:, c], self.batch_sums)

        mean, var, inv_std, count = _joined(run_parallel(forward_share, self._shares(x, self._PASSES_FORWARD)))
        if self.training and self.running_mean is not None and count.size:  # in place: the caller's
            n, m = int(count[0]), self.momentum                                   # buffers move
            self.running_mean[...] = (1 - m) * self.running_mean + m * mean
            self.running_var[...] = (1 - m) * self.running_var + m * var * (n / (n - 1))
        self.has_bias = bias is not None
        self.save_for_backward(centred, inv_std, weight, y if self.relu else None)
        return y.reshape(x.shape)

    def backward(self, grad_y):
        centred, inv_std, weight, relu_output = self.saved
        g = per_channel(grad_y)
        if relu_output is not None and is_cuda(g):  # the GPU's ReLU kernel, up front, into our own array
            grad_x = g = relu_gradient(g, relu_output)
            relu_output = None
        else:
            grad_x = get_array_module(g).empty_like(g)

        def backward_share(share):
            c = slice(*share)
            return _backward_channels(g[:, c], None if relu_output is None else relu_output[:, c],
                                      centred[:, c], inv_std[c], _channels(weight, share), self.training,
                                      grad_x[:, c], self.batch_sums)

        grad_weight, grad_bias = _joined(run_parallel(backward_share, self._shares(g, self._PASSES_BACKWARD)))
        return (grad_x.reshape(grad_y.shape),
                None if weight is None else grad_weight,
                grad_bias if self.has_bias else None)


def _check_channel_vector(value, name, x):
    """None, or a (C,) array/Tensor on x's device; returns the array (or None)."""
    if value is None:
        return None
    array = value.data if isinstance(value, Tensor) else value
    if tuple(array.shape) != (x.shape[1],):
        raise ValueError(f"{name} must have shape ({x.shape[1]},) for x of shape {tuple(x.shape)}, "
                         f"got shape {tuple(array.shape)}")
    if device_of(array) != device_of(x):
        raise ValueError(f"{name} is on {device_of(array)!r} but x is on {device_of(x)!r}")
    return array


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Normalise each channel of x (N, C, H, W), as torch.nn.functional.batch_norm.

    running_mean, running_var: (C,) arrays (or Tensors), updated in place when
    training; both may be None in training (then nothing is tracked).
    weight, bias: (C,) Tensors (the learnt scale and shift) or None.
    """
    return checked_batch_norm(BatchNorm, x, running_mean, running_var, weight, bias, training, momentum, eps,
                              relu=False)


def batch_norm_relu(x, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5):
    """relu(batch_norm(x, ...)), the same values and gradients, as one op.

    One pass over memory and one array fewer than the two ops: the ReLU is applied
    to the normalised output in place, and backward applies its mask to the
    incoming gradient, then reuses that array for the input's gradient.
    """
    return checked_batch_norm(BatchNorm, x, running_mean, running_var, weight, bias, training, momentum, eps,
                              relu=True)


def checked_batch_norm(function, x, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    """``function`` (BatchNorm, or a subclass) applied to x, once the arguments are checked."""
    op = "batch_norm_relu" if relu else "batch_norm"
    x_array = x.data if isinstance(x, Tensor) else x
    if x_array.ndim < 2:
        raise ValueError(f"{op} expects x of shape (N, C, ...), got shape {x_array.shape}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    running_mean = _check_channel_vector(running_mean, "running_mean", x_array)
    running_var = _check_channel_vector(running_var, "running_var", x_array)
    for name, value in (("weight", weight), ("bias", bias)):
        array = _check_channel_vector(value, name, x_array)
        if array is not None and array.dtype != x_array.dtype:  # as conv2d: no silent casts
            raise TypeError(f"{op}: x and {name} must share one dtype, got {x_array.dtype} "
                            f"and {array.dtype}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if training and x_array.size // max(x_array.shape[1], 1) < 2:
        raise ValueError(f"{op} in training needs more than one value per channel, "
                         f"got x of shape {x_array.shape}")
    if not training and running_mean is None:
        raise ValueError(f"{op} in evaluation (training=False) needs running_mean and running_var")
    return function(running_mean, running_var, bool(training), float(momentum), float(eps),
                    relu)(x, weight, bias)
