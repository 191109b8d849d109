"""The reference backend: every primitive in plain NumPy, written to be read.

Every other backend implements these same functions with the same signatures
and is tested against them; ``MINIFCN_BACKEND=reference`` (or
``minifcn.set_backend("reference")``) runs every op on them. The code is
written with ``xp = get_array_module(x)``, so it runs on CuPy arrays too.
"""

from minifcn.backend.reference.conv import (col2im, conv2d_backward, conv_transpose2d_backward, gather,
                                            im2col, scatter, window_products)
from minifcn.backend.reference.elementwise import adam_update_, dropout_apply, relu, relu_backward, sgd_update_
from minifcn.backend.reference.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from minifcn.backend.reference.normalization import channel_affine, channel_dot, channel_sum
from minifcn.backend.reference.pooling import max_pool2d_backward, max_pool2d_forward
from minifcn.backend.reference.resample import interpolate_backward, interpolate_forward
from minifcn.backend.reference.shape import crop_backward, crop_forward

NAME = "reference"

PRIMITIVES = (
    "im2col", "col2im", "gather", "scatter", "window_products", "conv2d_backward", "conv_transpose2d_backward",
    "max_pool2d_forward", "max_pool2d_backward",
    "channel_sum", "channel_dot", "channel_affine",
    "relu", "relu_backward", "dropout_apply",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
    "interpolate_forward", "interpolate_backward",
    "crop_forward", "crop_backward",
    "sgd_update_", "adam_update_",
)
"""The names every backend provides (tests/test_backends.py checks that each does)."""
