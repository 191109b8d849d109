"""The fast CPU backend's thread pool (minifcn.backend.cpu.threads): a primitive on several cores."""

import os
import threading
import time
import warnings

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import minifcn as mf
from minifcn.backend.cpu import conv_products as cpu_conv_products, threads as parallel, tuning

from conftest import random_weights


@pytest.mark.parametrize("count, parts", [(0, 2), (1, 3), (5, 2), (7, 3), (3, 8)])
def test_split_keeps_order_and_balances(count, parts):
    items = list(range(count))
    runs = parallel.split(items, parts)
    assert [item for run in runs for item in run] == items
    assert len(runs) == max(1, min(parts, count))
    lengths = [len(run) for run in runs]
    assert max(lengths) - min(lengths) <= 1


def test_workers_keep_the_callers_float_error_settings(threads):
    """NumPy's error settings are per thread: a worker must ignore, warn or raise as the caller asked."""
    threads(2)

    def divide(k):  # divides by zero in the worker's piece only
        return np.ones(4, np.float32) / np.zeros(4, np.float32) if k == 1 else None

    with np.errstate(divide="raise"), pytest.raises(FloatingPointError):
        parallel.run_parallel(divide, [0, 1])
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel.run_parallel(divide, [0, 1])
    with np.errstate(divide="raise"), pytest.raises(FloatingPointError):  # and back: the worker follows
        parallel.run_parallel(divide, [0, 1])


def test_shares_cut_only_large_passes(threads):
    threads(3)
    big = tuning.MIN_SHARED_BYTES
    assert parallel.shares(7, big) == [(0, 2), (2, 4), (4, 7)]
    assert parallel.shares(2, big) == [(0, 1), (1, 2)]  # never an empty share
    assert parallel.shares(7, big - 1) == [(0, 7)]     # too small to be worth a thread
    threads(1)
    assert parallel.shares(7, big) == [(0, 7)]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_results_come_back_in_piece_order(threads, count):
    threads(count)
    pieces = list(range(7))
    assert parallel.run_parallel(lambda p: p * p, pieces) == [p * p for p in pieces]


def test_pieces_really_run_on_two_threads(threads):
    threads(2)
    both_started = threading.Barrier(2, timeout=10)  # deadlocks (times out) if run one after another
    names = parallel.run_parallel(lambda _: (both_started.wait(), threading.current_thread().name)[1], [0, 1])
    assert len(set(names)) == 2


def _workers_alive():
    return [t for t in threading.enumerate() if t.name.startswith("minifcn-worker")]


def test_changing_the_thread_count_replaces_the_workers(threads):
    threads(3)
    all_started = threading.Barrier(3, timeout=10)
    names = parallel.run_parallel(lambda _: (all_started.wait(), threading.current_thread().name)[1], [0, 1, 2])
    assert len(set(names)) == 3 and len(_workers_alive()) == 2
    threads(2)
    assert _workers_alive() == []  # stopped, not left waiting for work
    parallel.run_parallel(lambda k: k, [0, 1])
    assert len(_workers_alive()) == 1


def test_a_call_while_the_workers_are_busy_runs_in_its_own_thread(threads):
    """Two threads of a user's may run ops at once: the second waits for nobody."""
    threads(2)
    worker_inside, let_go, results = threading.Event(), threading.Event(), []

    def slow(k):
        if k == 1:
            worker_inside.set()
            let_go.wait(10)

    other = threading.Thread(target=lambda: results.append(parallel.run_parallel(slow, [0, 1])))
    other.start()
    try:
        assert worker_inside.wait(10)
        names = parallel.run_parallel(lambda _: threading.current_thread().name, [0, 1, 2])
        assert set(names) == {threading.current_thread().name}
    finally:
        let_go.set()
        other.join(10)
    assert results == [[None, None]]


def test_one_thread_runs_in_the_caller(threads):
    threads(1)
    names = parallel.run_parallel(lambda _: threading.current_thread().name, [0, 1, 2])
    assert set(names) == {threading.current_thread().name}


def test_an_error_is_raised_after_every_piece_ends(threads):
    threads(2)
    finished = []

    def piece(k):
        if k == 0:
            raise ValueError("piece 0 failed")
        time.sleep(0.05)
        finished.append(k)

    with pytest.raises(ValueError, match="piece 0 failed"):
        parallel.run_parallel(piece, [0, 1])
    assert finished == [1]  # the worker was waited for: it may write into the caller's arrays


def test_small_convolutions_stay_in_the_calling_thread(threads, monkeypatch):
    """Handing work to a thread costs about 0.1 ms, more than a small convolution saves."""
    threads(2)
    calls = []
    monkeypatch.setattr(cpu_conv_products, "run_parallel", lambda f, pieces: calls.append(len(pieces)) or
                        [f(piece) for piece in pieces])
    small = mf.Tensor(np.ones((1, 4, 8, 8), np.float32))
    mf.functional.conv2d(small, mf.Tensor(np.ones((4, 4, 3, 3), np.float32)), padding=1)
    assert calls == []
    large = mf.Tensor(np.ones((2, 32, 64, 64), np.float32))
    mf.functional.conv2d(large, mf.Tensor(np.ones((32, 32, 3, 3), np.float32)), padding=1)
    assert calls == [2]


def test_a_forked_child_starts_its_own_pool(threads):
    """A child made by fork inherits the pool object but none of its threads."""
    import multiprocessing
    threads(2)
    parallel.run_parallel(lambda k: k, [0, 1])  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply(parallel.run_parallel, (abs, [-1, -2, -3])) == [1, 2, 3]


def test_nested_calls_run_inline(threads):
    threads(2)
    inner = parallel.run_parallel(lambda _: parallel.run_parallel(lambda k: k + 1, [1, 2]), [0, 1])
    assert inner == [[2, 3], [2, 3]]


def _blas_threads():
    return [library["num_threads"] for library in threadpool_info() if library["user_api"] == "blas"]


def test_blas_is_held_to_one_thread_while_minifcn_uses_several(threads):
    threads(1)
    before = _blas_threads()
    threads(2)
    inside = parallel.run_parallel(lambda _: _blas_threads(), [0, 1])
    assert all(count == 1 for counts in inside for count in counts)
    assert all(count == 1 for count in _blas_threads())  # held: no pool woken between ops
    threads(1)
    assert _blas_threads() == before  # given back


def test_a_process_sharing_the_cores_gets_its_share_and_blas_one_thread(threads, monkeypatch):
    """A rank of a data-parallel run (minifcn.distributed) that shares the machine with others:
    its ops get cores / processes threads (at least one), and BLAS one thread."""
    monkeypatch.delenv("MINIFCN_NUM_THREADS", raising=False)
    monkeypatch.setattr(parallel, "_default_num_threads", lambda: int(os.environ.get("MINIFCN_NUM_THREADS", 4)))
    threads(4)
    parallel.share_cores(2)
    assert mf.get_num_threads() == 2
    assert all(count == 1 for count in _blas_threads())
    parallel.share_cores(8)
    assert mf.get_num_threads() == 1
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "3")  # the user's choice wins
    parallel.share_cores(2)
    assert mf.get_num_threads() == 3
    with pytest.raises(ValueError, match="processes must be a positive int, got 0"):
        parallel.share_cores(0)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_set_num_threads_rejects_what_is_not_a_positive_int(bad):
    with pytest.raises(ValueError, match=rf"threads must be a positive int, got {bad!r}"):
        mf.set_num_threads(bad)


@pytest.mark.parametrize("value", ["0", "two", "-3"])
def test_a_bad_environment_variable_is_named(monkeypatch, value):
    monkeypatch.setenv("MINIFCN_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"MINIFCN_NUM_THREADS must be a positive integer, got '{value}'"):
        parallel._default_num_threads()


def test_the_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "3")
    assert parallel._default_num_threads() == 3


@pytest.mark.parametrize("channels_per_thread", [1, 10 ** 9], ids=["threads-share-channels", "threads-share-rows"])
def test_a_training_step_is_the_same_with_one_and_two_threads(threads, monkeypatch, channels_per_thread):
    """Ops that split work across threads: a small FCN-8s with random weights gives the same
    loss, and the same gradient for every parameter and for the image."""
    monkeypatch.setattr(tuning, "MIN_FLOPS_PER_THREAD", 0)  # split even tiny convolutions
    monkeypatch.setattr(tuning, "MIN_SHARED_BYTES", 0)      # and every pass over memory
    monkeypatch.setattr(tuning, "MIN_CHANNELS_PER_THREAD", channels_per_thread)
    losses, grads = [], []
    for count in (1, 2):
        threads(count)
        mf.nn.manual_seed(0)
        model = mf.models.fcn8s(num_classes=3, width=1 / 16, fc6_kernel=3, fc_channels=16, batch_norm=True,
                                learnable_upsampling=True).to(dtype=np.float64)
        random_weights(model, np.random.default_rng(3))
        image = mf.Tensor(np.random.default_rng(1).standard_normal((2, 3, 37, 29)), requires_grad=True)
        target = np.random.default_rng(2).integers(0, 3, (2, 37, 29))
        target[0, :5] = 255  # some pixels ignored
        loss = mf.functional.softmax_cross_entropy(model(image), target)
        loss.backward()
        losses.append(loss.item())
        grads.append({"image": image.grad, **{name: p.grad for name, p in model.named_parameters()}})
    assert abs(losses[0] - np.log(3)) > 0.01  # the scores are not all zero
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 53
    # gradients that can differ: every one non-zero somewhere, and nearly all their elements
    # (ReLU and dropout silence some of fc7's channels)
    assert all(np.count_nonzero(one) for one in grads[0].values())
    assert sum(np.count_nonzero(one) for one in grads[0].values()) > 0.95 * sum(one.size for one in grads[0].values())
    for name, one in grads[0].items():
        np.testing.assert_allclose(grads[1][name], one, rtol=1e-9, atol=1e-12, err_msg=name)
