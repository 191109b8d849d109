"""GPUs: MPI starts the ranks and agrees on a NCCL communicator; NCCL sums on the devices.

Each rank drives one GPU, chosen by its place on its machine (local rank 0 takes GPU 0,
and so on), so a machine may run at most as many ranks as it has GPUs. Rank 0 asks NCCL
for a unique id and broadcasts it over MPI; with it, every rank joins one NCCL
communicator. Device arrays are then summed by NCCL in place, on the
current CuPy stream, without a copy to the host; host arrays (a few numbers a step) still
go through MPI.
"""

import numpy as np

from minifcn.distributed.group import DistributedError, MPIGroup


class NCCLGroup(MPIGroup):
    """An MPIGroup whose sums of CuPy arrays go through NCCL on this rank's GPU."""

    def __init__(self, comm=None):
        super().__init__(comm)
        # checked on every rank at once: a missing GPU is reported once, not once per rank
        self._cupy, self._nccl = self.run_together(self._take_a_gpu)
        unique_id = self._nccl.get_unique_id() if self.rank == 0 else None
        unique_id = self.comm.bcast(unique_id, root=0)
        self.nccl_comm = self._nccl.NcclCommunicator(self.size, unique_id, self.rank)
        nccl = self._nccl
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.int64): nccl.NCCL_INT64,
                       np.dtype(np.int32): nccl.NCCL_INT32}

    def _take_a_gpu(self):
        """Make GPU ``local_rank`` this rank's; returns (cupy, cupy.cuda.nccl)."""
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as err:
            raise DistributedError(f"device 'cuda' on several ranks needs CuPy with NCCL ({err}); "
                                   "pip install cupy-cuda12x, or train on the CPU") from None
        try:
            gpus = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError:
            gpus = 0
        if gpus == 0:
            raise DistributedError("device 'cuda' was asked for, but this machine has no GPU that CUDA can see")
        if self.local_size > gpus:
            raise DistributedError(f"{self.local_size} ranks on this machine would share {gpus} GPU(s); "
                                   f"NCCL needs a GPU of its own for each rank: start at most {gpus} "
                                   "ranks per machine")
        self.device_id = self.local_rank
        cupy.cuda.Device(self.device_id).use()
        return cupy, nccl

    def _nccl_type(self, array):
        if not array.flags.c_contiguous or array.dtype not in self._types:
            raise TypeError(f"NCCL needs a C-contiguous CuPy array of {sorted(map(str, self._types))}, "
                            f"got dtype {array.dtype}, contiguous {array.flags.c_contiguous}")
        return self._types[array.dtype]

    def all_sum(self, array):
        if isinstance(array, np.ndarray):
            return super().all_sum(array)
        stream = self._cupy.cuda.get_current_stream().ptr
        self.nccl_comm.allReduce(array.data.ptr, array.data.ptr, array.size, self._nccl_type(array),
                                 self._nccl.NCCL_SUM, stream)
        return array

    def broadcast(self, array, root=0):
        if isinstance(array, np.ndarray):
            return super().broadcast(array, root)
        stream = self._cupy.cuda.get_current_stream().ptr
        self.nccl_comm.bcast(array.data.ptr, array.size, self._nccl_type(array), root, stream)
        return array
