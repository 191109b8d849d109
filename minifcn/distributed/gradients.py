"""Every rank's gradients summed in one call: packed into one flat buffer, reduced, unpacked.

Each Allreduce pays a fixed cost (every rank meets every other), so one call over one buffer
pays it once, not once per parameter. A few numbers of each rank's (its summed loss, its
labelled pixels, which gradients it has) go in a second, tiny sum, in float64 on the host.
"""

import numpy as np

from minifcn.backend import get_array_module


class GradientSum:
    """``sum_over(group, *numbers)``: each parameter's gradient replaced by its sum over the
    ranks; returns the sums of ``numbers`` over the ranks (floats).

    A parameter that no rank gave a gradient keeps None; one that some ranks did gets the
    sum, the others counting zero. The buffer is allocated on first use, on the parameters'
    device and in their dtype, and reused; after the call the gradients are views of it,
    valid until the next call.
    """

    def __init__(self, params):
        self.params = list(params)
        self.buffer, self.views, self.summed = None, None, False

    def sum_over(self, group, *numbers):
        self.summed = group.size > 1
        if not self.summed:
            return [float(n) for n in numbers]
        has_grad = [p.grad is not None for p in self.params]
        totals = group.all_sum(np.array(list(numbers) + has_grad, dtype=np.float64))
        if self.buffer is None:
            self._allocate()
        for param, view, mine in zip(self.params, self.views, has_grad):
            if mine:
                view[...] = param.grad
            else:
                view.fill(0)
        group.all_sum(self.buffer)
        for param, view, count in zip(self.params, self.views, totals[len(numbers):]):
            param.grad = view if count > 0 else None
        return [float(t) for t in totals[:len(numbers)]]

    def scale(self, factor):
        """Multiply every gradient by ``factor``: in place in the buffer after a sum over ranks."""
        if self.summed:
            self.buffer *= factor
            return
        for param in self.params:
            if param.grad is not None:
                param.grad = param.grad * factor

    def _allocate(self):
        first = self.params[0].data
        xp = get_array_module(first)
        sizes = [p.data.size for p in self.params]
        self.buffer = xp.empty(sum(sizes), dtype=first.dtype)
        bounds = np.cumsum([0] + sizes)
        self.views = [self.buffer[lo:hi].reshape(p.data.shape)
                      for p, lo, hi in zip(self.params, bounds, bounds[1:])]
