"""The diagnosis engine on hand-made records: each rule at its threshold's edges, the finding
types, the engine's bookkeeping. Plain Python: runs the same on every backend."""
import json
import math
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from keras_varinit.diagnosis import (
    KINDS, NORMALIZATION_FIELD, NORMALIZATION_VALUES, Context, Diagnoser, Finding, Kind,
    Severity, Suggestion, diagnose, findings_dataframe, read_findings, suggestions,
    write_findings,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
LN10 = math.log(10)


# -- hand-made records -------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _clear_session():
    """These tests build no Keras object: no session to clear (overrides conftest's)."""
    yield


def chain(step=0, fwd=(1.0, 1.0, 1.0, 1.0), grad=(1.0, 1.0, 1.0, 1.0), zero=0.5, sat=0.0,
          update=None, **overrides):
    """Records of a plain chain dense_01 -> act_01 -> ... -> logits: one weight record per
    `fwd` entry (std of its output, `grad`: std of dL/d output), an activation record after
    every weight layer but the last. `zero`/`sat`: a number or a per-activation list.
    `overrides`: {layer: {field: value}}."""
    n = len(fwd)
    zero = [zero] * (n - 1) if np.isscalar(zero) else list(zero)
    sat = [sat] * (n - 1) if np.isscalar(sat) else list(sat)
    rows = []
    for i in range(n):
        name = "logits" if i == n - 1 else f"dense_{i + 1:02d}"
        rows.append({"step": step, "epoch": 0, "layer": name, "layer_type": "Dense",
                     "activation_mean": 0.0, "activation_std": fwd[i], "zero_fraction": 0.0,
                     "saturated_fraction": 0.0, "activation_grad_std": grad[i],
                     "weight_std": 0.1, "weight_grad_std": 1e-3,
                     "update_ratio": None if step == 0 else update, "nan_count": 0,
                     "inf_count": 0})
        if i < n - 1:
            rows.append({"step": step, "epoch": 0, "layer": f"act_{i + 1:02d}",
                         "layer_type": "Activation", "activation_mean": 0.3,
                         "activation_std": fwd[i] / 2, "zero_fraction": zero[i],
                         "saturated_fraction": sat[i], "activation_grad_std": grad[i],
                         "weight_std": None, "weight_grad_std": None, "update_ratio": None,
                         "nan_count": 0, "inf_count": 0})
    for k, row in enumerate(rows):
        row["layer_index"] = k
        row.update(overrides.get(row["layer"], {}))
    return rows


def kinds(findings):
    return [f.kind.value for f in findings]


def one(findings, kind):
    found = [f for f in findings if f.kind == kind]
    assert len(found) == 1, (kind, kinds(findings))
    return found[0]


def profile_frame(factor=0.5, n=4, first_m2=1.0):
    """A `variance_profile`-like table of a ReLU chain of width 100 whose layers multiply the
    variance by `factor` (fan_in Var[W] c_f)."""
    weight_var = 2 * factor / 100
    rows = []
    for i in range(n):
        rows.append({"layer": "logits" if i == n - 1 else f"dense_{i + 1:02d}",
                     "activation": "linear" if i == n - 1 else "relu", "fan_in": 100,
                     "weight_var": weight_var, "input_second_moment": first_m2 if i == 0 else 1,
                     "forward_var": factor ** i, "backward_var": 1.0,
                     "predicted_forward_var_cumulative": factor ** i,
                     "predicted_backward_var_cumulative": 1.0})
    return pd.DataFrame(rows)


def std_for(ratio):
    """The std whose variance is `ratio` times that of a std-1 reference."""
    return math.sqrt(ratio)


# -- the typed values --------------------------------------------------------------------------

def test_kind_strings_are_the_contract():
    assert KINDS == ("vanishing", "exploding", "dead_units", "saturation", "divergence",
                     "stalled_loss", "unnormalized_input", "small_batch_norm")
    assert Kind.VANISHING == "vanishing" and str(Kind.DEAD_UNITS) == "dead_units"
    assert {s.value for s in Severity} == {"warning", "severe"}


def test_finding_round_trips_through_json(tmp_path):
    finding = Finding("vanishing", 0, ["conv_01", "conv_02"], "severe",
                      {"ratio": np.float32(1e-9), "missing": float("nan"), "layers": ("a",)},
                      Suggestion({"init": "kaiming_normal"}, "use Kaiming"), "message")
    assert finding.kind is Kind.VANISHING and finding.layers == ("conv_01", "conv_02")
    data = json.loads(json.dumps(finding.to_dict(), allow_nan=False))
    assert data["evidence"]["missing"] is None and data["kind"] == "vanishing"
    assert set(data) >= {"kind", "step", "layers", "severity", "evidence", "suggestion"}
    back = Finding.from_dict(data)
    assert back.to_dict() == finding.to_dict()
    path = tmp_path / "run" / "findings.jsonl"
    write_findings(path, [finding])
    write_findings(path, [back])
    with open(path, "a") as f:
        f.write('{"kind": "vanish')  # a line still being written
    assert [f.to_dict() for f in read_findings(path)] == [finding.to_dict()] * 2
    frame = findings_dataframe(read_findings(path))
    assert list(frame.columns) == ["kind", "step", "layers", "severity", "message",
                                   "suggestion", "changes"]
    assert frame["layers"][0] == "conv_01, conv_02"


def test_bad_values_say_what_was_received():
    with pytest.raises(ValueError, match="Received: kind="):
        suggestions.normalization("layer_norm")
    with pytest.raises(ValueError, match="batch_size=0"):
        Context(batch_size=0)
    with pytest.raises(ValueError, match="lr=-1"):
        Context(lr=-1)
    with pytest.raises(ValueError, match="num_classes=True"):
        Context(num_classes=True)
    with pytest.raises(ValueError, match="Received: dict"):
        Diagnoser(context={"batch_size": 2})
    with pytest.raises(ValueError, match="lacks the columns"):
        Diagnoser(profile=pd.DataFrame({"layer": ["a"]}))
    with pytest.raises(ValueError, match="lack the fields"):
        diagnose([{"step": 0, "layer": "a"}])
    with pytest.raises(ValueError, match="step and loss"):
        diagnose(losses=pd.DataFrame({"iteration": [1]}))
    with pytest.raises(ValueError, match="Allowed: 'a', 'w'"):
        write_findings("x.jsonl", [], mode="r")


def test_suggestion_apply_and_the_one_place_of_the_normalization_field():
    s = Suggestion(suggestions.normalization("group"), "group norm")
    assert s.apply({"normalization": "batch", "lr": 0.1}) == {
        "normalization": "group", "lr": 0.1}
    assert (NORMALIZATION_FIELD, NORMALIZATION_VALUES["group"]) == ("normalization", "group")
    assert NORMALIZATION_FIELD in suggestions.CONFIG_FIELDS


def _every_suggested_change():
    """Each change the rules can propose (suggestions' helpers and the rules' literal ones)."""
    yield from (suggestions.matched_init(a)[0] for a in
                ("relu", "leaky_relu", "elu", "tanh", "selu", "sigmoid", None))
    yield suggestions.normalization("batch")
    yield suggestions.normalization("group")
    yield suggestions.input_normalization()
    yield suggestions.input_normalization(model_rescales=True)
    yield {"lr": suggestions.lowered_lr(10.0, 2.1)}
    yield {"lr": suggestions.raised_lr(0.01)}
    yield {"activation": "leaky_relu", "init": "kaiming_normal"}


def test_every_suggestion_is_a_valid_train_config_change():
    """"Apply and re-run" is TrainConfig.from_dict(suggestion.apply(config)): every field a
    suggestion names is a TrainConfig field, and every value it proposes validates."""
    from keras_varinit.training import TrainConfig

    names = set(TrainConfig().to_dict())
    assert set(suggestions.CONFIG_FIELDS) <= names
    base = TrainConfig(model="cnn", depth=4, width=16, init="xavier_normal", lr=10.0,
                       input_normalization="none", data="synthetic").to_dict()
    for changes in _every_suggested_change():
        assert set(changes) <= set(suggestions.CONFIG_FIELDS), changes
        fixed = TrainConfig.from_dict(Suggestion(changes, "").apply(base)).validate()
        assert {k: getattr(fixed, k) for k in changes} == changes


@pytest.mark.parametrize("activation, changes", [
    ("relu", {"init": "kaiming_normal"}),
    ("leaky_relu", {"init": "kaiming_normal"}),
    ("tanh", {"init": "xavier_normal_tanh"}),
    ("sigmoid", {"init": "xavier_normal"}),
    (None, {"init": "xavier_normal"}),
    ("selu", {"init": "lecun_normal"}),
])
def test_matched_init(activation, changes):
    assert suggestions.matched_init(activation)[0] == changes


@pytest.mark.parametrize("lr, ratio, expected", [
    (10.0, 2.1, 1e-3),      # 10 * 1e-3 / 2.1 = 4.8e-3 -> a power of ten below
    (10.0, None, 1.0),      # unmeasured: 10x
    (0.01, 1e-9, 1e-3),     # already slow: still at least 10x
    (1.0, 100.0, 1e-4),     # at most 10^4 x
    (None, 1.0, None),
])
def test_lowered_lr(lr, ratio, expected):
    new = suggestions.lowered_lr(lr, ratio)
    assert new == expected if expected is None else math.isclose(new, expected)


# -- vanishing / exploding ---------------------------------------------------------------------

@pytest.mark.parametrize("ratio, found", [(0.99e-3, True), (1.01e-3, False)])
def test_vanishing_forward_edge(ratio, found):
    records = chain(fwd=(1.0, 0.5, std_for(ratio), 1.0))
    found_kinds = kinds(diagnose(records))
    assert ("vanishing" in found_kinds) is found
    if found:
        f = one(diagnose(records), "vanishing")
        assert f.step == 0 and f.layers == ("dense_03",)
        assert math.isclose(f.evidence["forward_ratio"], ratio, rel_tol=1e-9)
        assert f.evidence["forward_reference"] == "dense_01"


@pytest.mark.parametrize("ratio, found", [(0.99e-3, True), (1.01e-3, False)])
def test_vanishing_backward_edge(ratio, found):
    records = chain(grad=(std_for(ratio), 1.0, 1.0, 5.0))
    findings = diagnose(records)
    assert ("vanishing" in kinds(findings)) is found
    if found:
        f = one(findings, "vanishing")
        assert f.layers == ("dense_01",) and f.evidence["backward_reference"] == "dense_03"


@pytest.mark.parametrize("ratio, severity", [(0.99e-6, "severe"), (1.01e-6, "warning")])
def test_vanishing_severity_edge(ratio, severity):
    f = one(diagnose(chain(fwd=(1.0, 1.0, std_for(ratio), 1.0))), "vanishing")
    assert f.severity == severity


def test_a_single_hidden_layer_is_never_vanishing():
    """A conv and the classifier after it: their gradient variances differ by 10^-7 (per
    pixel against after global pooling), which once read as severe vanishing on the page."""
    records = chain(fwd=(1.0, 1.0), grad=(std_for(1e-7), 1.0))
    assert kinds(diagnose(records)) == []


def test_vanishing_is_judged_at_initialization_only():
    """A healthy start whose deep activations shrink during training (measured on the
    30-layer Kaiming CNN: x1e-4 after 10 SGD steps while it learns) is not vanishing."""
    records = chain(0) + chain(10, fwd=(1.0, 0.1, 0.01, 1.0), update=0.01)
    assert diagnose(records) == []


@pytest.mark.parametrize("ratio, found", [(1.01e3, True), (0.99e3, False)])
def test_exploding_edges_forward_and_backward(ratio, found):
    assert ("exploding" in kinds(diagnose(chain(fwd=(1.0, 1.0, std_for(ratio), 1.0))))) is found
    assert ("exploding" in kinds(diagnose(chain(grad=(std_for(ratio), 1, 1, 1))))) is found


def test_the_suggestion_follows_the_recursion_factor():
    """Measured vanishing with a mismatched initializer (factor 1/2, Xavier under ReLU) ->
    Kaiming; with a matched one (factor 1) the loss comes from depth -> batch normalization."""
    records = chain(fwd=(1.0, 0.1, 0.01, 1.0))
    ctx = Context(activation="relu")
    xavier = one(diagnose(records, profile=profile_frame(0.5), context=ctx), "vanishing")
    assert xavier.suggestion.changes == {"init": "kaiming_normal"}
    assert math.isclose(xavier.evidence["predicted_per_layer_factor"], 0.5)
    assert math.isclose(xavier.evidence["predicted_forward_ratio"], 0.25)
    matched = one(diagnose(records, profile=profile_frame(1.0), context=ctx), "vanishing")
    assert matched.suggestion.changes == suggestions.normalization("batch")
    # ... unless the network has batch normalization already (ResNet50 was told to add it)
    with_bn = Context(activation="relu", batch_norm_layers=("bn_01",))
    has_bn = one(diagnose(records, profile=profile_frame(1.0), context=with_bn), "vanishing")
    assert has_bn.suggestion.changes == {}
    assert "already has batch normalization" in has_bn.suggestion.text
    # without a profile, the measured factor (1e-4 over 2 layers: 0.01 per layer) decides
    alone = one(diagnose(records, context=ctx), "vanishing")
    assert alone.suggestion.changes == {"init": "kaiming_normal"}
    assert math.isclose(alone.evidence["forward_per_layer_factor"], 0.01)
    sigmoid = one(diagnose(records, context=Context(activation="sigmoid")), "vanishing")
    assert sigmoid.suggestion.changes["activation"] == "tanh"


def test_the_profile_is_the_initial_measurement_when_the_records_start_later():
    """A resumed run (records from step 50) is judged at initialization on the profile."""
    profile = profile_frame(0.01, n=5)
    findings = diagnose(chain(50, update=0.01), profile=profile,
                        context=Context(activation="relu"))
    f = one(findings, "vanishing")
    assert f.step == 0 and f.layers == ("dense_03", "dense_04")
    assert diagnose(profile=profile) and one(diagnose(profile=profile), "vanishing").step == 0


def test_exploding_during_training_asks_for_a_smaller_learning_rate():
    records = chain(0) + chain(1, fwd=(1.0, 40.0, 1e3, 1.0), update=2.1)
    f = one(diagnose(records, profile=profile_frame(1.0), context=Context(lr=10.0)),
            "exploding")
    assert f.step == 1 and f.layers == ("dense_02", "dense_03")
    assert f.suggestion.changes == {"lr": 1e-3}
    assert math.isclose(f.evidence["forward_ratio"], 1e6)
    # the profile predicts the initial state, not step 1's
    assert f.evidence["predicted_forward_ratio"] is None


# -- saturation, dead units --------------------------------------------------------------------

@pytest.mark.parametrize("fraction, found", [(0.5, True), (0.4999, False)])
def test_saturation_edge_at_initialization(fraction, found):
    findings = diagnose(chain(sat=[0.1, fraction, 0.1]), context=Context(activation="tanh"))
    assert ("saturation" in kinds(findings)) is found
    if found:
        f = one(findings, "saturation")
        assert f.layers == ("act_02",) and f.severity == "warning"
        assert f.suggestion.changes == {"init": "xavier_normal_tanh"}


@pytest.mark.parametrize("fraction, found", [(0.9, True), (0.8999, False)])
def test_saturation_edge_during_training(fraction, found):
    records = chain(0) + chain(20, sat=[fraction, 0, 0], update=0.02)
    findings = diagnose(records, context=Context(activation="tanh", lr=0.1))
    assert ("saturation" in kinds(findings)) is found
    if found:
        f = one(findings, "saturation")
        assert f.step == 20 and f.severity == "severe" and f.suggestion.changes == {"lr": 0.01}


def test_saturation_predicted_from_the_profile():
    """erfc(atanh(0.97) / sqrt(2 Var[y])): Var[y] = 230 (N(0, 1) weights, 256 units) -> 89%."""
    profile = profile_frame(1.0)
    profile["activation"] = ["tanh", "tanh", "tanh", "linear"]
    profile["forward_var"] = 230.0
    f = one(diagnose(chain(sat=0.9), profile=profile), "saturation")
    assert math.isclose(f.evidence["predicted_saturated_fraction"],
                        math.erfc(math.atanh(0.97) / math.sqrt(460)))
    assert 0.88 < f.evidence["predicted_saturated_fraction"] < 0.90


@pytest.mark.parametrize("fraction, severity", [(0.9, "warning"), (0.99, "severe"),
                                                (0.8999, None)])
def test_dead_units_edges(fraction, severity):
    findings = diagnose(chain(zero=[0.5, 0.5, fraction]))
    if severity is None:
        assert findings == []
        return
    f = one(findings, "dead_units")
    assert f.layers == ("act_03",) and f.severity == severity
    assert f.suggestion.changes == {"activation": "leaky_relu", "init": "kaiming_normal"}


def test_dead_units_during_training_and_reported_once_per_layer():
    records = (chain(0) + chain(10, zero=[0.95, 0.5, 0.5], update=0.05)
               + chain(20, zero=[0.97, 0.95, 0.5], update=0.05))
    findings = diagnose(records, context=Context(lr=0.1))
    dead = [f for f in findings if f.kind == "dead_units"]
    assert [(f.step, f.layers) for f in dead] == [(10, ("act_01",)), (20, ("act_02",))]
    assert dead[0].suggestion.changes == {"lr": 0.01}  # 0.1 * 1e-3 / (0.05 / 10) = 0.02 -> 0.01



def _with_batch_norm_after(rows, *layers):
    """`rows` with a BatchNormalization record (gamma tracked) right after each of `layers`."""
    out = []
    for row in rows:
        out.append(row)
        if row["layer"] in layers:
            out.append({**row, "layer": f"bn_{row['layer']}", "layer_type": "BatchNormalization",
                        "activation_std": 1.0, "weight_std": 1.0})
    for k, row in enumerate(out):
        row["layer_index"] = k
    return out


def test_a_normalization_restarts_the_scale_the_ratios_compare():
    """Batch norm between two weight layers rescales the signal: the variance ratios compound
    only within a stretch without normalization (the raw scales of a Conv-BN-ReLU net at
    initialization, or in inference mode with the untrained moving statistics, are no
    vanishing signal); a vanishing stretch after a normalization is still found, measured
    from the stretch's first layer."""
    fwd, grad = (1.0, 1e-2, 1e-4, 1e-6, 1.0), (1.0,) * 5
    assert one(diagnose(chain(0, fwd=fwd, grad=grad)), "vanishing").severity == "severe"
    every = _with_batch_norm_after(chain(0, fwd=fwd, grad=grad),
                                   "dense_01", "dense_02", "dense_03")
    assert diagnose(every) == []
    later = _with_batch_norm_after(chain(0, fwd=(1.0, 1.0, 1.0, 1e-4, 1.0), grad=grad),
                                   "dense_02")
    finding = one(diagnose(later), "vanishing")
    assert finding.layers == ("dense_04",)
    assert (finding.evidence["forward_reference"], finding.evidence["forward_ratio"]) == \
        ("dense_03", pytest.approx(1e-8))     # chain() takes standard deviations


def test_a_parallel_branch_is_not_compared_with_the_path_it_leaves():
    """MobileNetV3Small at initialization: between two batch norms, a squeeze-and-excitation
    gate's convolutions (a gradient 1e-5 of the block's) and the projection after the gate's
    multiply; compared as one path they read as a vanishing gradient ('use Kaiming'). The
    profile's `follows_previous` says the projection does not continue the gate's path:
    neither the profile nor the step-0 records, mapped to it by layer, compare them."""
    profile = profile_frame(1.0, n=5)
    profile["backward_var"] = [1e-3, 1e-8, 1e-8, 1e-3, 1e-3]
    profile["segment"] = [0, 1, 1, 1, 2]
    profile["follows_previous"] = [False, True, True, True, True]
    grad = tuple(math.sqrt(v) for v in profile["backward_var"])
    one(diagnose(profile=profile), "vanishing")             # as one path: "vanishing"
    profile["follows_previous"] = [False, True, True, False, True]
    assert diagnose(profile=profile) == []
    records = chain(0, fwd=(1.0,) * 5, grad=grad)   # no batch norm records: one segment
    one(diagnose(records), "vanishing")
    assert diagnose(records, profile=profile) == []


def test_records_split_at_a_parallel_branch_without_the_profile():
    """The same net as above from the logger's records alone: their `follows_previous` says
    where a parallel branch starts, as the profile's does; records written before the field
    existed (None) split at the batch norms only."""
    grad = tuple(math.sqrt(v) for v in (1e-3, 1e-8, 1e-8, 1e-3, 1e-3))
    records = _with_batch_norm_after(chain(0, fwd=(1.0,) * 5, grad=grad),
                                     "dense_01", "dense_04")
    for row in records:
        row["follows_previous"] = row is not records[0]
    one(diagnose(records), "vanishing")                     # as one path: "vanishing"
    next(r for r in records if r["layer"] == "dense_04")["follows_previous"] = False
    assert diagnose(records) == []
    for row in records:
        row["follows_previous"] = None
    one(diagnose(records), "vanishing")


def test_a_vanishing_signal_the_initializer_cannot_explain_gets_no_initializer():
    """The recursion's factor per layer is 3 (weights that make the signal grow) while the
    measured signal vanishes: 'the initial weights are too small ... x3 per layer' contradicted
    its own evidence (seen in EfficientNetB0's gates on inputs its Rescaling shrank). The
    cause is elsewhere: the unnormalized input when it was found, else no setting."""
    records = chain(0, fwd=(1.0, 1e-2, 1e-4, 1e-6, 1.0), grad=(1.0,) * 5)
    finding = one(diagnose(records, profile=profile_frame(3.0, n=5)), "vanishing")
    assert finding.evidence["predicted_per_layer_factor"] == pytest.approx(3.0)
    assert finding.suggestion.changes == {}
    assert "would make the signal grow, so it is not the cause" in finding.suggestion.text
    tiny = Context(input_mean=0.0, input_std=0.004, input_layers=("rescaling",))
    findings = diagnose(records, profile=profile_frame(3.0, n=5, first_m2=1.6e-5),
                        context=tiny)
    assert kinds(findings) == ["unnormalized_input", "vanishing"]
    assert findings[1].suggestion.changes == {"input_normalization": "none"}
    assert findings[1].suggestion.text.startswith("The unnormalized_input finding (step 0) is "
                                                  "the cause")


def test_units_that_die_after_a_vanishing_start_or_under_small_updates_get_no_smaller_lr():
    """A smaller learning rate is the fix only for large updates: after a vanishing signal at
    initialization the vanishing finding is the cause; with updates already at or below the
    1e-3 target (10 steps of 1e-4 each here) leaky ReLU is proposed, not lr / 10."""
    vanishing = [chain(0, fwd=(1.0, 1e-3, 1e-6, 1e-9))]
    vanishing.append(chain(10, fwd=(1.0, 1e-3, 1e-6, 1e-9), zero=[0.5, 0.5, 0.97], update=1e-8))
    dead = one(diagnose(sum(vanishing, []), context=Context(lr=0.1, activation="relu")),
               "dead_units")
    assert dead.suggestion.changes == {"init": "kaiming_normal"}
    assert dead.suggestion.text.startswith("The vanishing finding (step 0) is the cause")
    small = chain(0) + chain(10, zero=[0.95, 0.5, 0.5], update=1e-3)
    dead = one(diagnose(small, context=Context(lr=0.1)), "dead_units")
    assert dead.suggestion.changes == {"activation": "leaky_relu", "init": "kaiming_normal"}
    assert "measured ||dW||/||W|| 0.0001 per step" in dead.suggestion.text


# -- divergence --------------------------------------------------------------------------------

def test_divergence_names_the_first_layer_with_non_finite_forward_values():
    bad = chain(3, update=1.0, **{"dense_02": {"activation_std": float("inf")},
                                  "act_02": {"activation_std": float("nan"), "nan_count": 9},
                                  "dense_01": {"activation_grad_std": float("inf")}})
    records = chain(0) + chain(1, update=5.0) + bad + chain(4, fwd=(1, 1e9, 1e9, 1e9))
    findings = diagnose(records, [(1, 2.3), (2, 1e30), (3, float("nan"))],
                        context=Context(lr=10.0))
    f = one(findings, "divergence")
    assert f.step == 3 and f.layers == ("dense_02",) and f.severity == "severe"
    assert f.evidence["direction"] == "forward"
    assert f.suggestion.changes == {"lr": 1e-3}   # 10 * 1e-3 / 5 = 2e-3 -> 1e-3
    assert kinds(findings) == ["divergence"]      # nothing after it (step 4 would explode)


def test_divergence_from_a_gradient_names_the_last_non_finite_layer():
    records = chain(0) + chain(5, update=0.01, **{"dense_01": {"activation_grad_std": np.inf},
                                                  "dense_02": {"activation_grad_std": np.inf}})
    f = one(diagnose(records), "divergence")
    assert f.layers == ("dense_02",) and f.evidence["direction"] == "backward"


def test_divergence_from_the_loss_alone():
    engine = Diagnoser(context=Context(lr=1.0))
    assert engine.update(chain(0), [(1, 2.0), (2, float("inf"))]) == []
    (f,) = engine.finish()
    assert f.kind == "divergence" and f.step == 2 and f.layers == ()
    assert f.suggestion.changes == {"lr": 0.1}
    # records logged after a non-finite loss: the divergence starts at the loss's step
    records = chain(0) + chain(10, update=0.01)
    f = one(diagnose(records, [(4, float("nan"))]), "divergence")
    assert f.step == 4 and f.evidence["first_nonfinite_record_step"] == 10


def test_divergence_defers_to_unnormalized_inputs():
    records = chain(0) + chain(10, update=1.0, **{"dense_01": {"nan_count": 3}})
    findings = diagnose(records, context=Context(input_mean=120.0, input_std=60.0, lr=0.01))
    assert kinds(findings) == ["unnormalized_input", "divergence"]
    assert findings[1].suggestion.changes == {"input_normalization": "pooled"}


# -- the loss ----------------------------------------------------------------------------------

def flat_losses(n, offset=0.0, start=0):
    rng = np.random.default_rng(0)
    return [(start + s, LN10 + offset + rng.uniform(-0.005, 0.005)) for s in range(n)]


@pytest.mark.parametrize("n, offset, found", [(101, 0.0, True), (100, 0.0, False),
                                              (101, 0.015, True), (101, 0.021, False)])
def test_stalled_loss_edges(n, offset, found):
    findings = diagnose(losses=flat_losses(n, offset), context=Context(num_classes=10))
    assert ("stalled_loss" in kinds(findings)) is found
    if found:
        f = one(findings, "stalled_loss")
        assert f.step == 100 and f.evidence["since_step"] == 0 and f.severity == "severe"


def test_stalled_loss_needs_the_number_of_classes_and_a_plateau():
    assert diagnose(losses=flat_losses(300)) == []
    falling = [(s, LN10 - 0.01 * s) for s in range(300)]
    assert diagnose(losses=falling, context=Context(num_classes=10)) == []
    # a late plateau is found where its 100 steps end (the median of 5 enters it 2 steps late)
    late = [(s, 1.0) for s in range(50)] + flat_losses(150, start=50)
    f = one(diagnose(losses=late, context=Context(num_classes=10)), "stalled_loss")
    assert (f.evidence["since_step"], f.step) == (52, 152)


def test_stalled_loss_points_at_its_cause():
    records = chain(0, fwd=(1.0, 0.01, 1e-4, 1e-4)) + chain(100, update=1e-9)
    findings = diagnose(records, flat_losses(150), context=Context(num_classes=10,
                                                                   activation="relu", lr=0.01))
    assert kinds(findings) == ["vanishing", "stalled_loss"]
    assert findings[1].suggestion.changes == findings[0].suggestion.changes
    assert findings[1].evidence["cause"] == "vanishing"
    # no cause in the statistics, but the weights do not move: a larger learning rate
    slow = chain(0) + chain(50, update=1e-5 * 50 * 0.5)
    f = one(diagnose(slow, flat_losses(150), context=Context(num_classes=10, lr=0.01)),
            "stalled_loss")
    assert f.suggestion.changes == {"lr": 0.1}
    fast = chain(0) + chain(50, update=0.05)
    f = one(diagnose(fast, flat_losses(150), context=Context(num_classes=10, lr=0.01)),
            "stalled_loss")
    assert f.suggestion.changes == {}


# -- the context -------------------------------------------------------------------------------

@pytest.mark.parametrize("second_moment, severity", [
    (16.0, None), (16.5, "warning"), (1 / 16, None), (0.06, "warning"),
    (999.0, "warning"), (1001.0, "severe"), (0.9e-3, "severe")])
def test_unnormalized_input_edges(second_moment, severity):
    context = Context(input_mean=0.0, input_std=math.sqrt(second_moment))
    findings = diagnose(chain(0), context=context)
    if severity is None:
        assert findings == []
        return
    f = one(findings, "unnormalized_input")
    assert f.severity == severity and f.layers == ("dense_01",) and f.step == 0
    assert f.suggestion.changes == {"input_normalization": "pooled"}


def test_a_model_that_rescales_its_input_is_fed_raw_pixels():
    """keras.applications' EfficientNetB0 (weights=None) divides its input by 255 before its
    first convolution: given standardized images, E[x^2] there is 1.5e-5, and "normalize the
    inputs" (already done) would re-run the same thing. The fix is to feed the raw range."""
    own = Context(input_mean=0.0, input_std=math.sqrt(1.5e-5), input_layers=("rescaling",))
    f = one(diagnose(chain(0), context=own), "unnormalized_input")
    assert f.suggestion.changes == {"input_normalization": "none"}
    assert "after the model's own input layers (rescaling)" in f.message
    assert "feed it that range" in f.suggestion.text
    # too large after its own layers: normalizing the data is still the fix
    big = Context(input_mean=0.0, input_std=150.0, input_layers=("rescaling",))
    f = one(diagnose(chain(0), context=big), "unnormalized_input")
    assert f.suggestion.changes == {"input_normalization": "pooled"}
    assert Context.from_dict(own.to_dict()) == own


def test_the_profile_measures_the_first_layer_input():
    """The profile's E[x^2] of the first weight layer's input wins over the raw data's
    statistics (a model may rescale its inputs before its first layer)."""
    raw = Context(input_mean=120.0, input_std=60.0)
    assert diagnose(chain(0), profile=profile_frame(1.0, first_m2=1.0), context=raw) == []
    f = one(diagnose(chain(0), profile=profile_frame(1.0, first_m2=2e4)), "unnormalized_input")
    assert f.evidence["input_second_moment"] == 2e4


@pytest.mark.parametrize("batch, severity", [(8, None), (7, "warning"), (4, "warning"),
                                             (3, "severe"), (2, "severe")])
def test_small_batch_norm_edges(batch, severity):
    context = Context(batch_size=batch, batch_norm_layers=("bn_01", "bn_02"))
    findings = diagnose(chain(0), context=context)
    if severity is None:
        assert findings == []
        return
    f = one(findings, "small_batch_norm")
    assert f.severity == severity and f.layers == ("bn_01", "bn_02")
    assert f.suggestion.changes == {NORMALIZATION_FIELD: "group"}
    assert math.isclose(f.evidence["variance_relative_error"], math.sqrt(2 / (batch - 1)))
    assert diagnose(chain(0), context=Context(batch_size=batch)) == []  # no BN, no finding


# -- the engine --------------------------------------------------------------------------------

def test_incremental_updates_find_what_one_pass_finds():
    steps = [chain(0, fwd=(1.0, 0.1, 0.01, 1.0), sat=[0.6, 0, 0]),
             chain(10, zero=[0.95, 0.5, 0.5], update=0.01),
             chain(20, zero=[0.95, 0.95, 0.5], update=0.01),
             chain(30, update=0.01, **{"dense_03": {"activation_std": float("nan")}})]
    losses = flat_losses(35)
    context = Context(num_classes=10, activation="tanh", lr=0.01)
    whole = diagnose(sum(steps, []), losses, context=context)
    engine = Diagnoser(context=context)
    live = []
    for k, records in enumerate(steps):
        live += engine.update(records, [l for l in losses if k * 10 - 10 < l[0] <= k * 10])
    live += engine.update((), [l for l in losses if l[0] > 30])
    live += engine.finish()
    assert [f.to_dict() for f in live] == [f.to_dict() for f in whole]
    assert kinds(whole) == ["vanishing", "saturation", "dead_units", "dead_units", "divergence"]
    assert engine.findings == live


def test_records_as_a_dataframe_and_json_nulls():
    records = chain(0, sat=[0.7, 0, 0])
    as_json = [json.loads(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v)
                                          else v) for k, v in r.items()})) for r in records]
    expected = [f.to_dict() for f in diagnose(records)]
    assert [f.to_dict() for f in diagnose(pd.DataFrame(records))] == expected
    assert [f.to_dict() for f in diagnose(as_json)] == expected
    assert kinds(diagnose(records)) == ["saturation"]


def test_healthy_records_give_no_finding():
    records = chain(0, fwd=(1.0, 0.7, 0.5, 0.8), grad=(1e-3, 2e-3, 3e-3, 5e-3))
    records += chain(50, fwd=(1.2, 0.8, 0.6, 2.0), zero=[0.6, 0.55, 0.5], update=0.05)
    losses = [(s, 2.8 - s / 100) for s in range(1, 150)]
    context = Context(num_classes=10, batch_size=64, batch_norm_layers=("bn",),
                      activation="relu", lr=0.01, input_mean=0.0, input_std=1.0)
    assert diagnose(records, losses, profile=profile_frame(1.0), context=context) == []


def test_the_engine_imports_no_keras(tmp_path):
    """The diagnosis package evaluates with Keras unimportable."""
    script = textwrap.dedent(f"""
        import sys, types
        sys.modules["keras"] = None
        package = types.ModuleType("keras_varinit")
        package.__path__ = [{str(REPO / "keras_varinit")!r}]
        sys.modules["keras_varinit"] = package
        from keras_varinit.diagnosis import Context, diagnose
        records = [dict(step=0, epoch=0, layer=n, layer_index=i, layer_type="Dense",
                        activation_mean=0.0, activation_std=s, zero_fraction=0.0,
                        saturated_fraction=0.0, activation_grad_std=1.0, weight_std=0.1,
                        weight_grad_std=0.1, update_ratio=None, nan_count=0, inf_count=0)
                   for i, (n, s) in enumerate([("a", 1.0), ("b", 1e-3), ("c", 1.0)])]
        print([f.kind.value for f in diagnose(records, context=Context(activation="relu"))])
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['vanishing']"


def test_earlier_findings_are_not_reported_again():
    """A resumed run gives the engine the findings it kept: the same kind and layers are not
    reported again; a finding of another kind still is."""
    context = Context(batch_size=2, batch_norm_layers=("bn_01",), input_mean=0.0,
                      input_std=100.0)
    first = diagnose(chain(0), context=context)
    assert {f.kind.value for f in first} == {"small_batch_norm", "unnormalized_input"}
    kept = [one(first, "small_batch_norm")]
    engine = Diagnoser(context=context, earlier=kept)
    new = engine.update(chain(4))
    assert [f.kind.value for f in new] == ["unnormalized_input"]
    assert engine.findings[0] is kept[0]
