"""The pictures of a run: its curves and a few of its predictions (PNG files)."""

import math

import numpy as np

from minifcn import visualize


def draw_curves(history, path):
    """Training loss (a running mean) and validation mean IU beside it, from the log's records."""
    steps = [r for r in history if "loss" in r and math.isfinite(r["loss"])]
    vals = [r for r in history if "val" in r]
    if not steps:
        return
    window = max(1, len(steps) // 50)  # a running mean, so the trend shows through the noise
    losses = np.convolve([r["loss"] for r in steps], np.ones(window) / window, mode="valid")
    panels = [visualize.plot_curves(
        None, {"training loss": ([r["iteration"] for r in steps][window - 1:], losses)},
        title="training loss", xlabel="iteration")]
    if vals:
        panels.append(visualize.plot_curves(
            None, {"val mean IU": ([r["iteration"] for r in vals], [r["val"]["mean_iu"] for r in vals])},
            title="validation mean IU", xlabel="iteration"))
    visualize.side_by_side([panels], path=path)


def draw_predictions(dataset, predict, path, count, name, palette):
    """Image / ground truth / ``predict(image)`` for the first ``count`` samples of ``dataset``."""
    rows = []
    for index in range(min(count, len(dataset))):
        image, label = dataset[index]
        rows.append([image, label, predict(image)])
    visualize.side_by_side(rows, titles=["image", "ground truth", name], path=path, scale=2, palette=palette)
