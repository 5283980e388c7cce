"""Layer-sequential unit-variance initialization (LSUV; Mishkin & Matas 2015).

Re-exported as `keras_varinit.initializers.lsuv` and `keras_varinit.lsuv`. Works on any Keras
model: the weight layers are reached through `keras_varinit.instrument` (one forward pass in
which each weight layer is calibrated where the model calls it).
"""
import enum
import math
import numbers
import warnings

import keras

from keras_varinit import batch_checks, instrument

REPORT_COLUMNS = ("layer", "index", "iterations", "initial_variance", "final_variance",
                  "converged", "status")


class Status(str, enum.Enum):
    """How the calibration of one layer ended (the report's `status` column)."""

    CONVERGED = "converged"          # |v - target| <= tol * target
    MAX_ITER = "max_iter"            # rescaled max_iter times, still outside the tolerance
    ZERO_VARIANCE = "zero_variance"  # output variance 0 (dead input): not calibrated
    NON_FINITE = "non_finite"        # output variance NaN/Inf: not calibrated
    FROZEN = "frozen"                # trainable=False (e.g. a pretrained backbone): left as is


def _check_number(name, value, *, minimum, integer=False, strict=True):
    ok_type = numbers.Integral if integer else numbers.Real
    bad = isinstance(value, bool) or not isinstance(value, ok_type) or \
        not math.isfinite(value) or (value <= minimum if strict else value < minimum)
    if bad:
        kind = "an integer" if integer else "a finite number"
        relation = ">" if strict else ">="
        raise ValueError(f"`{name}` must be {kind} {relation} {minimum}. "
                         f"Received: {name}={value!r}")


def scaled_kernel(layer):
    """The kernel LSUV rescales: `pointwise_kernel` of a separable convolution (the last
    linear map), `depthwise_kernel` of a depthwise one, else `kernel`."""
    for name in ("pointwise_kernel", "depthwise_kernel", "kernel"):
        variable = getattr(layer, name, None)
        if isinstance(variable, keras.Variable):
            return variable
    raise ValueError(f"Layer {layer.name!r} has no kernel to rescale.")


def _variance(tensor):
    """Variance over all elements, reduced by the backend in float32 (a float64 numpy copy of a
    (256, 32, 32, 16) activation costs more than the convolution that made it)."""
    return float(keras.ops.convert_to_numpy(keras.ops.var(keras.ops.cast(tensor, "float32"))))


def _status(var, target, tol):
    if not math.isfinite(var):
        return Status.NON_FINITE
    if var == 0:
        return Status.ZERO_VARIANCE
    return Status.CONVERGED if abs(var - target) <= tol * target else Status.MAX_ITER

def lsuv(model, x, target_variance=1.0, tol=0.02, max_iter=10, verbose=0, *,
         orthonormal=True, seed=None):
    """Layer-sequential unit-variance initialization (Mishkin & Matas 2015).

    For each weight layer of a built model (Dense, EinsumDense, Conv*, Conv*Transpose,
    DepthwiseConv*, SeparableConv*; any model: Sequential, Functional, nested, subclassed), in
    the order the model calls them:

    1. orthonormal start: the kernel, flattened to `(prod(shape[:-1]), shape[-1])`, is set to an
       orthonormal matrix (`keras.initializers.Orthogonal`);
    2. measure `v`, the variance (over all elements) of the layer's pre-activation output on the
       batch `x` -- if the layer has a fused activation (`Dense(64, activation="relu")`), it is
       split off for the measurement, so `v` is the variance of `W f + b`;
    3. while `|v - target| > tol * target` and fewer than `max_iter` rescalings were made:
       `W <- W / sqrt(v / target)`, re-measure.

    The model runs once, in inference mode; each weight layer is calibrated where the model
    first calls it, so it sees the signal the already rescaled earlier layers produce, and
    every other layer runs once (O(depth)). Biases are left as they are (zero at a usual init).
    The kernel rescaled is `scaled_kernel(layer)` (a separable convolution's pointwise one).

    A layer whose output variance is 0 (an all-zero batch, a dead input) or not finite cannot
    be rescaled: it keeps its (orthonormal) start, its report row says `status`
    "zero_variance" / "non_finite" and `converged` False, and a warning names the first such
    layer. A layer with `trainable=False` (a frozen, e.g. pretrained, backbone) is left as it
    is: its row says "frozen" (its measured variance, `converged` False), and a warning
    counts them; the layers after it are calibrated on the signal it passes on.

    Args:
        model: a built `keras.Model` with at least one weight layer. Its kernels are changed in
            place.
        x: a batch of inputs (array or tensor; a list of them for a multi-input model), e.g. 256
            training examples; finite values only.
        target_variance: the pre-activation variance to reach (default 1).
        tol: relative tolerance: stop when `|v - target| <= tol * target`.
        max_iter: the most rescalings per layer.
        verbose: 0 silent, 1 one line per layer.
        orthonormal: start from an orthonormal kernel (the paper's step 1); False rescales the
            current kernel.
        seed: int, None or `keras.random.SeedGenerator` for the orthonormal start.

    Returns:
        pandas DataFrame, one row per weight layer: `layer` (its path), `index` (position in
        the model's layer tree, `instrument.layer_sites`; for a flat model its position in
        `model.layers`, input layer left out), `iterations` (rescalings made),
        `initial_variance` (after the orthonormal start, before rescaling), `final_variance`,
        `converged` (bool), `status` (`Status` value: "converged", "max_iter",
        "zero_variance", "non_finite", "frozen").

    Example:

    >>> model = kv.models.plain_mlp(10, activation="tanh")
    >>> report = kv.lsuv(model, x_train[:256])
    >>> report[["layer", "final_variance", "converged"]]

    Reference: D. Mishkin and J. Matas, "All you need is a good init", ICLR 2016
    (arXiv:1511.06422, 2015).
    """
    import pandas as pd

    arrays = _checked_arguments(model, x, target_variance, tol, max_iter, verbose)
    sites = instrument.weight_sites(model, "lsuv")
    instrument.check_interceptable(sites, model)   # quantized layers
    orthogonal = keras.initializers.Orthogonal(seed=seed) if orthonormal else None
    starts = {id(kernel): _start(kernel, orthogonal) for kernel, frozen in
              ((scaled_kernel(site.layer), _is_frozen(site.layer)) for site in sites)
              if not frozen}
    calibrate = _Calibration(starts, float(target_variance), tol, max_iter, verbose)
    with instrument.intercept(sites, calibrate):
        model(arrays if len(arrays) > 1 else arrays[0], training=False)
    rows = sorted(calibrate.rows, key=lambda row: row["index"])
    _warn_uncalibrated(rows)
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))


def _checked_arguments(model, x, target_variance, tol, max_iter, verbose):
    """Refuse what `lsuv` cannot work with; the batch `x` as a list of arrays."""
    instrument.check_model(model, "lsuv")
    if not model.built:
        raise ValueError("lsuv needs a built model (create it with keras.Input, call it once "
                         "on a batch, or call model.build(input_shape)). Received: unbuilt "
                         f"{instrument.describe_model(model)}")
    _check_number("target_variance", target_variance, minimum=0)
    _check_number("tol", tol, minimum=0)
    _check_number("max_iter", max_iter, minimum=1, integer=True, strict=False)
    if verbose not in (0, 1) or isinstance(verbose, float):
        raise ValueError(f"`verbose` must be 0 or 1. Received: verbose={verbose!r}")
    inputs = getattr(model, "inputs", None)
    arrays = batch_checks.as_arrays(x, "lsuv", n_inputs=len(inputs) if inputs else None)
    batch_checks.check_examples(arrays, "lsuv")
    batch_checks.check_finite(arrays, "lsuv")
    return arrays


def _warn_uncalibrated(rows):
    """One warning for the layers whose variance could not be measured, one for the frozen."""
    dead = [row for row in rows if row["status"] in (Status.ZERO_VARIANCE.value,
                                                     Status.NON_FINITE.value)]
    if dead:
        first = min(dead, key=lambda row: row["order"])
        warnings.warn(
            f"lsuv could not calibrate {len(dead)} layer(s): the first, {first['layer']!r}, "
            f"has output variance {first['final_variance']!r} on this batch (an all-zero "
            "batch or a dead input gives 0), so its kernel cannot be rescaled; the report "
            "marks it (and any other) with status "
            f"{first['status']!r}, converged False.", UserWarning, stacklevel=3)
    frozen = [row["layer"] for row in rows if row["status"] == Status.FROZEN.value]
    if frozen:
        warnings.warn(
            f"lsuv leaves {len(frozen)} layer(s) with trainable=False as they are (the first: "
            f"{frozen[0]!r}); the report marks them with status 'frozen'. Set "
            "`layer.trainable = True` before lsuv to calibrate them.", UserWarning, stacklevel=3)


def _is_frozen(layer):
    """True for a layer LSUV must not change: `trainable=False` (e.g. a pretrained backbone),
    or its rescaled kernel is not trainable."""
    return not layer.trainable or not scaled_kernel(layer).trainable


def _start(kernel, orthogonal):
    """The kernel LSUV starts from, as a numpy array read before the forward pass: an
    orthonormal draw, or the kernel's value. Under a mixed-precision policy a layer's call
    reads its variables cast to the compute dtype (float16): rescaling this float32 copy
    instead keeps the variables' full precision (and QR runs in float32 or wider)."""
    if orthogonal is None:
        return keras.ops.convert_to_numpy(kernel)
    dtype = "float64" if kernel.dtype == "float64" else "float32"   # read outside autocast
    return keras.ops.convert_to_numpy(orthogonal(tuple(kernel.shape), dtype=dtype))


class _Calibration:
    """The `intercept` hook: calibrates a weight layer at its first call, returns its output.
    The kernel is set to `start * scale` (`starts`: `_start` per kernel id)."""

    def __init__(self, starts, target, tol, max_iter, verbose):
        self.starts, self.target, self.tol = starts, target, tol
        self.max_iter, self.verbose = max_iter, verbose
        self.rows = []

    def __call__(self, call):
        if call.index > 1:  # a shared layer is calibrated once, at its first call
            return call.run()
        kernel = scaled_kernel(call.site.layer)
        if id(kernel) in self.starts:
            pre, activation, initial, var, iterations = self._calibrate(call, kernel)
            status = _status(var, self.target, self.tol)
        else:  # frozen: measured, left as it is
            pre, activation = call.run_split()
            initial = var = _variance(pre)
            iterations, status = 0, Status.FROZEN
        self._report(call, iterations, initial, var, status)
        return activation(pre) if activation is not None else pre

    def _calibrate(self, call, kernel):
        """Set the kernel to `start * scale`, rescaling until the variance is on target."""
        start, scale = self.starts[id(kernel)], 1.0
        kernel.assign(start)
        pre, activation = call.run_split()
        var = initial = _variance(pre)
        iterations, target = 0, self.target
        while math.isfinite(var) and var > 0 and abs(var - target) > self.tol * target \
                and iterations < self.max_iter:
            scale *= math.sqrt(target / var)
            kernel.assign(start * scale)
            iterations += 1
            pre, activation = call.run_split()
            var = _variance(pre)
        return pre, activation, initial, var, iterations

    def _report(self, call, iterations, initial, var, status):
        self.rows.append({"layer": call.site.path, "index": call.site.position,
                          "order": len(self.rows), "iterations": iterations,
                          "initial_variance": initial, "final_variance": var,
                          "converged": status is Status.CONVERGED, "status": status.value})
        if self.verbose:
            note = "" if status is Status.CONVERGED else f"  ({status.value})"
            print(f"lsuv {call.site.path:>20}: variance {initial:.4g} -> {var:.4g} in "
                  f"{iterations} step(s){note}")
