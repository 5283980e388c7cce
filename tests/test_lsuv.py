"""LSUV (Mishkin & Matas 2015): every weight layer's pre-activation variance reaches the target."""
import keras
import numpy as np
import pandas as pd
import pytest

from keras_varinit.initializers import lsuv

pytestmark = pytest.mark.backend_independent


def mlp(depth, activation, width=64, input_dim=32):
    inp = keras.Input((input_dim,))
    h = inp
    for _ in range(depth - 1):
        h = keras.layers.Dense(width, activation=activation)(h)
    return keras.Model(inp, keras.layers.Dense(10)(h))


def cnn():
    return keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.Conv2D(16, 3, strides=2, padding="same"),
        keras.layers.Activation("relu"),
        keras.layers.Conv2D(16, 3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])


def measured_preactivations(model, x):
    """Independent of lsuv's code: x_in @ W + b (Dense) or ops.conv(x_in, W) + b (Conv2D)."""
    out = []
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            continue
        feed = keras.Model(model.inputs[0], layer.input)(x)
        w = layer.kernel
        if isinstance(layer, keras.layers.Dense):
            z = keras.ops.matmul(feed, w)
        else:
            z = keras.ops.conv(feed, w, strides=layer.strides, padding=layer.padding)
        z = z + layer.bias
        out.append((layer.name, float(np.var(keras.ops.convert_to_numpy(z).astype(np.float64)))))
    return out


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_deep_mlp_reaches_target(activation):
    model = mlp(10, activation)
    x = np.random.default_rng(0).normal(size=(256, 32)).astype("float32")
    report = lsuv(model, x, seed=0)
    assert isinstance(report, pd.DataFrame)
    assert list(report.columns) == ["layer", "index", "iterations", "initial_variance",
                                    "final_variance", "converged", "status"]
    assert len(report) == 10 and report["converged"].all()
    assert set(report["status"]) == {"converged"}
    measured = measured_preactivations(model, x)
    assert [name for name, _ in measured] == list(report["layer"])
    for name, var in measured:
        assert abs(var - 1.0) <= 0.02 + 1e-4, (name, var)
    # orthonormal start: each kernel is a multiple of an orthonormal matrix
    w = keras.ops.convert_to_numpy(model.layers[3].kernel).astype(np.float64)
    gram = w.T @ w
    np.testing.assert_allclose(gram / gram[0, 0], np.eye(64), atol=1e-4)


def test_small_cnn_reaches_target_variance():
    model = cnn()
    x = np.random.default_rng(1).normal(size=(64, 12, 12, 3)).astype("float32")
    report = lsuv(model, x, target_variance=0.5, tol=0.01, seed=1)
    assert list(report["layer"]) == [layer.name for layer in model.layers
                                     if isinstance(layer, (keras.layers.Conv2D,
                                                           keras.layers.Dense))]
    assert list(report["index"]) == [0, 1, 3, 5]
    assert report["converged"].all()
    assert (report["iterations"] <= 10).all()
    for name, var in measured_preactivations(model, x):
        assert abs(var - 0.5) <= 0.01 * 0.5 + 1e-4, (name, var)


def test_measures_before_fused_activation():
    # Dense(relu) fused vs Dense + Activation(relu): same pre-activation target either way.
    x = np.random.default_rng(2).normal(size=(128, 32)).astype("float32")
    fused = mlp(4, "relu")
    lsuv(fused, x, seed=3)
    for name, var in measured_preactivations(fused, x):
        assert abs(var - 1.0) <= 0.02 + 1e-4, (name, var)
    assert fused.layers[1].activation is keras.activations.relu  # restored


def test_max_iter_and_report_values():
    model = mlp(3, "tanh")
    x = np.random.default_rng(3).normal(size=(64, 32)).astype("float32") * 5.0
    report = lsuv(model, x, max_iter=1, tol=1e-6, seed=0)
    assert (report["iterations"] <= 1).all()
    # orthonormal 32 -> 64 kernel (W W^T = I): input variance 25 spread over 64 outputs
    assert report["initial_variance"].iloc[0] == pytest.approx(25.0 * 32 / 64, rel=0.2)
    assert report["iterations"].dtype.kind == "i"


def test_bad_inputs():
    x = np.ones((8, 32), "float32")
    no_weights = keras.Sequential([keras.Input((32,)), keras.layers.Activation("relu")])
    with pytest.raises(ValueError, match="lsuv found no layer with a kernel in model "
                                         "'sequential.*Received: layers"):
        lsuv(no_weights, x)
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="Received: unbuilt model"):
        lsuv(unbuilt, x)
    model = mlp(2, "relu")
    with pytest.raises(ValueError, match=r"Received: x with shape \(0, 32\)"):
        lsuv(model, np.zeros((0, 32), "float32"))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"Received: x with 1 non-finite value\(s\) \(1 NaN, "
                                         r"0 Inf\)"):
        lsuv(model, bad)
    with pytest.raises(ValueError, match="Received: x=None"):
        lsuv(model, None)
    with pytest.raises(ValueError, match="Received: model of type str"):
        lsuv("model", x)
    for kwargs, received in [({"tol": 0}, "tol=0"), ({"max_iter": 0}, "max_iter=0"),
                             ({"target_variance": -1.0}, "target_variance=-1.0")]:
        with pytest.raises(ValueError, match=f"Received: {received}"):
            lsuv(model, x, **kwargs)


def test_nested_and_subclassed_models_reach_target():
    """A backbone inside a Functional model, and a subclassed model with a shared layer: every
    weight layer is calibrated where the model calls it (the shared one once, at its first
    call), named by its path."""
    inner = keras.Sequential([keras.Input((32,)), keras.layers.Dense(24, activation="tanh",
                                                                     name="d")], name="inner")
    inp = keras.Input((32,))
    outer = keras.Model(inp, keras.layers.Dense(6, name="head")(inner(inp)))
    x = np.random.default_rng(0).normal(size=(256, 32)).astype("float32")
    report = lsuv(outer, x, seed=0)
    assert list(report["layer"]) == ["inner/d", "head"] and report["converged"].all()
    pre = x @ keras.ops.convert_to_numpy(inner.get_layer("d").kernel)
    assert abs(np.var(pre) - 1.0) <= 0.02 + 1e-4
    head_in = np.tanh(pre)
    head = outer.get_layer("head")
    assert abs(np.var(head_in @ keras.ops.convert_to_numpy(head.kernel)) - 1.0) <= 0.02 + 1e-4

    class Twice(keras.Model):
        def __init__(self):
            super().__init__()
            self.shared = keras.layers.Dense(32, name="shared")
            self.out = keras.layers.Dense(4, name="out")

        def call(self, h):
            return self.out(self.shared(self.shared(h)))

    model = Twice()
    model(x[:2])
    report = lsuv(model, x, seed=0)
    assert list(report["layer"]) == ["shared", "out"] and report["converged"].all()
    w = keras.ops.convert_to_numpy(model.shared.kernel)
    assert abs(np.var(x @ w) - 1.0) <= 0.02 + 1e-4   # calibrated at its first call


def test_all_zero_batch_warns_and_marks_layers_not_calibrated():
    model = mlp(3, "relu")
    with pytest.warns(UserWarning, match=r"could not calibrate 3 layer\(s\): the first, "
                                         r"'dense.*output variance 0\.0"):
        report = lsuv(model, np.zeros((16, 32), "float32"), seed=0)
    assert list(report["status"]) == ["zero_variance"] * 3
    assert not report["converged"].any() and (report["iterations"] == 0).all()


def test_dead_layer_in_the_middle_is_named():
    """A ReLU layer whose bias kills every unit (its pre-activation still calibrates): the
    next layer sees zeros, and the warning names it."""
    inp = keras.Input((8,))
    h = keras.layers.Dense(8, name="ok")(inp)
    h = keras.layers.Dense(8, activation="relu", bias_initializer=keras.initializers.Constant(
        -1e6), name="killer")(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="starved")(h))
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    with pytest.warns(UserWarning, match="the first, 'starved'"):
        report = lsuv(model, x, seed=0)
    assert list(report["status"]) == ["converged", "converged", "zero_variance"]


class _CountCalls(keras.layers.Layer):
    """Identity that counts its (eager) calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return x


def test_one_forward_pass_every_layer_runs_once():
    """Each layer between the weight layers runs once (a pass per weight layer, as re-running
    the model up to each of them would do, is O(depth^2))."""
    inp = keras.Input((32,))
    h, counters = inp, []
    for _ in range(6):
        counter = _CountCalls()
        counters.append(counter)
        h = counter(keras.layers.Dense(32, activation="tanh")(h))
    model = keras.Model(inp, keras.layers.Dense(4)(h))
    before = [c.calls for c in counters]
    report = lsuv(model, np.random.default_rng(0).normal(size=(128, 32)).astype("float32"))
    assert report["converged"].all()
    assert [c.calls - b for c, b in zip(counters, before)] == [1] * 6


def test_branched_functional_model_reaches_target():
    inp = keras.Input((32,))
    a = keras.layers.Dense(16, activation="relu", name="branch_a")(inp)
    b = keras.layers.Dense(24, activation="tanh", name="branch_b")(inp)
    h = keras.layers.Concatenate()([a, b])
    out = keras.layers.Dense(10, name="head")(keras.layers.Dense(32, name="mix")(h))
    model = keras.Model(inp, out)
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(256, 32)).astype("float32")
    report = lsuv(model, x, seed=0)
    assert list(report["layer"]) == ["branch_a", "branch_b", "mix", "head"]  # model order
    assert list(report["index"]) == sorted(report["index"])
    for name, var in measured_preactivations(model, x):
        assert abs(var - 1.0) <= 0.02, (name, var)


def test_masked_sequential_model_calibrates_on_the_masked_signal():
    """The head after a masked average must be calibrated on what the model computes: the
    average over the unmasked steps only (dropping the mask gives 0.49 or 2.7 here)."""
    model = keras.Sequential([
        keras.Input((12,), dtype="int32"),
        keras.layers.Embedding(50, 8, mask_zero=True),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(4, name="head"),
    ])
    x = np.random.default_rng(0).integers(1, 50, size=(256, 12))
    x[:, 3:] = 0   # 9 of 12 steps are padding
    lsuv(model, x, seed=0)
    feed = x
    for layer in model.layers[:-1]:
        feed = layer(feed)   # eager calls propagate the mask, as in the model
    head = model.get_layer("head")
    z = keras.ops.matmul(feed, head.kernel) + head.bias
    assert abs(float(np.var(keras.ops.convert_to_numpy(z))) - 1.0) <= 0.02


def test_mixed_precision_model_keeps_float32_kernels_at_full_precision():
    """Under mixed_float16 a layer's call reads its kernel as float16: LSUV rescales a float32
    copy, so the stored kernels are not rounded to float16 (and the orthonormal draw's QR
    runs in float32, which JAX's CPU LAPACK needs)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = cnn()
    finally:
        keras.mixed_precision.set_global_policy(previous)
    x = np.random.default_rng(0).normal(size=(64, 12, 12, 3)).astype("float32")
    report = lsuv(model, x, tol=0.05)
    assert report["converged"].all() and (report["iterations"] > 0).any()
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            assert kernel.dtype == np.float32
            rounded = kernel.astype(np.float16).astype(np.float32)
            assert np.mean(kernel != rounded) > 0.9, layer.name


def test_layers_inside_an_rnn_are_left_out_with_a_warning_and_the_rest_calibrated():
    model = keras.Sequential([keras.Input((6, 8)), keras.layers.Dense(16, name="embed"),
                              keras.layers.LSTM(12, name="lstm"),
                              keras.layers.Dense(10, name="out")])
    cell_kernel = keras.ops.convert_to_numpy(model.get_layer("lstm").cell.kernel)
    x = np.random.default_rng(0).normal(size=(64, 6, 8)).astype("float32")
    with pytest.warns(UserWarning, match=r"lsuv leaves out \['lstm/lstm_cell'\]: they run "
                                         r"inside a recurrent layer's loop"):
        report = lsuv(model, x)
    assert list(report["layer"]) == ["embed", "out"] and report["converged"].all()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.get_layer("lstm").cell.kernel), cell_kernel)
    only_rnn = keras.Sequential([keras.Input((6, 8)), keras.layers.GRU(4, name="gru")])
    with pytest.raises(ValueError, match=r"'gru/gru_cell' \(GRUCell\).*inside a recurrent "
                                         r"layer's loop"):
        lsuv(only_rnn, x)


def test_frozen_layers_are_left_as_they_are_and_the_rest_calibrated_after_them():
    backbone = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu",
                                                                        name="b1"),
                                 keras.layers.Dense(64, activation="relu", name="b2")],
                                name="backbone")
    backbone.trainable = False
    inputs = keras.Input((32,))
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(backbone(inputs)))
    before = [keras.ops.convert_to_numpy(w) for w in backbone.weights]
    x = np.random.default_rng(0).normal(size=(256, 32)).astype("float32")
    with pytest.warns(UserWarning, match=r"lsuv leaves 2 layer\(s\) with trainable=False as "
                                         r"they are \(the first: 'backbone/b1'\)"):
        report = lsuv(model, x)
    assert list(report["status"]) == ["frozen", "frozen", "converged"]
    assert not report["converged"].iloc[:2].any() and (report["iterations"].iloc[:2] == 0).all()
    for old, new in zip(before, backbone.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(new), old)
    head = keras.ops.convert_to_numpy(model.get_layer("head").kernel)
    features = np.asarray(keras.ops.convert_to_numpy(backbone(x)), np.float64)
    assert np.var(features @ head) == pytest.approx(1.0, rel=0.03)
    # frozen variances are measured where the model runs them
    assert report["final_variance"].iloc[0] == pytest.approx(
        np.var(x.astype(np.float64) @ keras.ops.convert_to_numpy(
            model.get_layer("backbone").get_layer("b1").kernel)), rel=1e-4)


def test_a_batch_of_one_is_refused():
    """A variance over one example: the last layer used to come out 'zero_variance', blamed
    on a dead input."""
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(8)(inputs)))
    with pytest.raises(ValueError, match="at least 2 examples. Received: x with shape \\(1, 6\\)"):
        lsuv(model, np.ones((1, 6), "float32"))
    with pytest.raises(ValueError, match="`verbose` must be 0 or 1. Received: verbose='x'"):
        lsuv(model, np.ones((4, 6), "float32"), verbose="x")
