"""explorer/norm_figure.py: the N x C x (H, W) block of each normalization, the right cells
shaded (read back from the chart's own data), one sentence per method, clear errors."""
import itertools

import pytest

from explorer import norm_figure as nf

GEOMETRIES = [dict(samples=4, channels=6, positions=4, groups=2),
              dict(samples=3, channels=8, positions=5, groups=4)]


def expected_set(method, samples, channels, positions, groups):
    """Written out independently of the module: the cells that share the statistics of the
    first set (sample 0 / channel 0 / group 0)."""
    cells = itertools.product(range(samples), range(channels), range(positions))
    if method == "none":
        return set()
    if method in ("batch", "batch_per_sample"):  # one channel: all samples, all positions
        return {(n, c, p) for n, c, p in cells if c == 0}
    if method == "layer":  # one sample: all channels, all positions
        return {(n, c, p) for n, c, p in cells if n == 0}
    if method == "instance":  # one sample, one channel: its positions
        return {(n, c, p) for n, c, p in cells if n == 0 and c == 0}
    if method == "group":  # one sample, the first channels // groups channels
        return {(n, c, p) for n, c, p in cells if n == 0 and c < channels // groups}
    raise AssertionError(method)


def chart_panels(chart):
    """{method: rows of the block's cells} from the chart's Vega-Lite spec."""
    spec = chart.to_dict()
    panels = {}
    for panel in spec["hconcat"]:
        rows = spec["datasets"][panel["layer"][0]["data"]["name"]]
        (method,) = {row["method"] for row in rows}
        panels[method] = rows
    return panels


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["4x6x4-g2", "3x8x5-g4"])
def test_shaded_cells_are_the_normalized_set(geometry):
    chart = nf.norm_figure(nf.METHODS, **geometry)
    panels = chart_panels(chart)
    assert list(panels) == list(nf.METHODS)
    total = geometry["samples"] * geometry["channels"] * geometry["positions"]
    for method, rows in panels.items():
        assert len(rows) == total  # every cell of the block is drawn once
        shaded = {(r["sample"], r["channel"], r["position"]) for r in rows if r["shaded"]}
        assert shaded == expected_set(method, **geometry), method
        assert shaded == nf.normalized_cells(method, **geometry)


def test_methods_differ_as_the_paper_draws_them():
    """Group norm sits between layer norm (G = 1) and instance norm (G = C)."""
    geometry = dict(samples=3, channels=6, positions=4)
    layer = nf.normalized_cells("layer", **geometry)
    instance = nf.normalized_cells("instance", **geometry)
    assert nf.normalized_cells("group", groups=1, **geometry) == layer
    assert nf.normalized_cells("group", groups=6, **geometry) == instance
    group = nf.normalized_cells("group", groups=3, **geometry)
    assert instance < group < layer
    batch = nf.normalized_cells("batch", **geometry)
    assert batch & layer == instance  # the two sets cross in one sample's channel


def test_front_slice_is_sample_zero_drawn_last():
    """Sample 0 is the front face: drawn last, at the lower left; each sample behind it is
    shifted up and right, so the batch dimension reads as depth."""
    chart = nf.norm_figure(["batch"])
    spec = chart.to_dict()
    rect = spec["hconcat"][0]["layer"][0]
    assert rect["mark"]["type"] == "rect"
    assert rect["encoding"]["order"]["field"] == "draw_order"
    assert rect["encoding"]["order"].get("sort", "ascending") == "ascending"
    rows = chart_panels(chart)["batch"]
    front = max(r["draw_order"] for r in rows)
    assert {r["sample"] for r in rows if r["draw_order"] == front} == {0}
    by_sample = {r["sample"]: (r["x"], r["y"]) for r in rows
                 if r["channel"] == 0 and r["position"] == 0}
    assert by_sample[0] < by_sample[1] < by_sample[3]


def test_one_sentence_per_method():
    assert set(nf.DESCRIPTIONS) == set(nf.METHODS) == set(nf.TITLES)
    assert {"none", "batch", "layer", "instance", "group"} <= set(nf.METHODS)
    for method, text in nf.DESCRIPTIONS.items():
        assert text.endswith(".") and text.count(". ") == 0, method
    assert "(N, H, W)" in nf.DESCRIPTIONS["batch"]
    assert "(C, H, W)" in nf.DESCRIPTIONS["layer"]
    assert "(H, W)" in nf.DESCRIPTIONS["instance"]
    assert "(C/G, H, W)" in nf.DESCRIPTIONS["group"]


def test_group_panel_title_shows_groups():
    spec = nf.norm_figure(["group", "layer"], groups=3).to_dict()
    titles = [panel["title"]["text"] for panel in spec["hconcat"]]
    assert titles == ["Group norm (G = 3)", "Layer norm"]


def test_bad_method_and_groups():
    with pytest.raises(ValueError, match=r"Received: method='batchnorm'\. Allowed: 'none', "
                                         r"'batch'"):
        nf.norm_figure(["batchnorm"])
    with pytest.raises(ValueError, match=r"Received: groups=4\. Allowed: 1, 2, 3, 6"):
        nf.normalized_cells("group", channels=6, groups=4)
    with pytest.raises(ValueError, match="groups=0"):
        nf.norm_figure(["layer"], groups=0)
