"""Suggestions as changes of the training configuration (`keras_varinit.training.TrainConfig`).

Every fix the rules propose is a `Suggestion` whose `changes` use the configuration's field
names and values, so that "apply and re-run" is `TrainConfig.from_dict(suggestion.apply(config))`
(and `keras-varinit doctor` prints them as the `train` options to change):

    init                 initializer name ("kaiming_normal", "xavier_normal_tanh": Xavier with
                         tanh's gain 5/3, "lecun_normal", ...)
    activation           hidden nonlinearity ("leaky_relu", "tanh", ...)
    normalization        the normalization layer before each activation (`models.NORMALIZATIONS`:
                         "batch" or "group" here)
    lr                   learning rate
    input_normalization  "pooled": per channel, (x - mean_c) / std_c with the pooled std
                         (`kv.channel_stats(x, "pooled")`)
"""
import math

from keras_varinit import fans
from keras_varinit.net_options import (DEFAULT_GROUPS, DEFAULT_NEGATIVE_SLOPE,
                                       INITIALIZER_NAMES)

#: The normalization layer's configuration field (`TrainConfig.normalization`) and the values
#: a suggestion gives it (kind -> value of `models.NORMALIZATIONS`).
NORMALIZATION_FIELD, NORMALIZATION_VALUES = "normalization", {"batch": "batch", "group": "group"}

#: Every field a suggestion may change (each a `TrainConfig` field).
CONFIG_FIELDS = ("init", "activation", NORMALIZATION_FIELD, "lr", "input_normalization")

#: Target of a learning-rate change: ||delta W|| / ||W|| per step (the usual rule of thumb,
#: e.g. cs231n "Neural Networks Part 3": about 1e-3).
UPDATE_RATIO_TARGET = 1e-3
#: A lowered learning rate is at least 10x and at most 10^4 x smaller than the current one.
LR_MAX_FACTOR, LR_MIN_FACTOR = 0.1, 1e-4

_RELU_LIKE = ("relu", "leaky_relu")
_SMOOTH_RELU_LIKE = ("elu", "gelu", "silu", "swish", "softplus")


def matched_init(activation):
    """The initializer change that gives fan_in Var[W] c_f = 1 for `activation` (DESIGN.md):
    Kaiming for ReLUs (2/fan_in), Xavier with the tanh gain 5/3 for tanh, Xavier for linear and
    sigmoid, LeCun for SELU.

    >>> matched_init("tanh")[0]
    {'init': 'xavier_normal_tanh'}
    """
    if activation in _RELU_LIKE:
        return ({"init": "kaiming_normal"},
                "Kaiming (He et al. 2015): Var[W] = 2/fan_in, so fan_in Var[W] E[relu(y)^2]/Var[y]"
                " = 1 and the variance is kept through depth (the project's Kaiming names "
                "follow the activation, leaky ReLU's slope included)")
    if activation in _SMOOTH_RELU_LIKE:
        return ({"init": "he_normal"},
                f"He initialization (Var[W] = 2/fan_in), the ReLU-family choice for {activation}")
    if activation == "tanh":
        g = fans.gain("tanh")
        return ({"init": "xavier_normal_tanh"},
                f"Xavier with the tanh gain {g:.3g}: Var[W] = (5/3)^2 * 2/(fan_in + fan_out) "
                "(Glorot & Bengio 2010; the gain compensates tanh's contraction, so the "
                "pre-activations stay of order 1: neither linear nor saturated)")
    if activation == "selu":
        return ({"init": "lecun_normal"},
                "LeCun normal: Var[W] = 1/fan_in, SELU's self-normalizing fixed point")
    return ({"init": "xavier_normal"},
            "Xavier (Glorot & Bengio 2010): Var[W] = 2/(fan_in + fan_out), so fan_in Var[W] = 1 "
            "at constant width")


def normalization(kind):
    """`{NORMALIZATION_FIELD: value}` for "batch" or "group"."""
    if kind not in NORMALIZATION_VALUES:
        raise ValueError(f"Unknown normalization. Received: kind={kind!r}. "
                         f"Allowed: {tuple(NORMALIZATION_VALUES)}")
    return {NORMALIZATION_FIELD: NORMALIZATION_VALUES[kind]}


def input_normalization(model_rescales=False):
    """Normalize the inputs per channel with the pooled standard deviation; for a model with
    its own input layers (`Context.input_layers`), feed it the raw pixels they expect."""
    return {"input_normalization": "none" if model_rescales else "pooled"}


def _power_of_ten_below(value):
    return 10.0 ** math.floor(math.log10(value) + 1e-9)


def lowered_lr(lr, update_ratio_per_step=None):
    """A learning rate small enough for `UPDATE_RATIO_TARGET`, as a power of ten.

    lr_new = lr * clip(target / measured update ratio per step, LR_MIN_FACTOR, LR_MAX_FACTOR),
    rounded down to a power of ten; with no measured ratio, lr / 10. None when `lr` is unknown.

    >>> lowered_lr(10.0, update_ratio_per_step=2.1)   # 10 * 1e-3 / 2.1 = 4.8e-3 -> 1e-3
    0.001
    """
    if lr is None:
        return None
    factor = LR_MAX_FACTOR
    if update_ratio_per_step is not None and math.isfinite(update_ratio_per_step) \
            and update_ratio_per_step > 0:
        factor = min(max(UPDATE_RATIO_TARGET / update_ratio_per_step, LR_MIN_FACTOR),
                     LR_MAX_FACTOR)
    return _power_of_ten_below(lr * factor)


def raised_lr(lr):
    """lr * 10 (None when `lr` is unknown)."""
    return None if lr is None else float(lr) * 10.0


def keras_code(changes):
    """A suggestion's `changes` as the Keras code that makes them in a model of one's own (a
    `.keras` file or a factory: the page and `doctor` cannot rebuild it), one line per change.

    >>> keras_code({"lr": 0.001, "normalization": "batch"})
    ['keras_varinit.layers.BatchNormalization() between each hidden weight layer
      (use_bias=False) and its activation', 'learning_rate=0.001 in the optimizer']
    """
    unknown = sorted(set(changes) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"Unknown suggestion fields. Received: {unknown}. Allowed: "
                         f"{', '.join(CONFIG_FIELDS)}")
    lines = []
    activation = changes.get("activation")
    if "init" in changes:
        lines.append(f"kernel_initializer={_initializer_code(changes['init'], activation)} "
                     "in each hidden weight layer")
    if activation is not None:
        lines.append(f'activation="{activation}" in each hidden weight layer (or its '
                     "activation layer)")
    if NORMALIZATION_FIELD in changes:
        lines.append(f"{_NORMALIZATION_CODE[changes[NORMALIZATION_FIELD]]} between each hidden "
                     "weight layer (use_bias=False) and its activation")
    if "lr" in changes:
        lines.append(f"learning_rate={changes['lr']:g} in the optimizer")
    if changes.get("input_normalization") == "pooled":
        lines.append('keras_varinit.channel_stats(x_train, "pooled").normalization_layer() as '
                     "the model's first layer")
    elif "input_normalization" in changes:
        lines.append("the raw pixels (0-255) as the model's input, not normalized first: its "
                     "own input layers (Rescaling, Normalization) expect them")
    return lines


_NORMALIZATION_CODE = {
    "batch": "keras_varinit.layers.BatchNormalization()",
    "group": f"keras.layers.GroupNormalization(groups={DEFAULT_GROUPS})",
}


def _initializer_code(name, activation):
    """`kernel_initializer=` for an initializer name of a suggestion: a Kaiming name takes the
    new activation's gain (leaky ReLU: its slope, as the trainer's nets do)."""
    if activation == "leaky_relu" and name == "kaiming_normal":
        return ('keras_varinit.initializers.KaimingNormal(nonlinearity="leaky_relu", '
                f"negative_slope={DEFAULT_NEGATIVE_SLOPE:g})")
    if name in INITIALIZER_NAMES:
        return f'keras_varinit.initializers.get("{name}")'
    return f'"{name}"'   # Keras's own: "he_normal", "lecun_normal"
