"""Cutting a run's files back to the backup it resumes from, so that the finished run holds
every step once: what an interrupted process wrote after its last backup is removed, and the
resumed process writes it again (from the same state, in the same order).

Kept, for a backup after global step ``s`` with ``e`` epochs completed:

* ``steps.jsonl``: records with ``step <= s``;
* ``layer_stats.jsonl``: records with ``step <= l``, ``l`` the last log the backup's
  ``LoggerState`` covers (its weights are the next ``update_ratio``'s reference; records after
  it were written after the backup); ``step < s`` for a backup without one (the resumed
  ``LayerStatsLogger`` measures step ``s`` again when training begins);
* ``findings.jsonl``: findings with ``step <= s`` (the resumed ``DiagnosisLogger`` is given
  them, so it does not report them again);
* ``metrics.csv``: epochs ``<= e``;
* TensorBoard event files (rewritten in place): ``epoch_*`` scalars (whose step is the
  0-based epoch) of epochs ``< e``, layer statistics as ``layer_stats.jsonl``, every other summary
  (``evaluation_*_vs_iterations``, whose step is the optimizer's) of steps ``<= s``.
"""
import os
import pathlib

from keras_varinit import run_files as rf

LAYER_TAGS = ("layer_stats/", "layer_hist/")
RECORD_FRAMING = 16   # a TFRecord: length (8 bytes) and its CRC (4), data, the data's CRC (4)


def cut_back(run_dir, step, epochs_done, stats_through=None):
    """Cut the files of ``run_dir`` back to a backup after ``step`` (``epochs_done`` epochs
    completed; layer statistics logged through step ``stats_through``, None: before ``step``);
    ``step=0`` empties them (a run started over)."""
    run_dir = pathlib.Path(run_dir)
    last_stats = step - 1 if stats_through is None else min(stats_through, step)
    rf.truncate_jsonl(run_dir / rf.STEPS_FILE, lambda r: (r.get("step") or 0) <= step)
    rf.truncate_jsonl(run_dir / rf.LAYER_STATS_FILE,
                      lambda r: (r.get("step") or 0) <= last_stats)
    rf.truncate_jsonl(run_dir / rf.FINDINGS_FILE, lambda r: (r.get("step") or 0) <= step)
    rf.MetricsCsv(run_dir / rf.METRICS_FILE).truncate(epochs_done)
    for path in sorted((run_dir / rf.TENSORBOARD_DIR).rglob("events.out.tfevents*")):
        truncate_events(path, lambda tag, s: _keep_summary(tag, s, step, epochs_done,
                                                           last_stats))


def _keep_summary(tag, summary_step, step, epochs_done, last_stats):
    if tag.startswith("epoch_"):
        return summary_step < epochs_done
    if tag.startswith(LAYER_TAGS):
        return summary_step <= last_stats
    return summary_step <= step


def truncate_events(path, keep):
    """Rewrite the TensorBoard event file ``path`` without the summaries for which
    ``keep(tag, step)`` is false (events without a summary, such as the file version, stay);
    a record cut short by a kill is dropped. Needs the ``tensorboard`` package (TF-free)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    path = pathlib.Path(path)
    kept, dropped, size = [], 0, 0
    for raw in RawEventFileLoader(str(path)).Load():
        size += len(raw) + RECORD_FRAMING
        event = event_pb2.Event.FromString(raw)
        values = event.summary.value if event.HasField("summary") else ()
        if values and not keep(values[0].tag, event.step):
            dropped += 1
            continue
        kept.append(raw)
    if not dropped and size == path.stat().st_size:
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        writer = RecordWriter(f)
        for raw in kept:
            writer.write(raw)
        writer.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped
