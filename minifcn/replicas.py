"""Data parallelism on the CPU: one training step split over processes, one per core.

Why processes, when minifcn already runs each op on several threads
(minifcn.parallel)? Threads share one interpreter, and only one of them may run
Python at a time (the GIL). NumPy lets go of it inside long loops, but a step
of the default net makes some two thousand NumPy calls, most of them short, and
threads passing the GIL between short calls waited about 40 us for each other
each time: the step kept 1.3 of 2 cores busy (bench/RESULTS.md, round 7).
Processes have an interpreter each, so nothing is shared that they must queue
for. This is what PyTorch's DistributedDataParallel does, on one machine.

A step on a batch of B images with R replicas (processes), this one first:

1. The batch is cut into R shares of consecutive images; each worker gets its
   share through a pipe, and this process keeps the first.
2. Each replica runs forward and backward on its share, on one thread. A
   share's loss is its summed pixel losses divided by the labelled pixels of
   the *whole* batch, so the shares' losses, and their gradients, add up to
   the batch's mean loss and its gradient.
3. BatchNorm normalises with the whole batch's statistics: at each BatchNorm
   the replicas add up their per-channel sums (minifcn.collective; three
   exchanges per layer, two forward and one backward).
4. Each worker leaves its parameter gradients in shared memory; this process
   adds them to its own, in replica order, and the optimiser steps here as in
   a one-process run. The weights themselves live in shared memory, so the
   workers see the update without a copy.

An exchange goes through this process (a star): a worker writes its vector
into its slot of shared memory and posts this process's semaphore; this
process waits for every worker, adds the slots in replica order, writes the
total and posts each worker's semaphore. All replicas so get the same bits.
Replicas reach each exchange at about the same time (they do the same work),
so a waiting replica first spins for a while: waking one that went to sleep
costs about 40 us on our VM, and there are some fifty exchanges a step.

The result equals a one-process step's up to float rounding: BatchNorm's sums
and the gradients are added in another order. Dropout draws each share's
masks from a seed that this process draws per step, so a run is reproducible
(and resumable) for a given number of replicas, but not across numbers.

The replicas run in processes started with "spawn" (a fresh interpreter: safe
with threads, on every OS), so a script that trains must keep its top-level
code under ``if __name__ == "__main__":``, as multiprocessing requires.
"""

import contextlib
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np

from minifcn import collective, nn, parallel
from minifcn import functional as F
from minifcn.autograd import no_grad
from minifcn.memory import keep_freed_memory
from minifcn.tensor import Tensor

_ALIGN = 64                   # bytes: each shared array starts on a cache line of its own
_EXCHANGE_CAPACITY = 1 << 14  # float64s in a slot: 2 of header, then the vector (BatchNorm's
                              # backward sends 2 C + 1 values: up to 8190 channels)
_SPIN_SECONDS = 2e-3          # how long a waiting replica spins before it sleeps
_WATCH_SECONDS = 0.1          # a sleeping replica checks on the others this often
_START_SECONDS = 120.0        # a worker that has not started by then never will


class ReplicaError(RuntimeError):
    """A worker process of a data-parallel step failed or stopped."""


def share_bounds(batch_size, replicas):
    """The (start, stop) of each replica's images: consecutive runs of near-equal length."""
    return parallel.ranges(batch_size, replicas)


def replicas_for(batch_size, requested=0):
    """How many replicas to use: ``requested``, or with 0, one per core (get_num_threads())
    up to one image each."""
    if requested:
        return min(requested, batch_size)
    if multiprocessing.current_process().daemon or not _main_is_importable():
        return 1  # no worker could start: the step runs in this process
    return max(1, min(parallel.get_num_threads(), batch_size))


def _main_is_importable():
    """False where a spawned worker could not import the main script (read from stdin)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is not None or path is None or os.path.exists(path)


# ---- shared memory ------------------------------------------------------------------

def _layout(specs):
    """[(shape, dtype)] -> (byte offset of each, total bytes), each start aligned."""
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        total += -(-math.prod(shape) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
    return offsets, max(total, _ALIGN)


def _views(buffer, specs, base=0):
    """The arrays of ``specs`` (as _layout places them), as views of ``buffer`` from byte ``base``."""
    offsets, _ = _layout(specs)
    return [np.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=base + offset).reshape(shape)
            for (shape, dtype), offset in zip(specs, offsets)]


class _Exchange:
    """Sums over the replicas (minifcn.collective's all_sum), through shared slots and semaphores.

    slots (R, capacity) float64: row r is replica r's exchange (its number in the step and its
    size, then the vector); totals (capacity,): the sum, written by replica 0. arrived: posted
    by each worker when its slot is written (replica 0 waits on it); released[r - 1]: posted by
    replica 0 when the total is written. Replica 0 checks that every replica is at the same
    exchange with a vector of the same size: replicas whose models differ (a layer frozen after
    the group started) would otherwise add up unrelated numbers without a word.
    """

    _HEADER = 2  # the exchange's number in the step, and the vector's size

    def __init__(self, rank, slots, totals, arrived, released, check_others):
        self.rank, self.slots, self.totals = rank, slots, totals
        self.arrived, self.released = arrived, released
        self.check_others = check_others  # raises ReplicaError if another replica failed
        self.number = 0  # exchanges so far in this step

    def all_sum(self, vector):
        size, start = vector.size, self._HEADER
        if size > self.slots.shape[1] - start:
            raise ValueError(f"an exchange of {size} values is more than the {self.slots.shape[1] - start} "
                             "a data-parallel step may send at once (BatchNorm over too many channels)")
        self.number += 1
        if self.rank == 0:
            for _ in range(len(self.slots) - 1):
                self.wait(self.arrived)
            total = vector.astype(np.float64)  # a copy: replica 0's own, then the others in order
            for rank, row in enumerate(self.slots[1:], start=1):
                if (row[0], row[1]) != (self.number, size):
                    raise ReplicaError(
                        f"replica {rank} sent {int(row[1])} values for exchange {int(row[0])} of the step, "
                        f"this process {size} for exchange {self.number}: the replicas' models differ "
                        "(changed after the group started?)")
                total += row[start:start + size]
            self.totals[:size] = total
            for semaphore in self.released:
                semaphore.release()
            return total
        self.slots[self.rank, :start] = self.number, size
        self.slots[self.rank, start:start + size] = vector
        self.arrived.release()
        self.wait(self.released[self.rank - 1])
        return self.totals[:size].copy()

    def wait(self, semaphore):
        """Take ``semaphore``: spin on it a while, then sleep, checking on the other replicas."""
        deadline = time.perf_counter() + _SPIN_SECONDS
        while not semaphore.acquire(False):
            if time.perf_counter() > deadline:
                while not semaphore.acquire(timeout=_WATCH_SECONDS):
                    self.check_others()
                return


def _share_loss(model, images, labels, ignore_index, labelled_in_batch):
    """(1, ...) Tensor: this share's summed pixel loss over the whole batch's labelled pixels."""
    scores = model(Tensor(images))
    summed = F.softmax_cross_entropy(scores, labels, ignore_index=ignore_index, reduction="sum")
    return summed * (1.0 / labelled_in_batch)


def _run_share(model, exchange, images, labels, ignore_index, labelled_in_batch, seed):
    """Forward and backward of one share, in training mode; returns its loss."""
    model.train()
    for param in model.parameters():
        param.grad = None
    nn.manual_seed(seed)  # this share's dropout masks
    exchange.number = 0
    with parallel.serial_ops(), collective.exchanging_through(exchange):
        loss = _share_loss(model, images, labels, ignore_index, labelled_in_batch)
        loss.backward()
    return loss.item()


# ---- the worker processes --------------------------------------------------------

def _serve(rank, model, specs, weights, grads, slots, totals, arrived, released, commands):
    """A worker's life: bind the model to the shared weights, then run one share per command."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the first process's to handle
    keep_freed_memory()
    parent = multiprocessing.parent_process()

    def check_parent():
        if parent is not None and not parent.is_alive():
            raise SystemExit(0)

    try:
        params = list(model.parameters())
        for param, view in zip(params, _views(weights, specs)):
            param.data = view
        grad_views = _views(grads, specs, base=(rank - 1) * _layout(specs)[1])
        exchange = _Exchange(rank, _float64_view(slots).reshape(-1, _EXCHANGE_CAPACITY),
                             _float64_view(totals), arrived, released, check_parent)
    except BaseException:
        commands.send(("error", traceback.format_exc()))
        return
    commands.send(("ready", None))
    while True:
        try:
            while not commands.poll(_WATCH_SECONDS):
                check_parent()
            command = commands.recv()
        except (EOFError, OSError):  # the first process is gone
            return
        if command is None:
            return
        try:
            loss = _run_share(model, exchange, *command)
            flags = []
            for param, view in zip(params, grad_views):
                flags.append(param.grad is not None)
                if param.grad is None:
                    view[...] = 0
                else:
                    view[...] = param.grad
                param.grad = None
            # the last exchange of the step: the loss and which gradients exist; it also
            # tells replica 0 that the gradients above are written
            exchange.all_sum(np.array([loss] + flags, dtype=np.float64))
        except SystemExit:  # check_parent: nobody left to tell
            return
        except BaseException:
            try:
                commands.send(("error", traceback.format_exc()))
            except OSError:
                pass
            return


def _float64_view(raw):
    return np.frombuffer(raw, dtype=np.float64)


# ---- the first process's side -------------------------------------------------------

class ReplicaGroup:
    """``replicas - 1`` worker processes, each with a copy of ``model`` whose weights are
    this process's, in shared memory; ``step(images, labels)`` runs forward and backward
    of one batch across all of them.

    Creating the group moves ``model``'s parameters into shared memory (their values are
    kept). The workers copy the model as it is then: later changes to its weights reach them,
    changes to its layers (a parameter frozen, a dropout rate) need a fresh group.
    ``close()`` stops the workers; the parameters stay where they are.
    """

    def __init__(self, model, replicas):
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 2:
            raise ValueError(f"replicas must be an int of at least 2, got {replicas!r}")
        context = multiprocessing.get_context("spawn")
        if multiprocessing.current_process().daemon:
            raise ReplicaError("a data-parallel step needs worker processes, and this process is a "
                               "daemonic one, which may not start any: use processes=1")
        self.model, self.replicas = model, replicas
        self.params = list(model.parameters())
        self.specs = [(p.data.shape, p.data.dtype) for p in self.params]
        self.wanted = [p.requires_grad for p in self.params]  # as the workers' copies have it
        if any(not isinstance(p.data, np.ndarray) for p in self.params):
            raise ReplicaError("data-parallel steps run on the CPU; the model is on the GPU")
        _, weight_bytes = _layout(self.specs)
        self._weights = context.RawArray("b", weight_bytes)
        self._grads = context.RawArray("b", weight_bytes * (replicas - 1))
        self._slots = context.RawArray("b", 8 * _EXCHANGE_CAPACITY * replicas)
        self._totals = context.RawArray("b", 8 * _EXCHANGE_CAPACITY)
        self.weights = _views(self._weights, self.specs)
        self.grads = [_views(self._grads, self.specs, base=r * weight_bytes) for r in range(replicas - 1)]
        self._bind_weights()
        arrived = context.Semaphore(0)
        released = [context.Semaphore(0) for _ in range(replicas - 1)]
        self.exchange = _Exchange(0, _float64_view(self._slots).reshape(replicas, _EXCHANGE_CAPACITY),
                                  _float64_view(self._totals), arrived, released, self._check_workers)
        self.workers, self.pipes = [], []
        try:
            # the workers map the shared weights instead; and they ignore Ctrl-C from birth (the
            # terminal sends it to every process of the group): the first process handles it
            with _weights_set_aside(self.params), _ctrl_c_ignored():
                for rank in range(1, replicas):
                    mine, theirs = context.Pipe()
                    worker = context.Process(
                        target=_serve, name=f"minifcn-replica-{rank}", daemon=True,
                        args=(rank, model, self.specs, self._weights, self._grads, self._slots,
                              self._totals, arrived, released, theirs))
                    worker.start()
                    theirs.close()
                    self.workers.append(worker)
                    self.pipes.append(mine)
            for rank, pipe in enumerate(self.pipes, start=1):
                self._expect_ready(rank, pipe)
        except BaseException:
            self.close()
            raise

    def _expect_ready(self, rank, pipe):
        worker, deadline = self.workers[rank - 1], time.monotonic() + _START_SECONDS
        try:
            while not pipe.poll(_WATCH_SECONDS):
                if not worker.is_alive() or time.monotonic() > deadline:
                    raise EOFError
            kind, text = pipe.recv()
        except EOFError:
            worker.join(1.0)
            if worker.exitcode is None:
                raise ReplicaError(f"replica {rank} did not start within {_START_SECONDS:.0f} s") from None
            if worker.exitcode < 0:
                raise ReplicaError(f"replica {rank} was stopped by signal {-worker.exitcode} while "
                                   "starting") from None
            raise ReplicaError(
                f"replica {rank} did not start (exit code {worker.exitcode}; its error is printed "
                "above). Worker processes start a fresh Python that imports the main script: it "
                "must keep its top-level code under `if __name__ == \"__main__\":`, and cannot "
                "be read from stdin. Or use processes=1") from None
        if kind != "ready":
            raise ReplicaError(f"replica {rank} failed while starting:\n{text}")

    def _bind_weights(self):
        """Make each parameter's data the shared array, copying in values set since (a loaded
        checkpoint replaces the arrays)."""
        for param, view in zip(self.params, self.weights):
            if param.data is not view:
                view[...] = param.data
                param.data = view

    def matches(self, model):
        """True if ``model`` is still the one the workers copied: the same parameters, of the
        same shapes, each still wanting a gradient or not."""
        params = list(model.parameters())
        return (model is self.model and len(params) == len(self.params)
                and all(p is q and (p.data.shape, p.data.dtype, p.requires_grad) == spec + (wanted,)
                        for p, q, spec, wanted in zip(params, self.params, self.specs, self.wanted)))

    def _check_workers(self, grace=0.0):
        """Raise ReplicaError if a worker reported an error or is gone (waiting up to ``grace``
        seconds for one whose pipe has closed to exit)."""
        for rank, (worker, pipe) in enumerate(zip(self.workers, self.pipes), start=1):
            if pipe.poll():
                try:
                    _, text = pipe.recv()
                except EOFError:  # closed: the worker is exiting
                    worker.join(grace)
                else:
                    raise ReplicaError(f"replica {rank} failed during a training step:\n{text}")
            if not worker.is_alive():
                raise ReplicaError(f"replica {rank} stopped during a training step "
                                   f"(exit code {worker.exitcode})")

    def step(self, images, labels, ignore_index=255):
        """Forward and backward of the batch (images (B, 3, H, W), labels (B, H, W)) over the
        replicas; leaves the batch's gradients in this process's parameters; returns the
        batch's mean loss. After an error the group is closed (a worker may be stuck)."""
        if self.closed:
            raise ReplicaError("this replica group is closed (after an error, or by close()); "
                               "start a new one")
        try:
            return self._step(images, labels, ignore_index)
        except BaseException:
            self.close(wait=False)  # a worker may be waiting in an exchange that never comes
            raise

    def _step(self, images, labels, ignore_index):
        self._bind_weights()
        bounds = share_bounds(len(images), self.replicas)
        if len(bounds) < self.replicas:
            raise ValueError(f"a batch of {len(images)} images cannot be shared by {self.replicas} "
                             "replicas; expected at least one image each")
        labelled = max(int(np.count_nonzero(labels != ignore_index)), 1)
        seeds = nn.init.generator().integers(0, 2 ** 63, size=self.replicas)
        for pipe, (start, stop), seed in zip(self.pipes, bounds[1:], seeds[1:]):
            try:
                pipe.send((images[start:stop], labels[start:stop], ignore_index, labelled, int(seed)))
            except OSError:  # a worker that is gone: say which, and why
                self._check_workers(grace=1.0)
                raise
        start, stop = bounds[0]
        loss = _run_share(self.model, self.exchange, images[start:stop], labels[start:stop],
                          ignore_index, labelled, int(seeds[0]))
        flags = [p.grad is not None for p in self.params]
        totals = self.exchange.all_sum(np.array([loss] + flags, dtype=np.float64))
        with no_grad():
            for index, param in enumerate(self.params):
                if totals[1 + index] > flags[index]:  # some worker has a gradient for it
                    summed = param.grad if flags[index] else 0
                    for worker_grads in self.grads:
                        summed = summed + worker_grads[index]
                    param.grad = summed
        return float(totals[0])

    def close(self, wait=True):
        """Stop the workers: ask them, and give them a second in all (``wait=False``: none)."""
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + (1.0 if wait else 0.0)
        for worker in self.workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.terminate()
                worker.join()
        for pipe in self.pipes:
            pipe.close()
        self.workers, self.pipes = [], []

    @property
    def closed(self):
        return not self.workers


@contextlib.contextmanager
def _ctrl_c_ignored():
    """SIGINT ignored within the block, in the main thread (elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _weights_set_aside(params):
    """Within the block each parameter's data is an empty array (of its dtype), so that
    pickling the model for a worker does not copy its weights; restored afterwards."""
    saved = [param.data for param in params]
    try:
        for param in params:
            param.data = np.empty(0, dtype=param.data.dtype)
        yield
    finally:
        for param, data in zip(params, saved):
            param.data = data
