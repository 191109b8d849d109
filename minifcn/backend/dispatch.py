"""The one place that chooses which backend's primitives run.

Three backends implement the same primitives (the names in
``reference.PRIMITIVES``), with the same signatures:

    reference   plain NumPy, written to be read (NumPy or CuPy arrays)
    cpu         the fast CPU backend: blocks, tiles, threads (NumPy arrays)
    cuda        the CUDA kernels of kernels/*.cu (CuPy arrays; NumPy arrays
                run the same kernels through the CPU emulator, slowly)

By default the data decides: NumPy arrays run on "cpu", CuPy arrays on
"cuda". ``MINIFCN_BACKEND=reference`` in the environment, ``set_backend(name)``
or ``with using(name):`` make every op run on one backend instead, so that a
learner can step through plain NumPy, or a test can compare backends.
"""

import contextlib
import os

from minifcn.backend import cpu, cuda, reference
from minifcn.backend.arrays import is_cuda

BACKENDS = {"reference": reference, "cpu": cpu, "cuda": cuda}
ENVIRONMENT_VARIABLE = "MINIFCN_BACKEND"


def _checked(name):
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None (by the data), got {name!r}")
    return name


def _from_environment():
    name = os.environ.get(ENVIRONMENT_VARIABLE) or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be one of {sorted(BACKENDS)}, got {name!r}")
    return name


_chosen = _from_environment()


def set_backend(name):
    """Run every op on backend ``name`` ("reference", "cpu" or "cuda"); None: by the data."""
    global _chosen
    _chosen = _checked(name)


def get_backend():
    """The backend every op runs on, or None when the data decides."""
    return _chosen


@contextlib.contextmanager
def using(name):
    """``with using("reference"): ...`` runs the block's ops on that backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def primitives(array):
    """The primitives that run on ``array``: the chosen backend's, else "cuda" for a CuPy
    array and "cpu" for a NumPy one."""
    if _chosen is None:
        return cuda if is_cuda(array) else cpu
    if _chosen == "cpu" and is_cuda(array):
        raise ValueError("the 'cpu' backend runs NumPy arrays, got a CuPy array; "
                         "use set_backend(None) or 'cuda' for arrays on the GPU")
    return BACKENDS[_chosen]
