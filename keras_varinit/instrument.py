"""The one place where keras_varinit intercepts a model's layers (public Keras API only).

The variance profile (`diagnostics`), the callback's probe (`probe`) and `lsuv` reach inside a
model only through this module, so they work on every kind of Keras 3 model: Sequential,
Functional, models nested to any depth (a backbone inside a Functional model), subclassed
`keras.Model`s with layers as attributes, and layers called several times in one forward pass.

How. For the duration of a `with intercept(sites, hook):` block, each selected layer's `call`
is replaced by a wrapper (an instance attribute, as Keras itself does for `build`), so every
call of the layer -- from a Sequential, a Functional graph or a hand-written `call()` --
goes through `hook(LayerCall)`; on exit, also after an exception, the class's `call` is back
and nothing else about the model has changed. No graph walk, no private Keras API.

`Recorder` builds on it: one forward and one backward pass of a batch, compiled
(`tf.function` after a few eager calls on TensorFlow, `jax.jit` on JAX), that records, per
call of each selected layer, its output a^l and dL/da^l. The gradient with respect to an
intermediate output is obtained without touching the model: TensorFlow watches a^l on a
`GradientTape`; JAX adds a zero tensor e^l to it and differentiates with respect to e^l
(dL/de^l = dL/da^l). Weight layers with a fused activation (`Dense(64, activation="relu")`)
can be split: the recorded tensor is then the pre-activation W x + b, and the activation is
applied after it. The pass runs inside a `keras.StatelessScope`, so batch-normalization moving
statistics and seed generators are left untouched. Statistics are reduced in the compiled
function (`statistics(CallTensors) -> {name: tensor}`), and only they come back to the host.
Each record says whether it continues the previous record's path (`follows_previous`): the
leaf layers a recorder does not record are intercepted too, only to follow the path through
them, so the answer does not depend on which layers are recorded.

Mixed precision (a float16 compute dtype): the backward pass scales the loss as training does
(`loss_scale`: the model's `LossScaleOptimizer` scale, else its initial 2^15) and divides the
gradients by it in float32, so the recorded gradients are the ones training computes. Unscaled,
the small activation gradients of a vanishing network (1e-9 and less) underflow float16 to 0.

Naming: a layer is named by its path from the model, its ancestors' names joined with "/"
(`backbone/conv2_block1_1_conv`; a flat model's layers keep their own names). A layer called
k > 1 times in one forward pass gets one record per call, `path#1` ... `path#k`, in call order.

Supported and not:

* weight layers (`is_weight_layer`): every layer that owns a `kernel` or `depthwise_kernel`
  variable: Dense, EinsumDense, Conv1D/2D/3D, Conv1D/2D/3DTranspose, DepthwiseConv1D/2D,
  SeparableConv1D/2D, and custom layers with a `kernel`;
* layers inside a recurrent layer (`keras.layers.RNN`: LSTM, GRU, SimpleRNN, their cells)
  run inside the RNN's loop, where no per-step tensor can be recorded: selecting one raises
  `UnsupportedLayerError` (record the RNN layer's own output instead); `weight_sites` and
  the logger's default selection leave them out with a warning (`outside_loops`). Quantized
  layers (`layer.quantize(...)`) bypass `call` and are refused.

* custom layers that hold their weight matrix under another name (`self.w`) are not weight
  layers: `weight_sites` and the logger's default selection name them in a warning
  (`warn_kernel_less`; both warnings are `CoverageWarning`s).

Public names: `LayerSite`, `layer_sites`, `weight_sites`, `outside_loops`,
`kernel_less_weight_layers`, `warn_kernel_less`, `coverage_notes`, `is_weight_layer`,
`final_layer`, `check_interceptable`, `loss_scale`, `computes_float16`, `fused_activation`,
`LayerCall`, `intercept`,
`CallTensors`, `CallRecord`, `Recording`, `Recorder`, `get_loss`, `default_loss`,
`describe_model`, `CoverageWarning`, `UnsupportedLayerError`, `MultiOutputError`,
`NoWeightLayerError`.

>>> sites = [s for s in layer_sites(model) if s.is_leaf]
>>> recorder = Recorder(model, sites, lambda v: {"var": keras.ops.var(v.output)},
...                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
>>> [(r.name, float(r.stats["var"])) for r in recorder(x, y).records]
"""
import contextlib
import dataclasses
import functools
import warnings

import keras
import numpy as np
from keras import ops

#: Keras layers whose fused `activation` can be split off (their `call` applies
#: `self.activation` last, when it is not None).
SPLITTABLE_LAYERS = (
    keras.layers.Dense, keras.layers.EinsumDense,
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
)
#: Variables that make a layer a weight layer.
KERNEL_ATTRIBUTES = ("kernel", "depthwise_kernel")
#: Layers whose sublayers run inside a loop (one call per time step, not recordable).
LOOP_LAYERS = (keras.layers.RNN,)
#: The loss scale of a float16 model without a `LossScaleOptimizer` (where that one starts).
DEFAULT_LOSS_SCALE = 2.0 ** 15


class UnsupportedLayerError(ValueError):
    """A selected layer cannot be intercepted (inside an RNN loop, quantized)."""


class CoverageWarning(UserWarning):
    """Layers the diagnostics leave out: inside a recurrent layer's loop, or custom layers
    with a weight matrix not called `kernel` (a typed category, for callers that show it)."""


class MultiOutputError(ValueError):
    """The default loss was asked to score a model with several outputs."""


class NoWeightLayerError(ValueError):
    """The model has no layer with a kernel."""


# --------------------------------------------------------------------------------------------
# the layer tree

@dataclasses.dataclass(frozen=True, eq=False)
class LayerSite:
    """A layer of a model and its path (`backbone/conv1`).

    `position`: index in `layer_sites` order (pre-order, input layers left out); `is_leaf`:
    no sublayers; `in_loop`: inside a recurrent layer's step loop.
    """

    path: str
    layer: keras.layers.Layer
    position: int
    is_leaf: bool
    in_loop: bool = False


def _children(layer):
    """Direct sublayers: `model.layers` for models, else the layers held in attributes."""
    if isinstance(layer, keras.Model):
        found = list(layer.layers)
    else:
        found = []
        for value in vars(layer).values():
            if isinstance(value, keras.layers.Layer):
                found.append(value)
            elif isinstance(value, (list, tuple)):
                found.extend(v for v in value if isinstance(v, keras.layers.Layer))
            elif isinstance(value, dict):
                found.extend(v for v in value.values() if isinstance(v, keras.layers.Layer))
    return [child for child in found if not isinstance(child, keras.layers.InputLayer)]


def layer_sites(model):
    """Every layer of `model`'s tree, pre-order, each once (the first path that reaches it).

    Two different layers with the same path get `~2`, `~3` appended to the later ones.
    """
    sites, seen, paths = [], {id(model)}, set()

    def visit(layer, prefix, in_loop):
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path, k = prefix + child.name, 1
            while path in paths:
                k += 1
                path = f"{prefix}{child.name}~{k}"
            paths.add(path)
            grandchildren = _children(child)
            sites.append(LayerSite(path, child, len(sites), not grandchildren, in_loop))
            visit(child, path + "/", in_loop or isinstance(child, LOOP_LAYERS))

    visit(model, "", False)
    return sites


def _own_variable(layer, name):
    try:
        value = getattr(layer, name, None)
    except Exception:  # noqa: BLE001 -- e.g. a property of a quantized layer that raises
        return None
    return value if isinstance(value, keras.Variable) else None


def is_weight_layer(layer):
    """True for a layer that owns a `kernel` or `depthwise_kernel` variable."""
    return any(_own_variable(layer, name) is not None for name in KERNEL_ATTRIBUTES)


def check_model(model, caller):
    """Raise ValueError unless `model` is a `keras.Model` (a file path is a common mistake)."""
    if not isinstance(model, keras.Model):
        shown = f" {model!r}" if isinstance(model, str) else ""
        raise ValueError(
            f"{caller} needs a keras.Model. Received: model of type {type(model).__name__}"
            f"{shown}. Allowed: a built keras.Model (a saved file: keras.models.load_model(path) "
            "first).")


def describe_model(model):
    """`model 'name' (Class)`, as error messages name a model."""
    return f"model {getattr(model, 'name', model)!r} ({type(model).__name__})"


def weight_sites(model, caller="this function"):
    """The sites of `model`'s weight layers that can be recorded: those inside a recurrent
    layer's loop are left out with a warning (`outside_loops`). Raises `NoWeightLayerError`
    (no weight layer) or `UnsupportedLayerError` (all of them inside loops)."""
    every = layer_sites(model)
    sites = [site for site in every if is_weight_layer(site.layer)]
    unnamed = kernel_less_weight_layers(every)
    if not sites:
        names = [f"{s.path} ({type(s.layer).__name__})" for s in every][:20]
        raise NoWeightLayerError(
            f"{caller} found no layer with a kernel in {describe_model(model)}. Received: layers "
            f"{names}. Allowed: models with Dense, EinsumDense, Conv*, Conv*Transpose, "
            "DepthwiseConv* or SeparableConv* layers (or custom layers with a `kernel`)."
            + (f" {unnamed} hold a weight matrix under another name: call it `kernel`."
               if unnamed else ""))
    warn_kernel_less(unnamed, caller)
    if all(site.in_loop for site in sites):
        check_interceptable(sites, model)
    return outside_loops(sites, caller)


def kernel_less_weight_layers(sites):
    """Paths of leaf layers from outside Keras that own a trainable variable of rank >= 2 but
    no `kernel` (the Keras guide's `Linear` with `self.w`): weight layers `is_weight_layer`
    cannot see. Keras's own such layers (Embedding, PReLU) are not weight layers by design."""
    return [site.path for site in sites
            if site.is_leaf and not site.in_loop and not is_weight_layer(site.layer)
            and not type(site.layer).__module__.startswith("keras.")
            and any(len(v.shape) >= 2 for v in site.layer.trainable_variables)]


def warn_kernel_less(paths, caller, hint=None):
    """A `CoverageWarning` naming the `kernel_less_weight_layers` that `caller` leaves out."""
    if paths:
        hint = hint or ("Name the matrix `kernel` (`self.kernel = self.add_weight(shape=(fan_in, "
                        "units))`, as Dense does) to include them.")
        warnings.warn(f"{caller} leaves out {paths}: custom layers with a trainable weight "
                      f"matrix but no `kernel` attribute. {hint}", CoverageWarning, stacklevel=3)


def outside_loops(sites, caller, hint=""):
    """`sites` less those inside a recurrent layer's loop (`LayerSite.in_loop`: run once per
    time step, where no output can be recorded), with a `CoverageWarning` naming them."""
    looped = [site.path for site in sites if site.in_loop]
    if looped:
        warnings.warn(f"{caller} leaves out {looped}: they run inside a recurrent layer's loop "
                      f"(once per time step), where their outputs cannot be recorded.{hint}",
                      CoverageWarning, stacklevel=3)
    return [site for site in sites if not site.in_loop]


@contextlib.contextmanager
def coverage_notes():
    """Collect the texts of the `CoverageWarning`s raised inside the block (layers a profile
    or LSUV leaves out), each once, into the yielded list, for a page or a CLI to show as
    notes; every other warning goes on as usual."""
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CoverageWarning)
        yield notes
    for item in caught:
        if issubclass(item.category, CoverageWarning):
            if str(item.message) not in notes:
                notes.append(str(item.message))
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


def final_layer(model):
    """The last leaf layer of the tree (for Sequential/Functional models, the output layer)."""
    leaves = [site.layer for site in layer_sites(model) if site.is_leaf]
    return leaves[-1] if leaves else None


def get_loss(identifier):
    """`keras.losses.get(identifier)`, with an error that says what is allowed."""
    try:
        return keras.losses.get(identifier)
    except ValueError:
        raise ValueError(
            "`loss` must be a Keras loss name (e.g. 'mean_squared_error'), a keras.losses.Loss "
            f"or a function loss(y_true, y_pred). Received: loss={identifier!r}.") from None


def default_loss(model, y):
    """`(loss, y)`: softmax cross-entropy for labels `y` (sparse for integer labels,
    categorical for one-hot), from logits unless the model's final layer applies a softmax.
    The labels are checked on the host (whole numbers >= 0; one-hot rows) and against the
    model's output when the loss first sees it: a model with several outputs
    (`MultiOutputError`), one output unit (softmax over one logit has no gradient), or fewer
    units than labels is refused with a message that says to pass `loss=`."""
    last = final_layer(model)
    activation = getattr(last, "activation", None)
    from_logits = not (isinstance(last, keras.layers.Softmax) or
                       getattr(activation, "__name__", activation) == "softmax")
    y = np.asarray(y)
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        y = _sparse_labels(y.reshape(-1))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        classes_needed = int(y.max()) + 1 if y.size else 1
    else:
        loss, y = keras.losses.CategoricalCrossentropy(from_logits=from_logits), y.astype("float32")
        classes_needed = y.shape[-1]
    return _checked_cross_entropy(loss, model, classes_needed, one_hot=y.ndim > 1), y


def _sparse_labels(y):
    """Integer class labels as int32, or ValueError for labels that are not whole numbers >= 0."""
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(np.isfinite(y))
                                         and np.all(y == np.round(y))):
        raise ValueError(
            "The default loss (softmax cross-entropy) needs class labels. Received: y of dtype "
            f"{y.dtype} with values like {y[:3].tolist()}. Allowed: integer labels in [0, "
            "classes), one-hot rows, or `loss=` (e.g. 'mean_squared_error' for regression "
            "targets).")
    if y.size and y.min() < 0:
        raise ValueError(f"Class labels must be >= 0. Received: y with minimum {y.min()}. "
                         "Allowed: integer labels in [0, classes), or `loss=`.")
    return y.astype("int32")


def _checked_cross_entropy(loss, model, classes_needed, one_hot):
    """`loss`, refusing (when it sees the output) a model with several outputs, one unit, or
    fewer units than the labels need."""

    def cross_entropy(y_true, y_pred):
        if keras.tree.is_nested(y_pred):
            outputs = keras.tree.flatten(y_pred)
            raise MultiOutputError(
                f"The default loss (softmax cross-entropy on the labels) needs a model with one "
                f"output. Received: {describe_model(model)} with {len(outputs)} outputs, shapes "
                f"{[tuple(t.shape) for t in outputs]}. Allowed: pass `loss=`, a function "
                "`loss(y_true, y_pred)` of the model's output structure, e.g. `lambda y, out: "
                "keras.losses.sparse_categorical_crossentropy(y, out[0], from_logits=True)`.")
        units = y_pred.shape[-1]
        if units == 1 or (units is not None and (units != classes_needed if one_hot
                                                 else units < classes_needed)):
            raise ValueError(
                f"The default loss (softmax cross-entropy) cannot score {describe_model(model)}: "
                f"its output has {units} unit{'s' if units != 1 else ''} (shape "
                f"{tuple(y_pred.shape)}) and the labels need "
                f"{'exactly' if one_hot else 'at least'} {classes_needed}"
                + (" (softmax over one logit is constant: no gradient)" if units == 1 else "")
                + ". Allowed: `loss=` for this output (e.g. 'binary_crossentropy' or "
                "'mean_squared_error'), or labels that match the output.")
        return loss(y_true, y_pred)

    return cross_entropy


def check_interceptable(sites, model):
    """Raise `UnsupportedLayerError` for a site that cannot be intercepted."""
    for site in sites:
        if site.in_loop:
            raise UnsupportedLayerError(
                f"Layer {site.path!r} ({type(site.layer).__name__}) of {describe_model(model)} "
                "runs inside a recurrent layer's loop (once per time step), where its outputs "
                "cannot be recorded. Allowed: layers outside RNNs, or the RNN layer itself.")
        if getattr(site.layer, "quantization_mode", None) is not None:
            raise UnsupportedLayerError(
                f"Layer {site.path!r} of {describe_model(model)} is quantized "
                f"({site.layer.quantization_mode}): its forward pass bypasses `call`. "
                "Allowed: float layers (record the model before `quantize`).")


# --------------------------------------------------------------------------------------------
# interception

def loss_scale(model, float16=None):
    """The factor a backward pass through `model` multiplies its loss by: the current scale of
    the model's `keras.optimizers.LossScaleOptimizer` (`dynamic_scale`), else
    `DEFAULT_LOSS_SCALE` when the model or a layer at any depth computes in float16, else 1.
    `float16`: that last fact when the caller knows it already (`computes_float16`).

    Training under `mixed_float16` differentiates `S * L` and divides the gradients by S
    (Micikevicius et al. 2018, "Mixed precision training"); a probe that does the same sees
    the gradients training sees, underflow included."""
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
        return float(ops.convert_to_numpy(scale))
    if float16 is None:
        float16 = computes_float16(model)
    return DEFAULT_LOSS_SCALE if float16 else 1.0


def computes_float16(model):
    """Whether `model` or a layer at any depth computes in float16 (one walk of the tree)."""
    dtypes = {model.compute_dtype} | {site.layer.compute_dtype for site in layer_sites(model)}
    return "float16" in dtypes


def fused_activation(layer):
    """The fused activation `intercept` can split off, or None (linear or not splittable)."""
    if not isinstance(layer, SPLITTABLE_LAYERS):
        return None
    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        return None
    return activation


class LayerCall:
    """One call of an intercepted layer, handed to the hook of `intercept`.

    `site`, `index` (1-based: the k-th call of this layer in the block), `args`, `kwargs`,
    `inputs` (the first positional argument when it is a single tensor, else None).
    """

    def __init__(self, site, index, original, args, kwargs):
        self.site, self.index = site, index
        self.args, self.kwargs = args, kwargs
        self._original = original
        first = args[0] if args else None
        self.inputs = first if first is not None and ops.is_tensor(first) else None

    @property
    def activation(self):
        """The fused activation `run_split` leaves out, or None."""
        return fused_activation(self.site.layer)

    def run(self):
        """The layer's own output."""
        return self._original(*self.args, **self.kwargs)

    def run_split(self):
        """`(pre_activation, activation)`: the output without the fused activation, which is
        returned (None when there is none: then `pre_activation` is the output)."""
        activation = self.activation
        if activation is None:
            return self.run(), None
        layer = self.site.layer
        layer.activation = None
        try:
            return self.run(), activation
        finally:
            layer.activation = activation


_MISSING = object()


@contextlib.contextmanager
def intercept(sites, hook):
    """Within the block, every call of a site's layer returns `hook(LayerCall)`.

    The hook runs the layer with `call.run()` or `call.run_split()` and returns what the layer
    should output. On exit (also on an exception) each layer's `call` is what it was.

    >>> with intercept(weight_sites(model), lambda call: call.run() * 2):
    ...     doubled = model(x)
    """
    installed = []
    try:
        for site in sites:
            layer = site.layer
            installed.append((layer, vars(layer).get("call", _MISSING)))
            layer.call = _wrapper(site, layer.call, hook)
        yield
    finally:
        for layer, previous in reversed(installed):
            if previous is _MISSING:
                del layer.call
            else:
                layer.call = previous


def _wrapper(site, original, hook):
    calls = [0]

    @functools.wraps(original)
    def call(*args, **kwargs):
        calls[0] += 1
        return hook(LayerCall(site, calls[0], original, args, kwargs))

    return call


# --------------------------------------------------------------------------------------------
# recording: one compiled forward and backward pass

@dataclasses.dataclass
class CallTensors:
    """One recorded call inside the compiled pass (backend tensors), handed to `statistics`.

    `output`: what was recorded, the layer's output, or its pre-activation W x + b when its
    fused activation was split off; `activated`: the output after that activation (`output`
    itself when nothing was split); `output_grad`: dL/d`output` (None in a forward-only pass
    or for a site outside `gradient_sites`); `weight`, `weight_grad`: the value of
    `weight_of(layer)` and dL/dW (None when not tracked).
    """

    site: LayerSite
    index: int
    inputs: object
    output: object
    activated: object
    output_grad: object = None
    weight: object = None
    weight_grad: object = None


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """One call's statistics on the host.

    `name`: the site's path, `path#k` when the layer was called more than once; `index`: k;
    `input_shape` / `output_shape`: static shapes of its first input (None when it was not a
    single tensor) and of the recorded output; `follows_previous`: its input is the previous
    record's output, directly or through unrecorded layers of one input that each took the
    one before's output (the two are links of a chain; False after a layer of several inputs,
    such as a residual `Add`, and on a parallel branch); `stats`: {name: numpy value}.
    """

    name: str
    site: LayerSite
    index: int
    input_shape: tuple
    output_shape: tuple
    follows_previous: bool
    stats: dict

    @property
    def layer(self):
        return self.site.layer


@dataclasses.dataclass(frozen=True)
class Recording:
    """The records of one pass, in call order. `chain`: every record's input is the previous
    record's output and the model's output is the last record's (a plain chain of the
    recorded layers, no other layer in between)."""

    records: list
    chain: bool


@dataclasses.dataclass
class _Traced:
    site: LayerSite
    index: int
    inputs: object
    output: object
    activated: object
    follows: bool
    grad_slot: object  # position among the gradient targets, or None


@dataclasses.dataclass
class _Plan:
    calls: list         # per call: (site, index, input shape, output shape, follows previous)
    layout: list        # per call: [(key, is_scalar, position)]
    chain: bool


def _link_sites(model, sites):
    """The leaf layers a `Recorder` does not record but follows the chain through (pooling,
    Flatten, Dropout...: a call that takes the chain's last output extends it), so that a
    record's `follows_previous` does not depend on which layers are recorded."""
    recorded = {id(site.layer) for site in sites}
    return [s for s in layer_sites(model) if s.is_leaf and not s.in_loop
            and id(s.layer) not in recorded
            and getattr(s.layer, "quantization_mode", None) is None]


def _static_shape(tensor):
    if tensor is None:
        return None
    return tuple(None if d is None else int(d) for d in tensor.shape)


class Recorder:
    """Compiled forward (+ backward) pass that records statistics of selected layer calls.

    Args:
        model: a built Keras model of any kind.
        sites: the `LayerSite`s to record (from `layer_sites` / `weight_sites`).
        statistics: `statistics(CallTensors) -> {name: tensor}`, reduced inside the compiled
            pass with `keras.ops` (scalars come back in one transfer, other shapes as arrays).
        loss: `loss(y_true, y_pred)` (mean taken) for the backward pass; None: forward only.
        training: the `training` flag of the forward pass.
        split: split the fused activation off splittable weight layers (record W x + b).
        gradient_sites: the sites whose dL/d output is needed (default: all of `sites`).
        weight_of: `weight_of(layer) -> keras.Variable | None`, weights to differentiate too.
        eager_calls: TensorFlow: calls run eagerly before one `tf.function` is traced (tracing
            costs several passes, which a one-off profile never earns back); None: never
            compile. JAX always compiles with `jax.jit` (op-by-op `jax.grad` is slower).

    `recorder(x, y=None) -> Recording`. The model is intercepted only while a pass is traced
    or runs eagerly; between calls it is untouched (a `fit()` can run in between).
    """

    def __init__(self, model, sites, statistics, *, loss=None, training=False, split=False,
                 gradient_sites=None, weight_of=None, eager_calls=3):
        if not getattr(model, "built", False):
            raise ValueError(
                f"Recording needs a built model. Received: unbuilt {describe_model(model)}. "
                "Allowed: a model created with keras.Input, or called once on a batch, or "
                "built with model.build(input_shape).")
        self.model, self.sites = model, list(sites)
        check_interceptable(self.sites, model)
        self._links = _link_sites(model, self.sites)
        self.statistics, self.loss = statistics, loss
        self.training, self.split = training, bool(split)
        wanted = self.sites if gradient_sites is None else list(gradient_sites)
        self._grad_ids = {id(site.layer) for site in wanted} if loss is not None else set()
        self._weight_of = weight_of if loss is not None else None
        self._weights = self._unique_weights()
        self._plan = None
        self.calls = 0   # passes run so far
        self.eager_calls = eager_calls
        self._float16 = loss is not None and computes_float16(model)   # dtypes are fixed
        self.backend = keras.backend.backend()
        if self.backend == "tensorflow":
            self._fn = self._build_tf()
        elif self.backend == "jax":
            self._fn = self._build_jax()
        else:
            raise ValueError(f"Recording supports the TensorFlow and JAX backends. Received: "
                             f"backend={self.backend!r}. Allowed: 'tensorflow', 'jax'")

    def _unique_weights(self):
        if self._weight_of is None:
            return []
        found = {}
        for site in self.sites:
            w = self._weight_of(site.layer)
            if w is not None:
                found.setdefault(id(w), w)
        return list(found.values())

    def _weight_for(self, site):
        if self._weight_of is None:
            return None
        w = self._weight_of(site.layer)
        if w is None:
            return None
        return next(i for i, v in enumerate(self._weights) if v is w)

    # -- the intercepted forward -------------------------------------------------------------

    def _forward(self, x, inject):
        """`(y_pred, traced, chain)`; `inject(slot, tensor)` marks gradient target `slot`.

        A call follows the previous record when its input is that record's output, directly
        or through unrecorded layers (`_link_sites`) that each took the one before's output.
        """
        traced, previous, slots, linked = [], [None], [0], [False]

        def hook(call):
            pre, activation = call.run_split() if self.split else (call.run(), None)
            if not ops.is_tensor(pre):
                raise ValueError(
                    f"Layer {call.site.path!r} ({type(call.site.layer).__name__}) returns "
                    f"{type(pre).__name__}, not one tensor: it cannot be recorded. Allowed: "
                    "layers with a single output tensor.")
            slot = None
            if id(call.site.layer) in self._grad_ids:
                slot, slots[0] = slots[0], slots[0] + 1
                pre = inject(slot, pre)
            out = activation(pre) if activation is not None else pre
            follows = call.inputs is not None and call.inputs is previous[0]
            traced.append(_Traced(call.site, call.index, call.inputs, pre, out, follows, slot))
            previous[0] = out
            return out

        def link(call):
            out = call.run()
            if call.inputs is not None and call.inputs is previous[0]:
                previous[0], linked[0] = out, True
            return out

        with intercept(self.sites, hook), intercept(self._links, link):
            y_pred = self.model(x, training=self.training)
        chain = (bool(traced) and not linked[0] and all(t.follows for t in traced[1:])
                 and y_pred is previous[0])
        return y_pred, traced, chain

    def _mean_loss(self, y, y_pred):
        y_pred = keras.tree.map_structure(lambda t: ops.cast(t, "float32"), y_pred)
        return ops.mean(ops.cast(self.loss(y, y_pred), "float32"))

    @staticmethod
    def _unscaled(grads, scale):
        """Gradients of `scale * L` -> gradients of L, in float32 (None: an unscaled loss,
        the gradients as they are: no pass over them)."""
        if scale is None:
            return list(grads)
        return [ops.cast(g, "float32") / scale for g in grads]

    @staticmethod
    def _scaled(loss, scale):
        return loss if scale is None else loss * scale

    def _reduce(self, traced, chain, grads, w_values, w_grads):
        """Run `statistics` on every call; pack the scalars into one vector."""
        scalars, tensors, layout = [], [], []
        for t in traced:
            w = self._weight_for(t.site)
            view = CallTensors(
                t.site, t.index, t.inputs, t.output, t.activated,
                grads[t.grad_slot] if grads is not None and t.grad_slot is not None else None,
                w_values[w] if w is not None else None, w_grads[w] if w is not None else None)
            keys = []
            for key, value in self.statistics(view).items():
                value = ops.cast(value, "float32")
                if len(value.shape) == 0:
                    keys.append((key, True, len(scalars)))
                    scalars.append(value)
                else:
                    keys.append((key, False, len(tensors)))
                    tensors.append(value)
            layout.append(keys)
        calls = [(t.site, t.index, _static_shape(t.inputs), _static_shape(t.output), t.follows)
                 for t in traced]
        self._plan = _Plan(calls, layout, chain)
        packed = ops.stack(scalars) if scalars else ops.zeros((0,), "float32")
        return packed, tensors

    # -- TensorFlow --------------------------------------------------------------------------

    def _pass_tf(self, x, y, scale):
        import tensorflow as tf

        if self.loss is None:
            with keras.StatelessScope():
                y_pred, traced, chain = self._forward(x, None)
            return self._reduce(traced, chain, None, None, None)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            w_values = [w.value for w in self._weights]
            for value in w_values:
                tape.watch(value)

            def inject(slot, tensor):
                tape.watch(tensor)
                return tensor

            with keras.StatelessScope():
                y_pred, traced, chain = self._forward(x, inject)
            loss = self._scaled(self._mean_loss(y, y_pred), scale)
        targets = [t.output for t in traced if t.grad_slot is not None]
        grads = self._unscaled(tape.gradient(loss, targets + w_values,
                                             unconnected_gradients=tf.UnconnectedGradients.ZERO),
                               scale)
        return self._reduce(traced, chain, grads[:len(targets)], w_values,
                            grads[len(targets):])

    def _build_tf(self):
        import tensorflow as tf

        # No AutoGraph, as Keras's own train function: a model that `fit()` can train has no
        # Python control flow on tensors, and converting every layer's `call` tripled the trace.
        compiled = tf.function(self._pass_tf, reduce_retracing=True, autograph=False)

        def run(x, y, scale):
            eager = self.eager_calls is None or self.calls <= self.eager_calls
            packed, tensors = (self._pass_tf if eager else compiled)(
                x, y, None if scale is None else tf.constant(scale, "float32"))
            return packed.numpy(), [t.numpy() for t in tensors]

        return run

    # -- JAX ---------------------------------------------------------------------------------

    def _build_jax(self):
        import jax
        import jax.numpy as jnp

        tracked_ids = {id(w) for w in self._weights}
        others = [v for v in self.model.variables if id(v) not in tracked_ids]

        def forward(w_vals, eps, other_vals, x):
            mapping = list(zip(others, other_vals)) + list(zip(self._weights, w_vals))
            inject = (lambda slot, t: t) if eps is None else (
                lambda slot, t: t + ops.cast(eps[slot], t.dtype))
            with keras.StatelessScope(state_mapping=mapping):
                return self._forward(x, inject)

        def target_shapes(w_vals, other_vals, x):
            _, traced, _ = forward(w_vals, None, other_vals, x)
            return [t.output for t in traced if t.grad_slot is not None]

        def loss_of(w_vals, eps, other_vals, x, y, scale):
            y_pred, traced, chain = forward(w_vals, eps, other_vals, x)
            tensors = [(t.inputs, t.output, t.activated) for t in traced]
            return self._scaled(self._mean_loss(y, y_pred), scale), (tensors, traced, chain)

        def with_tensors(traced, tensors):
            return [dataclasses.replace(t, inputs=i, output=o, activated=a)
                    for t, (i, o, a) in zip(traced, tensors)]

        def run_backward(w_vals, eps, other_vals, x, y, scale):
            side = {}

            def loss_only(w_vals, eps):
                loss, (tensors, traced, chain) = loss_of(w_vals, eps, other_vals, x, y, scale)
                side.update(traced=traced, chain=chain)
                return loss, tensors

            (_, tensors), (w_grads, grads) = jax.value_and_grad(
                loss_only, argnums=(0, 1), has_aux=True)(w_vals, eps)
            w_grads, grads = self._unscaled(w_grads, scale), self._unscaled(grads, scale)
            traced = with_tensors(side["traced"], tensors)
            return self._reduce(traced, side["chain"], grads, w_vals, w_grads)

        def run_forward(w_vals, other_vals, x):
            _, traced, chain = forward(w_vals, None, other_vals, x)
            return self._reduce(traced, chain, None, None, None)

        backward, forward_only = jax.jit(run_backward), jax.jit(run_forward)
        eps_cache = {}

        def run(x, y, scale):
            w_vals = [w.value for w in self._weights]
            other_vals = [v.value for v in others]
            if self.loss is None:
                packed, tensors = forward_only(w_vals, other_vals, x)
            else:
                key = tuple(tuple(np.shape(t)) for t in keras.tree.flatten(x))
                if key not in eps_cache:
                    specs = jax.eval_shape(target_shapes, w_vals, other_vals, x)
                    eps_cache[key] = [jnp.zeros(s.shape, s.dtype) for s in specs]
                packed, tensors = backward(w_vals, eps_cache[key], other_vals, x, y,
                                           None if scale is None else jnp.float32(scale))
            return np.asarray(packed), [np.asarray(t) for t in tensors]

        return run

    # -- results -----------------------------------------------------------------------------

    def __call__(self, x, y=None):
        """One pass on batch `x` (labels `y` for the loss) -> `Recording`."""
        if self.loss is not None and y is None:
            raise ValueError("This recorder has a loss: it needs labels. Received: y=None")
        x = keras.tree.map_structure(ops.convert_to_tensor, x)
        if y is not None:
            y = keras.tree.map_structure(ops.convert_to_tensor, y)
        self.calls += 1
        packed, tensors = self._fn(x, y, self._loss_scale())
        return self._unpack(packed, tensors)

    def _loss_scale(self):
        """This pass's loss scale, None for none (a float32 model: no extra pass over the
        gradients); the optimizer's scale is read each pass, it changes during training."""
        if self.loss is None:
            return None
        scale = loss_scale(self.model, self._float16)
        return None if scale == 1.0 else scale

    def _unpack(self, packed, tensors):
        plan = self._plan
        counts = {}
        for site, *_ in plan.calls:
            counts[id(site)] = counts.get(id(site), 0) + 1
        records = []
        for (site, index, in_shape, out_shape, follows), keys in zip(plan.calls, plan.layout):
            stats = {key: (packed[pos] if scalar else tensors[pos])
                     for key, scalar, pos in keys}
            name = site.path if counts[id(site)] == 1 else f"{site.path}#{index}"
            records.append(CallRecord(name, site, index, in_shape, out_shape, follows, stats))
        return Recording(records, plan.chain)
