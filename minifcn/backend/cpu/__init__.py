"""The fast CPU backend: the reference's primitives, faster on NumPy arrays.

Convolutions in cache-sized blocks of im2col straight into BLAS, rewritten
scatters and tiled pools (conv.py, conv_blocks.py, pooling.py); large passes
shared among a small pool of threads (threads.py); BatchNorm's per-channel
sums as BLAS products (normalization.py). Every knob is in tuning.py. What
is not here runs the reference. Everything is tested against the reference
(tests/test_backends.py and the op tests, which run each case on every backend).
"""

from minifcn.backend.cpu.conv import conv2d_backward, conv_transpose2d_backward, gather, scatter, window_products
from minifcn.backend.cpu.elementwise import relu, relu_backward
from minifcn.backend.cpu.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from minifcn.backend.cpu.normalization import channel_affine, channel_dot, channel_sum
from minifcn.backend.cpu.pooling import max_pool2d_backward, max_pool2d_forward
from minifcn.backend.reference import (adam_update_, col2im, crop_backward, crop_forward, dropout_apply, im2col,
                                       interpolate_backward, interpolate_forward, sgd_update_)

NAME = "cpu"
