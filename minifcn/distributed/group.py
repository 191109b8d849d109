"""Process groups: the ranks of a run, and the sums they take together.

A group knows its ``rank`` (0 .. size - 1), its ``size``, and where it stands on
its own machine (``local_rank`` of ``local_size``, to share the cores or pick a
GPU). Its collectives are blocking: every rank calls the same ones in the same
order, as every rank runs the same training loop.
"""

import os

import numpy as np

from minifcn.backend import get_array_module, is_cuda

# Set by mpiexec in every process it starts: MPICH's Hydra (PMI), Open MPI, PMIx.
_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


class DistributedError(RuntimeError):
    """Processes of a data-parallel run could not start, or disagree."""


class ProcessGroup:
    """What the training loop asks of its processes; a group of one does nothing at all."""

    rank, size, local_rank, local_size = 0, 1, 0, 1

    @property
    def is_root(self):
        """Rank 0 alone writes the log, the checkpoints and the pictures."""
        return self.rank == 0

    def all_sum(self, array):
        """Replace ``array`` (contiguous) by its sum over the ranks, in place; returns it."""
        return array

    def all_sum_vectors(self, *vectors):
        """Each vector (an array or a number) summed over the ranks, as float64 in one
        exchange; with one rank, the vectors themselves, untouched."""
        if self.size == 1:
            return vectors
        xp = np if not any(is_cuda(v) for v in vectors) else get_array_module(next(filter(is_cuda, vectors)))
        flat = [xp.asarray(v) for v in vectors]  # on the GPU, one device array for NCCL
        total = self.all_sum(xp.concatenate([v.astype(xp.float64).ravel() for v in flat]))
        bounds = np.cumsum([0] + [v.size for v in flat])
        return tuple(total[lo:hi].reshape(v.shape).astype(v.dtype, copy=False)
                     for v, lo, hi in zip(flat, bounds, bounds[1:]))

    def broadcast(self, array, root=0):
        """Overwrite ``array`` (contiguous) with rank ``root``'s, in place; returns it."""
        return array

    def broadcast_object(self, value, root=0):
        """A small Python value (numbers, strings, lists) from rank ``root`` to every rank."""
        return value

    def run_together(self, function, *args):
        """``function(*args)`` on every rank; if it raises on any rank, it raises on every
        rank: the lowest failing rank's exception where that is this one, else a
        DistributedError naming that rank and quoting its error. Such an exception has
        ``on_every_rank = True``, so that one rank may report it and all stop cleanly.
        ``function`` must not itself wait for the other ranks."""
        try:
            result, error = function(*args), None
        except Exception as err:  # noqa: BLE001 - handed to every rank below
            result, error = None, err
        failures = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = [rank for rank, message in enumerate(failures) if message is not None]
        if not failed:
            return result
        first = failed[0]
        if error is None or self.rank != first:
            error = DistributedError(f"rank {first} of {self.size} failed: {failures[first]}")
        error.on_every_rank = True
        raise error

    def all_gather(self, value):
        """[every rank's ``value``] in rank order (small Python values)."""
        return [value]

    def barrier(self):
        pass

    def abort(self, code=1):
        """Stop every rank of the run now (after an error that the others cannot see)."""
        raise SystemExit(code)

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(ProcessGroup):
    """The group of a process started on its own: rank 0 of 1."""


class MPIGroup(ProcessGroup):
    """The ranks of an MPI communicator (default: every process mpiexec started)."""

    def __init__(self, comm=None):
        from mpi4py import MPI
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # the ranks on this machine, by its name (shared-memory windows may be switched off)
        hosts = self.comm.allgather(MPI.Get_processor_name())
        here = [rank for rank, host in enumerate(hosts) if host == hosts[self.rank]]
        self.local_rank, self.local_size = here.index(self.rank), len(here)

    def all_sum(self, array):
        _check_contiguous(array)
        if self.size > 1:
            self.comm.Allreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM)
        return array

    def broadcast(self, array, root=0):
        _check_contiguous(array)
        if self.size > 1:
            self.comm.Bcast(array, root=root)
        return array

    def broadcast_object(self, value, root=0):
        """A small Python value (numbers, strings, lists) from rank ``root`` to every rank."""
        return self.comm.bcast(value, root=root)

    def barrier(self):
        self.comm.Barrier()

    def all_gather(self, value):
        return self.comm.allgather(value)

    def abort(self, code=1):
        self.comm.Abort(code)


def _check_contiguous(array):
    if is_cuda(array):
        raise TypeError("MPI here sums NumPy arrays, got a CuPy array: on GPUs the ranks sum "
                        "through NCCL (minifcn.distributed.nccl.NCCLGroup)")
    if not (isinstance(array, np.ndarray) and array.flags.c_contiguous):
        raise TypeError(f"an MPI sum needs a C-contiguous NumPy array, got {type(array).__name__}"
                        + (f" (contiguous: {array.flags.c_contiguous})" if isinstance(array, np.ndarray) else ""))


def launched_by_mpiexec():
    """True in a process that mpiexec started (even as the only rank)."""
    return any(name in os.environ for name in _LAUNCHER_VARIABLES)


def batch_share(batch_size, rank, size):
    """(start, stop): the images of a global batch that rank ``rank`` of ``size`` trains on,
    consecutive runs of near-equal length (uneven when size does not divide batch_size)."""
    if size > batch_size:
        raise DistributedError(f"a batch of {batch_size} images cannot be shared by {size} ranks; "
                               f"expected at most {batch_size} ranks (one image each at least), "
                               "or a larger batch_size")
    return batch_size * rank // size, batch_size * (rank + 1) // size
