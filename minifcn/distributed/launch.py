"""Starting a script's ranks, and stopping them all when one fails.

``python examples/train_fcn8s.py`` uses every core with no extra command: it starts
itself again as one rank per core under the ``mpiexec`` that ``pip install mpich``
put next to Python, and waits for them (``run_under_mpiexec``). A rank that raises
prints its error with its rank and aborts the whole run (``abort_on_error``), so that
the others do not wait forever in a sum it will never join; a rank that dies is seen
by mpiexec, which stops the others.

The launcher also sets the ranks' environment (``rank_environment``): BLAS gets one
thread in each rank, since the ranks already take every core between them, and
``--threads`` reaches them as MINIFCN_NUM_THREADS. A script therefore sets no
variables of its own before it imports NumPy.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback

from minifcn.backend.cpu.threads import cores as cores_of_this_machine, set_num_threads
from minifcn.distributed.group import launched_by_mpiexec
from minifcn.distributed.run import world

_STARTED = "MINIFCN_RANKS_STARTED"  # a folder where each rank leaves a file once MPI has started
# Read by the BLAS libraries when NumPy loads them; set to 1 in the ranks unless the user set one.
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def ranks_for(batch_size, requested=0, cores=None):
    """How many ranks to start: ``requested``, or with 0 one per core; never more than the
    images of a batch (each rank needs one)."""
    return max(1, min(requested or cores or cores_of_this_machine(), batch_size))


def find_mpiexec():
    """The mpiexec beside this Python (the mpich wheel's), else the first on PATH, else None."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


def rank_environment(threads=None, environ=None):
    """The environment for the ranks: ``environ`` (default ``os.environ``) with BLAS held to
    one thread (``BLAS_THREAD_VARIABLES`` at "1", unless any of them is set already: the
    user's choice wins), and MINIFCN_NUM_THREADS set to ``threads`` when given.

    One BLAS thread per rank, because a BLAS pool in each rank would compete with the other
    ranks for the cores; the variables must be set before NumPy loads BLAS, which is why the
    ranks get them from their environment rather than from a call."""
    env = dict(os.environ if environ is None else environ)
    if not any(name in env for name in BLAS_THREAD_VARIABLES):
        env.update(dict.fromkeys(BLAS_THREAD_VARIABLES, "1"))
    if threads is not None:
        env["MINIFCN_NUM_THREADS"] = str(threads)
    return env


def run_under_mpiexec(ranks, argv=None, threads=None):
    """Run this script again as ``ranks`` processes under mpiexec and wait for them.

    The ranks run in ``rank_environment(threads)``: BLAS on one thread each, and minifcn's
    ops on ``threads`` threads each (by default MINIFCN_NUM_THREADS, else their share of
    the cores).

    Returns their exit status, or None when MPI cannot start (no mpi4py, no mpiexec, or
    mpiexec failed before any rank started): then a one-line note has been printed and the
    caller goes on in this process. Ctrl-C is passed on to the ranks, which stop together.
    A rank that dies (killed) is named here: mpiexec itself names only its process id.
    """
    why = None
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        why = "mpi4py is not installed (pip install mpi4py mpich)"
    mpiexec = find_mpiexec()
    if why is None and mpiexec is None:
        why = "no mpiexec found (pip install mpich)"
    if why is None:
        with tempfile.TemporaryDirectory(prefix="minifcn-launch-") as started:
            command = [mpiexec, "-n", str(ranks), sys.executable] + list(sys.argv if argv is None else argv)
            env = dict(rank_environment(threads), **{_STARTED: started})
            # a session of its own: a Ctrl-C at the terminal reaches mpiexec once, through us
            ranks_process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                             preexec_fn=_die_with_parent, start_new_session=True)
            with _signals_passed_to(ranks_process) as passed:
                failed_pid = _copy_output(ranks_process.stdout)
                status = ranks_process.wait()
            pids = {int(name.split("-")[1]): int(name.split("-")[0]) for name in os.listdir(started)}
            if pids or passed:  # started, or stopped on purpose: never fall back then
                if failed_pid in pids:
                    print(f"error: rank {pids[failed_pid]} of {ranks} (process {failed_pid}) failed first; "
                          f"mpiexec stopped the others (exit status {status})", file=sys.stderr)
                return status
        why = f"mpiexec -n {ranks} failed to start (exit status {status})"
    print(f"note: training in one process: {why}", file=sys.stderr)
    return None


def run_on_every_core(body, script, argv, batch_size, processes=0, device="cpu", threads=None):
    """``body()`` on the ranks of a run; returns the exit status.

    Started as a plain script on the CPU, ``script`` starts itself again under mpiexec, one
    rank per core (``ranks_for(batch_size, processes)``, with ``argv`` or the command line's
    arguments), and waits; where MPI cannot start, or one rank is wanted, ``body`` runs here.
    Under mpiexec ``body`` runs on every rank, and an error of one rank's stops them all.
    ``threads`` (a script's ``--threads``): minifcn's threads for ``body``, here or in each
    rank started (``rank_environment``); None leaves the default."""
    if threads is not None:
        set_num_threads(threads)
        if launched_by_mpiexec():
            # a rank of the user's own mpiexec: the Trainer's share_cores keeps only this count
            os.environ["MINIFCN_NUM_THREADS"] = str(threads)
    if device == "cpu" and not launched_by_mpiexec():
        ranks = ranks_for(batch_size, processes)
        if ranks > 1:
            status = run_under_mpiexec(ranks, [script] + list(sys.argv[1:] if argv is None else argv), threads)
            if status is not None:
                return status
    announce_started()
    with abort_on_error():
        return body()


def report_error(err):
    """One ``error: ...`` line for ``err``, from rank 0. An error that every rank met
    (``on_every_rank``) is printed once, and the caller goes on to return; one of this
    rank's alone is raised again, for ``abort_on_error`` to name the rank and stop the others."""
    group = world()
    if group.size > 1 and not getattr(err, "on_every_rank", False):
        raise err
    if group.is_root:
        print(f"error: {err}", file=sys.stderr)


def stop_every_rank(status):
    """After a Ctrl-C outside a training step: the other ranks may be waiting in a sum for
    this one, so stop them all (with several ranks); else nothing."""
    if world().size > 1:
        world().abort(status)


def _copy_output(stream):
    """Copy the ranks' standard output to ours as it comes; returns the process id that
    mpiexec reports as the first to fail ("BAD TERMINATION ... PID n"), or None."""
    failed_pid = None
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
        found = re.search(rb"^=\s+PID (\d+) RUNNING AT", line)
        if found and failed_pid is None:
            failed_pid = int(found.group(1))
    return failed_pid


def _die_with_parent():
    """In the mpiexec child: if this launcher is killed, mpiexec is killed too (and it takes
    the ranks with it), so that no run goes on orphaned. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def announce_started():
    """Called by every rank once MPI is up: tells run_under_mpiexec that it started, and its
    rank and process id (a file ``<rank>-<pid>`` in the folder it gave)."""
    folder = os.environ.get(_STARTED)
    if folder and launched_by_mpiexec():
        open(os.path.join(folder, f"{world().rank}-{os.getpid()}"), "w").close()


@contextlib.contextmanager
def _signals_passed_to(process):
    """A Ctrl-C (SIGINT) or SIGTERM sent to this launcher goes on to mpiexec, which hands it to
    every rank: on Ctrl-C they finish the step, write a checkpoint and stop together."""
    passed = []

    def forward(signum, frame):
        passed.append(signum)
        process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield passed
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def abort_on_error(exit_status=1):
    """Under mpiexec with several ranks, an exception escaping the block is printed with
    the rank that raised it, and every rank of the run is stopped (MPI_Abort) with
    ``exit_status``. Otherwise the exception goes on as usual."""
    try:
        yield
    except BaseException as err:
        group = world() if launched_by_mpiexec() else None
        if group is None or group.size == 1 or isinstance(err, SystemExit) and not err.code:
            raise
        message = (str(err) if isinstance(err, (ValueError, RuntimeError, OSError, FloatingPointError))
                   else traceback.format_exc().rstrip())
        print(f"error: rank {group.rank} of {group.size}: {message}", file=sys.stderr, flush=True)
        group.abort(exit_status)
