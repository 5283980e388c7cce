"""Per-layer variance profile at initialization: measured and predicted (He et al. 2015).

`variance_profile(model, x, y)` runs one forward and one backward pass of a batch and returns,
per weight layer (Dense / Conv), the measured variances of the signal and of the gradient next
to what the recursion of `keras_varinit.propagation` predicts. It shows at a glance whether an
initialization keeps the signal alive through depth:

>>> import keras_varinit as kv, numpy as np
>>> model = kv.models.plain_cnn(30, kernel_initializer="xavier_normal", seed=0)
>>> x = np.random.default_rng(0).standard_normal((256, 32, 32, 3)).astype("float32")
>>> df = kv.variance_profile(model, x)
>>> kv.profile_report.summarize_profile(df)
'forward variance falls 10^-11x from conv_01 to conv_29 (30 weight layers): expect training to stall'

How the numbers are obtained (TensorFlow and JAX backends). The model's graph (Sequential, or
Functional through the same node walk `Functional.call` uses) is re-run layer by layer with two
changes at every weight layer: its own activation, if any, is applied separately so the
pre-activation y_l is observable, and y_l is made a differentiation target: TensorFlow watches
it on a `tf.GradientTape`; JAX adds a zero tensor e_l and differentiates with respect to e_l
(`jax.grad`, jitted), since dL/de_l = dL/dy_l. The pass runs inside a `keras.StatelessScope`,
so it changes nothing in the model
(batch normalization moving statistics included).

Reading the table (the one-line verdict, why a draw drifts, the plot):
`keras_varinit.profile_report`.
"""
import inspect

import keras
import numpy as np
import pandas as pd
from keras import ops

from keras_varinit import propagation
from keras_varinit.models import is_weight_layer

#: Columns of `variance_profile`'s DataFrame, in order.
COLUMNS = (
    "layer", "index", "layer_type", "activation", "fan_in", "fan_out", "stride", "weight_var",
    "input_second_moment", "forward_var", "forward_var_post", "backward_var",
    "predicted_forward_var", "predicted_forward_var_cumulative",
    "predicted_backward_var", "predicted_backward_var_cumulative", "padding_factor",
)

_ACTIVATION_LAYERS = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                      keras.layers.ELU, keras.layers.PReLU, keras.layers.Softmax)
# Layers that pass the signal on unchanged in scale (backward factor 1).
_NEUTRAL_LAYERS = (keras.layers.Flatten, keras.layers.Reshape, keras.layers.Dropout,
                   keras.layers.Identity, keras.layers.InputLayer, keras.layers.Permute)


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


def _fans(layer):
    shape = tuple(int(d) for d in layer.kernel.shape)
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return receptive * shape[-2], receptive * shape[-1]


def _strides(layer):
    strides = getattr(layer, "strides", None)
    return float(np.prod(strides)) if strides else 1.0


def _accepts_training(layer, cache={}):  # noqa: B006 (a deliberate per-class cache)
    key = type(layer)
    if key not in cache:
        try:
            cache[key] = "training" in inspect.signature(layer.call).parameters
        except (TypeError, ValueError):
            cache[key] = False
    return cache[key]


def _layer_sequence(model):
    """Layers in execution order, and whether they form a single chain (each layer's input is
    the previous layer's output)."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if isinstance(model, keras.Sequential):
        return layers, True
    chain = True
    previous = model.inputs[0] if len(model.inputs) == 1 else None
    for layer in layers:
        try:
            inputs = layer.input
        except (AttributeError, ValueError):
            return layers, False
        if previous is None or inputs is not previous:
            chain = False
            break
        previous = layer.output
    return layers, chain


# --------------------------------------------------------------------------------------------
# the instrumented pass

def _second_moment(t):
    return ops.mean(ops.square(ops.cast(t, "float32")))


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


class _Recorder:
    """Runs the model with the instrumentation and collects scalar statistics per layer."""

    def __init__(self, model, weight_names, training):
        self.model = model
        self.weight_names = set(weight_names)
        self.order = list(weight_names)
        self.training = training

    def run(self, x, deltas=None, tape=None):
        """deltas: zero tensors added to each pre-activation (JAX); tape: a tf.GradientTape
        that watches each pre-activation instead (TensorFlow; kept in `self.watched`);
        neither: a forward pass only."""
        self.deltas = dict(zip(self.order, deltas)) if deltas is not None else None
        self.tape = tape
        self.watched = {}
        self.stats = {}
        if isinstance(self.model, keras.Sequential):
            out = x
            for layer in self.model.layers:
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                out = self._call(layer, out)
        else:
            if not hasattr(self.model, "_run_through_graph"):
                raise ValueError("variance_profile needs a Sequential or Functional model. "
                                 f"Received: {type(self.model).__name__}")
            outputs = self.model._run_through_graph(
                [x], operation_fn=lambda op: op, call_fn=self._call)
            out = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        return out, self.stats

    def _call(self, op, *args, **kwargs):
        if not isinstance(op, keras.layers.Layer):
            return op(*args, **kwargs)
        if _accepts_training(op):
            kwargs["training"] = self.training
        inputs = args[0] if args else None
        is_weight = op.name in self.weight_names
        if is_weight:
            act = op.activation
            op.activation = None
            try:
                pre = op(*args, **kwargs)
            finally:
                op.activation = act
            if self.tape is not None:
                self.tape.watch(pre)
                self.watched[op.name] = pre
            elif self.deltas is not None:
                pre = pre + self.deltas[op.name]
            out = act(pre) if activation_of(op) is not None else pre
        else:
            pre, out = None, op(*args, **kwargs)
        if self.tape is not None:
            with self.tape.stop_recording():  # statistics are not part of the loss
                self.stats[op.name] = self._record(op, inputs, pre, out, is_weight)
        else:
            self.stats[op.name] = self._record(op, inputs, pre, out, is_weight)
        return out

    def _record(self, op, inputs, pre, out, is_weight):
        record = {}
        if is_weight:
            record["pre_var"] = _second_moment(pre)
            if activation_of(op) is not None:
                record["own_post_var"] = _variance(out)
        # only the statistics the profile uses (each is a pass over a large tensor)
        single_in = inputs is not None and not isinstance(inputs, (list, tuple, dict))
        single_out = not isinstance(out, (list, tuple, dict))
        if isinstance(op, _ACTIVATION_LAYERS):
            if single_out:
                record["out_var"] = _variance(out)
        elif not isinstance(op, _NEUTRAL_LAYERS) or is_weight:
            if single_in:
                record["in_m2"] = _second_moment(inputs)
            if single_out and not is_weight:
                record["out_m2"] = _second_moment(out)
            if single_in and isinstance(op, keras.layers.BatchNormalization):
                record["bn_scale2"] = _channel_scale2(inputs, out)
        return record


def _ends_in_softmax(model):
    last = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    act = activation_of(last[-1]) if last else None
    return act is not None and act[0] == "softmax"


def _loss_and_labels(model, loss, y):
    """The loss function and labels: `loss` as given, else softmax cross-entropy (sparse for
    integer labels, categorical for one-hot), from logits unless the model ends in softmax."""
    if loss is not None:
        return keras.losses.get(loss), y
    from_logits = not _ends_in_softmax(model)
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        return (keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
                y.reshape(-1).astype("int32"))
    return keras.losses.CategoricalCrossentropy(from_logits=from_logits), y.astype("float32")


def _run_backend(model, x, y, loss_fn, weight_layers, training, gradients=True):
    recorder = _Recorder(model, [layer.name for layer in weight_layers], training)
    batch = int(x.shape[0])
    shapes = [(batch,) + tuple(int(d) for d in layer.output.shape[1:]) for layer in weight_layers]
    backend = keras.backend.backend()

    if not gradients and backend in ("tensorflow", "jax"):
        with keras.StatelessScope():
            _, stats = recorder.run(keras.ops.convert_to_tensor(x))
        grads = [None] * len(weight_layers)
    elif backend == "tensorflow":
        import tensorflow as tf

        x_t = tf.convert_to_tensor(x)
        with keras.StatelessScope():
            with tf.GradientTape() as tape:
                out, stats = recorder.run(x_t, tape=tape)
                loss_value = loss_fn(y, out)
        grads = tape.gradient(loss_value, [recorder.watched[layer.name]
                                           for layer in weight_layers])
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        x_j = jnp.asarray(x)

        variables = list(model.variables)

        def loss_of(deltas, values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                out, stats = recorder.run(x_j, deltas)
                return loss_fn(y, out), stats

        deltas = [jnp.zeros(shape, dtype="float32") for shape in shapes]
        # jit (op-by-op jax.grad is several times slower on CPU); the weights are arguments.
        grads, stats = jax.jit(jax.grad(loss_of, has_aux=True))(
            deltas, [v.value for v in variables])
    else:
        raise RuntimeError("variance_profile supports the TensorFlow and JAX backends. "
                           f"Received: backend={backend!r}. Allowed: 'tensorflow', 'jax'")
    stats = {name: {k: float(keras.ops.convert_to_numpy(v)) for k, v in rec.items()}
             for name, rec in stats.items()}
    grad_vars = [float(np.mean(np.square(keras.ops.convert_to_numpy(g).astype(np.float64))))
                 if g is not None else float("nan") for g in grads]
    return stats, grad_vars


def _bridges(layers, chain, weight_layers):
    """For weight layer l, the layers between it and the next weight layer (None: unknown)."""
    if not chain:
        return [None] * len(weight_layers)
    positions = [layers.index(layer) for layer in weight_layers]
    bridges = []
    for k, pos in enumerate(positions):
        end = positions[k + 1] if k + 1 < len(positions) else len(layers)
        bridges.append(layers[pos + 1:end])
    return bridges


def _spatial_input(layer):
    """The spatial sizes of a layer's input, or None when unknown or flat."""
    try:
        shape = tuple(layer.input.shape)
    except (AttributeError, ValueError):
        return None
    if len(shape) < 3 or any(d is None for d in shape[1:]):
        return None
    channels_last = getattr(layer, "data_format", "channels_last") != "channels_first"
    sizes = shape[1:-1] if channels_last else shape[2:]
    return tuple(int(d) for d in sizes)


def _conv_energy(layer, profiles):
    """(output profiles, padding factor) of a convolution on per-axis input energy profiles."""
    kernel = tuple(layer.kernel_size)
    strides = tuple(getattr(layer, "strides", (1,) * len(kernel)))
    dilation = tuple(getattr(layer, "dilation_rate", (1,) * len(kernel)))
    padding = getattr(layer, "padding", "valid")
    out = []
    for axis, prof in enumerate(profiles):
        n, k, s, d = len(prof), kernel[axis], strides[axis], dilation[axis]
        if padding == "same":
            before = propagation.same_padding_before(n, k, s, d)
            size = -(-n // s)
        elif padding == "causal":
            before, size = (k - 1) * d, -(-n // s)
        else:
            before, size = 0, (n - (k - 1) * d - 1) // s + 1
        out.append(propagation.padded_energy(prof, k, s, before, d, out_size=size))
    factor = propagation.padding_factor(profiles, out)
    return [p / max(float(np.mean(p)), 1e-30) for p in out], factor


def _padding_factors(weight_layers, bridges):
    """Per weight layer, the zero-padding factor of the expected forward variance
    (`propagation.padding_factor`), propagating each axis's energy profile along the chain:
    activations, dropout and batch normalization keep its shape (the same factor at every
    position), non-overlapping pooling averages it in blocks, anything else starts it afresh
    (uniform). Dense layers and transposed convolutions get 1 (not modelled)."""
    transposed = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                  keras.layers.Conv3DTranspose)
    keeps_shape = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                   keras.layers.ELU, keras.layers.PReLU, keras.layers.Dropout,
                   keras.layers.Identity, keras.layers.BatchNormalization)
    factors, profiles = [], None
    for layer, bridge in zip(weight_layers, bridges):
        sizes = _spatial_input(layer) if hasattr(layer, "kernel_size") and \
            not isinstance(layer, transposed) else None
        if sizes is None:
            factors.append(1.0)
            profiles = None
            continue
        if profiles is None or tuple(len(p) for p in profiles) != sizes:
            profiles = [np.ones(n) for n in sizes]
        profiles, factor = _conv_energy(layer, profiles)
        factors.append(factor)
        for item in bridge if bridge is not None else [None]:
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


def _pooling_backward_factor(layer, stats):
    """Var[dL/d input] / Var[dL/d output] of a pooling layer (exact for these shapes)."""
    if isinstance(layer, (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
                          keras.layers.GlobalAveragePooling3D)):
        spatial = float(np.prod([int(d) for d in layer.input.shape[1:-1]]))
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
        model: a built Sequential or Functional Keras model (e.g. `keras_varinit.models.
            plain_cnn(30)`) with Dense/Conv weight layers and one input.
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
        A pandas DataFrame, one row per weight layer, with columns COLUMNS:

        Weight, forward and backward variances are measured about zero (mean of squares over
        all entries): at initialization weights are zero-mean and biases zero, so 0 is the
        ensemble mean of W, y_l and dL/dy_l and E[v^2] estimates the variance the recursion
        predicts (subtracting the batch mean would remove a part of it that is itself drawn
        with the weights).

        * `layer`, `index` (1-based), `layer_type`, `activation` (the nonlinearity found
          after it, e.g. "relu", or "linear"), `fan_in`, `fan_out` (k*k*c_in, k*k*c_out),
          `stride` (product of strides), `weight_var` (Var of the kernel);
        * `input_second_moment`: E[x_l^2] of the layer's input;
        * `forward_var`: Var of the pre-activation output y_l;
        * `forward_var_post`: Var after the following activation (about its batch mean) (the layer's own activation,
          else the next activation layer before the next weight layer; else = forward_var);
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
          fewer real inputs (`propagation.padded_energy`, exact in expectation over weights).

        Predictions are NaN where the path between two weight layers is not a simple chain or
        holds an activation without a factor (sigmoid forward, gelu...).
    """
    if not getattr(model, "built", False) or not model.inputs:
        raise ValueError("variance_profile needs a built model with a defined input. "
                         f"Received: model={getattr(model, 'name', model)!r}")
    if len(model.inputs) != 1:
        raise ValueError("variance_profile supports single-input models. "
                         f"Received: {len(model.inputs)} inputs")
    x = keras.ops.convert_to_numpy(x) if not isinstance(x, np.ndarray) else x
    x = np.asarray(x, dtype="float32")
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError("variance_profile needs a batch of at least 2 examples. "
                         f"Received: x with shape {x.shape}")
    layers, chain = _layer_sequence(model)
    weight_layers = [layer for layer in layers if is_weight_layer(layer)]
    if not weight_layers:
        raise ValueError("variance_profile found no Dense or Conv layer in the model. "
                         f"Received: model={model.name!r}")

    num_classes = int(model.outputs[0].shape[-1])
    if y is None:
        y = np.random.default_rng(seed).integers(0, num_classes, size=x.shape[0])
    y = np.asarray(y)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y must have the same number of examples. Received: "
                         f"x.shape={x.shape}, y.shape={y.shape}")
    loss_fn, y = _loss_and_labels(model, loss, y)

    stats, grad_vars = _run_backend(model, x, y, loss_fn, weight_layers, training, gradients)
    bridges = _bridges(layers, chain, weight_layers)
    return _assemble(weight_layers, stats, grad_vars, bridges)


def _bridge_factors(layer, bridge, stats):
    """(activation name, post var, forward transfer, BN reset, backward factor) for one link."""
    own = activation_of(layer)
    act_name, post_var = None, None
    forward = 1.0
    backward = 1.0
    reset = float("nan")
    if own is not None:
        act_name = own[0]
        post_var = stats[layer.name].get("own_post_var")
        forward *= propagation.forward_factor(*own)
        backward *= propagation.backward_factor(*own)
    if bridge is None:
        return act_name, post_var, float("nan"), reset, float("nan")
    for item in bridge:
        rec = stats.get(item.name, {})
        act = activation_of(item) if isinstance(item, _ACTIVATION_LAYERS) else None
        if act is not None:
            if act_name is None:
                act_name, post_var = act[0], rec.get("out_var")
            forward *= propagation.forward_factor(*act)
            backward *= propagation.backward_factor(*act)
        elif isinstance(item, keras.layers.BatchNormalization):
            # re-normalizes: the forward recursion restarts from its measured output; the
            # gradient is scaled like the signal (gamma / sigma per channel).
            reset = rec.get("out_m2", float("nan")) / max(forward, 1e-30) \
                if act_name is None else float("nan")
            backward *= rec.get("bn_scale2", float("nan"))
        elif isinstance(item, _NEUTRAL_LAYERS):
            continue
        else:
            # pooling and anything else: forward carries the measured ratio of second moments
            ratio = rec.get("out_m2", float("nan")) / rec.get("in_m2", float("nan"))
            forward *= ratio
            backward *= _pooling_backward_factor(item, stats)
    return act_name, post_var, forward, reset, backward


def _assemble(weight_layers, stats, grad_vars, bridges):
    rows = []
    transfer, resets, back = [], [], []
    for i, (layer, bridge) in enumerate(zip(weight_layers, bridges)):
        rec = stats[layer.name]
        fan_in, fan_out = _fans(layer)
        weight_var = float(np.mean(np.square(
            keras.ops.convert_to_numpy(layer.kernel).astype(np.float64))))
        act_name, post_var, forward, reset, backward = _bridge_factors(layer, bridge, stats)
        transfer.append(forward)
        resets.append(reset)
        back.append(backward)
        pre_var = rec["pre_var"]
        rows.append({
            "layer": layer.name, "index": i + 1, "layer_type": type(layer).__name__,
            "activation": act_name or "linear", "fan_in": fan_in, "fan_out": fan_out,
            "stride": _strides(layer), "weight_var": weight_var,
            "input_second_moment": rec.get("in_m2", float("nan")),
            "forward_var": pre_var,
            "forward_var_post": post_var if post_var is not None else pre_var,
            "backward_var": grad_vars[i],
        })
    df = pd.DataFrame(rows)
    df["predicted_forward_var"] = propagation.one_step_forward(
        df["fan_in"], df["weight_var"], df["input_second_moment"])
    df["padding_factor"] = _padding_factors(weight_layers, bridges)
    df["predicted_forward_var_cumulative"] = propagation.cumulative_forward(
        df["fan_in"], df["weight_var"], df["input_second_moment"].iloc[0], transfer, resets,
        df["padding_factor"])
    n = len(df)
    one_step = np.full(n, np.nan)
    if n > 1:
        one_step[:-1] = propagation.one_step_backward(
            df["fan_out"].to_numpy()[1:], df["weight_var"].to_numpy()[1:],
            df["backward_var"].to_numpy()[1:], np.asarray(back[:-1]),
            df["stride"].to_numpy()[1:])
    df["predicted_backward_var"] = one_step
    df["predicted_backward_var_cumulative"] = propagation.cumulative_backward(
        df["fan_out"], df["weight_var"], df["backward_var"].iloc[-1], back, df["stride"])
    return df[list(COLUMNS)]

