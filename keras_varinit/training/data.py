"""The data of a run: CIFAR-10 (or its synthetic stand-in), a seeded subset, and inputs
normalized per channel with the pooled statistics of the training subset actually used
(``channel_stats(x_train, "pooled")``: what batch normalization would compute), or, with
``input_normalization="none"``, the raw pixels in [0, 255]."""
import numpy as np

from keras_varinit import datasets
from keras_varinit.channel_stats import channel_stats

# Synthetic data sizes when no subset is given.
SYNTHETIC_TRAIN = 5000
SYNTHETIC_TEST = 1000


def _source(config):
    """``(source, path)`` for ``datasets.load_cifar10`` from ``config.data``."""
    if config.data in ("auto", "synthetic"):
        return config.data, None
    return "dir", config.data


def data_is_synthetic(config):
    """Whether ``config.data`` gives synthetic data (``datasets.resolve_source``), without
    loading anything."""
    source, path = _source(config)
    if source == "synthetic":
        return True
    try:
        return datasets.resolve_source(source, path) == "synthetic"
    except Exception:  # noqa: BLE001 - load_data raises the informative error
        return False


def _load_splits(config):
    """``((x_train, y_train), (x_test, y_test)), source``, before subsetting."""
    if config.data == "synthetic":
        n_train = config.subset or SYNTHETIC_TRAIN
        n_test = config.val_subset or SYNTHETIC_TEST
        return datasets.synthetic_cifar10(n_train, n_test, seed=config.seed), "synthetic"
    source, path = _source(config)
    splits = datasets.load_cifar10(source, path)
    return splits, datasets.resolve_source(source, path)


def _subset(rng, x, y, n):
    """A sorted seeded random subset of ``n`` samples (all of them if n is None or too big)."""
    y = np.asarray(y).reshape(-1).astype("int32")
    if n is None or n >= len(x):
        return x, y
    index = np.sort(rng.permutation(len(x))[:n])
    return x[index], y[index]


def load_data(config):
    """Training and validation arrays for ``config``: float32 NHWC normalized per channel with
    the pooled statistics of the training subset (raw pixels when
    ``config.input_normalization == "none"``), int32 labels.

    Returns ``(x_train, y_train), (x_val, y_val), info`` with info = {"synthetic", "source",
    "mean", "std"} (mean and std per channel, as used: 0 and 1 for raw pixels).
    """
    ((x_train, y_train), (x_test, y_test)), source = _load_splits(config)
    rng = np.random.default_rng(config.seed)
    x_train, y_train = _subset(rng, x_train, y_train, config.subset)
    x_test, y_test = _subset(rng, x_test, y_test, config.val_subset)

    stats = channel_stats(x_train, estimator="pooled")
    mean = np.asarray(stats.mean, dtype="float64").reshape(-1)
    std = np.asarray(stats.std, dtype="float64").reshape(-1)
    std = np.where(std > 0, std, 1.0)
    if config.input_normalization == "none":
        mean, std = np.zeros_like(mean), np.ones_like(std)

    def normalize(x):
        return ((np.asarray(x, dtype="float32") - mean.astype("float32"))
                / std.astype("float32")).astype("float32")

    info = {"synthetic": source == "synthetic", "source": source,
            "mean": mean.tolist(), "std": std.tolist()}
    return (normalize(x_train), y_train), (normalize(x_test), y_test), info
