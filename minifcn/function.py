"""The op: one ``Function`` subclass per op, forward and backward side by side.

    forward(*arrays)   -> array          computes the result on raw arrays
    backward(grad_out) -> tuple of grads  one gradient per forward input

Calling a Function on Tensors runs ``forward`` on their arrays and, when a
gradient is wanted, records the inputs and the Function on the output
Tensor (``creator``), for the engine in minifcn.autograd to walk back.
"""

import numpy

from minifcn.autograd import check_finite, graph_node, is_anomaly_detection_enabled, is_grad_enabled
from minifcn.tensor import Tensor


class Function:
    """One differentiable op. Subclasses implement ``forward`` and ``backward``."""

    saved = ()

    def save_for_backward(self, *arrays):
        """Keep what backward needs; the engine drops it as soon as it is used."""
        self.saved = arrays

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, grad_output):
        raise NotImplementedError

    def __call__(self, *inputs):
        inputs = tuple(x if x is None or isinstance(x, Tensor) else Tensor(x) for x in inputs)
        # Which inputs want a gradient: backward may skip the others (e.g. the input image).
        self.needs_input_grad = tuple(is_grad_enabled() and x is not None and x.requires_grad for x in inputs)
        output = self.forward(*(None if x is None else x.data for x in inputs))
        if isinstance(output, numpy.generic):  # NumPy reductions to () give scalars; keep arrays
            output = numpy.asarray(output)
        if is_anomaly_detection_enabled():
            check_finite(output, type(self).__name__, "forward")
        needs_grad = any(self.needs_input_grad)
        result = Tensor.from_array(output, requires_grad=needs_grad)
        if needs_grad:
            self.inputs = tuple(None if x is None else graph_node(x) for x in inputs)
            result.creator = self
        else:
            self.saved = ()  # nothing will call backward: free the buffers now
        return result
