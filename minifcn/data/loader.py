"""DataLoader: batches in a reproducible order that a resumed run continues exactly.

Nothing random is kept as hidden state. The order of epoch e is a permutation
drawn from (seed, e), and the augmentation of sample i in epoch e uses a
generator drawn from (seed, e, i). So the loader's whole state is two numbers,
(epoch, position): save them with the model, load them, and training resumes
on exactly the batches, and augmentations, it would have seen.
"""

import numpy as np

from minifcn.data.errors import DatasetError
from minifcn.data.transforms import Normalize

_ORDER_STREAM, _SAMPLE_STREAM = 0, 1   # keep the two random streams of an epoch apart


class DataLoader:
    """Iterate over a dataset in batches of numpy arrays.

    Yields ``(images, labels)``: images float32 (N, 3, H, W), labels int64
    (N, H, W). Samples in a batch must have one size: use batch_size=1 for
    images of varying size, or a ``RandomCrop`` for larger batches.

    Args:
        dataset: anything with ``len()`` and ``[i] -> (image, label)``.
        batch_size: samples per batch.
        shuffle: a new permutation every epoch (from seed and epoch); else 0, 1, 2, ...
        transform: ``transform(image, label, rng) -> (image (3, H, W) float, label)``,
            typically a ``Compose`` ending in ``Normalize``. None means
            ``Normalize("none")``: float32 0-255, channels first.
        seed: base seed for the order and the augmentations.
        drop_last: skip a last batch smaller than batch_size.
        share: (start, stop), or None for all: load only these samples of every batch
            (a process's share of the global batch, minifcn.distributed). The batches,
            their order and the augmentations stay those of the whole loader.

    ``for images, labels in loader`` runs through the rest of the current
    epoch, then moves to the next epoch. Leaving the loop early keeps the
    position, so the next loop continues where this one stopped.
    """

    def __init__(self, dataset, batch_size=1, shuffle=True, transform=None, seed=0, drop_last=False,
                 share=None):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if len(dataset) == 0:
            raise DatasetError(f"dataset {dataset!r} is empty; a DataLoader needs at least one sample")
        if drop_last and len(dataset) < batch_size:
            raise DatasetError(f"drop_last=True with batch_size={batch_size} > len(dataset)={len(dataset)} "
                               "would give no batches at all")
        if share is not None and not (isinstance(share, tuple) and len(share) == 2
                                      and 0 <= share[0] < share[1] <= batch_size):
            raise ValueError(f"share must be None or (start, stop) with 0 <= start < stop <= "
                             f"batch_size={batch_size}, got {share!r}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.share = slice(*share) if share is not None else slice(None)
        self.shuffle = bool(shuffle)
        self.transform = transform if transform is not None else Normalize("none")
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0        # epochs completed
        self.position = 0     # batches already handed out in the current epoch

    def __len__(self):
        """Batches per epoch."""
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def order(self, epoch):
        """The sample indices of `epoch`, in the order they are served."""
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, epoch, _ORDER_STREAM]).permutation(len(self.dataset))

    def __iter__(self):
        order = self.order(self.epoch)
        while self.position < len(self):
            start = self.position * self.batch_size
            batch = self._load_batch(order[start:start + self.batch_size][self.share])
            self.position += 1   # count it now: a checkpoint taken after this step must skip it
            yield batch
        self.epoch += 1
        self.position = 0

    def _load_batch(self, indices):
        images, labels = [], []
        for index in indices:
            index = int(index)
            sample = self.dataset[index]
            if not isinstance(sample, (tuple, list)) or len(sample) != 2:
                raise DatasetError(f"dataset[{index}] must return a pair (image, label), "
                                   f"got {type(sample).__name__} {sample!r:.60}")
            image, label = sample
            rng = np.random.default_rng([self.seed, self.epoch, _SAMPLE_STREAM, index])
            image, label = self.transform(image, label, rng)
            image, label = np.asarray(image), np.asarray(label)
            if image.ndim != 3 or image.shape[0] != 3 or label.shape != image.shape[1:]:
                raise DatasetError(
                    f"sample {index}: the transform must return image (3, H, W) and label (H, W), got image "
                    f"{image.shape} and label {label.shape} (does the transform end with Normalize?)")
            if not np.issubdtype(image.dtype, np.floating):
                raise DatasetError(f"sample {index}: the transform returned a {image.dtype} image; "
                                   "expected float (end the transform with Normalize)")
            images.append(image)
            labels.append(label)
        sizes = [label.shape for label in labels]
        if len(set(sizes)) > 1:
            raise DatasetError(
                f"batch of {len(sizes)} samples (indices {[int(i) for i in indices]}) has different sizes "
                f"{sizes}; use batch_size=1 for images of varying size, "
                "or crop them to one size (RandomCrop)")
        return np.stack(images).astype(np.float32, copy=False), np.stack(labels).astype(np.int64)

    def state_dict(self):
        """Where the loader stands: plain ints, safe to store in a checkpoint."""
        epoch, position = self.epoch, self.position
        if position >= len(self):       # an epoch fully served is the start of the next one
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "seed": self.seed,
                "batch_size": self.batch_size, "dataset_size": len(self.dataset)}

    def load_state_dict(self, state):
        """Continue from a state_dict(); the seed, batch size and dataset size must match."""
        missing = {"epoch", "position", "seed", "batch_size", "dataset_size"} - set(state)
        if missing:
            raise ValueError(f"loader state is missing {sorted(missing)}; got keys {sorted(state)}")
        for key, expected in (("seed", self.seed), ("batch_size", self.batch_size),
                              ("dataset_size", len(self.dataset))):
            if int(state[key]) != expected:
                raise ValueError(f"loader state has {key}={int(state[key])} but this loader has "
                                 f"{key}={expected}; the data order would not match the saved run")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self):
            raise ValueError(f"loader state has epoch={epoch}, position={position}; expected epoch >= 0 "
                             f"and 0 <= position < {len(self)} (batches per epoch)")
        self.epoch, self.position = epoch, position

    def __repr__(self):
        return (f"DataLoader(dataset={self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"transform={self.transform!r}, seed={self.seed}, drop_last={self.drop_last})")
