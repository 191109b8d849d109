"""SyntheticShapes: a segmentation dataset drawn from a seed, no download.

Each sample is a textured, noisy background with a few shapes on it. The four
foreground classes differ by *shape*, never by colour (every object's colour
is drawn independently of its class), so a network has to learn geometry:

    0 background   1 disc   2 box (rotated rectangle)   3 triangle   4 bar

The bar is the thin-structure class: a line segment 2-3 px wide. A prediction
made at stride 32 and upsampled (FCN-32s) smears it away; the skip connections
of FCN-16s/8s bring it back, which is the point the FCN paper makes.

Like PASCAL VOC, labels mark a thin band along object borders with 255
("ignore"), shapes overlap (later ones drawn on top), and images have varying,
non-square sizes.

How a shape is drawn: every shape is a *signed distance function* (SDF),
negative inside, zero on the outline, positive outside, evaluated on the whole
pixel grid at once with NumPy. From one SDF we get the label (sdf <= 0), the
ignore band (0 < sdf <= border) and an anti-aliased image edge
(coverage = clip(0.5 - sdf, 0, 1)), all exactly consistent with each other.

Sample i depends only on (seed, split, i), so random access is deterministic
and train and val never share a sample.
"""

import zlib

import numpy as np

from minifcn.data.voc import voc_palette

CLASS_NAMES = ("background", "disc", "box", "triangle", "bar")
THIN_CLASSES = (4,)      # classes a few pixels wide: the test of fine detail
IGNORE_INDEX = 255


class SyntheticShapes:
    """Shapes on textured backgrounds, generated on the fly.

    Args:
        split: "train", "val" or "test"; each split has its own random stream.
        size: number of samples (``len(dataset)``).
        seed: base seed; the same (seed, split, index) always gives the same sample.
        image_size: int, or (min, max) pixel range from which height and width
            are drawn independently (inclusive).
        max_objects: each image holds 1..max_objects shapes.
        border: width in pixels of the ignore (255) band around objects; 0 for none.

    ``dataset[i]`` returns ``(image, label)``: (H, W, 3) uint8 RGB and (H, W)
    uint8 class indices.
    """

    SPLITS = ("train", "val", "test")
    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    ignore_index = IGNORE_INDEX
    thin_classes = THIN_CLASSES

    def __init__(self, split="train", size=1000, seed=0, image_size=(64, 112), max_objects=4, border=1):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(image_size, (int, np.integer)):
            image_size = (image_size, image_size)
        if (len(image_size) != 2 or not all(isinstance(s, (int, np.integer)) for s in image_size)
                or not 16 <= image_size[0] <= image_size[1]):
            raise ValueError(f"image_size must be an int >= 16 or a pair (min, max) with "
                             f"16 <= min <= max, got {image_size!r}")
        if not isinstance(max_objects, (int, np.integer)) or max_objects < 1:
            raise ValueError(f"max_objects must be a positive int, got {max_objects!r}")
        if not isinstance(border, (int, np.integer)) or border < 0:
            raise ValueError(f"border must be a non-negative int, got {border!r}")
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_objects = int(max_objects)
        self.border = int(border)
        self.palette = voc_palette()
        # A stable number per split name (Python's hash() changes between runs).
        self._split_key = zlib.crc32(split.encode())

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for SyntheticShapes({self.split!r}) "
                             f"of size {self.size}")
        index = int(index) % self.size
        rng = np.random.default_rng([self.seed, self._split_key, index])
        return _draw_sample(rng, self.image_size, self.max_objects, self.border)

    def __repr__(self):
        return (f"SyntheticShapes(split={self.split!r}, size={self.size}, seed={self.seed}, "
                f"image_size={self.image_size}, max_objects={self.max_objects}, border={self.border})")


def _draw_sample(rng, image_size, max_objects, border):
    low, high = image_size
    height, width = (int(s) for s in rng.integers(low, high + 1, size=2))
    ys = np.arange(height, dtype=np.float32)[:, None]    # (H, 1) and (1, W): broadcasting
    xs = np.arange(width, dtype=np.float32)[None, :]     # gives (H, W) without a meshgrid

    image = _background(rng, ys, xs)                     # (H, W, 3) float32, 0-255 scale
    label = np.zeros((height, width), dtype=np.uint8)
    sdfs = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        class_index = int(rng.integers(1, len(CLASS_NAMES)))
        sdf = _SHAPES[class_index](rng, ys, xs, min(height, width))
        color = _contrasting_color(rng, image, sdf)
        shading = _linear_ramp(rng, ys, xs, amplitude=25.0)     # objects are not flat either
        box = _bounding_box(sdf < 0.5)                           # blend only where the shape is
        coverage = np.clip(0.5 - sdf[box], 0.0, 1.0)[..., None]  # 1 inside, 0 outside, ramp on the edge
        image[box] += (color + shading[box][..., None] - image[box]) * coverage
        label[sdf <= 0] = class_index                            # later shapes paint over earlier ones
        sdfs.append(sdf)

    if border > 0:
        label[_ignore_band(sdfs, border)] = IGNORE_INDEX

    image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(3.0, 12.0)   # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8), label


def _bounding_box(mask):
    """Slices of the smallest rectangle holding all True pixels of mask (empty if none)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _ignore_band(sdfs, border):
    """Pixels within `border` px outside an object's visible outline.

    Walking from the top shape down, an object's band covers background and
    objects below it, never the object itself or anything drawn above it: so a
    thin bar keeps all its pixels and the band sits on the outer side of every
    visible edge, as in the VOC annotations.
    """
    band = np.zeros(sdfs[0].shape, dtype=bool)
    covered = np.zeros(sdfs[0].shape, dtype=bool)      # pixels of shapes above the current one
    for sdf in reversed(sdfs):
        band |= (sdf > 0) & (sdf <= border) & ~covered
        covered |= sdf <= 0
    return band


# ---------------------------------------------------------------- background

def _background(rng, ys, xs):
    """Smooth colour gradient + slow colour waves + optional stripes and soft blobs.

    The first parts are scalar fields, each tinted by its own colour vector, so
    the image is one matrix product: (H, W, fields) @ (fields, 3).
    """
    height, width = ys.shape[0], xs.shape[1]
    start, end = rng.uniform(0, 255, size=(2, 3))
    fields = [np.ones((height, width), dtype=np.float32), _unit_ramp(rng, ys, xs)]   # flat colour + gradient
    colors = [start, end - start]
    for _ in range(2):                                     # slow waves: period 40-120 px
        fields.append(_wave(rng, ys, xs, period=rng.uniform(40, 120)))
        colors.append(rng.uniform(-30, 30, 3))
    if rng.random() < 0.5:                                 # stripes: soft, so unlike a bar's sharp edges
        fields.append(_wave(rng, ys, xs, period=rng.uniform(6, 14)))
        colors.append(rng.uniform(-35, 35, 3))
    image = np.stack(fields, axis=-1) @ np.asarray(colors, dtype=np.float32)
    for _ in range(int(rng.integers(0, 3))):               # blurry blobs: unlike a disc's sharp edge
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma, strength = rng.uniform(6, 16), rng.uniform(0.3, 0.7)
        weight = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / np.float32(2 * sigma**2)) * np.float32(strength)
        image += weight[..., None] * (rng.uniform(0, 255, 3).astype(np.float32) - image)
    return image


def _unit_ramp(rng, ys, xs):
    angle = rng.uniform(0, 2 * np.pi)
    t = xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


def _linear_ramp(rng, ys, xs, amplitude):
    return (_unit_ramp(rng, ys, xs) - 0.5) * np.float32(2 * rng.uniform(0, amplitude))


def _wave(rng, ys, xs, period):
    angle = rng.uniform(0, 2 * np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    k = np.float32(2 * np.pi / period)
    return np.sin(k * (xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))) + np.float32(phase))


def _contrasting_color(rng, image, sdf):
    """A random colour that stands out from the background under the shape.

    Eight candidates are drawn at once (a fixed number keeps the random stream
    deterministic); the first at L1 distance >= 120 from the mean colour under
    the shape wins, else the farthest one.
    """
    inside = sdf <= 0
    local = image[inside].mean(axis=0) if inside.any() else image.reshape(-1, 3).mean(axis=0)
    candidates = rng.uniform(0, 255, size=(8, 3)).astype(np.float32)
    distance = np.abs(candidates - local).sum(axis=1)
    far_enough = np.flatnonzero(distance >= 120)
    return candidates[far_enough[0] if far_enough.size else int(distance.argmax())]


# ---------------------------------------------------------------- shapes (signed distance functions)
# Each returns an (H, W) float32 SDF: < 0 inside, 0 on the outline, > 0 outside (in pixels).
# `extent` is min(H, W), so shapes scale with the image.

def _random_center(rng, ys, xs):
    height, width = ys.shape[0], xs.shape[1]
    return rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width


def _disc(rng, ys, xs, extent):
    cy, cx = _random_center(rng, ys, xs)
    radius = rng.uniform(0.10, 0.22) * extent
    return np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2) - np.float32(radius)


def _box(rng, ys, xs, extent):
    """A rotated rectangle, aspect ratio 1 to 1.7 (a square is one kind of box)."""
    cy, cx = _random_center(rng, ys, xs)
    half_long = rng.uniform(0.10, 0.22) * extent
    half_short = half_long * rng.uniform(0.6, 1.0)
    angle = rng.uniform(0, np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = np.abs((xs - cx) * cos + (ys - cy) * sin) - np.float32(half_long)    # box-local coordinates,
    v = np.abs(-(xs - cx) * sin + (ys - cy) * cos) - np.float32(half_short)  # minus the half extents
    outside = np.sqrt(np.maximum(u, 0) ** 2 + np.maximum(v, 0) ** 2)
    inside = np.minimum(np.maximum(u, v), 0)
    return outside + inside


def _triangle(rng, ys, xs, extent):
    """A jittered equilateral triangle.

    Inside, the SDF is the largest of the three edges' signed line distances
    (all negative); outside, it is the distance to the nearest edge segment,
    which keeps the ignore band even around the sharp corners.
    """
    cy, cx = _random_center(rng, ys, xs)
    radius = rng.uniform(0.14, 0.28) * extent
    angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * (2 * np.pi / 3) + rng.uniform(-0.25, 0.25, 3)
    radii = radius * rng.uniform(0.85, 1.15, 3)
    corners = np.stack([cy + radii * np.sin(angles), cx + radii * np.cos(angles)], axis=1)   # (3, [y, x])
    line_distance = segment_distance = None
    for i in range(3):
        (y0, x0), (y1, x1) = corners[i], corners[(i + 1) % 3]
        # Corners go counter-clockwise in (x, y), so the outward normal of edge (p0 -> p1) is (dy, -dx).
        ny, nx = -(x1 - x0), (y1 - y0)
        norm = np.hypot(ny, nx)
        line = (ys - y0) * np.float32(ny / norm) + (xs - x0) * np.float32(nx / norm)
        segment = _distance_to_segment(ys, xs, (y0, x0), (y1, x1))
        line_distance = line if line_distance is None else np.maximum(line_distance, line)
        segment_distance = segment if segment_distance is None else np.minimum(segment_distance, segment)
    return np.where(line_distance <= 0, line_distance, segment_distance)


def _bar(rng, ys, xs, extent):
    """A line segment 2-3 px wide: the distance to the segment minus half the width."""
    cy, cx = _random_center(rng, ys, xs)
    half_length = rng.uniform(0.25, 0.45) * extent
    half_width = rng.uniform(1.0, 1.5)
    angle = rng.uniform(0, np.pi)
    dy, dx = half_length * np.sin(angle), half_length * np.cos(angle)
    return _distance_to_segment(ys, xs, (cy - dy, cx - dx), (cy + dy, cx + dx)) - np.float32(half_width)


def _distance_to_segment(ys, xs, start, end):
    """Distance of every pixel to the segment start-end (points given as (y, x))."""
    (y0, x0), (y1, x1) = start, end
    length_sq = max((y1 - y0) ** 2 + (x1 - x0) ** 2, 1e-12)
    # Project onto the segment's line, clamp to the segment, measure to that nearest point.
    dy, dx = np.float32(y1 - y0), np.float32(x1 - x0)
    t = np.clip(((ys - y0) * dy + (xs - x0) * dx) / np.float32(length_sq), 0, 1)
    return np.sqrt((ys - y0 - t * dy) ** 2 + (xs - x0 - t * dx) ** 2)


_SHAPES = {1: _disc, 2: _box, 3: _triangle, 4: _bar}
