"""The callbacks ``run_training`` adds to ``fit``: ``RunControl`` (status, steps.jsonl and
metrics.csv, divergence and stop handling) and ``tensorboard_callback`` (epoch metrics); the
backups are ``training.backup.RunBackup``'s. What they find out is kept in a ``RunProgress``.

Steps are global (the optimizer's iteration count), so the callbacks work alike when ``fit``
starts at an epoch boundary and when a resumed run continues an epoch from its middle."""
import dataclasses
import math
import pathlib
import time

import keras
import numpy as np

from keras_varinit import run_files as rf
from keras_varinit.run_files import RunState
from keras_varinit.training.mode_eval import ModeEvaluator


@dataclasses.dataclass
class RunProgress:
    """Where a run stands, as the callbacks saw it. ``state`` stays None while the run goes
    on; the callbacks set it to STOPPED or DIVERGED when they end it early."""

    state: RunState | None = None
    error: str | None = None
    step: int = 0
    total_steps: int | None = None
    epochs_completed: int = 0
    last_metrics: dict | None = None


class Throughput:
    """Images per second over the recent training batches, and the ETA of the run."""

    def __init__(self, window=20):
        self.window = window
        self._times = []
        self._start = None
        self._start_step = 0

    def reset_window(self):
        self._times = []

    def batch_end(self, step):
        now = time.perf_counter()
        if self._start is None:
            # The first batch includes tracing/compilation: measure from its end.
            self._start, self._start_step = now, step
        self._times.append(now)
        self._times = self._times[-(self.window + 1):]

    def images_per_second(self, batch_size):
        if len(self._times) < 2:
            return None
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) * batch_size / span if span > 0 else None

    def eta_seconds(self, step, total_steps):
        if self._start is None or step <= self._start_step:
            return None
        per_step = (time.perf_counter() - self._start) / (step - self._start_step)
        return max(0.0, (total_steps - step) * per_step)


def _float(value):
    """A logged metric as a Python float (None if absent or not a number)."""
    try:
        return None if value is None else float(np.asarray(value))
    except (TypeError, ValueError):
        return None


class RunControl(keras.callbacks.Callback):
    """Writes steps.jsonl and metrics.csv, keeps status.json up to date (through the run's
    ``StatusWriter``), ends the run when the loss is NaN/Inf (DIVERGED) or a stop is requested
    (STOPPED, after the current batch; an evaluation in progress is cut short).

    Args:
        progress: the ``RunProgress`` it updates.
        status: the run's ``run_files.StatusWriter``.
        steps_path, metrics: steps.jsonl's path and the ``run_files.MetricsCsv``.
        stop_requested: a callable, true once the run should stop.
        steps_per_epoch, epochs, batch_size, log_every: as in the config.
        train_slice: ``(x, y)``, training images evaluated after each epoch in training and
            in inference mode (``mode_eval.ModeEvaluator``: metrics.csv's ``train_mode_*``
            and ``train_eval_*``, also passed on in the epoch's logs); None: not measured.
    """

    def __init__(self, progress, status, steps_path, metrics, stop_requested, *,
                 steps_per_epoch, epochs, batch_size, log_every, verbose=0, train_slice=None):
        super().__init__()
        self.progress = progress
        self.status = status
        self.steps_path = steps_path
        self.metrics = metrics
        self.stop_requested = stop_requested
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.batch_size = batch_size
        self.log_every = log_every
        self.verbose = verbose
        self.train_slice = train_slice
        self._modes = None   # the ModeEvaluator (compiled once, at the first epoch's end)
        self.throughput = Throughput()
        self.epoch = 0
        self.epoch_start_step = 0
        self.batches_in_epoch = 0
        self.epoch_interrupted = False   # the run ended inside this epoch
        self.eval_cut = False            # its validation was cut short
        self._epoch_start = None

    def on_train_begin(self, logs=None):
        # The optimizer's iteration count: 0, or the step of the backup a run resumed from.
        start_step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.progress.step = start_step
        self.progress.total_steps = self.epochs * self.steps_per_epoch
        self.status.update(state=RunState.RUNNING, phase="training",
                           epoch=start_step // self.steps_per_epoch + 1, step=start_step,
                           total_steps=self.progress.total_steps)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epoch_start_step = epoch * self.steps_per_epoch
        self.batches_in_epoch = self.progress.step - self.epoch_start_step
        self.epoch_interrupted = False
        self.eval_cut = False
        self._epoch_start = time.perf_counter()
        self.throughput.reset_window()
        self.status.update(epoch=epoch + 1, phase="training")

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        step = self.progress.step = self.progress.step + 1
        self.batches_in_epoch = step - self.epoch_start_step
        self.throughput.batch_end(step)
        loss = _float(logs.get("loss"))
        if step % self.log_every == 0 or self.batches_in_epoch == self.steps_per_epoch:
            accuracy = _float(logs.get("accuracy", logs.get("compile_metrics")))
            rf.append_jsonl(self.steps_path, [{"step": step, "epoch": self.epoch + 1,
                                               "loss": loss, "accuracy": accuracy}])
        self.status.update(
            step=step, images_per_second=self.throughput.images_per_second(self.batch_size),
            eta_seconds=self.throughput.eta_seconds(step, self.progress.total_steps))
        if loss is not None and not math.isfinite(loss):
            self._end(RunState.DIVERGED, f"loss became {loss} at step {step} "
                                         f"(epoch {self.epoch + 1}); training stopped")
        elif self.stop_requested():
            self._end(RunState.STOPPED)

    def _end(self, state, error=None):
        """End the run after this batch, in ``state``."""
        self.progress.state, self.progress.error = state, error
        if error and self.verbose:
            print(f"\nDiverged: {error}", flush=True)
        self.epoch_interrupted = self.batches_in_epoch < self.steps_per_epoch
        self.model.stop_training = True

    def on_test_begin(self, logs=None):
        self.status.update(phase="validation")

    def on_test_batch_end(self, batch, logs=None):
        if self.progress.state is not None or self.stop_requested():
            if self.progress.state is None:
                self.progress.state = RunState.STOPPED
            self.eval_cut = True
            self.model.stop_evaluating = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.epoch_interrupted:
            return  # a partial epoch gets no metrics.csv row
        self.progress.epochs_completed = epoch + 1
        row = {"epoch": epoch + 1, "loss": _float(logs.get("loss")),
               "accuracy": _float(logs.get("accuracy")),
               "val_loss": None if self.eval_cut else _float(logs.get("val_loss")),
               "val_accuracy": None if self.eval_cut else _float(logs.get("val_accuracy")),
               "seconds": round(time.perf_counter() - self._epoch_start, 3)}
        if self.train_slice is not None:
            self.status.update(phase="train/test modes")
            if self._modes is None:
                self._modes = ModeEvaluator(self.model, self.batch_size)
            modes = self._modes(*self.train_slice)
            row.update(modes)
            logs.update(modes)   # for the TensorBoard callback after this one
        self.metrics.write(row)
        self.progress.last_metrics = row
        if self.stop_requested() and self.progress.state is None:
            self.progress.state = RunState.STOPPED
            self.model.stop_training = True


def tensorboard_callback(log_dir):
    """``keras.callbacks.TensorBoard`` when TensorFlow is importable (it needs tf.summary);
    else ``EpochScalars``: the epoch metrics through tensorboard's TF-free writer (JAX)."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return EpochScalars(log_dir)
    return keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False)


class EpochScalars(keras.callbacks.Callback):
    """Epoch metrics as TensorBoard scalars (``epoch_<metric>`` in ``train/`` and
    ``validation/``) without TensorFlow; does nothing if tensorboard is not installed."""

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = pathlib.Path(log_dir)
        self.writers = None

    def on_train_begin(self, logs=None):
        try:
            from tensorboard.summary import Writer
        except ImportError:
            return
        self.writers = {split: Writer(str(self.log_dir / split))
                        for split in ("train", "validation")}

    def on_epoch_end(self, epoch, logs=None):
        if not self.writers:
            return
        for key, value in (logs or {}).items():
            split = "validation" if key.startswith("val_") else "train"
            name = "epoch_" + (key[4:] if split == "validation" else key)
            value = _float(value)
            if value is not None:
                self.writers[split].add_scalar(name, value, step=epoch)
        for writer in self.writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in (self.writers or {}).values():
            writer.close()
