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

The Trainer is built from parts in ``minifcn/training/``, one job a file:

    config.py       TrainConfig, the recipe, and the model and datasets it builds
    step.py         one step: forward, loss, backward, sum over the ranks, update
    divergence.py   a NaN or infinity stops the run and names the op that made it
    interrupt.py    Ctrl-C finishes the step, writes a checkpoint and stops
    run_files.py    the checkpoint and the log, written and read back on resume
    pictures.py     the curves and predictions PNGs
"""

import contextlib
import os
import time

from tqdm import tqdm

from minifcn import distributed, nn, optim, visualize
from minifcn.data import transforms as T
from minifcn.data.loader import DataLoader
from minifcn.distributed.gradients import GradientSum
from minifcn.backend.cpu.memory import keep_freed_memory
from minifcn.backend.cpu.threads import share_cores
from minifcn.metrics import SegmentationMetrics, format_metrics
from minifcn.predict import segment
from minifcn.training import run_files
from minifcn.training.config import VARIANTS, TrainConfig, build_datasets, build_model
from minifcn.training.divergence import TrainingDiverged, check_update, explain_nonfinite
from minifcn.training.interrupt import CtrlC
from minifcn.training.pictures import draw_curves, draw_predictions
from minifcn.training.step import pixel_loss, train_step

__all__ = ["Trainer", "TrainConfig", "TrainingDiverged", "build_datasets", "build_model",
           "format_metrics", "VARIANTS"]


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
                share_cores(self.group.local_size)
            nn.convert_sync_batchnorm(self.model, self.group)
            for array in [p.data for p in self.model.parameters()] + list(self.model.buffers()):
                self.group.broadcast(array)  # one model: rank 0's, whatever each was given
        self.group.barrier()  # the output folder exists for every rank

    def _set_up(self, config, model):
        share = distributed.batch_share(config.batch_size, self.group.rank, self.group.size)
        keep_freed_memory()  # every step frees and reallocates the same arrays
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
        self.ctrl_c = CtrlC(announce=self.group.is_root)  # pressed at any moment, on any rank
        self._interrupted = False  # the ranks' agreed decision to stop, taken with each step's sums

    # ---- one step ---------------------------------------------------------------
    def lr_at(self, iteration):
        if self.config.schedule == "poly":
            return optim.poly_lr(self.config.lr, iteration, self.config.iterations)
        return self.config.lr

    def train_step(self, images, labels):
        """One SGD/Adam step (minifcn.training.step) on this rank's share (images, labels) of
        a batch; returns the batch's mean loss (NaN for a skipped step).

        A non-finite loss or gradient stops training (TrainingDiverged, naming the first op
        that made a NaN or infinity) or, with on_nonfinite="skip", drops the step before it
        touches the weights. An update that itself overflows the weights cannot be undone and
        always stops.
        """
        self.model.train()
        self.optimizer.lr = self.lr_at(self.iteration)
        rng_state = nn.init.get_rng_state()  # to replay this very step if it goes wrong
        with self._dropout_masks_of_this_rank():
            loss, updated, stop = train_step(self.model, self.optimizer, self.gradients, self.group,
                                             images, labels, self.config.device, stop=self.ctrl_c.pressed)
        self._interrupted = stop  # Ctrl-C on any rank stops every rank after this same step
        if not updated:
            if self.config.on_nonfinite == "skip":
                self.optimizer.zero_grad()
                return float("nan")
            raise TrainingDiverged(explain_nonfinite(
                lambda: self._replay(images, labels, rng_state), self.model, self.group, images,
                self.iteration + 1, loss, self.checkpoint_path))
        check_update(self.model, self.optimizer, self.iteration + 1, self.checkpoint_path)
        return loss

    def _dropout_masks_of_this_rank(self):
        """With several ranks, each keeps its share of the masks drawn for the whole batch:
        the masks one process would draw, whatever the number of ranks."""
        if self.group.size == 1:
            return contextlib.nullcontext()
        start, stop = distributed.batch_share(self.config.batch_size, self.group.rank, self.group.size)
        return nn.init.batch_share(start, stop, self.config.batch_size)

    def _replay(self, images, labels, rng_state):
        """The forward and backward of a step again, with the same random state and masks."""
        nn.init.set_rng_state(rng_state)
        with self._dropout_masks_of_this_rank():
            self.optimizer.zero_grad()
            pixel_loss(self.model, images, labels, self.config.device).backward()

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
        if self.group.is_root:
            run_files.save_run(self.checkpoint_path, self.model, self.optimizer, self.iteration,
                               self.train_loader, self.config)

    def resume(self):
        """Continue from ``checkpoint.npz``; the log is cut back to the same iteration."""
        extra = self.group.run_together(run_files.load_run, self.checkpoint_path, self.model,
                                        self.optimizer, self.train_loader, self.config)
        self.iteration = int(extra["iteration"])
        self.history = [r for r in run_files.read_log(self.log_path) if r["iteration"] <= self.iteration]
        self.group.barrier()  # every rank has read the log before rank 0 rewrites it
        if self.group.is_root:
            run_files.rewrite_log(self.log_path, self.history)

    def _log(self, record):
        self.history.append(record)
        if self.group.is_root:
            run_files.append_log(self.log_path, record)

    # ---- the loop ------------------------------------------------------------------
    def fit(self, resume=False, progress=True):
        """Train to ``config.iterations``; returns False if stopped by Ctrl-C."""
        config, root = self.config, self.group.is_root
        if root:
            run_files.remove_stale_temporaries(config.out)
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
        with self.ctrl_c, tqdm(total=config.iterations, initial=self.iteration, desc=f"FCN-{config.variant}",
                               unit="it", disable=not (progress and root), dynamic_ncols=True) as bar:
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
        draw_curves(self.history, os.path.join(out, "curves.png"))
        draw_predictions(self.val_set, self.predict, os.path.join(out, "predictions.png"), count,
                         f"FCN-{self.config.variant}", self.palette)
        metrics = self.evaluate(progress=False)
        visualize.confusion_matrix_image(metrics.confusion, self.class_names,
                                         path=os.path.join(out, "confusion.png"))
        return metrics
