"""Tests for keras_varinit/run_files.py: liveness from the run's lock (not from the age of
status.json), the states readers derive from it, and the error for a run directory that cannot
be written. (The writers and readers of each file are exercised by tests/test_training.py and
the explorer tests.)"""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from keras_varinit import run_files as rf
from keras_varinit.run_files import RunState


# Holds a run's lock like a trainer (status "running"), then sleeps until killed. run_files is
# plain Python: loaded from its file, without the package (and Keras) around it.
_HOLDER = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_files", sys.argv[2])
rf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rf)
lock = rf.RunLock(sys.argv[1])
assert lock.acquire()
rf.write_json_atomic(f"{sys.argv[1]}/{rf.STATUS_FILE}", {"state": "running"})
print("HELD", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``tmp_path/run``'s lock; yields (run_dir, process)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir), rf.__file__],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "HELD"
        yield run_dir, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_live_holder_is_running_whatever_the_age_of_status_json(holder):
    run_dir, proc = holder
    old = time.time() - 3600  # a run that wrote nothing for an hour (stalled, or slow)
    os.utime(run_dir / rf.STATUS_FILE, (old, old))
    assert rf.lock_held(run_dir)
    assert rf.lock_holder_pid(run_dir) == proc.pid
    assert rf.run_state(run_dir) == RunState.RUNNING
    assert rf.RunLock(run_dir).acquire(wait=0.1) is False  # a second trainer is refused


def test_sigkill_releases_the_lock_and_the_run_reads_interrupted(holder):
    run_dir, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not rf.lock_held(run_dir)  # at once: the operating system released it
    assert rf.read_json(run_dir / rf.STATUS_FILE)["state"] == "running"
    state = rf.run_state(run_dir)
    assert state == RunState.INTERRUPTED and state.terminal and state.resumable
    lock = rf.RunLock(run_dir)
    assert lock.acquire(wait=0.1)
    assert rf.lock_held(run_dir)  # another process (here: a reader's probe) sees it held
    lock.release()
    assert not rf.lock_held(run_dir)


def test_states_without_a_lock_file(tmp_path):
    assert not rf.lock_held(tmp_path)
    assert rf.run_state(tmp_path) == RunState.UNKNOWN
    assert rf.run_state(tmp_path, {"state": "finished"}) == RunState.FINISHED
    assert rf.run_state(tmp_path, {"state": "running"}) == RunState.INTERRUPTED
    assert not RunState.FINISHED.resumable and RunState.STOPPED.resumable
    assert RunState.QUEUED.active and not RunState.INTERRUPTED.active


def test_unwritable_run_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(rf.RunDirError, match="Cannot write the run directory") as info:
        rf.RunLock(blocker / "run").acquire()
    assert "a_file" in str(info.value) and "Allowed:" in str(info.value)
    with pytest.raises(rf.RunDirError, match="Cannot write the run directory"):
        rf.new_run_dir(blocker / "runs", "slug")
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert rf.is_write_error(full, tmp_path / "elsewhere")
    assert not rf.is_write_error(FileNotFoundError(errno.ENOENT, "gone", "/data"), tmp_path)
    assert "No space left on device" in str(rf.RunDirError.from_os_error(tmp_path, full))
