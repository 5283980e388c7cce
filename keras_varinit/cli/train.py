"""``keras-varinit train``: train a plain CNN/MLP on CIFAR-10 and write a run directory.

Example::

    keras-varinit train --model cnn --depth 30 --width 16 --init kaiming_normal \\
        --activation relu --optimizer sgd --lr 0.01 --momentum 0.9 --epochs 2 --subset 10000
    tensorboard --logdir runs/

Ctrl-C stops after the current batch, keeps complete logs and a checkpoint; run the same
command with ``--resume`` (and the same ``--log-dir``) to go on.
"""
import datetime
import os
import pathlib
import sys

HELP = "train a plain CNN/MLP on CIFAR-10 and log per-layer statistics"


def _optional_int(text):
    value = int(text)
    return None if value == 0 else value


def _batch_norm(text):
    return None if text.lower() in ("none", "off", "") else text


def add_parser(subparsers):
    from keras_varinit.training import MODELS, OPTIMIZERS, TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help=HELP, description="Train a plain CNN/MLP on CIFAR-10. Writes config.json, "
        "status.json, steps.jsonl, metrics.csv, layer_stats.jsonl, tensorboard/ and "
        "checkpoint/ under --log-dir. Ctrl-C stops after the current batch with complete logs "
        "and a checkpoint; --resume goes on from it.")
    p.add_argument("--model", choices=MODELS, default=d.model, help="plain_cnn or plain_mlp")
    p.add_argument("--depth", type=int, default=d.depth, help="weight layers (>= 2)")
    p.add_argument("--width", type=int, default=d.width, help="channels (cnn) / units (mlp)")
    p.add_argument("--init", default=d.init,
                   help="initializer: xavier_normal, kaiming_normal, normal:0.01, torch_default, "
                        "lsuv, or any Keras initializer name (default %(default)s)")
    p.add_argument("--activation", default=d.activation, help="relu, tanh, ... (%(default)s)")
    p.add_argument("--batch-norm", type=_batch_norm, default="none",
                   metavar="{none,pooled,per_sample}",
                   help="batch normalization variance estimator, or none (default)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (%(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum,
                   help="SGD/RMSprop momentum (%(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--subset", type=_optional_int, default=d.subset,
                   help="training images (seeded random subset; 0 = all) (%(default)s)")
    p.add_argument("--val-subset", type=_optional_int, default=d.val_subset,
                   help="test images used for validation (0 or unset = all)")
    p.add_argument("--data", default=d.data,
                   help="auto (KERAS_VARINIT_CIFAR10, caches, download), synthetic, or a path "
                        "to a CIFAR-10 directory/.tar.gz (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mixed-precision", action="store_true", help="mixed_float16 policy")
    p.add_argument("--distribute", choices=("mirrored", "multiworker"), default=None,
                   help="tf.distribute strategy (TensorFlow backend): mirrored = all local "
                        "GPUs; multiworker = MultiWorkerMirroredStrategy from TF_CONFIG")
    p.add_argument("--stats-every", type=int, default=d.stats_every_n_steps, metavar="N",
                   help="layer statistics every N steps (0 = off) (%(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every_n_steps, metavar="N",
                   help="steps.jsonl record every N steps (%(default)s)")
    p.add_argument("--log-dir", default=None,
                   help="run directory (default runs/<timestamp>-<config slug>)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --log-dir from its checkpoint")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the run in --log-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def config_from_args(args):
    from keras_varinit.training import TrainConfig

    return TrainConfig(
        model=args.model, depth=args.depth, width=args.width, init=args.init,
        activation=args.activation, batch_norm=args.batch_norm, optimizer=args.optimizer,
        lr=args.lr, momentum=args.momentum, epochs=args.epochs, batch_size=args.batch_size,
        subset=args.subset, val_subset=args.val_subset, data=args.data, seed=args.seed,
        mixed_precision=args.mixed_precision, distribute=args.distribute,
        stats_every_n_steps=args.stats_every, log_every_n_steps=args.log_every)


def _fmt(value, pct=False):
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if pct else f"{value:.4f}"


def run(args):
    from keras_varinit.training import run_training

    config = config_from_args(args).validate()
    log_dir = args.log_dir
    if log_dir is None:
        if args.resume:
            raise ValueError("--resume needs the run's directory. Received: --log-dir unset. "
                             "Allowed: --resume --log-dir runs/<run>.")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        log_dir = os.path.join("runs", f"{stamp}-{config.slug()}")
    # A live progress bar on a terminal; one line per epoch when the output goes to a file or
    # a pipe (e.g. the explorer's log), which keeps such logs short and readable.
    verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
    result = run_training(config, log_dir, resume=args.resume, overwrite=args.overwrite,
                          verbose=verbose)
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
    print(f"  logs: {run_dir}  (metrics.csv, steps.jsonl, layer_stats.jsonl, status.json)")
    print(f"  view: tensorboard --logdir {run_dir / 'tensorboard'}")
    if result.state == "stopped":
        print(f"  resume: keras-varinit train ... --log-dir {run_dir} --resume")
    return {"finished": 0, "stopped": 130, "diverged": 3}.get(result.state, 1)
