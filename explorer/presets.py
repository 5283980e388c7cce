"""Explorer settings, derived from the run schema (``keras_varinit.training.config``): the
controls offered, their defaults, the URL round trip, validation, presets.

Plain Python (no Streamlit) so the page, the worker and the tests share one definition of what
a configuration is. A *settings* dict holds the page's controls: one entry per ``TrainConfig``
field that declares a ``widget``, holding the field's value as the control shows it (None as
"none"). ``to_config(settings)`` is the ``TrainConfig`` it describes (other fields at their
defaults), so its validation, its slug and the ``keras-varinit train`` arguments are the
schema's own.
"""
from __future__ import annotations

import dataclasses
import math

from keras_varinit.checks import check_number
from keras_varinit.cli.train import config_argv
from keras_varinit.training.config import (NETWORK, TRAINING, USER_MODELS, Problem,
                                           TrainConfig, WidgetKind)
from keras_varinit.training.config import fields as schema_fields

from explorer.your_model import display_name

SECTIONS = (NETWORK, TRAINING)
# The width a model starts with on the page (plain_cnn's and plain_mlp's own defaults).
DEFAULT_WIDTH = {"cnn": 16, "mlp": 256}
# Fields the page sets itself rather than through a generic control, and keeps out of the URL:
# the stored upload a "file" model trains (explorer.your_model; a path under the runs dir).
PAGE_FIELDS = ("model_file",)
NO_UPLOAD = ("No model yet: upload a .keras file (in the sidebar, under Model) or pick a "
             "stored one; its profile and its training appear here.")


def controls(schema=TrainConfig) -> dict:
    """The fields the explorer offers (those with a ``widget``): name -> ``Option``."""
    return {spec.name: spec for spec in schema_fields(schema) if spec.widget is not None}


def _setting(spec, value):
    """A field value as a control holds it (None -> "none")."""
    return spec.to_text(value) if value is None else value


def offered(spec) -> list:
    """The values a control offers: its widget's options, else the field's choices."""
    return [_setting(spec, v) for v in (spec.widget.options or spec.choices)]


def bounds(spec) -> tuple:
    """``(low, high)`` of a numeric control: its widget's range, else the field's bounds."""
    low = spec.widget.low if spec.widget.low is not None else spec.minimum
    high = spec.widget.high if spec.widget.high is not None else spec.maximum
    return low, high


def label(spec, value) -> str:
    """How a control shows ``value``: the widget's label for it, else the value's text."""
    return spec.widget.labels.get(value, spec.to_text(value))


def defaults(schema=TrainConfig) -> dict:
    """The page's settings before anything is chosen (the controls', then ``PAGE_FIELDS``)."""
    out = {}
    for name, spec in controls(schema).items():
        default = spec.widget.default if spec.widget.has_default else spec.default
        out[name] = _setting(spec, default)
    specs = {spec.name: spec for spec in schema_fields(schema)}
    out.update({name: specs[name].default for name in PAGE_FIELDS if name in specs})
    return out


CONTROLS = controls()
DEFAULTS = defaults()
# Settings that change the network at initialization (the profile's cache key).
PROFILE_KEYS = tuple(spec.name for spec in schema_fields(TrainConfig)
                     if spec.at_init and spec.name in DEFAULTS)


# --------------------------------------------------------------------------- URL round trip

def from_query(params, schema=TrainConfig) -> tuple[dict, list[str]]:
    """Settings from URL query parameters (strings), plus notes about values that were ignored.

    Unknown keys are ignored; a malformed or out-of-range value falls back to (or is clipped
    towards, or snapped to the nearest offered) value, with a note, so a hand-edited URL never
    crashes the page.
    """
    settings = defaults(schema)
    notes = []
    params = {k: (v[-1] if isinstance(v, (list, tuple)) else v) for k, v in dict(params).items()}
    if "model" in params and "width" not in params and params["model"] in DEFAULT_WIDTH:
        settings["width"] = DEFAULT_WIDTH[params["model"]]
    for name, spec in controls(schema).items():
        if name in params:
            value, note = _from_text(spec, str(params[name]), settings[name])
            settings[name] = value
            notes += [note] if note else []
    return settings, notes


def _from_text(spec, raw, current):
    """``(value, note)`` for one URL parameter (note None when the value was taken as is)."""
    where = f"URL parameter {spec.name}={raw!r}"
    try:
        value = _parse(spec, raw)
    except ValueError as error:
        return current, f"{where} is not {error}; using {current!r}."
    kind = spec.widget.kind
    if kind is WidgetKind.NUMBER and spec.normalize(value) is None:
        high = bounds(spec)[1]   # an optional count's 0 means "all", as on the command line
        return high, f"{where} means all; using {high!r}, the most the page offers."
    if kind in (WidgetKind.RADIO, WidgetKind.SELECT) and value not in offered(spec):
        return current, f"{where} is not one of {offered(spec)}; using {current!r}."
    if kind in (WidgetKind.SLIDER, WidgetKind.NUMBER):
        low, high = bounds(spec)
        if not low <= value <= high:
            clipped = min(max(value, low), high)
            return clipped, f"{where} is outside [{low}, {high}]; using {clipped!r}."
    if kind == WidgetKind.SELECT_SLIDER and value not in offered(spec):
        if value <= 0:
            return current, f"{where} is not positive; using {current!r}."
        nearest = min(offered(spec), key=lambda o: abs(math.log(o) - math.log(value)))
        return nearest, (f"{where} is not one of the offered values; using the nearest, "
                         f"{nearest!r}.")
    return value, None


def _parse(spec, raw):
    """The URL text as the field's type; ValueError("a number" / "a whole number")."""
    if spec.type not in (int, float):
        return raw
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("a number") from None
    if not math.isfinite(value):
        raise ValueError("a finite number")
    if spec.type is int:
        if not value.is_integer():
            raise ValueError("a whole number")
        return int(value)
    return value


def to_query(settings: dict, schema=TrainConfig) -> dict[str, str]:
    """Settings as URL query parameters: only what differs from the defaults, in a fixed order.

    The default width depends on the model (16 channels for the CNN, 256 units for the MLP).
    """
    out = {}
    page_defaults = defaults(schema)
    for name, spec in controls(schema).items():
        value = settings.get(name, page_defaults[name])
        default = page_defaults[name]
        if name == "width":
            default = DEFAULT_WIDTH.get(settings.get("model"), default)
        if value != default:
            out[name] = spec.to_text(value)
    return out


# --------------------------------------------------------------------------- validation

def settings_of(config) -> dict:
    """The page's settings that describe ``config`` (the inverse of ``to_config`` on the
    fields the page offers)."""
    return {name: _setting(spec, getattr(config, name)) for name, spec in CONTROLS.items()}


def to_config(settings: dict, schema=TrainConfig):
    """The ``schema`` instance these settings describe (other fields at their defaults, and
    the fields the chosen model does not use too: ``for_model``)."""
    names = {spec.name for spec in schema_fields(schema)}
    values = for_model({**defaults(schema), **settings}, schema)
    return schema(**{k: v for k, v in values.items() if k in names})


def for_model(settings: dict, schema=TrainConfig) -> dict:
    """``settings`` with what the chosen model does not use at the schema's defaults: the
    page keeps every control's value (an architecture stays picked while the CNN is shown),
    a run gets only its model's. ``application`` and ``model_file`` belong to their model;
    the built-in nets' options (``Option.builtin``) to "cnn"/"mlp"."""
    model = settings.get("model")
    out = dict(settings)
    for spec in schema_fields(schema):
        unused = ((spec.builtin and model in USER_MODELS)
                  or (spec.name == "application" and model != "application")
                  or (spec.name == "model_file" and model != "file"))
        if unused and spec.name in out:
            out[spec.name] = _setting(spec, spec.default)
    return out


def problems(settings: dict, schema=TrainConfig) -> list[Problem]:
    """What is wrong with these settings, blocking problems first: the config's own
    (``TrainConfig.problems``), then the page's (a value outside a control's range, and
    combinations the explorer does not train because they teach nothing)."""
    settings = for_model({**defaults(schema), **settings}, schema)
    if awaiting_upload(settings):
        return [Problem(blocking=True, text=NO_UPLOAD)]
    found = to_config(settings, schema).problems()
    found += list(_outside_controls(settings, schema))
    if not any(p.blocking for p in found):
        found += [Problem(blocking=True, text=text) for text in _page_rules(settings) if text]
    return sorted(found, key=lambda p: not p.blocking)


def awaiting_upload(settings: dict) -> bool:
    """"Your .keras file" is chosen but no stored model is picked yet (not an error: the
    page asks for a file, ``NO_UPLOAD``)."""
    return settings.get("model") == "file" and not settings.get("model_file")


def blocking_problems(settings: dict, schema=TrainConfig) -> list[Problem]:
    """The problems that make a configuration impossible to build or train here."""
    return [p for p in problems(settings, schema) if p.blocking]


def _outside_controls(settings, schema):
    for name, spec in controls(schema).items():
        if spec.widget.kind not in (WidgetKind.SLIDER, WidgetKind.NUMBER):
            continue
        try:
            spec.check(settings[name])  # the field's own rule is TrainConfig.problems'
        except (ValueError, FileNotFoundError):
            continue
        low, high = bounds(spec)
        try:
            check_number(name, settings[name], integer=spec.type is int, minimum=low,
                         maximum=high)
        except ValueError as error:
            yield Problem(blocking=True, text=f"{error} (the explorer's range)")


def _page_rules(s):
    if s["init"] == "lsuv" and s["normalization"] != "none":
        yield ("LSUV rescales each layer so its output variance is 1; a normalization layer "
               "already does that, so LSUV with normalization is not a meaningful comparison. "
               "Pick normalization 'none' to see LSUV's effect.")
    if s["subset"] is not None and s["batch_size"] > s["subset"]:
        yield (f"Batch size ({s['batch_size']}) is larger than the training subset "
               f"({s['subset']} images): not even one full batch.")


# --------------------------------------------------------------------------- runs

def profile_key(settings: dict) -> tuple:
    settings = for_model({**DEFAULTS, **settings})
    return tuple((k, settings[k]) for k in PROFILE_KEYS)


def describe(settings: dict) -> str:
    """One-line human description of a configuration."""
    if settings.get("model") == "application":
        return (f"keras.applications.{settings.get('application')} (weights=None, 32x32 "
                "inputs, 10 classes), as Keras initializes it")
    if settings.get("model") == "file":
        path = settings.get("model_file")
        return (f"Your model {display_name(path)}, with its saved weights" if path
                else "Your model: upload a .keras file")
    model = "CNN" if settings.get("model") == "cnn" else "MLP"
    init = label(CONTROLS["init"], settings.get("init"))
    norm = settings.get("normalization", "none")
    norm_text = "no normalization" if norm == "none" else \
        label(CONTROLS["normalization"], norm).lower()
    if norm == "group":
        norm_text += f" (G = {settings.get('groups')})"
    return (f"{settings.get('depth')}-layer {model}, {init}, {settings.get('activation')}, "
            f"{norm_text}")


def cli_args(settings: dict, run_dir, stats_every: int | None = None) -> list[str]:
    """Arguments of ``keras-varinit train`` for these settings, writing into ``run_dir``."""
    config = to_config(settings)
    if stats_every is not None:
        config = dataclasses.replace(config, stats_every_n_steps=int(stats_every))
    return train_args(config, run_dir)


def train_args(config, run_dir) -> list[str]:
    """Arguments of ``keras-varinit train`` for ``config`` (every field), into ``run_dir``."""
    return ["train", *config_argv(config), "--log-dir", str(run_dir)]


def default_stats_every(settings: dict) -> int:
    """Log layer statistics about 40 times per run (at least every step, at most every 200)."""
    s = {**DEFAULTS, **settings}
    steps = max(1, s["subset"] // max(1, s["batch_size"])) * max(1, s["epochs"])
    return int(min(200, max(1, steps // 40)))


def reference_pair(settings: dict | None = None) -> list[dict]:
    """He et al. 2015, Fig. 3: a 30-layer plain ReLU CNN without BN, Xavier vs Kaiming."""
    base = {**DEFAULTS, **(settings or {})}
    base.update(model="cnn", depth=30, activation="relu", normalization="none",
                width=base["width"] if base.get("model") == "cnn" else DEFAULT_WIDTH["cnn"])
    return [dict(base, init="xavier_normal"), dict(base, init="kaiming_normal")]


PRESETS = {
    "30 layers, Xavier vs Kaiming": reference_pair,
}
