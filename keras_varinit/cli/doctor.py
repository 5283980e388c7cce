"""``keras-varinit doctor``: profile a network at initialization, train a short probe run, and
say what is wrong with it (the finding, the first step, the layers, the evidence, the fix).

Example::

    keras-varinit doctor --depth 30 --init xavier_normal --activation relu
    keras-varinit doctor --model my_net.keras --steps 100 --json
    keras-varinit doctor --model my_project.nets:build --lr 0.1

Built-in nets take every ``train`` option (``train.add_config_options``: one schema). The probe
is ``run_training`` of that configuration cut to ``--steps`` steps (``probe_config``) in a
temporary run directory (or ``--log-dir``), with ``DiagnosisLogger`` writing ``findings.jsonl``.
Your own model (``--model FILE.keras`` or ``module:function``, ``user_models``) is fitted for
``--steps`` steps with the ``train`` options of the optimizer, learning rate and batch size,
under ``LayerStatsLogger`` + ``DiagnosisLogger``, on the ``--data`` of ``train`` (CIFAR-10 via
``KERAS_VARINIT_CIFAR10``, or synthetic) when it takes (32, 32, 3) images with 10 classes, else
on learnable synthetic data of its input shape (``probe_data``).

Output: the init verdict (``profile_report.summarize_profile`` of ``variance_profile``), then
one block per finding; a suggestion is printed as the ``train`` options to change
(``--init kaiming_normal``). ``--json``: one JSON object per finding (``Finding.to_dict()``:
kind, step, layers, severity, evidence, suggestion, message) and nothing else on stdout.
Exit code: 1 when a finding is severe, 0 otherwise, 2 for bad usage (one line on stderr).
"""
import dataclasses
import json
import math
import pathlib
import sys
import tempfile
import threading
import time

from keras_varinit.cli.train import add_config_options, config_from_args

HELP = "profile at init, train a short probe run and report what is wrong (CI: exit 1)"
DEFAULT_STEPS = 200
DEFAULT_TIME_LIMIT = 300.0
VAL_IMAGES = 256        # validation images of a probe run (a probe needs no accuracy figure)
PROFILE_IMAGES = 32     # images of the init profile
PROBE_IMAGES = 128      # the LayerStatsLogger's probe batch (user models)
PROBE_DATA_IMAGES = 2048  # the most examples a user model's probe fits on
#: The configuration fields that describe a built-in net: refused with your own model.
NET_FIELDS = ("depth", "width", "init", "activation", "normalization", "groups",
              "input_normalization")
#: The fields that place a built-in net (devices, dtype policy): refused with your own model,
#: which the probe runs on one device in the dtype policy it was built with.
PLACEMENT_FIELDS = ("distribute", "mixed_precision")


def add_parser(subparsers):
    from keras_varinit.training.config import TrainConfig

    p = subparsers.add_parser(
        "doctor", help=HELP,
        description="Profile the network at initialization, train a short probe run (--steps "
        "steps, at most --time-limit seconds) and print its findings (kind, first step, "
        "layers, evidence, the options to change). --model also takes your own model: a "
        ".keras file or a factory module:function. Exit code 1 when a finding is severe, "
        "0 otherwise, 2 for bad usage.")
    add_config_options(p, TrainConfig)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="probe steps (batches) (default %(default)s)")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, metavar="SECONDS",
                   help="stop the probe after this long, findings so far kept "
                        "(default %(default)s)")
    p.add_argument("--log-dir", default=None,
                   help="keep the probe's run directory here (default: a temporary one)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per finding on stdout, nothing else")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run, schema=TrainConfig)
    return p


# --------------------------------------------------------------------------------------------
# what to probe

def _check_bounds(args):
    if args.steps < 1:
        raise ValueError(f"--steps must be a positive integer. Received: --steps {args.steps}")
    if not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise ValueError("--time-limit must be a positive number of seconds. Received: "
                         f"--time-limit {args.time_limit}")


def user_model_spec(args):
    """Your own model as ``load_user_model`` takes it: the ``--model`` value when it is a path
    or a factory, the ``--model-file`` of ``--model file``; None for a built-in net and for
    ``--model application`` (trained as ``keras-varinit train`` would). Refuses the options
    that describe a built-in net with your model."""
    from keras_varinit import models

    if args.model in models.KINDS or args.model == "application":
        return None
    if args.model == "file":
        if not args.model_file:
            raise ValueError("--model file needs --model-file PATH. Received: --model file "
                             "without --model-file. Allowed: --model file --model-file "
                             "net.keras, or --model net.keras")
        spec, args.model_file = args.model_file, None
    else:
        spec = args.model
    given = _changed_flags(args, NET_FIELDS)
    if given:
        raise ValueError(f"{', '.join(given)}: options of the built-in nets; your model is probed "
                         f"as it is. Received: {' '.join(given)} with --model {args.model}. "
                         "Allowed with your model: --optimizer, --lr, --momentum, --batch-size, "
                         "--data, --seed, --stats-every and the doctor's own options")
    placed = _changed_flags(args, PLACEMENT_FIELDS)
    if placed:
        raise ValueError(f"The doctor probes your model on one device, in the dtype policy it "
                         f"was built with. Received: {' '.join(placed)} with --model "
                         f"{args.model}. Allowed: build the model under the mixed_float16 "
                         "policy yourself (keras.mixed_precision.set_dtype_policy before "
                         "creating it), and no --distribute")
    return spec


def _changed_flags(args, names):
    """The command-line flags of the configuration fields ``names`` given a non-default value."""
    from keras_varinit.training.config import fields

    return [spec.cli_flag for spec in fields(args.schema)
            if spec.name in names and getattr(args, spec.name) != spec.default]


def probe_config(config, steps):
    """``config`` cut to a probe of ``steps`` steps: one epoch of ``steps`` batches (more
    epochs only when ``config.subset`` holds fewer images; the probe stops at ``steps``),
    ``VAL_IMAGES`` validation images,
    layer statistics about ten times per probe (every ``config.stats_every_n_steps`` if more
    often), backups only at epoch ends."""
    images = steps * config.batch_size
    subset = images if config.subset is None else min(config.subset, images)
    per_epoch = max(1, subset // config.batch_size)
    every = max(1, min(config.stats_every_n_steps or steps, steps // 10))
    return dataclasses.replace(
        config, subset=subset, epochs=math.ceil(steps / per_epoch),
        val_subset=min(config.val_subset or VAL_IMAGES, VAL_IMAGES), stats_every_n_steps=every,
        backup_every_n_steps=0).validate()


# --------------------------------------------------------------------------------------------
# progress and bounds

class _Progress:
    """A line on stderr about every tenth of the probe; ``stop()`` after ``steps`` steps (the
    last epoch of a probe may be longer) or past the time limit."""

    def __init__(self, steps, time_limit, quiet, stop):
        self.steps, self.time_limit, self.quiet, self.stop = steps, time_limit, quiet, stop
        self.start = time.perf_counter()
        self.done = 0
        self.timed_out = False

    def batch_end(self):
        self.done += 1
        elapsed = time.perf_counter() - self.start
        if not self.quiet and (self.done % max(1, self.steps // 10) == 0
                               or self.done == self.steps):
            print(f"doctor: step {self.done}/{self.steps} ({elapsed:.0f} s)", file=sys.stderr)
        if elapsed > self.time_limit and self.done < self.steps and not self.timed_out:
            self.timed_out = True
            if not self.quiet:
                print(f"doctor: the time limit ({self.time_limit:g} s) stops the probe at step "
                      f"{self.done}/{self.steps}", file=sys.stderr)
        if self.timed_out or self.done == self.steps:
            self.stop()

    def state(self, run_state="finished"):
        """How the probe ended: the time limit, else the run's state (a stop at ``steps``
        is the probe finished)."""
        if self.timed_out:
            return "stopped at the time limit"
        return "finished" if run_state in ("finished", "stopped") else str(run_state)


def _callback(progress):
    import keras

    class ProgressCallback(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            progress.batch_end()

    return ProgressCallback()


def _init_profile(model, x, y):
    """``variance_profile`` at initialization and its one-line verdict (None, why: a model
    the profile does not support)."""
    from keras_varinit import profile_report
    from keras_varinit.diagnostics import variance_profile

    try:
        df = variance_profile(model, x[:PROFILE_IMAGES], y[:PROFILE_IMAGES])
    except (ValueError, RuntimeError) as error:
        return None, f"no init profile ({type(error).__name__}: {error})"
    verdict = profile_report.summarize_profile(df)
    return df, f"{verdict.level.value.upper()}: {verdict.text}"


# --------------------------------------------------------------------------------------------
# the two probes

@dataclasses.dataclass
class Probe:
    """What a probe found: its findings, the init verdict, and how the run went."""

    findings: list
    verdict: str
    state: str
    steps: int
    seconds: float
    run_dir: pathlib.Path | None
    title: str
    notes: tuple = ()   # layers the diagnostics leave out (instrument.coverage_notes)


def probe_builtin(config, steps, time_limit, log_dir, quiet):
    """``run_training`` of ``probe_config(config, steps)`` into ``log_dir``; the findings of
    its ``findings.jsonl``."""
    import keras

    from keras_varinit import run_files as rf
    from keras_varinit.diagnosis import read_findings
    from keras_varinit.training.data import load_data
    from keras_varinit.training.loop import run_training

    config = probe_config(config, steps)
    (x, y), _, _ = load_data(config)
    verdict = []

    class InitProfile(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            verdict.append(_init_profile(self.model, x, y)[1])

    stop = threading.Event()
    progress = _Progress(steps, time_limit, quiet, stop.set)
    result = run_training(config, log_dir, overwrite=True, stop_event=stop, verbose=0,
                          callbacks=[InitProfile(), _callback(progress)])
    state = progress.state(str(result.state))
    return Probe(read_findings(pathlib.Path(log_dir) / rf.FINDINGS_FILE),
                 verdict[0] if verdict else "no init profile", state, result.step,
                 time.perf_counter() - progress.start, pathlib.Path(log_dir),
                 f"{config.slug()} ({'synthetic data' if result.synthetic else 'CIFAR-10'})")


def probe_data(model, config, n):
    """``(x, y, description)``: ``n`` inputs for ``model`` and labels it can learn.

    For a model taking (32, 32, 3) images (or images of any size) with 10 outputs: the
    training data of ``config`` (``--data``: CIFAR-10 through ``KERAS_VARINIT_CIFAR10``,
    synthetic, or a path), as ``train`` feeds it (``training.data.load_data``: standardized
    per channel); otherwise N(0, 1) inputs of the model's input shape labelled by a fixed
    random linear teacher (argmax of x W), so the loss can fall."""
    import numpy as np

    from keras_varinit import user_models
    from keras_varinit.training.data import load_data

    shape = user_models.model_input_shape(model)
    classes = int(model.outputs[0].shape[-1]) if getattr(model, "outputs", None) else None
    if shape is not None and user_models.cifar10_shape_mismatch(shape) is None and \
            classes == 10:   # (32, 32, 3), or images of any size such as (None, None, 3)
        (x, y), _, info = load_data(dataclasses.replace(config, subset=n, val_subset=1))
        return x, y, "synthetic CIFAR-like images (not CIFAR-10)" if info["synthetic"] \
            else "CIFAR-10"
    if shape is None or None in shape:
        raise ValueError(user_models.cifar10_mismatch(model) or "The model's input shape has "
                         f"an axis of unknown size. Received: {shape}. Allowed: a model "
                         "built with a fixed input shape, or one taking images of any size "
                         "(None, None, 3) with 10 outputs (probed on CIFAR-10)")
    rng = np.random.default_rng(config.seed)
    x = rng.standard_normal((n,) + tuple(shape)).astype("float32")
    teacher = rng.standard_normal((int(np.prod(shape)), classes or 2))
    y = np.argmax(x.reshape(n, -1) @ teacher, axis=1).astype("int32")
    return x, y, f"N(0, 1) inputs of shape {tuple(shape)}, labels of a random linear teacher"


def probe_user_model(spec, config, steps, time_limit, log_dir, quiet):
    """Fit the model ``spec`` names for ``steps`` steps under the two callbacks."""
    import keras

    from keras_varinit import instrument, run_files as rf, user_models
    from keras_varinit.callbacks import DiagnosisLogger, LayerStatsLogger
    from keras_varinit.diagnosis import Context
    from keras_varinit.training.model import make_optimizer

    model = user_models.load_user_model(spec)
    keras.utils.set_random_seed(config.seed)
    n = min(steps * config.batch_size, PROBE_DATA_IMAGES)
    x, y, described = probe_data(model, config, max(n, config.batch_size))
    with instrument.coverage_notes() as notes:
        profile, verdict = _init_profile(model, x, y)
        loss, y = instrument.default_loss(model, y)
        model.compile(optimizer=make_optimizer(config), loss=loss)
        every = probe_config(config, steps).stats_every_n_steps
        logger = LayerStatsLogger((x[:PROBE_IMAGES], y[:PROBE_IMAGES]), every_n_steps=every,
                                  jsonl_path=str(log_dir / rf.LAYER_STATS_FILE))
        doctor = DiagnosisLogger(logger, profile=profile if profile is not None else True,
                                 context=Context(batch_size=config.batch_size), verbose=0,
                                 jsonl_path=str(log_dir / rf.FINDINGS_FILE))
        progress = _Progress(steps, time_limit, quiet,
                             lambda: setattr(model, "stop_training", True))
        per_epoch = max(1, len(x) // config.batch_size)
        model.fit(x, y, batch_size=config.batch_size, epochs=math.ceil(steps / per_epoch),
                  steps_per_epoch=min(per_epoch, steps), verbose=0, shuffle=True,
                  callbacks=[logger, doctor, _callback(progress)])
    return Probe(doctor.findings, verdict, progress.state(), progress.done,
                 time.perf_counter() - progress.start, log_dir,
                 f"{model.name} from {spec} ({described})", tuple(notes))


# --------------------------------------------------------------------------------------------
# the report

def change_options(changes, schema):
    """A suggestion's changes as ``train`` options: ``{"init": "kaiming_normal"}`` ->
    ``--init kaiming_normal``."""
    from keras_varinit.training.config import fields

    specs = {spec.name: spec for spec in fields(schema)}
    return " ".join(f"{specs[name].cli_flag} {specs[name].to_text(value)}"
                    for name, value in changes.items())


def _evidence(evidence):
    def text(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{k}={text(v)}" for k, v in evidence.items() if v is not None)


def report_lines(probe, schema, user_model):
    """The short report: header, init verdict, one block per finding."""
    from keras_varinit.diagnosis.suggestions import keras_code

    lines = [f"keras-varinit doctor: {probe.title}",
             f"  at init: {probe.verdict}",
             *(f"  note: {note}" for note in probe.notes),
             f"  probe: {probe.steps} step(s) in {probe.seconds:.1f} s, {probe.state}"
             + (f"; run files in {probe.run_dir}" if probe.run_dir else "")]
    if not probe.findings:
        lines.append("no findings: nothing the rules check for went wrong in the probe")
    for f in probe.findings:
        layers = ", ".join(f.layers[:3]) + (f", ... ({len(f.layers)} layers)"
                                            if len(f.layers) > 3 else "")
        lines.append(f"{f.severity.value.upper()} {f.kind.value} from step {f.step}"
                     + (f" at {layers}" if layers else ""))
        lines.append(f"  {f.message}")
        lines.append(f"  evidence: {_evidence(f.evidence)}")
        changes = f.suggestion.changes
        if changes and user_model:
            lines += [f"  fix in your model's code: {code}" for code in keras_code(changes)]
        elif changes:
            lines.append(f"  fix: {change_options(changes, schema)}")
        lines.append(f"  why: {f.suggestion.text}")
    return lines


def exit_code(findings):
    """1 when a finding is severe, else 0."""
    return 1 if any(f.severity.value == "severe" for f in findings) else 0


def run(args):
    _check_bounds(args)
    spec = user_model_spec(args)
    config = config_from_args(args, args.schema)
    if spec is not None:
        config = dataclasses.replace(config, model=args.schema().model)
    config.validate()
    with tempfile.TemporaryDirectory(prefix="keras_varinit-doctor-") as tmp:
        log_dir = pathlib.Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        if spec is None:
            probe = probe_builtin(config, args.steps, args.time_limit, log_dir, args.quiet)
        else:
            probe = probe_user_model(spec, config, args.steps, args.time_limit, log_dir,
                                     args.quiet)
        if args.log_dir is None:
            probe.run_dir = None
    if args.json:
        for finding in probe.findings:
            print(json.dumps(finding.to_dict()))
    else:
        print("\n".join(report_lines(probe, args.schema, spec is not None)))
    return exit_code(probe.findings)
