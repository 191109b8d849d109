"""The CUDA backend: the raw CUDA kernels of ``kernels/*.cu``, launched through CuPy.

The reference's primitives (minifcn.backend.reference), same names and
arguments, on CuPy arrays. A kernel each:

    im2col, col2im                                          kernels/conv.cu
    max_pool2d_forward, max_pool2d_backward                 kernels/pooling.cu
    interpolate_forward, interpolate_backward               kernels/resample.cu
    softmax_cross_entropy_forward, softmax_cross_entropy_backward   kernels/loss.cu
    crop_forward, crop_backward                             kernels/crop.cu
    relu_backward, dropout_apply, sgd_update_, adam_update_ kernels/elementwise.cu

The convolution products are the im2col / col2im kernels and CuPy's matrix
products (conv.py); BatchNorm's per-channel sums and ReLU's forward are the
reference's NumPy code, which CuPy runs as it is. The backend runs CuPy arrays
(minifcn.backend.dispatch).
Each .cu file is compiled by NVRTC once per process, on first use
(``loader.py``). Importing this package does not import CuPy, so it works on
a machine without a GPU; there the same kernels can still run, slowly, on
NumPy arrays through the CPU emulator (``cpu_emulation.py``), which is how
the test suite proves them equal to NumPy without a GPU.
"""

from minifcn.backend.cuda.conv import (conv2d_backward, conv_transpose2d_backward, gather, scatter,
                                       window_products)
from minifcn.backend.cuda.primitives import (
    adam_update_,
    col2im,
    crop_backward,
    crop_forward,
    dropout_apply,
    im2col,
    interpolate_backward,
    interpolate_forward,
    max_pool2d_backward,
    max_pool2d_forward,
    relu_backward,
    sgd_update_,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
)
from minifcn.backend.reference import channel_affine, channel_dot, channel_sum, relu

NAME = "cuda"
