"""Tests for `keras-varinit train` (keras_varinit/cli/train.py)."""
import argparse
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from keras_varinit import run_files as rf
from keras_varinit.cli import train

REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = ["--model", "cnn", "--depth", "3", "--width", "4", "--data", "synthetic",
        "--subset", "256", "--val-subset", "64", "--epochs", "1", "--batch-size", "64",
        "--stats-every", "2"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="keras-varinit")
    subparsers = parser.add_subparsers(dest="command")
    train.add_parser(subparsers)
    return parser.parse_args(["train", *argv])


def cli(*argv, timeout=300, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([PYTHON, "-m", "keras_varinit.cli", "train", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.backend_independent
def test_arguments_map_to_the_config():
    args = parse(["--model", "mlp", "--depth", "12", "--width", "64", "--init", "normal:0.01",
                  "--activation", "tanh", "--norm", "layer", "--optimizer", "adam",
                  "--lr", "0.001", "--momentum", "0", "--epochs", "3", "--batch-size", "32",
                  "--subset", "0", "--data", "synthetic", "--seed", "7", "--mixed-precision",
                  "--stats-every", "10"])
    config = train.config_from_args(args)
    assert (config.model, config.depth, config.width, config.init) == \
        ("mlp", 12, 64, "normal:0.01")
    assert config.normalization == "layer" and config.subset is None
    assert (config.optimizer, config.lr, config.momentum, config.epochs) == ("adam", 1e-3, 0, 3)
    assert config.seed == 7 and config.mixed_precision is True
    assert config.stats_every_n_steps == 10 and config.distribute is None
    assert parse(["--norm", "batch_per_sample"]).normalization == "batch_per_sample"
    norm_group = train.config_from_args(parse(["--norm", "group", "--groups", "4"]))
    assert (norm_group.normalization, norm_group.groups) == ("group", 4)
    assert parse(["--distribute", "mirrored"]).distribute == "mirrored"
    with pytest.raises(SystemExit):
        parse(["--resume", "--overwrite"])
    # Values are checked by the config (one message format), not by argparse.
    with pytest.raises(ValueError, match="Received: optimizer='lamb'. Allowed: 'sgd'"):
        train.config_from_args(parse(["--optimizer", "lamb"])).validate()


@pytest.mark.backend_independent
@pytest.mark.parametrize("argv, match", [
    (["--depth", "1"], "depth=1"),
    (["--init", "bogus_init"], "init='bogus_init'"),
    (["--activation", "bogus"], "activation='bogus'"),
    (["--norm", "pooled"], "normalization='pooled'"),
    (["--norm", "group", "--groups", "3"], "groups=3. Allowed: 1, 2, 4"),   # TINY: width 4
    (["--model", "mlp", "--norm", "instance"], "Instance normalization needs spatial"),
    # trained to chance, silently: every batch-norm output of one sample is beta
    (["--model", "mlp", "--norm", "batch", "--batch-size", "1"],
     r"Batch normalization of an MLP .* Received: batch_size=1"),
])
def test_bad_arguments_raise_value_error(tmp_path, argv, match):
    args = parse([*TINY, *argv, "--log-dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=match):
        train.run(args)
    assert not (tmp_path / "run").exists()


@pytest.mark.backend_independent
def test_unknown_init_lists_the_allowed_names_once(tmp_path):
    """Issue 14: the message used to append the initializer module's own error (and its list)
    to the config's."""
    args = parse([*TINY, "--init", "bogus", "--log-dir", str(tmp_path / "run")])
    with pytest.raises(ValueError) as info:
        train.run(args)
    message = str(info.value)
    assert message.count("Received") == 1 and message.count("Allowed") == 1
    assert message.count("kaiming_normal_fan_out") == 1 and "init='bogus'" in message


@pytest.mark.backend_independent
def test_every_config_field_is_an_option_and_argv_round_trips():
    from keras_varinit.training.config import TrainConfig, fields

    parser = argparse.ArgumentParser(prog="keras-varinit")
    text = train.add_parser(parser.add_subparsers(dest="command")).format_help()
    for spec in fields(TrainConfig):
        assert spec.cli_flag in text, spec.name
    assert "--norm {none,batch,batch_per_sample,layer,instance,group}" in text
    assert "{cnn,mlp,file,application}" in text and "--groups" in text
    assert "--model-file PATH" in text and "--application {none,MobileNetV3Small," in text
    config = TrainConfig(model="mlp", depth=5, init="normal:0.01", normalization="group",
                         groups=4, optimizer="adam", lr=0.0123456789, subset=None,
                         val_subset=64, data="synthetic", seed=3, mixed_precision=True,
                         distribute="mirrored", stats_every_n_steps=0, log_every_n_steps=4)
    assert train.config_from_args(parse(train.config_argv(config))) == config
    assert train.config_from_args(parse(train.config_argv(TrainConfig()))) == TrainConfig()


def test_resume_needs_a_log_dir(tmp_path):
    with pytest.raises(ValueError, match="--log-dir"):
        train.run(parse([*TINY, "--resume"]))
    # a mistyped --log-dir once started the run over without a word
    with pytest.raises(ValueError, match="Nothing to resume: .*holds no run"):
        train.run(parse([*TINY, "--resume", "--log-dir", str(tmp_path / "typo")]))
    assert not (tmp_path / "typo").exists()


def test_run_in_process_prints_device_metrics_and_tensorboard(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = train.run(parse([*TINY, "--quiet", "--log-dir", str(run_dir)]))
    out = capsys.readouterr().out
    assert code == 0
    assert "Run finished after 1/1 epochs" in out
    assert "SYNTHETIC" in out
    assert "val_accuracy" in out
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in out
    assert rf.read_json(run_dir / "status.json")["state"] == "finished"


def test_default_log_dir_is_runs_timestamp_slug(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train.run(parse([*TINY, "--quiet", "--stats-every", "0"])) == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert run_dir.name.endswith("-cnn-d3-w4-kaiming_normal-relu-sgd-lr0.01-synthetic-s0")
    assert (run_dir / "metrics.csv").exists()


def test_cli_subprocess_run_and_refusal(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(*TINY, "--log-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training on " in proc.stdout  # the device line
    assert "tensorboard --logdir" in proc.stdout
    for name in ("config.json", "status.json", "steps.jsonl", "metrics.csv",
                 "layer_stats.jsonl", "tensorboard"):
        assert (run_dir / name).exists(), name
    # A different run in the same directory: one-line error, exit 2.
    proc = cli(*TINY, "--depth", "4", "--log-dir", str(run_dir))
    assert proc.returncode == 2
    assert "keras-varinit train: error:" in proc.stderr and "different run" in proc.stderr


@pytest.mark.slow
def test_cli_ctrl_c_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--epochs", "12", "--subset", "128", "--batch-size", "32",
            "--log-dir", str(run_dir)]
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([PYTHON, "-m", "keras_varinit.cli", "train", *argv], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            status = rf.read_json(run_dir / "status.json") or {}
            if (status.get("step") or 0) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"training did not start: {status}")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in out
    status = rf.read_json(run_dir / "status.json")
    assert status["state"] == "stopped"
    assert list((run_dir / "backup").glob("step-*.npz"))
    # The same command with --resume finishes the run.
    proc = cli(*argv, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    assert rf.read_json(run_dir / "status.json")["state"] == "finished"
    epochs = [int(r["epoch"]) for r in rf.MetricsCsv(run_dir / "metrics.csv").read()]
    assert epochs == list(range(1, 13))


# --------------------------------------------------------------------------- unwritable run dirs

def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("keras-varinit train: error")]
    assert "Cannot write the run directory" in line and "Allowed:" in line
    return line


def test_cli_log_dir_that_cannot_be_created(tmp_path, capsys):
    from keras_varinit.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main(["train", *TINY, "--log-dir", str(blocker / "run")])
    err = capsys.readouterr().err
    line = _one_line_error(subprocess.CompletedProcess([], code, "", err))
    assert "a_file" in line


def test_cli_read_only_log_dir(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:  # root writes through permission bits unless it drops that power
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a read-only directory is writable")
        prefix = ["setpriv", "--bounding-set=-dac_override,-fowner"]
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run([*prefix, PYTHON, "-m", "keras_varinit.cli", "train", *TINY,
                               "--log-dir", str(read_only / "run")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        read_only.chmod(0o755)
    line = _one_line_error(proc)
    assert "Permission denied" in line and "read_only" in line
    assert list(read_only.iterdir()) == []


def _file_size_limit(limit):
    """A child whose files cannot grow past ``limit`` bytes (EFBIG, as a full disk gives
    ENOSPC); SIGXFSZ ignored so that the write fails instead of killing the process."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def test_cli_run_directory_full_during_training(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(*TINY, "--log-dir", str(run_dir), preexec_fn=_file_size_limit(8192))
    line = _one_line_error(proc)
    assert "File too large" in line
    status = rf.read_json(run_dir / "status.json")
    assert status["state"] == "failed" and "Cannot write the run directory" in status["error"]
    assert not rf.lock_held(run_dir)


@pytest.mark.backend_independent
def test_a_batch_of_one_is_refused_only_where_batch_norm_has_no_pixels():
    from keras_varinit.net_options import check_batch_statistics

    assert check_batch_statistics("cnn", "batch", 1) == 1      # H x W pixels per channel
    assert check_batch_statistics("mlp", "layer", 1) == 1      # over the features
    assert check_batch_statistics("mlp", "batch", 2) == 2
    with pytest.raises(ValueError, match="Allowed: 2 or more, or normalization 'layer'"):
        check_batch_statistics("mlp", "batch", 1)
