"""Transforms applied to an (image, label) pair together.

Geometric transforms must move image and label identically or the network
learns from misaligned targets, so every transform takes and returns both:

    image, label = transform(image, label, rng)

Before ``Normalize``: image (H, W, 3) uint8 RGB (or float, 0-255 scale) and
label (H, W) uint8. ``Normalize`` comes last and turns the image into the
float32 (3, H, W) array a network eats. Randomness comes only from the explicit
``rng`` (a ``numpy.random.Generator``), so a run is reproducible and a resumed
run sees the same augmentations (``DataLoader`` derives one per sample).

Pillow does the resizing: bilinear for images, nearest neighbour for labels
(averaging class indices would invent classes); both use the pixel-centre
convention, so they stay aligned.
"""

import numpy as np
from PIL import Image

from minifcn.arguments import pair

IGNORE_INDEX = 255

# Mean RGB of the ImageNet training images on a 0-255 scale (the Caffe VGG
# mean, reordered to RGB): padding with it gives ~0 after normalisation.
MEAN_RGB_255 = (122.67891434, 116.66876762, 104.00698793)


def _check_pair(image, label, name):
    """Validate an (image, label) pair before a geometric transform."""
    image, label = np.asarray(image), np.asarray(label)
    if image.ndim != 3 or image.shape[2] != 3 or label.ndim != 2 or image.shape[:2] != label.shape:
        raise ValueError(
            f"{name} expects image (H, W, 3) and label (H, W) of the same size, got image "
            f"{image.shape} and label {label.shape} (Normalize, which makes (C, H, W), must come last)")
    if label.dtype != np.uint8:
        raise ValueError(f"{name} expects a uint8 label, got dtype {label.dtype}")
    return image, label


def _check_rng(rng, name):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{name} needs rng=numpy.random.Generator (e.g. np.random.default_rng(0)), "
                        f"got {type(rng).__name__}")


class Compose:
    """Apply transforms in order, all drawing from the same rng."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        for position, transform in enumerate(self.transforms[:-1]):
            if isinstance(transform, Normalize):
                raise ValueError(f"Normalize must be the last transform (it makes (C, H, W) float images), "
                                 f"found it at position {position} of {len(self.transforms)}")

    def __call__(self, image, label, rng=None):
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        return image, label

    def __repr__(self):
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


class Normalize:
    """(H, W, 3) RGB 0-255 -> (3, H, W) float32, in the convention the weights were trained with.

    mode:
      "caffe"        RGB -> BGR, subtract the mean BGR pixel, keep the 0-255 scale:
                     the preprocessing of the original Caffe FCN and VGG16 weights.
      "torchvision"  divide by 255, subtract mean (0.485, 0.456, 0.406), divide by
                     std (0.229, 0.224, 0.225): torchvision's ImageNet models.
      "unit"         divide by 255 (values in [0, 1]): networks trained from scratch.
      "none"         values kept as they are (0-255), only cast and transposed.
    The label passes through unchanged.
    """

    MODES = ("caffe", "torchvision", "unit", "none")
    CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
    TORCHVISION_MEAN = (0.485, 0.456, 0.406)
    TORCHVISION_STD = (0.229, 0.224, 0.225)

    def __init__(self, mode="caffe"):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def __call__(self, image, label, rng=None):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"Normalize expects an (H, W, 3) RGB image, got shape {image.shape}")
        x = image.astype(np.float32)
        if self.mode == "caffe":
            x = x[..., ::-1] - np.float32(self.CAFFE_MEAN_BGR)
        elif self.mode == "torchvision":
            x = (x / np.float32(255) - np.float32(self.TORCHVISION_MEAN)) / np.float32(self.TORCHVISION_STD)
        elif self.mode == "unit":
            x = x / np.float32(255)
        return np.ascontiguousarray(x.transpose(2, 0, 1)), label

    def denormalize(self, x):
        """Undo __call__ for display: (3, H, W) float -> (H, W, 3) uint8 RGB."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"denormalize expects a (3, H, W) image, got shape {x.shape}")
        x = x.transpose(1, 2, 0)
        if self.mode == "caffe":
            x = (x + np.float32(self.CAFFE_MEAN_BGR))[..., ::-1]
        elif self.mode == "torchvision":
            x = (x * np.float32(self.TORCHVISION_STD) + np.float32(self.TORCHVISION_MEAN)) * 255
        elif self.mode == "unit":
            x = x * 255
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    def __repr__(self):
        return f"Normalize(mode={self.mode!r})"


class RandomScale:
    """Resize by a factor drawn uniformly from scale_range (labels: nearest neighbour).

    image_interpolation: "bilinear" (default) or "nearest".
    """

    def __init__(self, scale_range=(0.5, 2.0), image_interpolation="bilinear"):
        low, high = tuple(scale_range) if np.size(scale_range) == 2 else (0.0, 0.0)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        if image_interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"image_interpolation must be 'bilinear' or 'nearest', "
                             f"got {image_interpolation!r}")
        self.scale_range = (float(low), float(high))
        self.image_interpolation = image_interpolation

    def __call__(self, image, label, rng):
        image, label = _check_pair(image, label, "RandomScale")
        _check_rng(rng, "RandomScale")
        scale = rng.uniform(*self.scale_range)
        height, width = label.shape
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        resample = Image.BILINEAR if self.image_interpolation == "bilinear" else Image.NEAREST
        return _resize_image(image, size, resample), _resize_label(label, size)

    def __repr__(self):
        return (f"RandomScale(scale_range={self.scale_range}, "
                f"image_interpolation={self.image_interpolation!r})")


def _resize_image(image, size, resample):
    height, width = size
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((width, height), resample))
    # Float images: Pillow's 32-bit float mode "F", one channel at a time.
    channels = [Image.fromarray(image[..., c].astype(np.float32)).resize((width, height), resample)
                for c in range(3)]
    return np.stack([np.asarray(channel) for channel in channels], axis=-1).astype(image.dtype)


def _resize_label(label, size):
    height, width = size
    return np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))


class RandomCrop:
    """Cut a random size = (h, w) window; pad first where the image is smaller.

    Padding goes on the bottom and right: the image with `fill` (default the
    mean pixel, which normalises to ~0), the label with `ignore_index`, so
    padded pixels never count in the loss.
    """

    def __init__(self, size, fill=MEAN_RGB_255, ignore_index=IGNORE_INDEX):
        self.size = pair("size", size, 1)
        self.fill = tuple(float(f) for f in np.broadcast_to(np.asarray(fill, dtype=np.float64), (3,)))
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index must be in [0, 255] for a uint8 label, got {ignore_index!r}")
        self.ignore_index = int(ignore_index)

    def __call__(self, image, label, rng):
        image, label = _check_pair(image, label, "RandomCrop")
        _check_rng(rng, "RandomCrop")
        crop_h, crop_w = self.size
        height, width = label.shape
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        if pad_h or pad_w:
            padded = np.empty((height + pad_h, width + pad_w, 3), dtype=image.dtype)
            fill = np.asarray(self.fill)
            padded[...] = np.rint(fill) if np.issubdtype(image.dtype, np.integer) else fill
            padded[:height, :width] = image
            image = padded
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=self.ignore_index)
        top = int(rng.integers(0, label.shape[0] - crop_h + 1))
        left = int(rng.integers(0, label.shape[1] - crop_w + 1))
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        return np.ascontiguousarray(image[window]), np.ascontiguousarray(label[window])

    def __repr__(self):
        return f"RandomCrop(size={self.size}, fill={self.fill}, ignore_index={self.ignore_index})"


class RandomHorizontalFlip:
    """Mirror left-right with probability p."""

    def __init__(self, p=0.5):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, image, label, rng):
        image, label = _check_pair(image, label, "RandomHorizontalFlip")
        _check_rng(rng, "RandomHorizontalFlip")
        if rng.random() < self.p:
            return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
        return image, label

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"
