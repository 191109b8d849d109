"""Batch normalisation (F.batch_norm), per channel.

Shape legend: N batch, C channels, H height, W width.
x (N, C, H, W) (or any (N, C, ...)); running_mean, running_var, weight, bias (C,)
-> y of x's shape. Statistics of a channel run over its n = N*H*W values.

    x_hat = (x - mean) / sqrt(var + eps)        y = weight * x_hat + bias

batch_norm_relu is relu(batch_norm(...)) as one op, as every BatchNorm of
a VGG or ResNet is followed by a ReLU: the ReLU happens in place on y, and
its mask is applied to the incoming gradient first.

Training normalises with the batch's own mean and biased variance and moves
the running statistics towards them (the variance unbiased, n / (n - 1),
as PyTorch does). Evaluation normalises with the running statistics, so y is
then a fixed affine map of x and its gradient a plain per-channel scale.
"""

import numbers

from minifcn.backend import device_of, get_array_module, primitives
from minifcn.backend.reference.normalization import per_channel
from minifcn.function import Function
from minifcn.tensor import Tensor


def _as_they_are(*sums):
    """The batch's per-channel sums are this x's own (nn.SyncBatchNorm2d adds other processes')."""
    return sums


class BatchNorm(Function):
    """y = weight * (x - mean) / sqrt(var + eps) + bias, per channel; weight and bias may be None.

    Written on per-channel primitives (minifcn.backend): ``channel_sum`` and
    ``channel_dot`` (sums over a channel's N*H*W values) and ``channel_affine``
    (x * scale[c] + shift[c]). ``batch_sums`` turns this x's sums into the whole
    batch's: a subclass may add those of other processes (nn.SyncBatchNorm2d).
    """

    batch_sums = staticmethod(_as_they_are)

    def __init__(self, running_mean, running_var, training, momentum, eps, relu=False):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps
        self.relu = relu  # then y = max(y, 0), in place

    def forward(self, x, weight, bias):
        P = primitives(x)
        x3 = per_channel(x)  # (N, C, L)
        if self.training:
            total, n = self.batch_sums(P.channel_sum(x3), x3.shape[0] * x3.shape[2])
            n = int(n)  # a Python int: no float64 promotion
            mean = total / n
            centred = P.channel_affine(x3, shift=-mean)  # first, so the variance has no cancellation
            (squares,) = self.batch_sums(P.channel_dot(centred, centred))
            var = squares / n
            if self.running_mean is not None:  # in place: the caller's buffers move
                m = self.momentum
                self.running_mean[...] = (1 - m) * self.running_mean + m * mean
                self.running_var[...] = (1 - m) * self.running_var + m * var * (n / (n - 1))  # unbiased
        else:
            mean, var = (r.astype(x.dtype, copy=False) for r in (self.running_mean, self.running_var))
            centred = P.channel_affine(x3, shift=-mean)
        inv_std = (1.0 / get_array_module(x).sqrt(var + self.eps)).astype(x.dtype, copy=False)
        scale = inv_std if weight is None else inv_std * weight
        # y = x_hat * weight + bias with x_hat = centred * inv_std: x_hat itself is not stored
        y = P.channel_affine(centred, scale, bias, relu=self.relu)
        self.has_bias = bias is not None
        self.save_for_backward(centred, inv_std, weight, y if self.relu else None)
        return y.reshape(x.shape)

    def backward(self, grad_y):
        centred, inv_std, weight, relu_output = self.saved
        P = primitives(grad_y)
        g = per_channel(grad_y)
        if relu_output is not None:  # batch_norm_relu: the ReLU's mask first
            g = P.relu_backward(g, relu_output)
        grad_bias = P.channel_sum(g)
        grad_weight = P.channel_dot(g, centred) * inv_std  # sum(g * x_hat)
        scale = inv_std if weight is None else inv_std * weight  # dy/dx_hat * dx_hat/dx, per channel
        if not self.training:  # y is a fixed affine map of x
            grad_x = P.channel_affine(g, scale)
        else:
            # The batch's mean and variance depend on every x of the channel too, which adds two
            # terms: grad_x = scale * (g - avg(g) - x_hat * avg(g * x_hat)), averaged over the batch
            sum_g, sum_g_x_hat, n = self.batch_sums(grad_bias, grad_weight, g.shape[0] * g.shape[2])
            n = int(n)
            grad_x = P.channel_affine(g, scale, -scale * sum_g / n, out=g if relu_output is not None else None)
            # centred is BatchNorm's own and backward runs once: the product may take its place
            grad_x -= P.channel_affine(centred, scale * sum_g_x_hat * inv_std / n, out=centred)
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
