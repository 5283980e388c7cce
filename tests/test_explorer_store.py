"""Explorer helpers without a subprocess: settings/URL round trip, validation, the run store
(reading run directories written per the contract), and the chart builders."""
import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from explorer import charts, presets
from explorer.run_store import RunStore, pid_alive
from keras_varinit import run_files as rf


# --------------------------------------------------------------------------------------------
# settings
def test_query_round_trip():
    for overrides in ({}, {"model": "mlp", "depth": 12, "init": "normal:0.01"},
                      {"depth": 60, "lr": 0.1, "normalization": "batch_per_sample",
                       "data": "synthetic", "activation": "tanh", "width": 32, "seed": 7},
                      {"normalization": "group", "groups": 4}):
        width = presets.DEFAULT_WIDTH[overrides.get("model", "cnn")]
        settings = {**presets.DEFAULTS, "width": width, **overrides}
        back, notes = presets.from_query(presets.to_query(settings))
        assert back == settings
        assert notes == []


def test_query_bad_values_fall_back_with_notes():
    settings, notes = presets.from_query({"depth": "999", "init": "bogus", "lr": "abc",
                                          "batch_size": "100", "unknown": "1"})
    assert settings["depth"] == presets.bounds(presets.CONTROLS["depth"])[1] == 60
    assert settings["init"] == presets.DEFAULTS["init"]
    assert settings["lr"] == presets.DEFAULTS["lr"]
    assert settings["batch_size"] == 128
    assert len(notes) == 4 and any("depth" in n for n in notes)


def test_query_non_finite_fractional_and_zero_values_never_crash():
    """inf in an integer field once raised OverflowError (a traceback instead of the page);
    2.7 layers was truncated in silence; lr=0 has no "nearest" offered value; subset=0 is
    the command line's "all"."""
    settings, notes = presets.from_query({"width": "inf", "depth": "2.7", "seed": "-inf",
                                          "lr": "0", "subset": "0"})
    assert settings["width"] == presets.DEFAULTS["width"]
    assert settings["depth"] == presets.DEFAULTS["depth"]
    assert settings["seed"] == presets.DEFAULTS["seed"]
    assert settings["lr"] == presets.DEFAULTS["lr"]
    assert settings["subset"] == presets.bounds(presets.CONTROLS["subset"])[1]
    text = " ".join(notes)
    assert "width='inf' is not a finite number" in text
    assert "depth='2.7' is not a whole number" in text
    assert "lr='0' is not positive" in text
    assert "subset='0' means all" in text
    assert len(notes) == 5


def test_every_initializer_is_known_to_the_package():
    from keras_varinit import initializers

    for name in presets.offered(presets.CONTROLS["init"]):
        if name == "lsuv":
            continue
        assert initializers.get(name) is not None


def test_invalid_combinations_are_explained():
    problems = presets.blocking_problems(dict(presets.DEFAULTS, model="mlp",
                                              normalization="batch_per_sample"))
    assert problems and "MLP" in problems[0].text
    problems = presets.blocking_problems(dict(presets.DEFAULTS, normalization="group",
                                              groups=3))
    assert problems and "Received: groups=3. Allowed: 1, 2, 4, 8, 16" in problems[0].text
    problems = presets.blocking_problems(dict(presets.DEFAULTS, normalization="layer",
                                              init="lsuv"))
    assert problems and "LSUV" in problems[0].text
    assert presets.blocking_problems(presets.DEFAULTS) == []
    too_big = presets.blocking_problems(dict(presets.DEFAULTS, batch_size=512, subset=256))
    assert too_big and "batch" in too_big[0].text.lower()
    # a huge learning rate is a warning, not a refusal: the run is shown as diverged
    assert presets.problems(dict(presets.DEFAULTS, lr=3.0))
    assert presets.blocking_problems(dict(presets.DEFAULTS, lr=3.0)) == []


def test_cli_args_are_accepted_by_the_train_command(tmp_path):
    from keras_varinit.cli import build_parser

    args = presets.cli_args(dict(presets.DEFAULTS, init="normal:0.01", normalization="group",
                                 groups=4), tmp_path / "run", stats_every=5)
    parsed = build_parser().parse_args(args)
    assert parsed.depth == 30 and parsed.init == "normal:0.01"
    assert (parsed.normalization, parsed.groups) == ("group", 4)
    assert str(parsed.log_dir) == str(tmp_path / "run")


def test_reference_pair():
    pair = presets.reference_pair(dict(presets.DEFAULTS, model="mlp", epochs=5))
    assert [p["init"] for p in pair] == ["xavier_normal", "kaiming_normal"]
    assert all(p["depth"] == 30 and p["model"] == "cnn" and p["activation"] == "relu"
               and p["normalization"] == "none" and p["epochs"] == 5 for p in pair)


# --------------------------------------------------------------------------------------------
# run store
# metrics.csv of a run written before the training/inference-mode columns, and of a newer one
OLD_METRICS = "epoch,loss,accuracy,val_loss,val_accuracy,seconds\n1,2.0,0.2,2.1,0.15,3.5\n"
NEW_METRICS = ("epoch,loss,accuracy,val_loss,val_accuracy,train_mode_loss,train_mode_accuracy,"
               "train_eval_loss,train_eval_accuracy,seconds\n"
               "1,2.0,0.2,2.1,0.15,1.9,0.3,2.4,0.1,3.5\n2,1.8,0.3,2.0,0.2,1.7,0.4,1.9,0.35,3.4\n")


def _write_run(root, name, *, state="finished", losses=(2.3, 2.1, 1.9), synthetic=True,
               epochs=1, normalization={"batch_norm": None}, metrics=OLD_METRICS):
    """A run directory; by default as written before the normalization choice (its config
    says ``batch_norm``) and before the mode columns of metrics.csv."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "model": "cnn", "depth": 3, "width": 4, "init": "kaiming_normal",
        "activation": "relu", **normalization, "optimizer": "sgd", "lr": 0.01,
        "epochs": epochs, "batch_size": 64, "subset": 192, "data": "synthetic",
        "seed": 0, "synthetic": synthetic, "device": "CPU"}))
    (run / "status.json").write_text(json.dumps({
        "state": state, "epoch": 1, "step": len(losses), "total_steps": len(losses),
        "images_per_second": 500.0, "eta_seconds": 0, "device": "CPU",
        "started_at": "2026-01-01T00:00:00.000Z", "updated_at": "2026-01-01T00:00:05.000Z",
        "error": None}))
    with open(run / "steps.jsonl", "w") as f:
        for i, loss in enumerate(losses, 1):
            value = None if (loss is None or not math.isfinite(loss)) else loss
            f.write(json.dumps({"step": i, "epoch": 1, "loss": value, "accuracy": 0.1 * i})
                    + "\n")
    (run / "metrics.csv").write_text(metrics)
    with open(run / "layer_stats.jsonl", "w") as f:
        for step in (0, 2):
            for index, layer in enumerate(("conv_01", "conv_02", "logits"), 1):
                f.write(json.dumps({
                    "step": step, "epoch": 0, "layer": layer, "layer_index": index,
                    "layer_type": "Conv2D", "activation_mean": 0.1,
                    "activation_std": 1.0 / index, "zero_fraction": 0.5,
                    "saturated_fraction": 0.0, "activation_grad_std": 1e-3 * index,
                    "weight_std": 0.1, "weight_grad_std": 0.01,
                    "update_ratio": None if step == 0 else 1e-3,
                    "nan_count": 0, "inf_count": 0}) + "\n")
    return run


def test_store_lists_and_reads_runs(tmp_path):
    _write_run(tmp_path, "20260101-000000-a")
    _write_run(tmp_path, "20260101-000100-b", state="diverged", losses=(2.3, float("nan")))
    (tmp_path / "not-a-run").mkdir()
    store = RunStore(tmp_path)
    runs = store.list_runs()
    assert {r.run_id for r in runs} == {"20260101-000000-a", "20260101-000100-b"}
    info = store.info("20260101-000000-a")
    assert info.state == "finished" and info.synthetic and info.progress == 1.0
    assert "[synthetic]" in info.label
    steps = store.steps("20260101-000000-a")
    assert list(steps["loss"]) == [2.3, 2.1, 1.9]
    metrics = store.metrics("20260101-000000-a")
    assert metrics["val_accuracy"].iloc[-1] == pytest.approx(0.15)
    stats = store.layer_stats("20260101-000000-a")
    assert len(stats) == 6 and stats["update_ratio"].isna().sum() == 3
    # NaN loss is kept as NaN (null in JSON), and the run counts as diverged
    diverged = store.steps("20260101-000100-b")
    assert math.isnan(diverged["loss"].iloc[-1])
    assert store.diverged("20260101-000100-b") and not store.diverged("20260101-000000-a")
    table = store.final_metrics()
    assert set(table["state"]) == {"finished", "diverged"}
    assert (table["data"] == "synthetic").all()
    # a new store object (a restarted explorer) sees the same runs
    assert [r.run_id for r in RunStore(tmp_path).list_runs()] == [r.run_id for r in runs]


@pytest.mark.parametrize("old, new", [(None, "none"), ("pooled", "batch"),
                                      ("per_sample", "batch_per_sample")])
def test_runs_written_with_batch_norm_are_listed_and_read(tmp_path, old, new):
    """config.json of older runs says batch_norm: the page lists them under today's names."""
    from keras_varinit.training import TrainConfig

    run = _write_run(tmp_path, "20260101-000000-old", normalization={"batch_norm": old})
    store = RunStore(tmp_path)
    (info,) = store.list_runs()
    assert info.config["normalization"] == new and "batch_norm" not in info.config
    assert ("norm:" in info.label) == (new != "none")
    assert store.final_metrics()["normalization"].tolist() == [new]
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    metrics = store.metrics(run.name)   # no mode columns yet: empty, not an error
    assert metrics["train_eval_accuracy"].isna().all()
    assert "No training/inference-mode" in json.dumps(charts.modes_chart(metrics).to_dict())


def test_a_config_json_with_an_unknown_batch_norm_is_still_listed(tmp_path):
    _write_run(tmp_path, "20260101-000000-odd", normalization={"batch_norm": "weird"})
    (info,) = RunStore(tmp_path).list_runs()
    assert info.config["batch_norm"] == "weird" and info.state == "finished"


def test_new_runs_show_both_modes_and_their_gap(tmp_path):
    run = _write_run(tmp_path, "20260101-000000-new", metrics=NEW_METRICS, epochs=2,
                     normalization={"normalization": "group", "groups": 2})
    store = RunStore(tmp_path)
    info = store.info(run.name)
    assert info.label.startswith("cnn d3 kaiming_normal relu norm:group G=2")
    metrics = store.metrics(run.name)
    long = charts.modes_long(metrics, "accuracy")
    assert sorted(long["mode"].unique()) == sorted(charts.MODES.values())
    gaps = charts.mode_gaps(metrics)
    assert gaps["mode_gap"].tolist() == pytest.approx([0.2, 0.05])
    assert gaps["mode_gap_loss"].tolist() == pytest.approx([0.5, 0.2])
    table = store.final_metrics()
    assert table[["train_mode_acc", "train_eval_acc"]].values.tolist() == [[0.4, 0.35]]


def test_store_reads_growing_files_incrementally(tmp_path):
    run = _write_run(tmp_path, "20260101-000000-a", losses=(2.3,))
    store = RunStore(tmp_path)
    assert len(store.steps(run.name)) == 1
    with open(run / "steps.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "epoch": 1, "loss": 2.0, "accuracy": 0.2}) + "\n")
        f.write('{"step": 3, "epoch": 1, "lo')  # a line being written right now
    assert list(store.steps(run.name)["step"]) == [1, 2]
    with open(run / "steps.jsonl", "a") as f:
        f.write('ss": 1.5, "accuracy": 0.3}\n')
    assert list(store.steps(run.name)["loss"]) == [2.3, 2.0, 1.5]
    # rewritten shorter (a resumed run truncates its logs): read again from the start
    (run / "steps.jsonl").write_text(json.dumps({"step": 1, "epoch": 1, "loss": 9.0,
                                                 "accuracy": 0.0}) + "\n")
    assert list(store.steps(run.name)["loss"]) == [9.0]


def test_store_reads_liveness_from_the_lock(tmp_path):
    """A run whose status.json says running is running while a process holds its lock,
    interrupted (resumable) once none does; a launched process that died before writing a
    status failed; one still starting (alive, no lock yet) is running."""
    run = _write_run(tmp_path, "20260101-000000-a", state="running")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid) and pid_alive(os.getpid())
    (run / "explorer_job.json").write_text(json.dumps({"pid": proc.pid,
                                                       "owner_pid": os.getpid()}))
    info = RunStore(tmp_path).info(run.name)
    assert info.state == "interrupted" and info.resumable and info.backup_step is None
    lock = rf.RunLock(run)
    assert lock.acquire()
    try:
        assert RunStore(tmp_path).info(run.name).state == "running"
    finally:
        lock.release()
    (run / "status.json").unlink()
    assert RunStore(tmp_path).info(run.name).state == "failed"
    (run / "explorer_job.json").write_text(json.dumps({"pid": os.getpid()}))
    assert RunStore(tmp_path).info(run.name).state == "running"


def test_store_rejects_paths_outside_its_root(tmp_path):
    with pytest.raises(ValueError, match="run_id"):
        RunStore(tmp_path / "runs").path("../elsewhere")


# --------------------------------------------------------------------------------------------
# charts
def test_charts_build_and_label_synthetic_data(tmp_path):
    run = _write_run(tmp_path, "20260101-000000-a")
    store = RunStore(tmp_path)
    steps, metrics, stats = (store.steps(run.name), store.metrics(run.name),
                             store.layer_stats(run.name))
    built = [
        charts.training_chart(steps, metrics, 3, "loss", synthetic=True),
        charts.training_chart(steps, metrics, 3, "accuracy", synthetic=True),
        charts.heatmap(stats, "activation_std", synthetic=True),
        charts.heatmap(stats, "activation_grad_std", synthetic=True),
        charts.fractions_chart(stats, synthetic=True),
        charts.compare_chart({"a": metrics}, "epoch", "val_accuracy", title="Val",
                             synthetic=True),
    ]
    for chart in built:
        spec = json.dumps(chart.to_dict())
        assert "SYNTHETIC" in spec
    real = json.dumps(charts.heatmap(stats, "activation_std").to_dict())
    assert "SYNTHETIC" not in real


def test_profile_chart_uses_log_scale_and_drops_non_positive_values():
    table = pd.DataFrame({
        "layer": ["conv_01", "conv_02", "logits"], "index": [1, 2, 3],
        "forward_var": [1.0, 1e-5, 0.0], "backward_var": [1e-3, 1e-4, float("nan")],
        "predicted_forward_var_cumulative": [1.0, 1e-5, 1e-10],
        "predicted_backward_var_cumulative": [1e-3, 1e-4, 1e-5],
    })
    long = charts.profile_long(table)
    assert (long["variance"] > 0).all()
    assert len(long) == 10  # 12 values minus the 0 and the NaN
    for direction in ("forward", "backward"):
        spec = charts.profile_chart(table, direction).to_dict()
        assert '"type": "log"' in json.dumps(spec)
        assert {row["direction"] for row in spec["datasets"].popitem()[1]} == {direction}


def test_histogram_and_empty_charts():
    import numpy as np

    chart = charts.histogram_chart({"act_01": np.random.default_rng(0).normal(size=1000),
                                    "act_02": np.zeros(10)})
    assert "hconcat" in chart.to_dict()
    assert charts.heatmap(pd.DataFrame(), "activation_std").to_dict()["mark"]["type"] == "text"
    assert charts.fmt_seconds(3725) == "1 h 02 min" and charts.fmt_seconds(None) == "?"


def test_a_user_models_run_is_labelled_by_its_file_or_architecture():
    label = RunStore.label
    assert label("20260101-120000-x", {"model": "file", "model_file": "/r/uploads/ab12.keras",
                                       "depth": 30}, False) == "file ab12.keras @12:00:00"
    assert label("20260101-120000-x", {"model": "application", "application": "ResNet50"},
                 True) == "ResNet50 @12:00:00 [synthetic]"
