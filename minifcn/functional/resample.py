"""Resampling: bilinear and nearest-neighbour interpolation (F.interpolate).

Shape legend: N batch, C channels, H, W input height and width, OH, OW output.
x (N, C, H, W) -> y (N, C, OH, OW).

Both modes are linear in x and separable, so along each axis they are a
matrix with one row per output pixel and one column per input pixel:

    y = A_h @ x @ A_w^T          A_h (OH, H), A_w (OW, W)

Row o holds the weights of the input pixels that output o reads: two weights
summing to 1 for bilinear, a single 1 for nearest. The gradient of a linear
map is its transpose, so backward needs no bookkeeping of indices:

    grad_x = A_h^T @ grad_y @ A_w

Where an output pixel reads from follows PyTorch exactly (ratio = input
pixels per output pixel):
    bilinear, align_corners=True:   src = dst * (in - 1) / (out - 1)      (0 if out == 1)
    bilinear, align_corners=False:  src = max((dst + 0.5) * ratio - 0.5, 0)
    nearest:                        src = min(floor(dst * ratio), in - 1)
with ratio = in / out, except that when the caller gave a scale factor s,
PyTorch uses ratio = 1 / s (output size floor(in * s) makes in / out differ).
Like PyTorch, an axis whose size does not change is copied, and "nearest"
doubles an axis by repeating each pixel twice.
"""

import math
import numbers

from minifcn.backend import primitives
from minifcn.function import Function

MODES = ("bilinear", "nearest")


class Interpolate(Function):
    """y = A_h @ x @ A_w^T; grad_x = A_h^T @ grad_y @ A_w (minifcn.backend's interpolate_*)."""

    def __init__(self, size, mode, align_corners, scales):
        self.size, self.mode, self.align_corners, self.scales = size, mode, align_corners, scales

    def forward(self, x):
        self.in_size = x.shape[2:]
        # a linear map along each axis: A_h @ x @ A_w^T
        return primitives(x).interpolate_forward(x, self.size, self.mode, self.align_corners, self.scales)

    def backward(self, grad_y):
        # the transpose of the same linear map: A_h^T grad_y A_w
        return (primitives(grad_y).interpolate_backward(grad_y, self.in_size, self.mode, self.align_corners,
                                                        self.scales),)


def _pair(value, name):
    """An int/float or a pair of them -> a tuple of two (values are checked by the caller)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or a pair (h, w), got {value!r}")
        return tuple(value)
    return (value, value)


def _output_size(in_size, size, scale_factor):
    """(OH, OW) and the scales to pass on (None when the size was given)."""
    if (size is None) == (scale_factor is None):
        raise ValueError(f"interpolate needs exactly one of size and scale_factor, "
                         f"got size={size!r} and scale_factor={scale_factor!r}")
    if size is not None:
        size = _pair(size, "size")
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"size must be a positive int or a pair of them, got {size!r}")
        return tuple(int(s) for s in size), None
    scales = _pair(scale_factor, "scale_factor")
    if not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) and s > 0
               for s in scales):
        raise ValueError(f"scale_factor must be a positive finite number or a pair of them, "
                         f"got {scale_factor!r}")
    scales = tuple(float(s) for s in scales)
    out = tuple(math.floor(n * s) for n, s in zip(in_size, scales))
    if min(out) < 1:
        raise ValueError(f"scale_factor={scale_factor!r} shrinks an input of size {tuple(in_size)} "
                         f"to {out}; every output side needs at least one pixel")
    return out, scales


def interpolate(x, size=None, scale_factor=None, mode="bilinear", align_corners=False):
    """Resize x (N, C, H, W) to (N, C, OH, OW), as torch.nn.functional.interpolate.

    size: (OH, OW) or one int for both; or scale_factor s (or (sh, sw)), giving
    OH = floor(H * sh). mode "bilinear" or "nearest". align_corners=True makes the
    corner pixels of input and output coincide (bilinear only).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if align_corners is None:
        align_corners = False
    if mode == "nearest" and align_corners:
        raise ValueError("align_corners=True only applies to mode='bilinear'; "
                         "mode='nearest' needs align_corners False or None")
    if len(x.shape) != 4:
        raise ValueError(f"interpolate expects x of shape (N, C, H, W), got shape {tuple(x.shape)}")
    out_size, scales = _output_size(x.shape[2:], size, scale_factor)
    if align_corners:
        scales = None  # PyTorch ignores the scale factor when corners are aligned
    return Interpolate(out_size, mode, bool(align_corners), scales)(x)
