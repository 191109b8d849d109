"""Loading ImageNet VGG16 weights (torchvision, timm and Caffe key layouts)
from .safetensors and .npz files into the FCN encoder.

The files built here carry the exact key names of the real downloads; the
arrays are those of a width-1/16 VGG16 so they stay small. The full-size
shapes are checked with zero-stride (memory-free) arrays.
"""

import numpy as np
import pytest
from safetensors.numpy import save_file

import minifcn as mf
from minifcn import models
from minifcn.models.pretrained import convert_vgg16, detect_layout, features_indices, key_map
from minifcn.models.vgg import vgg16_layers

NARROW = dict(width=1 / 16)
TORCHVISION_FEATURES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def _conv_shapes(width=1, fc6_kernel=7):
    """{layer: (weight shape, bias shape)} of conv1_1 ... fc7."""
    return {name: ((cout, cin, k, k), (cout,)) for name, cin, cout, k, _ in vgg16_layers(width, fc6_kernel)}


def _fake_imagenet(layout, width=1 / 16, seed=0, make=None):
    """A dict with the exact keys of ``layout``'s VGG16 file (random values)."""
    rng = np.random.default_rng(seed)
    make = make or (lambda shape: rng.standard_normal(shape).astype(np.float32))
    shapes = _conv_shapes(width)
    arrays = {}
    for name, index in zip([n for n in shapes if n.startswith("conv")], TORCHVISION_FEATURES):
        prefix = f"features.{index}" if layout != "caffe" else name
        arrays[f"{prefix}.weight"], arrays[f"{prefix}.bias"] = make(shapes[name][0]), make(shapes[name][1])
    (fc6, fc6_bias), (fc7, fc7_bias) = shapes["fc6"], shapes["fc7"]
    flat6, flat7 = (fc6[0], int(np.prod(fc6[1:]))), (fc7[0], fc7[1])
    if layout == "torchvision":
        names, weights, head = ("classifier.0", "classifier.3"), (flat6, flat7), "classifier.6"
    elif layout == "timm":
        names, weights, head = ("pre_logits.fc1", "pre_logits.fc2"), (fc6, fc7), "head.fc"
    else:  # a converted caffemodel: fully connected shapes, Caffe names
        names, weights, head = ("fc6", "fc7"), (flat6, flat7), "fc8"
    for name, shape, bias in zip(names, weights, (fc6_bias, fc7_bias)):
        arrays[f"{name}.weight"], arrays[f"{name}.bias"] = make(shape), make(bias)
    arrays[f"{head}.weight"], arrays[f"{head}.bias"] = make((1000, fc7[0])), make((1000,))
    return arrays


def _save(arrays, path):
    if str(path).endswith(".npz"):
        np.savez(path, **arrays)
    else:
        save_file(arrays, str(path))
    return path


def test_torchvision_feature_indices_are_derived():
    assert list(features_indices().values()) == TORCHVISION_FEATURES


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("layout", ["torchvision", "timm", "caffe"])
def test_values_land_in_the_right_layers(tmp_path, layout, suffix):
    arrays = _fake_imagenet(layout)
    path = _save(arrays, tmp_path / f"vgg16{suffix}")
    model = models.fcn8s(**NARROW)
    head_before = {name: value for name, value in model.state_dict().items()
                   if name.startswith(("score", "upscore"))}
    assert models.load_vgg16_weights(model, path) is model
    sources = {v: k for k, v in key_map(layout).items()}
    state = model.state_dict()
    for name in [n for n in state if n.startswith(("conv", "fc"))]:
        np.testing.assert_array_equal(state[name], arrays[sources[name]].reshape(state[name].shape),
                                      err_msg=name)
    for name, value in head_before.items():  # score and upsampling layers untouched
        np.testing.assert_array_equal(state[name], value)
    assert model.preprocessing == ("caffe" if layout == "caffe" else "torchvision")
    assert model.pretrained_source == path


def test_fully_connected_becomes_the_same_convolution():
    """fc6 as a 7x7 convolution on a 7x7 pool5 map computes W @ flatten(pool5) + b."""
    arrays = _fake_imagenet("torchvision")
    model = models.load_vgg16_weights(models.fcn32s(**NARROW), arrays)
    pool5 = np.random.default_rng(3).standard_normal((1, 32, 7, 7)).astype(np.float32)
    as_conv = model.fc6(mf.Tensor(pool5)).numpy().reshape(-1)
    as_fc = arrays["classifier.0.weight"] @ pool5.reshape(-1) + arrays["classifier.0.bias"]
    np.testing.assert_allclose(as_conv, as_fc, rtol=1e-4, atol=1e-4)
    hidden = np.random.default_rng(4).standard_normal((1, 256, 1, 1)).astype(np.float32)
    np.testing.assert_allclose(model.fc7(mf.Tensor(hidden)).numpy().reshape(-1),
                               arrays["classifier.3.weight"] @ hidden.reshape(-1) + arrays["classifier.3.bias"],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["torchvision", "timm", "caffe"])
def test_full_size_files_map_onto_the_full_model(layout):
    """The real files' shapes, e.g. classifier.0.weight (4096, 25088), map onto
    the reference model's fc6 (4096, 512, 7, 7). Zero-stride arrays: no memory."""
    arrays = _fake_imagenet(layout, width=1, make=lambda shape: np.broadcast_to(np.float32(0), shape))
    if layout == "torchvision":
        assert arrays["classifier.0.weight"].shape == (4096, 25088)
        assert arrays["classifier.3.weight"].shape == (4096, 4096)
        assert arrays["classifier.6.weight"].shape == (1000, 4096)
    if layout == "timm":
        assert arrays["pre_logits.fc1.weight"].shape == (4096, 512, 7, 7)
        assert arrays["pre_logits.fc2.weight"].shape == (4096, 4096, 1, 1)
    targets = {}
    for name, (weight, bias) in _conv_shapes(width=1).items():
        targets[f"{name}.weight"], targets[f"{name}.bias"] = weight, bias
    converted = convert_vgg16(arrays, layout, targets)
    assert {name: array.shape for name, array in converted.items()} == targets
    assert converted["fc6.weight"].shape == (4096, 512, 7, 7)
    assert converted["fc7.weight"].shape == (4096, 4096, 1, 1)
    assert detect_layout(arrays) == layout


def test_key_map_has_exactly_the_encoder_keys():
    torchvision = key_map("torchvision")
    assert len(torchvision) == 30
    assert torchvision["features.0.weight"] == "conv1_1.weight"
    assert torchvision["features.28.bias"] == "conv5_3.bias"
    assert torchvision["classifier.0.weight"] == "fc6.weight"
    assert torchvision["classifier.3.bias"] == "fc7.bias"
    assert key_map("timm")["pre_logits.fc1.weight"] == "fc6.weight"
    assert key_map("timm")["pre_logits.fc2.bias"] == "fc7.bias"
    assert len(key_map("caffe", include_fc=False)) == 26


def test_include_fc_false_loads_only_the_convolutions(tmp_path):
    arrays = _fake_imagenet("timm")
    model = models.fcn32s(fc6_kernel=3, **NARROW)
    fc6_before = model.fc6.weight.numpy()
    with pytest.raises(ValueError, match="include_fc=False"):
        models.load_vgg16_weights(model, arrays)
    models.load_vgg16_weights(model, arrays, include_fc=False)
    np.testing.assert_array_equal(model.fc6.weight.numpy(), fc6_before)
    np.testing.assert_array_equal(model.conv5_3.weight.numpy(), arrays["features.28.weight"])


def test_a_misfit_changes_nothing_and_names_every_problem():
    arrays = _fake_imagenet("torchvision")
    del arrays["features.0.bias"]
    arrays["features.5.weight"] = arrays["features.5.weight"][:1]
    arrays["stray.weight"] = np.zeros(1, dtype=np.float32)
    model = models.fcn32s(**NARROW)
    before = model.state_dict()
    with pytest.raises(ValueError) as error:
        models.load_vgg16_weights(model, arrays)
    message = str(error.value)
    assert "features.0.bias" in message and "features.5.weight" in message and "stray.weight" in message
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    assert model.preprocessing is None


def test_full_width_file_into_a_narrow_model_is_refused():
    arrays = _fake_imagenet("timm", width=1 / 8)
    with pytest.raises(ValueError, match="mis-shaped"):
        models.load_vgg16_weights(models.fcn32s(**NARROW), arrays)


def test_files_that_could_run_code_are_refused(tmp_path):
    pth = tmp_path / "vgg16-397923af.pth"
    pth.write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="docs/pretrained.md"):
        models.load_vgg16_weights(models.fcn32s(**NARROW), pth)
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, **{"features.0.weight": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        models.load_vgg16_weights(models.fcn32s(**NARROW), pickled)
    with pytest.raises(FileNotFoundError):
        models.load_vgg16_weights(models.fcn32s(**NARROW), tmp_path / "missing.npz")


def test_layout_and_preprocessing_choices():
    arrays = _fake_imagenet("torchvision")
    model = models.load_vgg16_weights(models.fcn32s(**NARROW), arrays, preprocessing="caffe")
    assert model.preprocessing == "caffe"  # e.g. Caffe weights converted to the torchvision layout
    with pytest.raises(ValueError, match="preprocessing"):
        models.load_vgg16_weights(models.fcn32s(**NARROW), arrays, preprocessing="bgr")
    with pytest.raises(ValueError, match="layout"):
        models.load_vgg16_weights(models.fcn32s(**NARROW), {"weights": np.zeros(1)})
    with pytest.raises(ValueError, match="VGG16"):
        models.load_vgg16_weights(models.fcn32s(backbone="resnet18", **NARROW), arrays)
    assert set(models.PREPROCESSING) == {"torchvision", "caffe"}
    # the recorded name is a mode the data pipeline understands
    from minifcn.data.transforms import Normalize
    for name in models.PREPROCESSING:
        Normalize(name)


def test_weights_survive_staged_training_and_dtype():
    arrays = _fake_imagenet("timm")
    model32 = models.load_vgg16_weights(models.fcn32s(**NARROW).to(dtype=np.float64), arrays)
    assert model32.conv1_1.weight.dtype == np.float64
    model16 = models.fcn16s_from_fcn32s(model32)
    np.testing.assert_allclose(model16.fc6.weight.numpy(), arrays["pre_logits.fc1.weight"])
    assert model16.preprocessing == "torchvision"
