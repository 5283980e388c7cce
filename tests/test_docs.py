"""The documentation stays inside the repository and matches the code: CONTRIBUTING.md's
architecture section and docs/architecture.md name every module that exists (and only those),
and say who writes each file of a run directory."""
import pathlib
import re


from keras_varinit import run_files as rf


REPO = pathlib.Path(__file__).resolve().parents[1]


def _modules():
    """Every module of the package and the explorer, as docs name them (``training/loop``)."""
    out = set()
    for root in ("keras_varinit", "explorer"):
        for path in (REPO / root).rglob("*.py"):
            if path.name in ("__init__.py", "__main__.py") or path.parent.name == "cli":
                continue
            out.add(str(path.relative_to(REPO / root).with_suffix("")))
    return out


def _section(text, title):
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:end if end > 0 else None]


def test_docs_never_point_outside_the_repository():
    paths = [REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").glob("*.md"),
             *(REPO / "keras_varinit").rglob("*.py"), *(REPO / "explorer").glob("*.py")]
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in paths
                 for n, line in enumerate(p.read_text().splitlines(), 1) if "shared/" in line]
    assert offenders == []


def test_contributing_architecture_names_every_module():
    section = _section((REPO / "CONTRIBUTING.md").read_text(), "## Architecture")
    named = set(re.findall(r"`([a-z_]+)`", section))
    for module in _modules():
        assert module.split("/")[-1] in named, module
    for name in ("training/", "cli/", "explorer/", "keras_varinit/"):
        assert name in section


def test_architecture_map_lists_exactly_the_modules():
    text = (REPO / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_/]+)\.py` \|", text, re.M))
    assert listed == _modules()


def test_architecture_map_says_who_writes_each_run_file():
    text = _section((REPO / "docs" / "architecture.md").read_text(), "## Who writes")
    rows = {m.group(1).rstrip("/"): m.group(2)
            for m in re.finditer(r"^\| `([\w./]+)` \| (.+?) \|", text, re.M)}
    assert set(rows) == {name.rstrip("/") for name in rf.RUN_FILES} | {
        rf.LOCK_FILE, "explorer_job.json", "explorer.log"}
    assert "RunLock" in rows[rf.LOCK_FILE] and "RunBackup" in rows[rf.BACKUP_DIR]
    assert "StatusWriter" in rows["status.json"]
    assert "LayerStatsLogger" in rows["layer_stats.jsonl"]
    assert "worker" in rows["explorer_job.json"]
    for writer in re.findall(r"`([a-z_/]+\.py)`", " ".join(rows.values())):
        path = writer if writer.startswith("explorer/") else f"keras_varinit/{writer}"
        assert (REPO / path).exists(), writer


def test_status_json_has_one_writer():
    """Only run_files.StatusWriter writes status.json (the explorer's worker writes its job
    file): no other code both names the status file and writes JSON."""
    writers = []
    for path in [*(REPO / "keras_varinit").rglob("*.py"), *(REPO / "explorer").glob("*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "write_json_atomic(" in line and ("STATUS_FILE" in line or "status" in line):
                writers.append(f"{path.relative_to(REPO)}:{n}")
    assert writers == ["keras_varinit/run_files.py:" + str(_status_writer_line())]


def _status_writer_line():
    lines = (REPO / "keras_varinit" / "run_files.py").read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1)
                if "write_json_atomic(self.path, status)" in line)
