"""``keras-varinit train``: train a plain CNN/MLP (or your own model) on CIFAR-10 and write a
run directory.

Example::

    keras-varinit train --model cnn --depth 30 --width 16 --init kaiming_normal \\
        --activation relu --optimizer sgd --lr 0.01 --momentum 0.9 --epochs 2 --subset 10000
    keras-varinit train --model my_net.keras --epochs 2    # = --model file --model-file ...
    keras-varinit train --model application --application MobileNetV2
    tensorboard --logdir runs/

One option per ``TrainConfig`` field, generated from the schema (``add_config_options``): its
flag, type, help and choices come from the field's declaration, and the config's own
validation checks the values (one message format). Ctrl-C stops after the current batch,
keeps complete logs and a backup; a process killed outright keeps its last backup (every
``--backup-every`` steps and each epoch end). Run the same command with ``--resume`` (and the
same ``--log-dir``) to go on: it refuses only a run whose process is still alive (it holds
``run.lock``).
"""
import pathlib
import sys

from keras_varinit import run_files as rf
from keras_varinit.training.config import TrainConfig, fields

HELP = ("train a plain CNN/MLP, a .keras file or a keras.applications net on CIFAR-10 and log "
        "per-layer statistics")
RUNS_DIR = "runs"


def add_parser(subparsers, schema=TrainConfig):
    """Register ``train``: the options of ``schema``'s fields, then the run's own options."""
    p = subparsers.add_parser(
        "train", help=HELP, description="Train a plain CNN/MLP on CIFAR-10, or your own model "
        "(--model net.keras, or --model file --model-file net.keras: from its saved weights, "
        "loaded in safe mode; "
        "--model application --application NAME: keras.applications with weights=None). "
        "Writes config.json, "
        "status.json, steps.jsonl, metrics.csv, layer_stats.jsonl, tensorboard/ and backup/ "
        "under --log-dir (and holds run.lock while it runs). Ctrl-C stops after the current "
        "batch with complete logs and a backup; after Ctrl-C, a kill or a crash, --resume "
        "goes on from the last backup.")
    add_config_options(p, schema)
    p.add_argument("--log-dir", default=None,
                   help=f"run directory (default {RUNS_DIR}/<UTC timestamp>-<config slug>)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --log-dir from its last backup (refused "
                            "only while its process is alive)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the run in --log-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, schema=schema)
    return p


def add_config_options(parser, schema=TrainConfig):
    """One option per field of ``schema``: ``--<name>`` (or the field's ``flag``), typed as
    the field, its choices in the metavar, its help and default in the help. Values are
    checked by ``schema.validate()``, not by argparse, so every bad value gets the same
    "Received: ... Allowed: ..." message."""
    for spec in fields(schema):
        kwargs = dict(dest=spec.name, default=spec.default,
                      help=f"{spec.help} (default: {spec.to_text(spec.default)})")
        if spec.type is bool:
            parser.add_argument(spec.cli_flag, action="store_true", **kwargs)
            continue
        metavar = spec.metavar
        if spec.choices:
            metavar = "{" + ",".join(spec.to_text(c) for c in spec.choices) + "}"
        parser.add_argument(spec.cli_flag, type=spec.type, metavar=metavar, **kwargs)


def config_from_args(args, schema=TrainConfig):
    """The ``schema`` instance the parsed options describe (not yet validated)."""
    return schema(**{spec.name: getattr(args, spec.name) for spec in fields(schema)})


def config_argv(config):
    """The options that give back ``config`` (``config_from_args(parse(argv)) == config``)."""
    argv = []
    for spec in fields(type(config)):
        value = getattr(config, spec.name)
        if spec.type is bool:
            argv += [spec.cli_flag] if value else []
        elif value is None and spec.type is int:
            argv += [spec.cli_flag, "0"]          # an optional count: 0 = None (all)
        elif isinstance(value, float):
            argv += [spec.cli_flag, repr(value)]  # every digit (%g keeps six)
        else:
            argv += [spec.cli_flag, spec.to_text(value)]
    return argv


def _fmt(value, pct=False):
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if pct else f"{value:.4f}"


def model_file_shorthand(args):
    """``--model net.keras`` as ``--model file --model-file net.keras``, the form ``profile`` and
    ``doctor`` take too. A factory (``module:function``) is refused: a run is rebuilt from its
    config.json on ``--resume`` and in the explorer, so it trains a saved file."""
    model = args.model
    if model.endswith(".keras") and args.model_file is None:
        args.model, args.model_file = "file", model
    elif ":" in model:
        raise ValueError(f"train takes a saved model, not a factory. Received: --model {model}. "
                         "Allowed: save what the factory builds (model.save('net.keras')) and "
                         "pass --model net.keras; `keras-varinit profile` and `doctor` take "
                         "the factory itself")


def run(args):
    from keras_varinit.training.loop import EXIT_CODES, run_training

    model_file_shorthand(args)
    config = config_from_args(args, args.schema).validate()
    for problem in config.problems():  # advice only: validate() raised any blocking one
        print(f"keras-varinit train: warning: {problem.text}", file=sys.stderr)
    if args.log_dir is None and args.resume:
        raise ValueError("--resume needs the run's directory. Received: --log-dir unset. "
                         "Allowed: --resume --log-dir runs/<run>.")
    log_dir = args.log_dir or rf.new_run_dir(RUNS_DIR, config.slug())
    # A live progress bar on a terminal; one line per epoch when the output goes to a file or
    # a pipe (e.g. the explorer's log), which keeps such logs short and readable.
    verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
    result = run_training(config, log_dir, resume=args.resume, overwrite=args.overwrite,
                          verbose=verbose)
    _print_summary(config, result)
    return EXIT_CODES.get(result.state, 1)


def _print_summary(config, result):
    m = result.metrics or {}
    run_dir = pathlib.Path(result.run_dir)
    data = "SYNTHETIC data" if result.synthetic else "CIFAR-10"
    print()
    print(f"Run {result.state} after {result.epochs_completed}/{config.epochs} epochs, "
          f"step {result.step}/{result.total_steps}, {result.seconds:.1f} s on {result.device} "
          f"({data})")
    if m:
        print(f"  final: loss {_fmt(m.get('loss'))}  accuracy {_fmt(m.get('accuracy'), True)}"
              f"  val_loss {_fmt(m.get('val_loss'))}  "
              f"val_accuracy {_fmt(m.get('val_accuracy'), True)}")
    if result.error:
        print(f"  {result.error}")
    if not result.chief:
        print(f"  a non-chief worker of a multi-worker run: the chief writes {run_dir}")
        return
    print(f"  logs: {run_dir}  (metrics.csv, steps.jsonl, layer_stats.jsonl, status.json)")
    print(f"  view: tensorboard --logdir {run_dir / 'tensorboard'}")
    if result.state.resumable:
        print(f"  resume: keras-varinit train ... --log-dir {run_dir} --resume")
