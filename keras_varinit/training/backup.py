"""Backups of a run's training state, so that ``--resume`` continues after any interruption
(Ctrl-C, SIGKILL, a crash, the machine going down) exactly where the last backup left it.

A backup is one file, ``<run>/backup/step-<step>.npz``: every variable of the model (weights
and batch-norm moving statistics), of its optimizer (its iteration count included) and of its
compiled metrics (the running means of the epoch in progress), in order, with the step and
the run's steps per epoch. It is written to a temporary file in the same folder, flushed to
disk, renamed to its name (``os.replace``: atomic), and the folder flushed; only then are
older backups removed (the newest two are kept). A kill at any moment therefore leaves the
previous backup, or the new one, complete; temporary files left by a kill are ignored and
removed by the next backup.

``RunBackup`` (the callback) backs up every ``every`` steps, at the first step from there on
where the layer statistics are logged, at the end of every epoch, and when a run is
stopped; never a diverged state. With each backup goes the ``LayerStatsLogger``'s
``LoggerState`` (the step of its last log and the weights there), so that a resumed run's
next ``update_ratio`` refers to the same weights as an uninterrupted run's. Restoring puts the model and optimizer back before ``fit``
(``restore``) and the metrics' running means at the start of the interrupted epoch (Keras
resets metrics when an epoch begins); with the fixed batch order of ``training.batches`` the
run then goes on exactly as if it had not stopped.

Why not ``keras.callbacks.BackupAndRestore``: its weights and metadata are two files written
in place (a kill during the weights, or between the two, leaves a broken or mismatched pair;
``double_checkpoint`` copies the previous pair first, in place too), its restore starts the
interrupted epoch over instead of continuing after the last batch saved, and it does not keep
the metrics' state, so a resumed run would differ from an uninterrupted one.

The metadata also records the replicas the batches were split over (``replicas``; absent from
backups of older versions, read as None), so that a run resumed on another number of devices
is told so.
"""
import dataclasses
import io
import json
import os
import pathlib
import re
import zipfile

import keras
import numpy as np

from keras_varinit.layer_stats_logger import LoggerState
from keras_varinit.run_files import RunState

KEEP = 2
_NAME = re.compile(r"^step-(\d+)\.npz$")
GROUPS = ("model", "optimizer", "metrics")
#: The layer-statistics logger's reference weights (``LoggerState``), by layer in meta's order.
LOGGER_GROUP = "layer_stats"


@dataclasses.dataclass(frozen=True)
class Backup:
    """A backup read back: the global step it was taken after, the run's steps per epoch,
    the arrays of each group (``GROUPS``), the replicas each batch was split over and the
    layer-statistics logger's ``LoggerState`` (None: a run without layer statistics, or a
    backup of an older version, which recorded neither)."""

    step: int
    steps_per_epoch: int
    arrays: dict
    replicas: int | None = None
    logger_state: LoggerState | None = None

    @property
    def epochs_done(self):
        return self.step // self.steps_per_epoch

    @property
    def batch_in_epoch(self):
        """Batches already trained of the epoch in progress (0 at an epoch boundary)."""
        return self.step % self.steps_per_epoch


def _variables(model):
    """Every variable a backup holds, by group, in a fixed order."""
    optimizer = model.optimizer
    return {"model": list(model.variables),
            "optimizer": list(optimizer.variables) if optimizer is not None else [],
            "metrics": list(model.metrics_variables)}


def sync_state(model):
    """On JAX the trainer keeps the state outside the variables during an epoch: put it back
    (before reading variables in a callback)."""
    if keras.backend.backend() == "jax":
        model.jax_state_sync()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_backup(backup_dir, model, step, steps_per_epoch, keep=KEEP, replicas=1,
                 logger_state=None):
    """Write the state of ``model`` after global step ``step`` (of a run whose batches are
    split over ``replicas`` devices), with the layer-statistics logger's ``logger_state``,
    atomically; return its path."""
    backup_dir = pathlib.Path(backup_dir)
    backup_dir.mkdir(parents=True, exist_ok=True)
    # np.asarray(variable): the value a reader sees (metric variables are sync-on-read under
    # a tf.distribute strategy: every worker reads them at the same step, as RunBackup does)
    arrays = {f"{group}/{i:05d}": np.asarray(v)
              for group, variables in _variables(model).items()
              for i, v in enumerate(variables)}
    meta = {"step": int(step), "steps_per_epoch": int(steps_per_epoch),
            "replicas": int(replicas)}
    if logger_state is not None:
        layers = list(logger_state.weights)
        meta[LOGGER_GROUP] = {"step": int(logger_state.step), "layers": layers}
        arrays.update({f"{LOGGER_GROUP}/{i:05d}": np.asarray(logger_state.weights[name])
                       for i, name in enumerate(layers)})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = backup_dir / f"step-{int(step):09d}.npz"
    tmp = backup_dir / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(backup_dir)
    _prune(backup_dir, keep)
    return path


def _prune(backup_dir, keep):
    """Remove all but the newest ``keep`` backups, and temporary files of earlier processes."""
    for path in backup_paths(backup_dir)[keep:]:
        path.unlink(missing_ok=True)
    mine = f".{os.getpid()}.tmp"
    for path in backup_dir.glob(".step-*.tmp"):
        if not path.name.endswith(mine):
            path.unlink(missing_ok=True)


def backup_paths(backup_dir):
    """The complete backups in ``backup_dir``, newest (highest step) first."""
    backup_dir = pathlib.Path(backup_dir)
    if not backup_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in backup_dir.iterdir()
             if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_step(backup_dir):
    """The step of the newest complete backup in ``backup_dir`` (None when there is none)."""
    paths = backup_paths(backup_dir)
    return int(_NAME.match(paths[0].name).group(1)) if paths else None


def read_backup(path):
    """The ``Backup`` in ``path`` (raises ValueError if it is unreadable)."""
    try:
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            arrays = {group: [] for group in (*GROUPS, LOGGER_GROUP)}
            for key in sorted(k for k in data.files if k != "meta"):
                group, _ = key.split("/")
                arrays[group].append(data[key])
            logger_state = _logger_state(meta.get(LOGGER_GROUP), arrays.pop(LOGGER_GROUP))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError,
            json.JSONDecodeError, io.UnsupportedOperation) as error:
        raise ValueError(f"Unreadable backup. Received: {str(path)!r} "
                         f"({type(error).__name__}: {error}).") from error
    replicas = meta.get("replicas")
    return Backup(step=int(meta["step"]), steps_per_epoch=int(meta["steps_per_epoch"]),
                  arrays=arrays, replicas=int(replicas) if replicas is not None else None,
                  logger_state=logger_state)


def _logger_state(meta, arrays):
    """The ``LoggerState`` a backup recorded (None when it recorded none)."""
    if meta is None:
        return None
    if len(meta["layers"]) != len(arrays):
        raise ValueError(f"{len(meta['layers'])} layers for {len(arrays)} arrays")
    return LoggerState(int(meta["step"]), dict(zip(meta["layers"], arrays)))


def latest_backup(backup_dir):
    """The newest readable ``Backup`` in ``backup_dir`` (an unreadable newest one falls back
    to the previous), or None when there is none."""
    for path in backup_paths(backup_dir):
        try:
            return read_backup(path)
        except ValueError:
            continue
    return None


def _assign(variables, values, group):
    if len(variables) != len(values):
        raise ValueError(f"The backup does not fit this model. Received: {len(values)} "
                         f"{group} arrays for {len(variables)} {group} variables. Allowed: a "
                         "backup of the same configuration.")
    for variable, value in zip(variables, values):
        if tuple(variable.shape) != tuple(value.shape):
            raise ValueError(f"The backup does not fit this model. Received: shape "
                             f"{value.shape} for {variable.path} of shape {variable.shape}. "
                             "Allowed: a backup of the same configuration.")
        variable.assign(value)


def restore_model(model, backup, sample):
    """Put the model's and its optimizer's variables back from ``backup`` (before ``fit``).

    ``sample`` (a few training inputs and labels) builds the compiled metrics if ``fit`` has
    not (TensorFlow without a strategy builds them in its first step), so that their running
    means can go back when the interrupted epoch begins (``RunBackup``)."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    _assign(list(model.variables), backup.arrays["model"], "model")
    _assign(list(model.optimizer.variables), backup.arrays["optimizer"], "optimizer")
    if len(model.metrics_variables) != len(backup.arrays["metrics"]):
        x, y = sample
        model.compute_metrics(x, y, model(x, training=False))


class RunBackup(keras.callbacks.Callback):
    """Backs a run up (see the module docstring); goes last among the run's callbacks, so that
    everything a step logs is on disk before the backup that covers it.

    Args:
        backup_dir: where the backups go.
        progress: the run's ``RunProgress`` (its ``step`` is the global step; its ``state``
            tells a stopped or diverged run).
        steps_per_epoch: of the run.
        every: back up every this many steps (0: only at epoch ends and stops).
        aligned_to: layer statistics are logged every this many steps (0: not logged); a
            periodic backup waits for the next such step.
        resumed: the ``Backup`` the run was restored from (its metrics go back into the
            interrupted epoch), or None.
        replicas: the devices each batch is split over (recorded with each backup).
        stats_logger: the run's ``LayerStatsLogger`` (its ``state`` goes with each backup),
            or None.
    """

    def __init__(self, backup_dir, progress, steps_per_epoch, every, aligned_to=0,
                 resumed=None, replicas=1, stats_logger=None):
        super().__init__()
        self.backup_dir = pathlib.Path(backup_dir)
        self.progress = progress
        self.steps_per_epoch = steps_per_epoch
        self.every = every
        self.aligned_to = aligned_to
        self.replicas = replicas
        self.stats_logger = stats_logger
        self.resumed = resumed if resumed is not None and resumed.batch_in_epoch else None
        self.last_step = resumed.step if resumed is not None else 0

    def on_epoch_begin(self, epoch, logs=None):
        if self.resumed is not None:
            _assign(list(self.model.metrics_variables), self.resumed.arrays["metrics"],
                    "metrics")
            self.resumed = None

    def on_train_batch_end(self, batch, logs=None):
        step = self.progress.step
        if self.progress.state == RunState.STOPPED:
            # now, while the metrics hold the epoch's running means: fit still validates
            # after a stop, which resets them (a resumed epoch then reported other numbers)
            self._back_up(step)
            return
        if not self.every or step - self.last_step < self.every:
            return
        if self.aligned_to and step % self.aligned_to:
            return
        self._back_up(step)

    def on_epoch_end(self, epoch, logs=None):
        if self.last_step != self.progress.step:
            self._back_up(self.progress.step)  # the epoch's end (a stop is backed up already)

    def _back_up(self, step):
        if self.progress.state == RunState.DIVERGED or step == 0:
            return
        sync_state(self.model)
        write_backup(self.backup_dir, self.model, step, self.steps_per_epoch,
                     replicas=self.replicas,
                     logger_state=self.stats_logger.state if self.stats_logger else None)
        self.last_step = step
