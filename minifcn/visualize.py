"""Pictures of segmentation results, drawn with Pillow alone (no matplotlib).

- ``colorize``: class indices -> colours (the VOC colour map by default).
- ``overlay``: classes tinted over the photograph.
- ``side_by_side``: image / ground truth / predictions in a row, with captions.
- ``plot_curves``: training loss, validation mean IU, ... as a line plot.
- ``confusion_matrix_image``: which classes are mistaken for which.
- ``kernel_image``: a 2-D array as a heat map (e.g. the bilinear upsampling kernel).

Each function returns the picture as an (H, W, 3) uint8 array and, given a
``path``, also writes it as a PNG.
"""

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from minifcn.data.voc import voc_palette

WHITE, BLACK, GREY, LIGHT_GREY = (255, 255, 255), (0, 0, 0), (110, 110, 110), (225, 225, 225)
# Distinct line colours (the "tab10" cycle), one per curve.
LINE_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
# Anchor colours of the perceptually even "viridis" map, low to high.
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
                   dtype=np.float64)


@functools.lru_cache(maxsize=None)
def font():
    try:
        return ImageFont.load_default(size=12)   # Pillow >= 10.1: a scalable font bundled with Pillow
    except TypeError:
        return ImageFont.load_default()          # older Pillow: the small built-in bitmap font


def _text_size(draw, text):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font())
    return right - left, bottom - top


def _save(image, path):
    """Write a PIL image as PNG (when path is given) and return it as an array."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
    return np.asarray(image.convert("RGB"))


def _check_rgb(image, name):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be an (H, W, 3) uint8 RGB image, "
                         f"got shape {image.shape} dtype {image.dtype}")
    return image


# ---------------------------------------------------------------- label maps

def colorize(label, palette=None):
    """(H, W) class indices -> (H, W, 3) uint8 colours; palette (P, 3), default VOC (255 = cream white)."""
    label = np.asarray(label)
    palette = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an (H, W) integer array, "
                         f"got shape {label.shape} dtype {label.dtype}")
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must be (P, 3) RGB rows, got shape {palette.shape}")
    if label.size and (label.min() < 0 or label.max() >= len(palette)):
        raise ValueError(f"label values {int(label.min())}..{int(label.max())} do not fit a palette "
                         f"of {len(palette)} colours")
    return palette[label]


def overlay(image, label, alpha=0.5, palette=None, ignore_index=255):
    """Tint the pixels of foreground classes with their colours; background (0) and ignored pixels stay."""
    image = _check_rgb(image, "image")
    label = np.asarray(label)
    if label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} must match the image's (H, W) {image.shape[:2]}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    colors = colorize(label, palette).astype(np.float32)
    tinted = (label != 0) & (label != ignore_index)
    blend = image.astype(np.float32)
    blend[tinted] = (1 - alpha) * blend[tinted] + alpha * colors[tinted]
    return np.rint(blend).astype(np.uint8)


def side_by_side(images, titles=None, path=None, scale=1, palette=None, gap=4):
    """Images in a row (or rows), each column captioned, e.g. image | ground truth | FCN-32s | FCN-8s.

    images: a list of arrays, or a list of such lists for several rows. An
        (H, W, 3) uint8 array is shown as is; an (H, W) integer array is a label
        map and is coloured with `palette`.
    titles: one caption per column, or None.
    scale: integer enlargement (nearest neighbour) for small images.
    """
    several_rows = len(images) > 0 and isinstance(images[0], (list, tuple))
    rows = [list(row) for row in images] if several_rows else [list(images)]
    if not rows or not rows[0]:
        raise ValueError("images must hold at least one image")
    columns = len(rows[0])
    if any(len(row) != columns for row in rows):
        raise ValueError(f"every row needs the same number of images, "
                         f"got row lengths {[len(r) for r in rows]}")
    if titles is not None and len(titles) != columns:
        raise ValueError(f"titles must have one caption per column ({columns}), got {len(titles)}")
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")

    tiles = [[_as_tile(picture, palette, scale) for picture in row] for row in rows]
    column_widths = [max(row[c].width for row in tiles) for c in range(columns)]
    row_heights = [max(tile.height for tile in row) for row in tiles]
    caption = 16 if titles is not None else 0
    canvas = Image.new("RGB", (sum(column_widths) + gap * (columns + 1),
                               caption + sum(row_heights) + gap * (len(rows) + 1)), WHITE)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for c, width in enumerate(column_widths):
        if titles is not None:
            text_width, _ = _text_size(draw, str(titles[c]))
            draw.text((x + (width - text_width) // 2, gap // 2 + 2), str(titles[c]), fill=BLACK, font=font())
        y = gap + caption
        for r, height in enumerate(row_heights):
            canvas.paste(tiles[r][c], (x, y))
            y += height + gap
        x += width + gap
    return _save(canvas, path)


def _as_tile(picture, palette, scale):
    picture = np.asarray(picture)
    if picture.ndim == 2:
        picture = colorize(picture, palette)
    picture = _check_rgb(picture, "each image")
    tile = Image.fromarray(picture)
    return tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST) if scale > 1 else tile


# ---------------------------------------------------------------- line plots

def _nice_ticks(low, high, count=5):
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if high <= low:            # a flat curve still needs an axis
        pad = abs(low) * 0.5 or 1.0
        low, high = low - pad, high + pad
    raw_step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


def plot_curves(path, series, title="", xlabel="", ylabel="", size=(640, 400)):
    """Line plot of named (xs, ys) series on one pair of axes, with ticks, grid and legend.

    series: dict name -> (xs, ys), e.g. {"train loss": (iterations, losses),
    "val mean IU": (iterations_at_eval, mean_ius)}. NaN values leave a gap.
    """
    if not series:
        raise ValueError("series must name at least one (xs, ys) curve")
    curves = {}
    for name, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, dtype=np.float64).ravel(), np.asarray(ys, dtype=np.float64).ravel()
        if xs.shape != ys.shape or xs.size == 0:
            raise ValueError(f"series {name!r} needs xs and ys of one non-zero length, "
                             f"got {xs.size} and {ys.size}")
        curves[name] = (xs, ys)
    points = np.concatenate([np.stack(c, axis=1) for c in curves.values()])
    points = points[np.isfinite(points).all(axis=1)]
    if points.size == 0:
        raise ValueError("series hold no finite (x, y) point to plot")
    width, height = size
    left, right, top, bottom = 64, 16, 30 if title else 14, 44 if xlabel else 30
    x_ticks = _nice_ticks(points[:, 0].min(), points[:, 0].max())
    y_ticks = _nice_ticks(points[:, 1].min(), points[:, 1].max())

    def to_pixel(x, y):
        px = left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (width - left - right)
        py = height - bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (height - top - bottom)
        return px, py

    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    for value in x_ticks:                                   # vertical grid lines and x tick labels
        px, _ = to_pixel(value, y_ticks[0])
        draw.line([(px, top), (px, height - bottom)], fill=LIGHT_GREY)
        text = f"{value:g}"
        draw.text((px - _text_size(draw, text)[0] / 2, height - bottom + 5), text, fill=GREY, font=font())
    for value in y_ticks:                                   # horizontal grid lines and y tick labels
        _, py = to_pixel(x_ticks[0], value)
        draw.line([(left, py), (width - right, py)], fill=LIGHT_GREY)
        text = f"{value:g}"
        text_width, text_height = _text_size(draw, text)
        draw.text((left - text_width - 6, py - text_height / 2 - 1), text, fill=GREY, font=font())
    draw.rectangle([left, top, width - right, height - bottom], outline=BLACK)

    for (name, (xs, ys)), color in zip(curves.items(), _cycle(LINE_COLORS)):
        finite = np.isfinite(xs) & np.isfinite(ys)
        # Split at NaNs: each run of finite points is one polyline.
        for run in np.split(np.arange(xs.size), np.flatnonzero(np.diff(finite.astype(np.int8)) != 0) + 1):
            if finite[run[0]]:
                line = [to_pixel(xs[i], ys[i]) for i in run]
                if len(line) == 1:
                    (px, py), = line
                    draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
                else:
                    draw.line(line, fill=color, width=2)

    if title:
        draw.text(((width - _text_size(draw, title)[0]) / 2, 8), title, fill=BLACK, font=font())
    if xlabel:
        draw.text(((width - _text_size(draw, xlabel)[0]) / 2, height - 16), xlabel, fill=BLACK, font=font())
    if ylabel:
        _vertical_text(canvas, ylabel, (4, top + (height - top - bottom) // 2), BLACK)
    _legend(draw, list(curves), right_edge=width - right - 8, top=top + 8)
    return _save(canvas, path)


def _cycle(items):
    while True:
        yield from items


def _legend(draw, names, right_edge, top):
    """A boxed legend in the top-right corner: a coloured line and the name per curve."""
    line_height = 14
    text_width = max(_text_size(draw, name)[0] for name in names)
    box_left = right_edge - text_width - 34
    draw.rectangle([box_left, top, right_edge, top + line_height * len(names) + 6], fill=WHITE, outline=GREY)
    for i, (name, color) in enumerate(zip(names, _cycle(LINE_COLORS))):
        y = top + 4 + i * line_height
        draw.line([(box_left + 6, y + 6), (box_left + 24, y + 6)], fill=color, width=2)
        draw.text((box_left + 30, y), name, fill=BLACK, font=font())


def _vertical_text(canvas, text, left_center, color):
    """Paste text rotated by 90 degrees (reading upwards), its middle at left_center."""
    draw = ImageDraw.Draw(canvas)
    text_width, text_height = _text_size(draw, text)
    stamp = Image.new("L", (text_width + 2, text_height + 4), 0)
    ImageDraw.Draw(stamp).text((1, 0), text, fill=255, font=font())
    stamp = stamp.rotate(90, expand=True)
    x, y = left_center
    canvas.paste(Image.new("RGB", stamp.size, color), (x, y - stamp.height // 2), stamp)


# ---------------------------------------------------------------- heat maps

def _viridis(values):
    """Values in [0, 1] -> uint8 RGB, interpolating the viridis anchors."""
    position = np.clip(np.asarray(values, dtype=np.float64), 0, 1) * (len(VIRIDIS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(VIRIDIS) - 2)
    t = (position - low)[..., None]
    return np.rint(VIRIDIS[low] * (1 - t) + VIRIDIS[low + 1] * t).astype(np.uint8)


def confusion_matrix_image(cm, class_names, path=None, normalize=True, cell=34):
    """The confusion matrix as a grid: rows = true class, columns = predicted class.

    normalize=True divides each row by its total, so a cell reads "fraction of
    class i predicted as j" and the diagonal is the per-class accuracy. Cells
    shade from white (0) to dark blue (row maximum 1).
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (K, K) matrix, got shape {cm.shape}")
    if len(class_names) != cm.shape[0]:
        raise ValueError(f"class_names must name all {cm.shape[0]} classes, got {len(class_names)}")
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        values = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    else:
        values = cm
    shade = values / values.max() if values.max() > 0 else values

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(_text_size(measure, str(name))[0] for name in class_names) + 10
    k = cm.shape[0]
    origin_x, origin_y = label_width + 16, label_width + 16     # room for row names and rotated column names
    canvas = Image.new("RGB", (origin_x + k * cell + 10, origin_y + k * cell + 10), WHITE)
    draw = ImageDraw.Draw(canvas)
    for i in range(k):
        for j in range(k):
            x, y = origin_x + j * cell, origin_y + i * cell
            blue = (247, 251, 255) + (np.array([8, 48, 107]) - (247, 251, 255)) * shade[i, j]
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=tuple(int(v) for v in blue))
            text = f"{values[i, j]:.2f}" if normalize else f"{int(values[i, j])}"
            text_width, text_height = _text_size(draw, text)
            if text_width < cell - 2:
                draw.text((x + (cell - text_width) / 2, y + (cell - text_height) / 2 - 1), text,
                          fill=WHITE if shade[i, j] > 0.5 else BLACK, font=font())
    for i, name in enumerate(class_names):
        name = str(name)
        text_width, text_height = _text_size(draw, name)
        draw.text((origin_x - text_width - 6, origin_y + i * cell + (cell - text_height) / 2 - 1), name,
                  fill=BLACK, font=font())
        _vertical_text(canvas, name, (origin_x + i * cell + cell // 2 - text_height // 2 - 1,
                                      origin_y - 6 - (text_width + 2) // 2), BLACK)
    draw.text((4, 2), "rows: true, columns: predicted", fill=GREY, font=font())
    draw.rectangle([origin_x - 1, origin_y - 1, origin_x + k * cell, origin_y + k * cell], outline=GREY)
    return _save(canvas, path)


def kernel_image(array2d, path=None, cell=None, annotate=None):
    """A 2-D array as a heat map (viridis, low = purple, high = yellow) with a min/max colour bar.

    cell: pixels per entry (default: fit about 384 px). annotate: print each
    value in its cell (default: when cells are large enough to hold it).
    """
    array = np.asarray(array2d, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"array2d must be a non-empty 2-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("array2d holds NaN or infinite values")
    rows, cols = array.shape
    cell = int(cell) if cell is not None else max(2, min(48, 384 // max(rows, cols)))
    annotate = cell >= 32 if annotate is None else annotate
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.full_like(array, 0.5)

    grid = Image.fromarray(_viridis(scaled)).resize((cols * cell, rows * cell), Image.NEAREST)
    bar_width, margin = 14, 8
    measure = ImageDraw.Draw(grid)
    label_width = max(_text_size(measure, f"{v:.3g}")[0] for v in (low, high))
    canvas_width = grid.width + 3 * margin + bar_width + label_width + 4
    canvas = Image.new("RGB", (canvas_width, grid.height + 2 * margin), WHITE)
    canvas.paste(grid, (margin, margin))
    draw = ImageDraw.Draw(canvas)
    if annotate:
        for i in range(rows):
            for j in range(cols):
                text = f"{array[i, j]:.2g}"
                text_width, text_height = _text_size(draw, text)
                x = margin + j * cell + (cell - text_width) / 2
                y = margin + i * cell + (cell - text_height) / 2 - 1
                draw.text((x, y), text, fill=BLACK if scaled[i, j] > 0.6 else WHITE, font=font())
    bar = _viridis(np.linspace(1, 0, grid.height))[:, None, :].repeat(bar_width, axis=1)   # high at the top
    bar_x = grid.width + 2 * margin
    canvas.paste(Image.fromarray(np.ascontiguousarray(bar)), (bar_x, margin))
    draw.text((bar_x + bar_width + 4, margin), f"{high:.3g}", fill=BLACK, font=font())
    draw.text((bar_x + bar_width + 4, margin + grid.height - 11), f"{low:.3g}", fill=BLACK, font=font())
    return _save(canvas, path)
