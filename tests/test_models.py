"""The FCN models: reference structure and names, exact parameter count,
any input size, frozen/learnable upsampling, ResNet backbones, staged training."""

import numpy as np
import pytest

import minifcn as mf
from minifcn import models
from minifcn.functional.conv import conv_transpose2d
from minifcn.functional.loss import softmax_cross_entropy
from minifcn.functional.shape import crop
from minifcn.models.vgg import VGG16_BLOCKS

NARROW = dict(width=1 / 16)
CONV_NAMES = [f"conv{b}_{i}" for b, convs in enumerate(VGG16_BLOCKS, start=1)
              for i in range(1, len(convs) + 1)]
HEAD_NAMES = {
    32: ["score_fr.weight", "score_fr.bias", "upscore.weight"],
    16: ["score_fr.weight", "score_fr.bias", "upscore2.weight", "score_pool4.weight",
         "score_pool4.bias", "upscore16.weight"],
    8: ["score_fr.weight", "score_fr.bias", "upscore2.weight", "score_pool4.weight",
        "score_pool4.bias", "upscore_pool4.weight", "score_pool3.weight", "score_pool3.bias",
        "upscore8.weight"],
}
# (name, kernel, stride) of every upsampling layer, as in the voc-fcn prototxts.
UPSAMPLING = {32: [("upscore", 64, 32)],
              16: [("upscore2", 4, 2), ("upscore16", 32, 16)],
              8: [("upscore2", 4, 2), ("upscore_pool4", 4, 2), ("upscore8", 16, 8)]}
# >= 12 sizes: 1x1, odd, even, non-square, multiples and non-multiples of 32, PASCAL's 500x375.
SIZES = [(1, 1), (1, 7), (2, 3), (5, 5), (17, 9), (31, 33), (32, 32), (63, 65), (97, 101),
         (128, 96), (224, 224), (255, 257), (500, 375)]


def _images(n, h, w, seed=0):
    return mf.Tensor(np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32))


def _randomise_scores(model, seed=1):
    """Give the zero-initialised score layers values, as training would."""
    rng = np.random.default_rng(seed)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        if hasattr(model, name):
            layer = getattr(model, name)
            layer.weight.data = rng.standard_normal(layer.weight.shape).astype(np.float32) * 0.1
            layer.bias.data = rng.standard_normal(layer.bias.shape).astype(np.float32) * 0.1
    return model


@pytest.fixture(scope="module")
def full_fcn8s():
    return models.fcn8s()


# ---- the reference structure ------------------------------------------------------------

@pytest.mark.parametrize("stride", [32, 16, 8])
def test_state_dict_names_are_the_reference_ones(stride):
    model = models.build_fcn(stride, **NARROW)
    expected = [f"{name}.{kind}" for name in CONV_NAMES + ["fc6", "fc7"] for kind in ("weight", "bias")]
    assert list(model.state_dict()) == expected + HEAD_NAMES[stride]
    assert model.num_classes == 21 and model.stride == stride


@pytest.mark.parametrize("stride", [32, 16, 8])
def test_layers_are_the_reference_ones(stride):
    model = models.build_fcn(stride, **NARROW)
    assert model.conv1_1.padding == (100, 100)
    for name in CONV_NAMES[1:]:
        layer = getattr(model, name)
        assert (layer.kernel_size, layer.stride, layer.padding) == ((3, 3), (1, 1), (1, 1))
    for block in range(1, 6):
        pool = getattr(model, f"pool{block}")
        assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == ((2, 2), (2, 2), (0, 0), True)
    assert (model.fc6.kernel_size, model.fc6.padding) == ((7, 7), (0, 0))
    assert (model.fc7.kernel_size, model.fc7.padding) == ((1, 1), (0, 0))
    assert model.drop6.p == 0.5 and model.drop7.p == 0.5
    for name in ("score_fr", "score_pool4", "score_pool3"):
        if hasattr(model, name):
            layer = getattr(model, name)
            assert layer.kernel_size == (1, 1) and layer.out_channels == 21
            assert not layer.weight.data.any() and not layer.bias.data.any()  # zero, as the reference
    for name, kernel, factor in UPSAMPLING[stride]:
        layer = getattr(model, name)
        assert (layer.kernel_size, layer.stride, layer.padding) == ((kernel, kernel), (factor, factor), (0, 0))
        assert layer.bias is None
        np.testing.assert_array_equal(layer.weight.data, mf.nn.init.bilinear_kernel(kernel, 21))
        assert layer.weight.requires_grad is False  # fixed, as lr_mult 0


def test_learnable_upsampling_option():
    model = models.fcn8s(learnable_upsampling=True, **NARROW)
    for name, _, _ in UPSAMPLING[8]:
        assert getattr(model, name).weight.requires_grad is True


def test_full_fcn8s_has_the_reference_parameter_count(full_fcn8s):
    """Count the reference layers one by one (k*k*c_in*c_out + bias) and compare."""
    convs, c_in = [], 3
    for block in VGG16_BLOCKS:
        for c_out in block:
            convs.append((3, c_in, c_out, True))
            c_in = c_out
    convs += [(7, 512, 4096, True), (1, 4096, 4096, True),              # fc6, fc7
              (1, 4096, 21, True), (1, 512, 21, True), (1, 256, 21, True),  # score_fr, _pool4, _pool3
              (4, 21, 21, False), (4, 21, 21, False), (16, 21, 21, False)]  # upscore2, _pool4, 8
    expected = sum(k * k * cin * cout + (cout if bias else 0) for k, cin, cout, bias in convs)
    count = sum(p.size for p in full_fcn8s.parameters())
    assert count == expected == 134_489_759
    assert full_fcn8s.fc6.weight.shape == (4096, 512, 7, 7)
    assert full_fcn8s.fc7.weight.shape == (4096, 4096, 1, 1)
    frozen = sum(p.size for p in full_fcn8s.parameters() if not p.requires_grad)
    assert frozen == 2 * 4 * 4 * 21 * 21 + 16 * 16 * 21 * 21


def test_full_fcn8s_forward(full_fcn8s):
    model = _randomise_scores(full_fcn8s).eval()
    scores = model(_images(1, 20, 27))
    assert scores.shape == (1, 21, 20, 27) and scores.dtype == np.float32
    assert np.isfinite(scores.numpy()).all() and scores.numpy().std() > 0


# ---- any input size ------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_vgg_fcn8s_keeps_any_size(size):
    model = _randomise_scores(models.fcn8s(**NARROW)).eval()
    scores = model(_images(1, *size))
    assert scores.shape == (1, 21, *size)
    assert np.isfinite(scores.numpy()).all()


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (33, 31), (64, 48), (131, 77)], ids=str)
@pytest.mark.parametrize("config", [
    dict(stride=32), dict(stride=16), dict(stride=32, fc6_kernel=3), dict(stride=16, fc6_kernel=1),
    dict(stride=8, fc6_kernel=1), dict(stride=8, fc6_kernel=3, fc_channels=64, width=1 / 8)],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_small_configurations_keep_any_size(config, size):
    config = {"width": 1 / 16, **config}
    model = models.build_fcn(num_classes=5, **config).eval()
    assert model(_images(2, *size)).shape == (2, 5, *size)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stride", [32, 16, 8])
def test_resnet_fcn_keeps_any_size(backbone, stride):
    model = _randomise_scores(models.build_fcn(stride, backbone=backbone, **NARROW))
    for size in [(1, 1), (2, 3), (31, 33), (64, 64), (97, 50)]:
        scores = model(_images(2, *size))  # training mode: batch statistics
        assert scores.shape == (2, 21, *size)
        assert np.isfinite(scores.numpy()).all()


def test_width_and_fc_options():
    model = models.fcn32s(width=1 / 4, fc6_kernel=3, fc_channels=48)
    assert model.conv1_1.out_channels == 16 and model.conv5_3.out_channels == 128
    assert model.fc6.weight.shape == (48, 128, 3, 3) and model.fc7.weight.shape == (48, 48, 1, 1)
    assert models.fcn32s(width=0.5).fc7.out_channels == 2048
    for bad in (dict(width=1 / 3), dict(width=0), dict(width="half"), dict(fc6_kernel=0),
                dict(fc_channels=0), dict(num_classes=0)):
        with pytest.raises(ValueError):
            models.fcn32s(**bad)
    for name, bad in (("conv1_padding", -1), ("fc6_padding", 0.5), ("fc6_padding", True)):
        with pytest.raises(ValueError, match=f"{name} must be a non-negative int, got {bad!r}"):
            models.fcn32s(width=1 / 16, **{name: bad})
    with pytest.raises(ValueError, match="backbone"):
        models.fcn32s(backbone="alexnet")
    with pytest.raises(ValueError, match="stride"):
        models.build_fcn(4)


def test_batch_norm_takes_the_place_of_the_encoders_biases():
    """A bias just before a BatchNorm is subtracted right back out: those convolutions have none."""
    plain = models.fcn8s(width=1 / 16, fc6_kernel=1)
    normed = models.fcn8s(width=1 / 16, fc6_kernel=1, batch_norm=True)
    names = [name for block in normed._blocks for name in block]
    assert len(names) == 13
    for name in names:
        assert getattr(plain, name).bias is not None
        assert getattr(normed, name).bias is None and f"{name}.bias" not in normed.state_dict()
        assert getattr(normed, f"{name}_bn").bias is not None
    assert normed.fc6.bias is not None and normed.fc7.bias is not None  # no BatchNorm after these
    assert normed.score_fr.bias is not None


def test_bad_input_shape_is_named():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        models.fcn32s(**NARROW)(mf.Tensor(np.zeros((3, 8, 8), dtype=np.float32)))


# ---- training behaviour ------------------------------------------------------------------

def test_gradients_skip_frozen_upsampling():
    model = models.fcn8s(**NARROW)
    images, target = _images(2, 24, 20), np.random.default_rng(0).integers(0, 21, (2, 24, 20))
    softmax_cross_entropy(model(images), target).backward()
    assert model.score_fr.weight.grad is not None and np.abs(model.score_fr.weight.grad).sum() > 0
    assert model.score_pool3.bias.grad is not None
    for name, _, _ in UPSAMPLING[8]:
        assert getattr(model, name).weight.grad is None
    learnable = models.fcn8s(learnable_upsampling=True, **NARROW)
    softmax_cross_entropy(learnable(images), target).backward()
    assert learnable.upscore8.weight.grad is not None


def test_dropout_only_in_training():
    model = _randomise_scores(models.fcn32s(**NARROW))
    images = _images(1, 16, 16)
    model.eval()
    np.testing.assert_array_equal(model(images).numpy(), model(images).numpy())
    model.train()
    assert not np.array_equal(model(images).numpy(), model(images).numpy())


def test_float64_model_stays_float64():
    model = models.fcn16s(**NARROW).to(dtype=np.float64).eval()
    images = mf.Tensor(np.zeros((1, 3, 9, 9)))
    assert model(images).dtype == np.float64


# ---- ResNet ---------------------------------------------------------------------------------

def test_resnet_names_follow_torchvision():
    model = models.fcn8s(backbone="resnet18", **NARROW)
    names = list(model.state_dict())
    for name in ("conv1.weight", "bn1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
                 "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var",
                 "layer4.1.bn2.bias", "score_fr.weight", "score_pool4.weight", "score_pool3.weight",
                 "upscore2.weight", "upscore_pool4.weight", "upscore8.weight"):
        assert name in names
    assert "layer1.0.downsample.0.weight" not in names  # identity shortcut
    # skips from layer3 (stride 16) and layer2 (stride 8)
    assert model.score_pool4.in_channels == model.layer3[-1].conv2.out_channels
    assert model.score_pool3.in_channels == model.layer2[-1].conv2.out_channels
    bottleneck = models.fcn8s(backbone="resnet50", **NARROW)
    assert bottleneck.score_fr.in_channels == 2048 // 16
    assert bottleneck.layer1[0].downsample is not None  # 4 -> 16 channels


@pytest.mark.parametrize("backbone,expected", [("resnet18", 11_176_512), ("resnet50", 23_508_032)])
def test_full_resnet_backbones_have_torchvision_counts(backbone, expected):
    """torchvision's resnet18 / resnet50 have 11,689,512 / 25,557,032 parameters,
    of which the 1000-class fc layer holds 513,000 / 2,049,000."""
    model = models.fcn32s(backbone=backbone)
    head = {"score_fr", "upscore"}
    count = sum(p.size for name, p in model.named_parameters() if name.split(".")[0] not in head)
    assert count == expected


def test_resnet_upsampling_is_odd_bilinear():
    model = models.fcn8s(backbone="resnet18", **NARROW)
    assert (model.upscore2.kernel_size, model.upscore2.padding) == ((3, 3), (1, 1))
    assert (model.upscore8.kernel_size, model.upscore8.stride, model.upscore8.padding) == ((15, 15), (8, 8), (7, 7))
    np.testing.assert_array_equal(model.upscore8.weight.data, mf.nn.init.bilinear_kernel(15, 21))
    assert model.crop_offsets["score"] == model.config["margin"] == 31


# ---- staged training ---------------------------------------------------------------------

def _same_named_arrays(coarse, fine):
    fine_state = fine.state_dict()
    for name, value in coarse.state_dict().items():
        if name in fine_state:
            np.testing.assert_array_equal(fine_state[name], value, err_msg=name)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet18"])
def test_fcn16s_from_fcn32s_starts_from_the_coarse_scores(backbone):
    model32 = _randomise_scores(models.fcn32s(backbone=backbone, **NARROW)).eval()
    model16 = models.fcn16s_from_fcn32s(model32)
    assert model16.stride == 16 and not model16.training
    _same_named_arrays(model32, model16)
    assert not model16.score_pool4.weight.data.any() and not model16.score_pool4.bias.data.any()
    assert "upscore.weight" not in model16.state_dict()

    images = _images(2, 45, 38)
    features32, features16 = model32.encode(images), model16.encode(images)
    for stride in (8, 16, 32):
        np.testing.assert_array_equal(features16[stride].numpy(), features32[stride].numpy())
    blobs32, blobs16 = {}, {}
    model32.decode(features32, (45, 38), blobs32)
    out16 = model16.decode(features16, (45, 38), blobs16)
    # 1. The skip adds nothing: FCN-16s outputs FCN-32s's coarse scores, upsampled
    #    by its own 2x then 16x bilinear layers.
    up2 = conv_transpose2d(blobs32["score_fr"], model16.upscore2.weight, stride=2,
                           padding=model16.upscore2.padding)
    o = model16.crop_offsets
    up2 = crop(up2, (o["upscore2c"],) * 2, blobs16["fuse_pool4"].shape[2:])
    up16 = conv_transpose2d(up2, model16.upscore16.weight, stride=16, padding=model16.upscore16.padding)
    np.testing.assert_allclose(out16.numpy(), crop(up16, (o["score"],) * 2, (45, 38)).numpy(),
                               rtol=1e-5, atol=1e-6)
    # 2. Whatever pool4 holds does not matter yet.
    features16[16] = mf.Tensor(np.random.default_rng(7).standard_normal(features16[16].shape)
                               .astype(np.float32))
    np.testing.assert_array_equal(model16.decode(features16, (45, 38)).numpy(), out16.numpy())


@pytest.mark.parametrize("backbone", ["vgg16", "resnet18"])
def test_staged_nets_agree_exactly_on_linear_scores(backbone):
    """The 2x-then-16x (or 8x) bilinear path and the 32x one are different
    kernels, so the outputs are not equal in general; both reproduce linear
    functions, so where the coarse scores are a ramp (and away from the coarse
    map's border) FCN-32s, its FCN-16s and that one's FCN-8s predict the same."""
    model32 = models.fcn32s(backbone=backbone, num_classes=2, **NARROW)
    model16 = models.fcn16s_from_fcn32s(model32)
    model8 = models.fcn8s_from_fcn16s(model16)
    size = (150, 140)
    features = model32.encode(_images(1, *size))
    channels = features[32].shape[1]
    rows, cols = np.indices(features[32].shape[2:], dtype=np.float32)
    ramp = np.zeros(features[32].shape, dtype=np.float32)
    ramp[0, 0], ramp[0, 1] = 3 * rows - 2 * cols + 1, rows + cols
    features[32] = mf.Tensor(ramp)
    for model in (model32, model16, model8):  # score_fr copies channels 0 and 1
        weight = np.zeros((2, channels, 1, 1), dtype=np.float32)
        weight[0, 0] = weight[1, 1] = 1
        model.score_fr.weight.data, model.score_fr.bias.data = weight, np.zeros(2, np.float32)
    outputs = [model.decode(features, size).numpy() for model in (model32, model16, model8)]
    # image position y <-> coarse position (y - shift) / 32; keep one coarse pixel of margin
    coarse = model32.coord_maps["score_fr"]
    n = features[32].shape[2:]
    inside = [[1 <= coarse.inverse()(y) <= n[axis] - 2 for y in range(size[axis])] for axis in (0, 1)]
    region = np.ix_(inside[0], inside[1])
    assert np.sum(inside[0]) >= 64 and np.sum(inside[1]) >= 64
    to_coarse = coarse.inverse()
    y, x = np.indices(size, dtype=np.float64)
    coarse_y, coarse_x = to_coarse(y), to_coarse(x)
    expected = 3 * coarse_y - 2 * coarse_x + 1
    for out in outputs:
        np.testing.assert_allclose(out[0, 0][region], expected[region], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(out[0, 1][region], (coarse_y + coarse_x)[region], rtol=1e-5, atol=1e-4)


def test_fcn8s_from_fcn16s_keeps_the_trained_pool4_fusion():
    model16 = _randomise_scores(models.fcn16s(**NARROW)).eval()
    model8 = models.fcn8s_from_fcn16s(model16)
    _same_named_arrays(model16, model8)
    assert not model8.score_pool3.weight.data.any()
    images = _images(1, 50, 61)
    features = model16.encode(images)
    blobs16, blobs8 = {}, {}
    model16.decode(features, (50, 61), blobs16)
    model8.decode(features, (50, 61), blobs8)
    np.testing.assert_array_equal(blobs8["fuse_pool4"].numpy(), blobs16["fuse_pool4"].numpy())
    o = model8.crop_offsets
    expected = crop(blobs8["upscore_pool4"], (o["upscore_pool4c"],) * 2, blobs8["fuse_pool3"].shape[2:])
    np.testing.assert_array_equal(blobs8["fuse_pool3"].numpy(), expected.numpy())


def test_staged_copy_keeps_flags_dtype_and_mode():
    model32 = models.fcn32s(learnable_upsampling=True, **NARROW).to(dtype=np.float64)
    model32.conv1_1.weight.requires_grad_(False)
    model32.preprocessing = "caffe"
    model16 = models.fcn16s_from_fcn32s(model32)
    assert model16.score_fr.weight.dtype == np.float64 and model16.training
    assert model16.conv1_1.weight.requires_grad is False
    assert model16.upscore2.weight.requires_grad is True
    assert model16.preprocessing == "caffe"
    with pytest.raises(ValueError, match="FCN-32s"):
        models.fcn16s_from_fcn32s(model16)
    with pytest.raises(ValueError, match="FCN-16s"):
        models.fcn8s_from_fcn16s(model32)
    assert models.from_coarser(model32).stride == 16
    assert models.from_coarser(model32, 8).stride == 8
