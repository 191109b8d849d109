"""Coordinate maps and crop offsets (minifcn.models.geometry).

The offsets are derived from the layers, never typed in; these tests check
that the derivation gives the reference values, that every configuration
(width, fc6 kernel, ResNet) stays aligned for every input size, and, through
real forward passes, that an impulse in the image comes out where it went in.
"""

from fractions import Fraction
import itertools

import numpy as np
import pytest

import minifcn as mf
from minifcn import models
from minifcn.functional.conv import conv2d, conv_transpose2d
from minifcn.functional.pooling import max_pool2d
from minifcn.models.geometry import (IDENTITY, CoordMap, TransposedWindow, Window, crop_offset,
                                     fuse_offsets, path_map, path_size, spec)

NARROW = dict(width=1 / 16)
VGG_CONFIGS = [dict(fc6_kernel=k) for k in (7, 5, 3, 1)] + [
    dict(fc6_kernel=3, conv1_padding=1, fc6_padding=1)]  # "same" padding: examples/train_fcn8s.py
RESNET_DEPTHS = ["resnet18", "resnet50"]


def _row(values):
    """A (1, 1, 1, W) float64 tensor holding ``values``."""
    return mf.Tensor(np.asarray(values, dtype=np.float64).reshape(1, 1, 1, -1))


# ---- single layers, against the real ops ----------------------------------------------

@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (7, 2, 3, 1), (2, 2, 0, 1), (1, 2, 0, 1), (3, 1, 100, 1),
    (5, 3, 0, 1), (3, 1, 2, 2), (4, 2, 1, 1)],
    ids=lambda v: str(v))
def test_conv_map_is_the_centre_of_each_window(kernel, stride, padding, dilation):
    # Averaging the ramp x[i] = i over each window gives the window's centre.
    n = 40
    weight = np.full((1, 1, 1, kernel), 1.0 / kernel)
    out = conv2d(_row(np.arange(n)), mf.Tensor(weight), stride=(1, stride), padding=(0, padding),
                 dilation=(1, dilation)).numpy().ravel()
    window = Window(kernel, stride, padding, dilation)
    assert window.output_size(n) == out.size
    for o, centre in enumerate(out):
        first, last = stride * o - padding, stride * o - padding + dilation * (kernel - 1)
        if first >= 0 and last < n:  # away from the zero padding
            assert window.coord_map()(o) == pytest.approx(centre)


@pytest.mark.parametrize("kernel,stride,padding", [
    (4, 2, 0), (64, 32, 0), (32, 16, 0), (16, 8, 0), (3, 2, 1), (63, 32, 31), (5, 3, 2), (1, 1, 0)],
    ids=lambda v: str(v))
def test_transposed_map_is_the_centre_of_each_footprint(kernel, stride, padding):
    # An impulse at input i spreads a symmetric kernel; its centroid is where i lands.
    n = 5
    weight = mf.Tensor(np.full((1, 1, 1, kernel), 1.0))
    deconv = TransposedWindow(kernel, stride, padding)
    for i in range(n):
        impulse = np.zeros(n)
        impulse[i] = 1.0
        out = conv_transpose2d(_row(impulse), weight, stride=(1, stride), padding=(0, padding)
                               ).numpy().ravel()
        assert out.size == deconv.output_size(n)
        first, last = stride * i - padding, stride * i - padding + kernel - 1
        if first >= 0 and last < out.size:
            centroid = (np.arange(out.size) * out).sum() / out.sum()
            assert deconv.coord_map().inverse()(i) == pytest.approx(centroid)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 199, 200, 375])
@pytest.mark.parametrize("kernel,stride,padding,ceil_mode", [
    (2, 2, 0, True), (2, 2, 0, False), (3, 2, 1, False), (3, 2, 1, True), (3, 3, 1, True), (3, 2, 0, True)],
    ids=lambda v: str(v))
def test_pool_sizes_match_the_op(n, kernel, stride, padding, ceil_mode):
    # In ceil mode a 2x2 pool of a 1-pixel map gives 1 pixel (the window hangs over the edge),
    # as in PyTorch; where the op has no output at all, the size is 0.
    x = mf.Tensor(np.zeros((1, 1, n, 1)))
    expected = Window(kernel, stride, padding, 1, ceil_mode).output_size(n)
    try:
        out = max_pool2d(x, (kernel, 1), stride=(stride, 1), padding=(padding, 0), ceil_mode=ceil_mode)
    except ValueError:
        assert expected == 0
    else:
        assert expected == out.shape[2]


def test_coord_map_algebra():
    a = CoordMap(Fraction(2), Fraction(1, 2))
    b = CoordMap(Fraction(3), Fraction(-1))
    assert a.then(b)(5) == a(b(5))
    assert a.then(a.inverse()) == IDENTITY
    assert path_map([]) == IDENTITY
    assert path_map([Window(2, 2), Window(2, 2)]) == CoordMap(Fraction(4), Fraction(3, 2))


def test_spec_reads_the_layers():
    nn = mf.nn
    assert spec(nn.Conv2d(1, 1, 3, stride=2, padding=1)) == Window(3, 2, 1, 1)
    assert spec(nn.MaxPool2d(2, ceil_mode=True)) == Window(2, 2, 0, 1, True)
    assert spec(nn.ConvTranspose2d(1, 1, 4, stride=2, bias=False)) == TransposedWindow(4, 2, 0)
    assert spec(nn.ReLU()) is None and spec(nn.BatchNorm2d(3)) is None
    with pytest.raises(TypeError, match="Sequential"):
        spec(nn.Sequential())
    with pytest.raises(ValueError, match="square"):
        spec(nn.Conv2d(1, 1, (3, 1)))


def test_crop_and_fuse_offsets():
    target = CoordMap(Fraction(16), Fraction(-23, 2))
    source = CoordMap(Fraction(16), Fraction(-183, 2))
    assert crop_offset(source, target) == 5
    assert fuse_offsets(target, source) == (0, 5)
    assert fuse_offsets(source, target) == (5, 0)
    with pytest.raises(ValueError, match="starts after"):
        crop_offset(target, source)
    with pytest.raises(ValueError, match="whole number"):
        crop_offset(CoordMap(Fraction(1), Fraction(1, 2)), IDENTITY)
    with pytest.raises(ValueError, match="different scales"):
        crop_offset(CoordMap(Fraction(2), Fraction(0)), IDENTITY)


# ---- the reference nets ------------------------------------------------------------------

REFERENCE_OFFSETS = {
    32: {"score": 19},
    16: {"upscore2c": 0, "score_pool4c": 5, "score": 27},
    8: {"upscore2c": 0, "score_pool4c": 5, "upscore_pool4c": 0, "score_pool3c": 9, "score": 31},
}


@pytest.mark.parametrize("stride", [32, 16, 8])
def test_reference_offsets_are_derived(stride):
    """FCN-32s 19; FCN-16s 5 and 27; FCN-8s 5, 9 and 31, as in the voc-fcn prototxts."""
    for width in (1 / 16, 1 / 4):  # channels never move pixels
        model = models.build_fcn(stride, width=width)
        assert model.crop_offsets == REFERENCE_OFFSETS[stride]


def test_reference_maps_match_the_docstring_table():
    model = models.fcn8s(**NARROW)
    maps = model.coord_maps
    assert maps["features8"] == CoordMap(Fraction(8), Fraction(-191, 2))
    assert maps["features16"] == CoordMap(Fraction(16), Fraction(-183, 2))
    assert maps["score_fr"] == CoordMap(Fraction(32), Fraction(25, 2))
    assert maps["upscore2"] == CoordMap(Fraction(16), Fraction(-23, 2))
    assert maps["upscore_pool4"] == CoordMap(Fraction(8), Fraction(-47, 2))
    assert maps["upscore8"] == CoordMap(Fraction(1), Fraction(-31))


def _all_models():
    for stride in (32, 16, 8):
        for config in VGG_CONFIGS:
            yield f"vgg16-{stride}s-{config}", models.build_fcn(stride, **NARROW, **config)
        for depth in RESNET_DEPTHS:
            yield f"{depth}-{stride}s", models.build_fcn(stride, backbone=depth, **NARROW)


def test_every_configuration_maps_output_pixels_onto_image_pixels():
    """After the final crop, output pixel y is image pixel y: scale 1, shift 0
    (so the centre of the output is the centre of the image)."""
    for name, model in _all_models():
        assert model.coord_maps["score"] == IDENTITY, name
        for key, offset in model.crop_offsets.items():
            assert offset >= 0 and isinstance(offset, int), (name, key)


def test_every_configuration_covers_every_input_size():
    for name, model in _all_models():
        uncovered = [n for n in range(1, 1001) if not model.covers(n)]
        assert not uncovered, f"{name} leaves sizes {uncovered[:5]}... uncovered"


def test_reference_crops_keep_the_whole_upsampled_map():
    """The reference crops only the skip map, to the upsampled map's size; the
    general rule (crop both to their overlap) does the same for these nets."""
    model8 = models.fcn8s(**NARROW)
    for n in range(1, 1001):
        sizes = model8.blob_sizes(n)
        assert sizes["fuse_pool4"] == sizes["upscore2"] and sizes["fuse_pool3"] == sizes["upscore_pool4"]


def test_padding_100_is_what_a_1x1_image_needs():
    # p >= 97 makes fc6 (7x7) see a 7x7 stride-32 map for a 1-pixel image; 96 does not.
    assert not models.fcn32s(conv1_padding=96, **NARROW).covers(1)
    for stride in (32, 16, 8):
        for padding in (97, 100):
            model = models.build_fcn(stride, conv1_padding=padding, **NARROW)
            assert all(model.covers(n) for n in range(1, 400))
    assert path_size(models.fcn32s(**NARROW).encoder_paths()[32], 1) == 1


def test_same_padding_spends_the_work_on_image_pixels():
    """conv1_1 and a 3x3 fc6 padded by 1 (examples/train_fcn8s.py): each feature map is the image
    divided by its stride, rounded up, its pixel i centred on image pixel stride * i + (stride - 1) / 2.
    The upsampled coarse map starts a cell before the skip map, so it is the one cropped (by 1),
    and the final crops come out 16, 8 and 4, half the last upsampling factor."""
    for stride, final in ((32, 16), (16, 8), (8, 4)):
        model = models.build_fcn(stride, fc6_kernel=3, conv1_padding=1, fc6_padding=1, **NARROW)
        assert model.crop_offsets["score"] == final
        for key in ("upscore2c", "upscore_pool4c"):
            assert model.crop_offsets.get(key, 1) == 1
        for feature_stride in (8, 16, 32):
            assert model.coord_maps[f"features{feature_stride}"] == CoordMap(
                Fraction(feature_stride), Fraction(feature_stride - 1, 2))
        for n in (1, 17, 96, 113):
            sizes = model.blob_sizes(n)
            assert [sizes[f"features{s}"] for s in (8, 16, 32)] == [-(-n // s) for s in (8, 16, 32)]
    conv1 = models.fcn8s(fc6_kernel=3, conv1_padding=1, fc6_padding=1, **NARROW).conv1_1
    assert conv1(mf.Tensor(np.zeros((1, 3, 40, 24), np.float32))).shape[2:] == (40, 24)


def test_resnet_margin_is_tight():
    # 31 extra stem pixels reach past the image on every side; 30 miss some sizes.
    assert all(models.fcn8s(backbone="resnet18", **NARROW).covers(n) for n in range(1, 600))
    short = models.fcn32s(backbone="resnet18", margin=30, **NARROW)
    assert not all(short.covers(n) for n in range(1, 600))


@pytest.mark.parametrize("depth", RESNET_DEPTHS)
def test_resnet_shortcuts_map_like_the_main_path(depth):
    model = models.fcn8s(backbone=depth, **NARROW)
    for index in range(1, 5):
        for block in getattr(model, f"layer{index}"):
            shortcut = [] if block.downsample is None else [block.downsample[0]]
            assert path_map(block.spatial_layers()) == path_map(shortcut)
            for n in (1, 2, 7, 8, 33):
                assert path_size(block.spatial_layers(), n) == path_size(shortcut, n)


def test_unalignable_configuration_is_refused():
    with pytest.raises(ValueError, match="cannot be aligned"):
        models.fcn32s(fc6_kernel=9, **NARROW)


# ---- impulses through real forward passes ---------------------------------------------------

def _centre_tap_(model):
    """Every convolution copies the mean of its input channels from the tap at
    its centre (so it moves nothing); biases 0; batch norm the identity."""
    for module in model.modules():
        if isinstance(module, mf.nn.Conv2d):
            k = module.kernel_size[0]
            weight = np.zeros(module.weight.shape, dtype=np.float32)
            weight[:, :, k // 2, k // 2] = 1.0 / module.in_channels
            module.weight.data = weight
            if module.bias is not None:
                module.bias.data = np.zeros_like(module.bias.data)
    return model.eval()


def _centroids(scores):
    """Row and column centroid of the (non-negative) class-0 score map."""
    plane = scores[0, 0].astype(np.float64)
    rows, cols = np.indices(plane.shape)
    total = plane.sum()
    assert total > 0
    return (rows * plane).sum() / total, (cols * plane).sum() / total


def _impulse(size, at):
    image = np.zeros((1, 3, size, size), dtype=np.float32)
    image[:, :, at[0], at[1]] = 1.0
    return mf.Tensor(image)


def _only(model, source):
    """Keep one score source (score_fr, score_pool4 or score_pool3) and zero the others."""
    for name in ("score_fr", "score_pool4", "score_pool3"):
        if hasattr(model, name) and name != source:
            getattr(model, name).weight.data = np.zeros_like(getattr(model, name).weight.data)
    return model


@pytest.mark.parametrize("stride,source,cell", [
    (32, "score_fr", 32), (16, "score_fr", 32), (8, "score_fr", 32),
    (16, "score_pool4", 16), (8, "score_pool4", 16), (8, "score_pool3", 8)])
def test_vgg_impulse_lands_on_its_pooling_cell(stride, source, cell):
    """With centre-tap convolutions, the impulse survives the max pools in the
    cell that contains it (conv1_1 row p + 99, cells of ``cell`` rows counted
    from 0), and the symmetric bilinear upsampling centres the response on the
    middle of that cell: any error in a crop offset would shift it."""
    model = _only(_centre_tap_(models.build_fcn(stride, **NARROW)), source)
    for at in [(70, 105), (100, 64)]:  # cells centred at 76.5 and 108.5 on each axis
        scores = model(_impulse(176, at)).numpy()
        expected = [cell * ((p + 99) // cell) - 99 + (cell - 1) / 2 for p in at]
        assert _centroids(scores) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("depth", RESNET_DEPTHS)
@pytest.mark.parametrize("stride", [32, 16, 8])
def test_resnet_impulse_on_the_coarse_grid_comes_back_in_place(depth, stride):
    """ResNet's stride-s maps sample the (margin-padded) image every s pixels;
    an impulse on the stride-32 grid reaches every stage and the odd bilinear
    kernels put the response exactly back on it."""
    model = _centre_tap_(models.build_fcn(stride, backbone=depth, **NARROW))
    margin = model.config["margin"]
    for at in [(65, 33), (33, 65)]:  # the response spans +-31 pixels: kept inside
        assert all((p + margin) % 32 == 0 for p in at)
        scores = model(_impulse(128, at)).numpy()
        assert _centroids(scores) == pytest.approx(at, abs=1e-6)
        assert np.unravel_index(scores[0, 0].argmax(), scores.shape[2:]) == at


def test_shift_of_one_pixel_would_be_seen():
    # The impulse test is sharp: the centroid moves with the impulse's cell.
    model = _only(_centre_tap_(models.fcn32s(**NARROW)), "score_fr")
    first = _centroids(model(_impulse(144, (60, 60))).numpy())
    second = _centroids(model(_impulse(144, (60 + 32, 60))).numpy())
    assert second[0] - first[0] == pytest.approx(32)
    assert second[1] == pytest.approx(first[1])


@pytest.mark.parametrize("size", [1, 2, 5, 31, 32, 33, 64, 100])
def test_blob_sizes_match_a_forward_pass(size):
    for model in (models.fcn8s(fc6_kernel=3, **NARROW), models.fcn16s(backbone="resnet18", **NARROW)):
        blobs = {}
        model.eval()
        features = model.encode(mf.Tensor(np.zeros((1, 3, size, size), dtype=np.float32)))
        model.decode(features, (size, size), blobs)
        predicted = model.blob_sizes(size)
        for name, n in predicted.items():
            if name in blobs:
                assert blobs[name].shape[2] == n, name
        for stride, tensor in features.items():
            assert tensor.shape[2] == predicted[f"features{stride}"]


def test_all_sizes_in_one_batch_of_combinations():
    # Rectangles mix two axis lengths; both axes are aligned independently.
    model = models.fcn8s(**NARROW).eval()
    for h, w in itertools.product((1, 17), (2, 40)):
        assert model(mf.Tensor(np.zeros((1, 3, h, w), dtype=np.float32))).shape == (1, 21, h, w)
