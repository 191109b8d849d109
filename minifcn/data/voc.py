"""PASCAL VOC segmentation: the folder layout, class names and colour map.

The reader expects the layout of ``VOCdevkit/VOC2012`` (or any folder shaped
like it)::

    root/JPEGImages/<id>.jpg                 RGB photographs
    root/SegmentationClass/<id>.png          palette PNGs: pixel value = class index
    root/ImageSets/Segmentation/<split>.txt  one image id per line (train, val, ...)

Label PNGs are stored in palette mode ("P"): each pixel holds a class index and
the palette only says how to colour it. Reading them with Pillow *without*
converting to RGB gives the indices directly. Index 255 marks the thin band
along object borders and other pixels the annotators left undecided; training
and evaluation ignore it.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from minifcn.data.errors import DatasetError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat",
    "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike",
    "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

IGNORE_INDEX = 255


def voc_palette(num_entries=256):
    """The standard VOC colour map as a (num_entries, 3) uint8 array.

    Colour i spreads the bits of i over the three channels, most significant
    first: bit 0 of i goes to red bit 7, bit 1 to green bit 7, bit 2 to blue
    bit 7, bit 3 to red bit 6, and so on. So 1 is dark red (128, 0, 0), 2 dark
    green, 15 "person" (192, 128, 128) and 255 the cream (224, 224, 192) used
    for ignored pixels.
    """
    if not 1 <= int(num_entries) <= 256:
        raise ValueError(f"num_entries must be in [1, 256], got {num_entries!r}")
    index = np.arange(num_entries)
    palette = np.zeros((num_entries, 3), dtype=np.int64)
    for bit in range(8):                      # three bits of i per step, one per channel
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


class VOCSegmentation:
    """PASCAL VOC images and labels for one split.

    ``VOCSegmentation(root, split="train")[i]`` returns ``(image, label)``:
    image (H, W, 3) uint8 RGB, label (H, W) uint8 class indices with 255 =
    ignore. Folders, the split file and every listed file are checked when the
    dataset is built, so a broken copy fails at once with the missing path
    rather than hours into training; a corrupt file is reported, with its path,
    when it is read.
    """

    class_names = VOC_CLASSES
    num_classes = len(VOC_CLASSES)
    ignore_index = IGNORE_INDEX

    def __init__(self, root, split="train"):
        self.root = Path(root)
        self.split = split
        self.palette = voc_palette()
        self.image_dir = self.root / "JPEGImages"
        self.label_dir = self.root / "SegmentationClass"
        split_dir = self.root / "ImageSets" / "Segmentation"

        if not self.root.is_dir():
            raise DatasetError(
                f"VOC root {self.root} is not a directory; expected the folder holding "
                "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/ (e.g. VOCdevkit/VOC2012)")
        for folder in (self.image_dir, self.label_dir, split_dir):
            if not folder.is_dir():
                raise DatasetError(f"VOC folder {folder} is missing under root {self.root}")

        split_file = split_dir / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(p.stem for p in split_dir.glob("*.txt"))
            raise DatasetError(f"split file {split_file} not found for split={split!r}; "
                               f"available splits: {available}")
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise DatasetError(f"split file {split_file} lists no image ids")

        missing = [str(path) for image_id in self.ids
                   for path in (self.image_path(image_id), self.label_path(image_id))
                   if not path.is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DatasetError(f"{len(missing)} file(s) listed by {split_file} are missing: {shown}")

    def image_path(self, image_id):
        return self.image_dir / f"{image_id}.jpg"

    def label_path(self, image_id):
        return self.label_dir / f"{image_id}.png"

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for VOC split {self.split!r} "
                             f"with {len(self)} images")
        image_id = self.ids[index]
        image = _read_image(self.image_path(image_id))
        label = _read_label(self.label_path(image_id), self.num_classes)
        if label.shape != image.shape[:2]:
            raise DatasetError(
                f"label {self.label_path(image_id)} is {label.shape[1]}x{label.shape[0]} (WxH) but image "
                f"{self.image_path(image_id)} is {image.shape[1]}x{image.shape[0]}; they must match")
        return image, label

    def __repr__(self):
        return f"VOCSegmentation(root={str(self.root)!r}, split={self.split!r}, size={len(self)})"


def _open_image(path):
    """Open and fully decode an image; any decoding failure names the file."""
    try:
        with Image.open(path) as image:
            image.load()   # decode now: a truncated file fails here, not later
            return image.copy()
    except (OSError, SyntaxError, ValueError) as error:   # PIL raises all three on bad data
        raise DatasetError(f"cannot read image file {path}: {error}") from error


def _read_image(path):
    # convert("RGB") also handles the few greyscale and CMYK JPEGs in VOC.
    return np.asarray(_open_image(path).convert("RGB"), dtype=np.uint8)


def _read_label(path, num_classes):
    label_image = _open_image(path)
    if label_image.mode not in ("P", "L"):
        raise DatasetError(
            f"label file {path} has mode {label_image.mode!r}; expected a palette ('P') or "
            "greyscale ('L') PNG whose pixel values are class indices, not colours")
    label = np.asarray(label_image, dtype=np.uint8)   # mode "P": the indices, not the palette colours
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise DatasetError(f"label file {path} holds class values {sorted(np.unique(label[bad]).tolist())}; "
                           f"expected 0..{num_classes - 1} or {IGNORE_INDEX} (ignore)")
    return label
