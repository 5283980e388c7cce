"""The Streamlit page through `streamlit.testing.v1.AppTest` (no browser): it renders, the init
profile follows depth and initializer, invalid combinations are explained, the offline-data
banner offers the synthetic set, and a tiny synthetic training run completes on the page."""
import json
import re
import pathlib
import time

import pytest
from streamlit.testing.v1 import AppTest

APP = str(pathlib.Path(__file__).resolve().parents[1] / "explorer" / "app.py")
TIMEOUT = 240


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    path = tmp_path / "runs"
    monkeypatch.setenv("KERAS_VARINIT_RUNS_DIR", str(path))
    return path


def _app(**query):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = str(value)
    return at


def _no_exceptions(at):
    assert not at.exception, [e.value for e in at.exception]


def _verdict(at):
    texts = [e.value for e in at.success] + [e.value for e in at.error] + \
        [e.value for e in at.warning]
    return [t for t in texts if "variance" in t]


def _metric(at, label):
    for m in at.metric:
        if m.label.startswith(label):
            return m.value
    raise AssertionError(f"no metric {label!r} in {[m.label for m in at.metric]}")


def test_page_renders_and_profile_follows_depth_and_initializer(runs_dir):
    at = _app(data="synthetic", depth=30, init="kaiming_normal").run()
    _no_exceptions(at)
    assert [t.label for t in at.tabs] == ["At initialization", "Training", "Compare"]
    assert any("30-layer CNN" in s.value for s in at.subheader)
    first = (_verdict(at), _metric(at, "Forward variance"), _metric(at, "Gradient variance"))
    assert first[0] and "30" in first[0][0]

    at.slider(key="depth").set_value(10)
    at.selectbox(key="init").set_value("xavier_normal")
    at.run()
    _no_exceptions(at)
    second = (_verdict(at), _metric(at, "Forward variance"), _metric(at, "Gradient variance"))
    assert second != first
    assert "10" in second[0][0]
    assert any("10-layer CNN" in s.value and "Xavier" in s.value for s in at.subheader)
    # the settings are in the URL, so the configuration can be shared
    assert at.query_params["depth"] == ["10"] or at.query_params["depth"] == "10"
    assert "xavier_normal" in str(at.query_params["init"])


def test_invalid_combination_is_explained_not_crashed(runs_dir):
    at = _app(data="synthetic", model="mlp", normalization="batch_per_sample", depth=5).run()
    _no_exceptions(at)
    assert any("Per-sample batch normalization" in e.value for e in at.error)
    assert at.button(key="train").disabled
    at.selectbox(key="normalization").set_value("instance").run()
    assert any("Instance normalization needs spatial" in e.value for e in at.error)
    at.radio(key="model").set_value("cnn").run()
    at.selectbox(key="normalization").set_value("group").run()
    at.number_input(key="groups").set_value(3).run()
    _no_exceptions(at)
    assert any("Received: groups=3" in e.value for e in at.error)
    assert at.button(key="train").disabled


@pytest.mark.parametrize("method", ["batch", "layer", "instance", "group"])
def test_normalization_select_says_and_draws_what_it_averages_over(runs_dir, method):
    from explorer import norm_figure

    at = _app(data="synthetic", depth=4, normalization=method).run()
    _no_exceptions(at)
    select = at.selectbox(key="normalization")
    assert select.value == method
    assert norm_figure.DESCRIPTIONS["layer"] in select.help   # one sentence on each
    assert any(c.value == norm_figure.DESCRIPTIONS[method] for c in at.caption)
    assert at.number_input(key="groups").disabled == (method != "group")
    title = norm_figure.TITLES[method]
    assert any(s.value.endswith(title.lower() + (" (G = 8)" if method == "group" else ""))
               for s in at.subheader)
    charts = [json.loads(c.proto.spec) for c in at.sidebar.get("vega_lite_chart")]
    assert any(title in json.dumps(spec) for spec in charts)   # the picture, in the sidebar
    assert _verdict(at)   # the init profile works with this normalization


def test_bad_url_values_are_reported(runs_dir):
    at = _app(data="synthetic", depth=500, init="nonsense", depth_extra="x").run()
    _no_exceptions(at)
    notes = " ".join(w.value for w in at.warning)
    assert "depth" in notes and "init" in notes
    assert at.slider(key="depth").value == 60


def test_offline_banner_offers_synthetic_data(runs_dir, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("KERAS_VARINIT_CIFAR10", raising=False)
    monkeypatch.setenv("KERAS_VARINIT_CACHE_DIR", str(empty))
    monkeypatch.setenv("KERAS_HOME", str(empty))
    monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
    from explorer.profile import data_info

    if data_info().available:
        pytest.skip("a CIFAR-10 copy is visible despite the empty cache dirs")
    import streamlit as st

    st.cache_resource.clear()  # the page caches what data_info found
    try:
        at = _app(depth=4).run()
        _no_exceptions(at)
        assert any("not available offline" in w.value for w in at.warning)
        at.button(key="use_synthetic").click().run()
        _no_exceptions(at)
        assert at.radio(key="data").value == "synthetic"
        assert any("synthetic" in i.value for i in at.info)
    finally:
        st.cache_resource.clear()


def test_tiny_synthetic_training_run_completes_on_the_page(runs_dir):
    at = _app(data="synthetic", depth=3, width=4, subset=256, batch_size=64, epochs=1,
              lr=0.01).run()
    _no_exceptions(at)
    at.button(key="train").click().run()
    _no_exceptions(at)
    deadline = time.time() + TIMEOUT
    state = None
    while time.time() < deadline:
        time.sleep(2)
        at.run()
        _no_exceptions(at)
        state = _metric(at, "State")
        if state in ("finished", "failed", "stopped", "diverged"):
            break
    assert state == "finished"
    runs = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / "metrics.csv").exists()
    # metrics appear: the epoch table, images/s and the run in the Compare tab
    assert any("val_accuracy" in df.value.columns for df in at.dataframe)
    assert any("train_eval_accuracy" in df.value.columns for df in at.dataframe)
    specs = " ".join(c.proto.spec for c in at.main.get("vega_lite_chart"))
    assert "Accuracy: training vs inference mode" in specs
    assert "Train/test gap" in specs and "No train/test gap" not in specs
    assert _metric(at, "Images / s") not in ("\u2013", "")
    assert any("SYNTHETIC" in c.value for c in at.caption)
    compare = [df.value for df in at.dataframe if "val_acc" in df.value.columns]
    assert compare and compare[0]["state"].tolist() == ["finished"]
    assert any("tensorboard --logdir" in c.value for c in at.code)


@pytest.mark.parametrize("query", [
    dict(init="lsuv", depth=5),
    dict(init="normal:1.0", activation="tanh", depth=6, model="mlp"),
    dict(init="normal:0.01", activation="tanh", depth=6, normalization="batch"),
])
def test_other_initializers_render(runs_dir, query):
    at = _app(data="synthetic", **query).run()
    _no_exceptions(at)
    assert _verdict(at)
    if query["init"] == "lsuv":
        assert any("LSUV" in e.label for e in at.expander)


def test_diverged_and_failed_runs_are_shown_not_crashed(runs_dir):
    import json

    from tests.test_explorer_store import _write_run

    _write_run(runs_dir, "20260101-000000-diverged", state="diverged",
               losses=(2.3, 40.0, float("nan")))
    failed = _write_run(runs_dir, "20260101-000100-failed", state="running", losses=(2.3,))
    (failed / "explorer_job.json").write_text(json.dumps({
        "pid": 2**22 + 1, "owner_pid": 2**22 + 1, "final_state": "failed",
        "error": "training process exited with code 1 without finishing"}))
    (failed / "explorer.log").write_text("Traceback ...\nMemoryError: out of memory\n")
    at = _app(data="synthetic", depth=3).run()
    _no_exceptions(at)
    # the newest run is shown first: the failed one, with the end of its log
    assert _metric(at, "State") == "failed"
    assert any("MemoryError" in c.value for c in at.code)
    at.selectbox(key="view_select").set_value("20260101-000000-diverged").run()
    _no_exceptions(at)
    assert _metric(at, "State") == "diverged"
    assert any("Diverged" in e.value for e in at.error)
    states = [df.value for df in at.dataframe if "val_acc" in df.value.columns][0]["state"]
    assert sorted(states) == ["diverged", "failed"]


def test_a_damaged_run_is_an_error_for_that_run_only(runs_dir):
    """A status.json whose total_steps is not a number (hand-edited, another tool's) once
    raised in the Training tab and left the init tab waiting for ever."""
    from tests.test_explorer_store import _write_run

    run = _write_run(runs_dir, "20260101-000000-odd")
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps(dict(status, total_steps="abc")))
    at = _app(data="synthetic", depth=3).run()
    _no_exceptions(at)
    assert _metric(at, "State") == "finished"
    assert _verdict(at)                       # the init tab is filled in


def test_a_finished_run_and_a_stored_model_can_be_deleted(runs_dir, tmp_path):
    from tests.test_explorer_store import _write_run
    from tests.test_training_user_model import two_conv

    run = _write_run(runs_dir, "20260101-000000-done")
    at = _app(data="synthetic", depth=3).run()
    at.button(key="delete_20260101-000000-done").click().run()
    _no_exceptions(at)
    assert not run.exists()
    assert any("No runs yet" in i.value for i in at.info)
    at = _upload(_app(data="synthetic", model="file").run(), "mine.keras",
                 pathlib.Path(two_conv(tmp_path / "mine.keras")).read_bytes())
    assert list((runs_dir / "uploads").glob("*.keras"))
    at.button(key="remove_upload").click().run()
    _no_exceptions(at)
    assert not list((runs_dir / "uploads").glob("*"))
    assert any("upload a .keras file" in s.value for s in at.subheader)


def test_a_single_hidden_layer_gets_no_verdict_and_no_finding(runs_dir):
    """Depth 2 (a conv and the classifier): a green "propagates" over a red "vanishing
    (severe)" once stood side by side; there is nothing to compare."""
    at = _app(data="synthetic", depth=2, normalization="batch").run()
    _no_exceptions(at)
    assert any("too few to judge" in i.value for i in at.info)
    assert not any("**vanishing**" in b.value for b in [*at.error, *at.warning])
    assert _metric(at, "Gradient variance") == "n/a"


def test_quick_presets_switch_to_the_plain_cnn(runs_dir):
    at = _app(data="synthetic", model="file").run()
    (button,) = [b for b in at.button if b.label == "ReLU Kaiming"]
    button.click().run()
    _no_exceptions(at)
    assert at.radio(key="model").value == "cnn" and at.slider(key="depth").value == 30
    assert at.selectbox(key="init").value == "kaiming_normal"


# --------------------------------------------------------------------------- restart and resume

# The explorer's side of a run, as the server holds it: a JobManager that launches
# `keras-varinit train`; prints the run id, then waits to be killed.
_EXPLORER = r"""
import sys, time
from explorer.run_store import RunStore
from explorer.worker import JobManager
jobs = JobManager(RunStore(sys.argv[1]),
                  devices=[{"id": "cpu", "name": "CPU", "env": {"CUDA_VISIBLE_DEVICES": ""}}])
print(jobs.submit(dict(data="synthetic", depth=3, width=4, subset=1024, batch_size=16,
                       epochs=2, lr=0.01)), flush=True)
time.sleep(3600)
"""


@pytest.mark.slow
def test_killed_explorer_and_trainer_show_interrupted_and_resume_completes(runs_dir):
    import json
    import os
    import signal
    import subprocess
    import sys

    from keras_varinit import run_files as rf

    repo = pathlib.Path(APP).parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), TF_CPP_MIN_LOG_LEVEL="3")
    explorer = subprocess.Popen([sys.executable, "-c", _EXPLORER, str(runs_dir)], cwd=repo,
                                env=env, stdout=subprocess.PIPE, text=True)
    try:
        run_id = explorer.stdout.readline().strip()
        run_dir = runs_dir / run_id
        deadline, trainer = time.time() + TIMEOUT, None
        while time.time() < deadline:  # mid-run: in epoch 2, after epoch 1's backup
            steps = rf.read_jsonl(run_dir / rf.STEPS_FILE)   # a record per step, unlike
            if trainer is None and steps:                     # status.json (about 1/s)
                trainer = rf.lock_holder_pid(run_dir)
            if steps and steps[-1]["step"] > 66 and list((run_dir / "backup").glob("*.npz")):
                # Frozen at once, some 60 steps before the end: a fast machine cannot finish
                # the run between this check and the kill below.
                os.kill(trainer, signal.SIGSTOP)
                break
            assert explorer.poll() is None
            time.sleep(0.01)
        assert trainer == json.loads((run_dir / "explorer_job.json").read_text())["pid"]
    finally:  # the server dies, and its training process with it
        explorer.send_signal(signal.SIGKILL)
        explorer.wait()
    os.kill(trainer, signal.SIGKILL)
    while rf.lock_held(run_dir):
        time.sleep(0.05)
    assert rf.read_json(run_dir / "status.json")["state"] == "running"  # as it was left

    at = _app(data="synthetic", depth=3).run()  # the explorer started again
    _no_exceptions(at)
    assert at.selectbox(key="view_select").value == run_id
    assert _metric(at, "State") == "interrupted"
    assert any("Interrupted at step" in w.value for w in at.warning)
    assert any("last backup (step 64)" in c.value for c in at.caption)
    at.button(key=f"resume_{run_id}").click().run()
    _no_exceptions(at)
    deadline, state = time.time() + TIMEOUT, None
    while time.time() < deadline:
        time.sleep(2)
        at.run()
        _no_exceptions(at)
        state = _metric(at, "State")
        if state not in ("running", "queued", "interrupted"):
            break
    assert state == "finished", (run_dir / "explorer.log").read_text()[-3000:]
    steps = [r["step"] for r in rf.read_jsonl(run_dir / "steps.jsonl")]
    assert steps == list(range(1, 129))  # every step once, the resumed ones after 64
    assert [r["epoch"] for r in rf.MetricsCsv(run_dir / "metrics.csv").read()] == [1, 2]


def test_runs_directory_that_cannot_be_written_is_a_message(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("KERAS_VARINIT_RUNS_DIR", str(blocker / "runs"))
    at = _app(data="synthetic", depth=3, width=4, subset=256, batch_size=64).run()
    _no_exceptions(at)
    at.button(key="train").click().run()
    _no_exceptions(at)
    errors = [e.value for e in at.error if "Cannot write the run directory" in e.value]
    assert errors and "a_file" in errors[0]
    # the page keeps working: the profile follows a new depth, the tabs are all there
    at.slider(key="depth").set_value(5).run()
    _no_exceptions(at)
    assert any("5-layer CNN" in s.value for s in at.subheader)
    assert [t.label for t in at.tabs] == ["At initialization", "Training", "Compare"]


def test_device_choice_offers_data_parallel_when_several_devices_are_visible(runs_dir,
                                                                             monkeypatch):
    import json

    import streamlit as st

    from explorer import worker

    st.cache_resource.clear()
    monkeypatch.setattr(worker, "data_parallel_devices", lambda: 1)
    try:
        at = _app(data="synthetic", depth=3, width=4, subset=256, batch_size=64).run()
        _no_exceptions(at)
        assert not [r for r in at.radio if r.key == "use_all_devices"]  # one device: none
        st.cache_resource.clear()
        monkeypatch.setattr(worker, "data_parallel_devices", lambda: 3)
        at = _app(data="synthetic", depth=3, width=4, subset=256, batch_size=64).run()
        choice = at.radio(key="use_all_devices")
        assert choice.value is False
        choice.set_value(True).run()
        _no_exceptions(at)
        # 64 images do not split over 3 devices: said on the page, Train disabled
        assert any("multiple of 3" in e.value for e in at.error)
        assert at.button(key="train").disabled
        monkeypatch.setattr(worker, "data_parallel_devices", lambda: 2)
        st.cache_resource.clear()
        at = _app(data="synthetic", depth=3, width=4, subset=256, batch_size=64).run()
        at.radio(key="use_all_devices").set_value(True).run()
        at.button(key="train").click().run()
        _no_exceptions(at)
        (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
        job = json.loads((run_dir / "explorer_job.json").read_text())
        assert job["distribute"] == "data_parallel"
        assert "--distribute data_parallel" in " ".join(job["argv"])
    finally:
        st.cache_resource.clear()


# --------------------------------------------------------------------------- diagnosis

def test_findings_panel_shows_the_diagnosis_and_apply_queues_the_fix(runs_dir):
    """A run with a findings.jsonl: the Training tab shows the finding (timeline, box, the
    layers outlined in the heatmaps); "Apply and re-run" queues the run's configuration with
    the suggestion applied as a new run. The init tab shows the diagnosis of the profile."""
    from keras_varinit import run_files as rf
    from keras_varinit.diagnosis import Finding, Suggestion, write_findings
    from tests.test_explorer_store import _write_run

    run = _write_run(runs_dir, "20260101-000000-xavier", normalization={"normalization": "none"})
    config = json.loads((run / rf.CONFIG_FILE).read_text())
    (run / rf.CONFIG_FILE).write_text(json.dumps(dict(config, init="xavier_normal")))
    finding = Finding("vanishing", 0, ("conv_01", "conv_02"), "severe",
                      {"forward_ratio": 1e-9, "threshold": 1e-3},
                      Suggestion({"init": "kaiming_normal"}, "Kaiming: Var[W] = 2/fan_in."),
                      "vanishing at initialization in conv_01..conv_02")
    write_findings(run / rf.FINDINGS_FILE, [finding])
    # N(0, 0.01^2) on a 4-layer CNN: the init profile vanishes (x0.014 per layer)
    at = _app(data="synthetic", depth=4, init="normal:0.01").run()
    _no_exceptions(at)
    boxes = [e.value for e in at.error]
    assert any(b.startswith("**vanishing** (severe) from step 0 at conv_01, conv_02") and
               "Initializer: Kaiming normal (fan_in)" in b for b in boxes), boxes
    init_boxes = [e.value for e in at.warning]    # the init tab: x1e-4 over 3 layers
    assert any(b.startswith("**vanishing** (warning) from step 0 at conv_01") and
               "Initializer: Kaiming normal (fan_in)" in b for b in init_boxes), init_boxes
    at.button(key="apply_20260101-000000-xavier_0").click().run()
    _no_exceptions(at)
    assert any("Queued" in i.value for i in at.info)
    (new,) = [p for p in runs_dir.iterdir() if p.is_dir() and p != run]
    argv = json.loads((new / "explorer_job.json").read_text())["argv"]
    options = dict(zip(argv[::2], argv[1::2])) | dict(zip(argv[1::2], argv[2::2]))
    assert options["--init"] == "kaiming_normal"
    assert (options["--depth"], options["--width"], options["--subset"]) == ("3", "4", "192")


# --------------------------------------------------------------------------- your model

def _upload(at, name, data):
    at.file_uploader(key="upload").set_value((name, data, "application/octet-stream")).run()
    _no_exceptions(at)
    return at


def _errors(at):
    return " ".join(e.value for e in at.error)


def test_uploaded_keras_file_is_profiled_and_stored_under_a_generated_name(runs_dir, tmp_path):
    from tests.test_training_user_model import two_conv

    at = _app(data="synthetic", model="file").run()
    _no_exceptions(at)
    assert any("CLI-only" in c.value and "never imports" in c.value for c in at.caption)
    assert at.slider(key="depth").disabled and at.selectbox(key="init").disabled
    data = pathlib.Path(two_conv(tmp_path / "my net.keras")).read_bytes()
    _upload(at, "my net.keras", data)
    (stored,) = (runs_dir / "uploads").glob("*.keras")
    assert re.fullmatch(r"[0-9a-f]{16}\.keras", stored.name)      # no name from the user
    assert any("my net.keras" in o for o in at.selectbox(key="_stored_model").options)
    assert any("Your model my net.keras" in s.value for s in at.subheader)   # not the hash
    assert _verdict(at) and _metric(at, "Forward variance")
    table = [df.value for df in at.dataframe if "forward_var" in df.value.columns]
    assert table and {"conv1", "conv2", "head"} <= set(table[0]["layer"])
    # an explorer restart: the stored model is offered again, and trains from the Training tab
    at = _app(data="synthetic", model="file", subset=64, batch_size=32, epochs=1).run()
    _no_exceptions(at)
    assert at.selectbox(key="_stored_model").value == str(stored)
    at.button(key="train").click().run()
    _no_exceptions(at)
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir() and p.name != "uploads"]
    argv = " ".join(json.loads((run_dir / "explorer_job.json").read_text())["argv"])
    assert f"--model file --model-file {stored}" in argv and "--depth 30" in argv


def test_layers_the_profile_leaves_out_are_named_on_the_page(runs_dir, tmp_path):
    import keras

    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = keras.layers.LSTM(8, name="lstm")(keras.layers.Reshape((30, 120))(h))
    path = tmp_path / "conv_lstm.keras"
    keras.Model(inputs, keras.layers.Dense(10, name="head")(h)).save(path)
    at = _upload(_app(data="synthetic", model="file").run(), "conv_lstm.keras",
                 path.read_bytes())
    assert any("leaves out ['lstm/lstm_cell']" in i.value for i in at.info), \
        [i.value for i in at.info]
    table = [df.value for df in at.dataframe if "forward_var" in df.value.columns]
    assert list(table[0]["layer"]) == ["conv", "head"]


def test_a_fix_for_your_own_model_is_shown_as_keras_code(runs_dir, tmp_path):
    """The page cannot change the layers of a model it did not build: the fix of an init
    finding on an uploaded model is the Keras code to write, not a button."""
    import keras

    inputs = keras.Input((32, 32, 3))
    h = inputs
    for i in range(6):
        h = keras.layers.Conv2D(8, 3, padding="same", activation="tanh", name=f"conv{i}",
                                kernel_initializer=keras.initializers.RandomNormal(
                                    stddev=0.01))(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    path = tmp_path / "tiny_tanh.keras"
    keras.Model(inputs, keras.layers.Dense(10, name="head")(h)).save(path)
    at = _upload(_app(data="synthetic", model="file").run(), "tiny_tanh.keras",
                 path.read_bytes())
    assert any("vanishing" in e.value for e in at.error), [e.value for e in at.error]
    # the model's own activation picks the fix (the page's disabled activation is relu's)
    assert any("Not a setting of this page" in c.value for c in at.caption), \
        [c.value for c in at.caption]
    code = " ".join(c.value for c in at.code)
    assert 'kernel_initializer=keras_varinit.initializers.get("xavier_normal_tanh")' in code
    assert not any(b.label in ("Apply to the settings", "Apply and re-run") for b in at.button)


def test_bad_uploads_get_clear_messages_and_are_not_stored(runs_dir, tmp_path, monkeypatch):
    import keras

    from tests.test_training_user_model import two_conv

    inputs = keras.Input((32, 32, 3))
    lam = keras.layers.Lambda(lambda t: t * 3, name="triple")(inputs)
    flat = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(lam))
    keras.Model(inputs, flat).save(tmp_path / "lambda.keras")
    good = pathlib.Path(two_conv(tmp_path / "good.keras")).read_bytes()
    at = _app(data="synthetic", model="file").run()
    cases = [
        ("lambda.keras", (tmp_path / "lambda.keras").read_bytes(),
         "holds Lambda layer(s) ['triple']"),
        ("cut.keras", good[: len(good) // 2], "'cut.keras' is a truncated or corrupt"),
        ("cat.keras", b"\x89PNG\r\n\x1a\n" + bytes(300), "it is a PNG image"),
        ("gray.keras", pathlib.Path(two_conv(tmp_path / "g.keras", (28, 28, 1))).read_bytes(),
         "input shape is (28, 28, 1)"),
    ]
    for name, data, message in cases:
        _upload(at, name, data)
        assert message in _errors(at), (name, _errors(at))
        # what an upload may be, in the page's words: no factory, no CLI flag
        assert "factory" not in _errors(at) and "--" not in _errors(at), _errors(at)
    monkeypatch.setenv("KERAS_VARINIT_MAX_UPLOAD_MB", "1")
    at.run()      # the uploader now says (and the browser enforces) 1 MB; the page checks too
    assert "at most 1 MB" in at.file_uploader(key="upload").label
    _upload(at, "big.keras", good + bytes(1_000_001))
    assert "over the upload limit. Allowed: a .keras file of at most 1 MB" in _errors(at)
    assert not list((runs_dir / "uploads").glob("*.keras"))
    assert at.button(key="train").disabled        # nothing to train: no model file
    assert "Traceback" not in _errors(at)


def test_a_refused_upload_does_not_leave_the_model_stored_before_it_on_show(runs_dir,
                                                                          tmp_path):
    """After a good upload, a refused one used to leave the page profiling (and Train
    training) the earlier model, under the heading a user reads as their new file's."""
    from explorer import presets
    from tests.test_training_user_model import two_conv

    at = _upload(_app(data="synthetic", model="file").run(), "good.keras",
                 pathlib.Path(two_conv(tmp_path / "good.keras")).read_bytes())
    assert any("Your model good.keras" in s.value for s in at.subheader)
    _upload(at, "bad.keras", b"not a zip at all" * 10)
    assert "'bad.keras'" in _errors(at)
    assert at.selectbox(key="_stored_model").value is None
    assert any("upload a .keras file" in s.value for s in at.subheader)
    assert any(presets.NO_UPLOAD == i.value for i in at.info)
    assert at.button(key="train").disabled
    assert not [df for df in at.dataframe if "forward_var" in df.value.columns]


def test_keras_application_choice_is_profiled(runs_dir):
    at = _app(data="synthetic", model="application", application="MobileNetV3Small").run()
    _no_exceptions(at)
    assert any("keras.applications.MobileNetV3Small" in s.value for s in at.subheader)
    assert _verdict(at)
    table = [df.value for df in at.dataframe if "forward_var" in df.value.columns][0]
    assert len(table) > 50     # every conv, depthwise conv and dense layer of the network


def test_init_finding_applied_to_the_settings_goes_away(runs_dir):
    """At initialization, a 30-layer ReLU net under Xavier: the diagnosis names the vanishing
    signal and its fix; "Apply to the settings" puts the fix in the sidebar, the profile is
    measured again, and that finding is gone."""
    at = _app(data="synthetic", depth=30, init="xavier_normal", activation="relu",
              normalization="none").run()
    _no_exceptions(at)
    boxes = [e.value for e in at.error] + [e.value for e in at.warning]
    assert any(b.startswith("**vanishing**") for b in boxes), boxes
    apply = [b for b in at.button if b.key and b.key.startswith("apply_init_")]
    assert apply and apply[0].label == "Apply to the settings"
    apply[0].click().run()
    _no_exceptions(at)
    assert at.selectbox(key="init").value == "kaiming_normal"
    boxes = [e.value for e in at.error] + [e.value for e in at.warning]
    assert not any(b.startswith("**vanishing**") for b in boxes), boxes


def test_an_application_that_rescales_its_input_is_fed_raw_pixels(runs_dir):
    """EfficientNetB0 (weights=None) divides its input by 255 itself: on the page's normalized
    images its first convolution sees E[x^2] = 1.5e-5. The fix is the raw pixels (the input
    normalization control), not normalizing again; applied, the finding is gone."""
    at = _app(data="synthetic", model="application", application="EfficientNetB0").run()
    _no_exceptions(at)
    assert at.radio(key="input_normalization").value == "pooled"
    boxes = [e.value for e in at.error] + [e.value for e in at.warning]
    (box,) = [b for b in boxes if b.startswith("**unnormalized_input**")]
    assert "after the model's own input layers (rescaling, normalization)" in box
    assert "**Fix**: Input normalization: Raw pixels (0-255)." in box
    apply = [b for b in at.button if b.key and b.key.startswith("apply_init_")]
    assert [b.label for b in apply] == ["Apply to the settings"]
    apply[0].click().run()
    _no_exceptions(at)
    assert at.radio(key="input_normalization").value == "none"
    boxes = [e.value for e in at.error] + [e.value for e in at.warning]
    assert not any(b.startswith("**unnormalized_input**") for b in boxes), boxes
