"""Where arrays live and which code computes on them.

- ``arrays``: NumPy on the CPU, CuPy on an NVIDIA GPU; device names, moving
  arrays between them.
- three backends of the same primitives: ``reference`` (readable NumPy),
  ``cpu`` (the fast CPU backend) and ``cuda`` (the kernels of kernels/*.cu);
- ``dispatch``: the one place that chooses which backend runs
  (``primitives(array)``, ``set_backend``, ``MINIFCN_BACKEND``).
"""

from minifcn.backend.arrays import (DEVICES, check_device, cupy_available, device_of, get_array_module, is_cuda,
                                    to_device, to_numpy)
from minifcn.backend.dispatch import BACKENDS, get_backend, primitives, set_backend, using
