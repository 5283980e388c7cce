"""`keras-varinit profile`: table, verdicts, comparison, plot, CSV, errors."""
import re

import pandas as pd
import pytest

from keras_varinit.cli import main

pytestmark = pytest.mark.backend_independent


def test_profile_compares_two_inits_and_plots(tmp_path, capsys):
    plot = tmp_path / "profile.png"
    csv = tmp_path / "profile.csv"
    code = main(["profile", "--depth", "30", "--init", "xavier_normal", "--init",
                 "kaiming_normal", "--activation", "relu", "--batch-size", "64",
                 "--plot", str(plot), "--csv", str(csv)])
    out = capsys.readouterr().out
    assert code == 0
    assert "conv_01" in out and "conv_29" in out and "logits" in out
    assert "xavier_normal: forward variance falls 10^-" in out
    assert "expect training to stall" in out
    kaiming_line = [line for line in out.splitlines() if line.startswith("kaiming_normal:")]
    assert kaiming_line and "stall" not in kaiming_line[0]
    assert plot.exists() and plot.read_bytes()[:4] == b"\x89PNG"
    df = pd.read_csv(csv)
    assert set(df["init"]) == {"xavier_normal", "kaiming_normal"} and len(df) == 60
    x = df[df["init"] == "xavier_normal"]["forward_var"].to_numpy()
    assert x[-2] / x[0] < 1e-3


def test_profile_single_init_prints_full_table_mlp(capsys):
    code = main(["profile", "--model", "mlp", "--depth", "6", "--width", "64",
                 "--init", "xavier_normal", "--activation", "tanh", "--batch-size", "32",
                 "--full"])
    out = capsys.readouterr().out
    assert code == 0
    assert "dense_01" in out and "logits" in out and "Var[dL/dy]" in out
    assert "xavier_normal:" in out and "profiled 1 model(s)" in out


def test_profile_synthetic_data(capsys):
    pytest.importorskip("keras_varinit.datasets")
    code = main(["profile", "--depth", "4", "--width", "4", "--init", "kaiming_normal",
                 "--batch-size", "16", "--data", "synthetic"])
    out = capsys.readouterr().out
    assert code == 0 and "synthetic" in out


@pytest.mark.parametrize("argv,match", [
    (["--depth", "1"], "--depth must be >= 2"),
    (["--batch-size", "1"], "--batch-size must be >= 2"),
    (["--draws", "0"], "--draws must be >= 1. Received: --draws 0"),
    (["--init", "no_such_init", "--depth", "3", "--width", "2", "--batch-size", "4"],
     "no_such_init"),
    (["--model", "mlp", "--norm", "instance", "--depth", "3", "--batch-size", "4"],
     "instance"),
    (["--norm", "group", "--groups", "3", "--width", "4", "--depth", "3", "--batch-size", "4"],
     "Received: groups=3. Allowed: 1, 2, 4"),
])
def test_profile_errors_exit_2(argv, match, capsys):
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-varinit profile: error:") and match in err


def test_profile_bad_choice_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["profile", "--activation", "gelu"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_profile_draws_reports_the_spread_over_independent_draws(capsys):
    code = main(["profile", "--depth", "6", "--width", "4", "--batch-size", "16",
                 "--init", "kaiming_normal", "--draws", "3", "--seed", "5"])
    out = capsys.readouterr().out
    assert code == 0
    line = [x for x in out.splitlines() if "independent draws" in x]
    assert len(line) == 1 and "3 independent draws (seeds 5-7)" in line[0]
    assert "within 4x in" in line[0] and "/3" in line[0]
    assert "and 2 more draw(s)" in out
    low, high = re.search(r"range x(\S+) \.\. x(\S+),", line[0]).groups()
    assert float(low) < float(high)   # different draws, not one net three times


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_profile_with_a_normalization(norm, capsys):
    code = main(["profile", "--depth", "4", "--width", "4", "--init", "kaiming_normal",
                 "--batch-size", "8", "--norm", norm, "--groups", "2"])
    out = capsys.readouterr().out
    assert code == 0 and f"normalization {norm}" in out and "kaiming_normal:" in out
