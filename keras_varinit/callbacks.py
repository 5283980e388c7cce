"""`kv.callbacks`: the package's Keras callbacks (the public names; each lives in its module).

* `LayerStatsLogger` (`keras_varinit.layer_stats_logger`): per-layer activation, gradient and
  weight statistics of an ordinary `fit()`, on a fixed probe batch;
* `DiagnosisLogger` (`keras_varinit.diagnosis_logger`): the diagnosis of those statistics,
  live (console warning, TensorBoard text, `findings.jsonl`).
"""
from keras_varinit.diagnosis_logger import DiagnosisLogger
from keras_varinit.layer_stats_logger import LayerStatsLogger

__all__ = ["DiagnosisLogger", "LayerStatsLogger"]
