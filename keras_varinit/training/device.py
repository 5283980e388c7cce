"""Where a run trains: the device it reports, the ``tf.distribute`` strategy, the dtype policy."""
import contextlib

import keras

from keras_varinit.checks import check_choice

DISTRIBUTES = (None, "mirrored", "multiworker")


def describe_device():
    """"GPU:0 (<name>)" (and "+N more") when a GPU is visible to the backend, else "CPU"."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                name = tf.config.experimental.get_device_details(gpus[0]).get("device_name")
                return _gpu_label(name, len(gpus))
        elif backend == "jax":
            import jax

            gpus = [d for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm")]
            if gpus:
                return _gpu_label(gpus[0].device_kind, len(gpus))
    except Exception:  # noqa: BLE001 - device discovery must never break training
        pass
    return "CPU"


def _gpu_label(name, count):
    label = f"GPU:0 ({name})" if name else "GPU:0"
    return label + (f" +{count - 1} more" if count > 1 else "")


def make_strategy(distribute):
    """The ``tf.distribute`` strategy for ``distribute`` (None -> None). "mirrored": every
    local GPU, else the logical CPU devices; "multiworker": ``MultiWorkerMirroredStrategy``
    from ``TF_CONFIG``. TensorFlow backend only."""
    check_choice("distribute", distribute, DISTRIBUTES)
    if distribute is None:
        return None
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"distribute={distribute!r} needs the TensorFlow backend. Received: "
                         f"KERAS_BACKEND={keras.backend.backend()!r}. Allowed: "
                         "KERAS_BACKEND=tensorflow, or distribute=None (with JAX use "
                         "keras.distribution).")
    import tensorflow as tf

    if distribute == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices] or None)


def strategy_scope(strategy):
    """``strategy.scope()``, or a no-op context without a strategy."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


@contextlib.contextmanager
def dtype_policy(mixed_precision):
    """Train under "mixed_float16" inside the block when asked; the global policy is restored
    on the way out."""
    if not mixed_precision:
        yield
        return
    before = keras.mixed_precision.dtype_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)
