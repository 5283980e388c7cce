"""explorer/charts.py: axes that count (epochs, steps, layers) have integer ticks, read from the
charts' Vega-Lite specs."""
import json

import pandas as pd
import pytest

from explorer import charts


def x_axis(chart):
    spec = chart.to_dict()
    layers = spec.get("layer", [spec])
    axes = [layer["encoding"]["x"]["axis"] for layer in layers if "encoding" in layer]
    if not axes:  # a layer chart whose layers share the top-level encoding
        axes = [spec["encoding"]["x"]["axis"]]
    assert all(a == axes[0] for a in axes)
    return axes[0]


def _runs(epochs):
    frame = lambda acc: pd.DataFrame({"epoch": list(range(1, epochs + 1)),  # noqa: E731
                                      "val_accuracy": [acc] * epochs})
    return {"run a": frame(0.3), "run b": frame(0.4)}


@pytest.mark.parametrize("epochs,ticks", [(1, [1]), (3, [1, 2, 3]), (12, [2, 4, 6, 8, 10, 12]),
                                          (40, [5, 10, 15, 20, 25, 30, 35, 40])])
def test_compare_chart_epoch_axis_has_integer_ticks(epochs, ticks):
    """A one-epoch run's axis has one tick, "1" (it read "1.000000"), never a fraction."""
    axis = x_axis(charts.compare_chart(_runs(epochs), "epoch", "val_accuracy", title="t"))
    assert axis["labelExpr"] == charts.INTEGER_LABELS
    assert axis["values"] == ticks


def test_compare_chart_step_axis_and_other_fields():
    frames = {"a": pd.DataFrame({"step": [0, 250, 500, 1000], "loss": [2.3, 2.0, 1.8, 1.5]})}
    axis = x_axis(charts.compare_chart(frames, "step", "loss", title="t"))
    assert axis == {"labelExpr": charts.INTEGER_LABELS, "values": list(range(0, 1001, 100))}
    frames = {"a": pd.DataFrame({"lr": [0.01, 0.1], "loss": [2.0, 1.0]})}
    assert "values" not in x_axis(charts.compare_chart(frames, "lr", "loss", title="t"))


def test_training_and_fraction_charts_step_axes():
    steps = pd.DataFrame({"step": [1, 2, 3], "loss": [2.0, 1.9, 1.8]})
    metrics = pd.DataFrame({"epoch": [1], "val_loss": [1.7]})
    axis = x_axis(charts.training_chart(steps, metrics, 3, "loss"))
    assert axis == {"labelExpr": charts.INTEGER_LABELS, "values": [1, 2, 3]}  # no tick at 1.5
    stats = pd.DataFrame({"step": [0, 0, 7, 7], "layer": ["act_01", "act_02"] * 2,
                          "layer_index": [1, 2] * 2, "zero_fraction": [0.1, 0.2, 0.3, 0.4]})
    assert x_axis(charts.fractions_chart(stats)) == {"labelExpr": charts.INTEGER_LABELS,
                                                     "values": list(range(0, 8))}


def test_profile_chart_layer_axis():
    table = pd.DataFrame({"index": range(30), "layer": [f"conv_{i}" for i in range(30)],
                          "forward_var": 1.0, "backward_var": 2.0})
    assert x_axis(charts.profile_chart(table, "forward"))["values"] == [5, 10, 15, 20, 25, 30]


def test_profile_chart_measured_and_predicted_legend_comes_from_the_lines():
    """With the dash encoded on the dots too, Vega drew the "measured"/"predicted" legend
    without symbols (rendered: the two words alone); the dots carry no dash now."""
    table = pd.DataFrame({"index": range(4), "layer": [f"conv_{i}" for i in range(4)],
                          "forward_var": 1.0, "backward_var": 2.0,
                          "predicted_forward_var_cumulative": 1.5})
    layers = {layer["mark"]["type"]: layer["encoding"]
              for layer in charts.profile_chart(table, "forward").to_dict()["layer"]}
    assert layers["line"]["strokeDash"]["legend"]["symbolType"] == "stroke"
    assert "strokeDash" not in layers["circle"]


def _y_domain(chart):
    return chart.to_dict()["layer"][0]["encoding"]["y"]["scale"]["domain"]


def test_profile_panels_have_their_own_log_axis_of_at_least_two_decades():
    """Forward (about 1) and backward (about 1e-9) variances on one axis flattened the
    forward curve; each direction is a panel now, and a nearly flat profile is not zoomed
    into a false collapse."""
    table = pd.DataFrame({"index": range(3), "layer": ["a", "b", "c"],
                          "forward_var": [1.0, 0.9, 0.8], "backward_var": [1e-9, 1e-5, 1e-3]})
    low, high = _y_domain(charts.profile_chart(table, "forward"))
    assert high / low == pytest.approx(100.0)             # two decades ...
    assert (low * high) ** 0.5 == pytest.approx(0.8 ** 0.5)  # ... centred on the data
    assert _y_domain(charts.profile_chart(table, "backward")) == [1e-9, 1e-3]


def test_profile_chart_refuses_an_unknown_direction_and_draws_a_missing_one_as_a_message():
    table = pd.DataFrame({"index": range(2), "layer": ["a", "b"], "forward_var": [1.0, 0.5]})
    with pytest.raises(ValueError, match="Unknown direction: 'sideways'. Allowed: forward, "
                                         "backward"):
        charts.profile_chart(table, "sideways")
    assert "No finite positive backward" in json.dumps(
        charts.profile_chart(table, "backward").to_dict())


def test_count_axis_without_finite_values():
    assert charts.count_axis(pd.Series([float("nan"), float("inf")])).to_dict() == {
        "labelExpr": charts.INTEGER_LABELS}


def _modes_metrics(epochs):
    return pd.DataFrame({"epoch": list(range(1, epochs + 1)), "val_accuracy": [0.3] * epochs,
                         "train_mode_accuracy": [0.5] * epochs,
                         "train_eval_accuracy": [0.2] * epochs,
                         "train_mode_loss": [1.5] * epochs, "train_eval_loss": [2.5] * epochs})


@pytest.mark.parametrize("epochs,ticks", [(1, [1]), (3, [1, 2, 3])])
def test_mode_charts_have_integer_epoch_ticks(epochs, ticks):
    integer_ticks = {"labelExpr": charts.INTEGER_LABELS, "values": ticks}
    assert x_axis(charts.modes_chart(_modes_metrics(epochs))) == integer_ticks
    spec = charts.mode_gap_chart(_modes_metrics(epochs)).to_dict()
    (line,) = [layer for layer in spec["layer"] if "x" in layer.get("encoding", {})]
    assert line["encoding"]["x"]["axis"] == integer_ticks
    gaps = charts.mode_gaps(_modes_metrics(epochs))
    assert gaps["mode_gap"].tolist() == pytest.approx([0.3] * epochs)


def test_gap_compare_chart_keeps_negative_gaps():
    """The gap is not an accuracy: the compare chart must not clip it to [0, 1]."""
    frame = charts.mode_gaps(_modes_metrics(2).assign(train_eval_accuracy=[0.6, 0.7]))
    spec = charts.compare_chart({"a": frame}, "epoch", "mode_gap", title="gap").to_dict()
    assert spec["encoding"]["y"]["scale"] == {"zero": False}
