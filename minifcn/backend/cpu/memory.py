"""Keeping freed memory for the next training step (glibc's malloc on Linux).

A training step allocates its activations and gradients, frees them all, and
the next step allocates the same sizes again. By default glibc's malloc hands
large freed blocks back to the operating system (it trims the top of its heap,
and serves blocks over its "mmap threshold" straight from the OS), so each
step gets fresh pages again, and the OS zeroes each 4 KiB page on its first
touch: a page fault, thousands of them a step.

``keep_freed_memory()`` raises both limits, so that freed blocks of up to
32 MiB stay in the heap and are reused. The resident memory then stays at the
peak of a step instead of falling between steps; the peak itself is unchanged.
It changes nothing where the C library is not glibc, or where the user has
chosen malloc's settings through the environment (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, or a glibc.malloc tunable in GLIBC_TUNABLES): those win.

Blocks larger than 32 MiB still come fresh from the OS each step. Where the
kernel defragments memory on demand for regions that NumPy marks for huge
pages (/sys/kernel/mm/transparent_hugepage/defrag set to madvise), such a page
fault can wait while it compacts memory (numpy issue 31590); setting
NUMPY_MADVISE_HUGEPAGE=0 in the environment before Python starts avoids it.

The Trainer calls it on the CPU.
"""

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1    # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
_TRIM_THRESHOLD = 256 << 20  # free memory the heap may keep at its top
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # and glibc.malloc.* tunables

_kept = None  # the result of the first call: settings are process-wide, made once


def keep_freed_memory():
    """Ask glibc's malloc to keep freed blocks for reuse; True if the settings took effect."""
    global _kept
    if _kept is None:
        _kept = _set_malloc_thresholds()
    return _kept


def _user_set_malloc():
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in _USER_SETTINGS) or "glibc.malloc." in tunables


def _set_malloc_thresholds():
    if not sys.platform.startswith("linux") or _user_set_malloc():
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # only glibc has this (musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # both, in this order: setting either stops glibc from moving the mmap threshold itself
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
