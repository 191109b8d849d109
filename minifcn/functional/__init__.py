"""Every op minifcn has, as functions on Tensors (``import minifcn.functional as F``).

One module per op family; each defines the op classes (forward and backward
side by side) and the lowercase functions re-exported here.
"""

from minifcn.functional.arithmetic import add, sub, mul, div, neg, pow, exp, log, matmul, sum_to
from minifcn.functional.arithmetic import to_device_op as to_device
from minifcn.functional.reduction import sum, mean
from minifcn.functional.shape import reshape, transpose, getitem, crop, concat
