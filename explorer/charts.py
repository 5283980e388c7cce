"""Altair chart builders for the explorer. Plain Python (no Streamlit): each function takes
DataFrames and returns an ``alt.Chart`` (or a compound chart), so tests can build and inspect
them without a page.

Every builder takes ``synthetic``: when true the title says "SYNTHETIC data", so a chart of a
run on the synthetic stand-in can never be mistaken for CIFAR-10.
"""
from __future__ import annotations

import json
import math

import altair as alt
import numpy as np
import pandas as pd

FORWARD_COLOR = "#1f77b4"
BACKWARD_COLOR = "#ff7f0e"
SYNTHETIC_TAG = " \u2014 SYNTHETIC data"
HEIGHT = 260


def _title(text: str, synthetic: bool = False, subtitle: str | list[str] | None = None):
    text = text + (SYNTHETIC_TAG if synthetic else "")
    if subtitle:
        return alt.TitleParams(text, subtitle=subtitle, anchor="start")
    return alt.TitleParams(text, anchor="start")


def _positive(series: pd.Series) -> pd.Series:
    values = pd.to_numeric(series, errors="coerce").astype(float)
    return values.where(np.isfinite(values) & (values > 0))


#: Integer tick labels. Through ``labelExpr``, not ``format="d"``: the Vega build Streamlit
#: ships drops the middle tick (label and grid line) of exactly three explicit ``values``
#: when the axis has ``format="d"`` (a 3-layer model's axis read "1 ... 3").
INTEGER_LABELS = "format(datum.value, 'd')"


def count_axis(counts, max_ticks: int = 10) -> alt.Axis:
    """An axis for counts (epochs, steps, layer numbers) with ticks on integers only, labelled
    as integers: a one-epoch run's axis reads "1" (not "1.000000"), a 3-step one has no "1.5".

    The tick values are given explicitly (every 1, 2, 5, 10, 20, ... within the range of
    ``counts``, at most about ``max_ticks``): Vega's ``tickMinStep`` alone still puts ticks at
    halves on a span of 2.
    """
    values = pd.to_numeric(pd.Series(counts), errors="coerce").astype(float)
    values = values[np.isfinite(values)]
    if values.empty:
        return alt.Axis(labelExpr=INTEGER_LABELS)
    lo, hi = math.floor(values.min()), math.ceil(values.max())
    step = _tick_step(hi - lo, max_ticks)
    ticks = list(range(-(-lo // step) * step, hi + 1, step))  # the multiples of step in range
    return alt.Axis(values=ticks, labelExpr=INTEGER_LABELS)


def _tick_step(span: int, max_ticks: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that cuts ``span`` into <= max_ticks steps."""
    magnitude = 1
    while True:
        for multiple in (1, 2, 5):
            if span <= max_ticks * multiple * magnitude:
                return multiple * magnitude
        magnitude *= 10


# Fields of the runs' tables that count something (the x axes of per-epoch and per-step charts).
COUNT_FIELDS = ("epoch", "step")


def empty_chart(message: str) -> alt.Chart:
    """A small placeholder chart that shows ``message`` (instead of an empty/broken plot)."""
    return alt.Chart(pd.DataFrame({"text": [message]})).mark_text(
        size=13, color="gray").encode(text="text:N").properties(height=60)


# --------------------------------------------------------------------------------------------
# At initialization
# --------------------------------------------------------------------------------------------
def profile_long(profile: pd.DataFrame) -> pd.DataFrame:
    """The variance profile in long form: one row per (layer, direction, measured/predicted).

    Uses the cumulative predictions (the variance predicted from the input through every
    layer, which is what the measured curve should follow) when present, else the per-layer
    ones. Non-positive and non-finite values are dropped (they cannot sit on a log axis).
    """
    series = [
        ("forward", "measured", "forward_var"),
        ("forward", "predicted", "predicted_forward_var_cumulative"),
        ("backward", "measured", "backward_var"),
        ("backward", "predicted", "predicted_backward_var_cumulative"),
    ]
    fallback = {"predicted_forward_var_cumulative": "predicted_forward_var",
                "predicted_backward_var_cumulative": "predicted_backward_var"}
    rows = []
    index = profile["index"] if "index" in profile else pd.Series(range(len(profile)))
    index = pd.to_numeric(index, errors="coerce")
    if index.min() == 0:
        index = index + 1  # show layers 1..depth
    for direction, kind, column in series:
        if column not in profile and fallback.get(column) in profile:
            column = fallback[column]
        if column not in profile:
            continue
        values = _positive(profile[column])
        rows.append(pd.DataFrame({
            "layer_number": index.values,
            "layer": profile.get("layer", index.astype(str)).values,
            "direction": direction,
            "kind": kind,
            "series": f"{direction}, {kind}",
            "variance": values.values,
        }))
    if not rows:
        return pd.DataFrame(columns=["layer_number", "layer", "direction", "kind", "series",
                                     "variance"])
    out = pd.concat(rows, ignore_index=True)
    return out[out["variance"].notna()]


PROFILE_PANELS = {
    # direction: (title, subtitle, colour)
    "forward": ("Forward variance at initialization",
                "Variance of each layer's pre-activation output.",
                FORWARD_COLOR),
    "backward": ("Gradient variance at initialization",
                 "Variance of the batch-mean loss's gradient at each layer's output.",
                 BACKWARD_COLOR),
}
#: A panel's log axis spans at least this many decades, so that a flat profile looks flat
#: (a 10 % drift drawn on an axis zoomed to its own range would look like a collapse).
MIN_DECADES = 2


def log_domain(values: pd.Series, decades: float = MIN_DECADES) -> list[float]:
    """[low, high] of a log axis holding `values` (positive), widened evenly on both sides to
    span at least `decades` powers of ten."""
    low, high = float(values.min()), float(values.max())
    pad = 10 ** max((decades - math.log10(high / low)) / 2, 0.0)
    return [low / pad, high * pad]


def profile_chart(profile: pd.DataFrame, direction: str, *, synthetic: bool = False,
                  height: int = 300) -> alt.Chart:
    """One direction ("forward" or "backward") of the variance profile: measured (solid,
    dots) and predicted (dashed) per layer, on a log axis of its own (the two directions
    differ by many decades, so they are drawn as two panels)."""
    if direction not in PROFILE_PANELS:
        raise ValueError(f"Unknown direction: {direction!r}. Allowed: "
                         f"{', '.join(PROFILE_PANELS)}")
    title, subtitle, colour = PROFILE_PANELS[direction]
    data = profile_long(profile)
    data = data[data["direction"] == direction]
    if data.empty:
        return empty_chart(f"No finite positive {direction} variances to plot (the signal is "
                           "0, NaN or Inf everywhere, or was not measured).")
    base = alt.Chart(data).encode(
        x=alt.X("layer_number:Q", title="layer (1 = nearest the input)",
                axis=count_axis(data["layer_number"])),
        y=alt.Y("variance:Q", title="variance (log scale)", axis=alt.Axis(format=".0e"),
                scale=alt.Scale(type="log", domain=log_domain(data["variance"]))),
        tooltip=[alt.Tooltip("layer:N"), alt.Tooltip("layer_number:Q", title="#"),
                 alt.Tooltip("series:N"), alt.Tooltip("variance:Q", format=".3e")],
    )
    # strokeDash on the lines only: shared with the circles, the legend drew no symbols
    lines = base.mark_line(strokeWidth=2, color=colour, clip=True).encode(
        strokeDash=alt.StrokeDash("kind:N", title="",
                                  scale=alt.Scale(domain=["measured", "predicted"],
                                                  range=[[1, 0], [6, 4]]),
                                  legend=alt.Legend(orient="top", symbolType="stroke",
                                                    symbolStrokeColor=colour,
                                                    symbolStrokeWidth=2, symbolSize=400)))
    points = base.transform_filter(alt.datum.kind == "measured").mark_circle(
        size=28, color=colour, clip=True)
    return (lines + points).properties(
        height=height, title=_title(title, synthetic, [subtitle, "Dashed: the formula's "
                                    "prediction."])).interactive(bind_y=False)


def histograms_long(activations: dict, bins: int = 40) -> pd.DataFrame:
    """Histogram rows (layer, left, right, center, fraction) from ``{layer_name: array}``."""
    rows = []
    for name, values in activations.items():
        values = np.asarray(values, dtype=np.float64).ravel()
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            continue
        lo, hi = np.percentile(finite, [0.5, 99.5])
        if not hi > lo:
            lo, hi = lo - 1e-6, hi + 1e-6
        counts, edges = np.histogram(np.clip(finite, lo, hi), bins=bins, range=(lo, hi))
        std = float(finite.std())
        for c, left, right in zip(counts, edges[:-1], edges[1:]):
            rows.append({"layer": f"{name} (std {std:.2g})", "left": left, "right": right,
                         "fraction": c / finite.size})
    return pd.DataFrame(rows, columns=["layer", "left", "right", "fraction"])


def histogram_chart(activations: dict, *, synthetic: bool = False, bins: int = 40,
                    width: int = 200) -> alt.HConcatChart | alt.Chart:
    """Activation histograms of a few layers side by side (each with its own x range)."""
    data = histograms_long(activations, bins)
    if data.empty:
        return empty_chart("No finite activations to show.")
    charts = []
    for layer in data["layer"].unique():
        part = data[data["layer"] == layer]
        charts.append(alt.Chart(part).mark_bar(color="#4c78a8", opacity=0.85).encode(
            x=alt.X("left:Q", bin="binned", title="activation value"),
            x2="right:Q",
            y=alt.Y("fraction:Q", title="fraction of units", axis=alt.Axis(format="%")),
            tooltip=[alt.Tooltip("left:Q", format=".3g"), alt.Tooltip("right:Q", format=".3g"),
                     alt.Tooltip("fraction:Q", format=".1%")],
        ).properties(width=width, height=170, title=alt.TitleParams(layer, fontSize=12)))
    return alt.hconcat(*charts).properties(
        title=_title("Activation histograms (after the nonlinearity)", synthetic))


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------
def curves_long(steps: pd.DataFrame, metrics: pd.DataFrame, steps_per_epoch: int | None,
                metric: str = "loss") -> pd.DataFrame:
    """Train (every logged step) and validation (each epoch's end) values of ``metric``."""
    parts = []
    if len(steps) and metric in steps:
        s = steps[["step", metric]].rename(columns={metric: "value"})
        s["split"] = "train (running mean)"
        parts.append(s)
    if len(metrics) and f"val_{metric}" in metrics and steps_per_epoch:
        m = metrics[["epoch", f"val_{metric}"]].rename(columns={f"val_{metric}": "value"})
        m["step"] = m["epoch"] * steps_per_epoch
        m["split"] = "validation"
        parts.append(m[["step", "value", "split"]])
    if not parts:
        return pd.DataFrame(columns=["step", "value", "split"])
    out = pd.concat(parts, ignore_index=True)
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    return out


def training_chart(steps: pd.DataFrame, metrics: pd.DataFrame, steps_per_epoch: int | None,
                   metric: str = "loss", *, synthetic: bool = False,
                   diverged: bool = False, height: int = HEIGHT) -> alt.Chart:
    """Loss or accuracy of one run over steps: train line, validation points."""
    data = curves_long(steps, metrics, steps_per_epoch, metric)
    if data.empty:
        return empty_chart(f"No {metric} logged yet.")
    finite = data[np.isfinite(data["value"])]
    title = "Loss" if metric == "loss" else "Accuracy"
    subtitle = "DIVERGED: the loss became NaN/Inf; later values are missing" if diverged else None
    base = alt.Chart(finite).encode(
        x=alt.X("step:Q", title="step", axis=count_axis(finite["step"])),
        y=alt.Y("value:Q", title=metric,
                scale=alt.Scale(zero=False) if metric == "loss" else alt.Scale(domain=[0, 1])),
        color=alt.Color("split:N", title="", legend=alt.Legend(orient="top"),
                        scale=alt.Scale(domain=["train (running mean)", "validation"],
                                        range=["#4c78a8", "#e45756"])),
        tooltip=["split:N", "step:Q", alt.Tooltip("value:Q", format=".4f")],
    )
    chart = (base.transform_filter(alt.datum.split != "validation").mark_line()
             + base.transform_filter(alt.datum.split == "validation").mark_line(
                 point=alt.OverlayMarkDef(size=60), strokeDash=[4, 3]))
    return chart.properties(height=height, title=_title(title, synthetic, subtitle))


# --------------------------------------------------------------------------------------------
# Training mode vs inference mode (batch normalization's train/test discrepancy)
# --------------------------------------------------------------------------------------------
#: metrics.csv's per-epoch evaluations: column prefix -> what it is.
MODES = {
    "train_mode": "train slice, training mode",
    "train_eval": "train slice, inference mode",
    "val": "validation",
}
MODE_COLORS = ("#4c78a8", "#e45756", "#f58518")
#: Lines, not one long subtitle: a chart in half the page cut it short.
MODES_SUBTITLE = ["A fixed slice of the training images after each epoch, in training mode",
                  "(batch statistics) and inference mode (moving statistics): batch norm",
                  "makes them differ, layer/instance/group norm (and none) do not."]


def modes_long(metrics: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """``epoch, mode, value``: ``metric`` of each evaluation in ``MODES`` (finite values
    only; runs written before these columns existed give an empty frame)."""
    parts = []
    for prefix, mode in MODES.items():
        column = f"{prefix}_{metric}"
        if len(metrics) and column in metrics:
            parts.append(pd.DataFrame({"epoch": metrics["epoch"], "mode": mode,
                                       "value": pd.to_numeric(metrics[column],
                                                              errors="coerce")}))
    out = pd.concat(parts, ignore_index=True) if parts else \
        pd.DataFrame(columns=["epoch", "mode", "value"])
    has_modes = out["mode"] != MODES["val"]
    if not out[has_modes]["value"].notna().any():
        return pd.DataFrame(columns=["epoch", "mode", "value"])
    return out[np.isfinite(out["value"].astype(float))]


def mode_gaps(metrics: pd.DataFrame) -> pd.DataFrame:
    """``metrics`` with the gap between the modes per epoch: ``mode_gap`` =
    training-mode minus inference-mode accuracy, ``mode_gap_loss`` = inference-mode minus
    training-mode loss (both positive when the moving statistics do worse)."""
    out = metrics.copy()
    for column in ("train_mode_accuracy", "train_eval_accuracy", "train_mode_loss",
                   "train_eval_loss"):
        values = out[column] if column in out else pd.Series(np.nan, index=out.index)
        out[column] = pd.to_numeric(values, errors="coerce")
    out["mode_gap"] = out["train_mode_accuracy"] - out["train_eval_accuracy"]
    out["mode_gap_loss"] = out["train_eval_loss"] - out["train_mode_loss"]
    return out


def modes_chart(metrics: pd.DataFrame, metric: str = "accuracy", *, synthetic: bool = False,
                height: int = HEIGHT) -> alt.Chart:
    """``metric`` per epoch in training mode and in inference mode on the same training
    images, and on the validation set."""
    data = modes_long(metrics, metric)
    if data.empty:
        return empty_chart("No training/inference-mode evaluation in this run (runs trained "
                           "before it was measured, or no epoch finished yet).")
    scale = alt.Scale(domain=[0, 1]) if metric == "accuracy" else alt.Scale(zero=False)
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("epoch:Q", title="epoch", axis=count_axis(data["epoch"])),
        y=alt.Y("value:Q", title=metric, scale=scale),
        # the legend beside the plot: above or below it, it took the plot's height (the
        # chart's total height is fixed) and squeezed the plot to a line
        color=alt.Color("mode:N", title="", legend=alt.Legend(orient="right", labelLimit=0),
                        scale=alt.Scale(domain=list(MODES.values()),
                                        range=list(MODE_COLORS))),
        tooltip=["mode:N", "epoch:Q", alt.Tooltip("value:Q", format=".4f")],
    ).properties(height=height, title=_title(
        f"{metric.capitalize()}: training vs inference mode", synthetic, MODES_SUBTITLE))


def mode_gap_chart(metrics: pd.DataFrame, *, synthetic: bool = False,
                   height: int = HEIGHT) -> alt.Chart:
    """The train/test gap per epoch: training-mode minus inference-mode accuracy on the
    training slice (0 without batch normalization), with a rule at 0."""
    data = mode_gaps(metrics)[["epoch", "mode_gap", "mode_gap_loss"]]
    data = data[np.isfinite(data["mode_gap"].astype(float))]
    if data.empty:
        return empty_chart("No train/test gap to show (no training/inference-mode "
                           "evaluation in this run).")
    line = alt.Chart(data).mark_line(point=True, color="#e45756").encode(
        x=alt.X("epoch:Q", title="epoch", axis=count_axis(data["epoch"])),
        y=alt.Y("mode_gap:Q", title="accuracy gap", axis=alt.Axis(format="~%")),
        tooltip=["epoch:Q", alt.Tooltip("mode_gap:Q", title="accuracy gap",
                                        format=".2%"),
                 alt.Tooltip("mode_gap_loss:Q", title="loss gap", format=".4f")],
    )
    zero = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(color="gray",
                                                           strokeDash=[3, 3]).encode(y="y:Q")
    return (zero + line).properties(height=height, title=_title(
        "Train/test gap", synthetic,
        ["Training-mode minus inference-mode accuracy on the same training images, same",
         "weights; positive: the moving statistics do worse than the batch's own."]))


# --------------------------------------------------------------------------------------------
# Layer statistics
# --------------------------------------------------------------------------------------------
STAT_TITLES = {
    "activation_std": "Signal std at each layer (layer \u00d7 step)",
    "activation_grad_std": "Gradient std at each layer (layer \u00d7 step)",
    "zero_fraction": "Dead fraction: units exactly 0 (layer \u00d7 step)",
    "saturated_fraction": "Saturated fraction (layer \u00d7 step)",
    "update_ratio": "Update / weight ratio (layer \u00d7 step)",
}


def _activation_rows(layer_stats: pd.DataFrame) -> pd.DataFrame:
    """Rows of the activation layers (ReLU/tanh outputs), or all rows if there are none."""
    names = layer_stats["layer"].astype(str)
    types = layer_stats.get("layer_type", pd.Series("", index=layer_stats.index)).astype(str)
    mask = names.str.startswith("act_") | types.isin(["Activation", "ReLU", "LeakyReLU", "ELU"])
    return layer_stats[mask] if mask.any() else layer_stats


def _weight_rows(layer_stats: pd.DataFrame) -> pd.DataFrame:
    """Rows of the weight layers (conv/dense outputs: neither activation nor normalization
    layers), or all rows if there are none."""
    from keras_varinit.propagation import renormalizes

    acts = _activation_rows(layer_stats)
    if len(acts) == len(layer_stats):
        return layer_stats
    rest = layer_stats.drop(acts.index)
    types = rest.get("layer_type", pd.Series("", index=rest.index)).astype(str)
    weights = rest[~types.map(renormalizes).astype(bool)]
    return weights if len(weights) else rest


def heatmap(layer_stats: pd.DataFrame, stat: str, *, synthetic: bool = False,
            log: bool = True, rows: str = "weight", highlight=()) -> alt.Chart:
    """A layer x step heatmap of one layer statistic (log colour scale for std-like stats).

    ``rows="weight"`` shows the weight layers' outputs (pre-activations; the same layers as the
    init profile), ``"activation"`` the nonlinearities' outputs, ``"all"`` every tracked layer.
    ``highlight``: layers to mark (a diagnosis's findings): their rows get a red outline and
    their labels are bold.
    """
    if layer_stats is None or layer_stats.empty or stat not in layer_stats:
        return empty_chart(f"No layer statistics ({stat}) logged yet.")
    picked = {"weight": _weight_rows, "activation": _activation_rows}.get(
        rows, lambda df: df)(layer_stats)
    data = picked[["step", "layer", "layer_index", stat]].copy()
    data["value"] = pd.to_numeric(data[stat], errors="coerce").astype(float)
    data = data[np.isfinite(data["value"])]
    if log:
        data = data[data["value"] > 0]
    if data.empty:
        return empty_chart(f"{stat}: no finite{' positive' if log else ''} values yet "
                           "(NaN/Inf or exactly 0 everywhere).")
    order = (data.drop_duplicates("layer").sort_values("layer_index")["layer"].tolist())
    step = 14 if len(order) <= 20 else (9 if len(order) <= 40 else 7)
    color_scale = (alt.Scale(type="log", scheme="viridis") if log
                   else alt.Scale(domain=[0, 1], scheme="magma", reverse=True))
    n_steps = data["step"].nunique()
    marked = [layer for layer in order if layer in set(highlight)]
    weight = alt.expr(f"indexof({json.dumps(marked)}, datum.value) >= 0 ? 'bold' : 'normal'")
    y = alt.Y("layer:N", sort=order, title=None,
              axis=alt.Axis(labelOverlap=False, labelFontSize=9 if step < 10 else 10,
                            labelFontWeight=weight if marked else "normal"))
    chart = alt.Chart(data).mark_rect().encode(
        x=alt.X("step:O", title="step",
                axis=alt.Axis(labelAngle=0, labelOverlap=True,
                              values=sorted(data["step"].unique())[::max(1, n_steps // 12)])),
        y=y,
        color=alt.Color("value:Q", scale=color_scale, title=None,
                        legend=alt.Legend(format=".0e" if log else "%", gradientLength=120)),
        tooltip=["layer:N", "step:Q", alt.Tooltip("value:Q", title=stat, format=".3e")],
    )
    if marked:
        outline = alt.Chart(pd.DataFrame({"layer": marked})).mark_rect(
            fill=None, stroke=FINDING_COLOR, strokeWidth=2).encode(y=y)
        chart = alt.layer(chart, outline)
    return chart.properties(height=alt.Step(step), width="container",
                            title=_title(STAT_TITLES.get(stat, stat), synthetic,
                                         "rows: layers from the input (top) to the classifier "
                                         "(bottom)" + ("; outlined: layers named by a finding"
                                                       if marked else "")))


#: The colour of what a finding marks (heatmap outlines, severe points of the timeline).
FINDING_COLOR = "#d62728"


def findings_timeline(findings: pd.DataFrame, *, synthetic: bool = False,
                      height: int = 160) -> alt.Chart:
    """The findings of a run by step (x) and kind (y), one point each, red when severe, with
    the layers, the message and the fix as tooltip (``findings_panel.findings_frame``)."""
    if findings is None or findings.empty:
        return empty_chart("No findings: the diagnosis saw nothing wrong so far.")
    return alt.Chart(findings).mark_point(filled=True, size=140, shape="diamond").encode(
        x=alt.X("step:Q", title="step (first seen)", scale=alt.Scale(zero=True)),
        y=alt.Y("kind:N", title=None, sort=list(dict.fromkeys(findings["kind"]))),
        color=alt.Color("severity:N", title="severity",
                        scale=alt.Scale(domain=["severe", "warning"],
                                        range=[FINDING_COLOR, "#ff7f0e"])),
        tooltip=["kind:N", "step:Q", "severity:N", "layers:N", "message:N", "fix:N"],
    ).properties(height=height, width="container",
                 title=_title("Findings of the diagnosis", synthetic,
                              "each problem at the step it was first seen"))


ZERO_LABEL = "exactly 0"


def fractions_chart(layer_stats: pd.DataFrame, *, synthetic: bool = False,
                    height: int = HEIGHT) -> alt.Chart:
    """The share of exact zeros and of saturated units over steps: mean over layers (solid) and
    the worst layer (dashed). A ReLU layer outputs about half zeros at any healthy step; dead
    units push its share towards 100%."""
    if layer_stats is None or layer_stats.empty:
        return empty_chart("No layer statistics logged yet.")
    layer_stats = _activation_rows(layer_stats)
    rows = []
    for stat, name in (("zero_fraction", ZERO_LABEL), ("saturated_fraction", "saturated")):
        if stat not in layer_stats:
            continue
        values = pd.to_numeric(layer_stats[stat], errors="coerce")
        grouped = values.groupby(layer_stats["step"])
        for how, agg in (("mean over layers", grouped.mean()), ("worst layer", grouped.max())):
            rows.append(pd.DataFrame({"step": agg.index, "fraction": agg.values,
                                      "stat": name, "aggregate": how}))
    if not rows:
        return empty_chart("No dead/saturated fractions logged.")
    data = pd.concat(rows, ignore_index=True).dropna()
    return alt.Chart(data).mark_line().encode(
        x=alt.X("step:Q", axis=count_axis(data["step"])),
        y=alt.Y("fraction:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        # legends beside the plot: above it they took its height (see modes_chart)
        color=alt.Color("stat:N", title="", legend=alt.Legend(orient="right"),
                        scale=alt.Scale(domain=[ZERO_LABEL, "saturated"],
                                        range=["#54a24b", "#b279a2"])),
        strokeDash=alt.StrokeDash("aggregate:N", title="",
                                  scale=alt.Scale(domain=["mean over layers", "worst layer"],
                                                  range=[[1, 0], [5, 3]]),
                                  legend=alt.Legend(orient="right", symbolType="stroke",
                                                    symbolStrokeColor="gray")),
        tooltip=["stat:N", "aggregate:N", "step:Q", alt.Tooltip("fraction:Q", format=".1%")],
    ).properties(height=height, title=_title(
        "Zero and saturated outputs", synthetic,
        "ReLU: about 50% zeros is normal, near 100% means dead units; saturated: tanh/sigmoid "
        "near their limits"))


# --------------------------------------------------------------------------------------------
# Compare
# --------------------------------------------------------------------------------------------
#: Axis titles and formats of the compared fields (others: the field's name, plain numbers).
COMPARE_AXES = {"val_accuracy": ("validation accuracy", None), "loss": ("training loss", None),
                "mode_gap": ("accuracy gap", "~%")}
LEGEND_ROW = 20   # pixels of one run's row in the legend under a compare chart


def compare_chart(frames: dict, x: str, y: str, *, title: str, synthetic: bool = False,
                  log_y: bool = False, height: int = HEIGHT) -> alt.Chart:
    """Overlay ``y`` against ``x`` for several runs: ``frames`` maps run label -> DataFrame.
    The chart grows by a legend row per run (the page gives a chart its height in all, and
    the legend under the plot took it from the plot)."""
    parts = []
    for label, df in frames.items():
        if df is None or df.empty or x not in df or y not in df:
            continue
        part = df[[x, y]].copy()
        part["run"] = label
        parts.append(part)
    if not parts:
        return empty_chart(f"Nothing to compare yet ({y}).")
    data = pd.concat(parts, ignore_index=True)
    data[y] = pd.to_numeric(data[y], errors="coerce")
    data = data[np.isfinite(data[y])]
    if log_y:
        data = data[data[y] > 0]
    if data.empty:
        return empty_chart(f"No finite values of {y} yet.")
    scale = alt.Scale(type="log") if log_y else alt.Scale(zero=False)
    if y.endswith("accuracy"):
        scale = alt.Scale(domain=[0, 1])
    mark = alt.Chart(data).mark_line(point=x == "epoch")
    y_title, y_format = COMPARE_AXES.get(y, (y, None))
    return mark.encode(
        x=alt.X(f"{x}:Q", title=x,
                axis=count_axis(data[x]) if x in COUNT_FIELDS else alt.Axis()),
        y=alt.Y(f"{y}:Q", title=y_title, scale=scale,
                axis=alt.Axis(format=y_format) if y_format else alt.Axis()),
        color=alt.Color("run:N", title="run", legend=alt.Legend(orient="bottom", columns=1,
                                                                labelLimit=400)),
        tooltip=["run:N", f"{x}:Q", alt.Tooltip(f"{y}:Q", format=".4f")],
    ).properties(height=height + LEGEND_ROW * (data["run"].nunique() + 1),
                 title=_title(title, synthetic))


def fmt_seconds(seconds) -> str:
    """'1 h 02 min', '3 min 05 s', '12 s' (or '?' when unknown)."""
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return "?"
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"
