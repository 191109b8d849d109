"""GPU speed of minifcn (CuPy + the kernels in kernels/) against PyTorch with cuDNN.

    python bench/bench_gpu.py                 # both cases, Markdown table
    python bench/bench_gpu.py --repeats 20

Cases (float32):

    fcn8s-500-fwdbwd   the full VGG16 FCN-8s (mf.models.fcn8s()), batch 1, 500x500,
                       forward + softmax cross-entropy + backward
    train-step         Trainer.train_step of the default TrainConfig on "cuda"

The PyTorch model is the same net with the same weights (bench_cpu.mirror_in_torch),
moved to the GPU, with cudnn.benchmark on. Both libraries compute in true float32:
PyTorch lets cuDNN's convolutions round their inputs to TF32 by default
(torch.backends.cudnn.allow_tf32), which on an H100 runs them on the tensor cores
at about 3x the speed, so the benchmark turns that off. ``--tf32`` lets both
libraries use TF32 instead (CUPY_TF32=1 for CuPy's cuBLAS products). Runs alternate minifcn and torch after a
warm-up; every run ends with a device synchronisation, so the time is the GPU's
work and not just the launch. The ratio is minifcn / torch (target: at most 1.5).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: find bench_cpu
import bench_cpu  # noqa: E402


def synchronise():
    import cupy
    import torch
    cupy.cuda.Device().synchronize()
    torch.cuda.synchronize()


def build_full_model(lib):
    np, mf, F, torch, tF = bench_cpu.np, bench_cpu.mf, bench_cpu.F, bench_cpu.torch, bench_cpu.tF
    model = mf.models.fcn8s()
    bench_cpu.randomise_score_layers(model)
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (1, 3, 500, 500)).astype(np.float32)
    target = rng.integers(0, 21, (1, 500, 500))
    if lib == "minifcn":
        model.to("cuda").train()
        x, t = mf.Tensor(image).to("cuda"), mf.backend.to_device(target, "cuda")
        params = list(model.parameters())

        def run():
            for p in params:
                p.grad = None
            F.softmax_cross_entropy(model(x), t).backward()
        return run
    tmodel = bench_cpu.mirror_in_torch(model).cuda().train()
    x, t = torch.from_numpy(image).cuda(), torch.from_numpy(target).cuda()
    params = list(tmodel.parameters())

    def run_torch():
        for p in params:
            p.grad = None
        tF.cross_entropy(tmodel(x), t, ignore_index=255).backward()
    return run_torch


def build_train_step(lib):
    torch, tF = bench_cpu.torch, bench_cpu.tF
    from minifcn.train import TrainConfig, Trainer
    config = TrainConfig(device="cuda", out=tempfile.mkdtemp(prefix="bench_gpu_"))
    trainer = Trainer(config)
    images, labels = next(iter(trainer.train_loader))
    if lib == "minifcn":
        return lambda: trainer.train_step(images, labels)
    tmodel = bench_cpu.mirror_in_torch(trainer.model.to("cpu")).cuda()
    trainable = [p for p in tmodel.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=trainer.lr_at(0), weight_decay=config.weight_decay)
    x, t = torch.from_numpy(images).cuda(), torch.from_numpy(labels).cuda()

    def run_torch():  # what Trainer.train_step does, including reading the loss back
        tmodel.train()
        optimizer.zero_grad(set_to_none=True)
        loss = tF.cross_entropy(tmodel(x), t, ignore_index=255)
        value = loss.item()
        loss.backward()
        optimizer.step()
        return value
    return run_torch


CASES = {"fcn8s-500-fwdbwd": build_full_model, "train-step": build_train_step}


def time_case(name, repeats):
    runs = {lib: CASES[name](lib) for lib in ("minifcn", "torch")}
    times = {"minifcn": [], "torch": []}
    for run in runs.values():  # warm-up: kernel compilation, cuDNN autotuning, memory pools
        run()
        run()
    synchronise()
    for repeat in range(repeats):
        order = ("minifcn", "torch") if repeat % 2 == 0 else ("torch", "minifcn")
        for lib in order:
            started = time.perf_counter()
            runs[lib]()
            synchronise()
            times[lib].append(time.perf_counter() - started)
    ratios = [a / b for a, b in zip(times["minifcn"], times["torch"])]
    return statistics.median(times["minifcn"]), statistics.median(times["torch"]), statistics.median(ratios)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--tf32", action="store_true",
                        help="both libraries multiply in TF32 on the tensor cores (default: float32)")
    args = parser.parse_args(argv)
    if args.tf32:
        os.environ["CUPY_TF32"] = "1"  # read when CuPy starts
    if not bench_cpu.import_libraries(threads=16, want_torch=True):
        sys.exit("bench_gpu needs torch (with CUDA) for the comparison")
    torch = bench_cpu.torch
    if not torch.cuda.is_available() or not bench_cpu.mf.backend.cupy_available():
        sys.exit("bench_gpu needs a GPU with both CuPy and torch's CUDA build")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}, {'TF32' if args.tf32 else 'float32'} products\n")
    print("| case | minifcn (ms) | torch + cuDNN (ms) | minifcn / torch |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.cases.split(","):
        ours, theirs, ratio = time_case(name, args.repeats)
        print(f"| {name} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
