"""Tests for keras_varinit/training/resume.py: the run files cut back to a backup (JSON lines,
metrics.csv, TensorBoard event files, a record half-written by a kill). Resuming end to end:
tests/test_backup.py."""

from keras_varinit import run_files as rf
from keras_varinit.training.resume import cut_back, truncate_events


def _write_events(folder, scalars):
    """An event file in ``folder`` with ``scalars``: (tag, step) pairs (tensorboard's writer)."""
    from tensorboard.summary import Writer

    writer = Writer(str(folder))
    for tag, step in scalars:
        writer.add_scalar(tag, float(step), step=step)
    writer.close()
    (path,) = folder.glob("events.out.tfevents*")
    return path


def _steps(path):
    """{tag: [steps]} of one event file."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    out = {}
    for raw in RawEventFileLoader(str(path)).Load():
        event = event_pb2.Event.FromString(raw)
        for value in event.summary.value:
            out.setdefault(value.tag, []).append(event.step)
    return out


def test_cut_back_keeps_what_the_backup_covers(tmp_path):
    """A backup after step 6 of epoch 2 (4 steps per epoch): epoch 1 and steps up to 6 stay,
    layer statistics of step 6 are measured again by the resumed run."""
    rf.append_jsonl(tmp_path / rf.STEPS_FILE, [{"step": s} for s in range(1, 9)])
    rf.append_jsonl(tmp_path / rf.LAYER_STATS_FILE,
                    [{"step": s, "layer": name} for s in (0, 2, 4, 6, 8) for name in "ab"])
    rf.append_jsonl(tmp_path / rf.FINDINGS_FILE,
                    [{"kind": kind, "step": s} for kind, s in
                     (("vanishing", 0), ("dead_units", 6), ("stalled_loss", 8))])
    metrics = rf.MetricsCsv(tmp_path / rf.METRICS_FILE)
    for epoch in (1, 2):
        metrics.write({"epoch": epoch, "loss": 1.0 / epoch})
    board = tmp_path / rf.TENSORBOARD_DIR
    (board / "train").mkdir(parents=True)
    layers = _write_events(board, [("layer_stats/activation_std/a", s) for s in (0, 2, 4, 6, 8)])
    epochs = _write_events(board / "train", [("epoch_loss", 0), ("epoch_loss", 1),
                                             ("evaluation_loss_vs_iterations", 4),
                                             ("evaluation_loss_vs_iterations", 8)])
    cut_back(tmp_path, step=6, epochs_done=1)
    assert [r["step"] for r in rf.read_jsonl(tmp_path / rf.STEPS_FILE)] == list(range(1, 7))
    assert [r["step"] for r in rf.read_jsonl(tmp_path / rf.LAYER_STATS_FILE)] == \
        [0, 0, 2, 2, 4, 4]
    # findings up to the backup's step stay: the resumed run is told about them
    assert [r["kind"] for r in rf.read_jsonl(tmp_path / rf.FINDINGS_FILE)] == \
        ["vanishing", "dead_units"]
    assert [r["epoch"] for r in metrics.read()] == [1]
    assert _steps(layers) == {"layer_stats/activation_std/a": [0, 2, 4]}
    assert _steps(epochs) == {"epoch_loss": [0], "evaluation_loss_vs_iterations": [4]}


def test_cut_back_to_nothing_starts_over(tmp_path):
    rf.append_jsonl(tmp_path / rf.STEPS_FILE, [{"step": 1}])
    rf.append_jsonl(tmp_path / rf.LAYER_STATS_FILE, [{"step": 0, "layer": "a"}])
    rf.append_jsonl(tmp_path / rf.FINDINGS_FILE, [{"kind": "dead_units", "step": 3}])
    cut_back(tmp_path, step=0, epochs_done=0)
    assert rf.read_jsonl(tmp_path / rf.FINDINGS_FILE) == []
    assert rf.read_jsonl(tmp_path / rf.STEPS_FILE) == []
    assert rf.read_jsonl(tmp_path / rf.LAYER_STATS_FILE) == []


def test_truncated_event_record_is_dropped(tmp_path):
    """A kill during a TensorBoard write leaves half a record: the rewrite drops it."""
    path = _write_events(tmp_path, [("layer_stats/x/conv_01", s) for s in range(5)])
    path.write_bytes(path.read_bytes() + b"\x20\x00\x00\x00\x00\x00\x00\x00half")
    assert truncate_events(path, lambda tag, step: step < 3) == 2
    assert _steps(path) == {"layer_stats/x/conv_01": [0, 1, 2]}
    size = path.stat().st_size
    assert truncate_events(path, lambda tag, step: True) == 0  # nothing to do: untouched
    assert path.stat().st_size == size
