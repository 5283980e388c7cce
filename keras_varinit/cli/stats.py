"""``keras-varinit stats``: per-channel mean and the two standard deviations of a data set.

Example::

    keras-varinit stats --data cifar10                       # train split, both estimators, [0, 1]
    keras-varinit stats --data data/cifar10-jpeg.tar.gz --split test
    keras-varinit stats --data synthetic --estimator pooled --scale 1
    keras-varinit stats --data images.npy --markdown         # any (N, H, W, C) / (N, d) array

Prints, per channel, the mean, the pooled std (what batch normalization computes) and the
mean of per-image std (the often-quoted "CIFAR-10 std"); docs/science.md explains the two.
"""
import os
import pathlib
import sys

HELP = "per-channel mean and pooled / per-sample std of a data set (CIFAR-10 by default)"
ESTIMATOR_CHOICES = ("pooled", "per_sample", "both")
SYNTHETIC_SIZE = (10000, 2000)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "stats", help=HELP,
        description="Per-channel statistics of a data set in one streaming pass: the mean, the "
        "pooled standard deviation (over all N*H*W pixels, what batch normalization computes) "
        "and the mean of per-image standard deviations.")
    p.add_argument("--data", default="cifar10",
                   help="cifar10 (= auto: $KERAS_VARINIT_CIFAR10, caches, download), synthetic "
                        f"({SYNTHETIC_SIZE[0]}/{SYNTHETIC_SIZE[1]} synthetic images), a CIFAR-10 "
                        "directory or .tar.gz in <split>/<class>/<file> layout, or a .npy array "
                        "(default %(default)s)")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="which split (default %(default)s; ignored for .npy)")
    p.add_argument("--estimator", choices=ESTIMATOR_CHOICES, default="both",
                   help="pooled, per_sample or both (default %(default)s)")
    p.add_argument("--scale", type=float, default=255.0,
                   help="divide the data by this first: 255 gives [0, 1] pixels, 1 raw values "
                        "(default %(default)g)")
    p.add_argument("--axis", type=int, default=-1,
                   help="channel axis (default %(default)s, channels last; 1 for NCHW)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per step (%(default)s)")
    p.add_argument("--digits", type=int, default=4, help="decimals shown (%(default)s)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--ignore-nan", action="store_true", help="skip NaN/Inf values")
    p.set_defaults(func=run)
    return p


def _load(data, split):
    """-> (array, description) for --data."""
    import numpy as np

    from keras_varinit import datasets

    index = 0 if split == "train" else 1
    if data in ("cifar10", "auto"):
        source = datasets.resolve_source("auto")
        x = datasets.load_cifar10("auto")[index][0]
        where = os.environ.get(datasets.ENV_PATH) or "cache/download"
        return x, f"CIFAR-10 {split} (source: {source}, {where})"
    if data == "synthetic":
        x = datasets.synthetic_cifar10(*SYNTHETIC_SIZE)[index][0]
        return x, f"SYNTHETIC CIFAR-10-shaped data, {split} (not CIFAR-10)"
    path = pathlib.Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data: no such file or directory: {data!r}. Allowed: cifar10, "
                                "synthetic, a <split>/<class>/<file> directory or .tar.gz, "
                                "or a .npy file")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False), f"{path.name} (numpy array)"
        except ValueError as error:   # numpy says "pickled data" of any file it cannot read
            raise ValueError(f"--data {data!r} is not a readable .npy array of numbers "
                             f"({error}). Allowed: a file written by np.save") from None
    x = datasets.load_cifar10("dir", path)[index][0]
    return x, f"{path.name}, {split}"


def run(args):
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from keras_varinit.channel_stats import (channel_stats, channel_stats_both, format_table,
                                             markdown_table)

    if args.scale <= 0:
        raise ValueError(f"--scale must be positive. Received: --scale={args.scale}")
    if args.digits < 0:
        raise ValueError(f"--digits must be >= 0. Received: --digits={args.digits}")
    x, description = _load(args.data, args.split)
    kwargs = dict(axis=args.axis, batch_size=args.batch_size, scale=args.scale,
                  ignore_nan=args.ignore_nan)
    if args.estimator == "both":
        pooled, per_sample = channel_stats_both(x, **kwargs)
        rows = [("mean", pooled.mean), ("std, pooled over all pixels", pooled.std),
                ("mean of per-image std", per_sample.std)]
        first = pooled
    else:
        first = channel_stats(x, estimator=args.estimator, **kwargs)
        label = ("std, pooled over all pixels" if args.estimator == "pooled"
                 else "mean of per-image std")
        rows = [("mean", first.mean), (label, first.std)]
    names = first.channel_names()
    scale_note = "on [0, 1]" if args.scale == 255 else (
        "raw values" if args.scale == 1 else f"divided by {args.scale:g}")
    title = (f"{description}: {first.n_samples:,} samples, shape {tuple(np.shape(x)[1:])}, "
             f"{scale_note}")

    console = Console(file=sys.stdout)
    if args.markdown:
        if args.estimator == "both":
            text = format_table(pooled, per_sample, names=names, digits=args.digits)
        else:
            text = markdown_table(rows, names, args.digits)
        console.print(f"{title}\n\n{text}", markup=False, highlight=False, soft_wrap=True)
        return 0
    console.print(title, markup=False, highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("statistic")
    for name in names:
        table.add_column(name, justify="right")
    for label, values in rows:
        table.add_row(label, *(f"{v:.{args.digits}f}" for v in values))
    console.print(table)
    return 0
