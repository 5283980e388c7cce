"""``keras-varinit profile``: per-layer forward/backward variance at init, of a plain net or
of your own model.

Example::

    keras-varinit profile --depth 30 --init xavier_normal --init kaiming_normal --activation relu
    keras-varinit profile --depth 30 --init kaiming_normal --width 64 --plot profile.png
    keras-varinit profile --depth 30 --init kaiming_normal --draws 8   # one draw vs many
    keras-varinit profile --model mlp --depth 20 --activation tanh --init normal:0.01 \
        --init xavier_normal --data synthetic
    keras-varinit profile --model my_net.keras              # your own model, as saved
    keras-varinit profile --model my_project.nets:build     # a factory returning a model

Plain nets: builds `keras_varinit.models.plain_cnn` (or `plain_mlp`) once per `--init` with the
same seed. Your model (`--model FILE.keras` or `--model module:function`, loaded by
`keras_varinit.user_models`): profiled with its weights as they are. Either way
`keras_varinit.diagnostics.variance_profile` runs on one batch and prints, per weight layer,
the measured variances next to the predictions of He et al.'s recursion, then a one-line
verdict. With two or more `--init` a compact side-by-side table of the forward variance per
layer comes first. Inputs (`--data`): N(0, 1) noise (`gaussian`, the plain nets' default),
per-channel standardized synthetic CIFAR-like images (`synthetic`, not CIFAR-10), or real
CIFAR-10 images standardized per channel (`cifar10`; your model's default when it takes
(32, 32, 3) images and CIFAR-10 is available offline, else gaussian noise of its input shape).
"""
import time

from keras_varinit.net_options import DEFAULT_GROUPS, DEFAULT_NEGATIVE_SLOPE

HELP = "per-layer forward/backward variance at init, measured and predicted"
DATA_CHOICES = ("gaussian", "synthetic", "cifar10")
#: Options that describe a plain net (attribute: flag); refused with your own model.
PLAIN_NET_OPTIONS = {"depth": "--depth", "inits": "--init", "activation": "--activation",
                     "width": "--width", "norm": "--norm", "groups": "--groups",
                     "first_layer_init": "--first-layer-init",
                     "negative_slope": "--negative-slope", "draws": "--draws"}
PLAIN_DEFAULTS = {"depth": 30, "activation": "relu", "norm": "none", "groups": DEFAULT_GROUPS,
                  "negative_slope": DEFAULT_NEGATIVE_SLOPE, "draws": 1}
DEFAULT_INITS = ("xavier_normal", "kaiming_normal")


def add_parser(subparsers):
    from keras_varinit.net_options import ACTIVATIONS, KINDS, NORMALIZATIONS

    p = subparsers.add_parser(
        "profile", help=HELP,
        description="Per weight layer of a plain (no skip connections) network at "
        "initialization, or of your own model (--model FILE.keras or module:function): "
        "measured forward variance (pre-activation), backward variance (dL/d output, softmax "
        "cross-entropy on random labels) and the predictions of the variance recursion of He "
        "et al. 2015, plus a one-line verdict.")
    p.add_argument("--model", default="cnn", metavar="MODEL",
                   help=f"a plain net, {' or '.join(KINDS)} (VGG-style CNN, MLP), or your own "
                        "model: a .keras file (loaded in safe mode) or a factory "
                        "'module:function' / 'file.py:function' returning a built model "
                        "(default %(default)s)")
    p.add_argument("--depth", type=int, default=None,
                   help="plain nets: weight layers, classifier included (default "
                        f"{PLAIN_DEFAULTS['depth']})")
    p.add_argument("--init", action="append", dest="inits", metavar="NAME",
                   help="initializer; repeat to compare (xavier_normal, xavier_uniform, "
                        "kaiming_normal, kaiming_uniform, kaiming_normal_fan_out, "
                        "torch_default, normal:<std>, any Keras name). Kaiming names follow "
                        f"--activation. Default: {' and '.join(DEFAULT_INITS)}")
    p.add_argument("--activation", choices=ACTIVATIONS, default=None,
                   help=f"(default {PLAIN_DEFAULTS['activation']})")
    p.add_argument("--width", type=int, default=None,
                   help="channels of the first CNN stage (default 16, the 'small30' net) or "
                        "MLP units (default 256)")
    p.add_argument("--norm", choices=NORMALIZATIONS, default=None,
                   help="plain nets: normalization between every hidden weight layer and its "
                        f"activation (default {PLAIN_DEFAULTS['norm']}; instance and "
                        "batch_per_sample: CNN only)")
    p.add_argument("--groups", type=int, default=None,
                   help="groups of --norm group; must divide the width of every hidden layer "
                        f"(default {PLAIN_DEFAULTS['groups']})")
    p.add_argument("--first-layer-init", default=None, metavar="NAME",
                   help="initializer of the first layer (a Kaiming name gives 1/fan_in)")
    p.add_argument("--negative-slope", type=float, default=None,
                   help=f"leaky_relu slope (default {PLAIN_DEFAULTS['negative_slope']})")
    p.add_argument("--batch-size", type=int, default=256, help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of weights, data and labels (default %(default)s)")
    p.add_argument("--data", choices=DATA_CHOICES, default=None,
                   help="N(0, 1) noise, standardized synthetic CIFAR-like images, or real "
                        "CIFAR-10 images (standardized per channel). Default: gaussian for "
                        "plain nets; for your model cifar10 when it takes (32, 32, 3) images "
                        "and CIFAR-10 is available offline, else gaussian")
    p.add_argument("--draws", type=int, default=None,
                   help="also profile this many independent weight draws per initializer "
                        "(seeds SEED..SEED+N-1, forward only) and print how the last/first "
                        "ratio spreads: one draw is not the initializer (default 1)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="save a log-scale plot (forward and backward panels) to PATH")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="save all profiles as one CSV (column 'init' added)")
    p.add_argument("--full", action="store_true",
                   help="print every column of the per-layer table (the profile's segment "
                        "and follows_previous as the stretch the verdict compares within)")
    p.set_defaults(func=run)
    return p


def _is_user_model(args):
    from keras_varinit.models import KINDS

    return args.model not in KINDS


def _check_args(args):
    """Fill in the plain-net defaults, or refuse plain-net options with a user model."""
    if _is_user_model(args):
        given = [flag for option, flag in PLAIN_NET_OPTIONS.items()
                 if getattr(args, option) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: options of the plain nets; your model "
                             f"({args.model}) is profiled as it is. Received: {' '.join(given)} "
                             "with --model FILE.keras/module:function. Allowed with your model: "
                             "--data, --batch-size, --seed, --plot, --csv, --full")
    else:
        for option, default in PLAIN_DEFAULTS.items():
            if getattr(args, option) is None:
                setattr(args, option, default)
        if args.depth < 2:
            raise ValueError(f"--depth must be >= 2. Received: --depth {args.depth}")
        if args.width is not None and args.width < 1:
            raise ValueError(f"--width must be >= 1. Received: --width {args.width}")
        if args.draws < 1:
            raise ValueError(f"--draws must be >= 1. Received: --draws {args.draws}")
        if args.draws > 1 and args.norm != "none":
            raise ValueError("--draws spreads the last/first forward ratio of the verdict over "
                             "weight draws; a normalization before every activation restarts "
                             "the scale at each layer, so there is no ratio to spread. "
                             f"Received: --draws {args.draws} --norm {args.norm}. Allowed: "
                             "--draws with --norm none")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2. Received: --batch-size {args.batch_size}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0. Received: --seed {args.seed}")
    _check_output("--plot", args.plot, PLOT_SUFFIXES)
    _check_output("--csv", args.csv, (".csv",))


#: What `profile_report.plot_profile` (matplotlib) is asked to write.
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _check_output(flag, path, suffixes):
    """Before any work: an output path in an existing directory, with a known suffix."""
    if path is None:
        return
    import pathlib

    path = pathlib.Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} must end in {', '.join(suffixes)}. Received: {flag} {path}")
    if not path.parent.resolve().is_dir():
        raise ValueError(f"{flag}: no such directory {str(path.parent)!r}. Received: {flag} "
                         f"{path}. Allowed: a file in an existing directory")


def make_batch(shape, data, batch_size, seed):
    """`(x, description)`: `batch_size` examples of `shape` (one example, no batch axis).

    "gaussian": N(0, 1) noise (an axis of size None gets 32); "synthetic" / "cifar10":
    synthetic CIFAR-like or real CIFAR-10 images, standardized per channel with the batch's
    pooled mean and std, flattened for a flat `shape` of 3072 values; other shapes are refused
    with `user_models.cifar10_mismatch`'s message."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if data == "gaussian":
        concrete = tuple(32 if d is None else int(d) for d in shape)
        note = " (axes of size None set to 32)" if None in shape else ""
        return (rng.standard_normal((batch_size,) + concrete).astype("float32"),
                f"N(0, 1) noise of shape {concrete}{note}")
    flat = tuple(shape) == (3072,)
    if not flat:
        _check_image_shape(shape)
    x, description = _images(data, batch_size, seed)
    x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))  # pooled per-channel
    if flat:
        x = x.reshape(batch_size, -1)
    return x.astype("float32"), description


def _check_image_shape(shape):
    from keras_varinit import user_models

    problem = user_models.cifar10_shape_mismatch(shape)
    if problem is not None:
        raise ValueError(f"--data synthetic/cifar10 are images. {problem} (--data gaussian)")


def _images(data, batch_size, seed):
    """`batch_size` images in [0, 1] (float32) and what they are."""
    import numpy as np

    from keras_varinit import datasets

    if data == "synthetic":
        (x, _), _ = datasets.synthetic_cifar10(n_train=batch_size, n_test=10, seed=seed)
        return x.astype("float32") / 255.0, \
            "synthetic CIFAR-like images (standardized; not CIFAR-10)"
    (x, _), _ = datasets.load_cifar10("auto", progress=False)
    index = np.sort(np.random.default_rng(seed).permutation(len(x))[:batch_size])
    return x[index].astype("float32") / 255.0, \
        f"{len(index)} CIFAR-10 training images (standardized per channel)"


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
          "predicted_forward_var", "padding_factor", "predicted_forward_var_cumulative",
          "backward_var", "predicted_backward_var")
_HEADERS = {"input_second_moment": "E[x_in^2]", "forward_var": "Var[y]",
            "predicted_forward_var": "pred 1-step", "predicted_forward_var_cumulative":
            "pred cumul.", "backward_var": "Var[dL/dy]", "predicted_backward_var":
            "pred bwd 1-step", "predicted_backward_var_cumulative": "pred bwd cumul.",
            "forward_var_post": "Var[post]", "weight_var": "Var[W]",
            "padding_factor": "padding"}


def _table(df, title, full):
    from rich.markup import escape
    from rich.table import Table

    from keras_varinit import profile_report

    if full:   # `segment` and `follows_previous` as what they decide: the verdict's stretches
        df = df.assign(stretch=profile_report.stretch_ids(df))
        columns = [c for c in df.columns
                   if c not in ("index", "layer_type", "segment", "follows_previous")]
    else:
        columns = list(_SHORT)
    table = Table(title=title, show_lines=False, header_style="bold")
    for col in columns:
        # layer names are identifiers: never cut or wrapped (the numbers give way)
        width = int(df[col].astype(str).str.len().max()) if col == "layer" and len(df) else None
        table.add_column(escape(_HEADERS.get(col, col)), justify="left" if col in ("layer",
                         "activation") else "right", no_wrap=col == "layer", min_width=width)
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


def _default_data(shape):
    """cifar10 for a model taking CIFAR-10 images when it is available offline, else gaussian
    (and why)."""
    from keras_varinit import datasets, user_models

    if user_models.cifar10_shape_mismatch(shape) is not None:
        return "gaussian", "its input is not CIFAR-sized"
    if datasets.resolve_source("auto") in ("dir", "tfds"):
        return "cifar10", None
    return "gaussian", "CIFAR-10 is not available offline (set KERAS_VARINIT_CIFAR10)"


def _profile_user_model(args):
    """`({name: profile}, header, notes)` of the model `--model` names (notes: the layers the
    profile leaves out, `instrument.coverage_notes`)."""
    import keras

    from keras_varinit import diagnostics, instrument, user_models

    model = user_models.load_user_model(args.model)
    shape = user_models.model_input_shape(model)
    if shape is None:
        raise ValueError(user_models.cifar10_mismatch(model))
    data, why = (args.data, None) if args.data else _default_data(shape)
    x, description = make_batch(shape, data, args.batch_size, args.seed)
    with instrument.coverage_notes() as notes:
        df = diagnostics.variance_profile(model, x, seed=args.seed)
    note = f" (gaussian: {why})" if why else ""
    header = (f"{model.name} ({type(model).__name__}) from {args.model}: {len(df)} weight "
              f"layer call(s); batch {args.batch_size} of {description}{note}; seed "
              f"{args.seed}; backend {keras.backend.backend()}")
    return {model.name: df}, header, notes


def _profile_plain_nets(args):
    """`({init: profile}, header, {init: spread line})` of the plain net per `--init`."""
    import keras

    from keras_varinit import diagnostics

    inits = args.inits or list(DEFAULT_INITS)
    shape = (32, 32, 3) if args.model == "cnn" else (3072,)
    x, description = make_batch(shape, args.data or "gaussian", args.batch_size, args.seed)
    profiles = {}
    for init in inits:
        profiles[init] = diagnostics.variance_profile(build(args, init), x, seed=args.seed)
        keras.backend.clear_session()
    spreads = {init: draw_spread(args, init, x, df) for init, df in profiles.items()} \
        if args.draws > 1 else {}
    width = args.width if args.width is not None else (16 if args.model == "cnn" else 256)
    header = (f"plain {args.model.upper()}, {args.depth} weight layers, width {width}, "
              f"{args.activation}, normalization {args.norm}; batch {args.batch_size} of "
              f"{description}; seed {args.seed}; backend {keras.backend.backend()}")
    return profiles, header, spreads


def _verdict_lines(name, df):
    """The verdict, the measured/predicted line (left out where float32 over- or underflowed:
    the verdict says so) and the drift explanation."""
    import math

    import numpy as np

    from keras_varinit import profile_report

    lines = [f"{name}: {profile_report.summarize_profile(df).text}"]
    last = profile_report.last_hidden_row(len(df))
    pred = df["predicted_forward_var_cumulative"].iloc[last]
    with np.errstate(all="ignore"):
        measured = df["forward_var"].iloc[last] / pred
        one_step = (df["forward_var"] / df["predicted_forward_var"]).iloc[1:last + 1]
    broken = profile_report.first_out_of_range(df)
    if broken is not None:
        lines.append(f"  float32 over- or underflows from {broken} on: measured/predicted "
                     "ratios not shown")
    elif pred > 0 and len(one_step) and math.isfinite(measured) and \
            np.isfinite(one_step).all():
        lines.append(f"  {df['layer'].iloc[last]}: measured / predicted (cumulative) "
                     f"x{measured:.2g}; one-step measured / predicted on layers 2-{last + 1}: "
                     f"{one_step.min():.2f} .. {one_step.max():.2f}")
    explanation = profile_report.explain_drift(df)
    if explanation:
        lines.append(f"  why: {explanation}")
    return lines


def run(args):
    _check_args(args)
    start = time.perf_counter()
    from rich.console import Console

    from keras_varinit import profile_report

    console = Console()
    if not console.is_terminal:  # piped / captured: do not squeeze the table into 80 columns
        console = Console(width=180)
    notes, spreads = [], {}
    if _is_user_model(args):
        profiles, header, notes = _profile_user_model(args)
    else:
        profiles, header, spreads = _profile_plain_nets(args)
    elapsed = time.perf_counter() - start
    console.print(header, markup=False, soft_wrap=True)
    for note in notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)
    if len(profiles) > 1 and not args.full:
        console.print(_comparison(profiles))
    else:
        for name, df in profiles.items():
            console.print(_table(df, name, args.full))
    for name, df in profiles.items():
        for line in _verdict_lines(name, df) + ([spreads[name]] if name in spreads else []):
            console.print(line, markup=False, soft_wrap=True)
    if args.plot:
        profile_report.plot_profile(profiles, args.plot, title=header.split(";")[0])
        console.print(f"plot written to {args.plot}")
    if args.csv:
        import pandas as pd

        frames = [df.assign(init=name) for name, df in profiles.items()]
        pd.concat(frames, ignore_index=True).to_csv(args.csv, index=False)
        console.print(f"profiles written to {args.csv}")
    extra = f" and {len(profiles) * (args.draws - 1)} more draw(s)" if spreads else ""
    console.print(f"profiled {len(profiles)} model(s){extra} in {elapsed:.1f} s")
    return 0
