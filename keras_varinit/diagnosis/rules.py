"""The rules: small functions that turn layer statistics into `Finding`s, and their thresholds.

Each rule reads one kind of evidence (a step's layer-statistics records, the weight layers'
variances at initialization, the loss history, the run's context) and returns a `Finding` or
None. Thresholds are module constants; `docs/diagnosis.md` says why each has its value.
Variances are compared, not standard deviations: the recursion of `keras_varinit.propagation`
is written in variances,

    Var[y_l] = fan_in_l Var[W_l] c_f Var[y_(l-1)],
    Var[dL/dy_l] = fan_out_(l+1) Var[W_(l+1)] c_b Var[dL/dy_(l+1)],

so a mismatched initialization multiplies the variance by the same factor at every layer and the
ratio between two layers is that factor to the power of their distance.

Layer names are opaque strings: the rules rely on the record fields (CONTRIBUTING.md, "Layer
statistics record") and the profile's columns (`diagnostics.COLUMNS`) only.
"""
import dataclasses
import math

import numpy as np
import pandas as pd

from keras_varinit import propagation
from keras_varinit.diagnosis import suggestions as sg
from keras_varinit.diagnosis.findings import Context, Finding, Kind, Severity, Suggestion
from keras_varinit.profile_report import MATCHED_FACTOR_BAND, last_hidden_row, stretch_ids

#: Vanishing: a weight layer's forward variance below this fraction of the first weight
#: layer's, or its gradient variance below this fraction of the last hidden weight layer's
#: (the same 10^-3 at which `profile_report.summarize_profile` says "expect training to stall").
VANISHING_RATIO = 1e-3
#: Exploding: the same ratios above this (`summarize_profile`'s "expect divergence").
EXPLODING_RATIO = 1e3
#: A vanishing/exploding finding is severe beyond the square of its threshold (10^-6, 10^6).
SEVERE_RATIO_POWER = 2

#: Dead units: fraction of exact zeros of a layer's output on the probe (a ReLU of symmetric
#: pre-activations gives 0.5).
DEAD_FRACTION = 0.9
DEAD_SEVERE = 0.99
#: Saturation: fraction of saturated outputs (the record's `saturated_fraction`: tanh |a| > 0.97,
#: sigmoid a outside [0.03, 0.97]) at initialization, where half the units saturated already
#: means weights too large; during training layers saturate in part and recover (Glorot &
#: Bengio 2010, Sec. 3), so only `SATURATED_SEVERE` counts there.
SATURATED_FRACTION = 0.5
SATURATED_SEVERE = 0.9
#: The record's saturation bound on the output, and the pre-activation bounds it implies.
SATURATED_OUTPUT = 0.97
_SATURATION_PRE_ACTIVATION = {"tanh": math.atanh(SATURATED_OUTPUT),
                              "sigmoid": math.log(SATURATED_OUTPUT / (1 - SATURATED_OUTPUT))}

#: Stalled loss: the loss (median of `STALL_SMOOTHING` consecutive values) within
#: `STALL_TOLERANCE` nats of ln(num_classes) for at least `STALL_STEPS` steps.
STALL_STEPS = 100
STALL_TOLERANCE = 0.02
STALL_SMOOTHING = 5
#: Parameter updates slower than this (||delta W|| / ||W|| per step) leave a loss where it is.
SLOW_UPDATE_RATIO = 1e-5

#: Unnormalized input: the first weight layer's input second moment E[x^2] outside this band
#: (initializers are derived for E[x^2] = 1; a factor 16 is 4x in standard deviation);
#: severe outside the second band.
INPUT_MOMENT_BAND = (1.0 / 16.0, 16.0)
INPUT_MOMENT_SEVERE = (1e-3, 1e3)

#: Batch normalization with fewer images per batch than this (Wu & He 2018, Fig. 1: BN's error
#: rises steeply below 8 images per batch, GN's stays flat); severe below the second.
SMALL_BATCH = 8
SMALL_BATCH_SEVERE = 4


@dataclasses.dataclass
class RunView:
    """What a rule may read besides its own data: the context, the init profile (or None), the
    hidden layers' activation, the parameters' update ratio per step (`||delta W|| / ||W||`, the
    median over layers at the first logged update), and the findings made so far."""

    context: Context
    profile: pd.DataFrame | None = None
    activation: str | None = None
    update_ratio_per_step: float | None = None
    earlier: list = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------
# helpers

def span(layers):
    """`conv_01..conv_29 (29 layers)` for long lists, `a, b` for short ones."""
    layers = list(layers)
    if len(layers) > 3:
        return f"{layers[0]}..{layers[-1]} ({len(layers)} layers)"
    return ", ".join(layers)


def _g(x):
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2g}"


def _finite(x):
    return x is not None and math.isfinite(x)


def _severity(worse_than_severe):
    return Severity.SEVERE if worse_than_severe else Severity.WARNING


def _cause(view, kinds):
    """The earliest finding so far among `kinds` (a root cause a later finding defers to)."""
    for finding in view.earlier:
        if finding.kind in kinds:
            return finding
    return None


def lr_suggestion(view, why):
    """Lower the learning rate (`suggestions.lowered_lr`), saying why."""
    lr = view.context.lr
    new = sg.lowered_lr(lr, view.update_ratio_per_step)
    measured = ""
    if _finite(view.update_ratio_per_step):
        measured = (f" (measured update ||dW||/||W|| {_g(view.update_ratio_per_step)} per step; "
                    f"target about {sg.UPDATE_RATIO_TARGET:g})")
    if new is None:
        return Suggestion({}, f"Lower the learning rate 10x or more: {why}{measured}. "
                              "(The learning rate is unknown: give Context(lr=...).)")
    return Suggestion({"lr": new}, f"Lower the learning rate from {lr:g} to {new:g}: "
                                   f"{why}{measured}.")


def deferred(cause, verb="is the cause"):
    """The suggestion of an earlier finding that explains a later one."""
    return Suggestion(cause.suggestion.changes,
                      f"The {cause.kind.value} finding (step {cause.step}) {verb}: "
                      f"{cause.suggestion.text}")


def training_suggestion(view, why):
    """The fix for a problem that appeared during training: unnormalized inputs when they were
    found (the first layer's gradient, dL/dW_1 = x dL/dy_1, scales with the input, and so does
    every update), else a smaller learning rate."""
    cause = _cause(view, (Kind.UNNORMALIZED_INPUT,))
    return deferred(cause) if cause is not None else lr_suggestion(view, why)


def init_suggestion(activation, why):
    changes, text = sg.matched_init(activation)
    return Suggestion(changes, f"{why}; use {text}.")


# --------------------------------------------------------------------------------------------
# vanishing / exploding: the variance ratios across weight layers

def weight_table_from_records(rows):
    """The weight layers of one step's records (model order): layer, forward_var (of the
    layer's output), backward_var (of dL/d output), segment: the stretch it belongs to
    (`profile_report.stretch_ids`: split at normalization layers, `propagation.renormalizes`,
    and, where there are some, at parallel branches, from the records' `follows_previous`;
    records without that field, written before it existed, split at normalization layers
    only). Weight layers: records with a weight std, normalization layers (their gamma)
    left out."""
    rows = rows.sort_values("layer_index")
    types = rows["layer_type"].astype(str)
    normalization = types.map(propagation.renormalizes).to_numpy(bool)
    is_weight = rows["weight_std"].notna().to_numpy() & ~normalization
    w = rows[is_weight]
    table = pd.DataFrame({"layer": w["layer"].astype(str).to_numpy(),
                          "forward_var": w["activation_std"].to_numpy(float) ** 2,
                          "backward_var": w["activation_grad_std"].to_numpy(float) ** 2,
                          "segment": propagation.weight_segments(types, is_weight)})
    follows = rows.get("follows_previous")
    if follows is None or follows.isna().any():    # records written before the field
        return table.assign(segment=stretch_ids(table))
    links = propagation.weight_links(follows.astype(bool), is_weight)
    return table.assign(segment=stretch_ids(table.assign(follows_previous=links)))


def weight_table_from_profile(profile):
    """The same table from `variance_profile`'s DataFrame (measured at initialization), its
    `segment` the profile's stretches (`profile_report.stretch_ids`: split at normalization
    layers and, where there are some, at parallel branches)."""
    return pd.DataFrame({"layer": profile["layer"].astype(str).to_numpy(),
                         "forward_var": profile["forward_var"].to_numpy(float),
                         "backward_var": profile["backward_var"].to_numpy(float),
                         "segment": stretch_ids(profile)})


def with_profile_stretches(table, profile):
    """`table` (from records) with the profile's stretches as its `segment` when the profile
    has the same weight layers (records written before they carried `follows_previous` know
    no branch structure); else as it is."""
    if profile is None or list(profile["layer"].astype(str)) != list(table["layer"]):
        return table
    return table.assign(segment=stretch_ids(profile))


def signal_ratios(table):
    """(forward, backward, forward reference, backward reference) arrays over the table's rows
    (ratios NaN where not compared): forward_l = Var[y_l] / Var[y_r] for the hidden layers,
    r the first weight layer of l's segment; backward_l = Var[dL/dy_l] / Var[dL/dy_r], r the
    last hidden weight layer of l's segment. A normalization between two layers restarts the
    scale, so layers of different segments are not compared (one segment without one)."""
    n = len(table)
    fwd, bwd = np.full(n, np.nan), np.full(n, np.nan)
    ref_f, ref_b = np.zeros(n, int), np.zeros(n, int)
    if n < 2:
        return fwd, bwd, ref_f, ref_b
    last = last_hidden_row(n)
    f = table["forward_var"].to_numpy(float)
    b = table["backward_var"].to_numpy(float)
    segment = table["segment"].to_numpy(int) if "segment" in table else np.zeros(n, int)
    for i in range(last + 1):
        same = np.flatnonzero(segment[:last + 1] == segment[i])
        ref_f[i], ref_b[i] = same[0], same[-1]
        if i > ref_f[i] and math.isfinite(f[ref_f[i]]) and f[ref_f[i]] > 0:
            fwd[i] = f[i] / f[ref_f[i]]
        if i < ref_b[i] and math.isfinite(b[ref_b[i]]) and b[ref_b[i]] > 0:
            bwd[i] = b[i] / b[ref_b[i]]
    return fwd, bwd, ref_f, ref_b


def _extreme(ratios, mask, vanishing):
    """(ratio, row index) of the most extreme flagged ratio, or (None, None)."""
    if not mask.any():
        return None, None
    values = np.where(mask, ratios, np.inf if vanishing else -np.inf)
    i = int(np.argmin(values) if vanishing else np.argmax(values))
    return float(ratios[i]), i


def _profile_series(profile, column):
    return pd.Series(profile[column].to_numpy(float), index=profile["layer"].astype(str))


def predicted_ratio(profile, column, layer, reference):
    """profile[column] at `layer` over its value at `reference`, or None when either is absent."""
    if profile is None or column not in profile:
        return None
    series = _profile_series(profile, column)
    if layer not in series.index or reference not in series.index:
        return None
    value = propagation.variance_ratio(series[reference], series[layer])
    return value if math.isfinite(value) else None


def predicted_layer_factor(profile):
    """Geometric mean over the hidden weight layers after the first of the recursion's forward
    factor fan_in_l Var[W_l] c_f(activation of layer l-1): 1 for a matched initialization,
    1/2 for Xavier under ReLU. None without a profile."""
    if profile is None or len(profile) < 2:
        return None
    last = last_hidden_row(len(profile))
    acts = list(profile["activation"])
    factors = []
    for i in range(1, last + 1):
        c_f = propagation.forward_factor(None if acts[i - 1] == "linear" else acts[i - 1])
        f = float(profile["fan_in"].iloc[i]) * float(profile["weight_var"].iloc[i]) * c_f
        if math.isfinite(f) and f > 0:
            factors.append(math.log(f))
    return math.exp(sum(factors) / len(factors)) if factors else None


def _direction_evidence(table, ratios, mask, vanishing, references, forward):
    ratio, i = _extreme(ratios, mask, vanishing)
    if ratio is None:
        return {}, None
    reference_row = int(references[i])
    distance = i - reference_row if forward else reference_row - i
    name = "forward" if forward else "backward"
    factor = ratio ** (1.0 / distance) if ratio > 0 and distance > 0 else None
    return {f"{name}_ratio": ratio, f"{name}_layer": table["layer"].iloc[i],
            f"{name}_reference": table["layer"].iloc[reference_row],
            f"{name}_per_layer_factor": factor}, factor


def scale_rule(kind, table, step, at_init, view, reported):
    """Vanishing or exploding signal/gradient across the weight layers of one step (see the
    module docstring). At initialization the fix is the initializer (or normalization when the
    initializer is already matched); later, an exploding scale is the learning rate's."""
    vanishing = kind is Kind.VANISHING
    fwd, bwd, ref_f, ref_b = signal_ratios(table)
    with np.errstate(invalid="ignore"):
        flag_f = fwd < VANISHING_RATIO if vanishing else fwd > EXPLODING_RATIO
        flag_b = bwd < VANISHING_RATIO if vanishing else bwd > EXPLODING_RATIO
    fresh = ~table["layer"].isin(reported).to_numpy()
    flag_f, flag_b = flag_f & fresh, flag_b & fresh
    if not (flag_f | flag_b).any():
        return None
    ev_f, factor_f = _direction_evidence(table, fwd, flag_f, vanishing, ref_f, True)
    ev_b, factor_b = _direction_evidence(table, bwd, flag_b, vanishing, ref_b, False)
    threshold = VANISHING_RATIO if vanishing else EXPLODING_RATIO
    evidence = {"threshold": threshold, **ev_f, **ev_b}
    profile = view.profile if at_init else None  # the profile predicts the initial state
    if "forward_layer" in ev_f:
        evidence["predicted_forward_ratio"] = predicted_ratio(
            profile, "predicted_forward_var_cumulative", ev_f["forward_layer"],
            ev_f["forward_reference"])
    if "backward_layer" in ev_b:
        evidence["predicted_backward_ratio"] = predicted_ratio(
            profile, "predicted_backward_var_cumulative", ev_b["backward_layer"],
            ev_b["backward_reference"])
    predicted_factor = predicted_layer_factor(profile)
    evidence["predicted_per_layer_factor"] = predicted_factor
    layers = tuple(table["layer"][flag_f | flag_b])
    extremes = [r for r in (ev_f.get("forward_ratio"), ev_b.get("backward_ratio")) if r is not None]
    worst = min(extremes) if vanishing else max(extremes)
    severe = worst < threshold ** SEVERE_RATIO_POWER if vanishing else \
        worst > threshold ** SEVERE_RATIO_POWER
    factor = predicted_factor if _finite(predicted_factor) else (factor_f or factor_b)
    suggestion = _scale_suggestion(kind, at_init, factor, view)
    message = f"{kind.value} {'at initialization' if at_init else f'at step {step}'} in " \
              f"{span(layers)}: {_scale_sentence(evidence, vanishing)}"
    return Finding(kind, step, layers, _severity(severe), evidence, suggestion, message)


def _scale_sentence(ev, vanishing):
    verb = "falls" if vanishing else "grows"
    parts = []
    if "forward_ratio" in ev:
        parts.append(f"the forward variance {verb} to {_g(ev['forward_ratio'])}x "
                     f"{ev['forward_reference']}'s at {ev['forward_layer']}"
                     + (f" (the recursion predicts {_g(ev['predicted_forward_ratio'])}x)"
                        if ev.get("predicted_forward_ratio") is not None else ""))
    if "backward_ratio" in ev:
        parts.append(f"the gradient variance at {ev['backward_layer']} is "
                     f"{_g(ev['backward_ratio'])}x {ev['backward_reference']}'s"
                     + (f" (predicted {_g(ev['predicted_backward_ratio'])}x)"
                        if ev.get("predicted_backward_ratio") is not None else ""))
    text = "; ".join(parts) + f" (threshold {ev['threshold']:g})"
    if ev.get("predicted_per_layer_factor") is not None:
        text += f"; fan_in Var[W] c_f = {_g(ev['predicted_per_layer_factor'])} per layer"
    return text


def _scale_suggestion(kind, at_init, factor, view):
    if not at_init:
        return training_suggestion(view, "the scale grew during training, not at "
                                         "initialization")
    low, high = MATCHED_FACTOR_BAND
    if kind is Kind.VANISHING and view.activation == "sigmoid":
        changes, text = sg.matched_init("tanh")
        return Suggestion({"activation": "tanh", **changes},
                          "A sigmoid passes back at most 1/16 of the gradient variance per layer "
                          f"(sigmoid'(0)^2 = 1/16): use tanh with {text}.")
    if _finite(factor) and low <= factor <= high and view.context.batch_norm_layers:
        return Suggestion({}, f"The initializer already keeps fan_in Var[W] c_f = {_g(factor)} "
                              "per layer and the network already has batch normalization: what "
                              "is lost comes from the architecture between them (zero padding, "
                              "pooling, unnormalized branches). No setting fixes it; check how "
                              "the signal changes with fewer layers.")
    if _finite(factor) and low <= factor <= high:
        return Suggestion(sg.normalization("batch"),
                          f"The initializer already keeps fan_in Var[W] c_f = {_g(factor)} per "
                          "layer; what is lost comes from depth (zero padding, one draw's "
                          "drift): re-normalize each layer with batch normalization before its "
                          "activation.")
    vanishing = kind is Kind.VANISHING
    if _finite(factor) and (factor > high if vanishing else factor < low):
        cause = _cause(view, (Kind.UNNORMALIZED_INPUT,))
        if cause is not None:
            return deferred(cause)
        return Suggestion({}, f"The initializer's scale (fan_in Var[W] c_f = {_g(factor)} per "
                              f"layer) would make the signal {'grow' if vanishing else 'shrink'}"
                              ", so it is not the cause: the loss comes from elsewhere (a gate "
                              "or a branch between these layers, the architecture); no "
                              "initializer fixes it.")
    direction = "too small" if vanishing else "too large"
    return init_suggestion(view.activation,
                           f"The initial weights are {direction} for this activation (variance "
                           f"x{_g(factor)} per layer instead of x1)")


# --------------------------------------------------------------------------------------------
# per-unit statistics: saturation and dead units

def _fractions(rows, column, threshold, reported):
    fractions = rows[column].to_numpy(float)
    with np.errstate(invalid="ignore"):
        mask = (fractions >= threshold) & ~rows["layer"].isin(reported).to_numpy()
    return {str(name): float(v) for name, v in zip(rows["layer"][mask], fractions[mask])}


def predicted_saturation(profile):
    """Median over the profile's tanh/sigmoid weight layers of P(|y| > y_sat) for Gaussian
    pre-activations y ~ N(0, forward_var): erfc(y_sat / sqrt(2 Var[y])), y_sat = atanh(0.97) for
    tanh, ln(0.97/0.03) for sigmoid. None without such layers."""
    if profile is None:
        return None
    values = []
    for act, var in zip(profile["activation"], profile["forward_var"].to_numpy(float)):
        bound = _SATURATION_PRE_ACTIVATION.get(act)
        if bound is not None and math.isfinite(var) and var > 0:
            values.append(math.erfc(bound / math.sqrt(2.0 * var)))
    return float(np.median(values)) if values else None


def saturation(rows, step, at_init, view, reported):
    """Most outputs of a tanh/sigmoid layer at its flat ends: their gradient is ~0."""
    threshold = SATURATED_FRACTION if at_init else SATURATED_SEVERE
    fractions = _fractions(rows, "saturated_fraction", threshold, reported)
    if not fractions:
        return None
    worst = max(fractions.values())
    evidence = {"threshold": threshold, "saturated_fraction": fractions,
                "max_saturated_fraction": worst,
                "predicted_saturated_fraction": predicted_saturation(view.profile)
                if at_init else None}
    activation = view.activation if view.activation in _SATURATION_PRE_ACTIVATION else "tanh"
    if at_init:
        suggestion = init_suggestion(activation, "The initial weights are too large: the "
                                     "pre-activations are far beyond the linear range")
    else:
        suggestion = training_suggestion(view, "the units saturated during training")
    predicted = evidence["predicted_saturated_fraction"]
    message = (f"saturation {'at initialization' if at_init else f'at step {step}'} in "
               f"{span(fractions)}: up to {worst:.0%} of the outputs saturated (threshold "
               f"{threshold:.0%})"
               + (f"; Gaussian pre-activations of the profile's variance predict {predicted:.0%}"
                  if predicted is not None else ""))
    return Finding(Kind.SATURATION, step, tuple(fractions), _severity(worst >= SATURATED_SEVERE),
                   evidence, suggestion, message)


def dead_units(rows, step, at_init, view, reported):
    """Most outputs of a layer exactly zero on the probe (dead ReLUs pass no gradient)."""
    fractions = _fractions(rows, "zero_fraction", DEAD_FRACTION, reported)
    if not fractions:
        return None
    worst = max(fractions.values())
    evidence = {"threshold": DEAD_FRACTION, "zero_fraction": fractions,
                "max_zero_fraction": worst, "expected_zero_fraction": 0.5}
    suggestion = _revive_units() if at_init else _dead_in_training(view)
    message = (f"dead units {'at initialization' if at_init else f'at step {step}'} in "
               f"{span(fractions)}: up to {worst:.0%} of the outputs are exactly zero on the probe "
               f"(threshold {DEAD_FRACTION:.0%}; a ReLU of symmetric pre-activations gives 50%)")
    return Finding(Kind.DEAD_UNITS, step, tuple(fractions), _severity(worst >= DEAD_SEVERE),
                   evidence, suggestion, message)


def _revive_units(why="Most units are off from the start"):
    return Suggestion({"activation": "leaky_relu", "init": "kaiming_normal"},
                      f"{why}: leaky ReLU keeps a gradient on the negative side, with Kaiming's "
                      "gain 2/((1 + a^2) fan_in).")


def _dead_in_training(view):
    """Units that died during training: an earlier vanishing signal or unnormalized input is
    the cause (a signal near 0 at depth leaves the pre-activations at the biases, which a few
    updates push below zero); else large updates (a smaller learning rate), unless the
    measured updates are already small, where a smaller rate would not help."""
    cause = _cause(view, (Kind.UNNORMALIZED_INPUT, Kind.VANISHING))
    if cause is not None:
        return deferred(cause)
    ratio = view.update_ratio_per_step
    if _finite(ratio) and ratio <= sg.UPDATE_RATIO_TARGET:
        return _revive_units(f"The updates are small (measured ||dW||/||W|| {_g(ratio)} "
                             f"per step, target about {sg.UPDATE_RATIO_TARGET:g}), so a smaller "
                             "learning rate would not bring the units back")
    return lr_suggestion(view, "large updates pushed the units' pre-activations below zero "
                               "for every input")


# --------------------------------------------------------------------------------------------
# divergence

_FORWARD_FIELDS = ("activation_mean", "activation_std")


def nonfinite_mask(rows):
    """Records with non-finite values: NaN/Inf counts > 0, or a forward statistic or the
    activation gradient's std not finite (a std can overflow float32 before any value does)."""
    counts = rows[["nan_count", "inf_count"]].to_numpy(float)
    stats = rows[list(_FORWARD_FIELDS) + ["activation_grad_std"]].to_numpy(float)
    return (np.nan_to_num(counts, nan=1.0) > 0).any(axis=1) | ~np.isfinite(stats).all(axis=1)


def first_nonfinite_layer(rows):
    """Where non-finite values first appear: the first layer in model order whose forward
    statistics are not finite (everything after it inherits them); else, when only gradients
    are affected, the last layer whose activation gradient is not finite (the backward pass
    runs from the output); else the first layer with a NaN/Inf count."""
    rows = rows.sort_values("layer_index")
    forward = ~np.isfinite(rows[list(_FORWARD_FIELDS)].to_numpy(float)).all(axis=1)
    if forward.any():
        return str(rows["layer"].iloc[int(np.argmax(forward))]), "forward"
    backward = ~np.isfinite(rows["activation_grad_std"].to_numpy(float))
    if backward.any():
        return str(rows["layer"].iloc[len(backward) - 1 - int(np.argmax(backward[::-1]))]), \
            "backward"
    mask = nonfinite_mask(rows)
    return str(rows["layer"].iloc[int(np.argmax(mask))]), "counts"


def divergence(rows, step, loss_step, view):
    """Non-finite loss or statistics. `rows`: the records of the first logged step with
    non-finite values (None when only the loss shows it); `loss_step`: the first step with a
    non-finite loss (or None)."""
    first = min(s for s in (step, loss_step) if s is not None)
    evidence = {"first_nonfinite_loss_step": loss_step, "first_nonfinite_record_step": step,
                "lr": view.context.lr}
    layers = ()
    where = "the loss became non-finite (no layer statistics logged since)"
    if rows is not None:
        layer, direction = first_nonfinite_layer(rows)
        row = rows[rows["layer"].astype(str) == layer].iloc[0]
        layers = (layer,)
        evidence.update({"first_nonfinite_layer": layer, "direction": direction,
                         "nan_count": row["nan_count"], "inf_count": row["inf_count"],
                         "activation_std": row["activation_std"]})
        where = (f"non-finite values first appear at {layer} "
                 f"({'forward' if direction == 'forward' else direction} pass, step {step})")
    exploding_at_init = next((f for f in view.earlier
                              if f.kind is Kind.EXPLODING and f.step == 0), None)
    if exploding_at_init is not None and not _cause(view, (Kind.UNNORMALIZED_INPUT,)):
        suggestion = deferred(exploding_at_init)
    else:
        suggestion = training_suggestion(view, "the updates are too large for this network")
    message = f"divergence from step {first}: {where}"
    return Finding(Kind.DIVERGENCE, first, layers, Severity.SEVERE, evidence, suggestion,
                   message)


# --------------------------------------------------------------------------------------------
# the loss

def first_stall(steps, losses, num_classes):
    """(step, since) of the first step at which the smoothed loss has stayed within
    `STALL_TOLERANCE` of ln(num_classes) for `STALL_STEPS` steps, or None."""
    steps = np.asarray(steps, dtype=float)
    if len(steps) == 0:
        return None
    smoothed = pd.Series(np.asarray(losses, dtype=float)).rolling(
        STALL_SMOOTHING, min_periods=1).median().to_numpy()
    with np.errstate(invalid="ignore"):
        ok = np.abs(smoothed - math.log(num_classes)) <= STALL_TOLERANCE
    index = np.arange(len(ok))
    run_start = np.maximum.accumulate(np.where(~ok, index, -1)) + 1
    run_start = np.minimum(run_start, len(ok) - 1)
    hit = ok & (steps - steps[run_start] >= STALL_STEPS)
    if not hit.any():
        return None
    i = int(np.argmax(hit))
    return int(steps[i]), int(steps[run_start[i]])


def stalled_loss(steps, losses, view):
    """The loss sits at ln(num_classes), the loss of a uniform prediction: nothing is learned."""
    num_classes = view.context.num_classes
    if num_classes is None or num_classes < 2:
        return None
    found = first_stall(steps, losses, num_classes)
    if found is None:
        return None
    step, since = found
    chance = math.log(num_classes)
    evidence = {"chance_loss": chance, "tolerance": STALL_TOLERANCE, "since_step": since,
                "window_steps": STALL_STEPS, "update_ratio_per_step": view.update_ratio_per_step}
    cause = _cause(view, (Kind.VANISHING, Kind.SATURATION, Kind.DEAD_UNITS,
                          Kind.UNNORMALIZED_INPUT, Kind.EXPLODING, Kind.SMALL_BATCH_NORM))
    if cause is not None:
        evidence["cause"] = cause.kind.value
        suggestion = deferred(cause, "explains it")
    elif _finite(view.update_ratio_per_step) and view.update_ratio_per_step < SLOW_UPDATE_RATIO \
            and view.context.lr is not None:
        new = sg.raised_lr(view.context.lr)
        suggestion = Suggestion({"lr": new}, f"The weights hardly move (||dW||/||W|| "
                                             f"{_g(view.update_ratio_per_step)} per step, below "
                                             f"{SLOW_UPDATE_RATIO:g}): raise the learning rate "
                                             f"from {view.context.lr:g} to {new:g}.")
    else:
        suggestion = Suggestion({}, "The layer statistics show no cause: check that the labels "
                                    "belong to the inputs and that the data are shuffled.")
    message = (f"stalled loss: within {STALL_TOLERANCE} of ln({num_classes}) = {chance:.4f}, "
               f"the loss of a uniform guess, from step {since} to step {step}")
    return Finding(Kind.STALLED_LOSS, step, (), Severity.SEVERE, evidence, suggestion, message)


# --------------------------------------------------------------------------------------------
# the run's context

def unnormalized_input(second_moment, step, first_layer, view):
    """The first weight layer's input has E[x^2] far from 1: every initializer scales Var[y_1] =
    fan_in Var[W] E[x^2] for E[x^2] = 1, so the whole net starts off by that factor."""
    low, high = INPUT_MOMENT_BAND
    if not _finite(second_moment) or low <= second_moment <= high:
        return None
    ctx = view.context
    evidence = {"input_second_moment": second_moment, "input_mean": ctx.input_mean,
                "input_std": ctx.input_std, "band": list(INPUT_MOMENT_BAND)}
    severe = not INPUT_MOMENT_SEVERE[0] <= second_moment <= INPUT_MOMENT_SEVERE[1]
    stats = "" if ctx.input_mean is None or ctx.input_std is None else \
        f" (mean {ctx.input_mean:.3g}, std {ctx.input_std:.3g})"
    own = ", ".join(ctx.input_layers)
    if own and second_moment < low:   # the model's own rescaling shrinks normalized inputs
        suggestion = Suggestion(sg.input_normalization(model_rescales=True),
                                f"The model's own input layers ({own}) rescale the input for "
                                "the range they were built for (keras.applications: pixels "
                                "in [0, 255]); feed it that range, not normalized first.")
    else:
        suggestion = Suggestion(sg.input_normalization(),
                                "Normalize the inputs per channel: x -> (x - mean_c) / std_c, "
                                "so E[x^2] = 1 as the initializers assume.")
    after = f" after the model's own input layers ({own})" if own else ""
    message = (f"unnormalized input at {first_layer or 'the first layer'}: E[x^2] = "
               f"{second_moment:.3g}{stats}{after}, outside [{low:g}, {high:g}]: the first "
               f"layer's variance starts x{second_moment:.3g} off")
    layers = (first_layer,) if first_layer else ()
    return Finding(Kind.UNNORMALIZED_INPUT, step, layers, _severity(severe), evidence,
                   suggestion, message)


def small_batch_norm(step, view):
    """Batch normalization estimates each channel's mean and variance from the batch; with B
    images the variance estimate's relative standard error is about sqrt(2 / (B - 1)) (the
    pixels of one image are correlated, so images count, not pixels)."""
    ctx = view.context
    if not ctx.batch_norm_layers or ctx.batch_size is None or ctx.batch_size >= SMALL_BATCH:
        return None
    b = ctx.batch_size
    rel_error = math.sqrt(2.0 / (b - 1)) if b > 1 else math.inf
    evidence = {"batch_size": b, "threshold": SMALL_BATCH,
                "batch_norm_layers": len(ctx.batch_norm_layers),
                "variance_relative_error": rel_error}
    suggestion = Suggestion(sg.normalization("group"),
                            "Use group normalization (Wu & He 2018): it normalizes each sample "
                            "over groups of channels, independent of the batch size.")
    message = (f"small batch for batch normalization: batch size {b} < {SMALL_BATCH} in "
               f"{span(ctx.batch_norm_layers)}; the batch variance is off by about "
               f"{rel_error:.0%} (sqrt(2/(B-1)))")
    return Finding(Kind.SMALL_BATCH_NORM, step, ctx.batch_norm_layers,
                   _severity(b < SMALL_BATCH_SEVERE), evidence, suggestion, message)
