"""keras_varinit.user_models: a user's .keras file or factory, loaded safely, clear refusals."""
import textwrap

import keras
import numpy as np
import pytest

from keras_varinit import user_models
from keras_varinit.user_models import ModelLoadError

pytestmark = pytest.mark.backend_independent


def _cifar_model(name="mine"):
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(h), name=name)


def test_keras_file_round_trip(tmp_path):
    model = _cifar_model()
    path = tmp_path / "mine.keras"
    model.save(path)
    loaded = user_models.load_user_model(str(path))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-6)
    assert user_models.cifar10_mismatch(loaded) is None


def test_lambda_layer_is_refused_in_safe_mode(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 3, name="triple")(inputs))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ModelLoadError, match=r"holds Lambda layer\(s\) \['triple'\].*safe mode"):
        user_models.load_model_file(path)


def test_truncated_file_and_renamed_png_get_clear_messages(tmp_path):
    path = tmp_path / "mine.keras"
    _cifar_model().save(path)
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt .keras archive"):
        user_models.load_model_file(truncated)
    png = tmp_path / "picture.keras"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(ModelLoadError, match="is not a Keras model archive: it is a PNG image"):
        user_models.load_model_file(png)
    text = tmp_path / "notes.keras"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a zip archive"):
        user_models.load_model_file(text)
    with pytest.raises(ModelLoadError, match="No such model file"):
        user_models.load_model_file(tmp_path / "missing.keras")


def test_unknown_custom_layer_is_reported_by_name(tmp_path):
    @keras.saving.register_keras_serializable(package="TestOnly")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return x * 2

    inputs = keras.Input((4,))
    path = tmp_path / "custom.keras"
    keras.Model(inputs, keras.layers.Dense(2)(Doubler()(inputs))).save(path)
    assert isinstance(user_models.load_model_file(path), keras.Model)   # known: loads
    keras.saving.get_custom_objects().pop("TestOnly>Doubler")
    with pytest.raises(ModelLoadError, match=r"custom classes this process does not know: "
                                             r"\['TestOnly>Doubler'\].*give a factory instead"
                                             r".*--model my_module:load"):
        user_models.load_model_file(path)


def test_factory_from_a_file_and_its_errors(tmp_path):
    script = tmp_path / "nets.py"
    script.write_text(textwrap.dedent("""
        import keras

        def build():
            inputs = keras.Input((8,))
            return keras.Model(inputs, keras.layers.Dense(3)(inputs))

        def not_a_model():
            return 42

        def unbuilt():
            return keras.Sequential([keras.layers.Dense(3)])

        def two_heads():
            inputs = keras.Input((8,))
            return keras.Model(inputs, [keras.layers.Dense(3)(inputs),
                                        keras.layers.Dense(2)(inputs)])
    """))
    model = user_models.load_user_model(f"{script}:build")
    assert user_models.model_input_shape(model) == (8,)
    assert "(8,)" in user_models.cifar10_mismatch(model)
    with pytest.raises(ValueError, match=r"input shape is \(8,\).*CIFAR-10 images are "
                                         r"\(32, 32, 3\)"):
        user_models.check_cifar10_input(model)
    with pytest.raises(ModelLoadError, match="gave a int, not a keras.Model"):
        user_models.load_user_model(f"{script}:not_a_model")
    with pytest.raises(ModelLoadError, match="unbuilt model"):
        user_models.load_user_model(f"{script}:unbuilt")
    with pytest.raises(ModelLoadError, match=r"with 2 outputs \[\(None, 3\), \(None, 2\)\]\. "
                                             r"Allowed: a model with one output"):
        user_models.load_user_model(f"{script}:two_heads")
    with pytest.raises(ModelLoadError, match="has no function 'nope'"):
        user_models.load_user_model(f"{script}:nope")
    with pytest.raises(ModelLoadError, match="Cannot import module 'no_such_module_xyz'"):
        user_models.load_user_model("no_such_module_xyz:build")
    with pytest.raises(ModelLoadError, match="Cannot tell how to load"):
        user_models.load_user_model("model.h5")
    with pytest.raises(ModelLoadError, match=(
            r"needs the function that builds the model after a colon\. Received: 'nets\.py', "
            r"with no function\. Allowed: 'nets\.py:function', e\.g\. 'nets\.py:build'")):
        user_models.load_user_model("nets.py")


def test_cifar10_shapes():
    assert user_models.cifar10_shape_mismatch((32, 32, 3)) is None
    assert user_models.cifar10_shape_mismatch((None, None, 3)) is None
    assert "(64, 64, 3)" in user_models.cifar10_shape_mismatch((64, 64, 3))
    assert "(32, 32, 1)" in user_models.cifar10_shape_mismatch((32, 32, 1))

    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((2, 32, 32, 3), "float32"))
    assert user_models.model_input_shape(net) == (32, 32, 3)   # from the build config
    assert user_models.cifar10_mismatch(net) is None
