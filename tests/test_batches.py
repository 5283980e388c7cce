"""Tests for keras_varinit/training/batches.py: the batch order is fixed by the seed and the
epoch, so the batches from any step on are the same in a resumed process."""
import numpy as np
import pytest

from keras_varinit.training.batches import RunBatches, epoch_order, steps_per_epoch


def test_every_epoch_visits_every_sample_once_in_its_own_order():
    x = np.arange(10, dtype="float32").reshape(10, 1)
    batches = RunBatches(x, np.arange(10), batch_size=4, seed=3, start=0, stop=9)
    assert len(batches) == 9 and batches.steps_per_epoch == 3
    epochs = [np.concatenate([batches[3 * e + b][1] for b in range(3)]) for e in range(3)]
    for e, seen in enumerate(epochs):
        assert sorted(seen) == list(range(10))
        np.testing.assert_array_equal(seen, epoch_order(3, e, 10))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert [len(batches[i][0]) for i in range(3)] == [4, 4, 2]
    with pytest.raises(IndexError, match="Received: 9"):
        batches[9]


def test_a_resumed_stream_continues_the_same_batches():
    x, y = np.arange(50).reshape(50, 1), np.arange(50)
    whole = RunBatches(x, y, batch_size=8, seed=0, start=0, stop=21)
    rest = RunBatches(x, y, batch_size=8, seed=0, start=11, stop=21)
    for i in range(10):
        np.testing.assert_array_equal(rest[i][1], whole[11 + i][1])
    other_seed = RunBatches(x, y, batch_size=8, seed=1, start=0, stop=1)
    assert not np.array_equal(other_seed[0][1], whole[0][1])


def test_data_parallel_batches_split_evenly():
    """multiple=k: the last batch of an epoch keeps a multiple of k samples, or is left out."""
    assert steps_per_epoch(10, 4) == 3
    assert steps_per_epoch(10, 4, multiple=2) == 3   # last batch: 2 samples
    assert steps_per_epoch(9, 4, multiple=2) == 2    # last batch: 1 sample, left out
    assert steps_per_epoch(11, 4, multiple=2) == 3   # last batch: 3 -> 2 samples
    batches = RunBatches(np.arange(11).reshape(11, 1), np.arange(11), batch_size=4, seed=0,
                         start=0, stop=3, multiple=2)
    assert [len(batches[i][1]) for i in range(3)] == [4, 4, 2]
