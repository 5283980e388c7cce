"""Layer-sequential unit-variance initialization (LSUV; Mishkin & Matas 2015).

Re-exported as `keras_varinit.initializers.lsuv` and `keras_varinit.lsuv`.
"""
import math
import numbers

import keras
import numpy as np

try:  # where Keras 3 keeps a tensor's mask (an attribute, or a side table for JAX arrays)
    from keras.src.backend.common.masking import get_keras_mask as _keras_mask
except ImportError:  # elsewhere in another Keras: always call the layer (correct, slower)
    _keras_mask = None

WEIGHT_LAYERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
                 keras.layers.Conv3D)
REPORT_COLUMNS = ("layer", "index", "iterations", "initial_variance", "final_variance",
                  "converged")


def _check_number(name, value, *, minimum, integer=False, strict=True):
    ok_type = numbers.Integral if integer else numbers.Real
    bad = isinstance(value, bool) or not isinstance(value, ok_type) or \
        not math.isfinite(value) or (value <= minimum if strict else value < minimum)
    if bad:
        kind = "an integer" if integer else "a finite number"
        relation = ">" if strict else ">="
        raise ValueError(f"`{name}` must be {kind} {relation} {minimum}. "
                         f"Received: {name}={value!r}")


def _check_batch(x, n_inputs):
    """numpy arrays, one per model input; rejects empty batches and non-finite values."""
    if isinstance(x, dict):
        raise ValueError("lsuv takes a batch as an array (or a list of arrays, one per model "
                         f"input), not a dict. Received: x of type {type(x).__name__}")
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(items) != n_inputs:
        raise ValueError(f"The model has {n_inputs} input(s) but the batch has {len(items)}. "
                         f"Received: x of type {type(x).__name__}")
    arrays = []
    for item in items:
        if item is None:
            raise ValueError("lsuv needs a batch of data. Received: x=None")
        try:
            arr = np.asarray(keras.ops.convert_to_numpy(item))
        except Exception as err:  # noqa: BLE001 -- say what was received
            raise ValueError(f"lsuv needs a numeric array batch. Received: x of type "
                             f"{type(item).__name__}") from err
        if arr.ndim == 0 or arr.shape[0] == 0 or arr.size == 0:
            raise ValueError(f"lsuv needs a non-empty batch. Received: x with shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"lsuv needs a numeric batch. Received: x with dtype {arr.dtype}")
        if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise ValueError(f"lsuv needs a finite batch. Received: x with {bad} NaN/Inf "
                                 f"value(s) (shape {arr.shape})")
        arrays.append(arr)
    return arrays


def _weight_layers(model):
    found = []
    for index, layer in enumerate(model.layers):
        if isinstance(layer, keras.Model) and layer.weights:
            raise ValueError("lsuv handles the Dense/Conv layers of a flat Sequential or "
                             "Functional model; nested models are not supported. Received: "
                             f"nested model {layer.name!r}")
        if isinstance(layer, WEIGHT_LAYERS):
            found.append((index, layer))
    return found


def _preactivation(layer, inputs):
    """The layer's output before its fused activation (the activation is switched off)."""
    activation = layer.activation
    try:
        layer.activation = None
        return layer(inputs)
    finally:
        layer.activation = activation


def _variance(tensor):
    """Variance over all elements, reduced by the backend in float32 (a float64 numpy copy of a
    (256, 32, 32, 16) activation costs more than the convolution that made it)."""
    return float(keras.ops.convert_to_numpy(keras.ops.var(keras.ops.cast(tensor, "float32"))))


def lsuv(model, x, target_variance=1.0, tol=0.02, max_iter=10, verbose=0, *,
         orthonormal=True, seed=None):
    """Layer-sequential unit-variance initialization (Mishkin & Matas 2015).

    For each Dense / Conv1D / Conv2D / Conv3D layer of a built Sequential or Functional model, in
    model order:

    1. orthonormal start: the kernel, flattened to `(prod(shape[:-1]), shape[-1])`, is set to an
       orthonormal matrix (`keras.initializers.Orthogonal`);
    2. measure `v`, the variance (over all elements) of the layer's pre-activation output on the
       batch `x` -- if the layer has a fused activation (`Dense(64, activation="relu")`), it is
       switched off for the measurement, so `v` is the variance of `W f + b`;
    3. while `|v - target| > tol * target` and fewer than `max_iter` rescalings were made:
       `W <- W / sqrt(v / target)`, re-measure.

    Earlier layers are final before a layer is processed, so each layer sees the signal that the
    rescaled network really produces. Biases are left as they are (zero at a usual init). A layer
    whose pre-activation variance is 0 (dead input) cannot be rescaled and is reported as not
    converged.

    Args:
        model: a built `keras.Model` (Sequential or Functional, not nested) with at least one
            Dense or Conv layer. Its kernels are changed in place.
        x: a batch of inputs (array or tensor; a list of them for a multi-input model), e.g. 256
            training examples.
        target_variance: the pre-activation variance to reach (default 1).
        tol: relative tolerance: stop when `|v - target| <= tol * target`.
        max_iter: the most rescalings per layer.
        verbose: 0 silent, 1 one line per layer.
        orthonormal: start from an orthonormal kernel (the paper's step 1); False rescales the
            current kernel.
        seed: int, None or `keras.random.SeedGenerator` for the orthonormal start.

    Returns:
        pandas DataFrame, one row per processed layer: `layer` (name), `index` (position in
        `model.layers`), `iterations` (rescalings made), `initial_variance` (after the
        orthonormal start, before rescaling), `final_variance`, `converged` (bool).

    Example:

    >>> model = kv.models.plain_mlp(10, activation="tanh")
    >>> report = kv.lsuv(model, x_train[:256])
    >>> report[["layer", "final_variance", "converged"]]

    Reference: D. Mishkin and J. Matas, "All you need is a good init", ICLR 2016
    (arXiv:1511.06422, 2015).
    """
    import pandas as pd

    if not isinstance(model, keras.Model):
        raise ValueError(f"lsuv needs a keras.Model. Received: model of type "
                         f"{type(model).__name__}")
    try:
        model_inputs = model.inputs
    except (AttributeError, ValueError):
        model_inputs = None
    if not model.built or not model_inputs:
        raise ValueError("lsuv needs a built model with known inputs (create it with "
                         "keras.Input, or call model.build(input_shape)). Received: unbuilt "
                         f"model {model.name!r}")
    _check_number("target_variance", target_variance, minimum=0)
    _check_number("tol", tol, minimum=0)
    _check_number("max_iter", max_iter, minimum=1, integer=True, strict=False)
    layers = _weight_layers(model)
    if not layers:
        names = [f"{layer.name} ({type(layer).__name__})" for layer in model.layers]
        raise ValueError("lsuv found no Dense or Conv1D/2D/3D layer to initialize. Received: "
                         f"model {model.name!r} with layers {names}")
    arrays = _check_batch(x, len(model_inputs))
    orthogonal = keras.initializers.Orthogonal(seed=seed) if orthonormal else None
    target = float(target_variance)

    for _, layer in layers:
        try:
            layer_input = layer.input
        except (AttributeError, ValueError) as err:
            raise ValueError(f"lsuv needs each weight layer to be called once in the model. "
                             f"Received: layer {layer.name!r} with several call sites") from err
        if isinstance(layer_input, (list, tuple)):
            raise ValueError(f"lsuv expects single-input weight layers. Received: layer "
                             f"{layer.name!r} with {len(layer_input)} inputs")

    index_of = {id(layer): index for index, layer in layers}
    rows = []

    def calibrate(layer, feed):
        kernel = layer.kernel
        if orthogonal is not None:
            kernel.assign(orthogonal(tuple(kernel.shape), dtype=kernel.dtype))
        pre = _preactivation(layer, feed)
        var = _variance(pre)
        initial, iterations = var, 0
        while math.isfinite(var) and var > 0 and abs(var - target) > tol * target \
                and iterations < max_iter:
            kernel.assign(kernel * keras.ops.cast(math.sqrt(target / var), kernel.dtype))
            iterations += 1
            pre = _preactivation(layer, feed)
            var = _variance(pre)
        converged = bool(math.isfinite(var) and abs(var - target) <= tol * target)
        rows.append({"layer": layer.name, "index": index_of[id(layer)],
                     "iterations": iterations, "initial_variance": initial,
                     "final_variance": var, "converged": converged})
        if verbose:
            print(f"lsuv {layer.name:>20}: variance {initial:.4g} -> {var:.4g} in {iterations} "
                  f"step(s){'' if converged else '  (NOT converged)'}")
        return pre

    _forward_calibrating(model, arrays, index_of, calibrate)
    rows.sort(key=lambda row: row["index"])  # graph order may interleave parallel branches
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))


def _forward_calibrating(model, arrays, weight_ids, calibrate):
    """One inference-mode forward pass of `model` on `arrays`, layer by layer in graph order
    (Sequential: its layers; Functional: the node walk `Functional.call` uses), calling
    `calibrate(layer, inputs)` on each weight layer in place of its call (it returns the final
    pre-activation; the layer's own activation is applied to it). Every
    layer runs once on inputs that already come from final earlier layers: O(depth), where
    re-running the model up to each weight layer would be O(depth^2)."""

    def call(op, *args, **kwargs):
        if not isinstance(op, keras.layers.Layer):
            return op(*args, **kwargs)
        if getattr(op, "_call_has_training_arg", False):
            kwargs["training"] = False
        if id(op) in weight_ids:
            pre = calibrate(op, args[0])
            if _keras_mask is not None and _keras_mask(args[0]) is None:
                # its output from the last measurement: no second pass
                return op.activation(pre) if op.activation is not None else pre
        return op(*args, **kwargs)  # a masked input: the layer call propagates the mask

    if isinstance(model, keras.Sequential):
        out = arrays[0]
        for layer in model.layers:
            if not isinstance(layer, keras.layers.InputLayer):
                out = call(layer, out)
    else:
        model._run_through_graph(arrays, operation_fn=lambda op: op, call_fn=call)
