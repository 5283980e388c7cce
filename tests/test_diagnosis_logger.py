"""DiagnosisLogger: the live diagnosis inside fit(): where it reads, what it writes."""
import json
import logging
import math

import keras
import numpy as np
import pytest

import keras_varinit as kv
from keras_varinit.callbacks import DiagnosisLogger, LayerStatsLogger
from keras_varinit.diagnosis import Context, read_findings
from keras_varinit.diagnosis_logger import _EventFileText, model_context, text_writer

bi = pytest.mark.backend_independent


def saturating_mlp(seed=0):
    """A 6-layer tanh MLP with N(0, 1) weights: saturated from step 0."""
    return kv.models.plain_mlp(6, width=64, kernel_initializer="normal:1.0", activation="tanh",
                               input_shape=(4, 4, 3), seed=seed)


def data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4, 4, 3)).astype("float32"), rng.integers(0, 10, n)


def fit(model, callbacks, steps=4, lr=0.01, epochs=1, x=None, y=None):
    if x is None:
        x, y = data()
    if not model.compiled:
        model.compile(keras.optimizers.SGD(lr),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:steps * 16], y[:steps * 16], batch_size=16, epochs=epochs, verbose=0,
              callbacks=callbacks)


def tensorboard_texts(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        for event in acc.Tensors(tag):
            text = event.tensor_proto.string_val[0].decode()
            out.setdefault(tag, []).append((event.step, text))
    return out


@bi
def test_findings_go_to_the_console_tensorboard_jsonl_and_python(tmp_path, caplog):
    x, y = data()
    logger = LayerStatsLogger((x[:32], y[:32]), every_n_steps=None)
    doctor = DiagnosisLogger(logger, log_dir=tmp_path / "tb", jsonl_path=tmp_path / "f.jsonl")
    with caplog.at_level(logging.WARNING, logger="keras_varinit.diagnosis"):
        fit(saturating_mlp(), [logger, doctor])
    findings = doctor.findings
    assert "saturation" in [f.kind.value for f in findings]
    saturation = next(f for f in findings if f.kind == "saturation")
    assert saturation.step == 0 and saturation.suggestion.changes["init"] == "xavier_normal_tanh"
    lines = [r.getMessage() for r in caplog.records if r.name == "keras_varinit.diagnosis"]
    assert len(lines) == len(findings) and "saturation at initialization" in " ".join(lines)
    assert [f.to_dict() for f in read_findings(tmp_path / "f.jsonl")] == \
        [f.to_dict() for f in findings]
    texts = tensorboard_texts(tmp_path / "tb")
    assert texts["diagnosis/saturation"][0][0] == 0
    assert "xavier_normal" in texts["diagnosis/saturation"][0][1]
    frame = doctor.to_dataframe()
    assert list(frame["kind"]) == [f.kind.value for f in findings]


@bi
def test_the_callback_order_does_not_matter_and_nothing_is_reported_twice():
    x, y = data()
    results = []
    for order in ("logger first", "diagnosis first"):
        keras.utils.set_random_seed(0)
        logger = LayerStatsLogger((x[:32], y[:32]), every_n_steps=2)
        doctor = DiagnosisLogger(logger, verbose=0)
        model = saturating_mlp()
        cbs = [logger, doctor] if order == "logger first" else [doctor, logger]
        fit(model, cbs, steps=6)
        first = [f.to_dict() for f in doctor.findings]
        fit(model, cbs, steps=6)  # a second fit continues the same run: nothing new
        assert [f.to_dict() for f in doctor.findings] == first
        results.append([(f["kind"], f["step"], f["layers"]) for f in first])
    assert results[0] == results[1]
    assert ("saturation", 0) in [(k, s) for k, s, _ in results[0]]


@bi
def test_a_non_finite_loss_is_named_at_the_next_log():
    """Logged at step 0 and the epoch end only: the divergence starts at the first non-finite
    loss and names the first layer whose statistics are non-finite at the next log."""
    x, y = data()
    logger = LayerStatsLogger((x[:32], y[:32]), every_n_steps=None)
    doctor = DiagnosisLogger(logger, verbose=0)
    model = kv.models.plain_mlp(4, width=64, kernel_initializer="kaiming_normal",
                                activation="relu", input_shape=(4, 4, 3), seed=0)
    fit(model, [logger, doctor], steps=12, lr=1e4)
    (f,) = [f for f in doctor.findings if f.kind == "divergence"]
    assert f.evidence["first_nonfinite_loss_step"] is not None
    assert f.step == f.evidence["first_nonfinite_loss_step"] < 12
    assert f.evidence["first_nonfinite_record_step"] == 12 and len(f.layers) == 1
    assert f.suggestion.changes["lr"] <= 1e3


@bi
def test_a_logger_outside_fit_is_reported(caplog):
    x, y = data()
    logger = LayerStatsLogger((x[:32], y[:32]))
    doctor = DiagnosisLogger(logger, verbose=0)
    with caplog.at_level(logging.WARNING, logger="keras_varinit.diagnosis"):
        fit(saturating_mlp(), [doctor], steps=2)
    assert "was not part of this fit()" in caplog.text
    assert doctor.findings == []


@bi
def test_bad_arguments_say_what_was_received():
    x, y = data()
    logger = LayerStatsLogger((x[:8], y[:8]))
    with pytest.raises(ValueError, match="Received: logger of type TensorBoard"):
        DiagnosisLogger(keras.callbacks.TensorBoard())
    with pytest.raises(ValueError, match="Received: str"):
        DiagnosisLogger(logger, profile="auto")
    with pytest.raises(ValueError, match="Received: dict"):
        DiagnosisLogger(logger, context={"batch_size": 2})


@bi
def test_the_context_comes_from_the_model():
    inputs = keras.Input((4, 4, 3))
    h = keras.layers.Rescaling(1 / 255.0)(inputs)
    h = keras.layers.Conv2D(8, 3, name="conv")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(7, name="logits")(h))
    model.compile(keras.optimizers.Adam(3e-4), "mse")
    x = np.full((8, 4, 4, 3), 255.0, dtype="float32")
    ctx = model_context(model, x)
    assert (ctx.num_classes, ctx.batch_norm_layers, ctx.activation) == (7, ("bn",), "relu")
    assert ctx.lr == pytest.approx(3e-4) and ctx.batch_size is None
    # the first weight layer sees the rescaled input: E[x^2] = 1, not 255^2
    assert ctx.input_second_moment == pytest.approx(1.0)
    assert ctx.input_layers == (model.layers[1].name,)   # the Rescaling layer
    given = model_context(model, x, Context(batch_size=4, activation="tanh", lr=0.1))
    assert (given.batch_size, given.activation, given.lr) == (4, "tanh", 0.1)
    mlp = kv.models.plain_mlp(3, width=8, activation="tanh", input_shape=(4, 4, 3))
    assert model_context(mlp, np.ones((2, 4, 4, 3))).input_second_moment == 1.0
    assert model_context(mlp).input_layers == ()   # a Flatten only changes the shape


@bi
def test_text_summaries_without_tensorflow(tmp_path):
    """The TF-free writer (tensorboard's event file and text protobuf) reads back like
    tf.summary.text's."""
    for writer, path in ((_EventFileText(str(tmp_path / "free")), tmp_path / "free"),
                         (text_writer(str(tmp_path / "tf")), tmp_path / "tf")):
        writer.write("diagnosis/vanishing", "**vanishing** at conv_03", 0)
        writer.write("diagnosis/divergence", "divergence at dense_02", 17)
        writer.close()
        texts = tensorboard_texts(path)
        assert texts["diagnosis/vanishing"] == [(0, "**vanishing** at conv_03")]
        assert texts["diagnosis/divergence"] == [(17, "divergence at dense_02")]


@bi
def test_the_profile_gives_predicted_values():
    """By default the init profile is measured (forward only) and its prediction is in the
    evidence; profile=None leaves it out; a given DataFrame is used as is."""
    x, y = data()
    model = kv.models.plain_mlp(8, width=64, kernel_initializer="normal:0.01", activation="tanh",
                                input_shape=(4, 4, 3), seed=0)
    for profile in (True, None):
        logger = LayerStatsLogger((x[:32], y[:32]), every_n_steps=None)
        doctor = DiagnosisLogger(logger, profile=profile, verbose=0)
        fit(model if profile else keras.models.clone_model(model), [logger, doctor], steps=1)
        (f,) = [f for f in doctor.findings if f.kind == "vanishing"]
        predicted = f.evidence["predicted_forward_ratio"]
        if profile:
            assert 0.1 < predicted / f.evidence["forward_ratio"] < 10
            assert math.isclose(f.evidence["predicted_per_layer_factor"], 64 * 1e-4, rel_tol=0.1)
        else:
            assert predicted is None
    df = kv.variance_profile(model, x[:32], y[:32])
    logger = LayerStatsLogger((x[:32], y[:32]), every_n_steps=None)
    doctor = DiagnosisLogger(logger, profile=df, verbose=0)
    fit(keras.models.clone_model(model), [logger, doctor], steps=1)
    (f,) = [f for f in doctor.findings if f.kind == "vanishing"]
    assert f.evidence["predicted_backward_ratio"] is not None  # the full profile has gradients
    json.dumps(f.to_dict(), allow_nan=False)


def test_bench_diagnosis_runs_and_prints_every_ratio(capsys, load_script):
    bench = load_script("benchmarks/bench_diagnosis.py")
    assert bench.main(["--images", "32", "--batch-size", "16", "--epochs", "1", "--rounds", "1",
                       "--depth", "3", "--width", "4"]) == 0
    out = capsys.readouterr().out
    for kind in bench.KINDS:
        line = next(line for line in out.splitlines() if line.startswith(kind + " "))
        assert float(line.split()[-2]) > 0


@bi
def test_a_probe_with_dict_labels_runs_with_the_diagnosis():
    """`LayerStatsLogger` takes any structure of labels with `loss=`; the diagnosis's init
    profile sliced them as an array and ended the fit (TypeError: unhashable type: 'slice')."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)
    inputs = keras.Input((6,))
    trunk = keras.layers.Dense(8, activation="relu", name="trunk")(inputs)
    model = keras.Model(inputs, {"a": keras.layers.Dense(3, name="a")(trunk),
                                 "b": keras.layers.Dense(3, name="b")(trunk)})
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile("sgd", {"a": ce, "b": ce})
    logger = LayerStatsLogger((x[:16], {"a": y[:16], "b": y[:16]}), every_n_steps=None,
                              loss=lambda t, p: ce(t["a"], p["a"]) + ce(t["b"], p["b"]))
    doctor = DiagnosisLogger(logger, verbose=0)
    model.fit(x, {"a": y, "b": y}, batch_size=16, epochs=1, verbose=0,
              callbacks=[logger, doctor])
    assert doctor.engine.view.profile is not None and len(logger.history) == 2 * 3


@bi
def test_a_resumed_logger_measures_the_update_ratio_per_step_at_its_first_log():
    """The update ratio per step (the learning-rate suggestion's measurement) is taken at the
    first logged update. A logger resumed from an interrupted one's state (last log at step 2,
    weights trained to step 3) logs step 4 with the ratio against step 2's weights: the
    diagnosis divides by those 2 steps (it waited for the next log, step 6, before)."""
    x, y = data()
    probe = (x[:32], y[:32])
    model = kv.models.plain_mlp(4, width=32, kernel_initializer="kaiming_normal",
                                activation="relu", input_shape=(4, 4, 3), seed=0)
    first = LayerStatsLogger(probe, every_n_steps=2, log_on_epoch_end=False)
    fit(model, [first], steps=3)                     # logs at steps 0 and 2
    assert first.state.step == 2
    logger = LayerStatsLogger(probe, every_n_steps=2, log_on_epoch_end=False)
    logger.resume(first.state, log_at_start=False)   # step 3 is not a logged step
    doctor = DiagnosisLogger(logger, verbose=0)
    fit(model, [logger, doctor], steps=3)            # steps 4-6: logs at 4 and 6
    assert sorted({r["step"] for r in logger.history}) == [4, 6]
    at_4 = [r["update_ratio"] for r in logger.history
            if r["step"] == 4 and r["update_ratio"] is not None]
    assert len(at_4) >= 4
    assert doctor.engine.view.update_ratio_per_step == pytest.approx(np.median(at_4) / 2)
