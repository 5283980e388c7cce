"""The example scripts run end to end on tiny settings and write what they promise (on the
TensorFlow backend only: they call the package's public API, whose backends are tested by the
other modules)."""
import pytest


def test_finite_width_drift_writes_table_and_plot(tmp_path, capsys, load_script):
    module = load_script("examples/finite_width_drift.py")
    code = module.main(["--depth", "6", "--widths", "2", "4", "--seeds", "2", "--batch", "8",
                        "--out", str(tmp_path)])
    assert code == 0
    table = (tmp_path / "finite_width_drift.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| kaiming_")]
    assert len(rows) == 4   # 2 initializers x 2 widths
    assert (tmp_path / "finite_width_drift.png").read_bytes()[:4] == b"\x89PNG"
    assert "within 4x" in capsys.readouterr().out


def test_finite_width_drift_rejects_bad_arguments(capsys, load_script):
    module = load_script("examples/finite_width_drift.py")
    with pytest.raises(SystemExit):
        module.parse_args(["--seeds", "0"])
    assert "Received: --depth 30 --seeds 0" in capsys.readouterr().err


def test_normalization_batch_size_writes_table_and_plot(tmp_path, capsys, load_script):
    module = load_script("examples/normalization_batch_size.py")
    code = module.main(["--data", "synthetic", "--subset", "16", "--val-subset", "8",
                        "--epochs", "1", "--batch-sizes", "4", "--depth", "3",
                        "--width", "4", "--groups", "2", "--out", str(tmp_path)])
    assert code == 0
    table = (tmp_path / "normalization_batch_size.md").read_text()
    assert "| batch size | batch | group | layer |" in table and "SYNTHETIC" in table
    rows = [line for line in table.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 3   # validation error, train/test gap, seconds
    assert rows[1].split("|")[3:5] == [" +0.0 ", " +0.0 "]   # GN, LN: the modes agree
    assert "Wall time of the whole script" in table
    assert (tmp_path / "normalization_batch_size.png").read_bytes()[:4] == b"\x89PNG"
    assert "lr 0.00625" in capsys.readouterr().out   # 0.05 x 4 / 32: scaled linearly


@pytest.mark.parametrize("argv, match", [
    (["--methods", "pooled"], "Received: --methods pooled"),
    (["--width", "6", "--groups", "4"], "Received: groups=4. Allowed: 1, 2"),
    (["--methods", "instance", "--batch-sizes", "0"], "Received: --batch-sizes 0"),
    (["--subset", "8", "--batch-sizes", "16"], "Received: --subset 8"),
])
def test_normalization_batch_size_rejects_bad_arguments(argv, match, capsys, load_script):
    module = load_script("examples/normalization_batch_size.py")
    with pytest.raises(SystemExit):
        module.parse_args(argv)
    assert match in capsys.readouterr().err
