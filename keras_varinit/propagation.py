"""Predicted forward and backward variances of a plain network at initialization (pure math).

The recursion of He et al. 2015 (derived in docs/science.md). Weight layer l computes
y_l = W_l x_l (+ 0 bias), x_(l+1) = f(y_l), weights zero-mean i.i.d. with variance Var[W_l]:

    forward:   Var[y_l]      = fan_in_l * Var[W_l] * E[x_l^2]
               E[x_(l+1)^2]  = c_f(f) * Var[y_l]
    backward:  Var[dL/dx_l]  = fan_out_l * Var[W_l] * Var[dL/dy_l]          (stride 1)
               Var[dL/dy_l]  = c_b(f) * Var[dL/dx_(l+1)]

with the activation factors c_f = E[f(y)^2] / Var[y] and c_b = E[f'(y)^2] for symmetric y:

    relu        1/2                 (He et al.: half the units are zero)
    leaky_relu  (1 + a^2) / 2       (slope a on the negative side)
    linear      1
    tanh        1                   (tanh(y) ~ y near 0; ignores saturation)
    selu        1                   (its self-normalizing fixed point; approximate)
    sigmoid     c_f undefined (sigmoid(0) = 1/2 is not centred), c_b = 1/16 (slope 1/4 at 0)

Convolutions: fan_in = k*k*c_in and fan_out = k*k*c_out (`fans.compute_fans`); a strided convolution
reaches each input position from fan_out / prod(strides) output terms on average, so the
backward step divides by the product of the strides.

"One-step" predictions use the measured input (forward) or the measured gradient of the next
layer (backward), and test a single application of the formula. "Cumulative" predictions run
the whole recursion from the data's second moment (forward) or from the gradient at the logits
(backward) and show what the theory predicts for the network as a whole.

Everything here is plain numpy on numbers: tests call it with hand-computed values.
"""
import math

import numpy as np

#: Activations with a known factor.
FACTOR_ACTIVATIONS = ("relu", "leaky_relu", "linear", "tanh", "selu", "sigmoid")
DEFAULT_LEAKY_SLOPE = 0.2  # keras.activations.leaky_relu's default


def forward_factor(activation, negative_slope=None):
    """c_f = E[f(y)^2] / Var[y] for zero-mean symmetric y (NaN when not defined).

    >>> forward_factor("relu")
    0.5
    >>> forward_factor("leaky_relu", 0.2)  # (1 + 0.04) / 2
    0.52
    """
    if activation in (None, "linear", "identity"):
        return 1.0
    if activation == "relu":
        return 0.5
    if activation == "leaky_relu":
        a = DEFAULT_LEAKY_SLOPE if negative_slope is None else float(negative_slope)
        return (1.0 + a * a) / 2.0
    if activation in ("tanh", "selu"):
        return 1.0
    return float("nan")  # sigmoid, softmax, gelu, ...: not part of the recursion


def backward_factor(activation, negative_slope=None):
    """c_b = E[f'(y)^2] for zero-mean symmetric y (NaN when unknown).

    >>> backward_factor("relu")
    0.5
    >>> backward_factor("sigmoid")  # sigmoid'(0)^2
    0.0625
    """
    if activation == "sigmoid":
        return 1.0 / 16.0
    return forward_factor(activation, negative_slope)


def one_step_forward(fan_in, weight_var, input_second_moment):
    """Var[y_l] = fan_in * Var[W_l] * E[x_l^2] (the layer's measured input).

    >>> float(one_step_forward(144, 2 / 144, 0.5))
    1.0
    """
    return np.asarray(fan_in, dtype=float) * np.asarray(weight_var, dtype=float) * \
        np.asarray(input_second_moment, dtype=float)


def one_step_backward(fan_out_next, weight_var_next, grad_var_next, factor=1.0,
                      stride_next=1.0):
    """Var[dL/dy_l] = c_b * fan_out_(l+1) / stride_(l+1) * Var[W_(l+1)] * Var[dL/dy_(l+1)].

    `fan_out_next`, `weight_var_next`, `grad_var_next` and `stride_next` (product of the strides)
    belong to the *next* weight layer; `factor` is everything between y_l and the next layer's
    input (the activation's c_b times any pooling factor).

    >>> float(one_step_backward(144, 2 / 144, 1e-6, factor=0.5))
    1e-06
    """
    return np.asarray(factor, dtype=float) * np.asarray(fan_out_next, dtype=float) / \
        np.asarray(stride_next, dtype=float) * np.asarray(weight_var_next, dtype=float) * \
        np.asarray(grad_var_next, dtype=float)


def same_padding_before(size, kernel, stride=1, dilation=1):
    """Zeros Keras's "same" padding puts before the first position (TF convention: the odd one
    goes after): total = max((ceil(n/s) - 1) s + (k - 1) d + 1 - n, 0), before = total // 2.

    >>> same_padding_before(32, 3), same_padding_before(32, 3, stride=2)
    (1, 0)
    """
    out = -(-int(size) // int(stride))
    total = max((out - 1) * int(stride) + (int(kernel) - 1) * int(dilation) + 1 - int(size), 0)
    return total // 2


def padded_energy(profile, kernel, stride=1, pad_before=0, dilation=1, out_size=None,
                  pad_after=None):
    """Expected energy per output position of a zero-padded convolution, along one axis.

    With zero-mean i.i.d. weights, E_W[y(o)^2] = Var[W] sum_c sum_t E[x_c(o s - p + t d)^2],
    the sum running over the taps t that land inside the input (the padding contributes 0).
    `profile` is E[x^2] per input position; returned: the mean over the kernel's taps per
    output position, so an interior position keeps its input's energy and a border one loses
    the taps that fall on the padding. Separable: a 2D (3D) map is the outer product of the
    per-axis profiles, so each axis is propagated on its own.

    `out_size` defaults to the convolution's output size, rounded down as convolutions do:
    floor((n + pad_before + pad_after - (kernel - 1) dilation - 1) / stride) + 1, with
    `pad_after` defaulting to `pad_before`. That is floor((n - k) / s) + 1 for "valid"
    (no padding) and, with Keras's "same" split (`same_padding_before`, the odd zero after:
    pad_after = total - pad_before), ceil(n / s).

    >>> padded_energy([1.0, 1.0, 1.0, 1.0], 3, pad_before=1)
    array([0.66666667, 1.        , 1.        , 0.66666667])
    >>> len(padded_energy(np.ones(8), 3, stride=2))   # "valid": floor((8 - 3) / 2) + 1
    3
    """
    profile = np.asarray(profile, dtype=float)
    n = profile.shape[0]
    if out_size is None:
        after = pad_before if pad_after is None else pad_after
        out_size = (n + pad_before + after - (kernel - 1) * dilation - 1) // stride + 1
    out = np.zeros(int(out_size))
    for o in range(int(out_size)):
        for t in range(int(kernel)):
            i = o * stride - pad_before + t * dilation
            if 0 <= i < n:
                out[o] += profile[i]
    return out / float(kernel)


def padding_factor(in_profiles, out_profiles):
    """Mean output energy over the full-tap prediction: prod over axes of mean(out) / mean(in).

    It multiplies fan_in * Var[W] * E[x^2] into the expected Var[y] of a zero-padded
    convolution (1 for "valid" padding, Dense layers and 1x1 kernels).

    >>> round(padding_factor([np.ones(8)] * 2, [padded_energy(np.ones(8), 3, pad_before=1)] * 2), 4)
    0.8403
    """
    factor = 1.0
    for a, b in zip(in_profiles, out_profiles):
        factor *= float(np.mean(b)) / float(np.mean(a))
    return factor


def _as_array(values, n, default):
    if values is None:
        return np.full(n, default, dtype=float)
    values = np.asarray(values, dtype=float)
    if values.shape != (n,):
        raise ValueError(f"Expected {n} values, one per weight layer. Received: shape "
                         f"{values.shape}")
    return values


def cumulative_forward(fan_in, weight_var, input_second_moment, transfer=None, reset=None,
                       padding=None):
    """Var[y_l] for every weight layer from the data's second moment alone.

    Args:
        fan_in, weight_var: per weight layer (length L).
        input_second_moment: E[x^2] of the first weight layer's input (the data).
        transfer: per layer, E[x_(l+1)^2] / Var[y_l] (activation factor c_f times any
            structural ratio up to the next weight layer); default 1. The last entry is unused.
        reset: per layer, NaN or a value that replaces Var[y_l] before `transfer` (a batch
            normalization re-normalizes the signal); default all NaN.
        padding: per layer, the zero-padding factor (`padding_factor`: the share of the
            kernel's taps that land inside the input, weighted by the expected energy per
            position); default 1 (the textbook recursion).

    >>> cumulative_forward([27, 144, 144], [2/27, 2/144, 2/144], 1.0, transfer=[.5, .5, .5])
    array([2., 2., 2.])
    """
    fan_in = np.asarray(fan_in, dtype=float)
    n = fan_in.shape[0]
    weight_var = _as_array(weight_var, n, np.nan)
    transfer = _as_array(transfer, n, 1.0)
    reset = _as_array(reset, n, np.nan)
    padding = _as_array(padding, n, 1.0)
    out = np.empty(n)
    m2 = float(input_second_moment)
    for layer in range(n):
        out[layer] = fan_in[layer] * weight_var[layer] * m2 * padding[layer]
        var = out[layer] if math.isnan(reset[layer]) else reset[layer]
        m2 = transfer[layer] * var
    return out


def cumulative_backward(fan_out, weight_var, top_grad_var, transfer=None, stride=None):
    """Var[dL/dy_l] for every weight layer from the gradient at the last layer's output.

    Args:
        fan_out, weight_var: per weight layer (length L).
        top_grad_var: Var[dL/dy_L] of the last weight layer (e.g. the logits).
        transfer: per layer l, the backward factor between y_l and the next layer's input
            (c_b times pooling factors); default 1. The last entry is unused.
        stride: per layer, product of its strides; default 1.

    >>> cumulative_backward([144, 144, 10], [2/144, 2/144, 2/64], 1e-4, transfer=[.5, .5, .5])
    array([1.5625e-05, 1.5625e-05, 1.0000e-04])
    """
    fan_out = np.asarray(fan_out, dtype=float)
    n = fan_out.shape[0]
    weight_var = _as_array(weight_var, n, np.nan)
    transfer = _as_array(transfer, n, 1.0)
    stride = _as_array(stride, n, 1.0)
    out = np.empty(n)
    out[-1] = float(top_grad_var)
    for layer in range(n - 2, -1, -1):
        out[layer] = one_step_backward(fan_out[layer + 1], weight_var[layer + 1],
                                       out[layer + 1], transfer[layer], stride[layer + 1])
    return out


def variance_ratio(first, last):
    """last / first, NaN when either is missing or first is 0."""
    first, last = float(first), float(last)
    if not (math.isfinite(first) and first > 0) or math.isnan(last):
        return float("nan")
    return last / first


def renormalizes(layer_type):
    """Whether a layer of this class name (`type(layer).__name__`) rescales its output to unit
    variance from statistics of its input: batch, layer, group (and instance) normalization.
    After one, the scale of the signal starts again: variance ratios that compound over depth
    are compared only between layers with no such layer between them."""
    return str(layer_type).endswith("Normalization")


def weight_segments(layer_types, is_weight):
    """Per weight layer (`is_weight` True; rows in call order), how many normalization layers
    (`renormalizes`) came before it: weight layers of one segment have none between them."""
    normalization = np.array([renormalizes(t) for t in layer_types], bool)
    return np.cumsum(normalization)[np.asarray(is_weight, bool)]


def weight_links(follows, is_weight):
    """Per weight layer (rows in call order; `follows[i]`: row i's input is row i-1's output),
    whether its input is the previous weight layer's output through rows that each take the
    one before's output: False for the first weight layer, for a parallel branch (a residual
    block's shortcut, a squeeze-and-excitation gate) and after a residual add."""
    follows, is_weight = np.asarray(follows, bool), np.asarray(is_weight, bool)
    out, previous = [], None
    for p in np.flatnonzero(is_weight):
        out.append(previous is not None and bool(follows[previous + 1:p + 1].all()))
        previous = p
    return np.array(out, bool)
