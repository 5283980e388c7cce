"""Shared fixtures. The backend comes from KERAS_BACKEND (make test runs TF, then JAX)."""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import keras
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def cifar10_archive():
    """Path of the CIFAR-10 JPEG archive, or None (tests needing it skip with a reason)."""
    path = os.environ.get("KERAS_VARINIT_CIFAR10")
    if path and pathlib.Path(path).exists():
        return pathlib.Path(path)
    if SHARED_CIFAR10.exists():
        return SHARED_CIFAR10
    return None


@pytest.fixture
def cifar10_path():
    path = cifar10_archive()
    if path is None:
        pytest.skip("CIFAR-10 archive not found: set KERAS_VARINIT_CIFAR10 to "
                    "cifar10-jpeg.tar.gz (CI uses ../shared/datasets/cifar10-jpeg.tar.gz)")
    return path


@pytest.fixture
def backend():
    return keras.backend.backend()


@pytest.fixture(autouse=True)
def _clear_session():
    yield
    keras.backend.clear_session()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def gated_residual():
    """A Functional CNN on 6x6x3 images, 4 classes: stem -> BN -> a -> b -> a squeeze-and-
    excitation gate (pooling, se_reduce, se_expand, multiply) -> + a shortcut convolution of
    the BN's output -> after -> pooling -> logits. Weight layers that continue the previous
    one's path: a, b, se_reduce, se_expand, logits (not stem, shortcut, after)."""
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    h = keras.layers.BatchNormalization(name="stem_bn")(h)
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(h)
    a = keras.layers.Conv2D(4, 3, padding="same", name="b")(a)
    gate = keras.layers.GlobalAveragePooling2D(keepdims=True)(a)
    gate = keras.layers.Conv2D(2, 1, activation="relu", name="se_reduce")(gate)
    gate = keras.layers.Conv2D(4, 1, activation="sigmoid", name="se_expand")(gate)
    a = keras.layers.Multiply()([a, gate])
    h = keras.layers.Add()([a, keras.layers.Conv2D(4, 1, name="shortcut")(h)])
    h = keras.layers.Conv2D(4, 3, padding="same", name="after")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(h))


@pytest.fixture(scope="session")
def small30():
    """Profiles of the 30-layer plain ReLU CNN (width 16), Xavier and Kaiming, seed 0, on 256
    N(0, 1) images: shared by test_diagnostics and test_profile_report (built once)."""
    from keras_varinit import diagnostics, models

    x = np.random.default_rng(0).standard_normal((256, 32, 32, 3)).astype("float32")
    out = {}
    for init in ("xavier_normal", "kaiming_normal"):
        model = models.reference_cnn("small30", kernel_initializer=init, seed=0)
        out[init] = diagnostics.variance_profile(model, x, seed=0)
        keras.backend.clear_session()
    return out


@pytest.fixture
def load_script():
    """`load_script("examples/x.py")`: import a script of the repository as a module (its
    `main()` is not run), for tests that call its functions with tiny settings."""
    import importlib.util

    def load(relative_path):
        path = REPO / relative_path
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def pytest_collection_modifyitems(config, items):
    """Files with a `slow` test run first (the order is otherwise kept): with two test
    processes sharing out whole files (`make test`: `--dist loadfile`), the longest files start
    at once instead of ending last, while the other process idles."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
