"""`keras-varinit doctor`: the probe of a built-in net and of your own model, the report, the
JSON lines, the exit codes (1 severe, 0 healthy, 2 bad usage)."""
import json

import keras
import numpy as np
import pytest

import keras_varinit
from keras_varinit import run_files as rf
from keras_varinit.cli import main
from keras_varinit.cli.doctor import Probe, change_options, probe_config, report_lines
from keras_varinit.diagnosis import Finding, suggestions
from keras_varinit.models import make_initializer
from keras_varinit.training import TrainConfig


#: A 30-layer ReLU MLP under Xavier: the variance halves per layer (2^-29 ~ 2e-9 at the top).
FAILING = ["--model", "mlp", "--depth", "30", "--width", "8", "--init", "xavier_normal",
           "--activation", "relu", "--data", "synthetic", "--batch-size", "16", "--steps", "3",
           "--quiet"]


@pytest.mark.slow
def test_a_vanishing_net_exits_1_and_names_the_fix(tmp_path, capsys):
    code = main(["doctor", *FAILING, "--log-dir", str(tmp_path / "probe")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "at init: FAILURE: forward variance falls" in out
    assert "SEVERE vanishing from step 0 at dense_01" in out
    assert "fix: --init kaiming_normal" in out
    # the probe is an ordinary run directory of 3 steps of 16 images, with its findings.jsonl
    assert json.loads((tmp_path / "probe" / rf.CONFIG_FILE).read_text())["subset"] == 48
    kinds = [r["kind"] for r in rf.read_jsonl(tmp_path / "probe" / rf.FINDINGS_FILE)]
    assert "vanishing" in kinds and kinds == [line.split()[1] for line in out.splitlines()
                                              if line.startswith(("SEVERE", "WARNING"))]


def test_a_healthy_net_exits_0(capsys):
    code = main(["doctor", "--model", "mlp", "--depth", "3", "--width", "32", "--init",
                 "kaiming_normal", "--data", "synthetic", "--batch-size", "32", "--steps", "3",
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "at init: OK" in out and "no findings" in out


def _saved_model(path, init):
    inputs = keras.Input((8,))
    h = inputs
    for i in range(29):
        h = keras.layers.Dense(16, activation="relu", kernel_initializer=init,
                               name=f"hidden_{i:02d}")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(h), name="mine")
    model.save(path)
    return path


def test_a_keras_file_is_probed_within_the_time_limit_json(tmp_path, capsys):
    """A saved 30-layer ReLU MLP under Glorot, on synthetic data of its input shape (8,) with 3
    classes; the time limit stops the probe after its first step, the findings stand; --json
    prints one finding per line and nothing else."""
    path = _saved_model(tmp_path / "mine.keras", "glorot_normal")
    code = main(["doctor", "--model", str(path), "--steps", "1000", "--time-limit", "0.001",
                 "--batch-size", "16", "--json", "--log-dir", str(tmp_path / "probe")])
    captured = capsys.readouterr()
    assert code == 1, captured
    findings = [json.loads(line) for line in captured.out.splitlines()]
    assert findings and all({"kind", "step", "layers", "severity", "evidence",
                             "suggestion"} <= set(f) for f in findings)
    vanishing = [f for f in findings if f["kind"] == "vanishing"]
    assert vanishing[0]["step"] == 0 and vanishing[0]["severity"] == "severe"
    assert vanishing[0]["layers"][0] == "hidden_00"
    assert vanishing[0]["suggestion"]["changes"] == {"init": "kaiming_normal"}
    assert rf.read_jsonl(tmp_path / "probe" / rf.FINDINGS_FILE) == findings
    assert "stops the probe at step 1/1000" in captured.err      # progress goes to stderr

    probe = Probe([Finding.from_dict(f) for f in findings], "FAILURE: ...", "stopped at the "
                  "time limit", 1, 0.5, None, "mine")
    text = "\n".join(report_lines(probe, TrainConfig, user_model=True))
    assert ('fix in your model\'s code: kernel_initializer=keras_varinit.initializers.get('
            '"kaiming_normal") in each hidden weight layer') in text


def _sample_variance(initializer):
    return float(np.var(keras.ops.convert_to_numpy(initializer((512, 512)))))


@pytest.mark.parametrize("changes", [
    {"init": "xavier_normal_tanh"}, {"init": "kaiming_normal"}, {"init": "he_normal"},
    {"init": "lecun_normal"}, {"activation": "leaky_relu", "init": "kaiming_normal"},
    {"normalization": "batch"}, {"normalization": "group"}, {"lr": 0.0003},
    {"input_normalization": "pooled"},
])
def test_the_fix_for_your_own_model_is_keras_code_that_makes_the_same_change(changes):
    """Each line of `keras_code` is an expression that runs, and it makes what the trainer
    makes for its own nets: the same weight variance (a relu gain where leaky ReLU's is due
    would be 4 % off: the sampled variance is within 0.3 %), layer, rate or activation."""
    lines = suggestions.keras_code(changes)
    assert len(lines) == len(changes)
    scope = {"keras": keras, "keras_varinit": keras_varinit,
             "x_train": np.random.default_rng(0).normal(2.0, 3.0, (64, 8, 8, 3))}
    for line in lines:
        name, _, rest = line.partition("=")
        if name == "kernel_initializer":
            made = keras.initializers.get(eval(rest.split(" in each")[0], scope))
            expected = make_initializer(changes["init"], changes.get("activation", "relu"))
            assert _sample_variance(made) == pytest.approx(_sample_variance(expected), rel=0.015)
        elif name == "activation":
            assert keras.activations.get(eval(rest.split(" in each")[0])) is \
                keras.activations.get(changes["activation"])
        elif name == "learning_rate":
            assert float(rest.split(" in the")[0]) == changes["lr"]
        else:
            layer = eval(line.split(" between ")[0].split(" as ")[0], scope)
            kind = {"batch": keras_varinit.layers.BatchNormalization,
                    "group": keras.layers.GroupNormalization}.get(
                changes.get("normalization"), keras.layers.Normalization)
            assert isinstance(layer, kind), line


def test_keras_code_for_raw_inputs_says_what_to_feed():
    """The one fix that is no code to add: a model with its own input layers wants the raw
    pixels (no normalization of one's own before them)."""
    (line,) = suggestions.keras_code({"input_normalization": "none"})
    assert line.startswith("the raw pixels (0-255) as the model's input, not normalized first")


def test_keras_code_refuses_a_field_no_suggestion_has():
    with pytest.raises(ValueError, match=r"Unknown suggestion fields. Received: \['depth'\]"):
        suggestions.keras_code({"depth": 4})


def test_a_model_with_a_recurrent_layer_is_probed_and_the_report_notes_what_is_left_out(
        tmp_path, capsys):
    inputs = keras.Input((6, 4))
    h = keras.layers.GRU(8, name="gru")(keras.layers.Dense(8, name="embed")(inputs))
    path = tmp_path / "seq.keras"
    keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name="seq").save(path)
    code = main(["doctor", "--model", str(path), "--steps", "4", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert code in (0, 1), out
    assert "  note: variance_profile leaves out ['gru/gru_cell']" in out
    assert "  note: LayerStatsLogger leaves out ['gru/gru_cell']" in out


_FACTORY = """
import keras

def build():
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu",
                            kernel_initializer="he_normal", name="conv_a")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="factory_net")
"""


def test_a_cifar_shaped_factory_is_probed_on_the_train_data_option(tmp_path, capsys):
    """A factory taking CIFAR-10 images with 10 outputs gets `--data` as `train` reads it."""
    (tmp_path / "nets.py").write_text(_FACTORY)
    code = main(["doctor", "--model", f"{tmp_path / 'nets.py'}:build", "--data", "synthetic",
                 "--steps", "2", "--batch-size", "16", "--quiet"])
    out = capsys.readouterr().out
    assert code in (0, 1), out      # 2 would be an error
    assert "factory_net from" in out and "synthetic CIFAR-like images (not CIFAR-10)" in out
    assert "probe: 2 step(s)" in out and "at init: " in out


def test_a_model_for_images_of_any_size_is_probed_on_cifar(tmp_path, capsys):
    """`train` takes a model with input (None, None, 3); the doctor refused it ("an axis of
    unknown size")."""
    inputs = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    path = tmp_path / "any_size.keras"
    keras.Model(inputs, keras.layers.Dense(10, name="head")(h)).save(path)
    code = main(["doctor", "--model", str(path), "--data", "synthetic", "--steps", "2",
                 "--batch-size", "16", "--quiet"])
    out = capsys.readouterr().out
    assert code in (0, 1), out
    assert "synthetic CIFAR-like images (not CIFAR-10)" in out and "probe: 2 step(s)" in out


def test_model_file_and_model_file_option_is_the_same_as_a_path(tmp_path, capsys):
    """`--model file --model-file X` (offered by --help, as for train) failed with an error
    whose "Allowed:" was the command typed."""
    path = _saved_model(tmp_path / "mine.keras", "he_normal")
    code = main(["doctor", "--model", "file", "--model-file", str(path), "--steps", "2",
                 "--batch-size", "16", "--quiet"])
    out = capsys.readouterr().out
    assert code in (0, 1), out
    assert "probe: 2 step(s)" in out and "mine" in out


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], "--steps must be a positive integer. Received: --steps 0"),
    (["--time-limit", "-1"], "Received: --time-limit -1"),
    (["--model", "missing.keras"], "missing.keras"),
    (["--model", "mine.keras", "--depth", "5"], "--depth: options of the built-in nets"),
    # were accepted and ignored: the probe ran on one device in float32
    (["--model", "mine.keras", "--distribute", "mirrored"],
     "Received: --distribute with --model mine.keras"),
    (["--model", "mine.keras", "--mixed-precision"],
     "Received: --mixed-precision with --model mine.keras"),
    (["--init", "no_such_init"], "Received: init='no_such_init'"),
    (["--model", "file"], "--model file needs --model-file PATH"),
])
def test_bad_usage_exits_2_with_one_line(argv, match, capsys):
    code = main(["doctor", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert match in err and err.startswith("keras-varinit doctor: error:")


def test_the_probe_configuration_and_the_options_of_a_fix():
    config = TrainConfig(batch_size=64, subset=10000, epochs=5, stats_every_n_steps=50)
    probe = probe_config(config, 200)
    assert (probe.subset, probe.epochs, probe.stats_every_n_steps, probe.val_subset) == \
        (10000, 2, 20, 256)      # the subset holds 156 batches: two epochs
    small = probe_config(TrainConfig(batch_size=16, subset=None), 10)
    assert (small.subset, small.epochs, small.stats_every_n_steps) == (160, 1, 1)
    assert change_options({"normalization": "group", "lr": 0.001}, TrainConfig) == \
        "--norm group --lr 0.001"
    assert change_options({"input_normalization": "pooled"}, TrainConfig) == \
        "--input-normalization pooled"
