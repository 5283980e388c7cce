"""``run_training``: train a ``TrainConfig`` and write its run directory (``run_files``); used
by ``keras-varinit train`` and, through it, by the explorer's worker.

A run trains ``models.plain_cnn`` or ``models.plain_mlp`` (``training.model``) on CIFAR-10 or
its synthetic stand-in (``training.data``), on the device and strategy of ``training.device``,
with the callbacks of ``training.run_control``.

Conventions of the files written:

* ``step`` counts optimizer steps (batches) from the start of the run: the first batch is step 1,
  the state at initialization is step 0 (as in the layer statistics).
* ``epoch`` in ``status.json``, ``steps.jsonl`` and ``metrics.csv`` is 1-based: in ``steps.jsonl``
  and ``status.json`` the epoch being trained (1..epochs), in ``metrics.csv`` the epoch just
  completed. ``status.json`` also carries ``epochs`` (the total) and ``phase``.
* ``loss``/``accuracy`` in ``steps.jsonl`` are Keras's running means over the current epoch (what
  the progress bar shows); ``metrics.csv`` holds the epoch means and the validation metrics.

Interruption: SIGINT (Ctrl-C) or ``stop_event.set()`` ends training after the current batch
(an evaluation in progress is cut short), writes complete logs, state "stopped", and saves the
weights and optimizer state to ``checkpoint/`` (Keras's ``BackupAndRestore`` format). With
``resume=True`` the run goes on from that checkpoint: completed epochs are not repeated; an epoch
that was interrupted restarts its pass over the data from the saved weights, and the log records
of its unfinished part are dropped so that every file stays monotonic in ``step``.

Example:

>>> from keras_varinit.training import TrainConfig, run_training
>>> config = TrainConfig(model="cnn", depth=4, width=8, data="synthetic", subset=256, epochs=1)
>>> result = run_training(config, "runs/demo")        # doctest: +SKIP
>>> result.state, result.metrics["val_accuracy"]      # doctest: +SKIP
"""
import contextlib
import dataclasses
import math
import pathlib
import shutil
import signal
import sys
import threading
import time

import keras

from keras_varinit import run_files as rf
from keras_varinit.callbacks import LayerStatsLogger
from keras_varinit.run_files import RunState
from keras_varinit.training.config import TrainConfig
from keras_varinit.training.data import data_is_synthetic, load_data
from keras_varinit.training.device import (describe_device, dtype_policy, make_strategy,
                                           strategy_scope)
from keras_varinit.training.model import compile_model
from keras_varinit.training.run_control import (RunCheckpoint, RunControl, RunProgress,
                                                tensorboard_callback)

# A status.json rewritten more recently than this belongs to a run that is still alive (its
# StatusWriter rewrites it about once a second).
ALIVE_SECONDS = 10
STATS_PROBE_IMAGES = 128   # the LayerStatsLogger's fixed probe batch
# The fixed slice of training images evaluated after each epoch in training and in inference
# mode (metrics.csv's train_mode_* and train_eval_*: batch norm's train/test discrepancy), at
# least one batch. Measured for every run: both passes over 512 images cost what evaluate()
# costs on 1024, about 1% of a default epoch (10,000 training + 10,000 validation images;
# 30-layer CNN, 2 loaded CPU cores: 7 s, plus 7-12 s compiling once per run).
TRAIN_EVAL_IMAGES = 512
EXIT_CODES = {RunState.FINISHED: 0, RunState.STOPPED: 130, RunState.DIVERGED: 3}


@dataclasses.dataclass
class TrainResult:
    """What ``run_training`` returns."""

    state: RunState                # FINISHED, STOPPED or DIVERGED
    metrics: dict                  # last completed epoch: loss, accuracy, val_loss, val_accuracy
    history: list                  # metrics.csv rows (dicts)
    run_dir: pathlib.Path
    epochs_completed: int
    step: int
    total_steps: int
    device: str
    synthetic: bool
    seconds: float
    error: str | None = None
    model: object = dataclasses.field(default=None, repr=False, compare=False)
    data: object = dataclasses.field(default=None, repr=False, compare=False)


class StopFlag:
    """True once ``stop_event`` is set or SIGINT arrived (a second SIGINT raises
    KeyboardInterrupt). A context manager: the SIGINT handler is installed inside the block
    (main thread only) and the previous one restored after it."""

    def __init__(self, stop_event, verbose):
        self.stop_event = stop_event
        self.verbose = verbose
        self.sigint = False
        self._previous = None
        self._installed = False

    def __call__(self):
        return self.sigint or (self.stop_event is not None and self.stop_event.is_set())

    def _handler(self, signum, frame):
        if self.sigint:
            raise KeyboardInterrupt
        self.sigint = True
        if self.verbose:
            print("\nInterrupted: stopping after the current batch (or before training starts) "
                  "(Ctrl-C again to abort at once).", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except (ValueError, OSError):
                self._installed = False
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
        return False


# --------------------------------------------------------------------------- the run directory

def prepare_run_dir(config, run_dir, resume, overwrite):
    """Create ``run_dir``; refuse one that holds a different run (or this run, unless resuming
    or overwriting). Returns ``(path, resuming)``."""
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"Run directory is a file. Received: run_dir={str(run_dir)!r}. "
                         "Allowed: a new or existing directory.")
    existing = rf.read_json(run_dir / rf.CONFIG_FILE)
    if overwrite:
        _remove_run_files(run_dir)
    elif existing is not None:
        _check_same_run(existing, config, run_dir)
        state = RunState.parse((rf.read_json(run_dir / rf.STATUS_FILE) or {}).get("state"))
        started = state not in (RunState.UNKNOWN, RunState.QUEUED)
        if started and not resume:
            raise ValueError(
                f"Run directory already holds this run (state {state.value!r}). Received: "
                f"run_dir={str(run_dir)!r}. Allowed: resume=True (--resume) to continue it, "
                "overwrite=True (--overwrite) to start over, or a new directory.")
        if state == RunState.RUNNING:
            _check_not_running(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, resume and started
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, False


def _remove_run_files(run_dir):
    for name in rf.RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _check_same_run(existing, config, run_dir):
    try:
        same = TrainConfig.from_dict(existing).to_dict() == config.to_dict()
    except (TypeError, ValueError):
        same = False
    if same:
        return
    keys = []
    if isinstance(existing, dict):
        keys = [k for k, v in config.to_dict().items() if existing.get(k) != v]
    diff = " (differs in: " + ", ".join(keys) + ")" if keys else ""
    raise ValueError(
        f"Run directory already holds a different run{diff}. Received: "
        f"run_dir={str(run_dir)!r}. Allowed: a new directory, or overwrite=True "
        "(--overwrite) to replace that run.")


def _check_not_running(run_dir):
    try:
        age = time.time() - (run_dir / rf.STATUS_FILE).stat().st_mtime
    except OSError:
        return
    if age < ALIVE_SECONDS:
        raise RuntimeError(f"Run in {str(run_dir)!r} is still running (status.json "
                           f"updated {age:.0f} s ago); stop it before resuming.")


def _prepare_logs(run_dir, resuming, steps_per_epoch, config, verbose):
    """Start the log files afresh, or (resuming) cut them back to the checkpoint: returns the
    number of completed epochs the run starts from."""
    checkpoint_dir = run_dir / rf.CHECKPOINT_DIR
    if not resuming:
        for name in (rf.STEPS_FILE, rf.LAYER_STATS_FILE, rf.METRICS_FILE):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return 0
    done_epochs, keep_step = 0, 0
    if checkpoint_dir.exists():
        meta = rf.read_json(checkpoint_dir / "training_metadata.json") or {}
        done_epochs = int(meta.get("epoch", 0))
        # Step of the checkpoint: completed epochs plus the batches of an interrupted one.
        keep_step = done_epochs * steps_per_epoch + int(meta.get("batch", 0) or 0)
    rf.truncate_jsonl(run_dir / rf.STEPS_FILE, lambda r: (r.get("step") or 0) <= keep_step)
    rf.truncate_jsonl(run_dir / rf.LAYER_STATS_FILE,
                      lambda r: (r.get("step") or 0) < keep_step)
    rf.MetricsCsv(run_dir / rf.METRICS_FILE).truncate(done_epochs)
    _say(verbose, f"resuming from {checkpoint_dir} at epoch {done_epochs + 1}/{config.epochs}, "
                  f"step {keep_step}")
    return done_epochs


def _train_slice(x_train, y_train, batch_size):
    """The first ``max(TRAIN_EVAL_IMAGES, batch_size)`` training images and labels."""
    n = max(TRAIN_EVAL_IMAGES, batch_size)
    return x_train[:n], y_train[:n]


def _say(verbose, text):
    if verbose:
        print(f"keras-varinit: {text}", flush=True)


# --------------------------------------------------------------------------- training

def run_training(config, run_dir, *, resume=False, overwrite=False, stop_event=None,
                 callbacks=(), verbose=1, keep_data=False):
    """Train ``config`` and write the run directory ``run_dir``; returns a ``TrainResult``.

    Args:
        config: a ``TrainConfig`` (or a dict for ``TrainConfig.from_dict``).
        run_dir: the run directory (created if needed).
        resume: continue the run already in ``run_dir`` from its checkpoint.
        overwrite: replace whatever run ``run_dir`` holds.
        stop_event: a ``threading.Event``; setting it stops after the current batch.
        callbacks: extra Keras callbacks for ``fit``.
        verbose: 0 silent, 1 progress bar and summary lines, 2 one line per epoch.
        keep_data: also return the normalized arrays in ``result.data``
            (``((x_train, y_train), (x_val, y_val))``); ``result.model`` is the trained model.

    Raises:
        ValueError: a bad config, or a run directory holding a different run.
        FileNotFoundError / RuntimeError: data that cannot be found or loaded.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()
    run_dir, resuming = prepare_run_dir(config, run_dir, resume, overwrite)
    previous = rf.read_json(run_dir / rf.STATUS_FILE) or {}
    if resuming and previous.get("state") == RunState.FINISHED:
        return _already_finished(run_dir, previous, verbose)
    started_at = (previous.get("started_at") if resuming else None) or rf.utc_now()
    with contextlib.ExitStack() as stack:
        status = stack.enter_context(rf.StatusWriter(
            run_dir / rf.STATUS_FILE, state=RunState.RUNNING, phase="starting", epoch=0, step=0,
            epochs=config.epochs, started_at=started_at))
        # SIGINT / stop_event are honoured from here on: during data loading and model
        # building the run ends before training starts; during fit after the current batch.
        stop = stack.enter_context(StopFlag(stop_event, verbose))
        stack.enter_context(dtype_policy(config.mixed_precision))
        run = _Run(config, run_dir, resuming, status, stop, verbose)
        try:
            return run.train(callbacks, keep_data)
        except KeyboardInterrupt:
            run.close(RunState.STOPPED, "aborted by a second Ctrl-C (KeyboardInterrupt)")
            raise
        except BaseException as error:
            run.close(RunState.FAILED, f"{type(error).__name__}: {error}")
            raise


def _already_finished(run_dir, status, verbose):
    history = rf.MetricsCsv(run_dir / rf.METRICS_FILE).read()
    _say(verbose, f"the run in {run_dir} has already finished; nothing to resume.")
    saved = rf.read_json(run_dir / rf.CONFIG_FILE) or {}
    return TrainResult(
        state=RunState.FINISHED, metrics=dict(history[-1]) if history else {},
        history=history, run_dir=run_dir, epochs_completed=len(history),
        step=status.get("step") or 0, total_steps=status.get("total_steps") or 0,
        device=status.get("device") or "CPU", synthetic=bool(saved.get("synthetic")),
        seconds=0.0, error=None)


class _Run:
    """One call of ``run_training``: its config, directory and status, and the steps of a run
    (``train``: data, model, fit, result; ``close``: the final status)."""

    def __init__(self, config, run_dir, resuming, status, stop, verbose):
        self.config = config
        self.run_dir = run_dir
        self.resuming = resuming
        self.status = status      # the run's StatusWriter
        self.stop = stop          # the StopFlag
        self.verbose = verbose
        self.progress = RunProgress()
        self.started = time.perf_counter()
        self.device = "CPU"

    def close(self, state, error=None, **fields):
        self.status.close(state=state, phase="done", error=error, step=self.progress.step,
                          **fields)

    def train(self, callbacks, keep_data):
        config = self.config
        strategy = make_strategy(config.distribute)  # first: MultiWorker wants it early
        self.device = describe_device()
        self.status.update(device=self.device, phase="loading data")
        _say(self.verbose, f"training on {self.device} (backend {keras.backend.backend()}"
             + (f", distribute={config.distribute}" if config.distribute else "")
             + (", mixed_float16" if config.mixed_precision else "") + ")")
        (x_train, y_train), (x_val, y_val), synthetic = self._load_data()
        steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
        self.progress.total_steps = steps_per_epoch * config.epochs
        self.status.update(total_steps=self.progress.total_steps, phase="building model")
        keras.utils.set_random_seed(config.seed)
        with strategy_scope(strategy):
            model = compile_model(config, x_train)
        start_epoch = _prepare_logs(self.run_dir, self.resuming, steps_per_epoch, config,
                                    self.verbose)
        if self.stop():
            self.progress.state = RunState.STOPPED  # asked to stop before training started
        else:
            fit_callbacks = self._callbacks(x_train, y_train, steps_per_epoch, start_epoch)
            model.fit(x_train, y_train, batch_size=config.batch_size, epochs=config.epochs,
                      validation_data=(x_val, y_val), callbacks=fit_callbacks + list(callbacks),
                      verbose=self.verbose, shuffle=True)
        data = ((x_train, y_train), (x_val, y_val)) if keep_data else None
        return self._result(model, synthetic, data)

    def _load_data(self):
        """Write config.json (before loading, so a slow load already shows the run), load the
        data, and correct config.json's "synthetic" if loading found otherwise."""
        record = dict(self.config.to_dict(), synthetic=data_is_synthetic(self.config),
                      device=self.device, backend=keras.backend.backend(),
                      slug=self.config.slug())
        rf.write_json_atomic(self.run_dir / rf.CONFIG_FILE, record)
        train, val, info = load_data(self.config)
        if info["synthetic"] != record["synthetic"]:
            rf.write_json_atomic(self.run_dir / rf.CONFIG_FILE,
                                 dict(record, synthetic=info["synthetic"]))
        if info["synthetic"]:
            _say(self.verbose, "using SYNTHETIC CIFAR-shaped data (not CIFAR-10)")
        return train, val, info["synthetic"]

    def _callbacks(self, x_train, y_train, steps_per_epoch, start_epoch):
        config, run_dir = self.config, self.run_dir
        control = RunControl(
            self.progress, self.status, run_dir / rf.STEPS_FILE,
            rf.MetricsCsv(run_dir / rf.METRICS_FILE), self.stop,
            steps_per_epoch=steps_per_epoch, epochs=config.epochs,
            batch_size=config.batch_size, log_every=config.log_every_n_steps,
            start_epoch=start_epoch, verbose=self.verbose,
            train_slice=_train_slice(x_train, y_train, config.batch_size))
        # The checkpoint restores weights and optimizer before RunControl reads the step.
        out = [RunCheckpoint(run_dir / rf.CHECKPOINT_DIR, control), control]
        if config.stats_every_n_steps:
            n = min(len(x_train), STATS_PROBE_IMAGES)
            out.append(LayerStatsLogger(
                probe=(x_train[:n], y_train[:n]), log_dir=str(run_dir / rf.TENSORBOARD_DIR),
                every_n_steps=config.stats_every_n_steps,
                jsonl_path=str(run_dir / rf.LAYER_STATS_FILE)))
        out.append(tensorboard_callback(run_dir / rf.TENSORBOARD_DIR))
        return out

    def _result(self, model, synthetic, data):
        progress = self.progress
        state = progress.state or RunState.FINISHED
        if state == RunState.STOPPED:
            _say(self.verbose, f"stopped at step {progress.step}; checkpoint in "
                               f"{self.run_dir / rf.CHECKPOINT_DIR} (continue with --resume)")
        history = rf.MetricsCsv(self.run_dir / rf.METRICS_FILE).read()
        result = TrainResult(
            state=state, metrics=dict(progress.last_metrics or {}), history=history,
            run_dir=self.run_dir, epochs_completed=len(history), step=progress.step,
            total_steps=progress.total_steps, device=self.device, synthetic=synthetic,
            seconds=time.perf_counter() - self.started, error=progress.error, model=model,
            data=data)
        self.close(state, progress.error,
                   eta_seconds=0.0 if state == RunState.FINISHED else None)
        return result
