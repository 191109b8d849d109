"""minifcn.cuda: the raw CUDA kernels of ``kernels/*.cu``, launched through CuPy.

One function per NumPy primitive, with the NumPy function's name and
arguments, taking and returning CuPy arrays:

    im2col, col2im                                          kernels/conv.cu
    max_pool2d_forward, max_pool2d_backward                 kernels/pooling.cu
    interpolate_forward, interpolate_backward               kernels/resample.cu
    softmax_cross_entropy_forward, softmax_cross_entropy_backward   kernels/loss.cu
    crop_forward, crop_backward                             kernels/crop.cu
    relu_backward, dropout_apply, sgd_update_, adam_update_ kernels/elementwise.cu

An op calls them for CuPy arrays only (``if is_cuda(x): cuda.im2col(...)``).
Each .cu file is compiled by NVRTC once per process, on first use
(``loader.py``). Importing this package does not import CuPy, so it works on
a machine without a GPU; there the same kernels can still run, slowly, on
NumPy arrays through the CPU emulator (``cpu_emulation.py``), which is how
the test suite proves them equal to NumPy without a GPU.
"""

from minifcn.cuda.primitives import (
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

__all__ = [
    "im2col", "col2im",
    "max_pool2d_forward", "max_pool2d_backward",
    "interpolate_forward", "interpolate_backward",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
    "crop_forward", "crop_backward",
    "relu_backward", "dropout_apply", "sgd_update_", "adam_update_",
]
