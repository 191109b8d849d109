"""Segmentation metrics of the FCN paper, all read off one confusion matrix.

With n_ij the number of pixels of true class i predicted as class j,
t_i = sum_j n_ij the pixels of class i, and K the number of classes
(section 5 of Long, Shelhamer and Darrell):

    pixel accuracy          sum_i n_ii / sum_i t_i
    mean accuracy           (1/K) sum_i n_ii / t_i
    mean IU                 (1/K) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
    frequency weighted IU   (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)

As in the reference ``score.py`` of the FCN repository, a class whose ratio is
0/0 (absent from the truth, and for IU also from the prediction) is left out
of the means (NaN, then nanmean) instead of counting as 0 or 1. Pixels whose
target is ``ignore_index`` (255: VOC's border band) are not counted at all.

Arrays may be NumPy arrays, or CuPy arrays / minifcn Tensors, which are copied
to the host first (this module itself needs only NumPy).
"""

import numpy as np


def _to_numpy(array, name):
    """NumPy view of a NumPy array, a CuPy array (.get()) or a Tensor (.numpy())."""
    if hasattr(array, "numpy") and not isinstance(array, np.ndarray):
        array = array.numpy()
    elif hasattr(array, "get") and hasattr(array, "shape") and not isinstance(array, np.ndarray):
        array = array.get()
    array = np.asarray(array)
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.number)):
        raise TypeError(f"{name} must be a numeric array, got dtype {array.dtype}")
    return array


def confusion_matrix(pred, target, num_classes, ignore_index=255):
    """(num_classes, num_classes) int64 matrix: [true class, predicted class] -> pixel count.

    pred, target: integer arrays of the same shape, e.g. (N, H, W). Pixels whose
    target is ignore_index are skipped; any other value outside
    [0, num_classes) is an error.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    pred, target = _to_numpy(pred, "pred"), _to_numpy(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, "
                         f"got pred {pred.shape} and target {target.shape}")
    for name, array in (("pred", pred), ("target", target)):
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    valid = target != ignore_index
    # Every prediction must be a class; every target too, except the ignored pixels.
    for name, array in (("pred", pred.ravel()), ("target", target[valid])):
        if array.size and (array.min() < 0 or array.max() >= num_classes):
            bad = np.unique(array[(array < 0) | (array >= num_classes)])
            raise ValueError(f"{name} holds class values {bad[:10].tolist()} outside [0, {num_classes}) "
                             f"(ignore_index={ignore_index} is skipped in target)")
    pred, target = pred[valid].astype(np.int64), target[valid].astype(np.int64)
    # Pixel (i, j) gets the flat cell i * K + j; one bincount counts all pixels at once.
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class SegmentationMetrics:
    """Accumulate a confusion matrix over batches and read the FCN metrics from it.

        metrics = SegmentationMetrics(num_classes=21)
        for images, labels in loader:
            metrics.update(model_scores, labels)       # scores (N, K, H, W) or labels (N, H, W)
        print(metrics.summary())
    """

    def __init__(self, num_classes, ignore_index=255):
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self):
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred, target, mask=None):
        """Add one batch.

        pred: predicted classes, same shape as target, or class scores with one
            more axis, the class axis third from the end ((N, K, H, W) or (K, H, W)),
            of which the argmax is taken.
        target: true classes (N, H, W) or (H, W), ignore_index to skip.
        mask: optional bool array like target; pixels where it is False are
            skipped too (e.g. ``boundary_mask(target, 3)`` to score only near edges).
        """
        pred, target = _to_numpy(pred, "pred"), _to_numpy(target, "target")
        if pred.ndim == target.ndim + 1:     # class scores: the prediction is their argmax
            if (not np.issubdtype(pred.dtype, np.floating) or pred.ndim < 3
                    or pred.shape[-3] != self.num_classes):
                raise ValueError(f"pred with one axis more than target {target.shape} must be float scores "
                                 f"with {self.num_classes} classes on axis -3, got {pred.dtype} {pred.shape}")
            pred = pred.argmax(axis=-3)
        if mask is not None:
            mask = _to_numpy(mask, "mask")
            if mask.shape != target.shape:
                raise ValueError(f"mask must have the target's shape {target.shape}, got {mask.shape}")
            target = np.where(mask.astype(bool), target, self.ignore_index)
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    # Every ratio below may be 0/0 for an absent class: that NaN is intended.
    def pixel_accuracy(self):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.diag(self.confusion).sum() / self.confusion.sum())

    def per_class_accuracy(self):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.diag(self.confusion) / self.confusion.sum(axis=1)

    def mean_accuracy(self):
        return _nanmean(self.per_class_accuracy())

    def per_class_iu(self):
        """Intersection over union per class; NaN for a class in neither truth nor prediction."""
        intersection = np.diag(self.confusion)
        union = self.confusion.sum(axis=1) + self.confusion.sum(axis=0) - intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            return intersection / union

    def mean_iu(self):
        return _nanmean(self.per_class_iu())

    def frequency_weighted_iu(self):
        frequency = self.confusion.sum(axis=1) / max(int(self.confusion.sum()), 1)
        present = frequency > 0     # weight 0 for absent classes, and their NaN must not spread
        if not present.any():
            return float("nan")
        return float((frequency[present] * self.per_class_iu()[present]).sum())

    def summary(self):
        """All metrics as a dict of floats (per_class_iu as a list)."""
        return {
            "pixel_accuracy": self.pixel_accuracy(),
            "mean_accuracy": self.mean_accuracy(),
            "mean_iu": self.mean_iu(),
            "frequency_weighted_iu": self.frequency_weighted_iu(),
            "per_class_iu": self.per_class_iu().tolist(),
        }


def format_metrics(metrics, class_names):
    """The four metrics of the FCN paper and the per-class IU, as a text table."""
    lines = [f"{'pixel accuracy':>24}  {metrics.pixel_accuracy():.4f}",
             f"{'mean accuracy':>24}  {metrics.mean_accuracy():.4f}",
             f"{'mean IU':>24}  {metrics.mean_iu():.4f}",
             f"{'frequency weighted IU':>24}  {metrics.frequency_weighted_iu():.4f}",
             "", f"{'class':>24}  IU"]
    for name, iu in zip(class_names, metrics.per_class_iu()):
        lines.append(f"{name:>24}  {'  -' if np.isnan(iu) else f'{iu:.4f}'}")
    return "\n".join(lines)


def _nanmean(values):
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def boundary_mask(label, width):
    """True for pixels within `width` px (a (2*width+1)^2 square) of a change of label value.

    label: (H, W) or (N, H, W) integer labels. The ignore value counts as a
    value like any other, so VOC's void band is itself near a boundary. Image
    borders are not boundaries. A square window holds two different values
    exactly when its max and min differ, and max/min over a square split into
    a pass over rows and a pass over columns.
    """
    if not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"width must be a positive int (pixels), got {width!r}")
    label = _to_numpy(label, "label")
    if label.ndim not in (2, 3):
        raise ValueError(f"label must be (H, W) or (N, H, W), got shape {label.shape}")
    return _window_extreme(label, width, np.maximum) != _window_extreme(label, width, np.minimum)


def _window_extreme(label, width, op):
    """max or min (op) over the (2*width+1)^2 window around each pixel, edges replicated."""
    result = label
    for axis in (-2, -1):
        pad = [(0, 0)] * label.ndim
        pad[axis] = (width, width)
        padded = np.pad(result, pad, mode="edge")
        size = label.shape[axis]
        result = padded.take(np.arange(size), axis=axis)
        for shift in range(1, 2 * width + 1):
            result = op(result, padded.take(np.arange(shift, shift + size), axis=axis))
    return result
