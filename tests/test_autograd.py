"""The core: Tensor dtype rules, the backward engine, and the gradients of the
arithmetic, reduction and shape ops, each checked against finite differences."""

import re

import numpy as np
import pytest

import minifcn as mf
from minifcn.function import Function
from minifcn.functional.arithmetic import add, div, exp, log, matmul, mul, pow, sub
from minifcn.functional.reduction import mean, sum
from minifcn.functional.shape import concat, crop, getitem, reshape, transpose


def leaf(shape, seed=0, low=-1.0, high=1.0):
    """A float64 Tensor that requires grad, with values drawn from [low, high)."""
    rng = np.random.default_rng(seed)
    return mf.Tensor(rng.uniform(low, high, size=shape), requires_grad=True)


# ---- Tensor(...) dtype rules -----------------------------------------------------------------

@pytest.mark.parametrize("array, expected", [
    (np.ones(3, np.float32), np.float32),
    (np.ones(3, np.float64), np.float64),
    (np.ones(3, np.int64), np.float32),
    (np.ones(3, np.uint8), np.float32),
    (np.ones(3, bool), np.float32),
    (np.ones(3, np.float16), np.float32),
    ([1, 2, 3], np.float32),
    (7, np.float32),
    ([1.0, 2.0], np.float32),
    (0.5, np.float32),
], ids=["float32-kept", "float64-kept", "int64", "uint8", "bool", "float16", "int-list", "int-scalar",
        "float-list", "float-scalar"])
def test_tensor_dtype_rules(array, expected):
    assert mf.Tensor(array).dtype == expected


@pytest.mark.parametrize("data, dtype", [
    (np.ones(2, np.int64), np.float64),
    (np.ones(2, np.float64), np.float32),
    (np.ones(2, np.float32), np.float64),
], ids=["int-to-float64", "float64-to-float32", "float32-to-float64"])
def test_tensor_dtype_override(data, dtype):
    assert mf.Tensor(data, dtype=dtype).dtype == dtype


def test_requires_grad_needs_a_float_tensor():
    with pytest.raises(TypeError, match="float"):
        mf.Tensor(np.ones(2, np.int64), dtype=np.int64, requires_grad=True)


def test_tensor_basic_properties():
    x = mf.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert (x.shape, x.ndim, x.size, x.device, len(x)) == ((2, 3), 2, 6, "cpu", 2)
    copy = x.numpy()
    copy[0, 0] = 100
    assert x.data[0, 0] == 0  # numpy() is a copy
    assert mf.Tensor(np.array([2.5])).item() == 2.5
    with pytest.raises(ValueError, match="one element"):
        x.item()


@pytest.mark.parametrize("op", [
    lambda x: x * 2.0, lambda x: 2.0 - x, lambda x: 1 / (x + 3), lambda x: x ** 2, lambda x: 2 ** x,
    lambda x: -x, lambda x: x.exp(), lambda x: (x + 3).log(), lambda x: x.sum(), lambda x: x.mean(axis=0),
    lambda x: x @ x.T, lambda x: x * np.ones(3, np.float64),
], ids=["mul-scalar", "rsub-scalar", "rtruediv", "pow-scalar", "rpow", "neg", "exp", "log", "sum", "mean",
        "matmul", "mul-float64-array"])
def test_float32_stays_float32(op):
    x = mf.Tensor(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    y = op(x)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


# ---- gradients of the elementwise ops, with broadcasting on every axis --------------------------

BROADCAST_SHAPES = [
    ((2, 3, 4), (2, 3, 4)),
    ((2, 3, 4), (1, 3, 1)),
    ((2, 3, 4), (2, 1, 4)),
    ((2, 3, 4), (4,)),
    ((2, 1, 4), (3, 1)),
    ((1, 3, 1), (2, 1, 5)),
    ((), (2, 3)),
    ((2, 3), ()),
]
BROADCAST_IDS = ["same", "middle-axis-kept", "middle-axis-broadcast", "trailing-only", "both-broadcast",
                 "cross", "scalar-left", "scalar-right"]
BINARY_OPS = {"add": add, "sub": sub, "mul": mul, "div": div, "pow": pow}


@pytest.mark.parametrize("name", BINARY_OPS)
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES, ids=BROADCAST_IDS)
def test_binary_op_gradients_broadcast(name, shapes):
    op = BINARY_OPS[name]
    # positive operands keep div away from 0 and pow on real, differentiable ground
    x = leaf(shapes[0], seed=1, low=0.5, high=2.0)
    y = leaf(shapes[1], seed=2, low=0.5, high=2.0)
    assert mf.gradcheck(op, [x, y])


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow", "matmul"])
def test_operators_match_the_functions(op):
    x, y = leaf((3, 3), seed=1, low=0.5, high=2.0), leaf((3, 3), seed=2, low=0.5, high=2.0)
    symbol = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**", "matmul": "@"}[op]
    by_operator = eval(f"x {symbol} y")  # noqa: S307 - a fixed expression
    by_function = {**BINARY_OPS, "matmul": matmul}[op](x, y)
    np.testing.assert_array_equal(by_operator.data, by_function.data)


@pytest.mark.parametrize("fn, low", [(exp, -2.0), (log, 0.2)], ids=["exp", "log"])
def test_unary_gradients(fn, low):
    assert mf.gradcheck(fn, [leaf((2, 3, 4), low=low, high=2.0)])


def test_scalar_operands_on_either_side():
    x = leaf((2, 3), low=0.5, high=2.0)
    assert mf.gradcheck(lambda x: 3.0 - x / 2.0 + 1.0 / x + 2.0 ** x - x ** 3, [x])


@pytest.mark.parametrize("shapes", [
    ((3, 4), (4, 5)),
    ((2, 3, 4), (2, 4, 5)),
    ((2, 1, 3, 4), (5, 4, 2)),
    ((3, 4), (2, 4, 5)),
    ((2, 3, 4), (4, 1)),
    ((1, 1), (1, 1)),
], ids=["2d", "batched", "broadcast-batch", "broadcast-left", "batched-by-matrix", "1x1"])
def test_matmul_gradients(shapes):
    assert mf.gradcheck(matmul, [leaf(shapes[0], 1), leaf(shapes[1], 2)])


def test_matmul_rejects_vectors():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        matmul(mf.Tensor(np.ones(3)), mf.Tensor(np.ones((3, 2))))


# ---- reductions -------------------------------------------------------------------------------

REDUCTION_AXES = [None, 0, 1, -1, (0, 2), (2, 0, 1)]
REDUCTION_IDS = ["all", "first", "middle", "last", "first-and-last", "every-axis-unsorted"]


@pytest.mark.parametrize("keepdims", [False, True], ids=["dropdims", "keepdims"])
@pytest.mark.parametrize("axis", REDUCTION_AXES, ids=REDUCTION_IDS)
@pytest.mark.parametrize("op", [sum, mean], ids=["sum", "mean"])
def test_reduction_gradients(op, axis, keepdims):
    x = leaf((2, 3, 4))
    y = op(x, axis, keepdims)
    np.testing.assert_allclose(y.data, getattr(np, op.__name__)(x.data, axis=axis, keepdims=keepdims))
    assert mf.gradcheck(lambda x: op(x, axis, keepdims), [x])


def test_reduction_of_everything_has_shape_0d():
    assert mf.Tensor(np.ones((2, 3))).sum().shape == ()


@pytest.mark.parametrize("op", [sum, mean], ids=["sum", "mean"])
def test_reduction_of_a_0d_tensor(op):
    # gradcheck itself sums the weighted output, so every scalar loss goes through this
    x = leaf(())
    assert op(op(x)).shape == ()
    assert mf.gradcheck(lambda x: op(op(x * 3.0)), [x])


def test_data_is_an_ndarray_after_a_full_reduction():
    assert isinstance(mf.Tensor(np.ones((2, 3))).sum().data, np.ndarray)


@pytest.mark.parametrize("axis", [3, -4, (0, 5)], ids=["too-big", "too-negative", "in-a-tuple"])
def test_reduction_axis_out_of_range(axis):
    with pytest.raises(ValueError, match="out of range"):
        sum(mf.Tensor(np.ones((2, 3, 4))), axis)


# ---- shape ops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 4), (2, 12), (24,), (2, -1, 3), (1, 2, 3, 4, 1)],
                         ids=["2d", "merge", "flat", "inferred", "unit-axes"])
def test_reshape_gradient(shape):
    assert mf.gradcheck(lambda x: reshape(x, shape) * np.arange(24.0).reshape(reshape(x, shape).shape),
                        [leaf((2, 3, 4))])


def test_reshape_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 2\)"):
        reshape(mf.Tensor(np.ones((2, 3))), (4, 2))


@pytest.mark.parametrize("axes", [None, (0, 2, 1), (2, 0, 1), (-1, 0, -2)],
                         ids=["reverse", "swap-last", "rotate", "negative"])
def test_transpose_gradient(axes):
    x = leaf((2, 3, 4))
    np.testing.assert_array_equal(transpose(x, axes).data, np.transpose(x.data, axes))
    assert mf.gradcheck(lambda x: transpose(x, axes), [x])


def test_transpose_rejects_a_non_permutation():
    with pytest.raises(ValueError, match="permutation"):
        transpose(mf.Tensor(np.ones((2, 3))), (0, 0))


def test_transpose_rejects_an_axis_out_of_range():
    with pytest.raises(ValueError):
        transpose(mf.Tensor(np.ones((2, 3))), (0, 3))


GETITEM_INDICES = [
    (slice(None), slice(1, 3)),
    (0,),
    (Ellipsis, -1),
    (slice(None, None, -1),),
    (slice(None), slice(None, None, 2), 1),
    (np.array([0, 1, 1, 1, 0]),),
    (np.array([1, 1]), np.array([0, 0])),
    (np.array([[True, False, True], [False, True, True]]),),
    (None, 1),
]
GETITEM_IDS = ["slices", "int", "ellipsis", "negative-step", "step-and-int", "advanced-with-repeats",
               "advanced-same-element-twice", "boolean-mask", "newaxis"]


@pytest.mark.parametrize("index", GETITEM_INDICES, ids=GETITEM_IDS)
def test_getitem_gradient(index):
    x = leaf((2, 3, 4)) if not (isinstance(index[0], np.ndarray) and index[0].dtype == bool) else leaf((2, 3))
    np.testing.assert_array_equal(getitem(x, index).data, x.data[index])
    assert mf.gradcheck(lambda x: x[index], [x])


def test_getitem_repeated_index_accumulates():
    x = mf.Tensor(np.zeros(3), requires_grad=True)
    x[np.array([1, 1, 1, 2])].sum().backward()
    np.testing.assert_array_equal(x.grad, [0, 3, 1])


@pytest.mark.parametrize("offset, size", [((0, 0), (3, 4)), ((1, 2), (2, 3)), ((2, 0), (1, 5)), ((0, 0), (1, 1))],
                         ids=["whole", "inner", "last-row", "one-pixel"])
def test_crop_gradient(offset, size):
    x = leaf((2, 2, 3, 5))
    y = crop(x, offset, size)
    (oh, ow), (h, w) = offset, size
    np.testing.assert_array_equal(y.data, x.data[:, :, oh:oh + h, ow:ow + w])
    assert y.data.flags.c_contiguous
    assert mf.gradcheck(lambda x: crop(x, offset, size), [x])


@pytest.mark.parametrize("offset, size", [((2, 0), (2, 5)), ((0, 3), (3, 3)), ((-1, 0), (2, 2)), ((0, 0), (0, 2))],
                         ids=["too-tall", "too-wide", "negative-offset", "empty"])
def test_crop_window_must_fit(offset, size):
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        crop(mf.Tensor(np.ones((1, 1, 3, 5))), offset, size)


@pytest.mark.parametrize("axis", [0, 1, -1], ids=["batch", "channels", "last"])
def test_concat_gradient(axis):
    shapes = {0: [(1, 2, 3), (2, 2, 3), (3, 2, 3)], 1: [(2, 1, 3), (2, 4, 3), (2, 2, 3)],
              -1: [(2, 2, 1), (2, 2, 2), (2, 2, 5)]}[axis]
    xs = [leaf(s, seed=i) for i, s in enumerate(shapes)]
    np.testing.assert_array_equal(concat(xs, axis).data, np.concatenate([x.data for x in xs], axis))
    assert mf.gradcheck(lambda *xs: concat(list(xs), axis), xs)


def test_concat_errors():
    with pytest.raises(ValueError, match="empty"):
        concat([], 0)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 4\)"):
        concat([mf.Tensor(np.ones((2, 3))), mf.Tensor(np.ones((3, 4)))], axis=0)


# ---- the engine ---------------------------------------------------------------------------------

def test_long_chain_needs_no_recursion():
    x = mf.Tensor(np.ones(3), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0 + 0.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones(3))
    del y  # freeing a 10000-op graph must not overflow the stack either


@pytest.mark.parametrize("expression, expected", [
    (lambda x: x * x, lambda x: 2 * x),
    (lambda x: x + x, lambda x: 2 * np.ones_like(x)),
    (lambda x: (x * 3.0).exp() * x.exp(), lambda x: 4 * np.exp(4 * x)),
    (lambda x: (x * 2.0 + x[::-1].sum()) * x, None),
], ids=["square", "double", "two-branches", "diamond"])
def test_tensor_used_twice_gets_both_gradients(expression, expected):
    x = leaf((4,), low=0.1, high=0.5)
    expression(x).sum().backward()
    if expected is not None:
        np.testing.assert_allclose(x.grad, expected(x.data))
    assert mf.gradcheck(expression, [x])


def test_gradients_accumulate_across_backward_calls():
    x = mf.Tensor(np.ones(2), requires_grad=True)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [5.0, 5.0])
    x.zero_grad()
    assert x.grad is None


def test_only_leaves_that_require_grad_get_a_gradient():
    x = mf.Tensor(np.ones(2), requires_grad=True)
    c = mf.Tensor(np.ones(2))
    y = x * c
    y.sum().backward()
    assert c.grad is None and y.grad is None  # a constant, and an intermediate
    np.testing.assert_array_equal(x.grad, [1.0, 1.0])


def test_no_grad_records_nothing():
    x = mf.Tensor(np.ones(2), requires_grad=True)
    with mf.no_grad():
        assert not mf.is_grad_enabled()
        y = x * 2.0 + 1.0
        with mf.no_grad():
            pass
        assert not mf.is_grad_enabled()  # leaving a nested block keeps the outer one
    assert mf.is_grad_enabled()
    assert not y.requires_grad and y.creator is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_no_grad_restores_after_an_exception():
    with pytest.raises(KeyError):
        with mf.no_grad():
            raise KeyError
    assert mf.is_grad_enabled()


def test_no_grad_releases_buffers_at_once():
    fn = Square()
    with mf.no_grad():
        fn(mf.Tensor(np.ones(2), requires_grad=True))
    assert fn.saved == ()


def test_detach_cuts_the_graph_and_shares_data():
    x = mf.Tensor(np.ones(2), requires_grad=True)
    y = x * 2.0
    d = y.detach()
    assert not d.requires_grad and d.creator is None and d.data is y.data
    (d * x).sum().backward()  # only the direct path to x counts
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])


def test_backward_twice_raises_a_clear_error():
    x = mf.Tensor(np.ones(2), requires_grad=True)
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_buffers_are_released_after_backward():
    x = mf.Tensor(np.ones((2, 2)), requires_grad=True)
    y = (x * x).exp() @ x
    loss = y.sum()
    functions, stack = [], [loss]
    while stack:
        t = stack.pop()
        if t.creator is not None:
            functions.append(t.creator)
            stack.extend(p for p in t.creator.inputs if p is not None)
    assert any(len(fn.saved) for fn in functions)  # Mul, Exp and MatMul keep their inputs
    loss.backward()
    assert all(fn.saved is None for fn in functions)


def test_backward_of_non_scalar_needs_a_gradient():
    x = mf.Tensor(np.ones((2, 3)), requires_grad=True)
    y = x * 2.0
    with pytest.raises(RuntimeError, match=r"scalar.*\(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 3\)"):
        y.backward(np.ones(3))
    y.backward(np.full((2, 3), 0.5))
    np.testing.assert_array_equal(x.grad, np.ones((2, 3)))


def test_backward_on_a_constant_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        mf.Tensor(np.ones(2)).sum().backward()


def test_leaf_gradients_are_independent_arrays():
    x, y = mf.Tensor(np.ones(2), requires_grad=True), mf.Tensor(np.ones(2), requires_grad=True)
    (x + y).sum().backward()
    assert x.grad is not y.grad


def test_gradient_has_the_leaf_dtype():
    a = mf.Tensor(np.ones(2, np.float32), requires_grad=True)
    (a * mf.Tensor(np.ones(2, np.float64))).sum().backward()
    assert a.grad.dtype == np.float32


# ---- gradcheck itself ---------------------------------------------------------------------------

class Square(Function):
    """y = x^2, correctly."""

    def forward(self, x):
        self.save_for_backward(x)
        return x * x

    def backward(self, grad_y):
        (x,) = self.saved
        return (2 * x * grad_y,)


class BrokenSquare(Square):
    """y = x^2 with the factor 2 forgotten, and element [1, 2] dropped entirely."""

    def backward(self, grad_y):
        (x,) = self.saved
        grad = x * grad_y
        grad[1, 2] = 0
        return (grad,)


def test_gradcheck_passes_a_correct_function():
    assert mf.gradcheck(lambda x: Square()(x), [leaf((2, 3))])


def test_gradcheck_fails_a_wrong_backward_and_names_the_worst_elements():
    x = mf.Tensor(np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 10.0]]), requires_grad=True)
    with pytest.raises(mf.GradcheckError) as info:
        mf.gradcheck(lambda x: BrokenSquare()(x), [x])
    message = str(info.value)
    assert "inputs[0]" in message and "6 of 6 elements" in message and "worst" in message
    first_row = message.splitlines()[1]  # the worst element: x = 10, where the error is 20 * |w|
    assert re.search(r"index \((np\.int64\()?1\)?, (np\.int64\()?2\)?\)", first_row)
    assert "backward" in first_row and "numerical" in first_row


def test_gradcheck_checks_only_inputs_that_require_grad():
    x, c = leaf((2,)), mf.Tensor(np.ones(2))
    assert mf.gradcheck(lambda x, c: x * c, [x, c])


def test_gradcheck_argument_errors():
    with pytest.raises(TypeError, match="float64"):
        mf.gradcheck(lambda x: x, [mf.Tensor(np.ones(2, np.float32), requires_grad=True)])
    with pytest.raises(ValueError, match="requires_grad"):
        mf.gradcheck(lambda x: x, [mf.Tensor(np.ones(2))])
    with pytest.raises(TypeError, match="Tensor"):
        mf.gradcheck(lambda x: x, [np.ones(2)])


def test_gradcheck_calls_fn_with_the_inputs_spread_out_and_takes_a_bare_tensor():
    """fn(*inputs), as torch.autograd.gradcheck: a function of positional Tensors works as it is,
    and a Tensor alone stands for (tensor,)."""
    import minifcn.functional as F
    x = mf.Tensor(np.array([[-1.5, 0.5, 2.0], [0.3, -0.7, 1.1]]), requires_grad=True)  # away from 0
    assert mf.gradcheck(F.relu, x)
    assert mf.gradcheck(F.relu, (x,))
    assert mf.gradcheck(mul, (leaf((2, 3), seed=1), leaf((2, 3), seed=2)))


def test_gradcheck_names_a_function_of_the_wrong_arity():
    x, y = leaf((2,), seed=1), leaf((2,), seed=2)
    with pytest.raises(TypeError, match=r"fn\(\*inputs\).*2 of them"):
        mf.gradcheck(lambda t: t[0] * t[1], [x, y])  # the old calling convention, fn(inputs)
    with pytest.raises(TypeError, match=r"1 of them"):
        mf.gradcheck(lambda x, y: x * y, x)
    with pytest.raises(TypeError, match=r"a Tensor or a list or tuple of Tensors, got ndarray"):
        mf.gradcheck(lambda x: x, np.ones(2))


def test_gradcheck_on_a_non_contiguous_input():
    x = mf.Tensor(np.arange(6.0).reshape(2, 3).T, requires_grad=True)
    assert mf.gradcheck(lambda x: x * 2.0, [x])
