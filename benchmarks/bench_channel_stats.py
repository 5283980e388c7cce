"""channel_stats against numpy float64 on the CIFAR-10 training set in memory (same run).

Anchor: ``x.mean(axis=(0, 1, 2))`` and ``x.std(axis=(0, 1, 2))`` on the uint8 (50000, 32, 32, 3)
array (numpy accumulates in float64 and materialises float64 temporaries).
Ours: ``kv.channel_stats(x)`` (exact integer accumulation on uint8, streaming batches of 1024).
Goal: ours pooled at most 0.25x numpy's time. Peak memory by tracemalloc (numpy reports its
allocations to it), measured in a separate pass so that tracing does not affect the timings.

    .venv/bin/python benchmarks/bench_channel_stats.py [--repeat 3]
"""
import argparse
import datetime
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from keras_varinit import datasets  # noqa: E402
from keras_varinit.channel_stats import channel_stats, channel_stats_both  # noqa: E402

GOAL = 0.25
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                      "datasets", "cifar10-jpeg.tar.gz")


def load():
    path = os.environ.get(datasets.ENV_PATH) or (SHARED if os.path.exists(SHARED) else None)
    try:
        if path:
            return datasets.load_cifar10("dir", path)[0][0], f"CIFAR-10 train ({path})"
        return datasets.load_cifar10("auto")[0][0], "CIFAR-10 train (auto)"
    except (datasets.DatasetUnavailableError, FileNotFoundError) as error:
        print(f"CIFAR-10 unavailable ({error}); using SYNTHETIC data of the same shape")
        return datasets.synthetic_cifar10(50000, 0)[0][0], "SYNTHETIC 50000x32x32x3 uint8"


def numpy_anchor(x):
    return x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))


def best_time(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def peak_mb(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats for ours (best)")
    parser.add_argument("--numpy-repeat", type=int, default=1, help="timing repeats for numpy")
    args = parser.parse_args()

    x, what = load()
    print(f"data: {what}: {x.shape} {x.dtype}, {x.nbytes / 2**20:.0f} MB")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}, load average {os.getloadavg()[0]:.1f}")

    t_np, (mean_np, std_np) = best_time(lambda: numpy_anchor(x), args.numpy_repeat)
    x_f32 = x.astype(np.float32)
    cases = {
        "ours pooled (uint8, exact integer)": lambda: channel_stats(x),
        "ours per_sample (uint8, exact integer)": lambda: channel_stats(x, "per_sample"),
        "ours both, one pass (uint8)": lambda: channel_stats_both(x),
        "ours pooled (float32 input, float64 Chan merge)": lambda: channel_stats(x_f32),
    }
    timings = {name: best_time(fn, args.repeat) for name, fn in cases.items()}

    pooled = timings["ours pooled (uint8, exact integer)"][1]
    diff_mean = np.abs(pooled.mean - mean_np).max()
    diff_std = np.abs(pooled.std - std_np).max()

    mem_np = peak_mb(lambda: numpy_anchor(x))
    mems = {name: peak_mb(fn) for name, fn in cases.items()}

    print(f"\n{'':50s} {'time':>8s} {'ratio':>8s} {'peak mem':>10s}")
    print(f"{'numpy float64 x.mean + x.std (anchor)':50s} {t_np:7.3f}s {1.0:7.3f}x "
          f"{mem_np:8.1f}MB")
    for name, (t, _) in timings.items():
        print(f"{name:50s} {t:7.3f}s {t / t_np:7.3f}x {mems[name]:8.1f}MB")
    ratio = timings["ours pooled (uint8, exact integer)"][0] / t_np
    print(f"\nmax |ours - numpy|: mean {diff_mean:.2e}, std {diff_std:.2e} (0-255 scale)")
    print(f"ours pooled / numpy = {ratio:.3f}x (goal <= {GOAL}x): "
          f"{'MET' if ratio <= GOAL else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
