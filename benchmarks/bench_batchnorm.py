"""Training time of a plain 10-layer conv net: no BN, Keras BN, ours pooled, ours per_sample.

Same model (10 x Conv2D 3x3, width 32, ReLU, at 32x32; global average pooling; Dense 10), same
random CIFAR-sized data, same run. BN goes between each conv and its ReLU (convs without bias
when followed by BN). After one warm-up epoch per model, the models take turns batch by batch
(`train_on_batch`, the order rotating each step), so that load from other processes on a shared
machine hits them alike; an epoch's time is the sum of its steps' times, and the median over
the timed epochs is reported.

    .venv/bin/python benchmarks/bench_batchnorm.py [--images 2048] [--batch 128] [--epochs 3]

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

from keras_varinit.batch_norm import BatchNormalization  # noqa: E402

VARIANTS = ("no BN", "keras BN", "ours pooled", "ours per_sample")


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
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
    model = keras.Model(inputs, outputs, name=variant.replace(" ", "_"))
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per model")
    parser.add_argument("--width", type=int, default=32, help="channels of every conv")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]

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
              ("per_sample / ours pooled", "ours per_sample", "ours pooled", 1.5)]
    for label, a, b, goal in ratios:
        if a in med and b in med:
            r = med[a] / med[b]
            verdict = "" if goal is None else f"(goal <= {goal}: {'met' if r <= goal else 'MISSED'})"
            print(f"{label:<26}{r:>6.3f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
