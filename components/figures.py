"""Plotly figures for the dashboard pages (no streamlit import: pure data -> figure functions).

Conventions: eigenvalues are those of WᵀW as produced by analysis.spectra (unnormalized unless the
analysis said otherwise); depth is the block index divided by (n_blocks - 1); sparsity is the
fraction of weights set to zero.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image
from plotly import colors
from plotly.subplots import make_subplots

from analysis.allocation import block_depths
from analysis.spectra import ALPHA_BANDS

KIND_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHOD_COLORS = {"uniform": "#7f7f7f", "alphapruning": "#1f77b4", "farms": "#2ca02c", "owl": "#ff7f0e",
                 "custom": "#d62728"}
# lines past an allocation method's first (another ε, setup, pruner), and methods without a color of their own
@functools.cache
def favicon(size: int = 32) -> Image.Image:
    """The app's icon, drawn here (once: app.py asks on every rerun): a heavy-tailed histogram, bars falling as a
    power law. A named icon would be fetched from a font server the offline machines this runs on cannot reach."""
    icon = np.zeros((size, size, 4), dtype=np.uint8)
    bars = 6
    width = size // bars
    for b in range(bars):
        height = max(2, round((size - 2) * (1 + b) ** -1.2))
        icon[size - height:, b * width + 1:(b + 1) * width, :] = (31, 119, 180, 255)
    return Image.fromarray(icon, "RGBA")


PALETTE = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39",
           "#7b4173", "#3182bd", "#e6550d"]


def _layout(fig: go.Figure, height: int = 360, top: int = 40, **kw) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=50, r=10, t=top, b=40), **kw)
    return fig


def esd_density(eigs: np.ndarray, log: bool = True, bins: int | None = None,
                edges: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of the positive eigenvalues as a density: (bin edges, density per bin).

    log=True uses logarithmically spaced bins (what a log-log plot needs). log=False spends `bins` equal
    bins on the bulk (up to the 99th percentile) and a quarter as many log-spaced ones on the tail: equal
    bins over the whole range would put a heavy-tailed bulk into a spike at the first bin or two. The
    density is count / (n * bin width) either way, so it integrates to 1 over the positive eigenvalues.
    bins: by default one per 8 eigenvalues, from 20 to 80 (more would leave a small matrix's histogram a comb
    of empty bins). edges: another histogram's bins instead (an overlay on it), with log-spaced ones added past
    its last where these eigenvalues reach further.
    """
    x = np.asarray(eigs, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    if x.size == 0:
        return np.array([0.0, 1.0]), np.array([0.0])
    if edges is not None:
        if x.max() > edges[-1]:
            edges = np.concatenate([edges, np.geomspace(edges[-1], x.max(), 11)[1:]])
    else:
        edges = _own_edges(x, log, int(np.clip(x.size // 8, 20, 80)) if bins is None else bins)
    counts, edges = np.histogram(x, bins=edges)
    return edges, counts / (x.size * np.diff(edges))


def _own_edges(x: np.ndarray, log: bool, bins: int) -> np.ndarray:
    """esd_density's bins for the positive eigenvalues `x`."""
    lo, hi = x.min(), x.max()
    if hi <= lo:
        hi = lo * 1.01 + 1e-12
    bulk = float(np.quantile(x, 0.99))
    if log:
        return np.geomspace(lo, hi, bins + 1)
    if lo < bulk < hi:
        return np.concatenate([np.linspace(lo, bulk, bins + 1), np.geomspace(bulk, hi, bins // 4 + 1)[1:]])
    return np.linspace(lo, hi, bins + 1)


def _steps(edges: np.ndarray, dens: np.ndarray, floor: float) -> dict:
    """x, y of a histogram drawn as a step line over its bin edges, empty bins at `floor`."""
    return {"x": np.repeat(edges, 2)[1:-1], "y": np.repeat(np.where(dens > 0, dens, floor), 2)}


def esd_figure(eigs: np.ndarray, alpha: float | None = None, xmin: float | None = None, log: bool = True,
               mp: tuple[np.ndarray, np.ndarray] | None = None,
               randomized: np.ndarray | None = None, title: str = "",
               x_title: str = "eigenvalue λ of WᵀW", overlay: tuple[str, np.ndarray] | None = None) -> go.Figure:
    """ESD histogram with the fitted power law p(λ) ∝ λ^-alpha drawn over the tail λ >= xmin.

    The power-law line is scaled to the tail's share of the eigenvalues, so on the log-log plot it
    sits on the histogram: p(λ) = f · (alpha-1)/xmin · (λ/xmin)^-alpha, f = n_tail / n.
    mp: (x, density) of a Marchenko–Pastur curve; randomized: eigenvalues of the same matrix with its
    entries shuffled (what the layer would look like with no learned structure); overlay: (name,
    eigenvalues) of another ESD drawn as a line over this one (another layer, or this one pruned).
    """
    edges, dens = esd_density(eigs, log=log)
    # on a linear axis the overlays take this ESD's bins: their own would spend a quarter of them on their top 1%,
    # a comb where a shuffled matrix has no tail
    shared = None if log else edges
    oedges, odens = esd_density(overlay[1], log=log, edges=shared) if overlay is not None else (None, dens[:0])
    fig = go.Figure()
    keep = dens > 0
    drawn = np.concatenate([dens[keep], odens[odens > 0]])  # the densities the y axis shows
    # a log axis has no zero: empty bins are drawn down at `floor`, below the axis range, so a gap in
    # the spectrum (a lone outlier far out) shows as a gap instead of a line joining its neighbours
    floor = drawn.min() / 10 if log and keep.any() else 0.0
    if log:  # bars have no sensible width on a log axis: draw the histogram as a filled step line
        fig.add_trace(go.Scatter(
            **_steps(edges, dens, floor), mode="lines", fill="tozeroy", line=dict(color="#4c78a8", width=1),
            name="ESD",
            hovertemplate="λ %{x:.3g}<br>density %{y:.3g}<extra></extra>",
        ))
    else:
        fig.add_trace(go.Bar(
            x=0.5 * (edges[:-1] + edges[1:]), y=dens, width=np.diff(edges), name="ESD",
            marker_color="#4c78a8", marker_line_width=0, opacity=0.75,
            hovertemplate="λ %{x:.3g}<br>density %{y:.3g}<extra></extra>",
        ))
    x = np.asarray(eigs, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    if randomized is not None:
        redges, rdens = esd_density(randomized, log=log, edges=shared)
        fig.add_trace(go.Scatter(**_steps(redges, rdens, floor), mode="lines", line=dict(color="#9467bd", width=1.5),
                                 name="randomized"))
    if overlay is not None:
        fig.add_trace(go.Scatter(**_steps(oedges, odens, floor), mode="lines", line=dict(color="#ff7f0e", width=1.5),
                                 name=overlay[0]))
    if mp is not None:
        mx, my = mp
        mk = my > 0
        fig.add_trace(go.Scatter(x=mx[mk], y=my[mk], mode="lines", line=dict(color="#2ca02c", width=2),
                                 name="Marchenko–Pastur"))
    if alpha is not None and xmin is not None and math.isfinite(alpha) and math.isfinite(xmin) and x.size:
        tail = x[x >= xmin]
        f = tail.size / x.size
        lx = np.geomspace(xmin, max(x.max(), xmin * 1.01), 60)
        ly = f * (alpha - 1) / xmin * (lx / xmin) ** (-alpha)
        fig.add_trace(go.Scatter(x=lx, y=ly, mode="lines", line=dict(color="#d62728", width=2.5, dash="dash"),
                                 name=f"power law, α = {alpha:.2f}"))
        fig.add_vline(x=xmin, line=dict(color="#d62728", width=1, dash="dot"))
        # an annotation's x on a log axis is log10 of the value (add_vline's own label would put it at
        # 10^xmin and stretch the axis that far)
        # inside the plot's top, right of the line: above it the legend sits
        fig.add_annotation(x=math.log10(xmin) if log else xmin, y=1, yref="paper", yanchor="top", xanchor="left",
                           xshift=2, text="xmin", showarrow=False, font=dict(size=10, color="#d62728"),
                           bgcolor="rgba(255,255,255,0.7)")
    shown = np.concatenate([x, *(np.asarray(e, dtype=np.float64) for e in (randomized, overlay[1] if overlay else None)
                                 if e is not None)])
    fig.update_xaxes(type="log" if log else "linear", title=x_title, **(log_ticks(pd.Series(shown)) if log else {}))
    fig.update_yaxes(type="log" if log else "linear", title="density")
    if log and keep.any():
        lo, hi = drawn.min(), drawn.max()
        fig.update_yaxes(range=[math.log10(lo) - 0.5, math.log10(hi) + 0.5], **log_ticks(pd.Series([lo / 3, hi * 3])))
    fig.update_layout(bargap=0, legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))
    # a title above the legend: room for two rows of legend between them (four overlays wrap on a half-width panel)
    return _layout(fig, 380, top=95 if title else 40,
                   title=dict(text=title, y=0.98, font=dict(size=13)) if title else None)


def kind_order(kinds) -> list[str]:
    """The matrix kinds present in `kinds`, in KIND_ORDER (attention, then MLP), others after them by name."""
    present = set(kinds)
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def alpha_depth_figure(metrics: pd.DataFrame, metric: str = "alpha") -> go.Figure:
    """`metric` across depth (block index), one line per matrix kind; customdata = module name,
    so a clicked point tells which layer it is."""
    df = metrics[metrics["block"] >= 0]
    kinds = kind_order(df["kind"])
    fig = go.Figure()
    for kind in kinds:
        d = df[df["kind"] == kind].sort_values("block")
        several = d["block"].duplicated().any()  # a block's experts: points, not a line zigzagging through them
        fig.add_trace(go.Scatter(
            x=d["block"], y=d[metric], mode="markers" if several else "lines+markers", name=kind, customdata=d["name"],
            marker=dict(size=7), hovertemplate="%{customdata}<br>" + metric + " %{y:.3f}<extra></extra>",
        ))
    if metric == "alpha":
        low, high = ALPHA_BANDS
        fig.add_hrect(y0=low, y1=high, fillcolor="green", opacity=0.06, line_width=0)
        # named in the legend: a label inside the plot covered the points of the first blocks
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"{low:g} ≤ α ≤ {high:g}",
                                 marker=dict(symbol="square", size=12, color="rgba(0,128,0,0.2)"), hoverinfo="skip"))
    fig.update_xaxes(title="block (depth)", dtick=1 if df["block"].nunique() <= 16 else None)  # no block 0.5
    fig.update_yaxes(title=metric, type="log" if metric == "lambda_max" else None)  # a few λmax dwarf the rest
    fig.update_layout(clickmode="event+select", legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))
    return _layout(fig, 380)


def alpha_colors(low: float = ALPHA_BANDS[0], high: float = ALPHA_BANDS[1], top: float = 8.0) -> dict:
    """Heatmap colours that read α by HT-SR's bands on a fixed scale from 1 to `top`: purple below `low` (a very
    heavy tail: over-trained), green to yellow inside the band (well trained, the heavier the greener), orange to
    red above `high` (close to random). A colour scale fitted to one model's range would paint its smallest α the
    "best" colour even below 2."""
    at = [(v - 1.0) / (top - 1.0) for v in (low, high)]
    scale = [[0.0, "#542788"], [at[0], "#998ec3"], [at[0], "#1a9850"], [at[1], "#fee08b"], [at[1], "#fdae61"],
             [1.0, "#d73027"]]
    return dict(colorscale=scale, zmin=1.0, zmax=top, colorbar=dict(
        title="alpha", tickvals=[1.0, low, high, top], ticktext=["1", f"{low:g}", f"{high:g}", f"≥ {top:g}"]))


def heatmap_figure(metrics: pd.DataFrame, metric: str = "alpha") -> go.Figure:
    """Block × kind heatmap of `metric`, with an invisible marker on every cell whose customdata is the
    module name: Streamlit reports clicks on scatter points but not on heatmap cells, so the markers
    take the hover and the click (the nearest cell's, wherever the pointer is). A cell of several
    matrices (a block's experts) shows their median, its hover their count and range, and its click opens
    the matrix nearest the median."""
    df = metrics[metrics["block"] >= 0]
    kinds = kind_order(df["kind"])
    blocks = sorted(df["block"].unique())
    z = df.pivot_table(index="kind", columns="block", values=metric, aggfunc="median").reindex(index=kinds,
                                                                                              columns=blocks)
    fig = go.Figure(go.Heatmap(
        z=z.to_numpy(dtype=float), x=blocks, y=kinds, hoverinfo="skip",
        **(alpha_colors() if metric == "alpha" else
           dict(colorscale="RdYlGn_r" if metric == "alpha_hat" else "Viridis", colorbar=dict(title=metric))),
    ))
    known = df.dropna(subset=[metric])
    cell = known.groupby(["kind", "block"])[metric]
    known = known.assign(cell_median=cell.transform("median"), cell_n=cell.transform("count"),
                         cell_lo=cell.transform("min"), cell_hi=cell.transform("max"))
    cells = (known.assign(cell_off=(known[metric] - known["cell_median"]).abs())
             .sort_values("cell_off", kind="stable").drop_duplicates(["kind", "block"]))
    text = [f"{r.cell_median:.3f}" if r.cell_n == 1 else
            f"{r.cell_median:.3f}, the median of {r.cell_n} (from {r.cell_lo:.3f} to {r.cell_hi:.3f})"
            for r in cells.itertuples()]
    fig.add_trace(go.Scatter(
        x=cells["block"], y=cells["kind"], customdata=cells["name"], mode="markers", showlegend=False,
        marker=dict(size=12, opacity=0), text=text,
        hovertemplate="%{customdata}<br>" + metric + " %{text}<extra></extra>",
    ))
    fig.update_xaxes(title="block", dtick=1 if len(blocks) <= 16 else None)
    fig.update_layout(hoverdistance=-1)
    return _layout(fig, 300)


def allocation_overlay(per_block: list[float], name: str, color: str | None = None, dash: str = "dot") -> dict:
    """An overlay line for the curve editor: a per-block allocation drawn at block depths."""
    d = block_depths(len(per_block))
    return {"name": name, "x": d.tolist(), "y": [float(v) for v in per_block], "color": color, "dash": dash}


def block_bars_figure(per_block: list[float], params: list[int], target: float | None = None) -> go.Figure:
    """Per-block sparsity bars; hover shows the block's prunable parameters and pruned weights."""
    blocks = np.arange(len(per_block))
    p = np.asarray(params, dtype=float)
    r = np.asarray(per_block, dtype=float)
    fig = go.Figure(go.Bar(
        x=blocks, y=r, customdata=np.stack([p, p * r], axis=1), marker_color="#d62728",
        name="applied sparsity",
        hovertemplate="block %{x}<br>sparsity %{y:.3f}<br>params %{customdata[0]:,.0f}"
                      "<br>pruned %{customdata[1]:,.0f}<extra></extra>",
    ))
    if target is not None:
        fig.add_hline(y=target, line=dict(color="black", dash="dash", width=1),
                      annotation_text=f"target {target:.0%}", annotation_position="top right",
                      annotation_bgcolor="rgba(255,255,255,0.8)")  # readable over a bar
    fig.update_xaxes(title="block", dtick=1 if len(per_block) <= 16 else None)  # no ticks between two blocks
    fig.update_yaxes(title="sparsity", range=[0, max(1.0, float(r.max(initial=0)) * 1.05)])
    return _layout(fig, 280)


def ppl_figure(updates: list, dense: list | None = None) -> go.Figure:
    """Running perplexity vs windows evaluated, for the pruned weights and the dense baseline.

    updates / dense: sequences of objects with .windows_done and .ppl (analysis.evaluation.PplUpdate).
    """
    fig = go.Figure()
    if dense:
        fig.add_trace(go.Scatter(x=[u.windows_done for u in dense], y=[u.ppl for u in dense],
                                 mode="lines+markers", name="dense baseline", line=dict(color="#7f7f7f")))
    if updates:
        fig.add_trace(go.Scatter(x=[u.windows_done for u in updates], y=[u.ppl for u in updates],
                                 mode="lines+markers", name="this run", line=dict(color="#d62728")))
    done = max([u.windows_done for u in [*(dense or []), *(updates or [])]], default=0)
    fig.update_xaxes(title="evaluation windows done", dtick=1 if done <= 16 else None,  # no window 0.5
                     range=None if done else [0, 4])  # (nothing yet: no axis from -1, no negative perplexity)
    fig.update_yaxes(title="running perplexity", rangemode="nonnegative")
    fig.update_layout(legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))
    return _layout(fig, 320)


def ppl_vs_sparsity_figure(runs: pd.DataFrame, x: str = "sparsity", y: str = "ppl", color: str = "label",
                           hue: str = "allocation_method", dash: str = "method") -> go.Figure:
    """One line per value of `color` (e.g. "wanda + alphapruning ε=0.3"): perplexity against sparsity (log y,
    labelled in full). Each line has a color of its own, its allocation method's (`hue`) for the method's first
    line, and a dash per pruning method (`dash`); the legend names every line, even a lone one."""
    fig = go.Figure()
    dashes: dict[str, str] = {}
    colors: dict[str, str] = {}
    for label, d in runs.groupby(color, sort=True):
        d = d.sort_values(x)
        style = dashes.setdefault(str(d[dash].iloc[0]), ["solid", "dash", "dot", "dashdot"][len(dashes) % 4])
        fig.add_trace(go.Scatter(x=d[x], y=d[y], mode="lines+markers", name=str(label),
                                 line=dict(color=line_color(colors, label, str(d[hue].iloc[0])), dash=style)))
    fig.update_xaxes(title="sparsity", range=_close_values_range(runs[x]))
    fig.update_yaxes(title="perplexity", type="log", **log_ticks(runs[y]))
    return _layout(fig, 360, showlegend=True)


def line_color(colors: dict[str, str], label: str, method: str) -> str:
    """The color of line `label` (kept in `colors`, label -> color): the allocation `method`'s own for the
    first line that takes it, the palette's next unused one for the others, so no two lines share one."""
    if label not in colors:
        own = METHOD_COLORS.get(method)
        free = [c for c in PALETTE if c not in colors.values()] or PALETTE
        colors[label] = own if own and own not in colors.values() else free[0]
    return colors[label]


def log_ticks(values: pd.Series) -> dict:
    """tickvals/ticktext for a log axis over `values`, in full (20, 50, 100, 2k, 5M): Plotly labels the ticks
    between powers of ten with their first digit alone ("2", "5"), which reads as another number. The sparsest
    of powers of ten, steps of 1-2-5 and every digit that gives four ticks (else every digit); {} (Plotly's own)
    for no positive values."""
    v = pd.to_numeric(pd.Series(values), errors="coerce")
    v = v[(v > 0) & np.isfinite(v)]
    if v.empty:
        return {}
    lo, hi = float(v.min()) / 1.15, float(v.max()) * 1.15
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    options = [[d * 10.0 ** e for e in decades for d in digits if lo <= d * 10.0 ** e <= hi]
               for digits in ((1,), (1, 2, 5), range(1, 10))]
    ticks = next((t for t in options if len(t) >= 4), options[-1])
    return {"tickvals": ticks, "ticktext": [_short(t) for t in ticks]} if len(ticks) >= 2 else {}


def _short(value: float) -> str:
    """20, 500, 2k, 1.5M: a perplexity tick's label."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _close_values_range(values: pd.Series) -> list[float] | None:
    """An axis range around the only value of `values`, or values within 0.01 of each other (runs that pruned
    0.49996 and 0.50006 of their weights): Plotly's own spans ±0.5 for one value (sparsity -0.5 to 1.5), and ticks
    of 0.00002 for close ones. None (automatic) for values further apart."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    if v.empty or v.max() - v.min() >= 0.01:
        return None
    mid = float(v.max() + v.min()) / 2
    return [mid - 0.05, mid + 0.05]


def curves_figure(curves: list[tuple[str, list[float]]]) -> go.Figure:
    """Allocation curves (per-block sparsity over depth) overlaid, one per (label, per_block)."""
    fig = go.Figure()
    for label, per_block in curves:
        fig.add_trace(go.Scatter(x=block_depths(len(per_block)), y=per_block, mode="lines+markers", name=label))
    fig.update_xaxes(title="relative depth")
    fig.update_yaxes(title="sparsity")
    # Plotly's qualitative colours: Streamlit's own palette starts dark blue, light blue, which two runs' curves get
    return _layout(fig, 360, colorway=colors.qualitative.Plotly)


def pareto_front(points: pd.DataFrame, x: str = "sparsity", y: str = "ppl") -> pd.DataFrame:
    """The points no other point beats on both counts (a higher or equal `x`, sparsity, with a lower
    or equal `y`, perplexity), sorted by `x`."""
    best = math.inf
    keep = []
    for i, row in points.sort_values([x, y], ascending=[False, True]).iterrows():
        if row[y] < best:
            best = row[y]
            keep.append(i)
    return points.loc[keep].sort_values(x)


def model_names(models) -> dict[str, str]:
    """How charts name each model source: its folder's (or hub id's) last part, or the whole source where two
    sources share that last part (two folders named `checkpoint` must not become one model)."""
    models = [str(m) for m in dict.fromkeys(models)]
    short = {m: Path(m).name or m for m in models}
    taken = pd.Series(list(short.values())).value_counts()
    return {m: name if taken[name] == 1 else m for m, name in short.items()}


def sweep_figure(runs: pd.DataFrame) -> go.Figure:
    """A sweep's perplexity vs target sparsity: one panel per pruner (`method`), one line per
    `allocation` (label) through the mean over calibration seeds, bars from the lowest to the
    highest seed, and the panel's Pareto front over those means as a dashed black line (log y).

    runs: one row per run with method, allocation, sparsity (target), pruned_ppl (NaN dropped), and optionally
    model and setup (analysis.sweep.setup_label): runs of several models get a panel per model and pruner,
    runs of several setups a line per allocation and setup, so only seeds are ever averaged."""
    runs = runs.dropna(subset=["pruned_ppl"])
    if "model" in runs and runs["model"].nunique() > 1:
        names = model_names(runs["model"])
        runs = runs.assign(method=runs["model"].astype(str).map(names) + " · " + runs["method"].astype(str))
    if "setup" in runs and runs["setup"].nunique() > 1:
        runs = runs.assign(allocation=runs["allocation"].astype(str) + " (" + runs["setup"].astype(str) + ")")
    methods = sorted(runs["method"].astype(str).unique())
    fig = make_subplots(rows=1, cols=max(1, len(methods)), shared_yaxes=True, subplot_titles=methods,
                        horizontal_spacing=0.04)
    colors: dict[str, str] = {}  # allocation label -> color, the same in every panel (one legend entry)
    for col, method in enumerate(methods, start=1):
        stats = (runs[runs["method"].astype(str) == method].groupby(["allocation", "sparsity"])["pruned_ppl"]
                 .agg(["mean", "min", "max", "count"]).reset_index())
        for label, d in stats.groupby("allocation", sort=True):
            first = label not in colors
            color = line_color(colors, label, str(label).split(" ")[0])  # e.g. "alphapruning ε=0.3"
            fig.add_trace(go.Scatter(
                x=d["sparsity"], y=d["mean"], mode="lines+markers", name=str(label), legendgroup=str(label),
                showlegend=first, line=dict(color=color),
                error_y=dict(type="data", symmetric=False, array=d["max"] - d["mean"],
                             arrayminus=d["mean"] - d["min"], thickness=1),
                customdata=d[["min", "max", "count"]],
                hovertemplate="sparsity %{x}<br>mean %{y:.3f} (min %{customdata[0]:.3f}, max %{customdata[1]:.3f}, "
                              "%{customdata[2]} seeds)"), row=1, col=col)
        front = pareto_front(stats.rename(columns={"mean": "ppl"}), "sparsity", "ppl")
        fig.add_trace(go.Scatter(x=front["sparsity"], y=front["ppl"], mode="lines+markers", name="Pareto front",
                                 marker=dict(symbol="circle-open", size=12, color="black"),
                                 legendgroup="pareto", showlegend=col == 1, hoverinfo="skip",
                                 line=dict(color="black", dash="dash", width=1)), row=1, col=col)
        fig.update_xaxes(title="target sparsity", range=_close_values_range(stats["sparsity"]), row=1, col=col)
    fig.update_yaxes(title="perplexity", type="log", row=1, col=1)
    fig.update_yaxes(type="log", **log_ticks(runs["pruned_ppl"]))  # (the bars span every seed's)
    return _layout(fig, 400)
