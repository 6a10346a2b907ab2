"""Drive the dashboard in a real browser (Playwright + Debian's chromium) against `streamlit run`.

Shared by tests/e2e/test_browser.py and bench/app_latency.py. Every helper waits for what a user
would see (text, a chart's SVG), never for internal state.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = ROOT / "artifacts" / "e2e"
LONG_MS = 900_000  # spectra / pruning on two shared CPU cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict | None = None, log_path: Path | None = None, timeout: float = 120.0):
    """`streamlit run app.py` on a free port; returns (process, base url) once /_stcore/health answers."""
    port = free_port()
    log = open(log_path or os.devnull, "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://localhost:{port}"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode} (log: {log_path})")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"streamlit did not become healthy within {timeout} s")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_app(context, url: str):
    page = context.new_page()
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_role("button", name="Load model").wait_for(timeout=120_000)
    return page


def load_default(page) -> float:
    """Click Load with the packaged default preselected; seconds until the summary shows."""
    t0 = time.perf_counter()
    page.get_by_role("button", name="Load model").click()
    page.get_by_text(re.compile(r"^Loaded SmolLM2-135M-Instruct")).wait_for(timeout=300_000)
    return time.perf_counter() - t0


def nav(page, title: str) -> None:
    page.locator("[data-testid=stSidebarNav]").get_by_role("link", name=title).click()
    page.locator("h1").filter(has_text=re.compile(f"^{title}")).wait_for(timeout=60_000)
    wait_run(page)


def wait_run(page, timeout_ms: int = 60_000) -> None:
    """Wait until the script run the last action started has finished (the status widget's running icon
    is gone), so that the next action is not sent to a run in progress."""
    page.wait_for_timeout(200)
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidgetRunningIcon]')",
                           timeout=timeout_ms, polling=200)


def wait_idle(page, timeout_ms: int = LONG_MS) -> None:
    """Wait until no progress bar shows (background jobs of the page finished)."""
    page.wait_for_function("() => document.querySelectorAll('[data-testid=stProgress]').length === 0",
                           timeout=timeout_ms, polling=500)


def esd_svg(page):
    """The ESD histogram's plot area (a Plotly SVG) on the Spectra page."""
    return page.locator(".st-key-spectra_esd .main-svg").first


def metric_value(page, label: str, timeout_ms: int = LONG_MS) -> str:
    m = page.locator("[data-testid=stMetric]").filter(has_text=label).locator("[data-testid=stMetricValue]")
    m.first.wait_for(timeout=timeout_ms)
    return m.first.inner_text().strip()


def budget_text(page) -> str:
    return page.get_by_text(re.compile(r"^Budget as drawn:")).first.inner_text()


def curve_frame(page):
    return page.frame_locator("iframe[title*='curve_editor']").first


def drag_point(page, index: int, dy: float, steps: int = 8) -> float:
    """Drag control point `index` of the curve editor by `dy` pixels (negative: up) with the mouse.
    Returns time.perf_counter() at mouse-up."""
    point = curve_frame(page).locator(".scatterlayer .trace").last.locator("path.point").nth(index)
    point.wait_for(timeout=60_000)
    box = point.bounding_box()  # page coordinates (Playwright adds the iframe's offset)
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x, y + dy, steps=steps)
    t = time.perf_counter()
    page.mouse.up()
    return t


def wait_text_change(page, locator_js: str, old: str, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(f"(old) => {{ const e = {locator_js}; return e && e.innerText !== old; }}", arg=old,
                           timeout=timeout_ms, polling="raf")


BUDGET_JS = "[...document.querySelectorAll('[data-testid=stMarkdownContainer] p')]" \
            ".find(p => p.innerText.startsWith('Budget as drawn:'))"


def input_box(page, label: str, value: int | str):
    """The input labelled `label` that takes `value`: a number box for an int, else a text box."""
    return page.get_by_role("spinbutton" if isinstance(value, int) else "textbox", name=label, exact=True)


def set_inputs(page, expander: str, values: dict) -> None:
    """Open the expander titled `expander` and fill its inputs, by label: int values into number boxes,
    str values into text boxes, one rerun at a time; a value is typed again if a rerun re-drew its box
    with the old one before Enter reached it."""
    page.get_by_text(expander).click()
    for label, value in values.items():
        box = input_box(page, label, value)
        for _ in range(5):
            box.fill(str(value))
            box.press("Enter")
            wait_run(page)
            if box.input_value() == str(value):
                break
        assert box.input_value() == str(value), f"{label} did not keep {value}"


def set_small_eval(page, n_samples: int | None = None, calib_seqlen: int | None = None,
                   eval_seqlen: int | None = None, windows: int | None = None) -> None:
    """Fill the Prune page's calibration/evaluation inputs."""
    labels = {"Calibration samples": n_samples, "Calibration length (tokens)": calib_seqlen,
              "Window length (tokens)": eval_seqlen, "Windows (0 = all)": windows}
    set_inputs(page, "Calibration and evaluation data", {k: v for k, v in labels.items() if v is not None})


def weights_line(page, containing: str | None = None, timeout_ms: int = 60_000) -> str:
    """The Prune page's "Your weights: ..." line (waiting until it contains `containing`, if given)."""
    para = page.locator("[data-testid=stMain] [data-testid=stMarkdownContainer] p").filter(has_text="Your weights:")
    if containing:
        para = para.filter(has_text=containing)
    para.first.wait_for(timeout=timeout_ms)
    return para.first.inner_text()
