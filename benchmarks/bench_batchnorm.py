"""Training time of a plain 10-layer conv net: no BN, Keras BN, ours pooled, ours per_sample.

Same model (10 x Conv2D 3x3, width 32, ReLU, at 32x32; global average pooling; Dense 10), same
random CIFAR-sized data, same run. BN goes between each conv and its ReLU (convs without bias
when followed by BN). After one warm-up epoch per model, the models take turns batch by batch
(`train_on_batch`, the order rotating each step), so that load from other processes on a shared
machine hits them alike; an epoch's time is the sum of its steps' times, and the median over
the timed epochs is reported, with the range of the per-epoch ratios beside it.

"kernel floor" is `FusedBatchNormV3` in training mode with a trainable scale and offset and
nothing else: what any batch norm built on TF's fused kernel must cost at least. "ours pooled /
kernel floor" shows what our layer adds on top (moving averages, checks, the inference path).

    .venv/bin/python benchmarks/bench_batchnorm.py [--images 2048] [--batch 128] [--epochs 3]
    .venv/bin/python benchmarks/bench_batchnorm.py --layer [--repeats 50]

`--layer` instead times one layer's training step (forward + backward, `tf.function`) on
conv-shaped and Dense-shaped inputs: Keras BN, ours as it picks its path, and ours forced onto
the portable keras.ops path and onto the fused kernel (the Dense size threshold set to 0).

Goals (TensorFlow backend, CPU): ours pooled <= 0.6x Keras BN and <= 1.15x no BN;
per_sample <= 1.5x ours pooled.
"""
import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_varinit.layers import BatchNormalization  # noqa: E402

VARIANTS = ("no BN", "keras BN", "ours pooled", "ours per_sample", "kernel floor")


class KernelFloorBN(keras.layers.Layer):
    """The floor for any BN built on TF's fused kernel: `FusedBatchNormV3` in training mode with
    a trainable scale and offset and nothing else (no moving averages, no inference path, no
    checks). Not a usable layer; it bounds from below what ours pooled can cost."""

    def build(self, input_shape):
        c = input_shape[-1]
        self.gamma = self.add_weight(shape=(c,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(c,), initializer="zeros", name="beta")

    def call(self, x):
        import tensorflow as tf

        empty = tf.zeros([0], tf.float32)
        y, *_ = tf.raw_ops.FusedBatchNormV3(x=x, scale=self.gamma, offset=self.beta, mean=empty,
                                            variance=empty, epsilon=1e-3, is_training=True)
        return y


def build_model(variant, depth=10, width=32, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for _ in range(depth):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=variant == "no BN",
                                kernel_initializer="he_normal")(x)
        if variant == "keras BN":
            x = keras.layers.BatchNormalization()(x)
        elif variant == "ours pooled":
            x = BatchNormalization(variance_estimator="pooled")(x)
        elif variant == "ours per_sample":
            x = BatchNormalization(variance_estimator="per_sample")(x)
        elif variant == "kernel floor":
            x = KernelFloorBN()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
    model = keras.Model(inputs, outputs, name=variant.replace(" ", "_"))
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


LAYER_SHAPES = [(128, 32, 32, 16), (128, 32, 32, 32), (128, 256), (128, 512), (256, 512),
                (128, 1024), (512, 256), (1024, 512), (4096, 64)]


def layer_micro(repeats):
    """Median ms of one layer's forward + backward step per shape, the variants interleaved."""
    import tensorflow as tf

    from keras_varinit import fused_batch_norm_tf as fused

    def step_fn(layer, x, dy, path=None):
        """A traced training step; path "portable" or "fused" forces that path (the fused
        module is consulted while tracing only)."""
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * dy)
            return tape.gradient(loss, [x, layer.gamma, layer.beta])

        saved = fused.DENSE_MIN_SIZE, fused.call
        if path == "fused":
            fused.DENSE_MIN_SIZE = 0
        elif path == "portable":
            fused.call = lambda *args: None
        try:
            step()  # trace
        finally:
            fused.DENSE_MIN_SIZE, fused.call = saved
        return step

    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, {os.cpu_count()} CPUs; "
          f"one BN layer, forward + backward, median of {repeats} (ms)")
    names = ["keras BN", "ours", "ours portable", "ours fused"]
    print(f"{'shape':<20}" + "".join(f"{n:>15}" for n in names))
    rng = np.random.default_rng(0)
    for shape in LAYER_SHAPES:
        x = tf.constant(rng.normal(size=shape).astype("float32"))
        dy = tf.constant(rng.normal(size=shape).astype("float32"))
        steps = {"keras BN": step_fn(keras.layers.BatchNormalization(), x, dy),
                 "ours": step_fn(BatchNormalization(), x, dy),
                 "ours portable": step_fn(BatchNormalization(), x, dy, "portable"),
                 "ours fused": step_fn(BatchNormalization(), x, dy, "fused")}
        times = {n: [] for n in names}
        for _ in range(3):
            for n in names:
                steps[n]()[0].numpy()
        for k in range(repeats):
            for n in names[k % 4:] + names[:k % 4]:
                t0 = time.perf_counter()
                steps[n]()[0].numpy()
                times[n].append(time.perf_counter() - t0)
        print(f"{str(shape):<20}" + "".join(
            f"{1e3 * statistics.median(times[n]):>15.3f}" for n in names))
    try:
        print(f"load average after: {os.getloadavg()}")
    except OSError:
        pass
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per model")
    parser.add_argument("--width", type=int, default=32, help="channels of every conv")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all; "
                             "'kernel floor' is TensorFlow-only)")
    parser.add_argument("--layer", action="store_true",
                        help="time one BN layer's training step instead (see the docstring)")
    parser.add_argument("--repeats", type=int, default=50, help="--layer: timed steps per shape")
    args = parser.parse_args(argv)
    tensorflow = keras.backend.backend() == "tensorflow"
    if args.layer:
        if not tensorflow:
            parser.error("--layer times TensorFlow kernels. Received: backend "
                         f"{keras.backend.backend()!r}. Allowed: 'tensorflow'")
        return layer_micro(args.repeats)
    if args.variants is None:
        variants = [v for v in VARIANTS if tensorflow or v != "kernel floor"]
    else:
        variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or (not tensorflow and "kernel floor" in variants):
        parser.error(f"unknown or unavailable variant(s) {unknown or ['kernel floor']} on "
                     f"backend {keras.backend.backend()!r}. Allowed: {', '.join(VARIANTS)} "
                     "('kernel floor' on TensorFlow only)")

    rng = np.random.default_rng(0)
    x = rng.random((args.images, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, size=(args.images,))
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    models = {v: build_model(v, width=args.width) for v in variants}
    for v, model in models.items():  # warm-up: tracing, oneDNN primitive caches
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False)
    times = {v: [] for v in variants}
    steps = range(0, args.images, args.batch)
    for _ in range(args.epochs):
        epoch = {v: 0.0 for v in variants}
        for k, i in enumerate(steps):
            xb, yb = x[i:i + args.batch], y[i:i + args.batch]
            order = variants[k % len(variants):] + variants[:k % len(variants)]
            for v in order:
                t0 = time.perf_counter()
                models[v].train_on_batch(xb, yb)  # returns numpy logs: waits for the step
                epoch[v] += time.perf_counter() - t0
        for v in variants:
            times[v].append(epoch[v])
    med = {v: statistics.median(t) for v, t in times.items()}

    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"10 convs of width {args.width}; {args.images} images, batch {args.batch}, median of {args.epochs} epochs "
          "after 1 warm-up epoch (steps interleaved across models)")
    try:
        print(f"load average before/after: {load0} / {os.getloadavg()}")
    except OSError:
        pass
    print(f"{'variant':<18}{'s/epoch':>9}   epochs (s)")
    for v in variants:
        print(f"{v:<18}{med[v]:>9.3f}   " + " ".join(f"{t:.2f}" for t in times[v]))
    ratios = [("ours pooled / keras BN", "ours pooled", "keras BN", 0.6),
              ("ours pooled / no BN", "ours pooled", "no BN", 1.15),
              ("keras BN / no BN", "keras BN", "no BN", None),
              ("ours pooled / kernel floor", "ours pooled", "kernel floor", None),
              ("kernel floor / keras BN", "kernel floor", "keras BN", None),
              ("kernel floor / no BN", "kernel floor", "no BN", None),
              ("per_sample / ours pooled", "ours per_sample", "ours pooled", 1.5)]
    for label, a, b, goal in ratios:
        if a in med and b in med:
            r = med[a] / med[b]
            per_epoch = [ta / tb for ta, tb in zip(times[a], times[b])]
            spread = f"[epochs {min(per_epoch):.3f}-{max(per_epoch):.3f}]"
            if goal is None:
                verdict = ""
            elif tensorflow:
                verdict = f"(goal <= {goal}: {'met' if r <= goal else 'MISSED'})"
            else:
                verdict = "(the goals are set for the TensorFlow backend)"
            print(f"{label:<28}{r:>6.3f}  {spread:<22}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
