"""The findings of a run for the Training tab (plain Python, no Streamlit): the rows of the
panel and of its timeline, the layers the heatmaps highlight, a suggestion in the page's words,
and the configuration "Apply and re-run" queues.

A run's findings are its ``findings.jsonl`` (``run_store.RunStore.findings``), written live by
``DiagnosisLogger`` in the trainer. Applying a suggestion is one code path for every fix:
``applied_config(config, finding)`` = ``TrainConfig.from_dict(suggestion.apply(config))``,
validated, then queued by ``worker.JobManager.submit_config`` as a new run beside the original.
"""
from __future__ import annotations

import pandas as pd

from explorer import presets
from keras_varinit.training.config import USER_MODELS, TrainConfig, fields

#: Columns of ``findings_frame``.
COLUMNS = ("kind", "step", "severity", "layers", "message", "fix")


def fix_text(changes: dict) -> str:
    """A suggestion's changes in the page's words: "Initializer: Kaiming normal (fan_in)"
    (every field a suggestion may change, `suggestions.CONFIG_FIELDS`, is a sidebar control)."""
    return "; ".join(f"{presets.CONTROLS[name].widget.label}: "
                     f"{presets.label(presets.CONTROLS[name], value)}"
                     for name, value in changes.items())


def layers_text(layers, shown: int = 4) -> str:
    """``conv_01, conv_02, conv_03, conv_04 ... (29 layers)``."""
    layers = list(layers)
    text = ", ".join(layers[:shown])
    return text + (f" ... ({len(layers)} layers)" if len(layers) > shown else "")


def findings_frame(findings) -> pd.DataFrame:
    """One row per finding (``COLUMNS``), in the order found: the timeline's data."""
    rows = [{"kind": f.kind.value, "step": f.step, "severity": f.severity.value,
             "layers": layers_text(f.layers), "message": f.message,
             "fix": fix_text(f.suggestion.changes) or f.suggestion.text} for f in findings]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def highlighted_layers(findings) -> list[str]:
    """The layers the findings name, each once, in the order named (the heatmaps mark them)."""
    out = []
    for finding in findings:
        out += [layer for layer in finding.layers if layer not in out]
    return out


def needs_code_change(config: dict, changes: dict) -> bool:
    """A fix of a run on a model of one's own that changes an option of the built-in nets
    (init, activation, normalization): that model is trained as it is, so the fix is made in
    the code that builds it (``suggestions.keras_code``), not by re-running the run."""
    specs = {spec.name: spec for spec in fields(TrainConfig)}
    return config.get("model") in USER_MODELS and any(specs[name].builtin for name in changes)


def applied_config(config: dict, finding) -> TrainConfig:
    """The run's configuration (its ``config.json``) with ``finding``'s suggestion applied,
    validated; a ValueError when the suggestion changes nothing the trainer can change."""
    if not finding.suggestion.changes:
        raise ValueError(f"This finding's suggestion is no configuration change. Received: "
                         f"{finding.kind.value} with changes {{}}. Allowed: a finding whose "
                         "suggestion names configuration fields.")
    return TrainConfig.from_dict(finding.suggestion.apply(config)).validate()
