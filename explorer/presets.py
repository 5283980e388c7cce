"""Explorer settings: the choices offered, their defaults, URL round-trip, validation, presets.

Plain Python (no Streamlit, no Keras import) so the page, the worker and the tests share one
definition of what a configuration is.

A *settings* dict holds the page's controls::

    model, depth, width, activation, init, batch_norm, optimizer, lr, momentum,
    batch_size, epochs, subset, seed, data

and maps one-to-one onto the options of ``keras-varinit train``.
"""
from __future__ import annotations

import math

# label shown on the page -> name understood by keras_varinit.initializers.get() and
# `keras-varinit train --init`.
INITIALIZERS = {
    "Kaiming normal (fan_in)": "kaiming_normal",
    "Kaiming normal (fan_out)": "kaiming_normal_fan_out",
    "Kaiming uniform (fan_in)": "kaiming_uniform",
    "Kaiming uniform (fan_out)": "kaiming_uniform_fan_out",
    "Xavier normal": "xavier_normal",
    "Xavier uniform": "xavier_uniform",
    "PyTorch default": "torch_default",
    "LSUV": "lsuv",
    'Too small: N(0, 0.01\u00b2)': "normal:0.01",
    "Too large: N(0, 1)": "normal:1.0",
}
INIT_LABELS = {v: k for k, v in INITIALIZERS.items()}
INIT_HELP = {
    "kaiming_normal": "He et al. 2015: Var[W] = 2/fan_in, keeps the forward signal constant "
    "through ReLU layers.",
    "kaiming_normal_fan_out": "He et al. 2015, backward form: Var[W] = 2/fan_out keeps the "
    "gradient constant.",
    "kaiming_uniform": "U(-a, a) with a^2/3 = 2/fan_in.",
    "kaiming_uniform_fan_out": "U(-a, a) with a^2/3 = 2/fan_out.",
    "xavier_normal": "Glorot & Bengio 2010: Var[W] = 2/(fan_in + fan_out), made for tanh/linear;"
    " through ReLU the signal halves at every layer.",
    "xavier_uniform": "U(-a, a), a = sqrt(6/(fan_in + fan_out)).",
    "torch_default": "PyTorch's Linear/Conv default U(+-1/sqrt(fan_in)): Var[W] = 1/(3 fan_in).",
    "lsuv": "Mishkin & Matas 2016: start orthogonal, then rescale each layer on a data batch "
    "until its output variance is 1.",
    "normal:0.01": "N(0, 0.01^2) regardless of the fan: the signal shrinks at every layer.",
    "normal:1.0": "N(0, 1) regardless of the fan: the signal explodes (or tanh saturates).",
}

MODELS = {"Plain CNN": "cnn", "MLP": "mlp"}
ACTIVATIONS = ["relu", "leaky_relu", "tanh", "linear"]
BATCH_NORMS = ["none", "pooled", "per_sample"]
OPTIMIZERS = ["sgd", "adam"]
DATA_SOURCES = {"CIFAR-10 (auto)": "auto", "Synthetic (CIFAR-shaped)": "synthetic"}

DEPTH_RANGE = (2, 60)
WIDTH_RANGE = (1, 1024)
SUBSET_RANGE = (64, 50_000)
BATCH_SIZES = [16, 32, 64, 128, 256, 512]
LR_OPTIONS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
# Settings offered as a fixed list of options: a URL value is snapped to the nearest one.
_SNAP = {"lr": LR_OPTIONS, "batch_size": BATCH_SIZES}
EPOCH_RANGE = (1, 200)
LR_RANGE = (1e-6, 10.0)

DEFAULTS = {
    "model": "cnn",
    "depth": 30,
    "width": 16,
    "activation": "relu",
    "init": "kaiming_normal",
    "batch_norm": "none",
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "batch_size": 128,
    "epochs": 3,
    "subset": 10_000,
    "seed": 0,
    "data": "auto",
}
DEFAULT_WIDTH = {"cnn": 16, "mlp": 256}

_INT_KEYS = ("depth", "width", "batch_size", "epochs", "subset", "seed")
_FLOAT_KEYS = ("lr", "momentum")
_CHOICES = {
    "model": list(MODELS.values()),
    "activation": ACTIVATIONS,
    "init": list(INITIALIZERS.values()),
    "batch_norm": BATCH_NORMS,
    "optimizer": OPTIMIZERS,
    "data": list(DATA_SOURCES.values()),
}
_RANGES = {
    "depth": DEPTH_RANGE,
    "width": WIDTH_RANGE,
    "batch_size": (1, 4096),
    "epochs": EPOCH_RANGE,
    "subset": SUBSET_RANGE,
    "seed": (0, 2**31 - 1),
    "lr": LR_RANGE,
    "momentum": (0.0, 0.999),
}

# Settings that change the network at initialization (the profile's cache key).
PROFILE_KEYS = ("model", "depth", "width", "activation", "init", "batch_norm", "seed", "data")


def from_query(params) -> tuple[dict, list[str]]:
    """Settings from URL query parameters (strings), plus notes about values that were ignored.

    Unknown keys are ignored; a malformed or out-of-range value falls back to (or is clipped
    towards) the default, with a note, so a hand-edited URL never crashes the page.
    """
    settings = dict(DEFAULTS)
    notes = []
    params = {k: (v[-1] if isinstance(v, (list, tuple)) else v) for k, v in dict(params).items()}
    if "model" in params and "width" not in params and params["model"] in DEFAULT_WIDTH:
        settings["width"] = DEFAULT_WIDTH[params["model"]]
    for key in DEFAULTS:
        if key not in params:
            continue
        raw = str(params[key])
        try:
            if key in _INT_KEYS:
                value = int(float(raw))
            elif key in _FLOAT_KEYS:
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError(raw)
            else:
                value = raw
        except ValueError:
            notes.append(f"URL parameter {key}={raw!r} is not a number; using {settings[key]!r}.")
            continue
        if key in _CHOICES and value not in _CHOICES[key]:
            notes.append(f"URL parameter {key}={raw!r} is not one of {_CHOICES[key]}; "
                         f"using {settings[key]!r}.")
            continue
        if key in _RANGES:
            lo, hi = _RANGES[key]
            if not lo <= value <= hi:
                clipped = min(max(value, lo), hi)
                notes.append(f"URL parameter {key}={raw!r} is outside [{lo}, {hi}]; "
                             f"using {clipped!r}.")
                value = clipped
        if key in _SNAP and value not in _SNAP[key]:
            snapped = min(_SNAP[key], key=lambda o: abs(math.log(o) - math.log(max(value, 1e-12))))
            notes.append(f"URL parameter {key}={raw!r} is not one of the offered values; "
                         f"using the nearest, {snapped!r}.")
            value = snapped
        settings[key] = value
    return settings, notes


def to_query(settings: dict) -> dict[str, str]:
    """Settings as URL query parameters: only what differs from the defaults, in a fixed order.

    The default width depends on the model (16 channels for the CNN, 256 units for the MLP).
    """
    out = {}
    for key in DEFAULTS:
        value = settings.get(key, DEFAULTS[key])
        default = DEFAULTS[key]
        if key == "width":
            default = DEFAULT_WIDTH.get(settings.get("model"), default)
        if value != default:
            out[key] = _fmt(value)
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def validate(settings: dict) -> list[str]:
    """Plain-language problems with a combination of settings (empty list: it is valid)."""
    problems = []
    model, bn = settings.get("model"), settings.get("batch_norm")
    if model == "mlp" and bn == "per_sample":
        problems.append(
            "Per-sample batch normalization needs spatial positions: it averages each image's "
            "own standard deviation over its H x W pixels. The MLP works on flat vectors, so "
            "there is nothing to average over. Use the plain CNN, or pooled batch norm.")
    if settings.get("init") == "lsuv" and bn != "none":
        problems.append(
            "LSUV rescales each layer so its output variance is 1; batch normalization already "
            "does that, so LSUV with batch norm is not a meaningful comparison. Pick batch "
            "norm 'none' to see LSUV's effect.")
    depth = settings.get("depth", 0)
    if not DEPTH_RANGE[0] <= depth <= DEPTH_RANGE[1]:
        problems.append(f"Depth must be between {DEPTH_RANGE[0]} and {DEPTH_RANGE[1]}; "
                        f"received {depth}.")
    if settings.get("batch_size", 1) > settings.get("subset", 1):
        problems.append(f"Batch size ({settings['batch_size']}) is larger than the training "
                        f"subset ({settings['subset']} images): not even one full batch.")
    if settings.get("optimizer") == "sgd" and settings.get("lr", 0) > 1.0:
        problems.append(f"A learning rate of {settings['lr']:g} with SGD will almost certainly "
                        "diverge; you may still train (the run will be shown as diverged).")
    return problems


def blocking_problems(settings: dict) -> list[str]:
    """The subset of validate() that makes a configuration impossible to build or train."""
    return [p for p in validate(settings) if "you may still train" not in p]


def profile_key(settings: dict) -> tuple:
    return tuple((k, settings.get(k, DEFAULTS[k])) for k in PROFILE_KEYS)


def slug(settings: dict) -> str:
    """Short readable name for a run, e.g. ``cnn-d30-w16-relu-kaiming_normal-bnnone-s0``."""
    init = settings["init"].replace(":", "").replace(".", "p")
    return (f"{settings['model']}-d{settings['depth']}-w{settings['width']}-"
            f"{settings['activation']}-{init}-bn{settings['batch_norm']}-s{settings['seed']}")


def describe(settings: dict) -> str:
    """One-line human description of a configuration."""
    model = "CNN" if settings.get("model") == "cnn" else "MLP"
    init = INIT_LABELS.get(settings.get("init"), settings.get("init"))
    bn = settings.get("batch_norm", "none")
    bn_text = "no BN" if bn in (None, "none") else f"BN {bn}"
    return f"{settings.get('depth')}-layer {model}, {init}, {settings.get('activation')}, {bn_text}"


def cli_args(settings: dict, run_dir, stats_every: int | None = None) -> list[str]:
    """Arguments of ``keras-varinit train`` for these settings, writing into ``run_dir``."""
    s = {**DEFAULTS, **settings}
    args = [
        "train",
        "--model", str(s["model"]),
        "--depth", str(int(s["depth"])),
        "--width", str(int(s["width"])),
        "--init", str(s["init"]),
        "--activation", str(s["activation"]),
        "--batch-norm", str(s["batch_norm"]),
        "--optimizer", str(s["optimizer"]),
        "--lr", _fmt(float(s["lr"])),
        "--momentum", _fmt(float(s["momentum"])),
        "--epochs", str(int(s["epochs"])),
        "--batch-size", str(int(s["batch_size"])),
        "--subset", str(int(s["subset"])),
        "--data", str(s["data"]),
        "--seed", str(int(s["seed"])),
        "--log-dir", str(run_dir),
    ]
    if stats_every is not None:
        args += ["--stats-every", str(int(stats_every))]
    return args


def default_stats_every(settings: dict) -> int:
    """Log layer statistics about 40 times per run (at least every step, at most every 200)."""
    s = {**DEFAULTS, **settings}
    steps = max(1, s["subset"] // max(1, s["batch_size"])) * max(1, s["epochs"])
    return int(min(200, max(1, steps // 40)))


def reference_pair(settings: dict | None = None) -> list[dict]:
    """He et al. 2015, Fig. 3: a 30-layer plain ReLU CNN without BN, Xavier vs Kaiming."""
    base = {**DEFAULTS, **(settings or {})}
    base.update(model="cnn", depth=30, activation="relu", batch_norm="none",
                width=base["width"] if base.get("model") == "cnn" else DEFAULT_WIDTH["cnn"])
    return [dict(base, init="xavier_normal"), dict(base, init="kaiming_normal")]


PRESETS = {
    "30 layers, Xavier vs Kaiming": reference_pair,
}
