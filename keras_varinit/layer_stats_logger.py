"""`LayerStatsLogger`: per-layer activation and gradient statistics of an ordinary `fit()`.

Keras 3 / TF2 dropped `TensorBoard(write_grads=True)` and never logged activations; the usual
workarounds patch the optimizer or `train_step`. This callback does neither: it keeps a fixed
probe batch and, at chosen steps, runs it forward and backward through the model (any Keras
model; see `keras_varinit.probe` and `keras_varinit.instrument`), which measures the quantities
of signal-propagation theory
(Glorot & Bengio 2010; He et al. 2015):

* forward: Var[a^l] (``activation_std``), dead ReLUs (``zero_fraction``), tanh/sigmoid
  saturation (``saturated_fraction``);
* backward: std of dL/da^l (``activation_grad_std``) and of dL/dW^l (``weight_grad_std``);
* weights: std of W^l and the update ratio ||W_now - W_prev|| / ||W_prev|| between two logs.
"""
import dataclasses
import math
import os
import warnings

import keras
import numpy as np

from keras_varinit import batch_checks, instrument, propagation
from keras_varinit.probe import (STAT_NAMES, LayerProbe, eager_calls_for, finite_or_none,
                                 tracked_weight)
from keras_varinit.run_files import LAYER_STATS_FIELDS, LAYER_STATS_VALUES, append_jsonl

_ACTIVATION_LAYER_TYPES = ("Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax")


def _class_names(obj):
    return {c.__name__ for c in type(obj).__mro__}


def _is_default_tracked(layer):
    """Default selection: layers with a kernel (Dense, Conv, ...), activation layers and
    normalization layers (their output, and where the diagnosis's scale comparisons restart:
    `propagation.renormalizes`)."""
    return instrument.is_weight_layer(layer) or \
        bool(_class_names(layer) & set(_ACTIVATION_LAYER_TYPES)) or \
        propagation.renormalizes(type(layer).__name__)


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

    def match(site, s):
        if isinstance(s, type):
            return isinstance(site.layer, s)
        return s in (site.path, site.layer.name) or s in _class_names(site.layer)

    return match, specs


def _variable_to_numpy(variable):
    """A float64 host copy of a Keras variable (TF, TF-distributed or JAX)."""
    value = variable.value
    value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return np.array(value, dtype=np.float64)


class _SummaryWriter:
    """TensorBoard scalars through tensorboard's own `Writer` (plain Python: 367 scalars in
    0.03 s, where `tf.summary.scalar` takes 0.17 s, one eager op each); with histograms,
    `tf.summary` (the histogram summary needs TensorFlow) for all of them, one writer per
    directory either way."""

    def __init__(self, log_dir, histograms=False):
        self.log_dir = log_dir
        self._tf = None
        self._writer = None
        if histograms:
            try:
                import tensorflow as tf

                self._tf = tf
                with tf.device("/cpu:0"):
                    self._writer = tf.summary.create_file_writer(log_dir)
                return
            except ImportError:
                warnings.warn("LayerStatsLogger: histograms need TensorFlow (tf.summary); "
                              "logging the scalars only.")
        try:
            from tensorboard.summary import Writer
        except ImportError:
            warnings.warn("LayerStatsLogger: tensorboard is not importable; TensorBoard "
                          "logging is disabled.")
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
        else:
            for tag, value in scalars:
                self._writer.add_scalar(tag, value, step=int(step))
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close() if self._tf is None else self._writer.flush()


@dataclasses.dataclass(frozen=True)
class LoggerState:
    """What a logger carries from one log to the next: the global step of its last log and,
    per tracked layer path, the weights there (the reference of the next ``update_ratio``).
    ``LayerStatsLogger.state`` gives it, ``LayerStatsLogger.resume`` takes it back."""

    step: int
    weights: dict


class LayerStatsLogger(keras.callbacks.Callback):
    """Log per-layer activation and gradient statistics of a fixed probe batch during `fit()`.

    At train begin (step 0: the state at initialization), every `every_n_steps` training steps
    (a global step counter across epochs, started from `optimizer.iterations`) and at every
    epoch end, the probe batch (x, y) is run forward and backward through the model and one
    record per tracked layer is stored (fields: `run_files.LAYER_STATS_FIELDS`, the contract
    in CONTRIBUTING.md):

    * ``activation_mean``, ``activation_std``: of the layer's output a^l on the probe;
    * ``zero_fraction``: fraction of exact zeros of a^l (dead ReLUs);
    * ``saturated_fraction``: tanh layers |a| > 0.97, sigmoid layers a outside [0.03, 0.97],
      decided from the layer's own activation (0 for every other layer);
    * ``activation_grad_std``: std of dL/da^l; ``weight_std``, ``weight_grad_std``: std of the
      layer's kernel W^l (else embeddings, else BN gamma; null for layers without weights) and
      of dL/dW^l;
    * ``update_ratio``: ||W_now - W_prev|| / ||W_prev|| between this log and the previous one
      (null at the first log; a logger given an interrupted one's ``state`` through
      ``resume`` compares with the weights of that one's last log);
    * ``nan_count``, ``inf_count``: NaN/Inf entries in a^l, dL/da^l, W^l and dL/dW^l together.
      A diverging network is logged (statistics NaN, counts > 0); the logger never raises.

    Loss of the probe's backward pass: `loss=` when given; else the model's compiled loss
    (`model.loss`, a name, a `keras.losses.Loss` or a function) when there is a single one and
    it accepts the probe's y; otherwise cross-entropy: sparse if y holds integer labels,
    categorical if y is one-hot, from logits unless the last layer applies a softmax. A model
    with several outputs needs `loss=` (a function of the output structure; y may then be any
    structure of arrays): the default loss refuses it at train begin
    (`instrument.MultiOutputError`).

    Any Keras model (Sequential, Functional, nested, subclassed): `layer` is the layer's path
    (`backbone/conv1`), and a layer called k > 1 times per forward pass gives one record per
    call, `path#1` ... `path#k`.

    Sinks: TensorBoard scalars `layer_stats/<statistic>/<layer>` in `log_dir` (one chart per
    statistic, every layer on it), optional histograms `layer_hist/activation/<layer>` and
    `layer_hist/activation_grad/<layer>`; `.history` (list of records) and `.to_dataframe()`;
    and a JSON-lines file `jsonl_path` (appended, flushed after every log, NaN/Inf as null) that
    another process can tail while training runs (ignore a last line without a newline).

    Cost (TensorFlow): a probe log is one forward and backward pass of the probe batch, about
    2-4 training steps of the same batch size when run eagerly and 1.05-1.2 once compiled; the
    compiled probe's one-off trace pays for itself after about `probe.COMPILE_AFTER` logs, so
    a fit that plans that many logs (from `fit`'s epochs and steps) compiles from its first
    log, and a shorter one stays eager (`benchmarks/RESULTS.md`).

    Args:
        probe: `(x, y)` fixed batch (numpy); y integer labels or one-hot (any structure of
            arrays with `loss=`).
        log_dir: TensorBoard log directory, or None for no TensorBoard output.
        every_n_steps: log every this many training steps (None: only at train begin and epoch
            ends).
        layers: track only these layers: names or paths (`backbone/conv1`), layer classes or
            class-name strings. Default: layers with a kernel (Dense, Conv, ...), activation
            layers and normalization layers (batch, layer, group), at any depth of nested
            models.
        exclude: layers to leave out (same forms).
        histograms: also write activation and activation-gradient histograms (TensorBoard).
        jsonl_path: path of the JSON-lines file, or None.
        training: the `training` flag of the probe's forward pass (default False: inference
            mode; True uses batch statistics in batch norm; the model is never changed).
        log_on_epoch_end: log at every epoch end (default True).
        loss: the probe's loss: a Keras loss name, `keras.losses.Loss` or function
            `loss(y_true, y_pred)` (None: the compiled loss, else cross-entropy, above).

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
                 histograms=False, jsonl_path=None, training=False, log_on_epoch_end=True,
                 loss=None):
        super().__init__()
        if not isinstance(probe, (tuple, list)) or len(probe) != 2:
            raise ValueError(
                "`probe` must be a pair (x, y) of arrays: a fixed batch and its labels. "
                f"Received: {type(probe).__name__}"
                + (f" of length {len(probe)}" if isinstance(probe, (tuple, list)) else "") + "."
            )
        x, y = probe
        x_arrays = batch_checks.as_arrays(keras.tree.flatten(x), "LayerStatsLogger's probe")
        y = keras.tree.map_structure(np.asarray, y)
        n_x = [len(a) for a in x_arrays]
        n_y = [np.shape(t)[0] if np.ndim(t) else None for t in keras.tree.flatten(y)]
        if len(set(n_x)) != 1 or set(n_y) != set(n_x):
            raise ValueError(
                "`probe` x and y must hold the same number of samples, each array with a batch "
                f"axis. Received: x with {n_x} samples, y with {n_y} (None: a scalar)."
            )
        if every_n_steps is not None and (
                isinstance(every_n_steps, bool) or not isinstance(every_n_steps, (int, np.integer))
                or every_n_steps < 1):
            raise ValueError(
                "`every_n_steps` must be a positive integer or None. "
                f"Received: every_n_steps={every_n_steps!r}."
            )
        self.probe_x = keras.tree.map_structure(np.asarray, x)
        batch_checks.check_finite(keras.tree.flatten(self.probe_x), "LayerStatsLogger's probe")
        self.probe_y = y
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self._layers_match, self._layers_specs = _matcher(layers, "layers")
        self._exclude_match, self._exclude_specs = _matcher(exclude, "exclude")
        self.histograms = bool(histograms)
        self.jsonl_path = None if jsonl_path is None else os.fspath(jsonl_path)
        self.training = bool(training)
        self.log_on_epoch_end = bool(log_on_epoch_end)
        self.loss = None if loss is None else instrument.get_loss(loss)

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
        self._skip_start_log = False
        #: The step of the interrupted logger's last log (`resume`): the first `update_ratio`
        #: refers to it. None for a logger that was not resumed.
        self.resumed_from_step = None

    # -- setup -------------------------------------------------------------------------------

    def _select_layers(self, model):
        """The tracked `instrument.LayerSite`s: the default selection or `layers=`, less
        `exclude=`. Layers inside a recurrent layer's loop cannot be tracked: an explicit
        selection of one is an error, the default selection leaves them out with a warning."""
        candidates = instrument.layer_sites(model)
        if self._layers_match is None:
            chosen = [s for s in candidates if _is_default_tracked(s.layer)]
            instrument.warn_kernel_less(instrument.kernel_less_weight_layers(candidates),
                                        "LayerStatsLogger", "Track them with `layers=`.")
        else:
            chosen = [s for s in candidates
                      if any(self._layers_match(s, spec) for spec in self._layers_specs)]
            for spec in self._layers_specs:
                if not any(self._layers_match(s, spec) for s in candidates):
                    raise ValueError(
                        f"`layers` entry {spec!r} matches no layer of model {model.name!r}. "
                        f"Allowed: a layer name or path among {[s.path for s in candidates]}, "
                        "or a layer type."
                    )
        if self._exclude_match is not None:
            chosen = [s for s in chosen
                      if not any(self._exclude_match(s, spec) for spec in self._exclude_specs)]
        if self._layers_match is None:
            chosen = instrument.outside_loops(
                chosen, "LayerStatsLogger", " Track the RNN layer itself with `layers=`.")
        if not chosen:
            raise ValueError(
                f"LayerStatsLogger tracks no layer of model {model.name!r} with "
                f"layers={self._layers_specs or None!r}, exclude={self._exclude_specs or None!r}."
            )
        return chosen

    def _compiled_loss(self, model):
        """The model's compiled loss when there is one (a one-entry list or dict, as
        `compile(loss=["mse"])` writes it, is that entry), else None."""
        loss = getattr(model, "loss", None)
        if isinstance(loss, (list, tuple)) and len(loss) == 1:
            loss = loss[0]
        elif isinstance(loss, dict) and len(loss) == 1:
            (loss,) = loss.values()
        if loss is None or isinstance(loss, (dict, list, tuple)):
            return None
        if isinstance(loss, str):
            try:
                return keras.losses.get(loss)
            except Exception:
                return None
        return loss if callable(loss) else None

    def _build(self):
        """The probe and its loss: `loss=`, else the compiled loss, else cross-entropy. Its
        first pass, kept for the step-0 log, checks that the loss accepts the probe's y: a
        compiled loss that does not falls back to cross-entropy with a warning; `loss=` and
        cross-entropy raise."""
        model = self.model
        self.tracked_layers = self._select_layers(model)
        self._probe = None
        if self.loss is not None:
            self._start_probe(self.loss, "argument")
            return
        compiled = self._compiled_loss(model)
        if compiled is not None:
            try:
                self._start_probe(compiled, "compiled")
            except instrument.UnsupportedLayerError:
                raise
            except Exception as e:  # a compiled loss that does not fit the probe's y
                self._check_probe_fits(model)
                warnings.warn(
                    f"LayerStatsLogger: the model's compiled loss does not accept the probe "
                    f"({type(e).__name__}: {str(e)[:200]}); using cross-entropy instead.")
        if self._probe is None:
            loss, self._y = instrument.default_loss(model, self.probe_y)
            self._start_probe(loss, "cross_entropy")

    def _check_probe_fits(self, model):
        """Raise, naming the probe, when its x itself does not go through `model` (so that the
        failure is not blamed on the compiled loss)."""
        try:
            model(self._x, training=False)
        except Exception as e:
            shapes = keras.tree.map_structure(lambda a: tuple(a.shape), self.probe_x)
            raise ValueError(
                f"LayerStatsLogger's probe x does not fit model {model.name!r}. Received: x of "
                f"shape {shapes}; the model says: {type(e).__name__}: {str(e)[:300]}. Allowed: "
                "a batch shaped like the model's training inputs, e.g. (x_train[:128], "
                "y_train[:128]).") from e

    def _start_probe(self, loss, source):
        probe = LayerProbe(self.model, self.tracked_layers, loss, training=self.training,
                           return_tensors=self.histograms,
                           eager_calls=eager_calls_for(self._planned_logs()))
        self._first_out = probe(self._x, self._y)
        self._probe, self._probe_model, self.loss_source = probe, self.model, source

    def _planned_logs(self):
        """How many logs this fit will make, counted from `fit`'s `epochs` and `steps` (None
        when unknown): train begin, each multiple of every_n_steps, each epoch end."""
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        if not epochs or not steps:
            return None
        start, n = self._step, self.every_n_steps
        ends = [start + k * steps for k in range(1, epochs + 1)] if self.log_on_epoch_end else []
        crossed = (start + epochs * steps) // n - start // n if n is not None else 0
        return 1 + crossed + sum(1 for end in ends if n is None or end % n)

    def _prepare_inputs(self):
        """The probe batch as backend tensors, converted once."""
        self._x = keras.tree.map_structure(keras.ops.convert_to_tensor, self.probe_x)
        self._y = keras.tree.map_structure(keras.ops.convert_to_tensor, self.probe_y)

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
            recording, self._first_out = self._first_out, None
            if recording is None:
                recording = self._probe(self._x, self._y)
        except Exception as e:  # never let the logger end a training run
            warnings.warn(f"LayerStatsLogger: probe failed at step {step}: "
                          f"{type(e).__name__}: {e}")
            return
        records = [self._record(call, i, step, epoch)
                   for i, call in enumerate(recording.records)]
        self.history.extend(records)
        if self.jsonl_path is not None:
            append_jsonl(self.jsonl_path, records)
        if self._writer is not None:
            self._write_tensorboard(step, records, recording)

    def _record(self, call, index, step, epoch):
        """One record (`run_files.LAYER_STATS_FIELDS`) of a recorded layer call."""
        row = {name: float(call.stats[name]) for name in STAT_NAMES}
        update_ratio = self._update_ratio(call)
        if tracked_weight(call.layer) is None:
            row["weight_std"] = row["weight_grad_std"] = None
        count = lambda v: int(v) if math.isfinite(v) else None  # noqa: E731
        return {
            "step": int(step), "epoch": int(epoch), "layer": call.name,
            "layer_index": index, "layer_type": type(call.layer).__name__,
            "follows_previous": call.follows_previous,
            "activation_mean": row["activation_mean"],
            "activation_std": row["activation_std"],
            "zero_fraction": row["zero_fraction"],
            "saturated_fraction": row["saturated_fraction"],
            "activation_grad_std": row["activation_grad_std"],
            "weight_std": row["weight_std"],
            "weight_grad_std": row["weight_grad_std"],
            "update_ratio": update_ratio,
            "nan_count": count(row["nan_count"]), "inf_count": count(row["inf_count"]),
        }

    def _update_ratio(self, call):
        """||W_now - W_prev|| / ||W_prev|| since the previous log (None at the first)."""
        w = tracked_weight(call.layer)
        if w is None:
            return None
        w_now = _variable_to_numpy(w)
        prev = self._prev_weights.get(call.name)
        self._prev_weights[call.name] = w_now
        if prev is None:
            return None
        with np.errstate(all="ignore"):
            denom = np.linalg.norm(prev)
            return float(np.linalg.norm(w_now - prev) / denom) if denom > 0 else float("nan")

    def _write_tensorboard(self, step, records, recording):
        scalars = [(f"layer_stats/{field}/{record['layer']}", float(record[field]))
                   for record in records for field in LAYER_STATS_VALUES
                   if record[field] is not None]
        hists = []
        if self.histograms:
            for call in recording.records:
                hists.append((f"layer_hist/activation/{call.name}", call.stats["activation"]))
                hists.append((f"layer_hist/activation_grad/{call.name}",
                              call.stats["activation_grad"]))
        try:
            self._writer.write(step, scalars, hists)
        except Exception as e:
            warnings.warn(f"LayerStatsLogger: TensorBoard write failed at step {step}: {e}")

    # -- state across a restart --------------------------------------------------------------

    @property
    def state(self):
        """The ``LoggerState`` after the last log (None before the first): what a backup keeps
        so that a resumed run's ``update_ratio`` refers to the same weights."""
        if self._last_logged_step is None:
            return None
        return LoggerState(self._last_logged_step, dict(self._prev_weights))

    def resume(self, state, log_at_start):
        """Go on from ``state``, the ``state`` of an interrupted logger: its next
        ``update_ratio`` compares with ``state.weights``. ``log_at_start``: the step training
        resumes at is one the uninterrupted run logs (every ``every_n_steps``, an epoch's end)
        and ``state.step`` is earlier; else the first train begin does not log."""
        self._prev_weights = dict(state.weights)
        self._last_logged_step = self.resumed_from_step = int(state.step)
        self._skip_start_log = not log_at_start

    # -- Keras hooks -------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        start = self._current_step_from_optimizer()
        if start is not None:
            self._step = start
        if self._probe is None or self._probe_model is not self.model:
            self._prepare_inputs()
            if not self.model.built or any(not site.layer.built
                                           for site in instrument.layer_sites(self.model)):
                # a subclassed model (`model.build(shape)` leaves its sublayers unbuilt, and
                # on TF fit builds it later): its first call builds them
                self.model(self._x, training=False)
            self._build()
        if self.jsonl_path is not None:
            parent = os.path.dirname(os.path.abspath(self.jsonl_path))
            os.makedirs(parent, exist_ok=True)
        if self.log_dir is not None and self._writer is None:
            self._writer = _SummaryWriter(self.log_dir, histograms=self.histograms)
        self._epoch_base = self._step
        if not self._skip_start_log:
            self._log(self._step, self._epoch)
        self._skip_start_log = False
        self._first_out = None   # the build's pass belongs to this step only

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        self._epoch_base = self._step

    def on_train_batch_begin(self, batch, logs=None):
        # `batch` batches of this epoch are done. Logging here, before the next step, and not
        # in on_train_batch_end keeps Keras's asynchronous dispatch of batch-end callbacks on.
        self._advance(self._epoch_base + int(batch))

    def on_epoch_end(self, epoch, logs=None):
        done = self._current_step_from_optimizer()
        if done is None:
            per_epoch = (self.params or {}).get("steps")
            done = self._epoch_base + per_epoch if per_epoch else self._step
        self._advance(done)
        if self.log_on_epoch_end:
            self._log(self._step, int(epoch))

    def _advance(self, step):
        """The global step is now `step`: log if it crossed a multiple of every_n_steps."""
        prev = self._step
        self._step = max(int(step), prev)
        n = self.every_n_steps
        if n is not None and self._step // n != prev // n:
            self._log(self._step, self._epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.write(self._step, [])

    # -- results -----------------------------------------------------------------------------

    def to_dataframe(self):
        """The records as a pandas DataFrame (columns `LAYER_STATS_FIELDS`, null -> NaN)."""
        import pandas as pd

        df = pd.DataFrame(self.history, columns=list(LAYER_STATS_FIELDS))
        for field in LAYER_STATS_VALUES:
            df[field] = pd.to_numeric(df[field], errors="coerce").astype("float64")
        return df

