"""keras_varinit.models: layer counts, shapes, initializer/activation/normalization wiring,
errors."""
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


# --------------------------------------------------------------------------- normalization

CHOICES = [("cnn", n) for n in models.NORMALIZATIONS] + \
    [("mlp", n) for n in models.MLP_NORMALIZATIONS]


def _build(kind, normalization, seed=0):
    if kind == "cnn":
        return models.plain_cnn(4, width=4, normalization=normalization, groups=2, seed=seed,
                                input_shape=(8, 8, 3))
    return models.plain_mlp(3, width=8, normalization=normalization, groups=2, seed=seed,
                            input_dim=12)


@pytest.mark.parametrize("kind,normalization", CHOICES)
def test_each_normalization_builds_trains_and_round_trips(kind, normalization, tmp_path):
    """Built before every activation, one optimizer step changes the weights, and the saved
    .keras file gives back the same network (same outputs, same layer classes)."""
    model = _build(kind, normalization)
    shape = (16, 8, 8, 3) if kind == "cnn" else (16, 12)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype("float32")
    y = rng.integers(0, 10, 16).astype("int32")
    names = [layer.name for layer in model.layers]
    hidden = [n for n in names if n.startswith(("conv_", "dense_"))]
    prefix = {"none": None, "batch": "bn", "batch_per_sample": "bn", "layer": "ln",
              "instance": "in", "group": "gn"}[normalization]
    for i, weight in enumerate(hidden, start=1):
        after = names[names.index(weight) + 1]
        assert after == (f"{prefix}_{i:02d}" if prefix else f"act_{i:02d}")
        assert model.get_layer(weight).use_bias == (normalization == "none")
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [np.array(w) for w in model.get_weights()]
    model.train_on_batch(x, y)
    assert any(not np.array_equal(b, np.array(a)) for b, a in zip(before, model.get_weights()))
    path = tmp_path / f"{kind}_{normalization}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(l) for l in loaded.layers] == [type(l) for l in model.layers]
    np.testing.assert_allclose(np.array(loaded(x, training=False)),
                               np.array(model(x, training=False)), rtol=1e-5, atol=1e-5)


def test_layer_group_instance_are_keras_layers():
    from keras_varinit.layers import BatchNormalization

    cnn = {n: _build("cnn", n) for n in ("batch", "batch_per_sample", "layer", "instance",
                                          "group")}
    assert cnn["batch"].get_layer("bn_01").variance_estimator == "pooled"
    assert isinstance(cnn["batch"].get_layer("bn_01"), BatchNormalization)
    assert cnn["batch_per_sample"].get_layer("bn_01").variance_estimator == "per_sample"
    ln = cnn["layer"].get_layer("ln_01")
    assert type(ln) is keras.layers.LayerNormalization and list(ln.axis) == [1, 2, 3]
    channels = [4, 8, 16]   # width 4: one convolution per stage
    for i, c in enumerate(channels, start=1):
        inst = cnn["instance"].get_layer(f"in_{i:02d}")
        assert type(inst) is keras.layers.GroupNormalization and inst.groups == c
        group = cnn["group"].get_layer(f"gn_{i:02d}")
        assert type(group) is keras.layers.GroupNormalization and group.groups == 2
    mlp_ln = _build("mlp", "layer").get_layer("ln_01")
    assert type(mlp_ln) is keras.layers.LayerNormalization and list(mlp_ln.axis) == [-1]


# The axes each normalization averages over, for a (N, H, W, C) output, and what a channel
# group is: checked on the layer's output at initialization (gamma 1, beta 0).
_SETS = {"batch": (0, 1, 2), "layer": (1, 2, 3), "instance": (1, 2)}


@pytest.mark.parametrize("normalization", ["batch", "layer", "instance", "group"])
def test_each_normalization_averages_over_its_own_set(normalization):
    """Zero mean and unit variance over exactly the set of Wu & He's Fig. 2, and not over a
    neighbouring one (inputs with a different offset per sample and per channel)."""
    model = models.plain_cnn(2, width=4, normalization=normalization, groups=2, seed=0,
                             input_shape=(6, 6, 3))
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 6, 6, 3)) * rng.uniform(0.5, 3, (8, 1, 1, 3))
         + rng.uniform(-4, 4, (8, 1, 1, 3))).astype("float32")
    prefix = {"batch": "bn", "layer": "ln", "instance": "in", "group": "gn"}[normalization]
    probe = keras.Model(model.input, model.get_layer(f"{prefix}_01").output)
    out = np.asarray(probe(x, training=True), dtype="float64")
    axes = _SETS.get(normalization, (1, 2, 4))
    if normalization == "group":
        out = out.reshape(8, 6, 6, 2, 2)      # (N, H, W, group, channel in the group)
    np.testing.assert_allclose(out.mean(axis=axes), 0, atol=1e-4)
    np.testing.assert_allclose(out.var(axis=axes), 1, atol=2e-2)
    # A finer set is not centred: per sample and channel (batch, group), per position over
    # the channels (layer: Keras's default axis=-1 would centre that one instead).
    finer = {"batch": (1, 2), "layer": (3,), "group": (1, 2)}.get(normalization)
    if finer:
        assert np.abs(out.mean(axis=finer)).max() > 0.1


@pytest.mark.parametrize("kind,normalization,groups,width,match", [
    ("mlp", "instance", 2, 8, r"Instance normalization needs spatial positions.*"
                              r"Received: normalization='instance'. Allowed: 'none', 'batch', "
                              r"'layer', 'group' for an MLP"),
    ("mlp", "batch_per_sample", 2, 8, r"Per-sample batch normalization needs spatial.*"
                                      r"Received: normalization='batch_per_sample'"),
    ("cnn", "group", 8, 12, r"into 8 equal groups.*\(12/24/48 for this CNN of width 12\)"
                            r".*Received: groups=8. Allowed: 1, 2, 3, 4, 6, 12"),
    ("cnn", "group", 3, 4, r"Received: groups=3. Allowed: 1, 2, 4"),
    ("mlp", "group", 3, 8, r"\(8 for this MLP of width 8\).*Received: groups=3"),
    ("cnn", "group", 0, 8, r"Received: groups=0. Allowed: an integer >= 1"),
    ("cnn", "pooled", 2, 8, r"Received: normalization='pooled'. Allowed: 'none', 'batch', "
                            r"'batch_per_sample', 'layer', 'instance', 'group'"),
    ("cnn", None, 2, 8, r"Received: normalization=None"),
])
def test_nonsense_normalizations_are_refused(kind, normalization, groups, width, match):
    with pytest.raises(ValueError, match=match):
        models.check_normalization(kind, normalization, width, groups)
    build = models.plain_cnn if kind == "cnn" else models.plain_mlp
    with pytest.raises(ValueError, match=match):
        build(3, width=width, normalization=normalization, groups=groups)


def test_groups_matter_only_for_group_norm():
    assert models.check_normalization("cnn", "layer", 12, groups=8) == "layer"
    assert models.check_normalization("cnn", "group", 12, groups=4) == "group"
    assert models.stage_widths("cnn", 12) == [12, 24, 48]
    assert models.plain_cnn(3, width=12, normalization="instance", groups=5) is not None


@pytest.mark.parametrize("kwargs,match", [
    ({"depth": 1}, "depth=1"),
    ({"depth": 2.5}, "depth=2.5"),
    ({"depth": 3, "width": 0}, "width=0"),
    ({"depth": 3, "activation": "gelu"}, "activation='gelu'"),
    ({"depth": 3, "normalization": "pooled"}, "normalization='pooled'"),
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
    with pytest.raises(ValueError, match="per_sample.*Allowed: 'none', 'batch', 'layer'"):
        models.plain_mlp(3, normalization="batch_per_sample")
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
