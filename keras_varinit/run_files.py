"""Writers for the files of a run directory (the contract in CONTRIBUTING.md).

    <run_dir>/config.json        TrainConfig as a dict (+ "synthetic", "device")
    <run_dir>/status.json        rewritten atomically (tmp + os.replace) about once a second
    <run_dir>/steps.jsonl        {"step", "epoch", "loss", "accuracy"} every few steps
    <run_dir>/metrics.csv        per epoch: epoch, loss, accuracy, val_loss, val_accuracy, seconds
    <run_dir>/layer_stats.jsonl  written by callbacks.LayerStatsLogger
    <run_dir>/tensorboard/       TensorBoard logs
    <run_dir>/checkpoint/        BackupAndRestore state for resuming

Plain Python (no Keras import), so that a reader such as the explorer can use the helpers too.
"""
import csv
import datetime
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
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoint"
RUN_FILES = (CONFIG_FILE, STATUS_FILE, STEPS_FILE, METRICS_FILE, LAYER_STATS_FILE,
             TENSORBOARD_DIR, CHECKPOINT_DIR)

STATES = ("queued", "running", "finished", "stopped", "diverged", "failed")
METRICS_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")
STATUS_FIELDS = ("state", "epoch", "step", "total_steps", "images_per_second", "eta_seconds",
                 "device", "started_at", "updated_at", "error")


def utc_now():
    """ISO 8601 time in UTC with a trailing "Z", e.g. "2026-11-23T09:30:00.123Z"."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def json_safe(value):
    """Convert numpy scalars to Python numbers and NaN/Inf to None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path, data):
    """Write ``data`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(json_safe(data), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path, default=None):
    """Read a JSON file; ``default`` if it is missing or (half-)written."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, OSError, UnicodeDecodeError):
        return default


def read_jsonl(path):
    """All complete records of a JSON-lines file (a partial last line is skipped)."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return records


def truncate_jsonl(path, keep):
    """Rewrite a JSON-lines file keeping only the records for which ``keep(record)`` is true."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    records = [r for r in read_jsonl(path) if keep(r)]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
    os.replace(tmp, path)


class JsonlWriter:
    """Append one JSON object per line, flushed at once (another process may tail the file)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self._lock = threading.Lock()

    def write(self, record):
        line = json.dumps(json_safe(record), allow_nan=False)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


class MetricsCsv:
    """metrics.csv: one row per completed epoch, header written once, flushed at once."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def write(self, row):
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            if new:
                writer.writerow(METRICS_COLUMNS)
            values = []
            for column in METRICS_COLUMNS:
                value = json_safe(row.get(column))
                values.append("" if value is None else value)
            writer.writerow(values)
            f.flush()

    def read(self):
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        except FileNotFoundError:
            return []

    def truncate(self, keep_epochs):
        """Keep only rows with ``epoch <= keep_epochs`` (used when resuming)."""
        rows = [r for r in self.read() if r.get("epoch") and int(r["epoch"]) <= keep_epochs]
        if self.path.exists():
            self.path.unlink()
        for row in rows:
            self.write(row)


class StatusWriter:
    """Keeps status.json up to date: ``update(**fields)`` from any thread, and a background
    thread that rewrites the file about once a second (so ``updated_at`` is a heartbeat).
    ``close(**final)`` writes the final state synchronously and stops the thread."""

    def __init__(self, path, interval=1.0, **fields):
        self.path = pathlib.Path(path)
        self.interval = interval
        self._lock = threading.Lock()
        self._status = {name: None for name in STATUS_FIELDS}
        self._status.update(fields)
        self._dirty = True
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self.flush()
        self._thread = threading.Thread(target=self._loop, name="keras_varinit-status",
                                        daemon=True)
        self._thread.start()
        return self

    def update(self, **fields):
        with self._lock:
            self._status.update(fields)
            self._dirty = True

    def get(self, name, default=None):
        with self._lock:
            return self._status.get(name, default)

    def snapshot(self):
        with self._lock:
            return dict(self._status)

    def flush(self):
        with self._lock:
            self._status["updated_at"] = utc_now()
            status = dict(self._status)
            self._dirty = False
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


class Throughput:
    """Images per second over the recent training batches and the ETA of the run."""

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
