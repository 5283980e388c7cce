"""`DiagnosisLogger`: the diagnosis of `keras_varinit.diagnosis`, live during `fit()`.

It reads what a `LayerStatsLogger` records (its `.history`, incrementally) and the batch losses,
runs the rules as the records arrive, and emits each new finding once: a console warning line,
TensorBoard text (`diagnosis/<kind>`), and a line of `findings.jsonl` when given a path.
"""
import collections
import logging
import os

import keras
import numpy as np

from keras_varinit import instrument
from keras_varinit.diagnosis import Context, Diagnoser, findings_dataframe, write_findings
from keras_varinit.layer_stats_logger import LayerStatsLogger

#: Console lines go to this logger (Python's last-resort handler prints warnings to stderr when
#: the application configured none).
LOG = logging.getLogger("keras_varinit.diagnosis")

#: Inputs of the probe batch the init profile is measured on (`profile=True`).
PROFILE_IMAGES = 32

_SHAPE_ONLY_LAYERS = (keras.layers.InputLayer, keras.layers.Flatten, keras.layers.Reshape,
                      keras.layers.Permute, keras.layers.Dropout, keras.layers.Identity)
#: Before the first weight layer, layers that are part of its geometry, not a rescaling of the
#: input (`model_input_layers` leaves them out).
_GEOMETRY_LAYERS = _SHAPE_ONLY_LAYERS + (
    keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D)


# --------------------------------------------------------------------------------------------
# what the model tells about the run

def _activation_name(layer):
    """The nonlinearity a layer applies, or None (linear, softmax, or none)."""
    if isinstance(layer, keras.layers.LeakyReLU):
        return "leaky_relu"
    if isinstance(layer, keras.layers.ReLU):
        return "leaky_relu" if float(getattr(layer, "negative_slope", 0.0) or 0.0) > 0 else "relu"
    if isinstance(layer, keras.layers.ELU):
        return "elu"
    fn = getattr(layer, "activation", None)
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", None)
    return None if name in (None, "linear", "softmax") else name


def hidden_activation(model):
    """The most common nonlinearity among the model's layers, or None."""
    names = [n for n in (_activation_name(site.layer) for site in instrument.layer_sites(model))
             if n]
    return collections.Counter(names).most_common(1)[0][0] if names else None


def _first_weight_site(sites):
    return next((s for s in sites if instrument.is_weight_layer(s.layer)), None)


def _leaves_before(sites, first):
    """The leaf layers' sites before the weight layer `first` (none without one)."""
    return [s for s in sites[:first.position] if s.is_leaf] if first is not None else []


def model_input_layers(model):
    """The paths of the leaf layers before the first weight layer that rescale the input (a
    keras.applications net's `Rescaling` and `Normalization`), not reshape or pad it."""
    sites = instrument.layer_sites(model)
    return tuple(s.path for s in _leaves_before(sites, _first_weight_site(sites))
                 if not isinstance(s.layer, _GEOMETRY_LAYERS))


def _first_layer_input(model, x):
    """The first weight layer's input on the batch `x`: `x` itself when only shape-changing
    layers come before it, else a sub-model's output; None when that cannot be built."""
    sites = instrument.layer_sites(model)
    first = _first_weight_site(sites)
    if first is None or isinstance(x, (list, tuple, dict)) or \
            len(getattr(model, "inputs", None) or ()) != 1:
        return None
    if all(isinstance(s.layer, _SHAPE_ONLY_LAYERS) for s in _leaves_before(sites, first)):
        return np.asarray(x)
    try:
        sub = keras.Model(model.inputs[0], first.layer.input)
        return keras.ops.convert_to_numpy(sub(x, training=False))
    except Exception:  # nested or subclassed models: the input is not reachable
        return None


def _learning_rate(model):
    """The optimizer's current learning rate (float32 rounded to 6 digits), or None."""
    try:
        return float(f"{float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)):.6g}")
    except Exception:  # no optimizer, or a schedule that needs more than the current step
        return None


def model_context(model, x=None, context=None):
    """A `Context` for `model`: the fields `context` leaves empty are read from the model
    (classes from the output's last dimension, batch normalization layers, the hidden
    activation, the optimizer's learning rate, `model_input_layers`) and from `x`, a batch of
    inputs (mean and std of the first weight layer's input). The batch size cannot be read:
    give it in `context`."""
    given = context or Context()
    outputs = getattr(model, "outputs", None) or []
    num_classes = int(outputs[0].shape[-1]) if len(outputs) == 1 and \
        outputs[0].shape[-1] is not None else None
    mean = std = None
    inputs = _first_layer_input(model, x) if x is not None else None
    if inputs is not None:
        inputs = np.asarray(inputs, dtype=np.float64)
        mean, std = float(inputs.mean()), float(inputs.std())
    bn = tuple(site.path for site in instrument.layer_sites(model)
               if isinstance(site.layer, keras.layers.BatchNormalization))
    return Context(
        num_classes=given.num_classes if given.num_classes is not None else num_classes,
        batch_size=given.batch_size,
        batch_norm_layers=given.batch_norm_layers or bn,
        activation=given.activation or hidden_activation(model),
        lr=given.lr if given.lr is not None else _learning_rate(model),
        input_mean=given.input_mean if given.input_mean is not None else mean,
        input_std=given.input_std if given.input_std is not None else std,
        input_layers=given.input_layers or model_input_layers(model))


# --------------------------------------------------------------------------------------------
# TensorBoard text

class _TensorFlowText:
    """`tf.summary.text` into `log_dir`."""

    def __init__(self, log_dir, tf):
        self._tf = tf
        with tf.device("/cpu:0"):
            self._writer = tf.summary.create_file_writer(log_dir)

    def write(self, tag, text, step):
        with self._tf.device("/cpu:0"), self._writer.as_default(step=int(step)):
            self._tf.summary.text(tag, text)
        self._writer.flush()

    def close(self):
        self._writer.flush()


class _EventFileText:
    """TensorFlow-free text summaries: tensorboard's text protobuf through its event writer."""

    def __init__(self, log_dir):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(log_dir, exist_ok=True)
        self._writer = EventFileWriter(log_dir)

    def write(self, tag, text, step):
        import time

        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.text.summary_v2 import text_pb

        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=text_pb(tag, text))
        self._writer.add_event(event)
        self._writer.flush()

    def close(self):
        self._writer.close()


def text_writer(log_dir):
    """Text summaries the way `LayerStatsLogger` writes scalars: `tf.summary` when TensorFlow
    is importable, else tensorboard's own TF-free writer."""
    try:
        import tensorflow as tf
    except ImportError:
        return _EventFileText(log_dir)
    return _TensorFlowText(log_dir, tf)


def _markdown(finding):
    changes = ", ".join(f"`{k}={v!r}`" for k, v in finding.suggestion.changes.items())
    return (f"**{finding.kind.value}** ({finding.severity.value}), step {finding.step}: "
            f"{finding.message}\n\n**Suggestion**: {finding.suggestion.text}"
            + (f"\n\nConfiguration change: {changes}" if changes else ""))


# --------------------------------------------------------------------------------------------
# the callback

class DiagnosisLogger(keras.callbacks.Callback):
    """Diagnose a run while `fit()` runs, from what a `LayerStatsLogger` records.

    Give it the logger and put both in `callbacks=` (in any order: it reads the logger's new
    records at every batch end, epoch end and train end, so a logger placed after it is read
    one batch later, never missed). At train begin it fills a `Context` from the model
    (classes, batch normalization layers, activation, learning rate, the probe's input
    statistics; the batch size only from `context=`), then emits each new finding once:

    * a console warning line (Python logger `keras_varinit.diagnosis`) when `verbose`;
    * TensorBoard text `diagnosis/<kind>` in `log_dir`, at the finding's step;
    * a JSON line (`Finding.to_dict()`) appended to `jsonl_path`;
    * `.findings` (list of `Finding`) and `.to_dataframe()`.

    Losses are Keras's `logs["loss"]` per batch (the running mean over the epoch). A
    non-finite loss is reported at the next logged step (naming the first layer whose
    statistics are non-finite) or at train end.

    Args:
        logger: the run's `kv.callbacks.LayerStatsLogger`.
        profile: the init profile, for the theory's predictions in the evidence and to tell a
            mismatched initializer from depth: True (default) measures it at train begin
            (`kv.variance_profile(..., gradients=False)`: one forward pass of the first
            `PROFILE_IMAGES` probe inputs, no backward predictions); or `kv.variance_profile`'s
            DataFrame; or None (no profile).
        context: a `kv.diagnosis.Context`; its empty fields are read from the model.
        log_dir: TensorBoard log directory, or None.
        jsonl_path: path of the findings' JSON-lines file (appended), or None.
        verbose: 1: a warning line per finding; 0: silent.
        earlier: findings this run reported before (a resumed run's `findings.jsonl`): not
            reported again.

    Example:

    ```python
    logger = kv.callbacks.LayerStatsLogger((x[:256], y[:256]), every_n_steps=50)
    doctor = kv.callbacks.DiagnosisLogger(logger, context=kv.diagnosis.Context(batch_size=64),
                                          jsonl_path="runs/a/findings.jsonl")
    model.fit(x, y, batch_size=64, callbacks=[logger, doctor])
    doctor.to_dataframe()
    ```
    """

    def __init__(self, logger, profile=True, context=None, log_dir=None, jsonl_path=None,
                 verbose=1, earlier=()):
        super().__init__()
        if not isinstance(logger, LayerStatsLogger):
            raise ValueError("DiagnosisLogger reads the records of a LayerStatsLogger. "
                             f"Received: logger of type {type(logger).__name__}. Allowed: a "
                             "kv.callbacks.LayerStatsLogger, also given to fit(callbacks=...)")
        if profile is not None and not isinstance(profile, bool) and \
                not hasattr(profile, "columns"):
            raise ValueError("`profile` must be kv.variance_profile's DataFrame, True (measure "
                             f"at train begin) or None. Received: {type(profile).__name__}")
        if context is not None and not isinstance(context, Context):
            raise ValueError("`context` must be a kv.diagnosis.Context or None. Received: "
                             f"{type(context).__name__}")
        self.logger = logger
        self.profile = None if profile is False else profile
        self.context = context
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.jsonl_path = None if jsonl_path is None else os.fspath(jsonl_path)
        self.verbose = int(verbose)
        self.earlier = tuple(earlier)
        self.engine = None
        self._engine_model = None
        self._writer = None
        self._read = 0
        self._losses = []
        self._step = 0
        self._epoch_base = 0

    @property
    def findings(self):
        """The findings so far (`kv.diagnosis.Finding`), in the order they were found."""
        return [] if self.engine is None else list(self.engine.findings)

    def to_dataframe(self):
        """The findings as a DataFrame (`kv.diagnosis.findings_dataframe`)."""
        return findings_dataframe(self.findings)

    # -- Keras hooks -------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if self.engine is None or self._engine_model is not self.model:
            self._start_engine()
        self._step = self._optimizer_step()
        self._epoch_base = self._step

    def _optimizer_step(self):
        """Steps done so far (`optimizer.iterations`; 0 without an optimizer)."""
        try:
            return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        except Exception:  # a model without an optimizer: count from 0
            return 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_base = self._step

    def on_train_batch_end(self, batch, logs=None):
        self._step = max(self._epoch_base + int(batch) + 1, self._step + 1)
        loss = (logs or {}).get("loss")
        if loss is not None:
            self._losses.append((self._step, float(loss)))
        if len(self.logger.history) > self._read:
            self._evaluate()

    def on_epoch_end(self, epoch, logs=None):
        self._evaluate()

    def on_train_end(self, logs=None):
        self._evaluate()
        if self.logger.model is not self.model:
            LOG.warning("DiagnosisLogger: its LayerStatsLogger was not part of this fit(): "
                        "give both to fit(callbacks=[logger, diagnosis]).")
        self._publish(self.engine.finish())
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- work --------------------------------------------------------------------------------

    def _start_engine(self):
        profile = self.profile
        if profile is True:  # measured at initialization only (not when fit resumes a run)
            profile = self._measure_profile() if self._optimizer_step() == 0 else None
        context = model_context(self.model, self.logger.probe_x, self.context)
        self._read = self._first_new_record()
        # a resumed logger's first update ratio spans the steps since the interrupted log
        previous = self.logger.resumed_from_step if self._read == 0 else None
        self.engine = Diagnoser(profile, context, earlier=self.earlier,
                                previous_log_step=previous)
        self._engine_model = self.model
        self._losses = []

    def _first_new_record(self):
        """Index of this fit's first record in the logger's history: records of earlier fits
        are left out; the train-begin records a logger placed first has just written are kept."""
        history = self.logger.history
        start = self._optimizer_step()
        i = len(history)
        while i > 0 and history[i - 1]["step"] == start:
            i -= 1
        return i

    def _measure_profile(self):
        """`variance_profile` forward only, on the first `PROFILE_IMAGES` probe inputs."""
        from keras_varinit.diagnostics import variance_profile

        x = keras.tree.map_structure(lambda t: t[:PROFILE_IMAGES], self.logger.probe_x)
        try:
            return variance_profile(self.model, x, gradients=False)   # forward: no labels
        except (ValueError, RuntimeError) as error:  # a model the profile does not support
            LOG.warning(f"DiagnosisLogger: no init profile ({type(error).__name__}: {error}); "
                        "the findings will carry no predicted values.")
            return None

    def _evaluate(self):
        history = self.logger.history
        records, self._read = history[self._read:], len(history)
        losses, self._losses = self._losses, []
        if records or losses:
            self._publish(self.engine.update(records, losses))

    def _publish(self, findings):
        if findings and self.log_dir is not None and self._writer is None:
            # opened at the first finding: a run without findings gets no extra event file
            self._writer = text_writer(self.log_dir)
        for finding in findings:
            if self.verbose:
                LOG.warning(f"keras_varinit diagnosis: {finding}. Suggestion: "
                            f"{finding.suggestion.text}")
            if self._writer is not None:
                self._writer.write(f"diagnosis/{finding.kind.value}", _markdown(finding),
                                   finding.step)
        if findings and self.jsonl_path is not None:
            write_findings(self.jsonl_path, findings)
