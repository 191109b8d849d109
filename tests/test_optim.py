"""minifcn.optim: SGD and Adam against hand-computed steps, state round trips, schedules."""

import math

import numpy
import pytest

from minifcn import backend, nn, optim
from minifcn.backend import reference
from minifcn.tensor import Tensor

from conftest import DEVICES


def _param(values, grad=None, dtype=numpy.float64, device="cpu"):
    p = nn.Parameter(numpy.array(values, dtype=dtype))
    p.data = backend.to_device(p.data, device)
    if grad is not None:
        p.grad = backend.to_device(numpy.array(grad, dtype=dtype), device)
    return p


def _values(p):
    return backend.to_numpy(p.data)


# ---- the update rules, by hand ---------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_sgd_with_momentum_and_weight_decay_matches_hand_computed_steps(device):
    p = _param([1.0, -2.0], [0.5, 0.25], device=device)
    opt = optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.step()
    # g = grad + 0.01 p = [0.51, 0.23]; v = g; p -= 0.1 v
    numpy.testing.assert_allclose(_values(p), [0.949, -2.023], rtol=1e-12)
    opt.step()
    # g = [0.50949, 0.22977]; v = 0.9 [0.51, 0.23] + g = [0.96849, 0.43677]
    numpy.testing.assert_allclose(_values(p), [0.852151, -2.066677], rtol=1e-12)
    numpy.testing.assert_allclose(backend.to_numpy(opt.state[0]["velocity"]), [0.96849, 0.43677], rtol=1e-12)


def test_plain_sgd_is_a_gradient_step():
    p = _param([1.0, 2.0], [0.5, -1.0])
    optim.SGD([p], lr=0.5).step()
    numpy.testing.assert_allclose(p.data, [0.75, 2.5])


@pytest.mark.parametrize("device", DEVICES)
def test_adam_matches_hand_computed_steps(device):
    p = _param([1.0, -2.0], [0.5, 0.25], device=device)
    opt = optim.Adam([p], lr=0.1)
    opt.step()
    # step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps) ~ lr * sign(g)
    numpy.testing.assert_allclose(_values(p), [0.9, -2.1], rtol=1e-8)
    p.grad = backend.to_device(numpy.array([-0.5, 0.25]), device)
    opt.step()
    # m = [-0.005, 0.0475], m_hat = m / 0.19; v_hat = [0.25, 0.0625]
    numpy.testing.assert_allclose(_values(p), [0.9 + 0.1 * 0.005 / 0.19 / 0.5, -2.2], rtol=1e-8)
    assert opt.state[0]["step"] == 2
    numpy.testing.assert_allclose(backend.to_numpy(opt.state[0]["m"]), [-0.005, 0.0475], rtol=1e-12)
    numpy.testing.assert_allclose(backend.to_numpy(opt.state[0]["v"]), [0.00049975, 0.0001249375], rtol=1e-12)


def test_adam_weight_decay_is_added_to_the_gradient():
    p = _param([1.0], [-0.05])
    optim.Adam([p], lr=0.1, weight_decay=0.1).step()
    # g = -0.05 + 0.1 * 1 = +0.05: the decay wins, so p moves down by ~lr
    numpy.testing.assert_allclose(p.data, [0.9], rtol=1e-7)


def test_update_primitives_work_in_place_and_leave_the_gradient_alone():
    param = numpy.array([1.0, 2.0], dtype=numpy.float32)
    grad = numpy.array([0.5, -1.0], dtype=numpy.float32)
    velocity = numpy.zeros(2, dtype=numpy.float32)
    original = grad.copy()
    reference.sgd_update_(param, grad, velocity, 0.1, 0.9, 0.1)
    numpy.testing.assert_allclose(param, [1 - 0.1 * 0.6, 2 - 0.1 * -0.8], rtol=1e-6)
    m, v = numpy.zeros(2, numpy.float32), numpy.zeros(2, numpy.float32)
    reference.adam_update_(param, grad, m, v, 0.01, 0.9, 0.999, 1e-8, 0.0, 1)
    numpy.testing.assert_array_equal(grad, original)
    assert param.dtype == velocity.dtype == m.dtype == v.dtype == numpy.float32


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
                                  lambda ps: optim.Adam(ps, lr=0.1, weight_decay=0.1)], ids=["sgd", "adam"])
def test_optimisers_keep_dtype_and_never_modify_grad(make):
    p = _param(numpy.ones((3, 2)), numpy.full((3, 2), 0.5), dtype=numpy.float32)
    grad = p.grad
    opt = make([p])
    opt.step()
    opt.step()
    assert p.grad is grad and (grad == 0.5).all()
    assert p.dtype == numpy.float32
    assert all(s.dtype == numpy.float32 for s in opt.state[0].values() if hasattr(s, "dtype"))


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: optim.Adam(ps, lr=0.1)], ids=["sgd", "adam"])
def test_frozen_and_gradient_free_parameters_are_skipped(make):
    frozen = _param([1.0, 2.0], [1.0, 1.0])
    frozen.requires_grad_(False)
    unused = _param([3.0])  # grad None: not used by this forward pass
    live = _param([4.0], [1.0])
    opt = make([frozen, unused, live])
    opt.step()
    numpy.testing.assert_array_equal(frozen.data, [1.0, 2.0])
    numpy.testing.assert_array_equal(unused.data, [3.0])
    assert live.data[0] < 4.0
    assert opt.state[0] is None and opt.state[1] is None


def test_frozen_layer_of_a_model_is_not_trained():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Conv2d(3, 1, 1))
    net[0].requires_grad_(False)
    before = net.state_dict()
    opt = optim.SGD(net.parameters(), lr=0.1)
    x = Tensor(numpy.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(numpy.float32))
    net(x).sum().backward()
    opt.step()
    after = net.state_dict()
    numpy.testing.assert_array_equal(after["0.weight"], before["0.weight"])
    assert not numpy.array_equal(after["2.bias"], before["2.bias"])


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9),
                                  lambda ps: optim.Adam(ps, lr=0.1)], ids=["sgd", "adam"])
def test_optimisers_minimise_a_quadratic(make):
    target = numpy.array([1.0, -2.0, 3.0])
    p = nn.Parameter(numpy.zeros(3))
    opt = make([p])
    for _ in range(300):
        opt.zero_grad()
        ((p - target) ** 2).sum().backward()
        opt.step()
    numpy.testing.assert_allclose(p.data, target, atol=1e-3)


# ---- state round trip ------------------------------------------------------------------

@pytest.mark.parametrize("cls, kwargs", [(optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                                         (optim.Adam, dict(lr=0.01, weight_decay=1e-3))], ids=["sgd", "adam"])
def test_state_dict_round_trip_continues_identically(cls, kwargs):
    rng = numpy.random.default_rng(0)
    grads = [[rng.standard_normal((2, 3)), rng.standard_normal(4)] for _ in range(5)]
    a = [_param(numpy.ones((2, 3))), _param(numpy.zeros(4)), _param([7.0])]  # the last never has a grad
    opt_a = cls(a, **kwargs)
    for step in grads[:3]:
        for p, g in zip(a, step):
            p.grad = g
        opt_a.step()
    state = opt_a.state_dict()
    assert all(isinstance(v, numpy.ndarray) for v in state.values())
    assert "2.velocity" not in state and "2.m" not in state
    b = [_param(p.data.copy()) for p in a]
    opt_b = cls(b, lr=123.0)
    opt_b.load_state_dict(state)
    assert opt_b.lr == kwargs["lr"]
    for step in grads[3:]:
        for pa, pb, g in zip(a, b, step):
            pa.grad, pb.grad = g, g.copy()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        numpy.testing.assert_array_equal(pa.data, pb.data)


def test_load_state_dict_rejects_a_state_that_does_not_fit():
    p = _param(numpy.ones(3), numpy.ones(3))
    sgd = optim.SGD([p], lr=0.1, momentum=0.9)
    sgd.step()
    with pytest.raises(ValueError, match="from a SGD optimiser, not Adam"):
        optim.Adam([p]).load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="for 1 parameters.*has 2"):
        optim.SGD([p, _param([1.0])], lr=0.1).load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match=r"0.velocity: shape \(3,\) given, \(4,\) expected"):
        optim.SGD([_param(numpy.ones(4))], lr=0.1).load_state_dict(sgd.state_dict())


def test_state_follows_the_parameter_dtype():
    p = _param([1.0], [1.0], dtype=numpy.float32)
    opt = optim.SGD([p], lr=0.1, momentum=0.5)
    opt.step()
    state = opt.state_dict()
    p.data, p.grad = p.data.astype(numpy.float64), numpy.ones(1)
    opt.load_state_dict(state)
    assert opt.state[0]["velocity"].dtype == numpy.float64
    opt.step()
    assert p.dtype == numpy.float64


# ---- arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("build, name", [
    (lambda ps: optim.SGD(ps, lr=-0.1), "lr"),
    (lambda ps: optim.SGD(ps, lr=float("nan")), "lr"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=1.0), "momentum"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=-0.5), "momentum"),
    (lambda ps: optim.SGD(ps, lr=0.1, weight_decay=-1e-4), "weight_decay"),
    (lambda ps: optim.Adam(ps, lr=-1.0), "lr"),
    (lambda ps: optim.Adam(ps, betas=(1.0, 0.999)), "beta1"),
    (lambda ps: optim.Adam(ps, betas=(0.9, -0.1)), "beta2"),
    (lambda ps: optim.Adam(ps, betas=0.9), "betas"),
    (lambda ps: optim.Adam(ps, eps=0.0), "eps"),
    (lambda ps: optim.Adam(ps, eps=-1e-8), "eps"),
    (lambda ps: optim.Adam(ps, weight_decay=-1.0), "weight_decay"),
    (lambda ps: optim.SGD([], lr=0.1), "empty"),
    (lambda ps: optim.SGD(ps + ps, lr=0.1), "twice"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_raise_value_error(build, name):
    with pytest.raises(ValueError, match=name):
        build([_param([1.0])])


def test_lr_is_settable_and_checked():
    opt = optim.SGD([_param([1.0])], lr=0.1)
    opt.lr = 0.01
    assert opt.lr == 0.01
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -0.01
    with pytest.raises(TypeError, match="not a Tensor"):
        optim.SGD([numpy.ones(2)], lr=0.1)


# ---- schedules -----------------------------------------------------------------------------

def test_schedule_functions():
    assert optim.poly_lr(0.01, 0, 100) == 0.01
    assert math.isclose(optim.poly_lr(0.01, 50, 100), 0.01 * 0.5 ** 0.9)
    assert optim.poly_lr(0.01, 100, 100) == 0.0 and optim.poly_lr(0.01, 150, 100) == 0.0
    assert [optim.step_lr(1.0, i, 2) for i in range(5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert optim.constant_lr(0.3, 1000) == 0.3


def test_schedulers_drive_the_optimiser_lr_and_resume():
    opt = optim.SGD([_param([1.0])], lr=0.1)
    sched = optim.PolyLR(opt, max_iterations=10)
    assert opt.lr == 0.1
    lrs = [sched.step() for _ in range(10)]
    assert lrs[0] == pytest.approx(0.1 * 0.9 ** 0.9) and lrs[-1] == 0.0 and opt.lr == 0.0
    resumed = optim.PolyLR(optim.SGD([_param([1.0])], lr=0.5), max_iterations=10)
    resumed.load_state_dict({"iteration": 3, "base_lr": 0.1})
    assert resumed.optimizer.lr == pytest.approx(0.1 * 0.7 ** 0.9)
    step = optim.StepLR(opt, step_size=2, gamma=0.5, base_lr=1.0)
    assert [opt.lr] + [step.step() for _ in range(4)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    const = optim.ConstantLR(opt, base_lr=0.2)
    assert const.step() == 0.2 and const.state_dict() == {"iteration": 1, "base_lr": 0.2}
    with pytest.raises(ValueError, match="max_iterations"):
        optim.PolyLR(opt, max_iterations=0)
    with pytest.raises(ValueError, match="step_size"):
        optim.StepLR(opt, step_size=0)


@pytest.mark.cuda
@pytest.mark.parametrize("cls, kwargs", [(optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
                                         (optim.Adam, dict(lr=0.01, weight_decay=0.01))], ids=["sgd", "adam"])
def test_cuda_updates_match_numpy(cls, kwargs):
    rng = numpy.random.default_rng(1)
    start, grads = rng.standard_normal(1000).astype(numpy.float32), rng.standard_normal((3, 1000)).astype(numpy.float32)
    cpu, gpu = _param(start, dtype=numpy.float32), _param(start, dtype=numpy.float32, device="cuda")
    opt_cpu, opt_gpu = cls([cpu], **kwargs), cls([gpu], **kwargs)
    for g in grads:
        cpu.grad, gpu.grad = g, backend.to_device(g, "cuda")
        opt_cpu.step()
        opt_gpu.step()
    numpy.testing.assert_allclose(_values(gpu), cpu.data, rtol=1e-5, atol=1e-6)
    assert all(backend.is_cuda(s) for s in opt_gpu.state[0].values() if hasattr(s, "shape"))


def test_load_state_dict_needs_every_state_entry_of_a_parameter():
    p = _param(numpy.ones(3), numpy.ones(3))
    adam = optim.Adam([p])
    adam.step()
    state = adam.state_dict()
    del state["0.v"]
    state["lr"] = numpy.array(-1.0)
    with pytest.raises(ValueError, match="(?s)'lr'.*missing entry '0.v'"):
        optim.Adam([p]).load_state_dict(state)
