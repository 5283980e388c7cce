"""Training a user's model: a `.keras` file or a `keras.applications` architecture, through the
run schema (`TrainConfig.model` "file"/"application"), `keras-varinit train` and
`run_training`; clear refusals for what cannot be trained."""
import argparse
import hashlib
import pathlib

import keras
import numpy as np
import pytest

from keras_varinit import run_files as rf
from keras_varinit.cli import train
from keras_varinit.training import TrainConfig, run_training
from keras_varinit.training.model import build_model, compile_model

TINY = dict(data="synthetic", subset=64, val_subset=32, epochs=1, batch_size=32,
            stats_every_n_steps=1, backup_every_n_steps=0)


def two_conv(path, input_shape=(32, 32, 3), classes=10, activation=None):
    """A 2-conv model saved to `path` (what a user would upload)."""
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(classes, activation=activation, name="head")(h)
    keras.Model(inputs, outputs, name="two_conv").save(path)
    return str(path)


def parse(argv):
    parser = argparse.ArgumentParser(prog="keras-varinit")
    train.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


@pytest.mark.backend_independent
def test_keras_file_trains_from_its_own_weights(tmp_path):
    path = two_conv(tmp_path / "mine.keras")
    argv = ["--model", "file", "--model-file", path, "--data", "synthetic", "--subset", "64",
            "--val-subset", "32", "--epochs", "1", "--batch-size", "32", "--stats-every", "1",
            "--quiet", "--log-dir", str(tmp_path / "run")]
    args = parse(argv)
    config = train.config_from_args(args)
    assert (config.model, config.model_file, config.application) == ("file", path, None)
    assert config.slug().startswith("file-mine-sgd-lr0.01")     # no depth/width/init parts
    loaded = build_model(config, (32, 32, 3))
    saved = keras.models.load_model(path)
    for mine, theirs in zip(loaded.weights, saved.weights):   # as saved, not re-initialized
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mine),
                                      keras.ops.convert_to_numpy(theirs))
    assert train.run(args) == 0
    run_dir = tmp_path / "run"
    assert rf.read_json(run_dir / "status.json")["state"] == "finished"
    assert rf.read_json(run_dir / "config.json")["model_file"] == path
    layers = {r["layer"] for r in rf.read_jsonl(run_dir / "layer_stats.jsonl")}
    assert {"conv1", "conv2", "head"} <= layers
    recorded = rf.read_json(run_dir / "config.json")["model_file_sha256"]
    assert recorded == hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    two_conv(path, activation="softmax")      # another model saved over the run's file
    with pytest.raises(ValueError, match="model file changed since this run started"):
        train.run(parse([*argv, "--resume"]))


@pytest.mark.backend_independent
def test_model_path_is_the_file_shorthand_and_a_factory_is_refused(tmp_path):
    """`train --model net.keras` as `profile` and `doctor` take it; a factory cannot be resumed
    from config.json, so train asks for the saved file instead."""
    args = parse(["--model", "net.keras", "--data", "synthetic"])
    train.model_file_shorthand(args)
    config = train.config_from_args(args)
    assert (config.model, config.model_file) == ("file", "net.keras")
    args = parse(["--model", "my_project.nets:build"])
    with pytest.raises(ValueError, match=r"Received: --model my_project.nets:build\. Allowed: "
                                         r"save what the factory builds"):
        train.run(args)
    args = parse(["--model", "resnet"])
    with pytest.raises(ValueError, match="Allowed: 'cnn', 'mlp', 'file', 'application'"):
        train.run(args)


@pytest.mark.backend_independent
def test_softmax_output_is_trained_on_probabilities(tmp_path):
    config = TrainConfig(model="file", model_file=two_conv(tmp_path / "p.keras",
                                                           activation="softmax"), **TINY)
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
    assert compile_model(config, x).loss.get_config()["from_logits"] is False
    logits = TrainConfig(model="file", model_file=two_conv(tmp_path / "l.keras"), **TINY)
    assert compile_model(logits, x).loss.get_config()["from_logits"] is True


def test_application_builds_at_cifar_size_and_compiles():
    """(The training step itself is the .keras file's: compiling a fit of a 164-layer model
    costs ~40 s on 2 cores, too much for CI. TensorFlow only: on JAX the build and compile
    alone took 60 s in CI; the JAX path of a user's model is the .keras file's test.)"""
    config = TrainConfig(model="application", application="MobileNetV3Small", **TINY)
    assert config.slug().startswith("application-MobileNetV3Small-sgd")
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    model = compile_model(config, x)     # what run_training fits
    assert model.name.startswith("MobileNetV3") and tuple(model.output.shape) == (None, 10)
    assert model.loss.get_config()["from_logits"] is True    # classifier_activation=None
    assert np.isfinite(keras.ops.convert_to_numpy(model(x))).all()


@pytest.mark.backend_independent
@pytest.mark.parametrize("config, match", [
    (dict(model="file"), r"Received: model_file=None. Allowed: a value with model='file'"),
    (dict(model="application"), r"Received: application=None"),
    (dict(model="application", application="VGG99"), r"application='VGG99'.*'MobileNetV2'"),
    (dict(model="cnn", application="MobileNetV2"), r"None unless model='application'"),
    (dict(model="file", model_file="missing.keras"), "No such model file"),
    (dict(model="file", model_file="net.h5"), r"model_file='net.h5'.*a path to a .keras"),
    (dict(model="application", application="ResNet50", depth=10, init="xavier_normal"),
     r"depth, init: options of the built-in nets .* Received: model='application' with "
     r"depth=10, init='xavier_normal'"),
])
def test_bad_model_sources_are_refused_by_the_schema(config, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**config).validate()


@pytest.mark.backend_independent
def test_files_that_cannot_be_trained_get_clear_errors(tmp_path):
    png = tmp_path / "cat.keras"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="it is a PNG image"):
        TrainConfig(model="file", model_file=str(png), **TINY).validate()
    good = two_conv(tmp_path / "good.keras")
    truncated = tmp_path / "cut.keras"
    truncated.write_bytes(open(good, "rb").read()[:300])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        TrainConfig(model="file", model_file=str(truncated), **TINY).validate()
    wrong_shape = TrainConfig(model="file", model_file=two_conv(tmp_path / "gray.keras",
                                                                (28, 28, 1)), **TINY)
    with pytest.raises(ValueError, match=r"input shape is \(28, 28, 1\).*\(32, 32, 3\)"):
        build_model(wrong_shape.validate(), (32, 32, 3))
    five = TrainConfig(model="file", model_file=two_conv(tmp_path / "five.keras", classes=5),
                       **TINY)
    with pytest.raises(ValueError, match=r"Received: outputs of shape \[\(None, 5\)\]"):
        build_model(five.validate(), (32, 32, 3))
    frozen = keras.models.load_model(good)
    frozen.trainable = False
    frozen.save(tmp_path / "frozen.keras")
    with pytest.raises(ValueError, match="no trainable weights .* training would change nothing"):
        build_model(TrainConfig(model="file", model_file=str(tmp_path / "frozen.keras"),
                                **TINY).validate(), (32, 32, 3))


def test_a_run_refused_before_its_first_step_can_be_run_again_in_its_directory(tmp_path):
    """A model refused inside run_training left a 'failed' run directory that refused the
    same (or the corrected) command without --overwrite."""
    run_dir = tmp_path / "run"
    gray = TrainConfig(model="file", model_file=two_conv(tmp_path / "gray.keras", (28, 28, 1)),
                       **TINY)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"input shape is \(28, 28, 1\)"):
            run_training(gray, run_dir, verbose=0)
    good = TrainConfig(model="file", model_file=two_conv(tmp_path / "good.keras"), **TINY)
    assert run_training(good, run_dir, verbose=0).state == "finished"
