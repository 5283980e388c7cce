"""The explorer's first render does not wait for Keras: the page's layout (sidebar controls,
tabs, runs) is drawn without importing Keras, TensorFlow or JAX; only the "At initialization"
profile, filled in last, imports them. Checked in a fresh process where those imports fail:
the page renders, and the profile slot says why it could not be computed.

The time to first render in a real browser is recorded by tests/test_explorer_browser.py."""
import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys, traceback
    from streamlit.testing.v1 import AppTest

    attempts = []

    class NoKeras:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("keras", "tensorflow", "jax"):
                attempts.append("".join(traceback.format_stack()))
                raise ImportError(f"{name} blocked by the test")
            return None

    sys.meta_path.insert(0, NoKeras())
    at = AppTest.from_file(sys.argv[1], default_timeout=120)
    at.query_params["data"] = "synthetic"
    at.query_params["depth"] = "4"
    at.run()
    print(json.dumps({
        "exceptions": [e.value for e in at.exception],
        "tabs": [t.label for t in at.tabs],
        "depth": at.slider(key="depth").value,
        "train_button": bool([b for b in at.button if b.key == "train"]),
        "errors": [e.value for e in at.error],
        "attempts": attempts, "trace": [str(e.proto.stack_trace) for e in at.exception],
    }))
""")


def test_page_layout_is_drawn_without_keras(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), KERAS_VARINIT_RUNS_DIR=str(tmp_path / "runs"))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO / "explorer" / "app.py")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    page = json.loads(out.stdout.strip().splitlines()[-1])
    assert page["exceptions"] == []
    assert page["tabs"] == ["At initialization", "Training", "Compare"]
    assert page["depth"] == 4 and page["train_button"]
    assert any("Could not compute the profile" in e for e in page["errors"])
    assert page["attempts"], "the profile never asked for Keras: was it computed at all?"
    for stack in page["attempts"]:   # every Keras import comes from the profile, drawn last
        assert "init_profile" in stack, stack[-2000:]


def _imports_before_tabs(path):
    """The top-level import statements of the app that run before it draws its tabs."""
    tree = ast.parse(path.read_text())
    imports = []
    for node in tree.body:
        if "st.tabs(" in ast.unparse(node):
            return imports
        if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", "") \
                != "__future__":
            imports.append(ast.unparse(node))
    raise AssertionError("explorer/app.py draws no tabs at its top level")


def test_sidebar_and_tabs_wait_for_no_heavy_import():
    """pandas and Altair (about 2 s of imports on 2 cores) come after the sidebar and the tabs:
    nothing the app imports before `st.tabs` loads them, nor Keras."""
    imports = _imports_before_tabs(REPO / "explorer" / "app.py")
    assert any("presets" in line for line in imports)   # the check sees the real imports
    script = "\n".join(["import sys", f"sys.path.insert(0, {str(REPO)!r})", *imports,
                        "print(sorted(m for m in ('pandas', 'altair', 'keras', 'tensorflow', "
                        "'jax') if m in sys.modules))"])
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", (imports, out.stdout)
