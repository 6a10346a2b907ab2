"""Dashboard latency in a real browser (Playwright + Debian chromium against `streamlit run`).

Measures, with the packaged default model on CPU:
  - spectra_open_s: from clicking "Spectra" in the sidebar until the ESD histogram's SVG is drawn,
    (a) right after loading the model ("after_load": includes whatever remains of the spectra job
    that loading starts in the background), and (b) in a second browser session once the shared
    results exist ("warm").  Target: < 5 s.
  - run_to_first_ppl_s: from clicking Run (50% Wanda, uniform allocation, default calibration and
    evaluation settings of the Prune page) until the first live perplexity value shows. Target: < 15 s.
  - drag_roundtrip_s: from mouse-up after dragging a curve point until the budget text has changed
    (browser -> Python -> browser), over several drags.

Usage: .venv/bin/python -m bench.app_latency [--drags 7]   -> bench/results/app_latency.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import machine_info, write_result  # noqa: E402
from tests.e2e.app_driver import (  # noqa: E402
    BUDGET_JS,
    LONG_MS,
    budget_text,
    drag_point,
    esd_svg,
    launch,
    load_default,
    metric_value,
    nav,
    open_app,
    shot,
    start_server,
    stop_server,
    wait_idle,
    wait_text_change,
)

OUT = ROOT / "bench" / "results" / "app_latency.json"


def time_spectra_open(page) -> float:
    t0 = time.perf_counter()
    nav(page, "Spectra")
    esd_svg(page).wait_for(timeout=LONG_MS)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drags", type=int, default=7)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 (dev-only browser driver)

    tmp = Path(tempfile.mkdtemp(prefix="alphascope-bench-"))
    proc, url = start_server(env={"ALPHASCOPE_RUNS_DB": str(tmp / "runs.sqlite")}, log_path=tmp / "streamlit.log")
    res: dict = {}
    try:
        with sync_playwright() as p:
            browser = launch(p)
            a = open_app(browser.new_context(), url)
            res["model_load_s"] = round(load_default(a), 2)
            res["spectra_open_s"] = {"after_load": round(time_spectra_open(a), 2)}
            b = open_app(browser.new_context(), url)
            load_default(b)
            res["spectra_open_s"]["warm"] = round(time_spectra_open(b), 2)
            shot(b, "bench_spectra")

            nav(a, "Allocation")
            wait_idle(a)
            rts = []
            for i in range(args.drags):
                before = budget_text(a)
                t_up = drag_point(a, 1, dy=-40 if i % 2 == 0 else 40)
                wait_text_change(a, BUDGET_JS, before)
                rts.append(time.perf_counter() - t_up)
            res["drag_roundtrip_s"] = {"median": round(statistics.median(rts), 3), "max": round(max(rts), 3),
                                       "all": [round(x, 3) for x in rts]}

            nav(a, "Prune")  # default settings: wanda, unstructured, uniform 50%, 16 x 256 calibration
            t0 = time.perf_counter()
            a.get_by_role("button", name="Run", exact=True).click()
            first = metric_value(a, "Perplexity (prune)")
            res["run_to_first_ppl_s"] = round(time.perf_counter() - t0, 2)
            res["first_ppl"] = float(first)
            shot(a, "bench_prune_first_ppl")
            browser.close()
    finally:
        stop_server(proc)
    res["targets"] = {"spectra_open_s": 5.0, "run_to_first_ppl_s": 15.0}
    res["machine"] = machine_info()
    res["command"] = ".venv/bin/python -m bench.app_latency"
    write_result(res, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
