"""Check an op's backward against finite differences.

For inputs x and an op f, backward() computes J^T w for a weighting w of
the outputs. Here w is random, so every element of the gradient matters:
a gradient that is right only on average would still be caught. The
numerical side perturbs each input element by +-eps and takes the central
difference of sum(w * f(x)), in float64 where it is accurate to ~eps^2.

As in ``torch.autograd.gradcheck``, ``fn`` is called as ``fn(*inputs)``:
``mf.gradcheck(F.relu, x)`` or ``mf.gradcheck(lambda x, w: F.conv2d(x, w), [x, w])``.
"""

import inspect

import numpy

from minifcn.autograd import no_grad
from minifcn.backend import get_array_module, to_numpy
from minifcn.tensor import Tensor


class GradcheckError(AssertionError):
    """backward() disagrees with finite differences; the message lists the worst elements."""


def _weighted_output(fn, inputs, weights):
    with no_grad():
        out = fn(*inputs)
    return float((to_numpy(out.data).astype(numpy.float64) * weights).sum())


def _check_arity(fn, inputs):
    """Raise a TypeError naming fn if it cannot take len(inputs) positional arguments."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable without a signature: let the call decide
        return
    try:
        signature.bind(*inputs)
    except TypeError as error:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise TypeError(
            f"fn must accept the inputs as positional arguments, fn(*inputs), here "
            f"{len(inputs)} of them; {name}{signature} does not ({error}). "
            f"Write e.g. gradcheck(lambda x, w: f(x, w), [x, w]), not lambda t: f(t[0], t[1])") from None


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0, show=5):
    """Return True if backward() matches central differences for every input
    with ``requires_grad``; otherwise raise ``GradcheckError`` naming the worst
    elements.

    ``fn`` is called as ``fn(*inputs)``, as in ``torch.autograd.gradcheck``,
    and returns a Tensor of any shape. ``inputs`` is a Tensor, taken as
    ``(tensor,)``, or a list or tuple of Tensors; the ones with
    ``requires_grad`` must be float64."""
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs must be a Tensor or a list or tuple of Tensors, got {type(inputs).__name__}")
    inputs = list(inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{i}] must be a Tensor, got {type(x).__name__}")
        if x.requires_grad and x.dtype != numpy.float64:
            raise TypeError(f"inputs[{i}] has dtype {x.dtype}; gradcheck needs float64 "
                            "(float32 finite differences are too coarse to judge a gradient)")
    if not any(x.requires_grad for x in inputs):
        raise ValueError("gradcheck needs at least one input with requires_grad=True")
    _check_arity(fn, inputs)

    for x in inputs:  # perturbing through a flat view needs contiguous data
        if x.requires_grad:
            x.data = get_array_module(x.data).ascontiguousarray(x.data)
    out = fn(*inputs)
    rng = numpy.random.default_rng(seed)
    weights = rng.standard_normal(out.shape)
    for x in inputs:
        x.grad = None
    xp = get_array_module(out.data)
    (out * Tensor(xp.asarray(weights), dtype=out.dtype)).sum().backward()

    for i, x in enumerate(inputs):
        if not x.requires_grad:
            continue
        analytic = numpy.zeros(x.shape) if x.grad is None else to_numpy(x.grad).astype(numpy.float64)
        numeric = numpy.zeros(x.shape)
        flat = x.data.reshape(-1)  # a view: perturbing it perturbs x
        for k in range(flat.size):
            original = flat[k].item()
            flat[k] = original + eps
            plus = _weighted_output(fn, inputs, weights)
            flat[k] = original - eps
            minus = _weighted_output(fn, inputs, weights)
            flat[k] = original
            numeric.reshape(-1)[k] = (plus - minus) / (2 * eps)
        error = numpy.abs(analytic - numeric)
        tolerance = atol + rtol * numpy.abs(numeric)
        if (error > tolerance).any():
            worst = numpy.argsort(-(error - tolerance).reshape(-1))[:show]
            rows = "\n".join(
                f"  index {tuple(int(i) for i in numpy.unravel_index(k, x.shape))}: backward {analytic.reshape(-1)[k]:.8g}, "
                f"numerical {numeric.reshape(-1)[k]:.8g}, error {error.reshape(-1)[k]:.3g}"
                for k in worst)
            raise GradcheckError(
                f"gradient of inputs[{i}] (shape {x.shape}) is wrong in "
                f"{int((error > tolerance).sum())} of {x.size} elements; worst:\n{rows}")
    return True
