"""Training runs: ``TrainConfig`` and ``run_training``, used by ``keras-varinit train`` and by the
explorer's worker.

A run trains ``models.plain_cnn`` or ``models.plain_mlp`` on CIFAR-10 (or its synthetic stand-in)
with inputs normalized per channel by ``channel_stats(x_train, "pooled")`` (the statistics of the
training subset actually used), and writes a run directory (CONTRIBUTING.md, "A run directory";
writers in ``keras_varinit.run_files``).

Conventions of the files written here:

* ``step`` counts optimizer steps (batches) from the start of the run: the first batch is step 1,
  the state at initialization is step 0 (as in the layer statistics).
* ``epoch`` in ``status.json``, ``steps.jsonl`` and ``metrics.csv`` is 1-based: in ``steps.jsonl``
  and ``status.json`` the epoch being trained (1..epochs), in ``metrics.csv`` the epoch just
  completed. ``status.json`` also carries ``epochs`` (the total) and ``phase``.
* ``loss``/``accuracy`` in ``steps.jsonl`` are Keras's running means over the current epoch (what
  the progress bar shows); ``metrics.csv`` holds the epoch means and the validation metrics.

Interruption: SIGINT (Ctrl-C) or ``stop_event.set()`` ends training after the current batch
(an evaluation in progress is cut short), writes complete logs, state "stopped", and saves the
weights and optimizer state to ``checkpoint/`` (Keras's ``BackupAndRestore`` format). With
``resume=True`` the run goes on from that checkpoint: completed epochs are not repeated; an epoch
that was interrupted restarts its pass over the data from the saved weights, and the log records
of its unfinished part are dropped so that every file stays monotonic in ``step``.

Example:

>>> from keras_varinit.training import TrainConfig, run_training
>>> config = TrainConfig(model="cnn", depth=4, width=8, data="synthetic", subset=256, epochs=1)
>>> result = run_training(config, "runs/demo")        # doctest: +SKIP
>>> result.state, result.metrics["val_accuracy"]      # doctest: +SKIP
"""
import contextlib
import dataclasses
import math
import os
import pathlib
import shutil
import signal
import sys
import threading
import time

from keras_varinit import run_files as rf

MODELS = ("cnn", "mlp")
BATCH_NORMS = (None, "pooled", "per_sample")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
DISTRIBUTES = (None, "mirrored", "multiworker")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu", "elu", "selu", "gelu", "silu", "swish",
               "softplus", "linear")
EXTRA_INITS = ("lsuv",)
NUM_CLASSES = 10
# Synthetic data sizes when no subset is given.
SYNTHETIC_TRAIN = 5000
SYNTHETIC_TEST = 1000


def _allowed_inits():
    try:
        from keras_varinit import initializers

        names = list(getattr(initializers, "NAMES", ()))
    except ImportError:
        names = []
    return names + list(EXTRA_INITS)


def _check_init(name):
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid initializer. Received: init={name!r}. "
                         f"Allowed: {', '.join(_allowed_inits())} (or any Keras initializer name).")
    if name in EXTRA_INITS:
        return
    from keras_varinit import initializers

    try:
        initializers.get(name)
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"Unknown initializer. Received: init={name!r}. "
            f"Allowed: {', '.join(_allowed_inits())} (or any Keras initializer name). "
            f"({error})") from None


def _allowed_activations():
    try:
        from keras_varinit import models

        return tuple(getattr(models, "ACTIVATIONS", ACTIVATIONS))
    except ImportError:
        return ACTIVATIONS


def _check_activation(name):
    allowed = _allowed_activations()
    if name not in allowed:
        raise ValueError(f"Unknown activation. Received: activation={name!r}. "
                         f"Allowed: {', '.join(allowed)}.")


def _check_int(name, value, minimum, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"Invalid {name}. Received: {name}={value!r}. Allowed: {allowed}.")


def _check_float(name, value, minimum=0.0, strict=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= minimum if strict else value < minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"Invalid {name}. Received: {name}={value!r}. "
                         f"Allowed: a finite number {bound}.")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"Invalid {name}. Received: {name}={value!r}. "
                         f"Allowed: {', '.join(repr(a) for a in allowed)}.")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (written to ``config.json``).

    Args:
        model: "cnn" (``plain_cnn``) or "mlp" (``plain_mlp``).
        depth: number of weight layers, >= 2.
        width: channels (CNN) or units (MLP) per hidden layer.
        init: an ``initializers.get`` name ("kaiming_normal", "xavier_normal", "normal:0.01",
            any Keras name), or "lsuv" (orthogonal start, then ``lsuv`` on a training batch).
        activation: a ``keras.activations`` name ("relu", "tanh", ...).
        batch_norm: None, "pooled" or "per_sample" (the BN variance estimator).
        optimizer: "sgd" (with ``momentum``), "adam" or "rmsprop" (with ``momentum``).
        lr: learning rate; momentum: SGD/RMSprop momentum in [0, 1).
        epochs, batch_size: as in ``fit``.
        subset: number of training images (a seeded random subset); None = all.
        val_subset: number of test images used for validation; None = all.
        data: "auto" (``load_cifar10("auto")``), "synthetic", or a path (directory or .tar.gz in
            ``<split>/<class>/<image>`` layout).
        seed: seeds the subset, the weights and the shuffling.
        mixed_precision: train under the "mixed_float16" policy.
        distribute: None, "mirrored" (``tf.distribute.MirroredStrategy`` over all local GPUs, or
            the CPU devices) or "multiworker" (``MultiWorkerMirroredStrategy`` from TF_CONFIG);
            TensorFlow backend only.
        stats_every_n_steps: LayerStatsLogger period (0 disables the layer statistics).
        log_every_n_steps: period of the ``steps.jsonl`` records.
    """

    model: str = "cnn"
    depth: int = 30
    width: int = 16
    init: str = "kaiming_normal"
    activation: str = "relu"
    batch_norm: str | None = None
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = 2
    batch_size: int = 128
    subset: int | None = 10000
    val_subset: int | None = None
    data: str = "auto"
    seed: int = 0
    mixed_precision: bool = False
    distribute: str | None = None
    stats_every_n_steps: int = 50
    log_every_n_steps: int = 1

    def __post_init__(self):
        if self.batch_norm in ("none", "None", ""):
            self.batch_norm = None
        if self.distribute in ("none", "None", ""):
            self.distribute = None
        if self.subset == 0:
            self.subset = None
        if self.val_subset == 0:
            self.val_subset = None
        if isinstance(self.lr, int) and not isinstance(self.lr, bool):
            self.lr = float(self.lr)
        if isinstance(self.momentum, int) and not isinstance(self.momentum, bool):
            self.momentum = float(self.momentum)

    def validate(self):
        """Raise ``ValueError`` ("Received: ... Allowed: ...") on the first bad field."""
        _check_choice("model", self.model, MODELS)
        _check_int("depth", self.depth, 2)
        _check_int("width", self.width, 1)
        _check_init(self.init)
        _check_activation(self.activation)
        _check_choice("batch_norm", self.batch_norm, BATCH_NORMS)
        if self.batch_norm == "per_sample" and self.model == "mlp":
            raise ValueError("Invalid batch_norm for an MLP. Received: batch_norm='per_sample' "
                             "with model='mlp'. Allowed: None or 'pooled' (the per-sample "
                             "estimator needs spatial axes; use model='cnn').")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_float("lr", self.lr)
        _check_float("momentum", self.momentum, 0.0, strict=False)
        if self.momentum >= 1.0:
            raise ValueError(f"Invalid momentum. Received: momentum={self.momentum!r}. "
                             "Allowed: 0 <= momentum < 1.")
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("subset", self.subset, 1, allow_none=True)
        _check_int("val_subset", self.val_subset, 1, allow_none=True)
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"Invalid data. Received: data={self.data!r}. "
                             "Allowed: 'auto', 'synthetic' or a path to CIFAR-10.")
        if self.data not in ("auto", "synthetic") and not os.path.exists(self.data):
            raise FileNotFoundError(
                f"CIFAR-10 data not found. Received: data={self.data!r}. Allowed: 'auto', "
                "'synthetic', or an existing directory / .tar.gz in <split>/<class>/<image> "
                "layout.")
        _check_int("seed", self.seed, 0)
        if not isinstance(self.mixed_precision, bool):
            raise ValueError(f"Invalid mixed_precision. Received: "
                             f"mixed_precision={self.mixed_precision!r}. Allowed: True, False.")
        _check_choice("distribute", self.distribute, DISTRIBUTES)
        _check_int("stats_every_n_steps", self.stats_every_n_steps, 0)
        _check_int("log_every_n_steps", self.log_every_n_steps, 1)
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """Build from a dict (e.g. ``config.json``); extra keys such as "synthetic" and
        "device" are ignored, unknown-but-misspelt keys are not silently accepted."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - names - {"synthetic", "device", "slug", "backend"}
        if extra:
            raise ValueError(f"Unknown TrainConfig keys. Received: {sorted(extra)}. "
                             f"Allowed: {sorted(names)}.")
        return cls(**{k: v for k, v in data.items() if k in names})

    def slug(self):
        """A short name for directories, e.g. "cnn-d30-w16-kaiming_normal-relu-sgd-lr0.01-s0"."""
        init = self.init.replace(":", "").replace("/", "_").replace(" ", "")
        parts = [self.model, f"d{self.depth}", f"w{self.width}", init, self.activation]
        if self.batch_norm:
            parts.append(f"bn_{self.batch_norm}")
        parts += [self.optimizer, f"lr{self.lr:g}"]
        if self.data == "synthetic":
            parts.append("synthetic")
        parts.append(f"s{self.seed}")
        return "-".join(parts)


@dataclasses.dataclass
class TrainResult:
    """What ``run_training`` returns."""

    state: str                     # "finished" | "stopped" | "diverged"
    metrics: dict                  # last completed epoch: loss, accuracy, val_loss, val_accuracy
    history: list                  # metrics.csv rows (dicts)
    run_dir: pathlib.Path
    epochs_completed: int
    step: int
    total_steps: int
    device: str
    synthetic: bool
    seconds: float
    error: str | None = None
    model: object = dataclasses.field(default=None, repr=False, compare=False)
    data: object = dataclasses.field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------- device, strategy

def describe_device():
    """"GPU:0 (<name>)" when a GPU is visible to the backend, else "CPU"."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                name = tf.config.experimental.get_device_details(gpus[0]).get("device_name")
                label = f"GPU:0 ({name})" if name else "GPU:0"
                return label + (f" +{len(gpus) - 1} more" if len(gpus) > 1 else "")
        elif backend == "jax":
            import jax

            gpus = [d for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm")]
            if gpus:
                return f"GPU:0 ({gpus[0].device_kind})" + (
                    f" +{len(gpus) - 1} more" if len(gpus) > 1 else "")
    except Exception:  # noqa: BLE001 - device discovery must never break training
        pass
    return "CPU"


def make_strategy(distribute):
    """The tf.distribute strategy for ``distribute`` (None -> None)."""
    if distribute is None:
        return None
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"distribute={distribute!r} needs the TensorFlow backend. Received: "
                         f"KERAS_BACKEND={keras.backend.backend()!r}. Allowed: "
                         "KERAS_BACKEND=tensorflow, or distribute=None (with JAX use "
                         "keras.distribution).")
    import tensorflow as tf

    if distribute == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        cpus = tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in cpus] or None)
    if distribute == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Invalid distribute. Received: distribute={distribute!r}. "
                     f"Allowed: {DISTRIBUTES}.")


# --------------------------------------------------------------------------- data

def _data_source(config):
    if config.data == "synthetic":
        return "synthetic", None
    if config.data == "auto":
        return "auto", None
    return "dir", config.data


def data_is_synthetic(config):
    """Whether ``config.data`` gives synthetic data (``datasets.resolve_source``)."""
    source, path = _data_source(config)
    if source == "synthetic":
        return True
    from keras_varinit import datasets

    try:
        return datasets.resolve_source(source, path) == "synthetic"
    except Exception:  # noqa: BLE001 - load_data raises the informative error
        return False


def load_data(config):
    """Training and validation arrays for ``config``: float32 NHWC normalized per channel with
    the pooled statistics of the training subset, int32 labels. Returns
    ``(x_train, y_train), (x_val, y_val), info`` with info = {"synthetic", "source", "mean",
    "std"}."""
    import numpy as np

    from keras_varinit import datasets

    synthetic = config.data == "synthetic"
    if synthetic:
        n_train = config.subset or SYNTHETIC_TRAIN
        n_test = config.val_subset or SYNTHETIC_TEST
        (x_train, y_train), (x_test, y_test) = datasets.synthetic_cifar10(
            n_train, n_test, seed=config.seed)
        source = "synthetic"
    else:
        source, path = _data_source(config)
        (x_train, y_train), (x_test, y_test) = datasets.load_cifar10(source, path)
        synthetic = data_is_synthetic(config)
        source = datasets.resolve_source(source, path)

    rng = np.random.default_rng(config.seed)
    y_train = np.asarray(y_train).reshape(-1).astype("int32")
    y_test = np.asarray(y_test).reshape(-1).astype("int32")
    if config.subset is not None and config.subset < len(x_train):
        index = np.sort(rng.permutation(len(x_train))[: config.subset])
        x_train, y_train = x_train[index], y_train[index]
    if config.val_subset is not None and config.val_subset < len(x_test):
        index = np.sort(rng.permutation(len(x_test))[: config.val_subset])
        x_test, y_test = x_test[index], y_test[index]

    try:
        from keras_varinit.channel_stats import channel_stats
    except ImportError:  # pragma: no cover - only while normalization.py is being written
        channel_stats = None
    if channel_stats is not None:
        stats = channel_stats(x_train, estimator="pooled")
        mean = np.asarray(stats.mean, dtype="float64").reshape(-1)
        std = np.asarray(stats.std, dtype="float64").reshape(-1)
    else:
        axes = tuple(range(np.ndim(x_train) - 1))
        mean = np.asarray(x_train, dtype="float64").mean(axis=axes)
        std = np.asarray(x_train, dtype="float64").std(axis=axes)
    std = np.where(std > 0, std, 1.0)

    def normalize(x):
        return ((np.asarray(x, dtype="float32") - mean.astype("float32"))
                / std.astype("float32")).astype("float32")

    info = {"synthetic": bool(synthetic), "source": source,
            "mean": mean.tolist(), "std": std.tolist()}
    return (normalize(x_train), y_train), (normalize(x_test), y_test), info


# --------------------------------------------------------------------------- model

def build(config, input_shape):
    """The model (uncompiled) for ``config``; "lsuv" starts orthogonal (LSUV runs later)."""
    from keras_varinit import models

    init = "orthogonal" if config.init == "lsuv" else config.init
    kwargs = dict(kind=config.model, depth=config.depth, width=config.width,
                  kernel_initializer=init, activation=config.activation,
                  batch_norm=config.batch_norm, num_classes=NUM_CLASSES, seed=config.seed)
    build_model = getattr(models, "build_model", None)
    if build_model is not None:
        return build_model(input_shape=input_shape, **kwargs)
    kwargs.pop("kind")
    kwargs.pop("seed")
    if config.model == "cnn":
        return models.plain_cnn(input_shape=input_shape, **kwargs)
    return models.plain_mlp(input_dim=int(math.prod(input_shape)), **kwargs)


def make_optimizer(config):
    import keras

    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=config.lr, momentum=config.momentum)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=config.lr)
    return keras.optimizers.RMSprop(learning_rate=config.lr, momentum=config.momentum)


def _fit_inputs(model, x):
    """Reshape NHWC images to what the model takes (flat vectors for an MLP on (N, 3072))."""
    shape = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    if shape and len(shape) == 1 and x.ndim > 2:
        return x.reshape(len(x), -1)
    return x


# --------------------------------------------------------------------------- callbacks

def _make_callback_classes():
    import keras
    import numpy as np

    class RunControl(keras.callbacks.Callback):
        """status.json / steps.jsonl / metrics.csv writer, NaN detector and stop handling."""

        def __init__(self, run, status, steps_writer, metrics_writer, stop_requested,
                     steps_per_epoch, epochs, batch_size, log_every, verbose):
            super().__init__()
            self.run = run
            self.status = status
            self.steps_writer = steps_writer
            self.metrics_writer = metrics_writer
            self.stop_requested = stop_requested
            self.steps_per_epoch = steps_per_epoch
            self.epochs = epochs
            self.batch_size = batch_size
            self.log_every = log_every
            self.verbose = verbose
            self.throughput = rf.Throughput()
            self.epoch = 0
            self.step = 0
            self.epoch_start_step = 0
            self.total_steps = epochs * steps_per_epoch
            self.batches_in_epoch = 0
            self.epoch_interrupted = False
            self.eval_cut = False
            self._epoch_start = None

        def on_train_begin(self, logs=None):
            start_epoch = getattr(self.model, "_initial_epoch", None) or 0
            try:
                start_step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            except Exception:  # noqa: BLE001
                start_step = start_epoch * self.steps_per_epoch
            self.step = start_step
            self.total_steps = start_step + (self.epochs - start_epoch) * self.steps_per_epoch
            self.run.update(start_epoch=start_epoch, start_step=start_step, step=start_step,
                            total_steps=self.total_steps)
            self.epoch = start_epoch
            self.status.update(state="running", phase="training", epoch=start_epoch + 1,
                               step=start_step, total_steps=self.total_steps)

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            self.batches_in_epoch = 0
            self.epoch_start_step = self.step
            self.epoch_interrupted = False
            self.eval_cut = False
            self._epoch_start = time.perf_counter()
            self.throughput.reset_window()
            self.status.update(epoch=epoch + 1, phase="training")

        def on_train_batch_end(self, batch, logs=None):
            logs = logs or {}
            self.batches_in_epoch = batch + 1
            step = self.step = self.epoch_start_step + batch + 1
            self.run["step"] = step
            self.throughput.batch_end(step)
            loss = logs.get("loss")
            loss = float(np.asarray(loss)) if loss is not None else None
            if step % self.log_every == 0 or self.batches_in_epoch == self.steps_per_epoch:
                acc = logs.get("accuracy", logs.get("compile_metrics"))
                try:
                    acc = float(np.asarray(acc)) if acc is not None else None
                except (TypeError, ValueError):
                    acc = None
                self.steps_writer.write({"step": step, "epoch": self.epoch + 1,
                                         "loss": loss, "accuracy": acc})
            self.status.update(
                step=step,
                images_per_second=self.throughput.images_per_second(self.batch_size),
                eta_seconds=self.throughput.eta_seconds(step, self.total_steps))
            if loss is not None and not math.isfinite(loss):
                self.run["state"] = "diverged"
                self.run["error"] = (f"loss became {loss} at step {step} "
                                     f"(epoch {self.epoch + 1}); training stopped")
                if self.verbose:
                    print(f"\nDiverged: {self.run['error']}", flush=True)
                self.epoch_interrupted = self.batches_in_epoch < self.steps_per_epoch
                self.model.stop_training = True
            elif self.stop_requested():
                self.run["state"] = "stopped"
                self.epoch_interrupted = self.batches_in_epoch < self.steps_per_epoch
                self.model.stop_training = True

        def on_test_begin(self, logs=None):
            self.status.update(phase="validation")

        def on_test_batch_end(self, batch, logs=None):
            if self.run.get("state") in ("stopped", "diverged") or self.stop_requested():
                if self.run.get("state") is None:
                    self.run["state"] = "stopped"
                self.eval_cut = True
                self.model.stop_evaluating = True
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            if self.epoch_interrupted:
                return  # a partial epoch gets no metrics.csv row
            self.run["epochs_completed"] = epoch + 1
            row = {"epoch": epoch + 1,
                   "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
                   "val_loss": None if self.eval_cut else logs.get("val_loss"),
                   "val_accuracy": None if self.eval_cut else logs.get("val_accuracy"),
                   "seconds": round(time.perf_counter() - self._epoch_start, 3)}
            row = {k: (float(np.asarray(v)) if v is not None and k != "epoch" else v)
                   for k, v in row.items()}
            self.metrics_writer.write(row)
            self.run["last_metrics"] = row
            if self.stop_requested() and self.run.get("state") is None:
                self.run["state"] = "stopped"
                self.model.stop_training = True

    class Checkpoint(keras.callbacks.BackupAndRestore):
        """BackupAndRestore that also saves when a run is stopped mid-epoch (marking the epoch
        as unfinished), never saves a diverged state, and deletes the checkpoint only when the
        run finished."""

        def __init__(self, backup_dir, control, run):
            super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=True)
            self.control = control
            self.run = run

        def on_epoch_end(self, epoch, logs=None):
            if self.run.get("state") == "diverged":
                return
            if self.control.epoch_interrupted:
                self._current_epoch = epoch          # this epoch is not finished
                self._last_batch_seen = self.control.batches_in_epoch
                self._save_model()
                return
            super().on_epoch_end(epoch, logs)

        def on_train_end(self, logs=None):
            if self.run.get("state") in (None, "finished"):
                super().on_train_end(logs)

    return RunControl, Checkpoint


# --------------------------------------------------------------------------- the run

def _tensorboard_callback(log_dir):
    """keras.callbacks.TensorBoard when TensorFlow is importable (it needs tf.summary); else
    epoch metrics through tensorboard's TF-free writer (JAX without TensorFlow)."""
    import keras

    try:
        import tensorflow  # noqa: F401

        return keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False)
    except ImportError:
        pass

    class EpochScalars(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.writers = None

        def on_train_begin(self, logs=None):
            try:
                from tensorboard.summary import Writer

                self.writers = {split: Writer(str(pathlib.Path(log_dir) / split))
                                for split in ("train", "validation")}
            except ImportError:
                self.writers = None

        def on_epoch_end(self, epoch, logs=None):
            if not self.writers:
                return
            for key, value in (logs or {}).items():
                split = "validation" if key.startswith("val_") else "train"
                name = "epoch_" + (key[4:] if split == "validation" else key)
                try:
                    self.writers[split].add_scalar(name, float(value), step=epoch)
                except (TypeError, ValueError):
                    continue
            for writer in self.writers.values():
                writer.flush()

        def on_train_end(self, logs=None):
            for writer in (self.writers or {}).values():
                writer.close()

    return EpochScalars()


def _prepare_run_dir(config, run_dir, resume, overwrite):
    """Create ``run_dir``; refuse one that holds a different run unless resume/overwrite."""
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"Run directory is a file. Received: run_dir={str(run_dir)!r}. "
                         "Allowed: a new or existing directory.")
    existing = rf.read_json(run_dir / rf.CONFIG_FILE)
    status = rf.read_json(run_dir / rf.STATUS_FILE) or {}
    if overwrite:
        for name in rf.RUN_FILES:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, False
    if existing is not None:
        try:
            same = TrainConfig.from_dict(existing).to_dict() == config.to_dict()
        except (TypeError, ValueError):
            same = False
        if not same:
            diff = ""
            if isinstance(existing, dict):
                keys = [k for k, v in config.to_dict().items() if existing.get(k) != v]
                diff = " (differs in: " + ", ".join(keys) + ")" if keys else ""
            raise ValueError(
                f"Run directory already holds a different run{diff}. Received: "
                f"run_dir={str(run_dir)!r}. Allowed: a new directory, or overwrite=True "
                "(--overwrite) to replace that run.")
        state = status.get("state")
        if not resume and state not in (None, "queued"):
            raise ValueError(
                f"Run directory already holds this run (state {state!r}). Received: "
                f"run_dir={str(run_dir)!r}. Allowed: resume=True (--resume) to continue it, "
                "overwrite=True (--overwrite) to start over, or a new directory.")
        if state == "running" and resume:
            age = None
            try:
                age = time.time() - (run_dir / rf.STATUS_FILE).stat().st_mtime
            except OSError:
                pass
            if age is not None and age < 10:
                raise RuntimeError(f"Run in {str(run_dir)!r} is still running (status.json "
                                   f"updated {age:.0f} s ago); stop it before resuming.")
        return run_dir, resume and state not in (None, "queued")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, False


class _StopFlag:
    """stop_event and/or SIGINT; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self, stop_event, verbose):
        self.stop_event = stop_event
        self.verbose = verbose
        self.sigint = False
        self._previous = None
        self._installed = False

    def __call__(self):
        return self.sigint or (self.stop_event is not None and self.stop_event.is_set())

    def _handler(self, signum, frame):
        if self.sigint:
            raise KeyboardInterrupt
        self.sigint = True
        if self.verbose:
            print("\nInterrupted: stopping after the current batch (or before training starts) "
                  "(Ctrl-C again to abort at once).", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except (ValueError, OSError):
                self._installed = False
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _row_floats(row):
    out = {}
    for key, value in row.items():
        try:
            out[key] = int(value) if key == "epoch" else (float(value) if value != "" else None)
        except (TypeError, ValueError):
            out[key] = value
    return out


def run_training(config, run_dir, *, resume=False, overwrite=False, stop_event=None,
                 callbacks=(), verbose=1, keep_data=False):
    """Train ``config`` and write the run directory ``run_dir``; returns a ``TrainResult``.

    Args:
        config: a ``TrainConfig`` (or a dict for ``TrainConfig.from_dict``).
        run_dir: the run directory (created if needed).
        resume: continue the run already in ``run_dir`` from its checkpoint.
        overwrite: replace whatever run ``run_dir`` holds.
        stop_event: a ``threading.Event``; setting it stops after the current batch.
        callbacks: extra Keras callbacks for ``fit``.
        verbose: 0 silent, 1 progress bar and summary lines, 2 one line per epoch.
        keep_data: also return the normalized arrays in ``result.data``
            (``((x_train, y_train), (x_val, y_val))``); ``result.model`` is the trained model.

    Raises:
        ValueError: a bad config, or a run directory holding a different run.
        FileNotFoundError / RuntimeError: data that cannot be found or loaded.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()
    run_dir, resuming = _prepare_run_dir(config, run_dir, resume, overwrite)
    started = time.perf_counter()
    previous = rf.read_json(run_dir / rf.STATUS_FILE) or {}
    if resuming and previous.get("state") == "finished":
        history = [_row_floats(r) for r in rf.MetricsCsv(run_dir / rf.METRICS_FILE).read()]
        if verbose:
            print(f"keras-varinit: the run in {run_dir} has already finished; nothing to resume.",
                  flush=True)
        saved = rf.read_json(run_dir / rf.CONFIG_FILE) or {}
        return TrainResult(
            state="finished", metrics=dict(history[-1]) if history else {},
            history=history, run_dir=run_dir, epochs_completed=len(history),
            step=previous.get("step") or 0, total_steps=previous.get("total_steps") or 0,
            device=previous.get("device") or "CPU", synthetic=bool(saved.get("synthetic")),
            seconds=0.0, error=None)
    total_guess = None
    status = rf.StatusWriter(
        run_dir / rf.STATUS_FILE, state="running", phase="starting", epoch=0, step=0,
        total_steps=total_guess, images_per_second=None, eta_seconds=None, device=None,
        started_at=(previous.get("started_at") if resuming else None) or rf.utc_now(),
        error=None, epochs=config.epochs).start()
    run = {"state": None, "error": None, "step": 0, "epochs_completed": 0, "last_metrics": None}
    info = {"synthetic": config.data == "synthetic"}
    device = "CPU"
    policy_before = None
    # SIGINT / stop_event are honoured from here on: during data loading and model building
    # the run ends before training starts; during fit after the current batch.
    stop_flag = _StopFlag(stop_event, verbose).__enter__()
    try:
        import keras

        strategy = make_strategy(config.distribute)  # first: MultiWorker wants it early
        device = describe_device()
        status.update(device=device, phase="loading data")
        if verbose:
            print(f"keras-varinit: training on {device} (backend {keras.backend.backend()}"
                  + (f", distribute={config.distribute}" if config.distribute else "")
                  + (", mixed_float16" if config.mixed_precision else "") + ")", flush=True)

        config_record = dict(config.to_dict(), synthetic=data_is_synthetic(config),
                             device=device, backend=keras.backend.backend(), slug=config.slug())
        rf.write_json_atomic(run_dir / rf.CONFIG_FILE, config_record)
        (x_train, y_train), (x_val, y_val), info = load_data(config)
        if info["synthetic"] != config_record["synthetic"]:
            config_record["synthetic"] = info["synthetic"]
            rf.write_json_atomic(run_dir / rf.CONFIG_FILE, config_record)
        if verbose and info["synthetic"]:
            print("keras-varinit: using SYNTHETIC CIFAR-shaped data (not CIFAR-10)", flush=True)

        steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        status.update(total_steps=total_steps, phase="building model")

        if config.mixed_precision:
            policy_before = keras.mixed_precision.dtype_policy().name
            keras.mixed_precision.set_global_policy("mixed_float16")
        keras.utils.set_random_seed(config.seed)

        def build_and_compile():
            model = build(config, x_train.shape[1:])
            if config.init == "lsuv":
                from keras_varinit import initializers

                batch = _fit_inputs(model, x_train[: max(config.batch_size, 256)])
                initializers.lsuv(model, batch)
            model.compile(
                optimizer=make_optimizer(config),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
            return model

        if strategy is not None:
            with strategy.scope():
                model = build_and_compile()
        else:
            model = build_and_compile()
        x_train = _fit_inputs(model, x_train)
        x_val = _fit_inputs(model, x_val)

        steps_path = run_dir / rf.STEPS_FILE
        metrics = rf.MetricsCsv(run_dir / rf.METRICS_FILE)
        layer_stats_path = run_dir / rf.LAYER_STATS_FILE
        checkpoint_dir = run_dir / rf.CHECKPOINT_DIR
        if resuming:
            meta = rf.read_json(checkpoint_dir / "training_metadata.json") or {}
            done_epochs = int(meta.get("epoch", 0))
            # Step of the checkpoint: completed epochs plus the batches of an interrupted one.
            keep_step = done_epochs * steps_per_epoch + int(meta.get("batch", 0) or 0)
            if not checkpoint_dir.exists():
                keep_step, done_epochs = 0, 0
            rf.truncate_jsonl(steps_path, lambda r: (r.get("step") or 0) <= keep_step)
            rf.truncate_jsonl(layer_stats_path, lambda r: (r.get("step") or 0) < keep_step)
            metrics.truncate(done_epochs)
            if verbose:
                print(f"keras-varinit: resuming from {checkpoint_dir} at epoch "
                      f"{done_epochs + 1}/{config.epochs}, step {keep_step}", flush=True)
        else:
            for path in (steps_path, layer_stats_path, run_dir / rf.METRICS_FILE):
                if path.exists():
                    path.unlink()
            if checkpoint_dir.exists():
                shutil.rmtree(checkpoint_dir)

        RunControl, Checkpoint = _make_callback_classes()
        with contextlib.nullcontext():
            control = RunControl(run, status, rf.JsonlWriter(steps_path), metrics, stop_flag,
                                 steps_per_epoch, config.epochs, config.batch_size,
                                 config.log_every_n_steps, verbose)
            cbs = [Checkpoint(str(checkpoint_dir), control, run), control]
            if config.stats_every_n_steps:
                from keras_varinit.callbacks import LayerStatsLogger

                probe_n = min(len(x_train), 128)
                cbs.append(LayerStatsLogger(
                    probe=(x_train[:probe_n], y_train[:probe_n]),
                    log_dir=str(run_dir / rf.TENSORBOARD_DIR),
                    every_n_steps=config.stats_every_n_steps,
                    jsonl_path=str(layer_stats_path)))
            cbs.append(_tensorboard_callback(run_dir / rf.TENSORBOARD_DIR))
            cbs.extend(callbacks)
            # The model must be built before BackupAndRestore restores weights.
            if not model.built:
                model.build((None,) + tuple(x_train.shape[1:]))
            if stop_flag():
                run["state"] = "stopped"  # asked to stop before training started
            else:
                model.fit(x_train, y_train, batch_size=config.batch_size,
                          epochs=config.epochs, validation_data=(x_val, y_val),
                          callbacks=cbs, verbose=verbose, shuffle=True)
        state = run["state"] or "finished"
        if state == "stopped" and verbose:
            print(f"keras-varinit: stopped at step {run['step']}; checkpoint in "
                  f"{checkpoint_dir} (continue with --resume)", flush=True)
        history = [_row_floats(row) for row in metrics.read()]
        result = TrainResult(
            state=state, metrics=dict(run["last_metrics"] or {}), history=history,
            run_dir=run_dir, epochs_completed=len(history), step=run["step"],
            total_steps=run.get("total_steps", total_steps), device=device,
            synthetic=info["synthetic"],
            seconds=time.perf_counter() - started, error=run["error"], model=model,
            data=((x_train, y_train), (x_val, y_val)) if keep_data else None)
        status.close(state=state, phase="done", error=run["error"],
                     step=run["step"], eta_seconds=0.0 if state == "finished" else None)
        return result
    except KeyboardInterrupt:
        status.close(state="stopped", phase="done", error="aborted by a second Ctrl-C (KeyboardInterrupt)",
                     step=run["step"])
        raise
    except BaseException as error:
        status.close(state="failed", phase="done", step=run["step"],
                     error=f"{type(error).__name__}: {error}")
        raise
    finally:
        stop_flag.__exit__(None, None, None)
        if policy_before is not None:
            import keras

            keras.mixed_precision.set_global_policy(policy_before)
