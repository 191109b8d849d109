"""Where each pixel of a feature map sits in the image: the crop offsets of FCN.

An FCN adds maps of different resolutions (the upsampled coarse scores and
the scores of pool4 / pool3) and finally cuts the upsampled scores down to the
image. Each of those crops needs an offset, and the offsets are not typed in:
they follow from the kernel, stride and padding of every layer on the way,
as in Caffe's ``coord_map.py`` that the reference nets were generated with.

The coordinate map of a layer
-----------------------------
Every spatial layer relates the positions of its output to those of its
input by an affine map, which we write from the output back to the input::

    x_in = scale * x_out + shift

where ``x_in`` is the centre of what output pixel ``x_out`` sees.

- Convolution or pooling, kernel k (dilation d: effective size d*(k-1) + 1),
  stride s, padding p: output pixel o reads inputs s*o - p ... s*o - p + d*(k-1),
  whose centre is::

      x_in = s * x_out + d*(k-1)/2 - p           scale s, shift d*(k-1)/2 - p

  ceil_mode changes how many outputs there are, never where they sit.
- Transposed convolution ("deconvolution"), kernel k, stride s, padding p:
  input pixel i spreads over outputs s*i - p ... s*i - p + d*(k-1), centred at
  ``s*i + d*(k-1)/2 - p``. It is the inverse map::

      x_in = (x_out - (d*(k-1)/2 - p)) / s       scale 1/s, shift -(d*(k-1)/2 - p)/s

- Pointwise layers (ReLU, dropout, batch norm, 1x1 convolution with stride 1,
  elementwise sum) keep coordinates: scale 1, shift 0.
- A crop starting at ``offset``: ``x_in = x_out + offset``.

Maps compose along a path: if layer A feeds layer B, then
``x_image = A(B(x_out))``. ``path_map(layers)`` returns that composite for
the layers in forward order, so every feature map of the net knows where its
pixel i lies in the image: ``x_image = a*i + b``.

The crop offsets
----------------
Two maps with the same scale a and shifts b1, b2 can be summed pixel by pixel
once the second is cropped by ``(b1 - b2) / a`` (an integer, or the maps are
not on the same grid and no crop can align them). The final crop makes the
scores line up with the image, whose map is the identity: offset ``-b``.

For the reference VGG16 nets (conv1_1 padded by 100, then 3x3 convolutions
with padding 1, which keep coordinates, and 2x2 stride-2 pools, each adding
half an input pixel):

=============  ==========================================  ==================
map            x_image =                                   from
=============  ==========================================  ==================
conv1_1        x - 99                                      (3-1)/2 - 100
pool3          8x - 95.5                                   -99 + .5 + 1 + 2
pool4          16x - 91.5                                  ... + 4
pool5          32x - 83.5                                  ... + 8
fc6 (7x7)      32x + 12.5                                  + 32 * (7-1)/2
upscore 64/32  y - 19                  (FCN-32s)           (x - 31.5) / 32
upscore2 4/2   16y - 11.5                                  (x - 1.5) / 2
upscore16 32   y - 27                  (FCN-16s)           (x - 15.5) / 16
upscore_pool4  8y - 23.5               (FCN-8s)            fuse_pool4 then /2
upscore8 16/8  y - 31                  (FCN-8s)            (x - 7.5) / 8
=============  ==========================================  ==================

so score_pool4 is cropped by (-11.5 + 91.5)/16 = 5, score_pool3 by
(-23.5 + 95.5)/8 = 9, and the outputs by 19 (32s), 27 (16s) and 31 (8s):
the values in the reference prototxts.

Why conv1_1 is padded by 100
----------------------------
Without padding, VGG16 shrinks an image by 32 and fc6 (7x7, no padding) eats
6 more pixels of the stride-32 map: an image smaller than 224x224 would get
no fc6 output at all, and the scores of a larger one would start at image
pixel 112.5 (the centre of fc6's first window) and stop as far from the other
border. Padding conv1_1 by p makes the stride-32 map ceil((H + 2p - 2) / 32)
pixels long and moves the first fc6 centre to 112.5 - p. fc6 needs 7 of
those pixels, so a 1x1 image needs (2p - 1) / 32 > 6, p >= 97. With p = 100
every size down to 1x1 gets scores, the first coarse centre sits at image
pixel 12.5, and the upsampled map runs from image pixel -19 to at least 19
pixels past the image's last one: larger than the image on both sides, and
the final crop (19, 27 or 31) removes the excess. The padding costs compute (a 500x375 image is
convolved at 698x573) but keeps the net exact for any size without special
cases; ``FCN.covers(n)`` and the geometry tests confirm it for every size
from 1 to 1000.

The other way: "same" padding
-----------------------------
Pad conv1_1 by 1 and fc6 by (k - 1) / 2 instead, and every convolution keeps
its map's size: pool-n's map is the image divided by 2^n, rounded up, and its
pixel i is centred on image pixel ``2^n * i + (2^n - 1) / 2``. Nothing is
convolved but image pixels, which for small images is most of the saving
(conv1_1 maps a 96x96 crop to 96x96 instead of 294x294 with p = 100). The
crops are derived the same way and come out 16, 8 and 4 for 32s, 16s and 8s.
The price is at the border: the first coarse centre (15.5) lies inside the
image, so the outermost pixels get their scores from one side only
(docs/06_alignment.md). ``examples/train_fcn8s.py`` trains this way.

Fusion with a general crop
--------------------------
The reference crops only the skip map, which starts earlier in the image
than the upsampled coarse map. With other layer settings (e.g. a 1x1 fc6,
whose first centre is 96 pixels further up) the upsampled map starts
earlier instead, and then it is the one to crop. ``fuse_offsets`` handles
both: it crops whichever starts earlier, and ``FCN`` then trims both to the
length they share.
"""

from fractions import Fraction
from typing import NamedTuple


class CoordMap(NamedTuple):
    """x_in = scale * x_out + shift (exact rational numbers)."""

    scale: Fraction
    shift: Fraction

    def __call__(self, x):
        if hasattr(x, "dtype"):  # an array: float arithmetic, not an array of Fractions
            return float(self.scale) * x + float(self.shift)
        return self.scale * x + self.shift

    def then(self, inner):
        """The map of ``inner`` applied after this one's layer: if this maps B's
        output to A's input and ``inner`` maps C's output to B's output, the
        result maps C's output to A's input."""
        return CoordMap(self.scale * inner.scale, self.scale * inner.shift + self.shift)

    def inverse(self):
        return CoordMap(1 / self.scale, -self.shift / self.scale)

    def __repr__(self):
        return f"CoordMap(x_in = {self.scale} * x_out + {self.shift})"


IDENTITY = CoordMap(Fraction(1), Fraction(0))


class Window(NamedTuple):
    """A convolution or pooling layer, along one spatial axis."""

    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    def coord_map(self):
        extent = self.dilation * (self.kernel - 1)
        return CoordMap(Fraction(self.stride), Fraction(extent, 2) - self.padding)

    def output_size(self, n):
        """PyTorch's rule (and Caffe's for ceil_mode pooling)."""
        span = n + 2 * self.padding - self.dilation * (self.kernel - 1) - 1
        if not self.ceil_mode:
            return span // self.stride + 1 if span >= 0 else 0
        out = -(-span // self.stride) + 1  # rounding up: a window may hang over the far edge
        if (out - 1) * self.stride >= n + self.padding:
            out -= 1  # the last window would start inside the right padding
        return max(out, 0)


class TransposedWindow(NamedTuple):
    """A transposed convolution, along one spatial axis."""

    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    output_padding: int = 0

    def coord_map(self):
        extent = self.dilation * (self.kernel - 1)
        return CoordMap(Fraction(self.stride), Fraction(extent, 2) - self.padding).inverse()

    def output_size(self, n):
        return ((n - 1) * self.stride - 2 * self.padding + self.dilation * (self.kernel - 1)
                + self.output_padding + 1)


class Crop(NamedTuple):
    """The crop layer along one axis: output i is input i + offset."""

    offset: int

    def coord_map(self):
        return CoordMap(Fraction(1), Fraction(self.offset))

    def output_size(self, n):
        return n - self.offset  # at most; FCN's crops also name the size they keep


def _square(value, what):
    """One int from an int or an (h, w) pair with h == w."""
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"geometry handles square layers only; {what} is {tuple(value)}")
        value = value[0]
    return int(value)


def spec(layer):
    """The Window / TransposedWindow / None (pointwise) description of a layer.

    Accepts a spec (returned as is) or a minifcn.nn module, read through its
    kernel_size / stride / padding / dilation attributes.
    """
    if layer is None or isinstance(layer, (Window, TransposedWindow, Crop)):
        return layer
    from minifcn import nn

    def get(name, default=None):
        value = getattr(layer, name, None)
        value = default if value is None else value
        return _square(value, f"{type(layer).__name__}.{name}")

    if isinstance(layer, nn.ConvTranspose2d):
        return TransposedWindow(get("kernel_size"), get("stride", 1), get("padding", 0),
                                get("dilation", 1), get("output_padding", 0))
    if isinstance(layer, nn.Conv2d):
        return Window(get("kernel_size"), get("stride", 1), get("padding", 0), get("dilation", 1))
    if isinstance(layer, nn.MaxPool2d):
        return Window(get("kernel_size"), get("stride", layer.kernel_size), get("padding", 0),
                      get("dilation", 1), bool(layer.ceil_mode))
    if isinstance(layer, (nn.ReLU, nn.Dropout, nn.Dropout2d, nn.BatchNorm2d, nn.Identity)):
        return None
    raise TypeError(f"no coordinate map is defined for {type(layer).__name__}")


def path_map(layers, start=IDENTITY):
    """The map from the output of the last layer to the input of the first
    (or, with ``start``, to whatever ``start`` maps the first input to)."""
    result = start
    for layer in layers:
        layer = spec(layer)
        if layer is not None:
            result = result.then(layer.coord_map())
    return result


def path_size(layers, n):
    """The output length of ``layers`` for an input of length n (0: nothing left)."""
    for layer in layers:
        layer = spec(layer)
        if layer is not None and n > 0:
            n = layer.output_size(n)
    return max(n, 0)


def _integer(value, what):
    if value.denominator != 1:
        raise ValueError(f"{what} is {value}, not a whole number of pixels: the two maps "
                         "are not on the same pixel grid, so no crop can align them")
    return int(value)


def crop_offset(source, target):
    """Offset at which to crop the map ``source`` so that it lines up with
    ``target``: both maps lead to the same reference (the image); the offset
    must be a whole number >= 0."""
    if source.scale != target.scale:
        raise ValueError(f"cannot align maps of different scales ({source.scale} and "
                         f"{target.scale}); upsample one first")
    offset = _integer((target.shift - source.shift) / source.scale, "the crop offset")
    if offset < 0:
        raise ValueError(f"the crop offset is {offset}: the source map starts after the "
                         "target map and cannot be cropped to it")
    return offset


def fuse_offsets(first, second):
    """Offsets (o1, o2) that crop two same-scale maps to their common part:
    pixel i + o1 of the first and i + o2 of the second are at the same place.
    One of the two offsets is 0."""
    if first.scale != second.scale:
        raise ValueError(f"cannot fuse maps of different scales ({first.scale} and "
                         f"{second.scale})")
    delta = _integer((first.shift - second.shift) / first.scale, "the fusion offset")
    return (0, delta) if delta >= 0 else (-delta, 0)


def cropped_map(source, offset):
    """The map of ``source`` cropped at ``offset`` (pixel i is source's i + offset)."""
    return source.then(Crop(offset).coord_map())
