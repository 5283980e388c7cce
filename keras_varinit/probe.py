"""The compiled probe behind `LayerStatsLogger`: one forward and backward pass of a fixed batch.

`LayerProbe(model, sites, loss_fn)` records, on any Keras model (through
`keras_varinit.instrument.Recorder`), per call of each tracked layer, the statistics of the
layer statistics record (CONTRIBUTING.md) that can be computed in the compiled pass:

    activation_mean, activation_std, zero_fraction, saturated_fraction,
    activation_grad_std, weight_std, weight_grad_std, nan_count, inf_count

(all scalars come back in one device-to-host transfer), plus, on request, the raw activations
and activation gradients (for histograms). a^l is the layer's output (after its own
activation); dL/da^l and dL/dW^l come from the same backward pass, without touching the
model's `train_step` or optimizer. On TensorFlow, tracing the probe as a `tf.function`
(without AutoGraph) pays for itself after about `COMPILE_AFTER` logs, so the probe runs
eagerly unless the fit plans that many (`eager_calls_for`); JAX compiles with `jax.jit`. The
NaN/Inf counts cost four more passes over every tensor, so the compiled pass leaves them out
(0); a pass whose statistics are not all finite is run again, eagerly, with them. Nothing the
probe does (batch norm moving statistics with `training=True`, seed generator state) changes
the model.
"""
import math

import keras
from keras import ops

from keras_varinit import instrument

STAT_NAMES = (
    "activation_mean", "activation_std", "zero_fraction", "saturated_fraction",
    "activation_grad_std", "weight_std", "weight_grad_std", "nan_count", "inf_count",
)

# Saturation thresholds (tanh: |a| > 0.97; sigmoid: a outside [0.03, 0.97]).
TANH_SATURATION = 0.97
SIGMOID_LOW, SIGMOID_HIGH = 0.03, 0.97

_SAT_NONE, _SAT_TANH, _SAT_SIGMOID = 0, 1, 2

# All finite exactly when every entry of the tensors they summarize is (a NaN or Inf entry
# makes the mean, and so the centred standard deviation, non-finite). weight_std is NaN by
# design on layers without a tracked weight.
_ACTIVATION_STATS = ("activation_mean", "activation_std", "activation_grad_std")
_WEIGHT_STATS = ("weight_std", "weight_grad_std")

# TensorFlow: the compiled probe's one-off cost (trace and first run, less one log) pays for
# itself after about this many logs (22-layer plain CNN, 2 CPU cores, batch 128: 0.67 s once,
# against 0.28 - 0.12 = 0.16 s saved per compiled log; benchmarks/RESULTS.md).
COMPILE_AFTER = 4


def eager_calls_for(planned_logs):
    """Probes run eagerly before the `tf.function` is traced: none when the fit plans at least
    `COMPILE_AFTER` logs (the trace pays for itself), else `COMPILE_AFTER` (a fit of unknown
    length, or one longer than planned, compiles once its eager probes have cost about what a
    trace costs: the ski-rental rule, never worse than twice the better choice)."""
    if planned_logs is not None and planned_logs >= COMPILE_AFTER:
        return 0
    return COMPILE_AFTER


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


def _mean_std(t):
    """Mean and standard deviation of all entries, centred two-pass (`ops.moments`: one
    reduction for the mean, one fused squared difference for the variance)."""
    mean, variance = ops.moments(t, axes=list(range(len(t.shape))))
    return mean, ops.sqrt(variance)


def _count(mask):
    """The number of True entries of a boolean tensor: a sum of int32 ones (int64 past 2^31 - 1
    entries), exact where a float32 sum would round past 2^24 entries."""
    large = None not in mask.shape and math.prod(mask.shape) >= 2 ** 31
    return ops.sum(ops.cast(mask, "int64" if large else "int32"))


def _fraction(mask):
    """The fraction of True entries of a boolean tensor (`_count` / its size)."""
    return ops.cast(_count(mask), "float32") / ops.cast(ops.size(mask), "float32")


def _non_finite_counts(tensors):
    nan = sum(ops.cast(_count(ops.isnan(t)), "float32") for t in tensors)
    inf = sum(ops.cast(_count(ops.isinf(t)), "float32") for t in tensors)
    return nan, inf


def _layer_stats(a, g, w, gw, sat_mode, count_non_finite=False):
    """In-graph statistics of one layer call, in `STAT_NAMES` order (keras.ops, any backend).

    The NaN/Inf counts are computed only with `count_non_finite` (else 0): `LayerProbe` asks
    for them in a second pass, only when a statistic came out non-finite (finite means and
    standard deviations mean that every entry is finite), so a healthy network pays nothing.
    """
    f32 = "float32"
    a, g = ops.cast(a, f32), ops.cast(g, f32)
    mean, std = _mean_std(a)
    zero = _fraction(ops.equal(a, 0.0))
    if sat_mode == _SAT_TANH:
        sat = _fraction(ops.greater(ops.abs(a), TANH_SATURATION))
    elif sat_mode == _SAT_SIGMOID:
        sat = _fraction(ops.logical_or(ops.less(a, SIGMOID_LOW), ops.greater(a, SIGMOID_HIGH)))
    else:
        sat = ops.zeros((), f32)
    _, gstd = _mean_std(g)
    tensors = [a, g]
    if w is not None:
        w, gw = ops.cast(w, f32), ops.cast(gw, f32)
        wstd, gwstd = _mean_std(w)[1], _mean_std(gw)[1]
        tensors += [w, gw]
    else:
        wstd = gwstd = ops.full((), float("nan"), f32)
    if count_non_finite:
        nan, inf = _non_finite_counts(tensors)
    else:
        nan = inf = ops.zeros((), f32)
    return [mean, std, zero, sat, gstd, wstd, gwstd, nan, inf]


class LayerProbe:
    """Compiled forward + backward pass of a fixed batch, statistics per tracked layer call.

    Args:
        model: a built Keras model (any kind).
        sites: the `instrument.LayerSite`s to track (each call must return one tensor).
        loss_fn: `loss_fn(y_true, y_pred) -> scalar or per-sample loss` (mean is taken).
        training: the `training` flag of the probe's forward pass (default False: inference
            mode, deterministic; batch norm uses its moving statistics).
        return_tensors: also return raw activations and activation gradients (histograms).
        eager_calls: TensorFlow: probes run eagerly before it is compiled (`eager_calls_for`).

    `probe(x, y) -> instrument.Recording`: per call a record whose `stats` hold `STAT_NAMES`
    (and `activation`, `activation_grad` arrays with `return_tensors`).
    """

    def __init__(self, model, sites, loss_fn, training=False, return_tensors=False,
                 eager_calls=COMPILE_AFTER):
        self.return_tensors = return_tensors
        self._recorder_args = dict(model=model, sites=sites, loss=loss_fn, training=training,
                                   weight_of=tracked_weight)
        self.recorder = instrument.Recorder(statistics=self._statistics,
                                            eager_calls=eager_calls, **self._recorder_args)
        self._counting_recorder = None   # built when first needed (a diverged network)

    def _statistics(self, view, count_non_finite=False):
        values = _layer_stats(view.activated, view.output_grad, view.weight, view.weight_grad,
                              saturation_mode(view.site.layer), count_non_finite)
        stats = dict(zip(STAT_NAMES, values))
        if self.return_tensors:
            stats["activation"] = view.activated
            stats["activation_grad"] = view.output_grad
        return stats

    def _counting_statistics(self, view):
        return self._statistics(view, count_non_finite=True)

    def __call__(self, x, y):
        """The statistics of one pass; a pass whose statistics are not all finite is run again
        (eagerly) with the NaN/Inf counts of every tracked tensor."""
        recording = self.recorder(x, y)
        if all(_all_finite(record) for record in recording.records):
            return recording
        if self._counting_recorder is None:   # always eager: rarely needed, it earns no trace
            self._counting_recorder = instrument.Recorder(
                statistics=self._counting_statistics, eager_calls=None, **self._recorder_args)
        return self._counting_recorder(x, y)


def _all_finite(record):
    names = _ACTIVATION_STATS + (_WEIGHT_STATS if tracked_weight(record.layer) is not None
                                 else ())
    return all(math.isfinite(record.stats[name]) for name in names)


def finite_or_none(value):
    """float(value), or None for NaN/Inf/None (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
