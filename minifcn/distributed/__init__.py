"""Data-parallel training over processes: MPI between them, NCCL between GPUs.

Every process (a *rank*) holds a whole copy of the model and trains on its own
share of each global batch. Three things then keep the copies one model:

1. The gradient of the batch's mean loss is a sum over pixels, so it is the sum
   of the shares' gradients. One ``Allreduce`` over one flat buffer of every
   gradient gives each rank that sum (``ProcessGroup.all_sum``).
2. Every rank starts from the same weights and applies the same update to the
   same summed gradient, so the weights stay identical without being sent.
3. BatchNorm normalises with the statistics of the whole batch: its per-channel
   sums are summed over the ranks too (``nn.SyncBatchNorm2d``).

The processes are started by ``mpiexec`` (from the ``mpich`` wheel that
``pip install`` brings): ``mpiexec -n 4 python examples/train_fcn8s.py``, or
with a hostfile across machines. ``world()`` is the group of the processes this
one was started with: a group of one when it was not started by ``mpiexec``, in
which case nothing here imports MPI.
"""

from minifcn.distributed.group import (DistributedError, MPIGroup, ProcessGroup, SingleProcess, batch_share,
                                       launched_by_mpiexec)
from minifcn.distributed.run import world

__all__ = ["ProcessGroup", "SingleProcess", "MPIGroup", "DistributedError", "world",
           "batch_share", "launched_by_mpiexec"]
