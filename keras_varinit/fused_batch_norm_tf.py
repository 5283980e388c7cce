"""TensorFlow's fused batch-norm kernel (`FusedBatchNormV3`) as a fast path for our layer.

`kv.layers.BatchNormalization` calls `call(layer, inputs, mask, use_batch_stats)` on the
TensorFlow backend; it returns the layer's output computed with the fused kernel, or None where
the kernel does not apply (the layer then runs its portable `keras.ops` path, which gives the
same numbers: tests/test_batch_norm.py). The kernel applies to channels-last 4D inputs, and to
Dense-style (N, C) inputs viewed as (N, 1, 1, C) from `DENSE_MIN_SIZE` values on; not to masked
or `synchronized` training steps, other dtypes, or an epsilon below cuDNN's minimum.

In training, the pooled estimator lets the kernel update the moving averages itself
(`exponential_avg_factor`); the per-sample estimator feeds its own statistics to the kernel in
inference mode, with an analytic gradient (`tf.custom_gradient`).
"""
import keras
import tensorflow as tf

from keras_varinit.layers import PER_SAMPLE_TINY

__all__ = ["call", "DENSE_MIN_SIZE", "DTYPES", "MIN_EPSILON"]

# FusedBatchNormV3 input types (scale, offset, mean and variance are always float32).
DTYPES = ("float32", "float16")
# cuDNN's minimum epsilon; tf.compat.v1.nn.fused_batch_norm clamps to it. Below it we do not
# use the fused kernel, so that results never depend on the device.
MIN_EPSILON = 1.001e-5
# Dense-style (N, C) inputs go through the fused kernel (as (N, 1, 1, C)) only from this many
# values (N * C, batch size known when traced) on: below it the kernel's fixed cost made a
# training step slower than the op-by-op path on CPU (0.63 vs 0.44 ms for (128, 512)), from it
# on faster (0.82-0.91 vs 0.92-1.17 ms at 2**17 values, 1.4 vs 1.9 ms for (1024, 512));
# `benchmarks/bench_batchnorm.py --layer`, figures in benchmarks/RESULTS.md.
DENSE_MIN_SIZE = 2**17


def call(layer, inputs, mask, use_batch_stats):
    """`layer`'s output for `inputs` through the fused kernel, or None if it does not apply.

    In training (`use_batch_stats`), also updates the layer's moving averages, as the portable
    path would.
    """
    if not _applies(layer, inputs, mask, use_batch_stats):
        return None
    channels = inputs.shape[-1]
    dense = len(inputs.shape) == 2
    if dense:  # (N, C) -> (N, 1, 1, C): the same per-channel statistics over N values
        inputs_2d = inputs
        inputs = tf.reshape(inputs, [-1, 1, 1, channels])
    gamma = _float32_or(layer.gamma if layer.scale else None, tf.ones, channels)
    beta = _float32_or(layer.beta if layer.center else None, tf.zeros, channels)
    if not use_batch_stats:
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=gamma,
            offset=beta,
            mean=tf.convert_to_tensor(layer.moving_mean, tf.float32),
            variance=tf.convert_to_tensor(layer.moving_variance, tf.float32),
            epsilon=layer.epsilon,
            data_format="NHWC",
            is_training=False,
        )
    elif layer.variance_estimator == "pooled":
        y = _pooled_training(layer, inputs, gamma, beta)
    else:
        y, mean, variance = _per_sample(inputs, gamma, beta, layer.epsilon)
        shape = tf.shape(inputs)
        layer._update_moving(mean, variance, tf.cast(shape[1] * shape[2], tf.float32))
    if dense:
        y = tf.reshape(y, tf.shape(inputs_2d))
    return tf.cast(y, layer.compute_dtype)


def _applies(layer, inputs, mask, use_batch_stats):
    rank = len(inputs.shape)
    if rank not in (2, 4) or layer.axis % rank != rank - 1:
        return False
    if rank == 2:
        n = _static_count(inputs)
        if n is None or n * inputs.shape[-1] < DENSE_MIN_SIZE:
            return False
    if keras.backend.standardize_dtype(inputs.dtype) not in DTYPES:
        return False
    if layer.epsilon < MIN_EPSILON:
        return False
    # Masks matter in training only (at inference, Keras's layer ignores them too).
    if use_batch_stats and (mask is not None or layer.synchronized):
        return False
    return True


def _float32_or(variable, fill, channels):
    """`variable` as a float32 tensor, or `fill([channels])` for an absent gamma / beta."""
    if variable is None:
        return fill([channels], tf.float32)
    return tf.convert_to_tensor(variable, tf.float32)


def _pooled_training(layer, inputs, gamma, beta):
    """FusedBatchNormV3 in training mode, which also updates the moving averages.

    With `exponential_avg_factor = f = 1 - momentum` and the moving statistics as its `mean`
    and `variance` inputs, the kernel returns `(1 - f) * moving + f * batch_stat` (as
    tf.keras 2's fused batch norm used it), where for the variance `batch_stat` is the
    Bessel-corrected `u = var * n / (n - 1)` (`var` when n == 1) -- exactly the
    `moving_variance="unbiased"` update. For `"biased"` (Keras's) the wanted value
    `(1 - f) * mv + f * u * (n - 1) / n` equals `r * (n - 1) / n + (1 - f) * mv / n`, with
    `r` the kernel's output, so no batch statistic leaves the kernel except through `r`.
    """
    factor = 1.0 - float(layer.momentum)
    old_mean = tf.convert_to_tensor(layer.moving_mean, tf.float32)
    old_var = tf.convert_to_tensor(layer.moving_variance, tf.float32)
    y, new_mean, new_var, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs,
        scale=gamma,
        offset=beta,
        mean=old_mean,
        variance=old_var,
        epsilon=layer.epsilon,
        exponential_avg_factor=factor,
        data_format="NHWC",
        is_training=True,
    )
    if layer.moving_variance_mode == "biased":
        n = _static_count(inputs)
        if n is not None:  # the usual case: constants folded into two multiplies
            new_var = new_var * ((n - 1.0) / n) + old_var * ((1.0 - factor) / n)
        else:
            nt = tf.cast(tf.size(inputs, out_type=tf.int64) // inputs.shape[-1], tf.float32)
            new_var = (new_var * (nt - 1.0) + old_var * (1.0 - factor)) / nt
    layer.moving_mean.assign(tf.cast(new_mean, layer.moving_mean.dtype))
    layer.moving_variance.assign(tf.cast(new_var, layer.moving_variance.dtype))
    return y


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


def _per_sample(x, gamma, beta, epsilon):
    """Per-sample-variance batch norm on NHWC with an analytic gradient.

    Forward: per-sample moments (sums, then squares around the batch mean), then the fused kernel
    in inference mode with (mean_c, var_c). Backward: the fused kernel's gradient for fixed
    statistics, plus the gradient through mean_c (a constant per channel) and through var_c,
    which for sample n is a per-(n, c) affine function of x:

        d var_c / d x_{n,s,c} = 2 std_c / (N S) * (x_{n,s,c} - m_{n,c}) / s_{n,c}

    Returns (y, mean_c, var_c); y has x's dtype, the statistics are float32.
    """

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
