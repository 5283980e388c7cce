"""keras_varinit: principled initialization, BN variance estimators and signal diagnostics.

    import keras_varinit as kv
    kv.initializers.KaimingNormal()            # He et al. 2015
    kv.layers.BatchNormalization(variance_estimator="per_sample")
    kv.variance_profile(model, x)              # per-layer forward/backward variance

Importing the package is light: it does not import Keras (or TensorFlow) itself, so the run
schema, the CLI's argument parsing and the explorer's first page come up at once. The package's
modules and names are imported on first use (PEP 562 ``__getattr__``); each module registers
its initializers and layers with Keras when it is imported. For models that use them
(``kernel_initializer="keras_varinit>KaimingNormal"``) to load back from ``.keras`` files,
every one is registered with Keras: at import when Keras is already imported, else right
after Keras is imported (a one-shot import hook); ``keras_varinit.register()`` does it at once.
"""
import importlib.abc
import importlib.util
import sys
import types

__version__ = "0.1.0"

_SUBMODULES = ("callbacks", "datasets", "diagnosis", "diagnostics", "initializers", "layers",
               "models", "profile_report")
#: Public functions and classes -> the module that defines them.
_NAMES = {"variance_profile": "diagnostics", "compute_fans": "initializers",
          "gain": "initializers", "lsuv": "initializers", "ChannelStats": "channel_stats",
          "channel_stats": "channel_stats"}

__all__ = [
    "callbacks", "datasets", "diagnosis", "diagnostics", "initializers", "layers", "models",
    "profile_report", "variance_profile", "compute_fans", "gain", "lsuv",
    "ChannelStats", "channel_stats", "register", "__version__",
]


def register():
    """Import the package's Keras modules (registering every initializer and layer with
    Keras); idempotent."""
    import importlib

    for name in _SUBMODULES:
        importlib.import_module(f"{__name__}.{name}")


def __getattr__(name):
    """A submodule or public name, imported on first use."""
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module: ``kv.channel_stats`` is the function, even once its module (which
    has the same name) is imported, which would otherwise set the package attribute."""

    def __setattr__(self, name, value):
        if name in _NAMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """An import hook that runs ``register()`` once Keras is imported and no module of this
    package is half-way through its own import, so that ``import keras_varinit`` before Keras
    still registers everything with it, and ``import keras_varinit.layers`` (whose ``import
    keras`` fires the hook) does not import ``models`` while ``layers`` is half-built.

    It wraps the loader of ``keras`` and of this package's submodules; it removes itself
    before registering."""

    def __init__(self):
        self._importing = 0   # package submodules whose code is running now

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras" and not fullname.startswith(__name__ + "."):
            return None
        sys.meta_path.remove(self)   # the real finders locate it (no recursion into this one)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader.exec_module = self._wrapped(spec.loader.exec_module,
                                                    fullname != "keras")
        return spec

    def _wrapped(self, exec_module, is_submodule):
        def exec_then_register(module):
            self._importing += is_submodule
            try:
                exec_module(module)
            finally:
                self._importing -= is_submodule
            self._register_when_ready()

        return exec_then_register

    def _register_when_ready(self):
        if "keras" in sys.modules and not self._importing and self in sys.meta_path:
            sys.meta_path.remove(self)
            register()


sys.modules[__name__].__class__ = _Package
if "keras" in sys.modules:   # Keras is loaded anyway: register now, as an eager import would
    register()
elif not any(isinstance(f, _RegisterAfterKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterKeras())
