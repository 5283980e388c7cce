"""Read (and list) run directories under a runs directory. Plain Python: no Streamlit, no Keras.

A run directory follows the contract in CONTRIBUTING.md::

    config.json  status.json  steps.jsonl  metrics.csv  layer_stats.jsonl  tensorboard/

plus, for runs the explorer launched, ``explorer_job.json`` (the process id of the training
subprocess and of the explorer that owns it) and ``explorer.log`` (its stdout and stderr).

Everything is read from disk, so a new :class:`RunStore` (e.g. after a server restart) lists
the same runs. Growing JSON-lines files are read incrementally (only the new bytes), so polling
a long run every second stays cheap.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import pathlib
import threading
from dataclasses import dataclass, field

import pandas as pd

from keras_varinit.run_files import (  # noqa: E402  (the run-directory contract, one place)
    CONFIG_FILE, LAYER_STATS_FILE, METRICS_FILE, STATUS_FILE, STEPS_FILE, TENSORBOARD_DIR,
    read_json, write_json_atomic,
)

JOB_FILE = "explorer_job.json"
LOG_FILE = "explorer.log"

ACTIVE_STATES = ("queued", "running")
TERMINAL_STATES = ("finished", "stopped", "diverged", "failed")
ENV_RUNS_DIR = "KERAS_VARINIT_RUNS_DIR"

LAYER_STATS_COLUMNS = (
    "step", "epoch", "layer", "layer_index", "layer_type",
    "activation_mean", "activation_std", "zero_fraction", "saturated_fraction",
    "activation_grad_std", "weight_std", "weight_grad_std", "update_ratio",
    "nan_count", "inf_count",
)
STEPS_COLUMNS = ("step", "epoch", "loss", "accuracy")
METRICS_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")


def default_runs_dir() -> pathlib.Path:
    """``$KERAS_VARINIT_RUNS_DIR`` if set, else ``runs/`` in the repository root."""
    env = os.environ.get(ENV_RUNS_DIR)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path(__file__).resolve().parents[1] / "runs"


def utc_now() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def parse_time(text):
    """Seconds since the epoch from an ISO time as written in status.json (None if unparsable)."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def pid_alive(pid) -> bool:
    """Whether a process with this id exists and is not a zombie."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


class _JsonlTail:
    """Incremental reader of a JSON-lines file that another process appends to."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.offset = 0
        self.records: list[dict] = []
        self.inode = None

    def read(self) -> list[dict]:
        try:
            st = self.path.stat()
        except OSError:
            self.offset, self.records, self.inode = 0, [], None
            return self.records
        if st.st_ino != self.inode or st.st_size < self.offset:
            # Replaced or truncated (e.g. a resumed run rewrote it): start again.
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
            line = line.strip()
            if not line:
                continue
            try:
                self.records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
        self.offset += end + 1
        return self.records


def _frame(records, columns) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=list(columns))
    for column in columns:
        if column not in df.columns:
            df[column] = None
    return df


def _numeric(df: pd.DataFrame, skip=("layer", "layer_type")) -> pd.DataFrame:
    for column in df.columns:
        if column not in skip:
            df[column] = pd.to_numeric(df[column], errors="coerce")
    return df


@dataclass
class RunInfo:
    """What the explorer shows about one run (derived from its files)."""

    run_id: str
    path: pathlib.Path
    config: dict
    status: dict
    state: str
    synthetic: bool
    label: str
    created: float
    job: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return (self.status.get("device") or self.config.get("device") or "")

    @property
    def progress(self) -> float:
        step, total = self.status.get("step"), self.status.get("total_steps")
        try:
            if self.state == "finished":
                return 1.0
            return max(0.0, min(1.0, float(step) / float(total)))
        except (TypeError, ValueError, ZeroDivisionError):
            return 0.0


class RunStore:
    """The runs under ``root`` (default :func:`default_runs_dir`), read from disk on demand."""

    def __init__(self, root=None):
        self.root = pathlib.Path(root) if root is not None else default_runs_dir()
        self._tails: dict[tuple[str, str], _JsonlTail] = {}
        self._lock = threading.Lock()

    # -- creating ------------------------------------------------------------------------
    def new_run_dir(self, name: str) -> pathlib.Path:
        """Create ``<root>/<UTC time>-<name>`` (unique) and return it."""
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
        for i in range(1000):
            candidate = self.root / (f"{stamp}-{safe}" + (f"-{i}" if i else ""))
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
        raise RuntimeError(f"could not create a run directory under {self.root}")

    # -- listing -------------------------------------------------------------------------
    def run_ids(self) -> list[str]:
        """Run directories (those with a config.json or status.json), newest first."""
        if not self.root.is_dir():
            return []
        ids = []
        for entry in self.root.iterdir():
            if entry.is_dir() and ((entry / CONFIG_FILE).exists()
                                   or (entry / STATUS_FILE).exists()
                                   or (entry / JOB_FILE).exists()):
                ids.append(entry.name)
        return sorted(ids, key=lambda r: (self._created(self.root / r), r), reverse=True)

    def list_runs(self) -> list[RunInfo]:
        return [info for info in (self.info(r) for r in self.run_ids()) if info is not None]

    def path(self, run_id: str) -> pathlib.Path:
        path = (self.root / run_id)
        if path.resolve().parent != self.root.resolve():
            raise ValueError(f"Not a run of this store. Received: run_id={run_id!r}")
        return path

    @staticmethod
    def _created(path: pathlib.Path) -> float:
        """Creation time: the explorer's record if any, else the oldest run file's mtime."""
        job = read_json(path / JOB_FILE, {}) or {}
        if isinstance(job.get("created"), (int, float)):
            return float(job["created"])
        for name in (CONFIG_FILE, STATUS_FILE):
            try:
                return (path / name).stat().st_mtime
            except OSError:
                continue
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    def info(self, run_id: str) -> RunInfo | None:
        path = self.path(run_id)
        if not path.is_dir():
            return None
        job = read_json(path / JOB_FILE, {}) or {}
        config = read_json(path / CONFIG_FILE, None)
        if not isinstance(config, dict):
            config = dict(job.get("settings") or {})
        status = read_json(path / STATUS_FILE, {}) or {}
        state = self.effective_state(status, job, path)
        synthetic = bool(config.get("synthetic", config.get("data") == "synthetic"))
        return RunInfo(run_id=run_id, path=path, config=config, status=status, state=state,
                       synthetic=synthetic, label=self.label(run_id, config, synthetic),
                       created=self._created(path), job=job)

    @staticmethod
    def label(run_id: str, config: dict, synthetic: bool) -> str:
        if not config:
            return run_id
        init = config.get("init", "?")
        text = (f"{config.get('model', '?')} d{config.get('depth', '?')} {init} "
                f"{config.get('activation', '')}")
        bn = config.get("batch_norm")
        if bn and bn != "none":
            text += f" bn:{bn}"
        stamp = run_id.split("-")[1] if run_id.count("-") >= 2 else ""
        if len(stamp) == 6 and stamp.isdigit():
            text += f" @{stamp[:2]}:{stamp[2:4]}:{stamp[4:]}"
        if synthetic:
            text += " [synthetic]"
        return text

    @staticmethod
    def effective_state(status: dict, job: dict, path: pathlib.Path | None = None) -> str:
        """The state to show: status.json's, unless the run's process is known to be gone.

        A run whose status says queued/running but whose training process (recorded by the
        explorer) has exited without finishing the status -- killed, crashed, lost in a
        restart -- is shown as "failed". A run whose last loss is NaN/Inf is "diverged".
        """
        state = status.get("state") or ("queued" if job else "unknown")
        if state in ACTIVE_STATES and job:
            pid = job.get("pid")
            owner = job.get("owner_pid")
            if pid is not None and not pid_alive(pid):
                return "failed"
            if pid is None and owner is not None and not pid_alive(owner):
                return "failed"  # queued by an explorer that is gone
        return state

    # -- reading -------------------------------------------------------------------------
    def config(self, run_id: str) -> dict:
        return read_json(self.path(run_id) / CONFIG_FILE, {}) or {}

    def status(self, run_id: str) -> dict:
        return read_json(self.path(run_id) / STATUS_FILE, {}) or {}

    def _tail(self, run_id: str, name: str) -> list[dict]:
        key = (run_id, name)
        with self._lock:
            tail = self._tails.get(key)
            if tail is None:
                tail = self._tails[key] = _JsonlTail(self.path(run_id) / name)
            return list(tail.read())

    def steps(self, run_id: str) -> pd.DataFrame:
        """steps.jsonl as a DataFrame (step, epoch, loss, accuracy); NaN where not finite."""
        return _numeric(_frame(self._tail(run_id, STEPS_FILE), STEPS_COLUMNS))

    def layer_stats(self, run_id: str) -> pd.DataFrame:
        """layer_stats.jsonl as a DataFrame with the contract's columns (nulls as NaN)."""
        return _numeric(_frame(self._tail(run_id, LAYER_STATS_FILE), LAYER_STATS_COLUMNS))

    def metrics(self, run_id: str) -> pd.DataFrame:
        """metrics.csv (one row per epoch) as a DataFrame; empty columns where missing."""
        path = self.path(run_id) / METRICS_FILE
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (FileNotFoundError, OSError):
            rows = []
        return _numeric(_frame(rows, METRICS_COLUMNS))

    def log_tail(self, run_id: str, n_lines: int = 20) -> str:
        try:
            with open(self.path(run_id) / LOG_FILE, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-n_lines:])

    def diverged(self, run_id: str) -> bool:
        """True when the status says diverged or the last logged loss is NaN/Inf."""
        if self.status(run_id).get("state") == "diverged":
            return True
        steps = self.steps(run_id)
        if len(steps) and steps["loss"].notna().any():
            return not math.isfinite(float(steps["loss"].iloc[-1]))
        return False

    def final_metrics(self, runs: list[RunInfo] | None = None) -> pd.DataFrame:
        """One row per run: configuration, state and the last epoch's metrics."""
        runs = self.list_runs() if runs is None else runs
        rows = []
        for info in runs:
            c = info.config
            metrics = self.metrics(info.run_id)
            last = metrics.iloc[-1] if len(metrics) else {}
            steps = self.steps(info.run_id)
            last_loss = steps["loss"].iloc[-1] if len(steps) else float("nan")
            rows.append({
                "run": info.run_id,
                "state": info.state,
                "data": "synthetic" if info.synthetic else "CIFAR-10",
                "model": c.get("model"), "depth": c.get("depth"), "width": c.get("width"),
                "init": c.get("init"), "activation": c.get("activation"),
                "batch_norm": c.get("batch_norm"), "optimizer": c.get("optimizer"),
                "lr": c.get("lr"),
                "epochs": _get(last, "epoch"),
                "train_loss": _get(last, "loss", last_loss),
                "train_acc": _get(last, "accuracy"),
                "val_loss": _get(last, "val_loss"),
                "val_acc": _get(last, "val_accuracy"),
                "images_per_s": info.status.get("images_per_second"),
                "device": info.device,
            })
        return pd.DataFrame(rows)

    def delete(self, run_id: str) -> None:
        import shutil

        shutil.rmtree(self.path(run_id), ignore_errors=True)
        with self._lock:
            for key in [k for k in self._tails if k[0] == run_id]:
                del self._tails[key]


def _get(row, key, default=float("nan")):
    try:
        value = row[key]
    except (KeyError, IndexError, TypeError):
        return default
    return default if value is None else value
