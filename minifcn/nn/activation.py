"""Activation layers: ReLU, and dropout of single elements or of whole channels.

Dropout is active only in training mode (``model.train()``) and draws its
masks from the shared random stream of ``minifcn.nn.init``, so
``init.manual_seed`` makes them repeatable.
"""

from minifcn.functional.activation import dropout, dropout2d, relu
from minifcn.nn import init
from minifcn.arguments import probability
from minifcn.nn.module import Module


class ReLU(Module):
    """y = max(x, 0), element-wise."""

    def forward(self, x):
        return relu(x)


class Dropout(Module):
    """Training: zero each element with probability p, scale the rest by 1/(1-p). Eval: y = x."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = probability("p", p)

    def forward(self, x):
        return dropout(x, self.p, training=self.training, rng=init.mask_generator())

    def extra_repr(self):
        return f"p={self.p}"


class Dropout2d(Dropout):
    """Training: zero each whole channel x[n, c] with probability p (x is (N, C, H, W))."""

    def forward(self, x):
        return dropout2d(x, self.p, training=self.training, rng=init.mask_generator())
