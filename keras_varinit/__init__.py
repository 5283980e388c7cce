"""keras_varinit: principled initialization, BN variance estimators and signal diagnostics.

(Development-time lazy loader; the lead replaces it with eager imports at integration so that
importing the package registers every class with Keras.)
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("initializers", "normalization", "layers", "diagnostics", "callbacks",
               "models", "datasets", "training")
_NAMES = {
    "compute_fans": "initializers", "gain": "initializers", "lsuv": "initializers",
    "channel_stats": "normalization", "ChannelStats": "normalization",
    "variance_profile": "diagnostics",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_varinit.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"keras_varinit.{_NAMES[name]}"), name)
    raise AttributeError(name)
