"""Variance-preserving initializers: Xavier (Glorot & Bengio 2010), Kaiming (He et al. 2015),
PyTorch's default, plus `get()` and, re-exported, `compute_fans`, `gain` and `lsuv`.

Usage:

>>> import keras, keras_varinit as kv
>>> layer = keras.layers.Dense(64, kernel_initializer=kv.initializers.KaimingNormal(seed=0))
>>> layer = keras.layers.Dense(64, kernel_initializer="keras_varinit>KaimingNormal")
>>> init = kv.initializers.get("xavier_uniform")
"""
import math
import numbers
import random as python_random

import keras

from keras_varinit.checks import check_choice
from keras_varinit.fans import (  # noqa: F401  (re-exported)
    MODES,
    NONLINEARITIES,
    TRUNCATED_NORMAL_STD,
    compute_fans,
    gain,
    scaled_variance,
)
from keras_varinit.lsuv import lsuv  # noqa: F401  (re-exported)
from keras_varinit.net_options import (  # noqa: F401  (re-exported)
    FIXED_NORMAL_PREFIX, INITIALIZER_NAMES, fixed_normal_std)

DISTRIBUTIONS = ("normal", "truncated_normal", "uniform")

__all__ = [
    "compute_fans", "gain", "scaled_variance", "lsuv",
    "Xavier", "XavierNormal", "XavierUniform",
    "Kaiming", "KaimingNormal", "KaimingUniform", "TorchDefault",
    "get", "NAMES", "MODES", "DISTRIBUTIONS", "NONLINEARITIES",
]


def _check_seed(seed):
    """Keras's seed semantics (as `keras.initializers.RandomNormal`).

    int: the same values on every call; None: a random int drawn once at construction (so one
    instance repeats itself, two instances differ; `keras.utils.set_random_seed` makes it
    reproducible); `keras.random.SeedGenerator`: advances, new values on every call.
    """
    if seed is None:
        return python_random.randint(1, int(1e9))
    if isinstance(seed, dict):
        seed = keras.saving.deserialize_keras_object(seed)
    if isinstance(seed, keras.random.SeedGenerator):
        return seed
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return int(seed)
    raise ValueError("`seed` must be an int, None or a keras.random.SeedGenerator. "
                     f"Received: seed={seed!r}")


class _ScaledInitializer(keras.initializers.Initializer):
    """Base: zero-mean draw with variance `scale / n(mode, fans)` from one of DISTRIBUTIONS."""

    def __init__(self, mode, distribution, seed=None, transpose=False, depthwise=False):
        self.mode = check_choice("mode", mode, MODES)
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        compute_fans((1, 1, 1, 1), transpose=transpose, depthwise=depthwise)  # validates both
        self.transpose = transpose
        self.depthwise = depthwise
        self._init_seed = seed
        self.seed = _check_seed(seed)

    # subclasses define the numerator (gain squared)
    def _scale(self):
        raise NotImplementedError

    def fans(self, shape):
        """`(fan_in, fan_out)` this initializer uses for `shape` (Keras layout)."""
        return compute_fans(shape, "keras", transpose=self.transpose, depthwise=self.depthwise)

    def variance(self, shape):
        """Target variance of the weights for `shape` (after truncation, if any)."""
        return scaled_variance(self._scale(), self.mode, *self.fans(shape))

    def __call__(self, shape, dtype=None):
        std = math.sqrt(self.variance(shape))
        if self.distribution == "normal":
            return keras.random.normal(shape, mean=0.0, stddev=std, dtype=dtype, seed=self.seed)
        if self.distribution == "truncated_normal":
            # keras.random.truncated_normal truncates at +-2 sigma; the std of what is left is
            # 0.8796 sigma, so sigma = std / 0.8796 gives the target variance.
            return keras.random.truncated_normal(
                shape, mean=0.0, stddev=std / TRUNCATED_NORMAL_STD, dtype=dtype, seed=self.seed)
        limit = math.sqrt(3.0) * std  # U(-a, a) has variance a^2 / 3
        return keras.random.uniform(shape, minval=-limit, maxval=limit, dtype=dtype,
                                    seed=self.seed)

    def _base_config(self):
        config = {"seed": keras.saving.serialize_keras_object(self._init_seed)}
        if self.transpose:
            config["transpose"] = self.transpose
        if self.depthwise:
            config["depthwise"] = self.depthwise
        return config

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="keras_varinit")
class Xavier(_ScaledInitializer):
    """Xavier / Glorot initializer (Glorot & Bengio 2010).

    Zero-mean weights with variance

        Var[W] = gain^2 * 2 / (fan_in + fan_out)   (mode="fan_avg", the paper's trade-off)
        Var[W] = gain^2 / fan_in  or  gain^2 / fan_out   (mode="fan_in" / "fan_out")

    drawn from `distribution`:

    * `"normal"`: N(0, Var) untruncated, as in the paper's normal form (Keras's `GlorotNormal`
      truncates instead);
    * `"truncated_normal"`: normal truncated at +-2 sigma with sigma = sqrt(Var) / 0.8796, so the
      variance after truncation is Var;
    * `"uniform"`: U(-a, a), a = sqrt(3 Var) (= sqrt(6 / (fan_in + fan_out)) for gain 1).

    Example:

    >>> init = Xavier(distribution="uniform", gain=gain("tanh"), seed=0)
    >>> w = init((256, 1024))          # Var = (5/3)^2 * 2 / 1280
    >>> layer = keras.layers.Dense(64, kernel_initializer=init)

    Args:
        mode: `"fan_avg"` (default), `"fan_in"` or `"fan_out"`.
        distribution: `"normal"` (default), `"truncated_normal"` or `"uniform"`.
        gain: positive std multiplier (see `gain()`), default 1.
        seed: int, None or `keras.random.SeedGenerator`, with Keras's semantics: an int or None
            gives the same values on every call of one instance, a SeedGenerator new ones.
        transpose, depthwise: how to count fans of transposed/depthwise kernels
            (see `compute_fans`); default: as Keras does.

    Reference: X. Glorot and Y. Bengio, "Understanding the difficulty of training deep
    feedforward neural networks", AISTATS 2010.
    """

    def __init__(self, mode="fan_avg", distribution="normal", gain=1.0, seed=None, *,
                 transpose=False, depthwise=False):
        if isinstance(gain, bool) or not isinstance(gain, numbers.Real) or \
                not math.isfinite(gain) or gain <= 0:
            raise ValueError(f"`gain` must be a positive finite number. Received: gain={gain!r}")
        self.gain = float(gain)
        super().__init__(mode, distribution, seed=seed, transpose=transpose, depthwise=depthwise)

    def _scale(self):
        return self.gain ** 2

    def get_config(self):
        return {"mode": self.mode, "distribution": self.distribution, "gain": self.gain,
                **self._base_config()}


@keras.saving.register_keras_serializable(package="keras_varinit")
class XavierNormal(Xavier):
    """Xavier normal: N(0, 2 / (fan_in + fan_out)), untruncated (Glorot & Bengio 2010).

    >>> layer = keras.layers.Dense(64, kernel_initializer=XavierNormal(seed=0))
    """

    def __init__(self, seed=None, *, transpose=False, depthwise=False):
        super().__init__(mode="fan_avg", distribution="normal", gain=1.0, seed=seed,
                         transpose=transpose, depthwise=depthwise)

    def get_config(self):
        return self._base_config()


@keras.saving.register_keras_serializable(package="keras_varinit")
class XavierUniform(Xavier):
    """Xavier uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010).

    >>> layer = keras.layers.Dense(64, kernel_initializer=XavierUniform(seed=0))
    """

    def __init__(self, seed=None, *, transpose=False, depthwise=False):
        super().__init__(mode="fan_avg", distribution="uniform", gain=1.0, seed=seed,
                         transpose=transpose, depthwise=depthwise)

    def get_config(self):
        return self._base_config()


@keras.saving.register_keras_serializable(package="keras_varinit")
class Kaiming(_ScaledInitializer):
    """Kaiming / He initializer (He et al. 2015).

    Zero-mean weights with variance

        Var[W] = gain(nonlinearity, negative_slope)^2 / fan

    where fan = fan_in (mode="fan_in", the forward form and the paper's default), fan_out
    (backward form) or (fan_in + fan_out) / 2 ("fan_avg"). For ReLU, Var[W] = 2 / fan_in; for
    leaky ReLU with slope a, 2 / ((1 + a^2) fan_in).

    Distributions as for `Xavier`: `"normal"` (untruncated, as in the paper; Keras's `HeNormal`
    truncates), `"truncated_normal"` (at +-2 sigma, variance after truncation = Var), `"uniform"`
    (U(-a, a), a = sqrt(3 Var)).

    Example:

    >>> init = Kaiming(mode="fan_out", nonlinearity="leaky_relu", negative_slope=0.2, seed=0)
    >>> w = init((3, 3, 16, 64))       # Var = 2 / (1.04 * 9 * 64)
    >>> layer = keras.layers.Conv2D(64, 3, kernel_initializer=init)

    Args:
        mode: `"fan_in"` (default), `"fan_out"` or `"fan_avg"`.
        distribution: `"normal"` (default), `"truncated_normal"` or `"uniform"`.
        nonlinearity: one of `NONLINEARITIES` (default `"relu"`), see `gain()`.
        negative_slope: slope `a >= 0` of leaky ReLU; only meaningful with
            `nonlinearity="leaky_relu"` (a non-zero value with another nonlinearity is an
            error rather than silently ignored).
        seed: int, None or `keras.random.SeedGenerator` (Keras's semantics).
        transpose, depthwise: fan conventions for transposed/depthwise kernels
            (see `compute_fans`).

    Reference: K. He, X. Zhang, S. Ren and J. Sun, "Delving Deep into Rectifiers: Surpassing
    Human-Level Performance on ImageNet Classification", ICCV 2015.
    """

    def __init__(self, mode="fan_in", distribution="normal", nonlinearity="relu",
                 negative_slope=0.0, seed=None, *, transpose=False, depthwise=False):
        check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real) or \
                not math.isfinite(negative_slope) or negative_slope < 0:
            raise ValueError("`negative_slope` must be a finite number >= 0. "
                             f"Received: negative_slope={negative_slope!r}")
        if negative_slope != 0 and nonlinearity != "leaky_relu":
            raise ValueError("`negative_slope` only applies to nonlinearity='leaky_relu'. "
                             f"Received: nonlinearity={nonlinearity!r}, "
                             f"negative_slope={negative_slope!r}")
        self.nonlinearity = nonlinearity
        self.negative_slope = float(negative_slope)
        super().__init__(mode, distribution, seed=seed, transpose=transpose, depthwise=depthwise)

    def _scale(self):
        return gain(self.nonlinearity, self.negative_slope) ** 2

    def get_config(self):
        return {"mode": self.mode, "distribution": self.distribution,
                "nonlinearity": self.nonlinearity, "negative_slope": self.negative_slope,
                **self._base_config()}


@keras.saving.register_keras_serializable(package="keras_varinit")
class KaimingNormal(Kaiming):
    """Kaiming normal: N(0, gain^2 / fan), untruncated; default 2 / fan_in (He et al. 2015).

    >>> layer = keras.layers.Conv2D(64, 3, kernel_initializer=KaimingNormal(seed=0))
    >>> KaimingNormal(mode="fan_out")  # the backward form, 2 / fan_out
    """

    def __init__(self, mode="fan_in", nonlinearity="relu", negative_slope=0.0, seed=None, *,
                 transpose=False, depthwise=False):
        super().__init__(mode=mode, distribution="normal", nonlinearity=nonlinearity,
                         negative_slope=negative_slope, seed=seed, transpose=transpose,
                         depthwise=depthwise)

    def get_config(self):
        config = super().get_config()
        del config["distribution"]
        return config


@keras.saving.register_keras_serializable(package="keras_varinit")
class KaimingUniform(Kaiming):
    """Kaiming uniform: U(-a, a), a = gain * sqrt(3 / fan); default sqrt(6 / fan_in).

    >>> layer = keras.layers.Conv2D(64, 3, kernel_initializer=KaimingUniform(seed=0))
    """

    def __init__(self, mode="fan_in", nonlinearity="relu", negative_slope=0.0, seed=None, *,
                 transpose=False, depthwise=False):
        super().__init__(mode=mode, distribution="uniform", nonlinearity=nonlinearity,
                         negative_slope=negative_slope, seed=seed, transpose=transpose,
                         depthwise=depthwise)

    def get_config(self):
        config = super().get_config()
        del config["distribution"]
        return config


@keras.saving.register_keras_serializable(package="keras_varinit")
class TorchDefault(Kaiming):
    """PyTorch's default for `nn.Linear` / `nn.ConvNd` weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    That is `kaiming_uniform_(a=sqrt(5))`: gain^2 = 2 / (1 + 5) = 1/3, Var = 1 / (3 fan_in),
    a = sqrt(3 Var) = 1 / sqrt(fan_in). Note its variance is a third of Xavier/Kaiming for
    identity: signals shrink with depth unless something (BN) rescales them.

    >>> layer = keras.layers.Dense(64, kernel_initializer=TorchDefault(seed=0))
    """

    def __init__(self, seed=None, *, transpose=False, depthwise=False):
        super().__init__(mode="fan_in", distribution="uniform", nonlinearity="leaky_relu",
                         negative_slope=math.sqrt(5.0), seed=seed, transpose=transpose,
                         depthwise=depthwise)

    def get_config(self):
        return self._base_config()


_FACTORIES = {
    "xavier_normal": lambda seed: XavierNormal(seed=seed),
    "xavier_uniform": lambda seed: XavierUniform(seed=seed),
    "xavier_truncated_normal": lambda seed: Xavier(distribution="truncated_normal", seed=seed),
    # Xavier with tanh's gain 5/3 (Var[W] = (5/3)^2 2/(fan_in + fan_out)): the diagnosis's fix
    # for saturated or vanishing tanh nets, as an init name a configuration can hold.
    "xavier_normal_tanh": lambda seed: Xavier(gain=gain("tanh"), seed=seed),
    "kaiming_normal": lambda seed: KaimingNormal(seed=seed),
    "kaiming_uniform": lambda seed: KaimingUniform(seed=seed),
    "kaiming_truncated_normal": lambda seed: Kaiming(distribution="truncated_normal", seed=seed),
    "kaiming_normal_fan_out": lambda seed: KaimingNormal(mode="fan_out", seed=seed),
    "kaiming_uniform_fan_out": lambda seed: KaimingUniform(mode="fan_out", seed=seed),
    "torch_default": lambda seed: TorchDefault(seed=seed),
}

#: Our initializer names, for CLIs and UIs (``net_options.INITIALIZER_NAMES``: the schema reads
#: them without Keras). `get()` also takes "normal:<std>" (fixed-std N(0, std^2), e.g.
#: "normal:0.01") and anything `keras.initializers.get` understands.
NAMES = INITIALIZER_NAMES


def _fixed_normal(identifier, seed):
    return keras.initializers.RandomNormal(mean=0.0, stddev=fixed_normal_std(identifier),
                                           seed=seed)


def get(identifier, seed=None):
    """Initializer from a name, config, instance or callable.

    Args:
        identifier: one of `NAMES` ("xavier_normal", "xavier_uniform", "xavier_truncated_normal",
            "xavier_normal_tanh" (gain 5/3),
            "kaiming_normal", "kaiming_uniform", "kaiming_truncated_normal",
            "kaiming_normal_fan_out", "kaiming_uniform_fan_out", "torch_default";
            case-insensitive), "normal:<std>" for a fixed N(0, std^2) (e.g. "normal:0.01" for the
            "too small" preset), or anything `keras.initializers.get` understands: a Keras name
            ("he_normal", "GlorotUniform", "orthogonal"), "keras_varinit>KaimingNormal", a config
            dict, an Initializer instance (returned as is) or a callable. None gives None.
        seed: optional int / SeedGenerator given to the new initializer (ignored for instances
            and callables; for a Keras name it is set when that initializer takes a seed).

    Example:

    >>> get("kaiming_normal")
    KaimingNormal(mode='fan_in', nonlinearity='relu', negative_slope=0.0, seed=None)
    >>> get("normal:0.01")        # keras RandomNormal(stddev=0.01)
    >>> get("he_uniform")         # Keras's own
    """
    if identifier is None:
        return None
    if isinstance(identifier, str):
        key = identifier.strip().lower()
        if key in _FACTORIES:
            return _FACTORIES[key](seed)
        if key.startswith(FIXED_NORMAL_PREFIX):
            return _fixed_normal(identifier, seed)
        try:
            init = keras.initializers.get(identifier)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"Unknown initializer. Received: identifier={identifier!r}. Allowed: "
                f"{', '.join(NAMES)}, 'normal:<std>', or a name keras.initializers.get knows "
                "(e.g. 'he_normal', 'glorot_uniform', 'keras_varinit>KaimingNormal')") from err
        if seed is not None and isinstance(init, keras.initializers.Initializer):
            config = init.get_config()
            if "seed" in config:
                init = type(init).from_config({**config, "seed": seed})
        return init
    return keras.initializers.get(identifier)
