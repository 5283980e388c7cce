"""The scenario suite of issue 15: short CPU runs on the synthetic CIFAR-10 stand-in, each
producing its finding within its stated steps with the expected suggestion; applying the
suggestion and re-running removes it; healthy runs produce no finding at all.

Every run goes through `LayerStatsLogger` + `DiagnosisLogger` inside `fit()` (the live path).
"""
import math

import keras
import numpy as np
import pytest

import keras_varinit as kv
from keras_varinit.callbacks import DiagnosisLogger, LayerStatsLogger
from keras_varinit.diagnosis import NORMALIZATION_FIELD, Context


bi = pytest.mark.backend_independent


@pytest.fixture(scope="module")
def data():
    """Synthetic CIFAR-10 (uint8), its per-channel normalized float copy, and a 16x16 copy of
    that (a cheaper input for the small CNNs)."""
    (x, y), _ = kv.datasets.synthetic_cifar10(4096, 0, seed=0)
    stats = kv.channel_stats(x.astype("float32"), estimator="pooled")
    xn = ((x - stats.mean) / stats.std).astype("float32")
    return {"raw": x.astype("float32"), "x": xn, "x16": np.ascontiguousarray(xn[:, ::2, ::2]),
            "y": y}


def run(model, x, y, *, steps, lr=0.01, batch=32, epochs=1, every=None, context=None,
        log_on_epoch_end=True, probe=64):
    """Train `model` for `steps` batches per epoch under the two callbacks; returns
    (findings, logger)."""
    keras.utils.set_random_seed(0)
    model.compile(keras.optimizers.SGD(lr, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logger = LayerStatsLogger((x[:probe], y[:probe]), every_n_steps=every,
                              log_on_epoch_end=log_on_epoch_end)
    doctor = DiagnosisLogger(logger, context=context, verbose=0)
    n = steps * batch
    model.fit(x[:n], y[:n], batch_size=batch, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[logger, doctor])
    return doctor.findings, logger


def of_kind(findings, kind):
    return [f for f in findings if f.kind == kind]


def describe(findings):
    return [(f.kind.value, f.step, f.layers[:2], f.suggestion.changes) for f in findings]


def tanh_mlp(init, **kwargs):
    return kv.models.plain_mlp(12, width=128, kernel_initializer=init, activation="tanh",
                               input_shape=(16, 16, 3), seed=0, **kwargs)


# -- 30-layer ReLU CNN, Xavier: vanishing at step 0; Kaiming removes it ------------------------

@pytest.mark.slow
def test_xavier_relu_30_vanishes_and_kaiming_removes_it(data):
    x, y = data["x"], data["y"]
    findings, _ = run(kv.models.plain_cnn(30, kernel_initializer="xavier_normal", seed=0), x, y,
                      steps=1, log_on_epoch_end=False, probe=16)
    (f,) = of_kind(findings, "vanishing")
    assert f.step == 0 and f.severity == "severe"
    assert f.layers[0] == "conv_01" and "conv_29" in f.layers
    assert f.evidence["forward_ratio"] < 1e-6 and f.evidence["backward_ratio"] < 1e-6
    # the theory: Xavier under ReLU halves the variance per layer
    assert 0.4 < f.evidence["predicted_per_layer_factor"] < 0.6
    assert f.evidence["predicted_forward_ratio"] < 1e-6
    assert f.suggestion.changes == {"init": "kaiming_normal"}
    assert findings == [f], describe(findings)

    fixed, _ = run(kv.models.plain_cnn(30, kernel_initializer=f.suggestion.changes["init"],
                                       seed=0), x, y, steps=1, log_on_epoch_end=False, probe=16)
    assert fixed == [], describe(fixed)


# -- 12-layer tanh MLP: N(0, 1) saturates, N(0, 0.01^2) vanishes; Xavier with the tanh gain -----

@bi
def test_tanh_normal_1_saturates(data):
    findings, _ = run(tanh_mlp("normal:1.0"), data["x16"], data["y"], steps=5)
    (f,) = of_kind(findings, "saturation")
    assert f.step == 0 and f.severity == "severe"
    assert len(f.layers) == 11 and f.evidence["max_saturated_fraction"] > 0.9
    assert f.evidence["predicted_saturated_fraction"] > 0.8
    assert f.suggestion.changes == {"init": "xavier_normal_tanh"}
    # the same cause also makes the gradient explode towards the input; same fix
    assert {g.kind.value for g in findings} <= {"saturation", "exploding"}
    assert all(g.step == 0 and g.suggestion.changes == f.suggestion.changes for g in findings)


def test_tanh_tiny_weights_vanish_and_stall(data):
    findings, _ = run(tanh_mlp("normal:0.01"), data["x16"], data["y"], steps=120)
    vanishing, stalled = of_kind(findings, "vanishing"), of_kind(findings, "stalled_loss")
    assert len(vanishing) == 1 and vanishing[0].step == 0
    assert vanishing[0].evidence["forward_ratio"] < 1e-12
    assert vanishing[0].suggestion.changes == {"init": "xavier_normal_tanh"}
    assert len(stalled) == 1 and stalled[0].step <= 110
    assert stalled[0].evidence["cause"] == "vanishing"
    assert stalled[0].suggestion.changes == vanishing[0].suggestion.changes
    assert [g.kind.value for g in findings] == ["vanishing", "stalled_loss"]


def test_xavier_with_the_tanh_gain_removes_both(data):
    """The suggestion of the two tanh scenarios, applied: 2 epochs of 60 steps, no finding."""
    init = kv.initializers.get("xavier_normal_tanh", seed=0)
    assert init.gain == pytest.approx(kv.gain("tanh"))
    findings, _ = run(tanh_mlp(init), data["x16"], data["y"], steps=60, epochs=2)
    assert findings == [], describe(findings)


# -- learning rate 10: divergence at the first non-finite layer -------------------------------

def relu_mlp():
    return kv.models.plain_mlp(6, width=128, kernel_initializer="kaiming_normal",
                               activation="relu", input_shape=(16, 16, 3), seed=0)


@bi
def test_learning_rate_10_diverges_and_the_suggested_rate_does_not(data):
    x, y = data["x16"], data["y"]
    findings, logger = run(relu_mlp(), x, y, steps=3, lr=10.0, every=1)
    (f,) = of_kind(findings, "divergence")
    assert f.severity == "severe" and f.step <= 3
    layer = f.evidence["first_nonfinite_layer"]
    assert f.layers == (layer,)
    # the named layer is the first one, in model order, whose logged statistics are not finite
    at = [r for r in logger.history if r["step"] == f.evidence["first_nonfinite_record_step"]]
    bad = [r["layer"] for r in sorted(at, key=lambda r: r["layer_index"])
           if not all(math.isfinite(r[k]) for k in ("activation_mean", "activation_std"))]
    assert bad and bad[0] == layer
    lr = f.suggestion.changes["lr"]
    assert lr <= 1e-2    # sized by the measured update ratio, not just 10x
    assert findings.index(f) == len(findings) - 1  # nothing after the divergence

    fixed, _ = run(relu_mlp(), x, y, steps=60, lr=lr)
    assert fixed == [], describe(fixed)


# -- inputs in [0, 255]: unnormalized input; per-channel normalization removes it --------------

def small_cnn(**kwargs):
    return kv.models.plain_cnn(6, width=8, input_shape=(16, 16, 3), seed=0, **kwargs)


def test_raw_pixels_are_unnormalized_input(data):
    raw = np.ascontiguousarray(data["raw"][:, ::2, ::2])
    findings, _ = run(small_cnn(), raw, data["y"], steps=20)
    f = of_kind(findings, "unnormalized_input")[0]
    assert f.step == 0 and f.layers == ("conv_01",) and f.severity == "severe"
    assert f.evidence["input_second_moment"] > 1e4
    assert f.suggestion.changes == {"input_normalization": "pooled"}
    # a later divergence, if any, is put down to the same cause
    assert all(g.suggestion.changes == f.suggestion.changes for g in findings), describe(findings)

    stats = kv.channel_stats(raw, estimator="pooled")
    normalized = ((raw - stats.mean) / stats.std).astype("float32")
    fixed, _ = run(small_cnn(), normalized, data["y"], steps=20)
    assert fixed == [], describe(fixed)


# -- batch norm at batch 2: small batch; group normalization removes it ------------------------

def test_batch_norm_at_batch_2_and_group_norm(data):
    x, y = data["x16"], data["y"]
    findings, _ = run(small_cnn(normalization="batch"), x, y, steps=20, batch=2,
                      context=Context(batch_size=2))
    (f,) = of_kind(findings, "small_batch_norm")
    assert f.step == 0 and f.severity == "severe"
    assert f.layers == tuple(f"bn_{i:02d}" for i in range(1, 6))
    assert f.suggestion.changes == {NORMALIZATION_FIELD: "group"}

    # the suggestion applied to the model builder's own `normalization=` (groups dividing 8)
    fixed, _ = run(small_cnn(groups=4, **f.suggestion.changes), x, y, steps=20, batch=2,
                   context=Context(batch_size=2))
    assert fixed == [], describe(fixed)


# -- healthy runs: no finding at all -----------------------------------------------------------

def test_healthy_kaiming_relu_cnn(data):
    findings, _ = run(small_cnn(kernel_initializer="kaiming_normal"), data["x16"], data["y"],
                      steps=60, epochs=2)
    assert findings == [], describe(findings)


def test_healthy_xavier_tanh_mlp(data):
    findings, _ = run(tanh_mlp("xavier_normal"), data["x16"], data["y"], steps=60, epochs=2)
    assert findings == [], describe(findings)


def test_healthy_batch_norm_at_batch_64(data):
    findings, _ = run(small_cnn(normalization="batch"), data["x16"], data["y"], steps=60,
                      epochs=2, batch=64, context=Context(batch_size=64))
    assert findings == [], describe(findings)
