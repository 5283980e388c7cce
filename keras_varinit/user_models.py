"""A user's own model: loading it (a `.keras` file or a Python factory) and checking its input.

Shared by `keras-varinit profile --model` and the explorer's "Your model" upload. A `.keras`
file is untrusted input: it is checked before Keras reads it (a zip archive with a
`config.json`, no Lambda layer, no class this process does not know) and loaded with
`keras.models.load_model(path, safe_mode=True, compile=False)`; anything wrong becomes a
`ModelLoadError` (a ValueError) whose message says what was received and what works, never a
traceback. A factory `"module:function"` (or `"path/to/file.py:function"`) is the user's own
code, imported and called in this process: the CLI's path, never the explorer's.

>>> model = load_user_model("my_net.keras")           # or "my_project.nets:build"
>>> check_cifar10_input(model)                        # ValueError if not (32, 32, 3) images

Public names: `ModelLoadError`, `load_user_model`, `inspect_model_file`, `load_model_file`,
`load_factory`, `unknown_classes`, `model_input_shape`, `cifar10_shape_mismatch`,
`cifar10_mismatch`, `check_cifar10_input`, `file_sha256`, `CIFAR10_INPUT_SHAPE`.
"""
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import pathlib
import sys
import zipfile

CIFAR10_INPUT_SHAPE = (32, 32, 3)
_ALLOWED = ("Allowed: a .keras file saved with model.save(...) (Keras 3), or a factory "
            "'module:function' / 'path/to/file.py:function' returning a built keras.Model")


class ModelLoadError(ValueError):
    """A model file or factory that cannot be loaded; the message says why and what works.

    `reason`: what is wrong with what was received; `allowed`: what works (`generic`: the
    usual sources, a .keras file or a factory, which a caller that offers other sources, such
    as the explorer's upload, says in its own words); `str()` is both.
    """

    def __init__(self, reason, allowed=None):
        self.reason, self.generic = reason, allowed is None
        self.allowed = _ALLOWED if allowed is None else allowed
        super().__init__(f"{reason} {self.allowed}")


def file_sha256(path):
    """The SHA-256 hex digest of the file at `path` (read in 1 MiB chunks): what a run records
    of its `.keras` file, so that `--resume` can tell that the file changed since."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_user_model(spec):
    """A built `keras.Model` from `spec`: a path ending in `.keras`, or `module:function`."""
    spec = os.fspath(spec)
    if spec.endswith(".keras"):
        return load_model_file(spec)
    if ":" in spec and not spec.endswith(":"):
        return load_factory(spec)
    if spec.endswith(".py"):
        raise ModelLoadError(f"A Python file needs the function that builds the model after a "
                             f"colon. Received: {spec!r}, with no function.",
                             f"Allowed: '{spec}:function', e.g. '{spec}:build'.")
    raise ModelLoadError(f"Cannot tell how to load this model. Received: {spec!r}.")


# --------------------------------------------------------------------------------------------
# .keras files

def _read_config(path):
    """The `config.json` of a `.keras` archive, or ModelLoadError saying what the file is."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89PNG"):
        kind = "a PNG image"
    elif head.startswith(b"\xff\xd8\xff"):
        kind = "a JPEG image"
    elif head.startswith(b"\x89HDF"):
        kind = "an HDF5 file (the legacy .h5 format)"
    elif not head.startswith(b"PK"):
        kind = "not a zip archive"
    else:
        kind = None
    if kind is not None:
        raise ModelLoadError(f"{path} is not a Keras model archive: it is {kind}.")
    try:
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise ModelLoadError(f"{path} is a zip archive without config.json: not a "
                                     "Keras model.")
            return json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        if isinstance(err, ModelLoadError):
            raise
        raise ModelLoadError(f"{path} is a truncated or corrupt .keras archive "
                             f"({type(err).__name__}: {err}).") from None


def _nodes(config):
    """Every serialized object ({"class_name", "registered_name", ...}) in a config tree."""
    if isinstance(config, dict):
        if "class_name" in config and "registered_name" in config:
            yield config
        for value in config.values():
            yield from _nodes(value)
    elif isinstance(config, list):
        for value in config:
            yield from _nodes(value)


def unknown_classes(config):
    """Names of the custom classes a model config uses that this process has not registered
    (`keras.saving.register_keras_serializable`), sorted."""
    import keras

    unknown = set()
    for node in _nodes(config):
        name, module = node.get("registered_name"), node.get("module") or ""
        if not name or name == "function" or module.startswith("keras"):
            continue
        if keras.saving.get_registered_object(name) is None:
            unknown.add(name)
    return sorted(unknown)


def inspect_model_file(path):
    """The model config of a `.keras` file, read without Keras and without running anything:
    ModelLoadError if the file is missing, is not a Keras archive (a PNG, an HDF5 file, a
    truncated zip...) or holds a Lambda layer. Cheap (reads `config.json` only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"No such model file. Received: {path!r}.")
    config = _read_config(path)
    lambdas = sorted({n.get("config", {}).get("name", "?") for n in _nodes(config)
                      if n.get("class_name") == "Lambda"})
    if lambdas:
        raise ModelLoadError(
            f"{path} holds Lambda layer(s) {lambdas}: their Python code is not loaded in safe "
            "mode (it could run anything).", "Allowed: models without Lambda layers; replace a "
            "Lambda by a custom layer registered with keras.saving.register_keras_serializable "
            "(and import its module before loading).")
    return config


def load_model_file(path):
    """Load a `.keras` file safely (see the module doc), or raise ModelLoadError."""
    import keras

    import keras_varinit

    keras_varinit.register()   # the package's own layers and initializers are known classes
    path = os.fspath(path)
    config = inspect_model_file(path)
    unknown = unknown_classes(config)
    if unknown:
        raise ModelLoadError(
            f"{path} uses custom classes this process does not know: {unknown} (Keras's own "
            "layers and keras_varinit's are known; others must be registered with "
            "keras.saving.register_keras_serializable in a module imported before loading). "
            "From the command line, give a factory instead: a function in your module that "
            "imports the classes and returns keras.models.load_model(path), as "
            "--model my_module:load.")
    try:
        model = keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # noqa: BLE001 -- any failure is the file's: say so in one line
        message = " ".join(str(err).split())[:500]
        raise ModelLoadError(f"Keras could not load {path}: {type(err).__name__}: "
                             f"{message}.") from None
    return _checked(model, path)


# --------------------------------------------------------------------------------------------
# factories

@contextlib.contextmanager
def _cwd_importable():
    """The working directory on sys.path while importing (a console script lacks it)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            sys.path.remove(cwd)


def _import(module_part, spec):
    if module_part.endswith(".py"):
        path = pathlib.Path(module_part)
        if not path.is_file():
            raise ModelLoadError(f"No such Python file. Received: {spec!r}.")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        with _users_code(f"Importing {module_part}"):
            module_spec.loader.exec_module(module)
        return module
    try:
        with _cwd_importable():
            return importlib.import_module(module_part)
    except ModuleNotFoundError as err:
        raise ModelLoadError(f"Cannot import module {module_part!r} ({err}). Received: "
                             f"{spec!r}.") from None


@contextlib.contextmanager
def _users_code(what):
    """An exception raised by the user's own code (a factory, a module it imports) as one
    `ModelLoadError` naming where it came from, whatever its type (the original is chained)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 -- the user's code may raise anything
        raise ModelLoadError(
            f"{what} raised {type(err).__name__}: {err}.",
            "Allowed: a factory that returns a built keras.Model (call it in Python to see "
            "the traceback).") from err


def load_factory(spec):
    """Import `module:function` (or `file.py:function`), call it, return its built model.

    The factory is the user's own code: an exception it (or its module, on import) raises
    becomes a `ModelLoadError` naming the factory."""
    module_part, _, name = spec.rpartition(":")
    if not module_part or not name.isidentifier():
        raise ModelLoadError(f"A factory is 'module:function'. Received: {spec!r}.")
    factory = getattr(_import(module_part, spec), name, None)
    if not callable(factory):
        raise ModelLoadError(f"{module_part!r} has no function {name!r}. Received: {spec!r}.")
    with _users_code(f"The factory {spec!r}"):
        model = factory()
    return _checked(model, spec)


def _checked(model, source):
    import keras

    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"{source} gave a {type(model).__name__}, not a keras.Model.")
    if not model.built:
        raise ModelLoadError(
            f"{source} gave an unbuilt model {model.name!r} ({type(model).__name__}).",
            "Allowed: a model created with keras.Input, or built with "
            "model.build(input_shape) or one call on a batch.")
    outputs = getattr(model, "outputs", None) or ()
    if len(outputs) > 1:
        raise ModelLoadError(
            f"{source} gave model {model.name!r} ({type(model).__name__}) with {len(outputs)} "
            f"outputs {[tuple(t.shape) for t in outputs]}.", "Allowed: a model with one output "
            "(the profile and training score it with cross-entropy on class labels); in "
            "Python, `variance_profile(model, x, loss=...)` and `LayerStatsLogger(probe, "
            "loss=...)` take a loss of several outputs.")
    return model


# --------------------------------------------------------------------------------------------
# input shape

def model_input_shape(model):
    """The shape of one input example (no batch axis), from `model.inputs` (Functional,
    Sequential) or the shape it was built with (`get_build_config`); None if unknown or if
    the model has several inputs."""
    inputs = getattr(model, "inputs", None)
    if inputs:
        return tuple(inputs[0].shape[1:]) if len(inputs) == 1 else None
    shape = (model.get_build_config() or {}).get("input_shape")
    if not shape or not isinstance(shape, (list, tuple)) or \
            any(isinstance(d, (list, tuple, dict)) for d in shape):
        return None
    return tuple(shape[1:])


def cifar10_shape_mismatch(shape):
    """Why inputs of `shape` (one example) cannot be CIFAR-10 images (32, 32, 3), or None when
    they can (an axis of size None accepts 32)."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[2] == 3 and all(d in (None, 32) for d in shape[:2]):
        return None
    return (f"The model's input shape is {shape} (one example), CIFAR-10 images are "
            f"{CIFAR10_INPUT_SHAPE}. Allowed: a model taking (32, 32, 3) images (or "
            "(None, None, 3)).")


def cifar10_mismatch(model):
    """Why `model` cannot take CIFAR-10 images (32, 32, 3), or None when it can."""
    shape = model_input_shape(model)
    if shape is None:
        return (f"The model {model.name!r} ({type(model).__name__}) does not declare a single "
                "input shape, so it cannot be checked against CIFAR-10's (32, 32, 3) images. "
                "Allowed: a model built with keras.Input(shape=(32, 32, 3)).")
    return cifar10_shape_mismatch(shape)


def check_cifar10_input(model):
    """Raise ValueError (`cifar10_mismatch`'s message) unless `model` takes CIFAR-10 images."""
    problem = cifar10_mismatch(model)
    if problem is not None:
        raise ValueError(problem)
