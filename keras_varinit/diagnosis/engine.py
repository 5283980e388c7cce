"""The engine: feeds the statistics of a run to the rules, in step order, and keeps each finding
once per kind and layer.

`Diagnoser` is incremental (the live callback feeds it as `fit()` logs); `diagnose` runs it once
over a finished run. Both give the same findings for the same data: each rule looks only at data
up to the step it reports.

Order of evaluation, per `update`:

1. the context (first update only): unnormalized input, batch normalization with a small batch;
2. per new logged step, in order: divergence (non-finite statistics, or any step at or after
   the first non-finite loss: the statistics after it mean nothing, so no other rule runs
   again); else exploding, and at initialization (step 0) vanishing; saturation; dead units.
   Initialization is the step-0 records, else the profile's measurement;
3. the loss: a stalled loss.

`finish()` adds what only the end of the data can tell: a divergence seen in the loss alone.
"""
import math

import numpy as np
import pandas as pd

from keras_varinit.diagnosis import rules
from keras_varinit.diagnosis.findings import Context, Kind

#: The record fields the rules read (CONTRIBUTING.md, "Layer statistics record").
USED_FIELDS = ("step", "layer", "layer_index", "layer_type", "activation_mean", "activation_std",
               "zero_fraction", "saturated_fraction", "activation_grad_std", "weight_std",
               "update_ratio", "nan_count", "inf_count")
_NUMERIC_FIELDS = USED_FIELDS[4:]
#: Columns the profile needs (a subset of `diagnostics.COLUMNS`).
PROFILE_COLUMNS = ("layer", "activation", "fan_in", "weight_var", "input_second_moment",
                   "forward_var", "backward_var", "predicted_forward_var_cumulative",
                   "predicted_backward_var_cumulative")
_ACTIVATION_LAYER_TYPES = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "ELU": "elu"}


def records_frame(records):
    """Layer statistics records (list of dicts, or a DataFrame) as a DataFrame; null -> NaN."""
    frame = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    if frame.empty:
        return pd.DataFrame(columns=list(USED_FIELDS))
    missing = [c for c in USED_FIELDS if c not in frame.columns]
    if missing:
        raise ValueError(f"Layer statistics records lack the fields {missing}. Received: "
                         f"fields {sorted(frame.columns)}. Allowed: LayerStatsLogger records")
    for field in _NUMERIC_FIELDS:
        frame[field] = pd.to_numeric(frame[field], errors="coerce").astype("float64")
    return frame


def losses_frame(losses):
    """The loss history: (step, loss) pairs, dicts with "step" and "loss", or a DataFrame."""
    if isinstance(losses, pd.DataFrame):
        frame = losses
    else:
        items = list(losses)
        frame = pd.DataFrame(items) if items and isinstance(items[0], dict) else \
            pd.DataFrame(items, columns=["step", "loss"])
    if frame.empty:
        return pd.DataFrame({"step": pd.Series(dtype=float), "loss": pd.Series(dtype=float)})
    if not {"step", "loss"} <= set(frame.columns):
        raise ValueError("The loss history needs the fields step and loss. Received: fields "
                         f"{sorted(frame.columns)}")
    return pd.DataFrame({"step": pd.to_numeric(frame["step"]).astype(float),
                         "loss": pd.to_numeric(frame["loss"], errors="coerce").astype(float)})


def _check_profile(profile):
    if profile is None:
        return None
    if not isinstance(profile, pd.DataFrame):
        raise ValueError("`profile` must be the DataFrame of kv.variance_profile or None. "
                         f"Received: {type(profile).__name__}")
    missing = [c for c in PROFILE_COLUMNS if c not in profile.columns]
    if missing:
        raise ValueError(f"`profile` lacks the columns {missing}. Received: columns "
                         f"{list(profile.columns)}. Allowed: kv.variance_profile's DataFrame")
    return profile.reset_index(drop=True)


class Diagnoser:
    """Incremental diagnosis of one run.

    Args:
        profile: `kv.variance_profile`'s DataFrame at initialization, or None. It gives the
            predicted values of the evidence, and the initialization's measurement when the
            records have no step 0.
        context: a `Context` (number of classes, batch size, batch norm layers, activation,
            learning rate, input statistics), or None.
        earlier: findings already reported for this run (a resumed run's `findings.jsonl`):
            they are not reported again, and they explain later findings as their own would.
        previous_log_step: the step of the log the first record's `update_ratio` compares
            with (a resumed logger's `resumed_from_step`), or None (that ratio is null).

    `update(records, losses)` takes the new records (complete logged steps, in step order) and
    the new (step, loss) values and returns the new findings; `finish()` closes the run;
    `findings` holds every finding so far.

    Example:

    >>> engine = Diagnoser(context=Context(num_classes=10, activation="relu"))
    >>> engine.update(logger.history[:59], [(0, 2.3026)])   # doctest: +SKIP
    [Finding(kind=<Kind.VANISHING: 'vanishing'>, step=0, layers=('conv_01', ...), ...)]
    """

    def __init__(self, profile=None, context=None, earlier=(), previous_log_step=None):
        if context is not None and not isinstance(context, Context):
            raise ValueError("`context` must be a keras_varinit.diagnosis.Context or None. "
                             f"Received: {type(context).__name__}")
        self.profile = _check_profile(profile)
        self.view = rules.RunView(context or Context(), self.profile)
        self.findings = self.view.earlier
        self._reported = {kind: set() for kind in Kind}
        self._last_step = None
        self._first_layer = None
        self._started = False
        self._init_seen = False
        self._diverged = False
        self._bad_loss_step = None
        self._loss_steps = []
        self._loss_values = []
        self._prev_weights_step = previous_log_step
        for finding in earlier:
            self._emit(finding, [])

    # -- public -------------------------------------------------------------------------------

    def update(self, records=(), losses=()):
        """Feed new records and losses; returns the findings they produce (also in `findings`)."""
        frame = records_frame(records)
        self._add_losses(losses_frame(losses))
        new = []
        steps = sorted(s for s in frame["step"].unique() if self._last_step is None
                       or s > self._last_step)
        if not self._started:
            self._start(frame, steps, new)
        for step in steps:
            rows = frame[frame["step"] == step].sort_values("layer_index")
            self._step(int(step), rows, new)
            self._last_step = step
        self._loss_rules(new)
        return new

    def finish(self):
        """End of the run: rules that need all the data (a divergence in the loss alone)."""
        new = []
        if not self._started:
            self._start(records_frame(()), [], new)
        if not self._diverged and self._bad_loss_step is not None:
            self._emit(rules.divergence(None, None, self._bad_loss_step, self.view), new)
            self._diverged = True
        return new

    # -- steps --------------------------------------------------------------------------------

    def _start(self, frame, steps, new):
        self._started = True
        first_step = int(steps[0]) if steps else 0
        table = None
        if steps and steps[0] == 0:
            table = rules.weight_table_from_records(frame[frame["step"] == 0])
        elif self.profile is not None:
            table = rules.weight_table_from_profile(self.profile)
        if table is not None and len(table):
            self._first_layer = table["layer"].iloc[0]
        self.view.activation = self._activation(frame)
        self._emit(rules.unnormalized_input(self._input_moment(), first_step, self._first_layer,
                                            self.view), new)
        self._emit(rules.small_batch_norm(first_step, self.view), new)
        if (not steps or steps[0] != 0) and self.profile is not None:
            self._init_seen = True
            self._scale_rules(rules.weight_table_from_profile(self.profile), 0, True, new)

    def _step(self, step, rows, new):
        if self._diverged:
            return
        self._track_update_ratio(step, rows)
        bad_rows = rules.nonfinite_mask(rows).any()
        if bad_rows or (self._bad_loss_step is not None and step >= self._bad_loss_step):
            self._emit(rules.divergence(rows if bad_rows else None, step, self._bad_loss_step,
                                        self.view), new)
            self._diverged = True
            return
        at_init = step == 0 and not self._init_seen
        self._init_seen = self._init_seen or step == 0
        table = rules.with_profile_stretches(rules.weight_table_from_records(rows), self.profile)
        self._scale_rules(table, step, at_init, new)
        for rule in (rules.saturation, rules.dead_units):
            kind = Kind.SATURATION if rule is rules.saturation else Kind.DEAD_UNITS
            self._emit(rule(rows, step, at_init, self.view, self._reported[kind]), new)

    def _scale_rules(self, table, step, at_init, new):
        kinds = (Kind.VANISHING, Kind.EXPLODING) if at_init else (Kind.EXPLODING,)
        for kind in kinds:
            self._emit(rules.scale_rule(kind, table, step, at_init, self.view,
                                        self._reported[kind]), new)

    def _loss_rules(self, new):
        if self._reported[Kind.STALLED_LOSS] or not self._loss_steps:
            return
        end = len(self._loss_steps)
        if self._bad_loss_step is not None:
            end = int(np.searchsorted(self._loss_steps, self._bad_loss_step))
        self._emit(rules.stalled_loss(self._loss_steps[:end], self._loss_values[:end],
                                      self.view), new)

    # -- bookkeeping ------------------------------------------------------------------------

    def _emit(self, finding, new):
        if finding is None:
            return
        reported = self._reported[finding.kind]
        keys = finding.layers or ("",)
        if all(k in reported for k in keys):
            return
        reported.update(keys)
        self.findings.append(finding)
        new.append(finding)

    def _add_losses(self, frame):
        for step, loss in zip(frame["step"], frame["loss"]):
            if self._loss_steps and step <= self._loss_steps[-1]:
                continue
            self._loss_steps.append(float(step))
            self._loss_values.append(float(loss))
            if self._bad_loss_step is None and not math.isfinite(loss):
                self._bad_loss_step = int(step)

    def _track_update_ratio(self, step, rows):
        """The update ratio per step at the first logged update (before any blow-up compounds):
        median over weight layers of ||W_now - W_prev|| / ||W_prev||, over the steps between."""
        if self.view.update_ratio_per_step is None and self._prev_weights_step is not None:
            ratios = rows["update_ratio"].to_numpy(float)
            ratios = ratios[np.isfinite(ratios)]
            gap = step - self._prev_weights_step
            if len(ratios) and gap > 0:
                self.view.update_ratio_per_step = float(np.median(ratios)) / gap
        self._prev_weights_step = step

    def _input_moment(self):
        if self.profile is not None and len(self.profile):
            value = float(self.profile["input_second_moment"].iloc[0])
            if math.isfinite(value):
                return value
        return self.view.context.input_second_moment

    def _activation(self, frame):
        """The hidden layers' activation: the context's, else the profile's most common
        non-linear one, else one named by an activation layer's type (ReLU, LeakyReLU, ELU)."""
        if self.view.context.activation is not None:
            return self.view.context.activation
        if self.profile is not None:
            acts = [a for a in self.profile["activation"] if a not in ("linear", "softmax")]
            if acts:
                return max(set(acts), key=acts.count)
        types = [_ACTIVATION_LAYER_TYPES[t] for t in frame.get("layer_type", ())
                 if t in _ACTIVATION_LAYER_TYPES]
        return max(set(types), key=types.count) if types else None


def diagnose(records=(), losses=(), profile=None, context=None):
    """All findings of a run: `Diagnoser(profile, context)`, one `update`, `finish`.

    Args:
        records: layer statistics records (`LayerStatsLogger.history`, its JSON lines, or
            `to_dataframe()`).
        losses: the loss history: (step, loss) pairs, {"step", "loss"} dicts or a DataFrame.
        profile: `kv.variance_profile`'s DataFrame at initialization, or None.
        context: a `Context`, or None.

    Returns:
        A list of `Finding`s in the order they were found (by step).

    Example:

    >>> findings = diagnose(logger.history, losses, profile=df,
    ...                     context=Context(num_classes=10, activation="relu", lr=0.01))
    """
    engine = Diagnoser(profile, context)
    engine.update(records, losses)
    engine.finish()
    return list(engine.findings)
