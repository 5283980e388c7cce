"""Background training jobs for the explorer: a queue, one job per device at a time (unless
asked for more), each job a ``keras-varinit train`` subprocess writing its run directory.

Plain Python (no Streamlit import). The page holds one :class:`JobManager` in
``st.cache_resource`` so it survives reruns; a daemon thread launches queued runs, reaps
finished ones and enforces stops. The training process is started in its own session, so
browser reloads, page reruns and even an explorer restart do not kill it; a restarted
explorer adopts runs whose process is still alive.

Stop = SIGINT (the trainer finishes the current batch, writes complete logs and the state
"stopped"), then SIGKILL after a grace period. A process that exits without writing a final
state (out of memory, killed) is "interrupted", and one that never got as far as writing a
status is "failed", with the tail of its log. Whether a training process is alive is known
from the run's lock (``run_files.lock_held``), which the operating system releases when the
process dies; after an explorer restart, runs whose process is gone read "interrupted".
``resume(run_id)`` queues such a run (or a stopped or failed one) again with ``--resume``: it
continues from its last backup.

A run with ``distribute`` (data parallelism, offered when ``data_parallel_devices()`` > 1)
takes every device: it waits until none is busy, and nothing else starts while it runs.

Files: the worker writes only the run's ``explorer_job.json`` (settings, process ids, and how
it saw the run end: ``final_state``, ``error``) and ``explorer.log``; status.json is the
trainer's alone (``run_store.effective_status`` combines the two).

Example::

    store = RunStore("runs")
    jobs = JobManager(store)
    run_id = jobs.submit({"model": "cnn", "depth": 3, "width": 4, "data": "synthetic",
                          "subset": 256, "epochs": 1, "batch_size": 64})
    jobs.wait(run_id, timeout=300)
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import enum
import time
from dataclasses import dataclass, field

from explorer import presets
from explorer.run_store import JOB_FILE, LOG_FILE, RunStore, pid_alive
from keras_varinit.cli.train import config_argv
from keras_varinit.run_files import (STATUS_FILE, RunState, lock_held, lock_holder_pid,
                                     read_json, write_json_atomic)
from keras_varinit.training.config import TrainConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def detect_devices() -> list[dict]:
    """The devices a job can run on: one entry per NVIDIA GPU (``nvidia-smi -L``), else CPU.

    Each entry: ``{"id": "gpu:0", "name": "NVIDIA H100 80GB HBM3", "env": {...}}``; the env
    pins the subprocess to that device. Cheap (no TensorFlow import).
    """
    devices = []
    smi = shutil.which("nvidia-smi")
    if smi and os.environ.get("CUDA_VISIBLE_DEVICES", None) != "":
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            if line.startswith("GPU "):
                index = line.split()[1].rstrip(":")
                name = line.split(":", 1)[1].split("(UUID")[0].strip()
                devices.append({"id": f"gpu:{index}", "name": name,
                                "env": {"CUDA_VISIBLE_DEVICES": index}})
    if not devices:
        cores = os.cpu_count() or 1
        devices.append({"id": "cpu", "name": f"CPU ({cores} cores)",
                        "env": {"CUDA_VISIBLE_DEVICES": ""}})
    return devices


def data_parallel_devices(python=None, env=None, timeout=120) -> int:
    """How many devices a training subprocess on the JAX backend would share with
    ``--distribute data_parallel`` (``keras.distribution.list_devices()``); 0 on another
    backend, or when it cannot be asked. Asked in a subprocess, so that the page itself never
    initializes (and holds) an accelerator."""
    if configured_backend({**os.environ, **(env or {})}) != "jax":
        return 0
    command = [python or sys.executable, "-c",
               "import keras; print(len(keras.distribution.list_devices()))"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **(env or {})}).stdout
        return int(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def configured_backend(env) -> str:
    """The Keras backend a process with environment ``env`` gets, read as Keras reads it
    (``KERAS_BACKEND``, else ``keras.json``'s "backend" under ``KERAS_HOME`` or ``~/.keras``,
    else "tensorflow") without importing Keras: the page stays free of it until it profiles."""
    if env.get("KERAS_BACKEND"):
        return env["KERAS_BACKEND"]
    home = env.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return str(json.load(f).get("backend") or "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


ALL_DEVICES = "all"   # the device id of a data-parallel job (it takes every device)


class JobPhase(str, enum.Enum):
    """Where a job is in the worker's queue (not the run's state: see ``RunState``)."""

    QUEUED = "queued"      # waiting for a free device
    RUNNING = "running"    # its process was started (or adopted after a restart)
    DONE = "done"          # its process ended, or it was cancelled


@dataclass
class Job:
    run_id: str
    run_dir: pathlib.Path
    settings: dict
    argv: list
    phase: JobPhase = JobPhase.QUEUED
    device: dict | None = None
    proc: subprocess.Popen | None = None
    pid: int | None = None
    adopted: bool = False
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    stop_requested_at: float | None = None
    returncode: int | None = None
    final_state: RunState | None = None
    error: str | None = None         # why the worker ended it (when the trainer could not say)
    distribute: str | None = None    # set: the run takes every device

    @property
    def alive(self) -> bool:
        """Its training process runs: the worker's child, or (adopted) the holder of the
        run's lock, or a process still starting (before it takes the lock)."""
        if self.proc is not None:
            return self.proc.poll() is None
        return lock_held(self.run_dir) or pid_alive(self.pid)


class JobManager:
    """Queue of training runs executed as subprocesses, ``max_per_device`` at a time per device.

    Args:
        store: the :class:`RunStore` whose root receives the run directories.
        max_per_device: jobs that may share one device (1 by default: one job per device).
        devices: as returned by :func:`detect_devices` (detected when None).
        grace_seconds: how long a stopped job may take to finish its batch before SIGKILL.
        poll_interval: seconds between monitor ticks (launch, reap, enforce stops).
        python: interpreter for the subprocess (default ``$KERAS_VARINIT_EXPLORER_PYTHON`` or
            ``sys.executable``).
        env: extra environment variables for the subprocess.
        start: start the monitor thread (tests may call :meth:`poll` themselves).
    """

    def __init__(self, store: RunStore, *, max_per_device: int = 1, devices=None,
                 grace_seconds: float = 20.0, poll_interval: float = 0.5,
                 python: str | None = None, env: dict | None = None, start: bool = True):
        self.store = store
        self.max_per_device = max(1, int(max_per_device))
        self.devices = devices if devices is not None else detect_devices()
        self.grace_seconds = float(grace_seconds)
        self.poll_interval = float(poll_interval)
        # The interpreter of the training subprocess: this one, unless overridden (e.g. a
        # different venv) through the argument or $KERAS_VARINIT_EXPLORER_PYTHON.
        self.python = python or os.environ.get("KERAS_VARINIT_EXPLORER_PYTHON") or sys.executable
        self.env = dict(env or {})
        self._jobs: dict[str, Job] = {}
        self._order: list[str] = []
        self._lock = threading.RLock()
        self._stop_event = threading.Event()
        self._thread = None
        self._adopt_existing()
        if start:
            self.start()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self):
        if self._thread is None or not self._thread.is_alive():
            self._stop_event.clear()
            self._thread = threading.Thread(target=self._loop, name="explorer-jobs", daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop_event.wait(self.poll_interval):
            try:
                self.poll()
            except Exception:  # never let the monitor die; the next tick retries
                pass

    def shutdown(self, stop_running: bool = True, timeout: float = 30.0):
        """Stop the monitor; with ``stop_running``, cancel the queue and stop running jobs."""
        if stop_running:
            for run_id in list(self._order):
                self.stop(run_id)
            deadline = time.time() + timeout
            while time.time() < deadline and self.active():
                self.poll()
                time.sleep(0.1)
            for job in self.active():
                self._kill(job)
            self.poll()
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- submitting ----------------------------------------------------------------------
    def submit(self, settings: dict, *, stats_every: int | None = None) -> str:
        """Queue a run; returns its id (the run directory's name under the store's root)."""
        settings = {**presets.DEFAULTS, **settings}
        problems = presets.blocking_problems(settings)
        if problems:
            raise ValueError(problems[0].text)
        if stats_every is None:
            stats_every = presets.default_stats_every(settings)
        config = dataclasses.replace(presets.to_config(settings),
                                     stats_every_n_steps=int(stats_every))
        return self.submit_config(config, settings=settings)

    def submit_config(self, config: TrainConfig, *, settings: dict | None = None) -> str:
        """Queue a run of ``config`` as it is (every field, not only the page's: e.g. a run's
        config.json with a suggestion applied); returns its id. ``settings``: the page's
        settings it came from (default: those that describe ``config``)."""
        config.validate()
        settings = settings or presets.settings_of(config)
        problems = presets.blocking_problems(settings)
        if problems:
            raise ValueError(problems[0].text)
        run_dir = self.store.new_run_dir(config.slug())
        argv = [self.python, "-m", "keras_varinit.cli", *presets.train_args(config, run_dir)]
        job = Job(run_id=run_dir.name, run_dir=run_dir, settings=settings, argv=argv,
                  distribute=config.distribute)
        return self._queue(job)

    def resume(self, run_id: str) -> str:
        """Queue a stopped, interrupted or failed run again with ``--resume`` (the options of
        its config.json): it continues from its last backup."""
        info = self.store.info(run_id)
        if info is None or not info.resumable:
            state = info.state.value if info is not None else "no such run"
            raise ValueError(f"This run cannot be resumed. Received: run {run_id!r} in state "
                             f"{state!r}. Allowed: a stopped, interrupted or failed run.")
        with self._lock:
            previous = self._jobs.get(run_id)
            if previous is not None and previous.phase != JobPhase.DONE:
                raise ValueError(f"This run is already {previous.phase.value}. Received: "
                                 f"run {run_id!r}. Allowed: a run that has ended.")
        config = TrainConfig.from_dict(info.config)
        argv = [self.python, "-m", "keras_varinit.cli", "train", *config_argv(config),
                "--log-dir", str(info.path), "--resume"]
        settings = self.store.job(run_id).get("settings") or presets.settings_of(config)
        job = Job(run_id=run_id, run_dir=info.path, settings=settings, argv=argv,
                  distribute=config.distribute)
        return self._queue(job)

    def _queue(self, job: Job) -> str:
        self._write_job_file(job)
        with self._lock:
            self._jobs[job.run_id] = job
            if job.run_id in self._order:
                self._order.remove(job.run_id)
            self._order.append(job.run_id)
        self.poll()
        return job.run_id

    def submit_many(self, settings_list, **kwargs) -> list[str]:
        return [self.submit(s, **kwargs) for s in settings_list]

    # -- stopping ------------------------------------------------------------------------
    def stop(self, run_id: str) -> bool:
        """Cancel a queued run, or ask a running one to stop (SIGINT; SIGKILL after grace)."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is None or job.phase == JobPhase.DONE:
                return False
            if job.phase == JobPhase.QUEUED:
                self._order.remove(run_id)
                self._end(job, RunState.STOPPED, "cancelled before it started")
                return True
            if job.stop_requested_at is None:
                job.stop_requested_at = time.time()
                self._signal(job, signal.SIGINT)
            return True

    def stop_all(self):
        for run_id in list(self._order):
            self.stop(run_id)

    # -- state ---------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        with self._lock:
            return [self._jobs[r] for r in self._order]

    def active(self) -> list[Job]:
        return [j for j in self.jobs() if j.phase == JobPhase.RUNNING]

    def queued(self) -> list[Job]:
        return [j for j in self.jobs() if j.phase == JobPhase.QUEUED]

    def job(self, run_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(run_id)

    def busy(self) -> bool:
        return bool(self.active() or self.queued())

    def set_max_per_device(self, n: int):
        self.max_per_device = max(1, int(n))
        self.poll()

    def wait(self, run_id: str, timeout: float = 600.0) -> RunState | None:
        """Block until the run has ended (or ``timeout``); returns its final state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.poll()
            job = self.job(run_id)
            if job is None or job.phase == JobPhase.DONE:
                return job.final_state if job else None
            time.sleep(0.2)
        return None

    # -- the monitor tick ----------------------------------------------------------------
    def poll(self):
        """Reap ended processes, enforce stop deadlines, start queued runs on free devices."""
        with self._lock:
            now = time.time()
            for job in [j for j in self._jobs.values() if j.phase == JobPhase.RUNNING]:
                returncode = self._returncode(job)
                if returncode is None:
                    if (job.stop_requested_at is not None
                            and now - job.stop_requested_at > self.grace_seconds):
                        self._kill(job)
                    continue
                self._finish(job, returncode)
            for run_id in list(self._order):  # first come, first served
                job = self._jobs[run_id]
                if job.phase != JobPhase.QUEUED:
                    continue
                device = self._free_device(job)
                if device is None:
                    break
                self._launch(job, device)

    def _returncode(self, job: Job):
        if job.proc is not None:
            return job.proc.poll()
        return None if job.alive else -1

    def _free_device(self, job: Job):
        """A device for ``job`` (every device at once for a data-parallel one), or None."""
        running = [j for j in self._jobs.values() if j.phase == JobPhase.RUNNING]
        if any(j.distribute for j in running):
            return None
        if job.distribute:
            names = ", ".join(d["name"] for d in self.devices)
            return None if running or not self.devices else {
                "id": ALL_DEVICES, "name": f"all devices ({names})", "env": {}}
        load = {d["id"]: 0 for d in self.devices}
        for other in running:
            if other.device is not None:
                load[other.device["id"]] = load.get(other.device["id"], 0) + 1
        for device in self.devices:
            if load.get(device["id"], 0) < self.max_per_device:
                return device
        return None

    def _launch(self, job: Job, device: dict):
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
        env.update(device.get("env", {}))
        env.update(self.env)
        pythonpath = env.get("PYTHONPATH", "")
        if str(REPO_ROOT) not in pythonpath.split(os.pathsep):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), pythonpath) if p)
        job.device = device
        try:
            with open(job.run_dir / LOG_FILE, "ab") as log:
                log.write(f"$ {' '.join(job.argv)}\n".encode())
                log.flush()
                job.proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            cwd=str(REPO_ROOT), start_new_session=True)
        except OSError as error:
            self._end(job, RunState.FAILED, f"could not start training: {error}")
            return
        job.pid = job.proc.pid
        job.phase, job.started_at = JobPhase.RUNNING, time.time()
        self._write_job_file(job)

    def _finish(self, job: Job, returncode: int):
        """The process ended: its final state is the trainer's, else the worker's verdict."""
        job.returncode = returncode
        if job.proc is not None:
            try:
                job.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        written = RunState.parse((read_json(job.run_dir / STATUS_FILE, {}) or {}).get("state"))
        if written.terminal:
            job.phase, job.final_state, job.ended_at = JobPhase.DONE, written, time.time()
            self._write_job_file(job)
        elif job.stop_requested_at is not None:
            self._end(job, RunState.STOPPED, f"stopped (process exited with code {returncode} "
                                             "before writing its final state)")
        else:
            tail = self.store.log_tail(job.run_id, 15).strip()
            # it trained (status "running"): resumable from its last backup; else it never
            # started (an error before training, e.g. an unwritable run directory)
            state = RunState.INTERRUPTED if written == RunState.RUNNING else RunState.FAILED
            self._end(job, state, f"training process exited with code {returncode} "
                                  "without finishing" + (f":\n{tail}" if tail else ""))

    def _signal(self, job: Job, sig):
        try:
            if job.proc is not None:
                job.proc.send_signal(sig)
            elif job.pid is not None:
                os.kill(job.pid, sig)
        except (ProcessLookupError, OSError):
            pass

    def _kill(self, job: Job):
        self._signal(job, signal.SIGKILL)

    # -- files ---------------------------------------------------------------------------
    def _write_job_file(self, job: Job):
        write_json_atomic(job.run_dir / JOB_FILE, {
            "run_id": job.run_id,
            "settings": job.settings,
            "argv": job.argv,
            "created": job.submitted_at,
            "owner_pid": os.getpid(),
            "pid": job.pid,
            "device": job.device["name"] if job.device else None,
            "device_id": job.device["id"] if job.device else None,
            "returncode": job.returncode,
            "final_state": job.final_state,
            "error": job.error,
            "ended_at": job.ended_at,
            "distribute": job.distribute,
        })

    def _end(self, job: Job, state: RunState, error: str):
        """The worker ends ``job`` in ``state`` (the trainer could not say): recorded in the
        job file, which ``run_store.effective_status`` reads over status.json."""
        job.phase, job.final_state, job.error = JobPhase.DONE, state, error
        job.ended_at = time.time()
        try:
            self._write_job_file(job)
        except OSError:
            pass  # the run directory was deleted

    def _adopt_existing(self):
        """After a restart: keep watching runs whose training process is alive (it holds the
        run's lock, or is still starting), and settle the others: a run that was training
        reads "interrupted" (from its lock: nothing to write), one that never started
        "failed"."""
        for run_id in self.store.run_ids():
            path = self.store.path(run_id)
            job_file = read_json(path / JOB_FILE, None)
            if not isinstance(job_file, dict):
                continue
            # status.json as the trainer left it (not the store's effective view): decided here
            written = RunState.parse((read_json(path / STATUS_FILE, {}) or {}).get("state"))
            if job_file.get("final_state") or written.terminal:
                continue
            owner = job_file.get("owner_pid")
            if owner == os.getpid():
                continue
            pid = lock_holder_pid(path) if lock_held(path) else job_file.get("pid")
            job = Job(run_id=run_id, run_dir=path, settings=job_file.get("settings") or {},
                      argv=job_file.get("argv") or [], pid=pid, adopted=True,
                      submitted_at=job_file.get("created") or time.time(),
                      distribute=job_file.get("distribute"))
            if pid is not None and job.alive:
                device_id = job_file.get("device_id")
                job.device = next((d for d in self.devices if d["id"] == device_id),
                                  self.devices[0] if self.devices else None)
                job.phase, job.started_at = JobPhase.RUNNING, time.time()
                self._jobs[run_id] = job
                self._order.append(run_id)
            elif written == RunState.RUNNING:
                continue  # it was training: interrupted (its lock is free), resumable
            elif pid is None and owner is not None and pid_alive(owner):
                continue  # queued by another explorer that is still alive: its business
            else:
                reason = ("the explorer that queued it stopped before it started"
                          if pid is None else "its training process is gone (explorer or "
                          "machine restarted while it started)")
                self._end(job, RunState.FAILED, reason)
