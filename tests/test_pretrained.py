"""Loading ImageNet VGG16 weights (torchvision, timm and Caffe key layouts)
from .safetensors and .npz files into the FCN encoder.

The files built here carry the exact key names of the real downloads, from a
table written out below (not read from minifcn); the arrays are those of a
width-1/16 VGG16 so they stay small. The full-size shapes are checked with
zero-stride (memory-free) arrays. Only VGG16 has a loader: the ResNet
backbones start from scratch.
"""

import numpy as np
import pytest
from safetensors.numpy import save_file

import minifcn as mf
from minifcn import models
from minifcn.models.pretrained import convert_vgg16, detect_layout, features_indices, key_map
from minifcn.models.vgg import vgg16_layers

NARROW = dict(width=1 / 16)
WEIGHT_AND_BIAS = ("weight", "bias")

# The real files' layer names and full-size weight shapes, written out here rather than read from
# minifcn. torchvision's `features` Sequential numbers every ReLU and pool too, hence the gaps.
VGG16_TORCHVISION = {  # key in vgg16-397923af.pth: (our layer, weight shape in the file)
    "features.0": ("conv1_1", (64, 3, 3, 3)),
    "features.2": ("conv1_2", (64, 64, 3, 3)),
    "features.5": ("conv2_1", (128, 64, 3, 3)),
    "features.7": ("conv2_2", (128, 128, 3, 3)),
    "features.10": ("conv3_1", (256, 128, 3, 3)),
    "features.12": ("conv3_2", (256, 256, 3, 3)),
    "features.14": ("conv3_3", (256, 256, 3, 3)),
    "features.17": ("conv4_1", (512, 256, 3, 3)),
    "features.19": ("conv4_2", (512, 512, 3, 3)),
    "features.21": ("conv4_3", (512, 512, 3, 3)),
    "features.24": ("conv5_1", (512, 512, 3, 3)),
    "features.26": ("conv5_2", (512, 512, 3, 3)),
    "features.28": ("conv5_3", (512, 512, 3, 3)),
    "classifier.0": ("fc6", (4096, 25088)),  # fully connected, on pool5 flattened: 512 * 7 * 7
    "classifier.3": ("fc7", (4096, 4096)),
}
VGG16_TIMM = {  # timm/vgg16.tv_in1k: torchvision's features, and a classifier of convolutions
    **{key: value for key, value in VGG16_TORCHVISION.items() if key.startswith("features.")},
    "pre_logits.fc1": ("fc6", (4096, 512, 7, 7)),
    "pre_logits.fc2": ("fc7", (4096, 4096, 1, 1)),
}
VGG16_CAFFE = {layer: (layer, shape) for layer, shape in VGG16_TORCHVISION.values()}  # Caffe's own names
TABLES = {"torchvision": VGG16_TORCHVISION, "timm": VGG16_TIMM, "caffe": VGG16_CAFFE}
IMAGENET_CLASSIFIER = {"torchvision": "classifier.6", "timm": "head.fc", "caffe": "fc8"}  # in the files, unused
# The paper's model: fc6 and fc7 as convolutions
FULL_SIZE_FC = {"fc6": (4096, 512, 7, 7), "fc7": (4096, 4096, 1, 1)}


def _narrow(shape, width):
    """A full-size weight shape at ``width``: channel counts scale, kernel sizes (1, 3, 7) and
    RGB's 3 input channels do not (25088 = 512 * 49 scales with its 512)."""
    return tuple(d if d in (1, 3, 7) else round(d * width) for d in shape)


def _conv_shapes(width=1, fc6_kernel=7):
    """{layer: (weight shape, bias shape)} of conv1_1 ... fc7, as the model builds them."""
    return {name: ((cout, cin, k, k), (cout,)) for name, cin, cout, k, _ in vgg16_layers(width, fc6_kernel)}


def _fake_imagenet(layout, width=1 / 16, seed=0, make=None):
    """A dict with the exact keys of ``layout``'s VGG16 file (random values: no two layers alike)."""
    rng = np.random.default_rng(seed)
    make = make or (lambda shape: rng.standard_normal(shape).astype(np.float32))
    arrays = {}
    for key, (_, shape) in TABLES[layout].items():
        shape = _narrow(shape, width)
        arrays[f"{key}.weight"], arrays[f"{key}.bias"] = make(shape), make(shape[:1])
    head = IMAGENET_CLASSIFIER[layout]
    arrays[f"{head}.weight"], arrays[f"{head}.bias"] = make((1000, round(4096 * width))), make((1000,))
    return arrays


def _save(arrays, path):
    if str(path).endswith(".npz"):
        np.savez(path, **arrays)
    else:
        save_file(arrays, str(path))
    return path


def test_torchvision_feature_indices_are_derived():
    assert features_indices() == {layer: int(key.split(".")[1]) for key, (layer, _) in VGG16_TORCHVISION.items()
                                  if key.startswith("features.")}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("layout", ["torchvision", "timm", "caffe"])
def test_values_land_in_the_right_layers(tmp_path, layout, suffix):
    arrays = _fake_imagenet(layout)
    path = _save(arrays, tmp_path / f"vgg16{suffix}")
    model = models.fcn8s(**NARROW)
    head_before = {name: value for name, value in model.state_dict().items()
                   if name.startswith(("score", "upscore"))}
    assert models.load_vgg16_weights(model, path) is model
    state, loaded = model.state_dict(), set()
    for key, (layer, _) in TABLES[layout].items():  # fc6 and fc7 in C order: torchvision's flattening
        for kind in WEIGHT_AND_BIAS:
            ours = state[f"{layer}.{kind}"]
            np.testing.assert_array_equal(ours, arrays[f"{key}.{kind}"].reshape(ours.shape),
                                          err_msg=f"{key}.{kind} -> {layer}.{kind}")
            loaded.add(f"{layer}.{kind}")
    assert loaded == {name for name in state if name.startswith(("conv", "fc"))}
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
    """The real files' shapes, e.g. classifier.0.weight (4096, 25088), map onto the paper's
    model, whose fc6 is (4096, 512, 7, 7). Zero-stride arrays: no memory."""
    arrays = _fake_imagenet(layout, width=1, make=lambda shape: np.broadcast_to(np.float32(0), shape))
    expected = {}  # the paper's model: the convolutions as in the files, fc6 and fc7 as convolutions
    for layer, shape in VGG16_TORCHVISION.values():
        shape = FULL_SIZE_FC.get(layer, shape)
        expected[f"{layer}.weight"], expected[f"{layer}.bias"] = shape, shape[:1]
    targets = {}
    for name, (weight, bias) in _conv_shapes(width=1).items():
        targets[f"{name}.weight"], targets[f"{name}.bias"] = weight, bias
    assert targets == expected
    converted = convert_vgg16(arrays, layout, targets)
    assert {name: array.shape for name, array in converted.items()} == expected
    assert detect_layout(arrays) == layout


@pytest.mark.parametrize("layout", ["torchvision", "timm", "caffe"])
def test_key_map_is_the_table_of_the_real_files(layout):
    expected = {f"{key}.{kind}": f"{layer}.{kind}" for key, (layer, _) in TABLES[layout].items()
                for kind in WEIGHT_AND_BIAS}
    assert len(expected) == 30 and key_map(layout) == expected
    convolutions = {key: name for key, name in expected.items() if name.startswith("conv")}
    assert len(convolutions) == 26 and key_map(layout, include_fc=False) == convolutions


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


# ---- ResNet: the layer names of torchvision's and timm's files ------------------------------
# No loader reads ResNet weights yet; the encoders are named as those files name them, so one
# would be a renaming-free load. Each convolution is followed by its BatchNorm, named after it.
RESNET18_CONVOLUTIONS = {  # torchvision resnet18 / timm resnet18: weight shapes
    "conv1": (64, 3, 7, 7),
    "layer1.0.conv1": (64, 64, 3, 3), "layer1.0.conv2": (64, 64, 3, 3),
    "layer1.1.conv1": (64, 64, 3, 3), "layer1.1.conv2": (64, 64, 3, 3),
    "layer2.0.conv1": (128, 64, 3, 3), "layer2.0.conv2": (128, 128, 3, 3), "layer2.0.downsample.0": (128, 64, 1, 1),
    "layer2.1.conv1": (128, 128, 3, 3), "layer2.1.conv2": (128, 128, 3, 3),
    "layer3.0.conv1": (256, 128, 3, 3), "layer3.0.conv2": (256, 256, 3, 3), "layer3.0.downsample.0": (256, 128, 1, 1),
    "layer3.1.conv1": (256, 256, 3, 3), "layer3.1.conv2": (256, 256, 3, 3),
    "layer4.0.conv1": (512, 256, 3, 3), "layer4.0.conv2": (512, 512, 3, 3), "layer4.0.downsample.0": (512, 256, 1, 1),
    "layer4.1.conv1": (512, 512, 3, 3), "layer4.1.conv2": (512, 512, 3, 3),
}
RESNET50_LAYERS = {  # torchvision resnet50 / timm resnet50: (blocks, first block's convolutions, a later block's)
    "layer1": (3, {"conv1": (64, 64, 1, 1), "conv2": (64, 64, 3, 3), "conv3": (256, 64, 1, 1),
                   "downsample.0": (256, 64, 1, 1)},
               {"conv1": (64, 256, 1, 1), "conv2": (64, 64, 3, 3), "conv3": (256, 64, 1, 1)}),
    "layer2": (4, {"conv1": (128, 256, 1, 1), "conv2": (128, 128, 3, 3), "conv3": (512, 128, 1, 1),
                   "downsample.0": (512, 256, 1, 1)},
               {"conv1": (128, 512, 1, 1), "conv2": (128, 128, 3, 3), "conv3": (512, 128, 1, 1)}),
    "layer3": (6, {"conv1": (256, 512, 1, 1), "conv2": (256, 256, 3, 3), "conv3": (1024, 256, 1, 1),
                   "downsample.0": (1024, 512, 1, 1)},
               {"conv1": (256, 1024, 1, 1), "conv2": (256, 256, 3, 3), "conv3": (1024, 256, 1, 1)}),
    "layer4": (3, {"conv1": (512, 1024, 1, 1), "conv2": (512, 512, 3, 3), "conv3": (2048, 512, 1, 1),
                   "downsample.0": (2048, 1024, 1, 1)},
               {"conv1": (512, 2048, 1, 1), "conv2": (512, 512, 3, 3), "conv3": (2048, 512, 1, 1)}),
}
RESNET50_CONVOLUTIONS = {"conv1": (64, 3, 7, 7), **{
    f"{layer}.{block}.{conv}": shape for layer, (blocks, first, later) in RESNET50_LAYERS.items()
    for block in range(blocks) for conv, shape in (first if block == 0 else later).items()}}


def _resnet_file_keys(convolutions, width):
    """{key: shape} of the file's encoder at ``width`` (its classifier ``fc`` and BatchNorm's
    ``num_batches_tracked`` counters left out: FCN has its own classifier, and no counter)."""
    keys = {}
    for conv, shape in convolutions.items():
        shape = _narrow(shape, width)
        keys[f"{conv}.weight"] = shape
        norm = "bn1" if conv == "conv1" else conv.replace(".conv", ".bn").replace("downsample.0", "downsample.1")
        for kind in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{norm}.{kind}"] = shape[:1]
    return keys


@pytest.mark.parametrize("depth, convolutions", [("resnet18", RESNET18_CONVOLUTIONS),
                                                 ("resnet50", RESNET50_CONVOLUTIONS)])
def test_resnet_encoders_carry_the_names_and_shapes_of_torchvision_and_timm(depth, convolutions):
    assert len(convolutions) == {"resnet18": 20, "resnet50": 53}[depth]
    model = models.fcn8s(backbone=depth, **NARROW)
    encoder = {name: tuple(value.shape) for name, value in model.state_dict().items()
               if not name.startswith(("score", "upscore"))}
    assert encoder == _resnet_file_keys(convolutions, NARROW["width"])
