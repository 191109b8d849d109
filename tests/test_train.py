"""The training loop, the main script and prediction, on a tiny configuration."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minifcn.predict import main as predict_main, segment
from minifcn.train import TrainConfig, Trainer, format_metrics
from minifcn.training.step import train_step

from conftest import random_weights

TINY = dict(width=1 / 16, fc6_kernel=1, fc_channels=16, conv1_padding=40, train_size=2, val_size=2,
            batch_size=2, crop=32, lr=1e-2, val_every=1000, checkpoint_every=1000)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(TrainConfig(iterations=40, out=str(out), **TINY))
    assert trainer.fit(progress=False)
    return trainer


def test_training_overfits_two_images(trained):
    losses = [r["loss"] for r in trained.history if "loss" in r]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_log_checkpoint_and_validation_written(trained):
    out = trained.config.out
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["iteration"] for r in records if "loss" in r] == list(range(1, 41))
    validation = [r for r in records if "val" in r]
    assert validation and validation[-1]["iteration"] == 40
    assert set(validation[-1]["val"]) >= {"pixel_accuracy", "mean_accuracy", "mean_iu", "frequency_weighted_iu"}
    steps = sum(r["seconds"] for r in records if "loss" in r)
    assert validation[-1]["elapsed"] >= steps  # the run's wall time: every step and the validation
    assert os.path.exists(os.path.join(out, "checkpoint.npz"))


def test_draw_writes_pictures_and_table(trained):
    metrics = trained.draw(count=2)
    for name in ("curves.png", "predictions.png", "confusion.png"):
        with Image.open(os.path.join(trained.config.out, name)) as image:
            assert image.size[0] > 100 and image.size[1] > 50
    table = format_metrics(metrics, trained.class_names)
    assert "mean IU" in table and "frequency weighted IU" in table and "bar" in table


def test_predict_command_writes_label_png_and_overlay(trained, tmp_path, capsys):
    image, _ = trained.val_set[0]
    source = tmp_path / "photo.png"
    Image.fromarray(image).save(source)
    out = tmp_path / "labels.png"
    assert predict_main([os.path.join(trained.config.out, "checkpoint.npz"), str(source), "--out", str(out)]) == 0
    with Image.open(out) as labels:
        assert labels.mode == "P" and labels.size == (image.shape[1], image.shape[0])
        np.testing.assert_array_equal(np.asarray(labels), trained.predict(image))
    assert (tmp_path / "labels_overlay.png").exists()
    assert "classes found" in capsys.readouterr().out


@pytest.mark.parametrize("out", ["labels", "labels.jpg"])
def test_predict_command_wants_a_png_out(trained, tmp_path, capsys, out):
    source = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(source)
    code = predict_main([os.path.join(trained.config.out, "checkpoint.npz"), str(source),
                         "--out", str(tmp_path / out)])
    assert code == 1
    assert f"--out must name a .png file (the labels are a palette PNG), got '{tmp_path / out}'" \
        in capsys.readouterr().err
    assert not (tmp_path / out).exists()


def test_predict_command_names_a_missing_image(trained, tmp_path, capsys):
    code = predict_main([os.path.join(trained.config.out, "checkpoint.npz"), str(tmp_path / "nope.jpg")])
    assert code == 1 and "nope.jpg" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("variant", "4s"), ("iterations", 0), ("lr", -1.0),
                                          ("crop", 0), ("device", "tpu"), ("optimizer", "rmsprop"),
                                          ("fc6_padding", -1), ("conv1_padding", 1.5),
                                          ("learnable_upsampling", "yes")])
def test_bad_config_is_refused_with_its_name(field, value, tmp_path):
    with pytest.raises(ValueError, match=field if field != "device" else "device"):
        TrainConfig(out=str(tmp_path), **{**TINY, field: value}).validate()


def test_the_default_run_is_the_documented_recipe():
    """examples/train_fcn8s.py with no arguments: the README and docs quote these settings."""
    config = TrainConfig().validate()
    assert (config.variant, config.backbone, config.width, config.batch_norm) == ("8s", "vgg16", 1 / 8, True)
    assert (config.conv1_padding, config.fc6_kernel, config.fc6_padding) == (1, 3, 1)  # "same" padding
    assert config.learnable_upsampling and config.val_size >= 200
    assert config.batch_size * config.iterations <= config.train_size  # no training image comes twice


def _one_step_setup(tmp_path):
    trainer = Trainer(TrainConfig(iterations=2, out=str(tmp_path), **TINY))
    images, labels = next(iter(trainer.train_loader))
    weights = [p.data.copy() for p in trainer.optimizer.params]
    return trainer, images, labels, weights


def test_the_textbook_step_is_the_trainers_step(tmp_path):
    """minifcn.training.step.train_step, called by hand, moves the weights as Trainer.train_step does."""
    trainer, images, labels, weights = _one_step_setup(tmp_path / "a")
    expected = trainer.train_step(images, labels)
    after = [p.data.copy() for p in trainer.optimizer.params]
    again, _, _, _ = _one_step_setup(tmp_path / "b")
    again.model.train()
    again.optimizer.lr = again.lr_at(0)
    loss, updated, stop = train_step(again.model, again.optimizer, again.gradients, again.group, images, labels)
    assert (loss, updated, stop) == (expected, True, False)
    assert all(np.array_equal(a, p.data) for a, p in zip(after, again.optimizer.params))
    assert not all(np.array_equal(w, a) for w, a in zip(weights, after))


def test_the_step_leaves_the_weights_alone_when_the_loss_is_not_finite(tmp_path):
    trainer, images, labels, weights = _one_step_setup(tmp_path)
    images = images.copy()
    images[0, 0, 0, 0] = np.nan
    loss, updated, stop = train_step(trainer.model, trainer.optimizer, trainer.gradients, trainer.group,
                                     images, labels, stop=True)
    assert np.isnan(loss) and not updated and stop
    assert all(np.array_equal(w, p.data) for w, p in zip(weights, trainer.optimizer.params))


# ---- the evaluation path, by value -------------------------------------------------------

def _metrics_by_hand(predictions, labels, num_classes):
    """The FCN paper's four metrics and per-class IU, from n_ij = pixels of class i predicted j."""
    n = np.zeros((num_classes, num_classes))
    for pred, label in zip(predictions, labels):
        counted = label != 255
        np.add.at(n, (label[counted].astype(int), pred[counted].astype(int)), 1)
    truth, predicted, hits = n.sum(axis=1), n.sum(axis=0), np.diag(n)
    present = truth > 0
    union = truth + predicted - hits
    iu = np.array([hits[i] / union[i] if union[i] else np.nan for i in range(num_classes)])
    return n, {"pixel_accuracy": hits.sum() / n.sum(),
               "mean_accuracy": np.mean(hits[present] / truth[present]),
               "mean_iu": np.nanmean(iu),
               "frequency_weighted_iu": (truth[present] * iu[present]).sum() / truth.sum(),
               "per_class_iu": iu}


def test_evaluate_equals_the_metrics_by_hand_of_the_same_predictions(tmp_path):
    """On the two validation images, with random weights: every class predicted, one of them
    absent from the truth (IU 0), and ignored pixels."""
    trainer = Trainer(TrainConfig(iterations=1, out=str(tmp_path), **TINY))
    random_weights(trainer.model, np.random.default_rng(0))
    images, labels = zip(*(trainer.val_set[i] for i in range(len(trainer.val_set))))
    predictions = [trainer.predict(image) for image in images]
    assert len(images) == 2 and all(np.any(label == 255) for label in labels)
    assert len(np.unique(np.concatenate([p.ravel() for p in predictions]))) == trainer.num_classes
    confusion, expected = _metrics_by_hand(predictions, labels, trainer.num_classes)
    assert (confusion.sum(axis=1) == 0).any()  # a class that is predicted but not in the truth
    metrics = trainer.evaluate(progress=False)
    np.testing.assert_array_equal(metrics.confusion, confusion)
    summary = metrics.summary()
    for name in ("pixel_accuracy", "mean_accuracy", "mean_iu", "frequency_weighted_iu"):
        assert summary[name] == pytest.approx(expected[name], rel=1e-12), name
    np.testing.assert_allclose(summary["per_class_iu"], expected["per_class_iu"], rtol=1e-12)


# What the network eats, written out: RGB / 255, minus ImageNet's mean, over its std; or Caffe's
# BGR minus its mean pixel, on the 0-255 scale. Channels first.
PREPROCESSED_BY_HAND = {
    "torchvision": lambda image: ((image / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1),
    "caffe": lambda image: (image[..., ::-1] - [104.00698793, 116.66876762, 122.67891434]).transpose(2, 0, 1),
}


@pytest.mark.parametrize("mode", sorted(PREPROCESSED_BY_HAND))
def test_segment_preprocesses_as_training_does(mode, tmp_path):
    crop = TINY["crop"]
    image = np.random.default_rng(0).integers(0, 256, (crop, crop, 3), dtype=np.uint8)
    seen = []

    def model(x):  # a stand-in network: its scores are its input, three "classes"
        seen.append(np.asarray(x.data))
        return x

    labels = segment(model, image, mode)
    (x,) = seen
    assert x.shape == (1, 3, crop, crop) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], PREPROCESSED_BY_HAND[mode](image.astype(np.float64)), rtol=1e-6, atol=1e-5)
    assert labels.dtype == np.uint8 and labels.shape == (crop, crop)
    np.testing.assert_array_equal(labels, x[0].argmax(axis=0))
    # Training's transform on the same image (a crop of its whole size; maybe mirrored)
    trainer = Trainer(TrainConfig(iterations=1, out=str(tmp_path), preprocessing=mode, **TINY))
    for seed in range(4):
        trained_x, _ = trainer.train_loader.transform(image, np.zeros((crop, crop), np.uint8),
                                                      np.random.default_rng(seed))
        assert np.array_equal(trained_x, x[0]) or np.array_equal(trained_x, x[0][..., ::-1]), seed


def test_the_trainers_learning_rate_follows_the_poly_schedule(trained):
    """Step i (from 1) of a 40-iteration run with lr 0.01 uses 0.01 (1 - (i - 1) / 40)^0.9."""
    logged = {r["iteration"]: r["lr"] for r in trained.history if "lr" in r}
    expected = {1: 0.01, 11: 0.01 * 0.75 ** 0.9, 21: 0.01 * 0.5 ** 0.9, 31: 0.01 * 0.25 ** 0.9,
                40: 0.01 * 0.025 ** 0.9}
    for iteration, lr in expected.items():
        assert logged[iteration] == pytest.approx(lr, rel=1e-12), iteration


@pytest.mark.parametrize("schedule, expected", [
    ("poly", {0: 0.02, 50: 0.02 * 0.5 ** 0.9, 99: 0.02 * 0.01 ** 0.9}),
    ("constant", {0: 0.02, 50: 0.02, 99: 0.02}),
])
def test_each_step_moves_the_weights_by_the_scheduled_learning_rate(tmp_path, schedule, expected):
    """Plain SGD: the step is -lr * gradient, so the lr a step used can be read off the weights."""
    config = TrainConfig(iterations=100, out=str(tmp_path), schedule=schedule, optimizer="sgd", momentum=0.0,
                         **{**TINY, "lr": 0.02, "weight_decay": 0.0})
    trainer = Trainer(config)
    trainer.model.to(dtype=np.float64)  # so that the steps are read off the weights to many digits
    images, labels = next(iter(trainer.train_loader))
    for iteration, lr in expected.items():
        trainer.iteration = iteration
        before = [p.data.copy() for p in trainer.optimizer.params]
        trainer.train_step(images.astype(np.float64), labels)
        assert trainer.optimizer.lr == pytest.approx(lr, rel=1e-12)
        step = np.concatenate([(p.data - b).ravel() for p, b in zip(trainer.optimizer.params, before)])
        grad = np.concatenate([p.grad.ravel() for p in trainer.optimizer.params])
        assert -step @ grad / (grad @ grad) == pytest.approx(lr, rel=1e-6), iteration


def _python_m_minifcn(*args, cwd):
    return subprocess.run([sys.executable, "-m", "minifcn", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("args", [[], ["--help"]], ids=["no-command", "help"])
def test_python_m_minifcn_prints_its_usage(args, tmp_path):
    run = _python_m_minifcn(*args, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("usage: python -m minifcn predict CHECKPOINT IMAGE")


def test_python_m_minifcn_refuses_an_unknown_command(tmp_path):
    run = _python_m_minifcn("train", cwd=tmp_path)
    assert run.returncode == 2
    assert "error: unknown command 'train'; expected 'predict'" in run.stderr and "usage:" in run.stderr


def test_python_m_minifcn_predict_segments_an_image(trained, tmp_path):
    image, _ = trained.val_set[1]
    Image.fromarray(image).save(tmp_path / "photo.png")
    checkpoint = os.path.join(trained.config.out, "checkpoint.npz")
    run = _python_m_minifcn("predict", checkpoint, "photo.png", "--out", "labels.png", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "classes found" in run.stdout and (tmp_path / "labels_overlay.png").exists()
    with Image.open(tmp_path / "labels.png") as labels:
        np.testing.assert_array_equal(np.asarray(labels), trained.predict(image))
