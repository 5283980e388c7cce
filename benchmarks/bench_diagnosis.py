"""Overhead of DiagnosisLogger on `fit()`, against the same fit with LayerStatsLogger alone.

One process, one model, one data set: the 22-layer plain CNN (`kv.models.plain_cnn(22)`) on
CIFAR-sized random data, as in `bench_callback.py`. After a warm-up fit, each configuration is
timed over `--epochs` epochs in interleaved rounds (the order rotated every round), and the
minimum (and median) per configuration is reported with its ratio to the anchor:

* logger (anchor): `LayerStatsLogger(probe=(x[:128], y[:128]))` at its defaults;
* diagnosis: the same logger + `DiagnosisLogger(logger)` at its defaults (the init profile
  measured forward-only on 32 probe images at train begin, findings evaluated at every log);
* diagnosis_no_profile: the same with `profile=None`.

Fresh callbacks per timed fit, and `optimizer.iterations` reset to 0 before it, so every fit is
a run from step 0 for both callbacks (step-0 log and init profile included). Goal: diagnosis
<= 1.05x logger.

On a shared machine the fit times vary by far more than 5% from round to round, so the script
also reports the callback's self-time: the time spent inside DiagnosisLogger's hooks (profile,
context, rules, writing) as a fraction of the same fit's time. A slow-down that hits the whole
process alike leaves that fraction unchanged.

    .venv/bin/python benchmarks/bench_diagnosis.py                 # 5 rounds, 4096 images
    .venv/bin/python benchmarks/bench_diagnosis.py --images 2048 --rounds 5
"""
import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from keras_varinit.callbacks import DiagnosisLogger, LayerStatsLogger  # noqa: E402
from keras_varinit.models import plain_cnn  # noqa: E402

KINDS = ("logger", "diagnosis", "diagnosis_no_profile")


class TimedDiagnosisLogger(DiagnosisLogger):
    """DiagnosisLogger that adds up the time spent in its hooks (`self_time`)."""

    self_time = 0.0


def _timed(name):
    hook = getattr(DiagnosisLogger, name)

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            self.self_time += time.perf_counter() - start

    return timed


for _name in ("on_train_begin", "on_epoch_begin", "on_train_batch_end", "on_epoch_end",
              "on_train_end"):
    setattr(TimedDiagnosisLogger, _name, _timed(_name))


def callbacks_for(kind, probe):
    logger = LayerStatsLogger(probe)
    if kind == "logger":
        return [logger]
    profile = True if kind == "diagnosis" else None
    return [logger, TimedDiagnosisLogger(logger, profile=profile, verbose=0)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--depth", type=int, default=22)
    p.add_argument("--width", type=int, default=16)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.images, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.images)
    probe = (x[:128], y[:128])
    model = plain_cnn(args.depth, width=args.width, seed=0)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = args.epochs * -(-args.images // args.batch_size)
    print(f"backend={keras.backend.backend()} keras={keras.__version__} cpus={os.cpu_count()} "
          f"python={platform.python_version()}")
    print(f"model: plain_cnn({args.depth}, width={args.width}), {len(model.layers)} layers; "
          f"data {x.shape}, batch {args.batch_size}, {steps} steps per timed fit")
    t = time.perf_counter()
    model.fit(x[:4 * args.batch_size], y[:4 * args.batch_size], batch_size=args.batch_size,
              verbose=0)
    print(f"warm-up fit: {time.perf_counter() - t:.1f}s")

    times = {k: [] for k in KINDS}
    self_share = {k: [] for k in KINDS[1:]}
    findings = {}
    for r in range(args.rounds):
        # rotate the order every round: a load that drifts within a round then favours no one
        for kind in KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]:
            cbs = callbacks_for(kind, probe)
            model.optimizer.iterations.assign(0)
            t = time.perf_counter()
            model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
                      callbacks=cbs)
            times[kind].append(time.perf_counter() - t)
            extra = ""
            if kind != "logger":
                findings[kind] = [f.kind.value for f in cbs[1].findings]
                self_share[kind].append(cbs[1].self_time / times[kind][-1])
                extra = f"  (DiagnosisLogger self-time {cbs[1].self_time:.2f}s)"
            print(f"round {r + 1} {kind:21s} {times[kind][-1]:7.2f}s{extra}", flush=True)

    print(f"\nfindings per fit: {findings}")
    base_min, base_med = min(times["logger"]), statistics.median(times["logger"])
    print(f"{'config':21s} {'min s':>8s} {'median s':>9s} {'ratio(min)':>11s} {'ratio(med)':>11s}")
    for kind in KINDS:
        mn, md = min(times[kind]), statistics.median(times[kind])
        print(f"{kind:21s} {mn:8.2f} {md:9.2f} {mn / base_min:11.3f} {md / base_med:11.3f}")
    for kind, shares in self_share.items():
        print(f"{kind} self-time / fit time: min {min(shares):.4f}, median "
              f"{statistics.median(shares):.4f}, max {max(shares):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
