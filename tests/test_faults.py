"""Fault tolerance: non-finite values, interrupted runs, and untrusted files.

- A NaN or infinity in the loss or a gradient stops training with a message
  naming the iteration and the first op that produced it (or skips the step
  with on_nonfinite="skip"); the last good checkpoint is left byte for byte.
- A run killed with SIGKILL at any moment resumes from its last checkpoint,
  Ctrl-C (SIGINT) writes a checkpoint and exits with 130, and the resumed
  run's loss curve equals the uninterrupted one bit for bit. These run the
  real script, examples/train_fcn8s.py, in a subprocess.
- Nothing minifcn loads can run code: pickles inside or instead of a
  checkpoint are refused, and a payload that would write a marker file never
  gets the chance.
"""

import glob
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import minifcn as mf
from minifcn import nn, train
from minifcn.autograd import NonFiniteError, detect_anomaly
from minifcn.checkpoint import load_checkpoint, load_weights, read_checkpoint_extra, save_checkpoint
from minifcn.data.synthetic import SyntheticShapes
from minifcn.train import TrainConfig, Trainer, TrainingDiverged

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "train_fcn8s.py")

# The tiny configuration: a 66k-parameter FCN-8s, ~20 ms a step, a run of 60 steps in ~3 s on 2 cores.
# In-process runs use the paper's layers (no BatchNorm, dropout 0.5), so that a huge learning rate
# overflows where the tests say; the script runs keep BatchNorm, so a resume must also restore its
# running statistics, and dropout 0.5, so it must restore the random stream of the masks.
TINY = dict(width=1 / 16, fc6_kernel=1, fc_channels=16, conv1_padding=4, train_size=16, val_size=2,
            batch_size=2, crop=32, val_every=1000, checkpoint_every=2, batch_norm=False, dropout=0.5)
TINY_ARGS = ["--width", "0.0625", "--fc-channels", "16", "--fc6-kernel", "1", "--train-size", "16",
             "--val-size", "2", "--crop", "32", "--batch-size", "2", "--conv1-padding", "4", "--no-progress",
             "--dropout", "0.5"]
ITERATIONS = 60


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _losses(out):
    """The per-step losses of a run's log, as the exact floats that were written."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


# ---- non-finite values ---------------------------------------------------------------

class _PoisonedAfter:
    """Wraps a dataset; every sample served after the first ``clean`` ones has a NaN
    channel, as a broken image file or a bad augmentation would."""

    def __init__(self, dataset, clean):
        self.dataset, self.clean, self.served = dataset, clean, 0
        self.class_names, self.palette = dataset.class_names, dataset.palette

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        self.served += 1
        image = image.astype(np.float32)  # float images may carry NaN through the transforms
        if self.served > self.clean:
            image[..., 0] = np.nan
        return image, label


def _poison_training_data(monkeypatch, clean_samples):
    def build(config):
        train_set = SyntheticShapes("train", size=config.train_size, seed=config.seed)
        val_set = SyntheticShapes("val", size=config.val_size, seed=config.seed)
        return _PoisonedAfter(train_set, clean_samples), val_set, list(train_set.class_names), train_set.palette
    monkeypatch.setattr(train, "build_datasets", build)


def _record_saves(monkeypatch):
    """Every checkpoint the trainer writes, as (iteration, bytes on disk right after)."""
    saves = []
    original = Trainer.save

    def save(self):
        original(self)
        saves.append((self.iteration, _read_bytes(self.checkpoint_path)))
    monkeypatch.setattr(Trainer, "save", save)
    return saves


def _assert_last_checkpoint_intact(trainer, saves, iteration):
    assert saves and saves[-1][0] == iteration
    assert _read_bytes(trainer.checkpoint_path) == saves[-1][1]  # byte for byte
    assert not glob.glob(os.path.join(trainer.config.out, ".checkpoint.*"))  # no half-written temp file
    model = train.build_model(trainer.config, trainer.num_classes)
    assert load_checkpoint(trainer.checkpoint_path, model)["iteration"] == iteration
    assert all(np.isfinite(p.data).all() for p in model.parameters())


def test_nan_in_an_input_image_stops_naming_iteration_and_first_op(tmp_path, monkeypatch):
    _poison_training_data(monkeypatch, clean_samples=3 * TINY["batch_size"])  # iterations 1-3 are clean
    saves = _record_saves(monkeypatch)
    trainer = Trainer(TrainConfig(iterations=10, out=str(tmp_path), **{**TINY, "checkpoint_every": 1}))
    with pytest.raises(TrainingDiverged, match=r"iteration 4: the loss is nan") as info:
        trainer.fit(progress=False)
    message = str(info.value)
    assert "the forward pass of Conv2d" in message           # the first op whose output is NaN
    assert "input images of this batch already hold NaN" in message
    assert "last checkpoint" in message and "is intact" in message
    assert trainer.iteration == 3
    _assert_last_checkpoint_intact(trainer, saves, iteration=3)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_huge_learning_rate_stops_at_the_first_non_finite_loss(tmp_path, monkeypatch, optimizer):
    saves = _record_saves(monkeypatch)
    config = TrainConfig(iterations=10, out=str(tmp_path), lr=1e30, optimizer=optimizer,
                         **{**TINY, "checkpoint_every": 1})
    trainer = Trainer(config)
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged) as info:  # numpy warns of the overflow
        trainer.fit(progress=False)
    # step 1 moves the weights to ~1e30; step 2's forward pass overflows float32
    message = str(info.value)
    assert message.startswith("iteration 2: the loss is nan")
    assert "first non-finite value: the forward pass of Conv2d" in message
    assert "lower the learning rate" in message
    _assert_last_checkpoint_intact(trainer, saves, iteration=1)


def test_an_update_that_overflows_the_weights_stops_before_any_checkpoint(tmp_path):
    trainer = Trainer(TrainConfig(iterations=5, out=str(tmp_path), lr=1e39, **{**TINY, "checkpoint_every": 1}))
    with np.errstate(all="ignore"), pytest.raises(
            TrainingDiverged, match=r"iteration 1: the update made parameters \['conv1_1.weight'.* non-finite"):
        trainer.fit(progress=False)
    assert not os.path.exists(trainer.checkpoint_path)


def test_skip_drops_non_finite_steps_and_keeps_training(tmp_path, monkeypatch):
    _poison_training_data(monkeypatch, clean_samples=2 * TINY["batch_size"])
    trainer = Trainer(TrainConfig(iterations=5, out=str(tmp_path), on_nonfinite="skip", **TINY))
    before = {}
    original_step = trainer.train_step

    def step(images, labels):  # the weights before every step
        before[trainer.iteration + 1] = {k: v.copy() for k, v in trainer.model.state_dict().items()}
        return original_step(images, labels)
    trainer.train_step = step
    assert trainer.fit(progress=False)
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    assert np.isfinite(losses[:2]).all() and np.isnan(losses[2:]).all()
    after = trainer.model.state_dict()
    for name, value in before[3].items():  # steps 3-5 were all skipped: nothing moved
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert all(np.isfinite(v).all() for v in after.values())
    assert load_checkpoint(trainer.checkpoint_path, train.build_model(trainer.config, 5))["iteration"] == 5


def test_detect_anomaly_names_the_first_op_forward_and_backward():
    x = mf.Tensor(np.array([1.0, -1.0]), requires_grad=True)
    with detect_anomaly(), np.errstate(invalid="ignore"), pytest.raises(NonFiniteError) as info:
        (x * 2.0).log().exp()
    assert info.value.op_name == "Log" and info.value.direction == "forward"
    assert "1 of 2 values" in str(info.value)
    y = mf.Tensor(np.array([0.0, 4.0]), requires_grad=True)
    loss = (y ** 0.5).sum()  # d sqrt(y)/dy is infinite at 0: only the backward pass goes wrong
    with detect_anomaly(), np.errstate(divide="ignore"), pytest.raises(NonFiniteError,
                                                                       match="backward pass of Pow"):
        loss.backward()
    with np.errstate(invalid="ignore"):  # off by default: no check, no error
        assert np.isnan(mf.Tensor(np.array([-1.0])).log().data).all()


# ---- interruptions: the real script in a subprocess ------------------------------------

def _command(out, *extra, iterations=ITERATIONS):
    return [sys.executable, SCRIPT, "--iterations", str(iterations), *TINY_ARGS, "--checkpoint-every", "2",
            "--out", str(out), *extra]


def _run(out, *extra, **kwargs):
    result = subprocess.run(_command(out, *extra, **kwargs), capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _log_lines(out):
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _start_and_signal(out, sig, after_lines, *extra):
    """Start a run, send ``sig`` once its log has ``after_lines`` lines; (returncode, stdout, stderr)."""
    process = subprocess.Popen(_command(out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while _log_lines(out) < after_lines and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The loss curve of a run that nobody interrupts."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = _run(out)
    assert result.returncode == 0, result.stderr
    losses = _losses(out)
    assert len(losses) == ITERATIONS and np.isfinite(losses).all()
    return losses


def test_sigkill_at_any_moment_then_resume_reproduces_the_loss_curve_exactly(tmp_path, uninterrupted):
    out = tmp_path / "run"
    # killed before its first checkpoint, mid-epoch, at an epoch boundary (8 batches an epoch), late
    for kills, after_lines in enumerate((1, 13, 24, 47)):
        code, _, stderr = _start_and_signal(out, signal.SIGKILL, after_lines, *(["--resume"] if kills else []))
        assert code == -signal.SIGKILL, stderr
        if os.path.exists(out / "checkpoint.npz"):  # every checkpoint a kill leaves behind is whole
            assert read_checkpoint_extra(out / "checkpoint.npz")["iteration"] % 2 == 0
    result = _run(out, "--resume")
    assert result.returncode == 0, result.stderr
    assert _losses(out) == uninterrupted  # bit for bit: JSON keeps every digit of a float
    assert not glob.glob(str(out / ".checkpoint.*"))  # temp files of killed writes are cleaned up


def test_ctrl_c_writes_a_checkpoint_exits_130_and_resumes_exactly(tmp_path, uninterrupted):
    out = tmp_path / "run"
    # checkpoints every 1000 iterations: the only one on disk is the one Ctrl-C wrote
    code, stdout, stderr = _start_and_signal(out, signal.SIGINT, 10, "--checkpoint-every", "1000")
    assert code == 130, stderr
    assert "Traceback" not in stderr
    stopped_at = int(stdout.split("stopped at iteration ")[1].split(";")[0])
    assert read_checkpoint_extra(out / "checkpoint.npz")["iteration"] == stopped_at
    assert len(_losses(out)) == stopped_at
    result = _run(out, "--resume")
    assert result.returncode == 0, result.stderr
    assert _losses(out) == uninterrupted


def test_resume_without_a_checkpoint_starts_afresh_with_a_fresh_log(tmp_path):
    config = TrainConfig(iterations=3, out=str(tmp_path), **TINY)
    with open(os.path.join(config.out, "log.jsonl"), "w") as f:  # a run killed before its first checkpoint
        f.write('{"iteration": 1, "loss": 9.0, "lr": 0.1}\n{"iteration": 2, "lo')
    trainer = Trainer(config)
    assert trainer.fit(resume=True, progress=False)
    assert [r["iteration"] for r in trainer.history if "loss" in r] == [1, 2, 3]
    assert [r["iteration"] for r in map(json.loads, open(trainer.log_path)) if "loss" in r] == [1, 2, 3]


def test_resume_drops_a_half_written_last_log_line_and_later_records(tmp_path):
    config = TrainConfig(iterations=4, out=str(tmp_path), **TINY)
    trainer = Trainer(config)
    trainer.fit(progress=False)
    reference = _losses(config.out)
    # a run that went on after its iteration-4 checkpoint and was killed in the middle of a line
    with open(trainer.log_path, "a") as f:
        f.write('{"iteration": 5, "loss": 1.0, "lr": 0.1}\n{"iteration": 6, "lo')
    resumed = Trainer(config)
    resumed.resume()
    assert resumed.iteration == 4
    assert [r["loss"] for r in resumed.history if "loss" in r] == reference == _losses(config.out)


def test_resume_with_other_settings_names_them(tmp_path):
    config = TrainConfig(iterations=2, out=str(tmp_path), **TINY)
    Trainer(config).fit(progress=False)
    other = Trainer(TrainConfig(**{**config.__dict__, "width": 1 / 8}))
    with pytest.raises(ValueError, match=r"(?s)cannot resume from .*checkpoint.npz: the checkpoint was written "
                                         r"with width=0.0625; this run has width=0.125.*optimiser"):
        other.fit(resume=True, progress=False)


def test_a_save_interrupted_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = nn.Conv2d(3, 4, 3)
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, model, iteration=1)
    good = _read_bytes(path)

    def half_write_then_ctrl_c(file, **arrays):  # numpy.savez cut short by a Ctrl-C
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", half_write_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, iteration=2)
    assert _read_bytes(path) == good
    assert os.listdir(tmp_path) == ["checkpoint.npz"]


_SAVE_FOREVER = """
import sys
import minifcn as mf
model = mf.nn.Conv2d(16, 16, 3)
for iteration in range(1, 100000):
    mf.save_checkpoint(sys.argv[1], model, iteration=iteration)
    print(iteration, flush=True)
"""


def test_sigkill_while_writing_checkpoints_never_leaves_a_broken_one(tmp_path):
    path = tmp_path / "checkpoint.npz"
    for delay in (0.05, 0.21, 0.37):
        process = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(path)],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline()  # at least one whole checkpoint exists
        time.sleep(delay)                 # then kill it somewhere inside a later write
        process.kill()
        last_reported = max([1] + [int(line) for line in process.communicate()[0].split()])
        model = nn.Conv2d(16, 16, 3)
        iteration = load_checkpoint(path, model)["iteration"]
        assert iteration >= last_reported


# ---- untrusted files -------------------------------------------------------------------

class _Payload:
    """Unpickling this writes the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _evil_npz(path, marker, as_weights=False):
    arrays = {"weight": np.zeros((2, 3, 3, 3), np.float32), "bias": np.array([_Payload(marker)], dtype=object)}
    if not as_weights:
        arrays = {f"model/{k}": v for k, v in arrays.items()}
        arrays["meta/format"] = np.array(1)
    np.savez(path, **arrays)  # numpy pickles the object array


def test_the_crafted_payload_really_runs_when_unpickled(tmp_path):
    """The control: loading the file the unsafe way does write the marker."""
    marker = tmp_path / "marker"
    _evil_npz(tmp_path / "evil.npz", marker)
    with np.load(tmp_path / "evil.npz", allow_pickle=True) as npz:
        npz["model/bias"]
    assert marker.exists()


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_weights", "read_checkpoint_extra"])
def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path, loader):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.npz"
    _evil_npz(path, marker, as_weights=loader == "load_weights")
    load = {"load_checkpoint": lambda: load_checkpoint(path, nn.Conv2d(3, 2, 3)),
            "load_weights": lambda: load_weights(path, nn.Conv2d(3, 2, 3)),
            "read_checkpoint_extra": lambda: read_checkpoint_extra(path)}[loader]
    with pytest.raises(ValueError, match=r"refusing to load .*evil.npz.*pickled Python objects"):
        load()
    assert not marker.exists()


def test_a_pickle_posing_as_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    with pytest.raises(ValueError, match=r"not an .npz archive \(it looks like a pickle\)"):
        load_checkpoint(path, nn.Conv2d(3, 2, 3))
    assert not marker.exists()


def test_a_pytorch_style_zip_with_a_pickle_inside_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "model.npz"
    with zipfile.ZipFile(path, "w") as archive:  # torch.save's layout: archive/data.pkl + tensors
        archive.writestr("archive/data.pkl", pickle.dumps({"weight": _Payload(marker)}))
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(3))
        archive.writestr("archive/data/0.npy", buffer.getvalue())
    for load in (lambda: load_weights(path, nn.Conv2d(3, 2, 3)), lambda: load_checkpoint(path, nn.Conv2d(3, 2, 3))):
        with pytest.raises(ValueError, match=r"refusing to load .*model.npz.*'archive/data.pkl'.*not .npy arrays"):
            load()
    assert not marker.exists()


def test_resuming_from_a_malicious_checkpoint_is_an_error_line_not_code(tmp_path):
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    out.mkdir()
    _evil_npz(out / "checkpoint.npz", marker)
    result = _run(out, "--resume", iterations=2)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot resume from") and "pickled Python objects" in result.stderr
    assert not marker.exists()


def test_safetensors_weights_round_trip_and_a_corrupt_header_is_refused(tmp_path):
    model = nn.Conv2d(3, 2, 3)
    mf.save_weights(tmp_path / "w.safetensors", model)
    copy = nn.Conv2d(3, 2, 3)
    load_weights(tmp_path / "w.safetensors", copy)
    np.testing.assert_array_equal(copy.weight.data, model.weight.data)
    (tmp_path / "bad.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="bad.safetensors.*not a readable .safetensors file"):
        load_weights(tmp_path / "bad.safetensors", copy)
