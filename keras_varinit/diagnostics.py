"""Per-layer variance profile at initialization: measured and predicted (He et al. 2015).

`variance_profile(model, x, y)` runs one forward and one backward pass of a batch and returns,
per call of a weight layer (Dense, EinsumDense, Conv*, Conv*Transpose, DepthwiseConv*,
SeparableConv*), the measured variances of the signal and of the gradient next to what the
recursion of `keras_varinit.propagation` predicts. It shows at a glance whether an
initialization keeps the signal alive through depth:

>>> import keras_varinit as kv, numpy as np
>>> model = kv.models.plain_cnn(30, kernel_initializer="xavier_normal", seed=0)
>>> x = np.random.default_rng(0).standard_normal((256, 32, 32, 3)).astype("float32")
>>> df = kv.variance_profile(model, x)
>>> kv.profile_report.summarize_profile(df).text
'forward variance falls 10^-9x from conv_01 to conv_29 (30 weight layers): expect training to stall'

Any Keras model: Sequential, Functional, nested (a row's `layer` is its path, e.g.
`backbone/conv1_conv`), subclassed, and layers called several times (one row per call,
`name#1`, `name#2`). How the numbers are obtained: `keras_varinit.instrument` records every
leaf layer's call in one pass (TensorFlow and JAX); a weight layer's fused activation is split
off, so its pre-activation y_l is what is measured and differentiated. Nothing in the model
changes (batch-normalization moving statistics included).

The recorded non-weight layers feed the predictions: activation layers (ReLU, Activation, ...)
give the activation factor and `forward_var_post`; BatchNormalization restarts the forward
recursion from its measured output and scales the gradient by its measured per-channel gain;
pooling and other structural layers carry their measured ratio of second moments. This needs
the recorded layers to form a plain chain (each layer's input is the previous one's output,
as in a Sequential model); with branches (Add, Concatenate in residual blocks), skip
connections or raw tensor ops between layers, the cumulative and one-step backward
predictions are NaN (the one-step forward prediction, from the layer's measured input, is
always there).

Reading the table (the one-line verdict, why a draw drifts, the plot):
`keras_varinit.profile_report`.
"""
import keras
import numpy as np
import pandas as pd
from keras import ops

from keras_varinit import batch_checks, fans, instrument, propagation

#: Columns of `variance_profile`'s DataFrame, in order.
COLUMNS = (
    "layer", "index", "layer_type", "activation", "fan_in", "fan_out", "stride", "weight_var",
    "input_second_moment", "forward_var", "forward_var_post", "backward_var",
    "predicted_forward_var", "predicted_forward_var_cumulative",
    "predicted_backward_var", "predicted_backward_var_cumulative", "padding_factor",
    "segment", "follows_previous",
)

_ACTIVATION_LAYERS = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                      keras.layers.ELU, keras.layers.PReLU, keras.layers.Softmax)
# Layers that pass the signal on unchanged in scale (backward factor 1).
_NEUTRAL_LAYERS = (keras.layers.Flatten, keras.layers.Reshape, keras.layers.Identity,
                   keras.layers.InputLayer, keras.layers.Permute)
# Multiplicative noise of mean 1 (active in training mode only): E[(m x)^2] = E[x^2] / (1 - rate),
# and the same factor on the way back (Srivastava et al. 2014; GaussianDropout's variance
# rate / (1 - rate) gives 1 / (1 - rate) too).
_DROPOUT_LAYERS = (keras.layers.Dropout, keras.layers.GaussianDropout)


# --------------------------------------------------------------------------------------------
# layer introspection

def activation_of(layer):
    """`(name, negative_slope)` of the nonlinearity `layer` applies, or None.

    Weight layers: their `activation` ("linear" -> None). Activation layers: `Activation(name)`,
    `ReLU` (leaky when `negative_slope > 0`), `LeakyReLU`, ...
    """
    if isinstance(layer, keras.layers.LeakyReLU):
        return "leaky_relu", float(layer.negative_slope)
    if isinstance(layer, keras.layers.ReLU):
        slope = float(getattr(layer, "negative_slope", 0.0) or 0.0)
        return ("leaky_relu", slope) if slope > 0 else ("relu", None)
    if isinstance(layer, keras.layers.ELU):
        return "elu", None
    if isinstance(layer, keras.layers.PReLU):
        return "prelu", None
    if isinstance(layer, keras.layers.Softmax):
        return "softmax", None
    fn = getattr(layer, "activation", None)
    if fn is None:
        return None
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", None)
    if name in (None, "linear"):
        return None
    if name == "leaky_relu":
        return name, propagation.DEFAULT_LEAKY_SLOPE
    return name, None


_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
               keras.layers.Conv3DTranspose)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)


def _strides(layer):
    strides = getattr(layer, "strides", None)
    return float(np.prod(strides)) if strides else 1.0


def _mean_square(variable):
    return float(np.mean(np.square(keras.ops.convert_to_numpy(variable).astype(np.float64))))


def _einsum_fans(layer):
    """EinsumDense: kernel axes summed over (absent from the output) make fan_in, the others
    fan_out (`"ab,bc->ac"`: fan_in = b, fan_out = c)."""
    inputs, output = layer.equation.split("->")
    kernel_axes = inputs.split(",")[1]
    shape = tuple(int(d) for d in layer.kernel.shape)
    fan_in = int(np.prod([d for a, d in zip(kernel_axes, shape) if a not in output]))
    fan_out = int(np.prod([d for a, d in zip(kernel_axes, shape) if a in output]))
    return fan_in, fan_out


def kernel_terms(layer):
    """`(fan_in, fan_out, weight_var, stride)` of a weight layer, as the recursion uses them.

    fan_in: inputs summed into one output; fan_out: outputs one input reaches (He et al. 2015);
    weight_var: E[W^2] of the kernel; stride: product of the strides (the backward step
    divides fan_out by it).

    * Dense, Conv*, custom kernels: `fans.compute_fans(kernel.shape)` (k*k*c_in, k*k*c_out);
    * DepthwiseConv* (kernel (k, k, c, m)): each output sees one channel, fan_in = k*k
      (`compute_fans(depthwise=True)`), each input reaches m outputs per tap, fan_out = k*k*m
      (`compute_fans(depthwise="keras")`);
    * SeparableConv* (depthwise d, then pointwise p): y = p(d(x)), so fan_in = k*k*c*m, fan_out
      = k*k*m*filters and weight_var = E[d^2] E[p^2] (the product enters the recursion);
    * Conv*Transpose: `compute_fans(transpose=True)` and stride 1 (its backward pass is a
      strided convolution summing k*k*filters terms); its strides leave taps without input,
      which `padding_factor` counts (1/prod(strides));
    * EinsumDense: from its equation (contracted kernel axes -> fan_in).
    """
    if isinstance(layer, _SEPARABLE):
        depthwise, pointwise = layer.depthwise_kernel, layer.pointwise_kernel
        d_shape, p_shape = tuple(depthwise.shape), tuple(pointwise.shape)
        fan_in = fans.compute_fans(d_shape, depthwise=True)[0] * fans.compute_fans(p_shape)[0]
        fan_out = fans.compute_fans(d_shape, depthwise="keras")[1] * \
            fans.compute_fans(p_shape)[1]
        return fan_in, fan_out, _mean_square(depthwise) * _mean_square(pointwise), \
            _strides(layer)
    shape = tuple(layer.kernel.shape)
    if isinstance(layer, _DEPTHWISE):   # its `kernel` is the depthwise one
        return (fans.compute_fans(shape, depthwise=True)[0],
                fans.compute_fans(shape, depthwise="keras")[1],
                _mean_square(layer.kernel), _strides(layer))
    if isinstance(layer, _TRANSPOSED):
        fan_in, fan_out = fans.compute_fans(shape, transpose=True)
        return fan_in, fan_out, _mean_square(layer.kernel), 1.0
    if isinstance(layer, keras.layers.EinsumDense):
        return (*_einsum_fans(layer), _mean_square(layer.kernel), 1.0)
    fan_in, fan_out = fans.compute_fans(shape)
    # a grouped convolution's kernel is (..., in / groups, out): each input channel reaches
    # only the out / groups outputs of its group
    fan_out //= int(getattr(layer, "groups", 1) or 1)
    return fan_in, fan_out, _mean_square(layer.kernel), _strides(layer)


# --------------------------------------------------------------------------------------------
# the statistics of the pass (reduced in the compiled pass, keras.ops)

def _scaled_second_moment(prefix, t):
    """E[t^2] as (max|t|, E[(t / max|t|)^2]): the host multiplies them in float64, so a
    vanishing signal (|t| ~ 1e-20, t^2 below float32's range) is still measured."""
    t = ops.cast(t, "float32")
    scale = ops.max(ops.abs(t))
    safe = ops.where(scale > 0, scale, ops.ones_like(scale))
    return {f"{prefix}_scale": scale, f"{prefix}_m2": ops.mean(ops.square(t / safe))}


def _second_moment_from(stats, prefix, default=float("nan")):
    if f"{prefix}_scale" not in stats:
        return default
    scale, m2 = float(stats[f"{prefix}_scale"]), float(stats[f"{prefix}_m2"])
    if not np.isfinite(scale):
        return scale   # inf (overflow) or NaN
    return scale * scale * m2


def _variance(t):
    # centred (not E[t^2] - E[t]^2: a sigmoid's output, mean ~0.5 and tiny spread, would
    # cancel to noise in float32)
    return ops.var(ops.cast(t, "float32"))


def _channel_scale2(t_in, t_out):
    """mean over channels of Var_c[out] / Var_c[in] (the per-channel linear scale of a BN)."""
    t_in, t_out = ops.cast(t_in, "float32"), ops.cast(t_out, "float32")
    axes = tuple(range(len(t_in.shape) - 1))
    var_in = ops.var(t_in, axis=axes)
    var_out = ops.var(t_out, axis=axes)
    return ops.mean(var_out / (var_in + 1e-12))


def _profile_statistics(view):
    """Per call, only what the profile uses (each statistic is a pass over a large tensor)."""
    layer = view.site.layer
    stats = {}
    if instrument.is_weight_layer(layer):
        stats.update(_scaled_second_moment("pre", view.output))
        if instrument.fused_activation(layer) is not None:
            stats["own_post_var"] = _variance(view.activated)
        if view.inputs is not None:
            stats.update(_scaled_second_moment("in", view.inputs))
        if view.output_grad is not None:
            stats.update(_scaled_second_moment("grad", view.output_grad))
    elif isinstance(layer, _ACTIVATION_LAYERS):
        stats["out_var"] = _variance(view.output)
    elif not isinstance(layer, _NEUTRAL_LAYERS + _DROPOUT_LAYERS):
        if view.inputs is not None:
            stats.update(_scaled_second_moment("in", view.inputs))
            if isinstance(layer, keras.layers.BatchNormalization):
                stats["bn_scale2"] = _channel_scale2(view.inputs, view.output)
        stats.update(_scaled_second_moment("out", view.output))
    return stats


def _record(model, x, y, loss_fn, training):
    """One pass: the `instrument.Recording` of every leaf layer and weight layer call."""
    weight = instrument.weight_sites(model, "variance_profile")
    # A recurrent layer is recorded whole: its cell runs inside its loop.
    sites = [s for s in instrument.layer_sites(model) if not s.in_loop and (
        s.is_leaf or instrument.is_weight_layer(s.layer) or
        isinstance(s.layer, instrument.LOOP_LAYERS))]
    recorder = instrument.Recorder(model, sites, _profile_statistics, loss=loss_fn,
                                   training=training, split=True, gradient_sites=weight,
                                   eager_calls=None)
    return recorder(x, y)


# --------------------------------------------------------------------------------------------
# from the recorded calls to the predictions

def _bridges(recording, weight_records):
    """For each weight call, the recorded calls between it and the next weight call (the last
    one: up to the model's output); None for all when the recorded calls are not a chain."""
    if not recording.chain:
        return [None] * len(weight_records)
    records = recording.records
    positions = [next(i for i, r in enumerate(records) if r is w) for w in weight_records]
    ends = positions[1:] + [len(records)]
    return [records[p + 1:end] for p, end in zip(positions, ends)]


def _spatial_input(record):
    """The spatial sizes of a call's input, or None when unknown or flat."""
    shape = record.input_shape
    if shape is None or len(shape) < 3 or any(d is None for d in shape[1:]):
        return None
    channels_last = getattr(record.layer, "data_format", "channels_last") != "channels_first"
    return tuple(shape[1:-1] if channels_last else shape[2:])


def _conv_axis(layer, axis, n):
    """`(kernel, stride, dilation, zeros before, output size)` of a convolution along one
    spatial axis of input size `n` (Keras's "same", "causal" and "valid" padding)."""
    k = tuple(layer.kernel_size)[axis]
    s = tuple(getattr(layer, "strides", (1,) * len(layer.kernel_size)))[axis]
    d = tuple(getattr(layer, "dilation_rate", (1,) * len(layer.kernel_size)))[axis]
    padding = getattr(layer, "padding", "valid")
    if padding == "same":
        return k, s, d, propagation.same_padding_before(n, k, s, d), -(-n // s)
    if padding == "causal":
        return k, s, d, (k - 1) * d, -(-n // s)
    return k, s, d, 0, (n - (k - 1) * d - 1) // s + 1


def _conv_energy(layer, profiles):
    """(output profiles, padding factor) of a convolution on per-axis input energy profiles."""
    out = []
    for axis, prof in enumerate(profiles):
        k, s, d, before, size = _conv_axis(layer, axis, len(prof))
        out.append(propagation.padded_energy(prof, k, s, before, d, out_size=size))
    factor = propagation.padding_factor(profiles, out)
    return [p / max(float(np.mean(p)), 1e-30) for p in out], factor


def _backward_padding(record):
    """Var[dL/dx] of a convolution call over the textbook fan_out Var[W] Var[dL/dy] / stride:
    per axis, the (output, tap) pairs that land inside the input, times the stride, over the
    input size (a uniform gradient energy per output position). 1 for Dense and transposed
    layers; "valid" 3x3 on 8x8 gives (6/8)^2 = 0.5625, "same" 3x3 on 8x8 (22/24)^2."""
    layer = record.layer
    sizes = _spatial_input(record) if hasattr(layer, "kernel_size") else None
    if sizes is None or isinstance(layer, _TRANSPOSED):
        return 1.0
    factor = 1.0
    for axis, n in enumerate(sizes):
        k, s, d, before, size = _conv_axis(layer, axis, n)
        inside = propagation.padded_energy(np.ones(n), k, s, before, d, out_size=size)
        factor *= float(inside.sum()) * s / n
    return factor


def _padding_factors(weight_records, bridges):
    """Per weight call, the zero-padding factor of the expected forward variance
    (`propagation.padding_factor`), propagating each axis's energy profile along the chain:
    activations, dropout and batch normalization keep its shape (the same factor at every
    position), non-overlapping pooling averages it in blocks, anything else starts it afresh
    (uniform). Dense layers get 1; a transposed convolution 1/prod(strides) (the share of its
    taps that land on an input)."""
    keeps_shape = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                   keras.layers.ELU, keras.layers.PReLU, keras.layers.Dropout,
                   keras.layers.Identity, keras.layers.BatchNormalization)
    factors, profiles = [], None
    for record, bridge in zip(weight_records, bridges):
        layer = record.layer
        sizes = _spatial_input(record) if hasattr(layer, "kernel_size") else None
        if sizes is None or isinstance(layer, _TRANSPOSED):
            factors.append(1.0 / _strides(layer) if isinstance(layer, _TRANSPOSED) else 1.0)
            profiles = None
            continue
        if profiles is None or tuple(len(p) for p in profiles) != sizes:
            profiles = [np.ones(n) for n in sizes]
        profiles, factor = _conv_energy(layer, profiles)
        factors.append(factor)
        for item in [r.layer for r in bridge] if bridge is not None else [None]:
            if isinstance(item, keeps_shape):
                continue
            pool = getattr(item, "pool_size", None)
            if pool is not None and tuple(pool) == tuple(item.strides) and \
                    len(pool) == len(profiles) and getattr(item, "padding", "") == "valid":
                profiles = [p[: len(p) // k * k].reshape(-1, k).mean(axis=1)
                            for p, k in zip(profiles, pool)]
            else:
                profiles = None
                break
    return factors


def _pooling_backward_factor(record):
    """Var[dL/d input] / Var[dL/d output] of a pooling call (exact for these shapes)."""
    layer = record.layer
    if isinstance(layer, (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
                          keras.layers.GlobalAveragePooling3D)):
        if record.input_shape is None:
            return float("nan")
        channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
        axes = record.input_shape[2:] if channels_first else record.input_shape[1:-1]
        if None in axes:
            return float("nan")
        spatial = float(np.prod(axes))
        return 1.0 / spatial ** 2  # each input gets dL/dout / (H W); mean over (H W) copies
    if isinstance(layer, (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
                          keras.layers.MaxPooling3D)):
        if tuple(layer.pool_size) == tuple(layer.strides):
            return 1.0 / float(np.prod(layer.pool_size))  # routed to one of the pool's inputs
    if isinstance(layer, (keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
                          keras.layers.AveragePooling3D)):
        if tuple(layer.pool_size) == tuple(layer.strides):
            return 1.0 / float(np.prod(layer.pool_size)) ** 2
    return float("nan")


def variance_profile(model, x, y=None, loss=None, seed=0, training=True, gradients=True):
    """Per weight layer: fans, weight variance, measured and predicted forward/backward variance.

    Args:
        model: a built Keras model of any kind (Sequential, Functional, nested, subclassed;
            e.g. `keras_varinit.models.plain_cnn(30)`) with one input and at least one
            weight layer.
        x: one batch of inputs (numpy or backend tensor), e.g. 256 images.
        y: integer labels (or one-hot). None: random labels drawn with `seed`.
        loss: a Keras loss (name, instance or callable `loss(y_true, y_pred)`). Default: softmax
            cross-entropy, `from_logits=True` unless the model ends in a softmax. The loss is
            averaged over the batch, so gradient variances scale as 1/batch^2.
        seed: seed of the random labels.
        training: passed to the layers (default True: batch normalization uses batch
            statistics, as in the first training step; note Dropout is active too).
        gradients: False skips the backward pass (about 3x faster; the backward columns are
            NaN), for forward-only sweeps over many widths or seeds.

    Returns:
        A pandas DataFrame, one row per call of a weight layer, in call order, with columns
        COLUMNS:

        Weight, forward and backward variances are measured about zero (mean of squares over
        all entries): at initialization weights are zero-mean and biases zero, so 0 is the
        ensemble mean of W, y_l and dL/dy_l and E[v^2] estimates the variance the recursion
        predicts (subtracting the batch mean would remove a part of it that is itself drawn
        with the weights).

        * `layer` (its path, `#k` for the k-th call of a layer called several times),
          `index` (1-based), `layer_type`, `activation` (the nonlinearity found after it,
          e.g. "relu", or "linear"), `fan_in`, `fan_out` (k*k*c_in, k*k*c_out; depthwise,
          separable, transposed and einsum kernels: `kernel_terms`), `stride` (product of
          strides), `weight_var` (Var of the kernel);
        * `input_second_moment`: E[x_l^2] of the layer's input;
        * `forward_var`: Var of the pre-activation output y_l;
        * `forward_var_post`: Var after the following activation (about its batch mean): the
          layer's own activation, else the next activation layer before the next weight
          layer; else = forward_var;
        * `backward_var`: Var of dL/dy_l;
        * `predicted_forward_var`: one step, fan_in * Var[W] * E[x_l^2] (measured input);
        * `predicted_forward_var_cumulative`: the recursion from the first layer's input
          E[x^2] alone, with the activation factors of `keras_varinit.propagation` and the
          zero-padding factors (`padding_factor`); pooling and
          other structural layers carry their measured ratio of second moments, and a batch
          normalization restarts the recursion from its measured output;
        * `predicted_backward_var`: one step from the measured next layer:
          c_b * fan_out_(l+1) / stride_(l+1) * Var[W_(l+1)] * Var[dL/dy_(l+1)] (times the exact
          pooling factor, e.g. 1/(H W)^2 for global average pooling); NaN for the last layer;
        * `predicted_backward_var_cumulative`: the same recursion run down from the measured
          gradient at the last layer's output.

        * `padding_factor`: the share of the expected Var[y] left after zero padding (1 for
          "valid" padding and Dense layers): border positions of a "same" convolution sum
          fewer real inputs (`propagation.padded_energy`, exact in expectation over weights);
        * `segment`: how many normalization layers ran before this one (batch, layer, group:
          `propagation.renormalizes`); the diagnosis compares variances across depth only
          within a segment, since a normalization restarts the scale;
        * `follows_previous`: the layer's input is the previous weight layer's output through
          layers that each take the one before's output (False for the first, for a parallel
          branch such as a residual shortcut or a squeeze-and-excitation gate, and after a
          residual add): where normalization layers restart the scale, variances are compared
          only along such chains (`profile_report.stretches`).

        Predictions are NaN where the path between two weight layers is not a simple chain or
        holds an activation without a factor (sigmoid forward, gelu...).

    Raises:
        ValueError: an unbuilt model, a batch of fewer than 2 examples or with NaN/Inf
            values (`batch_checks.check_finite`), a model without weight layers
            (`instrument.NoWeightLayerError`) or with layers that cannot be recorded
            (`instrument.UnsupportedLayerError`: inside an RNN, quantized).
    """
    x = _checked_batch(model, x, training)
    loss_fn = None
    if gradients:
        y = _labels(model, x, y, seed)
        loss_fn, y = (instrument.get_loss(loss), y) if loss is not None else \
            instrument.default_loss(model, y)
    recording = _record(model, x, y if gradients else None, loss_fn, training)
    weight_records = [r for r in recording.records if instrument.is_weight_layer(r.layer)]
    df = _assemble(weight_records, _bridges(recording, weight_records), training)
    df["segment"], df["follows_previous"] = _segments_and_links(recording, weight_records)
    return df[list(COLUMNS)]


def _segments_and_links(recording, weight_records):
    """Per weight call, how many normalization calls came before it in call order
    (`propagation.weight_segments`) and whether it continues the previous weight call's path
    (`propagation.weight_links`)."""
    weights = {id(r) for r in weight_records}
    is_weight = [id(r) in weights for r in recording.records]
    return (propagation.weight_segments([type(r.layer).__name__ for r in recording.records],
                                        is_weight),
            propagation.weight_links([r.follows_previous for r in recording.records],
                                     is_weight))


def _checked_batch(model, x, training):
    """Refuse what `variance_profile` cannot profile; the batch `x` as one array."""
    instrument.check_model(model, "variance_profile")
    if not getattr(model, "built", False):
        raise ValueError(
            "variance_profile needs a built model. Received: unbuilt "
            f"{instrument.describe_model(model)}. Allowed: a model "
            "created with keras.Input, called once on a batch, or built with model.build().")
    inputs = getattr(model, "inputs", None)
    if inputs is not None and len(inputs) != 1:
        raise ValueError(
            "variance_profile supports single-input models (its predictions start from the "
            f"input's second moment). Received: {instrument.describe_model(model)} with "
            f"{len(inputs)} inputs. Allowed: a model with one input (`lsuv` and "
            "`LayerStatsLogger` take several).")
    (x,) = batch_checks.as_arrays(x, "variance_profile", n_inputs=1)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype("float32")
    batch_checks.check_examples([x], "variance_profile")
    batch_checks.check_finite(x, "variance_profile")
    if not isinstance(training, (bool, np.bool_)):
        raise ValueError(f"`training` must be True or False. Received: training={training!r}")
    return x


def _labels(model, x, y, seed):
    """`y` as an array, or random labels over the model's output units drawn with `seed`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer. Received: seed={seed!r}")
    if y is None:
        spec = model.compute_output_spec(keras.KerasTensor(x.shape, dtype=str(x.dtype)))
        num_classes = int(keras.tree.flatten(spec)[0].shape[-1])
        return np.random.default_rng(seed).integers(0, num_classes, size=x.shape[0])
    y = np.asarray(y)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y must have the same number of examples. Received: "
                         f"x.shape={x.shape}, y.shape={y.shape}")
    return y


def _bridge_factors(record, bridge, training):
    """(activation name, post var, forward transfer, BN reset, backward factor) for one link."""
    own = activation_of(record.layer) if instrument.fused_activation(record.layer) else None
    act_name, post_var = None, None
    forward = 1.0
    backward = 1.0
    reset = float("nan")
    if own is not None:
        act_name = own[0]
        post_var = float(record.stats["own_post_var"])
        forward *= propagation.forward_factor(*own)
        backward *= propagation.backward_factor(*own)
    if bridge is None:
        return act_name, post_var, float("nan"), reset, float("nan")
    for item in bridge:
        layer, stats = item.layer, item.stats
        act = activation_of(layer) if isinstance(layer, _ACTIVATION_LAYERS) else None
        if act is not None:
            if act_name is None:
                act_name, post_var = act[0], float(stats.get("out_var", float("nan")))
            forward *= propagation.forward_factor(*act)
            backward *= propagation.backward_factor(*act)
        elif isinstance(layer, keras.layers.BatchNormalization):
            # re-normalizes: the forward recursion restarts from its measured output (before
            # or after the activation: the factors after it still apply); the gradient is
            # scaled like the signal (gamma / sigma per channel).
            reset = _second_moment_from(stats, "out") / max(forward, 1e-30)
            backward *= float(stats.get("bn_scale2", float("nan")))
        elif isinstance(layer, _DROPOUT_LAYERS):
            noise = 1.0 / (1.0 - float(layer.rate)) if training else 1.0
            forward, backward = forward * noise, backward * noise
        elif isinstance(layer, _NEUTRAL_LAYERS):
            continue
        else:
            # pooling and anything else: forward carries the measured ratio of second moments
            forward *= _second_moment_from(stats, "out") / _second_moment_from(stats, "in")
            backward *= _pooling_backward_factor(item)
    return act_name, post_var, forward, reset, backward


def _assemble(weight_records, bridges, training):
    rows = []
    transfer, resets, back = [], [], []
    for i, (record, bridge) in enumerate(zip(weight_records, bridges)):
        layer = record.layer
        fan_in, fan_out, weight_var, stride = kernel_terms(layer)
        act_name, post_var, forward, reset, backward = _bridge_factors(record, bridge, training)
        transfer.append(forward)
        resets.append(reset)
        back.append(backward)
        pre_var = _second_moment_from(record.stats, "pre")
        rows.append({
            "layer": record.name, "index": i + 1, "layer_type": type(layer).__name__,
            "activation": act_name or "linear", "fan_in": fan_in, "fan_out": fan_out,
            "stride": stride, "weight_var": weight_var,
            "input_second_moment": _second_moment_from(record.stats, "in"),
            "forward_var": pre_var,
            "forward_var_post": post_var if post_var is not None else pre_var,
            "backward_var": _second_moment_from(record.stats, "grad"),
        })
    df = pd.DataFrame(rows)
    with np.errstate(all="ignore"):   # overflowing or dead profiles: NaN/inf, said by the verdict
        _add_predictions(df, weight_records, bridges, transfer, resets, back)
    return df


def _add_predictions(df, weight_records, bridges, transfer, resets, back):
    df["predicted_forward_var"] = propagation.one_step_forward(
        df["fan_in"], df["weight_var"], df["input_second_moment"])
    df["padding_factor"] = _padding_factors(weight_records, bridges)
    df["predicted_forward_var_cumulative"] = propagation.cumulative_forward(
        df["fan_in"], df["weight_var"], df["input_second_moment"].iloc[0], transfer, resets,
        df["padding_factor"])
    n = len(df)
    # what reaches layer l's output from layer l+1 loses the border taps of l+1, as forward
    back = np.asarray(back, dtype=float)
    back[:-1] *= [_backward_padding(record) for record in weight_records[1:]]
    one_step = np.full(n, np.nan)
    if n > 1:
        one_step[:-1] = propagation.one_step_backward(
            df["fan_out"].to_numpy()[1:], df["weight_var"].to_numpy()[1:],
            df["backward_var"].to_numpy()[1:], back[:-1], df["stride"].to_numpy()[1:])
    df["predicted_backward_var"] = one_step
    df["predicted_backward_var_cumulative"] = propagation.cumulative_backward(
        df["fan_out"], df["weight_var"], df["backward_var"].iloc[-1], back, df["stride"])
