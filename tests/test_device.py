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
import contextlib, json, os, sys
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
import keras
import numpy as np
import keras_varinit as kv
from keras_varinit import run_files as rf
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
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory):
    """One subprocess on two JAX host devices; its measurements as a dict."""
    root = tmp_path_factory.mktemp("data_parallel")
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([PYTHON, "-c", _DATA_PARALLEL, str(root)], cwd=REPO, env=env,
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
