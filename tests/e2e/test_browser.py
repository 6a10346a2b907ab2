"""End to end in a real browser: Playwright (Python, sync API) with Debian's chromium against
`streamlit run app.py` on localhost. Screenshots go to artifacts/e2e/.

Flow (one server, two browser sessions):
  A: load the default model -> Spectra shows an ESD histogram, and a heatmap click opens its layer ->
     drag a curve point with the mouse and see the budget change, type allocation search settings ->
     Undo the drag and drag again -> start a 50% Wanda prune with that curve and see a perplexity value -> another
     page and back, then a reload: the Prune and Allocation pages' settings and the curve are still those chosen.
  B (a second browser context, i.e. another user, while A's prune runs): its weights stay the dense
     shared model, its Spectra caption reports no pruned zeros, and evaluating its weights gives the
     dense baseline perplexity.
"""
import re
from pathlib import Path

import pytest

from tests.e2e.app_driver import (
    ARTIFACTS,
    BUDGET_JS,
    CHROMIUM,
    LONG_MS,
    budget_text,
    drag_point,
    esd_svg,
    input_box,
    launch,
    load_default,
    metric_value,
    nav,
    open_app,
    set_inputs,
    set_small_eval,
    shot,
    start_server,
    stop_server,
    wait_idle,
    wait_run,
    wait_text_change,
    weights_line,
)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"Debian chromium not found at {CHROMIUM} (install it: make browser)")

# small calibration/evaluation so the prune finishes in reasonable time on two shared CPU cores
SMALL = dict(n_samples=4, calib_seqlen=128, eval_seqlen=128, windows=3)
# allocation search settings, typed but not run; they must survive visits to other pages
SEARCH = {"Score on (held-out text)": "README.md", "Held-out windows": 24, "Then: more generations": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(env={"ALPHASCOPE_RUNS_DB": str(tmp / "runs.sqlite")},
                             log_path=ARTIFACTS / "streamlit.log")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


def test_spectra_drag_prune_and_isolation(server, browser):
    ctx_a, ctx_b = browser.new_context(), browser.new_context()
    a = open_app(ctx_a, server)
    load_default(a)
    assert "SmolLM2-135M-Instruct" in a.locator("[data-testid=stSidebar]").inner_text()
    # the URL names the model, and a reload (a new session) has it back without a Load
    a.wait_for_url(re.compile(r"[?&]model=default"), timeout=60_000)
    a.reload()
    a.get_by_text(re.compile(r"^Loaded SmolLM2-135M-Instruct")).wait_for(timeout=60_000)
    shot(a, "01_model_loaded")

    # Spectra: the ESD histogram of a layer is drawn (plotly SVG with the histogram trace)
    nav(a, "Spectra")
    wait_idle(a)
    esd_svg(a).wait_for(timeout=LONG_MS)
    assert a.locator(".st-key-spectra_esd").get_by_text("ESD", exact=True).count() >= 1
    assert a.locator(".st-key-spectra_esd .scatterlayer .trace").count() >= 2  # histogram + power-law fit
    shot(a, "02_spectra")
    # a click on a heatmap cell opens that cell's layer (the top right cell: the last block's down_proj)
    title = a.locator(".st-key-spectra_esd .gtitle")  # SVG text: textContent, not innerText
    before = title.text_content()
    heat = a.locator(".st-key-spectra_heatmap .nsewdrag").first
    heat.scroll_into_view_if_needed()
    box = heat.bounding_box()
    a.mouse.click(box["x"] + box["width"] - 3, box["y"] + 3)
    # (one title: while the chart redraws, the old one can stand beside the new for a moment)
    a.wait_for_function("(old) => { const e = document.querySelectorAll('.st-key-spectra_esd .gtitle'); "
                        "return e.length === 1 && e[0].textContent !== old; }", arg=before, timeout=60_000)
    assert title.text_content().startswith("model.layers.29.mlp.down_proj")

    # Allocation: drag the middle control point up with the mouse; the budget text follows
    nav(a, "Allocation")
    wait_idle(a)
    before = budget_text(a)
    drag_point(a, 1, dy=-80)
    wait_text_change(a, BUDGET_JS, before)
    after = budget_text(a)
    pct = [float(re.search(r"Budget as drawn: ([\d.]+)%", t).group(1)) for t in (before, after)]
    assert pct[1] > pct[0]  # dragged up -> more sparsity
    a.get_by_role("button", name="Undo", exact=True).click()  # the drag taken back, then made again
    wait_text_change(a, BUDGET_JS, after)
    assert budget_text(a) == before
    drag_point(a, 1, dy=-80)
    wait_text_change(a, BUDGET_JS, before)
    assert budget_text(a) == after
    shot(a, "03_allocation_dragged")
    set_inputs(a, "Find allocation (search)", SEARCH)  # (not run: kept for the page-change check below)

    # Prune: 50% Wanda with the curve just dragged (normalized to the 50% target), small calibration/eval; a live
    # perplexity value appears
    nav(a, "Prune")
    a.locator(".st-key-prune_alloc").click()
    a.get_by_role("option", name="custom curve (Allocation page)").click()
    wait_run(a)
    a.get_by_text(re.compile(r"^Your curve from the Allocation page prunes 50\.0%")).wait_for(timeout=60_000)
    set_small_eval(a, **SMALL)
    a.get_by_role("button", name="Run", exact=True).click()

    # meanwhile user B opens the app: same shared model, own (dense) weights
    b = open_app(ctx_b, server)
    load_default(b)  # instant: the model is cached for all sessions
    nav(b, "Prune")
    assert "dense (shared model) · 0.03% of prunable weights are zero" in weights_line(b)

    ppl_a = float(metric_value(a, "Perplexity (prune)"))
    shot(a, "04_prune_first_ppl")
    wait_idle(a)
    ppl_a = float(metric_value(a, "Perplexity (prune)"))
    dense_a = float(metric_value(a, "Dense baseline perplexity"))
    assert ppl_a > dense_a > 1
    assert "pruned copy" in weights_line(a, containing="50.00% of prunable weights are zero")
    shot(a, "05_prune_done")
    # the settings chosen on a page are still there after visiting another page
    nav(a, "Compare")
    nav(a, "Prune")
    a.get_by_text("Calibration and evaluation data").click()
    for label, value in (("Calibration samples", SMALL["n_samples"]), ("Windows (0 = all)", SMALL["windows"])):
        assert a.get_by_role("spinbutton", name=label, exact=True).input_value() == str(value)
    nav(a, "Allocation")
    a.get_by_text("Find allocation (search)").click()
    for label, value in SEARCH.items():
        assert input_box(a, label, value).input_value() == str(value)
    # ... and after a reload (a new session of the tab) on another page: the settings, the curve and the pruned
    # weights; and a setting changed after the reload is the one kept
    nav(a, "Prune")
    a.reload()
    a.get_by_text(re.compile(r"^Your settings are back after the reload")).wait_for(timeout=120_000)
    a.locator("h1").filter(has_text=re.compile("^Prune")).wait_for(timeout=60_000)
    wait_run(a)
    assert "pruned copy" in weights_line(a, containing="50.00% of prunable weights are zero")
    a.get_by_text("Calibration and evaluation data").click()
    assert a.get_by_role("spinbutton", name="Calibration samples", exact=True).input_value() == str(SMALL["n_samples"])
    nav(a, "Allocation")
    wait_idle(a)
    assert budget_text(a) == after
    a.get_by_text("Find allocation (search)").click()
    wait_run(a)
    for label, value in SEARCH.items():
        box = input_box(a, label, value)
        box.wait_for(timeout=60_000)
        assert box.input_value() == str(value), (label, box.input_value())
    epsilon = a.locator("[data-testid=stSlider]").filter(has_text="ε (AlphaPruning")
    epsilon.get_by_role("slider").press("ArrowLeft")  # 0.3 -> 0.25
    wait_run(a)
    nav(a, "Learn")
    nav(a, "Allocation")
    assert epsilon.locator("[data-testid=stSliderThumbValue]").inner_text() == "0.25"
    shot(a, "05b_after_reload")

    # B after A's prune: still dense, and its perplexity is the dense baseline
    set_small_eval(b, **SMALL)  # the same evaluation windows as A
    assert "dense (shared model) · 0.03% of prunable weights are zero" in weights_line(b)
    b.get_by_role("button", name="Evaluate current weights").click()
    ppl_b = float(metric_value(b, "Perplexity (eval)"))
    wait_idle(b)
    ppl_b = float(metric_value(b, "Perplexity (eval)"))
    dense_b = float(metric_value(b, "Dense baseline perplexity"))
    assert ppl_b == pytest.approx(dense_b, abs=0.011) and dense_b == pytest.approx(dense_a, abs=0.011)
    shot(b, "06_other_session_dense")
    nav(b, "Spectra")
    wait_idle(b)
    caption = b.get_by_text(re.compile(r"of the prunable weights analyzed here are zero")).first.inner_text()
    assert float(re.search(r"([\d.]+)% of the prunable", caption).group(1)) < 0.1
    shot(b, "07_other_session_spectra")
    ctx_a.close()
    ctx_b.close()


def test_a_page_asked_for_first_on_a_fresh_server_is_shown_through_the_app(browser, tmp_path):
    """After a server restart, an open tab comes back asking for its page before any session has run app.py, and
    Streamlit then runs the page on its own with its automatic pages/ navigation (lowercase file names, an "app"
    entry, no sidebar header, no kept settings). The page starts again from app.py and is shown in the app."""
    proc, url = start_server(env={"ALPHASCOPE_RUNS_DB": str(tmp_path / "runs.sqlite")})
    try:
        page = browser.new_page()
        page.goto(f"{url}/learn")
        page.get_by_text("Learn: what a spectrum says about a layer").wait_for(timeout=LONG_MS)
        nav = page.locator("[data-testid=stSidebarNav]").inner_text().split("\n")
        assert "Allocation" in nav and "app" not in nav and "allocation" not in nav, nav
        assert page.url.split("?")[0] == f"{url}/learn"
        assert "alphascope" in page.locator("[data-testid=stSidebar]").inner_text()  # app.py's sidebar
        page.close()
    finally:
        stop_server(proc)
