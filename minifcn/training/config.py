"""The recipe of a run: ``TrainConfig`` and the model and datasets it builds.

    config = TrainConfig(variant="16s", iterations=600)
    train_set, val_set, class_names, palette = build_datasets(config)
    model = build_model(config, num_classes=len(class_names))

Both the Trainer and ``minifcn.predict`` (which rebuilds a trained model from the config
saved in its checkpoint) read the recipe from here.
"""

import dataclasses
import math
import numbers
import os

from minifcn import models
from minifcn.backend import check_device
from minifcn.data.synthetic import SyntheticShapes
from minifcn.data.voc import VOC_CLASSES, VOCSegmentation

VARIANTS = {"32s": 32, "16s": 16, "8s": 8}


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; saved in the checkpoint and the log.

    The defaults train a CPU-sized FCN-8s on the built-in synthetic shapes
    to mean IU 0.85 in about three minutes on two cores: the VGG16 layout at
    1/8 of the channels, with BatchNorm (a net this thin learns from scratch
    far faster with it), no dropout (128 fc channels are too few to drop half
    of them), "same" padding and learned upsampling. The recipe was chosen by
    its time to quality (bench/time_to_quality.py, bench/RESULTS.md).
    """

    variant: str = "8s"               # "32s", "16s" or "8s"
    backbone: str = "vgg16"           # or "resnet18", "resnet50"
    width: float = 1 / 8              # VGG channel counts times this (1 = the paper's net)
    fc6_kernel: int = 3               # 7 in the paper
    fc_channels: int = 128            # 4096 in the paper
    dropout: float = 0.0              # after fc6 and fc7 (0.5 in the paper)
    learnable_upsampling: bool = True  # the upsampling layers start bilinear and learn (the paper
                                       # learned its 2x layers; the released nets froze them all)
    batch_norm: bool = True           # BatchNorm after each VGG convolution (not in the paper)
    conv1_padding: int = 1            # 100 in the paper. With 1 here and in fc6 every convolution
    fc6_padding: int = 1              # is "same": the work goes into image pixels, not padding
                                      # (0 in the paper; the crops are derived either way)
    data: str = "synthetic"           # "synthetic", or a PASCAL VOC folder (VOCdevkit/VOC2012)
    train_size: int = 40000           # synthetic training images, drawn when read: a stream that
                                      # 4000 batches of 8 never repeat
    val_size: int = 200               # synthetic validation images
    iterations: int = 4000
    batch_size: int = 8
    crop: int = 96                    # training crop (0: whole images, batch_size must be 1)
    optimizer: str = "adam"           # "adam" or "sgd"
    lr: float = 4e-3
    momentum: float = 0.9             # SGD only
    weight_decay: float = 1e-4
    schedule: str = "poly"            # "poly" or "constant"
    preprocessing: str = "torchvision"  # "caffe" or "torchvision" normalisation of the input
    val_every: int = 1000
    checkpoint_every: int = 100
    device: str = "cpu"
    processes: int = 0                # CPU processes examples/train_fcn8s.py starts to share each
                                      # batch (0: one per core, up to one image each; 1: one)
    seed: int = 0
    out: str = "runs/fcn8s"
    on_nonfinite: str = "stop"        # "stop" (raise) or "skip" (drop the step)

    def validate(self):
        def whole(value, minimum):
            return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum

        def real(value):
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        if isinstance(self.out, os.PathLike):
            self.out = os.fspath(self.out)  # the config is saved as JSON: keep plain strings

        checks = [
            ("variant", self.variant in VARIANTS, f"one of {sorted(VARIANTS)}"),
            ("iterations", whole(self.iterations, 1), "a positive int"),
            ("batch_size", whole(self.batch_size, 1), "a positive int"),
            ("crop", whole(self.crop, 0) and (self.crop > 0 or self.batch_size == 1),
             "a non-negative int (0 only with batch_size 1)"),
            ("optimizer", self.optimizer in ("adam", "sgd"), "'adam' or 'sgd'"),
            ("lr", real(self.lr) and self.lr > 0, "a positive number"),
            ("dropout", real(self.dropout) and 0 <= self.dropout <= 1, "a probability in [0, 1]"),
            ("batch_norm", isinstance(self.batch_norm, bool), "True or False"),
            ("learnable_upsampling", isinstance(self.learnable_upsampling, bool), "True or False"),
            ("conv1_padding", whole(self.conv1_padding, 0), "a non-negative int"),
            ("fc6_padding", whole(self.fc6_padding, 0), "a non-negative int"),
            ("schedule", self.schedule in ("poly", "constant"), "'poly' or 'constant'"),
            ("preprocessing", self.preprocessing in ("caffe", "torchvision"), "'caffe' or 'torchvision'"),
            ("val_every", whole(self.val_every, 1), "a positive int"),
            ("checkpoint_every", whole(self.checkpoint_every, 1), "a positive int"),
            ("on_nonfinite", self.on_nonfinite in ("stop", "skip"), "'stop' or 'skip'"),
            ("seed", whole(self.seed, 0), "a non-negative int"),
            ("processes", whole(self.processes, 0) and (self.processes <= 1 or self.device == "cpu"),
             "a non-negative int (more than 1 only with device 'cpu')"),
            ("out", isinstance(self.out, str) and self.out != "", "a folder name"),
            ("train_size", whole(self.train_size, 1), "a positive int"),
            ("val_size", whole(self.val_size, 1), "a positive int"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        check_device(self.device)
        return self


def build_datasets(config):
    """(train, val, class_names, palette) for ``config.data``."""
    if config.data == "synthetic":
        train = SyntheticShapes("train", size=config.train_size, seed=config.seed)
        val = SyntheticShapes("val", size=config.val_size, seed=config.seed)
        return train, val, list(train.class_names), train.palette
    train, val = VOCSegmentation(config.data, "train"), VOCSegmentation(config.data, "val")
    return train, val, list(VOC_CLASSES), train.palette


def build_model(config, num_classes):
    """The FCN that ``config`` describes, with ``num_classes`` output channels."""
    options = dict(width=config.width, learnable_upsampling=config.learnable_upsampling)
    if config.backbone == "vgg16":
        options.update(fc6_kernel=config.fc6_kernel, fc_channels=config.fc_channels,
                       conv1_padding=config.conv1_padding, fc6_padding=config.fc6_padding,
                       dropout=config.dropout, batch_norm=config.batch_norm)
    return models.build_fcn(VARIANTS[config.variant], num_classes=num_classes,
                            backbone=config.backbone, **options)
