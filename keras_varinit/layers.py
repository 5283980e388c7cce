"""Public layer namespace: ``kv.layers``.

>>> import keras_varinit as kv
>>> bn = kv.layers.BatchNormalization(variance_estimator="per_sample")
"""
from keras_varinit.batch_norm import BatchNormalization

__all__ = ["BatchNormalization"]
