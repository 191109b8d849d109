"""The three backends (minifcn.backend): the same primitives, the same signatures, the same
results as the reference; and the one switch that chooses among them."""

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKENDS, random_weights

import minifcn as mf
from minifcn import backend
from minifcn.backend import reference
from minifcn.backend.dispatch import BACKENDS as MODULES

FAST = [b for b in BACKENDS if getattr(b, "values", (b,))[0] != "reference"]


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_backend_has_every_primitive_with_the_reference_signature(name):
    module = MODULES[name]
    for primitive in reference.PRIMITIVES:
        assert hasattr(module, primitive), f"backend {name!r} lacks {primitive}"
        ours = list(inspect.signature(getattr(module, primitive)).parameters)
        theirs = list(inspect.signature(getattr(reference, primitive)).parameters)
        assert ours == theirs[:len(ours)] and len(ours) >= len(
            [p for p in inspect.signature(getattr(reference, primitive)).parameters.values()
             if p.default is inspect.Parameter.empty]), f"{name}.{primitive}{ours} differs from the reference {theirs}"


# (x shape, C_out, geometry as (kernel, stride, padding, dilation)), named by what is awkward
CONV = [
    pytest.param((2, 3, 7, 6), 4, ((3, 3), (1, 1), (1, 1), (1, 1)), id="same-size-3x3"),
    pytest.param((1, 2, 8, 7), 3, ((2, 2), (3, 3), (0, 0), (1, 1)), id="stride-gt-kernel"),
    pytest.param((2, 2, 7, 8), 2, ((3, 3), (1, 1), (2, 2), (2, 2)), id="dilated"),
    pytest.param((1, 3, 4, 5), 2, ((3, 3), (1, 1), (6, 6), (1, 1)), id="pad-wider-than-input"),
    pytest.param((2, 4, 3, 5), 3, ((1, 1), (1, 1), (0, 0), (1, 1)), id="1x1"),
    pytest.param((2, 3, 9, 8), 2, ((4, 4), (2, 2), (2, 2), (1, 1)), id="stride-divides-kernel"),
    pytest.param((1, 2, 6, 5), 3, ((3, 2), (2, 1), (1, 0), (1, 2)), id="pairs"),
]


def _conv_operands(x_shape, C_out, geometry, seed=0):
    from minifcn.backend.reference.conv import output_shape
    r = rng(seed)
    (kH, kW) = geometry[0]
    x = r.standard_normal(x_shape)
    weight2d = r.standard_normal((C_out, x_shape[1] * kH * kW))
    grad = r.standard_normal((x_shape[0], C_out) + output_shape(x_shape, *geometry))
    return x, weight2d, grad


def _close(ours, theirs):
    if isinstance(theirs, tuple):
        for a, b in zip(ours, theirs):
            _close(a, b)
        return
    if theirs is None:
        assert ours is None
        return
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("x_shape, C_out, geometry", CONV)
def test_convolution_primitives_equal_the_reference(name, x_shape, C_out, geometry):
    x, weight2d, grad = _conv_operands(x_shape, C_out, geometry)
    fast = MODULES[name]
    _close(fast.gather(x, weight2d, geometry), reference.gather(x, weight2d, geometry))
    _close(fast.scatter(grad, weight2d, x.shape, geometry), reference.scatter(grad, weight2d, x.shape, geometry))
    _close(fast.window_products(x, grad, geometry), reference.window_products(x, grad, geometry))
    for need in [(True, True), (True, False), (False, True)]:
        _close(fast.conv2d_backward(x, weight2d, grad, geometry, *need),
               reference.conv2d_backward(x, weight2d, grad, geometry, *need))
    # conv_transpose2d: x plays the output gradient's role, grad the input's
    weight_t = rng(1).standard_normal((C_out, weight2d.shape[1]))
    for need in [(True, True), (True, False), (False, True)]:
        _close(fast.conv_transpose2d_backward(grad, weight_t, x, geometry, *need),
               reference.conv_transpose2d_backward(grad, weight_t, x, geometry, *need))


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", [
    ((2, 2), (2, 2), (0, 0), True), ((3, 3), (2, 2), (1, 1), False), ((2, 3), (2, 3), (0, 0), False)])
def test_pooling_primitives_equal_the_reference(name, kernel, stride, padding, ceil_mode):
    x = rng(2).integers(0, 4, (2, 3, 7, 8)).astype(np.float64)  # ties everywhere
    out, argmax = MODULES[name].max_pool2d_forward(x, kernel, stride, padding, ceil_mode)
    expected, expected_argmax = reference.max_pool2d_forward(x, kernel, stride, padding, ceil_mode)
    np.testing.assert_array_equal(out, expected)
    g = rng(3).standard_normal(out.shape)
    np.testing.assert_array_equal(MODULES[name].max_pool2d_backward(g, argmax, x.shape),
                                  reference.max_pool2d_backward(g, expected_argmax, x.shape))


@pytest.mark.parametrize("name", FAST)
def test_elementwise_and_per_channel_primitives_equal_the_reference(name):
    fast, r = MODULES[name], rng(4)
    x, y, g = r.standard_normal((2, 3, 20)), np.maximum(r.standard_normal((2, 3, 20)), 0), r.standard_normal((2, 3, 20))
    scale, shift = r.standard_normal(3), r.standard_normal(3)
    _close(fast.relu(x), reference.relu(x))
    _close(fast.relu_backward(g, y), reference.relu_backward(g, y))
    _close(fast.channel_sum(x), reference.channel_sum(x))
    _close(fast.channel_dot(x, g), reference.channel_dot(x, g))
    for relu in (False, True):
        _close(fast.channel_affine(x, scale, shift, relu), reference.channel_affine(x, scale, shift, relu))
    keep = r.random(x.shape) < 0.6
    _close(fast.dropout_apply(x, keep, 2.5), reference.dropout_apply(x, keep, 2.5))


@pytest.mark.parametrize("name", FAST)
def test_loss_resample_and_crop_primitives_equal_the_reference(name):
    fast, r = MODULES[name], rng(5)
    logits = r.standard_normal((2, 4, 3, 5))
    target = r.integers(0, 4, (2, 3, 5))
    target[0, 1] = 255
    loss, lse = fast.softmax_cross_entropy_forward(logits, target, 255)
    _close((loss, lse), reference.softmax_cross_entropy_forward(logits, target, 255))
    _close(fast.softmax_cross_entropy_backward(logits, target, lse, 255, 0.25),
           reference.softmax_cross_entropy_backward(logits, target, lse, 255, 0.25))
    x = r.standard_normal((1, 2, 5, 4))
    for mode, corners in (("bilinear", False), ("bilinear", True), ("nearest", False)):
        y = fast.interpolate_forward(x, (9, 7), mode, corners)
        _close(y, reference.interpolate_forward(x, (9, 7), mode, corners))
        _close(fast.interpolate_backward(y, (5, 4), mode, corners), reference.interpolate_backward(y, (5, 4), mode, corners))
    _close(fast.crop_forward(x, 1, 2, 3, 2), reference.crop_forward(x, 1, 2, 3, 2))
    _close(fast.crop_backward(x[:, :, :3, :2].copy(), x.shape, 1, 2), reference.crop_backward(x[:, :, :3, :2].copy(), x.shape, 1, 2))


@pytest.mark.parametrize("name", FAST)
def test_optimiser_updates_equal_the_reference(name):
    r = rng(6)
    start = [r.standard_normal(7) for _ in range(4)]
    ours, theirs = [a.copy() for a in start], [a.copy() for a in start]
    MODULES[name].sgd_update_(ours[0], start[1], ours[2], 0.1, 0.9, 0.01)
    reference.sgd_update_(theirs[0], start[1], theirs[2], 0.1, 0.9, 0.01)
    _close(tuple(ours), tuple(theirs))
    m, v = np.zeros(7), np.zeros(7)
    m2, v2 = np.zeros(7), np.zeros(7)
    MODULES[name].adam_update_(ours[0], start[1], m, v, 0.01, 0.9, 0.999, 1e-8, 0.0, 1)
    reference.adam_update_(theirs[0], start[1], m2, v2, 0.01, 0.9, 0.999, 1e-8, 0.0, 1)
    _close((ours[0], m, v), (theirs[0], m2, v2))


def test_a_whole_network_trains_alike_on_every_backend():
    """One forward and backward of a small FCN-8s with BatchNorm and random weights: the
    reference gives the fast backend's loss and every gradient (to rounding), so a learner can
    step through plain NumPy."""
    results = {}
    for name in ("reference", "cpu"):
        mf.nn.manual_seed(0)
        model = mf.models.fcn8s(num_classes=3, width=1 / 16, batch_norm=True,
                                learnable_upsampling=True).to(dtype=np.float64)
        random_weights(model, rng(9))
        x = mf.Tensor(rng(7).standard_normal((2, 3, 40, 36)), requires_grad=True)
        labels = rng(8).integers(0, 3, (2, 40, 36))
        with backend.using(name):
            loss = mf.functional.softmax_cross_entropy(model(x), labels)
            loss.backward()
        results[name] = {"loss": loss.data, "x": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    assert results["cpu"].keys() == results["reference"].keys() and len(results["cpu"]) > 50
    assert abs(results["cpu"]["loss"] - np.log(3)) > 0.01  # the scores are not all zero
    grads = [g for n, g in results["cpu"].items() if n != "loss"]
    assert all(np.count_nonzero(g) for g in grads)  # gradients that can differ
    for name, ours in results["cpu"].items():
        np.testing.assert_allclose(ours, results["reference"][name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_the_switch():
    assert mf.get_backend() is None  # by default the data decides
    x = np.zeros(3)
    assert backend.primitives(x) is MODULES["cpu"]
    with backend.using("reference"):
        assert mf.get_backend() == "reference" and backend.primitives(x) is reference
    assert mf.get_backend() is None
    with pytest.raises(ValueError, match=r"backend must be one of \['cpu', 'cuda', 'reference'\] or None "
                                         r"\(by the data\), got 'numpy'"):
        mf.set_backend("numpy")


@pytest.mark.parametrize("value, expected", [("reference", "reference"), ("", "None")])
def test_the_environment_variable_chooses_the_backend(value, expected):
    env = dict(os.environ, MINIFCN_BACKEND=value)
    done = subprocess.run([sys.executable, "-c", "import minifcn; print(minifcn.get_backend())"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_a_bad_environment_variable_is_named():
    env = dict(os.environ, MINIFCN_BACKEND="fast")
    done = subprocess.run([sys.executable, "-c", "import minifcn"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "MINIFCN_BACKEND must be one of ['cpu', 'cuda', 'reference'], got 'fast'" in done.stderr
