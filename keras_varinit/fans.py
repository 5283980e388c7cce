"""Pure math for initialization: fans, gains and target variances.

Plain Python functions on shapes and numbers (no tensors), so that tests, the initializers and the
diagnostics can call them directly. Re-exported from `keras_varinit.initializers`.
"""
import math
import numbers

from keras_varinit.checks import check_choice

LAYOUTS = ("keras", "torch")
DEPTHWISE = (False, True, "keras", "torch")
MODES = ("fan_in", "fan_out", "fan_avg")

# Constant of proportionality between the std of a normal truncated at +-2 sigma and sigma.
TRUNCATED_NORMAL_STD = 0.87962566103423978

_LINEAR = ("linear", "identity", "conv1d", "conv2d", "conv3d",
           "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
NONLINEARITIES = _LINEAR + ("sigmoid", "tanh", "relu", "leaky_relu", "selu")


def _check_shape(shape):
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"`shape` must be a tuple of positive integers. Received: shape={shape!r}")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise ValueError("`shape` must be a tuple of positive integers. "
                             f"Received: shape={shape!r}")
    if any(dim <= 0 for dim in shape):
        raise ValueError("Cannot compute fans of a weight with a zero-size (or negative) "
                         f"dimension: fan_in and fan_out would be 0. Received: shape={shape!r}")
    return tuple(int(d) for d in shape)


def compute_fans(shape, layout="keras", *, transpose=False, depthwise=False):
    """Number of input and output connections per unit of a weight tensor.

    For a Dense kernel `(in, out)`: `fan_in = in`, `fan_out = out`. For a convolution kernel with
    receptive field `r = prod(spatial)`: `fan_in = r * in_channels`, `fan_out = r * out_channels`
    (He et al. 2015, Sec. 2.2: a `(2k+1)x(2k+1)` kernel from `c` to `h` channels has
    `fan_in = (2k+1)^2 c`, `fan_out = (2k+1)^2 h`). Rank 0 gives `(1, 1)`, rank 1 `(n, n)`.

    Args:
        shape: the weight's shape (tuple of positive ints).
        layout: `"keras"`: conv kernels `(*spatial, in, out)`;
            `"torch"`: `(out, in, *spatial)`.
        transpose: the kernel belongs to a transposed convolution. Keras's `Conv2DTranspose`
            stores `(*spatial, out, in)` and PyTorch's `ConvTranspose2d` `(in, out, *spatial)`,
            so the channel axes are swapped relative to a convolution; with `transpose=True`
            `fan_in = r * (input channels of the layer)`, `fan_out = r * (its filters)`. Keras's
            and PyTorch's own initializers do not swap (they count the layer's filters into
            fan_in): the default `False` reproduces them.
        depthwise: the kernel of a depthwise convolution. Keras stores `(*spatial, in, mult)`,
            PyTorch a grouped convolution with `groups=in`, shape `(in*mult, 1, *spatial)`.
            Each output then sees only `r` inputs (one channel), not `r * in`.

            * `False` (default): treat it as an ordinary kernel. In the Keras layout this counts
              the channels into fan_in (`fan_in = r * in`, `fan_out = r * mult`), which is what
              Keras's own initializers do; in the torch layout it is exactly PyTorch's
              `fan_in = r`, `fan_out = r * in * mult`.
            * `"keras"`: Keras's convention, stated explicitly (Keras layout only, since a torch
              depthwise shape does not say how many input channels there were).
            * `"torch"` or `True`: PyTorch's grouped-convolution convention,
              `fan_in = r` (the true number of inputs of each output) and
              `fan_out = r * in * mult` (PyTorch counts every output channel).

    Returns:
        `(fan_in, fan_out)` as Python ints.

    Raises:
        ValueError: unknown layout/depthwise value, or a zero-size dimension.

    Example:

    >>> compute_fans((3, 3, 16, 64))                 # Keras Conv2D
    (144, 576)
    >>> compute_fans((64, 16, 3, 3), layout="torch")  # the same in PyTorch
    (144, 576)
    >>> compute_fans((3, 3, 64, 16), transpose=True)  # Keras Conv2DTranspose 16 -> 64
    (144, 576)
    >>> compute_fans((3, 3, 32, 2), depthwise="torch")
    (9, 576)
    """
    check_choice("layout", layout, LAYOUTS)
    check_choice("depthwise", depthwise, DEPTHWISE)
    if not isinstance(transpose, bool):
        raise ValueError(f"`transpose` must be True or False. Received: transpose={transpose!r}")
    shape = _check_shape(shape)
    if transpose and depthwise:
        raise ValueError("A kernel cannot be both transposed and depthwise. Received: "
                         f"transpose={transpose!r}, depthwise={depthwise!r}")
    if depthwise and len(shape) < 3:
        raise ValueError("A depthwise kernel has rank >= 3 (spatial dims, channels, multiplier). "
                         f"Received: shape={shape!r}, depthwise={depthwise!r}")
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if layout == "keras":
        spatial, n_in, n_out = shape[:-2], shape[-2], shape[-1]
    else:
        n_out, n_in, spatial = shape[0], shape[1], shape[2:]
    field = math.prod(spatial)
    if transpose:
        # Keras (*spatial, filters, in); torch (in, filters, *spatial): swap what was read above.
        n_in, n_out = n_out, n_in
    if depthwise is True or depthwise == "torch":
        if layout == "keras":  # (*spatial, in, mult) -> grouped conv with in*mult outputs
            return field, field * n_in * n_out
        return field * n_in, field * n_out  # already (in*mult, 1, *spatial)
    if depthwise == "keras" and layout == "torch":
        raise ValueError("depthwise='keras' needs the Keras layout (*spatial, in, multiplier): a "
                         "torch depthwise kernel (in*mult, 1, *spatial) does not say how many "
                         f"input channels there were. Received: shape={shape!r}, layout='torch'")
    return field * n_in, field * n_out


def gain(nonlinearity, param=None):
    """Recommended gain (std multiplier) for a nonlinearity, as in `torch.nn.init.calculate_gain`.

    ============================ ==================================
    nonlinearity                 gain
    ============================ ==================================
    linear, identity, conv*      1
    sigmoid                      1
    tanh                         5/3
    relu                         sqrt(2)
    leaky_relu (slope a)         sqrt(2 / (1 + a^2)), a = 0.01 if param is None
    selu                         3/4
    ============================ ==================================

    The relu value follows He et al. 2015 (E[relu(x)^2] = Var[x]/2); tanh and selu are PyTorch's
    empirical choices.

    Example:

    >>> gain("relu")
    1.4142135623730951
    >>> gain("leaky_relu", 0.2)  # sqrt(2/1.04)
    1.386750490563073
    """
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, bool) or not isinstance(param, numbers.Real) or \
                not math.isfinite(param):
            raise ValueError("The negative slope of leaky_relu must be a finite number. "
                             f"Received: param={param!r}")
        elif param < 0:
            raise ValueError("The negative slope of leaky_relu must be >= 0. "
                             f"Received: param={param!r}")
        else:
            slope = float(param)
        return math.sqrt(2.0 / (1.0 + slope ** 2))
    if nonlinearity in _LINEAR or nonlinearity == "sigmoid":
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    return 0.75  # selu


def scaled_variance(scale, mode, fan_in, fan_out):
    """Target weight variance `scale / n`, `n` = fan_in, fan_out or (fan_in + fan_out) / 2.

    Xavier is `scale = gain^2` with `mode="fan_avg"` (i.e. `2 gain^2 / (fan_in + fan_out)`);
    Kaiming is `scale = gain(nonlinearity)^2` with `mode="fan_in"` (or `"fan_out"`).

    >>> scaled_variance(2.0, "fan_in", 100, 400)
    0.02
    """
    check_choice("mode", mode, MODES)
    if mode == "fan_in":
        n = fan_in
    elif mode == "fan_out":
        n = fan_out
    else:
        n = (fan_in + fan_out) / 2.0
    if n <= 0:
        raise ValueError(f"Fans must be positive. Received: fan_in={fan_in!r}, fan_out={fan_out!r}")
    return float(scale) / n
