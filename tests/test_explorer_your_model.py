"""explorer.your_model.UploadStore: uploads checked as a run loads them, stored under a
generated name, kept once, refused with the user's file name in the message."""
import pytest

from explorer.your_model import UploadError, UploadStore, file_size
from tests.test_training_user_model import two_conv


def test_upload_is_stored_once_under_its_digest_whatever_its_name(tmp_path, monkeypatch):
    data = open(two_conv(tmp_path / "net.keras"), "rb").read()
    store = UploadStore(tmp_path / "runs")
    first = store.add("../../etc/evil name.keras", data)
    assert first.path.parent == tmp_path / "runs" / "uploads"
    assert first.path.name != "evil name.keras" and len(first.path.stem) == 16
    assert first.name == "../../etc/evil name.keras" and "evil name.keras" in first.label
    # a model of 25 KB was listed as "0.0 MB"
    assert f"({len(data) // 1000} KB," in first.label or f"({len(data) // 1000 + 1} KB," \
        in first.label
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


def test_file_sizes_read_as_a_person_reads_them():
    assert [file_size(n) for n in (0, 999, 25_300, 999_000, 1_300_000, 250_000_000)] == \
        ["0 B", "999 B", "25 KB", "999 KB", "1.3 MB", "250.0 MB"]
