"""The two CIFAR-10 standard deviations: pooled over all pixels (what BN computes) vs the mean
of per-image standard deviations (the often-quoted "CIFAR-10 std").

Writes to --out (default examples/output/):
    cifar10_std_estimators.md    the per-channel table (mean, both stds), markdown
    cifar10_std_estimators.png   a bar chart of the two estimators per channel

    .venv/bin/python examples/cifar10_std_estimators.py [--data auto|synthetic|PATH] [--out DIR]

The pooled variance is the per-image variance averaged over images plus the variance of the
image means (law of total variance), and the mean of per-image std is at most the root of the mean
per-image variance (Jensen), so the pooled std is always the larger; the chart shows
that gap, and the markdown file states it numerically.
"""
import argparse
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from keras_varinit import datasets  # noqa: E402
from keras_varinit.channel_stats import channel_stats_both, format_table  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "output"


def load(data, split):
    index = 0 if split == "train" else 1
    if data == "synthetic":
        return datasets.synthetic_cifar10(10000, 2000)[index][0], True, "synthetic"
    if data == "auto":
        source = datasets.resolve_source("auto")
        return datasets.load_cifar10("auto")[index][0], False, source
    return datasets.load_cifar10("dir", data)[index][0], False, str(data)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="auto",
                        help="auto (KERAS_VARINIT_CIFAR10 / caches / download), synthetic, or a "
                             "CIFAR-10 directory/.tar.gz (default %(default)s)")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    x, synthetic, source = load(args.data, args.split)
    pooled, per_sample = channel_stats_both(x, scale=255)
    what = ("SYNTHETIC CIFAR-10-shaped data (not CIFAR-10)" if synthetic
            else f"CIFAR-10 {args.split} set")
    table = format_table(pooled, per_sample)
    between = np.sqrt(np.maximum(pooled.variance - per_sample.variance, 0))
    text = (f"# Per-channel statistics: {what}\n\n"
            f"{len(x):,} images from source `{source}`, pixels scaled to [0, 1] "
            f"(computed with `kv.channel_stats`, one streaming pass).\n\n{table}\n\n"
            "pooled std / mean of per-image std: "
            + ", ".join(f"{n} {a / b:.3f}" for n, a, b in zip("RGB", pooled.std, per_sample.std))
            + "\n\nsqrt(pooled variance - (mean per-image std)^2), an upper bound on the std of "
            "the image means (law of total variance; Jensen for the std): "
            + ", ".join(f"{n} {v:.4f}" for n, v in zip("RGB", between)) + "\n")

    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / "cifar10_std_estimators.md"
    md.write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    pos = np.arange(3)
    width = 0.38
    colours = ["#d62728", "#2ca02c", "#1f77b4"]
    bars_p = ax.bar(pos - width / 2, pooled.std, width, color=colours, edgecolor="black",
                    label="pooled over all N·H·W pixels (BN)")
    bars_s = ax.bar(pos + width / 2, per_sample.std, width, color=colours, edgecolor="black",
                    hatch="//", alpha=0.55, label="mean of per-image std")
    for bars in (bars_p, bars_s):
        ax.bar_label(bars, fmt="%.4f", fontsize=8, padding=2)
    ax.set_xticks(pos, ["R", "G", "B"])
    ax.set_ylabel("standard deviation (pixels on [0, 1])")
    ax.set_ylim(0, max(pooled.std.max(), per_sample.std.max()) * 1.25)
    title = "CIFAR-10" if not synthetic else "SYNTHETIC data (not CIFAR-10)"
    ax.set_title(f"{title} {args.split}: two std estimators per channel\n"
                 f"(means {', '.join(f'{m:.4f}' for m in pooled.mean)})", fontsize=10)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="0.5", edgecolor="black", label=bars_p.get_label()),
                       Patch(facecolor="0.5", edgecolor="black", hatch="//", alpha=0.55,
                             label=bars_s.get_label())], loc="upper left", fontsize=8)
    fig.tight_layout()
    png = args.out / "cifar10_std_estimators.png"
    fig.savefig(png)
    plt.close(fig)
    print(text)
    print(f"wrote {md}\nwrote {png}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
