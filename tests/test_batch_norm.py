"""Tests for kv.layers.BatchNormalization (keras_varinit/layers.py, and its TensorFlow fast path
keras_varinit/fused_batch_norm_tf.py). Keras's own tests of the layer: test_keras_bn_suite.py.

Tolerances: float32 comparisons use rtol = atol = 1e-5. Under mixed_float16 the outputs and
input gradients are float16 (spacing 2**-10 ~ 1e-3 relative), so those are compared with
rtol = 2e-3, atol = 4e-3 (about one float16 step at |y| <= 4); moving statistics and
gamma/beta gradients stay float32 and are compared at 1e-4.
"""
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_varinit as kv
from keras_varinit.layers import PER_SAMPLE_TINY, BatchNormalization

backend_independent = pytest.mark.backend_independent
TF_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow-specific behaviour"
)
F32 = dict(rtol=1e-5, atol=1e-5)
F16 = dict(rtol=2e-3, atol=4e-3)
F16_STATS = dict(rtol=1e-4, atol=1e-4)

CONV_SHAPE = (6, 5, 4, 3)  # (N, H, W, C)
DENSE_SHAPE = (16, 5)  # (N, C)


# ---------------------------------------------------------------------------- helpers
def _data(shape, seed=0, loc=0.7, scale=1.8):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, scale, size=shape).astype("float32")
    w = rng.normal(size=shape).astype("float32")  # upstream gradient dL/dy
    return x, w


def run_layer(layer, x, w, training, mask=None):
    """One call of `layer` with loss sum(y * w).

    Returns (y, dx, dgamma, dbeta, moving_mean, moving_variance) as float32 numpy arrays, on
    whichever backend is active (moving statistics after the call; dgamma / dbeta are None
    for a layer without gamma / beta)."""
    if not layer.built:
        layer.build(x.shape)
    backend = keras.backend.backend()
    params = [v for v in (layer.gamma, layer.beta) if v is not None]
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=training, mask=mask)
            loss = tf.reduce_sum(tf.cast(y, "float32") * w)
        dx, *dparams = tape.gradient(loss, [xt] + params)
        mm, mv = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        tvars, ntvars = layer.trainable_variables, layer.non_trainable_variables

        def loss_fn(xv, pvals):
            # gradients for gamma / beta also when the layer is frozen (non-trainable)
            sub = {id(p): v for p, v in zip(params, pvals)}
            tvv = [sub.get(id(v), v.value) for v in tvars]
            ntvv = [sub.get(id(v), v.value) for v in ntvars]
            y, new_ntv = layer.stateless_call(tvv, ntvv, xv, training=training, mask=mask)
            return jnp.sum(y.astype("float32") * w), (y, new_ntv)

        (_, (y, new_ntv)), (dx, dparams) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(jnp.asarray(x), [p.value for p in params])
        for var, value in zip(ntvars, new_ntv):
            var.assign(value)
        mm, mv = np.asarray(layer.moving_mean.value), np.asarray(layer.moving_variance.value)
    else:  # pragma: no cover
        pytest.skip(f"backend {backend} not covered")
    f = lambda a: np.asarray(keras.ops.convert_to_numpy(a), dtype="float32")  # noqa: E731
    grads = dict(zip([id(v) for v in params], dparams))
    dg = f(grads[id(layer.gamma)]) if layer.gamma is not None else None
    db = f(grads[id(layer.beta)]) if layer.beta is not None else None
    return f(y), f(dx), dg, db, np.asarray(mm), np.asarray(mv)


def _pair(shape, dtype=None, **kw):
    """A Keras BN and ours with identical (random) gamma/beta/moving statistics."""
    kw.setdefault("momentum", 0.9)
    kw.setdefault("gamma_initializer", keras.initializers.RandomNormal(1.0, 0.3, seed=1))
    kw.setdefault("beta_initializer", keras.initializers.RandomNormal(0.0, 0.3, seed=2))
    kw.setdefault("moving_mean_initializer", keras.initializers.RandomNormal(0.0, 0.3, seed=3))
    kw.setdefault("moving_variance_initializer", keras.initializers.RandomUniform(0.5, 2, seed=4))
    ours = BatchNormalization(dtype=dtype, **kw)
    kw.pop("variance_estimator", None)
    kw.pop("moving_variance", None)
    ref = keras.layers.BatchNormalization(dtype=dtype, **kw)
    ref.build(shape)
    ours.build(shape)
    ours.set_weights(ref.get_weights())
    return ref, ours


# ---------------------------------------------------------------------------- numpy reference
def np_per_sample(x, gamma, beta, eps, dy):
    """Per-sample-variance BN on (N, ..., C), channels last, float64, with its gradient.

    Returns y, mean_c, var_c, n (spatial size), dx, dgamma, dbeta. The gradient is written out
    by hand (checked against finite differences in test_numpy_reference_gradient)."""
    x = x.astype("float64")
    dy = dy.astype("float64")
    spatial = tuple(range(1, x.ndim - 1))
    nb, s_size = x.shape[0], int(np.prod([x.shape[a] for a in spatial]))
    m = x.mean(axis=spatial, keepdims=True)  # (N, 1.., C)
    v = ((x - m) ** 2).mean(axis=spatial, keepdims=True)
    s = np.sqrt(v + PER_SAMPLE_TINY)
    mean = x.mean(axis=tuple(range(x.ndim - 1)))
    std = s.mean(axis=0)  # (1.., C)
    var = (std**2).reshape(-1)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * inv
    y = gamma * xhat + beta
    red = tuple(range(x.ndim - 1))
    dbeta = dy.sum(axis=red)
    dgamma = (dy * xhat).sum(axis=red)
    dmean = -(gamma * inv * dy).sum(axis=red)
    dvar = -0.5 * (dy * gamma * (x - mean)).sum(axis=red) * inv**3
    # var = std^2, std = mean_n s_n, s_n = sqrt(v_n + tiny), v_n = mean_s (x - m_n)^2
    dx = dy * gamma * inv + dmean / (nb * s_size)
    dx = dx + (2.0 * dvar * std.reshape(-1) / (nb * s_size)) * (x - m) / s
    return y, mean, var, s_size, dx, dgamma, dbeta


def _np_loss(x, gamma, beta, eps, w):
    return float((np_per_sample(x, gamma, beta, eps, w)[0] * w).sum())


@backend_independent
def test_numpy_reference_gradient():
    """The hand-written gradient of the numpy reference equals central finite differences."""
    rng = np.random.default_rng(5)
    x = rng.normal(0.3, 1.5, size=(3, 2, 3, 2))
    w = rng.normal(size=x.shape)
    gamma, beta, eps = rng.normal(1, 0.3, 2), rng.normal(0, 0.3, 2), 1e-3
    _, _, _, _, dx, dgamma, dbeta = np_per_sample(x, gamma, beta, eps, w)
    h = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (_np_loss(xp, gamma, beta, eps, w) - _np_loss(xm, gamma, beta, eps, w)) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-7)
    num_g = np.array([
        (_np_loss(x, gamma + h * e, beta, eps, w) - _np_loss(x, gamma - h * e, beta, eps, w)) / (2 * h)
        for e in np.eye(2)
    ])
    np.testing.assert_allclose(dgamma, num_g, rtol=1e-6)
    np.testing.assert_allclose(dbeta, w.sum(axis=(0, 1, 2)), rtol=1e-12)
    # The per-sample variance is smaller than the pooled one (it leaves out between-sample
    # spread), so a pooled implementation would fail the tests that use this reference.
    _, _, var, *_ = np_per_sample(x, gamma, beta, eps, w)
    assert np.all(var < x.reshape(-1, 2).var(axis=0))


# ---------------------------------------------------------------------------- API basics
@backend_independent
def test_public_name_and_subclass():
    assert kv.layers.BatchNormalization is BatchNormalization
    assert BatchNormalization.__module__ == "keras_varinit.layers"  # its one public home
    layer = BatchNormalization()
    assert isinstance(layer, keras.layers.BatchNormalization)
    assert layer.variance_estimator == "pooled" and layer.moving_variance_mode == "biased"
    assert (layer.axis, layer.momentum, layer.epsilon) == (-1, 0.99, 1e-3)
    assert keras.saving.get_registered_name(BatchNormalization) == (
        "keras_varinit>BatchNormalization"
    )


# ---------------------------------------------------------------------------- Keras parity
@backend_independent
@pytest.mark.parametrize("shape", [CONV_SHAPE, DENSE_SHAPE], ids=["conv", "dense"])
@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
def test_pooled_parity_with_keras(shape, dtype):
    """Outputs, moving statistics and gradients equal Keras's, training then inference."""
    x, w = _data(shape)
    ref, ours = _pair(shape, dtype=dtype)
    out_tol = F32 if dtype == "float32" else F16
    stat_tol = F32 if dtype == "float32" else F16_STATS
    for training in (True, False):
        r = run_layer(ref, x, w, training)
        o = run_layer(ours, x, w, training)
        for name, a, b in zip(("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_var"), o, r):
            tol = out_tol if name in ("y", "dx") else stat_tol
            np.testing.assert_allclose(a, b, err_msg=f"{name} training={training}", **tol)
    # training changed the moving statistics (so the comparison above was not vacuous)
    assert not np.allclose(ours.moving_mean.numpy(), _pair(shape)[1].moving_mean.numpy())


@backend_independent
@pytest.mark.parametrize("kw", [dict(center=False), dict(scale=False), dict(epsilon=1e-6),
                                dict(axis=1)], ids=["no_center", "no_scale", "tiny_eps", "axis1"])
def test_pooled_parity_options(kw):
    x, w = _data(CONV_SHAPE, seed=3)
    ref, ours = _pair(CONV_SHAPE, **kw)
    for training in (True, False):
        r = run_layer(ref, x, w, training)
        o = run_layer(ours, x, w, training)
        for a, b in zip(o, r):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_allclose(a, b, **F32)


def _conv_bn_model(bn, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
        bn,
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])


@backend_independent
def test_jit_compiled_training_step_matches_keras():
    """A model compiled with jit_compile=True trains one step exactly like Keras BN's."""
    rng = np.random.default_rng(7)
    x = rng.normal(0.5, 1.5, size=(8, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    weights = {}
    for name, bn in (("keras", keras.layers.BatchNormalization(momentum=0.5)),
                     ("ours", BatchNormalization(momentum=0.5))):
        model = _conv_bn_model(bn)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=True)
        model.train_on_batch(x, y)
        weights[name] = model.get_weights()
        weights[name + "_pred"] = model.predict(x, verbose=0)
    assert len(weights["keras"]) == len(weights["ours"]) == 7
    for a, b in zip(weights["ours"], weights["keras"]):
        np.testing.assert_allclose(a, b, **F32)
    np.testing.assert_allclose(weights["ours_pred"], weights["keras_pred"], **F32)
    assert not np.allclose(weights["ours"][3], 0.0)  # moving mean moved


@backend_independent
def test_renorm_is_keras_renorm():
    x, w = _data(CONV_SHAPE, seed=21)
    ref, ours = _pair(CONV_SHAPE, renorm=True, renorm_clipping={"rmax": 2.0})
    ours.set_weights(ref.get_weights())
    for a, b in zip(run_layer(ours, x, w, True), run_layer(ref, x, w, True)):
        np.testing.assert_allclose(a, b, **F32)
    assert ours.get_config()["renorm"] is True


# ---------------------------------------------------------------------------- per-sample
@backend_independent
@pytest.mark.parametrize("shape", [CONV_SHAPE, (5, 7, 3)], ids=["NHWC", "NTC"])
@pytest.mark.parametrize("moving_variance", ["biased", "unbiased"])
def test_per_sample_against_numpy(shape, moving_variance):
    x, w = _data(shape, seed=11)
    _, ours = _pair(shape, variance_estimator="per_sample", moving_variance=moving_variance)
    gamma, beta = ours.gamma.numpy(), ours.beta.numpy()
    mm0, mv0 = ours.moving_mean.numpy().copy(), ours.moving_variance.numpy().copy()
    y, dx, dg, db, mm, mv = run_layer(ours, x, w, training=True)
    ry, mean, var, n, rdx, rdg, rdb = np_per_sample(x, gamma, beta, ours.epsilon, w)
    np.testing.assert_allclose(y, ry, **F32)
    np.testing.assert_allclose(dx, rdx, **F32)
    np.testing.assert_allclose(dg, rdg, **F32)
    np.testing.assert_allclose(db, rdb, **F32)
    stat = var * n / (n - 1) if moving_variance == "unbiased" else var
    np.testing.assert_allclose(mm, 0.9 * mm0 + 0.1 * mean, **F32)
    np.testing.assert_allclose(mv, 0.9 * mv0 + 0.1 * stat, **F32)
    # inference uses the moving statistics
    yi, dxi, *_ = run_layer(ours, x, w, training=False)
    inv = 1 / np.sqrt(mv + ours.epsilon)
    np.testing.assert_allclose(yi, gamma * (x - mm) * inv + beta, **F32)
    np.testing.assert_allclose(dxi, w * gamma * inv, **F32)


@backend_independent
def test_per_sample_channels_first():
    """axis=1 on (N, C, H, W) equals channels-last on the transposed input."""
    x, w = _data((4, 3, 5, 6), seed=2)
    _, first = _pair(x.shape, variance_estimator="per_sample", axis=1)
    y, dx, dg, db, _, mv = run_layer(first, x, w, training=True)
    to_last = lambda a: np.moveaxis(a, 1, -1)  # noqa: E731
    ry, _, var, _, rdx, rdg, rdb = np_per_sample(
        to_last(x), first.gamma.numpy(), first.beta.numpy(), first.epsilon, to_last(w)
    )
    np.testing.assert_allclose(to_last(y), ry, **F32)
    np.testing.assert_allclose(to_last(dx), rdx, **F32)
    np.testing.assert_allclose(dg, rdg, **F32)
    np.testing.assert_allclose(db, rdb, **F32)


@backend_independent
def test_per_sample_mixed_float16():
    x, w = _data(CONV_SHAPE, seed=4)
    _, ours = _pair(CONV_SHAPE, dtype="mixed_float16", variance_estimator="per_sample")
    assert ours.moving_variance.dtype == "float32" and ours.gamma.dtype == "float32"
    x16 = x.astype("float16").astype("float32")  # what the layer sees after autocast
    y, dx, dg, db, mm, mv = run_layer(ours, x, w, training=True)
    ry, mean, var, _, rdx, rdg, rdb = np_per_sample(
        x16, ours.gamma.numpy(), ours.beta.numpy(), ours.epsilon, w.astype("float16")
    )
    np.testing.assert_allclose(y, ry, **F16)
    np.testing.assert_allclose(dx, rdx, **F16)
    np.testing.assert_allclose(dg, rdg, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(db, rdb, rtol=1e-3, atol=1e-3)


@backend_independent
def test_constant_feature_map_has_finite_gradient():
    x, w = _data(CONV_SHAPE, seed=6)
    x[2, :, :, 1] = 0.25  # one sample's channel is constant: per-sample variance 0
    _, ours = _pair(CONV_SHAPE, variance_estimator="per_sample")
    outs = run_layer(ours, x, w, training=True)
    assert all(np.all(np.isfinite(a)) for a in outs)


# ---------------------------------------------------------------------------- unbiased
@backend_independent
@pytest.mark.parametrize("shape", [CONV_SHAPE, DENSE_SHAPE], ids=["conv", "dense"])
def test_unbiased_moving_variance_pooled(shape):
    x, w = _data(shape, seed=8)
    ref, ours = _pair(shape, moving_variance="unbiased")
    mv0 = ours.moving_variance.numpy().copy()
    r = run_layer(ref, x, w, training=True)
    o = run_layer(ours, x, w, training=True)
    for a, b in zip(o[:5], r[:5]):  # outputs, grads, moving mean: as Keras (biased in training)
        np.testing.assert_allclose(a, b, **F32)
    flat = x.reshape(-1, shape[-1]).astype("float64")
    np.testing.assert_allclose(o[5], 0.9 * mv0 + 0.1 * flat.var(axis=0, ddof=1), **F32)
    assert not np.allclose(o[5], r[5], rtol=1e-4)


# ---------------------------------------------------------------------------- frozen / masks
@backend_independent
@pytest.mark.parametrize("estimator", ["pooled", "per_sample"])
def test_frozen_layer_runs_in_inference_mode(estimator):
    x, w = _data(CONV_SHAPE, seed=9)
    _, ours = _pair(CONV_SHAPE, variance_estimator=estimator)
    mm0, mv0 = ours.moving_mean.numpy().copy(), ours.moving_variance.numpy().copy()
    inference = run_layer(ours, x, w, training=False)
    ours.trainable = False
    frozen = run_layer(ours, x, w, training=True)
    for a, b in zip(frozen, inference):
        np.testing.assert_allclose(a, b, **F32)
    np.testing.assert_array_equal(ours.moving_mean.numpy(), mm0)
    np.testing.assert_array_equal(ours.moving_variance.numpy(), mv0)
    ours.trainable = True
    trained = run_layer(ours, x, w, training=True)
    assert not np.allclose(trained[0], inference[0], atol=1e-3)


@backend_independent
def test_frozen_layer_in_fit_keeps_statistics():
    x, _ = _data((8, 6, 6, 3), seed=1)
    bn = BatchNormalization(variance_estimator="per_sample")
    model = _conv_bn_model(bn)
    bn.trainable = False
    model.compile(optimizer="sgd", loss="mse")
    before = [v.numpy() if hasattr(v, "numpy") else np.asarray(v) for v in bn.weights]
    model.fit(x, np.zeros((8, 2), "float32"), epochs=1, verbose=0)
    for a, b in zip(bn.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def _mask(shape, seed=0):
    """A Keras mask for inputs of `shape`: the shape without its last axis (whatever axis is
    normalized), about 70% True, the last sample entirely masked."""
    mask = np.random.default_rng(seed).random(shape[:-1]) > 0.3
    mask[-1] = False
    return mask


# (input shape, normalized axis): every axis but the batch axis, rank 3 and 4. With axis != -1
# the mask varies along the normalized axis, so each channel has its own count.
MASKED_AXES = [((5, 7, 3), -1), ((5, 7, 3), 1), ((4, 3, 5, 2), -1), ((4, 3, 5, 2), 1),
               ((4, 3, 5, 2), 2), ((4, 3, 5, 2), -3)]
MASKED_IDS = [f"{len(shape)}d-axis{axis}" for shape, axis in MASKED_AXES]


def _per_channel(x, mask, axis):
    """Per channel (along `axis`): [per sample: its unmasked values], the mask broadcast along
    the last axis as Keras does."""
    full = np.broadcast_to(mask[..., None], x.shape)
    xl, ml = np.moveaxis(x, axis, -1), np.moveaxis(full, axis, -1)
    return [[xl[n, ..., c][ml[n, ..., c]].astype("float64") for n in range(x.shape[0])]
            for c in range(xl.shape[-1])]


def _channel_view(a, axis, ndim):
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(a, shape)


@backend_independent
@pytest.mark.parametrize("shape,axis", MASKED_AXES, ids=MASKED_IDS)
def test_mask_pooled_matches_keras(shape, axis):
    """Masked inputs on every axis: outputs, gradients and moving statistics as Keras's layer
    (training, then inference, where the TF fused path ignores the mask as Keras does)."""
    x, w = _data(shape, seed=12)
    mask = _mask(shape)
    ref, ours = _pair(shape, axis=axis)
    for training in (True, False):
        r = run_layer(ref, x, w, training, mask=mask)
        o = run_layer(ours, x, w, training, mask=mask)
        for name, a, b in zip(("y", "dx", "dgamma", "dbeta", "mm", "mv"), o, r):
            np.testing.assert_allclose(a, b, err_msg=f"{name} training={training}", **F32)
    # the mask mattered
    _, plain = _pair(shape, axis=axis)
    run_layer(plain, x, w, True)
    assert not np.allclose(plain.moving_mean.numpy(), ours.moving_mean.numpy(), atol=1e-4)


@backend_independent
@pytest.mark.parametrize("shape,axis", MASKED_AXES, ids=MASKED_IDS)
def test_mask_pooled_unbiased_counts_per_channel(shape, axis):
    """moving_variance="unbiased" with a mask: each channel's n is its own unmasked count."""
    x, w = _data(shape, seed=22)
    mask = _mask(shape, seed=2)
    _, ours = _pair(shape, axis=axis, moving_variance="unbiased")
    mv0 = ours.moving_variance.numpy().copy()
    *_, mv = run_layer(ours, x, w, True, mask=mask)
    values = [np.concatenate(per_sample) for per_sample in _per_channel(x, mask, axis)]
    expected = [v.var(ddof=1) for v in values]
    np.testing.assert_allclose(mv, 0.9 * mv0 + 0.1 * np.array(expected), **F32)
    if axis not in (-1, len(shape) - 1):
        assert len({len(v) for v in values}) > 1  # the counts differ between channels


@backend_independent
@pytest.mark.parametrize("shape,axis", MASKED_AXES, ids=MASKED_IDS)
def test_mask_per_sample_against_numpy(shape, axis):
    x, w = _data(shape, seed=13)
    mask = _mask(shape, seed=1)
    _, ours = _pair(shape, axis=axis, variance_estimator="per_sample",
                    moving_variance="unbiased")
    mm0, mv0 = ours.moving_mean.numpy().copy(), ours.moving_variance.numpy().copy()
    y, *_, mm, mv = run_layer(ours, x, w, True, mask=mask)
    mean, var, stat = [], [], []
    for per_sample in _per_channel(x, mask, axis):
        valid = [v for v in per_sample if v.size]  # fully masked samples are left out
        mean.append(np.concatenate(valid).mean())
        var.append(np.mean([v.std() for v in valid]) ** 2)
        n_avg = np.mean([v.size for v in valid])  # unmasked positions per valid sample
        stat.append(var[-1] * n_avg / (n_avg - 1))
    np.testing.assert_allclose(mm, 0.9 * mm0 + 0.1 * np.array(mean), **F32)
    np.testing.assert_allclose(mv, 0.9 * mv0 + 0.1 * np.array(stat), **F32)
    view = lambda a: _channel_view(np.asarray(a), axis, len(shape))  # noqa: E731
    g, b = view(ours.gamma.numpy()), view(ours.beta.numpy())
    expected_y = g * (x - view(mean)) / np.sqrt(view(var) + ours.epsilon) + b
    np.testing.assert_allclose(y, expected_y, **F32)


@backend_independent
def test_mask_propagates_through_model():
    model = keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(10, 4, mask_zero=True),
        BatchNormalization(variance_estimator="per_sample"),
        keras.layers.GlobalAveragePooling1D(),
    ])
    tokens = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]], "int32")
    bn = model.layers[1]
    emb = model.layers[0]
    mask = tokens != 0
    out = model(tokens, training=True)
    ref = bn(emb(tokens), training=False, mask=mask)  # after the update, inference mode
    assert bn.compute_mask(emb(tokens), keras.ops.convert_to_tensor(mask)) is not None
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(out)))
    assert keras.ops.convert_to_numpy(ref).shape == (2, 6, 4)


# ---------------------------------------------------------------------------- serialization
@backend_independent
def test_config_round_trip():
    layer = BatchNormalization(
        axis=1, momentum=0.8, epsilon=1e-4, center=False, variance_estimator="per_sample",
        moving_variance="unbiased", gamma_regularizer="l2", gamma_constraint="non_neg",
        name="bn_x",
    )
    config = layer.get_config()
    assert config["variance_estimator"] == "per_sample"
    assert config["moving_variance"] == "unbiased"
    clone = BatchNormalization.from_config(config)
    assert clone.get_config() == config
    again = keras.layers.deserialize(json.loads(json.dumps(keras.layers.serialize(layer))))
    assert type(again) is BatchNormalization
    assert again.get_config() == config


@backend_independent
def test_keras_save_and_load(tmp_path):
    x, _ = _data((8, 6, 6, 3), seed=14)
    bn = BatchNormalization(variance_estimator="per_sample", moving_variance="unbiased",
                            momentum=0.5)
    model = _conv_bn_model(bn)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.ones((8, 2), "float32"), epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    lbn = loaded.layers[1]
    assert type(lbn) is BatchNormalization
    assert lbn.get_config() == bn.get_config()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for a, b in zip(lbn.get_weights(), bn.get_weights()):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- bad input
@backend_independent
def test_bad_arguments():
    with pytest.raises(ValueError, match=r"variance_estimator='pooledd'.*Allowed: 'pooled', "
                                         r"'per_sample'"):
        BatchNormalization(variance_estimator="pooledd")
    with pytest.raises(ValueError, match=r"moving_variance='bessel'.*Allowed: 'biased', "
                                         r"'unbiased'"):
        BatchNormalization(moving_variance="bessel")
    with pytest.raises(ValueError, match="renorm=True"):
        BatchNormalization(renorm=True, variance_estimator="per_sample")


@backend_independent
def test_per_sample_without_spatial_axes_fails_at_build():
    layer = BatchNormalization(variance_estimator="per_sample")
    with pytest.raises(ValueError, match=r"spatial axes.*input_shape=\(None, 8\)"):
        layer.build((None, 8))
    with pytest.raises(ValueError, match="spatial axes"):
        keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
                          BatchNormalization(variance_estimator="per_sample")])
    with pytest.raises(ValueError, match="batch axis"):
        BatchNormalization(variance_estimator="per_sample", axis=0).build((4, 5, 3))
    # one position per sample (a 1x1 map): its std is 0, the output would be x/sqrt(eps)
    with pytest.raises(ValueError, match=r"more than one spatial position.*\(None, 1, 1, 8\)"):
        BatchNormalization(variance_estimator="per_sample").build((None, 1, 1, 8))
    BatchNormalization(variance_estimator="per_sample").build((None, 1, 2, 8))
    BatchNormalization(variance_estimator="per_sample").build((None, None, None, 8))


@backend_independent
def test_bad_axis_and_mask():
    with pytest.raises(ValueError, match="out of bounds"):
        BatchNormalization(axis=4).build((2, 3, 4, 5))
    layer = BatchNormalization()
    x = np.ones((2, 3, 4), "float32")
    with pytest.raises(ValueError, match="one dimension less"):
        layer(x, training=True, mask=np.ones((2, 3, 4), bool))


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX-only error")
@backend_independent
def test_synchronized_needs_tensorflow():
    with pytest.raises(ValueError, match="synchronized=True"):
        BatchNormalization(synchronized=True)


# ---------------------------------------------------------------------------- TF fast path
@TF_ONLY
@pytest.mark.parametrize("estimator", ["pooled", "per_sample"])
@pytest.mark.parametrize("moving_variance", ["biased", "unbiased"])
@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
def test_fused_path_matches_portable_path(estimator, moving_variance, dtype, monkeypatch):
    """The TF fused-kernel path is taken for NHWC, and equals the portable keras.ops path."""
    x, w = _data((8, 6, 5, 4), seed=15)
    _, fast = _pair(x.shape, dtype=dtype, variance_estimator=estimator,
                    moving_variance=moving_variance)
    _, slow = _pair(x.shape, dtype=dtype, variance_estimator=estimator,
                    moving_variance=moving_variance)
    calls = _count_portable_calls(monkeypatch)
    _force_portable(monkeypatch, slow)
    out_tol = F32 if dtype == "float32" else F16
    stat_tol = F32 if dtype == "float32" else F16_STATS
    for training in (True, False):
        f = run_layer(fast, x, w, training)
        s = run_layer(slow, x, w, training)
        for name, a, b in zip(("y", "dx", "dgamma", "dbeta", "mm", "mv"), f, s):
            tol = out_tol if name in ("y", "dx") else stat_tol
            np.testing.assert_allclose(a, b, err_msg=f"{name} training={training}", **tol)
    assert set(calls) == {slow.name}  # the fast layer never took the portable path


@TF_ONLY
def test_fused_path_under_tf_function_and_xla():
    import tensorflow as tf

    x, w = _data((8, 6, 5, 4), seed=16)
    for estimator in ("pooled", "per_sample"):
        results = []
        for jit in (None, False, True):
            _, layer = _pair(x.shape, variance_estimator=estimator)

            def step(xt, layer=layer):
                with tf.GradientTape() as tape:
                    tape.watch(xt)
                    y = layer(xt, training=True)
                    loss = tf.reduce_sum(y * w)
                return [y] + tape.gradient(loss, [xt, layer.gamma, layer.beta])

            fn = step if jit is None else tf.function(step, jit_compile=jit)
            results.append([a.numpy() for a in fn(tf.constant(x))]
                           + [layer.moving_mean.numpy(), layer.moving_variance.numpy()])
        for other in results[1:]:
            for a, b in zip(other, results[0]):
                np.testing.assert_allclose(a, b, **F32)


@TF_ONLY
def test_per_sample_fast_path_large_offset():
    """Per-sample statistics stay accurate when the mean is large against the spread."""
    x, w = _data((4, 8, 8, 2), seed=17, loc=50.0, scale=0.5)
    _, ours = _pair(x.shape, variance_estimator="per_sample")
    y, *_, mv = run_layer(ours, x, w, training=True)
    ry, _, var, *_ = np_per_sample(x, ours.gamma.numpy(), ours.beta.numpy(), ours.epsilon, w)
    np.testing.assert_allclose(y, ry, rtol=1e-4, atol=1e-4)


def _count_portable_calls(monkeypatch):
    portable = BatchNormalization._call_portable
    calls = []

    def counting(self, *args, **kwargs):
        calls.append(self.name)
        return portable(self, *args, **kwargs)

    monkeypatch.setattr(BatchNormalization, "_call_portable", counting)
    return calls


def _force_portable(monkeypatch, layer):
    """Make the fused path decline for `layer` (only), as it does where the kernel does not
    apply: the layer then runs its portable path."""
    from keras_varinit import fused_batch_norm_tf

    fused = fused_batch_norm_tf.call
    monkeypatch.setattr(fused_batch_norm_tf, "call",
                        lambda lyr, *args: None if lyr is layer else fused(lyr, *args))


@TF_ONLY
@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
@pytest.mark.parametrize("moving_variance", ["biased", "unbiased"])
def test_fused_dense_path_matches_keras(dtype, moving_variance, monkeypatch):
    """(N, C) inputs through the fused kernel as (N, 1, 1, C) (size threshold lowered to 0):
    outputs, gradients and moving statistics as Keras's (unbiased: the n / (n - 1) update)."""
    from keras_varinit import fused_batch_norm_tf

    monkeypatch.setattr(fused_batch_norm_tf, "DENSE_MIN_SIZE", 0)
    calls = _count_portable_calls(monkeypatch)
    x, w = _data(DENSE_SHAPE, seed=18)
    ref, ours = _pair(DENSE_SHAPE, dtype=dtype, moving_variance=moving_variance)
    mv0 = ours.moving_variance.numpy().copy()
    out_tol = F32 if dtype == "float32" else F16
    stat_tol = F32 if dtype == "float32" else F16_STATS
    for training in (True, False):
        r = run_layer(ref, x, w, training)
        o = run_layer(ours, x, w, training)
        for name, a, b in zip(("y", "dx", "dgamma", "dbeta", "mm", "mv"), o, r):
            if name == "mv" and moving_variance == "unbiased" and training:
                assert not np.allclose(a, b, rtol=1e-4)
                b = 0.9 * mv0 + 0.1 * x.astype("float64").var(axis=0, ddof=1)
            tol = out_tol if name in ("y", "dx") else stat_tol
            np.testing.assert_allclose(a, b, err_msg=f"{name} training={training}", **tol)
        ref.moving_variance.assign(ours.moving_variance)  # inference: same statistics
    assert calls == []  # the fused path was taken, training and inference


@TF_ONLY
def test_dense_fused_path_only_from_threshold(monkeypatch):
    from keras_varinit import fused_batch_norm_tf

    calls = _count_portable_calls(monkeypatch)
    n = fused_batch_norm_tf.DENSE_MIN_SIZE // 64
    x, w = _data((n, 64), seed=19)
    ref, big = _pair(x.shape)
    # dgamma / dbeta are float32 sums of 4096 terms (|sum| ~ 100), added in another order
    for a, b in zip(run_layer(big, x, w, True), run_layer(ref, x, w, True)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert calls == []
    _, small = _pair(DENSE_SHAPE)
    run_layer(small, *_data(DENSE_SHAPE), True)
    assert calls == [small.name]


@TF_ONLY
@pytest.mark.parametrize("moving_variance", ["biased", "unbiased"])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("shape", [(8, 6, 5, 4), (1, 1, 1, 4)], ids=["n240", "n1"])
def test_fused_moving_average_update(moving_variance, momentum, shape):
    """The kernel's own running-average update (exponential_avg_factor = 1 - momentum), with a
    static and with an unknown batch size, over three steps: the moving statistics follow
    moving = momentum * moving + (1 - momentum) * stat, stat the biased or n / (n - 1) one."""
    import tensorflow as tf

    xs = [_data(shape, seed=30 + k)[0] for k in range(3)]
    for signature in (None, [tf.TensorSpec([None] + list(shape[1:]), tf.float32)]):
        _, layer = _pair(shape, momentum=momentum, moving_variance=moving_variance)
        mm, mv = layer.moving_mean.numpy().astype("float64"), layer.moving_variance.numpy()
        mv = mv.astype("float64")
        fn = tf.function(lambda t: layer(t, training=True), input_signature=signature)
        for x in xs:
            fn(tf.constant(x))
            flat = x.reshape(-1, shape[-1]).astype("float64")
            n = flat.shape[0]
            var = flat.var(axis=0) * (n / max(n - 1, 1) if moving_variance == "unbiased" else 1)
            mm = momentum * mm + (1 - momentum) * flat.mean(axis=0)
            mv = momentum * mv + (1 - momentum) * var
            np.testing.assert_allclose(layer.moving_mean.numpy(), mm, **F32)
            np.testing.assert_allclose(layer.moving_variance.numpy(), mv, **F32)


# ---------------------------------------------------------------------------- synchronized
MIRRORED_SCRIPT = r'''
import json, os, sys
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
import keras
from keras_varinit.layers import BatchNormalization

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
results = {}
CASES = [((8, 4, 5, 3), est, mv, sync) for est in ["pooled", "per_sample"]
         for mv in ["biased", "unbiased"] for sync in [True, False]]
CASES += [((8, 6, 3), est, "biased", True) for est in ["pooled", "per_sample"]]
for shape, est, mv, sync in CASES:
    x = rng.normal(0.5, 2.0, size=shape).astype("float32")
    x[4:] += 1.0  # the replicas' halves differ: local statistics would be wrong
    w = rng.normal(size=shape).astype("float32")
    halves = lambda a: strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(a[4 * ctx.replica_id_in_sync_group:
                                  4 * (ctx.replica_id_in_sync_group + 1)]))
    kw = dict(variance_estimator=est, moving_variance=mv, momentum=0.5,
              gamma_initializer=keras.initializers.RandomNormal(1.0, 0.3, seed=1),
              beta_initializer=keras.initializers.RandomNormal(0.0, 0.3, seed=2))
    with strategy.scope():
        dist = BatchNormalization(synchronized=sync, **kw)
        dist.build(shape)
    ref = BatchNormalization(**kw)
    ref.build(shape)
    ref.set_weights(dist.get_weights())

    @tf.function
    def step(xs, ws):
        def fn(xi, wi):
            with tf.GradientTape() as tape:
                tape.watch(xi)
                y = dist(xi, training=True)
                loss = tf.reduce_sum(y * wi)
            return [y] + tape.gradient(loss, [xi, dist.gamma, dist.beta])
        return strategy.run(fn, args=(xs, ws))

    y, gx, gg, gb = step(halves(x), halves(w))
    local = lambda t: [v.numpy() for v in strategy.experimental_local_results(t)]
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        yr = ref(xt, training=True)
        loss = tf.reduce_sum(yr * w)
    rgx, rgg, rgb = tape.gradient(loss, [xt, ref.gamma, ref.beta])
    # max abs difference relative to max(1, max |reference|): dgamma / dbeta are float32 sums
    # (|sum| ~ 25) added in another order across the replicas, a few ulps apart
    diff = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                              / max(1.0, float(np.max(np.abs(np.asarray(b))))))
    results[f"{len(shape)}d/{est}/{mv}/sync={sync}"] = {
        "y": diff(np.concatenate(local(y)), yr),
        "dx": diff(np.concatenate(local(gx)), rgx),
        "dgamma": diff(sum(local(gg)), rgg),
        "dbeta": diff(sum(local(gb)), rgb),
        "moving_mean": diff(dist.moving_mean.numpy(), ref.moving_mean.numpy()),
        "moving_variance": diff(dist.moving_variance.numpy(),
                                ref.moving_variance.numpy()),
    }
print("RESULT " + json.dumps(results))
'''


@TF_ONLY
def test_synchronized_mirrored_strategy_equals_single_device(tmp_path):
    """Two logical CPU replicas with synchronized=True equal one device on the whole batch."""
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(script), str(repo)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 10
    for key, diffs in results.items():
        if key.endswith("sync=True"):
            for name, d in diffs.items():
                assert d < 1e-5, f"{key} {name}: relative max abs diff {d}"
        else:  # per-replica statistics differ from the global batch's: the check has teeth
            assert diffs["y"] > 1e-2 and diffs["moving_mean"] > 1e-3, key
