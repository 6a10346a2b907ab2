// Draggable sparsity curve: a Streamlit custom component (v1 protocol) written without a build step.
//
// Protocol (window.postMessage between this iframe and the Streamlit page):
//   -> parent  {isStreamlitMessage: true, type: "streamlit:componentReady", apiVersion: 1}
//   <- parent  {type: "streamlit:render", args: {...}, disabled, theme}   (on every script run)
//   -> parent  {isStreamlitMessage: true, type: "streamlit:setComponentValue", value, dataType: "json"}
//   -> parent  {isStreamlitMessage: true, type: "streamlit:setFrameHeight", height}
//
// The value sent back is {points: [[depth, sparsity], ...], seq: "<unique id>", action: "..."}.
// It is sent once per gesture (on pointer up, add or remove), never during a drag: each value makes
// Streamlit re-run the script, and doing that on every mouse move would stall the page.
(function () {
  "use strict";

  const gd = document.getElementById("plot");
  const PICK_RADIUS_PX = 14;
  let args = null;        // last render args from Python
  let points = [];        // [[x, y], ...] control points, as displayed
  let dragIndex = -1;     // index of the point being dragged, -1 when idle
  let moved = false;
  let plotted = false;
  let lastHeight = 0;

  function post(type, data) {
    window.parent.postMessage(Object.assign({ isStreamlitMessage: true, type: type }, data || {}), "*");
  }

  function sendPoints(action) {
    const sorted = points.slice().sort((a, b) => a[0] - b[0]);
    const seq = Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 8);
    post("streamlit:setComponentValue", { value: { points: sorted, seq: seq, action: action }, dataType: "json" });
  }

  function setHeight() {
    const h = Math.ceil(document.body.scrollHeight);
    if (h !== lastHeight) {
      lastHeight = h;
      post("streamlit:setFrameHeight", { height: h });
    }
  }

  function yMax() { return (args && args.y_max) || 1.0; }
  function xRange() { return [-0.03, 1.03]; }
  function yRange() { return [-0.02 * yMax(), yMax() * 1.04]; }
  function clamp(v, lo, hi) { return Math.min(Math.max(v, lo), hi); }

  // ---- pixel <-> data, using the plot area plotly laid out (margins included) ----
  function plotArea() {
    const size = gd._fullLayout && gd._fullLayout._size;
    const rect = gd.getBoundingClientRect();
    return { left: rect.left + size.l, top: rect.top + size.t, w: size.w, h: size.h };
  }
  function toData(clientX, clientY) {
    const a = plotArea(), xr = xRange(), yr = yRange();
    return [xr[0] + (clientX - a.left) / a.w * (xr[1] - xr[0]),
            yr[1] - (clientY - a.top) / a.h * (yr[1] - yr[0])];
  }
  function toClient(x, y) {
    const a = plotArea(), xr = xRange(), yr = yRange();
    return [a.left + (x - xr[0]) / (xr[1] - xr[0]) * a.w, a.top + (yr[1] - y) / (yr[1] - yr[0]) * a.h];
  }
  function nearest(clientX, clientY) {
    let best = -1, bestD = PICK_RADIUS_PX;
    points.forEach((p, i) => {
      const c = toClient(p[0], p[1]);
      const d = Math.hypot(c[0] - clientX, c[1] - clientY);
      if (d <= bestD) { best = i; bestD = d; }
    });
    return best;
  }
  // What the user sees while dragging: the point held inside the chart (Python clamps the value too
  // and says so, since a point released outside the chart may carry values beyond the range).
  function shown(p) { return [clamp(p[0], 0, 1), clamp(p[1], 0, yMax())]; }

  // ---- drawing ----
  function traces() {
    const data = [];
    (args.overlays || []).forEach((o) => {
      data.push({
        x: o.x, y: o.y, name: o.name, type: "scatter", mode: o.mode || "lines",
        line: { dash: o.dash || "dot", width: o.width || 1.5, color: o.color },
        marker: { size: 5, color: o.color }, opacity: o.opacity || 0.9,
        hovertemplate: "%{y:.3f}<extra>%{fullData.name}</extra>",
      });
    });
    const sorted = points.map(shown).sort((a, b) => a[0] - b[0]);
    data.push({  // the editable curve, always the last trace
      x: sorted.map((p) => p[0]), y: sorted.map((p) => p[1]), name: args.curve_name || "your curve",
      type: "scatter", mode: "lines+markers", line: { width: 2, color: "#d62728" },
      marker: { size: 13, color: "#d62728", line: { width: 2, color: "white" } },
      hovertemplate: "depth %{x:.2f}<br>sparsity %{y:.3f}<extra></extra>",
    });
    return data;
  }

  function layout() {
    const theme = (args && args.theme) || {};
    return {
      height: (args && args.height) || 360,
      margin: { l: 56, r: 12, t: 28, b: 44 },
      dragmode: false,  // our own pointer handlers do the dragging; no zoom/pan
      hovermode: "closest",
      showlegend: true,
      legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom", font: { size: 11 } },
      xaxis: { range: xRange(), title: { text: (args && args.x_label) || "relative depth (0 = first block, 1 = last)" },
               fixedrange: true, zeroline: false },
      yaxis: { range: yRange(), title: { text: (args && args.y_label) || "sparsity" }, fixedrange: true,
               zeroline: false },
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
      font: { color: theme.textColor || "#31333F" },
    };
  }

  const config = { displayModeBar: false, doubleClick: false, scrollZoom: false, responsive: true };

  function draw() {
    if (!args) return;
    Plotly.react(gd, traces(), layout(), config).then(() => { plotted = true; setHeight(); });
  }

  function redrawCurve() {
    // During a drag only the last trace changes: restyle it instead of re-building the figure.
    const sorted = points.map(shown).sort((a, b) => a[0] - b[0]);
    const idx = gd.data.length - 1;
    Plotly.restyle(gd, { x: [sorted.map((p) => p[0])], y: [sorted.map((p) => p[1])] }, [idx]);
  }

  // ---- gestures ----
  gd.addEventListener("pointerdown", (ev) => {
    if (!plotted || (args && args.disabled)) return;
    const i = nearest(ev.clientX, ev.clientY);
    if (i < 0) return;
    ev.preventDefault();
    ev.stopPropagation();
    if (ev.button === 2 || ev.shiftKey) {  // remove (keep at least two points)
      if (points.length > 2) {
        points.splice(i, 1);
        redrawCurve();
        sendPoints("remove");
      }
      return;
    }
    if (ev.button !== 0) return;
    dragIndex = i;
    moved = false;
  }, true);

  window.addEventListener("pointermove", (ev) => {
    if (dragIndex < 0) return;
    ev.preventDefault();
    points[dragIndex] = toData(ev.clientX, ev.clientY);
    moved = true;
    redrawCurve();
  }, true);

  window.addEventListener("pointerup", (ev) => {
    if (dragIndex < 0) return;
    if (moved) {
      points[dragIndex] = toData(ev.clientX, ev.clientY);
      redrawCurve();
      sendPoints("drag");
    }
    dragIndex = -1;
    moved = false;
  }, true);

  // A double click adds a point. Plotly's drag layer covers the plot during a press, so browsers
  // fire no "dblclick" there; the second "click" (detail === 2) is what arrives reliably.
  gd.addEventListener("click", (ev) => {
    if (ev.detail !== 2 || !plotted || (args && args.disabled) || nearest(ev.clientX, ev.clientY) >= 0) return;
    const p = toData(ev.clientX, ev.clientY);
    if (p[0] < 0 || p[0] > 1) return;  // outside the depth axis: not a meaningful place for a point
    ev.preventDefault();
    ev.stopPropagation();
    points.push(shown(p));
    redrawCurve();
    sendPoints("add");
  }, true);

  gd.addEventListener("contextmenu", (ev) => {
    if (nearest(ev.clientX, ev.clientY) >= 0) ev.preventDefault();
  }, true);

  // ---- Streamlit messages ----
  window.addEventListener("message", (ev) => {
    const msg = ev.data;
    if (!msg || msg.type !== "streamlit:render") return;
    args = Object.assign({}, msg.args || {}, { disabled: !!msg.disabled, theme: msg.theme });
    if (dragIndex < 0) {  // never yank a point out of the user's hand
      points = (args.points || []).map((p) => [Number(p[0]), Number(p[1])]);
    }
    draw();
  });
  window.addEventListener("resize", setHeight);

  // For tests and debugging: where the control points are on screen (client coordinates).
  window.curveEditor = {
    pointPixels: () => points.map((p) => toClient(p[0], p[1])),
    points: () => points.map((p) => p.slice()),
  };

  post("streamlit:componentReady", { apiVersion: 1 });
})();
