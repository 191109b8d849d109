"""batch_norm: against the loop reference (outputs and running statistics), gradient
checks in training and evaluation, and argument errors. batch_norm_relu: the same
bits as relu(batch_norm(...)), and its own gradient checks."""

import re

import numpy as np
import pytest
from conftest import GPU
from loop_reference_misc import batch_norm_loop

import minifcn as mf
from minifcn.backend import cpu, reference, to_numpy
from minifcn.backend.cpu import normalization as cpu_normalization, threads as cpu_threads, tuning
from minifcn.functional.activation import relu
from minifcn.functional.normalization import batch_norm, batch_norm_relu


def normal(shape, seed=0, dtype=np.float64, loc=0.0, scale=1.0):
    return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def stats(channels, seed=10, dtype=np.float32):
    """running_mean, running_var (positive)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(channels).astype(dtype), (0.5 + rng.random(channels)).astype(dtype)


# (x shape, affine, running stats tracked)
CASES = [
    pytest.param((4, 3, 5, 6), True, True, id="nchw"),
    pytest.param((1, 2, 3, 3), True, True, id="batch-of-one"),
    pytest.param((3, 4, 1, 1), True, True, id="1x1-maps"),
    pytest.param((2, 3, 5, 4), False, True, id="no-affine"),
    pytest.param((2, 3, 3, 5), True, False, id="untracked"),
    pytest.param((6, 5), True, True, id="nc-2d"),
]
# every case in training, and in evaluation those with running statistics (evaluation needs them)
MODE_CASES = [pytest.param(*case.values, True, id=f"{case.id}-train") for case in CASES] + [
    pytest.param(*case.values, False, id=f"{case.id}-eval") for case in CASES if case.values[2]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape, affine, tracked, training", MODE_CASES)
def test_forward_and_running_stats_match_loop(backend, shape, affine, tracked, training, dtype):
    channels = shape[1]
    x = normal(shape, dtype=dtype, loc=2.0, scale=3.0)
    weight = normal(channels, 1, dtype) if affine else None
    bias = normal(channels, 2, dtype) if affine else None
    running_mean, running_var = stats(channels) if tracked else (None, None)
    expected, expected_mean, expected_var = batch_norm_loop(
        x, running_mean, running_var, weight, bias, training, momentum=0.3, eps=1e-4)
    y = batch_norm(mf.Tensor(x), running_mean, running_var,
                   None if weight is None else mf.Tensor(weight), None if bias is None else mf.Tensor(bias),
                   training, momentum=0.3, eps=1e-4)
    assert y.dtype == dtype
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y.data, expected, **tolerance)
    if tracked:  # updated in place, float32 buffers stay float32
        assert running_mean.dtype == np.float32 and running_var.dtype == np.float32
        np.testing.assert_allclose(running_mean, expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(running_var, expected_var, rtol=1e-5, atol=1e-6)


def test_training_normalises_each_channel(backend):
    x = normal((8, 3, 4, 4), loc=5.0, scale=4.0)
    y = batch_norm(mf.Tensor(x), None, None, training=True, eps=1e-12).data
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-9)


def test_running_stats_converge_to_the_data():
    running_mean, running_var = np.zeros(2, np.float32), np.ones(2, np.float32)
    x = mf.Tensor(normal((64, 2, 8, 8), dtype=np.float32, loc=3.0, scale=2.0))
    for _ in range(100):
        batch_norm(x, running_mean, running_var, training=True, momentum=0.1)
    np.testing.assert_allclose(running_mean, x.data.mean(axis=(0, 2, 3)), rtol=1e-4)
    n = x.size // 2
    np.testing.assert_allclose(running_var, x.data.var(axis=(0, 2, 3)) * n / (n - 1), rtol=1e-4)


def test_eval_leaves_running_stats_alone():
    running_mean, running_var = stats(3)
    before = running_mean.copy(), running_var.copy()
    batch_norm(mf.Tensor(normal((2, 3, 4, 4))), running_mean, running_var, training=False)
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])


def test_running_stats_as_tensors_update_in_place():
    running_mean, running_var = mf.Tensor(np.zeros(3, np.float32)), mf.Tensor(np.ones(3, np.float32))
    array = running_mean.data
    batch_norm(mf.Tensor(normal((2, 3, 4, 4), loc=1.0)), running_mean, running_var, training=True)
    assert running_mean.data is array and np.abs(array).sum() > 0


@pytest.mark.parametrize("op", [batch_norm, batch_norm_relu], ids=["batch_norm", "batch_norm_relu"])
@pytest.mark.parametrize("shape, affine, tracked, training", MODE_CASES)
def test_gradcheck(backend, shape, affine, tracked, training, op):
    channels = shape[1]
    inputs = [mf.Tensor(normal(shape, loc=1.0, scale=2.0), requires_grad=True)]
    if affine:
        inputs += [mf.Tensor(normal(channels, seed), requires_grad=True) for seed in (1, 2)]
    running = stats(channels, dtype=np.float64) if tracked else (None, None)

    def fn(x, *affine_params, op=op):
        # fresh copies: the in-place update must not drift the statistics between evaluations
        mean, var = (None, None) if running[0] is None else (running[0].copy(), running[1].copy())
        weight, bias = affine_params if affine else (None, None)
        return op(x, mean, var, weight, bias, training, momentum=0.2, eps=1e-3)

    if op is batch_norm_relu:  # central differences are only meaningful away from the ReLU's kink at 0
        with mf.no_grad():
            assert np.abs(fn(*inputs, op=batch_norm).data).min() > 1e-4
    assert mf.gradcheck(fn, inputs)


def test_gradient_only_for_weight_without_bias(backend):
    x = mf.Tensor(normal((2, 3, 4, 4)), requires_grad=True)
    weight = mf.Tensor(normal(3, 1), requires_grad=True)
    assert mf.gradcheck(lambda x, weight: batch_norm(x, None, None, weight, None, training=True), [x, weight])


def test_float32_gradients_stay_float32(backend):
    x = mf.Tensor(normal((2, 3, 4, 4), dtype=np.float32), requires_grad=True)
    weight = mf.Tensor(np.ones(3, np.float32), requires_grad=True)
    bias = mf.Tensor(np.zeros(3, np.float32), requires_grad=True)
    y = batch_norm(x, *stats(3), weight, bias, training=True)
    (y * y).sum().backward()
    assert x.grad.dtype == weight.grad.dtype == bias.grad.dtype == np.float32


# ---- batch_norm_relu: relu(batch_norm(...)) as one op --------------------------------------

def _forward_and_grads(op, shape, affine, tracked, training, dtype, seed=0):
    """op's output, the gradients of x, weight and bias under a random upstream gradient,
    and the running statistics after the call."""
    channels = shape[1]
    leaves = [mf.Tensor(normal(shape, seed, dtype, loc=0.5, scale=2.0), requires_grad=True)]
    if affine:  # weights of both signs: a negative scale flips which side the ReLU cuts
        leaves += [mf.Tensor(normal(channels, s, dtype), requires_grad=True) for s in (seed + 1, seed + 2)]
    running = [a.copy() for a in stats(channels, dtype=dtype)] if tracked else [None, None]
    y = op(leaves[0], *running, *(leaves[1:] if affine else [None, None]), training=training, momentum=0.3)
    upstream = mf.Tensor(normal(y.shape, seed + 3, dtype))
    (y * upstream).sum().backward()
    return [y.data] + [t.grad for t in leaves] + [r for r in running if r is not None]


def _batch_norm_then_relu(x, *args, **kwargs):
    return relu(batch_norm(x, *args, **kwargs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape, affine, tracked, training", MODE_CASES)
def test_batch_norm_relu_is_relu_of_batch_norm_bit_for_bit(backend, shape, affine, tracked, training, dtype):
    fused = _forward_and_grads(batch_norm_relu, shape, affine, tracked, training, dtype)
    two_ops = _forward_and_grads(_batch_norm_then_relu, shape, affine, tracked, training, dtype)
    assert len(fused) == len(two_ops)
    for ours, theirs in zip(fused, two_ops):
        assert ours.dtype == theirs.dtype == dtype
        np.testing.assert_array_equal(ours, theirs)
    assert (fused[0] == 0).any() and (fused[0] > 0).any()  # the ReLU cut something, and kept something


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("op", [batch_norm, batch_norm_relu], ids=["batch_norm", "batch_norm_relu"])
@pytest.mark.parametrize("shape, affine, tracked, training", MODE_CASES)
def test_channel_shares_on_threads_give_the_same_values(shape, affine, tracked, training, op, count, threads,
                                                       monkeypatch):
    """The fast CPU backend maps a large x one share of its channels per thread; here every x
    is large. The same values to rounding."""
    threads(1)
    alone = _forward_and_grads(op, shape, affine, tracked, training, np.float64)
    threads(count)
    monkeypatch.setattr(tuning, "MIN_SHARED_BYTES", 0)
    shares_seen = []
    monkeypatch.setattr(cpu_normalization, "run_parallel",
                        lambda f, pieces: shares_seen.append(len(pieces)) or cpu_threads.run_parallel(f, pieces))
    shared = _forward_and_grads(op, shape, affine, tracked, training, np.float64)
    assert shares_seen and set(shares_seen) == {min(count, shape[1])}  # every per-channel map
    for ours, theirs in zip(shared, alone):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_batch_norm_relu_keeps_nan(backend):  # as torch.relu: a broken activation must not turn into 0
    x = normal((2, 3, 4, 4), dtype=np.float32)
    x[1, 2, 3, 0] = np.nan
    y = batch_norm_relu(mf.Tensor(x), *stats(3), training=False).data
    others = np.ones(y.shape, bool)
    others[1, 2, 3, 0] = False
    assert np.isnan(y[1, 2, 3, 0]) and np.isfinite(y[others]).all()


def test_batch_norm_module_with_relu():
    layer = mf.nn.BatchNorm2d(3)
    layer.weight.data[...] = normal(3, 7, np.float32)
    x = normal((2, 3, 5, 5), dtype=np.float32, loc=0.3)
    fused = layer(mf.Tensor(x), relu=True).data
    mean_after_fused = layer.running_mean.copy()
    layer.running_mean[...], layer.running_var[...] = 0, 1
    np.testing.assert_array_equal(fused, relu(layer(mf.Tensor(x))).data)
    np.testing.assert_array_equal(mean_after_fused, layer.running_mean)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 1), (3, 2, 9), (2, 5)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("primitives", [reference, cpu], ids=["reference", "cpu"])
def test_channel_sum_and_dot(primitives, shape, dtype, contiguous):
    x = normal(shape, 8, dtype, loc=3.0)
    if not contiguous:  # a view of every other column (or row) of a larger array
        x = np.repeat(x, 2, axis=-1)[..., ::2]
        assert not x.flags.c_contiguous
    expected = x.sum(axis=tuple(a for a in range(x.ndim) if a != 1), dtype=np.float64)
    result = primitives.channel_sum(x)
    assert result.dtype == dtype and result.shape == (shape[1],)
    np.testing.assert_allclose(result, expected, rtol=1e-6 if dtype == np.float32 else 1e-12)
    squares = (x.astype(np.float64) ** 2).sum(axis=tuple(a for a in range(x.ndim) if a != 1))
    np.testing.assert_allclose(primitives.channel_dot(x, x), squares, rtol=1e-6 if dtype == np.float32 else 1e-12)


# ---- errors ----------------------------------------------------------------------------------

def _call(x_shape=(2, 3, 4, 4), running=True, weight_shape=(3,), bias_shape=(3,), training=True, **kwargs):
    running_mean, running_var = (np.zeros(3), np.ones(3)) if running else (None, None)
    return batch_norm(mf.Tensor(np.ones(x_shape)), kwargs.pop("running_mean", running_mean),
                      kwargs.pop("running_var", running_var),
                      None if weight_shape is None else mf.Tensor(np.ones(weight_shape)),
                      None if bias_shape is None else mf.Tensor(np.ones(bias_shape)), training, **kwargs)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(running_mean=np.zeros(4)), "running_mean must have shape (3,) for x of shape (2, 3, 4, 4), got shape (4,)"),
    (dict(running_var=np.ones((3, 1))),
     "running_var must have shape (3,) for x of shape (2, 3, 4, 4), got shape (3, 1)"),
    (dict(weight_shape=(2,)), "weight must have shape (3,) for x of shape (2, 3, 4, 4), got shape (2,)"),
    (dict(bias_shape=(1, 3)), "bias must have shape (3,) for x of shape (2, 3, 4, 4), got shape (1, 3)"),
    (dict(running_var=None), "running_mean and running_var must both be given or both be None"),
    (dict(momentum=1.5), "momentum must be a number in [0, 1], got 1.5"),
    (dict(momentum=None), "momentum must be a number in [0, 1], got None"),
    (dict(eps=0), "eps must be a positive number, got 0"),
    (dict(eps=-1e-5), "eps must be a positive number, got -1e-05"),
    (dict(x_shape=(1, 3, 1, 1)), "more than one value per channel, got x of shape (1, 3, 1, 1)"),
    (dict(x_shape=(1, 3)), "more than one value per channel, got x of shape (1, 3)"),
    (dict(x_shape=(3,)), "(N, C, ...), got shape (3,)"),
    (dict(running=False, training=False), "evaluation (training=False) needs running_mean and running_var"),
], ids=["mean-shape", "var-shape", "weight-shape", "bias-shape", "one-stat", "momentum-big", "momentum-none",
        "eps-zero", "eps-negative", "one-value-per-channel", "one-value-2d", "1d-input", "eval-without-stats"])
def test_argument_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=re.escape(pattern)):
        _call(**kwargs)


def test_batch_norm_relu_errors_name_it():
    with pytest.raises(ValueError, match=re.escape("batch_norm_relu expects x of shape (N, C, ...), got shape (3,)")):
        batch_norm_relu(mf.Tensor(np.ones(3)), None, None, training=True)
    with pytest.raises(TypeError, match="batch_norm_relu: x and weight must share one dtype"):
        batch_norm_relu(mf.Tensor(np.ones((2, 3, 2, 2), np.float32)), None, None,
                        mf.Tensor(np.ones(3, np.float64)), training=True)


def test_one_value_per_channel_is_fine_in_eval():
    y = _call(x_shape=(1, 3, 1, 1), training=False)
    assert y.shape == (1, 3, 1, 1)


# ---- devices ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", GPU)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", [batch_norm, batch_norm_relu], ids=["batch_norm", "batch_norm_relu"])
def test_on_device_matches_cpu(device, training, op):
    x, results = normal((3, 4, 5, 5), dtype=np.float32, loc=1.0), []
    for where in ("cpu", device):
        leaves = [mf.Tensor(x, requires_grad=True), mf.Tensor(np.full(4, 1.5, np.float32), requires_grad=True),
                  mf.Tensor(np.full(4, 0.5, np.float32), requires_grad=True)]
        running = [mf.Tensor(s).to(where).data for s in stats(4)]
        y = op(*(t.to(where) for t in leaves[:1]), *running, *(t.to(where) for t in leaves[1:]), training)
        (y * y).sum().backward()
        results.append([to_numpy(y.data)] + [t.grad for t in leaves] + [to_numpy(r) for r in running])
    for on_device, on_cpu in zip(results[1], results[0]):
        np.testing.assert_allclose(on_device, on_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 64, 27, 27), (2, 8, 100, 101)])
@pytest.mark.parametrize("relu_after", [False, True], ids=["affine", "affine-relu"])
def test_channel_affine_of_the_cpu_backend_gives_the_reference_bits(shape, relu_after):
    """The CPU backend walks the arrays with a small ufunc buffer and in channel shares: never
    other values. NumPy's buffer size is restored after."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32).reshape(shape[0], shape[1], -1)
    scale, shift = (np.random.default_rng(k).standard_normal(shape[1]).astype(np.float32) for k in (1, 2))
    before = np.getbufsize()
    got = cpu.channel_affine(x, scale, shift, relu=relu_after)
    assert np.getbufsize() == before
    np.testing.assert_array_equal(got, reference.channel_affine(x, scale, shift, relu=relu_after))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 16, 9, 9)])
def test_running_statistics_follow_the_textbook_sequence_bit_for_bit(shape):
    """running = (1 - m) * running + m * batch statistic, the variance unbiased by n / (n - 1),
    in that order of operations: SyncBatchNorm2d takes n from all ranks (minifcn.distributed),
    and one process must still get the same bits as the textbook sequence."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    running_mean = rng.standard_normal(shape[1]).astype(np.float32)
    running_var = (0.5 + rng.random(shape[1])).astype(np.float32)
    m, n = 0.1, shape[0] * shape[2] * shape[3]
    x3 = x.reshape(shape[0], shape[1], -1)
    mean = cpu.channel_sum(x3) / n
    centred = x3 - mean.reshape(1, -1, 1)
    var = cpu.channel_dot(centred, centred) / n
    expected_mean = (1 - m) * running_mean + m * mean
    expected_var = (1 - m) * running_var + m * var * (n / (n - 1))
    batch_norm(x, running_mean, running_var, training=True, momentum=m)
    np.testing.assert_array_equal(running_mean, expected_mean)
    np.testing.assert_array_equal(running_var, expected_var)
