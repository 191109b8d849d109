"""Draw the pictures of the guided tour (docs/images/*.png).

    python examples/compare_fcn_variants.py --out runs/compare     # trains the three nets
    python docs/make_figures.py --run runs/compare                 # draws from that run
    python docs/make_figures.py --only bilinear_kernel --default-run runs/fcn8s   # the default run's

Pictures:

    bilinear_kernel.png  the bilinear upsampling kernels, 4x4 (factor 2) and 64x64 (factor 32)
    upsampling.png       one class's stride-32 scores of the trained FCN-32s, upsampled by 32
                         three ways: nearest, bilinear, transposed convolution (upscore)
    score_maps.png       the trained FCN-8s's scores of the thin class "bar" before fusion:
                         score_fr (stride 32), score_pool4 (16), score_pool3 (8)
    confusion.png        the validation confusion matrix of FCN-8s
    curves.png           training loss and validation mean IU of the three nets
    comparison.png       image / ground truth / FCN-32s / FCN-16s / FCN-8s (drawn by the run)

Only bilinear_kernel.png needs no run; --only bilinear_kernel draws just that.
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

import minifcn as mf
import minifcn.functional as F
from minifcn import models, visualize
from minifcn.data.synthetic import SyntheticShapes
from minifcn.data.transforms import Normalize
from minifcn.nn.init import bilinear_filter

IMAGES = Path(__file__).resolve().parent / "images"
VARIANTS = ("32s", "16s", "8s")


# ---- the run's nets ----------------------------------------------------------------------

class Run:
    """The nets, settings and records of one run of examples/compare_fcn_variants.py."""

    def __init__(self, folder):
        self.folder = Path(folder)
        missing = [name for name in ("results.json", "history.json", "comparison.png", "fcn8s.npz")
                   if not (self.folder / name).exists()]
        if missing:
            raise FileNotFoundError(f"{self.folder} has no {', '.join(missing)}; run "
                                    f"python examples/compare_fcn_variants.py --out {self.folder} first")
        self.results = json.loads((self.folder / "results.json").read_text())
        self.history = json.loads((self.folder / "history.json").read_text())
        settings = self.results["settings"]
        self.val = SyntheticShapes("val", size=settings["val_size"], seed=settings["seed"])
        self.normalize = Normalize(self.results["preprocessing"])

    def model(self, variant):
        net = models.build_fcn(int(variant[:-1]), num_classes=SyntheticShapes.num_classes,
                               **self.results["model"])
        mf.load_weights(self.folder / f"fcn{variant}.npz", net)
        return net.eval()

    def input(self, image):
        """(1, 3, H, W) Tensor for an (H, W, 3) uint8 image, normalised as in training."""
        x, _ = self.normalize(image, np.zeros(image.shape[:2], np.uint8), None)
        return mf.Tensor(x[None])

    def image_with(self, class_index, skip=0):
        """The first validation image (after ``skip`` of them) with many pixels of a class."""
        found = []
        for index in range(len(self.val)):
            image, label = self.val[index]
            if (label == class_index).sum() >= 60:
                found.append((image, label))
                if len(found) > skip:
                    return found[-1]
        return self.val[0]


def inside_image(blob, coord_map, height, width):
    """The part of a (1, K, h, w) map whose pixel centres lie over the image.

    ``coord_map`` (minifcn.models.geometry) gives image position = scale * i + shift.
    """
    scale, shift = float(coord_map.scale), float(coord_map.shift)
    first = max(0, math.ceil(-shift / scale))
    last_row = min(blob.shape[2] - 1, math.floor((height - 1 - shift) / scale))
    last_col = min(blob.shape[3] - 1, math.floor((width - 1 - shift) / scale))
    return blob[0, :, first:last_row + 1, first:last_col + 1]


def heat(array, size):
    """A heat map of a 2-D array, each pixel about size / max(array.shape) wide."""
    cell = max(1, size // max(array.shape))
    return visualize.kernel_image(array, cell=cell, annotate=False)


# ---- the figures ---------------------------------------------------------------------------

def bilinear_kernel(run, path):
    small = visualize.kernel_image(bilinear_filter(4), cell=48)
    large = visualize.kernel_image(bilinear_filter(64), cell=3)
    visualize.side_by_side([small, large], titles=["4x4: factor 2 (upscore2)", "64x64: factor 32 (upscore)"],
                           path=path)


def upsampling(run, path):
    """One class's coarse scores of FCN-32s, brought to the image three ways."""
    net = run.model("32s")
    disc = SyntheticShapes.class_names.index("disc")
    image, label = run.image_with(disc)
    height, width = label.shape
    blobs = {}
    with mf.no_grad():
        net.decode(net.encode(run.input(image)), (height, width), blobs)
    coarse = blobs["score_fr"][:, disc:disc + 1]                         # (1, 1, h, w), stride 32
    # interpolate by 32 (align_corners=False) puts coarse pixel i at output 32*i + 15.5; the
    # coarse pixel itself lies at image 32*i + shift, so the image starts 15.5 - shift further in
    shift = float(net.coord_maps["score_fr"].shift)
    offset = int(round(15.5 - shift))
    nearest, bilinear = (F.interpolate(coarse, scale_factor=32, mode=mode).numpy()[0, 0]
                         [offset:offset + height, offset:offset + width] for mode in ("nearest", "bilinear"))
    transposed = blobs["score"].numpy()[0, disc]                         # upscore, then the crop
    coarse_view = inside_image(coarse.numpy(), net.coord_maps["score_fr"], height, width)[0]
    pictures = [image, label, heat(coarse_view, 2 * max(height, width))] + \
        [heat(m, 2 * max(height, width)) for m in (nearest, bilinear, transposed)]
    titles = ["image", "ground truth", "score_fr (stride 32)", "nearest x32", "bilinear x32",
              "transposed conv x32"]
    pictures[:2] = [np.kron(p, np.ones((2, 2, 1) if p.ndim == 3 else (2, 2), p.dtype)) for p in pictures[:2]]
    visualize.side_by_side(pictures, titles=titles, path=path, palette=run.val.palette)


def score_maps(run, path):
    """The thin class's scores at strides 32, 16 and 8, before they are added up (FCN-8s)."""
    net = run.model("8s")
    bar = SyntheticShapes.thin_classes[0]
    rows = []
    for skip in (0, 1):
        image, label = run.image_with(bar, skip)
        height, width = label.shape
        blobs = {}
        with mf.no_grad():
            net.decode(net.encode(run.input(image)), (height, width), blobs)
        maps = [inside_image(blobs[name].numpy(), net.coord_maps[name], height, width)[bar]
                for name in ("score_fr", "score_pool4", "score_pool3")]
        size = 2 * max(height, width)
        rows.append([np.kron(image, np.ones((2, 2, 1), np.uint8)), np.kron(label, np.ones((2, 2), np.uint8))]
                    + [heat(m, size) for m in maps] + [heat(blobs["score"].numpy()[0, bar], size)])
    titles = ["image", "ground truth", "score_fr (stride 32)", "score_pool4 (16)", "score_pool3 (8)",
              "fused, upsampled"]
    visualize.side_by_side(rows, titles=titles, path=path, palette=run.val.palette)


def confusion(run, path):
    visualize.confusion_matrix_image(np.array(run.results["confusion"]["8s"]),
                                     list(SyntheticShapes.class_names), path=path)


def curves(run, path):
    """Each net's curves from where its own training began: in the staged schedule
    FCN-16s branches off FCN-32s, and FCN-8s off FCN-16s."""
    losses, ious = {}, {}
    window = max(1, max(len(records) for records in run.history.values()) // 80)  # a running mean
    for variant in VARIANTS:
        start = run.results.get("started", {}).get(variant, 0)
        steps = [r for r in run.history[variant] if "loss" in r and math.isfinite(r["loss"])]
        smooth = np.convolve([r["loss"] for r in steps], np.ones(window) / window, mode="valid")
        points = [(r["iteration"], value) for r, value in zip(steps[window - 1:], smooth)
                  if r["iteration"] > start + window]
        losses[f"FCN-{variant}"] = tuple(zip(*points)) if points else ([0], [float("nan")])
        vals = [r for r in run.history[variant] if "val_mean_iu" in r and r["iteration"] >= start]
        ious[f"FCN-{variant}"] = ([r["iteration"] for r in vals], [r["val_mean_iu"] for r in vals])
    loss_plot = visualize.plot_curves(None, losses, title="training loss (running mean)", xlabel="iteration",
                                      size=(520, 360))
    iou_plot = visualize.plot_curves(None, ious, title="validation mean IU", xlabel="iteration",
                                     size=(520, 360))
    visualize.side_by_side([loss_plot, iou_plot], path=path)


def comparison(run, path):
    shutil.copyfile(run.folder / "comparison.png", path)


def network_name(model):
    """A net's settings (build_fcn's options) in words: "VGG16 layout, 1/8 of the channels, ..."."""
    backbone = str(model.get("backbone", "vgg16")).upper()
    parts = [f"{backbone} layout"]
    width = model.get("width", 1)
    if width != 1:
        parts.append(f"1/{round(1 / width)} of the channels")
    if model.get("batch_norm"):
        parts.append("BatchNorm")
    if "fc6_kernel" in model:
        parts.append(f"fc6 {model['fc6_kernel']}x{model['fc6_kernel']}")
    if "conv1_padding" in model:
        parts.append(f"conv1 padding {model['conv1_padding']}")
    if "fc6_padding" in model:
        parts.append(f"fc6 padding {model['fc6_padding']}")
    parts.append("upsampling learnt from bilinear" if model.get("learnable_upsampling") else "bilinear upsampling")
    return ", ".join(parts)


def with_heading(path, text):
    """The picture at ``path`` with a line of text above it (wider if the line needs it): which
    network it comes from."""
    from PIL import Image, ImageDraw
    picture = Image.open(path).convert("RGB")
    text_width = ImageDraw.Draw(picture).textlength(text, font=visualize.font())
    headed = Image.new("RGB", (max(picture.width, int(text_width) + 12), picture.height + 20), (255, 255, 255))
    headed.paste(picture, (0, 20))
    ImageDraw.Draw(headed).text((6, 4), text, fill=(0, 0, 0), font=visualize.font())
    headed.save(path)


def default_predictions(folder, path):
    """The predictions picture of a default run of examples/train_fcn8s.py, headed with its net."""
    from minifcn.train import TrainConfig
    shutil.copyfile(Path(folder) / "predictions.png", path)
    config = TrainConfig()
    recipe = dict(backbone=config.backbone, width=config.width, batch_norm=config.batch_norm,
                  fc6_kernel=config.fc6_kernel, conv1_padding=config.conv1_padding,
                  fc6_padding=config.fc6_padding, learnable_upsampling=config.learnable_upsampling)
    with_heading(path, "FCN-8s, trained by examples/train_fcn8s.py: " +
                 network_name(recipe))


FROM = {"upsampling": "FCN-32s", "score_maps": "FCN-8s", "confusion": "FCN-8s", "curves": "FCN-32s, 16s and 8s",
        "comparison": "FCN-32s, 16s and 8s"}  # which nets of the run each picture shows

DRAW = {"bilinear_kernel": bilinear_kernel, "upsampling": upsampling, "score_maps": score_maps,
        "confusion": confusion, "curves": curves, "comparison": comparison}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/compare", help="output folder of compare_fcn_variants.py")
    parser.add_argument("--out", default=str(IMAGES), help="where to write the PNG files")
    parser.add_argument("--only", nargs="+", choices=list(DRAW), default=list(DRAW), help="figures to draw")
    parser.add_argument("--default-run", default=None, metavar="FOLDER",
                        help="also draw default_predictions.png from this run of examples/train_fcn8s.py")
    args = parser.parse_args(argv)
    try:
        run = Run(args.run) if set(args.only) - {"bilinear_kernel"} else None
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.default_run:
        default_predictions(args.default_run, out / "default_predictions.png")
        print(out / "default_predictions.png")
    for name in args.only:
        DRAW[name](run, out / f"{name}.png")
        if run is not None and name in FROM:
            with_heading(out / f"{name}.png", f"{FROM[name]}, trained here: {network_name(run.results['model'])}")
        print(out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
