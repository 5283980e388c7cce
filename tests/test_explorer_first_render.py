"""The explorer's first render does not wait for Keras: the page's layout (sidebar controls,
tabs, runs) is drawn without importing Keras, TensorFlow or JAX; only the "At initialization"
profile, filled in last, imports them. Checked in a fresh process where those imports fail:
the page renders, and the profile slot says why it could not be computed.

The time to first render in a real browser is recorded by tests/test_explorer_browser.py."""
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
