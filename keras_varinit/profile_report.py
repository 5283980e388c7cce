"""Reading a variance profile: the one-line verdict, the last/first ratios, why a correctly
scaled initialization still drifts, and the plot.

The input is the DataFrame of `keras_varinit.diagnostics.variance_profile`:

>>> import keras_varinit as kv, numpy as np
>>> x = np.random.default_rng(0).standard_normal((256, 32, 32, 3)).astype("float32")
>>> model = kv.models.plain_cnn(30, kernel_initializer="xavier_normal", seed=0)
>>> df = kv.variance_profile(model, x)
>>> verdict = kv.profile_report.summarize_profile(df)
>>> verdict.level, verdict.text
(<VerdictLevel.FAILURE: 'failure'>, 'forward variance falls 10^-9x from conv_01 to conv_29 (30 weight layers): expect training to stall')
>>> kv.profile_report.plot_profile({"xavier_normal": df}, "profile.png")  # doctest: +SKIP

Seed 0 measures x8.3e-10 over the 28 steps from conv_01 to conv_29; the recursion expects
2^-28 (ReLU halving at 1/fan_in) * (2/3)^2 (the two widening convolutions, 2/(fan_in + fan_out)
= (2/3)/fan_in) = 1.7e-9, times the zero-padding loss x0.30: 5.0e-10.
"""
import dataclasses
import enum
import math

import numpy as np
import pandas as pd

from keras_varinit import propagation


class VerdictLevel(enum.Enum):
    """How a profile reads: the signal propagates (OK), trainable but the scale drifts
    (WARNING), expect training to stall or diverge, overflow, vanishing (FAILURE), or too few
    hidden weight layers to judge propagation through depth (UNDETERMINED)."""

    OK = "ok"
    WARNING = "warning"
    FAILURE = "failure"
    UNDETERMINED = "undetermined"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The one-line verdict on a profile: `level` (a `VerdictLevel`) and the sentence `text`
    (`str(verdict)` is the sentence)."""

    level: VerdictLevel
    text: str

    def __str__(self):
        return self.text


def _power_of_ten(ratio):
    return f"10^{math.log10(ratio):+.0f}".replace("+", "") if ratio > 0 else "0"


def last_hidden_row(n_rows):
    """Row of the last hidden weight layer in a profile of `n_rows` weight layers (0 for one or
    two). The last weight layer is the model's output layer, only a reference: in the reference
    nets a classifier after global pooling, whose effect on the second moment the recursion
    does not model, with few units (a noisy estimate). The verdict, the diagnosis and the
    explorer's ratios all compare the hidden layers this leaves."""
    return max(int(n_rows) - 2, 0)


def _normalized(df):
    """Whether normalization layers come between the hidden weight layers (`segment`)."""
    if "segment" not in df or len(df) == 0:
        return False
    segment = df["segment"].to_numpy(int)[:last_hidden_row(len(df)) + 1]
    return bool((segment != segment[0]).any())


def stretch_ids(df):
    """Per row, the stretch of weight layers it belongs to, numbered from 0. Without
    normalization layers between the hidden weight layers, one stretch: the whole net. With
    them, a new stretch starts at each normalization (the profile's `segment`: it restarts the
    forward scale) and wherever a layer does not take the previous weight layer's output
    (`follows_previous`: a residual shortcut or a gate is a parallel branch, not the next
    layer of one path). The verdict and the diagnosis compare variances within a stretch."""
    n = len(df)
    if not _normalized(df):
        return np.zeros(n, int)
    starts = np.zeros(n, bool)
    starts[1:] = np.diff(df["segment"].to_numpy(int)) != 0
    if "follows_previous" in df:
        starts[1:] |= ~df["follows_previous"].to_numpy(bool)[1:]
    return np.cumsum(starts)


def stretches(df):
    """The hidden weight layers' rows (`last_hidden_row`) grouped by `stretch_ids`."""
    rows = np.arange(min(last_hidden_row(len(df)) + 1, len(df)))
    ids = stretch_ids(df)[rows]
    return np.split(rows, np.flatnonzero(np.diff(ids)) + 1)


def _renormalized(df):
    """Whether the verdict compares within `stretches`: normalization layers between the
    hidden weight layers, and a forward variance finite and nonzero on all of them."""
    forward = df["forward_var"].to_numpy(float)[:last_hidden_row(len(df)) + 1]
    return _normalized(df) and bool((np.isfinite(forward) & (forward > 0)).all())


#: The fewest weight layers in a row (two steps) whose last/first ratio says how the scale
#: drifts through depth, where normalization layers restart it; one step is one layer's gain.
MIN_STRETCH = 3


def compared_rows(df):
    """(first row, last row) the verdict compares: the first and the last hidden weight layer
    (`last_hidden_row`), or, with normalization layers between them, the first and last layer
    of the one of the `stretches` (at least `MIN_STRETCH` layers) whose last/first forward
    ratio is farthest from 1; equal rows when there is none or the model has a single hidden
    weight layer. Where the forward variance overflows or vanishes (inf, NaN or 0) the whole
    net is compared, normalized or not: float32 lost the signal."""
    last = last_hidden_row(len(df))
    if not _renormalized(df):
        return 0, last
    forward = df["forward_var"].to_numpy(float)
    pairs = [(int(run[0]), int(run[-1])) for run in stretches(df) if len(run) >= MIN_STRETCH]
    if not pairs:
        return 0, 0
    return max(pairs, key=lambda pair: abs(math.log(forward[pair[1]] / forward[pair[0]])))


def summarize_profile(df, within=4.0, stall=1e-3, explode=1e3):
    """The one-line `Verdict` on the forward variance, last hidden weight layer against the
    first (`compared_rows`: within a stretch between normalization layers, which restart the
    scale), and on float32 overflow or underflow of the gradient; UNDETERMINED for a model with
    a single hidden weight layer, OK when normalization layers leave no `MIN_STRETCH` weight
    layers in a row (the scale cannot drift through depth).

    Below `stall` (10^-3): "forward variance falls 10^-9x from conv_01 to conv_29 (30 weight
    layers): expect training to stall"; above `explode`: "... grows 10^5x ...: expect
    divergence"; within `within` (4x) either way: "... stays within 4x (x0.45) ...: the signal
    propagates" (OK); in between: "... falls x0.0064 ...: trainable, but the scale drifts"
    (WARNING). A forward signal that overflows float32 (inf/NaN) or vanishes to 0, and a
    gradient that overflows or underflows to 0 on the way down, are FAILUREs named as such.
    """
    if len(df) == 0:
        raise ValueError("summarize_profile needs a profile with at least one row. "
                         "Received: an empty DataFrame")
    i, j = compared_rows(df)
    first, last = float(df["forward_var"].iloc[i]), float(df["forward_var"].iloc[j])
    normalized = _renormalized(df)
    where = "the stretch between normalization layers that drifts most; " if normalized else ""
    span = f"from {df['layer'].iloc[i]} to {df['layer'].iloc[j]} ({where}{len(df)} weight layers)"
    ratio = propagation.variance_ratio(first, last)
    failure = lambda text: Verdict(VerdictLevel.FAILURE, text)  # noqa: E731
    if not math.isfinite(ratio):
        if math.isinf(last) or (math.isnan(last) and math.isfinite(first)):
            return failure(f"forward variance overflows (inf/NaN) {span}: expect divergence")
        return failure(f"forward variance is undefined {span} (first layer {first:.3g})")
    if ratio == 0:
        return failure(f"forward variance vanishes (underflows to 0) {span}: "
                       "expect training to stall")
    gradient = _gradient_out_of_range(df)
    if gradient is not None:
        return failure(gradient)
    if i == j and normalized:
        k = last_hidden_row(len(df))
        restarts = int(df["segment"].iloc[k]) - int(df["segment"].iloc[0])
        return Verdict(VerdictLevel.OK, "forward variance restarts at each of the "
                                        f"{restarts} normalization layers between "
                                        f"{df['layer'].iloc[0]} and {df['layer'].iloc[k]}, "
                                        f"with fewer than {MIN_STRETCH} weight layers in a "
                                        "row between two of them "
                                        f"({len(df)} weight layers): it cannot drift through "
                                        "depth")
    if i == j:
        return Verdict(VerdictLevel.UNDETERMINED,
                       f"only {len(df)} weight layer{'s' if len(df) > 1 else ''}, the output "
                       "layer included: too few to judge how the signal propagates through "
                       "depth")
    if 1.0 / within <= ratio <= within:
        return Verdict(VerdictLevel.OK, f"forward variance stays within {within:g}x {span} "
                                        f"(x{ratio:.2g}): the signal propagates")
    if ratio < stall:
        return failure(f"forward variance falls {_power_of_ten(ratio)}x {span}: "
                       "expect training to stall")
    if ratio > explode:
        return failure(f"forward variance grows {_power_of_ten(ratio)}x {span}: "
                       "expect divergence")
    verb = "falls" if ratio < 1 else "grows"
    return Verdict(VerdictLevel.WARNING, f"forward variance {verb} x{ratio:.2g} {span}: "
                                         "trainable, but the scale drifts")


def _gradient_out_of_range(df):
    """The sentence for a gradient that overflows (inf/NaN) or underflows to 0 in float32,
    naming the deepest layer where it happens (it runs from the last layer down), or None.
    A profile without gradients (all NaN) has nothing to say."""
    if "backward_var" not in df:
        return None
    grad = df["backward_var"].to_numpy(float)
    if np.isnan(grad).all():
        return None
    for k in range(len(df) - 1, -1, -1):
        if not math.isfinite(grad[k]):
            return (f"the gradient overflows float32 (inf/NaN) at {df['layer'].iloc[k]} on the "
                    f"way down from {df['layer'].iloc[-1]} ({len(df)} weight layers): "
                    "expect divergence")
        if grad[k] == 0:
            return (f"the gradient underflows to 0 in float32 at {df['layer'].iloc[k]} on the "
                    f"way down from {df['layer'].iloc[-1]} ({len(df)} weight layers): "
                    "expect training to stall")
    return None


def first_out_of_range(df, column="forward_var"):
    """The first row (in `df` order) where `column` is inf/NaN or 0: the layer where float32
    overflowed or underflowed, or None."""
    values = df[column].to_numpy(float)
    bad = np.flatnonzero(~np.isfinite(values) | (values == 0))
    return None if len(bad) == 0 else df["layer"].iloc[int(bad[0])]


def forward_ratios(df):
    """(measured, predicted, padding): last hidden weight layer over the first (the rows the
    verdict compares) of `forward_var`, of `predicted_forward_var_cumulative`, and the product
    of the `padding_factor`s in between (1 when the column is missing)."""
    i, j = compared_rows(df)
    fwd = df["forward_var"].to_numpy(float)
    cumulative = df["predicted_forward_var_cumulative"].to_numpy(float)
    pad = df["padding_factor"].to_numpy(float) if "padding_factor" in df else np.ones(len(df))
    return (propagation.variance_ratio(fwd[i], fwd[j]),
            propagation.variance_ratio(cumulative[i], cumulative[j]),
            float(np.prod(pad[i + 1:j + 1])))


#: Per-layer variance factor fan_in Var[W] c_f inside this band: the initialization's scale
#: matches the activation (explain_drift; the diagnosis's vanishing rule).
MATCHED_FACTOR_BAND = (0.8, 1.25)


def explain_drift(df, within=4.0):
    """Why a correctly scaled initialization still loses (or gains) the signal, or None.

    The textbook recursion (fan_in Var[W] c_f = 1 per layer for Kaiming) assumes every tap of a
    kernel sees an input. Two things it leaves out, both measured here:

    * zero padding: a border position of a "same" convolution sums fewer real inputs, so the
      expected Var[y] is fan_in Var[W] E[x^2] times `padding_factor` (exact in expectation over
      the weights, at any width); on 8x8 maps about 0.92 a layer, over the 30-layer CIFAR CNN
      about x0.3. `predicted_forward_var_cumulative` includes it;
    * one draw versus the average over draws: each layer's realized gain, and the activation's
      factor (1/2 for ReLU only on average over units), fluctuate from draw to draw; their
      product over depth is roughly log-normal, so a typical draw sits below the mean (Jensen)
      and draws spread widely (cf. Hanin & Rolnick 2018 for MLPs). Measured on the 30-layer
      CIFAR CNN over 12 independent draws per width (examples/finite_width_drift.py): median
      x0.09-0.24 against the expected x0.30, range x0.006-2.2, with no clear trend between
      16 and 64 channels.

    Returns a sentence when the measured last/first ratio is outside `within`, the textbook
    recursion (without padding) is within it and its factor per layer is in
    `MATCHED_FACTOR_BAND` (the scale is right: a shallow Xavier/ReLU net's x0.25 over two
    layers is within 4x, but it halves at each), and the one-step predictions hold (median
    within 2x); else None. When the measurement is within 2x of the prediction with padding,
    the padding is the whole story; else one draw's deviation is.
    """
    if len(df) < 2:
        return None
    i, j = compared_rows(df)
    measured, predicted, padding = forward_ratios(df)
    textbook = predicted / padding if padding > 0 else float("nan")
    one_step = (df["forward_var"] / df["predicted_forward_var"]).iloc[i + 1:j + 1]
    one_step = one_step[np.isfinite(one_step)]
    if not (math.isfinite(measured) and math.isfinite(textbook) and len(one_step)):
        return None
    if 1.0 / within <= measured <= within or not 1.0 / within <= textbook <= within:
        return None
    low, high = MATCHED_FACTOR_BAND
    if not (textbook > 0 and low <= textbook ** (1.0 / (j - i)) <= high):
        return None
    if not 0.5 <= float(np.median(one_step)) <= 2.0:
        return None
    span = f"{df['layer'].iloc[i]} to {df['layer'].iloc[j]}"
    parts = [f"the recursion predicts x{predicted:.2g} from {span}"]
    if padding < 0.99:
        parts[0] += (f", x{padding:.2g} of it from zero padding (border taps of each "
                     f"convolution see zeros)")
    if 0.5 <= measured / predicted <= 2.0:
        parts.append(f"measured x{measured:.2g}, x{measured / predicted:.2g} of the "
                     "prediction: the zero padding accounts for the loss")
        return "; ".join(parts)
    parts.append(f"measured x{measured:.2g}, x{measured / predicted:.2g} of the prediction: "
                 "the recursion is the average over weight draws, and one draw of finite "
                 "layers deviates from it (each layer's realized gain, one-step "
                 f"x{one_step.min():.2f} .. x{one_step.max():.2f}, and the activation's "
                 "factor fluctuate, and the fluctuations compound over depth); other seeds "
                 "land elsewhere")
    return "; ".join(parts)


def plot_profile(profiles, path, title=None):
    """Plot forward (left) and backward (right) variance per layer for several profiles.

    Log-scale y; measured values solid with markers, the cumulative prediction dashed, one
    colour per profile. Writes `path` (PNG, SVG... by extension) and returns it.

    >>> plot_profile({"xavier_normal": df_x, "kaiming_normal": df_k}, "profile.png")
    """
    if isinstance(profiles, pd.DataFrame):
        profiles = {"profile": profiles}
    if not profiles:
        raise ValueError("plot_profile needs at least one profile. Received: profiles={}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    panels = (("forward_var", "predicted_forward_var_cumulative",
               "forward: Var[y_l] (pre-activation)"),
              ("backward_var", "predicted_backward_var_cumulative",
               "backward: Var[dL/dy_l]"))
    for k, (name, df) in enumerate(profiles.items()):
        color = f"C{k}"
        for ax, (measured, predicted, label) in zip(axes, panels):
            xs = df["index"].to_numpy()
            ax.plot(xs, _positive(df[measured]), "-o", ms=3, color=color,
                    label=f"{name} (measured)")
            ax.plot(xs, _positive(df[predicted]), "--", color=color, alpha=0.8,
                    label=f"{name} (predicted, cumulative)")
            ax.set_title(label)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("weight layer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("variance")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _positive(series):
    values = np.asarray(series, dtype=float)
    return np.where(values > 0, values, np.nan)
