"""minifcn.nn: Module bookkeeping, layers, initialisers and the shared random stream."""

import math

import numpy
import pytest

from minifcn import backend, nn
from minifcn.functional.conv import conv2d, conv_transpose2d
from minifcn.functional.pooling import max_pool2d
from minifcn.functional.resample import interpolate
from minifcn.nn import init
from minifcn.tensor import Tensor

from conftest import DEVICES


class TwoConvs(nn.Module):
    """A small net with a buffer, a frozen-able parameter and a plain attribute."""

    def __init__(self, width=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.scale = nn.Parameter(numpy.ones(1, dtype=numpy.float32))
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(width, 2, 1))
        self.register_buffer("calls", numpy.zeros((), dtype=numpy.int64))
        self.name = "two convs"  # a plain attribute: not state

    def forward(self, x):
        return self.block(self.conv1(x) * self.scale)


def _input(shape=(2, 3, 5, 6), seed=0, dtype=numpy.float32):
    return Tensor(numpy.random.default_rng(seed).standard_normal(shape).astype(dtype))


# ---- Parameter and Module bookkeeping ----------------------------------------------

def test_parameter_requires_grad_by_default_and_can_be_frozen():
    p = nn.Parameter(numpy.zeros((2, 3), dtype=numpy.float32))
    assert p.requires_grad and isinstance(p, Tensor) and p.grad is None
    frozen = nn.Parameter([1.0, 2.0], requires_grad=False)
    assert not frozen.requires_grad and frozen.dtype == numpy.float32
    assert nn.Parameter([1, 2], dtype=numpy.float64).dtype == numpy.float64
    assert "requires_grad=False" in repr(frozen) and "Parameter(shape=(2, 3)" in repr(p)


def test_named_parameters_follow_definition_order_with_dotted_names():
    net = TwoConvs()
    assert [name for name, _ in net.named_parameters()] == [
        "conv1.weight", "conv1.bias", "scale", "block.1.weight", "block.1.bias"]
    assert [p.shape for p in net.parameters()] == [(4, 3, 3, 3), (4,), (1,), (2, 4, 1, 1), (2,)]
    assert [name for name, _ in net.named_buffers()] == ["calls"]
    assert [name for name, _ in net.named_children()] == ["conv1", "block"]
    assert [name for name, _ in net.named_modules()] == ["", "conv1", "block", "block.0", "block.1"]
    assert list(net.children()) == [net.conv1, net.block]
    assert "name" not in dict(net.named_parameters()) and net.name == "two convs"


def test_shared_parameters_and_modules_are_listed_once():
    net = nn.Module()
    conv = nn.Conv2d(2, 2, 1)
    net.a, net.b = conv, conv
    net.w = conv.weight
    assert [name for name, _ in net.named_parameters()] == ["a.weight", "a.bias"]
    assert len(list(net.modules())) == 2


def test_registration_errors_are_clear():
    class Forgot(nn.Module):
        def __init__(self):
            self.w = nn.Parameter([1.0])

    with pytest.raises(AttributeError, match="super\\(\\).__init__"):
        Forgot()
    net = TwoConvs()
    with pytest.raises(TypeError, match="'scale'.*parameter"):
        net.scale = numpy.ones(1)
    with pytest.raises(TypeError, match="buffer 'calls'"):
        net.calls = [1, 2]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        net.nope
    with pytest.raises(TypeError, match="Sequential takes Modules"):
        nn.Sequential(nn.ReLU(), "relu")
    with pytest.raises(NotImplementedError, match="forward"):
        nn.Module()(1)


def test_reassigning_and_deleting_members():
    net = TwoConvs()
    net.conv1.bias = None  # an absent bias, as bias=False makes
    assert "conv1.bias" not in dict(net.named_parameters())
    new = nn.Parameter(numpy.full(1, 2.0, dtype=numpy.float32))
    net.scale = new
    assert net.scale is new and [n for n, _ in net.named_parameters()][1] == "scale"
    del net.scale
    assert "scale" not in dict(net.named_parameters())


def test_call_runs_forward_and_zero_grad_drops_gradients():
    net = TwoConvs()
    out = net(_input())
    assert out.shape == (2, 2, 5, 6)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_frozen_parameters_get_no_gradient_and_stay_in_state_dict():
    net = TwoConvs()
    net.conv1.requires_grad_(False)
    net(_input()).sum().backward()
    assert net.conv1.weight.grad is None and net.conv1.bias.grad is None
    assert net.block[1].weight.grad is not None and net.scale.grad is not None
    assert "conv1.weight" in net.state_dict() and len(list(net.parameters())) == 5


def test_train_and_eval_are_recursive():
    net = TwoConvs()
    assert all(m.training for m in net.modules())
    assert net.eval() is net and not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_repr_shows_the_tree_and_settings():
    text = repr(TwoConvs())
    assert text.splitlines()[0] == "TwoConvs("
    assert "(conv1): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))" in text
    assert "  (block): Sequential(\n    (0): ReLU()\n    (1): Conv2d(4, 2" in text
    assert repr(nn.MaxPool2d(2, ceil_mode=True)) == \
        "MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), ceil_mode=True)"
    assert repr(nn.Conv2d(1, 2, 3, bias=False)).endswith("bias=False)")


# ---- state dicts ---------------------------------------------------------------------

def test_state_dict_holds_numpy_copies_of_parameters_and_buffers():
    net = TwoConvs()
    state = net.state_dict()
    assert list(state) == ["conv1.weight", "conv1.bias", "scale", "block.1.weight", "block.1.bias", "calls"]
    assert all(type(v) is numpy.ndarray for v in state.values())
    state["scale"][...] = 7.0
    assert net.scale.data[0] == 1.0  # a copy, not a view


def test_state_dict_round_trip_reproduces_the_outputs():
    init.manual_seed(1)
    source, target = TwoConvs(), TwoConvs()
    x = _input()
    assert not numpy.allclose(source(x).data, target(x).data)
    result = target.load_state_dict(source.state_dict())
    assert result.missing == [] and result.unexpected == []
    numpy.testing.assert_array_equal(source(x).data, target(x).data)


def test_load_state_dict_lists_every_problem_in_one_error_and_changes_nothing():
    net = TwoConvs()
    before = net.state_dict()
    state = net.state_dict()
    del state["conv1.bias"], state["calls"]
    state["conv1.weight"] = numpy.zeros((4, 3, 5, 5), dtype=numpy.float32)
    state["block.1.weight"] = numpy.array(["a", "b"])
    state["conv9.weight"] = numpy.zeros(3)
    state["scale"] = numpy.full(1, 5.0)
    with pytest.raises(nn.StateDictError) as info:
        net.load_state_dict(state)
    err, text = info.value, str(info.value)
    assert err.missing == ["conv1.bias", "calls"] and err.unexpected == ["conv9.weight"]
    assert len(err.mismatched) == 2
    for name in ("conv1.bias", "calls", "conv9.weight", "conv1.weight", "(4, 3, 5, 5)", "block.1.weight"):
        assert name in text
    for name, array in net.state_dict().items():  # the valid "scale" was not loaded either
        numpy.testing.assert_array_equal(array, before[name])


def test_load_state_dict_non_strict_skips_missing_and_unexpected_but_not_bad_shapes():
    net = TwoConvs()
    result = net.load_state_dict({"scale": numpy.full(1, 3.0), "extra.weight": numpy.zeros(2)}, strict=False)
    assert net.scale.data[0] == 3.0
    assert "conv1.weight" in result.missing and result.unexpected == ["extra.weight"]
    with pytest.raises(nn.StateDictError, match="scale"):
        net.load_state_dict({"scale": numpy.zeros(2)}, strict=False)


def test_load_state_dict_keeps_the_model_dtype():
    net = TwoConvs().to(dtype=numpy.float64)
    state = {k: v.astype(numpy.float32) if v.dtype.kind == "f" else v for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    assert all(p.dtype == numpy.float64 for p in net.parameters())
    assert net.calls.dtype == numpy.int64
    with pytest.raises(TypeError, match="mapping"):
        net.load_state_dict([("scale", numpy.ones(1))])


# ---- devices and dtypes -----------------------------------------------------------------

def test_to_checks_the_device_name():
    net = TwoConvs()
    with pytest.raises(ValueError, match="device must be one of"):
        net.to("tpu")
    assert net.to("cpu") is net and all(p.device == "cpu" for p in net.parameters())


@pytest.mark.skipif(backend.cupy_available(), reason="checks the error raised without a GPU")
def test_to_cuda_without_cupy_is_a_clear_error():
    net = TwoConvs()
    with pytest.raises(RuntimeError, match="CuPy"):
        net.to("cuda")
    assert all(p.device == "cpu" for p in net.parameters())


def test_to_dtype_casts_parameters_gradients_and_float_buffers():
    bn = nn.BatchNorm2d(3)
    bn.weight.grad = numpy.ones(3, dtype=numpy.float32)
    bn.to(dtype=numpy.float64)
    assert bn.weight.dtype == bn.weight.grad.dtype == bn.running_mean.dtype == numpy.float64
    with pytest.raises(ValueError, match="floating-point"):
        bn.to(dtype=numpy.int32)


@pytest.mark.cuda
def test_to_cuda_moves_parameters_gradients_and_buffers_in_place():
    net = TwoConvs()
    net.block[1].bias.grad = numpy.ones(2, dtype=numpy.float32)
    params = list(net.parameters())
    x = _input()
    expected = net(x).data
    net.to("cuda")
    assert list(net.parameters()) == params  # the same objects, moved
    assert all(p.device == "cuda" for p in params) and backend.is_cuda(net.block[1].bias.grad)
    assert backend.is_cuda(net.calls)
    numpy.testing.assert_allclose(backend.to_numpy(net(x.to("cuda")).data), expected, rtol=1e-5, atol=1e-5)
    state = net.state_dict()
    assert all(type(v) is numpy.ndarray for v in state.values())
    net.load_state_dict(state)
    assert all(p.device == "cuda" for p in net.parameters())
    net.to("cpu")
    assert all(p.device == "cpu" for p in net.parameters())


# ---- layers -------------------------------------------------------------------------------

def test_conv2d_layer_matches_the_functional_op():
    layer = nn.Conv2d(3, 5, (3, 2), stride=2, padding=1, dilation=(1, 2))
    assert layer.weight.shape == (5, 3, 3, 2) and layer.bias.shape == (5,)
    assert layer.weight.dtype == numpy.float32 and not layer.bias.data.any()
    x = _input((2, 3, 9, 8))
    expected = conv2d(x, layer.weight, layer.bias, stride=2, padding=1, dilation=(1, 2))
    numpy.testing.assert_array_equal(layer(x).data, expected.data)
    assert nn.Conv2d(3, 5, 3, bias=False).bias is None
    assert nn.Conv2d(3, 5, 3, dtype=numpy.float64).weight.dtype == numpy.float64


def test_conv_transpose2d_layer_matches_the_functional_op():
    layer = nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1)
    assert layer.weight.shape == (3, 4, 4, 4)
    x = _input((1, 3, 5, 6))
    out = layer(x)
    assert out.shape == (1, 4, 10, 12)
    expected = conv_transpose2d(x, layer.weight, layer.bias, stride=2, padding=1)
    numpy.testing.assert_array_equal(out.data, expected.data)
    assert nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1)(x).shape == (1, 4, 12, 14)


def test_maxpool_relu_identity_layers():
    x = _input((1, 2, 5, 5))
    pool = nn.MaxPool2d(2, ceil_mode=True)
    assert pool.stride == (2, 2)
    numpy.testing.assert_array_equal(pool(x).data, max_pool2d(x, 2, 2, ceil_mode=True).data)
    assert pool(x).shape == (1, 2, 3, 3) and nn.MaxPool2d(2)(x).shape == (1, 2, 2, 2)
    numpy.testing.assert_array_equal(nn.ReLU()(x).data, numpy.maximum(x.data, 0))
    assert nn.Identity()(x) is x


def test_sequential_applies_layers_in_order():
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert len(seq) == 3 and isinstance(seq[1], nn.ReLU) and isinstance(seq[-1], nn.Conv2d)
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = _input()
    numpy.testing.assert_array_equal(seq(x).data, seq[2](seq[1](seq[0](x))).data)
    assert len(seq[:2]) == 2 and [type(m) for m in seq] == [nn.Conv2d, nn.ReLU, nn.Conv2d]


@pytest.mark.parametrize("build, name", [
    (lambda: nn.Conv2d(0, 4, 3), "in_channels"),
    (lambda: nn.Conv2d(3, -1, 3), "out_channels"),
    (lambda: nn.Conv2d(3, 4, 0), "kernel_size"),
    (lambda: nn.Conv2d(3, 4, 3, stride=0), "stride"),
    (lambda: nn.Conv2d(3, 4, 3, padding=-1), "padding"),
    (lambda: nn.Conv2d(3, 4, 3, dilation=0), "dilation"),
    (lambda: nn.Conv2d(3, 4, (3, 3, 3)), "kernel_size"),
    (lambda: nn.Conv2d(3.0, 4, 3), "in_channels"),
    (lambda: nn.ConvTranspose2d(3, 4, 4, stride=0), "stride"),
    (lambda: nn.ConvTranspose2d(3, 4, 4, stride=2, output_padding=2), "output_padding"),
    (lambda: nn.MaxPool2d(0), "kernel_size"),
    (lambda: nn.MaxPool2d(2, stride=-2), "stride"),
    (lambda: nn.Dropout(1.5), "p"),
    (lambda: nn.Dropout2d(-0.1), "p"),
    (lambda: nn.BatchNorm2d(0), "num_features"),
    (lambda: nn.BatchNorm2d(3, eps=0), "eps"),
    (lambda: nn.BatchNorm2d(3, momentum=2), "momentum"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_layer_arguments_raise_an_error_naming_them(build, name):
    """A value out of range is a ValueError; a pair of the wrong length a TypeError (minifcn.arguments)."""
    with pytest.raises((ValueError, TypeError), match=name):
        build()


# ---- dropout and the shared random stream ----------------------------------------------

def test_dropout_is_identity_in_eval_and_random_in_training():
    x = Tensor(numpy.ones((4, 8, 16, 16), dtype=numpy.float32))
    drop = nn.Dropout(0.25)
    out = drop(x).data
    kept = out != 0
    assert 0.7 < kept.mean() < 0.8
    numpy.testing.assert_allclose(out[kept], 1 / 0.75)
    assert drop.eval()(x) is x


def test_dropout2d_drops_whole_channels():
    x = Tensor(numpy.ones((4, 16, 5, 5), dtype=numpy.float32))
    out = nn.Dropout2d(0.5)(x).data
    per_channel = out.reshape(4, 16, -1)
    assert (per_channel == per_channel[..., :1]).all()  # each channel all kept or all dropped
    assert set(numpy.unique(out)) <= {0.0, 2.0} and 0 < (out == 0).mean() < 1


def test_manual_seed_makes_init_and_dropout_repeatable():
    def run():
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5))
        return net.state_dict()["0.weight"], net(_input()).data

    init.manual_seed(123)
    w1, y1 = run()
    init.manual_seed(123)
    w2, y2 = run()
    numpy.testing.assert_array_equal(w1, w2)
    numpy.testing.assert_array_equal(y1, y2)
    init.manual_seed(124)
    assert not numpy.array_equal(run()[0], w1)


def test_rng_state_round_trip_resumes_the_stream():
    import json

    init.manual_seed(5)
    init.generator().random(10)
    state = init.get_rng_state()
    assert json.loads(json.dumps(state)) == state  # fits in a checkpoint's JSON
    drop = nn.Dropout(0.5)
    x = Tensor(numpy.ones((64,), dtype=numpy.float32))
    first = drop(x).data
    init.set_rng_state(state)
    numpy.testing.assert_array_equal(drop(x).data, first)
    with pytest.raises(ValueError, match="get_rng_state"):
        init.set_rng_state({"bit_generator": "MT19937"})
    with pytest.raises(ValueError, match="seed"):
        init.manual_seed(-1)


# ---- batch norm -----------------------------------------------------------------------

def test_batchnorm_buffers_are_state_and_follow_the_batch_in_training():
    bn = nn.BatchNorm2d(3, momentum=0.5)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    x = _input((4, 3, 5, 5)) * 2.0 + 1.0
    y = bn(x).data
    mean = x.data.mean(axis=(0, 2, 3))
    numpy.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    numpy.testing.assert_allclose(bn.running_mean, 0.5 * mean, rtol=1e-5)
    bn.eval()
    running_mean, running_var = bn.running_mean.copy(), bn.running_var.copy()
    expected = (x.data - running_mean[:, None, None]) / numpy.sqrt(running_var[:, None, None] + bn.eps)
    numpy.testing.assert_allclose(bn(x).data, expected, rtol=1e-4, atol=1e-5)
    numpy.testing.assert_array_equal(bn.running_mean, running_mean)  # eval leaves them alone


# ---- initialisers ------------------------------------------------------------------------

def test_kaiming_initialisers_have_the_he_variance():
    init.manual_seed(0)
    w = nn.Parameter(numpy.empty((256, 64, 3, 3), dtype=numpy.float32))
    std = math.sqrt(2.0 / (64 * 9))
    assert init.fan_in(w) == 576
    init.kaiming_normal_(w)
    assert w.dtype == numpy.float32 and abs(w.data.std() / std - 1) < 0.02
    init.kaiming_uniform_(w)
    assert abs(w.data.std() / std - 1) < 0.02 and abs(w.data).max() <= std * math.sqrt(3) + 1e-7
    init.constant_(w, 0.5)
    assert (w.data == 0.5).all()
    init.zeros_(w)
    assert not w.data.any()
    with pytest.raises(ValueError, match="at least 2 dims"):
        init.kaiming_normal_(nn.Parameter(numpy.ones(3)))


def test_bilinear_filter_is_the_fcn_reference_tent():
    numpy.testing.assert_allclose(init.bilinear_filter(4)[0], [0.0625, 0.1875, 0.1875, 0.0625])
    numpy.testing.assert_allclose(init.bilinear_filter(4)[1], [0.1875, 0.5625, 0.5625, 0.1875])
    numpy.testing.assert_allclose(init.bilinear_filter(3), numpy.outer([0.5, 1, 0.5], [0.5, 1, 0.5]))
    f = init.bilinear_filter(16)  # factor 8: taps (1 - |x - 7.5| / 8)
    numpy.testing.assert_allclose(f[0, :2] / f[0, 0], [1, 3])
    weight = init.bilinear_kernel(4, 3)
    assert weight.shape == (3, 3, 4, 4) and weight.dtype == numpy.float32
    numpy.testing.assert_array_equal(weight[1, 1], init.bilinear_filter(4).astype(numpy.float32))
    assert not weight[0, 1].any() and not weight[2, 0].any()
    with pytest.raises(ValueError, match="\\(C, C, k, k\\)"):
        init.bilinear_(nn.ConvTranspose2d(3, 4, 4).weight)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bilinear_conv_transpose_upsamples_like_bilinear_interpolation(factor):
    """ConvTranspose2d(k=2f, stride=f, padding=f/2) with the bilinear kernel is bilinear
    upsampling by f (align_corners=False): exact on a linear ramp away from the borders."""
    up = nn.ConvTranspose2d(2, 2, 2 * factor, stride=factor, padding=factor // 2, bias=False,
                            dtype=numpy.float64)
    init.bilinear_(up.weight)
    H, W = 6, 7
    rows, cols = numpy.meshgrid(numpy.arange(H), numpy.arange(W), indexing="ij")
    x = numpy.stack([2.0 * rows + 0.5 * cols, 3.0 - cols])[None]      # (1, 2, H, W) smooth ramps
    y = up(Tensor(x)).data
    assert y.shape == (1, 2, H * factor, W * factor)
    # Output pixel o samples the input at (o + 0.5)/f - 0.5; interior = at least f from the border.
    inner = slice(factor, -factor)
    src_r, src_c = numpy.meshgrid((numpy.arange(H * factor) + 0.5) / factor - 0.5,
                                  (numpy.arange(W * factor) + 0.5) / factor - 0.5, indexing="ij")
    ramp = numpy.stack([2.0 * src_r + 0.5 * src_c, 3.0 - src_c])[None]
    numpy.testing.assert_allclose(y[..., inner, inner], ramp[..., inner, inner], atol=1e-12)
    # And on a smooth non-linear image it equals F.interpolate in the interior.
    smooth = numpy.sin(x / 3.0)
    expected = interpolate(Tensor(smooth), scale_factor=factor, mode="bilinear", align_corners=False)
    numpy.testing.assert_allclose(up(Tensor(smooth)).data[..., inner, inner],
                                  expected.data[..., inner, inner], atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_init_keeps_device_and_dtype(device):
    w = nn.Parameter(numpy.zeros((4, 4, 2, 2), dtype=numpy.float64))
    w.data = backend.to_device(w.data, device)
    init.bilinear_(w)
    init.kaiming_uniform_(w)
    assert w.device == device and w.dtype == numpy.float64
