"""The options of the built-in nets and the initializer names, as plain names (no Keras
import): what the run schema (``training.config``), the CLIs and the explorer offer, and the
one rule between them (``check_normalization``). ``keras_varinit.models`` and
``keras_varinit.initializers`` build from them and re-export them.

>>> check_normalization("cnn", "group", 16, groups=8)
'group'
"""
import math

from keras_varinit.checks import check_choice, check_number, format_choices, invalid

KINDS = ("cnn", "mlp")
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "linear", "sigmoid", "selu")
#: Where a layer's output gets its mean and variance before the activation (Wu & He 2018,
#: Fig. 2): "batch" over (N, H, W) per channel (keras_varinit's BatchNormalization, pooled
#: variance: Keras's), "batch_per_sample" the same with each image's own std averaged,
#: "layer" over (C, H, W) per sample, "instance" over (H, W) per sample and channel, "group"
#: over (C/G, H, W) per sample and group of channels.
NORMALIZATIONS = ("none", "batch", "batch_per_sample", "layer", "instance", "group")
#: Those that mean something on flat features (no spatial positions).
MLP_NORMALIZATIONS = ("none", "batch", "layer", "group")
DEFAULT_GROUPS = 8
#: Leaky ReLU's slope (Keras's `leaky_relu` default), also used in its Kaiming gain.
DEFAULT_NEGATIVE_SLOPE = 0.2
_FLAT_REASONS = {
    "batch_per_sample": "Per-sample batch normalization needs spatial positions: it averages "
                        "each image's own standard deviation over its H x W pixels, and an MLP "
                        "works on flat vectors, so there is nothing to average over. Use the "
                        "plain CNN, or 'batch'",
    "instance": "Instance normalization needs spatial positions: it normalizes each channel of "
                "each sample over its H x W pixels, and an MLP's feature is one number (its "
                "variance is 0, every output would be beta). Use the plain CNN, or 'layer' / "
                "'group'",
}


def stage_widths(kind, width):
    """The channels (cnn: the three stages, `width * 2**s`) or units (mlp) of the hidden
    layers: what a normalization layer sees.

    >>> stage_widths("cnn", 16)
    [16, 32, 64]
    """
    return [width * 2 ** s for s in range(3)] if kind == "cnn" else [width]


def check_batch_statistics(kind, normalization, batch_size):
    """Refuse batch normalization of an MLP over batches of one sample; return `batch_size`.

    An MLP's batch norm takes each unit's mean and variance over the batch alone: over one
    sample the variance is 0 and every output is beta, so the network never sees its input
    (a CNN's batch norm also averages over the H x W pixels, and trains with a batch of one).

    >>> check_batch_statistics("mlp", "batch", 1)
    Traceback (most recent call last):
    ValueError: Batch normalization of an MLP ... Received: batch_size=1. Allowed: ...
    """
    if kind == "mlp" and normalization == "batch" and batch_size < 2:
        raise invalid("batch_size", batch_size,
                      "2 or more, or normalization 'layer', 'group' or 'none'",
                      reason="Batch normalization of an MLP takes each unit's statistics over "
                             "the batch alone: one sample has variance 0, every output would "
                             "be beta and the network would never see its input")
    return batch_size


def check_normalization(kind, normalization, width, groups=DEFAULT_GROUPS):
    """Refuse a normalization the network `kind` of this `width` cannot have (the one home of
    this rule); return `normalization`.

    * per-sample batch norm and instance norm need spatial positions: refused for an MLP;
    * group norm splits each layer's channels into `groups` equal groups: `groups` must divide
      every hidden layer's width (`stage_widths`).

    >>> check_normalization("mlp", "instance", 256)
    Traceback (most recent call last):
    ValueError: Instance normalization needs spatial positions: ...
    >>> check_normalization("cnn", "group", 12, groups=8)
    Traceback (most recent call last):
    ValueError: Group normalization splits each layer's channels into 8 equal groups, ...
    """
    check_choice("kind", kind, KINDS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    if kind == "mlp" and normalization in _FLAT_REASONS:
        raise invalid("normalization", normalization,
                      f"{format_choices(MLP_NORMALIZATIONS)} for an MLP",
                      reason=_FLAT_REASONS[normalization])
    if normalization == "group":
        groups = _check_int("groups", groups, 1)
        widths = stage_widths(kind, _check_int("width", width, 1))
        if any(w % groups for w in widths):
            common = math.gcd(*widths)
            divisors = [str(g) for g in range(1, common + 1) if common % g == 0]
            raise invalid(
                "groups", groups, ", ".join(divisors),
                reason=f"Group normalization splits each layer's channels into {groups} equal "
                       f"groups, so groups must divide every hidden layer's width "
                       f"({'/'.join(map(str, widths))} for this {kind.upper()} of width "
                       f"{width})")
    return normalization


def _check_int(name, value, minimum):
    return int(check_number(name, value, integer=True, minimum=minimum))


# --------------------------------------------------------------------------------------------
# initializer names

#: keras_varinit's own initializer names (``initializers.get`` builds each), for CLIs and UIs.
INITIALIZER_NAMES = ("xavier_normal", "xavier_uniform", "xavier_truncated_normal",
                     "xavier_normal_tanh", "kaiming_normal", "kaiming_uniform",
                     "kaiming_truncated_normal", "kaiming_normal_fan_out",
                     "kaiming_uniform_fan_out", "torch_default")
FIXED_NORMAL_PREFIX = "normal:"


def fixed_normal_std(identifier):
    """The std of a fixed-std normal written "normal:<std>" (std > 0, finite), or ValueError."""
    text = identifier[len(FIXED_NORMAL_PREFIX):].strip()
    try:
        std = float(text)
    except ValueError:
        std = float("nan")
    if not math.isfinite(std) or std <= 0:
        raise ValueError("A fixed-std normal is written 'normal:<std>' with std a positive "
                         f"number, e.g. 'normal:0.01'. Received: identifier={identifier!r}")
    return std


def is_own_initializer(identifier):
    """Whether ``identifier`` names one of ours: an ``INITIALIZER_NAMES`` entry (any case) or
    a valid "normal:<std>" (what ``initializers.get`` builds without asking Keras)."""
    if not isinstance(identifier, str):
        return False
    key = identifier.strip().lower()
    if key in INITIALIZER_NAMES:
        return True
    if key.startswith(FIXED_NORMAL_PREFIX):
        try:
            fixed_normal_std(identifier)
        except ValueError:
            return False
        return True
    return False
