"""Tests for keras_varinit/training/backup.py: the backup files (atomic, the newest two kept, an
unreadable newest one skipped) and exact resume after a hard kill: a `keras-varinit train`
process killed with SIGKILL at a random step of its second epoch, or in the middle of writing a
backup, then resumed with --resume, ends with the weights and run files of an uninterrupted run.
"""
import os
import pathlib
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_varinit import run_files as rf
from keras_varinit.training import backup as bk


REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def small_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse", metrics=["mae"])
    model.fit(np.ones((8, 3)), np.zeros((8, 2)), batch_size=4, verbose=0)
    return model


# --------------------------------------------------------------------------- the files

@pytest.mark.backend_independent
def test_backup_round_trip_and_the_newest_two_are_kept(tmp_path):
    model = small_model()
    for step in (2, 4, 6):
        path = bk.write_backup(tmp_path, model, step, steps_per_epoch=2)
        assert path.name == f"step-{step:09d}.npz"
    assert [p.name for p in bk.backup_paths(tmp_path)] == ["step-000000006.npz",
                                                           "step-000000004.npz"]
    backup = bk.latest_backup(tmp_path)
    assert (backup.step, backup.steps_per_epoch, backup.epochs_done) == (6, 2, 3)
    # every variable of model, optimizer (its iteration count too) and metrics
    assert len(backup.arrays["model"]) == len(model.variables)
    assert len(backup.arrays["optimizer"]) == len(model.optimizer.variables)
    assert len(backup.arrays["metrics"]) == len(model.metrics_variables) == 4
    fresh = small_model()
    fresh.get_layer(index=0).kernel.assign(np.zeros((3, 4)))
    bk.restore_model(fresh, backup, (np.ones((2, 3)), np.zeros((2, 2))))
    for a, b in zip(model.variables + model.optimizer.variables,
                    fresh.variables + fresh.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert backup.logger_state is None   # no layer statistics logger given


def test_the_layer_statistics_logger_state_goes_with_the_backup(tmp_path):
    """The logger's step and reference weights (layer paths with "/" and "#") come back
    intact, in order; a backup without them reads as None."""
    from keras_varinit.layer_stats_logger import LoggerState

    weights = {"backbone/conv#2": np.arange(6.0).reshape(2, 3), "dense": np.ones(4)}
    bk.write_backup(tmp_path, small_model(), 5, steps_per_epoch=2,
                    logger_state=LoggerState(4, weights))
    state = bk.latest_backup(tmp_path).logger_state
    assert state.step == 4 and list(state.weights) == list(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(state.weights[name], value)


@pytest.mark.backend_independent
def test_unreadable_newest_backup_falls_back_and_temporary_files_are_ignored(tmp_path):
    model = small_model()
    bk.write_backup(tmp_path, model, 3, steps_per_epoch=2)
    (tmp_path / "step-000000005.npz").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / ".step-000000007.npz.12345.tmp").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="Unreadable backup.*step-000000005"):
        bk.read_backup(tmp_path / "step-000000005.npz")
    assert bk.latest_backup(tmp_path).step == 3
    bk.write_backup(tmp_path, model, 9, steps_per_epoch=2)  # cleans the temporary file
    assert not list(tmp_path.glob(".step-*"))
    assert bk.latest_backup(tmp_path / "absent") is None


@pytest.mark.backend_independent
def test_a_backup_of_another_model_is_refused(tmp_path):
    bk.write_backup(tmp_path, small_model(), 2, steps_per_epoch=2)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5)])
    other.compile(keras.optimizers.SGD(0.1), "mse")
    with pytest.raises(ValueError, match="does not fit this model.*Allowed"):
        bk.restore_model(other, bk.latest_backup(tmp_path), (np.ones((2, 3)), np.ones((2, 5))))


# --------------------------------------------------------------------------- hard kills

ARGV = ["--model", "cnn", "--depth", "3", "--width", "4", "--norm", "batch",
        "--data", "synthetic", "--subset", "160", "--val-subset", "32", "--epochs", "2",
        "--batch-size", "16", "--stats-every", "2", "--backup-every", "3", "--quiet"]
STEPS_PER_EPOCH = 10   # 160 / 16; backups after steps 4, 8, 10, 14, 18, 20

# Runs `keras-varinit train` and kills itself with SIGKILL: after step KILL_AT has been
# trained and logged by RunControl (KILL_MODE=step), or half-way through writing the backup
# of step KILL_AT (KILL_MODE=backup).
_DRIVER = r'''
import os, signal, sys
import numpy as np
from keras_varinit.training import run_control

mode, at = os.environ["KILL_MODE"], int(os.environ["KILL_AT"])
if mode == "step":
    trained = run_control.RunControl.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        trained(self, batch, logs)
        if self.progress.step == at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_control.RunControl.on_train_batch_end = on_train_batch_end
else:
    savez = np.savez

    def killed_while_saving(file, **arrays):
        if f"step-{at:09d}" in getattr(file, "name", ""):
            file.write(b"PK\x03\x04" + bytes(4096))  # the start of a zip file, no more
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        savez(file, **arrays)

    np.savez = killed_while_saving
from keras_varinit.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3",
                TF_DETERMINISTIC_OPS="1", **extra)


def _train(run_dir, *extra, env=None):
    return subprocess.run([PYTHON, "-m", "keras_varinit.cli", "train", *ARGV,
                           "--log-dir", str(run_dir), *extra], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=400)


def _killed_then_resumed(run_dir, mode, at):
    killed = subprocess.run([PYTHON, "-c", _DRIVER, "train", *ARGV, "--log-dir", str(run_dir)],
                            cwd=REPO, env=_env(KILL_MODE=mode, KILL_AT=str(at)),
                            capture_output=True, text=True, timeout=400)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # the process is gone without a final state: its lock is free, the run reads interrupted
    assert rf.read_json(run_dir / "status.json")["state"] == "running"
    assert not rf.lock_held(run_dir)
    assert rf.run_state(run_dir) == rf.RunState.INTERRUPTED
    assert rf.read_jsonl(run_dir / "steps.jsonl")[-1]["step"] == at
    before_resume = bk.latest_backup(run_dir / "backup")
    resumed = _train(run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Run finished after 2/2 epochs, step 20/20" in resumed.stdout
    return before_resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = _train(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _event_steps(run_dir):
    """{(folder, tag): [steps in file order]} over every TensorBoard event file of a run."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    out = {}
    root = run_dir / "tensorboard"
    for path in sorted(root.rglob("events.out.tfevents*")):
        for raw in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(raw)
            for value in event.summary.value:
                key = (str(path.parent.relative_to(root)), value.tag)
                out.setdefault(key, []).append(event.step)
    return out


def assert_same_run(reference, run_dir, resumed_at):
    """``run_dir`` (resumed from a backup after step ``resumed_at``) holds what the
    uninterrupted ``reference`` holds."""
    a, b = bk.latest_backup(reference / "backup"), bk.latest_backup(run_dir / "backup")
    assert a.step == b.step == 2 * STEPS_PER_EPOCH
    for group in bk.GROUPS:
        for x, y in zip(a.arrays[group], b.arrays[group], strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7, err_msg=group)
    steps_a, steps_b = (rf.read_jsonl(d / "steps.jsonl") for d in (reference, run_dir))
    assert [s["step"] for s in steps_b] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for x, y in zip(steps_a, steps_b, strict=True):
        assert (y["epoch"], y["loss"], y["accuracy"]) == pytest.approx(
            (x["epoch"], x["loss"], x["accuracy"]), rel=1e-5)
    rows_a, rows_b = (rf.MetricsCsv(d / "metrics.csv").read() for d in (reference, run_dir))
    assert [r["epoch"] for r in rows_b] == [1, 2]
    for x, y in zip(rows_a, rows_b, strict=True):
        for column in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert y[column] == pytest.approx(x[column], rel=1e-5), column
    stats_a, stats_b = (rf.read_jsonl(d / "layer_stats.jsonl") for d in (reference, run_dir))
    keys = [(r["step"], r["layer"]) for r in stats_b]
    assert keys == [(r["step"], r["layer"]) for r in stats_a] and len(set(keys)) == len(keys)
    for x, y in zip(stats_a, stats_b, strict=True):
        assert y["epoch"] == x["epoch"]
        for field in rf.LAYER_STATS_VALUES:
            # update_ratio too, at the resumed step: the backup keeps the weights of the
            # logger's previous log (it was null there when they were kept in memory only)
            if x[field] is None:
                assert y[field] is None, field
            else:
                assert y[field] == pytest.approx(x[field], rel=1e-5, abs=1e-9), field
    events_a, events_b = _event_steps(reference), _event_steps(run_dir)
    assert events_b == events_a  # the same summaries at the same steps, in order
    for steps in events_b.values():
        assert steps == sorted(set(steps))  # monotonic, each step once


def test_sigkill_at_a_random_step_of_epoch_two_then_resume_equals_uninterrupted(
        uninterrupted, tmp_path):
    at = int(np.random.default_rng(13).integers(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH))
    run_dir = tmp_path / "run"
    backup = _killed_then_resumed(run_dir, "step", at)
    backups = [4, 8, 10, 14, 18]  # every 3 steps at the next even step; epoch ends
    assert backup.step == max(b for b in backups if b < at)
    assert_same_run(uninterrupted, run_dir, backup.step)


@pytest.mark.slow
def test_sigkill_while_writing_a_backup_keeps_the_previous_one(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    backup = _killed_then_resumed(run_dir, "backup", 18)
    assert backup.step == 14  # the backup being written (18) never replaced it
    assert not list((run_dir / "backup").glob(".step-*"))  # its remains were removed
    assert_same_run(uninterrupted, run_dir, backup.step)
