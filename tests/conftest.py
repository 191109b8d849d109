"""Shared test setup: the "cuda" marker skips where no GPU can run the test; the
``threads`` fixture sets minifcn's CPU thread count for one test."""

import pytest

import minifcn
from minifcn.backend import cupy_available

GPU_SKIP_REASON = "needs CuPy and an NVIDIA GPU; this machine has none"

# Parametrise a test over devices with DEVICES; the CUDA case skips itself here.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if cupy_available():
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def threads():
    """minifcn.set_num_threads for one test; the previous count comes back afterwards."""
    previous = minifcn.get_num_threads()
    yield minifcn.set_num_threads
    minifcn.set_num_threads(previous)
