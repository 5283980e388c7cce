"""keras_varinit: principled initialization, BN variance estimators and signal diagnostics.

Importing the package registers every initializer and layer with Keras, so models that use
them (``kernel_initializer="keras_varinit>KaimingNormal"``) load back from ``.keras`` files.

    import keras_varinit as kv
    kv.initializers.KaimingNormal()            # He et al. 2015
    kv.layers.BatchNormalization(variance_estimator="per_sample")
    kv.variance_profile(model, x)              # per-layer forward/backward variance
"""
__version__ = "0.1.0"

from keras_varinit import callbacks  # noqa: E402
from keras_varinit import datasets  # noqa: E402
from keras_varinit import diagnosis  # noqa: E402
from keras_varinit import diagnostics  # noqa: E402
from keras_varinit import initializers  # noqa: E402
from keras_varinit import layers  # noqa: E402
from keras_varinit import models  # noqa: E402
from keras_varinit import profile_report  # noqa: E402
# The function shadows its module's name in this namespace: kv.channel_stats(data) is the
# function; the module's other names import from keras_varinit.channel_stats.
from keras_varinit.channel_stats import ChannelStats, channel_stats  # noqa: E402
from keras_varinit.diagnostics import variance_profile  # noqa: E402
from keras_varinit.initializers import compute_fans, gain, lsuv  # noqa: E402

__all__ = [
    "callbacks", "datasets", "diagnosis", "diagnostics", "initializers", "layers", "models",
    "profile_report", "variance_profile", "compute_fans", "gain", "lsuv",
    "ChannelStats", "channel_stats", "__version__",
]
