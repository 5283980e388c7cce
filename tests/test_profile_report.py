"""profile_report: the one-line verdict, the last/first ratios, the drift note and the plot."""
import pathlib
import re

import numpy as np
import pandas as pd
import pytest

from keras_varinit import profile_report

pytestmark = pytest.mark.backend_independent


# ----------------------------------------------------------------------------- verdict, plot

def _fake(values, activation="relu"):
    n = len(values)
    return pd.DataFrame({"layer": [f"l{i}" for i in range(n)], "index": range(1, n + 1),
                         "activation": [activation] * (n - 1) + ["linear"],
                         "forward_var": values})


def _verdict(values, backward=None):
    df = _fake(values)
    if backward is not None:
        df["backward_var"] = backward
    return profile_report.summarize_profile(df)


def test_summarize_profile_verdicts(small30):
    failure, warning, ok = (profile_report.VerdictLevel.FAILURE,
                            profile_report.VerdictLevel.WARNING, profile_report.VerdictLevel.OK)
    verdict = profile_report.summarize_profile(small30["xavier_normal"])
    assert verdict.level is failure and verdict.text.startswith("forward variance falls 10^-")
    assert str(verdict) == verdict.text
    verdict = _verdict([1.0] * 29 + [0.5, 0.1])
    assert verdict.level is ok
    assert "stays within 4x" in verdict.text and "l0 to l29" in verdict.text
    assert "propagates" in verdict.text
    for values, level, words in [([1.0, 1e5, 1.0], failure, "grows 10^5x"),
                                 ([1.0, 1e5, 1.0], failure, "expect divergence"),
                                 ([1.0, 1e-9, 1.0], failure, "falls 10^-9x"),
                                 ([1.0, 1e-2, 1.0], warning, "drifts"),
                                 ([1.0, np.inf, 1.0], failure, "overflows"),
                                 ([1.0, 0.0, 1.0], failure, "vanishes")]:
        verdict = _verdict(values)
        assert verdict.level is level and words in verdict.text, (values, verdict)
    with pytest.raises(ValueError, match="empty"):
        profile_report.summarize_profile(_fake([1.0])[:0])


def test_verdict_names_float32_gradient_overflow_and_underflow():
    """A forward signal that looks fine but a gradient that is inf/NaN or 0 in float32 is a
    failure, named at the deepest layer where it happens (the gradient runs top-down)."""
    verdict = _verdict([1.0, 1.0, 1.0], backward=[np.inf, 1e30, 1e-3])
    assert verdict.level is profile_report.VerdictLevel.FAILURE
    assert verdict.text.startswith("the gradient overflows float32 (inf/NaN) at l0 on the way "
                                   "down from l2") and "expect divergence" in verdict.text
    verdict = _verdict([1.0, 1.0, 1.0], backward=[0.0, 0.0, 1e-3])
    assert "the gradient underflows to 0 in float32 at l1" in verdict.text
    assert "expect training to stall" in verdict.text
    no_gradients = _verdict([1.0, 1.0, 1.0], backward=[np.nan] * 3)
    assert no_gradients.level is profile_report.VerdictLevel.OK
    assert profile_report.first_out_of_range(_fake([1.0, np.inf, np.nan])) == "l1"
    assert profile_report.first_out_of_range(_fake([1.0, 2.0, 3.0])) is None


def test_plot_profile_writes_png(small30, tmp_path):
    path = tmp_path / "profile.png"
    assert profile_report.plot_profile(small30, path, title="30 layers") == path
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one profile"):
        profile_report.plot_profile({}, tmp_path / "none.png")


def test_compared_rows_leave_out_the_output_layer():
    """One rule (`last_hidden_row`) for the verdict, the diagnosis and the explorer: the last
    weight layer is the output layer, whatever the activations (a linear net's classifier
    once counted as hidden, so the verdict and the page's ratio named different layers)."""
    assert profile_report.compared_rows(_fake([1.0, 2.0, 3.0, 4.0])) == (0, 2)
    assert profile_report.compared_rows(_fake([1.0, 2.0, 3.0, 4.0], activation="linear")) == (0, 2)
    assert profile_report.compared_rows(_fake([1.0, 2.0])) == (0, 0)
    assert [profile_report.last_hidden_row(n) for n in (1, 2, 3, 30)] == [0, 0, 1, 28]


def _normalized(values, segment, follows=None):
    df = _fake(values)
    df["segment"] = segment
    df["follows_previous"] = [False] + [True] * (len(values) - 1) if follows is None else follows
    return df


def test_the_verdict_compares_within_the_stretches_between_normalization_layers():
    """A normalization restarts the forward scale: the verdict compares the first and last
    layer of the stretch between two of them that drifts most, never across one (a batch-norm
    net fed raw pixels read 'falls 10^-5x: expect training to stall', EfficientNetB0 on
    normalized inputs 'grows 10^5x: expect divergence')."""
    ok, warning = profile_report.VerdictLevel.OK, profile_report.VerdictLevel.WARNING
    values = [1.0, 0.5, 0.25, 1.0, 0.1, 0.01, 1.0]    # a normalization after l2
    df = _normalized(values, [0, 0, 0, 1, 1, 1, 1])
    assert list(profile_report.stretch_ids(df)) == [0, 0, 0, 1, 1, 1, 1]
    assert profile_report.compared_rows(df) == (3, 5)
    verdict = profile_report.summarize_profile(df)
    assert verdict.level is warning, verdict
    assert "falls x0.01 from l3 to l5 (the stretch between normalization layers that drifts " \
           "most; 7 weight layers)" in verdict.text
    # the same net without the normalization: first against last hidden layer, one stretch
    assert profile_report.compared_rows(_fake(values)) == (0, 5)
    assert list(profile_report.stretch_ids(_fake(values))) == [0] * 7
    # every hidden layer renormalized: nothing drifts, whatever the scales
    df = _normalized([4e4, 1.0, 0.5, 1.0, 1.0], [0, 1, 2, 3, 4])
    assert profile_report.compared_rows(df) == (0, 0)
    verdict = profile_report.summarize_profile(df)
    assert verdict.level is ok, verdict
    assert verdict.text == "forward variance restarts at each of the 3 normalization layers " \
                           "between l0 and l3, with fewer than 3 weight layers in a row between " \
                           "two of them (5 weight layers): it cannot drift through depth"
    # a parallel branch (a residual shortcut after the block's last convolution) starts a
    # stretch of its own; two layers in a row are one layer's gain, not a drift through depth
    df = _normalized([1.0, 1.0, 0.2, 3.0, 1.0, 1.0], [0, 1, 1, 1, 2, 3],
                     follows=[False, True, True, False, True, True])
    assert list(profile_report.stretch_ids(df)) == [0, 1, 1, 2, 3, 4]
    assert profile_report.compared_rows(df) == (0, 0)
    assert profile_report.summarize_profile(df).level is ok
    # float32 lost the signal: compared over the whole net, normalized or not
    df = _normalized([1.0, np.inf, np.nan, np.nan, np.nan], [0, 1, 2, 3, 4])
    assert profile_report.compared_rows(df) == (0, 3)
    verdict = profile_report.summarize_profile(df)
    assert verdict.text == "forward variance overflows (inf/NaN) from l0 to l3 (5 weight " \
                           "layers): expect divergence"


def test_a_single_hidden_layer_is_undetermined_not_ok():
    """A conv and its classifier (or an LSTM model's one profiled Dense) once got a green
    "stays within 4x from dense_5 to dense_5": with one hidden layer there is nothing to
    compare. A float32 overflow is still a failure."""
    for values in ([1.0], [1.0, 1e-7]):
        verdict = _verdict(values)
        assert verdict.level is profile_report.VerdictLevel.UNDETERMINED, verdict
        assert "too few to judge" in verdict.text
        assert f"only {len(values)} weight layer" in verdict.text
    assert _verdict([1.0, 1.0], backward=[np.inf, 1.0]).level is \
        profile_report.VerdictLevel.FAILURE


def test_forward_ratios_hand_values():
    df = _fake([2.0, 1.0, 0.5, 9.0])
    df["predicted_forward_var_cumulative"] = [2.0, 1.6, 1.0, 9.0]
    df["padding_factor"] = [1.0, 0.8, 0.5, 0.1]    # the classifier's is not counted
    measured, predicted, padding = profile_report.forward_ratios(df)
    assert measured == pytest.approx(0.25)
    assert predicted == pytest.approx(0.5)
    assert padding == pytest.approx(0.4)
    assert profile_report.forward_ratios(df.drop(columns="padding_factor"))[2] == 1.0


# ----------------------------------------------------------------------------- drift note

def _drift_frame(measured, predicted, one_step=1.0):
    """A 10-row profile (9 ReLU layers + linear classifier) with given hidden-layer values."""
    n = len(measured)
    return pd.DataFrame({
        "layer": [f"l{i}" for i in range(n)], "index": range(1, n + 1),
        "activation": ["relu"] * (n - 1) + ["linear"],
        "forward_var": measured, "predicted_forward_var": np.asarray(measured) / one_step,
        "predicted_forward_var_cumulative": predicted})


def test_explain_drift_only_when_the_recursion_holds_but_one_draw_drifts():
    flat = [2.0] * 10
    drifting = list(2.0 * 0.55 ** np.arange(9)) + [1.0]   # x0.0084 by l8
    note = profile_report.explain_drift(_drift_frame(drifting, flat))
    assert note is not None and "average over weight draws" in note and "padding" not in note
    assert "predicts x1 from l0 to l8" in note and "measured x0.0084" in note
    # measured within 4x: nothing to explain
    assert profile_report.explain_drift(_drift_frame([2.0, 1.5, 1.0, 0.8, 0.6, 1.0], flat[:6])) \
        is None
    # the recursion itself predicts the fall (Xavier): the verdict says it all
    halving = list(2.0 * 0.5 ** np.arange(9)) + [1.0]
    assert profile_report.explain_drift(_drift_frame(drifting, halving)) is None
    # the one-step prediction is off (a wrong formula): no story about draws
    assert profile_report.explain_drift(_drift_frame(drifting, flat, one_step=3.0)) is None
    assert profile_report.explain_drift(_drift_frame([1.0], [1.0])) is None


def test_explain_drift_says_nothing_of_draws_when_the_recursion_predicts_the_measurement():
    """Two Xavier/ReLU layers: x0.25 is within 4x, yet the recursion halves at each layer and
    the measurement matches it; the note used to blame one draw's deviation."""
    two = _drift_frame([1.0, 0.5, 0.24, 1.0], [1.0, 0.5, 0.25, 1.0])
    assert profile_report.explain_drift(two) is None
    # padding alone: the textbook recursion is flat, the padded one matches the measurement
    frame = _drift_frame(list(2.0 * 0.8 ** np.arange(9)) + [1.0],
                         list(2.0 * 0.8 ** np.arange(9)) + [1.0])
    frame["padding_factor"] = [1.0] + [0.8] * 8 + [1.0]
    note = profile_report.explain_drift(frame)
    assert note is not None and "zero padding accounts for the loss" in note
    assert "weight draws" not in note


def test_explain_drift_on_the_measured_small30(small30):
    note = profile_report.explain_drift(small30["kaiming_normal"])
    ratio, _, _ = profile_report.forward_ratios(small30["kaiming_normal"])
    if ratio < 0.25:   # one draw at width 16: x0.006-1.3 over 12 draws; seed 0 ~ x0.5
        assert note is not None and "zero padding" in note
    else:
        assert note is None
    assert profile_report.explain_drift(small30["xavier_normal"]) is None


# ----------------------------------------------------------------------------- quoted figures

REPO = pathlib.Path(__file__).resolve().parents[1]


def _e(value):
    """1.7e-9, as the docs write it (numpy: 1.7e-09)."""
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2),
                  f"{value:.1e}")


def test_docs_quote_the_small30_xavier_figures_it_prints(small30):
    """What the docstrings, the example and the docs say the 30-layer Xavier CNN does (seed 0,
    256 N(0, 1) images, `examples/variance_profile.py`) is what the profile prints: the
    verdict "falls 10^-9x" (the text said 10^-11x), the measured ratio conv_29 / conv_01, and
    the recursion over those 28 steps, 2^-28 (2/3)^2 (it said 2^-29) times the padding loss.
    The docs quote TensorFlow's draw (JAX's seed 0 draws other weights: 10^-10 there)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the quoted figures are the TensorFlow backend's seed-0 draw")
    df = small30["xavier_normal"]
    text = profile_report.summarize_profile(df).text
    power = re.search(r"falls (10\^-\d+)x", text).group(1)
    assert power == "10^-9"
    i, j = profile_report.compared_rows(df)
    assert (df["layer"].iloc[i], df["layer"].iloc[j]) == ("conv_01", "conv_29")
    measured = float(df["forward_var"].iloc[j] / df["forward_var"].iloc[i])
    backward = float(df["backward_var"].iloc[i] / df["backward_var"].iloc[j])
    padding = float(np.prod(df["padding_factor"].iloc[i + 1:j + 1]))
    textbook = 0.5 ** (j - i) * (2 / 3) ** 2   # 28 ReLU halvings, 2 widening convolutions
    figures = [f"x{_e(measured)}", "2^-28", _e(textbook), f"x{padding:.2f}",
               _e(textbook * padding)]
    for name in ("keras_varinit/diagnostics.py", "keras_varinit/profile_report.py",
                 "examples/variance_profile.py", "README.md"):
        source = (REPO / name).read_text()
        assert "10^-11" not in source and "2^-29 * (2/3)" not in source, name
        powers = re.findall(r"(?:forward variance|variance to) falls? (?:about )?(10\^-?\d+)",
                            source)
        assert powers and set(powers) == {power}, (name, powers)
        for quoted in re.findall(r"'(forward variance falls [^']*)'", source):
            assert quoted == text, name
        if name in ("keras_varinit/profile_report.py", "examples/variance_profile.py",
                    "README.md"):
            missing = [f for f in figures if f not in " ".join(source.split())]
            assert missing == [], (name, missing)
    diagnosis = (REPO / "docs" / "diagnosis.md").read_text()
    assert re.findall(r"measures (10\^-?\d+) forward and (10\^-?\d+) backward", diagnosis) == \
        [(power, profile_report._power_of_ten(backward))]
