"""ImageNet VGG16 weights for the FCN encoder (conv1_1 ... conv5_3, fc6, fc7).

FCN starts from a classifier trained on ImageNet. Three key layouts are read,
from ``.safetensors`` or ``.npz`` files (``numpy.load(allow_pickle=False)``:
nothing read can run code; a PyTorch ``.pth`` must be converted first, see
docs/pretrained.md):

- "torchvision" (vgg16-397923af.pth): ``features.N.weight/bias`` for the
  thirteen convolutions (N = 0, 2, 5, ... 28: the ReLUs and pools between them
  hold indices too), ``classifier.0`` (4096, 25088) = fc6,
  ``classifier.3`` (4096, 4096) = fc7, ``classifier.6`` (1000 classes).
- "timm" (vgg16.tv_in1k): the same ``features.N``, and the classifier already
  convolutional: ``pre_logits.fc1`` (4096, 512, 7, 7) = fc6,
  ``pre_logits.fc2`` (4096, 4096, 1, 1) = fc7, ``head.fc`` (1000 classes).
- "caffe": our own names (``conv1_1.weight`` ... ``fc7.bias``, ``fc8`` the
  classifier), as a converted VGG_ILSVRC_16_layers.caffemodel has them; fc6/fc7
  may be given either fully connected (2-D) or as convolutions (4-D).

Convolutionalisation: a fully connected layer on a (512, 7, 7) input is a
7x7 convolution whose weight is the same numbers, reshaped. torchvision
flattens the pool5 output channel-major (index c*49 + y*7 + x), which is
exactly NumPy's C order for (512, 7, 7), so (4096, 25088) -> (4096, 512, 7, 7)
is a plain ``reshape``; fc7 becomes (4096, 4096, 1, 1). The 1000-class layer
is not used: FCN scores its own classes from fc7.

The weights only work on images normalised the way they were trained, so
the loader records it on the model as ``model.preprocessing`` ("torchvision":
RGB / 255, minus mean, over std; "caffe": BGR, minus the mean pixel, 0-255
scale), the mode string that ``minifcn.data.transforms.Normalize`` takes.
torchvision and timm weights default to "torchvision", Caffe-named ones to
"caffe"; pass ``preprocessing=`` when a file says otherwise (e.g. Caffe
weights converted into the torchvision layout).
"""

import os
from collections.abc import Mapping

import numpy

from minifcn.models.vgg import VGG16_BLOCKS

PREPROCESSING = {
    "torchvision": dict(channel_order="RGB", scale=1 / 255, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225)),
    "caffe": dict(channel_order="BGR", scale=1.0, mean=(104.00698793, 116.66876762, 122.67891434),
                  std=(1.0, 1.0, 1.0)),
}
LAYOUTS = ("torchvision", "timm", "caffe")
DEFAULT_PREPROCESSING = {"torchvision": "torchvision", "timm": "torchvision", "caffe": "caffe"}

# The 1000-class ImageNet classifier of each layout: present in the files, not used.
_CLASSIFIER = {"torchvision": "classifier.6.", "timm": "head.fc.", "caffe": "fc8."}


def _conv_names():
    return [f"conv{block}_{index}" for block, convs in enumerate(VGG16_BLOCKS, start=1)
            for index in range(1, len(convs) + 1)]


def features_indices():
    """{conv name: index in torchvision's ``features`` Sequential}, counted as
    torchvision builds it: each convolution is followed by a ReLU, each block by a pool."""
    indices, position = {}, 0
    for block, convs in enumerate(VGG16_BLOCKS, start=1):
        for index in range(1, len(convs) + 1):
            indices[f"conv{block}_{index}"] = position
            position += 2  # the convolution and its ReLU
        position += 1  # the max pool
    return indices


def key_map(layout, include_fc=True):
    """{source key: our parameter name} for ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    fc_sources = {"torchvision": ("classifier.0", "classifier.3"),
                  "timm": ("pre_logits.fc1", "pre_logits.fc2"),
                  "caffe": ("fc6", "fc7")}[layout]
    layers = {name: (f"features.{index}" if layout != "caffe" else name)
              for name, index in features_indices().items()}
    if include_fc:
        layers.update(fc6=fc_sources[0], fc7=fc_sources[1])
    return {f"{source}.{kind}": f"{name}.{kind}" for name, source in layers.items()
            for kind in ("weight", "bias")}


def detect_layout(keys):
    keys = set(keys)
    if "classifier.0.weight" in keys:
        return "torchvision"
    if "pre_logits.fc1.weight" in keys:
        return "timm"
    if "conv1_1.weight" in keys:
        return "caffe"
    raise ValueError("cannot tell the layout of these VGG16 weights: expected torchvision "
                     "(classifier.0.weight), timm (pre_logits.fc1.weight) or Caffe names "
                     f"(conv1_1.weight); the file has {sorted(keys)[:8]}...")


def read_arrays(source):
    """name -> NumPy array from a .safetensors or .npz file (or a mapping, as is)."""
    if isinstance(source, Mapping):
        return {str(key): numpy.asarray(value) for key, value in source.items()}
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return load_file(path)
    if path.endswith(".npz"):
        with numpy.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    raise ValueError(f"{path}: weights must be a .safetensors or .npz file; a PyTorch .pth "
                     "must first be converted where torch is installed (see docs/pretrained.md)")


def convert_vgg16(arrays, layout, target_shapes, include_fc=True):
    """Rename (and for fc6/fc7 reshape) the arrays of ``layout`` into our names.

    target_shapes: {our name: shape} of the model's parameters. Returns
    {our name: array}. Every problem (a missing key, an unknown key, a shape
    that fits no reshape) is reported in one ValueError.
    """
    mapping = key_map(layout, include_fc)
    ignored = _CLASSIFIER[layout]
    skipped_fc = () if include_fc else tuple(key_map(layout, True).keys() - mapping.keys())
    missing = [key for key in mapping if key not in arrays]
    unexpected = [key for key in arrays
                  if key not in mapping and not key.startswith(ignored) and key not in skipped_fc]
    converted, mismatched = {}, []
    for key, name in mapping.items():
        if key not in arrays:
            continue
        array, shape = arrays[key], tuple(target_shapes[name])
        if array.shape != shape and array.size == numpy.prod(shape) and name.startswith("fc"):
            array = array.reshape(shape)  # a fully connected layer as a convolution
        if array.shape != shape:
            mismatched.append(f"{key} {tuple(arrays[key].shape)} -> {name} {shape}")
        else:
            converted[name] = array
    if missing or unexpected or mismatched:
        lines = [f"these {layout} VGG16 weights do not fit the model:"]
        if missing:
            lines.append(f"  missing: {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected: {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  mis-shaped: {'; '.join(mismatched)}")
            lines.append("  (ImageNet VGG16 needs the full-width model (width=1) with fc6_kernel=7 "
                         "and 4096 fc channels; pass include_fc=False to load only the convolutions)")
        raise ValueError("\n".join(lines))
    return converted


def load_vgg16_weights(model, source, layout=None, include_fc=True, preprocessing=None):
    """Load ImageNet VGG16 weights into a VGG16 FCN's encoder; returns the model.

    source: a .safetensors / .npz path, or a mapping name -> array.
    layout: "torchvision", "timm" or "caffe" (default: told by the key names).
    include_fc: also load fc6 and fc7 (convolutionalised); False loads the
        thirteen convolutions only (for a model with a smaller fc6).
    preprocessing: "torchvision" or "caffe", recorded as model.preprocessing
        (default: the layout's usual one).
    The score and upsampling layers are left as they are. Nothing changes
    unless every array fits.
    """
    if getattr(model, "backbone", None) != "vgg16":
        raise ValueError(f"load_vgg16_weights needs a VGG16 FCN, got backbone "
                         f"{getattr(model, 'backbone', None)!r}")
    arrays = read_arrays(source)
    layout = detect_layout(arrays) if layout is None else layout
    preprocessing = DEFAULT_PREPROCESSING.get(layout) if preprocessing is None else preprocessing
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {tuple(PREPROCESSING)}, got {preprocessing!r}")
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters()}
    converted = convert_vgg16(arrays, layout, shapes, include_fc)
    model.load_state_dict(converted, strict=False)
    model.preprocessing = preprocessing
    model.pretrained_source = source if isinstance(source, (str, os.PathLike)) else "<arrays>"
    return model
