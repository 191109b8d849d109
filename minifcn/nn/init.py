"""Initial values for parameters, and the random stream behind them.

The random stream
-----------------
Everything random in ``minifcn.nn`` (initialisers here, the dropout masks of
``Dropout``/``Dropout2d``) draws from ONE NumPy ``Generator`` kept in this
module (dropout masks are drawn on the CPU and moved to the device, so a seed
gives the same masks on CPU and GPU). So a run is reproducible by calling ``manual_seed(seed)`` once before
building the model, and resumable by saving ``get_rng_state()`` with the
checkpoint and handing it back to ``set_rng_state()`` (``save_checkpoint``
stores it for you; ``load_checkpoint(..., restore_rng=True)`` restores it).

Initialisers
------------
Each ``*_`` function fills a Parameter (or Tensor) in place, keeping its
shape, dtype and device, and returns it. Values are drawn on the CPU in the
tensor's dtype (float32 draws are about twice as fast as float64 for VGG's
100M-element fc6 weight), so one seed gives the same numbers on every device.

``fan_in`` of a weight is the number of inputs that feed one output:
``C_in * kH * kW`` for a Conv2d weight (C_out, C_in, kH, kW). He (Kaiming)
initialisation scales by ``gain / sqrt(fan_in)`` with gain sqrt(2) for ReLU,
so activations keep their variance layer after layer.

``bilinear_`` sets a ConvTranspose2d weight to the fixed bilinear upsampling
kernel that FCN uses for its upsampling layers (``surgery.interp`` in the
reference Caffe code).
"""

import contextlib
import math

import numpy

from minifcn import backend

# ---- the random stream --------------------------------------------------------

_generator = numpy.random.default_rng()  # seeded from OS entropy until manual_seed()


def manual_seed(seed):
    """Restart the random stream from ``seed`` (a non-negative int).

    The Generator object stays the same, so a reference to ``generator()``
    taken earlier follows the new seed too.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _generator.bit_generator.state = type(_generator.bit_generator)(int(seed)).state


def generator():
    """The ``numpy.random.Generator`` every random draw in minifcn.nn uses."""
    return _generator


@contextlib.contextmanager
def batch_share(start, stop, total):
    """Within the block this process holds images ``start:stop`` of a batch of ``total`` that
    other processes share (minifcn.distributed): a dropout mask is drawn for the whole batch
    and this share of it kept, so every rank draws the masks one process would draw, and the
    stream stays the same on every rank."""
    global _share
    if not 0 <= start < stop <= total:
        raise ValueError(f"batch_share needs 0 <= start < stop <= total, got {start}, {stop}, {total}")
    previous, _share = _share, (start, stop, total)
    try:
        yield
    finally:
        _share = previous


def mask_generator():
    """The generator dropout masks come from: ``generator()``, or within ``batch_share`` one
    that draws the whole batch's mask and hands back this process's share of it."""
    return _generator if _share is None else _ShareOfBatch(*_share)


_share = None  # (start, stop, total) within batch_share


class _ShareOfBatch:
    def __init__(self, start, stop, total):
        self.start, self.stop, self.total = start, stop, total

    def random(self, shape):
        if shape[0] != self.stop - self.start:
            raise ValueError(f"a mask for {shape[0]} images, but this process holds {self.stop - self.start} "
                             f"(images {self.start}:{self.stop} of {self.total})")
        return _generator.random((self.total,) + tuple(shape[1:]))[self.start:self.stop]


def get_rng_state():
    """The stream's state as a JSON-serialisable dict (a copy)."""
    return _copy_state(_generator.bit_generator.state)


def set_rng_state(state):
    """Put the stream back to a state returned by ``get_rng_state()``."""
    expected = type(_generator.bit_generator).__name__
    if not isinstance(state, dict) or state.get("bit_generator") != expected:
        raise ValueError(f"state must be a dict from get_rng_state() for a {expected} generator, "
                         f"got {state!r:.200}")
    bit_generator = type(_generator.bit_generator)()  # a scratch one: a bad state leaves ours as it was
    try:
        bit_generator.state = _copy_state(state)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"not a valid {expected} state: {err}") from None
    _generator.bit_generator.state = bit_generator.state


def _copy_state(state):
    return {k: (_copy_state(v) if isinstance(v, dict) else int(v) if isinstance(v, numpy.integer) else v)
            for k, v in state.items()}


# ---- fan-in and gains ---------------------------------------------------------

def fan_in(weight):
    """Inputs feeding one output: shape[1] * prod(shape[2:]) for (C_out, C_in, kH, kW)."""
    shape = weight.shape
    if len(shape) < 2:
        raise ValueError(f"fan_in needs a weight with at least 2 dims, got shape {tuple(shape)}")
    return shape[1] * math.prod(shape[2:])


def _check_fan(fan):
    if not fan > 0:
        raise ValueError(f"fan_in must be positive, got {fan!r}")
    return fan


def _draw_dtype(tensor):
    """float32 for float32 tensors, float64 for the rest (what Generator can draw)."""
    return numpy.float32 if tensor.dtype == numpy.float32 else numpy.float64


def _fill(tensor, values):
    """Replace ``tensor``'s values (same shape), keeping its dtype and device."""
    values = numpy.asarray(values, dtype=tensor.dtype)
    if values.shape != tensor.shape:
        values = numpy.broadcast_to(values, tensor.shape)
    tensor.data = backend.to_device(numpy.ascontiguousarray(values), tensor.device)
    return tensor


# ---- initialisers --------------------------------------------------------------

def zeros_(tensor):
    return _fill(tensor, 0.0)


def ones_(tensor):
    return _fill(tensor, 1.0)


def constant_(tensor, value):
    return _fill(tensor, value)


def normal_(tensor, mean=0.0, std=1.0):
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std!r}")
    values = _generator.standard_normal(tensor.shape, dtype=_draw_dtype(tensor))
    values *= std
    values += mean
    return _fill(tensor, values)


def uniform_(tensor, low=0.0, high=1.0):
    if not low <= high:
        raise ValueError(f"uniform_ needs low <= high, got low={low!r}, high={high!r}")
    values = _generator.random(tensor.shape, dtype=_draw_dtype(tensor))
    values *= high - low
    values += low
    return _fill(tensor, values)


def kaiming_normal_(tensor, fan=None, gain=math.sqrt(2.0)):
    """He normal: N(0, std^2) with std = gain / sqrt(fan_in) (gain sqrt(2) suits ReLU)."""
    std = gain / math.sqrt(_check_fan(fan_in(tensor) if fan is None else fan))
    return normal_(tensor, 0.0, std)


def kaiming_uniform_(tensor, fan=None, gain=math.sqrt(2.0)):
    """He uniform: U(-b, b) with b = gain * sqrt(3 / fan_in), the same variance as kaiming_normal_."""
    bound = gain * math.sqrt(3.0 / _check_fan(fan_in(tensor) if fan is None else fan))
    return uniform_(tensor, -bound, bound)


# ---- bilinear upsampling kernel -------------------------------------------------

def bilinear_filter(kernel_size):
    """The (k, k) bilinear interpolation filter of FCN's ``surgery.upsample_filt``.

    factor = (k + 1) // 2 is the upsampling factor the filter is made for;
    tap x gets weight 1 - |x - center| / factor, the linear "tent" centred on
    the filter, in each direction. E.g. k=4 -> [0.25, 0.75, 0.75, 0.25] per axis.
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, numpy.integer)) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    tent = 1.0 - numpy.abs(numpy.arange(kernel_size) - center) / factor
    return numpy.outer(tent, tent)


def bilinear_kernel(kernel_size, channels, dtype=numpy.float32):
    """A (channels, channels, k, k) ConvTranspose2d weight that upsamples each channel
    on its own: the bilinear filter on the diagonal (c, c), zeros elsewhere."""
    if isinstance(channels, bool) or not isinstance(channels, (int, numpy.integer)) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    weight = numpy.zeros((channels, channels, kernel_size, kernel_size), dtype=dtype)
    weight[numpy.arange(channels), numpy.arange(channels)] = bilinear_filter(kernel_size)
    return weight


def bilinear_(weight):
    """Fill a ConvTranspose2d weight (C, C, k, k) with ``bilinear_kernel(k, C)``.

    With stride f, kernel_size 2f and padding f // 2 (f even), the layer then
    computes bilinear upsampling by f (align_corners=False) away from the borders.
    """
    shape = tuple(weight.shape)
    if len(shape) != 4 or shape[0] != shape[1] or shape[2] != shape[3]:
        raise ValueError(f"bilinear_ needs a weight of shape (C, C, k, k), got {shape}")
    return _fill(weight, bilinear_kernel(shape[2], shape[0], dtype=numpy.float64))
