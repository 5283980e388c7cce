"""The N x C x (H, W) block of each normalization method, with the set it normalizes over shaded.

The classic picture (Wu and He, "Group Normalization", ECCV 2018, Fig. 2): a batch of feature
maps drawn as a block with N (samples) as depth, C (channels) across and the spatial positions
(H, W), flattened, down. The shaded cells are those whose values share one mean and one
variance: each method takes its statistics over one such set, for every set alike.

* batch: channel c over all N samples and all positions;
* layer: sample n over all C channels and all positions;
* instance: sample n, channel c, over its positions;
* group: sample n, the C / G channels of one group, over their positions.

Plain Python (no Streamlit): `norm_figure` returns an Altair chart, `normalized_cells` the shaded
set; the explorer shows the figure next to its normalization select, with `DESCRIPTIONS`.
Altair and pandas are imported by the functions that draw, so that the explorer's sidebar can
use the texts before they are loaded.
"""
from __future__ import annotations

# One sentence per method: what its statistics are taken over.
DESCRIPTIONS = {
    "none": "No normalization: each layer's output goes to the activation as it is, and "
            "the initialization alone keeps the signal's scale.",
    "batch": "Batch normalization: each channel's mean and variance over all samples of the "
             "batch and all positions (N, H, W), so every sample's output depends on the "
             "others; at inference the running averages replace them.",
    "batch_per_sample": "Batch normalization with the per-sample variance: the same set as "
                        "batch norm (N, H, W per channel), but the spread is each sample's own "
                        "standard deviation over its positions, averaged over the batch.",
    "layer": "Layer normalization: each sample's mean and variance over all its channels and "
             "positions (C, H, W); independent of the batch, the same in training and at "
             "inference.",
    "instance": "Instance normalization: each sample's and each channel's own mean and "
                "variance over its positions (H, W); group norm with one channel per group.",
    "group": "Group normalization: each sample's channels split into groups, statistics over "
             "one group's channels and positions (C/G, H, W); between layer norm (one group) "
             "and instance norm (one channel per group), independent of the batch size.",
}
METHODS = tuple(DESCRIPTIONS)
TITLES = {"none": "No normalization", "batch": "Batch norm",
          "batch_per_sample": "Batch norm (per-sample variance)", "layer": "Layer norm",
          "instance": "Instance norm", "group": "Group norm"}

SHADED_COLOR = "#4c78a8"
PLAIN_COLOR = "#e3e3e3"
DEPTH_OFFSET = 0.45  # how far each sample's slice sits behind the previous one (cell units)
CELL_PIXELS = 20


def normalized_cells(method, *, samples=4, channels=6, positions=4, groups=2):
    """The set of cells `(n, c, p)` that share the statistics of sample 0 / channel 0 / group 0.

    `p` indexes the H * W spatial positions, flattened. Empty for "none".
    """
    _check_method(method)
    _check_groups(groups, channels)
    per_group = channels // groups
    rule = {
        "none": lambda n, c: False,
        "batch": lambda n, c: c == 0,
        "batch_per_sample": lambda n, c: c == 0,
        "layer": lambda n, c: n == 0,
        "instance": lambda n, c: n == 0 and c == 0,
        "group": lambda n, c: n == 0 and c < per_group,
    }[method]
    return {(n, c, p) for n in range(samples) for c in range(channels)
            for p in range(positions) if rule(n, c)}


def block_cells(method, *, samples=4, channels=6, positions=4, groups=2):
    """One row per cell of the block: `sample, channel, position, shaded` and the rectangle
    `x, x2, y, y2` it is drawn as (sample n's slice shifted up and right by n * DEPTH_OFFSET),
    and `draw_order` (back slices first, sample 0 in front)."""
    import pandas as pd

    shaded = normalized_cells(method, samples=samples, channels=channels, positions=positions,
                              groups=groups)
    rows = []
    for n in range(samples):
        shift = n * DEPTH_OFFSET
        for c in range(channels):
            for p in range(positions):
                top = positions - p  # position 0 at the top
                rows.append({"method": method, "sample": n, "channel": c, "position": p,
                             "shaded": (n, c, p) in shaded, "draw_order": samples - 1 - n,
                             "x": c + shift, "x2": c + 1 + shift,
                             "y": top - 1 + shift, "y2": top + shift})
    return pd.DataFrame(rows)


def norm_figure(methods=("batch", "layer", "instance", "group"), *, samples=4, channels=6,
                positions=4, groups=2) -> alt.HConcatChart:
    """The block of each method in `methods`, side by side, its normalized set shaded."""
    import altair as alt

    panels = [_panel(m, samples, channels, positions, groups) for m in methods]
    parts = [f"N = {samples} samples (depth)", f"C = {channels} channels (across)",
             f"H, W = {positions} positions (down)",
             "shaded: the values that share one mean and variance"]
    if len(methods) > 1:
        title, subtitle = "What each normalization averages over", [" x ".join(parts[:3]),
                                                                    parts[3]]
    else:   # one narrow panel (the sidebar): one short line each
        title, subtitle = "What it averages over", parts
    return alt.hconcat(*panels, spacing=24).properties(
        title=alt.TitleParams(title, subtitle=subtitle, anchor="start"))


def _panel(method, samples, channels, positions, groups):
    import altair as alt
    import pandas as pd

    cells = block_cells(method, samples=samples, channels=channels, positions=positions,
                        groups=groups)
    depth = samples * DEPTH_OFFSET
    x_domain, y_domain = [-0.9, channels + depth + 0.9], [-0.9, positions + depth + 0.3]
    blocks = alt.Chart(cells).mark_rect(stroke="white", strokeWidth=1).encode(
        x=alt.X("x:Q", scale=_fixed(x_domain), axis=None),
        x2="x2:Q",
        y=alt.Y("y:Q", scale=_fixed(y_domain), axis=None),
        y2="y2:Q",
        color=alt.Color("shaded:N", legend=None,
                        scale=alt.Scale(domain=[True, False], range=[SHADED_COLOR, PLAIN_COLOR])),
        order=alt.Order("draw_order:Q"),
        tooltip=["sample:Q", "channel:Q", "position:Q", "shaded:N"],
    )
    labels = alt.Chart(pd.DataFrame([
        {"text": "C", "x": channels / 2, "y": -0.5, "angle": 0},
        {"text": "H, W", "x": -0.5, "y": positions / 2, "angle": 270},
        {"text": "N", "x": channels + depth / 2 + 0.4, "y": positions + depth / 2 - 0.2,
         "angle": 0},
    ])).mark_text(fontSize=12, fontStyle="italic").encode(
        x=alt.X("x:Q", scale=_fixed(x_domain)), y=alt.Y("y:Q", scale=_fixed(y_domain)),
        text="text:N", angle=alt.Angle("angle:Q", scale=None),
    )
    title = TITLES[method] + (f" (G = {groups})" if method == "group" else "")
    return (blocks + labels).properties(
        view=alt.ViewBackground(stroke=None),
        width=CELL_PIXELS * (x_domain[1] - x_domain[0]),
        height=CELL_PIXELS * (y_domain[1] - y_domain[0]),
        title=alt.TitleParams(title, fontSize=13))


def _fixed(domain):
    """A linear scale on exactly `domain` (so that a cell is CELL_PIXELS wide in every panel)."""
    import altair as alt

    return alt.Scale(domain=domain, nice=False, zero=False)


def _check_method(method):
    if method not in DESCRIPTIONS:
        raise ValueError(f"Unknown normalization method. Received: method={method!r}. "
                         f"Allowed: {', '.join(repr(m) for m in METHODS)}")


def _check_groups(groups, channels):
    if not isinstance(groups, int) or groups < 1 or channels % groups:
        divisors = [str(g) for g in range(1, channels + 1) if channels % g == 0]
        raise ValueError(f"groups must divide the number of channels ({channels}). Received: "
                         f"groups={groups!r}. Allowed: {', '.join(divisors)}")
