"""Tests for minifcn.visualize: colours, layouts, and PNGs that open with the right size."""

import numpy as np
import pytest
from PIL import Image

from minifcn import visualize
from minifcn.data.voc import voc_palette


def read_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_colorize_uses_the_palette():
    label = np.array([[0, 1, 15], [255, 2, 0]], dtype=np.uint8)
    rgb = visualize.colorize(label)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == (128, 0, 0) and tuple(rgb[0, 2]) == (192, 128, 128)
    assert tuple(rgb[1, 0]) == (224, 224, 192)            # ignore: near white
    custom = visualize.colorize(np.array([[0, 1]]), palette=[(1, 2, 3), (4, 5, 6)])
    np.testing.assert_array_equal(custom[0], [(1, 2, 3), (4, 5, 6)])


def test_colorize_errors():
    with pytest.raises(ValueError, match="do not fit a palette of 2 colours"):
        visualize.colorize(np.array([[0, 2]]), palette=[(0, 0, 0), (1, 1, 1)])
    with pytest.raises(ValueError, match=r"\(H, W\) integer array"):
        visualize.colorize(np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(P, 3\)"):
        visualize.colorize(np.zeros((2, 2), dtype=np.uint8), palette=np.zeros((4, 4)))


def test_overlay_tints_only_foreground():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    label = np.array([[0, 1], [255, 2]], dtype=np.uint8)
    out = visualize.overlay(image, label, alpha=0.5)
    assert tuple(out[0, 0]) == (100, 100, 100) and tuple(out[1, 0]) == (100, 100, 100)
    assert tuple(out[0, 1]) == (114, 50, 50)              # halfway to (128, 0, 0)
    np.testing.assert_array_equal(visualize.overlay(image, label, alpha=0.0), image)
    assert tuple(visualize.overlay(image, label, alpha=1.0)[1, 1]) == tuple(voc_palette()[2])
    with pytest.raises(ValueError, match="alpha"):
        visualize.overlay(image, label, alpha=2)
    with pytest.raises(ValueError, match="must match"):
        visualize.overlay(image, label[:1])
    with pytest.raises(ValueError, match="uint8 RGB image"):
        visualize.overlay(image.astype(np.float32), label)


def test_side_by_side_layout_and_png(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (20, 30)).astype(np.uint8)
    path = tmp_path / "out" / "compare.png"
    out = visualize.side_by_side([image, label, label], ["image", "truth", "pred"], path, gap=4)
    assert out.shape == (16 + 20 + 2 * 4, 3 * 30 + 4 * 4, 3)
    np.testing.assert_array_equal(read_png(path), out)
    np.testing.assert_array_equal(out[20:40, 4:34], image)                     # first tile, below the caption
    np.testing.assert_array_equal(out[20:40, 38:68], visualize.colorize(label))  # a label is coloured
    assert (out[:16] != 255).any()                                            # captions were drawn


def test_side_by_side_rows_scale_and_uneven_sizes():
    small = np.zeros((10, 12, 3), dtype=np.uint8)
    big = np.zeros((14, 8), dtype=np.uint8)
    out = visualize.side_by_side([[small, big], [big, small]], scale=2, gap=2)
    # columns as wide as their widest tile, rows as tall as their tallest (scaled by 2)
    assert out.shape == (2 * 28 + 3 * 2, 24 + 24 + 3 * 2, 3)


def test_side_by_side_errors():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="one caption per column"):
        visualize.side_by_side([image, image], ["only one"])
    with pytest.raises(ValueError, match="same number of images"):
        visualize.side_by_side([[image, image], [image]])
    with pytest.raises(ValueError, match="at least one image"):
        visualize.side_by_side([])
    with pytest.raises(ValueError, match="scale"):
        visualize.side_by_side([image], scale=0)


def test_plot_curves_png(tmp_path):
    steps = np.arange(50)
    loss = 2 * np.exp(-steps / 15.0)
    loss[20] = np.nan                                      # a gap, not a crash
    path = tmp_path / "curves.png"
    out = visualize.plot_curves(path, {"train loss": (steps, loss), "val mean IU": ([10], [0.5])},
                                title="training", xlabel="iteration", ylabel="value", size=(400, 300))
    assert out.shape == (300, 400, 3)
    np.testing.assert_array_equal(read_png(path), out)
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert visualize.LINE_COLORS[0] in colours and visualize.LINE_COLORS[1] in colours


def test_plot_curves_flat_series():
    out = visualize.plot_curves(None, {"constant": ([0, 1, 2], [3.0, 3.0, 3.0])})
    assert out.shape == (400, 640, 3)


def test_plot_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        visualize.plot_curves(tmp_path / "a.png", {})
    with pytest.raises(ValueError, match="'loss' needs xs and ys of one non-zero length"):
        visualize.plot_curves(tmp_path / "a.png", {"loss": ([1, 2], [1])})
    with pytest.raises(ValueError, match="no finite"):
        visualize.plot_curves(tmp_path / "a.png", {"loss": ([1], [np.nan])})


@pytest.mark.parametrize("low, high", [(0, 1), (0.013, 0.92), (-3, 250), (1000, 1000)])
def test_nice_ticks_cover_the_range(low, high):
    ticks = visualize._nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and 3 <= len(ticks) <= 12
    steps = np.diff(ticks)
    np.testing.assert_allclose(steps, steps[0])


def test_confusion_matrix_image(tmp_path):
    cm = np.array([[50, 5, 0], [10, 40, 0], [0, 0, 0]])
    path = tmp_path / "cm.png"
    out = visualize.confusion_matrix_image(cm, ["background", "disc", "box"], path, cell=30)
    np.testing.assert_array_equal(read_png(path), out)
    height, width, _ = out.shape
    # the darkest cell (row 0, column 0 at 50/55 of its row) sits top-left of the grid
    grid_top, grid_left = height - 10 - 3 * 30, width - 10 - 3 * 30
    corner = out[grid_top + 2, grid_left + 2].astype(int)
    empty = out[grid_top + 2 * 30 + 2, grid_left + 2 * 30 + 2].astype(int)
    assert corner.sum() < 300 and tuple(empty) == (247, 251, 255)
    with pytest.raises(ValueError, match="square"):
        visualize.confusion_matrix_image(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="name all 3 classes"):
        visualize.confusion_matrix_image(cm, ["a", "b"])


def test_kernel_image(tmp_path):
    kernel = np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25])   # a 4x4 bilinear kernel
    path = tmp_path / "kernel.png"
    out = visualize.kernel_image(kernel, path, cell=20)
    np.testing.assert_array_equal(read_png(path), out)
    assert out.shape[0] == 4 * 20 + 16
    assert tuple(out[8 + 30, 8 + 30]) == tuple(visualize.VIRIDIS[-1].astype(np.uint8))   # max: yellow
    assert tuple(out[8 + 2, 8 + 2]) == tuple(visualize.VIRIDIS[0].astype(np.uint8))      # min: purple
    assert visualize.kernel_image(np.zeros((64, 64))).shape[0] == 64 * 6 + 16            # large: auto cell
    with pytest.raises(ValueError, match="2-D"):
        visualize.kernel_image(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        visualize.kernel_image(np.array([[np.nan]]))
