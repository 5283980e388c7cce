"""The example scripts run end to end on tiny settings and write what they promise."""
import pytest


@pytest.mark.backend_independent
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
