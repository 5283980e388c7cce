"""explorer.your_model.UploadStore: uploads checked as a run loads them, stored under a
generated name, kept once, refused with the user's file name in the message."""
import pytest

from explorer.your_model import UploadError, UploadStore
from tests.test_training_user_model import two_conv


def test_upload_is_stored_once_under_its_digest_whatever_its_name(tmp_path, monkeypatch):
    data = open(two_conv(tmp_path / "net.keras"), "rb").read()
    store = UploadStore(tmp_path / "runs")
    first = store.add("../../etc/evil name.keras", data)
    assert first.path.parent == tmp_path / "runs" / "uploads"
    assert first.path.name != "evil name.keras" and len(first.path.stem) == 16
    assert first.name == "../../etc/evil name.keras" and "evil name.keras" in first.label
    again = store.add("copy.keras", data)            # same bytes: the same stored model
    assert again.path == first.path and [m.path for m in store.models()] == [first.path]
    assert sorted(p.name for p in first.path.parent.iterdir()) == \
        sorted([first.path.name, first.path.stem + ".json"])   # no leftover incoming file
    monkeypatch.setenv("KERAS_VARINIT_MAX_UPLOAD_MB", "1")
    with pytest.raises(UploadError, match=r"'big.keras' is 2.0 MB, over the upload limit"):
        store.add("big.keras", bytes(2_000_000))
    monkeypatch.setenv("KERAS_VARINIT_MAX_UPLOAD_MB", "lots")
    with pytest.raises(ValueError, match=r"Received: 'lots'. Allowed: a positive integer"):
        store.add("net.keras", data)


def test_refused_upload_names_the_users_file_and_leaves_nothing(tmp_path):
    store = UploadStore(tmp_path / "runs")
    with pytest.raises(UploadError, match=r"'holiday.keras' is not a Keras model archive: it "
                                          r"is a PNG image"):
        store.add("holiday.keras", b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert store.models() == [] and list((tmp_path / "runs" / "uploads").iterdir()) == []
