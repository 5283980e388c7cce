"""The "At initialization" computation: build the network the page describes, push one batch
through it, and return the per-layer variance profile, a plain-language verdict and the
activations of a few layers for histograms. Plain Python (Keras, no Streamlit). The network is
what a run trains (``training.model.build_model``): a built-in net, or the user's model (a
stored upload, loaded in safe mode, or a ``keras.applications`` architecture), profiled on
CIFAR-10 or the synthetic set; only the built-in nets have activation layers for histograms.

The page caches :func:`compute_profile` by settings (``st.cache_data``); the probe batch is
loaded once per process (:func:`probe_batch`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from explorer import presets

# Images pushed through the network: 32 CNN images give 32x32x32 samples per channel at the first
# stage, plenty for a variance, and keep a 30-layer profile near a second on 2 CPU cores.
PROBE_IMAGES = {"cnn": 32, "mlp": 128}
HIST_SAMPLE = 20_000  # activation values kept per layer for histograms


@dataclass
class DataInfo:
    """Whether real CIFAR-10 can be had without a download, and what the page should say."""

    source: str            # "dir" | "tfds" | "keras" | "synthetic" | "unavailable"
    available: bool        # real CIFAR-10 without a network download
    message: str


def data_info() -> DataInfo:
    """What ``load_cifar10("auto")`` would use, without loading (and without downloading)."""
    import os

    from keras_varinit import datasets

    try:
        source = datasets.resolve_source("auto")
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        return DataInfo("unavailable", False, str(error))
    if source == "dir":
        path = os.environ.get(datasets.ENV_PATH)
        if path and not os.path.exists(os.path.expanduser(path)):
            return DataInfo("unavailable", False,
                            f"$KERAS_VARINIT_CIFAR10 points to {path!r}, which does not exist.")
        return DataInfo("dir", True, f"CIFAR-10 from {path or 'the decoded cache'}")
    if source == "tfds":
        return DataInfo("tfds", True, "CIFAR-10 from TensorFlow Datasets")
    if source == "keras":
        cached = datasets.keras_cached()
        if cached is not None:
            return DataInfo("keras", True, f"CIFAR-10 from the Keras cache ({cached})")
        return DataInfo(
            "unavailable", False,
            "Real CIFAR-10 is not available offline: $KERAS_VARINIT_CIFAR10 is not set and "
            "nothing is cached (Keras, TFDS or the decoded cache). Training with data 'auto' "
            "would try to download it (about 170 MB). Set KERAS_VARINIT_CIFAR10 to a "
            "cifar10-jpeg.tar.gz or go online once, or use the synthetic CIFAR-shaped set.")
    return DataInfo(source, source != "synthetic", source)


@functools.lru_cache(maxsize=4)
def probe_batch(data: str, n: int = 128, seed: int = 0, input_normalization: str = "pooled"):
    """A batch of ``n`` training images and labels as training feeds them, and whether it is
    synthetic.

    ``data="auto"`` uses real CIFAR-10 when it is available without a download, else the
    synthetic set (the page says so). With ``input_normalization="pooled"`` the images are
    normalized per channel with the batch's pooled mean and standard deviation, as training
    normalizes with the subset's; with "none" they are the raw pixels in [0, 255].
    """
    from keras_varinit import datasets

    synthetic = data == "synthetic" or not data_info().available
    if synthetic:
        (x, y), _ = datasets.synthetic_cifar10(n, 0, seed=seed)
    else:
        (x, y), _ = datasets.load_cifar10("auto", progress=False)
        rng = np.random.default_rng(seed)
        index = np.sort(rng.permutation(len(x))[:n])
        x, y = x[index], y[index]
    x = x.astype("float32")
    if input_normalization == "none":
        return x, np.asarray(y).reshape(-1).astype("int32"), synthetic
    mean = x.mean(axis=(0, 1, 2), keepdims=True)
    std = x.std(axis=(0, 1, 2), keepdims=True)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    return x.astype("float32"), np.asarray(y).reshape(-1).astype("int32"), synthetic


@dataclass
class Profile:
    table: pd.DataFrame
    verdict: object   # keras_varinit.profile_report.Verdict (.level, .text)
    activations: dict = field(default_factory=dict)   # layer name -> activation sample
    layer_names: list = field(default_factory=list)   # every activation layer, in order
    synthetic: bool = False
    seconds: float = 0.0
    lsuv_report: object = None
    notes: tuple = ()                 # instrument.CoverageWarning texts: layers left out
    explanation: str | None = None   # profile_report.explain_drift: why it misses the recursion
    context: object = None   # keras_varinit.diagnosis.Context read from the model (init_findings)


def build_model(settings: dict, input_shape=(32, 32, 3)):
    """The network of these settings at initialization (exactly what training builds)."""
    from keras_varinit.training.model import build_model as build

    return build(presets.to_config(settings), tuple(input_shape))


def init_findings(table: pd.DataFrame, settings: dict, context=None) -> list:
    """The diagnosis of the init profile (``keras_varinit.diagnosis.diagnose`` on the profile
    alone): vanishing or exploding signal, unnormalized input, a batch too small for batch
    normalization; what the trainer's DiagnosisLogger reports at step 0. ``context``: what the
    profile read from the model (``Profile.context``: its classes, batch normalization layers,
    hidden activation, first-layer input), with the page's batch size and learning rate.
    Cheap: the page calls it on every render."""
    from keras_varinit.diagnosis import Context, diagnose

    config = presets.to_config(settings)
    context = dataclasses.replace(context or Context(), batch_size=config.batch_size,
                                  lr=config.lr)
    return diagnose(profile=table, context=context)


def histogram_layers(depth: int) -> list[int]:
    """Default layers for histograms: first, one in the middle, last hidden (1-based)."""
    hidden = max(1, depth - 1)
    picks = sorted({1, max(1, (hidden + 1) // 2), hidden})
    return picks


def compute_profile(settings: dict, hist_layers=None, n_images: int | None = None) -> Profile:
    """Variance profile, verdict and activation samples for ``settings`` (see module doc)."""
    import keras

    from keras_varinit import diagnostics, instrument, profile_report
    from keras_varinit.diagnosis_logger import model_context

    problems = presets.blocking_problems(settings)
    if problems:
        raise ValueError(problems[0].text)
    start = time.perf_counter()
    n_images = n_images or PROBE_IMAGES.get(settings.get("model"), 32)
    x, y, synthetic = probe_batch(settings.get("data", "auto"), n_images,
                                  input_normalization=settings.get("input_normalization",
                                                                   "pooled"))
    keras.utils.set_random_seed(int(settings.get("seed", 0)))
    model = build_model(settings, x.shape[1:])   # an MLP flattens the images itself
    x_in = x
    with instrument.coverage_notes() as notes:
        report = None
        if settings.get("init") == "lsuv":
            from keras_varinit import initializers

            report = initializers.lsuv(model, x_in)
        table = diagnostics.variance_profile(model, x_in, y)
    verdict = profile_report.summarize_profile(table)
    explanation = profile_report.explain_drift(table)
    context = model_context(model, x_in)

    act_layers = [layer for layer in model.layers if layer.name.startswith("act_")]
    names = [layer.name for layer in act_layers]
    if hist_layers == "all":
        chosen = act_layers
    else:
        wanted = hist_layers or histogram_layers(int(settings.get("depth", 2)))
        chosen = [act_layers[i - 1] for i in wanted if 1 <= i <= len(act_layers)]
    activations = {}
    if chosen:
        probe = keras.Model(model.inputs, [layer.output for layer in chosen])
        outputs = probe([x_in[:32]], training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        rng = np.random.default_rng(0)
        for layer, out in zip(chosen, outputs):
            values = np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32).ravel()
            if values.size > HIST_SAMPLE:
                values = values[rng.choice(values.size, HIST_SAMPLE, replace=False)]
            activations[layer.name] = values
    return Profile(table=table, verdict=verdict, activations=activations, layer_names=names,
                   synthetic=synthetic, seconds=time.perf_counter() - start,
                   lsuv_report=report, explanation=explanation, context=context,
                   notes=tuple(notes))


def signal_summary(table: pd.DataFrame) -> dict:
    """Measured variance ratios across the hidden layers (the output layer is left out, as
    in the verdict: ``profile_report.last_hidden_row``).

    ``forward``: Var[y] of the last layer over the first of the rows the verdict compares
    (``profile_report.compared_rows``: within a stretch between normalization layers), at
    1-based layers ``forward_layers``; absent where it compares none (a single hidden layer,
    or every hidden layer renormalized). ``backward``: Var[dL/dy] at the first layer / at the
    last hidden layer (absent with a single hidden layer); ``hidden_layers``: how many layers
    that spans.
    """
    from keras_varinit.profile_report import compared_rows, last_hidden_row

    last = last_hidden_row(len(table))
    out = {"hidden_layers": last + 1}
    i, j = compared_rows(table) if "forward_var" in table else (0, 0)
    pairs = {"forward": ("forward_var", j, i), "backward": ("backward_var", 0, last)}
    for direction, (column, top, bottom) in pairs.items():
        if column not in table or top == bottom:
            continue
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        num, den = values[top], values[bottom]
        if math.isfinite(num) and math.isfinite(den) and den > 0:
            out[direction] = num / den
        else:
            out[direction] = float("nan")
    if "forward" in out:
        out["forward_layers"] = (i + 1, j + 1)
    return out
