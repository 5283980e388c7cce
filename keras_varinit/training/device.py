"""Where a run trains: the device it reports, its ``Placement`` (the ``tf.distribute`` strategy
on TensorFlow, the ``keras.distribution`` on JAX), the dtype policy. Keras is imported by
the functions that use it, so the run schema can read ``DISTRIBUTES`` without it."""
import contextlib
import dataclasses

from keras_varinit.checks import check_choice

TF_STRATEGIES = ("mirrored", "multiworker")
JAX_DISTRIBUTIONS = ("data_parallel",)
DISTRIBUTES = (None, *TF_STRATEGIES, *JAX_DISTRIBUTIONS)


def describe_device():
    """"GPU:0 (<name>)" (and "+N more") when a GPU is visible to the backend, else "CPU"."""
    import keras

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


@dataclasses.dataclass
class Placement:
    """Where a run trains: the devices, the ``tf.distribute`` strategy (TensorFlow) or the
    ``keras.distribution`` (JAX), how many replicas share a batch, and whether this process
    writes the run directory (``chief``: every process but the non-chief workers of a
    multi-worker run)."""

    distribute: str | None = None
    strategy: object = None
    distribution: object = None
    replicas: int = 1
    chief: bool = True

    def build_scope(self):
        """Where the model and its optimizer are created: ``strategy.scope()`` (TensorFlow)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def run_scope(self):
        """Around the whole run: ``distribution.scope()`` (JAX: the variables, every step of
        ``fit`` and the layer-statistics probe run under it)."""
        if self.distribution is None:
            return contextlib.nullcontext()
        return self.distribution.scope()

    def check_batch_size(self, batch_size):
        """Every ``distribute`` splits each batch evenly over the replicas."""
        if self.distribute is not None:
            check_data_parallel_batch(batch_size, self.replicas, self.distribute)

    def describe(self):
        if self.distribute is None:
            return ""
        role = "" if self.chief else ", non-chief worker (writes no run files)"
        return f"distribute={self.distribute} over {self.replicas} replicas{role}"


def check_data_parallel_batch(batch_size, devices, distribute="data_parallel"):
    """Data parallelism (``distribute``) splits each batch evenly over the devices."""
    if batch_size % devices:
        raise ValueError(
            f"distribute={distribute!r} splits each batch over {devices} devices. "
            f"Received: batch_size={batch_size}. Allowed: a multiple of {devices}.")


def make_placement(distribute):
    """The ``Placement`` for ``distribute``: None (one device), "mirrored" (every local GPU,
    else the logical CPU devices) or "multiworker" (``MultiWorkerMirroredStrategy`` from
    ``TF_CONFIG``) on TensorFlow, "data_parallel" (``keras.distribution.DataParallel`` over
    every visible device) on JAX."""
    import keras

    check_choice("distribute", distribute, DISTRIBUTES)
    if distribute is None:
        return Placement()
    backend = keras.backend.backend()
    needed = "jax" if distribute in JAX_DISTRIBUTIONS else "tensorflow"
    if backend != needed:
        other = ("'data_parallel' (keras.distribution)" if backend == "jax"
                 else "'mirrored' or 'multiworker' (tf.distribute)")
        raise ValueError(f"distribute={distribute!r} needs the {needed} backend. Received: "
                         f"KERAS_BACKEND={backend!r}. Allowed: KERAS_BACKEND={needed}, or on "
                         f"this backend distribute=None or {other}.")
    if distribute == "data_parallel":
        devices = keras.distribution.list_devices()
        return Placement(distribute, distribution=keras.distribution.DataParallel(
            devices=devices), replicas=len(devices))
    import tensorflow as tf

    if distribute == "multiworker":
        strategy = _multi_worker_strategy()
        return Placement(distribute, strategy=strategy,
                         replicas=strategy.num_replicas_in_sync,
                         chief=strategy.extended.should_checkpoint)
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices] or None)
    return Placement(distribute, strategy=strategy, replicas=strategy.num_replicas_in_sync)


def _multi_worker_strategy():
    """``tf.distribute.MultiWorkerMirroredStrategy`` (configured from ``TF_CONFIG``) whose
    ``reduce`` also takes what Keras 3's ``fit`` gives it: a nest of values, and scalars with
    ``axis=0`` (keras-team/keras#20585: without this, ``fit`` under the strategy fails with
    "Attempt to convert a value (PerReplica...)" and then "Invalid reduction dimension 0 for
    input with 0 dimensions")."""
    import tensorflow as tf

    class KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def one(v):
                scalar = axis is not None and getattr(v, "shape", None) is not None \
                    and v.shape.rank == 0
                return super(KerasMultiWorkerStrategy, self).reduce(
                    reduce_op, v, None if scalar else axis)
            return tf.nest.map_structure(one, value)

    return KerasMultiWorkerStrategy()


@contextlib.contextmanager
def dtype_policy(mixed_precision):
    """Train under "mixed_float16" inside the block when asked; the global policy is restored
    on the way out."""
    import keras

    if not mixed_precision:
        yield
        return
    before = keras.mixed_precision.dtype_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)
