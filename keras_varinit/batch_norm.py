"""Batch normalization with a choice of variance estimator (pooled or per-sample).

`BatchNormalization` is a drop-in for `keras.layers.BatchNormalization` (it subclasses it): same
arguments, defaults and training/inference semantics, plus

* `variance_estimator`: `"pooled"` (Keras's, the default) or `"per_sample"`;
* `moving_variance`: `"biased"` (Keras's) or `"unbiased"` (PyTorch's `n / (n - 1)`);
* `synchronized=True` for both estimators under a `tf.distribute` strategy;
* a fast path on the TensorFlow backend: TF's fused batch-norm kernel (`FusedBatchNormV3`) for
  4D channels-last inputs, which removes most of the cost that Keras's op-by-op batch norm adds
  to a conv net on CPU, and for Dense-style (N, C) inputs viewed as (N, 1, 1, C); in training
  the kernel also updates the moving averages. Everything else (JAX, masks, `synchronized`,
  `axis != -1`, other ranks) runs the portable `keras.ops` path; the two give the same numbers
  (tested).
"""
import keras
from keras import ops

__all__ = ["BatchNormalization", "PER_SAMPLE_TINY", "VARIANCE_ESTIMATORS", "MOVING_VARIANCES"]

VARIANCE_ESTIMATORS = ("pooled", "per_sample")
MOVING_VARIANCES = ("biased", "unbiased")

#: Added to each per-sample variance before its square root, so that the gradient of
#: sqrt(var_{n,c}) stays finite on a constant feature map (var = 0). Far below float32
#: resolution for any variance that is not itself ~0.
PER_SAMPLE_TINY = 1e-12

# FusedBatchNormV3 input types (scale, offset, mean and variance are always float32).
_FUSED_DTYPES = ("float32", "float16")
# cuDNN's minimum epsilon; tf.compat.v1.nn.fused_batch_norm clamps to it. Below it we do not
# use the fused kernel, so that results never depend on the device.
_FUSED_MIN_EPSILON = 1.001e-5
# Dense-style (N, C) inputs go through the fused kernel (as (N, 1, 1, C)) only from this many
# values (N * C, batch size known when traced) on: below it the kernel's fixed cost made a
# training step slower than the op-by-op path on CPU (0.63 vs 0.44 ms for (128, 512)), from it
# on faster (0.82-0.91 vs 0.92-1.17 ms at 2**17 values, 1.4 vs 1.9 ms for (1024, 512));
# `benchmarks/bench_batchnorm.py --layer`, figures in benchmarks/RESULTS.md.
_FUSED_DENSE_MIN_SIZE = 2**17


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(
            f"Invalid value for argument `{name}`. Received: {name}={value!r}. "
            f"Allowed: {', '.join(repr(a) for a in allowed)}."
        )


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
        _check_choice("variance_estimator", variance_estimator, VARIANCE_ESTIMATORS)
        _check_choice("moving_variance", moving_variance, MOVING_VARIANCES)
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
        if self._can_use_fused(inputs, mask, use_batch_stats):
            return self._call_fused_tf(inputs, use_batch_stats)
        return self._call_portable(inputs, use_batch_stats, mask)

    def _can_use_fused(self, inputs, mask, use_batch_stats):
        if keras.backend.backend() != "tensorflow":
            return False
        rank = len(inputs.shape)
        if rank not in (2, 4) or self._axis_pos != rank - 1:
            return False
        if rank == 2:
            n = _static_count(inputs)
            if n is None or n * inputs.shape[-1] < _FUSED_DENSE_MIN_SIZE:
                return False
        if keras.backend.standardize_dtype(inputs.dtype) not in _FUSED_DTYPES:
            return False
        if self.epsilon < _FUSED_MIN_EPSILON:
            return False
        if use_batch_stats and (mask is not None or self.synchronized):
            return False
        return True

    def _update_moving(self, mean, variance):
        moving_mean = ops.cast(self.moving_mean, mean.dtype)
        moving_variance = ops.cast(self.moving_variance, variance.dtype)
        self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )

    def _moving_stat(self, variance, n):
        """The variance that enters the moving average: biased, or times n / (n - 1)."""
        if self.moving_variance_mode == "biased":
            return variance
        n = ops.cast(n, variance.dtype)
        return variance * (n / ops.maximum(n - 1.0, 1.0))

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
            self._update_moving(mean, self._moving_stat(variance, n))
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
        weights = ops.expand_dims(ops.cast(mask, "bool"), axis=self._axis_pos)
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
        return ops.squeeze(mean), ops.squeeze(variance), ops.reshape(wsum, (-1,))[0]

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
        n = ops.reshape(wsum / ops.maximum(nvalid, 1.0), (-1,))[0]
        return mean, ops.square(std), n

    # ------------------------------------------------------------------ TF fused path
    def _call_fused_tf(self, inputs, use_batch_stats):
        import tensorflow as tf

        channels = inputs.shape[-1]
        dense = len(inputs.shape) == 2
        if dense:  # (N, C) -> (N, 1, 1, C): the same per-channel statistics over N values
            inputs_2d = inputs
            inputs = tf.reshape(inputs, [-1, 1, 1, channels])
        gamma = (
            tf.convert_to_tensor(self.gamma, tf.float32)
            if self.scale
            else tf.ones([channels], tf.float32)
        )
        beta = (
            tf.convert_to_tensor(self.beta, tf.float32)
            if self.center
            else tf.zeros([channels], tf.float32)
        )
        if not use_batch_stats:
            y, *_ = tf.raw_ops.FusedBatchNormV3(
                x=inputs,
                scale=gamma,
                offset=beta,
                mean=tf.convert_to_tensor(self.moving_mean, tf.float32),
                variance=tf.convert_to_tensor(self.moving_variance, tf.float32),
                epsilon=self.epsilon,
                data_format="NHWC",
                is_training=False,
            )
        elif self.variance_estimator == "pooled":
            y = self._fused_pooled_training_tf(inputs, gamma, beta)
        else:
            y, mean, variance = _per_sample_fused_tf(inputs, gamma, beta, self.epsilon)
            shape = tf.shape(inputs)
            n = tf.cast(shape[1] * shape[2], tf.float32)
            self._update_moving(mean, self._moving_stat(variance, n))
        if dense:
            y = tf.reshape(y, tf.shape(inputs_2d))
        return tf.cast(y, self.compute_dtype)

    def _fused_pooled_training_tf(self, inputs, gamma, beta):
        """FusedBatchNormV3 in training mode, which also updates the moving averages.

        With `exponential_avg_factor = f = 1 - momentum` and the moving statistics as its `mean`
        and `variance` inputs, the kernel returns `(1 - f) * moving + f * batch_stat` (as
        tf.keras 2's fused batch norm used it), where for the variance `batch_stat` is the
        Bessel-corrected `u = var * n / (n - 1)` (`var` when n == 1) -- exactly the
        `moving_variance="unbiased"` update. For `"biased"` (Keras's) the wanted value
        `(1 - f) * mv + f * u * (n - 1) / n` equals `r * (n - 1) / n + (1 - f) * mv / n`, with
        `r` the kernel's output, so no batch statistic leaves the kernel except through `r`.
        """
        import tensorflow as tf

        factor = 1.0 - float(self.momentum)
        old_mean = tf.convert_to_tensor(self.moving_mean, tf.float32)
        old_var = tf.convert_to_tensor(self.moving_variance, tf.float32)
        y, new_mean, new_var, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=gamma,
            offset=beta,
            mean=old_mean,
            variance=old_var,
            epsilon=self.epsilon,
            exponential_avg_factor=factor,
            data_format="NHWC",
            is_training=True,
        )
        if self.moving_variance_mode == "biased":
            n = _static_count(inputs)
            if n is not None:  # the usual case: constants folded into two multiplies
                new_var = new_var * ((n - 1.0) / n) + old_var * ((1.0 - factor) / n)
            else:
                nt = tf.cast(tf.size(inputs, out_type=tf.int64) // inputs.shape[-1], tf.float32)
                new_var = (new_var * (nt - 1.0) + old_var * (1.0 - factor)) / nt
        self.moving_mean.assign(tf.cast(new_mean, self.moving_mean.dtype))
        self.moving_variance.assign(tf.cast(new_var, self.moving_variance.dtype))
        return y


# ---------------------------------------------------------------------- TF helpers
def _static_count(x):
    """The number of values per channel (all but the last dimension) of a channels-last tensor
    as a Python float, or None if a dimension is unknown."""
    dims = x.shape[:-1]
    if any(d is None for d in dims):
        return None
    n = 1
    for d in dims:
        n *= int(d)
    return float(n)


def _all_reduce_sum(*tensors):
    """Sum over the replicas of a tf.distribute strategy (identity outside one)."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        out = tensors
    else:
        out = [ctx.all_reduce(tf.distribute.ReduceOp.SUM, t) for t in tensors]
    return out[0] if len(out) == 1 else tuple(out)


def _per_sample_fused_tf(x, gamma, beta, epsilon):
    """Per-sample-variance batch norm on NHWC with an analytic gradient (TF backend).

    Forward: per-sample moments (sums, then squares around the batch mean), then the fused kernel
    in inference mode with (mean_c, var_c). Backward: the fused kernel's gradient for fixed
    statistics, plus the gradient through mean_c (a constant per channel) and through var_c,
    which for sample n is a per-(n, c) affine function of x:

        d var_c / d x_{n,s,c} = 2 std_c / (N S) * (x_{n,s,c} - m_{n,c}) / s_{n,c}

    Returns (y, mean_c, var_c); y has x's dtype, the statistics are float32.
    """
    import tensorflow as tf

    @tf.custom_gradient
    def fn(x, gamma, beta):
        x32 = tf.cast(x, tf.float32)
        shape = tf.shape(x)
        spatial = tf.cast(shape[1] * shape[2], tf.float32)
        # Per-sample sums over the spatial positions (a reduction over the middle axis of an
        # (N, S, C) view is faster on CPU than over axes [1, 2] of (N, H, W, C)).
        flat = tf.reshape(x32, [shape[0], shape[1] * shape[2], shape[3]])
        m = tf.reduce_sum(flat, axis=1, keepdims=True) / spatial  # (N, 1, C)
        mean = tf.reduce_mean(m, axis=[0, 1])  # (C,)
        # Per-sample variances from squares around the batch mean of each channel (one
        # broadcast along the last axis, cheap; cancellation limited to the spread of the
        # per-sample means around the batch mean): var_n = E_s[(x - mean)^2] - (m_n - mean)^2.
        sq = tf.reduce_sum(tf.math.squared_difference(flat, mean), axis=1, keepdims=True)
        v = tf.maximum(sq / spatial - tf.square(m - mean), 0.0)
        s = tf.sqrt(v + PER_SAMPLE_TINY)
        std = tf.reduce_mean(s, axis=[0, 1])
        var = tf.square(std)
        m = tf.reshape(m, [shape[0], 1, 1, shape[3]])
        s = tf.reshape(s, [shape[0], 1, 1, shape[3]])
        y, _, _, _, _, reserve3 = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=gamma,
            offset=beta,
            mean=mean,
            variance=var,
            epsilon=epsilon,
            data_format="NHWC",
            is_training=False,
        )

        def grad(dy, dmean_up=None, dvar_up=None):
            dx, dgamma, dbeta, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy,
                x=x,
                scale=gamma,
                reserve_space_1=mean,
                reserve_space_2=var,
                reserve_space_3=reserve3,
                epsilon=epsilon,
                data_format="NHWC",
                is_training=False,
            )
            inv = tf.math.rsqrt(var + epsilon)
            # y = gamma * (x - mean) * inv + beta, so with dgamma = sum dy (x - mean) inv and
            # dbeta = sum dy:  dL/dmean = -gamma inv dbeta,  dL/dvar = -gamma inv^2 dgamma / 2.
            dmean = -gamma * inv * dbeta
            dvar = -0.5 * gamma * inv * inv * dgamma
            if dmean_up is not None:
                dmean = dmean + dmean_up
            if dvar_up is not None:
                dvar = dvar + dvar_up
            count = tf.cast(shape[0], tf.float32) * spatial  # N * S
            scale = (2.0 * dvar * std / count) / s  # (N, 1, 1, C)
            offset = dmean / count - scale * m
            dx = tf.cast(tf.cast(dx, tf.float32) + (x32 * scale + offset), x.dtype)
            return dx, dgamma, dbeta

        return (y, mean, var), grad

    return fn(x, gamma, beta)
