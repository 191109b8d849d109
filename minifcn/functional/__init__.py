"""Every op minifcn has, as functions on Tensors (``import minifcn.functional as F``).

One module per op family; each defines the op classes (forward and backward
side by side) and the lowercase functions re-exported here.
"""

from minifcn.functional.arithmetic import add, sub, mul, div, neg, pow, exp, log, matmul, sum_to
from minifcn.functional.arithmetic import to_device_op as to_device
from minifcn.functional.reduction import sum, mean
from minifcn.functional.shape import reshape, transpose, getitem, crop, concat
from minifcn.functional.activation import relu, dropout, dropout2d
from minifcn.functional.conv import conv2d, conv_transpose2d
from minifcn.functional.pooling import max_pool2d
from minifcn.functional.resample import interpolate
from minifcn.functional.normalization import batch_norm, batch_norm_relu
from minifcn.functional.loss import softmax_cross_entropy, log_softmax, softmax
from minifcn.functional import operators  # noqa: F401,E402  (gives the Tensor its operators)
