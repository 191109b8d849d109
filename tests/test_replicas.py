"""Data-parallel training steps over processes (minifcn.replicas, minifcn.collective).

A step shared by replicas must give the batch's loss and gradients, as one
process does, up to float32 rounding (BatchNorm's sums and the gradients are
added in another order); the workers must see every weight update; and a
failure in any process must surface as a clear error, not a hang.
"""

import copy
import multiprocessing
import sys

import numpy as np
import pytest

from minifcn import collective, nn
from minifcn import functional as F
from minifcn.replicas import ReplicaError, ReplicaGroup, _Exchange, replicas_for, share_bounds
from minifcn.tensor import Tensor
from minifcn.train import TrainConfig, Trainer, build_model

# BatchNorm on, so that every step exchanges statistics; 5 classes (the synthetic shapes)
TINY = dict(width=1 / 16, fc6_kernel=1, fc_channels=16, conv1_padding=4, train_size=6, val_size=2,
            batch_size=2, crop=32, val_every=1000, checkpoint_every=1000, batch_norm=True)
CLASSES = 5


def _model(seed=0):
    """The tiny FCN-8s with every parameter random (FCN's zero-initialised score layers would
    leave the backbone without a gradient, and a test of nothing)."""
    nn.manual_seed(seed)
    model = build_model(TrainConfig(**TINY), CLASSES)
    for param in model.parameters():
        nn.init.normal_(param, 0.0, 0.3)
    return model


def _batch(size, seed=0, ignored_image=None):
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 1, (size, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, CLASSES, (size, 32, 32))
    labels[:, :3] = 255  # a void border, as in VOC
    if ignored_image is not None:
        labels[ignored_image] = 255  # a share with no labelled pixel at all
    return images, labels


def _one_process(model, images, labels):
    model.train()
    for param in model.parameters():
        param.grad = None
    loss = F.softmax_cross_entropy(model(Tensor(images)), labels)
    loss.backward()
    return loss.item()


def _assert_close(ours, theirs, what, rtol=2e-4):
    scale = max(float(np.abs(theirs).max()), 1e-12)
    worst = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max()) / scale
    assert worst <= rtol, f"{what}: worst difference {worst:.2e} of the largest value, expected <= {rtol}"


def test_sums_outside_a_step_are_the_very_same_arrays():
    a, b = np.arange(3.0, dtype=np.float32), 7
    assert collective.sum_over_replicas(a, b) == (a, b)
    assert collective.sum_over_replicas(a)[0] is a
    assert not collective.in_data_parallel_step()


def test_replica_count_and_shares(monkeypatch):
    assert share_bounds(5, 2) == [(0, 2), (2, 5)]
    assert share_bounds(1, 2) == [(0, 1)]
    assert replicas_for(batch_size=8, requested=3) == 3
    assert replicas_for(batch_size=2, requested=4) == 2  # one image each at most
    monkeypatch.setattr("minifcn.parallel._num_threads", 2)
    assert replicas_for(batch_size=1) == 1
    assert replicas_for(batch_size=4) == 2  # one per core

    class FromStdin:  # python - < script.py: a spawned worker could not import the main script
        __file__, __spec__ = "<stdin>", None
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "__main__", FromStdin())
        assert replicas_for(batch_size=4) == 1  # the step runs here instead

    class Daemonic:
        daemon = True
    monkeypatch.setattr(multiprocessing, "current_process", lambda: Daemonic())
    assert replicas_for(batch_size=4) == 1  # may not start processes: the step runs here


@pytest.mark.parametrize("batch,replicas,ignored_image", [
    (2, 2, None), (3, 2, None), (3, 3, None), (2, 2, 1),
], ids=["2-images-2-replicas", "3-images-uneven-shares", "3-replicas", "a-share-all-void"])
def test_a_shared_step_gives_the_batch_loss_gradients_and_statistics(batch, replicas, ignored_image):
    model = _model()
    reference = copy.deepcopy(model)
    images, labels = _batch(batch, ignored_image=ignored_image)
    expected_loss = _one_process(reference, images, labels)
    group = ReplicaGroup(model, replicas)
    try:
        loss = group.step(images, labels)
    finally:
        group.close()
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    named = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected = named[name].grad
        assert (param.grad is None) == (expected is None), name
        if expected is not None:
            assert np.abs(expected).max() > 0, f"{name}: a zero gradient tests nothing"
            _assert_close(param.grad, expected, f"gradient of {name}")
    buffers = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():  # the running statistics of the whole batch
        if buffer.dtype.kind == "f":
            _assert_close(buffer, buffers[name], f"buffer {name}", rtol=2e-5)


def _trainer(tmp_path, processes, **changes):
    return Trainer(TrainConfig(out=str(tmp_path / f"p{processes}"), processes=processes,
                               **{**TINY, **changes}))


def _random_weights(trainer, seed=1):
    nn.manual_seed(seed)
    for param in trainer.model.parameters():
        nn.init.normal_(param, 0.0, 0.3)


def test_the_workers_see_every_update_and_replaced_weights(tmp_path):
    shared, alone = _trainer(tmp_path, 2), _trainer(tmp_path, 1)
    for trainer in (shared, alone):
        _random_weights(trainer)
    batches = [_batch(2, seed) for seed in range(3)]
    for images, labels in batches:
        assert shared.train_step(images, labels) == pytest.approx(alone.train_step(images, labels), rel=1e-4)
    assert shared.replicas is not None and alone.replicas is None
    # a checkpoint load (or a user) replaces a weight array: the next step must use the new one
    for trainer in (shared, alone):
        first = next(iter(trainer.model.parameters()))
        first.data = np.full_like(first.data, 0.05)
    images, labels = _batch(2, seed=9)
    assert shared.train_step(images, labels) == pytest.approx(alone.train_step(images, labels), rel=1e-4)
    for (name, ours), theirs in zip(shared.model.named_parameters(), alone.model.parameters()):
        _assert_close(ours.data, theirs.data, f"weights of {name} after four steps", rtol=1e-3)


def test_dropout_masks_repeat_for_the_same_seed(tmp_path):
    runs = []
    for run in range(2):
        trainer = _trainer(tmp_path / str(run), 2, dropout=0.5)
        runs.append([trainer.train_step(*_batch(2, seed)) for seed in range(3)])
    assert runs[0] == runs[1]


def test_an_error_in_a_worker_is_raised_with_its_traceback(tmp_path):
    trainer = _trainer(tmp_path, 2)
    images, labels = _batch(2)
    trainer.train_step(images, labels)
    group = trainer.replicas
    bad = labels.copy()
    bad[1, 10, 10] = CLASSES  # only the worker's share has the bad label
    with pytest.raises(ReplicaError, match=r"replica 1 failed(.|\n)*labels must lie in \[0, 5\)"):
        group.step(images, bad)
    assert group.closed
    trainer.train_step(images, labels)  # a fresh group takes over
    assert trainer.replicas is not group and not trainer.replicas.closed


def test_an_error_in_the_first_process_stops_the_workers(tmp_path):
    trainer = _trainer(tmp_path, 2)
    images, labels = _batch(2)
    trainer.train_step(images, labels)
    group = trainer.replicas
    workers = list(group.workers)
    bad = labels.copy()
    bad[0, 10, 10] = CLASSES  # only this process's share
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        group.step(images, bad)
    assert group.closed and not any(worker.is_alive() for worker in workers)


def test_a_worker_that_dies_is_reported(tmp_path):
    trainer = _trainer(tmp_path, 2)
    images, labels = _batch(2)
    trainer.train_step(images, labels)
    group = trainer.replicas
    group.workers[0].kill()
    group.workers[0].join()
    with pytest.raises(ReplicaError, match="replica 1 stopped during a training step"):
        group.step(images, labels)


def test_an_exchange_too_large_is_refused():
    exchange = _Exchange(1, np.zeros((2, 6)), np.zeros(6), None, [None], lambda: None)
    with pytest.raises(ValueError, match="an exchange of 5 values is more than the 4"):
        exchange.all_sum(np.zeros(5))


def test_replicas_whose_models_differ_are_caught():
    """A layer frozen after the group started: this process skips an exchange that the workers'
    copies make. Adding up unrelated numbers would train on garbage without a word."""
    model = _model()
    images, labels = _batch(2)
    group = ReplicaGroup(model, 2)
    try:
        group.step(images, labels)
        assert group.matches(model)
        for param in list(model.parameters())[:4]:  # conv1_1 and its BatchNorm
            param.requires_grad = False
        assert not group.matches(model)  # the Trainer starts a fresh group then
        with pytest.raises(ReplicaError, match="the replicas' models differ"):
            group.step(images, labels)
        assert group.closed
        with pytest.raises(ReplicaError, match="this replica group is closed"):
            group.step(images, labels)
    finally:
        group.close()


def test_a_frozen_layer_restarts_the_trainers_group(tmp_path):
    shared, alone = _trainer(tmp_path, 2), _trainer(tmp_path, 1)
    for trainer in (shared, alone):
        _random_weights(trainer)
    images, labels = _batch(2)
    shared.train_step(images, labels)
    alone.train_step(images, labels)
    first_group = shared.replicas
    for trainer in (shared, alone):
        for param in list(trainer.model.parameters())[:4]:
            param.requires_grad = False
    assert shared.train_step(images, labels) == pytest.approx(alone.train_step(images, labels), rel=1e-4)
    assert first_group.closed and shared.replicas is not first_group


def test_the_ignore_index_reaches_every_share():
    model = _model()
    reference = copy.deepcopy(model)
    images, labels = _batch(2)
    labels[labels == 255] = 4  # class 4 is "void" here
    reference.train()
    expected = F.softmax_cross_entropy(reference(Tensor(images)), labels, ignore_index=4).item()
    group = ReplicaGroup(model, 2)
    try:
        assert group.step(images, labels, ignore_index=4) == pytest.approx(expected, rel=1e-5)
    finally:
        group.close()


@pytest.mark.parametrize("changes,message", [
    (dict(processes=-1), "processes must be a non-negative int"),
    (dict(processes=1.5), "processes must be a non-negative int"),
    (dict(processes=2, device="cuda"), r"more than 1 only with device 'cpu'"),
])
def test_bad_process_counts_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out=str(tmp_path), **changes).validate()
