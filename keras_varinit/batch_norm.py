"""Transitional: only normalization.py's re-export still imports this module.

The layer lives in `keras_varinit.layers` (its one public path: `kv.layers.BatchNormalization`).
This file goes when normalization.py becomes channel_stats.py without the re-export (issue 12,
another branch); nothing else may import it.
"""
from keras_varinit.layers import BatchNormalization  # noqa: F401
