"""``run_training``: train a ``TrainConfig`` and write its run directory (``run_files``); used
by ``keras-varinit train`` and, through it, by the explorer's worker.

A run trains ``models.plain_cnn`` or ``models.plain_mlp`` (``training.model``) on CIFAR-10 or
its synthetic stand-in (``training.data``), in the batch order of ``training.batches``, on the
devices of ``training.device``, with the callbacks of ``training.run_control`` and the backups
of ``training.backup``.

Conventions of the files written:

* ``step`` counts optimizer steps (batches) from the start of the run: the first batch is step 1,
  the state at initialization is step 0 (as in the layer statistics).
* ``epoch`` in ``status.json``, ``steps.jsonl`` and ``metrics.csv`` is 1-based: in ``steps.jsonl``
  and ``status.json`` the epoch being trained (1..epochs), in ``metrics.csv`` the epoch just
  completed. ``status.json`` also carries ``epochs`` (the total) and ``phase``.
* ``loss``/``accuracy`` in ``steps.jsonl`` are Keras's running means over the current epoch (what
  the progress bar shows); ``metrics.csv`` holds the epoch means and the validation metrics.

Liveness: the training process holds ``run.lock`` (``run_files.RunLock``) from before it writes
anything until after its final status; a second process refuses the directory while the lock
is held, and readers (``run_files.run_state``, the explorer) read "running" without a held lock
as "interrupted".

Interruption: SIGINT (Ctrl-C) or ``stop_event.set()`` ends training after the current batch
(an evaluation in progress is cut short), writes complete logs, state "stopped", and a backup.
A process killed outright (SIGKILL, out of memory, power cut) leaves its last periodic backup
(every ``backup_every_n_steps`` steps and at every epoch end). With ``resume=True`` the run goes
on from the newest backup: the run files are cut back to it (``training.resume``), the model,
optimizer and metric state come back, and training continues at the next batch of the same
epoch, in the same order, so the finished run holds every epoch and step once and, with
deterministic ops, the same weights as an uninterrupted run.

Several devices (``config.distribute``): "mirrored" and "multiworker" (TensorFlow) and
"data_parallel" (JAX) split each batch over the replicas. In a multi-worker run only the chief
writes the run directory (and its TensorBoard logs); the other workers write into a private
temporary directory, removed at the end, and read the chief's backups when resuming (the run
directory must then be on a file system they share).

Example:

>>> from keras_varinit.training import TrainConfig, run_training
>>> config = TrainConfig(model="cnn", depth=4, width=8, data="synthetic", subset=256, epochs=1)
>>> result = run_training(config, "runs/demo")        # doctest: +SKIP
>>> result.state, result.metrics["val_accuracy"]      # doctest: +SKIP
"""
import contextlib
import dataclasses
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
import time

import keras

from keras_varinit import run_files as rf
from keras_varinit import user_models
from keras_varinit.callbacks import DiagnosisLogger, LayerStatsLogger
from keras_varinit.diagnosis import Context, read_findings
from keras_varinit.run_files import RunState
from keras_varinit.training.config import TrainConfig
from keras_varinit.training.backup import RunBackup, latest_backup, restore_model
from keras_varinit.training.batches import RunBatches, steps_per_epoch
from keras_varinit.training.data import data_is_synthetic, load_data
from keras_varinit.training.device import describe_device, dtype_policy, make_placement
from keras_varinit.training.model import compile_model
from keras_varinit.training.resume import cut_back
from keras_varinit.training.run_control import RunControl, RunProgress, tensorboard_callback

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
    chief: bool = True             # False: a non-chief worker (the chief wrote run_dir)
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

def prepare_run_dir(config, run_dir, resume, overwrite, lock):
    """Create ``run_dir`` and take its ``lock``; refuse a directory whose run is alive (its lock
    is held), one that holds a different run, or this run unless resuming or overwriting.
    Returns ``(path, resuming)``; the lock is held on return."""
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"Run directory is a file. Received: run_dir={str(run_dir)!r}. "
                         "Allowed: a new or existing directory.")
    if resume and not overwrite and not (run_dir / rf.CONFIG_FILE).exists():
        # a mistyped --log-dir would otherwise start a long run over without a word
        raise ValueError(f"Nothing to resume: {str(run_dir)!r} holds no run (no "
                         f"{rf.CONFIG_FILE}). Received: resume=True (--resume). Allowed: the "
                         "directory of an earlier run, or no --resume to start a new one.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise rf.RunDirError.from_os_error(run_dir, error) from error
    if not lock.acquire():
        pid = rf.lock_holder_pid(run_dir)
        raise RuntimeError(
            f"Run in {str(run_dir)!r} is still running (process {pid} holds "
            f"{rf.LOCK_FILE}); stop it first, or choose another directory.")
    try:
        return run_dir, _check_run_dir(config, run_dir, resume, overwrite)
    except BaseException:
        lock.release()
        raise


def _check_run_dir(config, run_dir, resume, overwrite):
    """Whether this call resumes the run in ``run_dir`` (whose lock it holds)."""
    existing = rf.read_json(run_dir / rf.CONFIG_FILE)
    if overwrite:
        _remove_run_files(run_dir)
        return False
    if existing is None:
        return False
    status = rf.read_json(run_dir / rf.STATUS_FILE) or {}
    state = RunState.parse(status.get("state"))
    if (state == RunState.FAILED and not resume and not status.get("step")
            and not (run_dir / rf.BACKUP_DIR).exists()
            and not (run_dir / rf.STEPS_FILE).exists()):
        # failed before its first step (a model or batch size refused): nothing to keep, so
        # the command, corrected or not, may run in the same directory without --overwrite
        _remove_run_files(run_dir)
        return False
    _check_same_run(existing, config, run_dir)
    _check_same_model_file(existing, config, run_dir)
    started = state not in (RunState.UNKNOWN, RunState.QUEUED)
    if started and not resume:
        shown = RunState.INTERRUPTED if state == RunState.RUNNING else state
        raise ValueError(
            f"Run directory already holds this run (state {shown.value!r}). Received: "
            f"run_dir={str(run_dir)!r}. Allowed: resume=True (--resume) to continue it, "
            "overwrite=True (--overwrite) to start over, or a new directory.")
    return resume and started


def model_file_record(config):
    """``{"model_file_sha256": digest}`` for a run of a ``.keras`` file, else ``{}``."""
    if config.model != "file":
        return {}
    return {"model_file_sha256": user_models.file_sha256(config.model_file)}


def _check_same_model_file(existing, config, run_dir):
    """A run of a ``.keras`` file resumes only from the file it started from."""
    recorded = existing.get("model_file_sha256")
    if recorded is None or config.model != "file":   # older runs did not record it
        return
    now = user_models.file_sha256(config.model_file)
    if now != recorded:
        raise ValueError(
            f"The model file changed since this run started (SHA-256 {recorded[:12]}... then, "
            f"{now[:12]}... now). Received: model_file={config.model_file!r}, "
            f"run_dir={str(run_dir)!r}. Allowed: the file the run started from, "
            "overwrite=True (--overwrite) to start over with this one, or a new directory.")


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


def _start_files(run_dir, resuming, backup, steps_per_epoch):
    """A fresh run starts with no logs and no backup; a resumed one cuts its files back to
    ``backup`` (to nothing when there is none: it starts over)."""
    if not resuming:
        for name in (rf.STEPS_FILE, rf.LAYER_STATS_FILE, rf.FINDINGS_FILE, rf.METRICS_FILE):
            (run_dir / name).unlink(missing_ok=True)
        for name in (rf.BACKUP_DIR, rf.TENSORBOARD_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        return
    step = backup.step if backup is not None else 0
    state = backup.logger_state if backup is not None else None
    cut_back(run_dir, step, step // steps_per_epoch,
             stats_through=state.step if state is not None else None)


def _train_slice(x_train, y_train, batch_size):
    """The first ``max(TRAIN_EVAL_IMAGES, batch_size)`` training images and labels."""
    n = max(TRAIN_EVAL_IMAGES, batch_size)
    return x_train[:n], y_train[:n]


def _say(verbose, text):
    if verbose:
        print(f"keras-varinit: {text}", flush=True)


def segments(start_step, steps_per_epoch, epochs):
    """The ``fit`` calls that train global steps ``start_step`` to the end: the rest of an
    interrupted epoch (one call of its own), then the remaining whole epochs. Each is
    ``(first_step, stop_step, initial_epoch, epochs, steps_per_epoch)`` for ``fit``."""
    epoch, batch = divmod(start_step, steps_per_epoch)
    out = []
    if batch:
        out.append((start_step, (epoch + 1) * steps_per_epoch, epoch, epoch + 1,
                    steps_per_epoch - batch))
        epoch += 1
    if epoch < epochs:
        out.append((epoch * steps_per_epoch, epochs * steps_per_epoch, epoch, epochs,
                    steps_per_epoch))
    return out


# --------------------------------------------------------------------------- training

def run_training(config, run_dir, *, resume=False, overwrite=False, stop_event=None,
                 callbacks=(), verbose=1, keep_data=False):
    """Train ``config`` and write the run directory ``run_dir``; returns a ``TrainResult``.

    Args:
        config: a ``TrainConfig`` (or a dict for ``TrainConfig.from_dict``).
        run_dir: the run directory (created if needed).
        resume: continue the run already in ``run_dir`` from its newest backup.
        overwrite: replace whatever run ``run_dir`` holds.
        stop_event: a ``threading.Event``; setting it stops after the current batch.
        callbacks: extra Keras callbacks for ``fit`` (a run resumed in the middle of an epoch
            calls ``fit`` twice: the rest of that epoch, then the other epochs).
        verbose: 0 silent, 1 progress bar and summary lines, 2 one line per epoch.
        keep_data: also return the normalized arrays in ``result.data``
            (``((x_train, y_train), (x_val, y_val))``); ``result.model`` is the trained model.

    Raises:
        ValueError: a bad config, or a run directory holding a different run.
        RuntimeError: a run directory whose run is still alive; ``run_files.RunDirError``
            (a RuntimeError) when the run directory cannot be written.
        FileNotFoundError / RuntimeError: data that cannot be found or loaded.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()
    placement = make_placement(config.distribute)  # first: MultiWorker wants it early
    with contextlib.ExitStack() as stack:
        source_dir = pathlib.Path(run_dir)
        lock = rf.RunLock(source_dir)
        if placement.chief:
            run_dir, resuming = prepare_run_dir(config, source_dir, resume, overwrite, lock)
        else:  # a non-chief worker writes into a private directory, removed at the end
            run_dir = pathlib.Path(tempfile.mkdtemp(prefix="keras_varinit-worker-"))
            stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
            lock, resuming = rf.RunLock(run_dir), resume
            lock.acquire()
        stack.callback(lock.release)  # after the final status (ExitStack: last in, first out)
        previous = rf.read_json(run_dir / rf.STATUS_FILE) or {}
        if resuming and previous.get("state") == RunState.FINISHED:
            return _already_finished(run_dir, previous, verbose)
        started_at = (previous.get("started_at") if resuming else None) or rf.utc_now()
        status = stack.enter_context(rf.StatusWriter(
            run_dir / rf.STATUS_FILE, state=RunState.RUNNING, phase="starting", epoch=0, step=0,
            epochs=config.epochs, started_at=started_at))
        # SIGINT / stop_event are honoured from here on: during data loading and model
        # building the run ends before training starts; during fit after the current batch.
        stop = stack.enter_context(StopFlag(stop_event, verbose))
        stack.enter_context(dtype_policy(config.mixed_precision))
        stack.enter_context(placement.run_scope())
        run = _Run(config, run_dir, source_dir if resuming else None, placement, status, stop,
                   verbose, shown_dir=source_dir)
        try:
            return run.train(callbacks, keep_data)
        except KeyboardInterrupt:
            run.close(RunState.STOPPED, "aborted by a second Ctrl-C (KeyboardInterrupt)")
            raise
        except BaseException as error:
            if rf.is_write_error(error, run_dir):
                unwritable = rf.RunDirError.from_os_error(run_dir, error)
                run.close(RunState.FAILED, str(unwritable))
                raise unwritable from error
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
    """One call of ``run_training``: its config, directory, placement and status, and the
    steps of a run (``train``: data, model, backup, fit, result; ``close``: the final status).
    ``resume_from``: the directory whose backups a resumed run restores (None: a fresh run);
    ``shown_dir``: the run directory the result names."""

    def __init__(self, config, run_dir, resume_from, placement, status, stop, verbose,
                 shown_dir):
        self.config = config
        self.run_dir = run_dir
        self.shown_dir = shown_dir   # the run directory (a non-chief worker writes elsewhere)
        self.resume_from = resume_from
        self.placement = placement
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
        config, placement = self.config, self.placement
        self.device = describe_device()
        self.status.update(device=self.device, phase="loading data")
        _say(self.verbose, f"training on {self.device} (backend {keras.backend.backend()}"
             + (f", {placement.describe()}" if placement.distribute else "")
             + (", mixed_float16" if config.mixed_precision else "") + ")")
        placement.check_batch_size(config.batch_size)
        (x_train, y_train), (x_val, y_val), synthetic = self._load_data()
        spe = steps_per_epoch(len(x_train), config.batch_size, self._multiple)
        self.progress.total_steps = spe * config.epochs
        self.status.update(total_steps=self.progress.total_steps, phase="building model")
        keras.utils.set_random_seed(config.seed)
        with placement.build_scope():  # the restore too: the optimizer variables it builds
            model = compile_model(config, x_train, synchronized=placement.strategy is not None)
            backup = self._restore(model, spe, (x_train[:2], y_train[:2]))
        start = backup.step if backup is not None else 0
        if self.stop():
            self.progress.state = RunState.STOPPED  # asked to stop before training started
        else:
            fit_callbacks = self._callbacks(x_train, y_train, spe, backup) + list(callbacks)
            validation = self._validation(x_val, y_val)
            for first, stop_step, initial, epochs, fit_spe in segments(start, spe,
                                                                        config.epochs):
                model.fit(RunBatches(x_train, y_train, config.batch_size, config.seed, first,
                                     stop_step, multiple=self._multiple),
                          epochs=epochs, initial_epoch=initial, steps_per_epoch=fit_spe,
                          validation_data=validation,
                          validation_batch_size=config.batch_size, shuffle=False,
                          callbacks=fit_callbacks, verbose=self.verbose)
                if self.progress.state is not None:
                    break
        data = ((x_train, y_train), (x_val, y_val)) if keep_data else None
        return self._result(model, synthetic, data)

    @property
    def _multiple(self):
        """Batches split over the replicas (any ``distribute``: a replica's share of a batch
        must not be empty) hold a multiple of their number."""
        return self.placement.replicas

    def _validation(self, x_val, y_val):
        """The validation data, cut to a multiple of the replicas (said when that drops any)."""
        n = len(x_val) - len(x_val) % self._multiple
        if n < len(x_val):
            _say(self.verbose, f"validation: {n} of {len(x_val)} images (a multiple of "
                               f"{self._multiple} devices)")
        return x_val[:n], y_val[:n]

    def _check_backup(self, backup, spe):
        """A backup of the same number of steps per epoch, else a ValueError that says why."""
        if backup.steps_per_epoch == spe:
            return
        devices = self.placement.replicas
        if backup.replicas is not None and backup.replicas != devices:
            raise ValueError(
                f"The backup does not fit this run: it was made on {backup.replicas} devices, "
                f"whose batches gave {backup.steps_per_epoch} steps per epoch ({spe} on "
                f"{devices}). Received: {devices} device(s). Allowed: {backup.replicas} devices, "
                "as when the backup was made.")
        same = "data, subset, batch size" + (" and number of devices"
                                              if self.placement.distribute else "")
        raise ValueError(f"The backup does not fit this run. Received: a backup with "
                         f"{backup.steps_per_epoch} steps per epoch. Allowed: {spe} (the same "
                         f"{same}).")

    def _restore(self, model, spe, sample):
        """The backup a resumed run goes on from (restored into ``model``; None: a fresh run,
        or a resumed one without a backup, which starts over); cuts the run files back to it."""
        backup = None
        if self.resume_from is not None:
            backup = latest_backup(self.resume_from / rf.BACKUP_DIR)
            if backup is not None:
                self._check_backup(backup, spe)
                restore_model(model, backup, sample)
            _say(self.verbose, "resuming from the backup at step "
                 f"{backup.step} (epoch {backup.step // spe + 1}/{self.config.epochs})"
                 if backup is not None else "no backup to resume from: starting over")
        _start_files(self.run_dir, self.resume_from is not None, backup, spe)
        return backup

    def _load_data(self):
        """Write config.json (before loading, so a slow load already shows the run), load the
        data, and correct config.json's "synthetic" if loading found otherwise."""
        record = dict(self.config.to_dict(), synthetic=data_is_synthetic(self.config),
                      device=self.device, backend=keras.backend.backend(),
                      slug=self.config.slug(), **model_file_record(self.config))
        rf.write_json_atomic(self.run_dir / rf.CONFIG_FILE, record)
        train, val, info = load_data(self.config)
        if info["synthetic"] != record["synthetic"]:
            rf.write_json_atomic(self.run_dir / rf.CONFIG_FILE,
                                 dict(record, synthetic=info["synthetic"]))
        if info["synthetic"]:
            _say(self.verbose, "using SYNTHETIC CIFAR-shaped data (not CIFAR-10)")
        return train, val, info["synthetic"]

    def _callbacks(self, x_train, y_train, spe, backup):
        """RunControl first (it counts the steps), the layer statistics and their diagnosis,
        TensorBoard, and the backups last (everything a step writes is on disk before the
        backup covering it)."""
        config, run_dir = self.config, self.run_dir
        control = RunControl(
            self.progress, self.status, run_dir / rf.STEPS_FILE,
            rf.MetricsCsv(run_dir / rf.METRICS_FILE), self.stop,
            steps_per_epoch=spe, epochs=config.epochs, batch_size=config.batch_size,
            log_every=config.log_every_n_steps, verbose=self.verbose,
            train_slice=_train_slice(x_train, y_train, config.batch_size))
        out, logger = [control], None
        if config.stats_every_n_steps:
            n = min(len(x_train), STATS_PROBE_IMAGES)
            logger = LayerStatsLogger(
                probe=(x_train[:n], y_train[:n]), log_dir=str(run_dir / rf.TENSORBOARD_DIR),
                every_n_steps=config.stats_every_n_steps,
                jsonl_path=str(run_dir / rf.LAYER_STATS_FILE))
            if backup is not None:
                # Its first record (the restored state, at the backup's step) belongs to the
                # epoch that step ended or is in, as in the uninterrupted run.
                logger.on_epoch_begin(max(backup.step - 1, 0) // spe)
                if backup.logger_state is not None:
                    # as the uninterrupted run: the backup's step is logged where it is a
                    # multiple of --stats-every or an epoch's end (a stop can be neither)
                    logger.resume(backup.logger_state, log_at_start=not (
                        backup.step % config.stats_every_n_steps and backup.step % spe))
            out += [logger, self._diagnosis(logger)]
        out.append(tensorboard_callback(run_dir / rf.TENSORBOARD_DIR))
        out.append(RunBackup(run_dir / rf.BACKUP_DIR, self.progress, spe,
                             every=config.backup_every_n_steps,
                             aligned_to=config.stats_every_n_steps, resumed=backup,
                             replicas=self.placement.replicas, stats_logger=logger))
        return out

    def _diagnosis(self, logger):
        """The live diagnosis of the layer statistics: ``findings.jsonl`` and TensorBoard text
        (``diagnosis/<kind>``); a resumed run's kept findings are not reported again."""
        path = self.run_dir / rf.FINDINGS_FILE
        return DiagnosisLogger(
            logger, context=Context(batch_size=self.config.batch_size),
            log_dir=str(self.run_dir / rf.TENSORBOARD_DIR), jsonl_path=str(path),
            verbose=1 if self.verbose else 0,
            earlier=read_findings(path) if self.resume_from is not None else ())

    def _result(self, model, synthetic, data):
        progress = self.progress
        state = progress.state or RunState.FINISHED
        if state == RunState.STOPPED:
            _say(self.verbose, f"stopped at step {progress.step}; backup in "
                               f"{self.shown_dir / rf.BACKUP_DIR} (continue with --resume)")
        history = rf.MetricsCsv(self.run_dir / rf.METRICS_FILE).read()
        result = TrainResult(
            state=state, metrics=dict(progress.last_metrics or {}), history=history,
            run_dir=self.shown_dir, epochs_completed=len(history), step=progress.step,
            total_steps=progress.total_steps, device=self.device, synthetic=synthetic,
            seconds=time.perf_counter() - self.started, error=progress.error,
            chief=self.placement.chief, model=model, data=data)
        self.close(state, progress.error,
                   eta_seconds=0.0 if state == RunState.FINISHED else None)
        return result
