"""Batch normalisation (F.batch_norm), per channel.

Shape legend: N batch, C channels, H height, W width.
x (N, C, H, W) (or any (N, C, ...)); running_mean, running_var, weight, bias (C,)
-> y of x's shape. Statistics of a channel run over its n = N*H*W values.

    x_hat = (x - mean) / sqrt(var + eps)        y = weight * x_hat + bias

Training normalises with the batch's own mean and biased variance and moves
the running statistics towards them (the variance unbiased, n / (n - 1),
as PyTorch does). Evaluation normalises with the running statistics, so y is
then a fixed affine map of x and its gradient a plain per-channel scale.
"""

import numbers

from minifcn.autograd import Function
from minifcn.backend import device_of, get_array_module
from minifcn.tensor import Tensor


def _channel_view(x):
    """The axes a channel's statistics run over, and the shape that broadcasts (C,) against x."""
    return (0,) + tuple(range(2, x.ndim)), (1, -1) + (1,) * (x.ndim - 2)


class BatchNorm(Function):
    """y = weight * (x - mean) / sqrt(var + eps) + bias; weight and bias may be None."""

    def __init__(self, running_mean, running_var, training, momentum, eps):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps

    def forward(self, x, weight, bias):
        xp = get_array_module(x)
        axes, shape = _channel_view(x)
        if self.training:
            mean, var = x.mean(axis=axes), x.var(axis=axes)
            if self.running_mean is not None:  # in place: the caller's buffers move
                n = x.size // x.shape[1]
                m = self.momentum
                self.running_mean[...] = (1 - m) * self.running_mean + m * mean
                self.running_var[...] = (1 - m) * self.running_var + m * var * (n / (n - 1))
        else:
            mean = self.running_mean.astype(x.dtype, copy=False)
            var = self.running_var.astype(x.dtype, copy=False)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        x_hat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
        y = x_hat if weight is None else x_hat * weight.reshape(shape)
        y = y if bias is None else y + bias.reshape(shape)
        self.has_bias = bias is not None
        self.save_for_backward(x_hat, inv_std, weight)
        return y

    def backward(self, grad_y):
        x_hat, inv_std, weight = self.saved
        axes, shape = _channel_view(grad_y)
        grad_bias = grad_y.sum(axis=axes)
        grad_weight = (grad_y * x_hat).sum(axis=axes)
        scale = inv_std if weight is None else inv_std * weight  # dy/dx_hat * dx_hat/dx, per channel
        if self.training:
            # the batch mean and var depend on every x of the channel too, which adds
            # two terms: grad_x = scale * (g - avg(g) - x_hat * avg(g * x_hat)), g = grad_y
            n = grad_y.size // grad_y.shape[1]
            grad_x = scale.reshape(shape) * (grad_y - grad_bias.reshape(shape) / n
                                             - x_hat * (grad_weight.reshape(shape) / n))
        else:
            grad_x = grad_y * scale.reshape(shape)
        return (grad_x,
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
    x_array = x.data if isinstance(x, Tensor) else x
    if x_array.ndim < 2:
        raise ValueError(f"batch_norm expects x of shape (N, C, ...), got shape {x_array.shape}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    running_mean = _check_channel_vector(running_mean, "running_mean", x_array)
    running_var = _check_channel_vector(running_var, "running_var", x_array)
    _check_channel_vector(weight, "weight", x_array)
    _check_channel_vector(bias, "bias", x_array)
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if training and x_array.size // max(x_array.shape[1], 1) < 2:
        raise ValueError(f"batch_norm in training needs more than one value per channel, "
                         f"got x of shape {x_array.shape}")
    if not training and running_mean is None:
        raise ValueError("batch_norm in evaluation (training=False) needs running_mean and running_var")
    return BatchNorm(running_mean, running_var, bool(training), float(momentum), float(eps))(x, weight, bias)
