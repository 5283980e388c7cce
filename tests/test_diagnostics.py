"""variance_profile and the predicted-variance math (the verdict and the plot: test_profile_report).

The reference claims (He et al. 2015), measured at init on a batch of 256 N(0, 1) images:

* 30-layer plain ReLU CNN ("small30", width 16): Xavier's forward variance falls by more than
  10^3 (the ReLU halving over the 28 steps from conv_01 to conv_29, 2^-28, times (2/3)^2 for
  the two widening convolutions and the zero-padding loss; seed 0: 10^-9), while Kaiming's
  textbook prediction stays flat;
* the one-step prediction fan_in * Var[W] * E[x^2] agrees with the measurement within a factor
  2 on every hidden layer past the first (and the backward one within 2 as well);
* Kaiming keeps the last hidden layer within a factor 4 of the first in the textbook
  recursion and, measured, on a 30-layer ReLU MLP of width 256. On the CNN two things the
  textbook leaves out move it: zero padding (border taps see zeros; the expectation over
  weights, exact at any width, falls about x0.3 over the 30 layers, mostly on the 8x8 maps),
  which the cumulative prediction includes (`padding_factor`), and one draw deviating from
  the average over draws: over 12 independent draws per width, medians x0.09-0.24, range
  x0.006-2.2, within 4x in 17-42% of draws at widths 16-64
  (examples/output/finite_width_drift.md). Seed 0 at width 16 lands at about x0.5. The tests
  assert what holds for every draw and document the rest instead of hiding it.
"""
import math

import keras
import numpy as np
import pandas as pd
import pytest

from keras_varinit import diagnostics, models, profile_report, propagation

pytestmark = pytest.mark.backend_independent

BATCH = 256


def _images(n=BATCH, seed=0, shape=(32, 32, 3)):
    return np.random.default_rng(seed).standard_normal((n,) + shape).astype("float32")


def _hidden_ratio(df):
    """forward_var of the last hidden weight layer over the first."""
    return df["forward_var"].iloc[-2] / df["forward_var"].iloc[0]


# ----------------------------------------------------------------------------- pure math

def test_activation_factors_closed_forms():
    assert propagation.forward_factor("relu") == 0.5
    assert propagation.forward_factor("leaky_relu", 0.2) == pytest.approx(0.52)
    assert propagation.forward_factor("leaky_relu", 1.0) == pytest.approx(1.0)
    assert propagation.forward_factor("linear") == propagation.forward_factor(None) == 1.0
    assert propagation.forward_factor("tanh") == 1.0
    assert math.isnan(propagation.forward_factor("sigmoid"))
    assert propagation.backward_factor("sigmoid") == pytest.approx(1 / 16)
    assert propagation.backward_factor("relu") == 0.5


def test_relu_factor_matches_monte_carlo(rng):
    y = rng.standard_normal(2_000_000) * 3.0
    assert np.mean(np.maximum(y, 0) ** 2) / np.var(y) == pytest.approx(
        propagation.forward_factor("relu"), rel=0.01)
    a = 0.2
    leaky = np.where(y > 0, y, a * y)
    assert np.mean(leaky ** 2) / np.var(y) == pytest.approx(
        propagation.forward_factor("leaky_relu", a), rel=0.01)


def test_one_step_and_cumulative_hand_values():
    # Kaiming on a relu chain: fan_in * 2/fan_in * (1/2) = 1 per layer.
    assert propagation.one_step_forward(144, 2 / 144, 0.5) == pytest.approx(1.0)
    fwd = propagation.cumulative_forward([27, 144, 288], [2 / 27, 2 / 144, 2 / 288], 1.0,
                                         transfer=[0.5, 0.5, 0.5])
    np.testing.assert_allclose(fwd, [2.0, 2.0, 2.0])
    # Xavier at constant width: 1/fan_in -> halves per layer.
    fwd = propagation.cumulative_forward([144] * 4, [1 / 144] * 4, 1.0, transfer=[0.5] * 4)
    np.testing.assert_allclose(fwd, [1.0, 0.5, 0.25, 0.125])
    # backward: fan_out of the *next* layer, divided by its stride.
    assert propagation.one_step_backward(288, 2 / 144, 1.0, factor=0.5, stride_next=4) == \
        pytest.approx(0.5 * 288 / 4 * 2 / 144)
    bwd = propagation.cumulative_backward([144, 144, 10], [2 / 144, 2 / 144, 2 / 64], 1e-4,
                                          transfer=[0.5, 0.5, 0.5])
    np.testing.assert_allclose(bwd, [1.5625e-5, 1.5625e-5, 1e-4])
    # a BN reset restarts the recursion
    fwd = propagation.cumulative_forward([144] * 3, [1e-6] * 3, 1.0, transfer=[0.5] * 3,
                                         reset=[1.0, np.nan, np.nan])
    np.testing.assert_allclose(fwd, [144e-6, 144e-6 * 0.5, 144e-6 * (0.5 * 72e-6)])


def test_cumulative_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="Expected 3 values"):
        propagation.cumulative_forward([1, 2, 3], [1, 1], 1.0)


# ----------------------------------------------------------------------------- the profile

def test_profile_columns_and_fans(small30):
    df = small30["kaiming_normal"]
    assert list(df.columns) == list(diagnostics.COLUMNS)
    assert len(df) == 30
    assert list(df["layer"][:2]) == ["conv_01", "conv_02"] and df["layer"].iloc[-1] == "logits"
    # hand-computed fans: 3x3 kernels, widths 16/32/64, classifier 64 -> 10
    assert (df["fan_in"].iloc[0], df["fan_out"].iloc[0]) == (27, 144)
    assert (df["fan_in"].iloc[10], df["fan_out"].iloc[10]) == (144, 288)
    assert df["stride"].iloc[10] == 4 and df["stride"].iloc[9] == 1
    assert (df["fan_in"].iloc[-1], df["fan_out"].iloc[-1]) == (64, 10)
    assert set(df["activation"][:-1]) == {"relu"} and df["activation"].iloc[-1] == "linear"
    # Kaiming's 2/fan_in, measured on the kernels
    np.testing.assert_allclose(df["weight_var"][1:-1] * df["fan_in"][1:-1], 2.0, rtol=0.1)
    assert (df["forward_var_post"] < df["forward_var"]).iloc[:-1].all()  # relu removes half+


def test_xavier_falls_more_than_1e3_kaiming_does_not(small30):
    xavier, kaiming = small30["xavier_normal"], small30["kaiming_normal"]
    assert _hidden_ratio(xavier) < 1e-3
    assert xavier["forward_var"].iloc[-1] / xavier["forward_var"].iloc[0] < 1e-3
    # the recursion: Xavier ~ (1/2)^28 * (2/3)^2 * padding, Kaiming flat * padding
    padding = float(np.prod(xavier["padding_factor"].iloc[1:-1]))
    assert 0.25 < padding < 0.35
    pred_x = xavier["predicted_forward_var_cumulative"]
    # (rel 0.3: the recursion uses the sampled kernel variances, 28 of them)
    assert pred_x.iloc[-2] / pred_x.iloc[0] == pytest.approx(
        0.5 ** 28 * (2 / 3) ** 2 * padding, rel=0.3)
    pred_k = kaiming["predicted_forward_var_cumulative"]
    assert 0.25 < pred_k.iloc[-2] / pred_k.iloc[0] / padding < 4
    # measured, Kaiming keeps >= 10^6 times more of the signal than Xavier; at width 16 one
    # draw still drifts down (finite width), but by far less than 10^3.
    assert _hidden_ratio(kaiming) > 1e6 * _hidden_ratio(xavier)
    assert _hidden_ratio(kaiming) > 1e-3
    assert "stall" in profile_report.summarize_profile(xavier).text
    assert "stall" not in profile_report.summarize_profile(kaiming).text


@pytest.mark.parametrize("init", ["xavier_normal", "kaiming_normal"])
def test_one_step_forward_within_2x_past_the_first(small30, init):
    df = small30[init]
    ratio = df["forward_var"] / df["predicted_forward_var"]
    hidden = ratio.iloc[1:-1]
    assert hidden.between(0.5, 2.0).all(), hidden.describe()
    # the first layer sees the data itself: exact up to sampling
    assert ratio.iloc[0] == pytest.approx(1.0, rel=0.15)
    # the 10-unit classifier after global pooling is a chi^2 estimate with ~10 degrees of
    # freedom: P(outside 3x) ~ 3%; within 2x in most draws but not all (seed 0: 0.4)
    assert 1 / 3 < ratio.iloc[-1] < 3


@pytest.mark.parametrize("init", ["xavier_normal", "kaiming_normal"])
def test_one_step_backward_within_2x(small30, init):
    df = small30[init]
    ratio = (df["backward_var"] / df["predicted_backward_var"]).iloc[:-1]
    assert ratio.between(0.5, 2.0).all(), ratio.describe()
    assert np.isnan(df["predicted_backward_var"].iloc[-1])
    # Xavier's gradient vanishes towards the input; Kaiming's stays within ~2 decades
    assert df["backward_var"].iloc[0] > 0


def test_swapped_fans_break_the_predictions(small30):
    """The checks above fail if fan_in and fan_out are swapped (or the stride is ignored)."""
    df = small30["kaiming_normal"]
    # conv_11 maps 16 -> 32 channels: fan_out = 2 fan_in
    row = df.iloc[10]
    swapped = propagation.one_step_forward(row["fan_out"], row["weight_var"],
                                           row["input_second_moment"])
    right = row["forward_var"] / row["predicted_forward_var"]
    assert abs(math.log(right)) < abs(math.log(row["forward_var"] / swapped))
    # backward into conv_10 goes through conv_11 (stride 2x2): without the stride, 4x off
    nxt = df.iloc[10]
    no_stride = propagation.one_step_backward(nxt["fan_out"], nxt["weight_var"],
                                              nxt["backward_var"], 0.5, 1.0)
    assert df["backward_var"].iloc[9] / no_stride < 0.5
    with_fan_in = propagation.one_step_backward(nxt["fan_in"], nxt["weight_var"],
                                                nxt["backward_var"], 0.5, nxt["stride"])
    assert df["backward_var"].iloc[9] / with_fan_in > 1.5


def test_swapped_fans_fail_on_an_mlp_with_4x_fans():
    """A Dense chain whose widths alternate 64 <-> 256: every fan_in/fan_out differs by 4x."""
    widths = [256, 64, 256, 64, 256, 10]
    inputs = keras.Input((64,))
    h = inputs
    for i, w in enumerate(widths):
        h = keras.layers.Dense(w, use_bias=False, name=f"d{i}",
                               kernel_initializer=keras.initializers.RandomNormal(
                                   stddev=math.sqrt(2 / h.shape[-1]), seed=i))(h)
        if i < len(widths) - 1:
            h = keras.layers.Activation("relu", name=f"a{i}")(h)
    model = keras.Model(inputs, h)
    x = np.random.default_rng(1).standard_normal((512, 64)).astype("float32")
    df = diagnostics.variance_profile(model, x)
    ok = (df["forward_var"] / df["predicted_forward_var"]).iloc[:-1]
    assert ok.between(0.8, 1.25).all(), ok
    swapped = df["forward_var"] / propagation.one_step_forward(
        df["fan_out"], df["weight_var"], df["input_second_moment"])
    assert (~swapped.iloc[:-1].between(0.5, 2.0)).all(), swapped
    back_ok = (df["backward_var"] / df["predicted_backward_var"]).iloc[:-1]
    assert back_ok.between(0.75, 1.33).all(), back_ok
    back_swapped = df["backward_var"].iloc[:-1].to_numpy() / propagation.one_step_backward(
        df["fan_in"].to_numpy()[1:], df["weight_var"].to_numpy()[1:],
        df["backward_var"].to_numpy()[1:], 0.5)
    assert not np.any((back_swapped > 0.5) & (back_swapped < 2.0)), back_swapped
    np.testing.assert_allclose(df["predicted_forward_var_cumulative"][:-1],
                               df["forward_var"][:-1], rtol=0.5)


def test_kaiming_relu_mlp_30_layers_within_4x_xavier_falls():
    x = np.random.default_rng(0).standard_normal((BATCH, 3072)).astype("float32")
    ratios = {}
    for init in ("kaiming_normal", "xavier_normal"):
        model = models.plain_mlp(30, width=256, kernel_initializer=init, activation="relu",
                                 seed=0)
        df = diagnostics.variance_profile(model, x)
        ratios[init] = _hidden_ratio(df)
        one_step = (df["forward_var"] / df["predicted_forward_var"]).iloc[1:]
        assert one_step.between(0.5, 2.0).all()
        keras.backend.clear_session()
    assert 0.25 < ratios["kaiming_normal"] < 4
    assert ratios["xavier_normal"] < 1e-3


@pytest.mark.slow
def test_kaiming_wide_30_layer_cnn_one_draw():
    """Width 64 (channels 64/128/256), seed 0: the textbook recursion is flat, the padded one
    falls about x0.3, and the draw measured lands within 16x of the first layer without a
    'stall' verdict. Wider layers do not tighten the spread between draws much in this range
    (12 independent draws per width, examples/output/finite_width_drift.md: x0.04-0.83 at
    width 64 against x0.008-1.3 at 16), so only this draw's bound is asserted."""
    x = _images(32)
    model = models.plain_cnn(30, width=64, kernel_initializer="kaiming_normal", seed=0)
    df = diagnostics.variance_profile(model, x)
    assert 1 / 16 < _hidden_ratio(df) < 4
    assert "stall" not in profile_report.summarize_profile(df).text
    pred = df["predicted_forward_var_cumulative"]
    padding = float(np.prod(df["padding_factor"].iloc[1:-1]))
    assert 0.25 < padding < 0.35
    assert 0.25 < pred.iloc[-2] / pred.iloc[0] / padding < 4
    one_step = (df["forward_var"] / df["predicted_forward_var"]).iloc[1:-1]
    assert one_step.between(0.5, 2.0).all()


def test_labels_loss_and_determinism():
    model = models.plain_cnn(4, width=4, seed=0)
    x = _images(16)
    a = diagnostics.variance_profile(model, x, seed=1)
    b = diagnostics.variance_profile(model, x, seed=1)
    pd.testing.assert_frame_equal(a, b)
    y = np.arange(16) % 10
    onehot = np.eye(10, dtype="float32")[y]
    c = diagnostics.variance_profile(model, x, y=y)
    d = diagnostics.variance_profile(model, x, y=onehot)
    np.testing.assert_allclose(c["backward_var"], d["backward_var"], rtol=1e-4)
    np.testing.assert_allclose(c["forward_var"], a["forward_var"], rtol=1e-5)
    e = diagnostics.variance_profile(
        model, x, y=onehot, loss=keras.losses.MeanSquaredError())
    assert not np.allclose(e["backward_var"], d["backward_var"])


def test_model_weights_untouched_and_bn_profile():
    pytest.importorskip("keras_varinit.layers")
    model = models.plain_cnn(6, width=4, normalization="batch", seed=0,
                             kernel_initializer="normal:0.02")
    before = [keras.ops.convert_to_numpy(v).copy() for v in model.variables]
    df = diagnostics.variance_profile(model, _images(32))
    after = [keras.ops.convert_to_numpy(v) for v in model.variables]
    assert all(np.array_equal(u, v) for u, v in zip(before, after))  # moving stats too
    assert np.isfinite(df["forward_var"]).all() and np.isfinite(df["backward_var"]).all()
    # weights ~10x too small (Var[y_1] = 27 * 4e-4), but BN (training mode, batch statistics)
    # re-normalizes: the next layer's input is relu(N(0, 1)), E[x^2] ~ 1/2
    assert df["forward_var"].iloc[0] < 0.05
    assert 0.2 < df["input_second_moment"].iloc[1] < 1.0


def test_sequential_model_and_own_activation():
    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(64, activation="relu", name="h1"),
        keras.layers.Dense(64, activation="tanh", name="h2"),
        keras.layers.Dense(3, name="out"),
    ])
    x = np.random.default_rng(0).standard_normal((64, 20)).astype("float32")
    df = diagnostics.variance_profile(model, x)
    assert list(df["activation"]) == ["relu", "tanh", "linear"]
    pre = keras.ops.convert_to_numpy(model.get_layer("h1").kernel)
    y1 = x @ pre  # zero bias at init
    assert df["forward_var"].iloc[0] == pytest.approx(np.mean(y1 ** 2), rel=1e-4)
    assert df["forward_var_post"].iloc[0] == pytest.approx(np.var(np.maximum(y1, 0)), rel=1e-4)
    assert df["input_second_moment"].iloc[1] == pytest.approx(
        np.mean(np.maximum(y1, 0) ** 2), rel=1e-4)


def test_profile_bad_input():
    model = models.plain_cnn(3, width=2, seed=0)
    with pytest.raises(ValueError, match="at least 2 examples"):
        diagnostics.variance_profile(model, _images(1))
    with pytest.raises(ValueError, match="same number of examples"):
        diagnostics.variance_profile(model, _images(4), y=np.zeros(3, "int32"))
    empty = keras.Sequential([keras.Input((4,)), keras.layers.Activation("relu")])
    with pytest.raises(ValueError, match=r"no layer with a kernel in model 'sequential' "
                                         r"\(Sequential\).*Allowed: models with Dense"):
        diagnostics.variance_profile(empty, np.zeros((4, 4), "float32"))
    with pytest.raises(ValueError, match=r"needs a keras.Model. Received: model of type str "
                                         r"'net.keras'. Allowed: .*keras.models.load_model"):
        diagnostics.variance_profile("net.keras", _images(4))
    with pytest.raises(ValueError, match=r"1 input\(s\) but the batch has 4. Received: x of "
                                         r"type list \(a list or tuple is read as one array per "
                                         r"model input: for one input, pass np.asarray\(x\)\)"):
        diagnostics.variance_profile(model, _images(4).tolist())


class _TwoHeads(keras.Model):
    def __init__(self):
        super().__init__()
        self.trunk = keras.layers.Dense(8, activation="relu", name="trunk")
        self.head_a = keras.layers.Dense(3, name="head_a")
        self.head_b = keras.layers.Dense(2, name="head_b")

    def call(self, x):
        h = self.trunk(x)
        return self.head_a(h), self.head_b(h)


def test_multi_output_models_need_a_loss_and_multi_input_models_are_refused():
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    inp = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu", name="trunk")(inp)
    functional = keras.Model(inp, [keras.layers.Dense(3, name="head_a")(h),
                                   keras.layers.Dense(2, name="head_b")(h)], name="heads")
    subclassed = _TwoHeads()
    subclassed(x)
    for model in (functional, subclassed):
        with pytest.raises(ValueError, match=r"one output\. Received: model .* with 2 outputs, "
                                             r"shapes \[\(16, 3\), \(16, 2\)\].*`loss=`"):
            diagnostics.variance_profile(model, x)
        assert len(diagnostics.variance_profile(model, x, gradients=False)) == 3
        y = np.arange(16) % 2
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        df = diagnostics.variance_profile(model, x, y, loss=lambda t, p: ce(t, p[1]))
        backward = df.set_index("layer")["backward_var"]
        assert backward["head_b"] > 0 and backward["trunk"] > 0 and backward["head_a"] == 0
    two_in = keras.Input((4,)), keras.Input((4,))
    joint = keras.Model(list(two_in), keras.layers.Dense(2)(keras.layers.Add()(list(two_in))))
    with pytest.raises(ValueError, match=r"single-input.*with 2 inputs.*Allowed: a model with "
                                         r"one input"):
        diagnostics.variance_profile(joint, [x, x])


def test_a_recurrent_layer_is_recorded_whole_and_its_cell_left_out_with_a_warning():
    model = keras.Sequential([keras.Input((6, 8)), keras.layers.Dense(16, name="embed"),
                              keras.layers.LSTM(12, name="lstm"),
                              keras.layers.Dense(10, name="out")])
    x = np.random.default_rng(0).normal(size=(32, 6, 8)).astype("float32")
    with pytest.warns(UserWarning, match=r"variance_profile leaves out \['lstm/lstm_cell'\]"):
        df = diagnostics.variance_profile(model, x)
    assert list(df["layer"]) == ["embed", "out"]
    assert df["forward_var"].gt(0).all() and df["backward_var"].gt(0).all()
    # the layer after the LSTM sees the LSTM's output: its one-step prediction starts there
    h = np.asarray(keras.Model(model.inputs[0], model.get_layer("lstm").output)(x), np.float64)
    out = df.set_index("layer").loc["out"]
    assert out["input_second_moment"] == pytest.approx(np.mean(h ** 2), rel=1e-4)
    assert out["predicted_forward_var"] == pytest.approx(
        out["fan_in"] * out["weight_var"] * np.mean(h ** 2), rel=1e-4)


# ----------------------------------------------------------------------------- forward only

def test_forward_only_profile_matches_the_full_one():
    model = models.plain_cnn(8, width=4, kernel_initializer="kaiming_normal", seed=1)
    x = _images(32, seed=2)
    full = diagnostics.variance_profile(model, x, seed=0)
    forward = diagnostics.variance_profile(model, x, seed=0, gradients=False)
    cols = ["forward_var", "forward_var_post", "input_second_moment", "weight_var",
            "predicted_forward_var", "predicted_forward_var_cumulative"]
    np.testing.assert_allclose(forward[cols].to_numpy(float), full[cols].to_numpy(float),
                               rtol=1e-5)
    assert full["backward_var"].notna().all()
    for col in ("backward_var", "predicted_backward_var", "predicted_backward_var_cumulative"):
        assert forward[col].isna().all(), col


# ----------------------------------------------------------------------------- zero padding

def test_padding_factors_hand_values(small30):
    pad = small30["kaiming_normal"]["padding_factor"].to_numpy()
    # conv_01 on a uniform 32x32 input: per axis (32*3 - 2) / (32*3) taps land inside
    assert pad[0] == pytest.approx((94 / 96) ** 2)
    # deep inside a stage the energy near the border is already depleted: the loss per layer
    # tends to the top eigenvalue of the 3-tap path operator, ((1 + 2 cos(pi/(n+1))) / 3)^2
    assert pad[28] == pytest.approx(((1 + 2 * math.cos(math.pi / 9)) / 3) ** 2, abs=0.003)
    assert pad[-1] == 1.0   # the Dense classifier
    assert propagation.same_padding_before(32, 3, stride=2) == 0   # TF/Keras: extra pad after
    np.testing.assert_allclose(propagation.padded_energy(np.ones(5), 3, stride=2, pad_before=1),
                               [2 / 3, 1, 2 / 3])


@pytest.mark.parametrize("padding", ["valid", "same", "causal"])
def test_padded_energy_default_out_size_is_the_convolution_output(padding):
    """Without `out_size`, as many positions as Keras's convolution outputs: rounded down
    (floor((n - k) / s) + 1 for "valid", ceil(n / s) for "same"); the old default rounded up,
    one position too many for "valid" 3-tap stride 2 on 8 (a border position of 2 taps)."""
    np.testing.assert_allclose(propagation.padded_energy(np.ones(8), 3, stride=2), [1, 1, 1])
    for n in range(1, 14):
        for kernel, stride, dilation in [(k, s, 1) for k in range(1, 6) for s in (1, 2, 3)] + \
                [(k, 1, 2) for k in range(1, 5)]:
            eff = (kernel - 1) * dilation + 1
            if padding == "valid" and eff > n:
                continue
            layer = keras.layers.Conv1D(1, kernel, strides=stride, padding=padding,
                                        dilation_rate=dilation)
            expected = layer.compute_output_shape((1, n, 1))[1]
            if padding == "same":
                before = propagation.same_padding_before(n, kernel, stride, dilation)
                total = max((-(-n // stride) - 1) * stride + eff - n, 0)
                after = total - before
            else:
                before, after = ((eff - 1, 0) if padding == "causal" else (0, 0))
            got = propagation.padded_energy(np.ones(n), kernel, stride, before, dilation,
                                            pad_after=after)
            assert len(got) == expected, (n, kernel, stride, dilation)
            if padding == "valid":   # pad_after defaults to pad_before (0 here)
                assert len(propagation.padded_energy(np.ones(n), kernel, stride,
                                                     dilation=dilation)) == expected


@pytest.mark.parametrize("size,stride,padding", [(8, 1, "same"), (8, 2, "same"),
                                                 (7, 2, "same"), (8, 1, "valid")])
def test_padded_energy_is_the_expectation_over_weights(size, stride, padding):
    """E_W[y(o)^2] per output position of a real Keras convolution, averaged over 20,000
    independent kernels (one per output channel), against the per-axis energy propagation."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.2, 2.0, size), rng.uniform(0.2, 2.0, size)   # separable energy map
    channels, draws = 4, 20_000
    signs = rng.choice([-1.0, 1.0], size=channels)
    x = (np.sqrt(np.outer(a, b))[:, :, None] * signs).astype("float32")[None]
    w = rng.standard_normal((3, 3, channels, draws)).astype("float32")
    y = keras.ops.convert_to_numpy(keras.ops.conv(x, w, strides=stride, padding=padding))[0]
    measured = (y.astype(np.float64) ** 2).mean(axis=-1)
    before = propagation.same_padding_before(size, 3, stride) if padding == "same" else 0
    out = y.shape[0]
    pa = propagation.padded_energy(a, 3, stride, before, out_size=out)
    pb = propagation.padded_energy(b, 3, stride, before, out_size=out)
    expected = channels * 9 * np.outer(pa, pb)   # Var[W] = 1
    np.testing.assert_allclose(measured, expected, rtol=0.06)
    if padding == "same":
        # the textbook formula (each output sees a full fan_in of inputs like its own) is off
        # at the border, and so is the other padding convention for strided convolutions
        def renormalized(p):
            ones = propagation.padded_energy(np.ones(size), 3, stride, before, out_size=out)
            return propagation.padded_energy(p, 3, stride, before, out_size=out) / ones
        textbook = channels * 9 * np.outer(renormalized(a), renormalized(b))
        assert not np.allclose(measured, textbook, rtol=0.06)
        total = (out - 1) * stride + 3 - size
        if total % 2:
            wrong = channels * 9 * np.outer(
                propagation.padded_energy(a, 3, stride, total - before, out_size=out),
                propagation.padded_energy(b, 3, stride, total - before, out_size=out))
            assert not np.allclose(measured, wrong, rtol=0.06)


# ----------------------------------------------------------------------------- any model

def _skip_on_jax_for_applications():
    if keras.backend.backend() == "jax":
        pytest.skip("keras.applications models take 30-45 s to build and as long to jit on "
                    "JAX on 2 CPU cores (measured); the same code path is checked on JAX by "
                    "the small oracle tests of test_instrument.py")


def test_mobilenet_v2_has_a_row_per_conv_depthwise_and_dense_layer():
    _skip_on_jax_for_applications()
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3))
    df = diagnostics.variance_profile(model, _images(2), gradients=False)
    expected = [layer.name for layer in model.layers if isinstance(
        layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense))]
    assert len(df) == len(expected) == 53
    assert list(df["layer"]) == expected
    assert df["layer_type"].value_counts().to_dict() == {"Conv2D": 35, "DepthwiseConv2D": 17,
                                                         "Dense": 1}
    depthwise = df[df["layer_type"] == "DepthwiseConv2D"]
    assert (depthwise["fan_in"] == 9).all()   # 3x3 taps of one channel, not 9 * channels
    assert np.isfinite(df["forward_var"]).all()


def test_resnet50_backbone_lists_every_conv_with_its_path():
    _skip_on_jax_for_applications()
    backbone = keras.applications.ResNet50(include_top=False, weights=None,
                                           input_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(features))
    df = diagnostics.variance_profile(model, _images(2), gradients=False)
    convs = [f"resnet50/{layer.name}" for layer in backbone.layers
             if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 53 and len(df) == 54 and df["layer"].iloc[-1] == "head"
    assert sorted(df["layer"][:-1]) == sorted(convs)   # in call order
    assert "resnet50/conv2_block1_1_conv" in set(df["layer"])


def test_mobilenet_v2_lsuv_then_fit_with_layer_stats_logger():
    """The issue's application row end to end: LSUV calibrates all 53 weight layers of
    MobileNetV2, and a fit logs every Conv2D, DepthwiseConv2D, Dense, ReLU and batch norm
    call, with the calibrated unit variance visible at step 0 (convolutions feed batch norm, so their own
    output keeps LSUV's scale)."""
    _skip_on_jax_for_applications()
    from keras_varinit import lsuv
    from keras_varinit.applications import build_application
    from keras_varinit.callbacks import LayerStatsLogger

    model = build_application("MobileNetV2")
    x, y = _images(32, seed=3), np.random.default_rng(3).integers(0, 10, 32)
    report = lsuv(model, x[:16], seed=0)
    assert len(report) == 53 and report["converged"].all()
    np.testing.assert_allclose(report["final_variance"], 1.0, atol=0.02)
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logger = LayerStatsLogger((x[:16], y[:16]))
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[logger], verbose=0)
    df = logger.to_dataframe()
    assert sorted(df["step"].unique()) == [0, 2]
    counts = df[df["step"] == 0]["layer_type"].value_counts().to_dict()
    assert counts == {"Conv2D": 35, "ReLU": 35, "DepthwiseConv2D": 17, "Dense": 1,
                      "BatchNormalization": 52}
    assert np.isfinite(df[["activation_std", "activation_grad_std"]].to_numpy()).all()
    weights = df[df["layer_type"] != "ReLU"][["weight_std", "weight_grad_std"]]  # BN: gamma
    assert np.isfinite(weights.to_numpy()).all()
    convs = df[(df["step"] == 0) & df["layer_type"].isin(["Conv2D", "DepthwiseConv2D"])]
    np.testing.assert_allclose(convs["activation_std"], 1.0, atol=0.1)


def _twin_models(seed=0):
    """A subclassed model with a nested block and a shared layer, and a Sequential twin that
    calls the same layer objects in the same order (same weights)."""
    init = keras.initializers.HeNormal(seed=seed)
    d1 = keras.layers.Dense(64, activation="relu", kernel_initializer=init, name="d1")
    shared = keras.layers.Dense(64, activation="relu", kernel_initializer=init, name="shared")
    head = keras.layers.Dense(10, kernel_initializer=init, name="head")

    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.block = keras.Sequential([d1], name="block")
            self.shared, self.head = shared, head

        def call(self, h):
            return self.head(self.shared(self.shared(self.block(h))))

    net = Net()
    net(np.zeros((2, 32), "float32"))
    twin = keras.Sequential([keras.Input((32,)), d1, shared, shared, head])
    return net, twin


def test_subclassed_profile_equals_its_sequential_twin_with_a_row_per_call():
    net, twin = _twin_models()
    x = np.random.default_rng(0).standard_normal((256, 32)).astype("float32")
    ours, reference = diagnostics.variance_profile(net, x), diagnostics.variance_profile(twin, x)
    assert list(ours["layer"]) == ["block/d1", "shared#1", "shared#2", "head"]
    assert list(reference["layer"]) == ["d1", "shared#1", "shared#2", "head"]
    columns = [c for c in diagnostics.COLUMNS if c != "layer"]
    pd.testing.assert_frame_equal(ours[columns], reference[columns], rtol=1e-5)
    one_step = (ours["forward_var"] / ours["predicted_forward_var"]).iloc[1:]
    assert one_step.between(0.5, 2.0).all()   # Kaiming, width 64: each call one step of 1


def test_depthwise_and_separable_fans_predict_the_measured_variance():
    """One-step forward predictions within 25% on depthwise and separable convolutions (16
    channels): with Keras's fan convention for the depthwise kernel (fan_in = 9 * 16) they
    would be 16x off, with its fans swapped 2x (depth multiplier 2). (The backward one-step
    is not asserted here: behind global pooling the gradient is the same at every position,
    so a few dozen per-channel weight sums decide it, too noisy for a test.)"""
    normal = keras.initializers.RandomNormal(stddev=0.1, seed=1)
    inputs = keras.Input((16, 16, 16))
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="valid",
                                     depthwise_initializer=normal, name="dw")(inputs)
    h = keras.layers.SeparableConv2D(24, 3, depth_multiplier=2, padding="valid",
                                     depthwise_initializer=normal,
                                     pointwise_initializer=normal, name="sep")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(h))
    df = diagnostics.variance_profile(model, _images(64, shape=(16, 16, 16)))
    dw, sep = df.iloc[0], df.iloc[1]
    assert (dw["fan_in"], dw["fan_out"]) == (9, 18)
    assert (sep["fan_in"], sep["fan_out"]) == (9 * 32 * 2, 9 * 2 * 24)
    assert dw["forward_var"] / dw["predicted_forward_var"] == pytest.approx(1.0, rel=0.25)
    assert sep["forward_var"] / sep["predicted_forward_var"] == pytest.approx(1.0, rel=0.25)
    keras_convention = propagation.one_step_forward(9 * 16, dw["weight_var"],
                                                    dw["input_second_moment"])
    assert dw["forward_var"] / keras_convention < 0.1


def test_nan_in_the_batch_is_refused_with_the_count():
    model = models.plain_cnn(3, width=2, seed=0)
    x = _images(4)
    x[0, 0, 0, :] = np.nan
    x[1, 0, 0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"variance_profile needs a finite batch. Received: x "
                                         r"with 4 non-finite value\(s\) \(3 NaN, 1 Inf\)"):
        diagnostics.variance_profile(model, x)


def test_float32_overflow_is_a_failure_verdict_not_nan_ratios():
    """60 ReLU layers of width 64 with N(0, 1) weights: the variance grows 32x a layer; the
    activations themselves overflow float32 (3.4e38, a variance of 1e77) near layer 51. (The
    variance is reduced without squaring in float32, so 1e43 at layer 30 is still measured.)"""
    init = keras.initializers.RandomNormal(stddev=1.0, seed=0)
    model = keras.Sequential([keras.Input((64,))] + [
        keras.layers.Dense(64, activation="relu", kernel_initializer=init) for _ in range(59)]
        + [keras.layers.Dense(10, kernel_initializer=init)])
    x = np.random.default_rng(0).standard_normal((32, 64)).astype("float32")
    df = diagnostics.variance_profile(model, x)
    assert not np.isfinite(df["forward_var"]).all()
    verdict = profile_report.summarize_profile(df)
    assert verdict.level is profile_report.VerdictLevel.FAILURE
    assert "overflows (inf/NaN)" in verdict.text
    first = list(df["layer"]).index(profile_report.first_out_of_range(df))
    assert 45 <= first <= 55 and np.isfinite(df["forward_var"].iloc[:first]).all()
    assert df["forward_var"].iloc[first - 1] > 1e60


def test_save_and_load_after_a_profile_round_trip(tmp_path):
    model = models.plain_cnn(4, width=4, normalization="batch", seed=0)
    x = _images(8)
    expected = keras.ops.convert_to_numpy(model(x))
    diagnostics.variance_profile(model, x)
    model.save(tmp_path / "cnn.keras")
    loaded = keras.models.load_model(tmp_path / "cnn.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), expected, rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), expected, rtol=1e-6)


# --------------------------------------------------------------------------- labels the default
# loss cannot score (found by a user-style review): refused, not a silent zero gradient

def _mlp(units):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(units)(hidden))


def test_one_output_unit_is_refused_by_the_default_loss_and_works_with_loss():
    """Softmax over one logit is constant: every backward_var came out exactly 0 (read
    downstream as a vanished gradient)."""
    x = np.random.default_rng(0).standard_normal((16, 6)).astype("float32")
    with pytest.raises(ValueError, match="output has 1 unit .* no gradient.*loss="):
        diagnostics.variance_profile(_mlp(1), x)
    y = np.random.default_rng(1).standard_normal((16, 1)).astype("float32")
    df = diagnostics.variance_profile(_mlp(1), x, y=y, loss="mean_squared_error")
    assert (df["backward_var"] > 0).all()


@pytest.mark.parametrize("labels, match", [
    (np.full(8, 7), "labels need at least 8"),          # out of range for 3 units
    (np.linspace(-1, 1, 8), "needs class labels"),      # regression targets
    (-np.ones(8, dtype=int), "must be >= 0"),
    (np.eye(4, dtype="float32")[np.arange(8) % 4], "labels need exactly 4"),   # one-hot width
])
def test_labels_that_do_not_fit_the_output_are_refused(labels, match):
    """Once a deep TensorFlow error, and on JAX a silent zero or wrong gradient."""
    x = np.random.default_rng(0).standard_normal((8, 6)).astype("float32")
    with pytest.raises(ValueError, match=match):
        diagnostics.variance_profile(_mlp(3), x, y=labels)


def _runs_channels_first_convolutions():
    """TensorFlow's CPU Conv2D takes channels_first (NCHW) only through oneDNN, which TF turns
    on by the CPU it finds (off on some AMD CPUs): there Keras cannot run the layer at all."""
    try:
        keras.layers.Conv2D(1, 1, data_format="channels_first")(np.zeros((1, 1, 2, 2), "float32"))
    except Exception as error:  # noqa: BLE001 -- tf.errors.UnimplementedError on TensorFlow
        if "NHWC" in str(error):
            return False
        raise
    return True


def test_global_pooling_prediction_is_the_same_in_both_data_formats():
    """The backward factor of a global average pooling divides by its spatial size: read
    from the last axes of a channels_first input, it was 16x off on (32, 8, 8)."""
    if not _runs_channels_first_convolutions():
        pytest.skip("this TensorFlow build runs no channels_first Conv2D on this CPU")
    x = np.random.default_rng(0).standard_normal((16, 8, 8, 4)).astype("float32")
    predicted = {}
    for fmt, data in (("channels_last", x), ("channels_first", x.transpose(0, 3, 1, 2))):
        inputs = keras.Input(data.shape[1:])
        h = keras.layers.Conv2D(8, 3, padding="same", data_format=fmt,
                                kernel_initializer=keras.initializers.HeNormal(1))(inputs)
        h = keras.layers.GlobalAveragePooling2D(data_format=fmt)(h)
        out = keras.layers.Dense(10, kernel_initializer=keras.initializers.HeNormal(2))(h)
        df = diagnostics.variance_profile(keras.Model(inputs, out), data)
        predicted[fmt] = df["predicted_backward_var"].iloc[0] / df["backward_var"].iloc[0]
    assert predicted["channels_first"] == pytest.approx(predicted["channels_last"], rel=1e-3)


def test_loss_seed_and_training_arguments_are_checked():
    x = np.random.default_rng(0).standard_normal((8, 6)).astype("float32")
    with pytest.raises(ValueError, match="`loss` must be a Keras loss name.*loss='nope'"):
        diagnostics.variance_profile(_mlp(3), x, loss="nope")
    with pytest.raises(ValueError, match="`seed` must be a non-negative integer.*seed=-1"):
        diagnostics.variance_profile(_mlp(3), x, seed=-1)
    with pytest.raises(ValueError, match="`training` must be True or False.*'no'"):
        diagnostics.variance_profile(_mlp(3), x, training="no")


# --------------------------------------------------------------------------- predictions the
# recursion once got wrong (grouped convs, BN after the activation, dropout, border taps)

def _kaiming(seed):
    from keras_varinit import initializers

    return initializers.KaimingNormal(seed=seed)


def _predicted_over_measured(df, row, column, cumulative=False):
    predicted = f"predicted_{column}" + ("_cumulative" if cumulative else "")
    return df[predicted].iloc[row] / df[column].iloc[row]


def test_a_grouped_convolution_reaches_out_over_groups_outputs():
    """Each input channel of Conv2D(groups=8) feeds 1/8 of the outputs: fan_out = 9 * 32 / 8.
    Ignoring groups predicted a gradient 7.7x the measured one."""
    model = keras.Sequential([
        keras.Input((12, 12, 32)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu",
                            kernel_initializer=_kaiming(1)),
        keras.layers.Conv2D(32, 3, padding="same", groups=8, activation="relu",
                            kernel_initializer=_kaiming(2)),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, kernel_initializer=_kaiming(3))])
    x = np.random.default_rng(0).standard_normal((128, 12, 12, 32)).astype("float32")
    df = diagnostics.variance_profile(model, x)
    assert df["fan_out"].iloc[1] == 9 * 32 // 8
    assert 0.7 < _predicted_over_measured(df, 0, "backward_var") < 1.4


def test_batch_norm_after_the_activation_restarts_the_recursion():
    """Dense -> ReLU -> BN(gamma=3) -> Dense: the next layer sees E[x^2] = 9, not the ReLU's."""
    model = keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(256, kernel_initializer=_kaiming(1)),
        keras.layers.ReLU(),
        keras.layers.BatchNormalization(gamma_initializer=keras.initializers.Constant(3.0)),
        keras.layers.Dense(256, kernel_initializer=_kaiming(2)), keras.layers.ReLU(),
        keras.layers.Dense(10, kernel_initializer=_kaiming(3))])
    x = np.random.default_rng(0).standard_normal((512, 64)).astype("float32")
    df = diagnostics.variance_profile(model, x)
    for row in (1, 2):
        assert 0.8 < _predicted_over_measured(df, row, "forward_var", cumulative=True) < 1.25, df


@pytest.mark.parametrize("training, factor", [(True, 2.0), (False, 1.0)])
def test_dropout_scales_both_directions_by_one_over_keep_in_training_mode(training, factor):
    """Dropout(0.5) is active in the profile's default training mode: E[(m x)^2] = 2 E[x^2],
    and the gradient is scaled alike (it was taken as neutral: forward 4.2 predicted 2.0)."""
    model = keras.Sequential([
        keras.Input((256,)),
        keras.layers.Dense(256, activation="relu", kernel_initializer=_kaiming(1)),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(256, activation="relu", kernel_initializer=_kaiming(2)),
        keras.layers.Dense(10, kernel_initializer=_kaiming(3))])
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((1024, 256)).astype("float32")
    df = diagnostics.variance_profile(model, x, training=training)
    assert df["forward_var"].iloc[1] / df["forward_var"].iloc[0] == pytest.approx(factor, rel=0.15)
    assert 0.85 < _predicted_over_measured(df, 1, "forward_var", cumulative=True) < 1.15
    assert 0.8 < _predicted_over_measured(df, 0, "backward_var") < 1.25


@pytest.mark.parametrize("padding, size, kernel, expected", [
    ("valid", 5, 5, 1 / 25), ("valid", 8, 3, (6 / 8) ** 2), ("same", 8, 3, (22 / 24) ** 2)])
def test_the_backward_prediction_counts_the_taps_inside_the_input(padding, size, kernel,
                                                                 expected):
    """The gradient reaching a border position comes from fewer outputs: "valid" 5x5 on 5x5
    (one output) was predicted 25x too large."""
    model = keras.Sequential([
        keras.Input((size, size, 16)),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu",
                            kernel_initializer=_kaiming(1)),
        keras.layers.Conv2D(64, kernel, padding=padding, activation="relu",
                            kernel_initializer=_kaiming(2)),
        keras.layers.Flatten(), keras.layers.Dense(10, kernel_initializer=_kaiming(3))])
    x = np.random.default_rng(0).standard_normal((256, size, size, 16)).astype("float32")
    df = diagnostics.variance_profile(model, x)
    assert diagnostics._backward_padding(_FakeRecord(model.layers[1], (None, size, size, 64))) \
        == pytest.approx(expected)
    assert 0.85 < _predicted_over_measured(df, 0, "backward_var") < 1.15


class _FakeRecord:
    def __init__(self, layer, input_shape):
        self.layer, self.input_shape = layer, input_shape


def test_the_segment_column_counts_the_normalizations_before_each_weight_layer():
    inputs = keras.Input((16,))
    h = keras.layers.Dense(16, name="d1")(inputs)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.Dense(16, activation="relu", name="d2")(keras.layers.ReLU()(h))
    h = keras.layers.Dense(16, activation="relu", name="d3")(h)
    h = keras.layers.LayerNormalization(name="ln")(h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(h))
    x = np.random.default_rng(0).standard_normal((64, 16)).astype("float32")
    df = diagnostics.variance_profile(model, x)
    assert list(df["layer"]) == ["d1", "d2", "d3", "head"]
    assert list(df["segment"]) == [0, 1, 1, 2]


def test_a_batch_norm_net_fed_raw_pixels_is_not_a_stall():
    """The first convolution sees pixels in [0, 255] (E[x^2] ~ 2e4), every later one a
    batch-normalized input: last/first falls about 10^-5x, which the verdict once read as
    'expect training to stall'. Batch norm restarts the scale, so it now compares only within
    the chains between normalization layers, and here there are none."""
    x = np.random.default_rng(0).uniform(0, 255, size=(16, 32, 32, 3)).astype("float32")
    model = models.plain_cnn(6, normalization="batch", seed=0)
    df = diagnostics.variance_profile(model, x)
    assert _hidden_ratio(df) < 1e-3
    assert list(df["segment"]) == [0, 1, 2, 3, 4, 5]
    verdict = profile_report.summarize_profile(df)
    assert verdict.level is profile_report.VerdictLevel.OK, verdict
    assert "restarts at each of the 4 normalization layers between conv_01 and conv_05" \
        in verdict.text


def test_follows_previous_marks_parallel_branches(gated_residual):
    """A residual block with a squeeze-and-excitation gate and a shortcut convolution: the
    gate continues b's path (it pools b's output), the shortcut does not take the previous
    weight layer's output (it reads the block's input), nor does the layer after the residual
    add."""
    df = diagnostics.variance_profile(gated_residual, _images(8, shape=(6, 6, 3)))
    follows = dict(zip(df["layer"], df["follows_previous"]))
    assert follows == {"stem": False, "a": True, "b": True, "se_reduce": True,
                       "se_expand": True, "shortcut": False, "after": False, "logits": True}
    assert list(df["segment"]) == [0, 1, 1, 1, 1, 1, 1, 1]
    assert list(profile_report.stretch_ids(df)) == [0, 1, 1, 1, 1, 2, 3, 3]
