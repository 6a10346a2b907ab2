"""Layerwise allocation: exact budgets, the published AlphaPruning/OWL maps, custom curves, JSON."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.allocation import (
    MAX_RATIO,
    Allocation,
    AllocationError,
    allocate,
    block_offsets,
    block_table,
    budget,
    control_points,
    curve_of,
    curve_values,
    custom_allocation,
    exact_budget,
    kind_offsets,
    parse_points,
    set_kind_offset,
    within_block_spread,
)

ROOT = Path(__file__).resolve().parents[1]
SMOL_SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
               "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def metrics_frame(block_alphas, shapes=None, per_matrix=None):
    """A metrics table by hand: one row per matrix; alpha = the block's value unless per_matrix gives it."""
    shapes = shapes or {"w": (10, 10)}
    rows = []
    for b, a in enumerate(block_alphas):
        for j, (kind, (r, c)) in enumerate(shapes.items()):
            alpha = per_matrix[b][j] if per_matrix is not None else a
            rows.append(dict(name=f"model.layers.{b}.{kind}", block=b, kind=kind, params=r * c, prunable=True,
                             alpha=alpha, status="ok"))
    return pd.DataFrame(rows)


def smol_like(seed=0):
    rng = np.random.default_rng(seed)
    alphas = rng.uniform(2, 8, size=(30, len(SMOL_SHAPES)))
    return metrics_frame([0] * 30, SMOL_SHAPES, per_matrix=alphas)


def ratios_of(alloc, df):
    return np.array([alloc.per_layer[n] for n in df["name"]])


# ------------------------------------------------------------------ exact budget


@settings(max_examples=150, deadline=None)
@given(
    ratios=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=60),
    data=st.data(),
    target=st.floats(0, 0.95),
    mode=st.sampled_from(["scale", "shift"]),
)
def test_exact_budget_hits_target_within_bounds_and_keeps_order(ratios, data, target, mode):
    params = data.draw(st.lists(st.integers(1, 10_000_000), min_size=len(ratios), max_size=len(ratios)))
    out = exact_budget(ratios, params, target, mode=mode)
    assert abs(budget(out, params) - target) < 1e-6
    assert np.all(out >= 0) and np.all(out <= MAX_RATIO)
    r = np.asarray(ratios)
    i, j = np.meshgrid(np.arange(r.size), np.arange(r.size))
    higher = r[i] > r[j]
    assert np.all(out[i][higher] >= out[j][higher] - 1e-12)


def test_exact_budget_is_one_multiplication_when_nothing_clips():
    r, p = np.array([0.2, 0.4, 0.6]), np.array([1.0, 2.0, 3.0])
    out = exact_budget(r, p, 0.5)
    np.testing.assert_allclose(out, r * 0.5 * p.sum() / (p * r).sum(), rtol=0, atol=1e-15)


def test_exact_budget_redistributes_what_clipping_removes():
    # naive scaling to 0.8 would give 0.8 * 1.3 / 1.0 -> above 1; the excess must go to the others
    r, p = np.array([0.7, 1.0, 1.3]), np.ones(3)
    naive = r * 0.8 / r.mean()
    assert naive.max() > 1
    out = exact_budget(r, p, 0.8)
    assert out.max() == pytest.approx(MAX_RATIO)
    assert out.mean() == pytest.approx(0.8, abs=1e-9)
    assert out[0] < out[1] < out[2]


def test_exact_budget_zero_ratios_fall_back_to_shift():
    out = exact_budget([0.0, 0.0, 0.5], [1, 1, 1], 0.9)
    assert budget(out, [1, 1, 1]) == pytest.approx(0.9, abs=1e-9)
    assert out[0] == out[1] < out[2]


@pytest.mark.parametrize("bad, word", [(1.3, "outside"), (float("nan"), "finite"), (-0.1, "outside"),
                                       (float("inf"), "finite"), ("0.5", "number")])
def test_exact_budget_rejects_bad_targets(bad, word):
    with pytest.raises(ValueError, match=f"sparsity.*{word}"):
        exact_budget([0.5, 0.5], [1, 1], bad)


def test_exact_budget_rejects_bad_arrays():
    with pytest.raises(ValueError, match="same length"):
        exact_budget([0.5], [1, 2], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        exact_budget([0.5, float("nan")], [1, 2], 0.5)
    with pytest.raises(ValueError, match="params"):
        exact_budget([0.5, 0.5], [0, 0], 0.5)


# ------------------------------------------------------------------ alphapruning


def paper_ratios(values, s, eps, params):
    """AlphaPruning as written in the paper: linear map onto [S(1-eps), S(1+eps)], then one scale factor."""
    v = np.asarray(values, float)
    r = s * (1 - eps) + 2 * s * eps * (v - v.min()) / (v.max() - v.min())
    return r * s * np.sum(params) / np.sum(params * r)


def test_alphapruning_equals_published_formula_evenly_spaced():
    df = metrics_frame([2.0, 3.0, 4.0, 5.0])
    a = allocate(df, 0.5, epsilon=0.2)
    # evenly spaced alphas and equal sizes: the map already has mean S, the scale factor is 1
    np.testing.assert_allclose(a.per_block, [0.4, 0.4 + 0.2 / 3, 0.6 - 0.2 / 3, 0.6], atol=1e-12)
    assert a.achieved == pytest.approx(0.5, abs=1e-12)


def test_alphapruning_equals_published_formula_with_block_means_and_unequal_sizes():
    per_matrix = [[2.0, 3.0], [2.2, 2.8], [4.0, 6.0], [3.1, 2.9], [2.0, 2.1]]
    df = metrics_frame([0] * 5, {"small": (4, 8), "big": (16, 8)}, per_matrix=per_matrix)
    a = allocate(df, 0.6, epsilon=0.25)
    block_means = np.mean(per_matrix, axis=1)
    block_params = np.full(5, 4 * 8 + 16 * 8)
    np.testing.assert_allclose(a.per_block, paper_ratios(block_means, 0.6, 0.25, block_params), atol=1e-12)
    assert a.params == {"epsilon": 0.25, "metric": "alpha", "granularity": "block"}


def test_alphapruning_layer_granularity_equals_formula_per_matrix():
    df = smol_like(1)
    a = allocate(df, 0.5, epsilon=0.3, granularity="layer")
    expected = paper_ratios(df["alpha"], 0.5, 0.3, df["params"].to_numpy(float))
    np.testing.assert_allclose(ratios_of(a, df), expected, atol=1e-12)


def test_higher_alpha_gets_more_sparsity():
    a = allocate(metrics_frame([6.0, 2.0, 4.0]), 0.5)
    assert a.per_block[1] < a.per_block[2] < a.per_block[0]


def test_high_sparsity_stays_below_cap_with_exact_budget():
    df = smol_like(2)
    for g in ("block", "layer"):
        a = allocate(df, 0.8, epsilon=0.3, granularity=g)
        r = ratios_of(a, df)
        assert r.max() <= MAX_RATIO and r.min() >= 0
        assert r.max() == pytest.approx(MAX_RATIO)  # it did clip: 0.8 * 1.3 > 0.99
        assert a.achieved == pytest.approx(0.8, abs=1e-9)
        assert max(a.per_block) <= MAX_RATIO


def _block_granularity_inputs():
    return st.integers(1, 25).flatmap(lambda n: st.tuples(
        st.lists(st.floats(1.0, 12.0), min_size=n, max_size=n),
        st.lists(st.integers(1, 5_000_000), min_size=n, max_size=n),
    ))


@settings(max_examples=120, deadline=None)
@given(inp=_block_granularity_inputs(), target=st.floats(0, 0.95), eps=st.floats(0, 0.99),
       granularity=st.sampled_from(["block", "layer"]))
def test_alphapruning_budget_exact_and_order_preserving(inp, target, eps, granularity):
    alphas, sizes = inp
    rows = [dict(name=f"b{i}.{k}", block=i, params=sz * (k + 1), prunable=True, alpha=a + 0.1 * k, status="ok")
            for i, (a, sz) in enumerate(zip(alphas, sizes)) for k in range(2)]
    df = pd.DataFrame(rows)
    a = allocate(df, target, epsilon=eps, granularity=granularity)
    r = ratios_of(a, df)
    assert abs(a.achieved - target) < 1e-4
    assert abs(budget(r, df["params"]) - target) < 1e-4
    assert np.all(r >= 0) and np.all(r <= MAX_RATIO)
    score = df.groupby("block")["alpha"].transform("mean") if granularity == "block" else df["alpha"]
    s = score.to_numpy()
    i, j = np.meshgrid(np.arange(len(s)), np.arange(len(s)))
    higher = s[i] > s[j] + 1e-9
    assert np.all(r[i][higher] >= r[j][higher] - 1e-12)


def test_farms_uses_same_mapping_and_records_method():
    df = metrics_frame([3.0, 5.0, 4.0])
    a, f = allocate(df, 0.6, method="alphapruning"), allocate(df, 0.6, method="farms")
    assert f.method == "farms" and a.method == "alphapruning"
    assert f.per_layer == a.per_layer


def test_other_metrics_follow_their_direction():
    df = metrics_frame([3.0, 5.0, 4.0]).assign(stable_rank=[30.0, 10.0, 20.0])
    a = allocate(df, 0.5, metric="stable_rank")
    assert a.per_block[1] < a.per_block[2] < a.per_block[0]
    assert a.params["metric"] == "stable_rank"


def test_failed_fits_fall_back_to_mean_with_warning():
    df = metrics_frame([2.0, 4.0, 6.0, 0.0])
    df.loc[3, "alpha"] = float("nan")
    df.loc[3, "status"] = "too few eigenvalues"
    a = allocate(df, 0.5)
    assert a.per_block[3] == pytest.approx(a.per_block[1])  # mean of 2, 4, 6 is 4
    assert any("model.layers.3.w" in w for w in a.warnings)
    df2 = metrics_frame([2.0, 4.0]).assign(status="fit failed")
    with pytest.raises(ValueError, match="no valid alpha"):
        allocate(df2, 0.5)


def test_ratios_pushed_to_the_cap_by_the_budget_are_named():
    """A spread that the budget rescale pushes past 99% is clipped there (the others pruned more to keep the budget):
    the allocation says which blocks, so "exact budget" does not hide a flattened curve."""
    df = metrics_frame(list(np.linspace(2.0, 6.0, 12)))
    high = allocate(df, 0.85, epsilon=0.3)
    capped = [b for b, r in enumerate(high.per_block) if r >= MAX_RATIO - 1e-9]
    assert capped and high.achieved == pytest.approx(0.85, abs=1e-12)
    (warning,) = high.warnings
    blocks = ", ".join(map(str, capped))
    assert warning.startswith(f"{len(capped)} of 12 matrices (blocks {blocks}) reached the 99% cap")
    assert not allocate(df, 0.5, epsilon=0.3).warnings  # within the cap: nothing to say
    assert not allocate(df, MAX_RATIO, method="uniform").warnings  # every matrix at the cap, as asked
    curve = custom_allocation([(0, 0.99), (1, 0.2)], df, normalize=False)
    assert not curve.warnings  # drawn at the cap by hand, applied as drawn


def test_uniform_and_non_prunable_rows():
    df = smol_like(3)
    extra = pd.DataFrame([dict(name="model.embed_tokens", block=-1, kind="embed_tokens", params=10**7,
                               prunable=False, alpha=9.0, status="ok")])
    df = pd.concat([df, extra], ignore_index=True)
    for method in ("uniform", "alphapruning"):
        a = allocate(df, 0.7, method=method, model="default")
        assert "model.embed_tokens" not in a.per_layer and len(a.per_layer) == 210
        assert len(a.per_block) == 30 and a.model == "default"
    assert set(allocate(df, 0.7, method="uniform").per_layer.values()) == {0.7}


@pytest.mark.parametrize("kwargs, word", [
    (dict(sparsity=1.3), "sparsity = 1.3 is outside"),
    (dict(sparsity=float("nan")), "sparsity must be a finite number"),
    (dict(sparsity=0.5, epsilon=1.5), "epsilon = 1.5 is outside"),
    (dict(sparsity=0.5, epsilon=float("nan")), "epsilon"),
    (dict(sparsity=0.5, method="random"), "unknown method 'random'"),
    (dict(sparsity=0.5, metric="beta"), "unknown metric 'beta'"),
    (dict(sparsity=0.5, granularity="row"), "granularity"),
    (dict(sparsity=0.5, method="owl"), "outlier_ratios"),
    (dict(sparsity=0.5, method="owl", outlier_ratios={0: 0.1}), "lacks block"),
    (dict(sparsity=0.5, method="owl", outlier_ratios={0: 0.1, 1: 0.2, 2: float("nan")}), "block 2"),
])
def test_bad_inputs_raise_clear_errors(kwargs, word):
    with pytest.raises(ValueError, match=word.replace("(", r"\(")):
        allocate(metrics_frame([2.0, 3.0, 4.0]), **kwargs)


def test_bad_metrics_tables():
    with pytest.raises(ValueError, match="lacks column.*alpha"):
        allocate(metrics_frame([2.0]).drop(columns="alpha"), 0.5)
    with pytest.raises(ValueError, match="no prunable"):
        allocate(metrics_frame([2.0]).assign(prunable=False), 0.5)
    with pytest.raises(ValueError, match="DataFrame"):
        allocate([1, 2], 0.5)


# ------------------------------------------------------------------ OWL


def test_owl_more_outliers_less_sparsity_and_published_shift():
    df = metrics_frame([0, 0, 0, 0])
    outliers = {0: 0.02, 1: 0.08, 2: 0.05, 3: 0.03}
    a = allocate(df, 0.6, method="owl", outlier_ratios=outliers, owl_lambda=0.08)
    d = np.array([outliers[b] for b in range(4)])
    # OWL: density = 1 - S + normalized outliers in [0, 2 lambda] centred on the mean; sparsity = 1 - density
    dens = (d - d.min()) / (d.max() - d.min()) * 2 * 0.08
    expected = 1 - (dens - dens.mean() + (1 - 0.6))
    np.testing.assert_allclose(a.per_block, expected, atol=1e-12)
    assert np.argmin(a.per_block) == 1 and np.argmax(a.per_block) == 0
    assert a.achieved == pytest.approx(0.6, abs=1e-12)


def test_owl_budget_exact_at_high_sparsity():
    df = smol_like(4)
    rng = np.random.default_rng(0)
    a = allocate(df, 0.95, method="owl", outlier_ratios={b: rng.uniform(0, 0.1) for b in range(30)}, owl_lambda=0.2)
    r = ratios_of(a, df)
    assert r.max() <= MAX_RATIO and a.achieved == pytest.approx(0.95, abs=1e-9)


# ------------------------------------------------------------------ custom curves


def test_custom_as_drawn_reports_implied_budget():
    df = metrics_frame([0] * 11)
    a = custom_allocation([(0, 0.2), (1, 0.8)], df, normalize=False)
    np.testing.assert_allclose(a.per_block, np.linspace(0.2, 0.8, 11), atol=1e-12)  # two points: a line
    assert a.achieved == pytest.approx(0.5) and a.sparsity == pytest.approx(0.5)
    b = custom_allocation([(0, 0.2), (1, 0.8)], df, sparsity=0.7, normalize=False)
    assert b.sparsity == 0.7 and b.achieved == pytest.approx(0.5)


def test_custom_normalized_hits_target_and_keeps_shape():
    df = smol_like(5)
    pts = [(0, 0.3), (0.4, 0.5), (0.6, 0.9), (1, 0.95)]
    drawn = custom_allocation(pts, df, normalize=False)
    norm = custom_allocation(pts, df, sparsity=0.6, normalize=True)
    assert norm.achieved == pytest.approx(0.6, abs=1e-9)
    assert drawn.achieved > 0.6
    assert np.all(np.diff(drawn.per_block) >= -1e-12) and np.all(np.diff(norm.per_block) >= -1e-12)
    assert max(norm.per_block) <= MAX_RATIO


def test_a_flat_zero_curve_normalized_says_it_has_no_shape():
    """A curve dragged to 0 everywhere has nothing to scale: the target is spread evenly, and the user is told."""
    df = smol_like(5)
    a = custom_allocation([(0, 0.0), (1, 0.0)], df, sparsity=0.5, normalize=True)
    assert a.achieved == pytest.approx(0.5, abs=1e-9) and a.per_block == pytest.approx([0.5] * len(a.per_block))
    assert any("prunes nothing" in w for w in a.warnings)
    assert not custom_allocation([(0, 0.1), (1, 0.2)], df, sparsity=0.5, normalize=True).warnings
    assert not custom_allocation([(0, 0.0), (1, 0.0)], df, normalize=False).warnings


def test_custom_curve_is_the_drawn_segments_and_clamped():
    """The editor draws straight segments between the points: the applied ratios lie on them."""
    pts = [(0.2, 0.1), (0.5, 0.6), (0.8, 0.6), (1.0, 0.7)]
    d = np.linspace(0, 1, 501)
    v = curve_values(pts, d)
    assert np.all(np.diff(v) >= -1e-12)  # no overshoot on the flat piece, no dip anywhere
    assert v[d <= 0.2].tolist() == [0.1] * int(np.sum(d <= 0.2))
    assert np.all(np.abs(v[(d >= 0.5) & (d <= 0.8)] - 0.6) < 1e-12)
    assert curve_values(pts, [0.35, 0.9]) == pytest.approx([0.35, 0.65])  # halfway along two segments
    valley = [(0.0, 0.6), (0.47, 0.0), (1.0, 0.6)]  # a point dragged to the bottom: a V, not a rounded dip
    assert curve_values(valley, [0.53]) == pytest.approx([0.6 * 0.06 / 0.53])


def test_custom_points_cleaned_with_warnings():
    df = metrics_frame([0] * 5)
    a = custom_allocation([(1.2, 0.5), (0, 1.5), (0.5, 0.2), (0.5, 0.4)], df, normalize=False)
    np.testing.assert_allclose(a.params["points"], [[0.0, 0.99], [0.5, 0.3], [1.0, 0.5]], atol=1e-12)
    assert len(a.warnings) == 3
    one = custom_allocation([(0.3, 0.4)], df, sparsity=0.4)
    assert one.per_block == pytest.approx([0.4] * 5)


def test_custom_bad_points():
    df = metrics_frame([0] * 3)
    with pytest.raises(ValueError, match="NaN"):
        custom_allocation([(0, float("nan"))], df, 0.5)
    with pytest.raises(ValueError, match="at least one"):
        custom_allocation([], df, 0.5)
    with pytest.raises(ValueError, match="needs a target"):
        custom_allocation([(0, 0.5)], df)
    with pytest.raises(ValueError, match="pairs"):
        custom_allocation([(0, "x")], df, 0.5)
    assert parse_points("0:0.5, 0.5:0.7,1:0.8") == [(0, 0.5), (0.5, 0.7), (1, 0.8)]
    with pytest.raises(ValueError, match="bad control point '0.5'"):
        parse_points("0:0.5,0.5")


# ------------------------------------------------------------------ tables and JSON


def test_block_table():
    df = metrics_frame([0, 0], {"a": (2, 3), "b": (4, 5)}, per_matrix=[[2.0, 4.0], [3.0, float("nan")]])
    t = block_table(df)
    assert t["block"].tolist() == [0, 1] and t["params"].tolist() == [26, 26]
    assert t["metric_mean"].tolist() == [3.0, 3.0] and t["n_matrices"].tolist() == [2, 2]


def test_json_round_trip(tmp_path):
    a = allocate(smol_like(6), 0.7, epsilon=0.3, model="default")
    path = a.save(tmp_path / "sub" / "alloc.json")
    raw = json.loads(path.read_text())
    assert set(raw) >= {"model", "sparsity", "method", "params", "per_block", "per_layer", "achieved", "version"}
    b = Allocation.load(path)
    assert b == a
    with pytest.raises(AllocationError, match=r"sub is a folder: give the allocation a file name, e\.g\. .*alloc"):
        a.save(tmp_path / "sub")
    # a folder is named as one; a saved model's (--save-model) points at the allocation it holds
    with pytest.raises(AllocationError, match=r"sub is a folder, not an allocation JSON$"):
        Allocation.load(tmp_path / "sub")
    a.save(tmp_path / "saved-model" / "allocation.json")
    with pytest.raises(AllocationError, match=r"saved-model is a folder; give .*saved-model/allocation\.json, the "):
        Allocation.load(tmp_path / "saved-model")
    # a run record (prune --out) names the allocation its run pruned with: that is the one it loads as
    record = tmp_path / "run.json"
    record.write_text(json.dumps({"config": {"method": "wanda"}, "allocation": raw, "pruned_ppl": 12.0}))
    from_record = Allocation.load(record)  # with how that run pruned with it (allocation_caveats compares it)
    assert from_record.params.pop("run") == {"pruner": "wanda", "rowwise": None} and from_record == a


@pytest.mark.parametrize("patch, word", [
    (lambda d: d.pop("per_layer"), "missing key.*per_layer"),
    (lambda d: d.__setitem__("per_layer_typo", {}), r"unknown key\(s\): per_layer_typo \(an allocation has format, "),
    (lambda d: d["per_block"].__setitem__(0, 1.2), r"per_block\[0\] = 1.2 is outside \[0, 0.99\]"),
    (lambda d: d["per_layer"].__setitem__("x", 0.995), r"per_layer\['x'\] = 0.995 is outside \[0, 0.99\] \(a "
                                                         r"matrix keeps at least 1% of its weights\)"),
    (lambda d: d["per_layer"].__setitem__("x", -0.1), r"per_layer\['x'\] = -0.1 is outside"),
    (lambda d: d.__setitem__("sparsity", "0.7"), "sparsity must be a finite number"),
    (lambda d: d.__setitem__("per_block", {"0": 0.5}), "per_block must be a list"),
    (lambda d: d.__setitem__("params", []), "params must be an object"),
    (lambda d: d.__setitem__("version", 99), "unsupported version"),
    (lambda d: d.__setitem__("version", 0), "version must be 1 or more, got 0"),
    (lambda d: d["params"].__setitem__("nm", "garbage"),
     "params.nm must be an N:M pattern such as '2:4', got 'garbage'"),
    (lambda d: d.__setitem__("per_layer", {"x": True}), "finite number"),
    # a pruner's name is no allocation method: the run's line would read "magnitude + magnitude"
    (lambda d: d.__setitem__("method", "magnitude"), r"method must be one of uniform, alphapruning, farms, owl, "
                                                     r"custom, auto \(how the ratios were made; a file written by "
                                                     r"hand: custom\), got 'magnitude'"),
])
def test_bad_json_is_rejected_with_message(tmp_path, patch, word):
    d = allocate(metrics_frame([2.0, 3.0]), 0.5).to_dict()
    patch(d)
    p = tmp_path / "a.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=word):
        Allocation.load(p)


def test_an_allocation_comes_back_as_a_curve_on_this_model_or_says_why_not():
    shapes = {"q_proj": (8, 8), "up_proj": (16, 8)}
    here = metrics_frame([0] * 3, shapes, per_matrix=[[3.0, 6.0], [4.0, 5.0], [5.0, 4.0]])
    per_matrix = allocate(here, 0.5, "alphapruning", granularity="layer")
    pts, offsets, notes, target = curve_of(per_matrix, here)  # this model's own: every ratio comes back
    assert notes == [] and len(pts) == 3 and offsets and target is None
    back = custom_allocation(pts, here, normalize=False, offsets=offsets)
    assert back.per_layer == pytest.approx(per_matrix.per_layer)
    for other in (metrics_frame([3.0, 4.0], shapes), metrics_frame([3.0] * 3, {"c_attn": (8, 8)})):
        pts, offsets, notes, _ = curve_of(allocate(other, 0.4, "uniform"), here)
        assert offsets == {} and all(y == pytest.approx(0.4) for _, y in pts)
        [note] = notes
        assert note.startswith("The allocation was made for another model") and "this one has 3" in note
    # a curve saved normalized comes back normalized to its own target, where that is a target here
    curve = custom_allocation([[0, 0.3], [1, 0.8]], here, sparsity=0.5, normalize=True)
    assert curve_of(curve, here, [0.45, 0.5])[2:] == ([], 0.5)
    pts, offsets, notes, target = curve_of(curve, here, [0.45, 0.55])  # else as its ratios, drawn
    assert target is None and notes[0].startswith("The curve was saved normalized to 50.00%")
    assert custom_allocation(pts, here, normalize=False, offsets=offsets).per_layer == pytest.approx(curve.per_layer)
    lying = Allocation.from_dict({**curve.to_dict(), "per_layer": {n: 0.9 for n in curve.per_layer}})
    assert any("not those of its own curve (up to" in n for n in curve_of(lying, here)[2])
    partial = allocate(here, 0.5, "uniform")
    partial.per_layer = dict(list(partial.per_layer.items())[:2])
    assert "The file gives 2 of this model's 6 matrices their ratios" in curve_of(partial, here)[2][0]
    drawn = custom_allocation([[0, 1.5], [1, 0.2]], here, normalize=False)
    drawn.params["points"] = [[0, 1.5], [1, 0.2]]  # as a hand-edited file may hold them
    assert "clipped to the chart" in curve_of(drawn, here)[2][0]
    drawn.params["points"] = [[0.5, 0.3]]
    with pytest.raises(AllocationError, match="at least two control points"):
        curve_of(drawn, here)
    with pytest.raises(AllocationError, match="offset 1.5 of 'model.layers.0.q_proj' is outside ±0.99"):
        custom_allocation([[0, 0.2], [1, 0.2]], here, offsets={"model.layers.0.q_proj": 1.5})


def test_not_json(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        Allocation.load(p)
    with pytest.raises(ValueError, match="JSON object"):
        Allocation.from_dict([1, 2])


# ------------------------------------------------------------------ real model


def test_alphapruning_on_default_model_spectra(default_model):
    from analysis.layers import prunable_layers
    from analysis.spectra import analyze, refit

    res = analyze(default_model.model)
    layers = prunable_layers(default_model.model)
    a = allocate(res.metrics, 0.7, epsilon=0.3, model="default")
    # the xmin rule its alphas were fitted with is part of the allocation, made in Python as by the CLI
    assert a.params["fit"] == "peak" and allocate(refit(res, "scan").metrics, 0.7).params["fit"] == "scan"
    assert list(a.per_layer) == [r.name for r in layers]
    assert len(a.per_block) == default_model.info.n_blocks
    assert a.achieved == pytest.approx(0.7, abs=1e-6)
    r = np.array(list(a.per_layer.values()))
    assert r.min() >= 0.7 * 0.7 - 1e-9 and r.max() <= MAX_RATIO
    t = block_table(res.metrics)
    # the block with the largest mean alpha is pruned most, the smallest least
    assert a.per_block[int(t["metric_mean"].idxmax())] == pytest.approx(max(a.per_block))
    assert a.per_block[int(t["metric_mean"].idxmin())] == pytest.approx(min(a.per_block))
    with pytest.raises(AllocationError, match=r"farms needs the metrics of FARMS spectra \(analyze\(\.\.\., farms"):
        allocate(res.metrics, 0.7, "farms")


def test_farms_and_alphapruning_refuse_each_others_spectra():
    from analysis.spectra import SpectraResult

    pooled = SpectraResult(metrics_frame([2.0, 3.0]), {}, farms=True).metrics
    assert allocate(pooled, 0.5, "farms").method == "farms"
    with pytest.raises(AllocationError, match="alphapruning needs the metrics of whole-matrix spectra"):
        allocate(pooled, 0.5, "alphapruning")
    assert allocate(metrics_frame([2.0, 3.0]), 0.5, "farms").method == "farms"  # a table built by hand: trusted
    # FARMS refits alpha: with a metric no fit changes it would be alphapruning's allocation under another name
    with pytest.raises(AllocationError, match="farms changes only the power-law fit"):
        allocate(pooled, 0.5, "farms", metric="stable_rank")


# ------------------------------------------------------------------ CLI


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "analysis", "allocate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, word", [
    (["--sparsity", "1.3"], "sparsity = 1.3 is outside [0, 0.99]"),
    (["--sparsity", "nan"], "sparsity must be a finite number"),
    (["--sparsity", "0.5", "--epsilon", "1.5"], "epsilon = 1.5 is outside [0, 1)"),
    (["--method", "custom", "--sparsity", "0.5"], "--points"),
    (["--method", "custom", "--points", "0:0.5,x", "--sparsity", "0.5"], "bad control point"),
])
def test_cli_bad_values_exit_2(args, word, tmp_path):
    p = run_cli(*args, "--out", str(tmp_path / "a.json"))
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and word in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "a.json").exists()


def test_cli_alphapruning_writes_loadable_json(tmp_path):
    out = tmp_path / "alloc.json"
    p = run_cli("--model", "default", "--device", "cpu", "--method", "alphapruning", "--sparsity", "0.7",
                "--epsilon", "0.3", "--out", str(out))
    assert p.returncode == 0, p.stderr
    a = Allocation.load(out)
    assert a.method == "alphapruning" and a.model == "default" and len(a.per_layer) == 210
    assert a.achieved == pytest.approx(0.7, abs=1e-6)
    assert "achieved" in p.stdout and "29" in p.stdout  # the per-block table reaches the last block


def test_cli_custom_as_drawn(tmp_path):
    out = tmp_path / "c.json"
    p = run_cli("--method", "custom", "--points", "0:0.4,1:0.8", "--as-drawn", "--device", "cpu", "--out", str(out))
    assert p.returncode == 0, p.stderr
    a = Allocation.load(out)
    assert a.per_block[0] == pytest.approx(0.4) and a.per_block[-1] == pytest.approx(0.8)
    assert a.achieved == pytest.approx(0.6, abs=1e-9) and math.isclose(a.sparsity, a.achieved)


def test_cli_owl_uses_calibration_outliers(tmp_path):
    out = tmp_path / "o.json"
    p = run_cli("--method", "owl", "--sparsity", "0.6", "--owl-lambda", "0.1", "--nsamples", "2", "--seqlen", "64",
                "--device", "cpu", "--out", str(out))
    assert p.returncode == 0, p.stderr
    a = Allocation.load(out)
    assert a.method == "owl" and a.achieved == pytest.approx(0.6, abs=1e-6)
    d = {int(k): v for k, v in a.params["outlier_ratios"].items()}
    assert sorted(d) == list(range(30))
    # the block with the most outliers is pruned least
    assert int(np.argmin(a.per_block)) == max(d, key=d.get)


def test_within_block_spread_is_the_largest_gap_inside_a_block():
    table = pd.DataFrame({"name": ["b0.q", "b0.k", "b1.q", "b1.k", "other"], "block": [0, 0, 1, 1, 2], "params": 1})
    assert within_block_spread({"b0.q": 0.0, "b0.k": 0.0, "b1.q": 0.0, "b1.k": 0.0}, table) == 0.0
    assert within_block_spread({"b0.q": 0.05, "b0.k": -0.05, "b1.q": -0.1, "b1.k": 0.1}, table) == pytest.approx(0.2)
    # names the table lacks are ignored; a matrix without an offset has its block's ratio (offset 0)
    assert within_block_spread({"b0.q": 0.1, "elsewhere.k": 0.9}, table) == pytest.approx(0.1)
    assert within_block_spread({}, table) == 0.0


def test_a_curve_with_block_offsets_reproduces_a_per_matrix_allocation():
    df = smol_like(3)
    per_layer = allocate(df, 0.6, "alphapruning", epsilon=0.3, granularity="layer")  # every matrix its own ratio
    per_block = allocate(df, 0.6, "alphapruning", epsilon=0.3)
    assert block_offsets(per_block, df) == {}  # one ratio per block: nothing for a curve to leave out
    offsets = block_offsets(per_layer, df)
    assert set(offsets) == set(df["name"]) and within_block_spread(offsets, df) > 0.05
    points = control_points(per_layer.per_block)
    plain = custom_allocation(points, df, normalize=False)
    assert plain.per_block == pytest.approx(per_layer.per_block) and plain.per_layer != pytest.approx(
        per_layer.per_layer)  # the curve alone averages each block
    for normalize in (False, True):
        back = custom_allocation(points, df, sparsity=0.6, normalize=normalize, offsets=offsets)
        assert back.per_layer == pytest.approx(per_layer.per_layer, abs=1e-9) and back.achieved == pytest.approx(0.6)
        assert back.params["offsets"] == offsets
    # a dragged curve moves each block; its matrices keep their differences, and the budget stays exact
    lower = [[d, y - 0.1] for d, y in points]
    moved = custom_allocation(lower, df, sparsity=0.6, normalize=True, offsets=offsets)
    assert moved.achieved == pytest.approx(0.6, abs=1e-9)
    q, k = "model.layers.4.q_proj", "model.layers.4.k_proj"
    assert moved.per_layer[q] - moved.per_layer[k] != pytest.approx(0.0)
    drawn = custom_allocation(lower, df, normalize=False, offsets=offsets)
    assert drawn.per_layer[q] - drawn.per_layer[k] == pytest.approx(offsets[q] - offsets[k])
    # offsets that push a matrix past [0, 0.99] are clipped there, with a warning
    clipped = custom_allocation([[0, 0.02], [1, 0.02]], df, normalize=False, offsets={q: -0.5})
    assert clipped.per_layer[q] == 0.0 and "clipped" in clipped.warnings[-1]
    with pytest.raises(AllocationError, match="another model"):
        custom_allocation(points, df, 0.6, offsets={"lm_head": 0.1})
    with pytest.raises(AllocationError, match="finite numbers"):
        custom_allocation(points, df, 0.6, offsets={q: float("nan")})


def test_a_kind_offset_moves_every_matrix_of_that_kind_alike():
    df = smol_like(3)
    offsets = block_offsets(allocate(df, 0.6, "alphapruning", epsilon=0.3, granularity="layer"), df)
    means = kind_offsets(offsets, df)
    assert list(means) == list(dict.fromkeys(df["kind"]))  # every kind, in model order
    moved = set_kind_offset(offsets, df, "k_proj", -0.1)
    assert kind_offsets(moved, df)["k_proj"] == pytest.approx(-0.1)
    ks = df.loc[df["kind"] == "k_proj", "name"]
    shifts = [moved[n] - offsets[n] for n in ks]
    assert max(shifts) - min(shifts) < 1e-12  # the blocks' differences are kept
    assert all(moved[n] == offsets[n] for n in df["name"] if n not in set(ks))
    assert kind_offsets(moved, df) == pytest.approx({**means, "k_proj": -0.1})
    # from no offsets: only that kind gets one; back to 0 leaves none
    plain = set_kind_offset({}, df, "down_proj", 0.05)
    assert set(plain) == set(df.loc[df["kind"] == "down_proj", "name"]) and set(plain.values()) == {0.05}
    assert set_kind_offset(plain, df, "down_proj", 0.0) == {}
    # an offset edited by hand is applied as it is: down_proj 0.05 above the curve, its blocks' means above it too
    drawn = custom_allocation([[0, 0.5], [1, 0.5]], df, normalize=False, offsets=plain)
    down, up = (df.loc[(df["kind"] == kind) & (df["block"] == 1), "name"].item() for kind in ("down_proj", "up_proj"))
    assert (drawn.per_layer[down], drawn.per_layer[up]) == pytest.approx((0.55, 0.5))
    assert all(r > 0.5 for r in drawn.per_block) and drawn.achieved > 0.5
    with pytest.raises(AllocationError, match="no matrix of kind 'c_attn'"):
        set_kind_offset(offsets, df, "c_attn", 0.1)
    with pytest.raises(AllocationError, match="finite"):
        set_kind_offset(offsets, df, "k_proj", float("inf"))
