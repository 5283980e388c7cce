"""Read (and list) run directories under a runs directory. Plain Python: no Streamlit.

A run directory is the trainer's (``keras_varinit.run_files`` owns its format and its
readers, used here)::

    config.json  status.json  steps.jsonl  metrics.csv  layer_stats.jsonl  findings.jsonl
    tensorboard/  backup/  run.lock

plus, for runs the explorer launched, two files of the explorer's worker: ``explorer_job.json``
(the settings, the process ids of the training subprocess and of the explorer that owns it, and
how the worker saw the run end) and ``explorer.log`` (the subprocess's stdout and stderr).
Each file has one writer: status.json is the trainer's alone; what the worker knows (queued,
cancelled, killed, crashed) goes to its job file, and :func:`effective_status` combines the
two, with the run's lock (held by a live trainer only), for display.

Everything is read from disk, so a new :class:`RunStore` (e.g. after a server restart) lists
the same runs. Growing JSON-lines files are read incrementally (only the new bytes), so polling
a long run every second stays cheap.
"""
from __future__ import annotations

import math
import os
import pathlib
import shutil
import threading
from dataclasses import dataclass, field

import pandas as pd

from keras_varinit.run_files import (
    BACKUP_DIR, CONFIG_FILE, FINDINGS_FILE, LAYER_STATS_FIELDS, LAYER_STATS_FILE,
    METRICS_COLUMNS, METRICS_FILE, STATUS_FILE, STEP_FIELDS, STEPS_FILE, JsonlTail, MetricsCsv,
    RunState, lock_held, new_run_dir, read_json, run_state, upgrade_config,
)
from keras_varinit.training.config import USER_MODELS

from explorer.your_model import display_name

JOB_FILE = "explorer_job.json"
LOG_FILE = "explorer.log"
ENV_RUNS_DIR = "KERAS_VARINIT_RUNS_DIR"
# The Compare table's columns that describe a built-in net (empty for a user's model).
BUILTIN_COLUMNS = ("depth", "width", "init", "activation", "normalization")


def default_runs_dir() -> pathlib.Path:
    """``$KERAS_VARINIT_RUNS_DIR`` if set, else ``runs/`` in the repository root."""
    env = os.environ.get(ENV_RUNS_DIR)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path(__file__).resolve().parents[1] / "runs"


def effective_state(status: dict, job: dict, run_dir) -> RunState:
    """The state to show: status.json's (the trainer's), completed by the run's lock and the
    worker's job file.

    * a process holds the run's lock (``run_files.lock_held``): running; so is a run whose
      training process the worker started and is alive but does not hold the lock yet (it is
      starting: importing, loading data);
    * otherwise the trainer's final state, else the worker's verdict on how the run ended
      (cancelled, killed, never started);
    * status.json still says "running" but no process holds the lock: interrupted (killed,
      or the explorer or the machine restarted while it ran): resumable;
    * no status.json: queued (failed if the explorer that queued it is gone, or if its
      process ended before writing anything).
    """
    written = RunState.parse(status.get("state")) if status.get("state") else None
    if lock_held(run_dir):
        return RunState.RUNNING
    pid, final = job.get("pid"), job.get("final_state")
    if pid is not None and final is None and pid_alive(pid):
        return RunState.RUNNING
    if written is not None and written.terminal:
        return written
    if final:
        return RunState.parse(final)
    if written is None:
        if not job:
            return RunState.UNKNOWN
        owner = job.get("owner_pid")
        if pid is None and (owner is None or pid_alive(owner)):
            return RunState.QUEUED
        return RunState.FAILED  # queued by an explorer that is gone, or died at once
    return run_state(run_dir, status)


def effective_status(status: dict, job: dict, run_dir) -> dict:
    """status.json with ``state`` from :func:`effective_state` and, when the worker decided
    the end, its ``error``."""
    out = dict(status)
    state = effective_state(status, job, run_dir)
    out["state"] = state.value
    if job.get("final_state") and not RunState.parse(status.get("state")).terminal:
        out["error"] = job.get("error")
    return out


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
    status: dict          # effective_status: status.json completed by the job file
    state: RunState
    synthetic: bool
    label: str
    created: float
    job: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        """The device's name: the explorer's own (its job file) while and after it runs,
        else the trainer's."""
        return (self.job.get("device") or self.status.get("device")
                or self.config.get("device") or "")

    @property
    def resumable(self) -> bool:
        """``--resume`` can continue it: stopped, interrupted or failed after it started (it
        has a config.json; with a backup it goes on from there, else from the start)."""
        return self.state.resumable and (self.path / CONFIG_FILE).exists()

    @property
    def backup_step(self):
        """The step of its newest backup (None without one)."""
        from keras_varinit.training.backup import newest_step

        return newest_step(self.path / BACKUP_DIR)

    @property
    def progress(self) -> float:
        step, total = self.status.get("step"), self.status.get("total_steps")
        try:
            if self.state == RunState.FINISHED:
                return 1.0
            return max(0.0, min(1.0, float(step) / float(total)))
        except (TypeError, ValueError, ZeroDivisionError):
            return 0.0


class RunStore:
    """The runs under ``root`` (default :func:`default_runs_dir`), read from disk on demand."""

    def __init__(self, root=None):
        self.root = pathlib.Path(root) if root is not None else default_runs_dir()
        self._tails: dict[tuple[str, str], JsonlTail] = {}
        self._lock = threading.Lock()

    # -- creating ------------------------------------------------------------------------
    def new_run_dir(self, slug: str) -> pathlib.Path:
        """Create ``<root>/<UTC time>-<slug>`` (unique; ``run_files.new_run_dir``)."""
        return new_run_dir(self.root, slug)

    # -- listing -------------------------------------------------------------------------
    def run_ids(self) -> list[str]:
        """Run directories (those with a config.json, status.json or job file), newest first."""
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
        job = self.job(run_id)
        config = self.config(run_id) or _upgraded(dict(job.get("settings") or {}))
        status = effective_status(read_json(path / STATUS_FILE, {}) or {}, job, path)
        synthetic = bool(config.get("synthetic", config.get("data") == "synthetic"))
        return RunInfo(run_id=run_id, path=path, config=config, status=status,
                       state=RunState(status["state"]), synthetic=synthetic,
                       label=self.label(run_id, config, synthetic),
                       created=self._created(path), job=job)

    @staticmethod
    def label(run_id: str, config: dict, synthetic: bool) -> str:
        if not config:
            return run_id
        model = config.get("model", "?")
        if model == "application":     # a user's model: its architecture or file, not depth
            text = f"{config.get('application')}"
        elif model == "file":
            text = f"file {display_name(config.get('model_file'))}"
        else:
            text = (f"{model} d{config.get('depth', '?')} {config.get('init', '?')} "
                    f"{config.get('activation', '')}")
            norm = config.get("normalization", "none")
            if norm != "none":
                text += f" norm:{norm}" + (f" G={config.get('groups')}" if norm == "group"
                                           else "")
        stamp = run_id.split("-")[1] if run_id.count("-") >= 2 else ""
        if len(stamp) == 6 and stamp.isdigit():
            text += f" @{stamp[:2]}:{stamp[2:4]}:{stamp[4:]}"
        if synthetic:
            text += " [synthetic]"
        return text

    # -- reading -------------------------------------------------------------------------
    def config(self, run_id: str) -> dict:
        """config.json ({} if missing or garbled); an older run's ``batch_norm`` read as its
        ``normalization`` (``run_files.upgrade_config``), an unknown one left as written."""
        config = read_json(self.path(run_id) / CONFIG_FILE, {})
        return _upgraded(config) if isinstance(config, dict) else {}

    def job(self, run_id: str) -> dict:
        """The worker's job file ({} for runs the explorer did not launch)."""
        return read_json(self.path(run_id) / JOB_FILE, {}) or {}

    def status(self, run_id: str) -> dict:
        """status.json completed by the job file (:func:`effective_status`)."""
        path = self.path(run_id)
        return effective_status(read_json(path / STATUS_FILE, {}) or {}, self.job(run_id), path)

    def _tail(self, run_id: str, name: str) -> list[dict]:
        key = (run_id, name)
        with self._lock:
            tail = self._tails.get(key)
            if tail is None:
                tail = self._tails[key] = JsonlTail(self.path(run_id) / name)
            return list(tail.read())

    def steps(self, run_id: str) -> pd.DataFrame:
        """steps.jsonl as a DataFrame (step, epoch, loss, accuracy); NaN where not finite."""
        return _numeric(_frame(self._tail(run_id, STEPS_FILE), STEP_FIELDS))

    def layer_stats(self, run_id: str) -> pd.DataFrame:
        """layer_stats.jsonl as a DataFrame with the record's fields (nulls as NaN)."""
        return _numeric(_frame(self._tail(run_id, LAYER_STATS_FILE), LAYER_STATS_FIELDS))

    def findings(self, run_id: str) -> list:
        """findings.jsonl as ``keras_varinit.diagnosis.Finding``s, in the order found."""
        from keras_varinit.diagnosis import Finding

        return [Finding.from_dict(record) for record in self._tail(run_id, FINDINGS_FILE)]

    def metrics(self, run_id: str) -> pd.DataFrame:
        """metrics.csv (one row per epoch) as a DataFrame; empty columns where missing."""
        rows = MetricsCsv(self.path(run_id) / METRICS_FILE).read()
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
        if self.status(run_id).get("state") == RunState.DIVERGED:
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
                "state": info.state.value,
                "data": "synthetic" if info.synthetic else "CIFAR-10",
                **_network_columns(c),
                "optimizer": c.get("optimizer"),
                "lr": c.get("lr"), "batch_size": c.get("batch_size"),
                "epochs": c.get("epochs"), "epochs_done": _epochs_done(last),
                "train_loss": _get(last, "loss", last_loss),
                "train_acc": _get(last, "accuracy"),
                "val_loss": _get(last, "val_loss"),
                "val_acc": _get(last, "val_accuracy"),
                "train_mode_acc": _get(last, "train_mode_accuracy"),
                "train_eval_acc": _get(last, "train_eval_accuracy"),
                "images_per_s": info.status.get("images_per_second"),
                "device": info.device,
            })
        return pd.DataFrame(rows)

    def delete(self, run_id: str) -> None:
        shutil.rmtree(self.path(run_id), ignore_errors=True)
        with self._lock:
            for key in [k for k in self._tails if k[0] == run_id]:
                del self._tails[key]


def _upgraded(config: dict) -> dict:
    """``run_files.upgrade_config(config)``, or ``config`` as written if its old
    ``batch_norm`` value is unknown (the page still lists the run)."""
    try:
        return upgrade_config(config)
    except ValueError:
        return config


def _network_columns(config: dict) -> dict:
    """The table's network columns: a built-in net's settings, or for a user's model what it
    is (its file or architecture) and nothing of the built-in nets' options, which it does
    not use (``Option.builtin``)."""
    model = config.get("model")
    if model in USER_MODELS:
        name = (display_name(config.get("model_file")) if model == "file"
                else config.get("application"))
        return {"model": f"{model}: {name}", **{key: None for key in BUILTIN_COLUMNS}}
    return {"model": model, **{key: config.get(key) for key in BUILTIN_COLUMNS}}


def _epochs_done(last) -> int | None:
    """The last logged epoch (metrics.csv counts from 1), or None before the first."""
    epoch = _get(last, "epoch", None)
    try:
        return int(epoch)
    except (TypeError, ValueError):
        return None


def _get(row, key, default=float("nan")):
    try:
        value = row[key]
    except (KeyError, IndexError, TypeError):
        return default
    return default if value is None else value
