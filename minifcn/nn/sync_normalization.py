"""Synchronised BatchNorm: normalise with the statistics of the whole batch, when the batch
is shared by several processes (minifcn.distributed).

Each process sees only its share of the batch. A plain BatchNorm would normalise each
share with its own mean and variance, and a model trained on 4 processes of 2 images
would not be the model trained on 8 images in one. The statistics are sums over the
batch, so each process sums over its share and the processes add their sums:

    forward:  sum(x) and n, then sum((x - mean)^2)       (the variance after the mean)
    backward: sum(g) and sum(g * x_hat), for the two terms the batch statistics add

three exchanges of a few numbers per channel; the arithmetic is BatchNorm's own
(minifcn.functional.normalization), with ``batch_sums`` going over the processes.
In evaluation the running statistics are used, and nothing is exchanged.
"""

import contextlib
import functools

from minifcn.distributed import SingleProcess, world
from minifcn.functional.normalization import BatchNorm, checked_batch_norm
from minifcn.nn.normalization import BatchNorm2d


class SyncBatchNormFunction(BatchNorm):
    """BatchNorm whose per-channel sums are summed over the ranks of ``group``."""

    def __init__(self, group, *args):
        super().__init__(*args)
        self.batch_sums = group.all_sum_vectors

    def _shares(self, x, passes):
        # every channel in one sum: the plain op may cut channels into per-thread shares by
        # x's size, which differs between ranks with uneven shares, and every rank must make
        # the same sums in the same order
        return [(0, x.shape[1])]


class SyncBatchNorm2d(BatchNorm2d):
    """BatchNorm2d over the global batch of a data-parallel run; ``group``: the processes
    that share each batch (None: ``minifcn.distributed.world()``, looked up at each call; on
    GPUs pass the NCCL group, as the Trainer does). With a group of one it is BatchNorm2d,
    to the bit. In training every rank must call it, in the same order."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=None, group=None):
        super().__init__(num_features, eps, momentum, **({} if dtype is None else {"dtype": dtype}))
        self.group = group

    def forward(self, x, relu=False):
        group = world() if self.group is None else self.group
        if not self.training or group.size == 1:
            return super().forward(x, relu)
        return checked_batch_norm(functools.partial(SyncBatchNormFunction, group), x, self.running_mean,
                                  self.running_var, self.weight, self.bias, training=True,
                                  momentum=self.momentum, eps=self.eps, relu=relu)

    @classmethod
    def from_batch_norm(cls, layer, group=None):
        """A SyncBatchNorm2d holding ``layer``'s very parameters and statistics."""
        sync = cls(layer.num_features, layer.eps, layer.momentum, group=group)
        sync.weight, sync.bias = layer.weight, layer.bias
        sync.running_mean, sync.running_var = layer.running_mean, layer.running_var
        sync.training = layer.training
        return sync


@contextlib.contextmanager
def each_rank_alone(model):
    """Within the block every SyncBatchNorm2d of ``model`` normalises with its own process's
    statistics, exchanging nothing (to replay one rank's share by itself)."""
    layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm2d)]
    groups = [layer.group for layer in layers]
    try:
        for layer in layers:
            layer.group = SingleProcess()
        yield
    finally:
        for layer, group in zip(layers, groups):
            layer.group = group


def convert_sync_batchnorm(model, group=None):
    """Replace every BatchNorm2d in ``model`` by a SyncBatchNorm2d on the same parameters and
    statistics, in place (as PyTorch's convert_sync_batchnorm); returns ``model``. The names
    in ``state_dict()`` do not change, so checkpoints load either way."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is BatchNorm2d:
                setattr(module, name, SyncBatchNorm2d.from_batch_norm(child, group))
    return model
