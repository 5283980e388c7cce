"""Tests for keras_varinit.callbacks.LayerStatsLogger (record contract in CONTRIBUTING.md)."""
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

from keras_varinit.callbacks import LayerStatsLogger
from keras_varinit.run_files import LAYER_STATS_FIELDS

bi = pytest.mark.backend_independent
REPO = pathlib.Path(__file__).resolve().parents[1]


# -- helpers -----------------------------------------------------------------------------------

def _mlp(activation="relu", init=None, width=16, n_in=8, n_out=3, seed=0, sequential=True):
    init = init or keras.initializers.GlorotNormal(seed=seed)
    layers = [
        keras.layers.Dense(width, kernel_initializer=init, name="d1"),
        keras.layers.Activation(activation, name="a1"),
        keras.layers.Dense(width, activation=activation, kernel_initializer=init, name="d2"),
        keras.layers.Dense(n_out, kernel_initializer=init, name="logits"),
    ]
    if sequential:
        return keras.Sequential([keras.Input((n_in,))] + layers, name="seq")
    inp = keras.Input((n_in,))
    h = inp
    for layer in layers:
        h = layer(h)
    return keras.Model(inp, h, name="func")


def _data(n=64, n_in=8, n_out=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)).astype("float32"), rng.integers(0, n_out, n)


def _probe_now(model, probe, **kw):
    """Run the logger once on the current weights, outside fit (step 0 record)."""
    cb = LayerStatsLogger(probe, **kw)
    cb.set_model(model)
    cb.on_train_begin()
    return cb


def _rec(cb, layer, step=None):
    rows = [r for r in cb.history if r["layer"] == layer and (step is None or r["step"] == step)]
    assert rows, (layer, step)
    return rows[-1]


def _sub_outputs(model, x, names):
    graph = model._functional if isinstance(model, keras.Sequential) else model
    sub = keras.Model(graph.inputs[0], [model.get_layer(n).output for n in names])
    outs = sub(x, training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return [np.asarray(o) for o in outs]


# -- schedule and record format ----------------------------------------------------------------

@bi
def test_records_at_step_zero_every_n_steps_and_epoch_end(tmp_path):
    x, y = _data(64)
    model = _mlp()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = LayerStatsLogger((x[:32], y[:32]), every_n_steps=3)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)  # 4 steps/epoch
    steps = sorted({r["step"] for r in cb.history})
    assert steps == [0, 3, 4, 6, 8]
    assert {(r["step"], r["epoch"]) for r in cb.history} == {(0, 0), (3, 0), (4, 0), (6, 1),
                                                             (8, 1)}
    assert [r["layer"] for r in cb.history if r["step"] == 0] == ["d1", "a1", "d2", "logits"]
    assert [r["layer_index"] for r in cb.history if r["step"] == 0] == [0, 1, 2, 3]
    assert _rec(cb, "a1", 0)["layer_type"] == "Activation"
    for r in cb.history:
        assert tuple(r) == LAYER_STATS_FIELDS
    df = cb.to_dataframe()
    assert list(df.columns) == list(LAYER_STATS_FIELDS)
    assert len(df) == 5 * 4
    # update ratio: null at the first log, > 0 once training moved the weights; null for
    # layers without weights.
    assert all(r["update_ratio"] is None for r in cb.history if r["step"] == 0)
    assert all(r["update_ratio"] > 0 for r in cb.history
               if r["step"] > 0 and r["layer"] != "a1")
    assert all(r["update_ratio"] is None and r["weight_std"] is None
               for r in cb.history if r["layer"] == "a1")
    assert df["update_ratio"].isna().sum() == 4 + 4  # step 0 (4 layers) + a1 at 4 later logs
    assert cb.loss_source == "compiled"
    # no batch-end hook: Keras keeps dispatching batch-end callbacks asynchronously
    assert LayerStatsLogger.on_train_batch_end is keras.callbacks.Callback.on_train_batch_end


@bi
def test_every_n_steps_none_logs_only_begin_and_epoch_ends():
    x, y = _data(64)
    model = _mlp()
    model.compile("sgd", "sparse_categorical_crossentropy")
    cb = LayerStatsLogger((x[:16], y[:16]), every_n_steps=None)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    assert sorted({r["step"] for r in cb.history}) == [0, 4, 8]


# -- values against independent computations ---------------------------------------------------

@bi
@pytest.mark.parametrize("sequential", [True, False])
def test_activation_stats_match_a_direct_forward_pass(sequential):
    x, y = _data(128)
    model = _mlp(sequential=sequential)
    cb = _probe_now(model, (x, y))
    names = ["d1", "a1", "d2", "logits"]
    for name, a in zip(names, _sub_outputs(model, x, names)):
        r = _rec(cb, name, 0)
        np.testing.assert_allclose(r["activation_mean"], a.mean(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r["activation_std"], a.std(), rtol=1e-4)
        np.testing.assert_allclose(r["zero_fraction"], np.mean(a == 0), atol=1e-7)
    # the ReLU layer kills about half its inputs; the Dense before it none
    assert 0.3 < _rec(cb, "a1")["zero_fraction"] < 0.7
    assert _rec(cb, "d1")["zero_fraction"] == 0.0
    w = np.asarray(model.get_layer("d2").kernel)
    np.testing.assert_allclose(_rec(cb, "d2")["weight_std"], w.std(), rtol=1e-5)


@bi
def test_gradient_stats_match_a_manual_backward_pass():
    """Tiny tanh net, cross-entropy from logits; dL/da and dL/dW by hand in numpy."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.integers(0, 3, 32)
    inp = keras.Input((5,))
    h = keras.layers.Dense(4, activation="tanh", bias_initializer="glorot_uniform", name="h")(inp)
    out = keras.layers.Dense(3, bias_initializer="glorot_uniform", name="out")(h)
    model = keras.Model(inp, out)
    cb = _probe_now(model, (x, y))
    assert cb.loss_source == "cross_entropy"  # not compiled: sparse CE from logits

    w1, b1 = (np.asarray(v, dtype=np.float64) for v in model.get_layer("h").weights)
    w2, b2 = (np.asarray(v, dtype=np.float64) for v in model.get_layer("out").weights)
    a1 = np.tanh(x @ w1 + b1)
    logits = a1 @ w2 + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d_logits = (p - np.eye(3)[y]) / len(x)
    d_a1 = d_logits @ w2.T
    d_w2 = a1.T @ d_logits
    d_w1 = x.T @ (d_a1 * (1 - a1 ** 2))

    h_rec, o_rec = _rec(cb, "h"), _rec(cb, "out")
    np.testing.assert_allclose(o_rec["activation_grad_std"], d_logits.std(), rtol=1e-4)
    np.testing.assert_allclose(h_rec["activation_grad_std"], d_a1.std(), rtol=1e-4)
    np.testing.assert_allclose(o_rec["weight_grad_std"], d_w2.std(), rtol=1e-4)
    np.testing.assert_allclose(h_rec["weight_grad_std"], d_w1.std(), rtol=1e-4)
    np.testing.assert_allclose(h_rec["activation_std"], a1.std(), rtol=1e-4)


@bi
def test_compiled_loss_is_used_and_bad_compiled_loss_falls_back():
    x, y = _data(32)
    model = _mlp()
    # compiled MSE on one-hot targets: dL/dlogits = 2 (z - t) / (N * C)
    y1h = np.eye(3, dtype="float32")[y]
    model.compile("sgd", "mean_squared_error")
    cb = _probe_now(model, (x, y1h))
    assert cb.loss_source == "compiled"
    z = _sub_outputs(model, x, ["logits"])[0].astype(np.float64)
    np.testing.assert_allclose(_rec(cb, "logits")["activation_grad_std"],
                               (2 * (z - y1h) / z.size).std(), rtol=1e-4)

    def bad_loss(y_true, y_pred):
        raise TypeError("not for this probe")

    model.compile("sgd", bad_loss)
    with pytest.warns(UserWarning, match="compiled loss"):
        cb = _probe_now(model, (x, y))
    assert cb.loss_source == "cross_entropy"
    assert len(cb.history) == 4


def _two_headed(name="two_heads"):
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="trunk")(inp)
    return keras.Model(inp, [keras.layers.Dense(3, name="head_a")(h),
                             keras.layers.Dense(3, name="head_b")(h)], name=name)


@bi
def test_a_multi_output_model_needs_loss_and_the_loss_sees_every_output():
    x, y = _data(32)
    model = _two_headed()
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile("sgd", [ce, ce])
    # the compiled list loss is not used; the default cross-entropy refuses two outputs at
    # train begin instead of failing at every log
    with pytest.raises(ValueError, match=r"one output.*2 outputs.*`loss=`"):
        model.fit(x, [y, y], epochs=1, batch_size=16, verbose=0,
                  callbacks=[LayerStatsLogger((x, y))])

    # loss on head_a only: no gradient reaches head_b's output
    cb = _probe_now(model, (x, [y, y]), loss=lambda t, p: ce(t[0], p[0]))
    assert cb.loss_source == "argument"
    assert _rec(cb, "head_a")["activation_grad_std"] > 0
    assert _rec(cb, "head_b")["activation_grad_std"] == 0
    assert _rec(cb, "head_b")["weight_grad_std"] == 0
    # both heads: head_b's gradient equals (softmax - one-hot) / N on its logits
    cb = _probe_now(model, (x, [y, y]), loss=lambda t, p: ce(t[0], p[0]) + ce(t[1], p[1]))
    z = _sub_outputs(model, x, ["head_b"])[0].astype(np.float64)
    prob = np.exp(z - z.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    np.testing.assert_allclose(_rec(cb, "head_b")["activation_grad_std"],
                               ((prob - np.eye(3)[y]) / len(x)).std(), rtol=1e-4)
    with pytest.raises(ValueError, match=r"same number of samples.*\[32\].*\[32, 16\]"):
        LayerStatsLogger((x, [y, y[:16]]))


@bi
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_saturated_fraction_large_vs_small_weights(activation):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)).astype("float32")
    y = rng.integers(0, 10, 256)

    def net(std):
        init = keras.initializers.RandomNormal(stddev=std, seed=0)
        layers = [keras.Input((64,))]
        for i in range(4):
            layers.append(keras.layers.Dense(64, activation=activation, kernel_initializer=init,
                                             name=f"h{i}"))
        layers.append(keras.layers.Dense(10, kernel_initializer=init, name="logits"))
        return keras.Sequential(layers)

    big = _probe_now(net(1.0), (x, y))       # pre-activation std ~ 8: saturates
    small = _probe_now(net(0.001), (x, y))   # pre-activation std ~ 0.008: linear regime
    for i in range(4):
        assert _rec(big, f"h{i}")["saturated_fraction"] > 0.5
        if activation == "tanh":
            assert _rec(small, f"h{i}")["saturated_fraction"] < 0.01
    if activation == "sigmoid":  # small weights keep sigmoid at 0.5: inside [0.03, 0.97]
        assert _rec(small, "h0")["saturated_fraction"] < 0.01
    # the logits layer has no saturating activation
    assert _rec(big, "logits")["saturated_fraction"] == 0.0
    # check the tanh figure against numpy on the first layer
    a = _sub_outputs(big.model, x, ["h0"])[0]
    expected = (np.mean(np.abs(a) > 0.97) if activation == "tanh"
                else np.mean((a < 0.03) | (a > 0.97)))
    np.testing.assert_allclose(_rec(big, "h0")["saturated_fraction"], expected, atol=1e-6)


# -- divergence ----------------------------------------------------------------------------------

@bi
def test_nan_counts_are_exact_and_the_counting_pass_runs_only_when_needed():
    """The NaN/Inf counts of a pass with one NaN kernel entry are exact integers (the entry
    itself, and every activation and gradient entry it reaches), and the counting recorder
    is built only when a statistic is not finite."""
    from keras_varinit import instrument
    from keras_varinit.probe import LayerProbe

    x, y = _data(16)
    model = _mlp()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    probe = LayerProbe(model, [s for s in instrument.layer_sites(model)
                               if s.path in ("d1", "logits")], loss, eager_calls=None)
    healthy = probe(x, y)
    assert probe._counting_recorder is None
    assert [r.stats["nan_count"] for r in healthy.records] == [0.0, 0.0]
    kernel = model.get_layer("logits").kernel
    bad = np.asarray(kernel).copy()
    bad[0, 1] = np.nan   # one entry of the last kernel: only logit 1 and its gradients
    kernel.assign(bad)
    counted = {r.name: r.stats for r in probe(x, y).records}
    assert probe._counting_recorder is not None
    # logits: the NaN entry, the 16 samples' logit 1 (activation) and the loss's gradient at
    # every logit of every sample (softmax couples them): 1 + 16 + 16 * 3, and dL/dW all NaN
    # (16 * 3 entries)
    assert counted["logits"]["nan_count"] == 1 + 16 + 16 * 3 + 16 * 3
    assert counted["logits"]["inf_count"] == 0


@bi
def test_nan_weights_are_logged_with_counts_not_raised(tmp_path):
    x, y = _data(64)
    model = _mlp()
    model.compile(keras.optimizers.SGD(1e30), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    k = model.get_layer("d2").kernel
    bad = np.asarray(k).copy()
    bad[0, 0] = np.nan
    k.assign(bad)
    path = tmp_path / "stats.jsonl"
    cb = LayerStatsLogger((x[:16], y[:16]), every_n_steps=2, jsonl_path=path,
                          log_dir=tmp_path / "tb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the probe itself must not fail
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    first = {r["layer"]: r for r in cb.history if r["step"] == 0}
    # upstream of the NaN weight the forward pass is clean; the NaN kernel itself is counted
    assert math.isfinite(first["d1"]["activation_std"])
    assert first["d1"]["inf_count"] == 0
    assert first["d2"]["nan_count"] >= 1
    # after a step with lr 1e30 and NaN gradients every kernel is NaN: logged, not raised
    last = {r["layer"]: r for r in cb.history if r["step"] == 4}
    for name in ("d1", "d2", "logits"):
        assert last[name]["nan_count"] >= last_kernel_size(model, name)
        assert math.isnan(last[name]["weight_std"])
    assert math.isnan(last["logits"]["activation_std"])
    assert sorted({r["step"] for r in cb.history}) == [0, 2, 4]
    for line in path.read_text().splitlines():
        rec = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSONL"))
        assert rec["nan_count"] is not None
    assert json.loads(path.read_text().splitlines()[-1])["activation_std"] is None


def last_kernel_size(model, name):
    return int(np.prod(model.get_layer(name).kernel.shape))


# -- filters and errors --------------------------------------------------------------------------

@bi
def test_layers_and_exclude_filters_by_name_and_type():
    x, y = _data(16)
    model = _mlp()
    names = lambda cb: [r["layer"] for r in cb.history]
    assert names(_probe_now(model, (x, y), layers=["d2"])) == ["d2"]
    assert names(_probe_now(model, (x, y), layers=[keras.layers.Activation])) == ["a1"]
    assert names(_probe_now(model, (x, y), layers="Dense")) == ["d1", "d2", "logits"]
    assert names(_probe_now(model, (x, y), exclude=["logits", "Activation"])) == ["d1", "d2"]
    assert names(_probe_now(model, (x, y), layers=["Dense", "a1"], exclude=keras.layers.Dense)) \
        == ["a1"]


@bi
def test_bad_arguments_raise_clear_errors():
    x, y = _data(16)
    model = _mlp()
    with pytest.raises(ValueError, match="matches no layer"):
        _probe_now(model, (x, y), layers=["nope"])
    with pytest.raises(ValueError, match="tracks no layer"):
        _probe_now(model, (x, y), exclude=["Dense", "Activation"])
    with pytest.raises(ValueError, match="layer names, layer classes"):
        LayerStatsLogger((x, y), layers=[3])
    with pytest.raises(ValueError, match="every_n_steps"):
        LayerStatsLogger((x, y), every_n_steps=0)
    with pytest.raises(ValueError, match="pair"):
        LayerStatsLogger(x)
    with pytest.raises(ValueError, match="same number"):
        LayerStatsLogger((x, y[:3]))
    with pytest.raises(ValueError, match=r"`loss` must be a Keras loss name.*Received: "
                                         r"loss='nope'"):
        LayerStatsLogger((x, y), loss="nope")
    # an empty or non-numeric probe was accepted, then logged NaN or failed inside fit
    with pytest.raises(ValueError, match=r"non-empty batch. Received: x with shape \(0, 8\)"):
        LayerStatsLogger((x[:0], y[:0]))
    with pytest.raises(ValueError, match="numeric batch"):
        LayerStatsLogger((x.astype(str), y))
    with pytest.raises(ValueError, match=r"batch axis.*y with \[None\]"):
        LayerStatsLogger((x, 3))


def test_a_one_entry_compiled_loss_list_is_the_compiled_loss():
    """`compile(loss=["mse"])` on a regression model fell back to cross-entropy, which
    crashed the fit on TF and logged zero gradients on JAX."""
    x, _ = _data(32)
    y = np.random.default_rng(3).normal(size=(32, 3)).astype("float32")
    model = _mlp()
    model.compile("sgd", ["mean_squared_error"])
    cb = _probe_now(model, (x, y))
    assert cb.loss_source == "compiled"
    assert all(r["activation_grad_std"] > 0 for r in cb.history)


def test_an_unbuilt_subclassed_model_is_built_from_the_probe():
    """On TF, fit builds a subclassed model only in its first step, after train begin: the
    logger found no layer with a kernel and said it tracks none."""

    class Tiny(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden, self.head = keras.layers.Dense(8), keras.layers.Dense(3)

        def call(self, t):
            return self.head(self.hidden(t))

    x, y = _data(32)
    for built_with_build in (False, True):    # model.build(shape) leaves the Dense unbuilt
        model = Tiny()
        if built_with_build:
            model.build((None, 8))
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        cb = LayerStatsLogger((x[:8], y[:8]), every_n_steps=2)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
        assert len({r["layer"] for r in cb.history}) == 2, built_with_build


@bi
def test_subclassed_model_with_a_nested_block_and_a_shared_layer():
    """Paths for nested layers, one record per call of a shared layer (#1, #2), and the
    activation std of each call against a direct computation."""
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.block = keras.Sequential([keras.layers.Dense(8, activation="tanh", name="d")],
                                          name="block")
            self.shared = keras.layers.Dense(8, activation="relu", name="shared")
            self.out = keras.layers.Dense(3, name="out")

        def call(self, x):
            return self.out(self.shared(self.shared(self.block(x))))

    x, y = _data(32)
    model = Net()
    model(x)
    cb = _probe_now(model, (x, y))
    assert [r["layer"] for r in cb.history] == ["block/d", "shared#1", "shared#2", "out"]
    h = np.tanh(x @ np.asarray(model.block.layers[0].kernel))
    w = np.asarray(model.shared.kernel)
    a1 = np.maximum(h @ w, 0)
    a2 = np.maximum(a1 @ w, 0)
    np.testing.assert_allclose(_rec(cb, "shared#1")["activation_std"], a1.std(), rtol=1e-4)
    np.testing.assert_allclose(_rec(cb, "shared#2")["activation_std"], a2.std(), rtol=1e-4)
    assert _rec(cb, "shared#1")["weight_std"] == _rec(cb, "shared#2")["weight_std"]
    assert [r["layer"] for r in _probe_now(model, (x, y), layers=["block/d"]).history] == \
        ["block/d"]


@bi
def test_a_probe_that_does_not_fit_the_model_is_named_as_such_not_blamed_on_the_loss():
    model = _mlp()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no "the compiled loss does not accept" warning
        with pytest.raises(ValueError, match=r"LayerStatsLogger's probe x does not fit model "
                                             r".*Received: x of shape \(8, 5\)"):
            _probe_now(model, (x[:, :5], y))


@bi
def test_nan_in_probe_batch_is_refused_with_the_count():
    x, y = _data(16)
    x[0, :3] = np.nan
    x[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"LayerStatsLogger's probe needs a finite batch. "
                                         r"Received: x with 4 non-finite value\(s\) "
                                         r"\(3 NaN, 1 Inf\)"):
        LayerStatsLogger((x, y))


@bi
def test_layers_inside_an_rnn_are_refused_or_left_out_with_a_warning():
    x = np.random.default_rng(0).normal(size=(8, 5, 4)).astype("float32")
    y = np.arange(8) % 3
    model = keras.Sequential([keras.Input((5, 4)), keras.layers.SimpleRNN(6, name="rnn"),
                              keras.layers.Dense(3, name="out")])
    with pytest.warns(UserWarning, match=r"LayerStatsLogger leaves out \['rnn/simple_rnn_cell"):
        cb = _probe_now(model, (x, y))
    assert [r["layer"] for r in cb.history] == ["out"]
    assert [r["layer"] for r in _probe_now(model, (x, y), layers=["rnn"]).history] == ["rnn"]
    with pytest.raises(ValueError, match="inside a recurrent layer's loop"):
        _probe_now(model, (x, y), layers=["SimpleRNNCell"])


@bi
def test_functional_model_with_branches():
    x, y = _data(64)
    inp = keras.Input((8,))
    a = keras.layers.Dense(8, activation="relu", name="a")(inp)
    b = keras.layers.Dense(8, name="b")(inp)
    s = keras.layers.Add(name="add")([a, b])
    t = keras.layers.Activation("tanh", name="t")(s)
    out = keras.layers.Dense(3, name="out")(t)
    model = keras.Model(inp, out)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = LayerStatsLogger((x, y), every_n_steps=2)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert [r["layer"] for r in cb.history if r["step"] == 0] == ["a", "b", "t", "out"]
    last = max(r["step"] for r in cb.history)
    for name, act in zip(["a", "t"], _sub_outputs(model, x, ["a", "t"])):
        np.testing.assert_allclose(_rec(cb, name, last)["activation_std"], act.std(), rtol=1e-4)


@bi
def test_records_say_which_paths_the_profile_compares(gated_residual):
    """The records' `follows_previous` (the logger does not record the pooling, the multiply
    or the add) splits the weight layers into the stretches the profile compares within."""
    import pandas as pd

    from keras_varinit import diagnostics, profile_report
    from keras_varinit.diagnosis import rules

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6, 6, 3)).astype("float32"), np.arange(16) % 4
    cb = _probe_now(gated_residual, (x, y))
    table = rules.weight_table_from_records(pd.DataFrame(cb.history))
    profile = diagnostics.variance_profile(gated_residual, x, y)
    assert list(table["layer"]) == list(profile["layer"])
    assert list(table["segment"]) == list(profile_report.stretch_ids(profile)) == \
        [0, 1, 1, 1, 1, 2, 3, 3]


# -- sinks ---------------------------------------------------------------------------------------

@bi
def test_jsonl_file_is_tailable_with_contract_fields(tmp_path):
    x, y = _data(64)
    model = _mlp()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = tmp_path / "sub" / "layer_stats.jsonl"
    seen = []

    class Tail(keras.callbacks.Callback):  # another reader, during training
        def on_train_batch_end(self, batch, logs=None):
            seen.append(len(path.read_text().splitlines()) if path.exists() else 0)

    cb = LayerStatsLogger((x[:16], y[:16]), every_n_steps=2, jsonl_path=path)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb, Tail()], verbose=0)
    # flushed after every log, before training goes on: the step-2 log is written before
    # step 3 runs (the logger logs at batch begin, so Keras keeps batch-end callbacks async)
    assert seen == [4, 4, 8, 8]
    text = path.read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == len(cb.history) == 3 * 4
    for line, rec in zip(lines, cb.history):
        parsed = json.loads(line)
        assert tuple(parsed) == LAYER_STATS_FIELDS
        assert parsed["step"] == rec["step"] and parsed["layer"] == rec["layer"]
    assert json.loads(lines[0])["update_ratio"] is None


@bi
def test_tensorboard_scalars_grouped_per_statistic(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    x, y = _data(64)
    model = _mlp()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = LayerStatsLogger((x[:16], y[:16]), log_dir=tmp_path / "tb", every_n_steps=2,
                          histograms=True)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    for layer in ("d1", "a1", "d2", "logits"):
        assert f"layer_stats/activation_std/{layer}" in tags
        assert f"layer_stats/activation_grad_std/{layer}" in tags
        assert f"layer_hist/activation/{layer}" in tags
    assert "layer_stats/weight_std/a1" not in tags  # no weights, nothing written
    events = acc.Tensors("layer_stats/activation_std/d1")
    assert [e.step for e in events] == [0, 2, 4]
    np.testing.assert_allclose(
        float(tensor_util.make_ndarray(events[0].tensor_proto)),
        _rec(cb, "d1", 0)["activation_std"], rtol=1e-6)


# -- distribution --------------------------------------------------------------------------------

MIRRORED_SCRIPT = textwrap.dedent('''
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    from keras_varinit.callbacks import LayerStatsLogger
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8, 8, 3)).astype("float32"); y = rng.integers(0, 4, 128)
    with strategy.scope():
        m = keras.Sequential([keras.Input((8, 8, 3)),
                              keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
                              keras.layers.Flatten(), keras.layers.Dense(4, name="out")])
        m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = LayerStatsLogger((x[:32], y[:32]), every_n_steps=2, log_dir=sys.argv[1],
                          jsonl_path=sys.argv[2])
    m.fit(x, y, batch_size=32, epochs=1, callbacks=[cb], verbose=0)
    sub = keras.Model(m.inputs, m.get_layer("c1").output)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "history": cb.history,
                      "c1_std": float(np.std(np.asarray(sub(x[:32]))))}))
''')


def test_mirrored_strategy_two_logical_cpus(tmp_path, backend):
    if backend != "tensorflow":
        pytest.skip("tf.distribute.MirroredStrategy is TensorFlow only")
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "tb"),
                           str(tmp_path / "s.jsonl")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    hist = out["history"]
    assert sorted({r["step"] for r in hist}) == [0, 2, 4]
    last = [r for r in hist if r["step"] == 4]
    assert all(r["weight_grad_std"] > 0 and r["update_ratio"] > 0 for r in last)
    c1 = [r for r in last if r["layer"] == "c1"][0]
    np.testing.assert_allclose(c1["activation_std"], out["c1_std"], rtol=1e-4)
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == len(hist)
    assert list((tmp_path / "tb").iterdir())


def test_a_fit_that_plans_enough_logs_compiles_the_probe_from_its_first_log():
    """Tracing the probe pays for itself after about COMPILE_AFTER logs: a fit that plans
    that many logs compiles at once, a shorter one stays eager, and both log the same values."""
    from keras_varinit.probe import COMPILE_AFTER, eager_calls_for

    assert eager_calls_for(None) == eager_calls_for(COMPILE_AFTER - 1) == COMPILE_AFTER
    assert eager_calls_for(COMPILE_AFTER) == 0
    x, y = _data(64)
    epochs = COMPILE_AFTER - 2
    runs = {}
    for every in (None, 1):   # epochs of 4 steps: 1 + epochs logs, then 1 + 4 * epochs
        model = _mlp()
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        runs[every] = LayerStatsLogger((x[:32], y[:32]), every_n_steps=every)
        model.fit(x, y, batch_size=16, epochs=epochs, callbacks=[runs[every]], verbose=0)
    assert len({r["step"] for r in runs[None].history}) == 1 + epochs == COMPILE_AFTER - 1
    assert runs[None]._probe.recorder.eager_calls == COMPILE_AFTER
    assert len({r["step"] for r in runs[1].history}) == 1 + 4 * epochs >= COMPILE_AFTER
    assert runs[1]._probe.recorder.eager_calls == 0
    eager, compiled = ([r for r in runs[k].history if r["step"] == 0] for k in (None, 1))
    for a, b in zip(eager, compiled):
        for field in ("activation_std", "activation_grad_std", "weight_grad_std"):
            if a[field] is not None:
                np.testing.assert_allclose(b[field], a[field], rtol=1e-5)
