"""Compiling kernels/*.cu as a GPU build would, on a machine that has no GPU.

Two compilers, two checks:
  * nvcc --ptx: a translation unit includes the .cu file and takes the
    address of every kernel instance ("im2col<float>", ...), which makes nvcc
    instantiate and compile each one to PTX.
  * NVRTC, the compiler CuPy itself runs, called through ctypes with the
    loader's own options and name expressions: it has no host headers, so it
    also catches a kernel that leans on <cmath> macros or the like.
Neither needs a GPU; each test skips itself with a reason when its compiler
is missing. Running the kernels without a GPU is minifcn.backend.cuda.cpu_emulation.
"""

import ctypes
import functools
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from minifcn.backend.cuda import loader

ARCH = "sm_90"


def nvcc():
    return shutil.which("nvcc")


def instantiation_source(family):
    """A .cu file that includes kernels/<family>.cu and instantiates every kernel in it."""
    lines = [f'#include "{family}.cu"', "",
             "// Taking a kernel's address makes nvcc instantiate and compile it.",
             "void* kernel_instances[] = {"]
    lines += [f"    (void*)&{expression}," for expression in loader.kernel_expressions(family)]
    lines += ["};", ""]
    return "\n".join(lines)


def start_nvcc_ptx(family, work_dir):
    """Start `nvcc --ptx` on one file; returns (process, ptx_path)."""
    source = Path(work_dir) / f"{family}_instances.cu"
    source.write_text(instantiation_source(family), encoding="utf-8")
    ptx = Path(work_dir) / f"{family}.ptx"
    command = [nvcc(), "--ptx", f"-arch={ARCH}", "-std=c++17", "-Werror", "all-warnings",
               "-I", str(loader.kernels_dir()), str(source), "-o", str(ptx)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, ptx


def _nvrtc_candidates():
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            yield from sorted(glob.glob(os.path.join(os.environ[env], "lib64", "libnvrtc.so*")))
    yield from sorted(glob.glob("/usr/local/cuda/lib64/libnvrtc.so*"))
    for site in sys.path:  # the nvidia-cuda-nvrtc wheel: site-packages/nvidia/<name>/lib/
        yield from sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))


@functools.lru_cache(maxsize=None)
def nvrtc():
    """The NVRTC library (ctypes), or None when none is installed."""
    for path in _nvrtc_candidates():
        if ".alt." in path:
            continue
        try:
            # NVRTC loads its builtins library from the library path; preload it from beside it.
            beside = os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*")
            for builtins in sorted(glob.glob(beside)):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def nvrtc_compile(family, arch="compute_90"):
    """Compile one .cu file as CuPy's RawModule does. Returns (ok, log, lowered names)."""
    lib = nvrtc()
    program = ctypes.c_void_p()
    source = loader.kernel_source(family).encode()
    name = f"{family}.cu".encode()
    if lib.nvrtcCreateProgram(ctypes.byref(program), source, name, 0, None, None):
        return False, "nvrtcCreateProgram failed", {}
    try:
        expressions = loader.kernel_expressions(family)
        for expression in expressions:
            lib.nvrtcAddNameExpression(program, expression.encode())
        options = [o.encode() for o in (*loader.NVRTC_OPTIONS, f"-arch={arch}")]
        option_array = (ctypes.c_char_p * len(options))(*options)
        status = lib.nvrtcCompileProgram(program, len(options), option_array)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value + 1)
        lib.nvrtcGetProgramLog(program, log)
        lowered = {}
        if status == 0:
            for expression in expressions:
                name = ctypes.c_char_p()
                if lib.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(name)) == 0:
                    lowered[expression] = name.value.decode()
        return status == 0, log.value.decode(errors="replace"), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))
