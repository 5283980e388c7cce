"""The explorer's job manager with real `keras-varinit train` subprocesses (tiny synthetic runs:
depth 3, width 4, a few hundred images). Covers: a run to completion with progress, the queue
(one job per device), SIGKILL -> "interrupted", Stop -> "stopped", cancelling a queued run,
divergence -> "diverged", and listing/adopting after a restart (new store and manager)."""
import json
import os
import signal
import time

import pytest

from explorer.run_store import RunStore
from explorer.worker import JobManager, data_parallel_devices, detect_devices

TINY = dict(model="cnn", depth=3, width=4, activation="relu", init="kaiming_normal",
            normalization="none", optimizer="sgd", lr=0.01, momentum=0.9, batch_size=64,
            epochs=1, subset=256, seed=0, data="synthetic")
# Long enough to be caught running (thousands of steps), stopped long before it ends.
LONG = dict(TINY, subset=4096, batch_size=16, epochs=50)
CPU = [{"id": "cpu", "name": "CPU (test)", "env": {"CUDA_VISIBLE_DEVICES": ""}}]


def _wait_for(predicate, timeout=240.0, interval=0.2, jobs=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if jobs is not None:
            jobs.poll()
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")


@pytest.fixture
def jobs(tmp_path):
    manager = JobManager(RunStore(tmp_path / "runs"), devices=CPU, grace_seconds=30,
                         poll_interval=0.2)
    yield manager
    manager.shutdown(stop_running=True, timeout=30)


def test_detect_devices_returns_at_least_cpu():
    devices = detect_devices()
    assert devices and all({"id", "name", "env"} <= set(d) for d in devices)


def test_tiny_run_completes_with_progress_and_is_listed_after_restart(jobs, tmp_path):
    run_id = jobs.submit(TINY, stats_every=1)
    store = jobs.store
    assert store.info(run_id).state in ("queued", "running")
    assert jobs.wait(run_id, timeout=300) == "finished", store.log_tail(run_id, 30)
    status = store.status(run_id)
    assert status["state"] == "finished"
    assert status["step"] == status["total_steps"] == 4
    assert store.info(run_id).progress == 1.0
    steps = store.steps(run_id)
    assert len(steps) >= 1 and steps["loss"].notna().all()
    metrics = store.metrics(run_id)
    assert len(metrics) == 1 and 0.0 <= metrics["val_accuracy"].iloc[0] <= 1.0
    stats = store.layer_stats(run_id)
    assert {"conv_01", "conv_02"} <= set(stats["layer"]) and stats["step"].max() >= 1
    assert (store.path(run_id) / "tensorboard").is_dir()
    assert store.info(run_id).synthetic
    # "restart": new store and manager objects over the same directory
    again = RunStore(tmp_path / "runs")
    info = again.info(run_id)
    assert info.state == "finished" and info.config["depth"] == 3
    restarted = JobManager(again, devices=CPU, start=False)
    assert restarted.jobs() == []  # nothing to adopt: the run is over
    table = again.final_metrics()
    assert table.loc[0, "state"] == "finished" and table.loc[0, "data"] == "synthetic"


@pytest.mark.slow
def test_queue_kill_stop_and_cancel(jobs):
    store = jobs.store
    first = jobs.submit(LONG, stats_every=50)
    second = jobs.submit(LONG, stats_every=50)
    third = jobs.submit(TINY)
    # one job per device: the others wait
    assert [j.phase for j in jobs.jobs()] == ["running", "queued", "queued"]
    assert store.info(second).state == "queued"
    _wait_for(lambda: (store.status(first).get("step") or 0) > 5, jobs=jobs)
    assert store.info(second).state == "queued"

    # a training process killed without writing a final state -> interrupted, resumable
    os.kill(jobs.job(first).pid, signal.SIGKILL)
    _wait_for(lambda: jobs.job(first).phase == "done", jobs=jobs)
    assert store.info(first).state == "interrupted" and store.info(first).resumable
    assert "exited with code -9" in store.status(first)["error"]

    # the queue moves on; cancel the queued tiny run while the second one trains
    _wait_for(lambda: jobs.job(second).phase == "running", jobs=jobs)
    assert jobs.stop(third)
    assert store.info(third).state == "stopped"
    assert "cancelled" in store.status(third)["error"]
    _wait_for(lambda: (store.status(second).get("step") or 0) > 5, jobs=jobs)

    # Stop: SIGINT, the trainer ends after the current batch with complete logs
    jobs.stop(second)
    assert jobs.wait(second, timeout=120) == "stopped"
    status = store.status(second)
    assert status["state"] == "stopped" and 0 < status["step"] < status["total_steps"]
    assert len(store.steps(second)) > 0
    assert not jobs.busy()


def test_diverged_run_is_reported(jobs):
    store = jobs.store
    # far past any stable step size (the page allows it with a warning)
    run_id = jobs.submit(dict(TINY, lr=1e6, epochs=3), stats_every=2)
    assert jobs.wait(run_id, timeout=300) == "diverged", store.log_tail(run_id, 30)
    info = store.info(run_id)
    assert info.state == "diverged" and store.diverged(run_id)
    assert "loss" in (info.status.get("error") or "")
    steps = store.steps(run_id)
    assert steps["loss"].isna().iloc[-1]  # NaN (null in the file) read back as NaN
    assert info.status["step"] < info.status["total_steps"]


def test_restart_adopts_live_runs_and_fails_orphans(tmp_path):
    root = tmp_path / "runs"
    store = RunStore(root)
    # an orphan: queued by an explorer process that no longer exists
    orphan = store.new_run_dir("orphan")
    (orphan / "status.json").write_text(json.dumps({"state": "queued"}))
    (orphan / "explorer_job.json").write_text(json.dumps({"pid": None, "owner_pid": 2**22 + 1,
                                                         "settings": TINY}))
    # a run "launched by an earlier explorer" whose process is still alive: this test process
    live = store.new_run_dir("live")
    (live / "status.json").write_text(json.dumps({"state": "running"}))
    (live / "explorer_job.json").write_text(json.dumps({"pid": os.getpid(),
                                                       "owner_pid": 2**22 + 1,
                                                       "settings": TINY}))
    manager = JobManager(store, devices=CPU, start=False)
    assert store.info(orphan.name).state == "failed"
    assert "stopped before it started" in store.status(orphan.name)["error"]
    adopted = manager.job(live.name)
    assert adopted is not None and adopted.adopted and adopted.phase == "running"
    # the adopted run occupies the device: a new submission waits
    new = manager.submit(TINY)
    assert manager.job(new).phase == "queued"
    manager.stop(new)
    assert store.info(new).state == "stopped"


def test_submit_refuses_invalid_combinations(jobs):
    with pytest.raises(ValueError, match="MLP"):
        jobs.submit(dict(TINY, model="mlp", normalization="instance"))
    assert jobs.store.list_runs() == []


def test_the_worker_never_writes_status_json(tmp_path):
    """status.json has one writer, the trainer: a run queued and cancelled by the worker has
    none; the store shows what the worker recorded in its job file."""
    store = RunStore(tmp_path / "runs")
    manager = JobManager(store, devices=[], start=False)  # no device: the run stays queued
    run_id = manager.submit(TINY)
    assert store.info(run_id).state == "queued"
    assert manager.stop(run_id)
    assert not (store.path(run_id) / "status.json").exists()
    assert store.info(run_id).state == "stopped"
    assert "cancelled" in store.status(run_id)["error"]
    job = json.loads((store.path(run_id) / "explorer_job.json").read_text())
    assert job["final_state"] == "stopped"


def test_data_parallel_devices_counts_jax_devices():
    two = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert data_parallel_devices(env=two) == 2
    assert data_parallel_devices(env={"KERAS_BACKEND": "tensorflow"}) == 0


def test_a_data_parallel_run_takes_every_device(tmp_path):
    devices = [{"id": f"gpu:{i}", "name": f"GPU {i}", "env": {"CUDA_VISIBLE_DEVICES": ""}}
               for i in range(2)]
    jobs = JobManager(RunStore(tmp_path / "runs"), devices=devices, poll_interval=0.2)
    try:
        first = jobs.submit(LONG, stats_every=50)
        parallel = jobs.submit(dict(TINY, distribute="data_parallel"))
        single = jobs.submit(TINY)
        # one device is free, but the data-parallel run needs both: it waits, and the run
        # queued after it waits its turn
        assert [jobs.job(r).phase for r in (first, parallel, single)] == \
            ["running", "queued", "queued"]
        assert "--distribute data_parallel" in " ".join(jobs.job(parallel).argv)
        jobs.stop(first)
        _wait_for(lambda: jobs.job(parallel).phase != "queued", jobs=jobs)
        assert jobs.job(parallel).device["name"] == "all devices (GPU 0, GPU 1)"
        assert jobs.job(single).phase == "queued"  # nothing else while it holds them all
    finally:
        jobs.shutdown(stop_running=True, timeout=30)
