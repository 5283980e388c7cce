"""Public layers: ``kv.layers``. `BatchNormalization` with a choice of variance estimator.

`BatchNormalization` is a drop-in for `keras.layers.BatchNormalization` (it subclasses it): same
arguments, defaults and training/inference semantics (Keras's own BatchNormalization tests pass
against it: tests/test_keras_bn_suite.py), plus

* `variance_estimator`: `"pooled"` (Keras's, the default) or `"per_sample"`;
* `moving_variance`: `"biased"` (Keras's) or `"unbiased"` (PyTorch's `n / (n - 1)`);
* `synchronized=True` for both estimators under a `tf.distribute` strategy;
* a fast path on the TensorFlow backend, `keras_varinit.fused_batch_norm_tf`: TF's fused
  batch-norm kernel for 4D channels-last inputs (and large Dense-style ones), which removes most
  of the cost that Keras's op-by-op batch norm adds to a conv net on CPU. Everything else (JAX,
  masked training, `synchronized`, `axis != -1`, other ranks) runs the portable `keras.ops`
  path in this file; the two give the same numbers (tested).

>>> import keras_varinit as kv
>>> bn = kv.layers.BatchNormalization(variance_estimator="per_sample")
"""
import keras
from keras import ops

from keras_varinit.checks import check_choice

__all__ = ["BatchNormalization", "PER_SAMPLE_TINY", "VARIANCE_ESTIMATORS", "MOVING_VARIANCES"]

VARIANCE_ESTIMATORS = ("pooled", "per_sample")
MOVING_VARIANCES = ("biased", "unbiased")

#: Added to each per-sample variance before its square root, so that the gradient of
#: sqrt(var_{n,c}) stays finite on a constant feature map (var = 0). Far below float32
#: resolution for any variance that is not itself ~0.
PER_SAMPLE_TINY = 1e-12


@keras.saving.register_keras_serializable(package="keras_varinit")
class BatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with a choice of variance estimator.

    In training (`training=True` and the layer trainable), per channel c:

        y = gamma_c * (x - mean_c) / sqrt(var_c + epsilon) + beta_c

    with `mean_c` the mean over all values of channel c in the batch (N * spatial), and

    * `variance_estimator="pooled"` (default, identical to `keras.layers.BatchNormalization`):
      `var_c = mean over N * spatial of (x - mean_c)^2`;
    * `variance_estimator="per_sample"`: each sample's own standard deviation over its spatial
      positions (around its own mean), averaged over the batch, squared:
      `var_c = (mean_n sqrt(var_{n,c} + PER_SAMPLE_TINY))^2`. It leaves out the spread between
      sample means, so it is smaller than the pooled variance. It needs spatial axes (an input
      of rank >= 3); gradients flow through it.

    The moving averages (used at inference, and by a frozen layer) are updated as
    `moving = momentum * moving + (1 - momentum) * stat`, where for the variance `stat` is
    `var_c` (`moving_variance="biased"`, Keras's behaviour) or `var_c * n / (n - 1)`
    (`"unbiased"`, PyTorch's), with n the number of values the statistic is computed over:
    N * spatial for "pooled" (the number of unmasked values with a mask); for "per_sample" the
    number of spatial positions of one sample, H * W (with a mask: the mean number of unmasked
    positions per sample that has any), since each per-sample variance is computed over them.
    Normalization in training always uses the biased `var_c`.

    `synchronized=True` (TensorFlow backend) computes the statistics over the global batch under
    a `tf.distribute` strategy, for both estimators (all-reduced sums of values, squares,
    per-sample standard deviations and counts).

    A mask (Keras's convention: the shape of the inputs without their last axis, whichever
    `axis` is normalized) leaves the masked values out of the training statistics, for both
    estimators and every `axis`; at inference it is ignored, as by Keras's layer.

    Keras's own BatchNormalization tests pass against this layer on TensorFlow and JAX
    (tests/test_keras_bn_suite.py). It refuses only what Keras's layer does not have:
    `renorm=True` with a non-default `variance_estimator` or `moving_variance` (batch
    renormalization corrects the pooled, biased statistics), and `"per_sample"` without spatial
    axes or along the batch axis.

    Args:
        axis, momentum, epsilon, center, scale, *_initializer, *_regularizer, *_constraint,
            synchronized, renorm, renorm_clipping, renorm_momentum: as in
            `keras.layers.BatchNormalization` (renorm only with the pooled/biased defaults).
        variance_estimator: `"pooled"` or `"per_sample"`.
        moving_variance: `"biased"` or `"unbiased"`.

    Example:

    >>> import numpy as np
    >>> import keras_varinit as kv
    >>> layer = kv.layers.BatchNormalization(variance_estimator="per_sample")
    >>> y = layer(np.random.rand(8, 4, 4, 3).astype("float32"), training=True)

    Reference: Ioffe and Szegedy, "Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift", ICML 2015, https://arxiv.org/abs/1502.03167.
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        variance_estimator="pooled",
        moving_variance="biased",
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        **kwargs,
    ):
        check_choice("variance_estimator", variance_estimator, VARIANCE_ESTIMATORS)
        check_choice("moving_variance", moving_variance, MOVING_VARIANCES)
        if renorm and (variance_estimator != "pooled" or moving_variance != "biased"):
            raise ValueError(
                "renorm=True is only supported with variance_estimator='pooled' and "
                "moving_variance='biased'. Received: "
                f"variance_estimator={variance_estimator!r}, "
                f"moving_variance={moving_variance!r}."
            )
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            renorm=renorm,
            renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum,
            synchronized=synchronized,
            **kwargs,
        )
        self.variance_estimator = variance_estimator
        self.moving_variance_mode = moving_variance

    # ------------------------------------------------------------------ build / config
    def build(self, input_shape):
        ndim = len(input_shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"Axis {self.axis} is out of bounds for input shape {tuple(input_shape)}. "
                f"Received: axis={self.axis}"
            )
        self._axis_pos = self.axis % ndim
        if self.variance_estimator == "per_sample":
            if ndim < 3:
                raise ValueError(
                    "variance_estimator='per_sample' needs inputs with spatial axes (rank >= 3, "
                    "e.g. (N, H, W, C)): each sample's standard deviation is taken over its "
                    "spatial positions, and an input of rank 2 has one value per sample and "
                    f"channel. Received: input_shape={tuple(input_shape)}. Use "
                    "variance_estimator='pooled' after Dense layers."
                )
            if self._axis_pos == 0:
                raise ValueError(
                    "variance_estimator='per_sample' normalizes a feature axis other than the "
                    f"batch axis 0. Received: axis={self.axis} for input_shape="
                    f"{tuple(input_shape)}."
                )
            spatial = [input_shape[a] for a in range(1, ndim) if a != self._axis_pos]
            if all(d == 1 for d in spatial):
                raise ValueError(
                    "variance_estimator='per_sample' needs more than one spatial position: a "
                    "sample's standard deviation over a single position is 0, and dividing by "
                    f"it would multiply the signal by 1/sqrt(epsilon). Received: input_shape="
                    f"{tuple(input_shape)} (1 position per sample). Use "
                    "variance_estimator='pooled' on 1x1 maps (the last stage of a CIFAR-sized "
                    "net, squeeze-and-excitation blocks)."
                )
        super().build(input_shape)
        self._spatial_axes = [a for a in range(ndim) if a not in (0, self._axis_pos)]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "variance_estimator": self.variance_estimator,
                "moving_variance": self.moving_variance_mode,
            }
        )
        return config

    # ------------------------------------------------------------------ call
    def call(self, inputs, training=None, mask=None):
        if self.renorm:
            return super().call(inputs, training=training, mask=mask)
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. Received: "
                f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        use_batch_stats = bool(training and self.trainable)
        if keras.backend.backend() == "tensorflow":
            from keras_varinit import fused_batch_norm_tf  # imports TensorFlow

            outputs = fused_batch_norm_tf.call(self, inputs, mask, use_batch_stats)
            if outputs is not None:
                return outputs
        return self._call_portable(inputs, use_batch_stats, mask)

    def _update_moving(self, mean, variance, n):
        """`moving = momentum * moving + (1 - momentum) * stat`, where for the variance `stat`
        is `variance` ("biased") or `variance * n / (n - 1)` ("unbiased"), n the number of
        values each channel's variance was computed over (a scalar or one per channel)."""
        if self.moving_variance_mode == "unbiased":
            n = ops.cast(n, variance.dtype)
            variance = variance * (n / ops.maximum(n - 1.0, 1.0))
        moving_mean = ops.cast(self.moving_mean, mean.dtype)
        moving_variance = ops.cast(self.moving_variance, variance.dtype)
        self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )

    # ------------------------------------------------------------------ portable path
    def _call_portable(self, inputs, use_batch_stats, mask):
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        # As Keras: statistics and normalization in (at least) float32.
        inputs = ops.cast(inputs, compute_dtype)
        gamma = ops.cast(self.gamma, inputs.dtype) if self.scale else None
        beta = ops.cast(self.beta, inputs.dtype) if self.center else None
        if use_batch_stats:
            if self.variance_estimator == "pooled":
                mean, variance, n = self._pooled_moments(inputs, mask)
            else:
                mean, variance, n = self._per_sample_moments(inputs, mask)
            self._update_moving(mean, variance, n)
        else:
            mean = ops.cast(self.moving_mean, inputs.dtype)
            variance = ops.cast(self.moving_variance, inputs.dtype)
        outputs = ops.batch_normalization(
            x=inputs,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=beta,
            scale=gamma,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)

    def _reduced_count(self, x):
        """Number of values per channel: the product of the non-channel dimensions."""
        shape = ops.shape(x)
        n = 1
        for a in self._reduction_axes:
            n = n * shape[a]
        return n

    def _mask_weights(self, inputs, mask):
        """The mask broadcast to `inputs` (booleans). As everywhere in Keras, a mask has the
        shape of the inputs without their last axis, whichever axis is normalized."""
        weights = ops.expand_dims(ops.cast(mask, "bool"), axis=-1)
        return ops.broadcast_to(weights, ops.shape(inputs))

    def _pooled_moments(self, inputs, mask):
        if mask is None:
            # Exactly Keras's computation (incl. its all-reduce when synchronized).
            mean, variance = ops.moments(
                inputs, axes=self._reduction_axes, synchronized=self.synchronized
            )
            if self.moving_variance_mode == "biased":
                return mean, variance, None
            n = self._reduced_count(inputs)
            if self.synchronized:
                n = _all_reduce_sum(ops.cast(n, "float32"))
            return mean, variance, n
        # Masked: Keras's formulas (epsilon in the denominators included); with
        # synchronized=True the sums are also all-reduced (Keras ignores it here).
        weights = self._mask_weights(inputs, mask)
        masked = ops.where(weights, inputs, 0)
        wsum = ops.sum(ops.cast(weights, inputs.dtype), self._reduction_axes, keepdims=True)
        xsum = ops.sum(masked, self._reduction_axes, keepdims=True)
        if self.synchronized:
            xsum, wsum = _all_reduce_sum(xsum, wsum)
        mean = xsum / (wsum + keras.backend.epsilon())
        sq = ops.sum(
            ops.square(ops.where(weights, inputs - mean, 0)), self._reduction_axes, keepdims=True
        )
        if self.synchronized:
            sq = _all_reduce_sum(sq)
        variance = sq / (wsum + keras.backend.epsilon())
        # One count per channel: with axis != -1 the mask differs between channels.
        channels = (-1,)
        return (
            ops.reshape(mean, channels),
            ops.reshape(variance, channels),
            ops.reshape(wsum, channels),
        )

    def _per_sample_moments(self, inputs, mask):
        spatial = self._spatial_axes
        batch_and_spatial = [0] + spatial
        if mask is None:
            m = ops.mean(inputs, axis=spatial, keepdims=True)
            v = ops.mean(ops.square(inputs - m), axis=spatial, keepdims=True)
            s = ops.sqrt(v + PER_SAMPLE_TINY)
            n = 1
            shape = ops.shape(inputs)
            for a in spatial:
                n = n * shape[a]
            if not self.synchronized:
                mean = ops.mean(m, axis=batch_and_spatial)
                std = ops.mean(s, axis=batch_and_spatial)
                return mean, ops.square(std), n
            # Global batch: sum of per-sample means (equal weights) and of per-sample stds.
            count = ops.cast(ops.shape(inputs)[0], inputs.dtype)
            msum = ops.sum(m, axis=batch_and_spatial)
            ssum = ops.sum(s, axis=batch_and_spatial)
            msum, ssum, count = _all_reduce_sum(msum, ssum, count)
            std = ssum / count
            return msum / count, ops.square(std), n
        # Masked: each sample's statistics over its unmasked positions; samples with no
        # unmasked position are left out of the average of standard deviations.
        weights = self._mask_weights(inputs, mask)
        w = ops.cast(weights, inputs.dtype)
        wn = ops.sum(w, axis=spatial, keepdims=True)  # (N, 1.., C)
        xn = ops.sum(ops.where(weights, inputs, 0), axis=spatial, keepdims=True)
        m = xn / ops.maximum(wn, 1.0)
        v = ops.sum(ops.square(ops.where(weights, inputs - m, 0)), axis=spatial, keepdims=True)
        v = v / ops.maximum(wn, 1.0)
        s = ops.sqrt(v + PER_SAMPLE_TINY)
        valid = ops.cast(wn > 0, inputs.dtype)
        sums = [
            ops.sum(xn, axis=batch_and_spatial),
            ops.sum(wn, axis=batch_and_spatial),
            ops.sum(s * valid, axis=batch_and_spatial),
            ops.sum(valid, axis=batch_and_spatial),
        ]
        if self.synchronized:
            sums = _all_reduce_sum(*sums)
        xsum, wsum, ssum, nvalid = sums
        mean = xsum / (wsum + keras.backend.epsilon())
        std = ssum / ops.maximum(nvalid, 1.0)
        n = wsum / ops.maximum(nvalid, 1.0)  # per channel: mean unmasked positions per sample
        return mean, ops.square(std), n


def _all_reduce_sum(*tensors):
    """Sum over the replicas of a tf.distribute strategy (identity outside one)."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        out = tensors
    else:
        out = [ctx.all_reduce(tf.distribute.ReduceOp.SUM, t) for t in tensors]
    return out[0] if len(out) == 1 else tuple(out)
