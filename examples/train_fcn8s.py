"""Train FCN-8s (or 16s / 32s) and show the result.

With no arguments it trains a CPU-sized FCN-8s on minifcn's built-in
synthetic shapes (no download) in about three minutes on two cores, then
prints the FCN paper's metrics on 200 validation images and writes pictures
to runs/fcn8s/:

    python examples/train_fcn8s.py
    python examples/train_fcn8s.py --data ~/data/VOCdevkit/VOC2012 --width 1 \\
        --fc6-kernel 7 --fc-channels 4096 --conv1-padding 100 --fc6-padding 0 \\
        --no-batch-norm --dropout 0.5 --crop 0 --batch-size 1 --device cuda
    python examples/train_fcn8s.py --resume          # continue an interrupted run

Ctrl-C writes a checkpoint before stopping; --resume continues from it.
"""

import argparse
import dataclasses
import os
import sys

import minifcn
from minifcn.distributed.launch import report_error, run_on_every_core, stop_every_rank
from minifcn.train import TrainConfig, Trainer, TrainingDiverged, format_metrics


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad argument: one line on stderr, exit status 2 (argparse's), no usage dump."""
        self.exit(2, f"error: {message} (see --help)\n")


def _count(number, noun):
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _workers(trainer):
    threads = _count(minifcn.get_num_threads(), "thread")
    if trainer.group.size > 1:  # each process runs its share of the batch
        return f"{trainer.group.size} processes sharing each batch, {threads} each"
    return threads


def parse_args(argv=None):
    defaults = TrainConfig()
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--variant", choices=["32s", "16s", "8s"], default=defaults.variant, help="FCN variant")
    add("--backbone", choices=["vgg16", "resnet18", "resnet50"], default=defaults.backbone)
    add("--width", type=float, default=defaults.width, help="channel multiplier: 1, 1/2 ... 1/16")
    add("--fc6-kernel", type=int, default=defaults.fc6_kernel, help="7 in the paper")
    add("--fc-channels", type=int, default=defaults.fc_channels, help="4096 in the paper")
    add("--dropout", type=float, default=defaults.dropout, help="after fc6 and fc7; 0.5 in the paper")
    add("--batch-norm", action=argparse.BooleanOptionalAction, default=defaults.batch_norm,
        help="BatchNorm after each VGG convolution (not in the paper; trains faster from scratch)")
    add("--learnable-upsampling", action=argparse.BooleanOptionalAction,
        default=defaults.learnable_upsampling,
        help="train the bilinear-initialised upsampling layers (frozen in the released reference nets)")
    add("--conv1-padding", type=int, default=defaults.conv1_padding, help="100 in the paper")
    add("--fc6-padding", type=int, default=defaults.fc6_padding, help="0 in the paper")
    add("--data", default=defaults.data, help="'synthetic' or a PASCAL VOC folder (VOCdevkit/VOC2012)")
    add("--train-size", type=int, default=defaults.train_size, help="synthetic training images")
    add("--val-size", type=int, default=defaults.val_size, help="synthetic validation images")
    add("--iterations", type=int, default=defaults.iterations)
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--crop", type=int, default=defaults.crop, help="training crop size; 0 for whole images (batch 1)")
    add("--optimizer", choices=["adam", "sgd"], default=defaults.optimizer)
    add("--lr", type=float, default=defaults.lr, help="learning rate")
    add("--momentum", type=float, default=defaults.momentum)
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--schedule", choices=["poly", "constant"], default=defaults.schedule)
    add("--preprocessing", choices=["caffe", "torchvision"], default=defaults.preprocessing)
    add("--val-every", type=int, default=defaults.val_every)
    add("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    add("--device", default=defaults.device, help="cpu or cuda")
    add("--threads", type=_positive_int, default=None,
        help="CPU threads for minifcn's ops (default: $MINIFCN_NUM_THREADS, else every core)")
    add("--processes", type=int, default=defaults.processes,
        help="CPU processes that share each batch, started with mpiexec (default 0: one per core, "
             "up to one image each; 1: this process alone). Under mpiexec, mpiexec's -n decides")
    add("--seed", type=int, default=defaults.seed)
    add("--out", default=defaults.out, help="output folder")
    add("--on-nonfinite", choices=["stop", "skip"], default=defaults.on_nonfinite)
    add("--resume", action="store_true", help="continue from <out>/checkpoint.npz")
    add("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}), args


def main(argv=None):
    config, args = parse_args(argv)
    try:
        config.validate()  # here, once, before any process starts
    except (ValueError, RuntimeError) as err:
        err.on_every_rank = True  # the same arguments on every rank
        report_error(err)
        return 1
    return run_on_every_core(lambda: train(config, args), os.path.abspath(__file__), argv,
                             config.batch_size, config.processes, config.device, threads=args.threads)


def train(config, args):
    try:
        trainer = Trainer(config)
        root = trainer.group.is_root
        if root:
            print(f"FCN-{config.variant} ({config.backbone}, width {config.width:g}), "
                  f"{sum(p.size for p in trainer.model.parameters()):,} parameters, "
                  f"{len(trainer.train_set)} training images, device {config.device} ({_workers(trainer)})",
                  flush=True)
        finished = trainer.fit(resume=args.resume, progress=not args.no_progress)
        if finished:
            metrics = trainer.draw()
    except KeyboardInterrupt:  # Ctrl-C outside a training step, or pressed twice
        stop_every_rank(130)
        print(f"error: interrupted; the last checkpoint in {config.out} is intact (--resume continues)",
              file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, TrainingDiverged) as err:
        report_error(err)
        return 1
    if not finished:
        return 130  # stopped by Ctrl-C, checkpoint written
    if root:
        print(f"\nValidation ({len(trainer.val_set)} images) after {trainer.iteration} iterations:")
        print(format_metrics(metrics, trainer.class_names))
        print(f"\npictures: {config.out}/curves.png, {config.out}/predictions.png, {config.out}/confusion.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
