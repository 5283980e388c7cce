"""keras_varinit.channel_stats: channel_stats / ChannelStats (BN layer: test_batch_norm.py)."""
import numpy as np
import pytest

from keras_varinit.channel_stats import (ChannelStats, channel_stats, channel_stats_both,
                                         format_table)

README_TABLE = {  # ../shared/datasets/README.md, decoded JPEG training set on [0, 1]
    "mean": [0.4913, 0.4821, 0.4465],
    "pooled": [0.2452, 0.2428, 0.2606],
    "per_sample": [0.2004, 0.1987, 0.2008],
}


@pytest.fixture(autouse=True)
def _clear_session():
    """Overrides conftest's keras.backend.clear_session() after every test (~0.8 s each on a
    loaded 2-core machine): these tests build no Keras models (test_normalization_layer,
    which builds layers, clears the session itself)."""
    yield


def _reference(x, axis=-1):
    """numpy float64 reference: mean, pooled std, mean of per-sample std (channel axis `axis`)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    reduce_all = tuple(range(x.ndim - 1))
    spatial = tuple(range(1, x.ndim - 1))
    mean = x.mean(axis=reduce_all)
    pooled = x.std(axis=reduce_all)
    per_sample = x.std(axis=spatial).mean(axis=0) if spatial else None
    return mean, pooled, per_sample


def _assert_matches(data, x, axis=-1, tol=1e-10, **kw):
    mean, pooled, per_sample = _reference(x, axis)
    p = channel_stats(data, "pooled", axis=axis, **kw)
    np.testing.assert_allclose(p.mean, mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(p.std, pooled, rtol=tol, atol=tol)
    np.testing.assert_allclose(p.variance, pooled**2, rtol=tol, atol=tol)
    if per_sample is not None:
        s = channel_stats(data, "per_sample", axis=axis, **kw)
        np.testing.assert_allclose(s.mean, mean, rtol=tol, atol=tol)
        np.testing.assert_allclose(s.std, per_sample, rtol=tol, atol=tol)
        np.testing.assert_allclose(s.variance, per_sample**2, rtol=tol, atol=tol)
    return p


# ---------------------------------------------------------------------------------- numerics
@pytest.mark.backend_independent
@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "float32", "float64",
                                   "int32", "bool"])
@pytest.mark.parametrize("batch_size", [1, 7, 1024])
def test_matches_numpy_float64(rng, dtype, batch_size):
    if dtype == "bool":
        x = rng.random((37, 6, 5, 3)) < 0.3
    elif dtype.startswith(("uint", "int")):
        info = np.iinfo(dtype)
        x = rng.integers(info.min, int(info.max) + 1, (37, 6, 5, 3)).astype(dtype)
    else:
        x = (rng.normal(3.0, 2.0, (37, 6, 5, 3)) * [1, 10, 0.1]).astype(dtype)
    p = _assert_matches(x, x, batch_size=batch_size)
    assert p.count == 37 * 30 and p.n_samples == 37 and p.estimator == "pooled"


@pytest.mark.backend_independent
def test_channels_first_and_flat(rng):
    x = rng.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)  # NCHW
    _assert_matches(x, x, axis=1, batch_size=6)
    xf = rng.normal(size=(20, 3, 8, 8))
    _assert_matches(xf, xf, axis=1, batch_size=6)
    flat = rng.normal(5.0, [1.0, 2.0, 3.0, 4.0, 5.0], size=(101, 5))  # (N, d): per feature
    p = _assert_matches(flat, flat, batch_size=10)
    assert p.mean.shape == (5,) and p.count == 101
    flat8 = rng.integers(0, 256, (101, 7), dtype=np.uint8)
    _assert_matches(flat8, flat8, batch_size=10)


@pytest.mark.backend_independent
def test_axis_negative_and_middle(rng):
    x = rng.normal(size=(10, 4, 5, 6))
    _assert_matches(x, x, axis=2)
    _assert_matches(x, x, axis=-2)


@pytest.mark.backend_independent
def test_per_sample_differs_from_pooled_by_between_image_spread(rng):
    """Images with different brightness: pooled includes the spread of image means."""
    offsets = rng.normal(0, 3.0, (200, 1, 1, 1))
    x = offsets + rng.normal(0, 1.0, (200, 16, 16, 2))
    pooled, per_sample = channel_stats_both(x)
    np.testing.assert_allclose(per_sample.std, 1.0, atol=0.02)
    np.testing.assert_allclose(pooled.std, np.sqrt(1 + 9), rtol=0.1)
    np.testing.assert_array_equal(pooled.mean, per_sample.mean)
    # swapping the estimators would fail these
    assert np.all(pooled.std > 2 * per_sample.std)


@pytest.mark.backend_independent
def test_stable_merge_with_large_offset(rng):
    """Naive sum of squares loses everything at offset 1e8; the Chan merge does not."""
    x = 1e8 + rng.normal(0.0, 1.0, (4000, 3))
    p = channel_stats(x, batch_size=100)
    np.testing.assert_allclose(p.std, x.std(axis=0), rtol=1e-6)
    naive = np.sqrt(np.maximum((x**2).mean(0) - x.mean(0) ** 2, 0))
    assert np.abs(naive - x.std(axis=0)).max() > 0.05  # the naive formula really fails here


@pytest.mark.backend_independent
def test_uint8_no_overflow():
    """3.1e8 values of 255: a uint8/uint32 accumulator would wrap; mean 255 and std 0 exactly."""
    x = np.broadcast_to(np.uint8(255), (100_000, 32, 32, 3))
    p, s = channel_stats_both(x, batch_size=20_000)
    np.testing.assert_array_equal(p.mean, 255.0)
    np.testing.assert_array_equal(p.std, 0.0)
    np.testing.assert_array_equal(s.std, 0.0)
    assert p.count == 100_000 * 1024
    # two values only: exact mean 127.5 and std 127.5
    x = np.zeros((5000, 64, 64, 1), np.uint8)
    x[:, ::2] = 255
    p = channel_stats(x, scale=255)
    assert p.mean[0] == 0.5 and p.std[0] == 0.5


@pytest.mark.backend_independent
def test_scale(rng):
    x = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    raw, scaled = channel_stats(x), channel_stats(x, scale=255)
    np.testing.assert_allclose(scaled.mean, raw.mean / 255, rtol=1e-14)
    np.testing.assert_allclose(scaled.std, raw.std / 255, rtol=1e-14)
    assert scaled.scale == 255.0


# ---------------------------------------------------------------------------------- inputs
@pytest.mark.backend_independent
def test_iterables_of_batches(rng):
    x = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 50)
    chunks = [x[i:i + 16] for i in range(0, 50, 16)]
    _assert_matches(chunks, x)
    _assert_matches([(c, y[:len(c)]) for c in chunks], x)
    _assert_matches([{"x": c, "y": 0} for c in chunks], x)
    _assert_matches([{"image": c.astype(np.float32)} for c in chunks], x)
    # a batch of another dtype switches to float accumulation, result unchanged
    mixed = chunks[:2] + [chunks[2].astype(np.float64)] + chunks[3:]
    _assert_matches(mixed, x)
    # empty batches are skipped
    _assert_matches([x[:0]] + chunks, x)


def test_tf_dataset_batched_and_unbatched(rng):
    import tensorflow as tf

    x = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 50)
    _assert_matches(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), x)
    _assert_matches(tf.data.Dataset.from_tensor_slices(x).batch(8, drop_remainder=False), x)
    _assert_matches(tf.data.Dataset.from_tensor_slices(x), x, batch_size=16)  # single images
    flat = rng.normal(size=(40, 6))
    _assert_matches(tf.data.Dataset.from_tensor_slices((flat, y[:40])), flat)  # single vectors
    _assert_matches(tf.convert_to_tensor(x), x)  # a tensor is an array, not a batch iterable
    # batches of a static size (drop_remainder) look like samples: say which, or be asked
    seq = rng.normal(size=(48, 10, 5)) * rng.uniform(0.5, 3, (48, 1, 1))
    fixed = tf.data.Dataset.from_tensor_slices(seq).batch(8, drop_remainder=True)
    _assert_matches(fixed, seq, batched=True)
    with pytest.raises(ValueError, match=r"batches or single samples.*\(8, 10, 5\).*batched="):
        channel_stats(fixed)
    gray = rng.normal(size=(20, 6, 6))
    _assert_matches(tf.data.Dataset.from_tensor_slices(gray), gray, batched=False)
    with pytest.raises(ValueError, match=r"shape \(6, 6\)"):
        channel_stats(tf.data.Dataset.from_tensor_slices(gray))


def test_single_samples_and_lists_of_numbers(rng):
    """A list of images read as a list of batches gave per-row 'samples' (4x n_samples, a
    wrong per-sample std); batched=False says they are samples. A nested list of numbers is
    the data."""
    x = rng.normal(size=(20, 4, 4, 3)) * rng.uniform(0.5, 3, (20, 1, 1, 1))
    _assert_matches(list(x), x, batched=False)
    _assert_matches(tuple(x), x, batched=False, batch_size=7)
    rows = [[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]]
    _assert_matches(rows, np.array(rows))


@pytest.mark.backend_independent
def test_backend_tensor_input(rng):
    import keras

    x = rng.normal(size=(20, 4, 4, 3)).astype("float32")
    _assert_matches(keras.ops.convert_to_tensor(x), x, tol=1e-6)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.backend_independent
def test_bad_input_errors(rng):
    x = rng.normal(size=(10, 4, 4, 3))
    with pytest.raises(ValueError, match=r"estimator='median'.*Allowed: 'pooled', 'per_sample'"):
        channel_stats(x, estimator="median")
    with pytest.raises(ValueError, match=r"axis is out of range.*axis=4"):
        channel_stats(x, axis=4)
    with pytest.raises(ValueError, match=r"axis is out of range.*axis=-5"):
        channel_stats(x, axis=-5)
    with pytest.raises(ValueError, match="not the sample axis"):
        channel_stats(x, axis=0)
    with pytest.raises(ValueError, match="axis must be an int"):
        channel_stats(x, axis=1.0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        channel_stats(x, batch_size=0)
    with pytest.raises(ValueError, match="scale must be a positive"):
        channel_stats(x, scale=0)
    with pytest.raises(ValueError, match="ndim=1"):
        channel_stats(np.arange(10.0))
    with pytest.raises(ValueError, match="scalar"):
        channel_stats(np.float64(3.0))
    with pytest.raises(ValueError, match="numeric"):
        channel_stats(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="Received: str"):
        channel_stats("cifar10")
    with pytest.raises(ValueError, match="data=None"):
        channel_stats(None)
    with pytest.raises(ValueError, match="Cannot tell which entry"):
        channel_stats([{"a": x, "b": x}])
    with pytest.raises(ValueError, match=r"at least one value.*\(5, 0, 3\)"):
        channel_stats(np.zeros((5, 0, 3)))
    with pytest.raises(ValueError, match="batched must be True, False or None"):
        channel_stats(x, batched="yes")


@pytest.mark.backend_independent
def test_per_sample_on_flat_data_says_why(rng):
    with pytest.raises(ValueError, match=r"no spatial axes.*estimator='pooled'"):
        channel_stats(rng.normal(size=(10, 5)), estimator="per_sample")


@pytest.mark.backend_independent
@pytest.mark.parametrize("empty", [np.zeros((0, 8, 8, 3), np.uint8), [], iter(()),
                                   [np.zeros((0, 4))]])
def test_empty_data(empty):
    with pytest.raises(ValueError, match="empty data"):
        channel_stats(empty)


@pytest.mark.backend_independent
def test_mismatched_batch_shapes(rng):
    batches = [rng.normal(size=(4, 8, 8, 3)), rng.normal(size=(4, 8, 7, 3))]
    with pytest.raises(ValueError, match=r"Batch 1 has shape \(4, 8, 7, 3\).*\(8, 8, 3\)"):
        channel_stats(batches)
    with pytest.raises(ValueError, match="same sample shape"):
        channel_stats([rng.normal(size=(4, 3)), rng.normal(size=(4, 1, 3))])


@pytest.mark.backend_independent
def test_nan_and_inf_counted(rng):
    x = rng.normal(size=(30, 4, 4, 3))
    x[0, 0, 0, 0] = np.nan
    x[5, 1, 1, 0] = np.nan
    x[7, 2, 2, 2] = np.inf
    x[9, 2, 2, 1] = -np.inf
    with pytest.raises(ValueError, match=r"2 NaN and 2 Inf.*NaN \[2, 0, 0\].*ignore_nan=True"):
        channel_stats(x, batch_size=8)
    p, s = channel_stats_both(x, batch_size=8, ignore_nan=True)
    clean = np.where(np.isfinite(x), x, np.nan)
    np.testing.assert_allclose(p.mean, np.nanmean(clean, axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(p.std, np.nanstd(clean, axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(s.std, np.nanstd(clean, axis=(1, 2)).mean(0), rtol=1e-12)
    assert list(p.count) == [478, 479, 479]


# ---------------------------------------------------------------------------------- ChannelStats
@pytest.mark.backend_independent
def test_normalization_layer(rng):
    import keras

    x = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    stats = channel_stats(x, scale=255)
    layer = stats.normalization_layer()
    assert isinstance(layer, keras.layers.Normalization) and layer.built
    out = keras.ops.convert_to_numpy(layer(x.astype("float32") / 255))
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    raw = stats.normalization_layer(raw_input=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(raw(x.astype("float32"))), out,
                               atol=1e-4)
    # channels first
    xc = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    layer = channel_stats(xc, axis=1).normalization_layer()
    out = keras.ops.convert_to_numpy(layer(xc.astype("float32")))
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
    # flat (N, d)
    flat = rng.normal(4.0, 3.0, (100, 5))
    layer = channel_stats(flat).normalization_layer()
    out = keras.ops.convert_to_numpy(layer(flat.astype("float32")))
    np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-4)
    keras.backend.clear_session()


@pytest.mark.backend_independent
def test_repr_and_tables(rng):
    x = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    pooled, per_sample = channel_stats_both(x, scale=255)
    assert isinstance(pooled, ChannelStats)
    text = repr(pooled)
    assert "estimator='pooled'" in text and f"{pooled.mean[0]:.4f}" in text and "scale=255" in text
    table = pooled.to_table()
    assert table.splitlines()[0].split("|")[2].strip() == "R"
    assert f"{pooled.std[2]:.4f}" in table and "pooled" in table
    both = format_table(pooled, per_sample, digits=5)
    lines = both.splitlines()
    assert len(lines) == 5 and "mean of per-image std" in lines[4]
    assert f"{per_sample.std[1]:.5f}" in lines[4] and f"{pooled.std[1]:.5f}" in lines[3]
    assert channel_stats(rng.normal(size=(5, 4))).channel_names() == ["c0", "c1", "c2", "c3"]


# ---------------------------------------------------------------------------------- real data
@pytest.mark.real_data
def test_cifar10_reproduces_readme_table(cifar10_path):
    from keras_varinit.datasets import load_cifar10

    (x, _), _ = load_cifar10("dir", cifar10_path, progress=False)  # cached after the first decode
    pooled, per_sample = channel_stats_both(x, scale=255)
    np.testing.assert_array_equal(np.round(pooled.mean, 4), README_TABLE["mean"])
    np.testing.assert_array_equal(np.round(pooled.std, 4), README_TABLE["pooled"])
    np.testing.assert_array_equal(np.round(per_sample.std, 4), README_TABLE["per_sample"])
    assert pooled.count == 50000 * 1024 and pooled.n_samples == 50000
    # and equals numpy float64 on a slice of the real data
    _assert_matches(x[:2000], x[:2000], scale=None)
