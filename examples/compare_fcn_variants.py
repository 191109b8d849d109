"""Train FCN-32s, FCN-16s and FCN-8s with the same budget and compare them.

The FCN paper's point in one table: fusing the coarse stride-32 scores with
finer layers (pool4 for 16s, pool4 and pool3 for 8s) sharpens the output,
most visibly on thin structures and along object boundaries. On minifcn's
synthetic shapes the thin class is "bar", a line 2-3 pixels wide.

    python examples/compare_fcn_variants.py                      # staged, as the paper
    python examples/compare_fcn_variants.py --schedule scratch   # each net from scratch
    python examples/compare_fcn_variants.py --quick              # a smoke test, seconds

The nets and the recipe are those of examples/train_fcn8s.py (TrainConfig()):
the VGG16 layout at 1/8 of its channels with BatchNorm, "same" padding, upsampling
that starts bilinear and learns, batches of 8 crops of 96x96 from a stream of
fresh images, Adam. Only the skips differ. --backbone resnet18 puts the same
heads on a ResNet-18 (a quarter of its width) instead.

Schedules, every net getting the same number of iterations T in the end:

  staged   the paper's 32s -> 16s -> 8s. FCN-32s trains for T/2 iterations;
           FCN-16s is made from it (minifcn.models.fcn16s_from_fcn32s) and
           trains T/4; FCN-8s is made from that (fcn8s_from_fcn16s) and
           trains the last T/4. So that the coarser nets are not short-changed,
           each keeps training alongside: FCN-32s for T/4 + T/4 more, FCN-16s
           for T/4 more. Every stage restarts the optimiser and the
           learning-rate schedule; the data stream continues where it stood.
  scratch  each net trains T iterations from random weights.

Printed for each net: the four metrics of the paper, the IU of the thin class
("bar"), and the mean IU over pixels near a boundary (within --boundary-width
pixels of a change of label, minifcn.metrics.boundary_mask). Written to --out:

    comparison.png   image / ground truth / FCN-32s / FCN-16s / FCN-8s, a few validation images
    results.json     the table, the settings and the wall time
    history.json     training loss and validation mean IU of each net, for plots
    fcn32s.npz ...   the weights of each net (minifcn.save_weights)
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import minifcn as mf
from minifcn import distributed, models, visualize
from minifcn.distributed.launch import report_error, run_on_every_core, stop_every_rank
from minifcn.data.synthetic import SyntheticShapes
from minifcn.metrics import SegmentationMetrics, boundary_mask
from minifcn.train import TrainConfig, Trainer, TrainingDiverged

VARIANTS = ("32s", "16s", "8s")
SCHEDULES = ("staged", "scratch")

# --quick: a run of seconds that goes through every step (for tests, not for results).
QUICK = dict(iterations=6, train_size=8, val_size=4, monitor_size=2, val_every=100, batch_size=2,
             figure_images=2, width=1 / 16, fc_channels=16, crop=64)
DEFAULT_WIDTH = {"resnet18": 1 / 4, "vgg16": TrainConfig.width}


# ---- training -------------------------------------------------------------------------

class Run:
    """One net in the comparison: its current model and the record of how it got there."""

    def __init__(self, variant):
        self.variant = variant
        self.model = None
        self.trainer = None       # the trainer of its last stage (predict() for evaluation)
        self.iterations = 0       # iterations trained so far
        self.started = 0          # where its own training began (a finer net inherits the rest)
        self.history = []         # {"iteration", "loss"} and {"iteration", "val_mean_iu"}


def train_stage(run, config, iterations, out, progress, model=None):
    """Train ``run`` (or ``model``, a net made from a coarser one) for ``iterations`` more steps.

    The data continue from where ``run`` stopped, as in one long run; the
    optimiser and the learning-rate schedule start afresh.
    """
    model = run.model if model is None else model
    config = dataclasses.replace(config, variant=run.variant, iterations=iterations,
                                 val_every=max(1, min(iterations, config.val_every)),
                                 checkpoint_every=iterations,
                                 out=os.path.join(out, f"fcn{run.variant}-from{run.iterations}"))
    say(f"  FCN-{run.variant}: iterations {run.iterations + 1} to {run.iterations + iterations}")
    trainer = Trainer(config, model=model)
    loader = trainer.train_loader
    epoch, position = divmod(run.iterations, len(loader))
    loader.load_state_dict({**loader.state_dict(), "epoch": epoch, "position": position})
    if not trainer.fit(progress=progress):
        raise KeyboardInterrupt
    for record in trainer.history:
        step = run.iterations + record["iteration"]
        if "loss" in record:
            run.history.append({"iteration": step, "loss": record["loss"]})
        else:
            run.history.append({"iteration": step, "val_mean_iu": record["val"]["mean_iu"]})
    run.model, run.trainer = trainer.model, trainer
    run.iterations += iterations
    return run


def stage_lengths(iterations):
    """T/2, T/4, T/4 (the parts add up to T)."""
    first = iterations // 2
    second = (iterations - first) // 2
    return first, second, iterations - first - second


def train_staged(config, options, iterations, out, progress):
    """The paper's staged schedule, each net reaching ``iterations`` in the end."""
    first, second, third = stage_lengths(iterations)
    runs = {variant: Run(variant) for variant in VARIANTS}
    say(f"stage 1/3: FCN-32s from scratch, {first} iterations")
    train_stage(runs["32s"], config, first, out, progress, model=build("32s", options, config.seed))

    say(f"stage 2/3: FCN-16s from FCN-32s, and FCN-32s on, {second} iterations each")
    runs["16s"].iterations = runs["16s"].started = runs["32s"].iterations
    runs["16s"].history = list(runs["32s"].history)
    model16 = models.fcn16s_from_fcn32s(runs["32s"].model)  # a copy, made before 32s trains on
    train_stage(runs["32s"], config, second, out, progress)
    train_stage(runs["16s"], config, second, out, progress, model=model16)

    say(f"stage 3/3: FCN-8s from FCN-16s, and FCN-32s, FCN-16s on, {third} iterations each")
    runs["8s"].iterations = runs["8s"].started = runs["16s"].iterations
    runs["8s"].history = list(runs["16s"].history)
    model8 = models.fcn8s_from_fcn16s(runs["16s"].model)
    train_stage(runs["32s"], config, third, out, progress)
    train_stage(runs["16s"], config, third, out, progress)
    train_stage(runs["8s"], config, third, out, progress, model=model8)
    return runs


def train_scratch(config, options, iterations, out, progress):
    runs = {}
    for variant in VARIANTS:
        say(f"FCN-{variant} from scratch, {iterations} iterations")
        runs[variant] = train_stage(Run(variant), config, iterations, out, progress,
                                    model=build(variant, options, config.seed))
    return runs


def build(variant, options, seed):
    """A fresh net, its weights drawn from ``seed`` (the same trunk for every variant)."""
    mf.nn.manual_seed(seed)
    return models.build_fcn(int(variant[:-1]), num_classes=SyntheticShapes.num_classes, **options)


def model_options(args):
    """The net's settings, for build_fcn (docs/make_figures.py rebuilds the nets with them)."""
    options = dict(backbone=args.backbone, width=args.width, learnable_upsampling=args.learnable_upsampling)
    if args.backbone == "vgg16":
        options.update(fc6_kernel=args.fc6_kernel, fc_channels=args.fc_channels,
                       conv1_padding=args.conv1_padding, fc6_padding=args.fc6_padding,
                       dropout=args.dropout, batch_norm=args.batch_norm)
    return options


# ---- evaluation -------------------------------------------------------------------------

def evaluate(runs, dataset, boundary_width):
    """{variant: (all pixels, pixels near a boundary)} SegmentationMetrics over ``dataset``."""
    scores = {v: (SegmentationMetrics(dataset.num_classes), SegmentationMetrics(dataset.num_classes))
              for v in runs}
    group = distributed.world()
    for index in range(group.rank, len(dataset), group.size):  # each rank a share of the images
        image, label = dataset[index]
        near_edge = boundary_mask(label, boundary_width)
        for variant, run in runs.items():
            prediction = run.trainer.predict(image)
            everywhere, boundary = scores[variant]
            everywhere.update(prediction, label)
            boundary.update(prediction, label, mask=near_edge)
    for metrics in scores.values():
        for part in metrics:
            group.all_sum(part.confusion)
    return scores


COLUMNS = (("pixel acc.", "pixel_accuracy"), ("mean acc.", "mean_accuracy"), ("mean IU", "mean_iu"),
           ("f.w. IU", "frequency_weighted_iu"), ("bar IU", "thin_iu"), ("boundary IU", "boundary_mean_iu"))


def table_rows(scores):
    thin = SyntheticShapes.thin_classes[0]
    rows = {}
    for variant, (everywhere, boundary) in scores.items():
        row = everywhere.summary()
        row["thin_iu"] = float(everywhere.per_class_iu()[thin])
        row["boundary_mean_iu"] = boundary.mean_iu()
        rows[variant] = row
    return rows


def format_table(rows):
    header = f"{'':8}" + "".join(f"{title:>12}" for title, _ in COLUMNS)
    lines = [header]
    for variant, row in rows.items():
        lines.append(f"{'FCN-' + variant:8}" + "".join(f"{row[key]:12.3f}" for _, key in COLUMNS))
    return "\n".join(lines)


def draw_comparison(runs, dataset, count, path):
    """image / ground truth / FCN-32s / FCN-16s / FCN-8s for the first ``count`` validation
    images that show a bar (the thin class), or the first ones when too few do."""
    thin = SyntheticShapes.thin_classes[0]
    with_bar = [i for i in range(len(dataset)) if (dataset[i][1] == thin).any()]
    chosen = (with_bar + [i for i in range(len(dataset)) if i not in with_bar])[:count]
    rows = []
    for index in chosen:
        image, label = dataset[index]
        rows.append([image, label] + [runs[v].trainer.predict(image) for v in VARIANTS])
    visualize.side_by_side(rows, titles=["image", "ground truth"] + [f"FCN-{v}" for v in VARIANTS],
                           path=path, scale=2, palette=dataset.palette)


# ---- command line -----------------------------------------------------------------------

def say(text):
    if distributed.world().is_root:  # one rank speaks for all
        print(text, flush=True)


def parse_args(argv=None):
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--schedule", choices=SCHEDULES, default="staged", help="staged (the paper's) or scratch")
    add("--iterations", type=int, default=5000, help="iterations per net, T (all stages together)")
    add("--backbone", choices=sorted(DEFAULT_WIDTH), default=defaults.backbone,
        help="vgg16 (default, as examples/train_fcn8s.py) or resnet18")
    add("--width", type=float, default=None,
        help="channel multiplier (default 1/8 for vgg16, 1/4 for resnet18)")
    add("--fc6-kernel", type=int, default=defaults.fc6_kernel, help="vgg16: 7 in the paper")
    add("--fc-channels", type=int, default=defaults.fc_channels, help="vgg16: 4096 in the paper")
    add("--conv1-padding", type=int, default=defaults.conv1_padding, help="vgg16: 100 in the paper")
    add("--fc6-padding", type=int, default=defaults.fc6_padding, help="vgg16: 0 in the paper")
    add("--dropout", type=float, default=defaults.dropout, help="vgg16: after fc6 and fc7; 0.5 in the paper")
    add("--batch-norm", action=argparse.BooleanOptionalAction, default=defaults.batch_norm,
        help="vgg16: BatchNorm after each convolution (not in the paper; as examples/train_fcn8s.py)")
    add("--learnable-upsampling", action=argparse.BooleanOptionalAction,
        default=defaults.learnable_upsampling, help="train the bilinear-initialised upsampling layers")
    add("--crop", type=int, default=defaults.crop, help="training crop")
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--optimizer", choices=["adam", "sgd"], default=defaults.optimizer)
    add("--lr", type=float, default=defaults.lr, help="learning rate at the start of each stage")
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--train-size", type=int, default=defaults.train_size, help="synthetic training images")
    add("--val-size", type=int, default=200, help="synthetic validation images for the table")
    add("--monitor-size", type=int, default=24, help="validation images for the curves during training")
    add("--val-every", type=int, default=None, help="iterations between those validations (default T/8)")
    add("--boundary-width", type=int, default=3, help="pixels either side of a label change")
    add("--figure-images", type=int, default=4, help="rows of comparison.png")
    add("--seed", type=int, default=0)
    add("--device", default="cpu", help="cpu or cuda")
    add("--threads", type=int, default=None,
        help="CPU threads for minifcn's ops (default: $MINIFCN_NUM_THREADS, else every core)")
    add("--processes", type=int, default=0,
        help="CPU processes that share each batch, started with mpiexec (default 0: one per core, "
             "up to one image each; 1: this process alone), as in examples/train_fcn8s.py")
    add("--out", default="runs/compare", help="output folder")
    add("--quick", action="store_true", help="a tiny run to check that everything works (seconds)")
    add("--no-progress", action="store_true", help="no progress bars")
    if parser.parse_args(argv).quick:
        parser.set_defaults(**QUICK)  # options given explicitly still win
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if args.iterations < 3:
        parser.error(f"--iterations must be at least 3 (one per stage), got {args.iterations}")
    if args.val_every is None:
        args.val_every = max(1, args.iterations // 8)
    if args.width is None:
        args.width = DEFAULT_WIDTH[args.backbone]
    return args


def main(argv=None):
    args = parse_args(argv)
    return run_on_every_core(lambda: compare(args), os.path.abspath(__file__), argv,
                             args.batch_size, args.processes, args.device, threads=args.threads)


def compare(args):
    started = time.perf_counter()
    root = distributed.world().is_root
    config = TrainConfig(
        backbone=args.backbone, width=args.width, fc6_kernel=args.fc6_kernel,
        fc_channels=args.fc_channels, conv1_padding=args.conv1_padding, fc6_padding=args.fc6_padding,
        dropout=args.dropout, batch_norm=args.batch_norm, learnable_upsampling=args.learnable_upsampling,
        train_size=args.train_size, val_size=args.monitor_size,
        batch_size=args.batch_size, crop=args.crop, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, val_every=args.val_every, device=args.device,
        seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    say(f"FCN-32s vs FCN-16s vs FCN-8s, {args.schedule} schedule, {args.iterations} iterations each, "
        f"{args.backbone} width {args.width:g}, crop {args.crop}, batch {args.batch_size}, "
        f"{args.optimizer} lr {args.lr:g}")
    train = train_staged if args.schedule == "staged" else train_scratch
    try:
        runs = train(config, model_options(args), args.iterations, args.out, not args.no_progress)
    except (ValueError, RuntimeError, TrainingDiverged) as err:
        report_error(err)
        return 1
    except KeyboardInterrupt:
        stop_every_rank(130)
        if root:
            print("stopped", file=sys.stderr)
        return 130
    trained = time.perf_counter()

    val = SyntheticShapes("val", size=args.val_size, seed=args.seed)
    say(f"\nValidation: {len(val)} images; bar IU = the thin class; boundary IU = mean IU within "
        f"{args.boundary_width} px of a label change")
    scores = evaluate(runs, val, args.boundary_width)
    rows = table_rows(scores)
    table = format_table(rows)
    say(table)

    if not root:
        return 0
    draw_comparison(runs, val, args.figure_images, os.path.join(args.out, "comparison.png"))
    for variant, run in runs.items():
        mf.save_weights(os.path.join(args.out, f"fcn{variant}.npz"), run.model)
    finished = time.perf_counter()
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({v: run.history for v, run in runs.items()}, f)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"table": rows, "text": table, "settings": vars(args),
                   "model": model_options(args), "preprocessing": config.preprocessing,
                   "started": {v: run.started for v, run in runs.items()},
                   "confusion": {v: everywhere.confusion.tolist() for v, (everywhere, _) in scores.items()},
                   "seconds": {"training": round(trained - started, 1),
                               "total": round(finished - started, 1)}}, f, indent=1)
    say(f"\nwall time {finished - started:.0f} s (training {trained - started:.0f} s); "
        f"pictures and weights in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
