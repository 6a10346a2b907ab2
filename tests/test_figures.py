"""Figures that tell the truth about the data they draw (components/figures.py)."""
import math

import numpy as np
import pandas as pd
import pytest

from components.figures import alpha_depth_figure, block_bars_figure, esd_density, esd_figure, heatmap_figure


def test_esd_histogram_shows_empty_bins_as_gaps():
    """A lone eigenvalue far out must not look like a tail: the bins between it and the bulk are drawn
    below the axis range, not joined by a line across them."""
    eigs = np.concatenate([np.random.default_rng(0).uniform(1, 10, 500), [1e5]])
    edges, dens = esd_density(eigs)
    fig = esd_figure(eigs, alpha=3.0, xmin=5.0)
    hist = fig.data[0]
    bottom = 10 ** fig.layout.yaxis.range[0]
    y = np.asarray(hist.y)
    assert len(y) == 2 * len(dens) and (dens == 0).sum() > 40
    assert (y[np.repeat(dens == 0, 2)] < bottom).all() and (y[np.repeat(dens > 0, 2)] > bottom).all()
    assert fig.layout.xaxis.title.text == "eigenvalue λ of WᵀW"
    # the xmin label sits at xmin: on a log axis an annotation's x is log10 of the value
    (label,) = fig.layout.annotations
    assert label.text == "xmin" and label.x == math.log10(5.0)
    assert esd_figure(eigs, alpha=3.0, xmin=5.0, log=False).layout.annotations[0].x == 5.0
    assert esd_figure(eigs, x_title="λ of (1/N)·WᵀW").layout.xaxis.title.text == "λ of (1/N)·WᵀW"


def test_linear_esd_histogram_resolves_a_heavy_tailed_bulk():
    """On a linear axis, equal bins over the whole range put a heavy-tailed bulk into one spike; the
    bulk gets its own bins, and the density still integrates to 1."""
    rng = np.random.default_rng(0)
    eigs = np.concatenate([rng.uniform(0.5, 2.0, 990), 2.0 + rng.pareto(1.5, 10) * 50])
    edges, dens = esd_density(eigs, log=False)
    in_bulk = (edges[1:] <= 2.0) & (dens > 0)
    assert in_bulk.sum() >= 60  # equal bins over [0.5, max] would leave the bulk one or two
    assert np.sum(dens * np.diff(edges)) == pytest.approx(1.0)
    assert edges[-1] == pytest.approx(eigs.max()) and np.all(np.diff(edges) > 0)
    # a shuffled matrix (no tail) drawn over it takes its bins: its own would crowd a quarter of them into its top 1%
    shuffled = rng.uniform(0.5, 4.0, 1000)
    fig = esd_figure(eigs, log=False, randomized=shuffled, overlay=("another", rng.uniform(0.5, 300.0, 1000)))
    random_x, other_x = (np.unique(t.x) for t in fig.data[1:3])
    assert np.array_equal(random_x, edges)
    assert np.isin(edges, other_x).all() and other_x.max() == pytest.approx(300.0, rel=0.01)  # its bins reach on


def test_heatmap_cells_carry_their_matrix_for_a_click():
    """Streamlit reports clicks on scatter points, not on heatmap cells: every cell has a point whose
    customdata is its matrix, and the heatmap itself takes no hover."""
    metrics = pd.DataFrame({"name": [f"b{b}.{k}" for b in range(3) for k in ("q_proj", "up_proj")],
                            "block": [b for b in range(3) for _ in range(2)],
                            "kind": ["q_proj", "up_proj"] * 3, "alpha": [2.0, 3.0, 4.0, math.nan, 5.0, 6.0]})
    fig = heatmap_figure(pd.concat([metrics, pd.DataFrame({"name": ["embed"], "block": [-1], "kind": ["embed"],
                                                           "alpha": [1.0]})]))
    heat, points = fig.data
    assert heat.hoverinfo == "skip" and fig.layout.hoverdistance == -1
    cells = set(zip(points.x, points.y, points.customdata))
    want = {(b, k, f"b{b}.{k}") for b in range(3) for k in ("q_proj", "up_proj")} - {(1, "up_proj", "b1.up_proj")}
    assert cells == want  # the NaN cell has no point
    # a block's experts: the cell shows their median and opens the expert nearest it
    experts = pd.DataFrame({"name": [f"b0.experts.{e}.up_proj" for e in range(4)], "block": [0] * 4,
                            "kind": ["experts.up_proj"] * 4, "alpha": [1.5, 3.0, 4.0, 147.0]})
    heat, points = heatmap_figure(experts).data
    assert heat.z[0][0] == 3.5 and list(points.customdata) == ["b0.experts.1.up_proj"]
    assert points.text[0].startswith("3.500, the median of 4 (from 1.500 to 147.000)")


def test_depth_chart_draws_experts_as_points_and_few_blocks_as_whole_numbers():
    rows = [dict(name=f"b{b}.q_proj", block=b, kind="q_proj", alpha=3.0 + b) for b in range(3)]
    rows += [dict(name=f"b{b}.experts.{e}.up_proj", block=b, kind="experts.up_proj", alpha=2.0 + e)
             for b in range(3) for e in range(4)]
    fig = alpha_depth_figure(pd.DataFrame(rows))
    modes = {t.name: t.mode for t in fig.data}
    # no zigzag through the experts; the well-trained band is named in the legend, not over the first blocks' points
    assert modes == {"q_proj": "lines+markers", "experts.up_proj": "markers", "2 ≤ α ≤ 6": "markers"}
    assert not fig.layout.annotations
    assert fig.layout.xaxis.dtick == 1 and heatmap_figure(pd.DataFrame(rows)).layout.xaxis.dtick == 1
    heat = heatmap_figure(pd.DataFrame(rows)).data[0]  # α on HT-SR's bands, not on this model's range
    assert (heat.zmin, heat.zmax) == (1.0, 8.0)
    stops = [(round(at, 6), color) for at, color in heat.colorscale]  # purple up to α = 2, green to yellow to 6
    assert stops[1:5] == [(0.142857, "#998ec3"), (0.142857, "#1a9850"), (0.714286, "#fee08b"), (0.714286, "#fdae61")]
    assert block_bars_figure([0.4, 0.6], [10, 10]).layout.xaxis.dtick == 1  # a 2-block model: no block 0.5
    assert block_bars_figure([0.5] * 30, [10] * 30).layout.xaxis.dtick is None


def test_ppl_vs_sparsity_lines_are_told_apart_and_the_axis_is_labelled_in_full():
    """Two ε of one allocation method, and methods without a color of their own, get colors of their own; a
    lone line is named in a legend; perplexity ticks read as numbers (2k), not as Plotly's bare digits."""
    from components.figures import METHOD_COLORS, log_ticks, ppl_vs_sparsity_figure

    runs = pd.DataFrame({
        "label": ["wanda + alphapruning ε=0.2", "wanda + alphapruning ε=0.3", "magnitude + 2:4", "sparsegpt + n:m"],
        "method": ["wanda", "wanda", "magnitude", "sparsegpt"],
        "allocation_method": ["alphapruning", "alphapruning", "n:m", "n:m"],
        "achieved": [0.5, 0.5, 0.5, 0.5], "pruned_ppl": [90.0, 95.0, 1634.0, 300.0]})
    fig = ppl_vs_sparsity_figure(runs, x="achieved", y="pruned_ppl")
    colors = {t.name: t.line.color for t in fig.data}
    assert colors["wanda + alphapruning ε=0.2"] == METHOD_COLORS["alphapruning"]
    assert len(set(colors.values())) == 4
    assert len({t.line.dash for t in fig.data if t.name.startswith("wanda")}) == 1  # a dash per pruner
    assert len({t.line.dash for t in fig.data}) == 3
    assert fig.layout.yaxis.ticktext == ("100", "200", "500", "1k")
    assert ppl_vs_sparsity_figure(runs.head(1), x="achieved", y="pruned_ppl").layout.showlegend
    close = runs.assign(achieved=[0.49996, 0.50006, 0.5, 0.5])  # runs that pruned about the same share
    assert ppl_vs_sparsity_figure(close, x="achieved", y="pruned_ppl").layout.xaxis.range == pytest.approx(
        (0.45001, 0.55001))
    apart = runs.assign(achieved=[0.5, 0.6, 0.5, 0.5])
    assert ppl_vs_sparsity_figure(apart, x="achieved", y="pruned_ppl").layout.xaxis.range is None
    assert log_ticks(pd.Series([82.3, 92.9]))["ticktext"] == ["80", "90", "100"]
    assert log_ticks(pd.Series([45.0, 6e6]))["ticktext"] == ["100", "1k", "10k", "100k", "1M"]
    assert log_ticks(pd.Series([float("nan"), -1.0])) == {}


def test_live_perplexity_counts_whole_windows():
    from analysis.evaluation import PplUpdate
    from components.figures import ppl_figure

    one = [PplUpdate(windows_done=1, windows_total=1, ppl=45.8, nll_sum=3.8 * 512, tokens=512)]
    assert ppl_figure(one, one).layout.xaxis.dtick == 1
    many = [PplUpdate(windows_done=i, windows_total=40, ppl=45.8, nll_sum=3.8 * i, tokens=i) for i in range(1, 41)]
    assert ppl_figure(many).layout.xaxis.dtick is None
