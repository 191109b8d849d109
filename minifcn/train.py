"""The training loop behind ``examples/train_fcn8s.py``.

    config = TrainConfig(variant="8s", iterations=600)
    trainer = Trainer(config)
    trainer.fit()                 # trains, validates, checkpoints, draws
    print(format_metrics(trainer.evaluate(), trainer.class_names))

What a run leaves in ``config.out``:

    log.jsonl            one JSON object per line: {"iteration", "loss", "lr", "seconds"} per
                         step, and {"iteration", "val": {metrics}, "elapsed"} at each validation
                         (elapsed: wall seconds of the run so far, validations included)
    checkpoint.npz       model + optimiser + data-loader position + random state
    curves.png           training loss and validation mean IU
    predictions.png      image / ground truth / prediction for a few validation images
    confusion.png        the validation confusion matrix

Never losing work: checkpoints are written atomically (see
minifcn.checkpoint); Ctrl-C finishes the current step, writes a checkpoint
and stops; ``resume=True`` continues from the checkpoint with the same data
order, dropout masks and optimiser state, so the loss curve of an
interrupted-and-resumed run is the one an uninterrupted run draws.
"""

import contextlib
import dataclasses
import glob
import json
import math
import numbers
import os
import signal
import time

import numpy as np
from tqdm import tqdm

from minifcn import distributed, models, nn, optim, parallel
from minifcn import functional as F
from minifcn import visualize
from minifcn.autograd import NonFiniteError, detect_anomaly
from minifcn.backend import check_device, get_array_module, is_cuda, to_device
from minifcn.checkpoint import _atomic_write, load_checkpoint, read_checkpoint_extra, save_checkpoint
from minifcn.data import transforms as T
from minifcn.data.loader import DataLoader
from minifcn.data.synthetic import SyntheticShapes
from minifcn.data.voc import VOC_CLASSES, VOCSegmentation
from minifcn.distributed.gradients import GradientSum
from minifcn.memory import keep_freed_memory
from minifcn.metrics import SegmentationMetrics
from minifcn.predict import segment
from minifcn.tensor import Tensor

VARIANTS = {"32s": 32, "16s": 16, "8s": 8}


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; saved in the checkpoint and the log.

    The defaults train a CPU-sized FCN-8s on the built-in synthetic shapes
    to mean IU 0.85 in about three minutes on two cores: the VGG16 layout at
    1/8 of the channels, with BatchNorm (a net this thin learns from scratch
    far faster with it), no dropout (128 fc channels are too few to drop half
    of them), "same" padding and learned upsampling. The recipe was chosen by
    its time to quality (bench/time_to_quality.py, bench/RESULTS.md).
    """

    variant: str = "8s"               # "32s", "16s" or "8s"
    backbone: str = "vgg16"           # or "resnet18", "resnet50"
    width: float = 1 / 8              # VGG channel counts times this (1 = the paper's net)
    fc6_kernel: int = 3               # 7 in the paper
    fc_channels: int = 128            # 4096 in the paper
    dropout: float = 0.0              # after fc6 and fc7 (0.5 in the paper)
    learnable_upsampling: bool = True  # the upsampling layers start bilinear and learn (the paper
                                       # learned its 2x layers; the released nets froze them all)
    batch_norm: bool = True           # BatchNorm after each VGG convolution (not in the paper)
    conv1_padding: int = 1            # 100 in the paper. With 1 here and in fc6 every convolution
    fc6_padding: int = 1              # is "same": the work goes into image pixels, not padding
                                      # (0 in the paper; the crops are derived either way)
    data: str = "synthetic"           # "synthetic", or a PASCAL VOC folder (VOCdevkit/VOC2012)
    train_size: int = 40000           # synthetic training images, drawn when read: a stream that
                                      # 4000 batches of 8 never repeat
    val_size: int = 200               # synthetic validation images
    iterations: int = 4000
    batch_size: int = 8
    crop: int = 96                    # training crop (0: whole images, batch_size must be 1)
    optimizer: str = "adam"           # "adam" or "sgd"
    lr: float = 4e-3
    momentum: float = 0.9             # SGD only
    weight_decay: float = 1e-4
    schedule: str = "poly"            # "poly" or "constant"
    preprocessing: str = "torchvision"  # "caffe" or "torchvision" normalisation of the input
    val_every: int = 1000
    checkpoint_every: int = 100
    device: str = "cpu"
    processes: int = 0                # CPU processes examples/train_fcn8s.py starts to share each
                                      # batch (0: one per core, up to one image each; 1: one)
    seed: int = 0
    out: str = "runs/fcn8s"
    on_nonfinite: str = "stop"        # "stop" (raise) or "skip" (drop the step)

    def validate(self):
        def whole(value, minimum):
            return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum

        def real(value):
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        if isinstance(self.out, os.PathLike):
            self.out = os.fspath(self.out)  # the config is saved as JSON: keep plain strings

        checks = [
            ("variant", self.variant in VARIANTS, f"one of {sorted(VARIANTS)}"),
            ("iterations", whole(self.iterations, 1), "a positive int"),
            ("batch_size", whole(self.batch_size, 1), "a positive int"),
            ("crop", whole(self.crop, 0) and (self.crop > 0 or self.batch_size == 1),
             "a non-negative int (0 only with batch_size 1)"),
            ("optimizer", self.optimizer in ("adam", "sgd"), "'adam' or 'sgd'"),
            ("lr", real(self.lr) and self.lr > 0, "a positive number"),
            ("dropout", real(self.dropout) and 0 <= self.dropout <= 1, "a probability in [0, 1]"),
            ("batch_norm", isinstance(self.batch_norm, bool), "True or False"),
            ("learnable_upsampling", isinstance(self.learnable_upsampling, bool), "True or False"),
            ("conv1_padding", whole(self.conv1_padding, 0), "a non-negative int"),
            ("fc6_padding", whole(self.fc6_padding, 0), "a non-negative int"),
            ("schedule", self.schedule in ("poly", "constant"), "'poly' or 'constant'"),
            ("preprocessing", self.preprocessing in ("caffe", "torchvision"), "'caffe' or 'torchvision'"),
            ("val_every", whole(self.val_every, 1), "a positive int"),
            ("checkpoint_every", whole(self.checkpoint_every, 1), "a positive int"),
            ("on_nonfinite", self.on_nonfinite in ("stop", "skip"), "'stop' or 'skip'"),
            ("seed", whole(self.seed, 0), "a non-negative int"),
            ("processes", whole(self.processes, 0) and (self.processes <= 1 or self.device == "cpu"),
             "a non-negative int (more than 1 only with device 'cpu')"),
            ("out", isinstance(self.out, str) and self.out != "", "a folder name"),
            ("train_size", whole(self.train_size, 1), "a positive int"),
            ("val_size", whole(self.val_size, 1), "a positive int"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        check_device(self.device)
        return self


class TrainingDiverged(FloatingPointError):
    """The loss or a gradient became NaN or infinite."""

    on_every_rank = True  # decided on sums over the ranks, so every rank raises it alike


def _all_finite(arrays):
    """True when no array holds NaN or infinity (one device sync for the lot)."""
    arrays = list(arrays)
    if not arrays:
        return True
    xp = get_array_module(arrays[0])
    if is_cuda(arrays[0]):  # one copy, one check: launching two kernels per array cost more (7 ms a step)
        return bool(xp.isfinite(xp.concatenate([a.ravel() for a in arrays])).all())
    return all(bool(xp.isfinite(a).all()) for a in arrays)


def _write_lines(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def build_datasets(config):
    """(train, val, class_names, palette) for ``config.data``."""
    if config.data == "synthetic":
        train = SyntheticShapes("train", size=config.train_size, seed=config.seed)
        val = SyntheticShapes("val", size=config.val_size, seed=config.seed)
        return train, val, list(train.class_names), train.palette
    train, val = VOCSegmentation(config.data, "train"), VOCSegmentation(config.data, "val")
    return train, val, list(VOC_CLASSES), train.palette


def build_model(config, num_classes):
    options = dict(width=config.width, learnable_upsampling=config.learnable_upsampling)
    if config.backbone == "vgg16":
        options.update(fc6_kernel=config.fc6_kernel, fc_channels=config.fc_channels,
                       conv1_padding=config.conv1_padding, fc6_padding=config.fc6_padding,
                       dropout=config.dropout, batch_norm=config.batch_norm)
    return models.build_fcn(VARIANTS[config.variant], num_classes=num_classes,
                            backbone=config.backbone, **options)


class Trainer:
    """Owns one run: data, model, optimiser, schedule, log and checkpoints.

    On several ranks (minifcn.distributed) every rank makes a Trainer and the same calls, in
    the same order: train_step, fit, evaluate and draw take sums over the ranks. Rank 0
    alone writes files."""

    def __init__(self, config, model=None, group=None):
        """group: the processes that share each batch (minifcn.distributed); by default every
        process mpiexec started, or this one alone."""
        self.config = config.validate()
        self.group = group if group is not None else distributed.world(config.device)
        self.group.run_together(self._set_up, config, model)  # a setup error stops every rank alike
        if self.group.size > 1:
            if config.device == "cpu":
                parallel.share_cores(self.group.local_size)
            nn.convert_sync_batchnorm(self.model, self.group)
            for array in [p.data for p in self.model.parameters()] + list(self.model.buffers()):
                self.group.broadcast(array)  # one model: rank 0's, whatever each was given
        self.group.barrier()  # the output folder exists for every rank

    def _set_up(self, config, model):
        share = distributed.batch_share(config.batch_size, self.group.rank, self.group.size)
        keep_freed_memory()  # every step frees and reallocates the same arrays (minifcn.memory)
        nn.manual_seed(config.seed)  # the model's initial weights and the dropout masks
        self.train_set, self.val_set, self.class_names, self.palette = build_datasets(config)
        self.num_classes = len(self.class_names)
        self.model = (model if model is not None else build_model(config, self.num_classes)).to(config.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.gradients = GradientSum(trainable)
        if config.optimizer == "adam":
            self.optimizer = optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                       weight_decay=config.weight_decay)
        normalize = T.Normalize(config.preprocessing)
        augment = [T.RandomHorizontalFlip()]
        if config.crop:
            augment.append(T.RandomCrop(config.crop))
        self.train_loader = DataLoader(self.train_set, batch_size=config.batch_size, shuffle=True,
                                       transform=T.Compose(augment + [normalize]), seed=config.seed,
                                       drop_last=True, share=share)  # this rank's images of each batch
        self.iteration = 0
        self.history = []  # the log's records, also kept in memory for the plot
        if os.path.exists(config.out) and not os.path.isdir(config.out):
            raise ValueError(f"out={config.out!r} is a file; expected a folder for the log and checkpoints")
        if self.group.is_root:
            os.makedirs(config.out, exist_ok=True)
        self.checkpoint_path = os.path.join(config.out, "checkpoint.npz")
        self.log_path = os.path.join(config.out, "log.jsonl")
        self._ctrl_c = False       # set by the Ctrl-C handler, at any moment
        self._interrupted = False  # the ranks' agreed decision to stop, taken with each step's sums

    # ---- one step ---------------------------------------------------------------
    def lr_at(self, iteration):
        if self.config.schedule == "poly":
            return optim.poly_lr(self.config.lr, iteration, self.config.iterations)
        return self.config.lr

    def _forward_loss(self, images, labels, reduction="mean"):
        scores = self.model(Tensor(to_device(images, self.config.device)))
        return F.softmax_cross_entropy(scores, to_device(labels, self.config.device), reduction=reduction)

    def train_step(self, images, labels):
        """One SGD/Adam step on this rank's share (images, labels) of a batch; returns the
        batch's mean loss (NaN for a skipped step).

        The loss is summed over this share's labelled pixels and divided by the whole batch's:
        the ranks add their gradients (one call), and the sum is the gradient of the batch's
        mean loss. A non-finite loss or gradient stops training (TrainingDiverged, naming the
        first op that made a NaN or infinity) or, with on_nonfinite="skip", drops the step
        before it touches the weights. An update that itself overflows the weights cannot be
        undone and always stops.
        """
        self.model.train()
        self.optimizer.lr = self.lr_at(self.iteration)
        self.optimizer.zero_grad()
        rng_state = nn.init.get_rng_state()  # to replay this very step if it goes wrong
        with self._dropout_masks_of_this_rank():
            loss = self._forward_loss(images, labels, reduction="sum")
            loss_sum = loss.item()
            if math.isfinite(loss_sum) or self.group.size > 1:  # every rank takes BatchNorm's sums
                loss.backward()
        labelled = int(np.count_nonzero(labels != 255))
        loss_sum, labelled, stop = self.gradients.sum_over(self.group, loss_sum, labelled, self._ctrl_c)
        self._interrupted = bool(stop)  # Ctrl-C on any rank stops every rank after this same step
        scale = 1.0 / max(labelled, 1)
        loss_value = loss_sum * scale
        finite = math.isfinite(loss_value)
        self.gradients.scale(scale)
        if finite:
            finite = _all_finite(p.grad for p in self.optimizer.params if p.grad is not None)
        if not finite:
            if self.config.on_nonfinite == "skip":
                self.optimizer.zero_grad()
                return float("nan")
            raise TrainingDiverged(self._explain_nonfinite(images, labels, loss_value, rng_state))
        self.optimizer.step()
        if not _all_finite(p.data for p in self.optimizer.params):
            names = {id(p): name for name, p in self.model.named_parameters()}
            broken = [names.get(id(p), "?") for p in self.optimizer.params if not _all_finite([p.data])]
            raise TrainingDiverged(
                f"iteration {self.iteration + 1}: the update made parameters {broken[:5]} non-finite "
                f"(lr {self.optimizer.lr:g} is far too large?). {self._checkpoint_note()}.")
        return loss_value

    def _dropout_masks_of_this_rank(self):
        """With several ranks, each keeps its share of the masks drawn for the whole batch:
        the masks one process would draw, whatever the number of ranks."""
        if self.group.size == 1:
            return contextlib.nullcontext()
        start, stop = distributed.batch_share(self.config.batch_size, self.group.rank, self.group.size)
        return nn.init.batch_share(start, stop, self.config.batch_size)

    def _explain_nonfinite(self, images, labels, loss_value, rng_state):
        """Replay the step with every op's output checked, to name the culprit, with the step's
        dropout masks. With several ranks each replays its own share alone (BatchNorm on the
        share's statistics: an op that stopped half-way must not leave the others waiting for
        its sums), and the first rank that found an op names it."""
        found = None
        nn.init.set_rng_state(rng_state)
        try:
            with detect_anomaly(), self._dropout_masks_of_this_rank(), nn.each_rank_alone(self.model):
                self.optimizer.zero_grad()
                self._forward_loss(images, labels).backward()
        except NonFiniteError as err:
            found = f"the {err.where}" + (f" (rank {self.group.rank})" if self.group.size > 1 else "")
        bad_input = not _all_finite([images])
        reports = self.group.all_gather((found, bad_input))
        found = next((where for where, _ in reports if where is not None), None)
        where = found or "no single op (the values overflowed only when combined)"
        if any(bad for _, bad in reports):
            where += "; the input images of this batch already hold NaN or infinity"
            advice = "check the dataset, or pass on_nonfinite='skip'"
        else:
            advice = "lower the learning rate or pass on_nonfinite='skip'"
        return (f"iteration {self.iteration + 1}: the loss is {loss_value} or a gradient is not finite; "
                f"first non-finite value: {where}. {self._checkpoint_note()}; {advice}.")

    def _checkpoint_note(self):
        if os.path.exists(self.checkpoint_path):
            return f"The last checkpoint ({self.checkpoint_path}) is intact"
        return "No checkpoint was written yet"

    # ---- evaluation ---------------------------------------------------------------
    def predict(self, image):
        """Label map (H, W) for one HxWx3 uint8 image."""
        self.model.eval()
        return segment(self.model, image, self.config.preprocessing, self.config.device)

    def evaluate(self, dataset=None, progress=True):
        """The FCN paper's metrics over ``dataset`` (default: the validation split)."""
        dataset = self.val_set if dataset is None else dataset
        metrics = SegmentationMetrics(self.num_classes)
        mine = range(self.group.rank, len(dataset), self.group.size)  # each rank a share of the images
        for index in tqdm(mine, desc="validating", leave=False, disable=not (progress and self.group.is_root)):
            image, label = dataset[index]
            metrics.update(self.predict(image), label)
        self.group.all_sum(metrics.confusion)
        return metrics

    # ---- checkpoints and the log ------------------------------------------------
    def save(self):
        """Write the checkpoint (rank 0; the others have the same weights)."""
        if not self.group.is_root:
            return
        save_checkpoint(self.checkpoint_path, self.model, self.optimizer,
                        iteration=self.iteration, loader=self.train_loader.state_dict(),
                        config=dataclasses.asdict(self.config))

    def resume(self):
        """Continue from ``checkpoint.npz``; the log is cut back to the same iteration."""
        extra = self.group.run_together(self._load_checkpoint)
        self.iteration = int(extra["iteration"])
        records = []
        if os.path.exists(self.log_path):
            with open(self.log_path) as f:
                lines = f.read().split("\n")
            # a run killed while appending may leave a partial last line: it is dropped (the
            # step it described is after the checkpoint anyway, and is done again)
            records = [json.loads(line) for line in lines[:-1] if line.strip()]
        self.history = [r for r in records if r["iteration"] <= self.iteration]
        self.group.barrier()  # every rank has read the log before rank 0 rewrites it
        if self.group.is_root:
            _atomic_write(self.log_path, lambda tmp: _write_lines(tmp, self.history))

    def _load_checkpoint(self):
        try:
            extra = load_checkpoint(self.checkpoint_path, self.model, self.optimizer, restore_rng=True)
            self.train_loader.load_state_dict(extra["loader"])
        except ValueError as err:
            changes = self._config_changes()
            if changes:  # the likely cause first; the first lines of the details after it
                lines = str(err).splitlines()
                err = "\n".join(lines[:3] + (["  ..."] if len(lines) > 3 else []))
            raise ValueError(f"cannot resume from {self.checkpoint_path}: {changes}{err}") from None
        return extra

    def _config_changes(self):
        """How this run's config differs from the checkpoint's, as text for an error message."""
        try:
            saved = read_checkpoint_extra(self.checkpoint_path)["config"]
        except (ValueError, KeyError, TypeError):
            return ""
        now = dataclasses.asdict(self.config)
        changed = [key for key in now if key not in ("out", "device", "processes") and saved.get(key) != now[key]]
        if not changed:
            return ""
        return (f"the checkpoint was written with {', '.join(f'{k}={saved.get(k)!r}' for k in changed)}; "
                f"this run has {', '.join(f'{k}={now[k]!r}' for k in changed)}. "
                "Resume with the same settings, or choose another output folder.\n")

    def _log(self, record):
        self.history.append(record)
        if self.group.is_root:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _on_sigint(self, signum, frame):
        if self._ctrl_c:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self._ctrl_c = True
        if self.group.is_root:
            tqdm.write("Ctrl-C: finishing this step and writing a checkpoint (Ctrl-C again to abort)")

    # ---- the loop ------------------------------------------------------------------
    def fit(self, resume=False, progress=True):
        """Train to ``config.iterations``; returns False if stopped by Ctrl-C."""
        config, root = self.config, self.group.is_root
        if root:
            for stale in glob.glob(os.path.join(glob.escape(config.out), ".checkpoint.*.tmp.npz")):
                os.remove(stale)  # left by a run killed while it wrote a checkpoint
        if resume and self.group.broadcast_object(os.path.exists(self.checkpoint_path)):  # rank 0's answer
            self.resume()
        else:
            if resume and root:
                tqdm.write(f"no checkpoint in {config.out} to resume from: starting at iteration 0")
            if os.path.exists(self.log_path) and root:
                os.remove(self.log_path)  # a fresh run starts a fresh log
        batches = self._batches()
        # wall time of the run so far, validation included; a resumed run goes on from its log
        started = time.perf_counter() - max((r.get("elapsed", 0.0) for r in self.history), default=0.0)
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        bar = tqdm(total=config.iterations, initial=self.iteration, desc=f"FCN-{config.variant}",
                   unit="it", disable=not (progress and root), dynamic_ncols=True)
        try:
            while self.iteration < config.iterations:
                images, labels = next(batches)
                step_started = time.perf_counter()
                loss = self.train_step(images, labels)
                self.iteration += 1
                self._log({"iteration": self.iteration, "loss": loss, "lr": self.optimizer.lr,
                           "seconds": round(time.perf_counter() - step_started, 4)})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.lr:.2g}")
                last = self.iteration == config.iterations
                if self.iteration % config.val_every == 0 or last:
                    summary = self.evaluate(progress=progress).summary()
                    self._log({"iteration": self.iteration, "val": summary,
                               "elapsed": round(time.perf_counter() - started, 3)})
                    if root:
                        bar.write(f"iteration {self.iteration}: val mean IU {summary['mean_iu']:.3f}, "
                                  f"pixel accuracy {summary['pixel_accuracy']:.3f}")
                if self.iteration % config.checkpoint_every == 0 or last or self._interrupted:
                    self.save()
                if self._interrupted:
                    if root:
                        bar.write(f"stopped at iteration {self.iteration}; checkpoint written to "
                                  f"{self.checkpoint_path}; continue with --resume")
                    return False
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous_handler)
        return True

    def _batches(self):
        while True:  # epochs follow one another; the loader knows where it stands
            yield from self.train_loader

    # ---- pictures --------------------------------------------------------------------
    def draw(self, count=4):
        """curves.png, predictions.png and confusion.png in the output folder."""
        if not self.group.is_root:  # the others only help with the metrics
            return self.evaluate(progress=False)
        out = self.config.out
        steps = [r for r in self.history if "loss" in r and math.isfinite(r["loss"])]
        vals = [r for r in self.history if "val" in r]
        if steps:
            window = max(1, len(steps) // 50)  # a running mean, so the trend shows through the noise
            losses = np.convolve([r["loss"] for r in steps], np.ones(window) / window, mode="valid")
            loss_plot = visualize.plot_curves(
                None, {"training loss": ([r["iteration"] for r in steps][window - 1:], losses)},
                title="training loss", xlabel="iteration")
            panels = [loss_plot]
            if vals:
                panels.append(visualize.plot_curves(
                    None, {"val mean IU": ([r["iteration"] for r in vals],
                                           [r["val"]["mean_iu"] for r in vals])},
                    title="validation mean IU", xlabel="iteration"))
            visualize.side_by_side([panels], path=os.path.join(out, "curves.png"))
        rows = []
        for index in range(min(count, len(self.val_set))):
            image, label = self.val_set[index]
            rows.append([image, label, self.predict(image)])
        visualize.side_by_side(rows, titles=["image", "ground truth", f"FCN-{self.config.variant}"],
                               path=os.path.join(out, "predictions.png"), scale=2, palette=self.palette)
        metrics = self.evaluate(progress=False)
        visualize.confusion_matrix_image(metrics.confusion, self.class_names,
                                         path=os.path.join(out, "confusion.png"))
        return metrics


def format_metrics(metrics, class_names):
    """The four metrics of the FCN paper and the per-class IU, as a text table."""
    lines = [f"{'pixel accuracy':>24}  {metrics.pixel_accuracy():.4f}",
             f"{'mean accuracy':>24}  {metrics.mean_accuracy():.4f}",
             f"{'mean IU':>24}  {metrics.mean_iu():.4f}",
             f"{'frequency weighted IU':>24}  {metrics.frequency_weighted_iu():.4f}",
             "", f"{'class':>24}  IU"]
    for name, iu in zip(class_names, metrics.per_class_iu()):
        lines.append(f"{name:>24}  {'  -' if np.isnan(iu) else f'{iu:.4f}'}")
    return "\n".join(lines)
