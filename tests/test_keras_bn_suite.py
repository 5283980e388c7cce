"""Keras's own BatchNormalization tests, run against `kv.layers.BatchNormalization`.

The test file that ships in the keras wheel
(`keras/src/layers/normalization/batch_normalization_test.py`) is loaded from the installed
package (nothing is copied into this repository), and the `layers` namespace its tests read
`layers.BatchNormalization` from is replaced by one in which that name is our layer (every other
name, e.g. `layers.Masking`, stays Keras's). Pytest then collects its `unittest` test case as
usual. If the file is missing, `test_keras_test_file_is_installed` fails.

Refused options: none. Every option Keras's tests exercise (masks on any axis, `renorm`,
`synchronized`, regularizers, autocast) is supported by our layer with its default
`variance_estimator="pooled"`, `moving_variance="biased"`, so all of Keras's tests must pass on
TensorFlow and on JAX. (Our layer refuses `renorm=True` only with a non-default estimator or
moving variance; Keras's tests never combine them.)
"""
import importlib.util
import pathlib
import types
import unittest

import keras
import pytest

import keras_varinit as kv

pytestmark = pytest.mark.backend_independent

KERAS_TEST_FILE = (
    pathlib.Path(keras.__file__).parent
    / "src" / "layers" / "normalization" / "batch_normalization_test.py"
)


def _layers_with_ours(original):
    """A copy of the module namespace `original` whose `BatchNormalization` is ours."""
    namespace = types.ModuleType(original.__name__)
    namespace.__dict__.update(vars(original))
    namespace.BatchNormalization = kv.layers.BatchNormalization
    return namespace


def _load_keras_tests(path):
    """Import Keras's BN test module from `path`, with `layers.BatchNormalization` = ours."""
    spec = importlib.util.spec_from_file_location("keras_batch_normalization_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.layers = _layers_with_ours(module.layers)
    return module


_keras_tests = _load_keras_tests(KERAS_TEST_FILE) if KERAS_TEST_FILE.exists() else None
if _keras_tests is not None:
    # A unittest.TestCase in this module's namespace: pytest collects its tests.
    KerasBatchNormalizationTest = _keras_tests.BatchNormalizationTest


def test_keras_test_file_is_installed():
    assert KERAS_TEST_FILE.exists(), (
        f"Keras's BatchNormalization test file is not in the installed keras {keras.__version__}"
        f": expected {KERAS_TEST_FILE}. The drop-in check cannot run without it."
    )


def test_keras_tests_use_our_layer():
    """The substitution is effective: the loaded tests see our class, and only there."""
    assert _keras_tests is not None, f"not found: {KERAS_TEST_FILE}"
    assert _keras_tests.layers.BatchNormalization is kv.layers.BatchNormalization
    assert _keras_tests.layers.Masking is keras.layers.Masking
    assert keras.layers.BatchNormalization is not kv.layers.BatchNormalization
    names = [n for n in dir(KerasBatchNormalizationTest) if n.startswith("test")]
    assert len(names) >= 30, names


def test_keras_tests_run_our_code(monkeypatch):
    """One of Keras's tests, run here, goes through our layer's own computation."""
    assert _keras_tests is not None, f"not found: {KERAS_TEST_FILE}"
    calls = []
    portable = kv.layers.BatchNormalization._call_portable

    def counting(self, *args, **kwargs):
        calls.append(type(self))
        return portable(self, *args, **kwargs)

    monkeypatch.setattr(kv.layers.BatchNormalization, "_call_portable", counting)
    result = unittest.TestResult()
    KerasBatchNormalizationTest("test_masked_broadcast_normalization").run(result)
    assert result.wasSuccessful(), result.failures + result.errors
    assert calls == [kv.layers.BatchNormalization]  # a masked training step: the portable path
