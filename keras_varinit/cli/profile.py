"""``keras-varinit profile``: per-layer forward/backward variance of a plain net at init.

Example::

    keras-varinit profile --depth 30 --init xavier_normal --init kaiming_normal --activation relu
    keras-varinit profile --depth 30 --init kaiming_normal --width 64 --plot profile.png
    keras-varinit profile --depth 30 --init kaiming_normal --draws 8   # one draw vs many
    keras-varinit profile --model mlp --depth 20 --activation tanh --init normal:0.01 \
        --init xavier_normal --data synthetic

Builds `keras_varinit.models.plain_cnn` (or `plain_mlp`) once per `--init` with the same seed,
runs `keras_varinit.diagnostics.variance_profile` on one batch and prints, per weight layer,
the measured variances next to the predictions of He et al.'s recursion, then a one-line
verdict per initializer. With two or more `--init` a compact side-by-side table of the forward
variance per layer comes first. Inputs are N(0, 1) noise by default (`--data gaussian`), or
per-channel standardized synthetic CIFAR-like images (`--data synthetic`, not CIFAR-10).
"""
import time

HELP = "per-layer forward/backward variance at init, measured and predicted"
DATA_CHOICES = ("gaussian", "synthetic")
DEFAULT_INITS = ("xavier_normal", "kaiming_normal")


def add_parser(subparsers):
    from keras_varinit.models import ACTIVATIONS, DEFAULT_GROUPS, KINDS, NORMALIZATIONS

    p = subparsers.add_parser(
        "profile", help=HELP,
        description="Per weight layer of a plain (no skip connections) network at "
        "initialization: measured forward variance (pre-activation), backward variance "
        "(dL/d output, softmax cross-entropy on random labels) and the predictions of the "
        "variance recursion of He et al. 2015, plus a one-line verdict.")
    p.add_argument("--depth", type=int, default=30,
                   help="weight layers, classifier included (default %(default)s)")
    p.add_argument("--init", action="append", dest="inits", metavar="NAME",
                   help="initializer; repeat to compare (xavier_normal, xavier_uniform, "
                        "kaiming_normal, kaiming_uniform, kaiming_normal_fan_out, "
                        "torch_default, normal:<std>, any Keras name). Kaiming names follow "
                        f"--activation. Default: {' and '.join(DEFAULT_INITS)}")
    p.add_argument("--activation", choices=ACTIVATIONS, default="relu",
                   help="(default %(default)s)")
    p.add_argument("--model", choices=KINDS, default="cnn",
                   help="plain VGG-style CNN or MLP (default %(default)s)")
    p.add_argument("--width", type=int, default=None,
                   help="channels of the first CNN stage (default 16, the 'small30' net) or "
                        "MLP units (default 256)")
    p.add_argument("--norm", choices=NORMALIZATIONS, default="none",
                   help="normalization between every hidden weight layer and its activation "
                        "(default %(default)s; instance and batch_per_sample: CNN only)")
    p.add_argument("--groups", type=int, default=DEFAULT_GROUPS,
                   help="groups of --norm group; must divide the width of every hidden layer "
                        "(default %(default)s)")
    p.add_argument("--first-layer-init", default=None, metavar="NAME",
                   help="initializer of the first layer (a Kaiming name gives 1/fan_in)")
    p.add_argument("--negative-slope", type=float, default=0.2,
                   help="leaky_relu slope (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of weights, data and labels (default %(default)s)")
    p.add_argument("--data", choices=DATA_CHOICES, default="gaussian",
                   help="N(0, 1) noise or standardized synthetic CIFAR-like images "
                        "(default %(default)s)")
    p.add_argument("--draws", type=int, default=1,
                   help="also profile this many independent weight draws per initializer "
                        "(seeds SEED..SEED+N-1, forward only) and print how the last/first "
                        "ratio spreads: one draw is not the initializer (default %(default)s)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="save a log-scale plot (forward and backward panels) to PATH")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="save all profiles as one CSV (column 'init' added)")
    p.add_argument("--full", action="store_true",
                   help="print every column of the per-layer table")
    p.set_defaults(func=run)
    return p


def _check_args(args):
    if args.depth < 2:
        raise ValueError(f"--depth must be >= 2. Received: --depth {args.depth}")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2. Received: --batch-size {args.batch_size}")
    if args.width is not None and args.width < 1:
        raise ValueError(f"--width must be >= 1. Received: --width {args.width}")
    if args.draws < 1:
        raise ValueError(f"--draws must be >= 1. Received: --draws {args.draws}")


def make_batch(kind, data, batch_size, seed):
    """(x, description) for the profile: N(0, 1) noise or standardized synthetic images."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if data == "gaussian":
        shape = (batch_size, 32, 32, 3) if kind == "cnn" else (batch_size, 3072)
        return rng.standard_normal(shape).astype("float32"), "N(0, 1) noise"
    from keras_varinit import datasets

    (x, _), _ = datasets.synthetic_cifar10(n_train=batch_size, n_test=10, seed=seed)
    x = x.astype("float32") / 255.0
    x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))  # pooled per-channel
    if kind == "mlp":
        x = x.reshape(batch_size, -1)
    return x.astype("float32"), "synthetic CIFAR-like images (standardized; not CIFAR-10)"


def build(args, init, seed=None):
    from keras_varinit import models

    kwargs = dict(depth=args.depth, kernel_initializer=init, activation=args.activation,
                  normalization=args.norm, groups=args.groups,
                  first_layer_initializer=args.first_layer_init,
                  seed=args.seed if seed is None else seed,
                  negative_slope=args.negative_slope)
    if args.width is not None:
        kwargs["width"] = args.width
    return models.build_model(args.model, **kwargs)


def _fmt(value):
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int,)) or (isinstance(value, float) and value.is_integer()
                                      and abs(value) < 1e6 and abs(value) >= 1):
        return str(int(value))
    return f"{value:.3g}"


_SHORT = ("layer", "fan_in", "fan_out", "weight_var", "input_second_moment", "forward_var",
          "predicted_forward_var", "predicted_forward_var_cumulative", "backward_var",
          "predicted_backward_var")
_HEADERS = {"input_second_moment": "E[x_in^2]", "forward_var": "Var[y]",
            "predicted_forward_var": "pred 1-step", "predicted_forward_var_cumulative":
            "pred cumul.", "backward_var": "Var[dL/dy]", "predicted_backward_var":
            "pred bwd 1-step", "predicted_backward_var_cumulative": "pred bwd cumul.",
            "forward_var_post": "Var[post]", "weight_var": "Var[W]"}


def _table(df, title, full):
    from rich.markup import escape
    from rich.table import Table

    columns = [c for c in df.columns if c not in ("index", "layer_type")] if full else \
        list(_SHORT)
    table = Table(title=title, show_lines=False, header_style="bold")
    for col in columns:
        table.add_column(escape(_HEADERS.get(col, col)), justify="left" if col in ("layer",
                         "activation") else "right")
    for _, row in df.iterrows():
        table.add_row(*[_fmt(row[c]) if c not in ("layer", "activation") else str(row[c])
                        for c in columns])
    return table


def _comparison(profiles):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape("forward variance Var[y] per layer (measured; cumulative "
                               "prediction in brackets)"), header_style="bold")
    table.add_column("layer")
    for name in profiles:
        table.add_column(name, justify="right")
    first = next(iter(profiles.values()))
    for i, layer in enumerate(first["layer"]):
        cells = []
        for df in profiles.values():
            cells.append(escape(f"{_fmt(df['forward_var'].iloc[i])} "
                                f"[{_fmt(df['predicted_forward_var_cumulative'].iloc[i])}]"))
        table.add_row(layer, *cells)
    return table


def draw_spread(args, init, x, first_df):
    """Last/first forward ratios over `args.draws` independent draws (the first is
    `first_df`), and the recursion's expectation; one line of text."""
    import keras
    import numpy as np

    from keras_varinit import diagnostics, profile_report

    measured, expected, _ = profile_report.forward_ratios(first_df)
    measured, expected = [measured], [expected]
    for seed in range(args.seed + 1, args.seed + args.draws):
        df = diagnostics.variance_profile(build(args, init, seed), x, seed=seed,
                                          gradients=False)
        m, e, _ = profile_report.forward_ratios(df)
        measured.append(m)
        expected.append(e)
        keras.backend.clear_session()
    r = np.asarray(measured, dtype=float)
    inside = int(np.sum((r >= 0.25) & (r <= 4.0)))
    return (f"  {len(r)} independent draws (seeds {args.seed}-{args.seed + len(r) - 1}): "
            f"last/first median x{np.median(r):.2g}, range x{r.min():.2g} .. x{r.max():.2g}, "
            f"within 4x in {inside}/{len(r)}; the recursion (expectation over draws) "
            f"x{np.median(expected):.2g}")


def run(args):
    _check_args(args)
    start = time.perf_counter()
    from rich.console import Console

    import keras

    from keras_varinit import diagnostics, profile_report

    console = Console()
    if not console.is_terminal:  # piped / captured: do not squeeze the table into 80 columns
        console = Console(width=180)
    inits = args.inits or list(DEFAULT_INITS)
    x, description = make_batch(args.model, args.data, args.batch_size, args.seed)
    profiles, verdicts = {}, {}
    for init in inits:
        model = build(args, init)
        profiles[init] = diagnostics.variance_profile(model, x, seed=args.seed)
        verdicts[init] = profile_report.summarize_profile(profiles[init])
        keras.backend.clear_session()
    spreads = {init: draw_spread(args, init, x, df) for init, df in profiles.items()} \
        if args.draws > 1 else {}
    elapsed = time.perf_counter() - start

    width = args.width if args.width is not None else (16 if args.model == "cnn" else 256)
    header = (f"plain {args.model.upper()}, {args.depth} weight layers, width {width}, "
              f"{args.activation}, normalization {args.norm}; batch {args.batch_size} of "
              f"{description}; seed {args.seed}; backend {keras.backend.backend()}")
    console.print(header, markup=False)
    if len(profiles) > 1 and not args.full:
        console.print(_comparison(profiles))
    else:
        for init, df in profiles.items():
            console.print(_table(df, f"{init}", args.full))
    for init, verdict in verdicts.items():
        console.print(f"{init}: {verdict}", markup=False)
        df = profiles[init]
        _, last = profile_report.compared_rows(df)
        pred = df["predicted_forward_var_cumulative"].iloc[last]
        one_step = (df["forward_var"] / df["predicted_forward_var"]).iloc[1:last + 1]
        if pred > 0 and len(one_step):
            console.print(
                f"  {df['layer'].iloc[last]}: measured / predicted (cumulative) "
                f"x{df['forward_var'].iloc[last] / pred:.2g}; one-step measured / predicted "
                f"on layers 2-{last + 1}: {one_step.min():.2f} .. {one_step.max():.2f}",
                markup=False)
        explanation = profile_report.explain_drift(df)
        if explanation:
            console.print(f"  why: {explanation}", markup=False)
        if init in spreads:
            console.print(spreads[init], markup=False)
    if args.plot:
        profile_report.plot_profile(profiles, args.plot, title=header.split(";")[0])
        console.print(f"plot written to {args.plot}")
    if args.csv:
        import pandas as pd

        frames = [df.assign(init=init) for init, df in profiles.items()]
        pd.concat(frames, ignore_index=True).to_csv(args.csv, index=False)
        console.print(f"profiles written to {args.csv}")
    extra = f" and {len(profiles) * (args.draws - 1)} more draw(s)" if args.draws > 1 else ""
    console.print(f"profiled {len(profiles)} model(s){extra} in {elapsed:.1f} s")
    return 0
