"""The schema of a training run: ``TrainConfig``, the single description of a run.

Each field declares, with ``option(default, help, ...)`` (stored in the dataclass field's
metadata), what it accepts and how it is offered::

    depth: int = option(30, "weight layers", minimum=2, slug="d{}", at_init=True,
                        widget=Widget(WidgetKind.SLIDER, "Depth (weight layers)", NETWORK,
                                      low=2, high=60))

``fields(schema)`` reads them back, one ``Option`` per field (with its name, type and default
filled in). Everything else is derived from that list:

* ``TrainConfig.validate()`` / ``problems()``: each field's own rule (``Option.check``: its
  choices, its bounds, or a custom ``rule``), then the rules that tie fields together
  (``net_options.check_normalization``), then advice (non-blocking ``Problem``);
* ``TrainConfig.slug()``: the short name of a run directory (each field's ``slug``);
* the ``keras-varinit train`` options (``cli/train.py``: one option per field, ``--<name>`` or
  ``flag``, its choices shown, its help);
* the explorer's controls, defaults, URL round trip and validation (``explorer/presets.py``)
  and its sidebar widgets (``explorer/app.py``): one widget per field with a ``widget``.

A new field with choices therefore shows up in the CLI and (if it has a ``widget``) in the
explorer without touching either.
"""
import dataclasses
import enum
import functools
import os
import pathlib
import types
import typing

from keras_varinit import net_options
from keras_varinit import user_models
from keras_varinit.applications import APPLICATIONS
from keras_varinit.run_files import upgrade_config
from keras_varinit.checks import check_choice, check_number, invalid
from keras_varinit.training.device import DISTRIBUTES

NETWORK = "Network"    # the explorer's sidebar sections
TRAINING = "Training"
_NONE_WORDS = ("none", "off", "")
_SAME = object()       # Widget.default: the field's own default


class WidgetKind(enum.Enum):
    """The explorer control a field gets (a Streamlit widget)."""

    RADIO = "radio"
    SELECT = "select"                   # a drop-down of options
    SLIDER = "slider"                   # a number between low and high
    SELECT_SLIDER = "select_slider"     # a slider over a fixed list of numbers
    NUMBER = "number"                   # a number input between low and high


@dataclasses.dataclass(frozen=True)
class Widget:
    """How the explorer offers a field.

    Attributes:
        kind: the control (``WidgetKind``).
        label: its label; section: the sidebar header it goes under.
        options: the values offered (default: the field's ``choices``); for a
            ``SELECT_SLIDER`` a value from a URL is snapped to the nearest option.
        labels: value -> text shown for it (default: the value).
        low, high, step: the range offered (default: the field's bounds).
        default: the page's default when it differs from the run's.
        help: the tooltip (default: the field's help).
        used_with: ``(field, values)``: the control is disabled unless that field holds
            one of those values (e.g. momentum only with SGD/RMSprop).
    """

    kind: WidgetKind
    label: str
    section: str
    options: tuple = ()
    labels: dict = dataclasses.field(default_factory=dict)
    low: float | None = None
    high: float | None = None
    step: float | None = None
    default: object = _SAME
    help: str | None = None
    used_with: tuple | None = None

    @property
    def has_default(self):
        """Whether the page starts from its own ``default`` rather than the field's."""
        return self.default is not _SAME


@dataclasses.dataclass(frozen=True)
class Option:
    """One field of a run's schema: what it accepts and how it is presented.

    Declared with ``option(...)``; ``fields(schema)`` fills ``name``, ``type`` (int, float,
    str or bool), ``optional`` (None is a value) and ``default``.

    Attributes:
        help: one line for ``--help`` (and the explorer, unless its widget has its own).
        choices: the allowed values, when they form a closed set (None included if allowed).
        minimum, maximum: inclusive bounds; above, below: exclusive bounds.
        rule: ``rule(name, value)`` raising on a bad value, for open fields (``init``,
            ``data``) whose allowed values are not a list.
        flag: the CLI option when it is not ``--<name with dashes>``; metavar: its metavar.
        slug: the field's part of ``TrainConfig.slug()``: a format string ("d{}") or a
            function of the value; None/"" values leave no part.
        at_init: the field changes the network at initialization (the explorer's profile
            cache key).
        builtin: the field shapes a built-in net (``model`` "cnn"/"mlp") only: with a user's
            model (``USER_MODELS``) it must stay at its default (``check_model_source``) and
            leaves no slug part.
        widget: how the explorer offers it (None: not in the explorer).
    """

    help: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    rule: typing.Callable | None = None
    flag: str | None = None
    metavar: str | None = None
    slug: str | typing.Callable | None = None
    at_init: bool = False
    builtin: bool = False
    widget: Widget | None = None
    name: str = ""
    type: type = str
    optional: bool = False
    default: object = None

    @property
    def cli_flag(self):
        return self.flag or "--" + self.name.replace("_", "-")

    def normalize(self, value):
        """The field's canonical value: "none"/"off"/"" -> None and 0 -> None for an
        optional field (``--distribute none``, ``--subset 0`` = all), ints -> float for a
        float field."""
        if self.optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
            return None
        if self.optional and self.type is int and value == 0 and not isinstance(value, bool):
            return None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def check(self, value):
        """Raise (ValueError, or FileNotFoundError from a ``rule``) if ``value`` is not
        allowed; the field's one rule."""
        if self.rule is not None:
            self.rule(self.name, value)
        elif self.type is bool:
            check_choice(self.name, value, (True, False))
        elif self.choices:
            check_choice(self.name, value, self.choices)
        elif self.type in (int, float):
            check_number(self.name, value, integer=self.type is int, minimum=self.minimum,
                         maximum=self.maximum, above=self.above, below=self.below,
                         allow_none=self.optional)
        elif not isinstance(value, str) or not value:
            raise invalid(self.name, value, "a non-empty string")

    def to_text(self, value):
        """The value as the CLI and URLs write it: None -> "none", floats as ``%g``."""
        if value is None:
            return "none"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def slug_part(self, value):
        if self.slug is None or value is None:
            return ""
        return self.slug(value) if callable(self.slug) else self.slug.format(value)


def option(default, help, **declaration):
    """A ``TrainConfig`` field: ``dataclasses.field(default=default)`` whose metadata holds
    ``Option(help, **declaration)``."""
    return dataclasses.field(default=default,
                             metadata={"option": Option(help=help, **declaration)})


@functools.cache
def fields(schema=None):
    """The ``Option`` of every field of ``schema`` (default ``TrainConfig``), in order."""
    schema = TrainConfig if schema is None else schema
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        declared = f.metadata.get("option")
        if declared is None:
            raise TypeError(f"{schema.__name__}.{f.name} is not declared with option(). "
                            "Received: a plain dataclass field. Allowed: option(default, "
                            "help, ...)")
        base, optional = _base_type(hints[f.name])
        out.append(dataclasses.replace(declared, name=f.name, type=base, optional=optional,
                                       default=f.default))
    return tuple(out)


def _base_type(hint):
    """``int | None`` -> (int, True); ``str`` -> (str, False)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something wrong with a configuration. ``blocking``: it cannot be built or trained;
    otherwise advice (it trains, but the user should know)."""

    blocking: bool
    text: str


# --------------------------------------------------------------------------- open-field rules

EXTRA_INITS = ("lsuv",)   # handled by training, not by initializers.get


def check_init(name, value):
    """An ``initializers.get`` name, ``normal:<std>``, any Keras initializer name, or
    "lsuv". One message with one list of names (not the inner error appended to it). Only a
    name that is not ours asks Keras (``initializers.get``, which imports it)."""
    if value in EXTRA_INITS or net_options.is_own_initializer(value):
        return
    if isinstance(value, str) and value:
        from keras_varinit import initializers

        try:
            initializers.get(value)
            return
        except (ValueError, TypeError, KeyError):
            pass
    names = ", ".join(net_options.INITIALIZER_NAMES + EXTRA_INITS)
    raise invalid(name, value, f"{names}, 'normal:<std>' with std > 0, or a name "
                               "keras.initializers.get knows (e.g. 'he_normal', 'orthogonal')")


def check_data(name, value):
    """"auto", "synthetic", or an existing CIFAR-10 directory / archive."""
    if not isinstance(value, str) or not value:
        raise invalid(name, value, "'auto', 'synthetic' or a path to CIFAR-10")
    if value not in ("auto", "synthetic") and not os.path.exists(value):
        raise FileNotFoundError(
            f"CIFAR-10 data not found. Received: {name}={value!r}. Allowed: 'auto', "
            "'synthetic', or an existing directory / .tar.gz in <split>/<class>/<image> layout.")


#: Models a run can train beside the built-in nets (``net_options.KINDS``): a ``.keras`` file
#: (``model_file``) or a ``keras.applications`` architecture (``application``).
USER_MODELS = ("file", "application")
MODELS = net_options.KINDS + USER_MODELS


def check_model_file(name, value):
    """None, or a readable ``.keras`` archive without Lambda layers
    (``user_models.inspect_model_file``: no Keras import, nothing run)."""
    if value is None:
        return
    if not isinstance(value, str) or not value.endswith(".keras"):
        raise invalid(name, value, "a path to a .keras file (saved with model.save) or None")
    user_models.inspect_model_file(value)


def check_model_source(config):
    """The model a run trains, said once: ``model_file`` exactly with model "file",
    ``application`` exactly with model "application", and with either of those every
    built-in-only option (``Option.builtin``: depth, width, init, ...) at its default, since a
    user's model is trained as it is (its own layers, initialization and weights)."""
    for name, kind in (("model_file", "file"), ("application", "application")):
        value, flag = getattr(config, name), "--" + name.replace("_", "-")
        if config.model == kind and value is None:
            raise invalid(name, value, f"a value with model={kind!r} ({flag} ...)")
        if config.model != kind and value is not None:
            raise invalid(name, value, f"None unless model={kind!r} (--model {kind} {flag} "
                                       f"{value}); model={config.model!r} ignores it")
    if config.model not in USER_MODELS:
        return
    changed = [spec for spec in fields(type(config))
               if spec.builtin and getattr(config, spec.name) != spec.default]
    if changed:
        received = ", ".join(f"{s.name}={getattr(config, s.name)!r}" for s in changed)
        defaults = ", ".join(f"{s.name}={s.default!r}" for s in changed)
        raise ValueError(
            f"{', '.join(s.name for s in changed)}: options of the built-in nets (cnn, mlp) "
            f"only; a user's model is trained as it is (its own layers and initialization). "
            f"Received: model={config.model!r} with {received}. Allowed: these options left "
            f"at their defaults ({defaults}) with model={config.model!r}.")


def _model_file_slug(value):
    return pathlib.PurePath(value).stem


def _init_slug(value):
    return value.replace(":", "").replace("/", "_").replace(" ", "")


def _data_slug(value):
    return "synthetic" if value == "synthetic" else ""


def _norm_slug(value):
    return "" if value == "none" else f"norm_{value}"


def _input_norm_slug(value):
    return "" if value == "pooled" else "raw_input"


#: How the trainer feeds the images (``training.data``): "pooled" per channel,
#: (x - mean_c) / std_c with the pooled std of the training subset; "none": raw [0, 255] pixels.
INPUT_NORMALIZATIONS = ("pooled", "none")


_BUILT_IN = ("model", net_options.KINDS)   # Widget.used_with of the built-in nets' options
# The initializers the explorer offers: name -> (label, what it does).
_EXPLORER_INITS = {
    "kaiming_normal": ("Kaiming normal (fan_in)", "He et al. 2015: Var[W] = 2/fan_in, keeps "
                       "the forward signal constant through ReLU layers."),
    "kaiming_normal_fan_out": ("Kaiming normal (fan_out)", "He et al. 2015, backward form: "
                               "Var[W] = 2/fan_out keeps the gradient constant."),
    "kaiming_uniform": ("Kaiming uniform (fan_in)", "U(-a, a) with a^2/3 = 2/fan_in."),
    "kaiming_uniform_fan_out": ("Kaiming uniform (fan_out)", "U(-a, a) with a^2/3 = 2/fan_out."),
    "xavier_normal": ("Xavier normal", "Glorot & Bengio 2010: Var[W] = 2/(fan_in + fan_out), "
                      "made for tanh/linear; through ReLU the signal halves at every layer."),
    "xavier_uniform": ("Xavier uniform", "U(-a, a), a = sqrt(6/(fan_in + fan_out))."),
    "xavier_normal_tanh": ("Xavier normal, tanh gain 5/3", "Var[W] = (5/3)^2 2/(fan_in + "
                           "fan_out): tanh's gain keeps its pre-activations of order 1."),
    "torch_default": ("PyTorch default", "PyTorch's Linear/Conv default U(+-1/sqrt(fan_in)): "
                      "Var[W] = 1/(3 fan_in)."),
    "lsuv": ("LSUV", "Mishkin & Matas 2016: start orthogonal, then rescale each layer on a data "
             "batch until its output variance is 1."),
    "normal:0.01": ("Too small: N(0, 0.01\u00b2)", "N(0, 0.01^2) regardless of the fan: the "
                    "signal shrinks at every layer."),
    "normal:1.0": ("Too large: N(0, 1)", "N(0, 1) regardless of the fan: the signal explodes "
                   "(or tanh saturates)."),
}


# --------------------------------------------------------------------------- the schema

@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (written to ``config.json``).

    Each field's help, choices and bounds are declared next to it (see the module docstring);
    ``keras-varinit train --help`` lists them. In short: ``model`` "cnn" (``plain_cnn``),
    "mlp" (``plain_mlp``), "file" (the ``.keras`` file ``model_file``, as saved) or
    "application" (``keras.applications.<application>(weights=None)`` at 32x32), the last two
    without the built-in-only options (``check_model_source``); ``init`` an
    ``initializers.get`` name or "lsuv" (orthogonal start, then ``lsuv`` on a training
    batch); ``normalization`` one of ``net_options.NORMALIZATIONS``
    (before each activation; ``groups`` for "group"); ``subset``/``val_subset`` None = all;
    ``data`` "auto", "synthetic" or a path; ``distribute`` None, "mirrored" or "multiworker"
    (TensorFlow), or "data_parallel" (JAX); ``backup_every_n_steps`` how often ``--resume``
    has a backup.
    """

    model: str = option(
        "cnn", "plain_cnn, plain_mlp, a .keras file (file: --model-file, or the file's path "
        "as --model net.keras) or a keras.applications architecture (application: "
        "--application)", choices=MODELS,
        slug="{}", at_init=True,
        widget=Widget(WidgetKind.RADIO, "Model", NETWORK,
                      labels={"cnn": "Plain CNN", "mlp": "MLP", "file": "Your .keras file",
                              "application": "Keras application"},
                      help="Plain CNN: 3x3 convolutions in three stages (16/32/64 channels at "
                           "width 16), no skip connections. MLP: dense layers on the flattened "
                           "image. Your model: a .keras file you upload, or a keras.applications "
                           "architecture with random weights (weights=None) at 32x32; trained "
                           "as it is (depth, width, initializer, activation and normalization "
                           "apply to the built-in nets only)."))
    model_file: str | None = option(
        None, "the .keras file to train with --model file (loaded in safe mode, without its "
        "compile state; its own weights are the starting point)", rule=check_model_file,
        slug=_model_file_slug, at_init=True, metavar="PATH")
    application: str | None = option(
        None, "the keras.applications architecture to train with --model application "
        "(weights=None, 32x32 inputs, 10 classes)", choices=(None, *APPLICATIONS), slug="{}",
        at_init=True,
        widget=Widget(WidgetKind.SELECT, "Architecture (keras.applications, weights=None)",
                      NETWORK, options=APPLICATIONS, default=APPLICATIONS[0],
                      used_with=("model", ("application",))))
    depth: int = option(
        30, "weight layers", minimum=2, slug="d{}", at_init=True, builtin=True,
        widget=Widget(WidgetKind.SLIDER, "Depth (weight layers)", NETWORK, low=2, high=60,
                      used_with=_BUILT_IN))
    width: int = option(
        16, "channels of the first stage (cnn) / units (mlp)", minimum=1, slug="w{}",
        at_init=True, builtin=True,
        widget=Widget(WidgetKind.NUMBER, "Width (channels of the first stage / units)",
                      NETWORK, low=1, high=1024, step=1, used_with=_BUILT_IN))
    init: str = option(
        "kaiming_normal", "initializer: xavier_normal, kaiming_normal, normal:0.01, "
        "torch_default, lsuv, or any Keras initializer name", rule=check_init,
        slug=_init_slug, at_init=True, builtin=True,
        widget=Widget(WidgetKind.SELECT, "Initializer", NETWORK, options=tuple(_EXPLORER_INITS),
                      labels={k: v[0] for k, v in _EXPLORER_INITS.items()}, used_with=_BUILT_IN,
                      help="\n\n".join(f"**{label}**: {text}"
                                       for label, text in _EXPLORER_INITS.values())))
    activation: str = option(
        "relu", "activation of the hidden layers", choices=net_options.ACTIVATIONS, slug="{}",
        at_init=True, builtin=True,
        widget=Widget(WidgetKind.SELECT, "Activation", NETWORK,
                      options=("relu", "leaky_relu", "tanh", "linear"), used_with=_BUILT_IN))
    normalization: str = option(
        "none", "normalization before each activation: batch (Keras's BN: pooled variance), "
        "batch_per_sample (BN with the per-image std), layer, instance (CNN only), group",
        choices=net_options.NORMALIZATIONS, flag="--norm", slug=_norm_slug, at_init=True,
        builtin=True,
        widget=Widget(WidgetKind.SELECT, "Normalization", NETWORK, used_with=_BUILT_IN,
                      labels={"none": "No normalization", "batch": "Batch norm",
                              "batch_per_sample": "Batch norm (per-sample variance)",
                              "layer": "Layer norm", "instance": "Instance norm",
                              "group": "Group norm"}))
    groups: int = option(
        net_options.DEFAULT_GROUPS, "groups of group normalization (must divide the width of "
        "every hidden layer)", minimum=1, at_init=True, builtin=True,
        widget=Widget(WidgetKind.NUMBER, "Groups (group norm)", NETWORK, low=1, high=64, step=1,
                      used_with=("normalization", ("group",))))
    optimizer: str = option(
        "sgd", "sgd (with momentum), adam or rmsprop (with momentum)",
        choices=("sgd", "adam", "rmsprop"), slug="{}",
        widget=Widget(WidgetKind.SELECT, "Optimizer", TRAINING, options=("sgd", "adam")))
    lr: float = option(
        0.01, "learning rate", above=0.0, slug="lr{:g}",
        widget=Widget(WidgetKind.SELECT_SLIDER, "Learning rate", TRAINING,
                      options=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0,
                               3.0)))
    momentum: float = option(
        0.9, "SGD/RMSprop momentum", minimum=0.0, below=1.0,
        widget=Widget(WidgetKind.SLIDER, "Momentum (SGD)", TRAINING, low=0.0, high=0.99,
                      step=0.01, used_with=("optimizer", ("sgd", "rmsprop"))))
    epochs: int = option(
        2, "epochs, as in fit", minimum=1,
        widget=Widget(WidgetKind.NUMBER, "Epochs", TRAINING, low=1, high=200, step=1,
                      default=3))
    batch_size: int = option(
        128, "batch size, as in fit", minimum=1,
        widget=Widget(WidgetKind.SELECT_SLIDER, "Batch size", TRAINING,
                      options=(16, 32, 64, 128, 256, 512)))
    subset: int | None = option(
        10000, "training images (a seeded random subset; 0 = all)", minimum=1,
        widget=Widget(WidgetKind.NUMBER, "Training subset (images)", TRAINING, low=64,
                      high=50_000, step=256))
    val_subset: int | None = option(
        None, "test images used for validation (0 = all)", minimum=1)
    data: str = option(
        "auto", "auto (KERAS_VARINIT_CIFAR10, caches, download), synthetic, or a path to a "
        "CIFAR-10 directory/.tar.gz in <split>/<class>/<image> layout", rule=check_data,
        slug=_data_slug, at_init=True,
        widget=Widget(WidgetKind.RADIO, "Data", TRAINING, options=("auto", "synthetic"),
                      labels={"auto": "CIFAR-10", "synthetic": "Synthetic"}))
    input_normalization: str = option(
        "pooled", "inputs fed to the network: pooled = per channel (x - mean_c) / std_c with the "
        "pooled std of the training subset; none = raw pixels in [0, 255] (to see what the "
        "initializers' E[x^2] = 1 assumption is worth)", choices=INPUT_NORMALIZATIONS,
        slug=_input_norm_slug, at_init=True,
        widget=Widget(WidgetKind.RADIO, "Input normalization", TRAINING,
                      labels={"pooled": "Per channel", "none": "Raw pixels (0-255)"},
                      help="Per channel: (x - mean_c) / std_c with the pooled std of the "
                           "training images, so E[x^2] = 1 as the initializers assume. Raw "
                           "pixels: E[x^2] about 2 * 10^4, what that assumption is worth; "
                           "also what keras.applications nets with their own Rescaling "
                           "layer (EfficientNetB0) were built for."))
    seed: int = option(
        0, "seeds the subset, the weights and the shuffling", minimum=0, slug="s{}",
        at_init=True,
        widget=Widget(WidgetKind.NUMBER, "Seed", TRAINING, low=0, high=2**31 - 1, step=1))
    mixed_precision: bool = option(False, "train under the mixed_float16 policy")
    distribute: str | None = option(
        None, "several devices: mirrored = all local GPUs (or the CPU devices) and "
        "multiworker = MultiWorkerMirroredStrategy from TF_CONFIG (TensorFlow backend); "
        "data_parallel = keras.distribution.DataParallel over every visible device (JAX)",
        choices=DISTRIBUTES)
    stats_every_n_steps: int = option(
        50, "layer statistics every N steps (0 = off)", minimum=0, flag="--stats-every",
        metavar="N")
    log_every_n_steps: int = option(
        1, "a steps.jsonl record every N steps", minimum=1, flag="--log-every", metavar="N")
    backup_every_n_steps: int = option(
        500, "back the training state up every N steps, at the next step with layer "
        "statistics (0 = only at epoch ends); --resume continues from the last backup",
        minimum=0, flag="--backup-every", metavar="N")

    def __post_init__(self):
        for spec in fields(type(self)):
            setattr(self, spec.name, spec.normalize(getattr(self, spec.name)))

    def _rules(self):
        """Every blocking rule, in order: each field's own, then those across fields."""
        for spec in fields(type(self)):
            yield functools.partial(spec.check, getattr(self, spec.name))
        yield functools.partial(check_model_source, self)
        if self.model in net_options.KINDS:
            yield functools.partial(net_options.check_normalization, self.model,
                                    self.normalization, self.width, self.groups)
            yield functools.partial(net_options.check_batch_statistics, self.model,
                                    self.normalization, self.batch_size)

    def validate(self):
        """Raise on the first blocking problem (ValueError "Received: ... Allowed: ...", or
        FileNotFoundError for a data path that does not exist); return ``self``."""
        for rule in self._rules():
            rule()
        return self

    def problems(self):
        """Every ``Problem``: the blocking ones (what ``validate`` raises), then advice."""
        found = []
        for rule in self._rules():
            try:
                rule()
            except (ValueError, FileNotFoundError) as error:
                found.append(Problem(blocking=True, text=str(error)))
        if not found:
            found += [Problem(blocking=False, text=text) for text in _advice(self) if text]
        return found

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """Build from a dict (e.g. ``config.json``); the keys the trainer adds to config.json
        ("synthetic", "device", "slug", "backend") are ignored, misspelt keys are refused; an
        older config.json's ``batch_norm`` is read as its ``normalization``
        (``run_files.upgrade_config``)."""
        data = upgrade_config(data)
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - names - set(RECORD_EXTRAS)
        if extra:
            raise ValueError(f"Unknown TrainConfig keys. Received: {sorted(extra)}. "
                             f"Allowed: {sorted(names)}.")
        return cls(**{k: v for k, v in data.items() if k in names})

    def slug(self):
        """A short name for directories, e.g. "cnn-d30-w16-kaiming_normal-relu-sgd-lr0.01-s0"
        (the fields' ``slug`` parts, in order)."""
        parts = (spec.slug_part(getattr(self, spec.name)) for spec in fields(type(self))
                 if not (spec.builtin and self.model in USER_MODELS))
        return "-".join(part for part in parts if part)


#: Keys config.json holds besides the fields (written by the trainer).
RECORD_EXTRAS = ("synthetic", "device", "backend", "slug", "model_file_sha256")


def _advice(config):
    """Non-blocking problems: the run trains, but the user should know."""
    if config.optimizer == "sgd" and config.lr > 1.0:
        yield (f"A learning rate of {config.lr:g} with SGD will almost certainly diverge; "
               "the run may still be trained (it will be shown as diverged).")

