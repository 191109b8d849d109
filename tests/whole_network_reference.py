"""The FCNs of minifcn.models written out again, layer by layer: the independent
composition that tests/test_whole_networks.py compares every model with.

Nothing here calls a model, one of its modules or minifcn.models.geometry. The
layers, their order, kernels, strides and paddings, and the crop offsets are
typed in from the reference nets: the voc-fcn32s/16s/8s prototxts for VGG16
(conv1_1 ... conv5_3, fc6, fc7, score_fr, upscore2, score_pool4, ...) and
torchvision's ResNet for the ResNet encoders. Weights are read by name from a
state_dict, and ``Weights.unread()`` tells which of them the composition never
used.

One layout runs on two sets of ops:

- ``FAST``: minifcn.functional on float64 Tensors, whose autograd gives the
  gradient of every weight. These ops are each tested against the loop
  references (test_conv, test_pooling, test_normalization, ...); here they are
  only laid out in the order the paper gives.
- ``LOOPS``: the loop-level references of loop_reference.py and
  loop_reference_misc.py on NumPy arrays, which share no code with minifcn.

Shape legend: N batch, C channels, H, W image height and width, K classes.
"""

import zlib

import numpy

import loop_reference
from loop_reference_misc import batch_norm_loop, relu_loop
from minifcn import functional as F

BATCH_NORM_EPS = 1e-5  # torchvision's and Caffe's BatchNorm default
BATCH_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


class Weights:
    """name -> array or Tensor, as read from a state_dict; remembers what was read."""

    def __init__(self, arrays):
        self.arrays, self.read = dict(arrays), set()

    def __call__(self, name):
        self.read.add(name)
        return self.arrays[name]

    def unread(self):
        return sorted(set(self.arrays) - self.read)


# ---- the two sets of ops ----------------------------------------------------------------

class FAST:
    """minifcn.functional ops on Tensors (autograd records them)."""

    @staticmethod
    def conv(x, weight, bias=None, stride=1, padding=0):
        return F.conv2d(x, weight, bias, stride=stride, padding=padding)

    @staticmethod
    def deconv(x, weight, stride, padding):
        return F.conv_transpose2d(x, weight, None, stride=stride, padding=padding)

    @staticmethod
    def max_pool(x, kernel, stride, padding, ceil_mode):
        return F.max_pool2d(x, kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)

    @staticmethod
    def relu(x):
        return F.relu(x)

    @staticmethod
    def batch_norm(x, weight, bias, running_mean, running_var, training):
        # Copies: the statistics a training step would update belong to the model.
        return F.batch_norm(x, running_mean.copy(), running_var.copy(), weight, bias,
                            training=training, eps=BATCH_NORM_EPS)

    @staticmethod
    def crop(x, top, left, height, width):
        return F.crop(x, (top, left), (height, width))

    @staticmethod
    def add(x, y):
        return x + y


class LOOPS:
    """The loop-level reference ops on NumPy arrays."""

    @staticmethod
    def conv(x, weight, bias=None, stride=1, padding=0):
        return loop_reference.conv2d(x, weight, bias, stride=stride, padding=padding)

    @staticmethod
    def deconv(x, weight, stride, padding):
        return loop_reference.conv_transpose2d(x, weight, None, stride=stride, padding=padding)

    @staticmethod
    def max_pool(x, kernel, stride, padding, ceil_mode):
        return loop_reference.max_pool2d(x, kernel, stride, padding, ceil_mode)[0]

    @staticmethod
    def relu(x):
        return relu_loop(x)

    @staticmethod
    def batch_norm(x, weight, bias, running_mean, running_var, training):
        return batch_norm_loop(x, running_mean, running_var, weight, bias, training, eps=BATCH_NORM_EPS)[0]

    @staticmethod
    def crop(x, top, left, height, width):
        assert top + height <= x.shape[2] and left + width <= x.shape[3], "crop past the map"
        return x[:, :, top:top + height, left:left + width]

    @staticmethod
    def add(x, y):
        return x + y


# ---- the FCN head, shared by both encoders ----------------------------------------------

def _fuse(ops, upsampled, up_offset, skip, skip_offset):
    """Caffe's Crop + Eltwise SUM: both maps cut to the window they share, then added."""
    height = min(upsampled.shape[2] - up_offset, skip.shape[2] - skip_offset)
    width = min(upsampled.shape[3] - up_offset, skip.shape[3] - skip_offset)
    return ops.add(ops.crop(upsampled, up_offset, up_offset, height, width),
                   ops.crop(skip, skip_offset, skip_offset, height, width))


def fcn_head(ops, take, features, stride, size, crops, upsampling_padding):
    """features {8: pool3, 16: pool4, 32: fc7} -> scores (N, K, H, W) of FCN-``stride``s.

    crops: {"upscore2c", "score_pool4c", "upscore_pool4c", "score_pool3c", 32, 16, 8};
    upsampling_padding(factor): the padding of the transposed convolution by ``factor``.
    """
    def upsample(x, name, factor):
        return ops.deconv(x, take(f"{name}.weight"), factor, upsampling_padding(factor))

    def score(name, x):
        return ops.conv(x, take(f"{name}.weight"), take(f"{name}.bias"))

    scores = score("score_fr", features[32])
    if stride <= 16:  # FCN-16s: 2x up, plus the pool4 scores
        scores = _fuse(ops, upsample(scores, "upscore2", 2), crops["upscore2c"],
                       score("score_pool4", features[16]), crops["score_pool4c"])
    if stride == 8:   # FCN-8s: 2x up again, plus the pool3 scores
        scores = _fuse(ops, upsample(scores, "upscore_pool4", 2), crops["upscore_pool4c"],
                       score("score_pool3", features[8]), crops["score_pool3c"])
    final = {32: "upscore", 16: "upscore16", 8: "upscore8"}[stride]
    scores = upsample(scores, final, stride)
    return ops.crop(scores, crops[stride], crops[stride], *size)


# ---- VGG16 ----------------------------------------------------------------------------

VGG16_BLOCKS = (("conv1_1", "conv1_2"), ("conv2_1", "conv2_2"), ("conv3_1", "conv3_2", "conv3_3"),
                ("conv4_1", "conv4_2", "conv4_3"), ("conv5_1", "conv5_2", "conv5_3"))

# The crops of the voc-fcn prototxts (conv1_1 padded by 100, fc6 7x7 unpadded).
PAPER_CROPS = {"upscore2c": 0, "score_pool4c": 5, "upscore_pool4c": 0, "score_pool3c": 9,
               32: 19, 16: 27, 8: 31}

# "Same" padding (conv1_1 by 1, fc6 3x3 by 1): pool-n pixel i lies on image pixel
# 2^n i + (2^n - 1)/2, so score_fr is 32i + 15.5. A k = 2f, stride f, unpadded
# transposed convolution maps its pixel j to input (j - (f - 1/2)) / f:
#   upscore2  16j - 8.5 against pool4 16i + 7.5 -> upscore2 cropped by 1, pool4 by 0;
#   upscore_pool4 (of 16i + 7.5) 8j - 4.5 against pool3 8i + 3.5 -> crops 1 and 0;
#   upscore   j - 31.5 + 15.5 = j - 16;  upscore16 j - 15.5 + 7.5 = j - 8;
#   upscore8  j - 7.5 + 3.5 = j - 4: the final crops 16, 8 and 4.
SAME_PADDING_CROPS = {"upscore2c": 1, "score_pool4c": 0, "upscore_pool4c": 1, "score_pool3c": 0,
                      32: 16, 16: 8, 8: 4}


class VGG16Layout:
    """The VGG16 FCN: conv1_1 ... conv5_3 (3x3; padding 1, conv1_1 ``conv1_padding``),
    ReLU after each (after a BatchNorm ``<conv>_bn`` when ``batch_norm``), a 2x2
    stride-2 ceil-mode max pool closing each block, fc6 (its kernel is its weight's,
    padding ``fc6_padding``) and fc7 (1x1), each with a ReLU. Dropout is left out:
    the tests run the paper's net in eval mode, and the CPU recipe has p = 0.
    The upsampling layers (kernel 2f, stride f) are unpadded."""

    def __init__(self, conv1_padding, fc6_padding, batch_norm, crops):
        self.conv1_padding, self.fc6_padding = conv1_padding, fc6_padding
        self.batch_norm, self.crops = batch_norm, crops

    def features(self, ops, take, x, training):
        """x (N, 3, H, W) -> {8: pool3, 16: pool4, 32: fc7}."""
        features = {}
        for block, names in enumerate(VGG16_BLOCKS, start=1):
            for name in names:
                padding = self.conv1_padding if name == "conv1_1" else 1
                if self.batch_norm:  # a convolution before a BatchNorm has no bias
                    x = ops.conv(x, take(f"{name}.weight"), None, padding=padding)
                    x = ops.batch_norm(x, *(take(f"{name}_bn.{key}") for key in BATCH_NORM_KEYS), training)
                else:
                    x = ops.conv(x, take(f"{name}.weight"), take(f"{name}.bias"), padding=padding)
                x = ops.relu(x)
            x = ops.max_pool(x, 2, 2, 0, ceil_mode=True)  # pool1 ... pool5
            if block in (3, 4):
                features[2 ** block] = x
        x = ops.relu(ops.conv(x, take("fc6.weight"), take("fc6.bias"), padding=self.fc6_padding))
        features[32] = ops.relu(ops.conv(x, take("fc7.weight"), take("fc7.bias")))
        return features

    def scores(self, ops, take, features, stride, size):
        return fcn_head(ops, take, features, stride, size, self.crops, upsampling_padding=lambda factor: 0)

    def __call__(self, ops, take, x, stride, training):
        """x (N, 3, H, W) -> scores (N, K, H, W)."""
        return self.scores(ops, take, self.features(ops, take, x, training), stride, x.shape[2:])


# ---- ResNet ---------------------------------------------------------------------------

RESNET_BLOCKS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


class ResNetLayout:
    """The ResNet FCN: torchvision's ResNet (conv1 7x7 stride 2, bn1, ReLU, 3x3
    stride-2 max pool; layer1 ... layer4, the first block of layer2-4 with stride 2),
    the stem padded by 3 + ``margin``. Every map is "same"-aligned but for the
    margin, so the skips need no crop and the final crop is the margin. The
    upsampling layers (kernel 2f - 1, stride f) are padded by f - 1."""

    def __init__(self, depth, margin=31):
        self.kind, self.counts = RESNET_BLOCKS[depth]
        self.margin = margin
        self.crops = {"upscore2c": 0, "score_pool4c": 0, "upscore_pool4c": 0, "score_pool3c": 0,
                      32: margin, 16: margin, 8: margin}

    @staticmethod
    def _conv_bn(ops, take, x, conv, bn, training, stride=1, padding=0, relu=False):
        x = ops.conv(x, take(f"{conv}.weight"), None, stride=stride, padding=padding)
        x = ops.batch_norm(x, *(take(f"{bn}.{key}") for key in BATCH_NORM_KEYS), training)
        return ops.relu(x) if relu else x

    def _block(self, ops, take, x, prefix, stride, training):
        """One residual block: relu(main path + shortcut)."""
        unit = self._conv_bn
        if self.kind == "basic":    # 3x3 (stride) - BN - ReLU - 3x3 - BN
            out = unit(ops, take, x, prefix + "conv1", prefix + "bn1", training, stride, 1, relu=True)
            out = unit(ops, take, out, prefix + "conv2", prefix + "bn2", training, 1, 1)
        else:                       # 1x1 - BN - ReLU - 3x3 (stride) - BN - ReLU - 1x1 - BN
            out = unit(ops, take, x, prefix + "conv1", prefix + "bn1", training, relu=True)
            out = unit(ops, take, out, prefix + "conv2", prefix + "bn2", training, stride, 1, relu=True)
            out = unit(ops, take, out, prefix + "conv3", prefix + "bn3", training)
        if stride == 1 and x.shape[1] == out.shape[1]:
            shortcut = x
        else:                       # a 1x1 strided projection where the shape changes
            shortcut = unit(ops, take, x, prefix + "downsample.0", prefix + "downsample.1", training, stride)
        return ops.relu(ops.add(out, shortcut))

    def features(self, ops, take, x, training):
        """x (N, 3, H, W) -> {8: layer2, 16: layer3, 32: layer4}."""
        x = self._conv_bn(ops, take, x, "conv1", "bn1", training, 2, 3 + self.margin, relu=True)
        x = ops.max_pool(x, 3, 2, 1, ceil_mode=False)
        features = {}
        for layer, count in enumerate(self.counts, start=1):
            for index in range(count):
                stride = 2 if layer > 1 and index == 0 else 1
                x = self._block(ops, take, x, f"layer{layer}.{index}.", stride, training)
            if layer > 1:
                features[4 * 2 ** (layer - 1)] = x
        return features

    def scores(self, ops, take, features, stride, size):
        return fcn_head(ops, take, features, stride, size, self.crops,
                        upsampling_padding=lambda factor: factor - 1)

    def __call__(self, ops, take, x, stride, training):
        """x (N, 3, H, W) -> scores (N, K, H, W)."""
        return self.scores(ops, take, self.features(ops, take, x, training), stride, x.shape[2:])


def random_weights(state, seed):
    """Random float64 values for every entry of a state_dict, each drawn from a
    generator seeded by (seed, name), so nets that share a layer name share its values.

    Convolutions get He-scaled normal weights (signals neither vanish nor blow up
    through 13 or 50 layers), biases and score layers small random values (the
    model's zero score layers would hide everything below them), BatchNorm a random
    affine map and random running statistics (so eval mode is tested too).
    """
    out = {}
    for name, value in state.items():
        rng = numpy.random.default_rng([seed, zlib.crc32(name.encode())])
        shape, key = value.shape, name.rsplit(".", 1)[-1]
        if key == "running_var":
            out[name] = rng.uniform(0.5, 2.0, shape)
        elif key == "running_mean" or (key == "bias" and len(shape) == 1):
            out[name] = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:  # a BatchNorm scale
            out[name] = rng.uniform(0.5, 1.5, shape)
        elif name.startswith("upscore"):  # (C_in, C_out, k, k): each output sums C_in * (k/f)^2 taps
            out[name] = rng.standard_normal(shape) / numpy.sqrt(4 * shape[0])
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            out[name] = rng.standard_normal(shape) * numpy.sqrt(2.0 / fan_in)
    return out
