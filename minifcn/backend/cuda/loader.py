"""Finding, compiling and caching the CUDA kernels in ``kernels/*.cu``.

Each ``.cu`` file holds one op family (``conv``, ``pooling``, ...). Its
kernels are templates over the element type, ``template <typename T>
__global__ void im2col(...)``, and one kernel instance is named by a C++
expression such as ``"im2col<float>"`` or ``"im2col<double>"``: CuPy asks
NVRTC to instantiate exactly those names (``name_expressions``), and the CPU
emulator (``cpu_emulation.py``) compiles the same names with g++.

A file is compiled once per process, on first use, and kept (``lru_cache``);
CuPy also keeps the compiled binary on disk between processes. Nothing here
imports CuPy until a kernel for a CuPy array is first asked for, so a
CPU-only machine can import this module.
"""

import functools
import os
from pathlib import Path

# Every kernel of every file: the single list the loader, the CPU emulator
# and the tests work from. tests/test_kernels.py checks it against the files.
KERNELS = {
    "conv": ("im2col", "col2im"),
    "pooling": ("max_pool2d_forward", "max_pool2d_backward"),
    "loss": ("softmax_cross_entropy_forward", "softmax_cross_entropy_backward"),
    "resample": ("bilinear_forward", "bilinear_backward", "nearest_forward", "nearest_backward"),
    "crop": ("crop_forward", "crop_backward"),
    "elementwise": ("relu_backward", "dropout_apply", "sgd_update", "adam_update"),
}

# The C++ type T stands for, per NumPy dtype name.
C_TYPES = {"float32": "float", "float64": "double"}

# Extra options for NVRTC: none. The kernels are plain C++11 (every NVRTC
# accepts them) and keep IEEE arithmetic: no --use_fast_math, whose
# approximate exp, log and division would drift from NumPy in float32.
NVRTC_OPTIONS = ()

KERNELS_DIR_ENV = "MINIFCN_KERNELS_DIR"


def kernel_expression(name, dtype):
    """The name of one kernel instance, e.g. ("im2col", float32) -> "im2col<float>"."""
    return f"{name}<{C_TYPES[str(dtype)]}>"


def kernel_expressions(family):
    """Every kernel instance of one file, in a fixed order."""
    return tuple(kernel_expression(name, dtype) for name in KERNELS[family] for dtype in C_TYPES)


@functools.lru_cache(maxsize=None)
def kernels_dir():
    """The folder that holds the .cu files.

    Looked for, in order: $MINIFCN_KERNELS_DIR; ``minifcn/kernels/`` inside
    the installed package (where a wheel puts them, see setup.py); and the
    ``kernels/`` folder at the root of a source checkout (an editable install).
    """
    package = Path(__file__).resolve().parents[2]  # minifcn/
    candidates = [package / "kernels", package.parent / "kernels"]
    if os.environ.get(KERNELS_DIR_ENV):
        candidates = [Path(os.environ[KERNELS_DIR_ENV])]
    for folder in candidates:
        if (folder / "conv.cu").is_file():
            return folder
    raise FileNotFoundError(
        f"the CUDA kernel sources (conv.cu, ...) are in none of {[str(c) for c in candidates]}; "
        f"set {KERNELS_DIR_ENV} to the folder that holds them")


def kernel_path(family):
    if family not in KERNELS:
        raise ValueError(f"unknown kernel file {family!r}; expected one of {sorted(KERNELS)}")
    return kernels_dir() / f"{family}.cu"


def kernel_source(family):
    return kernel_path(family).read_text(encoding="utf-8")


def gpu_kernel(family, name, dtype):
    """One kernel instance as a ``cupy.RawKernel`` for the current GPU.

    Call it as ``kernel(grid, block, args)``.
    """
    import cupy  # only here: importing minifcn.backend.cuda must work without CuPy

    # dtype itself as the key, not str(dtype), and the device's number straight from the
    # runtime: a training step launches hundreds of kernels, and both lookups were costly
    return _gpu_kernel(family, name, dtype, cupy.cuda.runtime.getDevice())


@functools.lru_cache(maxsize=None)
def _gpu_kernel(family, name, dtype, device_id):
    return _gpu_module(family, device_id).get_function(kernel_expression(name, str(dtype)))


@functools.lru_cache(maxsize=None)
def _gpu_module(family, device_id):
    # A compiled module is loaded onto one GPU, hence one module per device.
    # NVRTC compiles the file on first use; CuPy keeps the binary on disk too.
    import cupy

    return cupy.RawModule(code=kernel_source(family), options=NVRTC_OPTIONS,
                          name_expressions=kernel_expressions(family))
