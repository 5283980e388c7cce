"""A deep plain ReLU CNN stalls under Xavier and trains under Kaiming (He et al. 2015).

He, Zhang, Ren & Sun (2015), "Delving deep into rectifiers", Fig. 3: a 30-layer plain ReLU net
without batch normalization does not learn with Xavier initialization (Var[W] = 1/fan_in at
constant width, so the forward signal halves at every ReLU layer: about 2^-29 at the logits)
and learns with Kaiming (Var[W] = 2/fan_in keeps it constant). Fig. 2: at 22 layers both
converge, Kaiming starts reducing the error earlier.

This script trains the same plain CNN (``keras_varinit.models.plain_cnn``: 3x3 convolutions in
three stages of width, 2*width, 4*width channels, no BN, no skip connections) once with each
initializer through ``keras_varinit.training.run_training`` and writes

* ``<out>/deep_relu_stall_<depth>.png``: training loss per step for both, and the per-layer
  weight-gradient std (and activation std) of a probe batch at step 0;
* ``<out>/deep_relu_stall_<depth>.md``: a table of epoch losses and accuracies;
* ``<out>/runs/<depth>-<init>/``: the full run directories (TensorBoard logs included).

Defaults (CPU, a few minutes on 2 cores): 30 layers, width 16, SGD lr 0.01 momentum 0.9,
2 epochs over 10,000 CIFAR-10 training images, validation on 2,000 test images. The check it
prints: Xavier's training loss stays within 0.01 of ln 10 = 2.303 while Kaiming's falls by at
least 0.05 below it.

Full runs on a GPU, e.g. the paper's 22-layer large model on all of CIFAR-10::

    python examples/deep_relu_stall.py --pair 22 --width 64 --subset 0 --val-subset 0 \\
        --epochs 30

Data: ``load_cifar10("auto")``: set ``KERAS_VARINIT_CIFAR10=/path/cifar10-jpeg.tar.gz`` to use a
local copy; ``--data synthetic`` runs offline on synthetic CIFAR-shaped data (clearly labelled).
"""
import argparse
import json
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LN10 = math.log(10.0)
INITS = ("xavier_normal", "kaiming_normal")
LABELS = {"xavier_normal": "Xavier", "kaiming_normal": "Kaiming"}
COLORS = {"xavier_normal": "tab:blue", "kaiming_normal": "tab:red"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", type=int, default=30,
                   help="depth of the pair: 30 (Fig. 3, default) or 22 (Fig. 2); any depth >= 2")
    p.add_argument("--width", type=int, default=16,
                   help="channels of the first stage (16; the paper's 22-layer model uses 64)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--subset", type=int, default=10000, help="training images (0 = all)")
    p.add_argument("--val-subset", type=int, default=2000, help="test images (0 = all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--data", default="auto", help="auto, synthetic or a CIFAR-10 path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-every", type=int, default=0,
                   help="layer statistics every N steps besides step 0 and epoch ends (0)")
    p.add_argument("--out", default="examples/output", help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="resume stopped runs in <out>/runs instead of starting over")
    return p.parse_args(argv)


def train_pair(args):
    from keras_varinit.training import TrainConfig, run_training

    results = {}
    for init in INITS:
        config = TrainConfig(
            model="cnn", depth=args.pair, width=args.width, init=init, activation="relu",
            normalization="none", optimizer="sgd", lr=args.lr, momentum=args.momentum,
            epochs=args.epochs, batch_size=args.batch_size, subset=args.subset or None,
            val_subset=args.val_subset or None, data=args.data, seed=args.seed,
            # Layer statistics at step 0 and epoch ends (plus every N steps if asked).
            stats_every_n_steps=args.stats_every or 10 ** 9)
        run_dir = pathlib.Path(args.out) / "runs" / f"{args.pair}-{init}"
        print(f"\n== {LABELS[init]} ({init}), {args.pair} layers -> {run_dir}", flush=True)
        started = time.perf_counter()
        result = run_training(config, run_dir, resume=args.resume, overwrite=not args.resume,
                              verbose=2)
        results[init] = {"result": result, "run_dir": run_dir,
                         "seconds": time.perf_counter() - started}
    return results


def load_run(run_dir):
    from keras_varinit import run_files as rf

    steps = rf.read_jsonl(run_dir / rf.STEPS_FILE)
    layers = rf.read_jsonl(run_dir / rf.LAYER_STATS_FILE)
    metrics = rf.MetricsCsv(run_dir / rf.METRICS_FILE).read()
    status = rf.read_json(run_dir / rf.STATUS_FILE) or {}
    config = rf.read_json(run_dir / rf.CONFIG_FILE) or {}
    return steps, layers, metrics, status, config


def per_step_losses(steps):
    """Per-batch losses recovered from Keras's running epoch means in steps.jsonl."""
    out, prev_epoch, prev_mean, k = [], None, 0.0, 0
    for rec in steps:
        if rec["loss"] is None:
            out.append((rec["step"], float("nan")))
            continue
        if rec["epoch"] != prev_epoch:
            prev_epoch, prev_mean, k = rec["epoch"], 0.0, 0
        k += 1
        batch_loss = k * rec["loss"] - (k - 1) * prev_mean
        prev_mean = rec["loss"]
        out.append((rec["step"], batch_loss))
    return out


def summarize(results):
    summary = {}
    for init, item in results.items():
        steps, layers, metrics, status, config = load_run(item["run_dir"])
        epoch_losses = [float(r["loss"]) for r in metrics]
        first = steps[0]["loss"] if steps else float("nan")
        summary[init] = {
            "state": status.get("state"), "epoch_losses": epoch_losses,
            "first_batch_loss": first,
            "final_loss": epoch_losses[-1] if epoch_losses else float("nan"),
            "max_dev_from_ln10": max((abs(v - LN10) for v in epoch_losses), default=math.nan),
            "metrics": metrics, "steps": steps, "layers": layers, "config": config,
            "seconds": item["seconds"],
            "epoch_seconds": [float(r["seconds"]) for r in metrics],
            "images_per_second": status.get("images_per_second"),
            "device": status.get("device"),
        }
    return summary


def check(summary):
    """The claims of Fig. 3 at the defaults; returns (ok, lines)."""
    x, k = summary["xavier_normal"], summary["kaiming_normal"]
    xavier_ok = x["max_dev_from_ln10"] <= 0.01
    kaiming_ok = k["final_loss"] <= LN10 - 0.05
    lines = [
        f"Xavier : epoch training losses {', '.join(f'{v:.4f}' for v in x['epoch_losses'])}; "
        f"max |loss - ln 10| = {x['max_dev_from_ln10']:.4f} "
        f"-> {'stalls (within 0.01 of ln 10)' if xavier_ok else 'NOT within 0.01 of ln 10'}",
        f"Kaiming: epoch training losses {', '.join(f'{v:.4f}' for v in k['epoch_losses'])}; "
        f"final {k['final_loss']:.4f} = ln 10 - {LN10 - k['final_loss']:.4f} "
        f"-> {'learns (falls by >= 0.05)' if kaiming_ok else 'does NOT fall by 0.05'}",
    ]
    for init, s in summary.items():
        start = next((i + 1 for i, v in enumerate(s["epoch_losses"]) if v < LN10 - 0.01), None)
        vals = [float(r["val_accuracy"]) for r in s["metrics"]
                if r.get("val_accuracy") is not None]
        best = f"best val error {100 * (1 - max(vals)):.2f}%, last {100 * (1 - vals[-1]):.2f}%" \
            if vals else "no validation"
        lines.append(f"{LABELS[init]}: epoch loss first below ln 10 - 0.01 at epoch "
                     f"{start if start else 'never'}; {best}")
    return xavier_ok and kaiming_ok, lines


def step0_profile(layers, field):
    rows = sorted((r for r in layers if r["step"] == 0 and r.get(field) is not None
                   and r["layer_type"] in ("Conv2D", "Dense")),
                  key=lambda r: r["layer_index"])
    return [r[field] for r in rows]


def plot(summary, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synthetic = any(s["config"].get("synthetic") for s in summary.values())
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for init, s in summary.items():
        pts = per_step_losses(s["steps"])
        steps = [p[0] for p in pts]
        ax.plot(steps, [p[1] for p in pts], color=COLORS[init], alpha=0.25, lw=0.8)
        window = 10
        smooth = [sum(v for _, v in pts[max(0, i - window + 1): i + 1])
                  / len(pts[max(0, i - window + 1): i + 1]) for i in range(len(pts))]
        ax.plot(steps, smooth, color=COLORS[init], lw=2,
                label=f"{LABELS[init]} (final epoch mean {s['final_loss']:.3f})")
    ax.axhline(LN10, color="gray", ls="--", lw=1, label="ln 10 = 2.303 (chance)")
    ax.set_xlabel("step (batch)")
    ax.set_ylabel("training loss (per batch; bold: 10-step mean)")
    ax.set_title(f"{args.pair}-layer plain ReLU CNN, no BN: training loss")
    ax.legend(fontsize=8)
    lo = min(min((p[1] for p in per_step_losses(s["steps"]) if math.isfinite(p[1])),
                 default=LN10) for s in summary.values())
    ax.set_ylim(max(0.0, min(lo, LN10 - 0.1) - 0.05), LN10 + 0.35)

    for ax, field, title in ((axes[1], "weight_grad_std", "std of dL/dW per layer at step 0"),
                             (axes[2], "activation_std", "activation std per layer at step 0")):
        for init, s in summary.items():
            values = step0_profile(s["layers"], field)
            ax.semilogy(range(1, len(values) + 1), values, "o-", ms=3, color=COLORS[init],
                        label=LABELS[init])
        ax.set_xlabel("weight layer (1 = first conv, last = classifier)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    data = "SYNTHETIC data" if synthetic else "CIFAR-10"
    fig.suptitle(f"He et al. 2015 Fig. {3 if args.pair >= 30 else 2}: Xavier vs Kaiming, "
                 f"{args.pair} layers, width {args.width}, SGD lr {args.lr} momentum "
                 f"{args.momentum}, {args.epochs} epochs, {args.subset or 'all'} {data} "
                 "training images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary, args, ok, lines):
    synthetic = any(s["config"].get("synthetic") for s in summary.values())
    out = [f"# Deep plain ReLU CNN: Xavier vs Kaiming ({args.pair} layers)", "",
           f"Config: plain CNN, {args.pair} weight layers, width {args.width}, ReLU, no BN; "
           f"SGD lr {args.lr}, momentum {args.momentum}, batch {args.batch_size}; "
           f"{args.epochs} epochs over {args.subset or 'all'} training images, validation on "
           f"{args.val_subset or 'all'} test images; "
           f"data: {'SYNTHETIC' if synthetic else 'CIFAR-10'}; seed {args.seed}; device "
           f"{next(iter(summary.values()))['device']}.", "",
           "| init | epoch | train loss | train acc | val loss | val acc | seconds |",
           "|---|---|---|---|---|---|---|"]
    for init, s in summary.items():
        for row in s["metrics"]:
            out.append(f"| {LABELS[init]} | {row['epoch']} | {float(row['loss']):.4f} | "
                       f"{100 * float(row['accuracy']):.2f}% | "
                       + (f"{float(row['val_loss']):.4f} | {100 * float(row['val_accuracy']):.2f}%"
                          if row.get("val_loss") is not None else "n/a | n/a")
                       + f" | {float(row['seconds']):.1f} |")
    out += ["", f"Step-0 gradient std, first/last weight layer (probe batch): "
            + "; ".join(f"{LABELS[i]} {step0_profile(s['layers'], 'weight_grad_std')[0]:.3g}"
                        f" / {step0_profile(s['layers'], 'weight_grad_std')[-1]:.3g}"
                        for i, s in summary.items() if step0_profile(s['layers'],
                                                                     'weight_grad_std')),
            "", ("Check (Fig. 3: Xavier within 0.01 of ln 10, Kaiming at least 0.05 below): "
                 + ("PASS" if ok else "FAIL")) if args.pair >= 30 else
            "Fig. 2 (22 layers): both are expected to converge, Kaiming earlier.", ""]
    out += [f"- {line}" for line in lines]
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = train_pair(args)
    summary = summarize(results)
    ok, lines = check(summary)
    png = out / f"deep_relu_stall_{args.pair}.png"
    md = out / f"deep_relu_stall_{args.pair}.md"
    plot(summary, args, png)
    md.write_text(markdown(summary, args, ok, lines))
    print()
    for line in lines:
        print(line)
    for init, s in summary.items():
        ips = s["images_per_second"]
        print(f"{LABELS[init]}: {s['seconds']:.0f} s in all, epoch seconds "
              f"{', '.join(f'{v:.0f}' for v in s['epoch_seconds'])}, "
              f"{ips:.0f} images/s (training, last batches) on {s['device']}" if ips else "")
    print(f"\nWrote {png} and {md}")
    if args.pair >= 30:
        print("Fig. 3 check: " + ("PASS" if ok else "FAIL"))
    (out / f"deep_relu_stall_{args.pair}.json").write_text(json.dumps({
        init: {k: v for k, v in s.items() if k not in ("steps", "layers", "metrics")}
        for init, s in summary.items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
