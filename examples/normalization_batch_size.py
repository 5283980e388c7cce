"""Batch norm vs group norm (and layer norm) against the batch size: Wu & He 2018, Fig. 1, small.

Wu and He ("Group Normalization", ECCV 2018, Fig. 1) train a ResNet-50 on ImageNet with batch
normalization (BN) and group normalization (GN) at 32, 16, 8, 4 and 2 images per worker, the
learning rate scaled linearly with the batch size: BN's validation error climbs steeply below 8
images (23.6% at 32, 34.7% at 2), GN's stays flat (about 24%), because BN's statistics come
from the batch and GN's from each image alone.

This script trains the same plain CNN (``keras_varinit.models.plain_cnn``: 3x3 convolutions,
ReLU, Kaiming, the normalization before every activation) with ``normalization="batch"``,
``"group"`` and ``"layer"`` at batch sizes 2, 4, 8, 16, 32 and 64, with

* the learning rate scaled linearly: ``lr = base_lr * batch_size / base_batch`` (SGD with
  momentum, cosine decay over the run; Goyal et al. 2017's rule, as in the paper),
* the same epochs, data, data order and initial weights for every run (one seed: one draw),
* BN's moving averages updated with momentum 0.9 (``--bn-momentum``; PyTorch's default,
  ``momentum=0.1`` in its convention; Keras's 0.99 lags behind short runs),

then evaluates each network on the validation images in inference mode (BN: its moving
statistics), and on a fixed slice of the training images in both modes
(``keras_varinit.training.mode_eval.evaluate_modes``: BN's train/test discrepancy). It writes

* ``<out>/normalization_batch_size.md``: validation error per method and batch size, the
  train/test gap, seconds per run, the settings and the wall time;
* ``<out>/normalization_batch_size.png``: validation error against the batch size per method
  (log2 x axis), and the train/test gap.

CPU defaults (sized for about 15 minutes on 2 cores; measured 18.8 min on 2 cores shared with
other jobs, load average 5.5-6.7): a 6-layer CNN of width 8 (8/16/32 channels, GN with 4
groups), 2 epochs over 5,000 CIFAR-10 training images, validation on 2,000 test images, base
learning rate 0.05 at batch 32::

    KERAS_VARINIT_CIFAR10=/path/to/cifar10-jpeg.tar.gz python examples/normalization_batch_size.py

Full settings (all of CIFAR-10, for a GPU; several hours)::

    python examples/normalization_batch_size.py --subset 0 --val-subset 0 --depth 11 \\
        --width 32 --groups 8 --epochs 30 --out examples/output/gpu

(``--subset 0`` / ``--val-subset 0``: all 50,000 training and 10,000 test images; width 32
gives 32/64/128 channels, 8 groups of 4/8/16 channels.) ``--methods``, ``--batch-sizes``,
``--base-lr`` and ``--base-batch`` change the grid; ``--seed`` the draw.
"""
import argparse
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METHODS = ("batch", "group", "layer")
COLORS = {"batch": "tab:blue", "batch_per_sample": "tab:cyan", "group": "tab:orange",
          "layer": "tab:green", "instance": "tab:red", "none": "tab:gray"}
BATCH_SIZES = (2, 4, 8, 16, 32, 64)
EVAL_BATCH = 500          # inference mode: the batch size changes nothing but speed
MODE_SLICE = 1000         # training images evaluated in both modes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Full settings for a GPU: see the module docstring.")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="normalizations to compare (default: %(default)s)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES),
                   help="(default: %(default)s)")
    p.add_argument("--depth", type=int, default=6, help="weight layers (default %(default)s)")
    p.add_argument("--width", type=int, default=8,
                   help="channels of the first stage (default %(default)s)")
    p.add_argument("--groups", type=int, default=4, help="GN groups (default %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="(default %(default)s)")
    p.add_argument("--subset", type=int, default=5000,
                   help="training images, 0 = all 50,000 (default %(default)s)")
    p.add_argument("--val-subset", type=int, default=2000,
                   help="test images, 0 = all 10,000 (default %(default)s)")
    p.add_argument("--base-lr", type=float, default=0.05,
                   help="learning rate at --base-batch (default %(default)s)")
    p.add_argument("--base-batch", type=int, default=32, help="(default %(default)s)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (default %(default)s)")
    p.add_argument("--bn-momentum", type=float, default=0.9,
                   help="BN moving-average momentum (default %(default)s)")
    p.add_argument("--data", default="auto", help="auto, synthetic or a CIFAR-10 path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples/output", help="output folder")
    args = p.parse_args(argv)
    problem = _problem(args)
    if problem:
        p.error(problem)
    return args


def _problem(args):
    """The first bad argument, worded as "what was received, what is allowed" (or None)."""
    from keras_varinit import models

    for method in args.methods:
        if method not in models.NORMALIZATIONS:
            return (f"unknown method. Received: --methods {method}. Allowed: "
                    f"{', '.join(models.NORMALIZATIONS)}")
    for name, value, low in (("--depth", args.depth, 2), ("--width", args.width, 1),
                             ("--epochs", args.epochs, 1), ("--base-batch", args.base_batch, 1),
                             *(("--batch-sizes", b, 1) for b in args.batch_sizes)):
        if value < low:
            return f"must be >= {low}. Received: {name} {value}"
    if args.subset and args.subset < max(args.batch_sizes):
        return (f"the subset must hold one batch. Received: --subset {args.subset}, "
                f"--batch-sizes up to {max(args.batch_sizes)}")
    if not (args.base_lr > 0 and 0 <= args.momentum < 1 and 0 <= args.bn_momentum < 1):
        return (f"Received: --base-lr {args.base_lr}, --momentum {args.momentum}, "
                f"--bn-momentum {args.bn_momentum}. Allowed: lr > 0, momenta in [0, 1)")
    try:
        for method in args.methods:
            models.check_normalization("cnn", method, args.width, args.groups)
    except ValueError as error:
        return str(error)
    return None


def load(args):
    """Normalized training and validation arrays (training.data.load_data), and whether
    they are synthetic."""
    from keras_varinit.training import TrainConfig
    from keras_varinit.training.data import load_data

    config = TrainConfig(data=args.data, subset=args.subset or None,
                         val_subset=args.val_subset or None, seed=args.seed)
    train, val, info = load_data(config)
    return train, val, info["synthetic"]


def build(method, batch_size, steps, args):
    """The compiled plain CNN of ``method`` for ``batch_size`` (linearly scaled learning rate,
    cosine decay over ``steps``); the same initial weights for every method with one seed."""
    import keras

    from keras_varinit import layers, models

    keras.utils.set_random_seed(args.seed)
    model = models.plain_cnn(args.depth, width=args.width, normalization=method,
                             groups=args.groups, seed=args.seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = args.bn_momentum
    lr = args.base_lr * batch_size / args.base_batch
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=args.momentum),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model, lr


def train_one(method, batch_size, data, args, advance):
    """Train one (method, batch size); its errors, gap and seconds."""
    import keras

    from keras_varinit.training.mode_eval import evaluate_modes

    (x, y), (xv, yv) = data
    steps = args.epochs * math.ceil(len(x) / batch_size)
    model, lr = build(method, batch_size, steps, args)
    tick = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: advance())
    started = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=args.epochs, shuffle=True, verbose=0,
              callbacks=[tick])
    seconds = time.perf_counter() - started
    val = model.evaluate(xv, yv, batch_size=EVAL_BATCH, verbose=0, return_dict=True)
    modes = evaluate_modes(model, x[:MODE_SLICE], y[:MODE_SLICE], batch_size)
    return {"method": method, "batch_size": batch_size, "lr": lr, "seconds": seconds,
            "val_error": 1 - val["accuracy"],
            "train_mode_error": 1 - modes["train_mode_accuracy"],
            "train_eval_error": 1 - modes["train_eval_accuracy"]}


def run_grid(args, data):
    """Every (batch size, method), with one rich progress bar over all their steps."""
    import keras
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    n = len(data[0][0])
    total = sum(args.epochs * math.ceil(n / b) for b in args.batch_sizes) * len(args.methods)
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("training", total=total)
        for batch_size in args.batch_sizes:
            for method in args.methods:
                progress.update(task, description=f"{method:>6} batch {batch_size:>3}")
                row = train_one(method, batch_size, data, args,
                                lambda: progress.advance(task))
                results.append(row)
                progress.console.print(
                    f"{method:>6} batch {batch_size:>3} lr {row['lr']:.4g}: val error "
                    f"{100 * row['val_error']:.1f}%, train slice error "
                    f"{100 * row['train_mode_error']:.1f}% (training mode) / "
                    f"{100 * row['train_eval_error']:.1f}% (inference mode), "
                    f"{row['seconds']:.0f} s")
                keras.backend.clear_session()
    return results


def _row(results, method, batch_size):
    return next(r for r in results if r["method"] == method and r["batch_size"] == batch_size)


def _gap(row):
    """Inference-mode minus training-mode error on the training slice (percentage points)."""
    return 100 * (row["train_eval_error"] - row["train_mode_error"])


def _table(results, args, value):
    """A markdown table: one row per batch size, one column per method, ``value(row)``."""
    lines = ["| batch size | " + " | ".join(args.methods) + " |",
             "|---" * (len(args.methods) + 1) + "|"]
    for b in args.batch_sizes:
        cells = [value(_row(results, m, b)) for m in args.methods]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines


def markdown(results, args, context):
    """The tables as markdown: validation error, the train/test gap, seconds per run."""
    data = "SYNTHETIC (not CIFAR-10)" if context["synthetic"] else "CIFAR-10"
    return "\n".join([
        f"# Validation error against the batch size ({args.depth}-layer plain CNN)", "",
        f"{args.epochs} epochs over {args.subset or 'all'} {data} training images, validation "
        f"on {args.val_subset or 'all'} test images; width {args.width} ({args.width}/"
        f"{2 * args.width}/{4 * args.width} channels), GN with {args.groups} groups, Kaiming "
        f"normal, ReLU; SGD momentum {args.momentum}, learning rate {args.base_lr:g} x batch / "
        f"{args.base_batch} with cosine decay; BN momentum {args.bn_momentum}; seed "
        f"{args.seed} (one draw). Backend {context['backend']}, {context['device']}.", "",
        "Validation error (%), inference mode:", "",
        *_table(results, args, lambda r: f"{100 * r['val_error']:.1f}"), "",
        f"Train/test gap on {MODE_SLICE} training images (percentage points): the error in "
        "inference mode (moving statistics) minus the error in training mode (each batch's own "
        "statistics, batches of the training batch size), same weights:", "",
        *_table(results, args, lambda r: f"{_gap(r):+.1f}"), "",
        "Training time per run (s):", "",
        *_table(results, args, lambda r: f"{r['seconds']:.0f}"), "",
        f"Wall time of the whole script: {context['wall']:.0f} s ({context['wall'] / 60:.1f} "
        f"min); load average (1 min) {context['load'][0]:.1f} at the start, "
        f"{context['load'][1]:.1f} at the end, on {os.cpu_count()} CPUs."]) + "\n"


def plot(results, args, context, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in args.methods:
        rows = [_row(results, method, b) for b in args.batch_sizes]
        color = COLORS.get(method)
        ax1.plot(args.batch_sizes, [100 * r["val_error"] for r in rows], "o-", color=color,
                 label=method)
        ax2.plot(args.batch_sizes, [_gap(r) for r in rows], "o-", color=color, label=method)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.batch_sizes, [str(b) for b in args.batch_sizes])
        ax.set_xlabel("batch size (images per step; lr scaled linearly)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_ylabel("validation error (%)")
    ax1.set_title("validation error (inference mode)")
    ax2.axhline(0, color="gray", lw=0.8)
    ax2.set_ylabel("inference-mode minus training-mode error (pp)")
    ax2.set_title(f"train/test gap on {MODE_SLICE} training images")
    data = "SYNTHETIC data" if context["synthetic"] else "CIFAR-10"
    fig.suptitle(f"{args.depth}-layer plain CNN, width {args.width}, {args.epochs} epochs over "
                 f"{args.subset or 'all'} {data} images, seed {args.seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    import keras

    from keras_varinit.training.device import describe_device

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    *data, synthetic = load(args)
    results = run_grid(args, data)
    context = {"synthetic": synthetic, "backend": keras.backend.backend(),
               "device": describe_device(), "wall": time.perf_counter() - started,
               "load": (load_start, os.getloadavg()[0])}
    png, md = out / "normalization_batch_size.png", out / "normalization_batch_size.md"
    plot(results, args, context, png)
    text = markdown(results, args, context)
    md.write_text(text)
    print()
    print(text)
    print(f"Wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
