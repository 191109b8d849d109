"""Segment any image with a trained checkpoint: a coloured label PNG and an overlay.

    python -m minifcn predict runs/fcn8s/checkpoint.npz photo.jpg --out photo_seg.png
    python examples/predict.py runs/fcn8s/checkpoint.npz photo.jpg

The checkpoint written by the training loop carries its config, so the
right model (variant, backbone, width, number of classes) and the right
input preprocessing are rebuilt from it.
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image, UnidentifiedImageError

from minifcn import visualize
from minifcn.autograd import no_grad
from minifcn.backend import to_device, to_numpy
from minifcn.checkpoint import load_checkpoint, read_checkpoint_extra
from minifcn.data.transforms import Normalize
from minifcn.data.voc import VOC_CLASSES, voc_palette
from minifcn.tensor import Tensor
from minifcn.training.config import TrainConfig, build_datasets, build_model


def load_trained(checkpoint, device="cpu"):
    """(model in eval mode, TrainConfig, class names) from a training checkpoint."""
    extra = read_checkpoint_extra(checkpoint)
    if "config" not in extra:
        raise ValueError(f"{checkpoint!r} holds no training config; was it written by minifcn.train?")
    config = TrainConfig(**{**extra["config"], "device": device})
    if config.data == "synthetic":
        class_names = list(build_datasets(config)[2])
    else:
        class_names = list(VOC_CLASSES)
    model = build_model(config, len(class_names))
    load_checkpoint(checkpoint, model)
    return model.to(device).eval(), config, class_names


def read_image(path):
    """An RGB uint8 (H, W, 3) array, with an error that names the file."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image file: {path!r}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path!r} is not a readable image ({err})") from None


def segment(model, image, preprocessing, device="cpu"):
    """Label map (H, W) uint8 for an (H, W, 3) uint8 image."""
    x, _ = Normalize(preprocessing)(image, np.zeros(image.shape[:2], np.uint8))
    with no_grad():
        scores = model(Tensor(to_device(x[None], device)))
    return to_numpy(scores.data[0].argmax(axis=0)).astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="minifcn predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.npz written by examples/train_fcn8s.py")
    parser.add_argument("image", help="any image file Pillow reads (JPEG, PNG, ...)")
    parser.add_argument("--out", help="label PNG to write (default: <image>_labels.png); "
                                      "the overlay goes beside it as <out>_overlay.png")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.out is not None and os.path.splitext(args.out)[1].lower() != ".png":
        print(f"error: --out must name a .png file (the labels are a palette PNG), got {args.out!r}",
              file=sys.stderr)
        return 1
    try:
        model, config, class_names = load_trained(args.checkpoint, args.device)
        image = read_image(args.image)
        labels = segment(model, image, config.preprocessing, args.device)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = args.out or os.path.splitext(args.image)[0] + "_labels.png"
    overlay_path = os.path.splitext(out)[0] + "_overlay.png"
    palette = voc_palette()
    label_image = Image.fromarray(labels).convert("P")  # a VOC-style palette PNG
    label_image.putpalette(palette.reshape(-1).tolist())
    label_image.save(out)
    visualize.side_by_side([[image, visualize.overlay(image, labels, palette=palette)]],
                           titles=["image", "prediction"], path=overlay_path)
    found = sorted(set(labels.reshape(-1).tolist()))
    print(f"classes found: {', '.join(class_names[i] for i in found if i < len(class_names))}")
    print(f"wrote {out} (palette PNG: pixel values are class indices) and {overlay_path}")
    return 0
