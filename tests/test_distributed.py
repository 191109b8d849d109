"""Data-parallel training over MPI (minifcn.distributed), run for real under mpiexec.

The checks in tests/distributed_checks.py run inside 2 and 3 ranks and compare what the ranks
compute together with what one process computes alone; the script tests start the main job
as a user does. Every run has a timeout: a hung rank fails the test instead of hanging CI.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minifcn import distributed
from minifcn.backend import cupy_available
from minifcn.checkpoint import read_checkpoint_extra
from minifcn.distributed import launch
from minifcn.distributed.launch import find_mpiexec, ranks_for

try:
    import mpi4py  # noqa: F401
    MPIEXEC = find_mpiexec()
except ImportError:
    MPIEXEC = None

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="needs mpi4py and mpiexec: pip install mpi4py mpich")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = os.path.join(REPO, "tests", "distributed_checks.py")
SCRIPT = os.path.join(REPO, "examples", "train_fcn8s.py")
TINY_ARGS = ["--width", "0.0625", "--fc-channels", "16", "--fc6-kernel", "1", "--train-size", "32",
             "--val-size", "3", "--crop", "32", "--batch-size", "6", "--conv1-padding", "4", "--no-progress",
             "--optimizer", "sgd", "--lr", "0.01"]  # SGD: rounding stays rounding (Adam's first steps amplify it)
TIMEOUT = 120


def finish(process, timeout=TIMEOUT):
    """(stdout, stderr) of ``process`` once it ends; past ``timeout`` it is stopped with SIGTERM
    (mpiexec and the launcher then stop every rank) and the test fails."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{stdout[-2000:]}\n{stderr[-2000:]}") from None


def run(command, timeout=TIMEOUT):
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = finish(process, timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def mpiexec(ranks, *arguments, timeout=TIMEOUT):
    return run([MPIEXEC, "-n", str(ranks), sys.executable, *arguments], timeout)


def losses(out):
    import json
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["iteration"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("check", ["step", "gradcheck", "trainer", "nan"])
def test_the_ranks_compute_what_one_process_computes(check, ranks):
    result = mpiexec(ranks, CHECKS, check)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok {check} on {ranks} ranks" in result.stdout


def test_a_rank_that_raises_stops_every_rank_and_is_named():
    started = time.monotonic()
    result = mpiexec(3, CHECKS, "raise", timeout=60)  # the others wait in a barrier rank 1 never joins
    assert result.returncode != 0
    assert "error: rank 1 of 3: planted error" in result.stderr
    assert time.monotonic() - started < 30


def test_the_script_runs_on_3_ranks_as_on_1(tmp_path):
    """The same run, the same batches, augmentations and dropout masks: the loss curves agree
    to rounding."""
    curves = {}
    for ranks in (1, 3):
        out = tmp_path / f"ranks{ranks}"
        command = [SCRIPT, "--iterations", "8", *TINY_ARGS, "--dropout", "0.5", "--out", str(out)]
        result = mpiexec(ranks, *command) if ranks > 1 else run([sys.executable, *command, "--processes", "1"])
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("Validation (3 images)") == 1  # rank 0 alone reports
        curves[ranks] = losses(out)
        assert sorted(curves[ranks]) == list(range(1, 9))
    np.testing.assert_allclose([curves[3][i] for i in range(1, 9)], [curves[1][i] for i in range(1, 9)],
                               rtol=1e-4)


def test_the_plain_script_starts_its_ranks_under_mpiexec(tmp_path):
    """No mpiexec on the command line: the script starts the ranks itself (here 3 on 2 cores)."""
    result = run([sys.executable, SCRIPT, "--iterations", "2", *TINY_ARGS, "--processes", "3", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert "(3 processes sharing each batch, 1 thread each)" in result.stdout


RANK_REPORT = """
import os, sys
import threadpoolctl
from minifcn import distributed
from minifcn.distributed.launch import announce_started
announce_started()
blas = sorted({pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"})
with open(os.path.join(sys.argv[1], f"rank{distributed.world().rank}"), "w") as f:
    f.write(f"blas {blas}, minifcn {os.environ.get('MINIFCN_NUM_THREADS')}")
"""


@pytest.mark.parametrize("user_variables, threads, expected", [
    ({}, None, "blas [1], minifcn None"),                           # the default: one BLAS thread a rank
    ({}, 3, "blas [1], minifcn 3"),                                 # --threads 3 reaches the ranks
    ({"OPENBLAS_NUM_THREADS": "2"}, None, "blas [2], minifcn None"),  # the user's setting wins
])
def test_the_launcher_gives_each_rank_one_blas_thread_unless_told_otherwise(user_variables, threads, expected,
                                                                            tmp_path):
    script = tmp_path / "report.py"
    script.write_text(RANK_REPORT)
    env = {k: v for k, v in os.environ.items() if k not in launch.BLAS_THREAD_VARIABLES + ("MINIFCN_NUM_THREADS",)}
    argv = [str(script), str(tmp_path)]
    start = ("import sys; from minifcn.distributed import launch; "
             f"sys.exit(launch.run_under_mpiexec(2, {argv!r}, {threads}))")
    process = subprocess.Popen([sys.executable, "-c", start], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(env, **user_variables))
    stdout, stderr = finish(process)
    assert process.returncode == 0, stdout + stderr
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == [expected, expected]


def test_rank_environment_leaves_the_callers_own_untouched():
    mine = {"PATH": "/bin"}
    env = launch.rank_environment(2, mine)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "MINIFCN_NUM_THREADS": "2"}
    assert mine == {"PATH": "/bin"}
    assert launch.rank_environment(None, {"MKL_NUM_THREADS": "4"}) == {"MKL_NUM_THREADS": "4"}


def test_threads_reach_every_rank_however_the_ranks_were_started(tmp_path):
    arguments = [SCRIPT, "--iterations", "1", *TINY_ARGS, "--threads", "2"]
    for started, result in [("by the script", run([sys.executable, *arguments, "--processes", "2",
                                                   "--out", str(tmp_path / "a")])),
                            ("by mpiexec", mpiexec(2, *arguments, "--out", str(tmp_path / "b")))]:
        assert result.returncode == 0, started + ": " + result.stderr
        assert "(2 processes sharing each batch, 2 threads each)" in result.stdout, started


def test_one_rank_per_core_up_to_one_image_each():
    assert ranks_for(batch_size=8, requested=0, cores=2) == 2
    assert ranks_for(batch_size=2, requested=0, cores=16) == 2  # one image each at least
    assert ranks_for(batch_size=8, requested=1, cores=16) == 1
    assert ranks_for(batch_size=8, requested=3, cores=2) == 3   # asked for: more ranks than cores


def _start(out, ranks, iterations, *extra):
    command = [sys.executable, SCRIPT, "--iterations", str(iterations), *TINY_ARGS, "--processes", str(ranks),
               "--checkpoint-every", "2", "--out", str(out), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(out, process, steps):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with open(os.path.join(out, "log.jsonl")) as f:
                if sum(1 for _ in f) >= steps:
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach {steps} steps: {finish(process, 10)}")


def test_resume_on_another_number_of_ranks_continues_the_run(tmp_path):
    whole = tmp_path / "whole"
    result = mpiexec(2, SCRIPT, "--iterations", "16", *TINY_ARGS, "--out", str(whole))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "interrupted"
    process = _start(out, 3, 16)
    _wait_for_steps(out, process, 6)
    process.send_signal(signal.SIGINT)  # Ctrl-C: the ranks finish the step and write a checkpoint
    _, stderr = finish(process, 60)
    assert process.returncode == 130, stderr
    stopped_at = int(read_checkpoint_extra(os.path.join(out, "checkpoint.npz"))["iteration"])
    assert 6 <= stopped_at < 16
    resumed = _start(out, 2, 16, "--resume")
    _, stderr = finish(resumed)
    assert resumed.returncode == 0, stderr
    got, expected = losses(out), losses(whole)
    assert sorted(got) == list(range(1, 17))  # every step once, none lost or done twice
    # the same batches, weights and optimiser state: the curves agree but for float32 rounding,
    # which BatchNorm's sums over 2 or 3 ranks order differently
    np.testing.assert_allclose([got[i] for i in range(1, 17)], [expected[i] for i in range(1, 17)], rtol=1e-3)


def _pid_of_rank(rank, out):
    """The process of rank ``rank`` of the run writing to ``out`` (read off /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and f"PMI_RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no process of rank {rank} writes to {out}")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_the_run_naming_it_and_the_checkpoint_stays_whole(tmp_path):
    process = _start(tmp_path, 2, 100000)
    _wait_for_steps(tmp_path, process, 6)
    os.kill(_pid_of_rank(1, tmp_path), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = finish(process, 60)
    assert time.monotonic() - killed < 10
    assert process.returncode != 0
    assert "error: rank 1 of 2 " in stderr, stderr
    assert read_checkpoint_extra(os.path.join(tmp_path, "checkpoint.npz"))["iteration"] >= 2


@pytest.mark.parametrize("arguments, ranks, message", [
    (["--batch-size", "2"], 3, "error: a batch of 2 images cannot be shared by 3 ranks; expected at most 2"),
    pytest.param(["--device", "cuda"], 2, "error: device 'cuda' ", id="gpu-without-a-gpu",
                 marks=pytest.mark.skipif(cupy_available(), reason="this machine has a GPU")),
], ids=["more-ranks-than-images", "gpu-without-a-gpu"])
def test_bad_arguments_are_one_error_line_from_rank_0(arguments, ranks, message, tmp_path):
    result = mpiexec(ranks, SCRIPT, "--iterations", "2", *TINY_ARGS, "--out", str(tmp_path), *arguments)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_batch_shares_are_near_equal_runs_and_too_many_ranks_are_refused():
    assert [distributed.batch_share(8, r, 3) for r in range(3)] == [(0, 2), (2, 5), (5, 8)]
    assert [distributed.batch_share(2, r, 2) for r in range(2)] == [(0, 1), (1, 2)]
    with pytest.raises(distributed.DistributedError, match="a batch of 2 images cannot be shared by 3 ranks"):
        distributed.batch_share(2, 0, 3)


def test_a_process_not_started_by_mpiexec_is_a_group_of_one_without_mpi(monkeypatch):
    for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed.run, "_world", None)
    group = distributed.world()
    assert isinstance(group, distributed.SingleProcess) and (group.rank, group.size) == (0, 1)
    a = np.arange(3.0)
    assert group.all_sum(a) is a and group.all_sum_vectors(a, 5) == (a, 5)


@pytest.mark.cuda
@pytest.mark.parametrize("ranks", [1, 2])
def test_nccl_sums_on_the_gpus(ranks):
    """One rank per GPU: one rank checks setting NCCL up and the device path of every sum; two
    check real sums between GPUs (skipped on a machine with one GPU)."""
    cupy = pytest.importorskip("cupy", reason="needs CuPy")
    if cupy.cuda.runtime.getDeviceCount() < ranks:
        pytest.skip(f"needs {ranks} NVIDIA GPUs, one per rank")
    result = mpiexec(ranks, CHECKS, "nccl")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok nccl on {ranks} ranks" in result.stdout


def test_docs_appendix_c_shows_what_the_data_parallel_step_prints():
    """examples/data_parallel_step.py gives the batch's loss and gradient on any number of ranks,
    and appendix C of the tour quotes its output for 1, 2 and 3 ranks word for word."""
    with open(os.path.join(REPO, "docs", "appendix_c_data_parallel.md"), encoding="utf-8") as f:
        page = f.read()
    step = os.path.join(REPO, "examples", "data_parallel_step.py")
    printed = []
    for ranks in (1, 2, 3):
        result = run([sys.executable, step]) if ranks == 1 else mpiexec(ranks, step)
        assert result.returncode == 0, result.stderr
        command = "python" if ranks == 1 else f"mpiexec -n {ranks} python"
        assert f"$ {command} examples/data_parallel_step.py\n{result.stdout}" in page
        printed.append(result.stdout.splitlines()[-1])
    assert len(set(printed)) == 1, printed


def test_dropout_masks_of_batch_shares_are_slices_of_the_whole_batch_mask():
    """Ranks that share a batch keep their part of the masks one process draws (nn.init.batch_share)."""
    from minifcn import nn
    from minifcn.tensor import Tensor
    x = np.ones((5, 3, 4, 4), dtype=np.float32)
    for layer in (nn.Dropout(0.5), nn.Dropout2d(0.5)):
        nn.manual_seed(7)
        whole = layer(Tensor(x)).numpy()
        for start, stop in [(0, 2), (2, 5)]:
            nn.manual_seed(7)
            with nn.init.batch_share(start, stop, 5):
                np.testing.assert_array_equal(layer(Tensor(x[start:stop])).numpy(), whole[start:stop])
    with pytest.raises(ValueError, match="a mask for 3 images, but this process holds 2"):
        with nn.init.batch_share(0, 2, 5):
            nn.Dropout(0.5)(Tensor(x[:3]))


def test_when_mpi_cannot_start_the_launcher_says_so_in_one_line_and_steps_aside(tmp_path, monkeypatch, capsys):
    from minifcn.distributed import launch
    monkeypatch.setattr(launch, "find_mpiexec", lambda: None)
    assert launch.run_under_mpiexec(2, ["script.py"]) is None
    assert capsys.readouterr().err == "note: training in one process: no mpiexec found (pip install mpich)\n"
    broken = tmp_path / "mpiexec"
    broken.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 7\n")
    broken.chmod(0o755)
    monkeypatch.setattr(launch, "find_mpiexec", lambda: str(broken))
    assert launch.run_under_mpiexec(2, ["script.py"]) is None
    assert capsys.readouterr().err.endswith(
        "note: training in one process: mpiexec -n 2 failed to start (exit status 7)\n")
