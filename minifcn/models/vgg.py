"""The VGG16 FCNs of the paper (voc-fcn32s / 16s / 8s), layer for layer.

Encoder: VGG16's thirteen 3x3 convolutions (padding 1) in five blocks, each
closed by a 2x2 stride-2 max pool in ceil mode (Caffe's rounding), with
conv1_1 padded by 100 (see geometry.py for why); then fc6 (7x7, 4096) and
fc7 (1x1, 4096) as convolutions, each followed by ReLU and dropout 0.5.

Every layer is an attribute of the model itself, named as in the reference
prototxt, so ``state_dict()`` keys read "conv1_1.weight", "fc6.bias",
"score_pool4.weight", "upscore2.weight", ...

For CPU-sized experiments ``width`` scales every channel count (1/2, 1/4,
1/8, 1/16 of 64...512 and of the 4096 fc channels), ``fc6_kernel`` shrinks
fc6 and ``fc_channels`` sets the fc width; the crop offsets are derived again
for each setting. ``batch_norm=True`` puts a BatchNorm2d after every
encoder convolution (as torchvision's vgg16_bn): not the paper's net, but a
thin VGG trained from scratch learns in minutes with it instead of hours.
BatchNorm is pointwise, so the geometry and the crop offsets do not change.
"""

from fractions import Fraction

from minifcn import nn
from minifcn.functional.activation import relu
from minifcn.models.fcn import FCN

# (block, convolutions) of VGG16 configuration "D": output channels at width 1.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG16_FC_CHANNELS = 4096
REFERENCE_CONV1_PADDING = 100


def scaled_channels(base, width, what="width"):
    """base * width as a whole, positive number of channels, or ValueError."""
    try:
        width = Fraction(width).limit_denominator(1 << 20)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number such as 1, 1/2 or 0.25, "
                         f"got {width!r}") from None
    channels = base * width
    if width <= 0 or channels.denominator != 1:
        raise ValueError(f"{what}={width} does not give a whole, positive number of channels "
                         f"for a layer of {base} (use 1, 1/2, 1/4, 1/8 or 1/16)")
    return int(channels)


def vgg16_layers(width=1, fc6_kernel=7, fc_channels=None, conv1_padding=REFERENCE_CONV1_PADDING,
                 in_channels=3, fc6_padding=0):
    """[(name, in_channels, out_channels, kernel, padding)] of every convolution
    of the encoder, conv1_1 to fc7."""
    layers, previous = [], in_channels
    for block, convs in enumerate(VGG16_BLOCKS, start=1):
        for index, base in enumerate(convs, start=1):
            channels = scaled_channels(base, width)
            padding = conv1_padding if (block, index) == (1, 1) else 1
            layers.append((f"conv{block}_{index}", previous, channels, 3, padding))
            previous = channels
    fc = scaled_channels(VGG16_FC_CHANNELS, width) if fc_channels is None else fc_channels
    layers.append(("fc6", previous, fc, fc6_kernel, fc6_padding))
    layers.append(("fc7", fc, fc, 1, 0))
    return layers


class VGGFCN(FCN):
    """FCN-32s/16s/8s on VGG16; build it with ``minifcn.models.fcn32s()`` etc.

    Args:
        num_classes: scores per pixel (21 for PASCAL VOC).
        stride: 32, 16 or 8 (FCN-32s, FCN-16s, FCN-8s).
        width: channel multiplier (1 is the reference net; 1/2 ... 1/16 for CPU runs).
        fc6_kernel: kernel of fc6 (7 in the reference; 3 or 1 are cheaper).
        fc_channels: channels of fc6 and fc7 (default 4096 * width).
        dropout: dropout probability after fc6 and fc7 (0.5).
        learnable_upsampling: train the bilinear upsampling layers too
            (frozen by default, as the reference's lr_mult 0).
        conv1_padding: padding of conv1_1 (100 in the reference).
        fc6_padding: padding of fc6 (0 in the reference). With conv1_padding 1 and
            fc6_padding (fc6_kernel - 1) // 2 every convolution is "same": the
            net convolves image pixels only, and the crops are derived as ever.
        batch_norm: a BatchNorm2d (``conv1_1_bn`` ...) after each encoder convolution,
            which then has no bias of its own.
    """

    def __init__(self, num_classes=21, stride=32, width=1, fc6_kernel=7, fc_channels=None,
                 dropout=0.5, learnable_upsampling=False, conv1_padding=REFERENCE_CONV1_PADDING,
                 batch_norm=False, fc6_padding=0):
        super().__init__()
        if isinstance(fc6_kernel, bool) or not isinstance(fc6_kernel, int) or fc6_kernel < 1:
            raise ValueError(f"fc6_kernel must be a positive int, got {fc6_kernel!r}")
        if fc_channels is not None and (isinstance(fc_channels, bool) or not isinstance(fc_channels, int)
                                        or fc_channels < 1):
            raise ValueError(f"fc_channels must be a positive int or None, got {fc_channels!r}")
        for name, value in (("conv1_padding", conv1_padding), ("fc6_padding", fc6_padding)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.config = dict(num_classes=num_classes, width=width, fc6_kernel=fc6_kernel,
                           fc_channels=fc_channels, dropout=dropout,
                           learnable_upsampling=learnable_upsampling, conv1_padding=conv1_padding,
                           batch_norm=batch_norm, fc6_padding=fc6_padding)
        self.backbone = "vgg16"
        self.preprocessing = None
        self._blocks = []  # the convolution names of each block
        for name, cin, cout, kernel, padding in vgg16_layers(width, fc6_kernel, fc_channels, conv1_padding,
                                                               fc6_padding=fc6_padding):
            # A BatchNorm subtracts each channel's mean, so a bias before it cancels: it would
            # only cost time, and get a gradient of rounding noise that Adam turns into steps.
            followed_by_batch_norm = batch_norm and name.startswith("conv")
            setattr(self, name, nn.Conv2d(cin, cout, kernel, padding=padding, bias=not followed_by_batch_norm))
            if name in ("fc6", "fc7"):  # Caffe's Dropout layers drop6 and drop7 (element-wise)
                setattr(self, f"drop{name[2]}", nn.Dropout(dropout))
            if name.startswith("conv"):
                if batch_norm:
                    setattr(self, f"{name}_bn", nn.BatchNorm2d(cout))
                block, index = int(name[4]), int(name[6])
                if block > len(self._blocks):
                    self._blocks.append([])
                self._blocks[-1].append(name)
                if index == len(VGG16_BLOCKS[block - 1]):  # the block's last convolution
                    setattr(self, f"pool{block}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
        channels = {8: self.conv3_3.out_channels, 16: self.conv4_3.out_channels,
                    32: self.fc7.out_channels}
        self._build_head(num_classes, stride, channels, learnable_upsampling)

    def encode(self, x):
        features = {}
        for block, names in enumerate(self._blocks, start=1):
            for name in names:
                x = getattr(self, name)(x)
                if self.config["batch_norm"]:  # BatchNorm, then ReLU, as one op
                    x = getattr(self, f"{name}_bn")(x, relu=True)
                else:
                    x = relu(x)
            x = getattr(self, f"pool{block}")(x)
            if block == 3:
                features[8] = x
            elif block == 4:
                features[16] = x
        x = self.drop6(relu(self.fc6(x)))
        features[32] = self.drop7(relu(self.fc7(x)))
        return features

    def encoder_paths(self):
        layers, paths = [], {}
        for block, names in enumerate(self._blocks, start=1):
            layers += [getattr(self, name) for name in names] + [getattr(self, f"pool{block}")]
            if block == 3:
                paths[8] = list(layers)
            elif block == 4:
                paths[16] = list(layers)
        paths[32] = layers + [self.fc6, self.fc7]
        return paths
