"""Shared test setup: the "cuda" marker skips where no GPU can run the test; the
``threads`` fixture sets minifcn's CPU thread count for one test; ``random_weights``."""

import numpy as np
import pytest

import minifcn
from minifcn.backend import cupy_available

GPU_SKIP_REASON = "needs CuPy and an NVIDIA GPU; this machine has none"

# Parametrise a test over devices with DEVICES; the CUDA case skips itself here.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# The devices other than the CPU, for a test that compares a device with the CPU (on the CPU
# it would compare the CPU with itself; the CPU is checked against loop references).
GPU = [pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if cupy_available():
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_gpu)


def random_weights(model, rng):
    """Every parameter of ``model`` random, the zero-initialised score layers and the bilinear
    upsampling layers included: with zero scores the loss is log K whatever the encoder computes,
    and most gradients are exactly zero, so a comparison of two networks could not fail."""
    for param in model.parameters():
        if param.data.ndim > 1:  # a convolution's weight, scaled by its fan-in
            param.data[...] = rng.standard_normal(param.shape) / np.sqrt(np.prod(param.shape[1:]))
        else:  # a bias, or a BatchNorm's scale or shift
            param.data[...] += 0.2 * rng.standard_normal(param.shape)
    return model


@pytest.fixture
def threads():
    """minifcn.set_num_threads for one test; the previous count comes back afterwards."""
    previous = minifcn.get_num_threads()
    yield minifcn.set_num_threads
    minifcn.set_num_threads(previous)


def _emulator_reason():
    from minifcn.backend.cuda import cpu_emulation
    return None if cpu_emulation.compiler() else "the CUDA backend runs here through its CPU emulator, which needs g++"


# Parametrise a test over the backends with the ``backend`` fixture: every op runs on
# "reference" (plain NumPy), "cpu" (the fast CPU backend) and "cuda" (the CUDA kernels,
# which on a machine without a GPU run through the CPU emulator, on NumPy arrays).
BACKENDS = ["reference", "cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    _emulator_reason() is not None, reason=str(_emulator_reason())))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test's ops on one backend (minifcn.backend.using); yields its name."""
    with minifcn.backend.using(request.param):
        yield request.param


@pytest.fixture
def on_reference():
    """A context manager that runs the ops inside it on the reference backend."""
    return lambda: minifcn.backend.using("reference")
