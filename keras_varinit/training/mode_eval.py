"""Batch normalization's train/test discrepancy, measured: the same images with the same
weights, evaluated in training mode (each batch normalized with its own statistics) and in
inference mode (the moving averages).

``ModeEvaluator(model, batch_size)`` runs both through ``model.stateless_call`` (compiled with
``jax.jit`` or ``tf.function`` on those backends), so the training-mode pass leaves the moving
averages as they are, and scores them with the model's compiled loss and accuracy. Layer,
instance and group normalization (and no normalization) compute the same thing in both modes,
so their two figures agree; batch normalization's differ by how far the moving averages are
from the batch statistics (Ioffe & Szegedy 2015, Sec. 3.1; Wu & He 2018, Sec. 2).

>>> figures = evaluate_modes(model, x_train[:512], y_train[:512], batch_size=128)  # doctest: +SKIP
>>> figures["train_mode_accuracy"] - figures["train_eval_accuracy"]                 # doctest: +SKIP
"""
import keras
import numpy as np

MODES = (("train_mode", True), ("train_eval", False))   # metrics.csv prefix, training flag


def _compiled(function):
    """``function(trainable, non_trainable, x, training)`` compiled for the backend (traced once
    per input shape and mode), or as is where there is no compiler to call."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(function, static_argnames="training")
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, reduce_retracing=True, autograph=False)
    return function


class ModeEvaluator:
    """Evaluates ``model`` in both modes in batches of ``batch_size`` (create it once per model:
    it keeps the compiled forward pass)."""

    def __init__(self, model, batch_size):
        self.model = model
        self.batch_size = int(batch_size)
        self._forward = _compiled(self._stateless_forward)

    def _stateless_forward(self, trainable, non_trainable, x, training):
        outputs, _ = self.model.stateless_call(trainable, non_trainable, x, training=training)
        return keras.ops.cast(outputs, "float32")

    def logits(self, x, training):
        """The outputs on ``x`` with ``training`` as given; the model's variables (moving
        averages included) are read, never written."""
        trainable = [v.value for v in self.model.trainable_variables]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        parts = [keras.ops.convert_to_numpy(self._forward(trainable, non_trainable,
                                                          x[i:i + self.batch_size],
                                                          training=training))
                 for i in range(0, len(x), self.batch_size)]
        return np.concatenate(parts)

    def __call__(self, x, y):
        """``{"train_mode_loss", "train_mode_accuracy", "train_eval_loss",
        "train_eval_accuracy"}`` on ``(x, y)``: training mode, then inference mode (the loss
        is the model's compiled loss, the accuracy the fraction of argmax predictions equal
        to ``y``)."""
        y = np.asarray(y).reshape(-1)
        out = {}
        for prefix, training in MODES:
            logits = self.logits(x, training)
            loss = self.model.loss(y, logits)
            out[f"{prefix}_loss"] = float(keras.ops.convert_to_numpy(loss))
            out[f"{prefix}_accuracy"] = float(np.mean(np.argmax(logits, axis=-1) == y))
        return out


def evaluate_modes(model, x, y, batch_size):
    """``ModeEvaluator(model, batch_size)(x, y)``: one evaluation in both modes."""
    return ModeEvaluator(model, batch_size)(x, y)
