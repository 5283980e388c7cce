"""Initializers: fans, gains, Xavier/Kaiming/TorchDefault statistics, get(), serialization, seeds.

Every statistical check uses shapes whose fan_in and fan_out differ by >= 8x and expected values
written out by hand, so a swapped fan, a wrong gain or a missing truncation correction fails.
"""
import contextlib
import math
import re

import keras
import numpy as np
import pytest
from scipy import stats

from keras_varinit import initializers as I
from keras_varinit.initializers import NAMES, compute_fans, gain, get

pytestmark = pytest.mark.backend_independent

# (shape, fan_in, fan_out), written by hand. Dense: 256 in, 2048 out. Conv2D 3x3, 64 -> 512.
DENSE = ((256, 2048), 256, 2048)
CONV = ((3, 3, 64, 512), 9 * 64, 9 * 512)
SMALL = (32, 64)  # one small shape everywhere: JAX compiles each op once per shape
SHAPES = pytest.mark.parametrize("shape,fan_in,fan_out", [DENSE, CONV], ids=["dense", "conv2d"])
MODES = ("fan_in", "fan_out", "fan_avg")
DISTS = ("normal", "truncated_normal", "uniform")
TRUNC = 0.87962566103423978


class Cases:
    """Many checks in one test (each pytest test pays a clear_session teardown): every failing
    case is collected and reported by its label."""

    def __init__(self):
        self.failures = []

    @contextlib.contextmanager
    def case(self, label):
        try:
            yield
        except (AssertionError, pytest.fail.Exception) as err:
            self.failures.append(f"{label}: {err}")

    def check(self):
        assert not self.failures, "\n".join(self.failures)


def draw(init, shape, dtype=None):
    return np.asarray(keras.ops.convert_to_numpy(init(shape, dtype=dtype)), dtype=np.float64)


def expected_var(scale, mode, fan_in, fan_out):
    return {"fan_in": scale / fan_in, "fan_out": scale / fan_out,
            "fan_avg": 2.0 * scale / (fan_in + fan_out)}[mode]


def assert_var(w, var):
    assert abs(w.mean()) < 0.01 * math.sqrt(var)
    assert w.var() == pytest.approx(var, rel=0.02), (w.var(), var)


def assert_support(w, dist, var):
    std = math.sqrt(var)
    top = np.abs(w).max()
    if dist == "uniform":
        a = math.sqrt(3.0) * std
        assert top <= a * (1 + 1e-6) and top > 0.99 * a
    elif dist == "truncated_normal":
        sigma = std / TRUNC
        assert top <= 2 * sigma * (1 + 1e-6) and top > 1.95 * sigma
    else:  # untruncated: on >= 250k draws the max |z| exceeds 4 almost surely
        assert top > 4 * std


# ---------------------------------------------------------------- empirical variance, all cores
@SHAPES
def test_xavier_variance(shape, fan_in, fan_out):
    cases, g = Cases(), 5.0 / 3.0
    for mode in MODES:
        for dist in DISTS:
            with cases.case(f"Xavier({mode}, {dist}, gain=5/3)"):
                w = draw(I.Xavier(mode=mode, distribution=dist, gain=g, seed=1), shape)
                var = expected_var(g * g, mode, fan_in, fan_out)
                assert_var(w, var)
                assert_support(w, dist, var)
    cases.check()


@SHAPES
def test_kaiming_variance(shape, fan_in, fan_out):
    cases = Cases()
    for mode in MODES:
        for dist in DISTS:
            with cases.case(f"Kaiming({mode}, {dist}, relu)"):
                w = draw(I.Kaiming(mode=mode, distribution=dist, seed=2), shape)
                var = expected_var(2.0, mode, fan_in, fan_out)
                assert_var(w, var)
                assert_support(w, dist, var)
    cases.check()


@SHAPES
def test_kaiming_nonlinearity_variance(shape, fan_in, fan_out):
    cases = Cases()
    for nonlinearity, slope, scale in [
        ("relu", 0.0, 2.0),
        ("leaky_relu", 0.2, 2.0 / 1.04),
        ("leaky_relu", 0.0, 2.0),
        ("tanh", 0.0, 25.0 / 9.0),
        ("linear", 0.0, 1.0),
        ("sigmoid", 0.0, 1.0),
        ("selu", 0.0, 9.0 / 16.0),
    ]:
        with cases.case(f"Kaiming({nonlinearity}, {slope})"):
            init = I.Kaiming(nonlinearity=nonlinearity, negative_slope=slope,
                             distribution="uniform", seed=3)
            assert_var(draw(init, shape), scale / fan_in)
    cases.check()


NAMED = [
    ("XavierNormal", lambda: I.XavierNormal(seed=4), lambda fi, fo: 2.0 / (fi + fo), "normal"),
    ("XavierUniform", lambda: I.XavierUniform(seed=4), lambda fi, fo: 2.0 / (fi + fo),
     "uniform"),
    ("KaimingNormal", lambda: I.KaimingNormal(seed=4), lambda fi, fo: 2.0 / fi, "normal"),
    ("KaimingNormal(fan_out)", lambda: I.KaimingNormal(mode="fan_out", seed=4),
     lambda fi, fo: 2.0 / fo, "normal"),
    ("KaimingUniform", lambda: I.KaimingUniform(seed=4), lambda fi, fo: 2.0 / fi, "uniform"),
    ("KaimingUniform(fan_out)", lambda: I.KaimingUniform(mode="fan_out", seed=4),
     lambda fi, fo: 2.0 / fo, "uniform"),
    ("TorchDefault", lambda: I.TorchDefault(seed=4), lambda fi, fo: 1.0 / (3.0 * fi), "uniform"),
]


@SHAPES
def test_named_variance(shape, fan_in, fan_out):
    cases = Cases()
    for label, make, var_fn, dist in NAMED:
        with cases.case(label):
            w = draw(make(), shape)
            var = var_fn(fan_in, fan_out)
            assert_var(w, var)
            assert_support(w, dist, var)
    with cases.case("TorchDefault bound 1/sqrt(fan_in)"):
        top = np.abs(draw(I.TorchDefault(seed=5), shape)).max()
        assert 0.99 / math.sqrt(fan_in) < top <= 1.0 / math.sqrt(fan_in) * (1 + 1e-6)
    cases.check()


def test_variance_method_matches_hand_formula():
    assert I.XavierNormal().variance((256, 2048)) == pytest.approx(2.0 / 2304)
    assert I.KaimingNormal(mode="fan_out").variance((3, 3, 64, 512)) == pytest.approx(2.0 / 4608)
    assert I.TorchDefault().variance((100, 7)) == pytest.approx(1.0 / 300)


def test_dtype():
    # JAX has no float64 unless jax_enable_x64 is set
    wide = ["float64"] if keras.backend.backend() != "jax" else []
    for dtype in ["float16", "float32"] + wide:
        out = I.KaimingNormal(seed=0)(SMALL, dtype=dtype)
        assert keras.backend.standardize_dtype(out.dtype) == dtype
        assert tuple(out.shape) == SMALL
    assert keras.backend.standardize_dtype(I.XavierUniform(seed=0)(SMALL).dtype) == \
        keras.backend.floatx()


# ---------------------------------------------------------------- distribution shape (KS)
def _standardized(dist):
    w = draw(I.Kaiming(distribution=dist, seed=11), (256, 2048)).ravel()[:100_000]
    return w / math.sqrt(2.0 / 256)  # unit variance if correct


REFERENCE = {
    "normal": stats.norm().cdf,
    "truncated_normal": stats.truncnorm(-2, 2, scale=1 / TRUNC).cdf,
    "uniform": stats.uniform(loc=-math.sqrt(3), scale=2 * math.sqrt(3)).cdf,
}


def test_ks_shape():
    cases = Cases()
    for dist in DISTS:
        z = _standardized(dist)
        with cases.case(f"{dist} vs its own law"):
            assert stats.kstest(z, REFERENCE[dist]).pvalue > 1e-4
        for other in DISTS:
            if other != dist:  # the same variance but the wrong shape is rejected
                with cases.case(f"{dist} vs {other}"):
                    assert stats.kstest(z, REFERENCE[other]).pvalue < 1e-8
    cases.check()


def test_truncated_has_nothing_beyond_two_sigma_and_normal_has():
    sigma = 1 / TRUNC
    assert np.abs(_standardized("truncated_normal")).max() <= 2 * sigma * (1 + 1e-6)
    assert (np.abs(_standardized("normal")) > 2 * sigma).mean() > 0.01


# ---------------------------------------------------------------- fans
FANS = [
    ((), "keras", {}, (1, 1)),
    ((7,), "keras", {}, (7, 7)),
    ((10, 40), "keras", {}, (10, 40)),                        # Dense (in, out)
    ((40, 10), "torch", {}, (10, 40)),                        # Linear (out, in)
    ((5, 16, 64), "keras", {}, (80, 320)),                    # Conv1D k=5
    ((64, 16, 5), "torch", {}, (80, 320)),
    ((3, 3, 16, 64), "keras", {}, (144, 576)),                # Conv2D 3x3
    ((64, 16, 3, 3), "torch", {}, (144, 576)),
    ((3, 5, 16, 64), "keras", {}, (240, 960)),                # non-square
    ((64, 16, 3, 5), "torch", {}, (240, 960)),
    ((3, 3, 3, 8, 32), "keras", {}, (216, 864)),              # Conv3D
    ((32, 8, 3, 3, 3), "torch", {}, (216, 864)),
    # Conv2DTranspose 16 -> 64 channels: Keras (kh, kw, filters, in), torch (in, filters, kh, kw)
    ((3, 3, 64, 16), "keras", {"transpose": True}, (144, 576)),
    ((3, 3, 64, 16), "keras", {}, (576, 144)),                # Keras's own (unswapped) count
    ((16, 64, 3, 3), "torch", {"transpose": True}, (144, 576)),
    ((16, 64, 3, 3), "torch", {}, (576, 144)),                # torch.nn.init's own count
    # DepthwiseConv2D 3x3, 32 channels, multiplier 2: Keras (3, 3, 32, 2), torch (64, 1, 3, 3)
    ((3, 3, 32, 2), "keras", {}, (288, 18)),                  # Keras: channels in fan_in
    ((3, 3, 32, 2), "keras", {"depthwise": "keras"}, (288, 18)),
    ((3, 3, 32, 2), "keras", {"depthwise": "torch"}, (9, 576)),
    ((3, 3, 32, 2), "keras", {"depthwise": True}, (9, 576)),
    ((64, 1, 3, 3), "torch", {}, (9, 576)),                   # torch grouped conv
    ((64, 1, 3, 3), "torch", {"depthwise": "torch"}, (9, 576)),
    ((5, 32, 1), "keras", {"depthwise": "torch"}, (5, 160)),  # DepthwiseConv1D
]


def test_compute_fans():
    cases = Cases()
    for shape, layout, kwargs, expected in FANS:
        with cases.case(f"compute_fans({shape}, {layout!r}, **{kwargs})"):
            got = compute_fans(shape, layout, **kwargs)
            assert got == expected
            assert all(type(v) is int for v in got)
    cases.check()


def test_fans_of_real_keras_kernels():
    conv_t = keras.layers.Conv2DTranspose(64, 3)
    conv_t.build((None, 8, 8, 16))
    assert tuple(conv_t.kernel.shape) == (3, 3, 64, 16)  # (kh, kw, filters, in) as documented
    assert compute_fans(conv_t.kernel.shape, transpose=True) == (9 * 16, 9 * 64)
    dw = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)
    dw.build((None, 8, 8, 32))
    assert tuple(dw.kernel.shape) == (3, 3, 32, 2)
    assert compute_fans(dw.kernel.shape, depthwise="torch") == (9, 9 * 64)


def test_initializer_in_transposed_and_depthwise_layers():
    conv_t = keras.layers.Conv2DTranspose(
        64, 3, kernel_initializer=I.KaimingNormal(transpose=True, seed=0))
    conv_t.build((None, 8, 8, 512))  # kernel (3, 3, 64, 512): true fan_in 9 * 512
    w = np.asarray(keras.ops.convert_to_numpy(conv_t.kernel), np.float64)
    assert w.var() == pytest.approx(2.0 / (9 * 512), rel=0.02)
    dw = keras.layers.DepthwiseConv2D(
        3, depth_multiplier=64,
        depthwise_initializer=I.KaimingUniform(depthwise="torch", seed=0))
    dw.build((None, 8, 8, 128))  # kernel (3, 3, 128, 64): each output sees 9 inputs
    w = np.asarray(keras.ops.convert_to_numpy(dw.kernel), np.float64)
    assert w.var() == pytest.approx(2.0 / 9, rel=0.02)


# ---------------------------------------------------------------- gains
GAINS = [
    ("linear", None, 1.0), ("identity", None, 1.0), ("conv1d", None, 1.0),
    ("conv2d", None, 1.0), ("conv3d", None, 1.0), ("conv_transpose2d", None, 1.0),
    ("sigmoid", None, 1.0), ("tanh", None, 5.0 / 3.0), ("relu", None, math.sqrt(2.0)),
    ("leaky_relu", None, math.sqrt(2.0 / (1.0 + 0.01 ** 2))),
    ("leaky_relu", 0.2, math.sqrt(2.0 / 1.04)), ("leaky_relu", 0, math.sqrt(2.0)),
    ("leaky_relu", math.sqrt(5), math.sqrt(1.0 / 3.0)), ("selu", None, 0.75),
]


def test_gain():
    for name, param, expected in GAINS:
        assert gain(name, param) == pytest.approx(expected, rel=1e-12), (name, param)


# ---------------------------------------------------------------- get()
GET_NAMES = [
    ("xavier_normal", I.XavierNormal, 1.0, "fan_avg", "normal"),
    ("xavier_uniform", I.XavierUniform, 1.0, "fan_avg", "uniform"),
    ("xavier_truncated_normal", I.Xavier, 1.0, "fan_avg", "truncated_normal"),
    ("xavier_normal_tanh", I.Xavier, (5.0 / 3.0) ** 2, "fan_avg", "normal"),
    ("kaiming_normal", I.KaimingNormal, 2.0, "fan_in", "normal"),
    ("kaiming_uniform", I.KaimingUniform, 2.0, "fan_in", "uniform"),
    ("kaiming_truncated_normal", I.Kaiming, 2.0, "fan_in", "truncated_normal"),
    ("kaiming_normal_fan_out", I.KaimingNormal, 2.0, "fan_out", "normal"),
    ("kaiming_uniform_fan_out", I.KaimingUniform, 2.0, "fan_out", "uniform"),
    ("torch_default", I.TorchDefault, 1.0 / 3.0, "fan_in", "uniform"),
]


def test_get_our_names():
    cases = Cases()
    for name, cls, scale, mode, dist in GET_NAMES:
        with cases.case(name):
            init = get(name, seed=7)
            assert type(init) is cls
            assert (init.mode, init.distribution) == (mode, dist)
            w = draw(init, DENSE[0])
            assert_var(w, expected_var(scale, mode, DENSE[1], DENSE[2]))
            assert get(name.upper()).get_config()["seed"] is None
    cases.check()


def test_names_tuple():
    assert isinstance(NAMES, tuple)
    assert set(NAMES) == {"xavier_normal", "xavier_uniform", "xavier_truncated_normal",
                          "xavier_normal_tanh",
                          "kaiming_normal", "kaiming_uniform", "kaiming_truncated_normal",
                          "kaiming_normal_fan_out", "kaiming_uniform_fan_out", "torch_default"}
    for name in NAMES:
        assert isinstance(get(name), keras.initializers.Initializer)


def test_get_fixed_normal():
    for std in [0.01, 1.0, 0.5]:
        init = get(f"normal:{std}", seed=3)
        assert isinstance(init, keras.initializers.RandomNormal)
        w = draw(init, DENSE[0])
        assert w.std() == pytest.approx(std, rel=0.01)
        assert np.abs(w).max() > 3.5 * std  # untruncated


def test_get_keras_identifiers():
    assert isinstance(get("he_normal"), keras.initializers.HeNormal)
    assert isinstance(get("GlorotUniform"), keras.initializers.GlorotUniform)
    assert isinstance(get("orthogonal"), keras.initializers.Orthogonal)
    assert get("he_uniform", seed=5).get_config()["seed"] == 5
    assert isinstance(get("keras_varinit>KaimingNormal"), I.KaimingNormal)
    config = keras.saving.serialize_keras_object(I.Xavier(mode="fan_in", gain=2.0))
    restored = get(config)
    assert isinstance(restored, I.Xavier) and (restored.mode, restored.gain) == ("fan_in", 2.0)
    inst = I.KaimingUniform()
    assert get(inst) is inst
    assert get(None) is None


def test_get_unknown():
    cases = Cases()
    for identifier in ["kaiming", "xavier_gaussian", "normal:abc", "normal:-1", "normal:0",
                       "normal:nan"]:
        with cases.case(identifier):
            with pytest.raises(ValueError,
                               match=re.escape(f"Received: identifier={identifier!r}")) as info:
                get(identifier)
            if not identifier.startswith("normal:"):
                for name in NAMES:
                    assert name in str(info.value)
    cases.check()


# ---------------------------------------------------------------- serialization
CONFIGURED = [
    lambda: I.Xavier(mode="fan_in", distribution="truncated_normal", gain=1.5, seed=3),
    lambda: I.XavierNormal(seed=3),
    lambda: I.XavierUniform(seed=3),
    lambda: I.Kaiming(mode="fan_out", distribution="uniform", nonlinearity="leaky_relu",
                      negative_slope=0.1, seed=3),
    lambda: I.KaimingNormal(mode="fan_avg", nonlinearity="tanh", seed=3),
    lambda: I.KaimingUniform(seed=3, transpose=True),
    lambda: I.KaimingNormal(seed=3, depthwise="torch"),
    lambda: I.TorchDefault(seed=3),
]


def test_config_round_trip():
    cases = Cases()
    for make in CONFIGURED:
        init = make()
        with cases.case(repr(init)):
            config = init.get_config()
            clone = type(init).from_config(config)
            assert clone.get_config() == config
            shape = CONV[0]
            np.testing.assert_array_equal(draw(init, shape), draw(clone, shape))
            serialized = keras.saving.serialize_keras_object(init)
            assert serialized["registered_name"] == f"keras_varinit>{type(init).__name__}"
            restored = keras.saving.deserialize_keras_object(serialized)
            assert type(restored) is type(init) and restored.get_config() == config
    cases.check()


def test_seed_generator_config_round_trip():
    init = I.KaimingNormal(seed=keras.random.SeedGenerator(42))
    clone = I.KaimingNormal.from_config(init.get_config())
    assert isinstance(clone.seed, keras.random.SeedGenerator)
    np.testing.assert_array_equal(draw(init, SMALL), draw(clone, SMALL))


def test_string_form_in_layer():
    layer = keras.layers.Dense(2048, kernel_initializer="keras_varinit>KaimingNormal")
    layer.build((None, 256))
    assert isinstance(layer.kernel_initializer, I.KaimingNormal)
    w = np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float64)
    assert w.var() == pytest.approx(2.0 / 256, rel=0.02)
    clone = keras.layers.Dense.from_config(layer.get_config())
    assert isinstance(clone.kernel_initializer, I.KaimingNormal)


def test_keras_save_load(tmp_path):
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, kernel_initializer=I.Kaiming(
            mode="fan_out", distribution="truncated_normal", seed=1)),
        keras.layers.Flatten(),
        keras.layers.Dense(5, kernel_initializer="keras_varinit>XavierUniform"),
        keras.layers.Dense(3, kernel_initializer=I.TorchDefault(
            seed=keras.random.SeedGenerator(2))),
    ])
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.layers, loaded.layers):
        if hasattr(a, "kernel_initializer"):
            assert type(b.kernel_initializer) is type(a.kernel_initializer)
            assert b.kernel_initializer.get_config() == a.kernel_initializer.get_config()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)),
                               keras.ops.convert_to_numpy(loaded(x)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- seeds (Keras's semantics)
def test_int_seed_reproducible():
    for cls in [I.XavierNormal, I.XavierUniform, I.KaimingNormal, I.KaimingUniform,
                I.TorchDefault]:
        a, b = cls(seed=123), cls(seed=123)
        np.testing.assert_array_equal(draw(a, SMALL), draw(b, SMALL))
        np.testing.assert_array_equal(draw(a, SMALL), draw(a, SMALL))  # int: repeats
        assert not np.array_equal(draw(a, SMALL), draw(cls(seed=124), SMALL))


def test_identical_seeds_identical_layer_weights():
    def build():
        layer = keras.layers.Dense(16, kernel_initializer=I.KaimingNormal(seed=9))
        layer.build((None, 32))
        return keras.ops.convert_to_numpy(layer.kernel)
    np.testing.assert_array_equal(build(), build())


def test_seed_semantics_match_keras():
    shape = SMALL
    for ours, theirs in [(I.KaimingNormal, keras.initializers.HeNormal),
                         (I.XavierUniform, keras.initializers.GlorotUniform)]:
        # None: one instance repeats itself, two instances differ
        for cls in (ours, theirs):
            a = cls()
            assert np.array_equal(draw(a, shape), draw(a, shape))
            assert not np.array_equal(draw(cls(), shape), draw(cls(), shape))
        # SeedGenerator: advances on each call; equal generators give equal sequences
        for cls in (ours, theirs):
            a = cls(seed=keras.random.SeedGenerator(5))
            b = cls(seed=keras.random.SeedGenerator(5))
            first, second = draw(a, shape), draw(a, shape)
            assert not np.array_equal(first, second)
            np.testing.assert_array_equal(first, draw(b, shape))
            np.testing.assert_array_equal(second, draw(b, shape))


def test_global_seed_makes_unseeded_reproducible():
    keras.utils.set_random_seed(77)
    first = draw(I.KaimingNormal(), SMALL)
    keras.utils.set_random_seed(77)
    np.testing.assert_array_equal(first, draw(I.KaimingNormal(), SMALL))


# ---------------------------------------------------------------- bad input
BAD = [
    (lambda: I.Xavier(mode="fan_sum"), "mode='fan_sum'"),
    (lambda: I.Kaiming(mode="in"), "mode='in'"),
    (lambda: I.Xavier(distribution="gaussian"), "distribution='gaussian'"),
    (lambda: I.Kaiming(distribution="untruncated_normal"), "distribution='untruncated_normal'"),
    (lambda: I.Kaiming(nonlinearity="swish"), "nonlinearity='swish'"),
    (lambda: I.Xavier(gain=0.0), "gain=0.0"),
    (lambda: I.Xavier(gain=-1), "gain=-1"),
    (lambda: I.Xavier(gain=float("nan")), "gain=nan"),
    (lambda: I.Kaiming(nonlinearity="leaky_relu", negative_slope=-0.1), "negative_slope=-0.1"),
    (lambda: I.Kaiming(nonlinearity="relu", negative_slope=0.2), "negative_slope=0.2"),
    (lambda: I.KaimingNormal(seed="abc"), "seed='abc'"),
    (lambda: I.KaimingNormal(seed=1.5), "seed=1.5"),
    (lambda: I.KaimingNormal(depthwise="tf"), "depthwise='tf'"),
    (lambda: compute_fans((0, 5)), "shape=(0, 5)"),
    (lambda: compute_fans((3, 3, 0, 8)), "shape=(3, 3, 0, 8)"),
    (lambda: compute_fans((3, -1)), "shape=(3, -1)"),
    (lambda: compute_fans((3.0, 4)), "shape=(3.0, 4)"),
    (lambda: compute_fans((3, 4), layout="tf"), "layout='tf'"),
    (lambda: compute_fans((3, 3, 4, 2), depthwise="pytorch"), "depthwise='pytorch'"),
    (lambda: compute_fans((8, 1, 3, 3), "torch", depthwise="keras"), "shape=(8, 1, 3, 3)"),
    (lambda: compute_fans((3, 4), depthwise=True), "shape=(3, 4)"),
    (lambda: gain("swish"), "nonlinearity='swish'"),
    (lambda: gain("leaky_relu", -0.5), "param=-0.5"),
    (lambda: gain("leaky_relu", "a"), "param='a'"),
    (lambda: I.KaimingNormal()((0, 4)), "shape=(0, 4)"),
]


def test_bad_input():
    cases = Cases()
    for make, received in BAD:
        with cases.case(received):
            with pytest.raises(ValueError, match="Received: .*" + re.escape(received)):
                make()
    cases.check()


def test_bad_choice_lists_allowed():
    for make, allowed in [
        (lambda: I.Xavier(mode="x"), "fan_avg"),
        (lambda: I.Kaiming(distribution="x"), "truncated_normal"),
        (lambda: I.Kaiming(nonlinearity="x"), "leaky_relu"),
        (lambda: gain("x"), "selu"),
        (lambda: compute_fans((2, 2), layout="x"), "torch"),
    ]:
        with pytest.raises(ValueError, match="Allowed: .*" + allowed):
            make()
