"""Whole networks pinned: each FCN that minifcn.models builds, compared with the same net
written out again layer by layer in whole_network_reference.py.

The nets: VGG16 FCN-32s/16s/8s as in the paper (conv1_1 padded by 100, fc6 7x7
unpadded, ceil-mode pools, no BatchNorm), the CPU recipe's VGG16 FCNs
(TrainConfig's defaults: 1/8 of the channels, BatchNorm, "same" padding, learned
upsampling) and the ResNet-18 and ResNet-50 FCNs. Every weight is random (the
score layers too, which start at zero and would hide everything below them), in
float64. Three comparisons:

1. scores, the image's gradient and every parameter's gradient against the
   composition run on minifcn.functional ops (autograd gives its gradients);
2. the gradient along a random direction in all parameters at once against the
   central difference of the loss, which needs no autograd at all;
3. scores against the composition run on the loop-level reference ops on a
   smaller net and image (the loops are slow).

A dropped ReLU or residual add, a layer skipped or swapped, a wrong padding,
stride or crop offset, a weight that is not used, or a gradient that does not reach
a weight, changes one of these numbers.
"""

import dataclasses
import functools

import numpy as np
import pytest
from whole_network_reference import (FAST, LOOPS, PAPER_CROPS, SAME_PADDING_CROPS, ResNetLayout, VGG16Layout,
                                     Weights, random_weights)

import minifcn as mf
from minifcn import models
from minifcn.training.config import TrainConfig, build_model

CLASSES = 3
SEED = 0


@dataclasses.dataclass(frozen=True)
class Net:
    build: object                # stride -> the model, built as a user builds it
    layout: object               # the composition of whole_network_reference
    shape: tuple                 # (N, 3, H, W) of the test image
    training: bool               # run in training mode too: the BatchNorm nets (dropout would draw at random)
    learnable_upsampling: bool   # False: the upscore layers are frozen, as the reference's lr_mult 0


def cpu_recipe(stride):
    """The net that TrainConfig's defaults train, as the Trainer builds it."""
    config = dataclasses.replace(TrainConfig(), variant=f"{stride}s")
    recipe = (config.width, config.fc6_kernel, config.fc6_padding, config.conv1_padding, config.batch_norm,
              config.dropout, config.learnable_upsampling, config.backbone)
    assert recipe == (1 / 8, 3, 1, 1, True, 0.0, True, "vgg16"), \
        f"the CPU recipe changed to {recipe}: write its layout in this file again"
    return build_model(config, num_classes=CLASSES)


def resnet(depth):
    return lambda stride: models.build_fcn(stride, CLASSES, backbone=depth, width=1 / 16)


PAPER = VGG16Layout(conv1_padding=100, fc6_padding=0, batch_norm=False, crops=PAPER_CROPS)
NETS = {
    # The paper's layers at 1/16 of its channels; eval mode, as dropout 0.5 draws at random.
    # 36x60 gives a 2x3 fc7 map, so every skip adds maps of several pixels.
    "vgg16-paper": Net(lambda stride: models.build_fcn(stride, CLASSES, width=1 / 16), PAPER,
                       (2, 3, 36, 60), training=False, learnable_upsampling=False),
    "vgg16-cpu-recipe": Net(cpu_recipe, VGG16Layout(conv1_padding=1, fc6_padding=1, batch_norm=True,
                                                    crops=SAME_PADDING_CROPS),
                            (2, 3, 36, 52), training=True, learnable_upsampling=True),
    "resnet18": Net(resnet("resnet18"), ResNetLayout("resnet18"), (2, 3, 36, 52),
                    training=True, learnable_upsampling=False),
    "resnet50": Net(resnet("resnet50"), ResNetLayout("resnet50"), (2, 3, 36, 52),
                    training=True, learnable_upsampling=False),
}
# The loop-level composition costs about a microsecond per multiply: smaller nets and images.
# The paper's net at 1/64 of its channels still convolves a 5x7 image at 203x205 (pad 100).
LOOP_NETS = {
    "vgg16-paper": dataclasses.replace(
        NETS["vgg16-paper"], build=lambda stride: models.build_fcn(stride, CLASSES, width=1 / 64),
        shape=(1, 3, 5, 7)),
    "vgg16-cpu-recipe": dataclasses.replace(NETS["vgg16-cpu-recipe"], shape=(2, 3, 12, 20)),
    "resnet18": dataclasses.replace(NETS["resnet18"], shape=(1, 3, 9, 13)),
    "resnet50": dataclasses.replace(NETS["resnet50"], shape=(1, 3, 9, 13)),
}
STRIDES = (32, 16, 8)
# BatchNorm nets in training mode (the gradients training uses) and in eval mode (running statistics).
CASES = [pytest.param(name, stride, training, id=f"{name}-{stride}s-{'train' if training else 'eval'}")
         for name, net in NETS.items() for stride in STRIDES
         for training in sorted({net.training, False}, reverse=True)]


def prepared(net, stride, training):
    """The model in float64 with random weights (the same values, name by name, for every stride)."""
    model = net.build(stride).to(dtype=np.float64)
    model.load_state_dict(random_weights(model.state_dict(), SEED))
    return model.train(training)


def image(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def output_weighting(model, shape, seed=2):
    """A random weighting of the scores: loss = sum(scores * weighting), so every
    score, and every element of every gradient, counts."""
    return np.random.default_rng(seed).standard_normal((shape[0], model.num_classes) + tuple(shape[2:]))


def assert_close(actual, expected, what, rtol=1e-9):
    """|actual - expected| <= rtol * max|expected|, element by element; on failure
    name the worst elements."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    scale = max(np.max(np.abs(expected)), 1e-300)
    error = np.abs(actual - expected)
    if np.all(error <= rtol * scale):
        return
    worst = np.argsort(error, axis=None)[::-1][:3]
    rows = [f"  at {np.unravel_index(i, error.shape)}: {actual.flat[i]!r}, expected {expected.flat[i]!r}"
            for i in worst]
    bad = int(np.sum(error > rtol * scale))
    raise AssertionError(f"{what}: {bad} of {error.size} elements differ by more than "
                         f"{rtol:g} * {scale:.3g}; worst:\n" + "\n".join(rows))


def frozen(net, model):
    """The parameter names that must get no gradient: the upsampling layers, unless learnable."""
    return set() if net.learnable_upsampling else {name for name, _ in model.named_parameters()
                                                    if name.startswith("upscore")}


@pytest.mark.parametrize("name, stride, training", CASES)
def test_scores_and_every_gradient_match_the_composition(name, stride, training):
    net = NETS[name]
    model = prepared(net, stride, training)
    x = image(net.shape)
    weighting = output_weighting(model, net.shape)
    model_image = mf.Tensor(x, requires_grad=True)
    scores = model(model_image)
    scores.backward(weighting)

    buffers = ("running_mean", "running_var")  # arrays; every parameter a Tensor with a gradient
    tensors = {key: value if key.endswith(buffers) else mf.Tensor(value, requires_grad=True)
               for key, value in model.state_dict().items()}
    take = Weights(tensors)
    reference_image = mf.Tensor(x, requires_grad=True)
    expected = net.layout(FAST, take, reference_image, stride, training)
    assert take.unread() == [], f"weights that the reference layer list does not use: {take.unread()}"
    expected.backward(weighting)

    assert_close(scores.data, expected.data, "scores")
    assert_close(model_image.grad, reference_image.grad, "the image's gradient")
    no_grad = frozen(net, model)
    for key, param in model.named_parameters():
        if key in no_grad:
            assert param.grad is None, f"{key} is frozen but got a gradient"
        else:
            assert param.grad is not None, f"{key} got no gradient"
            assert_close(param.grad, tensors[key].grad, f"the gradient of {key}")


@pytest.mark.parametrize("name", list(NETS))
def test_the_gradient_along_a_random_direction_matches_central_differences(name):
    """d/de loss(params + e * v) at e = 0, by autograd and by (loss(+h) - loss(-h)) / 2h,
    with v random in every learnable parameter at once: FCN-8s, which has every layer."""
    net = NETS[name]
    model = prepared(net, 8, net.training)
    x = mf.Tensor(image(net.shape))
    weighting = output_weighting(model, net.shape)
    model(x).backward(weighting)

    rng = np.random.default_rng(3)
    params = [param for _, param in model.named_parameters() if param.requires_grad]
    start = [param.data.copy() for param in params]
    # Each tensor moves in proportion to its own size, so h is as small for every layer.
    direction = [rng.standard_normal(value.shape) * np.sqrt(np.mean(value ** 2)) for value in start]
    by_autograd = sum(float(np.sum(param.grad * v)) for param, v in zip(params, direction))
    scale = sum(float(np.sum(np.abs(param.grad * v))) for param, v in zip(params, direction))

    def loss(step):
        for param, value, v in zip(params, start, direction):
            param.data = value + step * v
        with mf.no_grad():
            return float(np.sum(model(x).data * weighting))

    # A small step, as a ReLU kink crossed within +-h bends the quotient: at h = 1e-6 some
    # are (the paper's net copies each activation of conv1_1's constant padding over
    # thousands of pixels); at 1e-7 the two agree to about 1e-11 of the scale in every net.
    h = 1e-7
    by_differences = (loss(h) - loss(-h)) / (2 * h)
    assert abs(by_autograd - by_differences) <= 1e-8 * scale, \
        f"autograd {by_autograd!r}, central differences {by_differences!r} (scale {scale:.3g})"


@functools.lru_cache(maxsize=None)
def loop_features(name):
    """The loop-level encoder's features of LOOP_NETS[name]: computed once, shared by
    the three strides, whose models hold the same encoder weights."""
    net = LOOP_NETS[name]
    model = prepared(net, 8, net.training)
    return net.layout.features(LOOPS, Weights(model.state_dict()), image(net.shape), net.training)


@pytest.mark.parametrize("name", list(LOOP_NETS))
@pytest.mark.parametrize("stride", STRIDES)
def test_scores_match_the_net_built_from_loop_level_ops(name, stride):
    net = LOOP_NETS[name]
    model = prepared(net, stride, net.training)
    x = image(net.shape)
    scores = model(mf.Tensor(x)).data
    expected = net.layout.scores(LOOPS, Weights(model.state_dict()), loop_features(name), stride, x.shape[2:])
    assert_close(scores, expected, "scores")
