"""Overhead of LayerStatsLogger on `fit()`: no callback vs LayerStatsLogger vs Keras TensorBoard.

One process, one model, one data set: the 22-layer plain CNN (`keras_varinit.models.plain_cnn`,
or an equivalent built here if that module is missing) on CIFAR-sized random data. After a
warm-up fit (traces Keras's train function), each configuration is timed over `--epochs`
epochs, in interleaved rounds (none, logger, tensorboard, none, ...), and the minimum and
median per configuration are reported, with ratios against "no callback".

* none: `model.fit` without callbacks;
* logger: `LayerStatsLogger(probe=(x[:128], y[:128]), log_dir=...)`, all other arguments at
  their defaults (every_n_steps=100, no histograms). A fresh instance per timed fit, so its
  one-off build (tracing the probe function) is included;
* tensorboard: `keras.callbacks.TensorBoard(log_dir, histogram_freq=1)`.

Goal: logger <= 1.05x none.

    .venv/bin/python benchmarks/bench_callback.py            # 4096 images, batch 128, 2 epochs
    .venv/bin/python benchmarks/bench_callback.py --rounds 3 --images 2048
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from keras_varinit.callbacks import LayerStatsLogger  # noqa: E402


def build_cnn(depth=22, seed=0):
    try:
        from keras_varinit.models import plain_cnn

        return plain_cnn(depth, seed=seed), "keras_varinit.models.plain_cnn"
    except Exception as e:  # the models module is another engineer's; keep a fallback
        print(f"(plain_cnn unavailable: {type(e).__name__}: {e}; building an equivalent)")
    n_conv = depth - 1
    per = [n_conv // 3 + (1 if i < n_conv % 3 else 0) for i in range(3)]
    inp = keras.Input((32, 32, 3))
    h = inp
    for stage, (width, n) in enumerate(zip((16, 32, 64), per)):
        for i in range(n):
            h = keras.layers.Conv2D(width, 3, strides=2 if (stage and not i) else 1,
                                    padding="same", kernel_initializer="he_normal")(h)
            h = keras.layers.Activation("relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10)(h)), "local 22-layer plain CNN"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--depth", type=int, default=22)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.images, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.images)
    model, source = build_cnn(args.depth)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tmp = tempfile.mkdtemp(prefix="bench_callback_")
    print(f"backend={keras.backend.backend()} keras={keras.__version__} "
          f"cpus={os.cpu_count()} python={platform.python_version()}")
    print(f"model: {source}, {len(model.layers)} layers; data {x.shape}, "
          f"batch {args.batch_size}, {args.epochs} epochs "
          f"({args.epochs * -(-args.images // args.batch_size)} steps) per timed fit")

    t = time.perf_counter()
    model.fit(x[:4 * args.batch_size], y[:4 * args.batch_size], batch_size=args.batch_size,
              epochs=1, verbose=0)
    print(f"warm-up fit: {time.perf_counter() - t:.1f}s")

    def make(kind, r):
        if kind == "none":
            return []
        if kind == "logger":
            return [LayerStatsLogger((x[:128], y[:128]), log_dir=os.path.join(tmp, f"ls{r}"))]
        return [keras.callbacks.TensorBoard(os.path.join(tmp, f"tb{r}"), histogram_freq=1)]

    kinds = ("none", "logger", "tensorboard")
    times = {k: [] for k in kinds}
    n_logs = None
    for r in range(args.rounds):
        for kind in kinds:
            cbs = make(kind, r)
            t = time.perf_counter()
            model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
                      callbacks=cbs)
            dt = time.perf_counter() - t
            times[kind].append(dt)
            if kind == "logger":
                n_logs = len({rec["step"] for rec in cbs[0].history})
            print(f"round {r + 1} {kind:12s} {dt:7.2f}s", flush=True)

    base_min, base_med = min(times["none"]), statistics.median(times["none"])
    print(f"\nlogger: {len(model.layers)} model layers, probe 128 images, {n_logs} logs per fit")
    print(f"{'config':12s} {'min s':>8s} {'median s':>9s} {'ratio(min)':>11s} {'ratio(med)':>11s}")
    for kind in kinds:
        mn, md = min(times[kind]), statistics.median(times[kind])
        print(f"{kind:12s} {mn:8.2f} {md:9.2f} {mn / base_min:11.3f} {md / base_med:11.3f}")


if __name__ == "__main__":
    main()
