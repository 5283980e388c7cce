"""CIFAR-10 loading (TFDS, Keras, a JPEG folder/archive, or synthetic) and a synthetic stand-in.

Every loader returns the same thing::

    (x_train, y_train), (x_test, y_test) = load_cifar10()
    # x_*: uint8, shape (N, 32, 32, 3) (NHWC, channels last), values 0..255
    # y_*: int64, shape (N,), labels 0..9 in the standard CIFAR-10 order (CLASS_NAMES)

Sources (``source=``):

* ``"tfds"``: ``tensorflow_datasets.load("cifar10", data_dir=data_dir)`` (imported lazily).
* ``"keras"``: ``keras.datasets.cifar10.load_data()`` (downloads into the Keras cache if needed).
* ``"dir"``: a directory or ``.tar`` / ``.tar.gz`` archive laid out as
  ``<split>/<class>/<image file>`` with splits ``train`` and ``test`` and the ten class names
  (e.g. ``data/cifar10-jpeg.tar.gz``). Decoded once with Pillow (with a rich
  progress bar) and cached as an ``.npz`` under the cache dir (see :func:`cache_dir`), keyed by
  the archive's resolved path, size and modification time; later loads read the cache (well
  under 2 s). Decoding is single-process (measured: a 2-process pool gave no gain on 2 shared
  cores, and spawn re-imports the caller's main module). Images are returned in a fixed,
  shuffled order (seed 0), not sorted by class. RGB is forced (grayscale files are converted).
* ``"synthetic"``: :func:`synthetic_cifar10` -- learnable, CIFAR-shaped, **not CIFAR-10**.
* ``"auto"`` (default): the path in ``$KERAS_VARINIT_CIFAR10`` if set (as ``"dir"``); else
  whatever is cached already (a full decode in our cache dir, a prepared TFDS ``cifar10``, the
  Keras ``cifar-10-batches-py`` folder); else a download through ``keras.datasets``. Offline with
  nothing cached it raises :class:`DatasetUnavailableError` naming the places it looked and
  how to fix it. ``"auto"`` never falls back to synthetic data silently.

Knowing what you got: ``resolve_source(source, path)`` returns the concrete source that
``load_cifar10(source, path)`` will use (``"dir"``, ``"tfds"``, ``"keras"`` or ``"synthetic"``)
without loading anything; callers that display data (CLI, explorer, run configs) call it and
say "synthetic" when it is ``"synthetic"``. ``is_synthetic(source, path)`` is the short form.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import pathlib
import tarfile
import zlib

import numpy as np

from keras_varinit.checks import check_choice

__all__ = [
    "CLASS_NAMES",
    "DatasetUnavailableError",
    "cache_dir",
    "is_synthetic",
    "keras_cached",
    "load_cifar10",
    "resolve_source",
    "synthetic_cifar10",
]

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
SOURCES = ("auto", "tfds", "keras", "dir", "synthetic")
ENV_PATH = "KERAS_VARINIT_CIFAR10"
ENV_CACHE = "KERAS_VARINIT_CACHE_DIR"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
_CACHE_VERSION = 1
_ORDER_SEED = 0
_N_TRAIN, _N_TEST = 50000, 10000


class DatasetUnavailableError(RuntimeError):
    """No CIFAR-10 copy could be found or downloaded (see the message for what to do)."""


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------
def _keras_home() -> pathlib.Path:
    # Same rule as Keras's own backend config, without importing keras.
    if "KERAS_HOME" in os.environ:
        return pathlib.Path(os.environ["KERAS_HOME"]).expanduser()
    base = os.path.expanduser("~")
    if not os.access(base, os.W_OK):
        base = "/tmp"
    return pathlib.Path(base) / ".keras"


def cache_dir() -> pathlib.Path:
    """Where decoded archives are cached: ``$KERAS_VARINIT_CACHE_DIR`` if set, else
    ``$KERAS_HOME/datasets/keras_varinit`` (``~/.keras/datasets/keras_varinit`` by default)."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return pathlib.Path(env).expanduser()
    return _keras_home() / "datasets" / "keras_varinit"


def _keras_cifar_dirs() -> list[pathlib.Path]:
    base = _keras_home() / "datasets"
    # Keras >= 3.5 extracts into "cifar-10-batches-py-target/"; older versions directly.
    return [base / "cifar-10-batches-py-target" / "cifar-10-batches-py",
            base / "cifar-10-batches-py"]


def _tfds_data_dir(data_dir=None) -> pathlib.Path:
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get("TFDS_DATA_DIR")
    return pathlib.Path(env or "~/tensorflow_datasets").expanduser()


def _tfds_prepared(data_dir=None) -> bool:
    # A prepared TFDS dataset has <data_dir>/cifar10/<version>/dataset_info.json.
    # Checked on the file system: importing tensorflow_datasets takes seconds.
    root = _tfds_data_dir(data_dir) / "cifar10"
    return bool(glob.glob(str(root / "*" / "dataset_info.json")))


def keras_cached() -> pathlib.Path | None:
    """The Keras cache folder holding CIFAR-10 (``cifar-10-batches-py``), or None."""
    for d in _keras_cifar_dirs():
        if (d / "data_batch_1").exists() and (d / "test_batch").exists():
            return d
    return None


def _full_caches() -> list[pathlib.Path]:
    """Our cached full decodes (50,000 + 10,000 images), newest first."""
    found = []
    for f in sorted(cache_dir().glob("cifar10-*.npz"), key=lambda p: p.stat().st_mtime,
                    reverse=True):
        meta = _read_meta(f)
        if meta and meta.get("n_train") == _N_TRAIN and meta.get("n_test") == _N_TEST:
            found.append(f)
    return found


# --------------------------------------------------------------------------------------------
# Source resolution
# --------------------------------------------------------------------------------------------
def _check_source(source):
    check_choice("source", source, SOURCES)


def resolve_source(source: str = "auto", path=None, data_dir=None) -> str:
    """The concrete source ``load_cifar10(source, path)`` will use, without loading anything.

    Returns ``"dir"``, ``"tfds"``, ``"keras"`` or ``"synthetic"``. For ``"auto"``:
    ``path`` or ``$KERAS_VARINIT_CIFAR10`` -> ``"dir"``; a cached full decode -> ``"dir"``;
    a prepared TFDS copy -> ``"tfds"``; otherwise ``"keras"`` (cached or to be downloaded).

    Example::

        if kv.datasets.resolve_source() == "synthetic": print("SYNTHETIC data")
    """
    _check_source(source)
    if source != "auto":
        return source
    if path is not None or os.environ.get(ENV_PATH):
        return "dir"
    if _full_caches():
        return "dir"
    if _tfds_prepared(data_dir):
        return "tfds"
    return "keras"


def is_synthetic(source: str = "auto", path=None) -> bool:
    """True when ``load_cifar10(source, path)`` returns synthetic data (never for ``"auto"``)."""
    return resolve_source(source, path) == "synthetic"


# --------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------
def load_cifar10(source: str = "auto", path=None, *, data_dir=None, cache: bool = True,
                 progress: bool = True,
                 synthetic_size: tuple[int, int] = (_N_TRAIN, _N_TEST), seed: int = 0):
    """Load CIFAR-10 as ``((x_train, y_train), (x_test, y_test))``.

    ``x``: uint8 ``(N, 32, 32, 3)`` channels last; ``y``: int64 ``(N,)`` in the order of
    :data:`CLASS_NAMES`. See the module docstring for the sources.

    Args:
        source: ``"auto"`` | ``"tfds"`` | ``"keras"`` | ``"dir"`` | ``"synthetic"``.
        path: for ``"dir"`` (and ``"auto"``): a directory or ``.tar``/``.tar.gz`` archive in
            ``<split>/<class>/<file>`` layout. Defaults to ``$KERAS_VARINIT_CIFAR10``.
        data_dir: TFDS data directory for ``"tfds"``.
        cache: read and write the decoded ``.npz`` cache for ``"dir"``.
        progress: show a rich progress bar while decoding.
        synthetic_size: ``(n_train, n_test)`` for ``"synthetic"``.
        seed: seed for ``"synthetic"``.

    Example::

        (x, y), (xt, yt) = load_cifar10("dir", "data/cifar10-jpeg.tar.gz")
        x.shape, x.dtype, y.dtype  # (50000, 32, 32, 3), uint8, int64
    """
    _check_source(source)
    if source == "synthetic":
        return synthetic_cifar10(*synthetic_size, seed=seed)
    if source == "dir":
        path = path if path is not None else os.environ.get(ENV_PATH)
        if not path:
            raise ValueError("source='dir' needs a path (a directory or .tar/.tar.gz in "
                             "<split>/<class>/<file> layout) or $KERAS_VARINIT_CIFAR10. "
                             "Received: path=None")
        return _load_dir(path, cache=cache, progress=progress)
    if source == "tfds":
        return _load_tfds(data_dir)
    if source == "keras":
        try:
            return _load_keras()
        except Exception as error:
            if keras_cached() is not None:
                raise
            raise DatasetUnavailableError(
                f"keras.datasets.cifar10 could not download CIFAR-10 ({type(error).__name__}: "
                f"{error}) and {' / '.join(str(d) for d in _keras_cifar_dirs())} is absent. "
                f"Go online once, or use source='dir' with {ENV_PATH} or path=, or "
                "source='synthetic' (not CIFAR-10).") from error
    return _load_auto(path, data_dir, cache=cache, progress=progress)


def _load_auto(path, data_dir, *, cache, progress):
    tried = []
    explicit = path if path is not None else os.environ.get(ENV_PATH)
    if explicit:
        if not pathlib.Path(explicit).expanduser().exists():
            raise FileNotFoundError(
                f"CIFAR-10 path does not exist: {explicit!r} "
                f"({'path argument' if path is not None else '$' + ENV_PATH}). Set "
                f"{ENV_PATH} to a directory or .tar.gz in <split>/<class>/<file> layout.")
        return _load_dir(explicit, cache=cache, progress=progress)
    tried.append(f"${ENV_PATH} (not set)")

    caches = _full_caches()
    if caches:
        return _read_cache(caches[0])
    tried.append(f"decoded cache {cache_dir()}/cifar10-*.npz (none)")

    if _tfds_prepared(data_dir):
        return _load_tfds(data_dir)
    tried.append(f"TFDS {_tfds_data_dir(data_dir) / 'cifar10'} (not prepared)")

    if keras_cached() is not None:
        return _load_keras()
    tried.append("Keras cache " + " or ".join(str(d) for d in _keras_cifar_dirs())
                 + " (absent)")
    try:
        return _load_keras()
    except Exception as error:  # network errors come in many types
        tried.append(f"download via keras.datasets.cifar10 (failed: "
                     f"{type(error).__name__}: {error})")
        raise DatasetUnavailableError(
            "CIFAR-10 is not available. Looked in:\n  - " + "\n  - ".join(tried)
            + f"\nFix: set {ENV_PATH}=/path/to/cifar10-jpeg.tar.gz (or a <split>/<class>/<file> "
            "directory), or go online once so keras.datasets can download it, or use "
            "source='synthetic' (a synthetic stand-in, not CIFAR-10).") from error


def _load_keras():
    import keras

    (x, y), (xt, yt) = keras.datasets.cifar10.load_data()
    if x.shape[1] == 3:  # image_data_format() == "channels_first"
        x, xt = x.transpose(0, 2, 3, 1), xt.transpose(0, 2, 3, 1)
    return ((np.ascontiguousarray(x, np.uint8), y.reshape(-1).astype(np.int64)),
            (np.ascontiguousarray(xt, np.uint8), yt.reshape(-1).astype(np.int64)))


def _load_tfds(data_dir=None):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise RuntimeError("source='tfds' needs tensorflow-datasets: "
                           "pip install 'keras_varinit[datasets]'") from error
    kwargs = {"data_dir": str(data_dir)} if data_dir is not None else {}
    builder = tfds.builder("cifar10", **kwargs)
    names = tuple(builder.info.features["label"].names)
    if names != CLASS_NAMES:
        raise ValueError(f"TFDS cifar10 class names {names} differ from {CLASS_NAMES}")
    out = []
    for split in SPLITS:
        x, y = tfds.as_numpy(tfds.load("cifar10", split=split, batch_size=-1,
                                       as_supervised=True, **kwargs))
        out.append((np.ascontiguousarray(x, np.uint8), np.asarray(y).astype(np.int64)))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# "dir": folder or tar archive of image files
# --------------------------------------------------------------------------------------------
def _fingerprint(path: pathlib.Path) -> dict:
    if path.is_dir():
        n, size, mtime = 0, 0, 0
        for root, _, files in os.walk(path):
            for f in files:
                st = os.stat(os.path.join(root, f))
                n, size, mtime = n + 1, size + st.st_size, max(mtime, st.st_mtime_ns)
        return {"path": str(path), "kind": "dir", "files": n, "size": size, "mtime_ns": mtime}
    st = path.stat()
    return {"path": str(path), "kind": "archive", "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_file(fp: dict) -> pathlib.Path:
    key = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    stem = pathlib.Path(fp["path"]).name.split(".")[0] or "data"
    return cache_dir() / f"cifar10-{stem}-{key}.npz"


def _read_meta(file: pathlib.Path) -> dict | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
    except Exception:
        return None
    return meta if meta.get("version") == _CACHE_VERSION else None


def _read_cache(file: pathlib.Path):
    with np.load(file, allow_pickle=False) as z:
        return ((z["x_train"], z["y_train"]), (z["x_test"], z["y_test"]))


def _write_cache(file: pathlib.Path, data, fp: dict):
    (x, y), (xt, yt) = data
    meta = dict(fp, version=_CACHE_VERSION, n_train=len(x), n_test=len(xt))
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, x_train=x, y_train=y, x_test=xt, y_test=yt, meta=np.array(json.dumps(meta)))
        os.replace(tmp, file)
    except OSError as error:  # a read-only cache must not break loading
        import warnings

        warnings.warn(f"Could not write CIFAR-10 cache {file}: {error}", stacklevel=3)


def _load_dir(path, *, cache=True, progress=True):
    path = pathlib.Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 path does not exist: {str(path)!r}")
    fp = _fingerprint(path)
    file = _cache_file(fp)
    if cache and file.exists() and _read_meta(file) is not None:
        return _read_cache(file)
    data = _decode_layout(path, progress=progress)
    if cache:
        _write_cache(file, data, fp)
    return data


def _classify(parts, unknown):
    """(split, label, file name) for an image file at <...>/<split>/<class>/<file>, else None;
    unknown class folders are collected in ``unknown``."""
    if len(parts) < 3:
        return None
    split, cls, name = parts[-3], parts[-2], parts[-1]
    if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
        return None
    if split not in SPLITS:
        return None
    if cls not in CLASS_NAMES:
        unknown.add(f"{split}/{cls}")
        return None
    return split, CLASS_NAMES.index(cls), name


def _iter_files(path: pathlib.Path):
    """Yield (relative path parts, display name, reader) for every regular file; reader() ->
    bytes, to be called before the next item (tar archives are read as a stream)."""
    if path.is_dir():
        for root, _, files in os.walk(path):
            for f in files:
                full = os.path.join(root, f)
                rel = os.path.relpath(full, path).split(os.sep)
                yield rel, full, (lambda full=full: pathlib.Path(full).read_bytes())
        return
    try:
        archive = tarfile.open(path, "r|*")
    except tarfile.TarError as error:
        raise ValueError(f"Not a directory or readable .tar/.tar.gz archive: {str(path)!r} "
                         f"({error})") from error
    with archive:
        members = iter(archive)
        while True:
            try:
                member = next(members)
            except StopIteration:
                return
            except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
                raise ValueError(f"Truncated or corrupt archive {str(path)!r}: "
                                 f"{type(error).__name__}: {error}") from error
            if not member.isfile():
                continue
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            yield parts, f"{path}:{member.name}", (
                lambda m=member: _read_member(archive, m, path))


def _read_member(archive, member, path):
    try:
        return archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(f"Truncated or corrupt archive {str(path)!r} at {member.name}: "
                         f"{type(error).__name__}: {error}") from error


def _decode_image(name, blob):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as error:
        raise ValueError(f"Corrupt or unreadable image file {name}: "
                         f"{type(error).__name__}: {error}") from None


def _decode_layout(path: pathlib.Path, *, progress=True):
    entries = {s: [] for s in SPLITS}  # split -> [(label, name, display name, bytes)]
    unknown, top = set(), set()
    for parts, display, read in _iter_files(path):
        if len(parts) >= 3:
            top.add(parts[-3])
        hit = _classify(parts, unknown)
        if hit is None:
            continue
        split, label, name = hit
        entries[split].append((label, name, display, read()))
    if unknown:
        raise ValueError(f"Unknown class folder(s) in {str(path)!r}: {sorted(unknown)}. "
                         f"Allowed class names: {list(CLASS_NAMES)}")
    for split in SPLITS:
        if not entries[split]:
            found = sorted(top) or "no <split>/<class>/<file> entries at all"
            raise ValueError(
                f"{str(path)!r} has no {split!r} split with images: expected "
                f"<split>/<class>/<image> with splits {list(SPLITS)} and class folders "
                f"{list(CLASS_NAMES)}. Found split-level folders: {found}")
        present = {label for label, *_ in entries[split]}
        missing = [CLASS_NAMES[i] for i in range(10) if i not in present]
        if missing:
            raise ValueError(f"{str(path)!r}: split {split!r} lacks class folder(s) {missing}. "
                             f"Expected all of {list(CLASS_NAMES)}")

    total = sum(len(v) for v in entries.values())
    decoded, ref = {}, None
    with _progress_bar(progress, total, f"Decoding {path.name}") as advance:
        for split in SPLITS:
            items = sorted(entries[split], key=lambda e: (e[0], e[1]))
            entries[split] = None
            x = None
            for i, (_, _, display, blob) in enumerate(items):
                image = _decode_image(display, blob)
                if ref is None:
                    ref = (image.shape, display)
                elif image.shape != ref[0]:
                    raise ValueError(
                        f"Unequal image sizes: {ref[1]} is {ref[0][1]}x{ref[0][0]} but "
                        f"{display} is {image.shape[1]}x{image.shape[0]}. All images must "
                        "have the same size.")
                if x is None:
                    x = np.empty((len(items),) + image.shape, np.uint8)
                x[i] = image
                if i % 500 == 499:
                    advance(500)
            advance(len(items) % 500)
            y = np.array([e[0] for e in items], dtype=np.int64)
            order = np.random.default_rng(_ORDER_SEED).permutation(len(y))
            decoded[split] = (np.ascontiguousarray(x[order]), y[order])
    return decoded["train"], decoded["test"]
class _progress_bar:
    def __init__(self, enabled, total, label):
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn())
        self.progress.__enter__()
        task = self.progress.add_task(self.label, total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
        return False


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------
def synthetic_cifar10(n_train: int = 5000, n_test: int = 1000, seed: int = 0):
    """A SYNTHETIC, learnable stand-in for CIFAR-10 (same shapes and dtypes; not real images).

    Class ``c`` is a sinusoidal grating with a class-specific orientation and spatial frequency
    on a class-specific base colour, with per-image random phase, contrast, colour jitter and
    Gaussian pixel noise. A small CNN learns it well above chance within a few epochs; colour
    alone does not separate all classes. Returns ``((x_train, y_train), (x_test, y_test))``:
    uint8 ``(N, 32, 32, 3)`` and int64 ``(N,)``, balanced classes, deterministic for a ``seed``.
    Use it for offline demos and fast tests, and label anything that shows it "synthetic"
    (``resolve_source("synthetic") == "synthetic"``).

    Example::

        (x, y), (xt, yt) = synthetic_cifar10(2000, 500, seed=1)
    """
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be a non-negative int. Received: {name}={n!r}")
    rng = np.random.default_rng(seed)
    return _synthetic_split(int(n_train), rng), _synthetic_split(int(n_test), rng)


# Fixed per-class pattern parameters (independent of the seed: the task is the same task).
_BASE_COLOURS = np.array([
    [0.55, 0.65, 0.85], [0.80, 0.30, 0.30], [0.45, 0.60, 0.35], [0.60, 0.45, 0.35],
    [0.50, 0.55, 0.30], [0.65, 0.55, 0.45], [0.40, 0.55, 0.40], [0.60, 0.45, 0.30],
    [0.35, 0.50, 0.75], [0.70, 0.70, 0.70]], dtype=np.float32)
_ANGLES = np.deg2rad(np.array([0, 36, 72, 108, 144, 18, 54, 90, 126, 162], dtype=np.float32))
_FREQS = np.array([1.5, 2.5, 3.5, 4.5, 5.5, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=np.float32) / 32.0


def _synthetic_split(n, rng):
    y = np.arange(n, dtype=np.int64) % 10
    rng.shuffle(y)
    x = np.empty((n, 32, 32, 3), dtype=np.uint8)
    coords = np.arange(32, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    for start in range(0, n, 2048):
        lab = y[start:start + 2048]
        k = len(lab)
        angle = _ANGLES[lab] + rng.normal(0, 0.08, k).astype(np.float32)
        freq = _FREQS[lab] * rng.uniform(0.9, 1.1, k).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, k).astype(np.float32)
        proj = (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
        wave = np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
        contrast = rng.uniform(0.15, 0.3, (k, 1, 1, 1)).astype(np.float32)
        colour = _BASE_COLOURS[lab] + rng.normal(0, 0.08, (k, 3)).astype(np.float32)
        img = colour[:, None, None, :] + contrast * wave[..., None] * np.array(
            [1.0, 0.8, 0.6], np.float32)
        img += rng.normal(0, 0.08, img.shape).astype(np.float32)
        x[start:start + k] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return x, y
