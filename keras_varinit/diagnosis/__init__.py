"""Diagnosis: from layer statistics to findings that name the failing layer, the step, the
cause and the fix.

Plain Python (numpy and pandas; no Keras): the rules read the layer statistics records of
`LayerStatsLogger`, the loss history, the init profile of `kv.variance_profile` and a little
`Context`, and return `Finding`s, each with a `Suggestion` written as a change of the training
configuration. `docs/diagnosis.md` describes every rule and threshold.

>>> from keras_varinit.diagnosis import Context, diagnose
>>> findings = diagnose(logger.history, losses, profile=df,
...                     context=Context(num_classes=10, activation="relu", lr=0.01))
>>> findings[0].kind, findings[0].step, findings[0].suggestion.changes
('vanishing', 0, {'init': 'kaiming_normal'})

The live form is the callback `kv.callbacks.DiagnosisLogger`.
"""
from keras_varinit.diagnosis.engine import Diagnoser, diagnose
from keras_varinit.diagnosis.findings import (
    KINDS, Context, Finding, Kind, Severity, Suggestion, findings_dataframe, read_findings,
    write_findings,
)
from keras_varinit.diagnosis.suggestions import (
    CONFIG_FIELDS, NORMALIZATION_FIELD, NORMALIZATION_VALUES,
)

__all__ = [
    "Diagnoser", "diagnose", "KINDS", "Context", "Finding", "Kind", "Severity", "Suggestion",
    "findings_dataframe", "read_findings", "write_findings", "CONFIG_FIELDS",
    "NORMALIZATION_FIELD", "NORMALIZATION_VALUES",
]
