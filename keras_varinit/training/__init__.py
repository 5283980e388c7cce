"""Training runs, one module per job:

    config.py       TrainConfig: the schema of a run (fields, choices, ranges, help, slug)
    data.py         CIFAR-10 or synthetic data, subset, per-channel normalization
    model.py        the network and optimizer of a config (and LSUV)
    device.py       the device label, the Placement (tf.distribute strategy or
                    keras.distribution), the dtype policy
    batches.py      the batches of a run, in an order fixed by seed and epoch (exact resume)
    run_control.py  the callbacks that log a run and stop it (status, steps, metrics)
    backup.py       the run's backups (atomic, every N steps) and restoring them
    resume.py       cutting the run files back to the backup a run resumes from
    loop.py         run_training: the run directory and its lock, the loop, the result

>>> from keras_varinit.training import TrainConfig, run_training
>>> result = run_training(TrainConfig(depth=4, data="synthetic", subset=256), "runs/demo")
"""
from keras_varinit.training.config import Problem, TrainConfig

__all__ = ["TrainConfig", "Problem", "TrainResult", "run_training"]


def __getattr__(name):
    """``run_training`` and ``TrainResult`` on first use: the loop imports Keras, the schema
    does not (the explorer's page and the CLI's parser read it without Keras)."""
    if name in ("TrainResult", "run_training"):
        from keras_varinit.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
