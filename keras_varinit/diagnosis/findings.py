"""The typed values of a diagnosis: `Kind`, `Severity`, `Suggestion`, `Finding`, `Context`.

A `Finding` is what a rule of `keras_varinit.diagnosis.rules` concludes from the layer
statistics: its kind, the first step it is seen at, the layers concerned, the evidence (numbers,
with the theory's prediction where there is one) and one `Suggestion`: a change of the training
configuration, written with `TrainConfig`'s field names (see `suggestions.CONFIG_FIELDS`).

Everything here is plain Python: findings round-trip through `to_dict` / `from_dict` and JSON
lines (`write_findings` / `read_findings`, through `run_files`' JSON-lines helpers), the format
of a run's `findings.jsonl` (`run_files.FINDINGS_FILE`).
"""
import dataclasses
import enum
import math
import os

from keras_varinit.run_files import append_jsonl, json_safe, read_jsonl


class Kind(str, enum.Enum):
    """What went wrong. The string values are a contract (outside checks use them)."""

    VANISHING = "vanishing"
    EXPLODING = "exploding"
    DEAD_UNITS = "dead_units"
    SATURATION = "saturation"
    DIVERGENCE = "divergence"
    STALLED_LOSS = "stalled_loss"
    UNNORMALIZED_INPUT = "unnormalized_input"
    SMALL_BATCH_NORM = "small_batch_norm"

    def __str__(self):
        return self.value


class Severity(str, enum.Enum):
    """`WARNING`: training is impaired; `SEVERE`: training fails (``doctor`` exits non-zero)."""

    WARNING = "warning"
    SEVERE = "severe"

    def __str__(self):
        return self.value


#: The finding kinds, as strings.
KINDS = tuple(k.value for k in Kind)


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """One concrete fix: a change of the training configuration, and a sentence saying why.

    Args:
        changes: configuration field -> new value, with `TrainConfig`'s field names
            (`suggestions.CONFIG_FIELDS`), e.g. ``{"init": "kaiming_normal"}``. Empty only when
            the evidence points at no setting (the text then says what to check).
        text: the fix in words, with the formula behind it.
    """

    changes: dict
    text: str

    def apply(self, config):
        """`config` (a dict of configuration fields) with the changes applied.

        >>> Suggestion({"lr": 0.001}, "...").apply({"lr": 10.0, "depth": 6})
        {'lr': 0.001, 'depth': 6}
        """
        return {**dict(config), **self.changes}

    def to_dict(self):
        return {"changes": json_safe(self.changes), "text": self.text}

    @classmethod
    def from_dict(cls, data):
        return cls(changes=dict(data["changes"]), text=str(data["text"]))


@dataclasses.dataclass(frozen=True)
class Finding:
    """One diagnosis: `kind` from `step` on, at `layers`, because of `evidence`; fix: `suggestion`.

    Args:
        kind: a `Kind`.
        step: the first step the problem is seen at (0: at initialization).
        layers: the layers concerned, in model order (names as the records give them; empty for
            run-level findings such as a stalled loss).
        severity: a `Severity`.
        evidence: the numbers behind it (measured, the threshold, and the predicted value of
            the variance recursion where the theory gives one).
        suggestion: a `Suggestion`.
        message: the finding in one human sentence.
    """

    kind: Kind
    step: int
    layers: tuple
    severity: Severity
    evidence: dict
    suggestion: Suggestion
    message: str

    def __post_init__(self):
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "severity", Severity(self.severity))
        object.__setattr__(self, "layers", tuple(str(name) for name in self.layers))
        object.__setattr__(self, "step", int(self.step))

    def to_dict(self):
        return {"kind": self.kind.value, "step": self.step, "layers": list(self.layers),
                "severity": self.severity.value, "evidence": json_safe(self.evidence),
                "suggestion": self.suggestion.to_dict(), "message": self.message}

    @classmethod
    def from_dict(cls, data):
        return cls(kind=data["kind"], step=data["step"], layers=tuple(data["layers"]),
                   severity=data["severity"], evidence=dict(data["evidence"]),
                   suggestion=Suggestion.from_dict(data["suggestion"]),
                   message=str(data["message"]))

    def __str__(self):
        return f"[{self.severity.value}] {self.message}"


@dataclasses.dataclass(frozen=True)
class Context:
    """What the rules need to know besides the statistics (all optional; a rule whose input is
    missing does not run).

    Args:
        num_classes: classes of the classifier (the chance-level loss is ln(num_classes)).
        batch_size: training batch size.
        batch_norm_layers: names of the batch normalization layers (empty: none).
        activation: the hidden layers' nonlinearity ("relu", "tanh", ...): picks the
            initializer a suggestion proposes.
        lr: the learning rate (a suggestion proposes a new value).
        input_mean, input_std: mean and standard deviation of the first weight layer's input
            over a batch (its second moment is input_mean^2 + input_std^2).
        input_layers: names of the model's own layers that change its input's values before
            the first weight layer (`Rescaling`, `Normalization`, as in keras.applications),
            empty when none do.
    """

    num_classes: int | None = None
    batch_size: int | None = None
    batch_norm_layers: tuple = ()
    activation: str | None = None
    lr: float | None = None
    input_mean: float | None = None
    input_std: float | None = None
    input_layers: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "batch_norm_layers", tuple(self.batch_norm_layers))
        object.__setattr__(self, "input_layers", tuple(self.input_layers))
        for name in ("num_classes", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value
                                      or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None. "
                                 f"Received: {name}={value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float))
                                        and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("`lr` must be a positive finite number or None. "
                             f"Received: lr={self.lr!r}")

    @property
    def input_second_moment(self):
        """E[x^2] = mean^2 + std^2 of the first weight layer's input, or None."""
        if self.input_mean is None or self.input_std is None:
            return None
        return float(self.input_mean) ** 2 + float(self.input_std) ** 2

    def to_dict(self):
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data):
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


# --------------------------------------------------------------------------------------------
# findings.jsonl

def write_findings(path, findings, mode="a"):
    """Append (mode "a") or write (mode "w") `findings` to the JSON-lines file `path`
    (`run_files.append_jsonl`: one write, flushed at once)."""
    if mode not in ("a", "w"):
        raise ValueError(f"Unknown mode. Received: mode={mode!r}. Allowed: 'a', 'w'")
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    if mode == "w":
        open(path, "w", encoding="utf-8").close()
    append_jsonl(path, [finding.to_dict() for finding in findings])


def read_findings(path):
    """The findings of a JSON-lines file ([] if it does not exist; a last line without a
    newline, still being written, is left out: `run_files.read_jsonl`)."""
    return [Finding.from_dict(record) for record in read_jsonl(path)]


def findings_dataframe(findings):
    """One row per finding: kind, step, layers (comma-separated), severity, message,
    suggestion (its text), changes (a dict)."""
    import pandas as pd

    columns = ["kind", "step", "layers", "severity", "message", "suggestion", "changes"]
    rows = [{"kind": f.kind.value, "step": f.step, "layers": ", ".join(f.layers),
             "severity": f.severity.value, "message": f.message,
             "suggestion": f.suggestion.text, "changes": dict(f.suggestion.changes)}
            for f in findings]
    return pd.DataFrame(rows, columns=columns)
