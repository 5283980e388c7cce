"""Kaiming at finite width: how far one draw of a 30-layer plain ReLU CNN drifts from the theory.

He et al.'s recursion Var[y_l] = fan_in Var[W] E[x_l^2], E[x_(l+1)^2] = Var[y_l] / 2 is an
average over weight draws: with Var[W] = 2/fan_in the forward variance is the same at every
layer, except that a zero-padded ("same") convolution's border positions sum fewer real
inputs; with that `padding_factor` the recursion is exact in expectation at any width (about
x0.3 over the 30-layer CIFAR net, mostly on its 8x8 maps). A single draw deviates from
that average: each layer's realized gain, and ReLU's factor (1/2 only on average over units),
fluctuate from draw to draw, and their product over depth is roughly log-normal, so a
typical draw sits below the mean (Jensen) and draws spread widely. For MLPs, Hanin & Rolnick
(2018, "How to start training: the effect of initialization and architecture") show the
spread grows like sum_l 1/n_l; whether wider channels tighten it for this CNN is what the
sweep measures (between 16 and 64 channels they did not, clearly: see the committed output).

This script measures it: for each width and seed it builds ``plain_cnn(depth, width)`` with
Kaiming (normal and uniform: the uniform's lower fourth moment might fluctuate less) and records,
from ``kv.variance_profile(..., gradients=False)`` on a batch of N(0, 1) inputs, the forward
variance of the last hidden layer over the first's (the ratio the profile's verdict uses),
next to the recursion's prediction. It writes

* ``<out>/finite_width_drift.md``: per initializer and width, the median / min / max ratio,
  the fraction of draws within 4x, and the prediction;
* ``<out>/finite_width_drift.png``: the ratios per draw against width (log-log), and the
  median per-layer profile per width.

    python examples/finite_width_drift.py                    # widths 16 32 64, 8 seeds
    python examples/finite_width_drift.py --widths 16 24 32 48 64 --seeds 12   # committed

Draws are independent: `plain_cnn` hashes (seed, layer) into each layer's seed. About 8
minutes on 2 CPU cores for the committed run (width 64 is ~3 s a draw).
"""
import argparse
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

INITS = (("kaiming_normal", "Kaiming normal", "tab:red"),
         ("kaiming_uniform", "Kaiming uniform", "tab:orange"))
WITHIN = 4.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=30, help="weight layers (default 30)")
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64],
                   help="first-stage channel counts (default 16 32 64)")
    p.add_argument("--seeds", type=int, default=8, help="weight draws per width (default 8)")
    p.add_argument("--batch", type=int, default=256, help="inputs per draw (default 256)")
    p.add_argument("--out", default="examples/output", help="output folder")
    args = p.parse_args(argv)
    if args.depth < 3 or args.seeds < 1 or args.batch < 2 or min(args.widths) < 1:
        p.error(f"need --depth >= 3, --seeds >= 1, --batch >= 2, widths >= 1. Received: "
                f"--depth {args.depth} --seeds {args.seeds} --batch {args.batch} "
                f"--widths {args.widths}")
    return args


def measure(args):
    """{(init, width): [{"ratio", "predicted", "profile"} per seed]}."""
    import keras
    import numpy as np
    from rich.progress import Progress

    import keras_varinit as kv
    from keras_varinit import diagnostics, models, profile_report

    x = np.random.default_rng(0).standard_normal((args.batch, 32, 32, 3)).astype("float32")
    results = {}
    total = len(INITS) * len(args.widths) * args.seeds
    with Progress() as progress:
        task = progress.add_task("profiling draws", total=total)
        for init, _, _ in INITS:
            for width in args.widths:
                draws = []
                for seed in range(args.seeds):
                    model = models.plain_cnn(args.depth, width=width, kernel_initializer=init,
                                             seed=seed)
                    df = kv.variance_profile(model, x, seed=seed, gradients=False)
                    i, j = profile_report.compared_rows(df)
                    fwd = df["forward_var"].to_numpy()
                    ratio, predicted, padding = profile_report.forward_ratios(df)
                    draws.append({"ratio": ratio, "predicted": predicted, "padding": padding,
                                  "profile": fwd[: j + 1] / fwd[i]})
                    keras.backend.clear_session()
                    progress.advance(task)
                results[(init, width)] = draws
    return results


def summary_rows(results):
    import numpy as np

    rows = []
    for (init, width), draws in results.items():
        r = np.array([d["ratio"] for d in draws])
        rows.append({"init": init, "width": width, "draws": len(r),
                     "median": float(np.median(r)), "min": float(r.min()),
                     "max": float(r.max()),
                     "within": float(np.mean((r >= 1 / WITHIN) & (r <= WITHIN))),
                     "predicted": float(np.median([d["predicted"] for d in draws])),
                     "padding": float(np.median([d["padding"] for d in draws]))})
    return rows


def markdown(rows, args):
    import keras

    out = [f"# Kaiming at finite width: {args.depth}-layer plain ReLU CNN at initialization", "",
           f"Forward variance of the last hidden layer over the first's (pre-activations, "
           f"`kv.variance_profile`), one batch of {args.batch} N(0, 1) inputs, "
           f"{args.seeds} weight draws per row (seeds 0-{args.seeds - 1}); widths are the "
           f"first stage's channels (stages w/2w/4w). Backend {keras.backend.backend()}. "
           "The recursion (the expectation over weight draws, zero padding included) predicts "
           "the last column, of which the zero padding alone is the one before.", "",
           f"| initializer | width | median | min | max | draws within {WITHIN:g}x | "
           "zero padding | recursion predicts |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['init']} | {r['width']} | {r['median']:.3g} | {r['min']:.3g} | "
                   f"{r['max']:.3g} | {100 * r['within']:.0f}% | {r['padding']:.3g} | "
                   f"{r['predicted']:.3g} |")
    out += ["", "Xavier needs no row: with ReLU (positively homogeneous) and the same seed, its "
            "activations are Kaiming's times 2^(-l/2), so its ratio is Kaiming's times about "
            "2^-28.", ""]
    return "\n".join(out)


def plot(results, rows, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for k, (init, label, color) in enumerate(INITS):
        widths = [w for (i, w) in results if i == init]
        offset = 1.0 + 0.04 * (k - (len(INITS) - 1) / 2)
        for w in widths:
            r = [d["ratio"] for d in results[(init, w)]]
            ax.scatter([w * offset] * len(r), r, color=color, alpha=0.5, s=18)
        medians = [next(row["median"] for row in rows if row["init"] == init
                        and row["width"] == w) for w in widths]
        ax.plot(widths, medians, "o-", color=color, label=f"{label}: median of draws")
    preds = [row["predicted"] for row in rows]
    ax.axhspan(1 / WITHIN, WITHIN, color="tab:green", alpha=0.12,
               label=f"within {WITHIN:g}x of the first layer")
    ax.axhline(float(np.median(preds)), color="k", ls="--", lw=1,
               label="recursion incl. zero padding (expected over draws)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("channels in the first stage (stages w, 2w, 4w)")
    ax.set_ylabel("Var[y] last hidden layer / first")
    ax.set_title("one draw (dots) against the expectation over draws (dashed)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)

    init, label, _ = INITS[0]
    cmap = plt.get_cmap("viridis")
    widths = [w for (i, w) in results if i == init]
    for n, w in enumerate(widths):
        profiles = np.array([d["profile"] for d in results[(init, w)]])
        median = np.exp(np.median(np.log(profiles), axis=0))
        ax2.semilogy(np.arange(1, len(median) + 1), median, "o-", ms=3,
                     color=cmap(n / max(1, len(widths) - 1)), label=f"width {w}")
    ax2.axhspan(1 / WITHIN, WITHIN, color="tab:green", alpha=0.12)
    ax2.set_xlabel("weight layer")
    ax2.set_ylabel("Var[y_l] / Var[y_1] (median over draws)")
    ax2.set_title(f"{label}: per-layer profile")
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{args.depth}-layer plain ReLU CNN at initialization, {args.seeds} draws per "
                 f"width, batch {args.batch}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = measure(args)
    rows = summary_rows(results)
    png, md = out / "finite_width_drift.png", out / "finite_width_drift.md"
    plot(results, rows, args, png)
    md.write_text(markdown(rows, args))
    for r in rows:
        print(f"{r['init']:16s} width {r['width']:4d}: median {r['median']:.3g} "
              f"(min {r['min']:.3g}, max {r['max']:.3g}), within {WITHIN:g}x in "
              f"{100 * r['within']:.0f}% of draws; recursion predicts {r['predicted']:.3g} "
              f"(zero padding {r['padding']:.3g})")
    print(f"\nWrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
