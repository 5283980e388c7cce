"""Real-browser test of the explorer: `streamlit run explorer/app.py` on a free localhost port,
driven by Playwright with Debian's Chromium. Records the time to first render (the sidebar's
controls on the page) and to the first profile, from the page load of a fresh server
(printed, and written to first_render.json in the test's tmp dir; not asserted: the machine
is shared), runs a tiny synthetic training, checks that the Vega charts render and that no
exception box appears, uploads a .keras model (profiled) and a renamed PNG (refused on the
page), and saves screenshots under the test's tmp dir; with KERAS_VARINIT_UPDATE_SCREENSHOT=1
it also refreshes the one the README shows (docs/explorer.png), so a plain test run leaves the
tree clean.

Needs /usr/bin/chromium (`apt-get install chromium`; never `playwright install`). Without it the
test skips, unless KERAS_VARINIT_REQUIRE_BROWSER=1 (set by .ci/run), where it fails.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = REPO / "docs" / "explorer.png"
TINY_QUERY = ("data=synthetic&depth=8&width=8&subset=512&batch_size=64&epochs=2&lr=0.03"
              "&init=kaiming_normal")


def _require_browser():
    required = os.environ.get("KERAS_VARINIT_REQUIRE_BROWSER") == "1"
    problems = []
    if not os.path.exists(CHROMIUM):
        problems.append(f"{CHROMIUM} not found: install Debian's Chromium with "
                        "`apt-get install chromium` (never `playwright install`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright Python package is missing: pip install playwright")
    if problems:
        message = "; ".join(problems)
        if required:
            pytest.fail(f"KERAS_VARINIT_REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message + " (set KERAS_VARINIT_REQUIRE_BROWSER=1 to make this a failure)")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_streamlit(script, runs_dir, log_path):
    """`streamlit run script` on a free localhost port, headless; `(process, url)` once its
    health endpoint answers (the caller terminates the process)."""
    port = _free_port()
    env = dict(os.environ, KERAS_VARINIT_RUNS_DIR=str(runs_dir),
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(script),
         "--server.port", str(port), "--server.address", "127.0.0.1",
         "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"streamlit did not come up: {pathlib.Path(log_path).read_text()}")


def stop_streamlit(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def server(tmp_path):
    _require_browser()
    try:
        proc, url = start_streamlit(REPO / "explorer" / "app.py", tmp_path / "runs",
                                    tmp_path / "streamlit.log")
    except RuntimeError as e:
        pytest.fail(str(e))
    yield url
    stop_streamlit(proc)


def _no_exception_box(page):
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, boxes.first.inner_text()


def _timed_first_render(page, url, out):
    """Load ``url`` on a fresh server; seconds until the sidebar's controls are on the page
    (first render) and until the profile chart is (first profile), saved to ``out``."""
    from playwright.sync_api import expect

    started = time.perf_counter()
    page.goto(url, wait_until="domcontentloaded")
    expect(page.get_by_text("Depth (weight layers)").first).to_be_visible(timeout=180_000)
    expect(page.get_by_role("tab", name="Training")).to_be_visible(timeout=180_000)
    first_render = time.perf_counter() - started
    # At initialization: the variance profile renders as a Vega chart
    expect(page.get_by_text("8-layer CNN").first).to_be_visible(timeout=180_000)
    expect(page.locator('[data-testid="stMetricValue"]').first).to_be_visible(
        timeout=180_000)
    first_profile = time.perf_counter() - started
    timings = {"first_render_s": round(first_render, 2),
               "first_profile_s": round(first_profile, 2), "cpus": os.cpu_count()}
    out.write_text(json.dumps(timings))
    print(f"explorer time to first render {first_render:.2f} s, to the first profile "
          f"{first_profile:.2f} s (fresh server, {os.cpu_count()} CPUs; {out})")
    return timings


def _upload_path(page, tmp_path):
    """The sidebar's "Your .keras file": a 2-conv model is profiled, a renamed PNG refused."""
    from playwright.sync_api import expect

    from tests.test_training_user_model import two_conv

    model = two_conv(tmp_path / "two_conv.keras")
    png = tmp_path / "holiday.keras"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500))
    page.get_by_role("tab", name="At initialization").click()
    page.get_by_text("Your .keras file").first.click()
    expect(page.get_by_text("CLI-only").first).to_be_visible(timeout=60_000)
    # the heading names the stored upload ("Your model: upload a .keras file" before), and
    # once the script run is over, no element of the previous run is left on the page (the
    # built-in net's profile stayed visible, faded, while the upload was being profiled)
    _upload(page, model, "Your model two_conv.keras", timeout=180_000)
    expect(page.get_by_test_id("stStatusWidget")).to_be_hidden(timeout=180_000)
    expect(page.get_by_text("No model yet")).to_have_count(0)
    expect(page.get_by_text("from conv1 to conv2").first).to_be_visible(timeout=60_000)
    expect(page.locator('[data-testid="stMetricValue"]').first).to_be_visible(
        timeout=180_000)
    _no_exception_box(page)
    page.screenshot(path=str(tmp_path / "explorer-your-model.png"), full_page=True)
    _upload(page, png, "it is a PNG image", timeout=60_000)
    _no_exception_box(page)


def _upload(page, path, shows, timeout, attempts=3):
    """Put `path` into the sidebar's file uploader once the page is idle, until `shows` is on
    the page: a file set while Streamlit reruns the script can be dropped (seen in CI: the
    uploader kept the previous file), so it is set again, at most `attempts` times."""
    from playwright.sync_api import expect

    for attempt in range(1, attempts + 1):
        expect(page.get_by_test_id("stStatusWidget")).to_be_hidden(timeout=timeout)
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))
        try:
            expect(page.get_by_text(shows).first).to_be_visible(timeout=timeout // attempts)
            return
        except AssertionError:
            if attempt == attempts:
                raise


def test_browser_trains_a_tiny_run_and_renders_charts(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # Streamlit scrolls inside its own container, so a full-page shot needs a tall viewport.
            page = browser.new_page(viewport={"width": 1440, "height": 1900})
            _timed_first_render(page, f"{server}/?{TINY_QUERY}",
                                tmp_path / "first_render.json")
            expect(page.locator(".vega-embed").first).to_be_visible(timeout=180_000)
            page.wait_for_timeout(1000)
            _no_exception_box(page)
            page.screenshot(path=str(tmp_path / "explorer-init.png"), full_page=True)

            page.get_by_role("tab", name="Training").click()
            page.get_by_role("button", name="Train", exact=True).click()
            finished = page.locator('[data-testid="stMetricValue"]', has_text="finished").first
            expect(finished).to_be_visible(timeout=300_000)
            # the fragment redraws every 1.5 s: let the last charts come in
            page.mouse.move(5, 5)  # no tooltip in the screenshot
            page.wait_for_timeout(4000)
            _no_exception_box(page)
            panel = page.get_by_role("tabpanel", name="Training")
            charts = panel.locator(".vega-embed")
            assert charts.count() >= 5
            drawn = panel.locator(".vega-embed canvas, .vega-embed svg")
            assert drawn.count() >= 5
            expect(panel.get_by_text("SYNTHETIC").first).to_be_visible()
            shot = tmp_path / "explorer.png"
            page.screenshot(path=str(shot), full_page=True)

            page.get_by_role("tab", name="Compare").click()
            expect(page.get_by_text("tensorboard --logdir").first).to_be_visible(
                timeout=30_000)
            compare = page.get_by_role("tabpanel", name="Compare")
            expect(compare.locator(".vega-embed").first).to_be_visible(timeout=30_000)
            # the table is a canvas grid; its cells exist as an accessible (hidden) table
            expect(compare.get_by_text("finished").first).to_be_attached(timeout=30_000)
            page.mouse.move(5, 5)
            page.wait_for_timeout(1500)
            _no_exception_box(page)
            page.screenshot(path=str(tmp_path / "explorer-compare.png"), full_page=True)
            _upload_path(page, tmp_path)
        finally:
            browser.close()
    if os.environ.get("KERAS_VARINIT_UPDATE_SCREENSHOT") == "1":   # refresh the README's
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    print(f"screenshots in {tmp_path}")
