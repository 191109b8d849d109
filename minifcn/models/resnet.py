"""FCN-32s/16s/8s on a ResNet backbone (ResNet-18/34 with BasicBlock,
ResNet-50/101 with Bottleneck, BatchNorm after every convolution).

The layers and their names follow torchvision's ResNet (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0`` ...): the stem (7x7 stride-2
convolution and 3x3 stride-2 max pool) brings the image to stride 4; layer2,
layer3 and layer4 halve it again, to strides 8, 16 and 32. The FCN head is
the VGG one: ``score_fr`` scores layer4, and the skip score layers, which keep
their reference names ``score_pool4`` and ``score_pool3``, score layer3
(stride 16) and layer2 (stride 8).

Alignment, and why the head differs from VGG's in two details
--------------------------------------------------------------
ResNet pads every convolution and pool "same" style (3x3 padding 1, 7x7
padding 3, 1x1 padding 0), so by the coordinate maps of geometry.py every
layer has shift (k-1)/2 - p = 0: pixel i of the stride-s map sits exactly on
image pixel s*i. (Both branches of a residual block, the 3x3 stride-2 main
path and the 1x1 stride-2 shortcut, map alike, so the sum is aligned.)

1. *Odd upsampling kernels.* The reference's 2f x 2f bilinear kernel (even)
   puts the centre of input pixel i at output f*i + f - 1/2: half a pixel
   off ResNet's integer grid, and no crop can fix half a pixel. A
   (2f-1) x (2f-1) kernel, the same tent 1 - |d|/f sampled at integer d, with
   padding f-1 maps input pixel i to output f*i exactly: bilinear
   interpolation between pixel centres with integer offsets (all 0 here).
2. *A margin.* Interpolation is exact only between two coarse pixels; past
   the last one the tent fades to zero. The stride-32 map of an H-pixel image
   ends at image pixel 32*(ceil(H/32) - 1), up to 31 pixels short of the
   border. Padding the stem convolution by ``margin`` = 31 more pixels (the
   idea of VGG's pad 100, sized for ResNet) shifts every map by 31 and makes
   it ceil((H + 62) / 32) long, enough to reach past pixel H - 1 on both
   sides; the final crop (offset 31, derived) removes the margin.

The alternative, ``F.interpolate(scores, size=(H, W))``, maps the corners
(align_corners=True) or the half-pixel grid (False) onto the image, and
neither is ResNet's s*i grid unless H happens to be a multiple of the
stride: a fraction-of-a-stride misalignment that grows with the stride. The
deconvolution keeps the FCN structure (learnable, bilinear-initialised
upsampling) and stays exact for every input size.
"""

from minifcn import nn
from minifcn.functional.activation import relu
from minifcn.models.fcn import FCN
from minifcn.models.vgg import scaled_channels


class BasicBlock(nn.Module):
    """3x3 conv (stride) - BN - ReLU - 3x3 conv - BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_channels, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x):
        out = self.bn1(self.conv1(x), relu=True)  # relu(bn1(...)) as one op
        out = self.bn2(self.conv2(out))
        return relu(out + (x if self.downsample is None else self.downsample(x)))

    def spatial_layers(self):
        """The layers on the main path that move pixels (for geometry)."""
        return [self.conv1, self.conv2]


class Bottleneck(nn.Module):
    """1x1 conv - BN - ReLU - 3x3 conv (stride) - BN - ReLU - 1x1 conv (4x) - BN,
    plus the shortcut, then ReLU (the stride sits on the 3x3, as torchvision's)."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x):
        out = self.bn1(self.conv1(x), relu=True)
        out = self.bn2(self.conv2(out), relu=True)
        out = self.bn3(self.conv3(out))
        return relu(out + (x if self.downsample is None else self.downsample(x)))

    def spatial_layers(self):
        return [self.conv1, self.conv2, self.conv3]


def _shortcut(in_channels, out_channels, stride):
    """None (identity) or a 1x1 strided projection + BN where the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}

# Padding added to the stem beyond its own 3: one less than the coarsest stride.
DEFAULT_MARGIN = 32 - 1


class ResNetFCN(FCN):
    """FCN-32s/16s/8s on ResNet; build it with ``fcn8s(backbone="resnet18")`` etc.

    Args:
        num_classes, stride, learnable_upsampling: as for VGGFCN.
        depth: "resnet18", "resnet34", "resnet50" or "resnet101".
        width: channel multiplier of the base 64 (1, 1/2, ... 1/16).
        margin: extra stem padding (31; see the module docstring).
    """

    def __init__(self, num_classes=21, stride=32, depth="resnet18", width=1,
                 learnable_upsampling=False, margin=DEFAULT_MARGIN):
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"depth must be one of {sorted(RESNETS)}, got {depth!r}")
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise ValueError(f"margin must be an int >= 0, got {margin!r}")
        self.config = dict(num_classes=num_classes, depth=depth, width=width,
                           learnable_upsampling=learnable_upsampling, margin=margin)
        self.backbone = depth
        self.preprocessing = None
        block, counts = RESNETS[depth]
        base = scaled_channels(64, width)
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3 + margin, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels, channels = base, {}
        for index, count in enumerate(counts):
            planes, layer_stride = base * 2 ** index, 1 if index == 0 else 2
            blocks = []
            for position in range(count):
                blocks.append(block(in_channels, planes, layer_stride if position == 0 else 1))
                in_channels = planes * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
            channels[4 * 2 ** index] = in_channels
        self._build_head(num_classes, stride, channels, learnable_upsampling)

    def upsampling_shape(self, factor):
        return 2 * factor - 1, factor - 1

    def encode(self, x):
        x = self.maxpool(self.bn1(self.conv1(x), relu=True))
        x = self.layer1(x)
        features = {8: self.layer2(x)}
        features[16] = self.layer3(features[8])
        features[32] = self.layer4(features[16])
        return features

    def encoder_paths(self):
        layers, paths = [self.conv1, self.maxpool], {}
        for index in range(1, 5):
            for block in getattr(self, f"layer{index}"):
                layers += block.spatial_layers()
            if index >= 2:
                paths[4 * 2 ** (index - 1)] = list(layers)
        return paths
