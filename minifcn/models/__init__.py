"""FCN models: ``fcn32s``, ``fcn16s``, ``fcn8s`` on VGG16 (the paper's nets) or ResNet.

    model = minifcn.models.fcn8s()                      # the reference voc-fcn8s, 21 classes
    model = minifcn.models.fcn8s(width=1/8, fc6_kernel=3)  # a CPU-sized VGG16 FCN
    model = minifcn.models.fcn8s(backbone="resnet18", width=1/4)
    scores = model(images)                              # (N, 3, H, W) -> (N, 21, H, W)

Staged training as in the paper: ``fcn16s_from_fcn32s(model32)``, then
``fcn8s_from_fcn16s(model16)``. ImageNet weights for the VGG16 encoder:
``load_vgg16_weights(model, path)`` (see minifcn.models.pretrained).

geometry.py   coordinate maps, crop offsets (why conv1_1 is padded by 100)
fcn.py        the FCN head shared by every backbone, and staged training
vgg.py        VGG16 encoder (conv1_1 ... fc7)
resnet.py     ResNet-18/34/50/101 encoders
pretrained.py loading torchvision / timm / Caffe-named VGG16 weights
"""

from minifcn.models import geometry
from minifcn.models.fcn import FCN, fcn8s_from_fcn16s, fcn16s_from_fcn32s, from_coarser
from minifcn.models.pretrained import PREPROCESSING, load_vgg16_weights
from minifcn.models.resnet import RESNETS, ResNetFCN
from minifcn.models.vgg import VGGFCN

BACKBONES = ("vgg16",) + tuple(RESNETS)


def build_fcn(stride, num_classes=21, backbone="vgg16", **options):
    """FCN-``stride``s (32, 16 or 8) on ``backbone``; ``options`` go to VGGFCN
    (width, fc6_kernel, fc_channels, dropout, learnable_upsampling, conv1_padding)
    or ResNetFCN (width, learnable_upsampling, margin)."""
    if backbone == "vgg16":
        return VGGFCN(num_classes=num_classes, stride=stride, **options)
    if backbone in RESNETS:
        return ResNetFCN(num_classes=num_classes, stride=stride, depth=backbone, **options)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")


def fcn32s(num_classes=21, backbone="vgg16", **options):
    """FCN-32s: coarse scores upsampled by 32 (reference: voc-fcn32s)."""
    return build_fcn(32, num_classes, backbone, **options)


def fcn16s(num_classes=21, backbone="vgg16", **options):
    """FCN-16s: coarse scores fused with pool4 scores (reference: voc-fcn16s)."""
    return build_fcn(16, num_classes, backbone, **options)


def fcn8s(num_classes=21, backbone="vgg16", **options):
    """FCN-8s: fused with pool4 and pool3 scores (reference: voc-fcn8s, staged)."""
    return build_fcn(8, num_classes, backbone, **options)


__all__ = ["FCN", "VGGFCN", "ResNetFCN", "BACKBONES", "build_fcn", "fcn32s", "fcn16s", "fcn8s",
           "from_coarser", "fcn16s_from_fcn32s", "fcn8s_from_fcn16s", "load_vgg16_weights",
           "PREPROCESSING", "geometry"]
