"""Batch normalisation layer (the ResNet backbones; the VGG FCNs with ``batch_norm=True``)."""

import numbers

import numpy

from minifcn.functional.normalization import batch_norm, batch_norm_relu
from minifcn.arguments import check_int
from minifcn.nn.module import Module, Parameter


class BatchNorm2d(Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, per channel of x (N, C, H, W).

    In training mode mean and var are the batch's (over N, H, W) and the
    running statistics (buffers ``running_mean``, ``running_var``) move towards
    them: running = (1 - momentum) * running + momentum * batch. In eval mode
    the running statistics are used instead.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=numpy.float32):
        super().__init__()
        self.num_features = check_int("num_features", num_features, 1)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.eps, self.momentum = float(eps), float(momentum)
        self.weight = Parameter(numpy.ones(num_features, dtype))
        self.bias = Parameter(numpy.zeros(num_features, dtype))
        self.register_buffer("running_mean", numpy.zeros(num_features, dtype=dtype))
        self.register_buffer("running_var", numpy.ones(num_features, dtype=dtype))

    def forward(self, x, relu=False):
        """relu=True: relu(self(x)) as one op (F.batch_norm_relu), for a ReLU that follows."""
        op = batch_norm_relu if relu else batch_norm
        return op(x, self.running_mean, self.running_var, self.weight, self.bias,
                  training=self.training, momentum=self.momentum, eps=self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
