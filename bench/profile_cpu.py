"""Where the time of one step goes: seconds per op (forward and backward), per call site.

    python bench/profile_cpu.py                      # the default training step (TrainConfig())
    python bench/profile_cpu.py --case fcn8s-224-fwdbwd --threads 2
    python bench/profile_cpu.py --case fcn8s-500-fwdbwd --layers   # every convolution on its own line

Every ``forward`` and ``backward`` of every op (each ``Function`` subclass in
minifcn.functional) is wrapped with a timer; the optimiser step and whatever is
left (Python, the graph walk, gradient checks) are reported as well. Timings
are taken on the steps after ``--warmup`` warm-up steps, summed over ``--steps``.
The cases are those of bench_cpu.py. The machine may be shared: run it twice.
"""

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cpu  # noqa: E402  (the cases, and set_threads before NumPy)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="train-step", choices=bench_cpu.ALL_CASES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", action="store_true", help="one line per convolution shape")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: CPU seconds (with --threads 1, robust to a busy machine)")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    bench_cpu.set_threads(args.threads)
    bench_cpu.import_libraries(args.threads, want_torch=False)
    from minifcn import optim
    from minifcn.function import Function

    totals = collections.defaultdict(float)
    counts = collections.Counter()

    def label(fn, direction, arrays):
        name = type(fn).__name__
        if args.layers and name in ("Conv2d", "ConvTranspose2d"):
            name += f" {tuple(fn.x_shape_for_profile)}x{tuple(fn.w_shape_for_profile[:2])}" \
                    f"k{fn.w_shape_for_profile[2]}"
        return f"{name} {direction}"

    def wrap(cls):
        forward, backward = cls.forward, cls.backward

        def timed_forward(fn, *arrays):
            if args.layers and len(arrays) > 1 and arrays[1] is not None:
                fn.x_shape_for_profile, fn.w_shape_for_profile = arrays[0].shape, arrays[1].shape
            started = clock()
            out = forward(fn, *arrays)
            key = label(fn, "forward", arrays)
            totals[key] += clock() - started
            counts[key] += 1
            return out

        def timed_backward(fn, grad):
            started = clock()
            grads = backward(fn, grad)
            key = label(fn, "backward", ())
            totals[key] += clock() - started
            counts[key] += 1
            return grads
        cls.forward, cls.backward = timed_forward, timed_backward

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)
    for cls in set(subclasses(Function)):
        if "forward" in cls.__dict__:
            wrap(cls)
    for cls in (optim.Adam, optim.SGD):
        step = cls.step

        def timed_step(self, step=step):
            started = clock()
            step(self)
            totals["optimizer step"] += clock() - started
            counts["optimizer step"] += 1
        cls.step = timed_step

    run = bench_cpu.build(args.case, "minifcn")
    for _ in range(args.warmup):
        run()
    totals.clear()
    counts.clear()
    started = clock()
    for _ in range(args.steps):
        run()
    wall = clock() - started
    accounted = sum(totals.values())
    print(f"{args.case}: {wall / args.steps * 1e3:.1f} ms per step ({args.clock} clock), "
          f"{args.threads} threads, "
          f"load average {bench_cpu.load_average()}\n")
    print(f"| {'op':58s} | calls | ms/step | share |\n| --- | ---: | ---: | ---: |")
    rows = sorted(totals.items(), key=lambda kv: -kv[1]) + [("everything else (Python, graph, checks)",
                                                             wall - accounted)]
    for key, seconds in rows:
        print(f"| {key:58s} | {counts[key] // args.steps:5d} | {seconds / args.steps * 1e3:7.1f} "
              f"| {seconds / wall:5.1%} |")


if __name__ == "__main__":
    main()
