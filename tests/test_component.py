"""The curve editor component's Python side: clamping, the session-state contract, the static folder.

The JavaScript side (dragging with a real mouse) is covered by tests/e2e/test_browser.py.
"""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from components.curve_editor import FRONTEND, PLOTLY_JS, clamp_points, ensure_plotly_js


def test_clamp_points_sorts_clamps_and_drops_empty_rows():
    pts, clamped = clamp_points([[1.2, 0.5], [0.5, -0.1], [0.0, 0.3], [None, 0.2], [float("nan"), 0.1]], y_max=0.9)
    assert pts == [[0.0, 0.3], [0.5, 0.0], [1.0, 0.5]]
    assert clamped
    assert clamp_points([[0, 0.1], [1, 0.9]], y_max=0.9) == ([[0.0, 0.1], [1.0, 0.9]], False)


def test_plotly_js_is_served_from_the_installed_package():
    import plotly

    src = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert ensure_plotly_js() == PLOTLY_JS
    assert PLOTLY_JS.stat().st_size == src.stat().st_size
    html = (FRONTEND / "index.html").read_text()
    assert 'src="./plotly.min.js"' in html and "http" not in html.split("<body>")[0]  # no CDN


def _script():
    import streamlit as st

    from components.curve_editor import curve_editor

    pts = curve_editor([[0, 0.5], [1, 0.5]], overlays=[{"name": "o", "x": [0, 1], "y": [0.4, 0.4]}], key="c",
                       y_max=0.9)
    st.markdown(f"points: {pts}")
    if st.button("preset"):
        st.session_state["c"] = [[0.0, 0.1], [1.0, 0.2]]
        st.rerun()


@pytest.fixture
def at():
    at = AppTest.from_function(_script)
    at.run()
    assert not at.exception
    return at


def test_starting_points_then_session_state_override(at):
    assert at.markdown[0].value == "points: [[0.0, 0.5], [1.0, 0.5]]"
    at.session_state["c"] = [[0.0, 0.2], [0.3, 0.4], [1.0, 0.6]]  # what tests (and other widgets) do
    at.run()
    assert at.markdown[0].value == "points: [[0.0, 0.2], [0.3, 0.4], [1.0, 0.6]]"


def test_browser_value_is_applied_once_and_clamped(at):
    # what the browser sends on mouse-up: the component's own widget value with a fresh seq
    at.session_state["_c__component"] = {"points": [[0.5, 1.5], [0, 0.2], [1, 0.3]], "seq": "g1", "action": "drag"}
    at.run()
    assert at.markdown[0].value == "points: [[0.0, 0.2], [0.5, 0.9], [1.0, 0.3]]"
    assert "clamped" in at.info[0].value
    # a preset set after the gesture wins: the component's stale value (same seq) is not re-applied
    at.button[0].click().run()
    at.run()
    assert at.markdown[0].value == "points: [[0.0, 0.1], [1.0, 0.2]]"
    # a new gesture applies again; fewer than two points are ignored
    at.session_state["_c__component"] = {"points": [[0.2, 0.3]], "seq": "g2"}
    at.run()
    assert at.markdown[0].value == "points: [[0.0, 0.1], [1.0, 0.2]]"


def test_a_missing_plotly_js_is_a_message_and_the_points_still_come_back(monkeypatch, tmp_path):
    import components.curve_editor

    monkeypatch.setattr(components.curve_editor, "PLOTLY_JS", tmp_path / "plotly.min.js")
    at = AppTest.from_function(_script)
    at.run()
    assert not at.exception and "make setup" in at.error[0].value
    assert at.markdown[0].value == "points: [[0.0, 0.5], [1.0, 0.5]]"
