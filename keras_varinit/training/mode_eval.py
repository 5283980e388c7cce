"""Batch normalization's train/test discrepancy, measured: the same images with the same
weights, evaluated in training mode (each batch normalized with its own statistics) and in
inference mode (the moving averages).

``evaluate_modes(model, x, y, batch_size)`` runs both through ``model.stateless_call``, so the
training-mode pass leaves the moving averages as they are, and scores them with the model's
compiled loss and accuracy. Layer, instance and group normalization (and no normalization)
compute the same thing in both modes, so their two figures agree; batch normalization's differ
by how far the moving averages are from the batch statistics (Ioffe & Szegedy 2015, Sec. 3.1;
Wu & He 2018, Sec. 2: "BN's error increases rapidly when the batch size becomes smaller").

>>> figures = evaluate_modes(model, x_train[:512], y_train[:512], batch_size=128)  # doctest: +SKIP
>>> figures["train_mode_accuracy"] - figures["train_eval_accuracy"]                 # doctest: +SKIP
"""
import keras
import numpy as np


def logits_in_mode(model, x, batch_size, training):
    """The model's outputs on ``x`` in batches of ``batch_size``, with ``training`` as given;
    the model's variables (moving averages included) are read, never written."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    parts = []
    for start in range(0, len(x), batch_size):
        outputs, _ = model.stateless_call(trainable, non_trainable,
                                          x[start:start + batch_size], training=training)
        parts.append(keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32")))
    return np.concatenate(parts)


def evaluate_modes(model, x, y, batch_size):
    """Loss and accuracy of ``model`` on ``(x, y)`` in both modes:
    ``{"train_mode_loss", "train_mode_accuracy", "train_eval_loss", "train_eval_accuracy"}``
    (training mode, then inference mode; the loss is the model's compiled loss, the accuracy
    the fraction of argmax predictions equal to ``y``)."""
    y = np.asarray(y).reshape(-1)
    out = {}
    for prefix, training in (("train_mode", True), ("train_eval", False)):
        logits = logits_in_mode(model, x, batch_size, training)
        loss = model.loss(y, logits)
        out[f"{prefix}_loss"] = float(keras.ops.convert_to_numpy(loss))
        out[f"{prefix}_accuracy"] = float(np.mean(np.argmax(logits, axis=-1) == y))
    return out
