"""The group of every process of this run, made once: MPI between the ranks that mpiexec
started, NCCL between their GPUs, or this process alone."""

import os

from minifcn.backend.cpu.threads import cores
from minifcn.distributed.group import DistributedError, MPIGroup, SingleProcess, launched_by_mpiexec
from minifcn.distributed.nccl import NCCLGroup

_world = None
_gpu_world = None


def world(device="cpu"):
    """The group of every process of this run: ``MPIGroup()`` under mpiexec, else a
    ``SingleProcess()`` (and MPI is not even imported). Made once, then the same object.
    ``device="cuda"`` on several ranks: the same ranks with NCCL between their GPUs
    (``NCCLGroup``, also made once: each holds a communicator on the GPUs)."""
    global _world, _gpu_world
    if device == "cuda" and world().size > 1:
        if _gpu_world is None:
            _gpu_world = NCCLGroup(world().comm)
        return _gpu_world
    if _world is None:
        if launched_by_mpiexec():
            try:
                import mpi4py
            except ImportError:
                raise DistributedError("this process was started by mpiexec, but mpi4py is not "
                                       "installed: pip install mpi4py mpich") from None
            mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI
            _no_spinning_on_shared_cores()
            _world = MPIGroup()
        else:
            _world = SingleProcess()
    return _world


def _no_spinning_on_shared_cores():
    """With more ranks on this machine than cores, ranks talk through the loopback network
    instead of shared memory: MPICH waits on shared memory by spinning, and a spinning rank
    holds the core that the rank it waits for needs. Set before MPI starts;
    MPIR_CVAR_NOLOCAL set by the user wins."""
    local_ranks = int(os.environ.get("MPI_LOCALNRANKS", "1"))  # set by MPICH's mpiexec
    if local_ranks > cores():
        os.environ.setdefault("MPIR_CVAR_NOLOCAL", "1")
