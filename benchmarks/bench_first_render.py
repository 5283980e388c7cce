"""The explorer's time to first render in a real browser, against a bare Streamlit page.

Each repeat starts a fresh `streamlit run` server (as `make run` does) and loads the page in
Debian's Chromium through Playwright; the clock runs from `page.goto` until the sidebar's depth
slider and the "Training" tab are visible (first render), and, for the explorer, until the
"At initialization" profile's first metric is (first profile). The anchor is a bare Streamlit
page with the same wide layout, one sidebar slider and the same three tabs: the floor that
Streamlit's own server and frontend set on this machine. Variants are interleaved (anchor,
explorer, anchor, ...); minimum and median of `--repeats` are printed with their ratios.
Goal (issue 10): the explorer's first render under 3 s.

    .venv/bin/python benchmarks/bench_first_render.py              # 5 repeats
    .venv/bin/python benchmarks/bench_first_render.py --repeats 2  # quick look

Needs /usr/bin/chromium and the playwright package (the `dev` extra).
"""
import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import textwrap
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_explorer_browser import (CHROMIUM, CHROMIUM_ARGS, TINY_QUERY,  # noqa: E402
                                         start_streamlit, stop_streamlit)

ANCHOR = textwrap.dedent("""
    import streamlit as st

    st.set_page_config(page_title="anchor", layout="wide")
    st.sidebar.slider("Depth (weight layers)", 2, 60, 8)
    for tab, name in zip(st.tabs(["At initialization", "Training", "Compare"]),
                         ["profile", "runs", "compare"]):
        tab.write(name)
""")


def time_page(browser, url, profile):
    """Seconds to the first render (and to the first profile metric, or None)."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    try:
        started = time.perf_counter()
        page.goto(url, wait_until="domcontentloaded")
        expect(page.get_by_text("Depth (weight layers)").first).to_be_visible(timeout=180_000)
        expect(page.get_by_role("tab", name="Training")).to_be_visible(timeout=180_000)
        first = time.perf_counter() - started
        if not profile:
            return first, None
        expect(page.locator('[data-testid="stMetricValue"]').first).to_be_visible(
            timeout=180_000)
        return first, time.perf_counter() - started
    finally:
        page.close()


def measure(browser, script, query, tmp, profile):
    proc, url = start_streamlit(script, tmp / "runs", tmp / "streamlit.log")
    try:
        return time_page(browser, f"{url}/?{query}", profile)
    finally:
        stop_streamlit(proc)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_first_render_"))
    anchor = tmp / "anchor.py"
    anchor.write_text(ANCHOR)
    variants = {"bare Streamlit": (anchor, "", False),
                "explorer": (REPO / "explorer" / "app.py", TINY_QUERY, True)}
    times = {name: [] for name in variants}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for r in range(args.repeats):
                for name, (script, query, profile) in variants.items():
                    first, prof = measure(browser, script, query, tmp, profile)
                    times[name].append(first)
                    extra = f", first profile {prof:.2f} s" if prof is not None else ""
                    print(f"round {r + 1} {name:15s} first render {first:.2f} s{extra}, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            browser.close()
    base = times["bare Streamlit"]
    print(f"{'variant':15s} {'min':>7s} {'median':>7s} {'r(min)':>7s} {'r(median)':>9s}")
    for name, values in times.items():
        print(f"{name:15s} {min(values):7.2f} {statistics.median(values):7.2f} "
              f"{min(values) / min(base):7.2f} "
              f"{statistics.median(values) / statistics.median(base):9.2f}")
    print(f"goal: explorer first render < 3 s (min {min(times['explorer']):.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
