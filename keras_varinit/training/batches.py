"""The training batches of a run, in an order fixed by the seed and the epoch alone.

Epoch e visits the training samples in ``epoch_order(seed, e, n)`` (a permutation drawn from
``numpy.random.default_rng((seed, e))``), ``batch_size`` at a time, the last batch of the
epoch holding the rest. Because the order of every epoch is known in advance, a run resumed
at any step sees exactly the batches an uninterrupted run would have seen from that step on
(Keras's own ``shuffle=True`` draws each epoch's order from a generator whose state a new
process does not have).

``RunBatches`` is the ``keras.utils.PyDataset`` that ``fit`` reads: the batches of global
steps ``start .. stop - 1`` (step s is batch ``s % steps_per_epoch`` of epoch
``s // steps_per_epoch``), stateless, so ``fit`` may read it across epochs with
``steps_per_epoch`` set. Under data parallelism each batch must split evenly over the devices:
``multiple=k`` trims the last batch of each epoch to a multiple of k, or leaves it out when
fewer than k samples remain (at most k - 1 samples of an epoch are not visited; a different
few each epoch).
"""
import keras
import numpy as np


def epoch_order(seed, epoch, n):
    """The order in which epoch ``epoch`` (0-based) visits ``n`` samples."""
    return np.random.default_rng((int(seed), int(epoch))).permutation(n)


def steps_per_epoch(n, batch_size, multiple=1):
    """Optimizer steps in one epoch over ``n`` samples: the last batch may be partial, and
    holds a multiple of ``multiple`` samples (none: no last batch)."""
    rest = n % batch_size
    return n // batch_size + (1 if rest - rest % multiple else 0)


class RunBatches(keras.utils.PyDataset):
    """Batches ``(x[idx], y[idx])`` of global steps ``start`` to ``stop - 1`` (see the module
    docstring).

    Args:
        x, y: the training arrays.
        batch_size: samples per step.
        seed: the run's seed (the epoch orders).
        start, stop: the global steps served (``len()`` is ``stop - start``).
        multiple: each batch's size is trimmed to a multiple of this (data parallelism).
    """

    def __init__(self, x, y, batch_size, seed, start, stop, multiple=1):
        super().__init__()
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.seed = seed
        self.start, self.stop = int(start), int(stop)
        self.multiple = int(multiple)
        self.steps_per_epoch = steps_per_epoch(len(x), self.batch_size, self.multiple)
        self._orders = {}

    def __len__(self):
        return self.stop - self.start

    def indices(self, step):
        """The sample indices of global step ``step``."""
        epoch, batch = divmod(int(step), self.steps_per_epoch)
        order = self._orders.get(epoch)
        if order is None:
            self._orders = {epoch: epoch_order(self.seed, epoch, len(self.x))}  # one epoch
            order = self._orders[epoch]
        chosen = order[batch * self.batch_size:(batch + 1) * self.batch_size]
        return chosen[:len(chosen) - len(chosen) % self.multiple]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"RunBatches index out of range. Received: {i}. Allowed: 0 to "
                             f"{len(self) - 1}.")
        idx = self.indices(self.start + i)
        return self.x[idx], self.y[idx]
