"""The run directory: its files, their fields, the run states, and the one writer and reader of
each file. Plain Python (no Keras import), so a reader such as the explorer can use it too.

    <run_dir>/config.json        TrainConfig.to_dict() + "synthetic", "device", "backend", "slug"
                                 (an older run's "batch_norm" is read through upgrade_config)
    <run_dir>/status.json        STATUS_FIELDS; rewritten atomically about once a second by
                                 StatusWriter, its only writer (the training process)
    <run_dir>/steps.jsonl        STEP_FIELDS, one record every log_every_n_steps steps
    <run_dir>/metrics.csv        METRICS_COLUMNS, one row per completed epoch (MetricsCsv)
    <run_dir>/layer_stats.jsonl  LAYER_STATS_FIELDS, one record per (logged step, layer),
                                 appended by callbacks.LayerStatsLogger through append_jsonl
    <run_dir>/findings.jsonl     diagnosis.Finding.to_dict() records, one per finding, appended
                                 by callbacks.DiagnosisLogger (diagnosis.write_findings, through
                                 append_jsonl) as the findings are made
    <run_dir>/tensorboard/       TensorBoard logs
    <run_dir>/backup/            the training state for --resume (training/backup.py): one
                                 step-<step>.npz per backup, the newest two kept
    <run_dir>/run.lock           held (fcntl.flock) by the training process while it runs: the
                                 operating system releases it when the process dies, however

JSON files hold NaN/Inf as null (``json_safe``); JSON-lines files are appended and flushed one
record (or one batch of records) at a time, so another process can tail them with
``JsonlTail`` while training runs.

Whether a run is alive is known, not guessed: ``RunLock`` (the trainer holds it) and
``lock_held`` (anyone may ask); ``run_state`` is status.json's state with a "running" whose
lock is free read as ``RunState.INTERRUPTED`` (the process was killed, or the machine
restarted).
"""
import csv
import datetime
import enum
import errno
import fcntl
import json
import math
import os
import pathlib
import threading
import time

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
STEPS_FILE = "steps.jsonl"
METRICS_FILE = "metrics.csv"
LAYER_STATS_FILE = "layer_stats.jsonl"
FINDINGS_FILE = "findings.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Not "checkpoint": TensorBoard, pointed at a runs directory, takes <run>/checkpoint for a
# TensorFlow checkpoint file and logs errors about it.
BACKUP_DIR = "backup"
LOCK_FILE = "run.lock"
RUN_FILES = (CONFIG_FILE, STATUS_FILE, STEPS_FILE, METRICS_FILE, LAYER_STATS_FILE,
             FINDINGS_FILE, TENSORBOARD_DIR, BACKUP_DIR)

STATUS_FIELDS = ("state", "phase", "epoch", "epochs", "step", "total_steps",
                 "images_per_second", "eta_seconds", "device", "started_at", "updated_at",
                 "error")
STEP_FIELDS = ("step", "epoch", "loss", "accuracy")
#: One row per epoch: fit's epoch means (training mode, weights changing), validation
#: (inference mode), and a fixed slice of the training images evaluated with the epoch's final
#: weights in both modes: ``train_mode_*`` with batch statistics (the moving averages left
#: untouched), ``train_eval_*`` in inference mode (moving statistics). Their difference is
#: batch normalization's train/test discrepancy; without BN the two agree.
METRICS_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                   "train_mode_loss", "train_mode_accuracy", "train_eval_loss",
                   "train_eval_accuracy", "seconds")
#: One layer-statistics record (callbacks.LayerStatsLogger, CONTRIBUTING.md): which step and
#: layer call, and whether that call continues the previous record's path
#: (`instrument.CallRecord.follows_previous`) ...
LAYER_STATS_KEYS = ("step", "epoch", "layer", "layer_index", "layer_type", "follows_previous")
#: ... then the statistics of its output a^l, of dL/da^l and of its weights W^l.
LAYER_STATS_VALUES = (
    "activation_mean", "activation_std", "zero_fraction", "saturated_fraction",
    "activation_grad_std", "weight_std", "weight_grad_std", "update_ratio",
    "nan_count", "inf_count",
)
LAYER_STATS_FIELDS = LAYER_STATS_KEYS + LAYER_STATS_VALUES


class RunState(str, enum.Enum):
    """The ``state`` of ``status.json``. A ``str`` enum: it is written as its value and
    compares equal to it (``RunState.FINISHED == "finished"``)."""

    QUEUED = "queued"          # waiting for a device (the explorer's queue)
    RUNNING = "running"
    FINISHED = "finished"      # every epoch trained
    STOPPED = "stopped"        # Ctrl-C / stop_event / Stop: complete logs and a backup
    DIVERGED = "diverged"      # the loss became NaN/Inf
    FAILED = "failed"          # an exception (or, for the explorer, a process that never started)
    # Never written to status.json: readers' answers.
    INTERRUPTED = "interrupted"  # status.json says running, but no process holds the run's lock
    UNKNOWN = "unknown"        # a missing/garbled status

    def __str__(self):
        return self.value

    @property
    def active(self):
        return self in (RunState.QUEUED, RunState.RUNNING)

    @property
    def terminal(self):
        """The run is not going on (its process, if any, has ended)."""
        return self in (RunState.FINISHED, RunState.STOPPED, RunState.DIVERGED, RunState.FAILED,
                        RunState.INTERRUPTED)

    @property
    def resumable(self):
        """``--resume`` continues it from its last backup (from the start if it has none)."""
        return self in (RunState.STOPPED, RunState.FAILED, RunState.INTERRUPTED)

    @classmethod
    def parse(cls, value):
        """The state named by ``value`` (a RunState, its value, or None -> UNKNOWN)."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


def utc_now():
    """ISO 8601 time in UTC with a trailing "Z", e.g. "2026-11-23T09:30:00.123Z"."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def new_run_dir(root, slug):
    """Create and return ``<root>/<UTC YYYYmmdd-HHMMSS>-<slug>`` (``-1``, ``-2``, ... appended
    when that name is taken); the one naming of run directories (CLI and explorer)."""
    root = pathlib.Path(root)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in slug)[:80]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            candidate = root / (f"{stamp}-{safe}" + (f"-{i}" if i else ""))
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as error:
        raise RunDirError.from_os_error(root, error) from error
    raise RuntimeError(f"could not create a run directory under {root}")


class RunDirError(RuntimeError):
    """The run directory cannot be written (read-only, disk full, not a directory...)."""

    @classmethod
    def from_os_error(cls, run_dir, error):
        where = error.filename or run_dir
        return cls(f"Cannot write the run directory: {error.strerror or error} "
                   f"[errno {error.errno}]. Received: {str(where)!r}. Allowed: a directory "
                   "this user can write, on a file system with free space (free some space "
                   "and run again with --resume, or choose another --log-dir).")


#: errno values that mean "this location cannot be written" (whoever asks).
WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                errno.EFBIG, errno.ENOTDIR, errno.EISDIR)


def is_write_error(error, run_dir):
    """Whether ``error`` (an OSError) is the run directory refusing a write."""
    if not isinstance(error, OSError) or isinstance(error, FileNotFoundError):
        return False
    if error.errno in WRITE_ERRNOS:
        return True
    try:
        return pathlib.Path(error.filename).resolve().is_relative_to(
            pathlib.Path(run_dir).resolve())
    except (TypeError, ValueError, OSError):
        return False


# --------------------------------------------------------------------------- liveness

class RunLock:
    """The lock a training process holds on its run directory while it runs:
    ``fcntl.flock(LOCK_EX)`` on ``<run_dir>/run.lock``, which the operating system releases
    when the process ends, however it ends (SIGKILL, out of memory, power off of a remote
    client). The file holds the holder's pid, for people; liveness is the lock itself.

    ``acquire()`` raises ``RunDirError`` when the directory cannot be written and returns
    False when another process holds the lock. Readers call ``lock_held(run_dir)``, which
    takes a shared lock for an instant (so a trainer starting at that instant retries).
    """

    def __init__(self, run_dir):
        self.path = pathlib.Path(run_dir) / LOCK_FILE
        self._fd = None

    def acquire(self, wait=1.0):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError.from_os_error(self.path.parent, error) from error
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:  # a reader's probe lasts microseconds
                    os.close(fd)
                    return False
                time.sleep(0.02)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as error:
            self.release()
            raise RunDirError.from_os_error(self.path.parent, error) from error
        return True

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    @property
    def held(self):
        return self._fd is not None


def lock_held(run_dir):
    """Whether a live process holds ``run_dir``'s lock (False when there is no lock file)."""
    try:
        fd = os.open(pathlib.Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def lock_holder_pid(run_dir):
    """The pid written in ``run_dir``'s lock file (None if unreadable); meaningful only while
    ``lock_held(run_dir)``."""
    try:
        return int((pathlib.Path(run_dir) / LOCK_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def run_state(run_dir, status=None):
    """The state of the run in ``run_dir``: status.json's (``status`` if given), except that a
    "running" run whose lock no process holds is ``INTERRUPTED``."""
    if status is None:
        status = read_json(pathlib.Path(run_dir) / STATUS_FILE) or {}
    state = RunState.parse(status.get("state"))
    if state == RunState.RUNNING and not lock_held(run_dir):
        return RunState.INTERRUPTED
    return state


# --------------------------------------------------------------------------- JSON

def json_safe(value):
    """Numpy scalars to Python numbers, enums to their values, NaN/Inf to None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dumps(record):
    return json.dumps(json_safe(record), allow_nan=False)


def write_json_atomic(path, data):
    """Write ``data`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(json_safe(data), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:   # a full disk: no stray temporary file left behind
        tmp.unlink(missing_ok=True)
        raise


def read_json(path, default=None):
    """Read a JSON file; ``default`` if it is missing or (half-)written."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, OSError, UnicodeDecodeError):
        return default


# --------------------------------------------------------------------------- config.json

#: config.json of runs written before the normalization choice held ``batch_norm``: its
#: values and the ``normalization`` each one meant.
LEGACY_BATCH_NORM = {None: "none", "none": "none", "pooled": "batch",
                     "per_sample": "batch_per_sample"}


def upgrade_config(record):
    """A config.json record in today's terms: an older run's ``batch_norm`` (None, "pooled",
    "per_sample") becomes ``normalization`` ("none", "batch", "batch_per_sample"); anything
    else is returned unchanged.

    >>> upgrade_config({"depth": 30, "batch_norm": "pooled"})
    {'depth': 30, 'normalization': 'batch'}
    """
    if not isinstance(record, dict) or "batch_norm" not in record:
        return record
    old = record["batch_norm"]
    if old not in LEGACY_BATCH_NORM:
        allowed = ", ".join(repr(k) for k in LEGACY_BATCH_NORM)
        raise ValueError(f"Invalid batch_norm in an older config.json. Received: "
                         f"batch_norm={old!r}. Allowed: {allowed}.")
    out = {k: v for k, v in record.items() if k != "batch_norm"}
    out.setdefault("normalization", LEGACY_BATCH_NORM[old])
    return out


# --------------------------------------------------------------------------- JSON lines

def append_jsonl(path, records):
    """Append ``records`` (dicts) to a JSON-lines file in one write, flushed at once."""
    text = "".join(_dumps(record) + "\n" for record in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


class JsonlTail:
    """Incremental reader of a JSON-lines file that another process appends to: each
    ``read()`` parses only the bytes added since the last one and returns every complete
    record so far (a last line without its newline is left for later). A file replaced or
    truncated (a resumed run rewrites its logs) is read again from the start."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.offset = 0
        self.records = []
        self.inode = None

    def read(self):
        try:
            st = self.path.stat()
        except OSError:
            self.offset, self.records, self.inode = 0, [], None
            return self.records
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.offset, self.records, self.inode = 0, [], st.st_ino
        if st.st_size == self.offset:
            return self.records
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(st.st_size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return self.records  # only a partial line so far
        for line in chunk[:end].splitlines():
            try:
                if line.strip():
                    self.records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
        self.offset += end + 1
        return self.records


def read_jsonl(path):
    """All complete records of a JSON-lines file ([] if it does not exist)."""
    return list(JsonlTail(path).read())


def truncate_jsonl(path, keep):
    """Rewrite a JSON-lines file keeping only the records for which ``keep(record)`` is true."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    records = [r for r in read_jsonl(path) if keep(r)]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(_dumps(record) + "\n" for record in records))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- metrics.csv

class MetricsCsv:
    """metrics.csv: one row per completed epoch (METRICS_COLUMNS), header written once, each
    row flushed at once. ``read()`` returns typed rows: ``epoch`` an int, the rest floats or
    None."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def write(self, row):
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            if new:
                writer.writerow(METRICS_COLUMNS)
            values = [json_safe(row.get(column)) for column in METRICS_COLUMNS]
            writer.writerow(["" if value is None else value for value in values])
            f.flush()

    def read(self):
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                return [_typed_row(row) for row in csv.DictReader(f)]
        except FileNotFoundError:
            return []

    def truncate(self, keep_epochs):
        """Keep only rows with ``epoch <= keep_epochs`` (used when resuming)."""
        rows = [r for r in self.read() if r.get("epoch") and r["epoch"] <= keep_epochs]
        if self.path.exists():
            self.path.unlink()
        for row in rows:
            self.write(row)


def _typed_row(row):
    out = {}
    for key, text in row.items():
        try:
            out[key] = int(text) if key == "epoch" else (float(text) if text else None)
        except (TypeError, ValueError):
            out[key] = None
    return out


# --------------------------------------------------------------------------- status.json

class StatusWriter:
    """The one writer of status.json: ``update(**fields)`` from any thread of the training
    process, a background thread that rewrites the file about once a second (so
    ``updated_at`` is a heartbeat), and ``close(**final)``, which stops the thread and writes
    the final fields synchronously. A context manager: ``with StatusWriter(...) as status``
    starts it; leaving the block closes it (keeping what ``close`` wrote, if it was called)."""

    def __init__(self, path, interval=1.0, **fields):
        self.path = pathlib.Path(path)
        self.interval = interval
        self._lock = threading.Lock()
        self._status = {name: None for name in STATUS_FIELDS}
        self._status.update(fields)
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if not self._stop.is_set():
            self.close()
        return False

    def start(self):
        self.flush()
        self._thread = threading.Thread(target=self._loop, name="keras_varinit-status",
                                        daemon=True)
        self._thread.start()
        return self

    def update(self, **fields):
        with self._lock:
            self._status.update(fields)

    def get(self, name, default=None):
        with self._lock:
            return self._status.get(name, default)

    def flush(self):
        with self._lock:
            self._status["updated_at"] = utc_now()
            status = dict(self._status)
        try:
            write_json_atomic(self.path, status)
        except OSError:
            pass  # the run directory was removed under us; training goes on

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self, **fields):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.update(**fields)
        self.flush()
