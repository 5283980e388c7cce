"""Tests for keras_varinit/training/device.py: several devices. JAX data parallelism on two host
devices (a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=2), two real
TensorFlow workers on localhost (MultiWorkerMirroredStrategy from TF_CONFIG), and the refusals.
Both subprocess tests run whatever the backend of the pytest run (they set their own)."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from keras_varinit import run_files as rf
from keras_varinit.layers import PER_SAMPLE_TINY

REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable


# --------------------------------------------------------------------------- JAX data parallel

_DATA_PARALLEL = r'''
import contextlib, io, json, os, sys, threading
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
import keras
import numpy as np
import keras_varinit as kv
from keras_varinit import run_files as rf
from keras_varinit.cli.train import config_argv
from keras_varinit.training import TrainConfig, run_training

out = {"devices": jax.device_count()}
rng = np.random.default_rng(0)
x = rng.normal(1.0, 2.0, size=(5 * 8, 6, 6, 3)).astype("float32")
x[:4] *= 3.0  # the halves of the first batch differ: per-device statistics would differ
y = rng.integers(0, 4, len(x)).astype("int32")
layouts = []


class Layout(keras.layers.Layer):
    """Records how the batch that reaches the model is laid out over the devices."""

    def call(self, inputs):
        jax.debug.inspect_array_sharding(inputs, callback=lambda s: layouts.append(str(s)))
        return inputs


def model(estimator, momentum):
    keras.utils.set_random_seed(1)
    m = keras.Sequential([
        keras.Input((6, 6, 3)), Layout(),
        kv.layers.BatchNormalization(variance_estimator=estimator, momentum=momentum,
                                     name="bn_in"),
        keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
        kv.layers.BatchNormalization(variance_estimator=estimator),
        keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)])
    m.compile(keras.optimizers.SGD(0.1),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def fit(estimator, distributed, steps, momentum=0.99):
    scope = (keras.distribution.DataParallel(devices=keras.distribution.list_devices()).scope()
             if distributed else contextlib.nullcontext())
    with scope:
        m = model(estimator, momentum)
        m.fit(x[:8 * steps], y[:8 * steps], batch_size=8, epochs=1, shuffle=False, verbose=0)
    return m


for estimator in ("pooled", "per_sample"):
    layouts.clear()
    one = fit(estimator, False, 5).get_weights()
    one_layouts = sorted(set(layouts))
    layouts.clear()
    two = fit(estimator, True, 5).get_weights()
    # BN first, momentum 0: after one step its moving statistics are those of the batch.
    bn = fit(estimator, True, 1, momentum=0.0).get_layer("bn_in")
    out[estimator] = {
        "close": all(np.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(one, two)),
        "moved": max(float(np.max(np.abs(a - b))) for a, b in
                     zip(one, model(estimator, 0.99).get_weights())),
        "one_layouts": one_layouts, "two_layouts": sorted(set(layouts)),
        "moving_mean": np.asarray(bn.moving_mean).tolist(),
        "moving_variance": np.asarray(bn.moving_variance).tolist()}

# run_training (the CLI's path): data parallel equals one device, layer statistics included
base = dict(model="cnn", depth=3, width=4, data="synthetic", subset=120, val_subset=30,
            epochs=2, batch_size=16, stats_every_n_steps=3, normalization="batch_per_sample",
            lr=0.05)
runs = {}
for name, distribute in (("one", None), ("two", "data_parallel")):
    result = run_training(TrainConfig(**base, distribute=distribute), f"{sys.argv[1]}/{name}",
                          verbose=0)
    runs[name] = (result.state.value, result.step, result.model.get_weights(),
                  rf.read_jsonl(f"{sys.argv[1]}/{name}/layer_stats.jsonl"),
                  rf.MetricsCsv(f"{sys.argv[1]}/{name}/metrics.csv").read())
out["run_states"] = [runs[n][0] for n in ("one", "two")]
out["run_steps"] = [runs[n][1] for n in ("one", "two")]
out["run_weights_close"] = all(np.allclose(a, b, rtol=1e-4, atol=1e-7)
                               for a, b in zip(runs["one"][2], runs["two"][2]))
out["run_records"] = [runs[n][3] for n in ("one", "two")]
out["run_losses"] = [[row["loss"] for row in runs[n][4]] for n in ("one", "two")]
try:  # a batch that does not split over the two devices
    run_training(TrainConfig(**dict(base, batch_size=15), distribute="data_parallel"),
                 f"{sys.argv[1]}/odd", verbose=0)
except ValueError as error:
    out["odd_batch_error"] = str(error)

# A run stopped after its first steps: its 113 = 7 x 16 + 1 training images give 7 batches per
# epoch on 2 devices (8 on one), its 31 validation images are cut to 30. The test resumes it
# on one device.
stop = threading.Event()


class StopNow(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        stop.set()


config = TrainConfig(**dict(base, subset=113, val_subset=31), distribute="data_parallel")
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    result = run_training(config, f"{sys.argv[1]}/stopped", stop_event=stop,
                          callbacks=[StopNow()], verbose=1)
out["stopped"] = {"state": result.state.value, "argv": config_argv(config),
                  "run_dir": f"{sys.argv[1]}/stopped",
                  "said": [l for l in printed.getvalue().splitlines()
                           if l.startswith("keras-varinit:")]}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory):
    """One subprocess on two JAX host devices; its measurements as a dict."""
    return _run_script(_DATA_PARALLEL, tmp_path_factory.mktemp("data_parallel"))


def _run_script(script, root):
    """Run ``script`` in a subprocess with ``root`` as its argument; its RESULT line's dict."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([PYTHON, "-c", script, str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _global_statistics(batch, estimator):
    """Per channel: the mean and the variance BN takes (``variance_estimator``) of ``batch``."""
    batch = batch.astype("float64")
    mean = batch.mean(axis=(0, 1, 2))
    if estimator == "pooled":
        return mean, batch.var(axis=(0, 1, 2))
    per_sample = np.sqrt(batch.var(axis=(1, 2)) + PER_SAMPLE_TINY)  # (N, C)
    return mean, per_sample.mean(axis=0) ** 2


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["pooled", "per_sample"])
def test_data_parallel_equals_one_device_with_the_global_batch(data_parallel, estimator):
    assert data_parallel["devices"] == 2
    result = data_parallel[estimator]
    # the batch really was split over the two devices (and not on one device)
    assert any("'batch'" in layout for layout in result["two_layouts"]), result["two_layouts"]
    assert not any("'batch'" in layout for layout in result["one_layouts"])
    assert result["moved"] > 1e-3  # 5 SGD steps changed the weights
    assert result["close"]  # ... to the same values on 1 and 2 devices (rtol 1e-4)


@pytest.mark.parametrize("estimator", ["pooled", "per_sample"])
def test_data_parallel_batch_norm_uses_the_global_batch(data_parallel, estimator):
    rng = np.random.default_rng(0)  # the subprocess's data
    x = rng.normal(1.0, 2.0, size=(5 * 8, 6, 6, 3)).astype("float32")
    x[:4] *= 3.0
    mean, variance = _global_statistics(x[:8], estimator)
    result = data_parallel[estimator]
    np.testing.assert_allclose(result["moving_mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(result["moving_variance"], variance, rtol=1e-5)
    # device 0's half alone gives other statistics: the test tells them apart
    half_mean, half_variance = _global_statistics(x[:4], estimator)
    assert np.min(np.abs(half_variance / variance - 1)) > 0.1
    assert np.min(np.abs(half_mean - mean)) > 1e-2


def test_run_training_data_parallel_equals_one_device(data_parallel):
    assert data_parallel["run_states"] == ["finished", "finished"]
    assert data_parallel["run_steps"] == [16, 16]
    assert data_parallel["run_weights_close"]
    one, two = data_parallel["run_losses"]
    np.testing.assert_allclose(two, one, rtol=1e-5)


def test_layer_stats_logger_under_data_parallel_equals_one_device(data_parallel):
    """The probe runs under the distribution, on the whole (unsplit) probe batch: the same
    records as on one device."""
    one, two = data_parallel["run_records"]
    assert [(r["step"], r["layer"]) for r in one] == [(r["step"], r["layer"]) for r in two]
    assert {r["step"] for r in one} == {0, 3, 6, 8, 9, 12, 15, 16}
    for a, b in zip(one, two):
        for field in ("activation_mean", "activation_std", "activation_grad_std",
                      "weight_std", "weight_grad_std", "update_ratio"):
            if a[field] is None:
                assert b[field] is None
            else:
                assert b[field] == pytest.approx(a[field], rel=1e-4, abs=1e-9), (field, a)


def test_data_parallel_batch_size_must_split_over_the_devices(data_parallel):
    message = data_parallel["odd_batch_error"]
    assert "batch_size=15" in message and "multiple of 2" in message


def test_data_parallel_says_the_validation_images_it_leaves_out(data_parallel):
    """31 validation images over 2 devices: 30 are evaluated, and the run says so once."""
    said = data_parallel["stopped"]["said"]
    assert said.count(
        "keras-varinit: validation: 30 of 31 images (a multiple of 2 devices)") == 1


def test_resuming_on_another_number_of_devices_says_so(data_parallel):
    """A backup made on 2 devices (7 batches per epoch) resumed on 1 (8): the error blamed "the
    same data, subset and batch size"; it names the numbers of devices."""
    stopped = data_parallel["stopped"]
    assert stopped["state"] == "stopped"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="jax")
    env.pop("XLA_FLAGS", None)   # one host device
    proc = subprocess.run([PYTHON, "-m", "keras_varinit.cli", "train", *stopped["argv"],
                           "--log-dir", stopped["run_dir"], "--resume", "--quiet"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "it was made on 2 devices, whose batches gave 7 steps per epoch (8 on 1)" in \
        proc.stderr
    assert "Received: 1 device(s). Allowed: 2 devices, as when the backup was made." in \
        proc.stderr
    assert "the same data, subset and batch size" not in proc.stderr


def test_every_distribute_needs_a_batch_that_splits_over_the_replicas():
    """Batches are cut to a multiple of the replicas under a tf.distribute strategy too (a
    replica without samples crashed the step): a batch size that does not split is refused."""
    from keras_varinit.training.device import Placement

    Placement("mirrored", replicas=2).check_batch_size(16)
    Placement().check_batch_size(15)
    with pytest.raises(ValueError, match=r"distribute='mirrored' splits each batch over 2 "
                                         r"devices. Received: batch_size=15. Allowed: a "
                                         r"multiple of 2."):
        Placement("mirrored", replicas=2).check_batch_size(15)


# --------------------------------------------------------------------------- TF mirrored

_MIRRORED = r'''
import contextlib, io, json, os, sys, threading
os.environ["KERAS_BACKEND"] = "tensorflow"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from keras_varinit import run_files as rf
from keras_varinit.training import TrainConfig, run_training
from keras_varinit.training.backup import latest_backup

root = sys.argv[1]
base = dict(model="cnn", depth=3, width=4, data="synthetic", subset=96, val_subset=32,
            epochs=2, batch_size=16, stats_every_n_steps=2, normalization="batch",
            distribute="mirrored")
out = {}


class StopAfter(keras.callbacks.Callback):
    """Sets ``event`` after batch ``batch`` (the run stops at the end of a following step)."""

    def __init__(self, event, batch):
        super().__init__()
        self.event, self.batch = event, batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            self.event.set()


def said(call):
    """``call()``'s result and the keras-varinit lines it printed."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = call()
    return result, [l for l in buffer.getvalue().splitlines() if l.startswith("keras-varinit:")]


def stopped_then_resumed():
    config, run_dir, stop = TrainConfig(**base), f"{root}/resumed", threading.Event()
    first = run_training(config, run_dir, stop_event=stop, callbacks=[StopAfter(stop, 2)],
                         verbose=0)
    backup = latest_backup(f"{run_dir}/backup")
    second, lines = said(lambda: run_training(config, run_dir, resume=True, verbose=1))
    whole = run_training(config, f"{root}/whole", verbose=0)
    return {"first": [first.state.value, first.step], "backup": backup.step,
            "backup_replicas": backup.replicas, "said": lines,
            "second": [second.state.value, second.step, second.total_steps],
            "steps": [r["step"] for r in rf.read_jsonl(f"{run_dir}/steps.jsonl")],
            "close": all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in
                         zip(second.model.get_weights(), whole.model.get_weights()))}


def odd_last_batches():
    # 97 = 6 x 16 + 1 training images, 33 = 2 x 16 + 1 validation images
    config = TrainConfig(**dict(base, subset=97, val_subset=33))
    result, lines = said(lambda: run_training(config, f"{root}/odd", verbose=1))
    return {"run": [result.state.value, result.step, result.total_steps], "said": lines}


for name, part in (("resume", stopped_then_resumed), ("odd", odd_last_batches)):
    try:
        out[name] = part()
    except Exception as error:  # noqa: BLE001 - each part is reported on its own
        out[name] = {"error": f"{type(error).__name__}: {error}"[-3000:]}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """One subprocess on two logical TensorFlow CPU devices (tf.distribute.MirroredStrategy);
    its measurements as a dict. TensorFlow's pass of the tests only."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.distribute: run in the TensorFlow pass of the tests")
    return _run_script(_MIRRORED, tmp_path_factory.mktemp("mirrored"))


def test_mirrored_run_resumes_from_its_backup(mirrored):
    """--resume restored the backup outside the strategy's scope: "Need to be inside
    `with strategy.scope()`" when building the optimizer's variables."""
    result = mirrored["resume"]
    assert "error" not in result, result.get("error")
    state, step = result["first"]
    assert state == "stopped" and 0 < step < 6 and result["backup"] == step
    assert result["backup_replicas"] == 2
    assert f"keras-varinit: resuming from the backup at step {step} (epoch 1/2)" in \
        result["said"]
    assert result["second"] == ["finished", 12, 12]
    assert result["steps"] == list(range(1, 13))       # every step once
    assert result["close"]   # the weights of an uninterrupted run


def test_mirrored_last_batches_of_one_sample_are_left_out(mirrored):
    """A last batch of 1 sample left one replica without data: the run crashed (training
    and validation alike). Now each batch holds a multiple of the 2 replicas."""
    result = mirrored["odd"]
    assert "error" not in result, result.get("error")
    assert result["run"] == ["finished", 12, 12]     # 6 batches of 16 per epoch
    assert result["said"].count(
        "keras-varinit: validation: 32 of 33 images (a multiple of 2 devices)") == 1


# --------------------------------------------------------------------------- TF multi-worker

TINY = ["--model", "cnn", "--depth", "3", "--width", "4", "--data", "synthetic",
        "--subset", "256", "--val-subset", "64", "--epochs", "1", "--batch-size", "64",
        "--norm", "batch", "--stats-every", "2", "--quiet"]


def _free_ports(n):
    """``n`` distinct free localhost ports (skips when the machine cannot open one)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    except OSError as error:
        pytest.skip(f"cannot open a local port for the workers: {error}")
    finally:
        for s in sockets:
            s.close()


def test_two_tensorflow_workers_equal_one_process(tmp_path, backend):
    if backend != "tensorflow":
        pytest.skip("compared with a one-process run of the TensorFlow backend")
    from keras_varinit.cli import main as keras_varinit_cli

    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    run_dir = tmp_path / "multiworker"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3",
               KERAS_BACKEND="tensorflow")
    command = [PYTHON, "-m", "keras_varinit.cli", "train", *TINY]
    workers = [subprocess.Popen(
        [*command, "--distribute", "multiworker", "--log-dir", str(run_dir)], cwd=REPO,
        env=dict(env, TF_CONFIG=json.dumps({"cluster": cluster,
                                            "task": {"type": "worker", "index": i}})),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [w.communicate(timeout=420)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    assert "non-chief worker" in outputs[1] and "non-chief" not in outputs[0]
    assert keras_varinit_cli(["train", *TINY, "--log-dir", str(tmp_path / "single")]) == 0

    # the chief's run directory is complete, and holds the chief's files only
    assert rf.read_json(run_dir / "status.json")["state"] == "finished"
    for name in ("config.json", "steps.jsonl", "metrics.csv", "layer_stats.jsonl"):
        assert (run_dir / name).exists(), name
    events = sorted(p.relative_to(run_dir / "tensorboard").parts[:-1]
                    for p in (run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert events == [(), ("train",), ("validation",)]  # one writer each: the chief's
    steps = rf.read_jsonl(run_dir / "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert {r["step"] for r in rf.read_jsonl(run_dir / "layer_stats.jsonl")} == {0, 2, 4}
    # each step's loss is that of one process with the same global batch
    reference = [s["loss"] for s in rf.read_jsonl(tmp_path / "single" / "steps.jsonl")]
    np.testing.assert_allclose([s["loss"] for s in steps], reference, atol=1e-4)
