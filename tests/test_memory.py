"""minifcn.backend.cpu.memory: freed arrays stay in the heap for the next step, unless the user said otherwise.

malloc's settings belong to the whole process, so each test runs in a fresh one.
"""

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest


def _is_glibc():
    try:
        ctypes.CDLL(None).gnu_get_libc_version
        return True
    except (OSError, AttributeError):
        return False


needs_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not _is_glibc(),
                                 reason="the malloc settings exist in glibc (Linux) only")

# Page faults while a "step" reallocates the arrays the previous one freed: 8 MiB arrays,
# over glibc's default mmap threshold, so by default each comes fresh from the OS.
STEP = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from minifcn.backend.cpu.memory import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    def step():
        arrays = [np.ones(2 << 20, np.float32) for _ in range(4)]
        del arrays
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"kept": kept, "faults": faults}))
""")


USER_SETTINGS = ("GLIBC_TUNABLES",)


def _run_step(mode, **env):
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("MALLOC_") and name not in USER_SETTINGS}
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True,
                          env=environment, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_arrays_are_reused_without_page_faults():
    default = _run_step("default")
    kept = _run_step("keep")
    assert kept["kept"] is True
    # 5 steps x 32 MiB is 40,960 pages of 4 KiB; glibc's own heuristics keep some of them
    assert default["faults"] > 5_000
    assert kept["faults"] < 500


@needs_glibc
@pytest.mark.parametrize("setting", [{"MALLOC_TRIM_THRESHOLD_": "0"},
                                     {"MALLOC_MMAP_THRESHOLD_": "65536"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_the_users_own_malloc_settings_win(setting):
    result = _run_step("keep", **setting)
    assert result["kept"] is False
    assert result["faults"] > 5_000


@needs_glibc
def test_other_glibc_tunables_leave_it_on():
    assert _run_step("keep", GLIBC_TUNABLES="glibc.rtld.optional_static_tls=1024")["kept"] is True


def test_nothing_is_touched_off_linux(monkeypatch):
    """On Windows ctypes.CDLL(None) itself raises; it must never be reached there."""
    from minifcn.backend.cpu import memory
    monkeypatch.setattr(memory.sys, "platform", "win32")
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda *a: pytest.fail("CDLL called off Linux"))
    assert memory._set_malloc_thresholds() is False


def test_the_trainer_keeps_freed_memory(monkeypatch, tmp_path):
    import minifcn.train as train
    calls = []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(1))
    config = train.TrainConfig(out=str(tmp_path), iterations=1, train_size=2, val_size=2, batch_size=2)
    train.Trainer(config)
    assert calls == [1]
