"""Cost of LayerStatsLogger: one probe log against one training step, and fit() with it against
fit() without it.

One process, one model, one data set: the 22-layer plain CNN (`keras_varinit.models.plain_cnn`,
45 Keras layers; the logger tracks 43: 21 Conv2D, 21 Activation, the Dense) on CIFAR-sized
random data, SGD(0.01, momentum 0.9), after a warm-up fit (traces Keras's train function).

1. Probe log vs training step, batch 128 both: `model.train_on_batch` on the probe batch
   against one `LayerStatsLogger` log of it (forward + backward + in-graph statistics + the
   records and update ratios; no TensorBoard or JSON file), interleaved step, log, step, log,
   ... `--repeats` times, after the probe's eager calls and its tf.function trace (reported
   separately: what the first logs of a fit cost). Goal: log <= 1.5 steps (a probe is the same
   forward and backward without the update, so about one step is the floor). Interleaved with
   them (TensorFlow): a plain eager `tf.GradientTape` forward and backward of the model on the
   probe batch, no interception and no statistics, the floor of an eager log, and what two of
   them cost against 64 training steps (a 64-step fit's step-0 and epoch-end logs).
2. fit() of `--images` images in batches of 128 for `--epochs` epoch(s) (default 8192 x 1 =
   64 steps: a short epoch, where the step-0 and epoch-end logs weigh most), without a
   callback and with `LayerStatsLogger((x[:128], y[:128]))` at its defaults (every_n_steps
   100: logs at step 0 and at every epoch end), a fresh logger per fit (its one-off build is
   included), interleaved none, logger, none, ... `--repeats` rounds. Every timed fit starts
   from step 0 (`optimizer.iterations` reset; SGD has no schedule, so the fit is unchanged), as
   a user's first fit does: the logger logs at step 0 and at the epoch end(s), not at a multiple
   of 100 that a count carried over from earlier fits would cross. Goal: <= 1.05x.
   `--tensorboard` adds Keras's `TensorBoard(histogram_freq=1)` as a third variant. Also
   printed: the seconds spent inside the logger's hooks within each logged fit, as a ratio to
   the rest of that fit (Keras runs callbacks synchronously: the logger's own cost, measured in
   the same fit, so immune to the machine's speed changing from one fit to the next).

Minimum and median of the repeats are printed with their ratios, in wall-clock seconds and in
CPU seconds of this process (`time.process_time`, user + system over all its threads): on a
shared machine other jobs stretch wall time far more than the work this process does (this
machine's speed is bimodal from run to run: compare minima).

    .venv/bin/python benchmarks/bench_callback.py                   # both parts, 5 repeats
    .venv/bin/python benchmarks/bench_callback.py --images 2048 --repeats 2   # quick look
    .venv/bin/python benchmarks/bench_callback.py --norm batch      # a BN net (64 tracked layers)
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
from keras_varinit.models import plain_cnn  # noqa: E402
from keras_varinit.net_options import NORMALIZATIONS  # noqa: E402
from keras_varinit.probe import COMPILE_AFTER  # noqa: E402

PROBE = 128


class _Clock:
    """Wall-clock and process CPU seconds of a block: `with _Clock() as c: ...; c.wall, c.cpu`."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def _summary(name, times, anchor):
    cells = []
    for kind in (0, 1):   # wall, cpu
        values, base = [t[kind] for t in times], [t[kind] for t in anchor]
        mn, md = min(values), statistics.median(values)
        cells.append(f"{mn:9.3f} {md:9.3f} {mn / min(base):8.3f} "
                     f"{md / statistics.median(base):8.3f}")
    return f"{name:12s} " + "  |".join(cells)


def _print_table(times, anchor_name):
    print(f"{'':12s} {'wall-clock seconds':^37s}  | {'process CPU seconds':^37s}")
    head = f"{'min':>9s} {'median':>9s} {'r(min)':>8s} {'r(med)':>8s}"
    print(f"{'variant':12s} {head}  |{head}")
    for name, values in times.items():
        print(_summary(name, values, times[anchor_name]))


def probe_vs_step(model, x, y, repeats):
    """Part 1: seconds of one training step and of one probe log, interleaved."""
    xb, yb = x[:PROBE], y[:PROBE]
    logger = LayerStatsLogger((xb, yb))
    logger.set_model(model)
    step = [0]

    def log():
        step[0] += 1
        with _Clock() as clock:
            logger._log(step[0], 0)
        return clock.wall, clock.cpu

    def train_step():
        with _Clock() as clock:
            model.train_on_batch(xb, yb)
        return clock.wall, clock.cpu

    with _Clock() as clock:
        logger.on_train_begin()   # builds the probe; its first (eager) pass is the step-0 log
    first = [(clock.wall, clock.cpu)] + [log() for _ in range(COMPILE_AFTER - 1)]
    trace = log()   # the call that traces the tf.function and runs it once
    steps = [train_step() for _ in range(2)]
    print(f"first {COMPILE_AFTER} logs (eager; the first includes the probe's build), wall/CPU s: "
          f"{', '.join(f'{w:.3f}/{c:.3f}' for w, c in first)}; the tf.function trace + first "
          f"run: {trace[0]:.3f}/{trace[1]:.3f}; two train steps: "
          f"{', '.join(f'{w:.3f}/{c:.3f}' for w, c in steps)}")
    tape = _eager_pass(model, xb, yb)
    times = {"train step": [], "probe log": []} | ({"eager tape": []} if tape else {})
    for _ in range(repeats):
        times["train step"].append(train_step())
        times["probe log"].append(log())
        if tape:
            times["eager tape"].append(tape())
    print(f"tracked layers: {len(logger.tracked_layers)}; interleaved x{repeats}, batch {PROBE}:")
    _print_table(times, "train step")
    if tape:
        share = 2 * min(t[0] for t in times["eager tape"]) / (
            64 * min(t[0] for t in times["train step"]))
        print(f"floor of two eager logs (2 x eager tape) / 64 train steps, wall: {share:.1%}")
    for kind, label in ((0, "wall"), (1, "CPU")):
        eager = min(t[kind] for t in first[1:]) if len(first) > 1 else first[0][kind]
        print(f"eager log (min of calls 2-{COMPILE_AFTER}) / train step (min), {label}: "
              f"{eager / min(t[kind] for t in times['train step']):.2f}")
    return times


def _eager_pass(model, xb, yb):
    """A timed plain eager forward and backward of `model` on the probe batch (`GradientTape`,
    mean sparse cross-entropy from logits, gradients of the weights): the work an eager log
    cannot avoid. None on other backends than TensorFlow."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = tf.constant(xb), tf.constant(yb)

    def run():
        with _Clock() as clock:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=False))
            tape.gradient(loss, model.trainable_variables)
        return clock.wall, clock.cpu

    run()   # the first eager call builds the loss
    return run


class _TimedLogger(LayerStatsLogger):
    """LayerStatsLogger that adds up the wall seconds spent in its Keras hooks (`hook_seconds`):
    Keras runs callbacks synchronously, so that is the logger's own cost inside the same fit,
    unaffected by the machine's speed changing between fits."""

    hook_seconds = 0.0

    def _timed(self, hook, *args, **kwargs):
        started = time.perf_counter()
        try:
            return getattr(super(), hook)(*args, **kwargs)
        finally:
            self.hook_seconds += time.perf_counter() - started

    def on_train_begin(self, logs=None):
        return self._timed("on_train_begin", logs)

    def on_epoch_begin(self, epoch, logs=None):
        return self._timed("on_epoch_begin", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        return self._timed("on_train_batch_begin", batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        return self._timed("on_epoch_end", epoch, logs)

    def on_train_end(self, logs=None):
        return self._timed("on_train_end", logs)


def fit_overhead(model, x, y, args, tmp):
    """Part 2: seconds of fit() without a callback and with a fresh LayerStatsLogger."""
    def callbacks(kind, r):
        if kind == "none":
            return []
        if kind == "logger":
            return [_TimedLogger((x[:PROBE], y[:PROBE]), log_dir=os.path.join(tmp, f"ls{r}"))]
        return [keras.callbacks.TensorBoard(os.path.join(tmp, f"tb{r}"), histogram_freq=1)]

    kinds = ("none", "logger") + (("tensorboard",) if args.tensorboard else ())
    times = {k: [] for k in kinds}
    logs, own = None, []
    for r in range(args.repeats):
        for kind in kinds:
            cbs = callbacks(kind, r)
            model.optimizer.iterations.assign(0)
            with _Clock() as clock:
                model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
                          callbacks=cbs)
            times[kind].append((clock.wall, clock.cpu))
            hooks = ""
            if kind == "logger":
                logs = len({rec["step"] for rec in cbs[0].history})
                spent = cbs[0].hook_seconds
                own.append(1 + spent / (clock.wall - spent))
                hooks = f" ({spent:.2f} s in the logger's hooks: {own[-1]:.3f}x its fit)"
            print(f"round {r + 1} {kind:12s} {clock.wall:8.2f} s wall, {clock.cpu:8.2f} s CPU, "
                  f"load {os.getloadavg()[0]:.1f}{hooks}", flush=True)
    print(f"fit of {len(x)} images, batch {args.batch_size}, {args.epochs} epoch(s); "
          f"{logs} logs per fit with the logger:")
    _print_table(times, "none")
    print(f"the logger's own hooks, within each fit: min {min(own):.3f}x, median "
          f"{statistics.median(own):.3f}x (the fit without the hooks' seconds = 1)")
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8192,
                   help="random CIFAR-sized images per epoch (default 8192: 64 steps of 128)")
    p.add_argument("--batch-size", type=int, default=128, help="also the probe's batch")
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed fit")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved repeats of each variant (the minimum is reported)")
    p.add_argument("--depth", type=int, default=22, help="weight layers of the plain CNN")
    p.add_argument("--norm", choices=NORMALIZATIONS, default="none",
                   help="normalization before each activation of the plain CNN (the logger "
                        "then tracks the normalization layers too)")
    p.add_argument("--part", choices=("both", "probe", "fit"), default="both",
                   help="1: one probe log against one training step; 2: fit() with the "
                        "logger against fit() without it; both (default)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also time keras.callbacks.TensorBoard(histogram_freq=1)")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.images, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.images)
    model = plain_cnn(args.depth, seed=0, normalization=args.norm)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    print(f"backend={keras.backend.backend()} keras={keras.__version__} "
          f"cpus={os.cpu_count()} python={platform.python_version()} "
          f"load={os.getloadavg()[0]:.1f}")
    print(f"model: plain_cnn({args.depth}, normalization={args.norm!r}), "
          f"{len(model.layers)} layers")
    with _Clock() as clock:
        model.fit(x[:4 * args.batch_size], y[:4 * args.batch_size], batch_size=args.batch_size,
                  epochs=1, verbose=0)
    print(f"warm-up fit: {clock.wall:.1f} s")
    if args.part in ("both", "probe"):
        print("\n-- 1. one probe log vs one training step")
        probe_vs_step(model, x, y, args.repeats)
    if args.part in ("both", "fit"):
        print("\n-- 2. fit() with LayerStatsLogger at its defaults vs without")
        fit_overhead(model, x, y, args, tempfile.mkdtemp(prefix="bench_callback_"))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
