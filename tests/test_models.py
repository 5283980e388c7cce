"""keras_varinit.models: layer counts, shapes, initializer/activation/BN wiring, errors."""
import math

import keras
import numpy as np
import pytest

from keras_varinit import initializers, models

pytestmark = pytest.mark.backend_independent


def _weights(model):
    return models.weight_layers(model)


@pytest.mark.parametrize("depth", [2, 3, 4, 7, 22, 30])
def test_cnn_has_exactly_depth_weight_layers(depth):
    model = models.plain_cnn(depth, width=4, seed=0)
    layers = _weights(model)
    assert len(layers) == depth
    assert [l.name for l in layers[:-1]] == [f"conv_{i:02d}" for i in range(1, depth)]
    assert layers[-1].name == "logits" and isinstance(layers[-1], keras.layers.Dense)
    assert model.output_shape == (None, 10)
    # no skip connections: every layer has exactly one inbound layer, a chain
    convs = [l for l in layers if isinstance(l, keras.layers.Conv2D)]
    assert all(c.kernel.shape[:2] == (3, 3) and c.padding == "same" for c in convs)


def test_cnn_stages_widths_and_downsampling():
    model = models.plain_cnn(30, width=8, seed=0)
    convs = [l for l in _weights(model) if isinstance(l, keras.layers.Conv2D)]
    filters = [c.filters for c in convs]
    assert filters == [8] * 10 + [16] * 10 + [32] * 9
    strides = [tuple(c.strides) for c in convs]
    assert [i for i, s in enumerate(strides) if s == (2, 2)] == [10, 20]
    assert model.get_layer("conv_29").output.shape[1:] == (8, 8, 32)
    assert model.get_layer("gap").output.shape[1:] == (32,)
    assert all(c.use_bias for c in convs)
    x = np.zeros((2, 32, 32, 3), "float32")
    assert model(x).shape == (2, 10)


def test_cnn_maxpool_downsampling_keeps_depth():
    model = models.plain_cnn(8, width=4, downsample="maxpool", seed=0)
    assert len(_weights(model)) == 8
    names = [l.name for l in model.layers]
    assert "pool_2" in names and "pool_3" in names
    assert all(tuple(c.strides) == (1, 1) for c in _weights(model)[:-1])
    assert model.get_layer("conv_07").output.shape[1:] == (8, 8, 16)


def test_pre_activations_observable_and_names():
    model = models.plain_cnn(4, width=4, activation="tanh", seed=0)
    names = [l.name for l in model.layers]
    assert names == ["input", "conv_01", "act_01", "conv_02", "act_02", "conv_03", "act_03",
                     "gap", "logits"]
    for layer in _weights(model):
        assert layer.activation is keras.activations.linear
    assert model.get_layer("act_01").activation is keras.activations.tanh


@pytest.mark.parametrize("activation", models.ACTIVATIONS)
def test_every_activation_builds_and_runs(activation):
    model = models.plain_cnn(3, width=2, activation=activation, seed=0)
    out = model(np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32"))
    assert out.shape == (2, 10) and np.all(np.isfinite(keras.ops.convert_to_numpy(out)))


def test_leaky_relu_slope_is_used_by_layer_and_kaiming_gain():
    model = models.plain_cnn(3, width=2, activation="leaky_relu", negative_slope=0.1, seed=0)
    act = model.get_layer("act_01")
    assert isinstance(act, keras.layers.LeakyReLU) and math.isclose(act.negative_slope, 0.1)
    init = model.get_layer("conv_02").kernel_initializer
    assert init.nonlinearity == "leaky_relu" and math.isclose(init.negative_slope, 0.1)
    assert models.DEFAULT_NEGATIVE_SLOPE == 0.2
    default = models.plain_cnn(3, width=2, activation="leaky_relu", seed=0)
    assert math.isclose(default.get_layer("act_01").negative_slope, 0.2)
    assert math.isclose(default.get_layer("conv_02").kernel_initializer.negative_slope, 0.2)


@pytest.mark.parametrize("activation,scale", [
    ("relu", 2.0), ("leaky_relu", 2.0 / 1.25), ("tanh", 25.0 / 9.0), ("linear", 1.0)])
def test_kaiming_name_follows_activation_in_the_weights(activation, scale):
    """Empirical Var[W] * fan_in of a wide conv equals gain(activation)^2 (within 3%)."""
    model = models.plain_cnn(3, width=64, activation=activation, negative_slope=0.5, seed=0)
    kernel = keras.ops.convert_to_numpy(model.get_layer("conv_02").kernel)  # 3x3x64x128
    fan_in = 9 * 64
    assert kernel.shape == (3, 3, 64, 128)
    assert abs(np.var(kernel) * fan_in / scale - 1) < 0.03
    # a swapped gain (e.g. relu's 2 for tanh) would be off by >= 4%
    assert abs(np.var(kernel) * fan_in / (2.0 if activation != "relu" else 1.0) - 1) > 0.03


def test_xavier_weights_and_mlp():
    model = models.plain_mlp(3, width=512, input_dim=128, seed=0)
    w1 = keras.ops.convert_to_numpy(model.get_layer("dense_01").kernel)  # 128 x 512
    assert abs(np.var(w1) * (128 + 512) / 2 - 1) < 0.03
    assert abs(np.var(w1) * 128 - 1) > 0.5  # fan_in alone would not match


def test_first_layer_initializer_is_linear_kaiming():
    model = models.plain_cnn(3, width=64, first_layer_initializer="kaiming_normal", seed=0)
    first = model.get_layer("conv_01").kernel_initializer
    assert isinstance(first, initializers.Kaiming) and first.nonlinearity == "linear"
    k1 = keras.ops.convert_to_numpy(model.get_layer("conv_01").kernel)  # 3x3x3x64, fan_in 27
    assert abs(np.var(k1) * 27 - 1) < 0.06
    assert model.get_layer("conv_02").kernel_initializer.nonlinearity == "relu"


def test_seeds_reproducible_and_layers_distinct():
    a = models.plain_cnn(8, width=4, seed=3)  # conv_02 and conv_03 both 3x3x4x4
    b = models.plain_cnn(8, width=4, seed=3)
    c = models.plain_cnn(8, width=4, seed=4)
    wa = [keras.ops.convert_to_numpy(w) for w in a.trainable_weights]
    wb = [keras.ops.convert_to_numpy(w) for w in b.trainable_weights]
    wc = [keras.ops.convert_to_numpy(w) for w in c.trainable_weights]
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb))
    assert not np.array_equal(wa[0], wc[0])
    k2 = keras.ops.convert_to_numpy(a.get_layer("conv_02").kernel)
    k3 = keras.ops.convert_to_numpy(a.get_layer("conv_03").kernel)
    assert not np.allclose(k2, k3)  # same shape, different draws


def test_initializer_instance_and_fixed_normal_pass_through():
    model = models.plain_cnn(3, width=32, kernel_initializer="normal:0.01", seed=0)
    k = keras.ops.convert_to_numpy(model.get_layer("conv_02").kernel)
    assert abs(np.std(k) / 0.01 - 1) < 0.05
    init = initializers.KaimingNormal(nonlinearity="tanh", seed=5)
    model = models.plain_cnn(8, width=4, kernel_initializer=init, activation="relu")
    k2 = keras.ops.convert_to_numpy(model.get_layer("conv_02").kernel)
    k3 = keras.ops.convert_to_numpy(model.get_layer("conv_03").kernel)
    assert model.get_layer("conv_02").kernel_initializer.nonlinearity == "tanh"  # as given
    assert k2.shape == k3.shape and not np.allclose(k2, k3)  # re-seeded per layer


def test_mlp_layers_flatten_and_shapes():
    model = models.plain_mlp(5, width=16, seed=0)
    assert model.input_shape == (None, 3072)
    assert [l.name for l in _weights(model)] == ["dense_01", "dense_02", "dense_03",
                                                 "dense_04", "logits"]
    image = models.plain_mlp(4, width=8, input_shape=(32, 32, 3), seed=0)
    assert image.get_layer("flatten") is not None and image.input_shape == (None, 32, 32, 3)
    assert len(_weights(image)) == 4
    assert image(np.zeros((2, 32, 32, 3), "float32")).shape == (2, 10)


def test_presets_and_build_model():
    assert set(models.PRESETS) == {"large22", "small30"}
    small = models.reference_cnn("small30", width=2, seed=0)
    assert len(_weights(small)) == 30
    large = models.reference_cnn("large22", width=2, seed=0)
    assert len(_weights(large)) == 22
    assert models.PRESETS["large22"]["width"] > models.PRESETS["small30"]["width"]
    assert len(_weights(models.build_model("cnn", depth=5, width=2))) == 5
    assert len(_weights(models.build_model("mlp", depth=5, width=2))) == 5
    assert len(_weights(models.build_model("cnn", preset="small30", width=2))) == 30


@pytest.mark.parametrize("estimator", ["pooled", "per_sample"])
def test_batch_norm_wiring(estimator):
    pytest.importorskip("keras_varinit.layers")
    from keras_varinit.layers import BatchNormalization

    model = models.plain_cnn(4, width=4, batch_norm=estimator, seed=0)
    names = [l.name for l in model.layers]
    assert names[1:4] == ["conv_01", "bn_01", "act_01"]
    bn = model.get_layer("bn_01")
    assert isinstance(bn, BatchNormalization) and bn.variance_estimator == estimator
    assert not model.get_layer("conv_01").use_bias
    assert model(np.zeros((2, 32, 32, 3), "float32")).shape == (2, 10)


def test_mlp_pooled_batch_norm():
    pytest.importorskip("keras_varinit.layers")
    model = models.plain_mlp(3, width=8, batch_norm="pooled", seed=0)
    assert [l.name for l in model.layers][1:4] == ["dense_01", "bn_01", "act_01"]


@pytest.mark.parametrize("kwargs,match", [
    ({"depth": 1}, "depth=1"),
    ({"depth": 2.5}, "depth=2.5"),
    ({"depth": 3, "width": 0}, "width=0"),
    ({"depth": 3, "activation": "gelu"}, "activation='gelu'"),
    ({"depth": 3, "batch_norm": "group"}, "batch_norm='group'"),
    ({"depth": 3, "downsample": "avg"}, "downsample='avg'"),
    ({"depth": 3, "negative_slope": -0.1}, "negative_slope=-0.1"),
    ({"depth": 3, "input_shape": (32, 32)}, "input_shape"),
    ({"depth": 3, "kernel_initializer": "no_such_init"}, "no_such_init"),
])
def test_cnn_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        models.plain_cnn(**kwargs)
    assert "Received" in str(info.value)


def test_mlp_bad_input():
    with pytest.raises(ValueError, match="per_sample.*Allowed: None, 'pooled'"):
        models.plain_mlp(3, batch_norm="per_sample")
    with pytest.raises(ValueError, match="Received: depth=1. Allowed"):
        models.plain_mlp(1)
    with pytest.raises(ValueError, match="activation='softmax'"):
        models.plain_mlp(3, activation="softmax")
    with pytest.raises(ValueError, match="preset='small30'"):
        models.build_model("mlp", depth=3, preset="small30")
    with pytest.raises(ValueError, match="kind='rnn'.*Allowed"):
        models.build_model("rnn", depth=3)
    with pytest.raises(ValueError, match="name='huge'.*Allowed"):
        models.reference_cnn("huge")


def test_nearby_seeds_share_no_layer():
    """With `seed + i` per layer, seed 1's layer i would repeat seed 0's layer i + 1 (same
    shape inside a stage): multi-seed studies would average shifted copies of one net."""
    from keras_varinit import models as m

    a = m.plain_cnn(8, width=4, seed=0)
    b = m.plain_cnn(8, width=4, seed=1)
    kernels_a = [np.asarray(layer.kernel) for layer in a.layers if hasattr(layer, "kernel")]
    kernels_b = [np.asarray(layer.kernel) for layer in b.layers if hasattr(layer, "kernel")]
    for kb in kernels_b:
        assert not any(ka.shape == kb.shape and np.array_equal(ka, kb) for ka in kernels_a)
    again = m.plain_cnn(8, width=4, seed=1)
    for k, layer in zip(kernels_b, [x for x in again.layers if hasattr(x, "kernel")]):
        np.testing.assert_array_equal(k, np.asarray(layer.kernel))
    assert len({m.layer_seed(s, i) for s in range(50) for i in range(1, 40)}) == 50 * 39
