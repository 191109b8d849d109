"""The training loop, the main script and prediction, on a tiny configuration."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from minifcn.predict import main as predict_main
from minifcn.train import TrainConfig, Trainer, format_metrics
from minifcn.training.step import train_step

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
