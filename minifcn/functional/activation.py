"""Activations: ReLU and dropout (element-wise and whole-channel).

Shape legend: N batch, C channels, H height, W width.
relu, dropout: x any shape -> y of x's shape. dropout2d: x (N, C, H, W) -> (N, C, H, W).

Both ops scale the incoming gradient by the very factor that scaled x:
ReLU by 1 where it let x through and 0 elsewhere, dropout by the kept
mask times 1 / (1 - p).
"""

from minifcn.arguments import probability
from minifcn.backend import device_of, get_array_module, primitives, to_device
from minifcn.function import Function
from minifcn.tensor import Tensor


class ReLU(Function):
    """y = max(x, 0)."""

    def forward(self, x):
        y = primitives(x).relu(x)  # NaN stays NaN, as torch.relu
        self.save_for_backward(y)  # y > 0 exactly where x > 0, and y is needed anyway
        return y

    def backward(self, grad_y):
        (y,) = self.saved
        return (primitives(y).relu_backward(grad_y, y),)  # grad_y * (y > 0)


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
        return primitives(x).dropout_apply(x, keep, self.scale)  # x * keep * scale

    def backward(self, grad_y):
        (keep,) = self.saved
        return (primitives(grad_y).dropout_apply(grad_y, keep, self.scale),)


def relu(x):
    """max(x, 0) element-wise; x any shape."""
    return ReLU()(x)


def dropout(x, p=0.5, training=True, rng=None):
    """Zero each element of x with probability p and scale the rest by 1 / (1 - p),
    so the expected value is unchanged and evaluation needs no rescaling.

    x any shape. training=False (or p == 0) returns x itself, as PyTorch does.
    rng: None (the array module's global generator) or a random generator.
    """
    p = probability("dropout probability p", p)
    if not training or p == 0:
        return x if isinstance(x, Tensor) else Tensor(x)
    return Dropout(p, rng)(x)


def dropout2d(x, p=0.5, training=True, rng=None):
    """Zero whole channels: x (N, C, H, W), each x[n, c] kept with probability 1 - p
    and scaled by 1 / (1 - p). Neighbouring pixels of a feature map are strongly
    correlated, so dropping single pixels would barely regularise a conv net."""
    p = probability("dropout probability p", p)
    if len(x.shape) != 4:
        raise ValueError(f"dropout2d expects x of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not training or p == 0:
        return x if isinstance(x, Tensor) else Tensor(x)
    return Dropout(p, rng, channelwise=True)(x)
