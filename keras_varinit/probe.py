"""The compiled probe behind `LayerStatsLogger`: one forward and backward pass of a fixed batch.

`build_probe(model, layers, loss_fn)` returns a callable `probe(x, y)` that runs the model's own
functional graph on a fixed batch, and returns, per tracked layer, the statistics of the layer
statistics record (CONTRIBUTING.md) that can be computed in-graph:

    activation_mean, activation_std, zero_fraction, saturated_fraction,
    activation_grad_std, weight_std, weight_grad_std, nan_count, inf_count

as one `(n_layers, 9)` float32 array (a single device-to-host transfer), plus, on request, the
raw activations and activation gradients (for histograms).

How the gradient with respect to an intermediate activation a^l is obtained without touching the
model's `train_step` or optimizer: the functional graph is re-run node by node
(`Function._run_through_graph`, the same walk `Functional.call` uses) with the tracked layers
wrapped.

* TensorFlow: the wrapper calls `tape.watch(a^l)` inside a `tf.GradientTape`; dL/da^l and
  dL/dW^l come from one `tape.gradient` call. The first `EAGER_CALLS` (3) calls run eagerly;
  the 4th traces one `tf.function` that every later call uses. Tracing a deep model costs about
  ten probes, which a short fit never recovers (benchmarks/RESULTS.md).
* JAX: the wrapper returns `a^l + e^l` with e^l = 0, and `jax.grad` differentiates the loss with
  respect to (W^l, e^l): dL/de^l = dL/da^l. Variables are fed through `keras.StatelessScope`
  (as `model.stateless_call` does); the function is compiled once with `jax.jit`.

On both backends the forward runs inside a `StatelessScope`, so nothing the probe does (batch
norm moving statistics with `training=True`, seed generator state) changes the model.
"""
import math

import keras
import numpy as np
from keras import ops

STAT_NAMES = (
    "activation_mean", "activation_std", "zero_fraction", "saturated_fraction",
    "activation_grad_std", "weight_std", "weight_grad_std", "nan_count", "inf_count",
)

# Saturation thresholds (tanh: |a| > 0.97; sigmoid: a outside [0.03, 0.97]).
TANH_SATURATION = 0.97
SIGMOID_LOW, SIGMOID_HIGH = 0.03, 0.97

_SAT_NONE, _SAT_TANH, _SAT_SIGMOID = 0, 1, 2

# TensorFlow: number of probe calls run eagerly before the probe is compiled with tf.function.
EAGER_CALLS = 3


def activation_name(layer):
    """Name of the activation a layer applies to its output (`"tanh"`, `"relu"`, ...) or None."""
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    if isinstance(act, str):
        return act
    return getattr(act, "__name__", None)


def saturation_mode(layer):
    name = activation_name(layer)
    if name == "tanh":
        return _SAT_TANH
    if name == "sigmoid":
        return _SAT_SIGMOID
    return _SAT_NONE


def tracked_weight(layer):
    """The weight whose std/gradient/update ratio is logged: kernel, else embeddings, else gamma."""
    for attr in ("kernel", "depthwise_kernel", "embeddings", "gamma"):
        try:
            w = getattr(layer, attr, None)
        except Exception:  # e.g. properties that raise on quantized layers
            w = None
        if w is not None and isinstance(w, keras.Variable):
            return w
    return None


def functional_graph(model):
    """The `Functional` whose graph holds the model's layers, or raise ValueError."""
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise ValueError(
                "LayerStatsLogger needs a built Sequential model with a known input shape "
                "(start it with keras.Input(shape=...)). Received: an unbuilt Sequential "
                f"model {model.name!r}."
            )
        return fn
    if isinstance(model, Functional):
        return model
    raise ValueError(
        "LayerStatsLogger supports Sequential and Functional models only (it needs the layer "
        "graph to reach intermediate activations). Received: a subclassed model of type "
        f"{type(model).__name__!r}. Allowed: keras.Sequential or keras.Model(inputs, outputs)."
    )


def _layer_stats(a, g, w, gw, sat_mode):
    """In-graph statistics of one layer, as a (9,) float32 tensor (keras.ops, any backend)."""
    f32 = "float32"
    a = ops.cast(a, f32)
    g = ops.cast(g, f32)
    mean = ops.mean(a)
    std = ops.std(a)
    zero = ops.mean(ops.cast(ops.equal(a, 0.0), f32))
    if sat_mode == _SAT_TANH:
        sat = ops.mean(ops.cast(ops.greater(ops.abs(a), TANH_SATURATION), f32))
    elif sat_mode == _SAT_SIGMOID:
        sat = ops.mean(ops.cast(
            ops.logical_or(ops.less(a, SIGMOID_LOW), ops.greater(a, SIGMOID_HIGH)), f32))
    else:
        sat = ops.zeros((), f32)
    gstd = ops.std(g)
    tensors = [a, g]
    if w is not None:
        w = ops.cast(w, f32)
        gw = ops.cast(gw, f32)
        wstd = ops.std(w)
        gwstd = ops.std(gw)
        tensors += [w, gw]
    else:
        wstd = ops.full((), float("nan"), f32)
        gwstd = ops.full((), float("nan"), f32)
    nan = sum(ops.sum(ops.cast(ops.isnan(t), f32)) for t in tensors)
    inf = sum(ops.sum(ops.cast(ops.isinf(t), f32)) for t in tensors)
    return ops.stack([mean, std, zero, sat, gstd, wstd, gwstd, nan, inf])


def _layer_stats_tf(a, g, w, gw, sat_mode):
    """`_layer_stats` in plain TensorFlow ops: far fewer graph nodes, so a deep model's probe
    traces and optimizes in a fraction of the time (measured: 22-layer CNN, 43 layers)."""
    import tensorflow as tf

    f32 = tf.float32
    a = tf.cast(a, f32)
    g = tf.cast(g, f32)
    mean, var = tf.nn.moments(tf.reshape(a, [-1]), axes=[0])
    n_a = tf.cast(tf.size(a), f32)
    zero = tf.cast(tf.math.count_nonzero(tf.equal(a, 0.0)), f32) / n_a
    if sat_mode == _SAT_TANH:
        sat = tf.cast(tf.math.count_nonzero(tf.abs(a) > TANH_SATURATION), f32) / n_a
    elif sat_mode == _SAT_SIGMOID:
        sat = tf.cast(tf.math.count_nonzero(
            tf.logical_or(a < SIGMOID_LOW, a > SIGMOID_HIGH)), f32) / n_a
    else:
        sat = tf.zeros((), f32)
    gstd = tf.math.reduce_std(g)
    tensors = [a, g]
    if w is not None:
        w = tf.cast(tf.convert_to_tensor(w), f32)
        gw = tf.cast(gw, f32)
        wstd = tf.math.reduce_std(w)
        gwstd = tf.math.reduce_std(gw)
        tensors += [w, gw]
    else:
        wstd = gwstd = tf.constant(float("nan"), f32)
    flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)
    nan = tf.cast(tf.math.count_nonzero(tf.math.is_nan(flat)), f32)
    inf = tf.cast(tf.math.count_nonzero(tf.math.is_inf(flat)), f32)
    return tf.stack([mean, tf.sqrt(var), zero, sat, gstd, wstd, gwstd, nan, inf])


def _call_op(op, training):
    from keras.src.models.functional import operation_fn

    return operation_fn(op, training=training)


class Probe:
    """Compiled forward + backward pass of a fixed batch through a Functional/Sequential model.

    Args:
        model: a built Sequential or Functional model.
        layers: the layers to track (each must have a single output in the model's graph).
        loss_fn: `loss_fn(y_true, y_pred) -> scalar or per-sample loss` (mean is taken).
        training: the `training` flag of the probe's forward pass (default False: inference
            mode, deterministic; batch norm uses its moving statistics).
        return_tensors: also return raw activations and activation gradients (histograms).
    """

    def __init__(self, model, layers, loss_fn, training=False, return_tensors=False):
        self.model = model
        self.graph = functional_graph(model)
        self.layers = list(layers)
        self.loss_fn = loss_fn
        self.training = training
        self.return_tensors = return_tensors
        self.sat_modes = [saturation_mode(l) for l in self.layers]
        self.weights = [tracked_weight(l) for l in self.layers]
        self._index = {id(l): i for i, l in enumerate(self.layers)}
        self.backend = keras.backend.backend()
        if self.backend == "tensorflow":
            self._fn = self._build_tf()
        elif self.backend == "jax":
            self._fn = self._build_jax()
        else:
            raise ValueError(
                "LayerStatsLogger supports the TensorFlow and JAX backends. Received: "
                f"backend={self.backend!r}. Allowed: 'tensorflow', 'jax'."
            )

    # -- shared pieces -----------------------------------------------------------------------

    def _loss(self, y, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        return ops.mean(ops.cast(self.loss_fn(y, y_pred), "float32"))

    def _forward(self, x, inject):
        """Run the graph; `inject(i, a)` is applied to the output of tracked layer i."""
        acts = [None] * len(self.layers)

        def wrap(op):
            call = _call_op(op, self.training)
            i = self._index.get(id(op))
            if i is None:
                return call

            def wrapped(*args, **kwargs):
                out = inject(i, call(*args, **kwargs))
                acts[i] = out
                return out

            return wrapped

        outputs = self.graph._run_through_graph(x, operation_fn=wrap)
        if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
            outputs = outputs[0]
        return outputs, acts

    def _collect(self, acts, act_grads, w_values, w_grads):
        stats_fn = _layer_stats_tf if self.backend == "tensorflow" else _layer_stats
        rows = []
        for i in range(len(self.layers)):
            rows.append(stats_fn(acts[i], act_grads[i], w_values[i], w_grads[i],
                                 self.sat_modes[i]))
        stats = ops.stack(rows)
        if self.return_tensors:
            return stats, list(acts), list(act_grads)
        return stats

    # -- TensorFlow --------------------------------------------------------------------------

    def _build_tf(self):
        import tensorflow as tf

        def run(x, y):
            with tf.GradientTape() as tape:
                def inject(i, a):
                    tape.watch(a)
                    return a

                with keras.StatelessScope():
                    y_pred, acts = self._forward(x, inject)
                loss = self._loss(y, y_pred)
            w_vars = [w for w in self.weights if w is not None]
            grads = tape.gradient(loss, w_vars + acts,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            it = iter(grads[:len(w_vars)])
            w_grads = [next(it) if w is not None else None for w in self.weights]
            w_values = [w.value if w is not None else None for w in self.weights]
            return self._collect(acts, grads[len(w_vars):], w_values, w_grads)

        fn = tf.function(run, reduce_retracing=True)
        calls = [0]

        def call(x, y):
            # The first EAGER_CALLS probes run eagerly: tracing + optimizing the graph of a
            # deep model costs ~10 probes' worth of time, which a short fit never earns back.
            calls[0] += 1
            out = run(x, y) if calls[0] <= EAGER_CALLS else fn(x, y)
            return tf.nest.map_structure(lambda t: t.numpy(), out)

        return call

    # -- JAX ---------------------------------------------------------------------------------

    def _build_jax(self):
        import jax
        import jax.numpy as jnp

        model = self.model
        variables = list(model.variables)
        tracked_ids = {id(w) for w in self.weights if w is not None}
        w_positions = [i for i, w in enumerate(self.weights) if w is not None]

        def loss_of(w_vals, eps, other_vals, x, y):
            mapping = [(v, val) for v, val in zip(variables, other_vals) if id(v) not in tracked_ids]
            mapping += [(self.weights[i], wv) for i, wv in zip(w_positions, w_vals)]

            def inject(i, a):
                return a + ops.cast(eps[i], a.dtype)

            with keras.StatelessScope(state_mapping=mapping):
                y_pred, acts = self._forward(x, inject)
            return self._loss(y, y_pred), acts

        def run(w_vals, eps, other_vals, x, y):
            (loss, acts), (w_grads_list, act_grads) = jax.value_and_grad(
                loss_of, argnums=(0, 1), has_aux=True)(w_vals, eps, other_vals, x, y)
            w_values = [None] * len(self.layers)
            w_grads = [None] * len(self.layers)
            for i, wv, gw in zip(w_positions, w_vals, w_grads_list):
                w_values[i] = wv
                w_grads[i] = gw
            return self._collect(acts, act_grads, w_values, w_grads)

        jitted = jax.jit(run)
        eps_cache = {}

        def call(x, y):
            other_vals = [v.value for v in variables]
            w_vals = [self.weights[i].value for i in w_positions]
            key = tuple(np.shape(t) for t in jax.tree_util.tree_leaves(x))
            if key not in eps_cache:
                def shapes(w_vals, other_vals, x):
                    def inject(i, a):
                        return a
                    mapping = list(zip(variables, other_vals))
                    with keras.StatelessScope(state_mapping=mapping):
                        _, acts = self._forward(x, inject)
                    return acts
                specs = jax.eval_shape(shapes, w_vals, other_vals, x)
                eps_cache[key] = [jnp.zeros(s.shape, "float32") for s in specs]
            out = jitted(w_vals, eps_cache[key], other_vals, x, y)
            return jax.tree_util.tree_map(np.asarray, out)

        return call

    def __call__(self, x, y):
        return self._fn(x, y)


def finite_or_none(value):
    """float(value), or None for NaN/Inf/None (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
