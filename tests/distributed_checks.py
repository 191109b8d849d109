"""Checks that run inside every rank of an MPI job; tests/test_distributed.py starts them:

    mpiexec -n 3 python tests/distributed_checks.py step

Each check compares what the ranks compute together with what one process computes alone
(every rank computes the one-process answer itself, from the same seed). Rank 0 prints
"ok <check>" when the check passes; a failure raises, names its rank and stops the job.
"""

import os
import sys
import tempfile
import zlib

import numpy as np

from minifcn import distributed, models, nn
from minifcn import functional as F
from minifcn.distributed.gradients import GradientSum
from minifcn.distributed.launch import abort_on_error
from minifcn.tensor import Tensor
from minifcn.train import TrainConfig, Trainer, TrainingDiverged

BATCH = 5  # shared unevenly by 2 or 3 ranks (2 + 3, or 1 + 2 + 2)


def tiny_fcn(dtype=np.float64):
    nn.manual_seed(0)
    model = models.build_fcn(8, num_classes=3, width=1 / 16, fc6_kernel=1, fc_channels=8, conv1_padding=4,
                             batch_norm=True, learnable_upsampling=True, dropout=0.0)
    return model.to(dtype=dtype)


def batch(size=BATCH, side=32):
    rng = np.random.default_rng(1)
    images = rng.standard_normal((size, 3, side, side))
    labels = rng.integers(0, 3, (size, side, side))
    labels[0] = 255  # an image with no labelled pixel: with 3 ranks, rank 0's whole share
    labels[1, :5] = 255
    return images, labels


def assert_close(got, expected, what, rtol=1e-9, atol=1e-12):
    if not np.allclose(got, expected, rtol=rtol, atol=atol):
        worst = np.max(np.abs(np.asarray(got) - np.asarray(expected)))
        raise AssertionError(f"{what}: the ranks' result differs from one process's by {worst:.3g}")


def check_step(group):
    """A step shared by the ranks (SyncBatchNorm, summed loss, summed gradients) equals the
    one-process step on the whole batch: the loss, every gradient, the running statistics."""
    images, labels = batch()
    alone = tiny_fcn()
    loss = F.softmax_cross_entropy(alone(Tensor(images)), labels)
    loss.backward()

    shared = nn.convert_sync_batchnorm(tiny_fcn(), group)
    start, stop = distributed.batch_share(BATCH, group.rank, group.size)
    summed = F.softmax_cross_entropy(shared(Tensor(images[start:stop])), labels[start:stop], reduction="sum")
    summed.backward()
    mine = int(np.count_nonzero(labels[start:stop] != 255))
    loss_sum, labelled = GradientSum(list(shared.parameters())).sum_over(group, summed.item(), mine)
    assert labelled == np.count_nonzero(labels != 255), (labelled, np.count_nonzero(labels != 255))
    assert_close(loss_sum / labelled, loss.item(), "the loss")
    for (name, p), q in zip(shared.named_parameters(), alone.parameters()):
        assert_close(p.grad / labelled, q.grad, f"the gradient of {name}")
    for (name, b), c in zip(shared.named_buffers(), alone.buffers()):
        assert_close(b, c, f"the running statistic {name}")


def check_gradcheck(group):
    """SyncBatchNorm's backward against central differences of the loss of the whole batch,
    L = sum over ranks of sum(w * relu(bn(x))), in float64: for elements of x on every rank,
    and for the weight and bias that all ranks share."""
    rng = np.random.default_rng(10 + group.rank)
    x = rng.standard_normal((2 + group.rank, 4, 3, 5)) * 2 + 1  # uneven shares
    w = rng.standard_normal(x.shape)
    layer = nn.SyncBatchNorm2d(4, dtype=np.float64, group=group)
    layer.weight.data[:] = [0.5, -1.0, 2.0, 1.5]
    layer.bias.data[:] = [0.1, 0.0, -0.3, 0.2]

    def total_loss(x_here):
        y = layer(x_here if isinstance(x_here, Tensor) else Tensor(x_here), relu=True)
        return y, float(group.all_sum(np.array([float((y.data * w).sum())]))[0])

    xt = Tensor(x.copy(), requires_grad=True)
    y, _ = total_loss(xt)
    (y * Tensor(w)).sum().backward()
    grad_x = xt.grad
    grads = group.all_sum(np.concatenate([layer.weight.grad, layer.bias.grad]))
    eps = 1e-6
    probes = [(rank, index) for rank in range(group.size) for index in [(0, 0, 0, 0), (1, 2, 1, 3), (0, 3, 2, 4)]]
    for rank, index in probes:  # every rank takes part; only `rank` moves its element
        values = []
        for step in (eps, -eps):
            moved = x.copy()
            if group.rank == rank:
                moved[index] += step
            values.append(total_loss(moved)[1])
        numeric = (values[0] - values[1]) / (2 * eps)
        if group.rank == rank:
            assert_close(grad_x[index], numeric, f"d loss / d x{index} on rank {rank}", rtol=1e-6, atol=1e-7)
    for k, param in enumerate([layer.weight, layer.bias]):
        for channel in range(4):
            values = []
            for step in (eps, -eps):
                param.data[channel] += step
                values.append(total_loss(x)[1])
                param.data[channel] -= step
            numeric = (values[0] - values[1]) / (2 * eps)
            assert_close(grads[4 * k + channel], numeric, f"d loss / d {['weight', 'bias'][k]}[{channel}]",
                         rtol=1e-6, atol=1e-7)


def check_trainer(group):
    """Three steps of the Trainer on the ranks follow three steps of a one-process Trainer
    (float32: to rounding), and every rank ends with the very same weights. SGD: Adam's first
    steps turn a gradient of rounding noise into a full step of either sign. Dropout: each rank
    keeps its share of the masks one process draws."""
    config = TrainConfig(width=1 / 16, fc6_kernel=1, fc_channels=16, train_size=16, val_size=3, batch_size=5,
                         crop=32, iterations=3, optimizer="sgd", lr=0.05, dropout=0.5,
                         out=os.path.join(tempfile.gettempdir(), f"minifcn-check-{os.getppid()}"))  # per job
    alone, shared = Trainer(config, group=distributed.SingleProcess()), Trainer(config)
    masks = nn.init.get_rng_state()  # the one stream dropout draws from: each trainer starts it here
    expected, got = [], []
    for trainer, losses in ((alone, expected), (shared, got)):
        nn.init.set_rng_state(masks)
        for _ in range(3):
            losses.append(trainer.train_step(*next(trainer._batches())))
            trainer.iteration += 1
    assert_close(got, expected, "the losses of three steps", rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(shared.model.named_parameters(), alone.model.parameters()):
        assert_close(p.data, q.data, f"{name} after three steps", rtol=1e-3, atol=1e-5)
    checksum = zlib.crc32(np.concatenate([p.data.ravel() for p in shared.model.parameters()]).tobytes())
    every = group.comm.allgather(checksum)
    assert len(set(every)) == 1, f"the ranks' weights differ: checksums {every}"
    # validation: each rank a share of the images, summed into one confusion matrix (the weights
    # differ by rounding from alone's: a pixel may flip class, but none is lost or counted twice)
    together, by_itself = shared.evaluate(progress=False).confusion, alone.evaluate(progress=False).confusion
    assert together.sum() == by_itself.sum() and abs(together - by_itself).sum() <= 0.01 * by_itself.sum(), \
        (together, by_itself)


def check_nccl(group):
    """On GPUs: NCCL sums device arrays in place, and a SyncBatchNorm2d on the GPU, with NCCL
    between the ranks, gives what it gives on the CPU with MPI between them."""
    import cupy

    from minifcn.distributed.nccl import NCCLGroup
    gpus = NCCLGroup(group.comm)
    x = cupy.arange(10, dtype=cupy.float32) * (group.rank + 1)
    gpus.all_sum(x)
    assert_close(cupy.asnumpy(x), np.arange(10) * sum(range(1, group.size + 1)), "an NCCL sum")
    rng = np.random.default_rng(group.rank)
    images = rng.standard_normal((2, 4, 6, 6))
    on_cpu = nn.SyncBatchNorm2d(4, dtype=np.float64, group=group)
    on_gpu = nn.SyncBatchNorm2d(4, dtype=np.float64, group=gpus).to("cuda")
    expected = on_cpu(Tensor(images)).data
    assert_close(cupy.asnumpy(on_gpu(Tensor(cupy.asarray(images))).data), expected, "SyncBatchNorm2d on the GPU")


def check_nan(group):
    """A NaN in rank 1's images: every rank stops at the same step, and the message names the
    first op that made a non-finite value, on rank 1, and the poisoned input."""
    config = TrainConfig(width=1 / 16, fc6_kernel=1, fc_channels=16, train_size=16, val_size=3, batch_size=5,
                         crop=32, iterations=3,
                         out=os.path.join(tempfile.gettempdir(), f"minifcn-check-{os.getppid()}"))
    trainer = Trainer(config)
    images, labels = next(trainer._batches())
    if group.rank == 1:
        images[0, 0, 3, 3] = np.nan
    try:
        trainer.train_step(images, labels)
    except TrainingDiverged as err:
        message = str(err)
    else:
        raise AssertionError("a NaN in the images did not stop training")
    assert "first non-finite value: the forward pass of Conv2d" in message and "(rank 1);" in message, message
    assert "the input images of this batch already hold NaN" in message, message


def check_raise(group):
    """Rank 1 raises while the others wait for it: the job must stop, naming rank 1."""
    if group.rank == 1:
        raise ValueError("planted error")
    group.barrier()  # never passed: rank 1 never gets here
    raise AssertionError("the barrier was passed without rank 1")


CHECKS = {name[len("check_"):]: function for name, function in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    with abort_on_error():
        group = distributed.world()
        CHECKS[sys.argv[1]](group)
        group.barrier()
        if group.is_root:
            print(f"ok {sys.argv[1]} on {group.size} ranks", flush=True)
