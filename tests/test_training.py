"""Tests for keras_varinit.training (run_training and the run-directory contract)."""
import csv
import json
import math
import os
import pathlib
import subprocess
import sys
import threading

import keras
import pytest

from keras_varinit import run_files as rf
from keras_varinit.training import TrainConfig, TrainResult, run_training
from keras_varinit.training.backup import backup_paths, latest_backup

REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable

STATUS_KEYS = {"state", "epoch", "step", "total_steps", "images_per_second", "eta_seconds",
               "device", "started_at", "updated_at", "error"}
STEP_KEYS = {"step", "epoch", "loss", "accuracy"}
METRICS_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "train_mode_loss",
                   "train_mode_accuracy", "train_eval_loss", "train_eval_accuracy", "seconds"]
LAYER_KEYS = {"step", "epoch", "layer", "layer_index", "layer_type", "follows_previous",
              "activation_mean", "activation_std", "zero_fraction", "saturated_fraction",
              "activation_grad_std", "weight_std", "weight_grad_std", "update_ratio",
              "nan_count", "inf_count"}


def tiny(**overrides):
    """A config that trains in about a second on CPU (synthetic data)."""
    base = dict(model="cnn", depth=3, width=4, init="kaiming_normal", activation="relu",
                data="synthetic", subset=256, val_subset=64, epochs=2, batch_size=64,
                stats_every_n_steps=2, lr=0.01)
    base.update(overrides)
    return TrainConfig(**base)


def read_metrics(run_dir):
    with open(pathlib.Path(run_dir) / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


class StopAfter(keras.callbacks.Callback):
    """Sets a threading.Event after n training batches (simulates a user pressing Stop)."""

    def __init__(self, event, n):
        super().__init__()
        self.event, self.n, self.seen = event, n, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen >= self.n:
            self.event.set()


# --------------------------------------------------------------------------- config
# The schema's own tests (validation, round trip, slug, CLI/explorer generation):
# tests/test_training_config.py.

def test_bad_config_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        run_training(tiny(depth=1), tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- a run

@pytest.mark.backend_independent
def test_tiny_run_writes_every_file_of_the_contract(tmp_path):
    run_dir = tmp_path / "run"
    result = run_training(tiny(), run_dir, verbose=0)
    assert isinstance(result, TrainResult)
    assert result.state == "finished"
    assert result.epochs_completed == 2 and result.step == result.total_steps == 8
    assert result.synthetic is True
    for name in ("config.json", "status.json", "steps.jsonl", "metrics.csv",
                 "layer_stats.jsonl", "tensorboard"):
        assert (run_dir / name).exists(), name
    # the last backup stays: the final state (no "checkpoint": TensorBoard misreads it)
    assert [p.name for p in backup_paths(run_dir / "backup")] == ["step-000000008.npz",
                                                                   "step-000000004.npz"]
    assert not (run_dir / "checkpoint").exists()

    config = json.loads((run_dir / "config.json").read_text())
    assert TrainConfig.from_dict(config) == tiny()
    assert config["synthetic"] is True and config["device"] == result.device

    status = json.loads((run_dir / "status.json").read_text())
    assert STATUS_KEYS <= set(status)
    assert status["state"] == "finished" and status["error"] is None
    assert status["step"] == status["total_steps"] == 8
    assert status["epoch"] == 2
    assert status["device"] in ("CPU",) or status["device"].startswith("GPU:0")
    assert status["images_per_second"] > 0
    assert status["started_at"] <= status["updated_at"]

    steps = rf.read_jsonl(run_dir / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert all(set(s) == STEP_KEYS for s in steps)
    assert [s["epoch"] for s in steps] == [1] * 4 + [2] * 4
    assert all(math.isfinite(s["loss"]) and 0 <= s["accuracy"] <= 1 for s in steps)

    columns, rows = read_metrics(run_dir)
    assert columns == METRICS_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert all(math.isfinite(float(row[c])) for c in METRICS_COLUMNS)
    assert result.metrics["val_accuracy"] == pytest.approx(float(rows[-1]["val_accuracy"]))
    assert [r["epoch"] for r in result.history] == [1, 2]

    records = rf.read_jsonl(run_dir / "layer_stats.jsonl")
    assert records and all(set(r) == LAYER_KEYS for r in records)
    assert min(r["step"] for r in records) == 0
    assert {r["layer"] for r in records} >= {"conv_01", "logits"}

    events = [p for p in (run_dir / "tensorboard").rglob("events.out.tfevents*")]
    assert events


# --------------------------------------------------------------------------- train/test modes

def _modes_run(tmp_path, normalization):
    """4 steps of 16 images: a BN layer's moving averages (momentum 0.99) still hold
    0.99^4 = 0.96 of their initial values (mean 0, variance 1)."""
    config = tiny(normalization=normalization, groups=2, subset=64, epochs=1, batch_size=16,
                  stats_every_n_steps=0)
    result = run_training(config, tmp_path / normalization, verbose=0, keep_data=True)
    (_, rows) = read_metrics(tmp_path / normalization)
    (x, y), _ = result.data
    return result.model, x, y, {k: float(v) for k, v in rows[-1].items()}


@pytest.mark.backend_independent
def test_batch_norm_run_measures_its_train_test_gap(tmp_path):
    model, x, y, row = _modes_run(tmp_path, "batch")
    assert len(x) == 64   # the whole subset is the slice (fewer than TRAIN_EVAL_IMAGES)
    assert abs(row["train_mode_loss"] - row["train_eval_loss"]) > 0.01
    # inference mode: what Keras's own evaluate gives with the final weights
    keras_eval = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    assert row["train_eval_loss"] == pytest.approx(keras_eval["loss"], rel=1e-4)
    assert row["train_eval_accuracy"] == pytest.approx(keras_eval["accuracy"], abs=1e-6)
    # training mode: each batch of 16 with its own statistics
    logits = keras.ops.concatenate([model(x[i:i + 16], training=True) for i in (0, 16, 32, 48)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    assert row["train_mode_loss"] == pytest.approx(float(loss), rel=1e-4)


@pytest.mark.backend_independent
@pytest.mark.parametrize("normalization", ["none", "group"])
def test_without_batch_norm_the_two_modes_agree(tmp_path, normalization):
    _, _, _, row = _modes_run(tmp_path, normalization)
    assert row["train_mode_loss"] == pytest.approx(row["train_eval_loss"], rel=1e-6)
    assert row["train_mode_accuracy"] == row["train_eval_accuracy"]
    assert 0 < row["train_eval_loss"] < 10


@pytest.mark.backend_independent
def test_evaluate_modes_leaves_the_moving_averages_alone():
    import numpy as np

    from keras_varinit.training.mode_eval import evaluate_modes
    from keras_varinit.training.model import compile_model

    rng = np.random.default_rng(0)
    x = (3 + 2 * rng.standard_normal((32, 8, 8, 3))).astype("float32")
    y = rng.integers(0, 10, 32).astype("int32")
    model = compile_model(tiny(normalization="batch"), x)
    before = [np.array(v) for v in model.non_trainable_variables]
    figures = evaluate_modes(model, x, y, batch_size=8)
    after = [np.array(v) for v in model.non_trainable_variables]
    assert all(np.array_equal(b, a) for b, a in zip(before, after))
    assert set(figures) == {"train_mode_loss", "train_mode_accuracy", "train_eval_loss",
                            "train_eval_accuracy"}
    assert figures["train_mode_loss"] != pytest.approx(figures["train_eval_loss"], rel=1e-3)


def test_mlp_with_lsuv_and_adam(tmp_path):
    result = run_training(tiny(model="mlp", width=16, init="lsuv", activation="tanh",
                               optimizer="adam", lr=1e-3, epochs=1, stats_every_n_steps=0),
                          tmp_path / "run", verbose=0)
    assert result.state == "finished"
    assert not (tmp_path / "run" / "layer_stats.jsonl").exists()  # statistics off
    assert math.isfinite(result.metrics["loss"])


def test_inputs_are_normalized_with_pooled_training_statistics():
    from keras_varinit.training.data import load_data

    (x, y), (xv, yv), info = load_data(tiny(subset=200, val_subset=50))
    assert x.dtype.name == "float32" and x.shape == (200, 32, 32, 3)
    assert y.dtype.name == "int32" and y.shape == (200,)
    assert xv.shape == (50, 32, 32, 3)
    assert info["synthetic"] is True
    # Per channel over N*H*W: mean 0, pooled std 1 on the training subset.
    assert abs(x.mean(axis=(0, 1, 2))).max() < 1e-4
    assert abs(x.std(axis=(0, 1, 2)) - 1).max() < 1e-4


@pytest.mark.backend_independent
def test_input_normalization_none_feeds_the_raw_pixels():
    """The configuration the unnormalized-input finding's fix is the opposite of."""
    from keras_varinit.datasets import synthetic_cifar10
    from keras_varinit.training.data import load_data

    (x, _), _, info = load_data(tiny(subset=200, val_subset=10, input_normalization="none"))
    (raw, _), _ = synthetic_cifar10(len(x), 10, seed=0)
    assert x.dtype.name == "float32" and x.max() > 100
    assert (x == raw.astype("float32")).all()
    assert info["mean"] == [0.0] * 3 and info["std"] == [1.0] * 3
    assert "raw_input" in tiny(input_normalization="none").slug()


def test_mixed_precision_run_restores_policy(tmp_path):
    before = keras.mixed_precision.dtype_policy().name
    result = run_training(tiny(mixed_precision=True, epochs=1, stats_every_n_steps=0),
                          tmp_path / "run", verbose=0)
    assert result.state == "finished"
    assert keras.mixed_precision.dtype_policy().name == before


# --------------------------------------------------------------------------- divergence

@pytest.mark.backend_independent
def test_huge_learning_rate_ends_diverged(tmp_path):
    run_dir = tmp_path / "run"
    # linear layers: nothing can die or saturate, so the logits (and the loss) overflow
    # whatever the draw (with ReLU one huge step may instead kill every unit and stall)
    result = run_training(tiny(lr=1e6, epochs=3, activation="linear"), run_dir, verbose=0)
    assert result.state == "diverged"
    assert "loss became" in result.error
    assert result.step < result.total_steps
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "diverged" and "loss became" in status["error"]
    steps = rf.read_jsonl(run_dir / "steps.jsonl")
    assert steps[-1]["loss"] is None  # NaN written as null, the file stays valid JSON
    records = rf.read_jsonl(run_dir / "layer_stats.jsonl")
    assert records  # the logger recorded the explosion without crashing


# --------------------------------------------------------------------------- run directories

def test_refuses_a_directory_holding_a_different_run(tmp_path):
    run_dir = tmp_path / "run"
    run_training(tiny(epochs=1, stats_every_n_steps=0), run_dir, verbose=0)
    with pytest.raises(ValueError, match="different run.*depth") as info:
        run_training(tiny(epochs=1, depth=4), run_dir, verbose=0)
    assert "overwrite" in str(info.value)
    with pytest.raises(ValueError, match="different run"):
        run_training(tiny(epochs=1, depth=4), run_dir, resume=True, verbose=0)
    # The same run again needs --resume or --overwrite too.
    with pytest.raises(ValueError, match="already holds this run"):
        run_training(tiny(epochs=1, stats_every_n_steps=0), run_dir, verbose=0)
    # Resuming a finished run trains nothing.
    again = run_training(tiny(epochs=1, stats_every_n_steps=0), run_dir, resume=True,
                         verbose=0)
    assert again.state == "finished" and again.epochs_completed == 1
    result = run_training(tiny(epochs=1, depth=4, stats_every_n_steps=0), run_dir,
                          overwrite=True, verbose=0)
    assert result.state == "finished"
    assert json.loads((run_dir / "config.json").read_text())["depth"] == 4
    assert len(read_metrics(run_dir)[1]) == 1


def test_other_files_in_the_run_directory_are_kept(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stdout.log").write_text("launcher output\n")
    rf.write_json_atomic(run_dir / "status.json", {"state": "queued"})
    run_training(tiny(epochs=1, stats_every_n_steps=0), run_dir, verbose=0)
    assert (run_dir / "stdout.log").read_text() == "launcher output\n"


# --------------------------------------------------------------------------- stop and resume

@pytest.mark.backend_independent
def test_stop_event_then_resume_continues_after_the_last_batch(tmp_path):
    run_dir = tmp_path / "run"
    config = tiny(epochs=3)
    event = threading.Event()
    # 4 steps per epoch; stopping after 6 batches interrupts epoch 2 (the control callback
    # sees the event at the next batch end, so the run stops after batch 7).
    stopped = run_training(config, run_dir, stop_event=event, callbacks=[StopAfter(event, 6)],
                           verbose=0)
    assert stopped.state == "stopped" and stopped.step == 7
    assert stopped.epochs_completed == 1
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == stopped.step
    assert latest_backup(run_dir / "backup").step == 7  # where the stop ended it
    assert len(read_metrics(run_dir)[1]) == 1  # the partial epoch has no row

    resumed = run_training(config, run_dir, resume=True, verbose=0)
    assert resumed.state == "finished"
    assert resumed.epochs_completed == 3
    # The interrupted epoch goes on at its 4th batch: 12 steps in all, each once.
    assert resumed.step == resumed.total_steps == 12
    assert [int(r["epoch"]) for r in read_metrics(run_dir)[1]] == [1, 2, 3]
    steps = [s["step"] for s in rf.read_jsonl(run_dir / "steps.jsonl")]
    assert steps == list(range(1, 13))
    records = rf.read_jsonl(run_dir / "layer_stats.jsonl")
    pairs = [(r["step"], r["layer"]) for r in records]
    assert len(pairs) == len(set(pairs))
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    # the steps an uninterrupted run logs (every 2, epoch ends): the stop's step 7, logged by
    # the resumed logger at train begin, was one too many; and no update ratio is missing
    assert sorted({r["step"] for r in records}) == [0, 2, 4, 6, 8, 10, 12]
    assert all(r["update_ratio"] is not None for r in records
               if r["step"] > 0 and r["weight_std"] is not None)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert latest_backup(run_dir / "backup").step == 12


@pytest.mark.backend_independent
def test_a_stop_mid_epoch_then_resume_reports_the_epoch_an_uninterrupted_run_reports(tmp_path):
    """After a stop, fit still validates, which resets the metrics; the stop's backup was
    written after that, so the resumed epoch's running loss and accuracy started from one
    validation batch (epoch 1: loss 2.2235 instead of 2.2495). SIGKILL was not affected."""
    config = tiny(epochs=2)
    reference = run_training(config, tmp_path / "reference", verbose=0)
    event = threading.Event()
    stopped = run_training(config, tmp_path / "run", stop_event=event,
                           callbacks=[StopAfter(event, 1)], verbose=0)
    assert stopped.state == "stopped" and stopped.step == 2   # in the middle of epoch 1
    run_training(config, tmp_path / "run", resume=True, verbose=0)
    for name in ("reference", "run"):
        assert len(read_metrics(tmp_path / name)[1]) == 2
    for a, b in zip(read_metrics(tmp_path / "reference")[1], read_metrics(tmp_path / "run")[1],
                    strict=True):
        for column in ("loss", "accuracy"):
            assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-4), (column, a, b)
    steps = [rf.read_jsonl(tmp_path / name / "steps.jsonl") for name in ("reference", "run")]
    for a, b in zip(*steps, strict=True):
        assert (b["loss"], b["accuracy"]) == pytest.approx((a["loss"], a["accuracy"]), rel=1e-4)
    stats = [rf.read_jsonl(tmp_path / name / "layer_stats.jsonl")
             for name in ("reference", "run")]
    for a, b in zip(*stats, strict=True):     # the update ratio at the resumed step included
        assert (b["step"], b["layer"]) == (a["step"], a["layer"])
        assert (b["update_ratio"] is None) == (a["update_ratio"] is None), b
        if a["update_ratio"] is not None:
            assert b["update_ratio"] == pytest.approx(a["update_ratio"], rel=1e-4), b
    assert reference.state == "finished"


def test_resume_refuses_only_a_run_whose_process_holds_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    config = tiny(epochs=1, stats_every_n_steps=0)
    run_dir.mkdir()
    rf.write_json_atomic(run_dir / "config.json", config.to_dict())
    rf.write_json_atomic(run_dir / "status.json", {"state": "running", "step": 2})
    lock = rf.RunLock(run_dir)  # the "training process", alive (here: this test)
    assert lock.acquire()
    try:
        with pytest.raises(RuntimeError, match="still running.*holds run.lock"):
            run_training(config, run_dir, resume=True, verbose=0)
        with pytest.raises(RuntimeError, match="still running"):
            run_training(config, run_dir, overwrite=True, verbose=0)
    finally:
        lock.release()
    # the process died (lock released) leaving status "running": not resumed is refused,
    # --resume goes on (here from the start: it left no backup)
    with pytest.raises(ValueError, match="state 'interrupted'.*resume=True"):
        run_training(config, run_dir, verbose=0)
    assert run_training(config, run_dir, resume=True, verbose=0).state == "finished"
    assert not rf.lock_held(run_dir)


def test_resume_restores_weights_not_a_fresh_model(tmp_path):
    run_dir = tmp_path / "run"
    config = tiny(epochs=2, stats_every_n_steps=0)
    event = threading.Event()
    run_training(config, run_dir, stop_event=event, callbacks=[StopAfter(event, 4)],
                 verbose=0)  # stops after epoch 1 is complete (during its validation/at end)

    class FirstLoss(keras.callbacks.Callback):
        loss = None

        def on_train_batch_end(self, batch, logs=None):
            if FirstLoss.loss is None:
                FirstLoss.loss = float(logs["loss"])

    resumed = run_training(config, run_dir, resume=True, callbacks=[FirstLoss()], verbose=0)
    assert resumed.state == "finished"
    first_epoch_loss = float(read_metrics(run_dir)[1][0]["loss"])
    # A fresh model starts near ln 10; the restored one continues below its epoch-1 mean.
    assert FirstLoss.loss < first_epoch_loss


def _text_tags(board):
    """The tags of the TensorBoard text summaries under ``board``."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    return {value.tag for path in board.rglob("events.out.tfevents*")
            for raw in RawEventFileLoader(str(path)).Load()
            for value in event_pb2.Event.FromString(raw).summary.value
            if value.metadata.plugin_data.plugin_name == "text"}


@pytest.mark.backend_independent
def test_the_trainer_diagnoses_live_and_a_resumed_run_reports_each_finding_once(tmp_path):
    """Batch norm at batch size 4: the small-batch finding at step 0 goes to findings.jsonl
    and TensorBoard text; a finding written after the backup (by a process killed later) is
    cut back on resume, and the resumed run does not report the kept one again."""
    from keras_varinit.diagnosis import read_findings

    run_dir = tmp_path / "run"
    config = tiny(epochs=2, normalization="batch", batch_size=4, subset=32, val_subset=8)
    event = threading.Event()
    stopped = run_training(config, run_dir, stop_event=event, callbacks=[StopAfter(event, 5)],
                           verbose=0)
    assert stopped.state == "stopped"
    (finding,) = read_findings(run_dir / rf.FINDINGS_FILE)
    assert (finding.kind, finding.step, finding.severity) == ("small_batch_norm", 0, "warning")
    assert finding.suggestion.changes == {"normalization": "group"}
    assert "diagnosis/small_batch_norm" in _text_tags(run_dir / rf.TENSORBOARD_DIR)

    late = dict(finding.to_dict(), kind="exploding", step=stopped.step + 1)
    rf.append_jsonl(run_dir / rf.FINDINGS_FILE, [late])
    resumed = run_training(config, run_dir, resume=True, verbose=0)
    assert resumed.state == "finished"
    assert [f.to_dict() for f in read_findings(run_dir / rf.FINDINGS_FILE)] == \
        [finding.to_dict()]


# SIGINT (Ctrl-C) on a real process, then --resume: tests/test_cli_train.py::
# test_cli_ctrl_c_then_resume (the same handler, through the command line).


# --------------------------------------------------------------------------- distribution

_MIRRORED_SCRIPT = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from keras_varinit.training import TrainConfig, run_training
from keras_varinit.training.device import make_placement
print("REPLICAS", make_placement("mirrored").replicas)
config = TrainConfig(model="cnn", depth=3, width=4, data="synthetic", subset=256,
                     val_subset=64, epochs=1, batch_size=64, distribute="mirrored",
                     stats_every_n_steps=2)
result = run_training(config, sys.argv[1], verbose=0)
print("STATE", result.state, result.step, result.metrics["loss"])
"""


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(tmp_path, backend):
    if backend != "tensorflow":
        pytest.skip("tf.distribute needs the TensorFlow backend")
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3",
               KERAS_BACKEND="tensorflow")
    proc = subprocess.run([PYTHON, "-c", _MIRRORED_SCRIPT, str(tmp_path / "run")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REPLICAS 2" in proc.stdout
    assert "STATE finished 4" in proc.stdout
    assert rf.read_json(tmp_path / "run" / "status.json")["state"] == "finished"


@pytest.mark.backend_independent
def test_distribute_of_the_other_backend_is_a_clear_error(tmp_path, backend):
    wrong, needed = (("mirrored", "tensorflow backend") if backend == "jax"
                     else ("data_parallel", "jax backend"))
    with pytest.raises(ValueError, match=needed) as info:
        run_training(tiny(distribute=wrong), tmp_path / "run", verbose=0)
    assert f"KERAS_BACKEND='{backend}'" in str(info.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_stop_requested_before_training_starts(tmp_path):
    event = threading.Event()
    event.set()
    result = run_training(tiny(), tmp_path / "run", stop_event=event, verbose=0)
    assert result.state == "stopped" and result.step == 0
    status = rf.read_json(tmp_path / "run" / "status.json")
    assert status["state"] == "stopped"
    assert (tmp_path / "run" / "config.json").exists()
