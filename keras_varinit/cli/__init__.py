"""The ``keras-varinit`` command: ``train``, ``profile``, ``stats`` and ``doctor``.

Each sub-command lives in its own module exposing ``add_parser(subparsers)`` (which registers
the sub-command and its options and sets ``func``) and the function it calls, returning an exit
code.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    from keras_varinit.cli import doctor, profile, stats, train

    parser = argparse.ArgumentParser(
        prog="keras-varinit",
        description="Weight initialization, batch normalization and signal-propagation "
        "diagnostics for Keras 3.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{train,profile,stats,doctor}")
    subparsers.required = True
    train.add_parser(subparsers)
    profile.add_parser(subparsers)
    stats.add_parser(subparsers)
    doctor.add_parser(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, OSError, RuntimeError) as error:  # OSError: an unwritable path
        print(f"keras-varinit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C outside a training run (which stops itself cleanly)
        print(f"keras-varinit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
