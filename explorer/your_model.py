"""The explorer's "Your model": uploaded ``.keras`` files, checked and stored under the runs
directory. Plain Python (no Streamlit).

An upload is untrusted input. :meth:`UploadStore.add` refuses a file over the size limit
(``$KERAS_VARINIT_MAX_UPLOAD_MB``, default 200 MB, also given to ``st.file_uploader``), then
writes it under a generated name, ``<runs>/uploads/<sha256 prefix>.keras`` (nothing of the
user's file name reaches a path), and keeps it only if a run could train it: a Keras archive
without Lambda layers, loaded in safe mode, taking CIFAR-10 images and giving 10 outputs
(``keras_varinit.training.model.user_model``, the trainer's own check). Anything else is an
:class:`UploadError` whose message names the file as the user called it. A sidecar
``<sha256 prefix>.json`` keeps that name for the page, so stored models can be picked again
after an explorer restart.

The explorer never imports a ``module:function`` factory (``FACTORIES_NOTE``): that path runs the
user's own Python code, which is the CLI's business, not a web page's.

>>> store = UploadStore("runs")
>>> stored = store.add("my_net.keras", data)       # UploadError with a clear message
>>> stored.path                                    # runs/uploads/3fa9c2e1b0d45a77.keras
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib

UPLOADS_DIR = "uploads"
ENV_MAX_UPLOAD_MB = "KERAS_VARINIT_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 200
DIGEST_CHARS = 16
UPLOAD_ALLOWED = ("Allowed: a .keras file saved with model.save(\"net.keras\") (Keras 3), "
                  "taking 32x32x3 images and giving 10 outputs.")
FACTORIES_NOTE = (
    "Python factories (`module:function`) are CLI-only: `keras-varinit profile --model "
    "my_project.nets:build` and `keras-varinit train --model file --model-file net.keras`. "
    "The explorer never imports them: a factory is your own code run in the server's process, "
    "and a web page must not run code it is sent. Save the model with `model.save(\"net.keras\")` "
    "and upload the file instead.")


class UploadError(ValueError):
    """An upload that is not stored; the message says why and what works."""


def max_upload_mb() -> int:
    """The upload limit in MB: ``$KERAS_VARINIT_MAX_UPLOAD_MB`` (a positive integer) or 200."""
    raw = os.environ.get(ENV_MAX_UPLOAD_MB, "").strip()
    if not raw:
        return DEFAULT_MAX_UPLOAD_MB
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"Invalid ${ENV_MAX_UPLOAD_MB}. Received: {raw!r}. Allowed: a "
                         "positive integer (megabytes).")
    return int(raw)


@dataclasses.dataclass(frozen=True)
class StoredModel:
    """An accepted upload: its stored ``path`` and what the user called it."""

    path: pathlib.Path
    name: str
    size: int
    uploaded_at: str

    @property
    def label(self) -> str:
        return f"{self.name} ({file_size(self.size)}, {self.path.stem[:8]}, " \
               f"{self.uploaded_at[:16].replace('T', ' ')} UTC)"


def file_size(n_bytes: int) -> str:
    """"25 KB", "1.3 MB": a stored model's size as a person reads it (decimal units).

    >>> file_size(25_000), file_size(1_300_000), file_size(300)
    ('25 KB', '1.3 MB', '300 B')
    """
    if n_bytes < 1e3:
        return f"{n_bytes} B"
    if n_bytes < 1e6:
        return f"{n_bytes / 1e3:.0f} KB"
    return f"{n_bytes / 1e6:.1f} MB"


class UploadStore:
    """The uploaded models of one runs directory (``<runs>/uploads``)."""

    def __init__(self, runs_root):
        self.root = pathlib.Path(runs_root) / UPLOADS_DIR

    def models(self) -> list[StoredModel]:
        """Every stored model, newest first."""
        if not self.root.is_dir():
            return []
        found = [self._stored(path) for path in self.root.glob("*.keras")
                 if not path.name.startswith(".")]
        return sorted(found, key=lambda m: m.uploaded_at, reverse=True)

    def add(self, filename: str, data: bytes) -> StoredModel:
        """Check ``data`` (an uploaded file called ``filename``) and store it; see the module
        doc. The same bytes uploaded twice are stored once."""
        limit = max_upload_mb()
        if len(data) > limit * 1_000_000:
            raise UploadError(f"{filename!r} is {len(data) / 1e6:.1f} MB, over the upload "
                              f"limit. Allowed: a .keras file of at most {limit} MB "
                              f"(${ENV_MAX_UPLOAD_MB}).")
        digest = hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]
        target = self.root / f"{digest}.keras"
        if target.exists():   # the same bytes again: shown under the name given last
            meta = _read_meta(target)
            _write_meta(target, {**meta, "name": filename, "size": len(data)})
            return self._stored(target)
        self.root.mkdir(parents=True, exist_ok=True)
        incoming = self.root / f".incoming-{digest}.keras"
        incoming.write_bytes(data)
        try:
            _check_trainable(incoming)
        except BaseException as error:
            incoming.unlink(missing_ok=True)
            if isinstance(error, ValueError):
                raise UploadError(_upload_message(error, incoming, filename)) from None
            raise
        os.replace(incoming, target)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        _write_meta(target, {"name": filename, "size": len(data), "uploaded_at": now})
        return self._stored(target)

    def remove(self, path) -> None:
        """Delete a stored model and its sidecar (a path outside the store is refused)."""
        path = pathlib.Path(path)
        if path.resolve().parent != self.root.resolve() or path.suffix != ".keras":
            raise ValueError(f"Not a model of this store. Received: {str(path)!r}")
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)

    def _stored(self, path: pathlib.Path) -> StoredModel:
        meta = _read_meta(path)
        stat = path.stat()
        when = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc)
        return StoredModel(path=path, name=str(meta.get("name") or path.name),
                           size=int(meta.get("size") or stat.st_size),
                           uploaded_at=str(meta.get("uploaded_at") or
                                           when.isoformat(timespec="seconds")))


def _upload_message(error: ValueError, stored: pathlib.Path, filename: str) -> str:
    """The refusal as the page says it: the user's file name for the stored path, and what an
    upload may be (``UPLOAD_ALLOWED``) where the loader's own would offer a factory."""
    from keras_varinit.user_models import ModelLoadError

    if isinstance(error, ModelLoadError):
        text = f"{error.reason} {UPLOAD_ALLOWED if error.generic else error.allowed}"
    else:
        text = str(error)
    text = text.replace(str(stored), repr(filename))
    return text if repr(filename) in text else f"{filename!r}: {text}"


def _read_meta(path: pathlib.Path) -> dict:
    """The sidecar ``<hash>.json`` of a stored model ({} when missing or unreadable)."""
    try:
        meta = json.loads(pathlib.Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _write_meta(path: pathlib.Path, meta: dict):
    pathlib.Path(path).with_suffix(".json").write_text(json.dumps(meta))


def display_name(model_file) -> str:
    """How the page names a stored model: the file name the user uploaded it under (its
    sidecar), else the stored file's own name."""
    path = pathlib.Path(str(model_file))
    return str(_read_meta(path).get("name") or path.name)


def _check_trainable(path: pathlib.Path):
    """ValueError unless a run could train the ``.keras`` file at ``path`` (the trainer's
    own checks: ``TrainConfig`` validation, then ``training.model.user_model``)."""
    from keras_varinit.training.config import TrainConfig
    from keras_varinit.training.model import user_model
    from keras_varinit.user_models import CIFAR10_INPUT_SHAPE

    config = TrainConfig(model="file", model_file=str(path)).validate()
    user_model(config, CIFAR10_INPUT_SHAPE)
