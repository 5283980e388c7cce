"""keras_varinit.instrument: recorded activations and dL/da equal an explicit oracle on every
kind of model, and the model is left exactly as it was.

The oracle of each model is an explicit Functional model built from the same layer objects
(hence the same weights): it takes the input and one extra input e_l per recorded call, adds
e_l to that call's output, and outputs the logits and every recorded tensor; dL/da_l is the
gradient of the loss with respect to e_l at e_l = 0, by `tf.GradientTape` or `jax.grad`.
"""
import pathlib
import re
import warnings

import keras
import numpy as np
import pytest

from keras_varinit import instrument, propagation

pytestmark = pytest.mark.backend_independent

REPO = pathlib.Path(__file__).resolve().parents[1]
N_IN, N_OUT, BATCH = 6, 4, 16


def _data(shape=(N_IN,)):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(BATCH,) + shape).astype("float32"),
            (np.arange(BATCH) % N_OUT).astype("int32"))


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _raw(view):
    return {"a": view.output, "g": view.output_grad}


def _record(model, sites, x, y, **kwargs):
    recorder = instrument.Recorder(model, sites, _raw, loss=_loss(), **kwargs)
    return recorder(x, y)


def _oracle(build, x, y, n_taps):
    """(activations, gradients) of the taps of `build(inputs, tap)` by explicit autodiff."""
    taps, eps_inputs = [], []
    inputs = keras.Input(x.shape[1:])

    def tap(tensor):
        e = keras.Input(tensor.shape[1:])
        eps_inputs.append(e)
        tapped = keras.layers.Add(name=f"oracle_tap_{len(taps)}")([tensor, e])
        taps.append(tapped)
        return tapped

    logits = build(inputs, tap)
    assert len(taps) == n_taps
    oracle = keras.Model([inputs] + eps_inputs, [logits] + taps)
    eps = [np.zeros((BATCH,) + tuple(t.shape[1:]), "float32") for t in taps]

    def loss_of(eps_values):
        outs = oracle([keras.ops.convert_to_tensor(x)] + list(eps_values))
        return _loss()(y, outs[0]), outs[1:]

    if keras.backend.backend() == "jax":
        import jax

        grads, acts = jax.grad(loss_of, has_aux=True)(eps)
    else:
        import tensorflow as tf

        eps_t = [tf.constant(e) for e in eps]
        with tf.GradientTape() as tape:
            tape.watch(eps_t)
            loss, acts = loss_of(eps_t)
        grads = tape.gradient(loss, eps_t)
    return ([keras.ops.convert_to_numpy(a) for a in acts],
            [keras.ops.convert_to_numpy(g) for g in grads])


def _assert_matches(recording, oracle, names):
    acts, grads = oracle
    assert [r.name for r in recording.records] == names
    for record, a, g in zip(recording.records, acts, grads):
        np.testing.assert_allclose(record.stats["a"], a, rtol=1e-5, atol=1e-7,
                                   err_msg=record.name)
        np.testing.assert_allclose(record.stats["g"], g, rtol=1e-5, atol=1e-9,
                                   err_msg=record.name)
        assert np.abs(g).max() > 0, record.name  # a real gradient, not zeros everywhere


def _twin(layer):
    """A copy of `layer` with the same weights under another name."""
    twin = type(layer).from_config({**layer.get_config(), "name": layer.name + "_twin"})
    twin.build(layer.get_build_config()["input_shape"])
    twin.set_weights(layer.get_weights())
    return twin


def _leaves(model):
    return [s for s in instrument.layer_sites(model) if s.is_leaf]


# ----------------------------------------------------------------------------- oracles

def test_sequential_matches_oracle():
    layers = [keras.layers.Dense(8, name="d1"), keras.layers.Activation("tanh", name="t"),
              keras.layers.Dense(N_OUT, name="out")]
    model = keras.Sequential([keras.Input((N_IN,))] + layers)
    x, y = _data()

    def build(h, tap):
        for layer in layers:
            h = tap(layer(h))
        return h

    _assert_matches(_record(model, _leaves(model), x, y), _oracle(build, x, y, 3),
                    ["d1", "t", "out"])


def test_functional_with_a_residual_branch_matches_oracle():
    d1, d2 = keras.layers.Dense(8, name="d1"), keras.layers.Dense(8, name="d2")
    add, out = keras.layers.Add(name="add"), keras.layers.Dense(N_OUT, name="out")
    inputs = keras.Input((N_IN,))
    h = d1(inputs)
    model = keras.Model(inputs, out(add([h, d2(h)])))
    x, y = _data()

    def build(inp, tap):
        a = tap(d1(inp))
        return tap(out(tap(add([a, tap(d2(a))]))))

    recording = _record(model, _leaves(model), x, y)
    _assert_matches(recording, _oracle(build, x, y, 4), ["d1", "d2", "add", "out"])
    assert not recording.chain   # a branch: not a plain chain


def test_nested_backbone_matches_oracle_with_paths():
    """A Sequential backbone inside a Functional model inside another (depth 2)."""
    inner = keras.Sequential([keras.Input((N_IN,)), keras.layers.Dense(8, name="conv"),
                              keras.layers.ReLU(name="relu")], name="inner")
    b_in = keras.Input((N_IN,))
    backbone = keras.Model(b_in, keras.layers.Dense(8, name="conv")(inner(b_in)),
                           name="backbone")
    inputs = keras.Input((N_IN,))
    head = keras.layers.Dense(N_OUT, name="head")
    model = keras.Model(inputs, head(backbone(inputs)))
    x, y = _data()
    # the oracle is flat, where two layers named "conv" cannot live: a twin (same weights)
    leaves = [inner.layers[0], inner.layers[1], _twin(backbone.layers[-1]), head]

    def build(h, tap):
        for layer in leaves:
            h = tap(layer(h))
        return h

    recording = _record(model, _leaves(model), x, y)
    _assert_matches(recording, _oracle(build, x, y, 4),
                    ["backbone/inner/conv", "backbone/inner/relu", "backbone/conv", "head"])
    assert recording.chain


@pytest.mark.parametrize("recorded", ["weights", "leaves"])
def test_follows_previous_does_not_depend_on_what_is_recorded(recorded, gated_residual):
    """A record follows the previous one through unrecorded layers of one input (the batch
    norm, the gate's pooling), not across a parallel branch (the shortcut reads the batch
    norm's output) or a layer of several inputs (the multiply, the residual add)."""
    model = gated_residual
    x, y = _data((6, 6, 3))
    sites = instrument.weight_sites(model) if recorded == "weights" else _leaves(model)
    records = _record(model, sites, x, y).records
    is_weight = [instrument.is_weight_layer(r.layer) for r in records]
    links = propagation.weight_links([r.follows_previous for r in records], is_weight)
    names = [r.name for r, w in zip(records, is_weight) if w]
    assert dict(zip(names, links)) == {
        "stem": False, "a": True, "b": True, "se_reduce": True, "se_expand": True,
        "shortcut": False, "after": False, "logits": True}


def test_a_chain_through_unrecorded_layers_is_not_a_plain_chain():
    """Weight layers with pooling and Flatten between them follow each other, but the
    recording is no `chain` (the profile needs every layer between two records)."""
    model = keras.Sequential([
        keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3, name="c1"),
        keras.layers.MaxPooling2D(name="pool"), keras.layers.Flatten(name="flat"),
        keras.layers.Dense(N_OUT, name="d")])
    x, y = _data((6, 6, 3))
    recording = _record(model, instrument.weight_sites(model), x, y)
    assert [r.follows_previous for r in recording.records] == [False, True]
    assert not recording.chain
    assert _record(model, _leaves(model), x, y).chain


class _Block(keras.layers.Layer):
    """A custom layer holding sublayers in a list (reached through its attributes)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.parts = [keras.layers.Dense(8, name="p1"), keras.layers.Dense(8, name="p2")]

    def call(self, h):
        return self.parts[1](keras.ops.tanh(self.parts[0](h)))


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="net")
        self.block = _Block(name="block")
        self.shared = keras.layers.Dense(8, activation="relu", name="shared")
        self.out = keras.layers.Dense(N_OUT, name="out")

    def call(self, h):   # no `training` argument, a raw op, a layer called twice
        return self.out(self.shared(self.shared(self.block(h)) * 0.5))


def test_subclassed_model_with_shared_layer_matches_oracle():
    model = _Subclassed()
    x, y = _data()
    model(x[:2])
    p1, p2 = model.block.parts

    def build(h, tap):
        h = tap(p2(keras.ops.tanh(tap(p1(h)))))
        h = tap(model.shared(h))
        return tap(model.out(tap(model.shared(h * 0.5))))

    recording = _record(model, _leaves(model), x, y)
    _assert_matches(recording, _oracle(build, x, y, 5),
                    ["block/p1", "block/p2", "shared#1", "shared#2", "out"])
    assert [r.index for r in recording.records] == [1, 1, 1, 2, 1]
    assert not recording.chain   # raw ops between the layers


def test_split_activation_records_the_pre_activation():
    """With split=True a fused activation is split off: the recorded tensor is W x + b and its
    gradient dL/d(W x + b); the oracle is a linear twin with the same weights."""
    fused = keras.layers.Dense(8, activation="tanh", name="fused")
    out = keras.layers.Dense(N_OUT, name="out")
    model = keras.Sequential([keras.Input((N_IN,)), fused, out])
    x, y = _data()
    twin = type(fused).from_config({**fused.get_config(), "name": "twin",
                                    "activation": "linear"})
    twin.build((None, N_IN))
    twin.set_weights(fused.get_weights())

    def build(h, tap):
        return tap(out(keras.layers.Activation("tanh")(tap(twin(h)))))

    recording = _record(model, _leaves(model), x, y, split=True)
    _assert_matches(recording, _oracle(build, x, y, 2), ["fused", "out"])
    assert fused.activation is keras.activations.tanh and "call" not in vars(fused)


# ----------------------------------------------------------------------------- model untouched

def _snapshot(model):
    return [keras.ops.convert_to_numpy(v).copy() for v in model.variables]


def test_model_unchanged_after_recording_and_after_an_exception(tmp_path):
    model = keras.Sequential([keras.Input((N_IN,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dropout(0.5),
                              keras.layers.Dense(N_OUT)])
    x, y = _data()
    before, expected = _snapshot(model), keras.ops.convert_to_numpy(model(x))
    sites = _leaves(model)
    for _ in range(2):   # training=True: BN batch statistics and Dropout, in a StatelessScope
        _record(model, sites, x, y, split=True, training=True, eager_calls=0)

    class Boom(Exception):
        pass

    def hook(call):
        if call.site.layer is sites[-1].layer:
            raise Boom
        return call.run_split()[0]

    with pytest.raises(Boom):
        with instrument.intercept(sites, hook):
            model(x)
    for site in sites:
        assert "call" not in vars(site.layer)
        assert site.layer.call.__func__ is type(site.layer).call
    assert sites[0].layer.activation is keras.activations.relu
    assert all(np.array_equal(u, v) for u, v in zip(before, _snapshot(model)))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), expected)
    path = tmp_path / "after.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), expected, rtol=1e-6)


def test_compiled_pass_follows_the_weights_and_records_weight_gradients():
    """Repeated calls reuse the compiled pass and see new weights; dL/dW equals the tape's."""
    model = keras.Sequential([keras.Input((N_IN,)), keras.layers.Dense(N_OUT, name="d")])
    x, y = _data()
    dense = model.layers[0]

    def stats(view):
        return {"gw": view.weight_grad, "a": view.output}

    recorder = instrument.Recorder(model, _leaves(model), stats, loss=_loss(),
                                   weight_of=lambda layer: layer.kernel, eager_calls=1)
    first = recorder(x, y).records[0].stats
    for _ in range(2):
        recorder(x, y)
    dense.kernel.assign(dense.kernel * 2.0)
    later = recorder(x, y).records[0].stats
    kernel = keras.ops.convert_to_numpy(dense.kernel)
    np.testing.assert_allclose(later["a"], x @ kernel + keras.ops.convert_to_numpy(dense.bias),
                               rtol=1e-5, atol=1e-6)
    logits = x @ kernel
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(later["gw"], x.T @ ((p - np.eye(N_OUT)[y]) / BATCH), rtol=1e-4,
                               atol=1e-7)
    assert not np.allclose(first["a"], later["a"])


def _deep_cnn(dtype, depth=30, width=8):
    """Xavier-initialized plain ReLU CNN: dL/da shrinks about 2^(-1/2) per layer towards the
    input (He et al. 2015)."""
    layers = [keras.Input((8, 8, 3))]
    for i in range(depth):
        layers.append(keras.layers.Conv2D(
            width, 3, padding="same", activation="relu", dtype=dtype, name=f"c{i}",
            kernel_initializer=keras.initializers.GlorotNormal(i)))
    layers += [keras.layers.GlobalAveragePooling2D(dtype=dtype),
               keras.layers.Dense(N_OUT, dtype=dtype, name="logits")]
    return keras.Sequential(layers)


def test_mixed_float16_gradients_are_loss_scaled_not_underflowed():
    """Under mixed_float16 the backward pass scales the loss by 2^15 and divides the gradients
    by it in float32: the first layers' tiny dL/da (about 1e-9 here) match float32's, where
    the unscaled float16 gradients underflow to zero or to a few subnormals."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = (np.arange(32) % N_OUT).astype("int32")
    full, mixed = _deep_cnn("float32"), _deep_cnn("mixed_float16")
    mixed.set_weights(full.get_weights())
    assert instrument.loss_scale(mixed) == instrument.DEFAULT_LOSS_SCALE
    assert instrument.loss_scale(full) == 1.0

    def grad_std(model):
        recorder = instrument.Recorder(
            model, _leaves(model), lambda v: {"g": keras.ops.std(v.output_grad)},
            loss=_loss(), weight_of=lambda layer: getattr(layer, "kernel", None))
        return np.array([r.stats["g"] for r in recorder(x, y).records])

    want, got = grad_std(full), grad_std(mixed)
    assert want[0] < 1e-8 < want[-1]   # float16: smallest normal 6e-5, subnormal 6e-8
    # The float16 forward itself moves them (JAX on CPU: up to 14 %); unscaled ones are 0.
    np.testing.assert_allclose(got, want, rtol=0.25)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(), initial_scale=8.0)
    mixed.compile(optimizer, _loss())
    assert instrument.loss_scale(mixed) == 8.0   # training's own scale, once it has one


# ----------------------------------------------------------------------------- refusals

def test_layers_inside_an_rnn_and_models_without_weights_are_refused():
    rnn = keras.Sequential([keras.Input((3, N_IN)), keras.layers.LSTM(4, name="lstm"),
                            keras.layers.Dense(N_OUT)])
    sites = instrument.layer_sites(rnn)
    assert [s.path for s in sites if s.in_loop] == ["lstm/lstm_cell"]
    with pytest.raises(instrument.UnsupportedLayerError,
                       match=r"'lstm/lstm_cell' \(LSTMCell\).*inside a recurrent layer's loop"):
        instrument.Recorder(rnn, sites, _raw, loss=_loss())
    empty = keras.Sequential([keras.Input((N_IN,)), keras.layers.ReLU()], name="empty")
    with pytest.raises(instrument.NoWeightLayerError,
                       match=r"no layer with a kernel in model 'empty' \(Sequential\)"):
        instrument.weight_sites(empty)
    with pytest.raises(ValueError, match=r"unbuilt model 'net' \(_Subclassed\)"):
        instrument.Recorder(_Subclassed(), [], _raw)


class _Linear(keras.layers.Layer):
    """The Keras guide's custom layer: its matrix is `self.w`, not `self.kernel`."""

    def __init__(self, units, matrix_name="w", **kwargs):
        super().__init__(**kwargs)
        self.units, self.matrix_name = units, matrix_name

    def build(self, input_shape):
        setattr(self, self.matrix_name, self.add_weight(shape=(input_shape[-1], self.units)))
        self.b = self.add_weight(shape=(self.units,), initializer="zeros")

    def call(self, x):
        return keras.ops.matmul(x, getattr(self, self.matrix_name)) + self.b


def test_custom_layers_with_a_matrix_not_called_kernel_are_named_not_skipped_silently():
    from keras_varinit import diagnostics
    from keras_varinit.callbacks import LayerStatsLogger
    from keras_varinit.lsuv import lsuv

    def model(matrix_name):
        return keras.Sequential([keras.Input((N_IN,)), _Linear(8, matrix_name, name="linear"),
                                 # (0, 1), read as index 0: valid whatever the draw
                                 keras.layers.Activation("sigmoid", name="squash"),
                                 keras.layers.Embedding(3, 2, name="table"),
                                 keras.layers.Flatten(), keras.layers.Dense(N_OUT, name="out")])

    x = np.random.default_rng(0).normal(size=(BATCH, N_IN)).astype("float32")
    y = np.arange(BATCH) % N_OUT
    custom = model("w")
    # Keras's own non-kernel matrices (the Embedding's table) are not flagged
    assert instrument.kernel_less_weight_layers(instrument.layer_sites(custom)) == ["linear"]
    match = r"leaves out \['linear'\]: custom layers with a trainable weight matrix but no `kernel`"
    with pytest.warns(UserWarning, match=rf"variance_profile {match}.*Name the matrix `kernel`"):
        assert list(diagnostics.variance_profile(custom, x)["layer"]) == ["out"]
    with pytest.warns(UserWarning, match=rf"lsuv {match}"):
        assert list(lsuv(custom, x)["layer"]) == ["out"]
    with pytest.warns(UserWarning, match=rf"LayerStatsLogger {match}.*`layers=`"):
        logger = LayerStatsLogger((x, y))
        logger.set_model(custom)
        logger.on_train_begin()
    assert [r["layer"] for r in logger.history] == ["squash", "out"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        named = model("kernel")
        assert list(diagnostics.variance_profile(named, x)["layer"]) == ["linear", "out"]
    only_custom = keras.Sequential([keras.Input((N_IN,)), _Linear(3, name="linear")])
    with pytest.raises(instrument.NoWeightLayerError,
                       match=r"\['linear'\] hold a weight matrix under another name"):
        instrument.weight_sites(only_custom)


def test_weight_layers_cover_depthwise_separable_transposed_and_einsum():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    h = keras.layers.SeparableConv2D(4, 3, name="sep")(h)
    h = keras.layers.Conv2DTranspose(4, 3, name="tr")(h)
    h = keras.layers.EinsumDense("abcd,de->abce", output_shape=(6, 6, 2), name="ein")(h)
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(h))
    assert [s.path for s in instrument.weight_sites(model)] == ["dw", "sep", "tr", "ein"]


def test_no_keras_src_in_the_package():
    """Public Keras API only: no `keras.src` anywhere in keras_varinit (code or comments)."""
    hits = [f"{path.relative_to(REPO)}:{n}" for path in (REPO / "keras_varinit").rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"keras\.src|_run_through_graph", line)]
    assert hits == []
