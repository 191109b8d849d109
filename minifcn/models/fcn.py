"""The FCN head: score layers, learned-or-fixed upsampling, skip fusion, crops.

Long, Shelhamer and Darrell turn a classification net into a dense
predictor in three moves:

1. *Convolutionalise*: the fully connected layers become convolutions
   (VGG16's fc6 a 7x7 convolution, fc7 a 1x1), so the net slides over an
   image of any size and outputs a coarse map of features, one pixel per 32
   image pixels.
2. *Score*: a 1x1 convolution (``score_fr``) gives ``num_classes`` scores per
   coarse pixel.
3. *Upsample*: a transposed convolution initialised to bilinear
   interpolation (``upscore``, stride 32) brings the scores back to image
   resolution, and a crop aligns them with the image: FCN-32s.

FCN-16s first upsamples the coarse scores by 2 (``upscore2``), adds scores
computed from pool4 (``score_pool4``, stride 16) and upsamples the sum by 16
(``upscore16``). FCN-8s adds pool3 scores at stride 8 too (``upscore_pool4``,
``score_pool3``, ``upscore8``). Every sum needs the two maps cropped into
register; the offsets come from ``minifcn.models.geometry``, derived from the
layers, and are kept in ``model.crop_offsets``.

A backbone (``VGGFCN`` in vgg.py, ``ResNetFCN`` in resnet.py) subclasses
``FCN``: it creates its layers, then calls ``_build_head``, and provides

- ``encode(x)`` -> {8: stride-8 features, 16: stride-16, 32: stride-32}
- ``encoder_paths()`` -> {stride: the spatial layers from the image to it}

Staged training (the paper trains 32s, then 16s from it, then 8s):
``fcn16s_from_fcn32s`` and ``fcn8s_from_fcn16s`` copy every layer by name
into the finer net. The new skip score layers start at zero, so the finer net
predicts the coarse net's scores, upsampled by its own bilinear layers.
"""

import numpy

from minifcn import nn
from minifcn.functional.shape import crop
from minifcn.models import geometry

STRIDES = (32, 16, 8)

# The name of the last upsampling layer of each net, as in the reference prototxts.
FINAL_UPSAMPLING = {32: "upscore", 16: "upscore16", 8: "upscore8"}


class FCN(nn.Module):
    """Base class of the FCN-32s/16s/8s nets; see the module docstring.

    Attributes after construction:
        stride          32, 16 or 8: the finest feature stride fused
        num_classes     scores per pixel
        crop_offsets    {"score_pool4c": 5, "score_pool3c": 9, "score": 31, ...}:
                        where each map is cropped (the keys ending in "c" name
                        the cropped blobs of the reference nets; "upscore2c" and
                        "upscore_pool4c" are 0 there)
        coord_maps      {blob name: geometry.CoordMap} image position of pixel i
        config          the constructor arguments, less ``stride``
        preprocessing   None, or after load_vgg16_weights the normalisation the
                        weights expect: "torchvision" or "caffe", a mode of
                        minifcn.data.transforms.Normalize
    """

    def upsampling_shape(self, factor):
        """(kernel_size, padding) of a bilinear upsampling layer by ``factor``.
        The reference's is (2 * factor, 0); ResNet overrides it."""
        return 2 * factor, 0

    def encode(self, x):
        raise NotImplementedError

    def encoder_paths(self):
        raise NotImplementedError

    # ---- construction ------------------------------------------------------
    def _build_head(self, num_classes, stride, channels, learnable_upsampling):
        """Create the score and upsampling layers; ``channels`` maps each feature
        stride (8, 16, 32) to its channel count."""
        if stride not in STRIDES:
            raise ValueError(f"stride must be one of {STRIDES} (FCN-32s/16s/8s), got {stride!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, numpy.integer)) \
                or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.stride, self.num_classes = stride, int(num_classes)
        self.learnable_upsampling = bool(learnable_upsampling)
        self.score_fr = self._score_layer(channels[32])
        if stride <= 16:
            self.upscore2 = self._upsampling_layer(2)
            self.score_pool4 = self._score_layer(channels[16])
        if stride == 8:
            self.upscore_pool4 = self._upsampling_layer(2)
            self.score_pool3 = self._score_layer(channels[8])
        setattr(self, FINAL_UPSAMPLING[stride], self._upsampling_layer(stride))
        self._derive_geometry()

    def _score_layer(self, in_channels):
        """A 1x1 convolution to class scores, starting at zero as in the reference."""
        layer = nn.Conv2d(in_channels, self.num_classes, 1)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer

    def _upsampling_layer(self, factor):
        """A bias-free transposed convolution, fixed to bilinear interpolation
        unless ``learnable_upsampling``."""
        kernel, padding = self.upsampling_shape(factor)
        layer = nn.ConvTranspose2d(self.num_classes, self.num_classes, kernel, stride=factor,
                                   padding=padding, bias=False)
        nn.init.bilinear_(layer.weight)
        layer.weight.requires_grad_(self.learnable_upsampling)
        return layer

    @property
    def final_upsampling(self):
        return getattr(self, FINAL_UPSAMPLING[self.stride])

    def _fusions(self):
        """(upsampling layer, skip score layer, feature stride, blob names) per fusion."""
        steps = []
        if self.stride <= 16:
            steps.append((self.upscore2, self.score_pool4, 16, "upscore2", "score_pool4", "fuse_pool4"))
        if self.stride == 8:
            steps.append((self.upscore_pool4, self.score_pool3, 8, "upscore_pool4", "score_pool3",
                          "fuse_pool3"))
        return steps

    def _derive_geometry(self):
        """Compose the coordinate maps along every path and read off the crops."""
        paths = self.encoder_paths()
        maps = {f"features{s}": geometry.path_map(paths[s]) for s in paths}
        maps["score_fr"] = geometry.path_map([self.score_fr], maps["features32"])
        offsets, coarse = {}, maps["score_fr"]
        for upsample, score, feature_stride, up_name, skip_name, fuse_name in self._fusions():
            maps[up_name] = geometry.path_map([upsample], coarse)
            maps[skip_name] = geometry.path_map([score], maps[f"features{feature_stride}"])
            offsets[up_name + "c"], offsets[skip_name + "c"] = geometry.fuse_offsets(
                maps[up_name], maps[skip_name])
            coarse = maps[fuse_name] = geometry.cropped_map(maps[up_name], offsets[up_name + "c"])
        final = FINAL_UPSAMPLING[self.stride]
        maps[final] = geometry.path_map([self.final_upsampling], coarse)
        try:
            offsets["score"] = geometry.crop_offset(maps[final], geometry.IDENTITY)
        except ValueError as err:
            raise ValueError(f"this configuration cannot be aligned with the image: {err}") from None
        maps["score"] = geometry.cropped_map(maps[final], offsets["score"])
        self.coord_maps, self.crop_offsets = maps, offsets

    # ---- sizes without running the net --------------------------------------
    def blob_sizes(self, n):
        """The length of every blob along one axis for an input of length ``n``,
        following the same rules as ``forward`` (pure arithmetic, no arrays)."""
        paths = self.encoder_paths()
        sizes = {f"features{s}": geometry.path_size(paths[s], n) for s in paths}
        coarse = sizes["score_fr"] = sizes["features32"]
        for upsample, _, feature_stride, up_name, skip_name, fuse_name in self._fusions():
            sizes[up_name] = geometry.path_size([upsample], coarse)
            sizes[skip_name] = sizes[f"features{feature_stride}"]
            coarse = sizes[fuse_name] = min(sizes[up_name] - self.crop_offsets[up_name + "c"],
                                            sizes[skip_name] - self.crop_offsets[skip_name + "c"])
        final = FINAL_UPSAMPLING[self.stride]
        sizes[final] = geometry.path_size([self.final_upsampling], coarse)
        return sizes

    def covers(self, n):
        """True when an input of length n gets a full (length n) score map."""
        sizes = self.blob_sizes(n)
        fused = [sizes[name] for *_, name in self._fusions()]
        return min([sizes["score_fr"]] + fused) >= 1 and \
            sizes[FINAL_UPSAMPLING[self.stride]] - self.crop_offsets["score"] >= n

    # ---- forward ---------------------------------------------------------------
    def forward(self, x):
        """x (N, 3, H, W) -> scores (N, num_classes, H, W)."""
        if len(x.shape) != 4:
            raise ValueError(f"{type(self).__name__} expects images of shape (N, C, H, W), "
                             f"got shape {tuple(x.shape)}")
        return self.decode(self.encode(x), tuple(x.shape[2:]))

    def decode(self, features, size, blobs=None):
        """Scores of an (H, W) = ``size`` image from its ``encode`` features.

        ``blobs``, if a dict, receives every intermediate map by its reference
        name (score_fr, upscore2, score_pool4c, fuse_pool4, ..., score).
        """
        blobs = {} if blobs is None else blobs
        score = blobs["score_fr"] = self.score_fr(features[32])
        for upsample, score_layer, feature_stride, up_name, skip_name, fuse_name in self._fusions():
            blobs[up_name] = upsample(score)
            blobs[skip_name] = score_layer(features[feature_stride])
            score = blobs[fuse_name] = self._fuse(
                blobs[up_name], blobs[skip_name],
                self.crop_offsets[up_name + "c"], self.crop_offsets[skip_name + "c"])
        score = blobs[FINAL_UPSAMPLING[self.stride]] = self.final_upsampling(score)
        height, width = size
        offset = self.crop_offsets["score"]
        if min(score.shape[2] - offset - height, score.shape[3] - offset - width) < 0:
            raise ValueError(f"the upsampled scores {tuple(score.shape[2:])} do not cover the "
                             f"{height}x{width} input after the crop at {offset}")
        blobs["score"] = crop(score, (offset, offset), (height, width))
        return blobs["score"]

    @staticmethod
    def _fuse(upsampled, skip, up_offset, skip_offset):
        """Crop both maps to their common window and add them (Caffe's Crop + Eltwise SUM)."""
        height = min(upsampled.shape[2] - up_offset, skip.shape[2] - skip_offset)
        width = min(upsampled.shape[3] - up_offset, skip.shape[3] - skip_offset)
        if min(height, width) < 1:
            raise ValueError(f"maps of sizes {tuple(upsampled.shape[2:])} and {tuple(skip.shape[2:])} "
                             f"do not overlap at offsets {up_offset} and {skip_offset}")
        return _crop_to(upsampled, up_offset, height, width) + _crop_to(skip, skip_offset, height, width)

    def extra_repr(self):
        return f"FCN-{self.stride}s, num_classes={self.num_classes}, crop_offsets={self.crop_offsets}"


def _crop_to(x, offset, height, width):
    if offset == 0 and tuple(x.shape[2:]) == (height, width):
        return x
    return crop(x, (offset, offset), (height, width))


# ---- staged training ---------------------------------------------------------------

def from_coarser(model, stride=None):
    """A finer FCN (``stride``, default model.stride // 2) initialised from ``model``.

    Every parameter and buffer whose name exists in both nets is copied (the
    backbone, fc6/fc7, score_fr, and for 8s from 16s also score_pool4 and
    upscore2); the new skip score layers are zero and the new upsampling
    layers bilinear. The copy is on model's device, in model's dtype and
    training mode, with model's frozen/learnable flags on the copied layers.

    What holds at the start: score_fr of both nets is identical, and the finer
    net's output is the coarse net's *fused* scores passed through the finer
    net's own upsampling (2x, then 16x or 8x) instead of the coarse net's;
    bilinear layers reproduce linear ramps exactly, so the two predictions
    agree wherever the scores are locally linear and differ only by the
    smoothing of the two interpolation kernels.
    """
    if not isinstance(model, FCN):
        raise TypeError(f"from_coarser needs an FCN model, got {type(model).__name__}")
    stride = model.stride // 2 if stride is None else stride
    if stride not in STRIDES or stride >= model.stride:
        raise ValueError(f"stride must be finer than the model's {model.stride} and one of "
                         f"{STRIDES}, got {stride!r}")
    finer = type(model)(stride=stride, **model.config)
    coarse_params = dict(model.named_parameters())
    dtype = next(iter(coarse_params.values())).dtype
    if finer.score_fr.weight.dtype != dtype:
        finer.to(dtype=dtype)
    own = finer.state_dict()
    shared = {name: value for name, value in model.state_dict().items() if name in own}
    finer.load_state_dict(shared, strict=False)
    for name, param in finer.named_parameters():
        if name in coarse_params:
            param.requires_grad_(coarse_params[name].requires_grad)
    finer.preprocessing = model.preprocessing
    finer.train(model.training)
    return finer.to(model.score_fr.weight.device)


def fcn16s_from_fcn32s(model32):
    """FCN-16s initialised from a trained FCN-32s (the reference's second stage)."""
    if getattr(model32, "stride", None) != 32:
        raise ValueError(f"fcn16s_from_fcn32s needs an FCN-32s, got stride "
                         f"{getattr(model32, 'stride', None)!r}")
    return from_coarser(model32, 16)


def fcn8s_from_fcn16s(model16):
    """FCN-8s initialised from a trained FCN-16s (the reference's third stage)."""
    if getattr(model16, "stride", None) != 16:
        raise ValueError(f"fcn8s_from_fcn16s needs an FCN-16s, got stride "
                         f"{getattr(model16, 'stride', None)!r}")
    return from_coarser(model16, 8)
