"""`LayerStatsLogger`: per-layer activation and gradient statistics of an ordinary `fit()`.

Keras 3 / TF2 dropped `TensorBoard(write_grads=True)` and never logged activations; the usual
workarounds patch the optimizer or `train_step`. This callback does neither: it keeps a fixed
probe batch and, at chosen steps, runs it forward and backward through the model's own layer
graph (see `keras_varinit.probe`), which measures the quantities of signal-propagation theory
(Glorot & Bengio 2010; He et al. 2015):

* forward: Var[a^l] (``activation_std``), dead ReLUs (``zero_fraction``), tanh/sigmoid
  saturation (``saturated_fraction``);
* backward: std of dL/da^l (``activation_grad_std``) and of dL/dW^l (``weight_grad_std``);
* weights: std of W^l and the update ratio ||W_now - W_prev|| / ||W_prev|| between two logs.
"""
import json
import math
import os
import warnings

import keras
import numpy as np

from keras_varinit.probe import (
    STAT_NAMES, Probe, activation_name, finite_or_none, functional_graph, tracked_weight,
)

RECORD_FIELDS = (
    "step", "epoch", "layer", "layer_index", "layer_type",
    "activation_mean", "activation_std", "zero_fraction", "saturated_fraction",
    "activation_grad_std", "weight_std", "weight_grad_std", "update_ratio",
    "nan_count", "inf_count",
)
# Statistics written to TensorBoard as layer_stats/<statistic>/<layer>.
SCALAR_FIELDS = RECORD_FIELDS[5:]

_ACTIVATION_LAYER_TYPES = ("Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax")


def _class_names(obj):
    return {c.__name__ for c in type(obj).__mro__}


def _is_default_tracked(layer):
    """Default selection: layers with a kernel (Dense, Conv, ...) and activation layers."""
    if isinstance(layer, keras.layers.InputLayer):
        return False
    try:
        kernel = getattr(layer, "kernel", None)
    except Exception:
        kernel = None
    if isinstance(kernel, keras.Variable):
        return True
    return bool(_class_names(layer) & set(_ACTIVATION_LAYER_TYPES))


def _matcher(specs, argname):
    """Normalize `layers=`/`exclude=` into a predicate on layers (names or types)."""
    if specs is None:
        return None, []
    if isinstance(specs, (str, type)):
        specs = [specs]
    specs = list(specs)
    for s in specs:
        if not isinstance(s, (str, type)):
            raise ValueError(
                f"`{argname}` must hold layer names, layer classes or class-name strings. "
                f"Received: {s!r} of type {type(s).__name__}."
            )

    def match(layer, s):
        if isinstance(s, type):
            return isinstance(layer, s)
        return layer.name == s or s in _class_names(layer)

    return match, specs


def _variable_to_numpy(variable):
    """A float64 host copy of a Keras variable (TF, TF-distributed or JAX)."""
    value = variable.value
    value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return np.array(value, dtype=np.float64)


def _to_jsonable(record):
    out = {}
    for k, v in record.items():
        if isinstance(v, (float, np.floating)):
            out[k] = finite_or_none(v)
        elif isinstance(v, np.integer):
            out[k] = int(v)
        else:
            out[k] = v
    return out


class _SummaryWriter:
    """tf.summary when TensorFlow is importable, else tensorboard's TF-free scalar writer."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self._tf = None
        self._writer = None
        try:
            import tensorflow as tf

            self._tf = tf
            with tf.device("/cpu:0"):
                self._writer = tf.summary.create_file_writer(log_dir)
        except ImportError:
            try:
                from tensorboard.summary import Writer
            except ImportError:
                warnings.warn("LayerStatsLogger: neither tensorflow nor tensorboard is "
                              "importable; TensorBoard logging is disabled.")
                return
            os.makedirs(log_dir, exist_ok=True)
            self._writer = Writer(log_dir)

    def write(self, step, scalars, histograms=()):
        if self._writer is None:
            return
        if self._tf is not None:
            tf = self._tf
            with tf.device("/cpu:0"), self._writer.as_default(step=int(step)):
                for tag, value in scalars:
                    tf.summary.scalar(tag, value)
                for tag, values in histograms:
                    values = np.asarray(values, dtype=np.float32).ravel()
                    values = values[np.isfinite(values)]
                    tf.summary.histogram(tag, values)
            self._writer.flush()
        else:
            for tag, value in scalars:
                self._writer.add_scalar(tag, value, step=int(step))
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close() if self._tf is None else self._writer.flush()


class LayerStatsLogger(keras.callbacks.Callback):
    """Log per-layer activation and gradient statistics of a fixed probe batch during `fit()`.

    At train begin (step 0: the state at initialization), every `every_n_steps` training steps
    (a global step counter across epochs, started from `optimizer.iterations`) and at every
    epoch end, the probe batch (x, y) is run forward and backward through the model and one
    record per tracked layer is stored (fields: `RECORD_FIELDS`, the contract in
    CONTRIBUTING.md):

    * ``activation_mean``, ``activation_std``: of the layer's output a^l on the probe;
    * ``zero_fraction``: fraction of exact zeros of a^l (dead ReLUs);
    * ``saturated_fraction``: tanh layers |a| > 0.97, sigmoid layers a outside [0.03, 0.97],
      decided from the layer's own activation (0 for every other layer);
    * ``activation_grad_std``: std of dL/da^l; ``weight_std``, ``weight_grad_std``: std of the
      layer's kernel W^l (else embeddings, else BN gamma; null for layers without weights) and
      of dL/dW^l;
    * ``update_ratio``: ||W_now - W_prev|| / ||W_prev|| between this log and the previous one
      (null at the first log);
    * ``nan_count``, ``inf_count``: NaN/Inf entries in a^l, dL/da^l, W^l and dL/dW^l together.
      A diverging network is logged (statistics NaN, counts > 0); the logger never raises.

    Loss of the probe's backward pass: the model's compiled loss (`model.loss`, a name, a
    `keras.losses.Loss` or a function) when there is a single one and it accepts the probe's y;
    otherwise cross-entropy: sparse if y holds integer labels, categorical if y is one-hot,
    from logits unless the last layer applies a softmax.

    Sinks: TensorBoard scalars `layer_stats/<statistic>/<layer>` in `log_dir` (one chart per
    statistic, every layer on it), optional histograms `layer_hist/activation/<layer>` and
    `layer_hist/activation_grad/<layer>`; `.history` (list of records) and `.to_dataframe()`;
    and a JSON-lines file `jsonl_path` (appended, flushed after every log, NaN/Inf as null) that
    another process can tail while training runs (ignore a last line without a newline).

    Args:
        probe: `(x, y)` fixed batch (numpy); y integer labels or one-hot.
        log_dir: TensorBoard log directory, or None for no TensorBoard output.
        every_n_steps: log every this many training steps (None: only at train begin and epoch
            ends).
        layers: track only these layers: names, layer classes or class-name strings. Default:
            layers with a kernel (Dense, Conv, ...) and activation layers.
        exclude: layers to leave out (same forms).
        histograms: also write activation and activation-gradient histograms (TensorBoard).
        jsonl_path: path of the JSON-lines file, or None.
        training: the `training` flag of the probe's forward pass (default False: inference
            mode; True uses batch statistics in batch norm; the model is never changed).
        log_on_epoch_end: log at every epoch end (default True).

    Example:

    ```python
    logger = kv.callbacks.LayerStatsLogger((x_train[:256], y_train[:256]),
                                           log_dir="runs/a/tensorboard", every_n_steps=50)
    model.fit(x_train, y_train, callbacks=[logger])
    df = logger.to_dataframe()   # one row per (logged step, layer)
    ```

    Reference: Glorot & Bengio (2010), "Understanding the difficulty of training deep
    feedforward neural networks"; He et al. (2015), "Delving deep into rectifiers".
    """

    def __init__(self, probe, log_dir=None, every_n_steps=100, layers=None, exclude=None,
                 histograms=False, jsonl_path=None, training=False, log_on_epoch_end=True):
        super().__init__()
        if not isinstance(probe, (tuple, list)) or len(probe) != 2:
            raise ValueError(
                "`probe` must be a pair (x, y) of arrays: a fixed batch and its labels. "
                f"Received: {type(probe).__name__}"
                + (f" of length {len(probe)}" if isinstance(probe, (tuple, list)) else "") + "."
            )
        x, y = probe
        y = np.asarray(y)
        n_x = {len(t) for t in keras.tree.flatten(x)}
        if len(n_x) != 1 or n_x.pop() != len(y):
            raise ValueError(
                "`probe` x and y must hold the same number of samples. Received: x with "
                f"{[len(t) for t in keras.tree.flatten(x)]} samples, y with {len(y)}."
            )
        if every_n_steps is not None and (
                isinstance(every_n_steps, bool) or not isinstance(every_n_steps, (int, np.integer))
                or every_n_steps < 1):
            raise ValueError(
                "`every_n_steps` must be a positive integer or None. "
                f"Received: every_n_steps={every_n_steps!r}."
            )
        self.probe_x = keras.tree.map_structure(np.asarray, x)
        self.probe_y = y
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self._layers_match, self._layers_specs = _matcher(layers, "layers")
        self._exclude_match, self._exclude_specs = _matcher(exclude, "exclude")
        self.histograms = bool(histograms)
        self.jsonl_path = None if jsonl_path is None else os.fspath(jsonl_path)
        self.training = bool(training)
        self.log_on_epoch_end = bool(log_on_epoch_end)

        self.history = []
        self.tracked_layers = []
        self.loss_source = None
        self._probe = None
        self._probe_model = None
        self._first_out = None
        self._writer = None
        self._prev_weights = {}
        self._step = 0
        self._epoch = 0
        self._epoch_base = 0
        self._last_logged_step = None

    # -- setup -------------------------------------------------------------------------------

    def _select_layers(self, model):
        graph = functional_graph(model)
        candidates = [l for l in graph.layers if not isinstance(l, keras.layers.InputLayer)]
        if self._layers_match is None:
            chosen = [l for l in candidates if _is_default_tracked(l)]
        else:
            chosen = [l for l in candidates
                      if any(self._layers_match(l, s) for s in self._layers_specs)]
            for s in self._layers_specs:
                if not any(self._layers_match(l, s) for l in candidates):
                    raise ValueError(
                        f"`layers` entry {s!r} matches no layer of model {model.name!r}. "
                        f"Allowed: a layer name among {[l.name for l in candidates]}, "
                        "or a layer type."
                    )
        if self._exclude_match is not None:
            chosen = [l for l in chosen
                      if not any(self._exclude_match(l, s) for s in self._exclude_specs)]
        usable = []
        for l in chosen:
            nodes = getattr(l, "_inbound_nodes", [])
            if len(nodes) != 1 or len(keras.tree.flatten(nodes[0].outputs)) != 1:
                if self._layers_match is not None:
                    raise ValueError(
                        f"Layer {l.name!r} cannot be tracked: it is called {len(nodes)} times "
                        "in the model or has several outputs. Allowed: layers with one call "
                        "and one output."
                    )
                continue
            usable.append(l)
        if not usable:
            raise ValueError(
                f"LayerStatsLogger tracks no layer of model {model.name!r} with "
                f"layers={self._layers_specs or None!r}, exclude={self._exclude_specs or None!r}."
            )
        return usable

    def _fallback_loss(self, model):
        graph = functional_graph(model)
        last = graph.layers[-1] if graph.layers else None
        from_logits = activation_name(last) != "softmax" if last is not None else True
        y = self.probe_y
        if y.ndim >= 2 and y.shape[-1] > 1:
            return keras.losses.CategoricalCrossentropy(from_logits=from_logits)
        return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)

    def _compiled_loss(self, model):
        loss = getattr(model, "loss", None)
        if loss is None or isinstance(loss, (dict, list, tuple)):
            return None
        if isinstance(loss, str):
            try:
                return keras.losses.get(loss)
            except Exception:
                return None
        return loss if callable(loss) else None

    def _build(self):
        model = self.model
        self.tracked_layers = self._select_layers(model)
        loss = self._compiled_loss(model)
        if loss is not None:
            try:
                self._probe = Probe(model, self.tracked_layers, loss, training=self.training,
                                    return_tensors=self.histograms)
                # Traces/compiles once and validates the loss; kept for the step-0 log.
                self._first_out = self._probe(self._x, self._y)
                self.loss_source = "compiled"
            except Exception as e:  # a compiled loss that does not fit the probe's y
                warnings.warn(
                    f"LayerStatsLogger: the model's compiled loss does not accept the probe "
                    f"({type(e).__name__}: {str(e)[:200]}); using cross-entropy instead.")
                self._probe = None
        if self._probe is None:
            self._probe = Probe(model, self.tracked_layers, self._fallback_loss(model),
                                training=self.training, return_tensors=self.histograms)
            self.loss_source = "cross_entropy"
        self._probe_model = model

    def _prepare_inputs(self):
        graph = functional_graph(self.model)
        x = self.probe_x
        flat = keras.tree.flatten(x)
        flat = [np.asarray(t, dtype=inp.dtype) if np.issubdtype(np.asarray(t).dtype, np.number)
                else t for t, inp in zip(flat, graph.inputs)]
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            self._x = [tf.constant(t) for t in flat]
            self._y = tf.constant(self.probe_y)
        else:
            self._x = flat
            self._y = self.probe_y

    # -- logging -----------------------------------------------------------------------------

    def _current_step_from_optimizer(self):
        opt = getattr(self.model, "optimizer", None)
        try:
            return int(keras.ops.convert_to_numpy(opt.iterations))
        except Exception:
            return None

    def _log(self, step, epoch):
        if self._last_logged_step == step:
            return
        self._last_logged_step = step
        # JAX trainer keeps the state outside the variables during an epoch: reattach it.
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        try:
            out, self._first_out = self._first_out, None
            if out is None:
                out = self._probe(self._x, self._y)
        except Exception as e:  # never let the logger end a training run
            warnings.warn(f"LayerStatsLogger: probe failed at step {step}: "
                          f"{type(e).__name__}: {e}")
            return
        if self.histograms:
            stats, acts, grads = out
        else:
            stats, acts, grads = out, None, None
        stats = np.asarray(stats, dtype=np.float64)
        records = []
        scalars = []
        for i, layer in enumerate(self.tracked_layers):
            row = dict(zip(STAT_NAMES, stats[i].tolist()))
            w = tracked_weight(layer)
            update_ratio = None
            if w is None:
                row["weight_std"] = None
                row["weight_grad_std"] = None
            else:
                w_now = _variable_to_numpy(w)
                prev = self._prev_weights.get(id(layer))
                if prev is not None:
                    with np.errstate(all="ignore"):
                        denom = np.linalg.norm(prev)
                        update_ratio = float(np.linalg.norm(w_now - prev) / denom) \
                            if denom > 0 else float("nan")
                self._prev_weights[id(layer)] = w_now
            record = {
                "step": int(step), "epoch": int(epoch), "layer": layer.name,
                "layer_index": i, "layer_type": type(layer).__name__,
                "activation_mean": row["activation_mean"],
                "activation_std": row["activation_std"],
                "zero_fraction": row["zero_fraction"],
                "saturated_fraction": row["saturated_fraction"],
                "activation_grad_std": row["activation_grad_std"],
                "weight_std": row["weight_std"],
                "weight_grad_std": row["weight_grad_std"],
                "update_ratio": update_ratio,
                "nan_count": int(row["nan_count"]) if math.isfinite(row["nan_count"]) else None,
                "inf_count": int(row["inf_count"]) if math.isfinite(row["inf_count"]) else None,
            }
            records.append(record)
            for field in SCALAR_FIELDS:
                if record[field] is not None:
                    scalars.append((f"layer_stats/{field}/{layer.name}", float(record[field])))
        self.history.extend(records)
        if self.jsonl_path is not None:
            self._write_jsonl(records)
        if self._writer is not None:
            hists = []
            if self.histograms:
                for layer, a, g in zip(self.tracked_layers, acts, grads):
                    hists.append((f"layer_hist/activation/{layer.name}", a))
                    hists.append((f"layer_hist/activation_grad/{layer.name}", g))
            try:
                self._writer.write(step, scalars, hists)
            except Exception as e:
                warnings.warn(f"LayerStatsLogger: TensorBoard write failed at step {step}: {e}")

    def _write_jsonl(self, records):
        text = "".join(json.dumps(_to_jsonable(r), allow_nan=False) + "\n" for r in records)
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()

    # -- Keras hooks -------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if self._probe is None or self._probe_model is not self.model:
            self._prepare_inputs()
            self._build()
        if self.jsonl_path is not None:
            parent = os.path.dirname(os.path.abspath(self.jsonl_path))
            os.makedirs(parent, exist_ok=True)
        if self.log_dir is not None and self._writer is None:
            self._writer = _SummaryWriter(self.log_dir)
        start = self._current_step_from_optimizer()
        if start is not None:
            self._step = start
        self._epoch_base = self._step
        self._log(self._step, self._epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        self._epoch_base = self._step

    def on_train_batch_end(self, batch, logs=None):
        prev = self._step
        self._step = max(self._epoch_base + int(batch) + 1, prev + 1)
        n = self.every_n_steps
        if n is not None and self._step // n != prev // n:
            self._log(self._step, self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.log_on_epoch_end:
            self._log(self._step, int(epoch))

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.write(self._step, [])

    # -- results -----------------------------------------------------------------------------

    def to_dataframe(self):
        """The records as a pandas DataFrame (columns `RECORD_FIELDS`, null -> NaN)."""
        import pandas as pd

        df = pd.DataFrame(self.history, columns=list(RECORD_FIELDS))
        for field in SCALAR_FIELDS:
            df[field] = pd.to_numeric(df[field], errors="coerce").astype("float64")
        return df


from keras_varinit.diagnosis_logger import DiagnosisLogger  # noqa: E402,F401 (re-export)
