"""Where an array lives: NumPy on the CPU, CuPy on an NVIDIA GPU.

Code written against an "array module" ``xp`` (numpy or cupy), chosen by the
data it is given (``get_array_module``), runs on both devices. CuPy is imported
lazily, here and by the CUDA backend's kernel loader, so that a CPU-only
machine never needs it.
"""

import numpy

DEVICES = ("cpu", "cuda")


def _cupy():
    """The cupy module, or None when it is not installed or no GPU works."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def cupy_available():
    """True when CuPy imports and sees at least one GPU."""
    cupy = _cupy()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # a driver error means "no usable GPU", not a crash
        return False


def check_device(device):
    """Validate a device name; for "cuda" also check that a GPU can be used."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not cupy_available():
        if _cupy() is None:
            raise RuntimeError(
                "device 'cuda' needs CuPy, which is not installed: "
                "pip install 'minifcn[cuda]' (or the cupy-cudaXXx wheel matching your CUDA)")
        raise RuntimeError("device 'cuda' was requested but CuPy sees no usable GPU")
    return device


def is_cuda(array):
    """True for a CuPy array (checked without importing cupy)."""
    kind = type(array)
    if kind is numpy.ndarray:  # first, the common case: ops ask this thousands of times a step
        return False
    return kind.__module__.startswith("cupy")


def get_array_module(array):
    """numpy for NumPy arrays and Python numbers, cupy for CuPy arrays."""
    if is_cuda(array):
        return _cupy()
    return numpy


def device_of(array):
    return "cuda" if is_cuda(array) else "cpu"


def to_device(array, device):
    """Return ``array`` on ``device`` (the same object when already there)."""
    check_device(device)
    if device == device_of(array):
        return array
    if device == "cuda":
        return _cupy().asarray(array)
    return array.get()  # cupy -> numpy copy


def to_numpy(array):
    """A NumPy view or copy of any backend array."""
    return array.get() if is_cuda(array) else numpy.asarray(array)
