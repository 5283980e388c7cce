"""`keras-varinit profile`: table, verdicts, comparison, plot, CSV, errors (TensorFlow backend
only: the profile under it is tested on both backends by test_diagnostics.py)."""
import re

import pandas as pd
import pytest

from keras_varinit.cli import main


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
    (["--draws", "4", "--norm", "batch"], "Received: --draws 4 --norm batch. Allowed: --draws "
                                          "with --norm none"),
    (["--init", "no_such_init", "--depth", "3", "--width", "2", "--batch-size", "4"],
     "no_such_init"),
    (["--model", "mlp", "--norm", "instance", "--depth", "3", "--batch-size", "4"],
     "instance"),
    (["--norm", "group", "--groups", "3", "--width", "4", "--depth", "3", "--batch-size", "4"],
     "Received: groups=3. Allowed: 1, 2, 4"),
    # checked before any work (they once failed after the whole profile, with a bare message)
    (["--seed", "-1"], "--seed must be >= 0. Received: --seed -1"),
    (["--plot", "no_such_dir/p.png"], "--plot: no such directory 'no_such_dir'"),
    (["--plot", "p.txt"], "--plot must end in .png, .pdf, .svg. Received: --plot p.txt"),
    (["--csv", "no_such_dir/p.csv"], "--csv: no such directory 'no_such_dir'"),
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


# ----------------------------------------------------------------------------- --model (yours)

def _save_cnn(path):
    import keras

    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    keras.Model(inputs, keras.layers.Dense(10, name="head")(h), name="mine").save(path)


def test_profile_a_keras_file(tmp_path, capsys):
    path = tmp_path / "mine.keras"
    _save_cnn(path)
    csv = tmp_path / "mine.csv"
    code = main(["profile", "--model", str(path), "--data", "gaussian", "--batch-size", "8",
                 "--csv", str(csv)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"mine (Functional) from {path}: 3 weight layer call(s)" in out
    assert "N(0, 1) noise of shape (32, 32, 3)" in out and "mine: forward variance" in out
    assert list(pd.read_csv(csv)["layer"]) == ["c1", "dw", "head"]


def test_profile_a_model_with_a_recurrent_layer_notes_what_it_leaves_out(tmp_path, capsys):
    import keras

    inputs = keras.Input((12, 5))
    h = keras.layers.GRU(6, name="gru")(keras.layers.Dense(8, name="embed")(inputs))
    path = tmp_path / "seq.keras"
    keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name="seq").save(path)
    csv = tmp_path / "seq.csv"
    assert main(["profile", "--model", str(path), "--batch-size", "8", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "note: variance_profile leaves out ['gru/gru_cell']: they run inside a recurrent " \
           "layer's loop" in out
    assert list(pd.read_csv(csv)["layer"]) == ["embed", "head"]


def test_profile_a_keras_file_on_cifar10(tmp_path, capsys, cifar10_path, monkeypatch):
    monkeypatch.setenv("KERAS_VARINIT_CIFAR10", str(cifar10_path))
    path = tmp_path / "mine.keras"
    _save_cnn(path)
    assert main(["profile", "--model", str(path), "--batch-size", "8"]) == 0
    assert "8 CIFAR-10 training images (standardized per channel)" in capsys.readouterr().out


def test_profile_a_factory_with_a_flat_input(tmp_path, capsys):
    script = tmp_path / "nets.py"
    script.write_text("import keras\n\ndef build():\n    inputs = keras.Input((20,))\n"
                      "    h = keras.layers.Dense(16, activation='tanh')(inputs)\n"
                      "    return keras.Model(inputs, keras.layers.Dense(3)(h), name='flat')\n")
    code = main(["profile", "--model", f"{script}:build", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "N(0, 1) noise of shape (20,) (gaussian: its input is not CIFAR-sized)" in out
    assert main(["profile", "--model", f"{script}:build", "--data", "cifar10"]) == 2
    assert "--data synthetic/cifar10 are images. The model's input shape is (20,)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--init", "kaiming_normal"], "--init: options of the plain nets"),
    (["--depth", "3", "--draws", "2"], "--depth, --draws: options of the plain nets"),
])
def test_profile_your_model_refuses_plain_net_options(tmp_path, capsys, argv, match):
    path = tmp_path / "mine.keras"
    _save_cnn(path)
    assert main(["profile", "--model", str(path), *argv]) == 2
    assert match in capsys.readouterr().err


def test_profile_bad_model_files_are_one_line_errors(tmp_path, capsys):
    png = tmp_path / "photo.keras"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert main(["profile", "--model", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-varinit profile: error:") and "it is a PNG image" in err
    assert "Traceback" not in err
    assert main(["profile", "--model", "nonsense"]) == 2
    assert "Cannot tell how to load this model. Received: 'nonsense'" in capsys.readouterr().err


def test_a_factory_that_raises_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """Whatever the user's code raises (a NameError once printed a traceback, a RuntimeError
    a bare line), on import or when called: one line that names the factory."""
    (tmp_path / "broken_nets.py").write_text(
        "def typo():\n    return undefined_name\n\n"
        "def boom():\n    raise RuntimeError('boom in my factory')\n")
    (tmp_path / "bad_import.py").write_text("import no_such_module_anywhere\n")
    monkeypatch.chdir(tmp_path)
    for spec, words in (("broken_nets:typo", "raised NameError: name 'undefined_name'"),
                        ("broken_nets:boom", "raised RuntimeError: boom in my factory"),
                        ("bad_import.py:build", "Importing bad_import.py raised "
                                                "ModuleNotFoundError")):
        assert main(["profile", "--model", spec]) == 2
        err = capsys.readouterr().err
        assert err.startswith("keras-varinit profile: error:") and words in err, err
        assert "Traceback" not in err


def test_overflowing_plain_net_prints_no_nan_ratios(capsys):
    code = main(["profile", "--model", "mlp", "--depth", "60", "--width", "64",
                 "--activation", "relu", "--init", "normal:1.0", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "forward variance overflows (inf/NaN)" in out
    assert "float32 over- or underflows from dense_" in out
    assert "xnan" not in out and "xinf" not in out and ".. inf" not in out
