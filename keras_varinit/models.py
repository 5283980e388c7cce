"""Plain (no skip connections) reference networks for the depth experiments of He et al. 2015.

`plain_cnn(depth, ...)` is a VGG-style convolutional net for 32x32 images (CIFAR-10), and
`plain_mlp(depth, ...)` a fully connected net for flat inputs (the tanh experiments). Both have
exactly `depth` weight layers, end in a `Dense` layer that returns **logits** (no softmax: use
`from_logits=True` losses), and keep every pre-activation observable: weight layers have
`activation=None` and are followed by (an optional normalization and) a separate activation
layer. Layer names:

    conv_01 .. conv_NN   (Conv2D, 3x3, padding "same")    plain_cnn
    dense_01 .. dense_NN (Dense hidden layers)            plain_mlp
    bn_01 ..             (keras_varinit.layers.BatchNormalization: normalization "batch" or
                          "batch_per_sample")
    ln_01 ..             (keras.layers.LayerNormalization: normalization "layer")
    in_01 ..             (keras.layers.GroupNormalization, one group per channel: "instance")
    gn_01 ..             (keras.layers.GroupNormalization(groups): "group")
    act_01 ..            (Activation / LeakyReLU)
    pool_2, pool_3       (MaxPooling2D, only with downsample="maxpool")
    gap                  (GlobalAveragePooling2D)
    logits               (Dense, num_classes units, no activation)

Initializers. `kernel_initializer` is anything `keras_varinit.initializers.get` takes
("kaiming_normal", "xavier_uniform", "normal:0.01", "he_normal", an Initializer instance...).
A Kaiming **name** ("kaiming_normal", "kaiming_uniform", "kaiming_truncated_normal",
"kaiming_normal_fan_out", "kaiming_uniform_fan_out") is built with the nonlinearity of the
network's activation, so that Var[W] = gain(activation)^2 / fan:

    relu -> 2/fan, leaky_relu (slope a) -> 2/((1+a^2) fan), linear/sigmoid -> 1/fan,
    tanh -> (5/3)^2/fan, selu -> (3/4)^2/fan   (`keras_varinit.gain`, PyTorch's values)

An Initializer *instance* is used as given (re-seeded per layer, see `seed`). The same
initializer is used for every weight layer, the classifier included, except the first layer
when `first_layer_initializer` is set: the first layer sees the data, not a ReLU output, so
Var[W] = 1/fan_in is the exact forward-preserving choice there (He et al. keep 2/fan_in "for
simplicity"); a Kaiming name given as `first_layer_initializer` is built with
`nonlinearity="linear"` (1/fan_in) -- e.g. `first_layer_initializer="kaiming_normal"`.

Seeds: with an int `seed`, weight layer i (1-based) is initialized with seed
`layer_seed(seed, i)`, a hash of (seed, i), so a model is reproducible, no two layers share
weights, and models built with nearby seeds share no layer either (with `seed + i`, seed 1's
layer 1 would repeat seed 0's layer 2, and "independent" repeats over seeds 0..k would be
shifted copies of each other). With `seed=None` every layer gets a
fresh random seed (reproducible under `keras.utils.set_random_seed`).

Leaky ReLU uses slope `negative_slope=0.2` by default (Keras's `keras.activations.leaky_relu`
default), and the same slope goes into the Kaiming gain.

Reference: K. He, X. Zhang, S. Ren and J. Sun, "Delving Deep into Rectifiers: Surpassing
Human-Level Performance on ImageNet Classification", ICCV 2015 (Sec. 2.2 and Figs. 2-3).

>>> import keras_varinit as kv
>>> model = kv.models.plain_cnn(30, kernel_initializer="xavier_normal", seed=0)
>>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
"""
import math
import numbers

import keras
import numpy as np

from keras_varinit import initializers as _initializers
from keras_varinit.checks import check_choice, check_number, invalid
from keras_varinit.layers import BatchNormalization
# The options' names and the rule between them live in net_options (importable without Keras,
# for the run schema); re-exported here, where the networks are.
from keras_varinit.net_options import (  # noqa: F401
    ACTIVATIONS, DEFAULT_GROUPS, DEFAULT_NEGATIVE_SLOPE, KINDS, MLP_NORMALIZATIONS,
    NORMALIZATIONS, check_normalization, stage_widths)

_BN_ESTIMATOR = {"batch": "pooled", "batch_per_sample": "per_sample"}
_NORM_PREFIX = {"batch": "bn", "batch_per_sample": "bn", "layer": "ln", "instance": "in",
                "group": "gn"}

DOWNSAMPLES = ("stride", "maxpool")

#: Presets for He et al. 2015's two depth-experiment nets, adapted to CIFAR-10 (32x32 inputs,
#: 10 classes, three stages instead of ImageNet's five). "large22": 22 weight layers (21 convs
#: + classifier) with widths 64/128/256, the "22-layer large model" of Fig. 2 where Xavier and
#: Kaiming both converge and Kaiming starts earlier. "small30": 30 weight layers (29 convs +
#: classifier), widths 16/32/64, the "30-layer small model" of Fig. 3 where Xavier stalls.
PRESETS = {
    "large22": {"depth": 22, "width": 64, "activation": "relu", "normalization": "none",
                "kernel_initializer": "kaiming_normal"},
    "small30": {"depth": 30, "width": 16, "activation": "relu", "normalization": "none",
                "kernel_initializer": "kaiming_normal"},
}

_KAIMING_NAMES = ("kaiming_normal", "kaiming_uniform", "kaiming_truncated_normal",
                  "kaiming_normal_fan_out", "kaiming_uniform_fan_out")


# --------------------------------------------------------------------------------------------
# validation

def _check_int(name, value, minimum):
    return int(check_number(name, value, integer=True, minimum=minimum))


# --------------------------------------------------------------------------------------------
# initializers

def _kaiming_nonlinearity(activation):
    """The `Kaiming(nonlinearity=...)` matching a network activation (see module docstring)."""
    return "linear" if activation is None else activation


def make_initializer(spec, activation="relu", negative_slope=DEFAULT_NEGATIVE_SLOPE, seed=None,
                     index=0):
    """One weight layer's initializer from `spec`, matched to `activation` for Kaiming names.

    Args:
        spec: a name or anything `keras_varinit.initializers.get` takes. A Kaiming name is
            rebuilt as `Kaiming(mode, distribution, nonlinearity=activation,
            negative_slope=negative_slope if leaky_relu else 0)`. Instances are cloned (with
            `seed` if given) so that layers do not share weights.
        activation: one of ACTIVATIONS, or "linear"/None for the first layer's 1/fan_in choice.
        negative_slope: leaky ReLU slope (only used with "leaky_relu").
        seed: int or None.
        index: the layer's 1-based index: an instance with an int seed and `seed=None` is
            cloned with seed `layer_seed(its seed, index)` (an int-seeded instance repeats its
            values).

    >>> make_initializer("kaiming_normal", "leaky_relu", 0.2, seed=1)
    Kaiming(mode='fan_in', distribution='normal', nonlinearity='leaky_relu', ...)
    """
    if isinstance(spec, str) and spec.strip().lower() in _KAIMING_NAMES:
        base = _initializers.get(spec)
        nonlinearity = _kaiming_nonlinearity(activation)
        slope = negative_slope if nonlinearity == "leaky_relu" else 0.0
        return _initializers.Kaiming(mode=base.mode, distribution=base.distribution,
                                     nonlinearity=nonlinearity, negative_slope=slope, seed=seed)
    if isinstance(spec, keras.initializers.Initializer):
        config = spec.get_config()
        if "seed" in config and not isinstance(config["seed"], dict):
            # int or None seed: clone so each layer draws its own values (an int-seeded
            # instance repeats itself on every call). SeedGenerator seeds advance by themselves.
            if seed is not None:
                config["seed"] = seed
            elif isinstance(config["seed"], numbers.Integral):
                config["seed"] = layer_seed(int(config["seed"]), index)
            return type(spec).from_config(config)
        return spec
    return _initializers.get(spec, seed=seed)


def layer_seed(seed, index):
    """Seed of weight layer `index` of a model built with the int `seed`: a SeedSequence hash
    of (seed, index) in [0, 2^31), distinct for distinct pairs in practice.

    >>> layer_seed(0, 2) == layer_seed(1, 1)
    False
    """
    entropy = [abs(int(seed)), int(seed < 0), int(index)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def _seed_for(seed, index):
    return None if seed is None else layer_seed(seed, index)


# --------------------------------------------------------------------------------------------
# building blocks

def _activation_layer(activation, negative_slope, name):
    if activation == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=negative_slope, name=name)
    return keras.layers.Activation(activation, name=name)


def _normalization_layer(normalization, channels, groups, spatial, index):
    """The layer of `normalization` for `channels` features, before the activation (None for
    "none"). "layer" takes each sample's statistics over all its channels and positions
    (`axis=[1, 2, 3]` on images; Keras's LayerNormalization then has one gamma and beta per
    value, as PyTorch's `LayerNorm([C, H, W])`); "instance" is group norm with one channel
    per group."""
    if normalization == "none":
        return None
    name = f"{_NORM_PREFIX[normalization]}_{index:02d}"
    if normalization in _BN_ESTIMATOR:
        return BatchNormalization(variance_estimator=_BN_ESTIMATOR[normalization], name=name)
    if normalization == "layer":
        return keras.layers.LayerNormalization(axis=[1, 2, 3] if spatial else -1, name=name)
    per_layer = channels if normalization == "instance" else groups
    return keras.layers.GroupNormalization(groups=per_layer, name=name)


def _stage_sizes(n_convs):
    """Split `n_convs` convolutions into three stages, the earlier stages taking the extra ones.

    >>> _stage_sizes(29)
    [10, 10, 9]
    """
    base, extra = divmod(n_convs, 3)
    return [base + (1 if s < extra else 0) for s in range(3)]


def _default_name(kind, depth, kernel_initializer, activation, normalization):
    init = kernel_initializer if isinstance(kernel_initializer, str) else \
        type(kernel_initializer).__name__
    init = "".join(c if c.isalnum() or c in "_-." else "_" for c in init)
    norm = "" if normalization == "none" else f"_norm_{normalization}"
    return f"plain_{kind}{depth}_{init}_{activation}{norm}"


# --------------------------------------------------------------------------------------------
# models

def plain_cnn(depth, width=16, kernel_initializer="kaiming_normal", activation="relu",
              normalization="none", input_shape=(32, 32, 3), num_classes=10,
              first_layer_initializer=None, seed=None, name=None, *,
              negative_slope=DEFAULT_NEGATIVE_SLOPE, downsample="stride",
              groups=DEFAULT_GROUPS):
    """A plain VGG-style CNN with exactly `depth` weight layers (He et al. 2015's depth study).

    Architecture: `depth - 1` 3x3 convolutions (padding "same") in three stages of widths
    `width`, `2*width`, `4*width` (the convolutions split as evenly as possible, earlier stages
    taking the remainder: 29 -> 10/10/9), each convolution followed by an optional normalization
    (`normalization`) and the activation; then global average pooling and one
    `Dense(num_classes)` classifier returning logits (no softmax: compile with
    `from_logits=True`). Between stages the resolution halves: `downsample="stride"` (default)
    makes the first convolution of stages 2 and 3 stride 2 (the layer count stays `depth`, no
    pooling layer in the chain); `downsample="maxpool"` inserts a 2x2 max-pooling before them,
    as the ImageNet nets of the paper do. Convolutions have a zero-initialized bias, or none
    when a normalization follows (its beta is the bias). There are no skip connections: that is
    the point of the experiment.

    With `activation="relu"` and Kaiming, the forward variance of each layer is preserved
    (fan_in * 2/fan_in * 1/2 = 1); with Xavier (Var = 2/(fan_in+fan_out) = 1/fan_in at constant
    width) it halves at every layer, and falls to a third where the width doubles
    (fan_out = 2 fan_in): about 2^-29 (2/3)^2 over the 30-layer "small30" preset, which then
    fails to train (Fig. 3).

    Example:

    >>> model = plain_cnn(30, kernel_initializer="xavier_normal", seed=0)
    >>> len([l for l in model.layers if l.name.startswith(("conv_", "logits"))])
    30

    Args:
        depth: number of weight layers (convolutions + classifier), >= 2.
        width: channels of the first stage, >= 1.
        kernel_initializer: see the module docstring (Kaiming names follow `activation`).
        activation: one of ACTIVATIONS.
        normalization: one of NORMALIZATIONS, between every convolution and its activation:
            "none"; "batch" (`keras_varinit.layers.BatchNormalization`, pooled variance: what
            Keras's layer computes); "batch_per_sample" (the same layer with
            `variance_estimator="per_sample"`); "layer" (`keras.layers.LayerNormalization`
            over (H, W, C)); "instance" (`keras.layers.GroupNormalization` with one group per
            channel); "group" (`keras.layers.GroupNormalization(groups)`).
        input_shape: (height, width, channels).
        num_classes: logits of the classifier.
        first_layer_initializer: optional initializer for `conv_01` (the 1/d vs 2/d choice).
        seed: int or None; weight layer i uses `layer_seed(seed, i)`.
        name: model name (default e.g. "plain_cnn30_kaiming_normal_relu").
        negative_slope: leaky ReLU slope (default 0.2), also used in the Kaiming gain.
        downsample: "stride" (default) or "maxpool".
        groups: groups of "group" normalization (default 8); must divide `width` (and so
            every stage's width). Ignored by the other normalizations.

    Returns:
        A `keras.Model` (Functional).
    """
    depth = _check_int("depth", depth, 2)
    width = _check_int("width", width, 1)
    num_classes = _check_int("num_classes", num_classes, 1)
    check_choice("activation", activation, ACTIVATIONS)
    check_normalization("cnn", normalization, width, groups)
    check_choice("downsample", downsample, DOWNSAMPLES)
    negative_slope = float(check_number("negative_slope", negative_slope, minimum=0))
    check_number("seed", seed, integer=True, allow_none=True)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise invalid("input_shape", input_shape, "a 3-tuple (height, width, channels)",
                      reason="plain_cnn needs image inputs")

    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    index = 0
    for stage, n_convs in enumerate(_stage_sizes(depth - 1)):
        filters = width * 2 ** stage
        for j in range(n_convs):
            index += 1
            strides = 1
            if stage > 0 and j == 0:
                if downsample == "stride":
                    strides = 2
                else:
                    x = keras.layers.MaxPooling2D(2, name=f"pool_{stage + 1}")(x)
            if index == 1 and first_layer_initializer is not None:
                init = make_initializer(first_layer_initializer, "linear", negative_slope,
                                        _seed_for(seed, index), index)
            else:
                init = make_initializer(kernel_initializer, activation, negative_slope,
                                        _seed_for(seed, index), index)
            x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same",
                                    activation=None, use_bias=normalization == "none",
                                    kernel_initializer=init, bias_initializer="zeros",
                                    name=f"conv_{index:02d}")(x)
            norm = _normalization_layer(normalization, filters, groups, True, index)
            if norm is not None:
                x = norm(x)
            x = _activation_layer(activation, negative_slope, f"act_{index:02d}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = _logits(x, num_classes, kernel_initializer, activation, negative_slope,
                      _seed_for(seed, depth), depth)
    return keras.Model(inputs, outputs, name=name or _default_name(
        "cnn", depth, kernel_initializer, activation, normalization))


def _logits(x, num_classes, kernel_initializer, activation, negative_slope, seed, index):
    init = make_initializer(kernel_initializer, activation, negative_slope, seed, index)
    return keras.layers.Dense(num_classes, activation=None, kernel_initializer=init,
                              bias_initializer="zeros", name="logits")(x)


def plain_mlp(depth, width=256, kernel_initializer="xavier_normal", activation="tanh",
              normalization="none", input_dim=3072, num_classes=10,
              first_layer_initializer=None, seed=None, name=None, *, input_shape=None,
              negative_slope=DEFAULT_NEGATIVE_SLOPE, groups=DEFAULT_GROUPS):
    """A plain fully connected net with exactly `depth` weight layers (Glorot & Bengio 2010).

    `depth - 1` hidden `Dense(width)` layers (zero bias, or none with a normalization), each
    followed by an optional normalization and the activation, then a `Dense(num_classes)`
    classifier returning logits (no softmax: compile with `from_logits=True`). With
    `activation="tanh"`, weights too large saturate every unit at +-1, weights too small
    shrink the activations to 0; Xavier keeps them in between.

    Example:

    >>> model = plain_mlp(10, kernel_initializer="normal:0.01")         # flat 3072 inputs
    >>> model = plain_mlp(10, input_shape=(32, 32, 3))                  # images, Flatten first

    Args:
        depth: number of Dense layers (hidden + classifier), >= 2.
        width: units of each hidden layer, >= 1.
        kernel_initializer: see the module docstring (Kaiming names follow `activation`).
        activation: one of ACTIVATIONS.
        normalization: "none", "batch", "layer" (over the `width` features of a sample) or
            "group" (over groups of width/groups features). "batch_per_sample" and "instance"
            need spatial positions and have no meaning on flat features: a ValueError.
        input_dim: size of the flat input (ignored when `input_shape` is given).
        num_classes: logits of the classifier.
        first_layer_initializer: optional initializer for `dense_01`.
        seed: int or None; weight layer i uses `layer_seed(seed, i)`.
        name: model name.
        input_shape: optional input shape; with more than one dimension a `Flatten` layer
            ("flatten") comes first (e.g. `(32, 32, 3)` for CIFAR images).
        negative_slope: leaky ReLU slope (default 0.2), also used in the Kaiming gain.
        groups: groups of "group" normalization (default 8); must divide `width`.

    Returns:
        A `keras.Model` (Functional).
    """
    depth = _check_int("depth", depth, 2)
    width = _check_int("width", width, 1)
    num_classes = _check_int("num_classes", num_classes, 1)
    check_choice("activation", activation, ACTIVATIONS)
    check_normalization("mlp", normalization, width, groups)
    negative_slope = float(check_number("negative_slope", negative_slope, minimum=0))
    check_number("seed", seed, integer=True, allow_none=True)
    if input_shape is None:
        input_shape = (_check_int("input_dim", input_dim, 1),)
    input_shape = tuple(input_shape)
    if not input_shape or any(not isinstance(d, numbers.Integral) or d < 1 for d in input_shape):
        raise invalid("input_shape", input_shape, "a tuple of positive ints")

    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    if len(input_shape) > 1:
        x = keras.layers.Flatten(name="flatten")(x)
    for index in range(1, depth):
        if index == 1 and first_layer_initializer is not None:
            init = make_initializer(first_layer_initializer, "linear", negative_slope,
                                    _seed_for(seed, index), index)
        else:
            init = make_initializer(kernel_initializer, activation, negative_slope,
                                    _seed_for(seed, index), index)
        x = keras.layers.Dense(width, activation=None, use_bias=normalization == "none",
                               kernel_initializer=init, bias_initializer="zeros",
                               name=f"dense_{index:02d}")(x)
        norm = _normalization_layer(normalization, width, groups, False, index)
        if norm is not None:
            x = norm(x)
        x = _activation_layer(activation, negative_slope, f"act_{index:02d}")(x)
    outputs = _logits(x, num_classes, kernel_initializer, activation, negative_slope,
                      _seed_for(seed, depth), depth)
    return keras.Model(inputs, outputs, name=name or _default_name(
        "mlp", depth, kernel_initializer, activation, normalization))


def reference_cnn(name, **overrides):
    """One of He et al. 2015's reference nets from PRESETS ("large22", "small30"), on CIFAR.

    Any `plain_cnn` argument overrides the preset, e.g. the initializer of the experiment:

    >>> model = reference_cnn("small30", kernel_initializer="xavier_normal", seed=0)
    """
    check_choice("name", name, tuple(PRESETS))
    return plain_cnn(**{**PRESETS[name], **overrides})


def build_model(kind="cnn", **kwargs):
    """`plain_cnn(**kwargs)` for kind="cnn", `plain_mlp(**kwargs)` for kind="mlp".

    A `preset=` keyword with kind="cnn" starts from PRESETS[preset] (see `reference_cnn`).

    >>> model = build_model("mlp", depth=5, input_shape=(32, 32, 3))
    """
    check_choice("kind", kind, KINDS)
    preset = kwargs.pop("preset", None)
    if kind == "cnn":
        if preset is not None:
            return reference_cnn(preset, **kwargs)
        return plain_cnn(**kwargs)
    if preset is not None:
        raise ValueError(f"Presets exist only for kind='cnn'. Received: kind={kind!r}, "
                         f"preset={preset!r}. Allowed presets with kind='cnn': {tuple(PRESETS)}")
    return plain_mlp(**kwargs)


def weight_layers(model):
    """The model's Dense and Conv layers (the weight layers `depth` counts), in order."""
    return [layer for layer in model.layers if is_weight_layer(layer)]


def is_weight_layer(layer):
    """True for Dense and (non-transposed, non-depthwise) Conv1D/2D/3D layers."""
    return isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
                              keras.layers.Conv3D)) and \
        not isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                               keras.layers.Conv3DTranspose))
