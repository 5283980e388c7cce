"""explorer/findings_panel.py (the data of the Training tab's findings), the findings chart and
the outlined heatmap rows (explorer/charts.py), and run_store reading findings.jsonl."""
import pandas as pd
import pytest

from explorer import charts, presets
from explorer.findings_panel import (
    applied_config, findings_frame, fix_text, highlighted_layers, layers_text, needs_code_change,
)
from explorer.run_store import RunStore
from keras_varinit import run_files as rf
from keras_varinit.diagnosis import Finding, Suggestion, suggestions, write_findings
from keras_varinit.training import TrainConfig


def _finding(kind="vanishing", step=0, layers=("conv_01", "conv_02"), changes=None,
             severity="severe"):
    changes = {"init": "kaiming_normal"} if changes is None else changes
    return Finding(kind, step, layers, severity, {"forward_ratio": 1e-9},
                   Suggestion(changes, "why"), f"{kind} in {layers}")


def test_applied_config_is_the_run_config_with_the_change():
    config = dict(TrainConfig(depth=5, width=8, init="xavier_normal", lr=0.1,
                              input_normalization="none").to_dict(), synthetic=True,
                  device="CPU", slug="x")
    fixed = applied_config(config, _finding())
    assert (fixed.init, fixed.depth, fixed.width, fixed.lr) == ("kaiming_normal", 5, 8, 0.1)
    assert fixed.input_normalization == "none"          # a field the fix leaves alone
    norm = applied_config(config, _finding("small_batch_norm", changes={"normalization":
                                                                        "group"}))
    assert norm.normalization == "group"
    with pytest.raises(ValueError, match="Received: stalled_loss with changes"):
        applied_config(config, _finding("stalled_loss", changes={}))
    with pytest.raises(ValueError, match="Received: lr=-1.0"):
        applied_config(config, _finding(changes={"lr": -1.0}))


@pytest.mark.parametrize("model, changes, in_code", [
    ("cnn", {"init": "kaiming_normal"}, False),
    ("application", {"init": "kaiming_normal"}, True),    # the net is trained as it is
    ("file", {"activation": "leaky_relu", "init": "kaiming_normal"}, True),
    ("file", {"normalization": "batch"}, True),
    ("file", {"lr": 0.001}, False),                       # a training option: re-run it
])
def test_a_fix_of_your_own_model_is_code_unless_it_is_a_training_option(model, changes,
                                                                         in_code):
    """"Apply and re-run" on a user's model with a built-in net's option would queue a run
    the configuration refuses; the page shows the Keras code instead."""
    assert needs_code_change({"model": model}, changes) is in_code


def test_panel_rows_fix_text_and_highlighted_layers():
    findings = [_finding(), _finding("dead_units", 40, ("act_01", "conv_02"),
                                     {"lr": 0.001}, "warning")]
    frame = findings_frame(findings)
    assert list(frame["kind"]) == ["vanishing", "dead_units"] and list(frame["step"]) == [0, 40]
    assert frame["fix"][0] == "Initializer: Kaiming normal (fan_in)"
    assert fix_text({"input_normalization": "none"}) == "Input normalization: Raw pixels (0-255)"
    assert set(suggestions.CONFIG_FIELDS) <= set(presets.CONTROLS)   # each fix is a control
    assert highlighted_layers(findings) == ["conv_01", "conv_02", "act_01"]
    assert layers_text([f"c{i}" for i in range(6)]) == "c0, c1, c2, c3 ... (6 layers)"


def test_findings_timeline_and_outlined_heatmap_rows():
    frame = findings_frame([_finding(), _finding("stalled_loss", 60, (), {"lr": 0.1},
                                                 "warning")])
    spec = charts.findings_timeline(frame).to_dict()
    assert spec["mark"]["type"] == "point"
    assert spec["encoding"]["x"]["field"] == "step" and spec["encoding"]["y"]["field"] == "kind"
    assert spec["encoding"]["color"]["scale"]["range"][0] == charts.FINDING_COLOR
    assert "No findings" in str(charts.findings_timeline(findings_frame([])).to_dict())

    stats = pd.DataFrame({"step": [0, 0, 0, 10, 10, 10], "layer_index": [1, 2, 3] * 2,
                          "layer": ["conv_01", "conv_02", "logits"] * 2,
                          "activation_std": [1.0, 0.1, 0.01, 1.0, 0.1, 0.01]})
    plain = charts.heatmap(stats, "activation_std").to_dict()
    assert "layer" not in plain
    marked = charts.heatmap(stats, "activation_std", highlight=["conv_02", "bn_01"]).to_dict()
    base, outline = marked["layer"]
    assert outline["mark"]["stroke"] == charts.FINDING_COLOR
    rows = marked["datasets"][outline["data"]["name"]]
    assert rows == [{"layer": "conv_02"}]                  # only layers the heatmap shows
    assert "conv_02" in base["encoding"]["y"]["axis"]["labelFontWeight"]["expr"]


def test_the_gradient_heatmap_shows_weight_layers_not_the_tracked_batch_norms():
    """The logger tracks normalization layers too (where the diagnosis's scale comparisons
    restart); the heatmap of the weight layers' gradients leaves them out."""
    stats = pd.DataFrame({"step": [0] * 5, "layer_index": [1, 2, 3, 4, 5],
                          "layer": ["conv_01", "bn_01", "act_01", "conv_02", "logits"],
                          "layer_type": ["Conv2D", "BatchNormalization", "ReLU", "Conv2D",
                                         "Dense"],
                          "activation_grad_std": [1.0, 0.5, 0.5, 0.1, 0.01]})
    spec = charts.heatmap(stats, "activation_grad_std").to_dict()
    shown = {row["layer"] for rows in spec["datasets"].values() for row in rows}
    assert shown == {"conv_01", "conv_02", "logits"}


def test_run_store_reads_findings_jsonl(tmp_path):
    run = tmp_path / "20260101-000000-a"
    run.mkdir()
    store = RunStore(tmp_path)
    assert store.findings(run.name) == []
    write_findings(run / rf.FINDINGS_FILE, [_finding()])
    assert [f.kind.value for f in store.findings(run.name)] == ["vanishing"]
    write_findings(run / rf.FINDINGS_FILE, [_finding("stalled_loss", 60, ())])
    assert [f.step for f in store.findings(run.name)] == [0, 60]
