"""Time to quality: how long until the validation mean IU reaches 0.5 ... 0.8, minifcn against PyTorch.

    python bench/time_to_quality.py                          # the default run, seeds 0 1 2, both libraries
    python bench/time_to_quality.py --seeds 0 --no-torch     # minifcn alone, one seed
    python bench/time_to_quality.py --set iterations=6000 --set lr=2e-3 --eval-every 500

What is measured, after MLPerf Training's rules:

- A run trains one configuration (``TrainConfig()``, the run of ``python examples/train_fcn8s.py``,
  changed by ``--set name=value``) from scratch. Its clock starts before the data and the model are
  built and stops when the last validation ends; validations count as training time.
- Every ``--eval-every`` iterations (and after the last) the whole validation split (``val_size``
  held-out images, at least 200, each at its own full size) is scored. The time to a threshold is
  the clock at the end of the first validation whose mean IU reaches it.
- ``--seeds`` runs each library once per seed; the table gives the median over the seeds and the
  spread (lowest, highest). A threshold a seed never reaches counts as never reached: its median
  is shown only when most seeds reach it.
- PyTorch trains the same recipe, built here: the same net (the minifcn model's initial weights
  copied into torch layers, checked once), the same batches and augmentations (minifcn's loader),
  torch.optim.Adam (or SGD) with the same learning-rate schedule and weight decay, and its own
  forward pass for validation. minifcn runs as examples/train_fcn8s.py runs it: one MPI rank per
  core, each loading and training its share of every batch, and validating its share of the
  images; PyTorch uses its own threads on every core, in one process that loads each whole batch,
  as a plain training loop does. The ratio minifcn / PyTorch compares the times to each threshold both reach, seed by
  seed; the target is the ratio at the highest threshold both reach.

Each (library, seed) run is a fresh subprocess; the order of the two libraries alternates from seed
to seed so that a change in the machine's load hits both alike.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8)
LIBRARIES = ("minifcn", "torch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change a TrainConfig field (repeatable), e.g. --set iterations=3000")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="iterations between validations (default: the config's val_every)")
    parser.add_argument("--no-torch", action="store_true", help="train minifcn alone")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores to use (default: all)")
    parser.add_argument("--out", default=None, help="also write the Markdown report to this file")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def set_threads(threads):
    """Before NumPy or torch is imported: every thread pool gets ``threads``; minifcn's step
    shares its batch between ``threads`` processes of one thread each."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINIFCN_NUM_THREADS"):
        os.environ[var] = str(threads)


def build_config(settings, seed, eval_every, out):
    """The TrainConfig of one run: defaults, then ``name=value`` settings, parsed by the field's type."""
    from minifcn.train import TrainConfig
    defaults, changes = TrainConfig(), {}
    for item in settings:
        name, equals, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not equals or name not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise SystemExit(f"error: --set expects NAME=VALUE with NAME a TrainConfig field, got {item!r}")
        try:
            changes[name] = parse_value(type(getattr(defaults, name)), text)
        except ValueError:
            raise SystemExit(f"error: --set {name}: cannot read {text!r} as a "
                             f"{type(getattr(defaults, name)).__name__}") from None
    config = dataclasses.replace(defaults, **changes, seed=seed, out=out)
    if eval_every:
        config.val_every = eval_every
    if config.data == "synthetic" and config.val_size < 200:
        raise SystemExit(f"error: validation needs at least 200 images, got val_size={config.val_size}")
    return config.validate()


def parse_value(kind, text):
    """``text`` as a value of type ``kind``: "4e3" is an int, "no" a bool."""
    if kind is bool:
        if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "yes", "1")
    if kind is int:
        value = float(text)
        if not value.is_integer():
            raise ValueError(text)
        return int(value)
    return kind(text)


# ---- one run, in a worker process -------------------------------------------------------

def run_minifcn(config):
    """Trainer.fit, as examples/train_fcn8s.py runs it; returns its validation records."""
    started = time.perf_counter()
    from minifcn.train import Trainer
    trainer = Trainer(config)
    setup = time.perf_counter() - started
    trainer.fit(progress=False)
    return [dict(iteration=r["iteration"], elapsed=setup + r["elapsed"], mean_iu=r["val"]["mean_iu"],
                 per_class_iu=r["val"]["per_class_iu"]) for r in trainer.history if "val" in r]


def run_torch(config, threads):
    """The same recipe in PyTorch: the minifcn Trainer lends its data, its initial weights and
    its learning-rate schedule; forward, backward, the update and validation are torch's."""
    started = time.perf_counter()
    import numpy as np
    import torch
    import torch.nn.functional as tF

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_cpu
    from minifcn.data.transforms import Normalize
    from minifcn.metrics import SegmentationMetrics
    from minifcn.train import Trainer

    torch.set_num_threads(threads)
    bench_cpu.import_libraries(threads, want_torch=True)
    trainer = Trainer(dataclasses.replace(config, processes=1))
    model = bench_cpu.mirror_in_torch(trainer.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    normalize = Normalize(config.preprocessing)

    def batches():
        while True:
            yield from trainer.train_loader

    def validate():
        model.eval()
        metrics = SegmentationMetrics(trainer.num_classes)
        with torch.no_grad():
            for index in range(len(trainer.val_set)):
                image, label = trainer.val_set[index]
                x, _ = normalize(image, label)
                metrics.update(model(torch.from_numpy(np.ascontiguousarray(x[None])))[0].argmax(0).numpy(),
                               label)
        return metrics

    records, stream = [], batches()
    for iteration in range(1, config.iterations + 1):
        images, labels = next(stream)
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = trainer.lr_at(iteration - 1)
        optimizer.zero_grad(set_to_none=True)
        loss = tF.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels), ignore_index=255)
        if not np.isfinite(loss.item()):
            raise FloatingPointError(f"torch: the loss is {loss.item()} at iteration {iteration}")
        loss.backward()
        optimizer.step()
        if iteration % config.val_every == 0 or iteration == config.iterations:
            metrics = validate()
            records.append(dict(iteration=iteration, elapsed=time.perf_counter() - started,
                                mean_iu=metrics.mean_iu(), per_class_iu=metrics.per_class_iu().tolist()))
    return records


def worker(args):
    config = json.loads(args.config)
    from minifcn.train import TrainConfig
    config = TrainConfig(**config).validate()
    from minifcn import distributed
    from minifcn.distributed.launch import abort_on_error
    with abort_on_error():  # a rank that fails stops the others
        records = run_minifcn(config) if args.worker == "minifcn" else run_torch(config, args.threads)
    if distributed.world().is_root:
        print(json.dumps(records))


def run_in_subprocess(library, config, threads):
    launcher, per_rank = [], threads
    if library == "minifcn":  # as examples/train_fcn8s.py runs: one MPI rank per core
        from minifcn.distributed.launch import find_mpiexec, ranks_for
        ranks = ranks_for(config.batch_size, config.processes, threads)
        if ranks > 1 and find_mpiexec():
            launcher, per_rank = [find_mpiexec(), "-n", str(ranks)], max(1, threads // ranks)
    command = launcher + [sys.executable, os.path.abspath(__file__), "--worker", library,
                          "--threads", str(per_rank), "--config", json.dumps(dataclasses.asdict(config))]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if result.returncode != 0:
        raise SystemExit(f"error: the {library} run (seed {config.seed}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the report ---------------------------------------------------------------------------

def time_to(records, threshold):
    """Clock at the end of the first validation reaching ``threshold``, or None."""
    return next((r["elapsed"] for r in records if r["mean_iu"] >= threshold), None)


def median_and_spread(values):
    """'median (lowest-highest)' over the seeds, a seed that never got there counting as slowest."""
    reached = sorted(v for v in values if v is not None)
    median = statistics.median(reached + [math.inf] * (len(values) - len(reached)))
    if math.isinf(median):
        return f"not reached ({len(reached)}/{len(values)} seeds)"
    never = "" if len(reached) == len(values) else f", {len(values) - len(reached)} never"
    return f"{median:.0f} s ({reached[0]:.0f}-{reached[-1]:.0f}{never})"


def report(runs, seeds, class_names, with_torch):
    lines = ["| mean IU | " + " | ".join(f"{lib}: time, median (spread)" for lib in runs)
             + (" | ratio minifcn / torch, per seed | median ratio |" if with_torch else " |"),
             "| ---: | " + " | ".join("---:" for _ in runs) + (" | ---: | ---: |" if with_torch else " |")]
    highest_shared = None
    for threshold in THRESHOLDS:
        times = {lib: [time_to(runs[lib][s], threshold) for s in seeds] for lib in runs}
        row = f"| {threshold:.2f} | " + " | ".join(median_and_spread(times[lib]) for lib in runs)
        if with_torch:
            ratios = [a / b if a is not None and b is not None else None
                      for a, b in zip(times["minifcn"], times["torch"])]
            shown = ", ".join("-" if r is None else f"{r:.2f}" for r in ratios)
            both = [r for r in ratios if r is not None]
            median = f"{statistics.median(both):.2f}" if both else "-"
            row += f" | {shown} | {median}"
            if both and len(both) * 2 > len(ratios):
                highest_shared = (threshold, statistics.median(both))
        lines.append(row + " |")
    lines += ["", "| library | seed | final mean IU | " + " | ".join(class_names) + " | wall time |",
              "| --- | ---: | ---: | " + " | ".join("---:" for _ in class_names) + " | ---: |"]
    for lib in runs:
        for seed in seeds:
            last = runs[lib][seed][-1]
            lines.append(f"| {lib} | {seed} | {last['mean_iu']:.3f} | "
                         + " | ".join(f"{iu:.3f}" for iu in last["per_class_iu"]) + f" | {last['elapsed']:.0f} s |")
    if with_torch:
        lines.append("")
        lines.append("Highest threshold both reach (most seeds): " + (
            "none" if highest_shared is None else
            f"{highest_shared[0]:.2f}, median ratio minifcn / torch {highest_shared[1]:.2f}"))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    if args.worker:
        worker(args)
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: timing minifcn alone", file=sys.stderr)
            with_torch = False
    libraries = LIBRARIES if with_torch else LIBRARIES[:1]
    from minifcn.data.synthetic import CLASS_NAMES
    runs = {lib: {} for lib in libraries}
    command = "python bench/time_to_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_cpu import load_average, machine
    header = [f"- command: `{command.strip()}`", f"- machine: {machine()}; {args.threads} cores used",
              f"- load average at start: {load_average()}"]
    with tempfile.TemporaryDirectory(prefix="time_to_quality_") as scratch:
        for index, seed in enumerate(seeds):
            config = build_config(args.set, seed, args.eval_every, os.path.join(scratch, str(seed)))
            if index == 0:
                changed = {k: v for k, v in dataclasses.asdict(config).items()
                           if k not in ("seed", "out") and v != getattr(type(config)(), k)}
                header.append(f"- configuration: TrainConfig() with {changed or 'no changes'}")
            order = libraries if index % 2 == 0 else libraries[::-1]
            for lib in order:
                runs[lib][seed] = run_in_subprocess(lib, config, args.threads)
                last = runs[lib][seed][-1]
                print(f"  {lib} seed {seed}: final mean IU {last['mean_iu']:.3f} after {last['elapsed']:.0f} s; "
                      + ", ".join(f"{t:g}: {time_to(runs[lib][seed], t) or '-'}" for t in THRESHOLDS)
                      + f" (load {load_average()})", file=sys.stderr, flush=True)
    header.append(f"- load average at end: {load_average()}")
    text = "\n".join(header) + "\n\n" + report(runs, seeds, CLASS_NAMES, with_torch) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
