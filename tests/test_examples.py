"""The example scripts run end to end on tiny settings and write what they promise."""
import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.backend_independent
def test_finite_width_drift_writes_table_and_plot(tmp_path, capsys):
    module = _load("finite_width_drift")
    code = module.main(["--depth", "6", "--widths", "2", "4", "--seeds", "2", "--batch", "8",
                        "--out", str(tmp_path)])
    assert code == 0
    table = (tmp_path / "finite_width_drift.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| kaiming_")]
    assert len(rows) == 4   # 2 initializers x 2 widths
    assert (tmp_path / "finite_width_drift.png").read_bytes()[:4] == b"\x89PNG"
    assert "within 4x" in capsys.readouterr().out


def test_finite_width_drift_rejects_bad_arguments(capsys):
    module = _load("finite_width_drift")
    with pytest.raises(SystemExit):
        module.parse_args(["--seeds", "0"])
    assert "Received: --depth 30 --seeds 0" in capsys.readouterr().err
