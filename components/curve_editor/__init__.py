"""A draggable sparsity-vs-depth curve: a bidirectional Streamlit custom component.

The browser side (frontend/index.html + main.js, no build step) draws the control points with
Plotly.js and sends the moved points back when the mouse is released. Plotly.js is copied from the
installed `plotly` Python package into the static folder at setup (`python -m components.curve_editor`,
run by `make setup`), so the app needs no CDN and importing this module writes nothing.

`st.session_state[key]` holds the current points (a list of [depth, sparsity] pairs) and is the one
source of truth: a drag in the browser writes it, and so can any other control on the page (preset
buttons, the numeric table) or a test (`AppTest.session_state[key] = [...]`, since AppTest does not
run JavaScript).
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import streamlit as st
import streamlit.components.v1 as components

FRONTEND = Path(__file__).resolve().parent / "frontend"
PLOTLY_JS = FRONTEND / "plotly.min.js"


def ensure_plotly_js() -> Path:
    """Copy plotly.min.js from the installed plotly package next to index.html (once); the setup step."""
    if not PLOTLY_JS.exists():
        spec = importlib.util.find_spec("plotly")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("The curve editor needs the 'plotly' Python package (it ships Plotly.js).")
        src = Path(spec.submodule_search_locations[0]) / "package_data" / "plotly.min.js"
        tmp = PLOTLY_JS.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(PLOTLY_JS)  # atomic: a concurrent import never serves a half-written file
    return PLOTLY_JS


_component = components.declare_component("curve_editor", path=str(FRONTEND))


def clamp_points(points: Any, y_max: float = 1.0) -> tuple[list[list[float]], bool]:
    """Sort points by depth and hold them inside [0, 1] x [0, y_max].

    Returns (points, clamped) where clamped says whether any coordinate was moved. Rows that are
    not two finite numbers are dropped (the numeric table may hand over empty rows).
    """
    out, clamped = [], False
    for p in points or []:
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError):
            continue
        if x != x or y != y:  # NaN from an empty table cell
            continue
        cx, cy = min(max(x, 0.0), 1.0), min(max(y, 0.0), y_max)
        clamped |= (cx, cy) != (x, y)
        out.append([round(cx, 4), round(cy, 4)])
    out.sort(key=lambda p: p[0])
    return out, clamped


def _keys(key: str) -> tuple[str, str]:
    return f"_{key}__component", f"_{key}__seq"


def curve_points(key: str, points: list | None = None, y_max: float = 0.95) -> list[list[float]]:
    """The current control points under `key`, with any new browser gesture applied first.

    Call it before computing anything from the points, so charts drawn in the same run (overlays,
    budgets) already reflect a drag that just happened; `curve_editor` calls it too (idempotent).
    points: starting points, used only while st.session_state[key] is unset.
    """
    state = st.session_state
    if key not in state:
        state[key] = clamp_points(points, y_max)[0]
    widget_key, seq_key = _keys(key)
    # The component keeps returning its last value on every rerun; only a new gesture (new seq)
    # may overwrite the points, otherwise a preset loaded after a drag would be undone.
    value = state.get(widget_key)
    if isinstance(value, dict) and value.get("seq") and value.get("seq") != state.get(seq_key):
        state[seq_key] = value["seq"]
        new, clamped = clamp_points(value.get("points"), y_max)
        if len(new) >= 2:
            state[key] = new
            if clamped:
                st.info(f"A point was released outside the chart; it was clamped to depth 0–1 and "
                        f"sparsity 0–{y_max:g}.")
    return [list(p) for p in state[key]]


def curve_editor(
    points: list | None = None,
    overlays: list[dict] | None = None,
    key: str = "curve",
    y_max: float = 0.95,
    height: int = 360,
    x_label: str | None = None,
    y_label: str | None = None,
    disabled: bool = False,
) -> list[list[float]]:
    """Show the editable curve and return its current control points [[depth, sparsity], ...].

    points: starting points, used only while st.session_state[key] is unset.
    overlays: extra read-only lines, each {"name", "x": [...], "y": [...]} plus optional
      "color", "dash", "mode" (plotly scatter mode), "width".
    y_max: highest sparsity a point may take; points released beyond the chart are clamped to it
      (and to depth 0..1), and a message says so.
    """
    current = curve_points(key, points, y_max)
    if not PLOTLY_JS.exists():  # the rest of the page (table, presets, budget) still works
        st.error(f"The draggable curve needs {PLOTLY_JS}, which is missing: run `make setup` (or "
                 "`python -m components.curve_editor`) once, then reload. Edit the points in the table meanwhile.")
        return current
    widget_key, _ = _keys(key)
    _component(points=current, overlays=overlays or [], y_max=y_max, height=height, x_label=x_label,
               y_label=y_label, key=widget_key, default=None, disabled=disabled)
    # a value returned by this very call was already in session state and applied above
    return curve_points(key, points, y_max)
