"""CPU speed and memory of minifcn, measured against PyTorch in the same run.

    python bench/bench_cpu.py                       # every case, 2 threads, Markdown table
    python bench/bench_cpu.py --quick               # fewer repetitions, no 500x500 cases
    python bench/bench_cpu.py --cases ops,train-step --threads 2 --out table.md

What is timed (float32, batch 1 unless said otherwise):

    fcn8s-224-fwd, fcn8s-500-fwd        the full VGG16 FCN-8s (mf.models.fcn8s()), eval mode, no_grad
    fcn8s-224-fwdbwd, fcn8s-500-fwdbwd  forward + softmax cross-entropy + backward, train mode
    train-step                          Trainer.train_step of TrainConfig() (examples/train_fcn8s.py):
                                        batch 8, shared on 2 threads by 2 MPI ranks (mpiexec -n 2, as the
                                        example starts them; minifcn.distributed)
    conv3x3     conv2d 3x3 256->256, padding 1, on 1x256x56x56, forward + backward
    maxpool     max_pool2d 2x2 stride 2 (ceil mode) on 1x256x56x56, forward + backward
    convT16     conv_transpose2d 16x16 stride 8 on 1x21x40x40 (x and weight need grads), fwd + bwd
    softmax-ce  softmax cross-entropy on 1x21x320x320 logits (some labels 255), fwd + bwd

Method. Each library runs in its own worker process (in one process, the
OpenMP threads of one library spin while the other's BLAS threads want the
cores), and the two take turns, 0.3 s apart (the time OpenBLAS and OpenMP
threads keep spinning after their last call). Each case is built once per
library; one warm-up run each, then ``--repeats`` runs that alternate minifcn
and PyTorch (the order flips every repetition), so a change of machine load
hits both alike. A case whose warm-up took less than a second (in both
libraries: decided once per case) runs once more, untimed, right before each
timed run: after the pause the cores start slow, which a training loop
running step after step never sees. The table gives the median time of each (the minimum in
brackets), the median of the paired ratios minifcn / torch, and the ratio of
the two minimums (the least disturbed runs, on a shared machine).
``--clock process`` times CPU seconds instead of wall time: with
``--threads 1`` that hardly depends on what else the machine runs. On more
threads minifcn's training step shares its batch among as many MPI ranks
(minifcn.distributed), which run every request together; their CPU time
counts too, as does their memory below. ``--baseline-tree PATH`` also times
every case on another checkout of minifcn (PYTHONPATH=PATH, in workers of its
own, the training step on as many ranks), in the same alternation.
GFLOP/s counts the multiply-adds of every convolution (2 flops each) that the
case really needs: forward, plus the input gradient and the weight gradient
of every layer whose input or weight requires one (conv1_1's image needs none;
FCN's bilinear upsampling weights are frozen). Both libraries get the same count.

Peak memory: each case runs again in a fresh subprocess per library; after one
warm-up run, dropping its gradients and gc, the peak resident set size is reset
(Linux: write 5 to /proc/self/clear_refs) and the table reports the growth of
the peak (VmHWM) over the resident size just before the measured run. That is
the memory the run itself needs (activations, gradients, workspace), not the
model's weights or the inputs; summed over the ranks of a training step
(and the worker processes of an older checkout's step), each measured alike. The subprocesses run with
MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0, so that glibc hands
freed arrays back at once instead of keeping them resident (timings are taken
without these settings). RSS and not tracemalloc, because PyTorch's
allocations are invisible to tracemalloc.

The PyTorch models are built from the minifcn models layer by layer (same
weights, same crop offsets: conv1_1 padding 100, ceil-mode pools, fc6 7x7,
crops 5/9/31 for the reference net) and checked against them once.
The thread count goes to OMP/OPENBLAS/MKL_NUM_THREADS before NumPy is imported
and to torch.set_num_threads.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

MODEL_CASES = ("fcn8s-224-fwd", "fcn8s-224-fwdbwd", "fcn8s-500-fwd", "fcn8s-500-fwdbwd")
OP_CASES = ("conv3x3", "maxpool", "convT16", "softmax-ce")
ALL_CASES = MODEL_CASES + ("train-step",) + OP_CASES
PAUSE = 0.3  # seconds between runs: OpenBLAS and OpenMP threads spin ~0.1 s after their last call
WARM_AGAIN_BELOW = 1.0  # seconds: a shorter case runs once, untimed, right before each timed run
GROUPS = {"all": ALL_CASES, "model": MODEL_CASES, "ops": OP_CASES, "train": ("train-step",)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="all", help=f"comma-separated cases or groups "
                        f"{sorted(GROUPS)}; cases: {', '.join(ALL_CASES)}")
    parser.add_argument("--threads", type=int, default=2, help="BLAS / OpenMP / torch threads (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="3 repetitions, 500x500 cases left out unless named")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repetitions per library (default 7, quick 3)")
    parser.add_argument("--no-torch", action="store_true", help="time minifcn alone")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: CPU seconds of the worker instead of wall time; with --threads 1 "
                             "this hardly depends on what else the machine runs (default wall)")
    parser.add_argument("--baseline-tree", default=None, metavar="PATH",
                        help="also time every case on the minifcn checkout at PATH (for example a "
                             "git worktree of an older commit), labelled 'baseline'")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "LIB"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["minifcn", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = []
    for name in args.cases.split(","):
        name = name.strip()
        if name in GROUPS:
            group = GROUPS[name]
            if args.quick and name == "all":
                group = tuple(c for c in group if "-500-" not in c)
            names += [c for c in group if c not in names]
        elif name in ALL_CASES:
            if name not in names:
                names.append(name)
        else:
            parser.error(f"unknown case {name!r}; choose from {', '.join(ALL_CASES)} "
                         f"or {sorted(GROUPS)}")
    args.cases = names
    args.repeats = args.repeats or (3 if args.quick else 7)
    return args


def set_threads(threads):
    """Before NumPy or torch is imported: every thread pool gets ``threads``."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINIFCN_NUM_THREADS"):
        os.environ[var] = str(threads)


# ---- the libraries (imported after set_threads) ----------------------------------

def import_libraries(threads, want_torch):
    global np, mf, F, torch, tF
    import numpy as np
    import minifcn as mf
    import minifcn.functional as F
    torch = tF = None
    if want_torch:
        try:
            import torch
            import torch.nn.functional as tF
            torch.set_num_threads(threads)
        except ImportError:
            torch = None
    return torch is not None


def mirror_in_torch(model):
    """A torch.nn.Module computing exactly what the minifcn VGG FCN-32s/16s/8s ``model`` computes."""
    tnn = torch.nn

    def copy(layer, tlayer):
        tlayer.weight.data.copy_(torch.from_numpy(layer.weight.numpy()))
        tlayer.weight.requires_grad_(layer.weight.requires_grad)
        if layer.bias is not None:
            tlayer.bias.data.copy_(torch.from_numpy(layer.bias.numpy()))
        return tlayer

    def conv(name):
        layer = getattr(model, name)
        return copy(layer, tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                      padding=layer.padding, bias=layer.bias is not None))

    def upsampling(name):
        layer = getattr(model, name)
        return copy(layer, tnn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                               stride=layer.stride, padding=layer.padding, bias=False))

    if getattr(model, "backbone", None) != "vgg16":
        raise ValueError("the torch mirror covers the VGG16 FCNs only")

    def batch_norm(name):
        layer = getattr(model, name)
        tlayer = tnn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        for key in ("weight", "bias"):
            getattr(tlayer, key).data.copy_(torch.from_numpy(getattr(layer, key).numpy()))
        for key in ("running_mean", "running_var"):
            getattr(tlayer, key).copy_(torch.from_numpy(numpy_copy(getattr(layer, key))))
        return tlayer

    def numpy_copy(array):
        return np.array(getattr(array, "data", array), copy=True)

    with_bn = model.config.get("batch_norm", False)
    stride = model.stride

    class TorchFCN(tnn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = tnn.ModuleList(tnn.ModuleList(conv(n) for n in names) for names in model._blocks)
            self.norms = tnn.ModuleList(tnn.ModuleList(batch_norm(f"{n}_bn") if with_bn else tnn.Identity()
                                                       for n in names) for names in model._blocks)
            self.fc6, self.fc7 = conv("fc6"), conv("fc7")
            self.drop = tnn.Dropout(model.config["dropout"])
            self.score_fr = conv("score_fr")
            if stride <= 16:
                self.upscore2, self.score_pool4 = upsampling("upscore2"), conv("score_pool4")
            if stride == 8:
                self.upscore_pool4, self.score_pool3 = upsampling("upscore_pool4"), conv("score_pool3")
            self.final_upsampling = upsampling({32: "upscore", 16: "upscore16", 8: "upscore8"}[stride])
            self.offsets = dict(model.crop_offsets)

        @staticmethod
        def fuse(up, skip, up_offset, skip_offset):
            h = min(up.shape[2] - up_offset, skip.shape[2] - skip_offset)
            w = min(up.shape[3] - up_offset, skip.shape[3] - skip_offset)
            return (up[:, :, up_offset:up_offset + h, up_offset:up_offset + w]
                    + skip[:, :, skip_offset:skip_offset + h, skip_offset:skip_offset + w])

        def forward(self, x):
            size, features = x.shape[2:], {}
            for index, (block, norms) in enumerate(zip(self.blocks, self.norms), start=1):
                for layer, norm in zip(block, norms):
                    x = torch.relu(norm(layer(x)))
                x = tF.max_pool2d(x, 2, 2, ceil_mode=True)
                features[index] = x
            x = self.drop(torch.relu(self.fc6(x)))
            x = self.drop(torch.relu(self.fc7(x)))
            o = self.offsets
            score = self.score_fr(x)
            if stride <= 16:
                score = self.fuse(self.upscore2(score), self.score_pool4(features[4]),
                                  o["upscore2c"], o["score_pool4c"])
            if stride == 8:
                score = self.fuse(self.upscore_pool4(score), self.score_pool3(features[3]),
                                  o["upscore_pool4c"], o["score_pool3c"])
            score = self.final_upsampling(score)
            return score[:, :, o["score"]:o["score"] + size[0], o["score"]:o["score"] + size[1]]

    return TorchFCN()


def randomise_score_layers(model, seed=0):
    """The score layers start at zero (as in the reference): give them small random
    weights so that the torch check compares something."""
    rng = np.random.default_rng(seed)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = getattr(model, name)
        layer.weight.data[...] = rng.normal(0, 0.01, layer.weight.shape).astype(layer.weight.dtype)


def check_mirror(model, tmodel, size):
    """Largest |minifcn - torch| of the eval-mode scores, relative to the largest score."""
    x = np.random.default_rng(1).normal(0, 1, (1, 3, size, size)).astype(np.float32)
    model.eval()
    tmodel.eval()
    with mf.no_grad():
        ours = model(mf.Tensor(x)).data
    with torch.no_grad():
        theirs = tmodel(torch.from_numpy(x)).numpy()
    if ours.shape != theirs.shape:
        raise AssertionError(f"minifcn gives {ours.shape}, torch {theirs.shape}")
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


# ---- the cases: build(lib) -> run() ----------------------------------------------

def build_full_model(lib, size, backward):
    """The reference FCN-8s at batch 1, (size x size); forward only (eval, no_grad) or fwd + bwd."""
    model = mf.models.fcn8s()
    randomise_score_layers(model)
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (1, 3, size, size)).astype(np.float32)
    target = rng.integers(0, 21, (1, size, size))
    if lib == "torch":  # the minifcn model only lends its weights
        return build_full_model_torch(mirror_in_torch(model), image, target, backward)
    model.train(backward)
    params, x = list(model.parameters()), mf.Tensor(image)

    def reset():
        for p in params:
            p.grad = None

    def run():
        if not backward:
            with mf.no_grad():
                return model(x)
        reset()
        F.softmax_cross_entropy(model(x), target).backward()
    return with_reset(run, reset)


def build_full_model_torch(tmodel, image, target, backward):
    tmodel.train(backward)
    params, x, t = list(tmodel.parameters()), torch.from_numpy(image), torch.from_numpy(target)

    def reset():
        for p in params:
            p.grad = None

    def run_torch():
        if not backward:
            with torch.no_grad():
                return tmodel(x)
        reset()
        tF.cross_entropy(tmodel(x), t, ignore_index=255).backward()
    return with_reset(run_torch, reset)


def build_train_step(lib):
    """One Trainer.train_step of the default TrainConfig, on one batch of its own loader."""
    from minifcn.train import TrainConfig, Trainer
    config = TrainConfig(out=tempfile.mkdtemp(prefix="bench_cpu_"))
    trainer = Trainer(config)
    try:
        from minifcn.training.step import pixel_loss
    except ImportError:  # an older checkout (--baseline-tree): the Trainer's own method
        def pixel_loss(model, images, labels, device):
            return trainer._forward_loss(images, labels)
    images, labels = next(iter(trainer.train_loader))
    if lib == "minifcn":
        run = with_reset(lambda: trainer.train_step(images, labels), trainer.optimizer.zero_grad)
        # every rank counts its share (all ranks run it: BatchNorm waits for them); the batch's is
        # the share's times the batch over the share
        with FlopCounter() as counter:
            pixel_loss(trainer.model, images, labels, config.device).backward()
        trainer.optimizer.zero_grad()
        run.flops = counter.total * config.batch_size // len(images)
        # an older checkout shares the step with worker processes of its own (minifcn.replicas)
        replicas = lambda: getattr(trainer, "replicas", None)  # noqa: E731
        run.replica_pids = lambda: [worker.pid for worker in replicas().workers] if replicas() else []
        return run
    tmodel = mirror_in_torch(trainer.model)
    trainable = [p for p in tmodel.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=trainer.lr_at(0), weight_decay=config.weight_decay)
    x, t = torch.from_numpy(images), torch.from_numpy(labels)

    def run_torch():  # what Trainer.train_step does, step for step
        tmodel.train()
        optimizer.zero_grad(set_to_none=True)
        loss = tF.cross_entropy(tmodel(x), t, ignore_index=255)
        value = loss.item()
        loss.backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in trainable)
        optimizer.step()
        return value
    return with_reset(run_torch, lambda: optimizer.zero_grad(set_to_none=True))


def build_op(lib, case):
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.normal(0, 1, shape).astype(np.float32)

    if case == "conv3x3":
        arrays = [normal(1, 256, 56, 56), normal(256, 256, 3, 3) * 0.02, normal(256)]
        ours = lambda x, w, b: F.conv2d(x, w, b, padding=1)
        theirs = lambda x, w, b: tF.conv2d(x, w, b, padding=1)
    elif case == "maxpool":
        arrays = [normal(1, 256, 56, 56)]
        ours = lambda x: F.max_pool2d(x, 2, 2, ceil_mode=True)
        theirs = lambda x: tF.max_pool2d(x, 2, 2, ceil_mode=True)
    elif case == "convT16":
        arrays = [normal(1, 21, 40, 40), normal(21, 21, 16, 16) * 0.05]
        ours = lambda x, w: F.conv_transpose2d(x, w, stride=8)
        theirs = lambda x, w: tF.conv_transpose2d(x, w, stride=8)
    elif case == "softmax-ce":
        arrays = [normal(1, 21, 320, 320) * 3]
        target = rng.integers(0, 21, (1, 320, 320))
        target[:, :20] = 255  # a border of "void", as in VOC
        ours = lambda z: F.softmax_cross_entropy(z, target)
        theirs = lambda z: tF.cross_entropy(z, torch.from_numpy(target), ignore_index=255)
    else:
        raise ValueError(case)
    if lib == "minifcn":
        tensors = [mf.Tensor(a, requires_grad=True) for a in arrays]
        grad = None

        def reset():
            for t in tensors:
                t.grad = None

        def run():
            nonlocal grad
            reset()
            out = ours(*tensors)
            if grad is None:
                grad = None if out.shape == () else normal(*out.shape)
            out.backward(grad)
        return with_reset(run, reset)
    tensors = [torch.from_numpy(a).requires_grad_() for a in arrays]
    grad = None

    def reset():
        for t in tensors:
            t.grad = None

    def run_torch():
        nonlocal grad
        reset()
        out = theirs(*tensors)
        if grad is None:
            grad = None if out.dim() == 0 else torch.from_numpy(normal(*out.shape))
        out.backward(grad)
    return with_reset(run_torch, reset)


def with_reset(run, reset):
    """run, with run.reset() dropping the gradients of the last run (before a memory baseline)."""
    run.reset = reset
    return run


def build(case, lib):
    if case.startswith("fcn8s-"):
        _, size, kind = case.split("-")
        return build_full_model(lib, int(size), kind == "fwdbwd")
    if case == "train-step":
        return build_train_step(lib)
    return build_op(lib, case)


# ---- counting flops: every convolution minifcn runs, and the gradients it needs ---------

class FlopCounter:
    """Counts 2 * multiply-adds of each Conv2d / ConvTranspose2d call while active."""

    def __enter__(self):
        from minifcn.functional import conv
        self.total, self._originals = 0, {}
        counter = self

        def wrap(cls, transposed):
            original = cls.forward

            def forward(fn, x, weight, bias):
                out = original(fn, x, weight, bias)
                pixels = x.shape[0] * (x.shape[2] * x.shape[3] if transposed else out.shape[2] * out.shape[3])
                flops = 2 * pixels * weight.shape[0] * weight[0].size
                counter.total += flops * (1 + sum(fn.needs_input_grad[:2]))  # fwd, grad x, grad w
                return out
            self._originals[cls] = original
            cls.forward = forward
        wrap(conv.Conv2d, False)
        wrap(conv.ConvTranspose2d, True)
        return self

    def __exit__(self, *exc):
        for cls, original in self._originals.items():
            cls.forward = original


# ---- timing and memory ----------------------------------------------------------------

CLOCK = time.perf_counter  # --clock process: CPU time of the process instead of wall time


def _cpu_clock_of(pid):
    """The clock id that reads the CPU time of process ``pid`` (Linux: clock_getcpuclockid)."""
    clock = ctypes.c_int()
    if ctypes.CDLL(None).clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        raise OSError(f"no CPU clock for process {pid}")
    return clock.value


def timed(run):
    """Seconds of one run; with --clock process, the CPU time of this process (summed over the
    MPI ranks of a shared training step, and counting the worker processes of an older
    checkout's step), in ns resolution."""
    gc.collect()
    pids = getattr(run, "replica_pids", list)() if CLOCK is time.process_time else []
    clocks = [_cpu_clock_of(pid) for pid in pids]

    def now():
        return CLOCK() + sum(time.clock_gettime(clock) for clock in clocks)

    group = _ranks()
    group.barrier()  # the ranks of a shared step start together
    started = now()
    run()
    seconds = now() - started
    if CLOCK is time.process_time:  # every rank's CPU time; wall time is rank 0's
        seconds = float(group.all_sum(np.array([seconds]))[0])
    return seconds


def _ranks():
    """The MPI ranks this worker runs with (one, unless started by mpiexec for a shared step)."""
    from minifcn import distributed
    return distributed.world() if hasattr(mf, "distributed") else _OneProcess()


class _OneProcess:  # an older checkout without minifcn.distributed
    rank, size, is_root = 0, 1, True

    def barrier(self):
        pass

    def all_sum(self, array):
        return array

    def broadcast_object(self, value):
        return value


class Worker:
    """One library in its own process, running cases on request.

    Why not both in one process: after each op, PyTorch's OpenMP threads and
    OpenBLAS's threads keep spinning for a while, and the other library's
    threads then fight them for the cores. Separate processes, used one at a
    time, keep the alternation without the interference.
    """

    def __init__(self, lib, threads, clock, ranks=1, label=None, tree=None):
        self.lib, self.label = lib, label or lib
        per_rank = max(1, threads // ranks)  # the ranks share the cores, as the example's do
        command = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--threads", str(per_rank),
                   "--clock", clock]
        env = dict(os.environ, PYTHONPATH=tree) if tree else None
        if ranks > 1:  # the ranks of a shared training step; mpiexec passes stdin to rank 0
            from minifcn.distributed.launch import find_mpiexec
            command = [find_mpiexec(), "-n", str(ranks)] + command
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=env)

    def ask(self, **request):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} worker died (see its error above)")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def serve(lib):
    """The worker's loop: {"build": case} -> {"flops", "warm_up_seconds"},
    {"run": true, "warm_again": bool} -> {"seconds"}."""
    run, group = None, _ranks()
    for line in _requests(group):
        request = json.loads(line)
        if "build" in request:
            run = None
            gc.collect()
            run = build(request["build"], lib)
            flops = 0
            started = time.perf_counter()
            if lib == "minifcn":
                with FlopCounter() as counter:
                    run()  # the warm-up, counted
                flops = getattr(run, "flops", counter.total)
            else:
                run()
            reply = {"flops": flops, "warm_up_seconds": time.perf_counter() - started}
        else:
            if request.get("warm_again"):  # the cores are up to speed again, as in a loop of steps
                run()
            reply = {"seconds": timed(run)}
        if group.is_root:
            print(json.dumps(reply), flush=True)


def _requests(group):
    """The requests on stdin; with several ranks, rank 0 reads them and sends each to the others,
    which wait for it asleep: a rank spinning in a collective would take a core from the other
    library's runs."""
    while True:
        if group.is_root:
            line = sys.stdin.readline()
            for rank in range(1, group.size):
                group.comm.send(line, dest=rank, tag=_REQUEST)
        else:
            while not group.comm.Iprobe(source=0, tag=_REQUEST):
                time.sleep(0.001)
            line = group.comm.recv(source=0, tag=_REQUEST)
        if not line:
            return
        yield line


_REQUEST = 7  # the MPI tag of a request handed on by rank 0


def time_case(case, repeats, workers):
    """{lib: [seconds]}, flops: one warm-up each, then repetitions alternating the libraries."""
    flops, warm_up = 0, 0.0
    for worker in workers:
        built = worker.ask(build=case)
        flops, warm_up = max(flops, built["flops"]), max(warm_up, built["warm_up_seconds"])
    warm_again = warm_up < WARM_AGAIN_BELOW  # decided once, for both libraries alike
    times = {worker.label: [] for worker in workers}
    for r in range(repeats):
        for worker in (workers if r % 2 == 0 else workers[::-1]):
            time.sleep(PAUSE)  # until the other worker's BLAS/OpenMP threads stop spinning
            times[worker.label].append(worker.ask(run=True, warm_again=warm_again)["seconds"])
    return times, flops


def _status(key, process="self"):
    with open(f"/proc/{process}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/{process}/status")


def child_memory(case, lib):
    """In a fresh process: peak RSS growth (bytes) of one run after a warm-up, summed over the
    MPI ranks of a shared training step (and the worker processes of an older checkout's step)."""
    run = build(case, lib)
    run()
    getattr(run, "reset", lambda: None)()  # the last run's gradients are not this run's memory
    gc.collect()
    processes = ["self"] + [str(pid) for pid in getattr(run, "replica_pids", list)()]
    before = {process: _status("VmRSS", process) for process in processes}
    for process in processes:
        with open(f"/proc/{process}/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
    group = _ranks()
    group.barrier()
    run()
    grown = sum(_status("VmHWM", process) - before[process] for process in processes)
    return float(group.all_sum(np.array([float(grown)]))[0])  # over the ranks of a shared step


def measure_memory(case, lib, threads, ranks=1, tree=None):
    command = [sys.executable, os.path.abspath(__file__), "--child", case, lib,
               "--threads", str(max(1, threads // ranks))]
    if ranks > 1:
        from minifcn.distributed.launch import find_mpiexec
        command = [find_mpiexec(), "-n", str(ranks)] + command
    # glibc keeps freed blocks below its (growing) mmap threshold in the heap, where they
    # still count as resident: a fixed, small threshold gives every array its own mapping,
    # returned on free, so RSS follows the memory really in use, for both libraries.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               **({"PYTHONPATH": tree} if tree else {}))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {case} ({lib}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


# ---- the report -------------------------------------------------------------------------

def machine():
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def load_average():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    if args.child:
        import_libraries(args.threads, args.child[1] == "torch")
        peak = child_memory(*args.child)
        if _ranks().is_root:
            print(json.dumps({"peak_bytes": peak}))
        return 0
    if args.worker:
        global CLOCK
        CLOCK = time.process_time if args.clock == "process" else time.perf_counter
        import_libraries(args.threads, args.worker == "torch")
        if hasattr(mf, "distributed"):
            from minifcn.distributed.launch import abort_on_error
            with abort_on_error():  # a rank that fails stops the others
                serve(args.worker)
        else:  # an older checkout
            serve(args.worker)
        return 0
    with_torch = import_libraries(args.threads, not args.no_torch)
    command = "python bench/bench_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        f"- command: `{command.strip()}`",
        f"- machine: {machine()}; threads: {args.threads} "
        f"(OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, OPENBLAS_NUM_THREADS="
        f"{os.environ['OPENBLAS_NUM_THREADS']}, MKL_NUM_THREADS={os.environ['MKL_NUM_THREADS']}, "
        f"mf.get_num_threads()={mf.get_num_threads()}"
        + (f", torch.get_num_threads()={torch.get_num_threads()})" if with_torch else ")"),
        f"- numpy {np.__version__}, minifcn from {os.path.dirname(mf.__file__)}"
        + (f", torch {torch.__version__}" if with_torch else ", torch not used"),
        f"- clock: {'CPU time of the worker process' if args.clock == 'process' else 'wall time'}",
        f"- float32; {args.repeats} timed repetitions per library after one warm-up, alternating "
        "minifcn and torch (each in its own worker process); times are medians (minimum in brackets), "
        "ratio = median of the paired minifcn/torch ratios, ratio of min = fastest minifcn / fastest torch "
        "(the least disturbed runs, when the machine is shared); GFLOP/s from the medians",
        "- memory: peak RSS growth during one run (after a warm-up) in a fresh process per case and library "
        "(glibc MALLOC_MMAP_THRESHOLD_=65536, so freed arrays leave the RSS)",
        f"- load average at start: {load_average()}",
    ]
    if with_torch:
        from minifcn.train import TrainConfig, build_model
        config = TrainConfig()
        for name, model, size in (("reference FCN-8s", mf.models.fcn8s(), 64),
                                  ("TrainConfig() model", build_model(config, 5), config.crop or 64)):
            randomise_score_layers(model)
            error = check_mirror(model, mirror_in_torch(model), size)
            header.append(f"- torch mirror check ({name}, {size}x{size}, eval): "
                          f"max |diff| / max |score| = {error:.1e}")
            del model
    print("\n".join(header), flush=True)
    libs = ["minifcn", "torch"] if with_torch else ["minifcn"]
    workers = [Worker(lib, args.threads, args.clock) for lib in libs]
    if args.baseline_tree:  # every case also on the older checkout, in the same alternation
        workers.append(Worker("minifcn", args.threads, args.clock, label="baseline", tree=args.baseline_tree))
    from minifcn.distributed.launch import ranks_for
    from minifcn.train import TrainConfig
    step_ranks = ranks_for(TrainConfig().batch_size, 0, args.threads)  # as examples/train_fcn8s.py starts
    step_workers = None  # made when the train-step case comes
    rows, notes = [], []
    for case in args.cases:
        case_workers = workers
        if case == "train-step":
            if step_workers is None:
                step_workers = [Worker("minifcn", args.threads, args.clock, ranks=step_ranks)] + \
                    [w for w in workers[1:] if w.label != "baseline"]
                if args.baseline_tree:
                    step_workers.append(Worker("minifcn", args.threads, args.clock, ranks=step_ranks,
                                               label="baseline", tree=args.baseline_tree))
            case_workers = step_workers
            header.append(f"- train-step: minifcn on {step_ranks} MPI rank(s)"
                          + (f"; baseline: the minifcn of {args.baseline_tree}" if args.baseline_tree else ""))
        times, flops = time_case(case, args.repeats, case_workers)
        ours = statistics.median(times["minifcn"])
        theirs = statistics.median(times["torch"]) if with_torch else None
        ratio = (statistics.median(a / b for a, b in zip(times["minifcn"], times["torch"]))
                 if with_torch else None)
        memory = {}
        if not args.no_memory:
            gc.collect()
            ranks = step_ranks if case == "train-step" else 1
            for lib in (["minifcn", "torch"] if with_torch else ["minifcn"]):
                memory[lib] = measure_memory(case, lib, args.threads, ranks if lib == "minifcn" else 1) / 2 ** 20
            if "baseline" in times:
                memory["baseline"] = measure_memory(case, "minifcn", args.threads, tree=args.baseline_tree) / 2 ** 20
        best = {lib: min(t) for lib, t in times.items()}
        row = dict(case=case, ours=ours * 1e3, theirs=None if theirs is None else theirs * 1e3, ratio=ratio,
                   best_ours=best["minifcn"] * 1e3, best_theirs=best["torch"] * 1e3 if with_torch else None,
                   best_ratio=best["minifcn"] / best["torch"] if with_torch else None,
                   gf_ours=flops / ours / 1e9 if flops else None,
                   gf_theirs=flops / theirs / 1e9 if flops and theirs else None,
                   gflop=flops / 1e9 if flops else None,
                   mem_ours=memory.get("minifcn"), mem_theirs=memory.get("torch"),
                   mem_ratio=memory["minifcn"] / memory["torch"] if memory.get("torch") else None)
        rows.append(row)
        if "baseline" in times:
            base = times["baseline"]
            rows.append(dict(row, case=f"{case} (baseline)", ours=statistics.median(base) * 1e3,
                             best_ours=min(base) * 1e3,
                             ratio=statistics.median(a / b for a, b in zip(base, times["torch"])) if with_torch else None,
                             best_ratio=min(base) / best["torch"] if with_torch else None,
                             gf_ours=flops / statistics.median(base) / 1e9 if flops else None,
                             mem_ours=memory.get("baseline"),
                             mem_ratio=memory["baseline"] / memory["torch"] if memory.get("torch") else None))
            paired = [a / b for a, b in zip(times["minifcn"], base)]
            notes.append(f"- {case}: minifcn / baseline = {statistics.median(paired):.2f} (median of the paired "
                         f"ratios; spread {min(paired):.2f}-{max(paired):.2f}); memory "
                         f"{fmt(memory.get('minifcn'), 0)} / {fmt(memory.get('baseline'), 0)} MiB")
        print(f"  {case}: minifcn {row['ours']:.1f} ms, torch {fmt(row['theirs'])} ms, "
              f"ratio {fmt(ratio, 2)}, "
              f"memory {fmt(row['mem_ours'])} / {fmt(row['mem_theirs'])} MiB (load {load_average()})",
              file=sys.stderr, flush=True)
    for worker in workers + [w for w in (step_workers or []) if w not in workers]:
        worker.close()
    table = ["| case | GFLOP | minifcn ms (min) | torch ms (min) | ratio | ratio of min | minifcn GFLOP/s "
             "| torch GFLOP/s | minifcn peak MiB | torch peak MiB | memory ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        table.append(f"| {r['case']} | {fmt(r['gflop'])} | {r['ours']:.1f} ({r['best_ours']:.1f}) "
                     f"| {fmt(r['theirs'])} ({fmt(r['best_theirs'])}) | {fmt(r['ratio'], 2)} "
                     f"| {fmt(r['best_ratio'], 2)} | {fmt(r['gf_ours'])} | {fmt(r['gf_theirs'])} "
                     f"| {fmt(r['mem_ours'], 0)} | {fmt(r['mem_theirs'], 0)} | {fmt(r['mem_ratio'], 2)} |")
    footer = "\n".join([""] + notes + [f"- load average at end: {load_average()}"])
    report = "\n".join(header) + "\n\n" + "\n".join(table) + "\n" + footer + "\n"
    print("\n" + "\n".join(table) + "\n" + footer)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
