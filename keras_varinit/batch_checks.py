"""Checks on a user's input batch, shared by the variance profile, the callback's probe and lsuv.

One rule each: a batch is numpy-convertible, non-empty and numeric (`as_arrays`), holds enough
examples for a variance (`check_examples`), and is finite (`check_finite`): a NaN or Inf in the
batch would turn every statistic downstream into NaN and a verdict built on them, so it is
refused with the count, before anything runs.
"""
import numpy as np


def as_arrays(x, caller, n_inputs=None):
    """`x` (an array, or a list/tuple of arrays, one per model input) as numpy arrays.

    Raises ValueError for None, a dict, a wrong number of inputs, an empty, non-numeric or
    non-array batch, saying what was received.
    """
    import keras

    if isinstance(x, dict):
        raise ValueError(f"{caller} takes a batch as an array (or a list of arrays, one per "
                         f"model input), not a dict. Received: x of type {type(x).__name__}")
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    if n_inputs is not None and len(items) != n_inputs:
        raise ValueError(f"The model has {n_inputs} input(s) but the batch has {len(items)}. "
                         f"Received: x of type {type(x).__name__}"
                         + (" (a list or tuple is read as one array per model input: for one "
                            "input, pass np.asarray(x))" if isinstance(x, (list, tuple)) else ""))
    arrays = []
    for item in items:
        if item is None:
            raise ValueError(f"{caller} needs a batch of data. Received: x=None")
        try:
            arr = np.asarray(keras.ops.convert_to_numpy(item))
        except Exception as err:  # noqa: BLE001 -- say what was received
            raise ValueError(f"{caller} needs a numeric array batch. Received: x of type "
                             f"{type(item).__name__}") from err
        if arr.ndim == 0 or arr.shape[0] == 0 or arr.size == 0:
            raise ValueError(f"{caller} needs a non-empty batch. Received: x with shape "
                             f"{arr.shape}")
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
            raise ValueError(f"{caller} needs a numeric batch. Received: x with dtype "
                             f"{arr.dtype}")
        arrays.append(arr)
    return arrays


def check_examples(arrays, caller, minimum=2):
    """Raise ValueError unless the batch (`as_arrays`'s list, one array per input) holds at
    least `minimum` examples: a variance over the batch (per unit, as the profile and LSUV
    measure it) needs two."""
    if len(arrays[0]) < minimum:
        shapes = [tuple(np.shape(a)) for a in arrays]
        raise ValueError(f"{caller} needs a batch of at least {minimum} examples. Received: x "
                         f"with shape {shapes[0] if len(shapes) == 1 else shapes}")


def count_nonfinite(array):
    """`(nan, inf)`: how many entries of `array` are NaN and how many are +-Inf."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact):
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = int(np.count_nonzero(np.isinf(array)))
    return nan, inf


def check_finite(arrays, caller):
    """Raise ValueError naming the count of NaN/Inf entries in `arrays` (a list, or one array).

    >>> check_finite([np.array([1.0, np.nan])], "variance_profile")
    Traceback (most recent call last):
    ValueError: variance_profile needs a finite batch. Received: x with 1 non-finite value(s) ...
    """
    if not isinstance(arrays, (list, tuple)):
        arrays = [arrays]
    nan = inf = size = 0
    for array in arrays:
        n, i = count_nonfinite(array)
        nan, inf, size = nan + n, inf + i, size + np.size(array)
    if nan or inf:
        shapes = [tuple(np.shape(a)) for a in arrays]
        shape = shapes[0] if len(shapes) == 1 else shapes
        raise ValueError(
            f"{caller} needs a finite batch. Received: x with {nan + inf} non-finite value(s) "
            f"({nan} NaN, {inf} Inf) among {size} (shape {shape}). Allowed: finite numbers "
            "only; drop or repair those examples first (e.g. np.nan_to_num).")
