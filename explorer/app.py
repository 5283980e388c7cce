"""keras_varinit explorer: ``streamlit run explorer/app.py`` (or ``make run``).

Layout and widgets only: one sidebar widget per ``TrainConfig`` field that declares a
``widget`` (keras_varinit.training.config). The work happens in plain-Python helpers:
``explorer.presets`` (settings derived from TrainConfig, URL round-trip, validation),
``explorer.profile`` (the network at initialization, drawn last so that the page and its
controls come up before Keras is imported), ``explorer.your_model`` (uploaded .keras files),
``explorer.worker`` (background training subprocesses), ``explorer.run_store`` (run directories
on disk), ``explorer.findings_panel`` (a run's findings and the fix "Apply and re-run" queues)
and ``explorer.charts`` (Altair charts).
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `streamlit run explorer/app.py` puts explorer/ on the path
    sys.path.insert(0, str(_REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import streamlit as st  # noqa: E402

# Only what the sidebar and the tabs need: pandas and Altair (charts, run_store, worker) are
# imported once the tabs are on the page (below), so the first render does not wait for them.
from explorer import norm_figure, presets  # noqa: E402
from explorer.your_model import (FACTORIES_NOTE, UploadError, UploadStore,  # noqa: E402
                                 max_upload_mb)
from keras_varinit.run_files import RunState  # noqa: E402
from keras_varinit.training.device import check_data_parallel_batch  # noqa: E402
from keras_varinit.training.config import NETWORK, WidgetKind  # noqa: E402

POLL_SECONDS = 1.5

st.set_page_config(page_title="keras_varinit explorer", page_icon=":material/insights:",
                   layout="wide")


# --------------------------------------------------------------------------------------------
# Long-lived objects (survive reruns and browser reloads)
# --------------------------------------------------------------------------------------------
def runs_dir() -> pathlib.Path:
    from explorer.run_store import default_runs_dir

    return default_runs_dir().resolve()


@st.cache_resource(show_spinner=False)
def get_store(root: str) -> RunStore:
    return RunStore(root)


@st.cache_resource(show_spinner=False)
def get_jobs(root: str) -> JobManager:
    return JobManager(get_store(root))


@st.cache_resource(show_spinner=False)
def get_devices():
    return detect_devices()


@st.cache_resource(show_spinner="Counting the devices a run can share...")
def get_parallel_devices() -> int:
    """Devices a data-parallel run would share (JAX backend; 0 elsewhere)."""
    return data_parallel_devices()


@st.cache_resource(show_spinner=False)
def get_data_info():
    from explorer.profile import data_info

    return data_info()


@st.cache_data(max_entries=64, show_spinner=False)
def cached_profile(key: tuple) -> dict:
    """The init profile for a settings key (st.cache_data: pickled, shared by sessions)."""
    from explorer.profile import compute_profile

    profile = compute_profile(dict(key), hist_layers="all")
    return {"table": profile.table, "verdict": profile.verdict,
            "activations": profile.activations, "layer_names": profile.layer_names,
            "synthetic": profile.synthetic, "seconds": profile.seconds,
            "lsuv": profile.lsuv_report, "explanation": profile.explanation,
            "context": profile.context, "notes": profile.notes}


# --------------------------------------------------------------------------------------------
# Settings: URL -> session state once, widgets, session state -> URL
# --------------------------------------------------------------------------------------------
if "_settings_loaded" not in st.session_state:
    _settings, _notes = presets.from_query(st.query_params.to_dict())
    for _k, _v in _settings.items():
        st.session_state[_k] = _v
    st.session_state["_url_notes"] = _notes
    st.session_state["_settings_loaded"] = True
    st.session_state.setdefault("view_run", None)


def _on_model_change():
    st.session_state["upload_error"] = None
    model = st.session_state["model"]
    other = "mlp" if model == "cnn" else "cnn"
    if model in presets.DEFAULT_WIDTH and \
            st.session_state.get("width") == presets.DEFAULT_WIDTH[other]:
        st.session_state["width"] = presets.DEFAULT_WIDTH[model]


def _use_synthetic():
    st.session_state["data"] = "synthetic"


def _preset(init=None, activation=None, depth=None, normalization=None):
    """A quick preset: the plain CNN with these settings (from any model choice)."""
    def apply():
        if st.session_state.get("model") != "cnn":
            st.session_state["model"] = "cnn"
            _on_model_change()
        for key, value in (("init", init), ("activation", activation), ("depth", depth),
                           ("normalization", normalization)):
            if value is not None:
                st.session_state[key] = value
    return apply


ON_CHANGE = {"model": _on_model_change}
# Tooltips the page words itself: one sentence on each normalization (norm_figure's).
HELP = {"normalization": "\n\n".join(
    f"**{norm_figure.TITLES[name]}**: {text}" for name, text in norm_figure.DESCRIPTIONS.items())}


def control(spec):
    """The sidebar widget of one TrainConfig field, as its ``widget`` declares it."""
    widget = spec.widget
    kwargs = dict(key=spec.name, help=HELP.get(spec.name) or widget.help or spec.help,
                  on_change=ON_CHANGE.get(spec.name))
    if widget.used_with:
        field, values = widget.used_with
        kwargs["disabled"] = st.session_state.get(field) not in values
    options = presets.offered(spec)
    shown = dict(format_func=lambda v: presets.label(spec, v))
    if widget.kind is WidgetKind.RADIO:
        st.radio(widget.label, options, horizontal=True, **shown, **kwargs)
    elif widget.kind is WidgetKind.SELECT:
        st.selectbox(widget.label, options, **shown, **kwargs)
    elif widget.kind is WidgetKind.SELECT_SLIDER:
        st.select_slider(widget.label, options, **shown, **kwargs)
    elif widget.kind is WidgetKind.SLIDER:
        st.slider(widget.label, *presets.bounds(spec), step=widget.step, **kwargs)
    else:
        st.number_input(widget.label, *presets.bounds(spec), step=widget.step, **kwargs)
    if spec.name == "normalization":
        normalization_note(st.session_state.get("normalization", "none"))
    if spec.name == "model" and st.session_state.get("model") == "file":
        your_model_file()


def your_model_file():
    """Under the model choice: upload a .keras file (checked and stored by
    ``your_model.UploadStore``) or pick one stored before; sets ``model_file``."""
    uploads = UploadStore(runs_dir())
    limit = max_upload_mb()
    uploaded = st.file_uploader(
        f"Upload a .keras model (at most {limit} MB)", type=["keras"], key="upload",
        max_upload_size=limit,
        help="Saved with model.save('net.keras'), taking 32x32x3 images, 10 outputs. The "
             "images arrive standardized per channel (mean 0, std 1 over the training set), "
             "as the built-in nets get them: leave out your own Rescaling or Normalization "
             "layer. Loaded in safe mode (no Lambda layers); stored under the runs directory.")
    if uploaded is None:
        st.session_state["_upload_id"] = None
        st.session_state["upload_error"] = None
    elif st.session_state.get("_upload_id") != uploaded.file_id:
        st.session_state["_upload_id"] = uploaded.file_id
        try:
            with st.spinner("Checking the model (safe-mode load)..."):
                stored = uploads.add(uploaded.name, uploaded.getvalue())
            st.session_state["_stored_model"] = str(stored.path)
            st.session_state["upload_error"] = None
        except (UploadError, OSError) as error:
            st.session_state["upload_error"] = str(error)
            st.session_state["_stored_model"] = None   # not the model stored before it
    if st.session_state.get("upload_error"):
        st.error(st.session_state["upload_error"], icon=":material/block:")
    stored = {str(m.path): m for m in uploads.models()}
    if st.session_state.get("_stored_model") not in stored:
        # the newest at first; none after a refused upload (the page then says to pick one)
        first = "_stored_model" not in st.session_state and stored
        st.session_state["_stored_model"] = next(iter(stored)) if first else None
    if stored:
        st.selectbox("Stored models (newest first)", [None, *stored], key="_stored_model",
                     format_func=lambda path: (stored[path].label if path else
                                               "(none: upload a file or pick one)"))
    if st.session_state.get("_stored_model"):
        st.button("Remove this stored model", key="remove_upload", icon=":material/delete:",
                  on_click=_remove_upload, args=(uploads, st.session_state["_stored_model"]),
                  help="Deletes the stored copy; runs that trained it keep their logs but can "
                       "no longer be resumed.")
    st.session_state["model_file"] = st.session_state.get("_stored_model")
    st.caption(FACTORIES_NOTE)


def _remove_upload(uploads, path):
    uploads.remove(path)
    st.session_state["_stored_model"] = None


def normalization_note(method):
    """Under the normalization select: what the chosen one averages over, drawn and said."""
    st.caption(norm_figure.DESCRIPTIONS[method])
    if method != "none":
        st.altair_chart(norm_figure.norm_figure((method,)), width="content")


def quick_presets():
    st.caption("Quick presets (30 layers unless noted)")
    p1, p2 = st.columns(2)
    p1.button("ReLU Xavier", on_click=_preset("xavier_normal", "relu", 30, "none"),
              help="30 layers, ReLU, Xavier normal, no normalization: stalls (He et al. 2015, "
                   "Fig. 3)", width="stretch")
    p2.button("ReLU Kaiming", on_click=_preset("kaiming_normal", "relu", 30, "none"),
              help="30 layers, ReLU, Kaiming normal, no normalization: trains",
              width="stretch")
    p3, p4 = st.columns(2)
    p3.button("tanh small", on_click=_preset("normal:0.01", "tanh", 10, "none"),
              help="10 layers, tanh, N(0, 0.01^2): activations shrink to 0",
              width="stretch")
    p4.button("tanh large", on_click=_preset("normal:1.0", "tanh", 10, "none"),
              help="10 layers, tanh, N(0, 1): every unit saturates at +-1", width="stretch")


with st.sidebar:
    for section in presets.SECTIONS:
        st.header(section)
        for spec in presets.CONTROLS.values():
            if spec.widget.section == section:
                control(spec)
        if section == NETWORK:
            quick_presets()
    st.checkbox("Allow two runs at once on one device", key="parallel",
                help="By default one training job runs per device and the others wait in the "
                     "queue, so that runs do not slow each other down.")

settings = {k: st.session_state[k] for k in presets.DEFAULTS}
query = presets.to_query(settings)
if query != {k: v for k, v in st.query_params.to_dict().items()}:
    st.query_params.from_dict(query)

# --------------------------------------------------------------------------------------------
# Header, banners, validation
# --------------------------------------------------------------------------------------------
st.title("keras_varinit explorer")
st.markdown("Pick a depth and an initializer: see how the signal propagates **at "
            "initialization**, then **train** on CIFAR-10 and **compare** runs. "
            "The settings live in the URL; copy it to share this configuration.")

banners = st.container()   # filled below, once the tabs are on the page
tab_init, tab_train, tab_compare = st.tabs(["At initialization", "Training", "Compare"])

from explorer import charts  # noqa: E402  (Altair, pandas: after the first render)
from explorer.run_store import RunStore  # noqa: E402
from explorer.worker import JobManager, data_parallel_devices, detect_devices  # noqa: E402

with banners:
    for note in st.session_state.get("_url_notes", []):
        st.warning(note, icon=":material/link:")

    data_info = get_data_info()
    if settings["data"] == "auto" and not data_info.available:
        with st.container(border=True):
            st.warning(data_info.message, icon=":material/cloud_off:")
            st.button("Use the synthetic CIFAR-shaped set", on_click=_use_synthetic,
                      type="primary", key="use_synthetic")
    elif settings["data"] == "synthetic":
        st.info("Data: the **synthetic** CIFAR-shaped set (oriented gratings per class, not "
                "CIFAR-10). Every chart of such a run says so.", icon=":material/science:")

    problems = presets.problems(settings)
    blocking = [problem for problem in problems if problem.blocking]
    for problem in problems:
        if presets.awaiting_upload(settings):
            st.info(problem.text, icon=":material/upload_file:")
        else:
            (st.error if problem.blocking else st.warning)(problem.text)

store = get_store(str(runs_dir()))
jobs = get_jobs(str(runs_dir()))
jobs.set_max_per_device(2 if st.session_state.get("parallel") else 1)

# --------------------------------------------------------------------------------------------
# Findings of the diagnosis (explorer.findings_panel: the data; here: the layout)
# --------------------------------------------------------------------------------------------
SEVERITY_BOX = {"severe": st.error, "warning": st.warning}


def finding_box(finding, key=None, config=None):
    """One finding: kind, step, layers, message, evidence, the fix; with ``config`` (the run's
    config.json) an "Apply and re-run" button that queues the corrected configuration, without
    it (the init profile) an "Apply to the settings" button that puts the fix in the sidebar."""
    from explorer.findings_panel import fix_text, layers_text, needs_code_change

    where = f" at {layers_text(finding.layers)}" if finding.layers else ""
    fix = fix_text(finding.suggestion.changes)
    SEVERITY_BOX[finding.severity.value](
        f"**{finding.kind.value}** ({finding.severity.value}) from step {finding.step}{where}: "
        f"{finding.message}\n\n**Fix**: {fix + '. ' if fix else ''}{finding.suggestion.text}",
        icon=":material/stethoscope:")
    with st.expander("Evidence"):
        st.json(finding.evidence)
    changes = finding.suggestion.changes
    if not changes:
        return
    if config is not None and not needs_code_change(config, changes):
        st.button("Apply and re-run", key=key, icon=":material/build:",
                  on_click=_apply_fix, args=(config, finding),
                  help=f"Queue this run's configuration with {fix} as a new run beside this "
                       "one; compare the two in the Compare tab.")
    elif config is None and _already_set(changes):
        st.caption(f"{fix} is already set: the cause is in the network itself (for your own "
                   "model, e.g. its preprocessing layers), not in a setting of this page.")
    elif config is None and _adjustable(changes):
        st.button("Apply to the settings", key=key, icon=":material/build:",
                  on_click=_apply_to_settings, args=(changes,),
                  help=f"Set {fix} in the sidebar: the profile is measured again with the fix.")
    else:
        from keras_varinit.diagnosis.suggestions import keras_code

        st.caption("Not a setting of this page for this model: make the change in the code "
                   "that builds it (then save it with model.save and upload it again):")
        st.code("\n".join(keras_code(changes)), language=None)


def _already_set(changes):
    """Every change of a fix already holds in the page's configuration."""
    config = presets.to_config(settings)
    return all(getattr(config, name, object()) == value for name, value in changes.items())


def _adjustable(changes):
    """Every change of a fix is a sidebar control that is enabled for the chosen model."""
    for name in changes:
        spec = presets.CONTROLS.get(name)
        if spec is None:
            return False
        if spec.widget.used_with:
            field, values = spec.widget.used_with
            if settings.get(field) not in values:
                return False
    return True


def init_diagnosis(table, context):
    """The diagnosis of the init profile, under the verdict."""
    from explorer.profile import init_findings

    for i, finding in enumerate(init_findings(table, settings, context)):
        finding_box(finding, key=f"apply_init_{i}")


def _apply_to_settings(changes):
    """The sidebar's widgets take the fix's values (the URL follows on the rerun)."""
    for name, value in changes.items():
        st.session_state[name] = value


def _apply_fix(config, finding):
    """Queue ``config`` with ``finding``'s suggestion applied (one code path:
    findings_panel.applied_config, then JobManager.submit_config)."""
    from explorer.findings_panel import applied_config

    try:
        run_id = jobs.submit_config(applied_config(config, finding))
    except (ValueError, RuntimeError, OSError) as error:
        st.session_state["apply_message"] = ("error", str(error))
        return
    _compare_later([run_id])
    st.session_state["apply_message"] = (
        "info", f"Queued `{run_id}` with the fix applied; compare it with this run in the "
                "Compare tab.")


def findings_panel(info, findings):
    """The Training tab's findings of a run: timeline, then each finding with its fix."""
    from explorer.findings_panel import findings_frame

    st.markdown("**Diagnosis**")
    message = st.session_state.get("apply_message")
    if message:
        (st.error if message[0] == "error" else st.info)(message[1])
    if not findings:
        st.caption("No findings so far: the diagnosis of the layer statistics saw nothing "
                   "wrong." if info.config.get("stats_every_n_steps") else
                   "No diagnosis: this run logs no layer statistics.")
        return
    st.altair_chart(charts.findings_timeline(findings_frame(findings),
                                             synthetic=info.synthetic), width="stretch")
    for i, finding in enumerate(findings):
        finding_box(finding, key=f"apply_{info.run_id}_{i}", config=info.config)


# --------------------------------------------------------------------------------------------
# At initialization
# --------------------------------------------------------------------------------------------
def show_verdict(result):
    """The profile's one-line verdict, colored by its level, and its explanation."""
    from keras_varinit.profile_report import VerdictLevel

    verdict = result["verdict"]
    if verdict.level is VerdictLevel.FAILURE:
        st.error(verdict.text, icon=":material/warning:")
    elif verdict.level is VerdictLevel.WARNING:
        st.warning(verdict.text, icon=":material/trending_down:")
    elif verdict.level is VerdictLevel.UNDETERMINED:
        st.info(verdict.text, icon=":material/info:")
    else:
        st.success(verdict.text, icon=":material/check_circle:")
    if result.get("explanation"):
        st.info(result["explanation"][0].upper() + result["explanation"][1:] + ".",
                icon=":material/info:")


def show_profile_metrics(result, elapsed):
    """Forward and backward variance ratios over the hidden layers, and the profile's time."""
    from explorer.profile import signal_summary

    ratios = signal_summary(result["table"])
    fwd, bwd = ratios.get("forward"), ratios.get("backward")
    hidden = ratios.get("hidden_layers", len(result["table"]))
    m1, m2, m3 = st.columns(3)
    hidden = hidden if hidden > 1 else "n"   # one hidden layer: nothing to compare
    first, last = ratios.get("forward_layers", (1, hidden))
    m1.metric(f"Forward variance, layer {last} / layer {first}",
              "n/a" if fwd is None or fwd != fwd else f"{fwd:.2g}\u00d7",
              help="Measured variance of the pre-activations of the last hidden layer "
                   "over the first one's (the classifier after global pooling is left "
                   "out). Near 1: the signal keeps its scale through depth. A "
                   "normalization layer restarts the scale: with some, the two layers of "
                   "the stretch between them that drifts most, as in the verdict; n/a when "
                   "every hidden layer is renormalized.")
    m2.metric(f"Gradient variance, layer 1 / layer {hidden}",
              "n/a" if bwd is None or bwd != bwd else f"{bwd:.2g}\u00d7",
              help="Measured variance of the loss gradient reaching the first layer "
                   "over that at the last hidden layer. Far below 1: the first layers "
                   "barely learn.")
    m3.metric("Profile time", f"{result['seconds']:.2f} s",
              help=f"Computed in {result['seconds']:.2f} s; this page render took "
                   f"{elapsed:.2f} s (cached profiles are instant).")


def show_histograms(result):
    """Activation histograms of up to five layers the user picks (a few spread over depth)."""
    from explorer.profile import histogram_layers

    names = result["layer_names"]
    if not names:   # a user's model: no act_* layers of the built-in nets
        return
    defaults = [names[i - 1] for i in histogram_layers(len(names) + 1)]
    # keyed by the layer count: a new depth starts from its own first/middle/last layers
    chosen = st.multiselect("Activation histograms for layers", names, default=defaults,
                            max_selections=5, key=f"hist_layers_{len(names)}")
    if chosen:
        acts = {n: result["activations"][n] for n in chosen if n in result["activations"]}
        st.altair_chart(charts.histogram_chart(acts, synthetic=result["synthetic"]),
                        width="content")


def init_profile():
    """The "At initialization" profile of the page's settings (computed after the rest of
    the page is drawn: see the end of this script)."""
    if blocking:
        if not presets.awaiting_upload(settings):
            st.info("Change the settings above to see the profile: this combination cannot "
                    "be built.")
        return
    try:
        with st.spinner("Building the network and measuring one batch..."):
            started = time.perf_counter()
            result = cached_profile(presets.profile_key(settings))
            elapsed = time.perf_counter() - started
    except Exception as error:  # an explanation, not a traceback
        st.error(f"Could not compute the profile for this configuration: "
                 f"{type(error).__name__}: {error}")
        return
    table = result["table"]
    show_verdict(result)
    for note in result.get("notes", ()):
        st.info(note, icon=":material/visibility_off:")
    init_diagnosis(table, result["context"])
    show_profile_metrics(result, elapsed)
    for column, direction in zip(st.columns(2), charts.PROFILE_PANELS):
        column.altair_chart(charts.profile_chart(table, direction,
                                                 synthetic=result["synthetic"]),
                            width="stretch")
    show_histograms(result)
    if result.get("lsuv") is not None:
        with st.expander("LSUV report (orthogonal start, then each layer rescaled to "
                         "unit output variance on the probe batch)"):
            st.dataframe(result["lsuv"], hide_index=True, width="stretch")
    with st.expander("Per-layer table"):
        st.dataframe(table, hide_index=True, width="stretch")


with tab_init:
    st.subheader(presets.describe(settings))
    # Filled last (the end of this script), so that the sidebar, the tabs and the runs are
    # on the page at once, while Keras imports and the first profile is measured.
    profile_slot = st.container()
    with profile_slot:
        profile_waiting = st.empty()
        if not blocking:
            profile_waiting.info("Building the network and measuring one batch...",
                                 icon=":material/hourglass_top:")
    with st.expander("What each normalization averages over"):
        st.altair_chart(norm_figure.norm_figure(), width="content")
        st.markdown("\n".join(f"* **{norm_figure.TITLES[name]}**: {text}"
                               for name, text in norm_figure.DESCRIPTIONS.items()))

# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
STATE_ICON = {RunState.QUEUED: ":material/schedule:", RunState.RUNNING: ":material/play_circle:",
              RunState.FINISHED: ":material/check_circle:",
              RunState.STOPPED: ":material/stop_circle:", RunState.DIVERGED: ":material/warning:",
              RunState.FAILED: ":material/error:",
              RunState.INTERRUPTED: ":material/pause_circle:"}


def _submit(settings_list):
    """Queue runs (with the page's device choice); a refusal or a runs directory that cannot
    be written becomes a message on the page."""
    if st.session_state.get("use_all_devices"):
        settings_list = [dict(s, distribute="data_parallel") for s in settings_list]
    try:
        ids = jobs.submit_many(settings_list)
    except (ValueError, RuntimeError, OSError) as error:  # RunDirError is a RuntimeError
        st.session_state["submit_error"] = str(error)
        return
    st.session_state["submit_error"] = None
    st.session_state["view_run"] = ids[0]
    st.session_state["view_select"] = ids[0]  # show the new run
    _compare_later(ids)


def _compare_later(run_ids):
    """New runs join the Compare tab's overlay (its multiselect keeps what it holds)."""
    st.session_state["compare_add"] = [*st.session_state.get("compare_add", []), *run_ids]


def _stop(run_id):
    jobs.stop(run_id)


def _resume(run_id):
    try:
        jobs.resume(run_id)
        st.session_state["resume_error"] = None
    except (ValueError, RuntimeError, OSError) as error:
        st.session_state["resume_error"] = str(error)


def queue_panel(active):
    """The queued and running runs, oldest first, each with its Stop/Cancel button."""
    if not active:
        return
    st.markdown("**Queue**")
    for info in sorted(active, key=lambda r: r.created):
        q1, q2, q3 = st.columns([5, 3, 1])
        q1.markdown(f"{STATE_ICON.get(info.state, '')} {info.label}")
        q2.progress(info.progress, text=f"{info.state} \u00b7 {info.progress:.0%}")
        q3.button("Stop" if info.state == RunState.RUNNING else "Cancel",
                  key=f"stop_{info.run_id}", on_click=_stop, args=(info.run_id,))


def run_summary(info):
    """The shown run's state, step, speed and device, and what its state means."""
    status, config = info.status, info.config
    s1, s2, s3, s4 = st.columns(4)
    s1.metric("State", info.state.value)
    s2.metric("Step", f"{status.get('step') or 0} / {status.get('total_steps') or '?'}")
    ips = status.get("images_per_second")
    s3.metric("Images / s", f"{ips:,.0f}" if isinstance(ips, (int, float)) else "\u2013")
    s4.metric("Device", info.device or "\u2013")
    if info.state == RunState.RUNNING:
        eta = charts.fmt_seconds(status.get("eta_seconds"))
        st.progress(info.progress, text=f"epoch {status.get('epoch')}/"
                    f"{status.get('epochs') or config.get('epochs', '?')} \u00b7 "
                    f"{status.get('phase') or ''} \u00b7 ETA {eta}")
        if st.button("Stop this run", key="stop_view"):
            _stop(info.run_id)
    elif info.state == RunState.QUEUED:
        st.info("Queued: it starts when the device is free.")
    elif info.state == RunState.DIVERGED:
        st.error(f"Diverged: {status.get('error') or 'the loss became NaN/Inf'}. "
                 "The charts show the values up to that point.", icon=":material/warning:")
    elif info.state == RunState.FAILED:
        reason = status.get("error") or "the training process ended without a final state"
        st.error(f"Failed: {reason}", icon=":material/error:")
        tail = store.log_tail(info.run_id, 12)
        if tail:
            st.code(tail, language=None)
    elif info.state == RunState.STOPPED:
        step = status.get("step")
        st.info((f"Stopped at step {step}." if step is not None else "Cancelled before it "
                 "started.") + (f" {status['error']}" if status.get("error") else ""))
    elif info.state == RunState.INTERRUPTED:
        st.warning(f"Interrupted at step {status.get('step')}: its training process ended "
                   "without finishing (killed, out of memory, or the explorer or the machine "
                   "restarted while it ran).", icon=":material/pause_circle:")
        tail = store.log_tail(info.run_id, 12) if status.get("error") else ""
        if tail:
            st.code(tail, language=None)
    if info.resumable:
        resume_button(info)
    if not info.state.active:
        delete_button(info)
    if info.synthetic:
        st.caption(":material/science: This run uses SYNTHETIC data (not CIFAR-10).")


def delete_button(info):
    """Delete a run that is not queued or running, after a second click."""
    with st.popover("Delete this run", icon=":material/delete:"):
        st.caption(f"Deletes `{info.path}`: its logs, backups and TensorBoard files.")
        st.button("Delete for good", key=f"delete_{info.run_id}", type="primary",
                  on_click=_delete, args=(info.run_id,))


def _delete(run_id):
    store.delete(run_id)
    for key in ("view_run", "view_select"):
        if st.session_state.get(key) == run_id:
            st.session_state[key] = None


def resume_button(info):
    """Resume: the run goes on from its last backup (keras-varinit train --resume)."""
    backup = info.backup_step
    where = (f"from its last backup (step {backup})" if backup is not None
             else "from the start (it has no backup yet)")
    st.button("Resume", key=f"resume_{info.run_id}", icon=":material/play_arrow:",
              on_click=_resume, args=(info.run_id,), type="primary",
              help=f"Continue this run {where}, with the same settings.")
    st.caption(f"Resume continues {where}.")
    if st.session_state.get("resume_error"):
        st.error(st.session_state["resume_error"])


def device_choice():
    """Where a new run trains: one device, or (when a run can share several) all of them."""
    shared = get_parallel_devices()
    if shared > 1:
        st.radio("Devices for a new run", [False, True], key="use_all_devices",
                 horizontal=True,
                 format_func=lambda all_: (f"All {shared} devices (data parallel)" if all_
                                           else "One device per run"),
                 help="Data parallel: keras.distribution.DataParallel splits each batch over "
                      "every device (batch norm still uses the whole batch); the run takes "
                      "all of them, so other runs wait.")
        if st.session_state.get("use_all_devices"):
            try:
                check_data_parallel_batch(settings["batch_size"], shared)
            except ValueError as error:
                st.error(str(error))
                return False
    return True


def _steps_per_epoch(total, epochs):
    """total_steps // epochs, or None when either is missing or not a positive number (a
    hand-edited or foreign status.json)."""
    try:
        return int(total) // int(epochs) if int(epochs) > 0 else None
    except (TypeError, ValueError):
        return None


def run_charts(info):
    """Loss and accuracy, the per-layer heatmaps and fractions, the epoch table."""
    run_id, synthetic = info.run_id, info.synthetic
    steps = store.steps(run_id)
    metrics = store.metrics(run_id)
    spe = _steps_per_epoch(info.status.get("total_steps"), info.config.get("epochs"))
    diverged = info.state == RunState.DIVERGED
    c1, c2 = st.columns(2)
    c1.altair_chart(charts.training_chart(steps, metrics, spe, "loss", synthetic=synthetic,
                                          diverged=diverged), width="stretch")
    c2.altair_chart(charts.training_chart(steps, metrics, spe, "accuracy",
                                          synthetic=synthetic, diverged=diverged),
                    width="stretch")
    stats = store.layer_stats(run_id)
    findings = store.findings(run_id)
    from explorer.findings_panel import highlighted_layers

    marked = highlighted_layers(findings)
    h1, h2 = st.columns(2)
    h1.altair_chart(charts.heatmap(stats, "activation_std", synthetic=synthetic,
                                   highlight=marked), width="stretch")
    h2.altair_chart(charts.heatmap(stats, "activation_grad_std", synthetic=synthetic,
                                   highlight=marked), width="stretch")
    findings_panel(info, findings)
    st.altair_chart(charts.fractions_chart(stats, synthetic=synthetic), width="stretch")
    m1, m2 = st.columns(2)
    m1.altair_chart(charts.modes_chart(metrics, "accuracy", synthetic=synthetic),
                    width="stretch")
    m2.altair_chart(charts.mode_gap_chart(metrics, synthetic=synthetic), width="stretch")
    if len(metrics):
        st.dataframe(metrics, hide_index=True, width="stretch")


with tab_train:
    devices = get_devices()
    splits = device_choice()
    b1, b2, b3 = st.columns([1, 2, 3])
    b1.button("Train", type="primary", disabled=bool(blocking) or not splits, key="train",
              on_click=_submit, args=([settings],), width="stretch",
              help="Start this configuration in the background (queued if a run is going).")
    b2.button("Queue preset: 30 layers, Xavier vs Kaiming", key="preset_pair",
              on_click=_submit, args=(presets.reference_pair(settings),),
              disabled=not splits, width="stretch",
              help="He et al. 2015, Fig. 3: the same 30-layer ReLU CNN without BN, once with "
                   "Xavier and once with Kaiming (your training settings).")
    per_device = "two runs" if st.session_state.get("parallel") else "one run"
    b3.markdown("**Device:** " + ", ".join(d["name"] for d in devices)
                + f" &nbsp;\u00b7&nbsp; {per_device} per device at a time; the rest wait in "
                "the queue.")
    if st.session_state.get("submit_error"):
        st.error(st.session_state["submit_error"])

    @st.fragment(run_every=POLL_SECONDS)
    def training_panel():
        runs = store.list_runs()
        if not runs:
            st.info("No runs yet. Press **Train** to start one; it runs in the background "
                    "and is saved under `" + str(store.root) + "`.")
            return
        active = [r for r in runs if r.state.active]
        queue_panel(active)
        ids = [r.run_id for r in runs]
        by_id = {r.run_id: r for r in runs}
        if st.session_state.get("view_select") not in by_id:
            view = st.session_state.get("view_run")
            st.session_state["view_select"] = view if view in by_id else (
                active[0].run_id if active else ids[0])
        run_id = st.selectbox("Show run", ids, key="view_select",
                              format_func=lambda r: f"{by_id[r].label} \u2014 "
                                                    f"{by_id[r].state}")
        try:
            run_summary(by_id[run_id])
            run_charts(by_id[run_id])
        except Exception as error:  # noqa: BLE001 -- one damaged run must not break the tab
            st.error(f"Cannot show run {run_id} ({by_id[run_id].path}): its files are damaged "
                     f"or from another tool ({type(error).__name__}: {error}).")

    training_panel()

# --------------------------------------------------------------------------------------------
# Compare
# --------------------------------------------------------------------------------------------
def compare_panel():
    st.button("Refresh", key="refresh_compare", icon=":material/refresh:",
              help="Re-read the runs directory (runs started elsewhere, e.g. from the CLI, "
                   "appear too).")
    runs = store.list_runs()
    if not runs:
        st.info(f"No saved runs in `{store.root}` yet.")
    else:
        labels = {}
        for info in runs:
            label = info.label if info.label not in labels else f"{info.label} ({info.run_id})"
            labels[label] = info
        _add_pending(labels)
        selected = st.multiselect("Runs to overlay", list(labels), default=list(labels)[:4],
                                  key="compare_runs",
                                  help="The four newest runs are selected at first; runs in "
                                       "progress show what they have logged so far.")
        chosen = [labels[lab] for lab in selected]
        any_synth = any(i.synthetic for i in chosen)
        if chosen:
            epoch_frames = {lab: store.metrics(labels[lab].run_id) for lab in selected}
            step_frames = {lab: store.steps(labels[lab].run_id) for lab in selected}
            c1, c2 = st.columns(2)
            c1.altair_chart(charts.compare_chart(epoch_frames, "epoch", "val_accuracy",
                                                 title="Validation accuracy",
                                                 synthetic=any_synth),
                            width="stretch")
            c2.altair_chart(charts.compare_chart(step_frames, "step", "loss",
                                                 title="Training loss", synthetic=any_synth),
                            width="stretch")
            gaps = {lab: charts.mode_gaps(frame) for lab, frame in epoch_frames.items()}
            st.altair_chart(charts.compare_chart(
                gaps, "epoch", "mode_gap", synthetic=any_synth,
                title="Train/test gap: training-mode minus inference-mode accuracy on the "
                      "training slice (0 without batch norm)"), width="stretch")
        st.markdown("**All runs** (final epoch)")
        st.dataframe(store.final_metrics(chosen or runs), hide_index=True,
                     width="stretch",
                     column_config={"train_acc": st.column_config.NumberColumn(format="%.3f"),
                                    "val_acc": st.column_config.NumberColumn(format="%.3f"),
                                    "train_mode_acc": st.column_config.NumberColumn(
                                        format="%.3f"),
                                    "train_eval_acc": st.column_config.NumberColumn(
                                        format="%.3f"),
                                    "train_loss": st.column_config.NumberColumn(format="%.3f"),
                                    "val_loss": st.column_config.NumberColumn(format="%.3f"),
                                    "images_per_s": st.column_config.NumberColumn(format="%.0f")})
        st.markdown("**TensorBoard** (metrics and per-layer statistics of these runs):")
        if chosen:
            spec = ",".join(f"{i.run_id}:{i.path / 'tensorboard'}" for i in chosen)
            st.code(f"tensorboard --logdir_spec {spec}", language="bash")
        st.code(f"tensorboard --logdir {store.root}", language="bash")


def _add_pending(labels):
    """Put the runs queued from this page since the last look (``_compare_later``) into the
    overlay, beside what the user picked."""
    pending = set(st.session_state.pop("compare_add", []))
    if not pending or "compare_runs" not in st.session_state:
        return
    chosen = list(st.session_state["compare_runs"])
    chosen += [label for label, info in labels.items()
               if info.run_id in pending and label not in chosen]
    st.session_state["compare_runs"] = chosen


with tab_compare:
    # Refreshes itself while runs are queued or training (finished states, new metrics).
    st.fragment(run_every=3.0 if jobs.busy() else None)(compare_panel)()

with profile_slot:
    profile_waiting.empty()
    init_profile()
