"""Datasets, augmentation and batching for semantic segmentation.

A dataset is anything with ``len(ds)`` and ``ds[i] -> (image, label)`` where
``image`` is an (H, W, 3) uint8 RGB array and ``label`` an (H, W) uint8 array of
class indices, 255 marking pixels to ignore. Two are built in:

- ``SyntheticShapes``: generated from a seed, no download; the default for
  examples and tests.
- ``VOCSegmentation``: the PASCAL VOC folder layout the FCN paper trains on.

Transforms (``minifcn.data.transforms``) act on the (image, label) pair together
and take an explicit ``numpy.random.Generator``; ``DataLoader`` turns a dataset
into (N, 3, H, W) float32 / (N, H, W) int64 batches in a reproducible,
resumable order. This package needs only NumPy and Pillow.
"""

from minifcn.data.errors import DatasetError
from minifcn.data.synthetic import SyntheticShapes
from minifcn.data.voc import VOC_CLASSES, VOCSegmentation, voc_palette
from minifcn.data.transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
)
from minifcn.data.loader import DataLoader

__all__ = [
    "DatasetError",
    "SyntheticShapes",
    "VOCSegmentation",
    "VOC_CLASSES",
    "voc_palette",
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomScale",
    "DataLoader",
]
