"""Reverse-mode automatic differentiation: the engine that walks the graph backwards.

Every op is a ``Function`` (minifcn.function) that, when a gradient is
wanted, remembers its inputs and itself on its output (``creator``). That
chain of creators *is* the graph. ``Tensor.backward()`` hands it to
``run_backward``, which visits it in reverse topological order, with an
explicit stack instead of recursion so that a chain of thousands of ops
cannot overflow Python's call stack. Here also: the switches that ops read
(``no_grad``, ``detect_anomaly``).
"""

import contextlib

from minifcn.backend import get_array_module

_grad_enabled = True
_anomaly_detection = False


def is_grad_enabled():
    return _grad_enabled


def is_anomaly_detection_enabled():
    return _anomaly_detection


@contextlib.contextmanager
def no_grad():
    """Run ops without recording the graph (evaluation, optimiser updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


@contextlib.contextmanager
def detect_anomaly():
    """Check every op's output for NaN/inf and name the first op that made one.

    It costs one pass over each output, so it is off by default; the training
    loop turns it on to explain a non-finite loss.
    """
    global _anomaly_detection
    previous, _anomaly_detection = _anomaly_detection, True
    try:
        yield
    finally:
        _anomaly_detection = previous


class NonFiniteError(FloatingPointError):
    """An op produced NaN or infinity while anomaly detection was on.

    ``op_name`` ("Conv2d"), ``direction`` ("forward" or "backward") and
    ``where`` (the message without its leading "the ") say which op it was.
    """

    def __init__(self, op_name, direction, detail=""):
        self.op_name, self.direction = op_name, direction
        self.where = f"{direction} pass of {op_name}{detail}"
        super().__init__(f"the {self.where} produced NaN or infinity")


class _Node:
    """What the graph keeps of an op's output once it is an input to another op: where it
    came from, and its shape and dtype, but not its array. The array lives as long as the
    Tensor does, so that e.g. conv1_2's output is freed once ReLU has read it (ReLU keeps
    its own output for backward), as it would be without a graph."""

    __slots__ = ("creator", "requires_grad", "shape", "dtype")

    def __init__(self, tensor):
        self.creator, self.requires_grad = tensor.creator, tensor.requires_grad
        self.shape, self.dtype = tensor.shape, tensor.dtype


def graph_node(tensor):
    """A leaf stands for itself (backward fills its .grad); an op's output for its _Node,
    one per Tensor so that every op reading it sends its gradient to the same place."""
    if tensor.creator is None:
        return tensor
    node = tensor.__dict__.get("_graph_node")
    if node is None:
        node = tensor._graph_node = _Node(tensor)
    return node


def check_finite(array, op_name, direction):
    xp = get_array_module(array)
    if array.dtype.kind == "f" and not bool(xp.isfinite(array).all()):
        bad = int((~xp.isfinite(array)).sum())
        raise NonFiniteError(op_name, direction,
                             f" ({bad} of {array.size} values of its {array.dtype} {tuple(array.shape)} result)")


def _topological_order(root):
    """Leaf Tensors and _Nodes reachable from ``root``, each after everything it depends on."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        tensor, children_done = stack.pop()
        if children_done:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        if tensor.creator is not None:
            for parent in tensor.creator.inputs:
                if parent is not None and parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order


def run_backward(root, grad):
    """Propagate ``grad`` (d loss / d root) to every leaf that requires grad.

    Gradients of intermediate tensors live only in the local ``pending`` dict
    and are dropped once passed on; leaves accumulate into ``.grad``.
    """
    root = graph_node(root)
    pending = {id(root): grad}
    shared = {id(grad)}  # arrays that someone else may also hold: the caller's, and any handed out twice
    for tensor in reversed(_topological_order(root)):
        grad_out = pending.pop(id(tensor), None)
        if grad_out is None:
            continue
        fn = tensor.creator
        if fn is None:  # a leaf: accumulate, so a tensor used twice gets both gradients
            # The first time, a copy unless the array is the leaf's alone: it may be shared with
            # another leaf (x + y hands both the same one), and editing one .grad in place must
            # not change the other. (An op's fresh gradient, e.g. conv2d's weight gradient of
            # hundreds of MB, is not copied.)
            if tensor.grad is None:
                tensor.grad = grad_out.copy() if _maybe_shared(grad_out, shared) else grad_out
            else:
                tensor.grad = tensor.grad + grad_out
            continue
        if fn.saved is None:
            raise RuntimeError(
                f"backward through {type(fn).__name__} a second time: its saved buffers were "
                "released after the first backward; run the forward pass again")
        grads = fn.backward(grad_out)
        fn.saved = None  # release what forward kept for us
        if _anomaly_detection:
            for g in grads:
                if g is not None:
                    check_finite(g, type(fn).__name__, "backward")
        for parent, g in zip(fn.inputs, grads):
            if parent is None or g is None or not parent.requires_grad:
                continue
            if g.dtype != parent.dtype:  # float32 x float64 gives float64; the leaf keeps its dtype
                g = g.astype(parent.dtype)
            if g.shape != parent.shape:
                raise RuntimeError(
                    f"{type(fn).__name__}.backward returned a gradient of shape {g.shape} "
                    f"for an input of shape {parent.shape}")
            if sum(g is other for other in grads) > 1:
                shared.add(id(g))
            previous = pending.get(id(parent))
            pending[id(parent)] = g if previous is None else previous + g


def _maybe_shared(array, shared):
    """False only for a writable, contiguous array whose memory no other gradient can hold."""
    if not array.flags.c_contiguous or not getattr(array.flags, "writeable", True):
        return True  # e.g. a broadcast view
    while array is not None:
        if id(array) in shared:
            return True
        array = array.base
    return False
