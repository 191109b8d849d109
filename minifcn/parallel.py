"""Running one op on several CPU cores: a small pool of worker threads.

Threads in Python usually buy nothing, because only one of them may run Python
code at a time (the GIL). NumPy lets go of the GIL inside its loops over large
arrays and inside BLAS, so two threads that each copy a block of im2col columns
and multiply it do run at once, on two cores. That is the whole trick: an op
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
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy
from threadpoolctl import ThreadpoolController


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
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_num_threads = None      # decided on first use, so the environment may be set after import
_pool = None             # ThreadPoolExecutor with _num_threads - 1 workers (the caller is one)
_pool_pid = None         # the process that started _pool
_state = threading.local()  # .inside: True in a worker (no nested pools: they could deadlock)
_blas = None             # threadpoolctl's view of the BLAS libraries NumPy loaded
_blas_limit = None       # the limit to one BLAS thread, while it holds
_setup_lock = threading.Lock()  # guards creating _pool and _blas_limit


def get_num_threads():
    """How many threads an op may use on the CPU (1: everything runs in the calling thread)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_num_threads()
    return _num_threads


def set_num_threads(threads):
    """Let CPU ops use ``threads`` threads (a positive int), as torch.set_num_threads."""
    global _num_threads, _pool
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if threads != _num_threads and _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
    if threads == 1:
        _give_blas_its_threads_back()
    _num_threads = threads


def _hold_blas_to_one_thread():
    """From now on, while minifcn uses several threads, BLAS multiplies on the calling thread only.

    Once, not around each op: every time BLAS gets its threads back, OpenBLAS wakes
    them, and they spin for a while on the cores the workers need (a training step
    took 15% longer when the limit was set and lifted around each op).
    """
    global _blas, _blas_limit
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


# A pass over less memory than this runs in the calling thread: handing a piece to a thread
# costs about 0.1 ms, and on a few MB two threads gain little (bench/RESULTS.md, round 2).
MIN_SHARED_BYTES = 16 << 20


def ranges(length, parts):
    """range(length) cut into at most ``parts`` (start, stop) runs of near-equal length
    (one, (0, length), when length is 0)."""
    parts = max(1, min(length, parts))
    bounds = [length * k // parts for k in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def shares(length, nbytes):
    """range(length) cut into one (start, stop) per thread, for a pass touching ``nbytes``;
    a single (0, length) when that is less than MIN_SHARED_BYTES, or with one thread."""
    return ranges(length, get_num_threads() if nbytes >= MIN_SHARED_BYTES else 1)


def split(items, parts):
    """``items`` (a list) cut into at most ``parts`` contiguous runs of near-equal length."""
    return [items[lo:hi] for lo, hi in ranges(len(items), parts)]


def run_parallel(function, pieces):
    """[function(piece) for piece in pieces], the pieces run at once on up to get_num_threads() threads.

    The calling thread runs the first piece itself, the workers the others: pass at
    most get_num_threads() pieces, or the extra ones wait in the workers' queue.
    ``function`` must only write what its piece owns. Exceptions propagate to the
    caller, after every piece ends. The workers run under the caller's NumPy error
    settings (numpy.seterr / errstate are per thread): a float error is ignored,
    warned about or raised as it would be in one thread.
    The first call with more than one thread holds BLAS to one thread from then on.
    """
    pieces = list(pieces)
    if len(pieces) == 0 or get_num_threads() == 1 or getattr(_state, "inside", False):
        return [function(piece) for piece in pieces]
    _hold_blas_to_one_thread()
    if len(pieces) == 1:
        return [function(pieces[0])]
    return _run_on_pool(function, pieces)


def _run_on_pool(function, pieces):
    global _pool, _pool_pid
    with _setup_lock:
        if _pool is None or _pool_pid != os.getpid():  # a forked child has the pool but not its threads
            _pool = ThreadPoolExecutor(max_workers=get_num_threads() - 1, thread_name_prefix="minifcn")
            _pool_pid = os.getpid()

    float_errors = numpy.geterr()  # the caller's; a new thread starts from NumPy's defaults

    def in_worker(piece):
        _state.inside = True
        try:
            with numpy.errstate(**float_errors):
                return function(piece)
        finally:
            _state.inside = False

    futures = [_pool.submit(in_worker, piece) for piece in pieces[1:]]
    results, error = [], None
    try:
        results.append(in_worker(pieces[0]))
    except BaseException as exc:  # still wait for the workers: they may write into our arrays
        error = exc
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
    return results
