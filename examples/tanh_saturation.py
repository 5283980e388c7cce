"""A deep tanh MLP at initialization: weights too small vanish, too large saturate (Glorot &
Bengio 2010).

Layer l computes a^l = tanh(W^l a^(l-1)), biases 0. Near 0, tanh is the identity, so the
forward variance is multiplied by n Var[W] per layer (docs/science.md section 1):

* too small, N(0, 0.01^2): n Var[W] = width * 1e-4 << 1 -> activations shrink to 0 layer after
  layer, and so do the gradients of the weights (dL/dW = delta a^(l-1)^T);
* Xavier, Var[W] = 2/(fan_in + fan_out): n Var[W] = 1 at constant width -> the activations
  keep a spread (tanh compresses them slowly, Glorot & Bengio's Fig. 6);
* too large, N(0, 1): n Var[W] = width >> 1 -> every pre-activation is huge (Var[y] ~ 490 at
  width 512) and most units sit near +-1 (92.5% saturated in layers 2-11, tanh' = 1 - a^2 ~ 0).
  The gradient is not starved, it explodes towards the input: the units that are not
  saturated, times the large weights, multiply Var[dL/dy] by n Var[W] E[tanh'(y)^2] =
  512 * 0.024 ~ 12 per layer, so the first layer's Var[dL/dy] is about 9e9 times the
  classifier's (CIFAR-10, seed 0: 6.01e+03 / 6.65e-07, the table's "ratio first/last").

This script builds ``keras_varinit.models.plain_mlp`` (tanh, no BN) with the three
initializations, feeds a batch of normalized CIFAR-10 images (``load_cifar10("auto")``;
``--data synthetic`` offline), and writes

* ``<out>/tanh_saturation.png``: per-layer activation histograms at initialization (one panel
  per initialization), the fraction of saturated units (|a| > 0.97) per layer, the activation
  std per layer and the gradient variance per layer (``kv.variance_profile``);
* ``<out>/tanh_saturation.md``: the same numbers as a table.

Runs in seconds on a CPU.
"""
import argparse
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SATURATION = 0.97  # same threshold as LayerStatsLogger's saturated_fraction
INITS = (("normal:0.01", "too small: N(0, 0.01^2)", "tab:blue"),
         ("xavier_normal", "Xavier: N(0, 2/(fan_in+fan_out))", "tab:green"),
         ("normal:1.0", "too large: N(0, 1)", "tab:red"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=12, help="weight layers (default 12)")
    p.add_argument("--width", type=int, default=512, help="hidden units (default 512)")
    p.add_argument("--n", type=int, default=512, help="images in the batch (default 512)")
    p.add_argument("--data", default="auto", help="auto, synthetic or a CIFAR-10 path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples/output", help="output folder")
    return p.parse_args(argv)


def load_batch(args):
    import numpy as np

    from keras_varinit import datasets
    from keras_varinit.channel_stats import channel_stats

    if args.data == "synthetic":
        (x, _), _ = datasets.synthetic_cifar10(max(args.n, 1000), 100, seed=args.seed)
        synthetic = True
    else:
        source, path = ("auto", None) if args.data == "auto" else ("dir", args.data)
        (x, _), _ = datasets.load_cifar10(source, path)
        synthetic = datasets.resolve_source(source, path) == "synthetic"
    stats = channel_stats(x, estimator="pooled")
    idx = np.random.default_rng(args.seed).permutation(len(x))[: args.n]
    batch = (x[idx].astype("float32") - np.asarray(stats.mean, "float32")) \
        / np.asarray(stats.std, "float32")
    return batch, synthetic


def activations(model, x):
    import keras
    import numpy as np

    acts = [layer for layer in model.layers if layer.name.startswith("act_")]
    probe = keras.Model(model.inputs, [layer.output for layer in acts])
    outs = probe([x], training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return [layer.name for layer in acts], [np.asarray(keras.ops.convert_to_numpy(o)) for o in outs]


def analyse(args, x):
    import numpy as np

    import keras_varinit as kv
    from keras_varinit import models

    results = {}
    for init, label, color in INITS:
        model = models.build_model("mlp", depth=args.depth, width=args.width,
                                   kernel_initializer=init, activation="tanh",
                                   input_shape=tuple(x.shape[1:]), seed=args.seed)
        names, acts = activations(model, x)
        profile = kv.variance_profile(model, x, seed=args.seed)
        results[init] = {
            "label": label, "color": color, "names": names, "acts": acts,
            "std": [float(a.std()) for a in acts],
            "saturated": [float((np.abs(a) > SATURATION).mean()) for a in acts],
            "grad_var": [float(v) for v in profile["backward_var"]],
            "weight_layers": list(profile["layer"]),
        }
    return results


def plot(results, args, synthetic, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    bins = np.linspace(-1, 1, 81)
    cmap = plt.get_cmap("viridis")
    for ax, (init, r) in zip(axes[0], results.items()):
        n = len(r["acts"])
        for i, a in enumerate(r["acts"]):
            hist, edges = np.histogram(np.clip(a.ravel(), -1, 1), bins=bins, density=True)
            ax.step(edges[:-1], hist, where="post", color=cmap(i / max(1, n - 1)), lw=1,
                    label=f"layer {i + 1}" if i in (0, n // 2, n - 1) else None)
        ax.set_yscale("log")
        ax.set_xlim(-1.05, 1.05)
        ax.set_title(f"{r['label']}\nactivation histograms (layer 1 purple -> {n} yellow)",
                     fontsize=9)
        ax.set_xlabel("tanh activation")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("density (log)")
    layers = np.arange(1, len(next(iter(results.values()))["std"]) + 1)
    ax = axes[1][0]
    for r in results.values():
        ax.plot(layers, r["saturated"], "o-", ms=3, color=r["color"], label=r["label"])
    ax.set_title(f"saturated fraction |a| > {SATURATION} per hidden layer")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("hidden layer")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    for r in results.values():
        ax.semilogy(layers, r["std"], "o-", ms=3, color=r["color"], label=r["label"])
    ax.set_title("activation std per hidden layer")
    ax.set_xlabel("hidden layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1][2]
    for r in results.values():
        ax.semilogy(range(1, len(r["grad_var"]) + 1), r["grad_var"], "o-", ms=3,
                    color=r["color"], label=r["label"])
    ax.set_title("Var[dL/dy] per weight layer (variance_profile)")
    ax.set_xlabel("weight layer (last = classifier)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    data = "SYNTHETIC data" if synthetic else "CIFAR-10"
    fig.suptitle(f"{args.depth}-layer tanh MLP, width {args.width}, at initialization: "
                 f"{args.n} normalized {data} images", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(results, args, synthetic):
    inits = list(results)
    head = "| hidden layer | " + " | ".join(
        f"{results[i]['label']}: std | sat." for i in inits) + " |"
    out = [f"# tanh MLP at initialization ({args.depth} layers, width {args.width})", "",
           f"Batch: {args.n} normalized {'SYNTHETIC' if synthetic else 'CIFAR-10'} images; "
           f"saturated = |a| > {SATURATION}.", "", head,
           "|---|" + "---|---|" * len(inits)]
    n = len(results[inits[0]]["std"])
    for layer in range(n):
        cells = []
        for i in inits:
            cells.append(f"{results[i]['std'][layer]:.3g} | "
                         f"{100 * results[i]['saturated'][layer]:.1f}%")
        out.append(f"| {layer + 1} | " + " | ".join(cells) + " |")
    out += ["", "Gradient variance Var[dL/dy] at the first / last weight layer "
            "(variance_profile):", ""]
    for i in inits:
        g = results[i]["grad_var"]
        out.append(f"- {results[i]['label']}: {g[0]:.3g} / {g[-1]:.3g} "
                   f"(ratio first/last {g[0] / g[-1]:.3g})" if g[-1] else f"- {i}: n/a")
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, synthetic = load_batch(args)
    results = analyse(args, x)
    png, md = out / "tanh_saturation.png", out / "tanh_saturation.md"
    plot(results, args, synthetic, png)
    md.write_text(markdown(results, args, synthetic))
    for r in results.values():
        print(f"{r['label']:34s} activation std layer 1 -> {len(r['std'])}: "
              f"{r['std'][0]:.3g} -> {r['std'][-1]:.3g}; saturated "
              f"{100 * r['saturated'][0]:.1f}% -> {100 * r['saturated'][-1]:.1f}%; "
              f"grad var first/last layer {r['grad_var'][0]:.3g}/{r['grad_var'][-1]:.3g}")
    print(f"\nWrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
