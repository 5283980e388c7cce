"""keras_varinit.datasets: load_cifar10 (all sources), the decode cache, synthetic_cifar10."""
import io
import os
import sys
import tarfile
import time
import types

import numpy as np
import pytest
from PIL import Image

from keras_varinit import datasets
from keras_varinit.datasets import CLASS_NAMES, load_cifar10, resolve_source, synthetic_cifar10


@pytest.fixture(autouse=True)
def _clear_session():
    """Overrides conftest's keras.backend.clear_session() after every test (~0.8 s each on a
    loaded 2-core machine): these tests build no Keras models."""
    yield


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test gets its own cache, Keras home and TFDS dir; no CIFAR-10 env var."""
    monkeypatch.setenv("KERAS_VARINIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.delenv("KERAS_VARINIT_CIFAR10", raising=False)


def _png(value, size=(32, 32)):
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _layout(per_class=2, splits=("train", "test"), classes=CLASS_NAMES):
    """{relative path: bytes}; pixel red value = 20 * label + index, so labels are checkable."""
    files = {}
    for split in splits:
        for cls in classes:
            label = CLASS_NAMES.index(cls) if cls in CLASS_NAMES else 0
            for i in range(per_class):
                files[f"{split}/{cls}/{i:04d}.png"] = _png(20 * label + i)
    return files


def _write_dir(root, files):
    for rel, blob in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    return root


def _write_tar(path, files, prefix=""):
    with tarfile.open(path, "w:gz") as tar:
        for rel, blob in files.items():
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def _check_labels(split):
    x, y = split
    assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3)
    assert y.dtype == np.int64 and y.shape == (len(x),)
    # red channel encodes 20 * label + index
    np.testing.assert_array_equal(x[:, 0, 0, 0] // 20, y)


# ---------------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_dtypes_balance_determinism():
    (x, y), (xt, yt) = synthetic_cifar10(200, 50, seed=3)
    assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8
    assert xt.shape == (50, 32, 32, 3) and yt.shape == (50,)
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert np.all(np.bincount(y, minlength=10) == 20)
    (x2, y2), _ = synthetic_cifar10(200, 50, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    (x3, _), _ = synthetic_cifar10(200, 50, seed=4)
    assert not np.array_equal(x, x3)
    assert 30 < x.std() < 120  # not constant, not saturated


def test_synthetic_is_learnable_beyond_colour():
    """Nearest class centroid on colour + grating-orientation features beats chance by far."""
    (x, y), (xt, yt) = synthetic_cifar10(2000, 500, seed=0)

    def features(images):
        f = images.astype(np.float64).mean(axis=-1)
        f -= f.mean(axis=(1, 2), keepdims=True)
        power = np.abs(np.fft.fftshift(np.fft.fft2(f), axes=(1, 2))) ** 2
        power = power.reshape(len(f), -1)
        power /= power.sum(axis=1, keepdims=True) + 1e-12
        colour = images.reshape(len(images), -1, 3).mean(1) / 255.0
        return np.concatenate([power * 30, colour], axis=1)

    f, ft = features(x), features(xt)
    centroids = np.stack([f[y == c].mean(0) for c in range(10)])
    pred = ((ft[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yt).mean() > 0.6
    # texture alone (no colour) carries the class too
    fp, fpt = f[:, :-3], ft[:, :-3]
    centroids = np.stack([fp[y == c].mean(0) for c in range(10)])
    pred = ((fpt[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yt).mean() > 0.4


@pytest.mark.parametrize("bad", [-1, 2.5, "10", True])
def test_synthetic_bad_sizes(bad):
    with pytest.raises(ValueError, match="n_train"):
        synthetic_cifar10(bad, 10)


def test_load_synthetic_source_and_resolve():
    (x, y), (xt, yt) = load_cifar10("synthetic", synthetic_size=(30, 10))
    assert x.shape == (30, 32, 32, 3) and xt.shape == (10, 32, 32, 3)
    assert resolve_source("synthetic") == "synthetic"
    assert datasets.is_synthetic("synthetic")
    assert not datasets.is_synthetic("dir", "/x")


def test_unknown_source():
    with pytest.raises(ValueError, match=r"source='cifar'.*Allowed"):
        load_cifar10("cifar")
    with pytest.raises(ValueError, match="Allowed"):
        resolve_source("cifar")


# ---------------------------------------------------------------------------------- dir / tar
def test_dir_source_directory(tmp_path):
    root = _write_dir(tmp_path / "data", _layout(per_class=3))
    (x, y), (xt, yt) = load_cifar10("dir", root, progress=False)
    assert len(x) == 30 and len(xt) == 30
    _check_labels((x, y))
    _check_labels((xt, yt))
    assert np.all(np.bincount(y) == 3)
    assert not np.all(np.diff(y) >= 0), "returned order should be shuffled, not class-sorted"


@pytest.mark.parametrize("prefix", ["", "cifar10/", "./"])
def test_dir_source_tar_gz_and_cache(tmp_path, monkeypatch, prefix):
    archive = _write_tar(tmp_path / "c.tar.gz", _layout(), prefix=prefix)
    first = load_cifar10("dir", archive, progress=False)
    _check_labels(first[0])
    _check_labels(first[1])
    cached = list((tmp_path / "cache").glob("cifar10-*.npz"))
    assert len(cached) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(datasets, "_decode_layout", boom)
    second = load_cifar10("dir", archive, progress=False)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # cache=False never reads it
    with pytest.raises(AssertionError, match="decoded again"):
        load_cifar10("dir", archive, cache=False, progress=False)


def test_cache_invalidated_when_archive_changes(tmp_path):
    archive = _write_tar(tmp_path / "c.tar.gz", _layout())
    load_cifar10("dir", archive, progress=False)
    files = _layout()
    files["train/cat/0099.png"] = _png(20 * 3 + 9)
    _write_tar(archive, files)
    os.utime(archive, (time.time() + 10, time.time() + 10))
    (x, y), _ = load_cifar10("dir", archive, progress=False)
    assert len(x) == 21
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 2


def test_env_var_and_auto(tmp_path, monkeypatch):
    archive = _write_tar(tmp_path / "c.tar.gz", _layout())
    monkeypatch.setenv("KERAS_VARINIT_CIFAR10", str(archive))
    assert resolve_source() == "dir"
    (x, y), _ = load_cifar10(progress=False)
    _check_labels((x, y))
    (x2, _), _ = load_cifar10("dir", progress=False)
    np.testing.assert_array_equal(x, x2)
    monkeypatch.setenv("KERAS_VARINIT_CIFAR10", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(FileNotFoundError, match="missing.tar.gz"):
        load_cifar10()


def test_dir_without_path():
    with pytest.raises(ValueError, match="needs a path"):
        load_cifar10("dir")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_cifar10("dir", tmp_path / "nope")


def test_corrupt_image_named(tmp_path):
    files = _layout()
    files["train/dog/0001.png"] = b"this is not an image"
    archive = _write_tar(tmp_path / "c.tar.gz", files)
    with pytest.raises(ValueError, match=r"Corrupt or unreadable image file .*train/dog/0001.png"):
        load_cifar10("dir", archive, progress=False)
    root = _write_dir(tmp_path / "d", files)
    with pytest.raises(ValueError, match=r"train/dog/0001.png"):
        load_cifar10("dir", root, progress=False)


def test_unknown_class_name(tmp_path):
    files = _layout()
    files["train/kitten/0000.png"] = _png(1)
    with pytest.raises(ValueError, match=r"Unknown class.*train/kitten.*Allowed"):
        load_cifar10("dir", _write_dir(tmp_path / "d", files), progress=False)


def test_missing_split(tmp_path):
    root = _write_dir(tmp_path / "d", _layout(splits=("train",)))
    with pytest.raises(ValueError, match="no 'test' split"):
        load_cifar10("dir", root, progress=False)


def test_no_class_folders(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png(i))
    with pytest.raises(ValueError, match="no 'train' split"):
        load_cifar10("dir", root, progress=False)


def test_missing_class(tmp_path):
    root = _write_dir(tmp_path / "d", _layout(classes=CLASS_NAMES[:9]))
    with pytest.raises(ValueError, match="lacks class folder.*truck"):
        load_cifar10("dir", root, progress=False)


def test_unequal_image_sizes(tmp_path):
    files = _layout()
    files["test/ship/0000.png"] = _png(5, size=(16, 16))
    with pytest.raises(ValueError, match=r"Unequal image sizes.*test/ship/0000.png is 16x16"):
        load_cifar10("dir", _write_dir(tmp_path / "d", files), progress=False)


def test_not_an_archive(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match="Not a directory or readable"):
        load_cifar10("dir", bad, progress=False)


def test_truncated_archive(tmp_path):
    archive = _write_tar(tmp_path / "c.tar.gz", _layout(per_class=20))
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="Truncated or corrupt archive"):
        load_cifar10("dir", archive, progress=False)


def test_non_image_and_hidden_files_ignored(tmp_path):
    files = _layout()
    files["train/cat/notes.txt"] = b"hello"
    files["train/cat/._0000.png"] = b"resource fork"
    files["README.md"] = b"readme"
    (x, y), _ = load_cifar10("dir", _write_dir(tmp_path / "d", files), progress=False)
    assert len(x) == 20


# ------------------------------------------------------------------------- keras / tfds / auto
def _fake_keras_data(n=20, nt=10):
    rng = np.random.default_rng(0)
    return ((rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             rng.integers(0, 10, (n, 1), dtype=np.uint8)),
            (rng.integers(0, 256, (nt, 32, 32, 3), dtype=np.uint8),
             rng.integers(0, 10, (nt, 1), dtype=np.uint8)))


def test_keras_source_flattens_labels(monkeypatch):
    import keras

    fake = _fake_keras_data()
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", lambda: fake)
    (x, y), (xt, yt) = load_cifar10("keras")
    assert y.shape == (20,) and y.dtype == np.int64 and yt.shape == (10,)
    np.testing.assert_array_equal(y, fake[0][1][:, 0])
    np.testing.assert_array_equal(x, fake[0][0])


def test_tfds_source_uses_data_dir(monkeypatch, tmp_path):
    calls = {}

    class Builder:
        label = types.SimpleNamespace(names=list(CLASS_NAMES))
        info = types.SimpleNamespace(features={"label": label})

    def load(name, split, batch_size, as_supervised, data_dir=None):
        calls[split] = (name, batch_size, as_supervised, data_dir)
        n = 8 if split == "train" else 4
        return (np.zeros((n, 32, 32, 3), np.uint8), np.arange(n) % 10)

    fake = types.SimpleNamespace(builder=lambda name, **kw: Builder(), load=load,
                                 as_numpy=lambda t: t)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    (x, y), (xt, yt) = load_cifar10("tfds", data_dir=tmp_path)
    assert x.shape == (8, 32, 32, 3) and y.dtype == np.int64 and len(xt) == 4
    assert calls["train"] == ("cifar10", -1, True, str(tmp_path))
    # auto picks a prepared TFDS copy (detected on disk, without importing tfds)
    info = tmp_path / "tfds" / "cifar10" / "3.0.2" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text("{}")
    assert resolve_source() == "tfds"


def test_auto_uses_keras_cache(monkeypatch, tmp_path):
    import keras

    d = tmp_path / "keras_home" / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "data_batch_1").write_bytes(b"x")
    (d / "test_batch").write_bytes(b"x")
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", lambda: _fake_keras_data())
    assert resolve_source() == "keras"
    (x, y), _ = load_cifar10()
    assert y.shape == (20,)


def test_auto_offline_nothing_cached(monkeypatch, tmp_path):
    import keras

    def offline():
        raise OSError("URL fetch failure: network unreachable")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(datasets.DatasetUnavailableError) as info:
        load_cifar10()
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for expected in ("KERAS_VARINIT_CIFAR10", "synthetic", "network unreachable",
                     str(tmp_path / "cache"), str(tmp_path / "tfds"),
                     "cifar-10-batches-py"):
        assert expected in message
    with pytest.raises(datasets.DatasetUnavailableError, match=r"could not download.*synthetic"):
        load_cifar10("keras")


def test_auto_prefers_full_decode_cache(tmp_path, monkeypatch):
    """A cached full decode (50,000 + 10,000) is found by "auto"; partial decodes are not."""
    archive = _write_tar(tmp_path / "c.tar.gz", _layout())
    load_cifar10("dir", archive, progress=False)
    assert resolve_source() == "keras"  # the 20-image decode is not a CIFAR-10 copy
    fp = {"path": "/somewhere/cifar10.tar.gz", "kind": "archive", "size": 1, "mtime_ns": 1}
    x = np.zeros((50000, 1, 1, 3), np.uint8)  # tiny images keep the test fast
    xt = np.zeros((10000, 1, 1, 3), np.uint8)
    datasets._write_cache(datasets._cache_file(fp),
                          ((x, np.zeros(50000, np.int64)), (xt, np.zeros(10000, np.int64))), fp)
    assert resolve_source() == "dir"
    (xa, _), (xta, _) = load_cifar10()
    assert xa.shape == (50000, 1, 1, 3) and xta.shape == (10000, 1, 1, 3)


# ---------------------------------------------------------------------------------- real data
@pytest.mark.real_data
def test_real_cifar10_archive(cifar10_path, monkeypatch):
    # The default (persistent) cache: the first run decodes once, later runs read the .npz.
    monkeypatch.delenv("KERAS_VARINIT_CACHE_DIR")
    monkeypatch.delenv("KERAS_HOME")
    (x, y), (xt, yt) = load_cifar10("dir", cifar10_path, progress=False)
    assert x.shape == (50000, 32, 32, 3) and x.dtype == np.uint8
    assert xt.shape == (10000, 32, 32, 3)
    assert y.dtype == np.int64 and np.all(np.bincount(y) == 5000)
    assert np.all(np.bincount(yt) == 1000)
    # README table: channel means 0.4913, 0.4821, 0.4465 on [0, 1]
    mean = x.reshape(-1, 3).mean(axis=0, dtype=np.float64) / 255.0
    np.testing.assert_allclose(mean, [0.4913, 0.4821, 0.4465], atol=6e-5)
    # class order: ships and airplanes are bluer than frogs (blue minus red, mean over class)
    blue_minus_red = [(x[y == c][..., 2].mean() - x[y == c][..., 0].mean()) for c in range(10)]
    assert blue_minus_red[CLASS_NAMES.index("ship")] > blue_minus_red[CLASS_NAMES.index("frog")]
    assert blue_minus_red[CLASS_NAMES.index("airplane")] > blue_minus_red[CLASS_NAMES.index("deer")]
