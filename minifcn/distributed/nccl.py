"""GPUs: MPI starts the ranks and agrees on a NCCL communicator; NCCL sums on the devices.

Each rank drives one GPU, chosen by its place on its machine (local rank 0 takes GPU 0,
and so on). Rank 0 asks NCCL for a unique id and broadcasts it over MPI; with it, every
rank joins one NCCL communicator. Device arrays are then summed by NCCL in place, on the
current CuPy stream, without a copy to the host; host arrays (a few numbers a step) still
go through MPI.
"""

import numpy as np

from minifcn.distributed.group import DistributedError, MPIGroup


class NCCLGroup(MPIGroup):
    """An MPIGroup whose sums of CuPy arrays go through NCCL on this rank's GPU."""

    def __init__(self, comm=None):
        super().__init__(comm)
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
            raise DistributedError(f"rank {self.rank}: device 'cuda' was asked for, but this machine "
                                   "has no GPU that CUDA can see")
        self.device_id = self.local_rank % gpus
        cupy.cuda.Device(self.device_id).use()
        unique_id = nccl.get_unique_id() if self.rank == 0 else None
        unique_id = self.comm.bcast(unique_id, root=0)
        self._cupy, self._nccl = cupy, nccl
        self.nccl_comm = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.int64): nccl.NCCL_INT64,
                       np.dtype(np.int32): nccl.NCCL_INT32}

    def all_sum(self, array):
        if isinstance(array, np.ndarray):
            return super().all_sum(array)
        if not array.flags.c_contiguous or array.dtype not in self._types:
            raise TypeError(f"a NCCL sum needs a C-contiguous CuPy array of {sorted(map(str, self._types))}, "
                            f"got dtype {array.dtype}, contiguous {array.flags.c_contiguous}")
        stream = self._cupy.cuda.get_current_stream().ptr
        self.nccl_comm.allReduce(array.data.ptr, array.data.ptr, array.size, self._types[array.dtype],
                                 self._nccl.NCCL_SUM, stream)
        return array

    def broadcast(self, array, root=0):
        if isinstance(array, np.ndarray):
            return super().broadcast(array, root)
        stream = self._cupy.cuda.get_current_stream().ptr
        self.nccl_comm.bcast(array.data.ptr, array.size, self._types[array.dtype], root, stream)
        return array
