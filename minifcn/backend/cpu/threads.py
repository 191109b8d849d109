"""The fast CPU backend's thread pool: one primitive on several cores.

Threads in Python usually buy nothing, because only one of them may run Python
code at a time (the GIL). NumPy lets go of the GIL inside its loops over large
arrays and inside BLAS, so two threads that each copy a block of im2col columns
and multiply it do run at once, on two cores. That is the whole trick: a primitive
splits its work into independent pieces (a convolution: runs of im2col
blocks, or shares of its output channels; a ReLU, max-pool or loss pass over
more than ``MIN_SHARED_BYTES``: a share of its elements, channels or rows each,
from ``shares``), hands them to ``run_parallel``, and each worker writes a
disjoint part of the result. BLAS threads alone cannot do this: they split only
the matrix products, not the copies around them, and multiply thin matrices
(8 output channels) poorly.

While minifcn runs ops on several threads, it holds BLAS to one thread, for
the whole process (through threadpoolctl), so that the parallel work is split
in one place only (PyTorch's intra-op pool, too, runs its BLAS calls on one
thread each inside its parallel regions): two workers that each start a BLAS
pool of two would put four busy threads on two cores, and OpenBLAS's threads
spin a while after each product, on the cores the workers need. An op with a
single large product (fc6 on one image) splits it by output channels itself.
``set_num_threads(1)`` gives BLAS its threads back, and then BLAS's own
threads, if any, split the products.

The number of workers is ``get_num_threads()``: the environment variable
``MINIFCN_NUM_THREADS`` if set, else the number of cores this process may run
on. ``set_num_threads(1)`` makes every op run serially in the calling thread.
Results do not depend on the split except for the order of floating-point
sums (a weight gradient summed over blocks); a given thread count always gives
the same bits. Ops are meant to be called from one thread at a time: the pool
is minifcn's, not something to share between threads of your own.

The small ops of a small net gain little from threads: each hand-off costs
more than the op. A training step therefore goes one level up
(minifcn.distributed): one process per core, each running its share of the
batch with every op in its one thread (``share_cores``).
"""

import os
import threading

import numpy
from threadpoolctl import ThreadpoolController

from minifcn.backend.cpu import tuning


def _default_num_threads():
    value = os.environ.get("MINIFCN_NUM_THREADS")
    if value is not None:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"MINIFCN_NUM_THREADS must be a positive integer, got {value!r}")
        return threads
    return cores()


def cores():
    """How many cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_num_threads = None      # decided on first use, so the environment may be set after import
_workers = []            # the _Worker threads, _num_threads - 1 of them (the caller is one)
_workers_pid = None      # the process that started them (a forked child has none of its threads)
_busy = threading.Lock()  # held by the thread whose op is using the workers
_blas = None             # threadpoolctl's view of the BLAS libraries NumPy loaded
_blas_limit = None       # the limit to one BLAS thread, while it holds
_setup_lock = threading.Lock()  # guards creating _blas_limit


def get_num_threads():
    """How many threads an op may use on the CPU (1: everything runs in the calling thread)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_num_threads()
    return _num_threads


def share_cores(processes):
    """This process is one of ``processes`` working at once on this machine: its ops get an
    equal share of the cores (at least one thread; MINIFCN_NUM_THREADS, when set, wins),
    and BLAS one thread, so that the processes do not take each other's cores."""
    global _num_threads
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive int, got {processes!r}")
    threads = _default_num_threads()
    if "MINIFCN_NUM_THREADS" not in os.environ:
        threads = max(1, threads // processes)
    with _busy:
        _stop_workers()
    _hold_blas_to_one_thread()
    _num_threads = threads


def set_num_threads(threads):
    """Let CPU ops use ``threads`` threads (a positive int), as torch.set_num_threads."""
    global _num_threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if threads != _num_threads:
        with _busy:  # not while an op runs on them
            _stop_workers()
    if threads == 1:
        _give_blas_its_threads_back()
    _num_threads = threads


def _hold_blas_to_one_thread():
    """From now on, while minifcn uses several threads, BLAS multiplies on the calling thread only.

    Once, not around each op: every time BLAS gets its threads back, OpenBLAS wakes
    them, and they spin for a while on the cores the workers need (a training step
    was slower when the limit was set and lifted around each op).
    """
    global _blas, _blas_limit
    if _blas_limit is not None:  # the usual case, on every call: no lock needed to see it
        return
    with _setup_lock:
        if _blas_limit is None:
            if _blas is None:
                _blas = ThreadpoolController()
            _blas_limit = _blas.limit(limits=1, user_api="blas")


def _give_blas_its_threads_back():
    global _blas_limit
    with _setup_lock:
        if _blas_limit is not None:
            _blas_limit.restore_original_limits()
            _blas_limit = None


def ranges(length, parts):
    """range(length) cut into at most ``parts`` (start, stop) runs of near-equal length
    (one, (0, length), when length is 0)."""
    parts = max(1, min(length, parts))
    bounds = [length * k // parts for k in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def shares(length, nbytes):
    """range(length) cut into one (start, stop) per thread, for a pass touching ``nbytes``;
    a single (0, length) when that is less than tuning.MIN_SHARED_BYTES, or with one thread."""
    return ranges(length, get_num_threads() if nbytes >= tuning.MIN_SHARED_BYTES else 1)


def split(items, parts):
    """``items`` (a list) cut into at most ``parts`` contiguous runs of near-equal length."""
    return [items[lo:hi] for lo, hi in ranges(len(items), parts)]


def run_parallel(function, pieces):
    """[function(piece) for piece in pieces], the pieces run at once on up to get_num_threads() threads.

    The pieces are cut into one run of consecutive pieces per thread (``split``): the
    calling thread runs the first run itself, the workers the others. ``function`` must
    only write what its piece owns. Exceptions propagate to the caller, after every
    piece ends. The workers run under the caller's NumPy error settings (numpy.seterr /
    errstate are per thread): a float error is ignored, warned about or raised as it
    would be in one thread. A call made while the workers are busy (from inside a
    piece, or from a second thread of yours) runs its pieces in the calling thread.
    The first call with more than one thread holds BLAS to one thread from then on.
    """
    pieces = list(pieces)
    if pieces and get_num_threads() > 1:
        _hold_blas_to_one_thread()
    if len(pieces) <= 1 or get_num_threads() == 1 or not _busy.acquire(blocking=False):
        return [function(piece) for piece in pieces]
    try:
        return _run_on_workers(function, split(pieces, get_num_threads()))
    finally:
        _busy.release()


class _Worker:
    """One thread of the pool, handed one run of pieces at a time.

    Two plain locks pass the work over and the results back, one futex wake-up each: a
    ThreadPoolExecutor's queue, Future and Condition cost more than a small op's work.
    """

    def __init__(self, index):
        self._work_ready = threading.Lock()
        self._work_ready.acquire()  # released by hand(): work is waiting
        self._work_done = threading.Lock()
        self._work_done.acquire()   # released by the thread: results are waiting
        self._work = self._outcome = None
        self._float_errors = None  # the NumPy error settings last copied from a caller
        self._thread = threading.Thread(target=self._serve, name=f"minifcn-worker-{index}", daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            self._work_ready.acquire()
            if self._work is None:  # stop()
                return
            function, pieces, float_errors = self._work
            try:
                if float_errors != self._float_errors:  # they are per thread, and rarely change
                    numpy.seterr(**float_errors)
                    self._float_errors = float_errors
                self._outcome = [function(piece) for piece in pieces], None
            except BaseException as exc:
                self._outcome = None, exc
            self._work = None
            self._work_done.release()

    def hand(self, function, pieces, float_errors):
        self._work = (function, pieces, float_errors)
        self._work_ready.release()

    def collect(self):
        """(results, None) or (None, the exception), once the run handed over has ended."""
        self._work_done.acquire()
        outcome, self._outcome = self._outcome, None
        return outcome

    def stop(self):
        self._work = None
        self._work_ready.release()
        self._thread.join()


def _stop_workers():
    global _workers
    if _workers_pid == os.getpid():
        for worker in _workers:
            worker.stop()
    _workers = []


def _run_on_workers(function, runs):
    global _workers, _workers_pid
    if len(_workers) != get_num_threads() - 1 or _workers_pid != os.getpid():
        _stop_workers()  # none in a forked child: it has the list but not the threads
        _workers = [_Worker(index) for index in range(1, get_num_threads())]
        _workers_pid = os.getpid()
    float_errors = numpy.geterr()  # the caller's; a new thread starts from NumPy's defaults
    for worker, run in zip(_workers, runs[1:]):
        worker.hand(function, run, float_errors)
    results, error = [], None
    try:
        results.extend(function(piece) for piece in runs[0])
    except BaseException as exc:  # still wait for the workers: they may write into our arrays
        error = exc
    for worker, _ in zip(_workers, runs[1:]):
        run_results, run_error = worker.collect()
        if run_error is not None:
            error = error or run_error
        else:
            results.extend(run_results)
    if error is not None:
        raise error
    return results
