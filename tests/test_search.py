"""Row-wise TRIM and the allocation search ("auto") on tiny models built from configs, and the
`--allocation auto --rowwise trim` command line end to end on a tiny checkpoint folder."""
import json
import math
import os
import re
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_llama, word_tokenizer
from test_pruning import calib_ids, correlated_inputs, tiny_llama

from analysis.allocation import Allocation, AllocationError, allocate, budget
from analysis.calibration import walk_blocks
from analysis.data import DataError, calibration_batches, spread_windows, unsampled_windows
from analysis.evaluation import window_nll
from analysis.layers import layer_table, prunable_layers
from analysis.pipeline import (
    AUTO_EPSILONS,
    build_allocation,
    dense_spectra,
    search_in_stages,
    search_starts,
    search_windows,
)
from analysis.pruners import (
    output_quality,
    prune_sparsegpt,
    prune_trim,
    prune_wanda,
    recentre_counts,
    row_prune_count,
    unstructured_mask,
)
from analysis.pruning import DenseSnapshot, prune
from analysis.search import (
    LEVEL_SETS,
    BlockLevels,
    Grid,
    _replays,
    describe,
    fitness,
    log_probs,
    mutate,
    paired_gain,
    reuse_caveats,
    search_allocation,
    search_memory,
    window_losses,
)
from analysis.settings import (
    QUICK_EVALUATION,
    SEARCH_STEP,
    THEN_SAMPLES,
    THEN_SEED,
    VERIFY_SAMPLES,
    AllocationSettings,
    CalibrationSettings,
    PruneSettings,
    RunSettings,
    SettingsError,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# per-row ratios and TRIM on one matrix


def test_per_row_ratios_remove_each_rows_count():
    scores = torch.rand(5, 40, generator=torch.Generator().manual_seed(0))
    ratios = torch.tensor([0.0, 0.1, 0.5, 0.62, 0.99])
    mask = unstructured_mask(scores, ratios)
    assert mask.sum(1).tolist() == row_prune_count(ratios, 40).tolist() == [0, 4, 20, 25, 40]
    # the removed entries are each row's lowest scores
    for r in range(5):
        kept = scores[r][~mask[r]]
        if mask[r].any() and kept.numel():
            assert scores[r][mask[r]].max() <= kept.min()


def test_recentred_counts_keep_the_matrix_ratio_exactly():
    raw = torch.tensor([0.9, 0.95, 0.2, 0.0, 0.5, 0.7, 0.61, 0.33])
    counts = recentre_counts(raw, 0.6, 128, 0.99)
    assert int(counts.sum()) == 8 * row_prune_count(0.6, 128)
    assert int(counts.max()) <= int(0.99 * 128) and int(counts.min()) >= 0


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_trim_keeps_ratio_and_reconstructs_better(pruner):
    x = correlated_inputs(tokens=2048, cols=64) * torch.linspace(0.2, 3.0, 64)
    g = torch.Generator().manual_seed(1)
    # rows of very different scales and input preferences: some outputs survive pruning far better
    w = torch.randn(48, 64, generator=g) * torch.linspace(0.1, 2.0, 48).reshape(-1, 1)
    w[:16, :8] *= 8.0
    gram = x.t() @ x
    norms = (x * x).sum(0).sqrt()
    hessian = gram * 2 / x.shape[0]
    if pruner == "wanda":
        rows_fn, plain = (lambda m, r: prune_wanda(m, norms, r)), prune_wanda(w, norms, 0.7)
    else:
        rows_fn, plain = (lambda m, r: prune_sparsegpt(m, hessian, r)), prune_sparsegpt(w, hessian, 0.7)
    trimmed, ratios = prune_trim(w, 0.7, rows_fn, gram)
    assert int((trimmed == 0).sum()) == int((plain == 0).sum())  # the matrix keeps its ratio exactly
    assert ratios.max() > ratios.min()  # rows really differ
    assert output_quality(w, trimmed, gram)[1] < output_quality(w, plain, gram)[1]


def test_trim_on_a_model_keeps_every_matrix_ratio_and_improves_layer_outputs():
    calib = calib_ids(8, 32)
    errors = {}
    for rowwise in (None, "trim"):
        model = tiny_llama(layers=2)
        report = prune(model, {r.name: 0.6 for r in prunable_layers(model)}, "wanda", calib, rowwise=rowwise)
        assert report.rowwise == rowwise
        cols = {r.name: r.cols for r in prunable_layers(model)}
        for name, s in report.per_layer.items():  # exactly round(0.6 * cols) per row on average
            assert s == pytest.approx(row_prune_count(0.6, cols[name]) / cols[name], abs=1e-12)
        pruned = {r.name: r.weight().detach().clone() for r in prunable_layers(model)}
        dense = tiny_llama(layers=2)
        total = []

        def measure(b, refs, stats, total=total, pruned=pruned):
            for r in refs:
                total.append(output_quality(r.weight().detach(), pruned[r.name], stats[r.name].xtx)[1])
            return False
        walk_blocks(dense, calib, measure, hessian=True)  # dense inputs, the reconstruction of each layer
        errors[rowwise] = float(np.mean(total))
    assert errors["trim"] < errors[None]


def test_rowwise_setting_refuses_nm_and_unknown_names():
    with pytest.raises(SettingsError, match="N:M"):
        PruneSettings(nm="2:4", rowwise="trim").check()
    with pytest.raises(SettingsError, match="rowwise must be one of trim"):
        PruneSettings(rowwise="rows").check()


# ---------------------------------------------------------------------------------------------
# the search


def test_mutations_keep_the_budget_exact_and_stay_on_the_grid():
    """The grid is anchored on the start's own (off-step) ratios; every move keeps the budget."""
    params = [1000] * 6 + [400] * 3  # two groups of equally sized blocks
    start = [0.451, 0.5, 0.55, 0.65, 0.7, 0.749, 0.913, 0.287, 0.6]
    grid = Grid.around(start, params)
    k = np.zeros(len(params), dtype=np.int64)
    assert grid.ratios(k) == start and grid.budget(k) == pytest.approx(0.6, abs=1e-12)
    assert grid.hi[6] == 3 and grid.lo[7] == -11  # 0.913 + 3 steps <= 0.99, 0.287 - 11 steps >= 0
    rng = np.random.default_rng(0)
    for _ in range(500):
        k = mutate(k, grid, rng)
        assert grid.budget(k) == pytest.approx(0.6, abs=1e-12)
        assert all(lo <= o <= hi for o, lo, hi in zip(k, grid.lo, grid.hi))
        assert all(0.0 <= r <= 0.99 for r in grid.ratios(k))
        assert np.allclose((np.asarray(grid.ratios(k)) - start) / SEARCH_STEP, k)


def test_kind_moves_keep_every_block_ratio_and_the_budget_exact():
    """block+kind: kinds found once in every block with one size get offsets; a kind move gives one step
    to the kind with the smaller matrices and as many weights from the other, so every block keeps its
    ratio, the budget stays exact and every matrix stays within [0, 0.99]."""
    params = [1000 + 400 + 2 * 100] * 4
    start = [0.55, 0.6, 0.62, 0.63]
    layers = [(f"{b}.{kind}", b, kind, n) for b in range(4) for kind, n in (("wide", 1000), ("narrow", 400),
                                                                              ("k", 100), ("v", 100))]
    grid = Grid.around(start, params, layers=layers, by_kind=True)
    assert grid.kinds == ("wide", "narrow", "k", "v") and grid.kind_params == (1000, 400, 100, 100)
    k = np.zeros(len(params) + len(grid.kinds))
    assert list(grid.per_layer(k).values()) == [r for r in start for _ in range(4)]
    rng, moved = np.random.default_rng(0), set()
    for _ in range(500):
        k = mutate(k, grid, rng)
        per = np.asarray(list(grid.per_layer(k).values())).reshape(4, 4)
        weights = [1000, 400, 100, 100]
        assert np.allclose(np.average(per, axis=1, weights=weights), grid.ratios(k), atol=1e-12)
        assert grid.budget(k) == pytest.approx(0.6, abs=1e-12)
        assert per.min() >= 0.0 and per.max() <= 0.99 + 1e-12
        moved |= {kind for kind, off in grid.offsets(k).items() if abs(off) > 1e-12}
    assert moved == set(grid.kinds)
    # a kind missing from a block, or of two sizes, gets no offset; a single eligible kind: none at all
    uneven = [row for row in layers if row[1:3] != (2, "v")] + [("2.v", 2, "v", 50)]
    assert Grid.around(start, params, layers=uneven, by_kind=True).kinds == ("wide", "narrow", "k")
    assert Grid.around(start, params, layers=[row for row in layers if row[2] == "k"], by_kind=True).kinds == ()


def test_a_start_with_per_matrix_ratios_keeps_them_as_the_search_moves_its_blocks():
    """A start whose matrices differ inside a block (a curve with per-matrix offsets): the grid starts at its own
    ratios, every matrix keeps its difference from its block's ratio, the budget stays exact, no matrix leaves
    [0, 0.99], and a move that would take one out is not made."""
    params = [1000 + 400] * 4
    layers = [(f"{b}.{kind}", b, kind, n) for b in range(4) for kind, n in (("wide", 1000), ("narrow", 400))]
    mine = {f"{b}.{kind}": r + d for b, r in enumerate([0.5, 0.55, 0.6, 0.65]) for kind, d in (("wide", -0.04),
                                                                                                ("narrow", 0.1))}
    start = [np.average([mine[f"{b}.wide"], mine[f"{b}.narrow"]], weights=[1000, 400]) for b in range(4)]
    grid = Grid.around(start, params, layers=layers, per_layer=mine)
    k = np.zeros(4, dtype=np.int64)
    assert grid.per_layer(k) == pytest.approx(mine, abs=1e-12)
    rng, spread = np.random.default_rng(0), set()
    for _ in range(500):
        k = mutate(k, grid, rng)
        per = grid.per_layer(k)
        for b, r in enumerate(grid.ratios(k)):
            assert per[f"{b}.narrow"] - per[f"{b}.wide"] == pytest.approx(0.14, abs=1e-12)
            assert np.average([per[f"{b}.wide"], per[f"{b}.narrow"]], weights=[1000, 400]) == pytest.approx(r)
        assert grid.budget(k) == pytest.approx(np.mean(start), abs=1e-12)
        assert min(per.values()) >= 0.0 and max(per.values()) <= 0.99 + 1e-12
        spread.add(max(per.values()))
    assert max(spread) > 0.9  # the bound was reached, not avoided
    # without per-matrix ratios the grid is the per-block one
    assert Grid.around(start, params, layers=layers).per_layer(np.zeros(4)) == {
        name: start[b] for name, b, _, _ in layers}


def test_kinds_found_once_per_expert_get_one_offset_weighted_by_their_count():
    """MoE: a kind found E times in every block (once per expert) gets one offset; its weights per block are E
    matrices' worth, so a kind move against attention keeps every block's ratio and the budget exact."""
    experts = [(f"{b}.experts.{e}.{kind}", b, f"experts.{kind}", 200) for b in range(3) for e in range(4)
               for kind in ("up", "down")]
    attn = [(f"{b}.{kind}", b, kind, 100) for b in range(3) for kind in ("q", "o")]
    layers = sorted(attn + experts, key=lambda row: row[1])
    params, start = [2 * 100 + 8 * 200] * 3, [0.5, 0.55, 0.6]
    grid = Grid.around(start, params, layers=layers, by_kind=True)
    assert grid.kinds == ("q", "o", "experts.up", "experts.down") and grid.kind_params == (100, 100, 800, 800)
    rng, k = np.random.default_rng(0), np.zeros(3 + 4)
    sizes = {name: n for name, _, _, n in layers}
    for _ in range(300):
        k = mutate(k, grid, rng)
        per = grid.per_layer(k)
        for b in range(3):
            mine = [name for name, blk, _, _ in layers if blk == b]
            assert np.average([per[n] for n in mine], weights=[sizes[n] for n in mine]) == \
                pytest.approx(grid.ratios(k)[b], abs=1e-12)
        assert grid.budget(k) == pytest.approx(np.average(start), abs=1e-12)
    assert any(abs(off) > 1e-12 for off in grid.offsets(k).values())


@pytest.fixture(scope="module")
def tiny_search():
    model = tiny_llama(layers=4)
    calib = calib_ids(8, 32)
    table = layer_table(model)
    starts = {"uniform": allocate(table, 0.6, "uniform"),
              "ramp": Allocation("", 0.6, "custom", {}, [0.5, 0.55, 0.65, 0.7],
                                 {r.name: [0.5, 0.55, 0.65, 0.7][r.block] for r in prunable_layers(model)}, 0.6)}
    return model, calib, starts


def test_search_starts_are_uniform_owl_alphapruning_and_farms_at_the_budget(tiny_search):
    """The issue's starts: uniform, OWL, and AlphaPruning and FARMS at several ε, each at the target
    budget; FARMS comes from its own (pooled) spectra, so its curves differ from AlphaPruning's."""
    model, calib, _ = tiny_search
    starts = search_starts(AllocationSettings(method="auto", sparsity=0.6), model, calib)
    # the starts do not depend on the method the settings name (bench.quality names none)
    assert {n: a.per_block for n, a in search_starts(AllocationSettings(sparsity=0.6), model, calib).items()} == \
        {n: a.per_block for n, a in starts.items()}
    spread = [f"{m} eps={e:g}" for m in ("alphapruning", "farms") for e in AUTO_EPSILONS]
    assert list(starts) == ["uniform", "owl", *spread]
    for name, a in starts.items():
        assert a.achieved == pytest.approx(0.6, abs=1e-3), name
        assert a.method == name.split()[0]
    assert starts["uniform"].per_block == pytest.approx([0.6] * 4)
    for e in AUTO_EPSILONS:
        assert starts[f"farms eps={e:g}"].per_block != pytest.approx(starts[f"alphapruning eps={e:g}"].per_block,
                                                                     abs=1e-3)
    # a larger ε spreads the ratios wider
    widths = [np.ptp(starts[f"farms eps={e:g}"].per_block) for e in AUTO_EPSILONS]
    assert widths == sorted(widths) and widths[0] > 0
    # FARMS spectra measured elsewhere (the Allocation page's FARMS preset) are used, not measured again
    # (given AlphaPruning's numbers as FARMS's, marked as FARMS spectra, the FARMS starts are AlphaPruning's curves)
    settings = AllocationSettings(method="auto", sparsity=0.6)
    numbers = dense_spectra(model, settings.spectra).copy()
    numbers.attrs["farms"] = True
    given = search_starts(settings, model, calib, farms_metrics=numbers)
    for e in AUTO_EPSILONS:
        assert given[f"farms eps={e:g}"].per_block == pytest.approx(starts[f"alphapruning eps={e:g}"].per_block)


def test_search_starts_include_the_settings_epsilon(tiny_search):
    """A user's own ε (e.g. chosen on a valid split) joins the AlphaPruning and FARMS starts; one already
    in AUTO_EPSILONS (up to float rounding), or ε = 0 (uniform), adds none."""
    model, calib, _ = tiny_search
    starts = search_starts(AllocationSettings(method="auto", sparsity=0.6, epsilon=0.05), model, calib)
    eps = (0.05, *AUTO_EPSILONS)
    assert list(starts) == ["uniform", "owl", *[f"{m} eps={e:g}" for m in ("alphapruning", "farms") for e in eps]]
    assert starts["alphapruning eps=0.05"].achieved == pytest.approx(0.6, abs=1e-3)
    assert starts["alphapruning eps=0.05"].params["epsilon"] == 0.05
    assert np.ptp(starts["alphapruning eps=0.05"].per_block) < np.ptp(starts["alphapruning eps=0.1"].per_block)
    for e in (0.0, AUTO_EPSILONS[0], 0.1 + 0.2):  # 0.30000000000000004: the 0.3 start
        n = len(search_starts(AllocationSettings(sparsity=0.6, epsilon=e), model, calib))
        assert n == 2 + 2 * len(AUTO_EPSILONS)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cached_levels_stay_within_their_budget_and_prune_the_same(tiny_search, method):
    """The search's cache of pruned blocks keeps to its byte budget (least recently used levels dropped): a
    candidate assembled after its levels were dropped and pruned again is the same model."""
    model, calib, _ = tiny_search
    refs = prunable_layers(model)
    rng = np.random.default_rng(0)
    candidates = [{r.name: float(rng.choice([0.4, 0.5, 0.6, 0.7])) for r in refs} for _ in range(6)]
    small, big = (BlockLevels(model, calib, method, level_sets=sets) for sets in (0.5, 100.0))
    for candidate in [*candidates, candidates[0]]:
        big.restore()
        big.apply(candidate)
        want = {r.name: r.weight().clone() for r in refs}
        small.restore()
        small.apply(candidate)
        assert all(torch.equal(r.weight(), want[r.name]) for r in refs)
        assert 0 < small.cached <= small.budget
    assert len(small.cache) < len(big.cache) and big.cached <= big.budget
    big.restore()


def test_search_progress_moves_while_its_starts_are_scored(tiny_search):
    """The starts (a proxy score each, then a real prune each) take their share of the progress bar, which
    moves on through them and the generations to the end, never back."""
    model, calib, starts = tiny_search
    seen: list[tuple[str, float]] = []
    search_allocation(model, calib, starts, steps=3, seed=0, screen_samples=2, screen_seqlen=16, verify="starts",
                      progress=lambda message, f: seen.append((message, f)))
    fractions = [f for m, f in seen if m.startswith("search:")]  # (the statistics' walk is a bar of its own)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    scoring = [f for m, f in seen if "scoring the start" in m]
    real = [f for m, f in seen if "pruning the start" in m]
    assert scoring[0] == 0.0 < scoring[1] < real[0] < real[-1] < min(f for m, f in seen if m.startswith("search: step"))


def test_search_memory_counts_what_the_search_holds(tiny_search):
    """The estimate's search term: the dense values and LEVEL_SETS levels (masks for Wanda, weights for
    SparseGPT, with its Hessians of every matrix), twice the levels and statistics when it prunes for real, and
    the KL objective's dense log-probabilities."""
    model, _, _ = tiny_search
    refs = prunable_layers(model)
    params = sum(r.params for r in refs)
    none = AllocationSettings(method="auto", search_verify="none")
    wanda = search_memory(model, none, "wanda", 4, 8, 32)
    assert wanda == params * 4 + LEVEL_SETS * params
    assert search_memory(model, replace(none, search_verify="starts"), "wanda", 4, 8, 32) == wanda + LEVEL_SETS * params
    hessians = sum(r.cols ** 2 * 4 for b in range(4) for r in {r.input_key: r for r in refs if r.block == b}.values())
    assert search_memory(model, none, "sparsegpt", 4, 8, 32) == params * 4 + LEVEL_SETS * params * 4 + hessians
    vocab = model.get_input_embeddings().num_embeddings
    assert search_memory(model, replace(none, search_objective="kl"), "wanda", 4, 8, 32) == wanda + 8 * 32 * vocab * 2


def test_search_is_deterministic_exact_and_never_worse_than_its_best_start(tiny_search):
    model, calib, starts = tiny_search
    dense = DenseSnapshot.take(model)
    a = search_allocation(model, calib, starts, steps=12, seed=3, screen_samples=2, screen_seqlen=16, verify="none")
    b = search_allocation(model, calib, starts, steps=12, seed=3, screen_samples=2, screen_seqlen=16, verify="none")
    assert a.per_block == b.per_block and a.params["history"] == b.params["history"]
    assert a.method == "auto" and a.achieved == pytest.approx(0.6, abs=1e-12)
    for step in a.params["history"]:  # every accepted candidate is exactly at the budget
        assert np.average(step["per_block"], weights=[1] * 4) == pytest.approx(0.6, abs=1e-12)
    assert a.params["best_fitness"] <= min(a.params["starts"].values())
    fits = [h["fitness"] for h in a.params["history"]]
    assert fits == sorted(fits, reverse=True)
    # the model is dense again, and the allocation's fitness is what the search says it is
    assert all(torch.equal(r.weight(), dense.weights[r.name]) for r in prunable_layers(model))
    assert a.params["forward_passes"] > 0 and a.params["seconds"] > 0
    # the gain over the start it went on from, on the confirmation windows, with its paired SE
    assert a.params["result"] == "search" and a.params["gain_windows"] == calib.shape[0]
    assert a.params["gain"] == pytest.approx(fits[0] - fits[-1], abs=1e-9) and a.params["gain"] > 0
    assert 0 < a.params["gain_se"] < math.inf
    text = "\n".join(describe(a.params))
    assert f"from {a.params['start']}: {fits[0]:.4f} -> {fits[-1]:.4f}" in text and "paired SE over 8 windows" in text
    one = "\n".join(describe({**a.params, "gain_se": math.nan, "gain_windows": 1}))  # one window: no spread
    assert "nan" not in one and "on 1 window (no standard error" in one
    back = Allocation.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.per_layer == a.per_layer and back.params["start"] in starts


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_search_over_blocks_and_matrix_kinds(tiny_search, method):
    """space="block+kind": deterministic, exact, never worse than its best start; the result's matrices
    differ inside a block by their kind's offset, each block keeps the per-block ratio the history shows,
    and its fitness is that of the model pruned from dense statistics at those per-matrix ratios."""
    model, calib, starts = tiny_search
    a = search_allocation(model, calib, starts, prune_method=method, steps=12, seed=1, screen_samples=2,
                          screen_seqlen=16, space="block+kind", verify="none")
    b = search_allocation(model, calib, starts, prune_method=method, steps=12, seed=1, screen_samples=2,
                          screen_seqlen=16, space="block+kind", verify="none")
    assert a.per_layer == b.per_layer and a.params["history"] == b.params["history"]
    assert a.params["space"] == "block+kind" and a.achieved == pytest.approx(0.6, abs=1e-12)
    kinds = a.params["history"][-1]["kinds"]
    assert set(kinds) == {r.kind for r in prunable_layers(model)} and any(abs(v) > 0 for v in kinds.values())
    layers = prunable_layers(model)
    for r in layers:
        assert a.per_layer[r.name] == pytest.approx(a.per_block[r.block] + kinds[r.kind], abs=1e-12)
    for blk in range(4):
        mine = [r for r in layers if r.block == blk]
        mean = np.average([a.per_layer[r.name] for r in mine], weights=[r.params for r in mine])
        assert mean == pytest.approx(a.per_block[blk], abs=1e-12)
    assert budget([a.per_layer[r.name] for r in layers], [r.params for r in layers]) == pytest.approx(0.6, abs=1e-12)
    assert a.params["best_fitness"] <= min(a.params["starts"].values())
    assert "kind offsets: " in "\n".join(describe(a.params))
    if method == "wanda":
        snap = prune_from_dense_statistics(model, calib, a)
        assert fitness(model, calib[:, :128]) == pytest.approx(a.params["best_fitness"], rel=1e-5)
        snap.restore(model)
    with pytest.raises(AllocationError, match="space must be one of block, block\\+kind"):
        search_allocation(model, calib, starts, steps=1, space="matrix")


def test_window_losses_and_their_paired_gain(tiny_search):
    """Per-window losses average to the token-weighted NLL of analysis.evaluation (windows of equal
    length); the paired gain's SE is that of the per-window differences."""
    model, calib, _ = tiny_search
    x = window_losses(model, calib[:, :40], batch=3)
    nll, tokens = window_nll(model, calib[:, :40])
    assert x.shape == (calib.shape[0],) and x.mean() == pytest.approx(nll / tokens, rel=1e-6)
    assert fitness(model, calib[:, :40]) == pytest.approx(x.mean(), rel=1e-12)
    gain, se = paired_gain([1.0, 2.0, 3.0], [0.5, 1.5, 3.5])  # differences 0.5, 0.5, -0.5
    assert gain == pytest.approx(1 / 6) and se == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    assert paired_gain([2.0], [1.0])[0] == 1.0 and math.isnan(paired_gain([2.0], [1.0])[1])


def prune_from_dense_statistics(model, calib, alloc) -> DenseSnapshot:
    """Wanda at `alloc`'s ratios, every block from the dense model's input statistics (what the
    search's cache assembles); returns the snapshot that restores the dense weights."""
    stats = {}
    walk_blocks(model, calib, lambda b, refs, s: stats.update(s) or False)
    snap = DenseSnapshot.take(model)
    with torch.no_grad():
        for r in prunable_layers(model):
            r.weight().copy_(prune_wanda(r.weight().float(), stats[r.name].col_norms(), alloc.per_layer[r.name]))
    return snap


def test_a_search_from_a_start_with_per_matrix_ratios_goes_on_from_those_ratios(tiny_search):
    """The Allocation page's "Start from your curve" with per-matrix offsets: the search's first entry is that
    start as scored (not the start with its offsets dropped), and its result keeps them."""
    model, calib, starts = tiny_search
    layers = prunable_layers(model)
    ramp = starts["ramp"]
    mine = {r.name: ramp.per_block[r.block] + (0.1 if r.kind == "down_proj" else 0.0) for r in layers}
    weights = {r.name: r.params for r in layers}
    per_block = [float(np.average([mine[r.name] for r in layers if r.block == b],
                                  weights=[weights[r.name] for r in layers if r.block == b])) for b in range(4)]
    curve = Allocation("", 0.62, "custom", {}, per_block, mine, float(np.average(per_block)))
    a = search_allocation(model, calib, {"your curve": curve}, steps=6, seed=1, screen_samples=2, screen_seqlen=16,
                          verify="none")
    assert a.params["history"][0]["fitness"] == pytest.approx(a.params["starts"]["your curve"], rel=1e-6)
    downs = [r for r in layers if r.kind == "down_proj"]
    others = {r.block: r for r in layers if r.kind == "up_proj"}
    assert all(a.per_layer[r.name] - a.per_layer[others[r.block].name] == pytest.approx(0.1) for r in downs)


def test_search_fitness_matches_the_cached_candidate(tiny_search):
    """The search's confirmed fitness is the calibration NLL of the model pruned block by block from
    dense statistics at the result's ratios (what the cache assembles)."""
    model, calib, starts = tiny_search
    a = search_allocation(model, calib, starts, steps=4, seed=0, screen_samples=2, screen_seqlen=16, verify="none")
    snap = prune_from_dense_statistics(model, calib, a)
    assert fitness(model, calib[:, :128]) == pytest.approx(a.params["best_fitness"], rel=1e-5)
    snap.restore(model)


def test_search_on_kl_to_the_dense_model(tiny_search):
    """objective="kl": the dense model is at KL 0 from itself; the search is deterministic, exact and
    never worse than its best start on that objective, and its fitness is KL(dense || result)."""
    model, calib, starts = tiny_search
    confirm = calib[:, :128]
    ref = log_probs(model, confirm)
    assert ref.dtype == torch.float16 and ref.shape[:2] == (confirm.shape[0], confirm.shape[1] - 1)
    assert abs(fitness(model, confirm, reference=ref)) < 1e-3
    a = search_allocation(model, calib, starts, steps=8, seed=1, screen_samples=2, screen_seqlen=16, objective="kl",
                          verify="none")
    b = search_allocation(model, calib, starts, steps=8, seed=1, screen_samples=2, screen_seqlen=16, objective="kl",
                          verify="none")
    assert a.per_block == b.per_block and a.params["objective"] == "kl" and "KL" in a.params["fitness"]
    assert a.achieved == pytest.approx(0.6, abs=1e-12)
    assert 0 < a.params["best_fitness"] <= min(a.params["starts"].values())
    snap = prune_from_dense_statistics(model, calib, a)
    assert fitness(model, confirm, reference=ref) == pytest.approx(a.params["best_fitness"], rel=1e-3)
    snap.restore(model)
    with pytest.raises(AllocationError, match="objective must be one of nll, kl"):
        search_allocation(model, calib, starts, steps=1, objective="kld")
    with pytest.raises(SettingsError, match="search_objective must be one of nll, kl") as e:
        AllocationSettings(method="auto", search_objective="loss").check()
    assert e.value.field == "allocation.search_objective"
    for step in (0, -0.025, 0.3, float("nan"), "0.05"):
        with pytest.raises(SettingsError, match="search_step must be a sparsity in") as e:
            AllocationSettings(method="auto", search_step=step).check()
        assert e.value.field == "allocation.search_step"


def test_search_scored_on_a_held_out_text(tiny_search):
    """fitness_windows: the starts and the result are scored on the held-out windows (the pruner's
    statistics still come from calib), and the result's fitness is the held-out NLL of the model
    pruned from calib's dense statistics at its ratios."""
    model, calib, starts = tiny_search
    held = calib_ids(6, 24, seed=5)
    a = search_allocation(model, calib, starts, steps=6, seed=2, screen_samples=2, screen_seqlen=16,
                          fitness_windows=held, verify="none")
    mine = search_allocation(model, calib, starts, steps=6, seed=2, screen_samples=2, screen_seqlen=16, verify="none")
    assert a.params["fitness"].startswith("held-out") and mine.params["fitness"].startswith("calibration")
    assert a.params["confirm_tokens"] == held.numel() and a.params["starts"] != mine.params["starts"]
    assert a.achieved == pytest.approx(0.6, abs=1e-12) and a.params["best_fitness"] <= min(a.params["starts"].values())
    snap = prune_from_dense_statistics(model, calib, a)
    assert fitness(model, held) == pytest.approx(a.params["best_fitness"], rel=1e-5)
    snap.restore(model)
    with pytest.raises(AllocationError, match="fitness_windows must be token ids"):
        search_allocation(model, calib, starts, steps=1, fitness_windows=held[0])


def test_search_goes_on_from_a_saved_result(tiny_search, tmp_path):
    """settings.search_from: a saved search result is the only start, scored where the search left it,
    and the search goes on from there at its budget; a drawn curve (`custom`) likewise."""
    model, calib, starts = tiny_search
    first = search_allocation(model, calib, starts, steps=6, seed=1, screen_samples=2, screen_seqlen=16, verify="none")
    assert first.params["result"] == "search"
    path = first.save(tmp_path / "first.json")
    # the proxy's fitness goes on from where the first (unverified) search left it
    settings = AllocationSettings(method="auto", sparsity=0.6, search_steps=6, search_seed=2, search_verify="none",
                                  search_from=str(path)).check()
    more = build_allocation(settings, model, calib=calib)
    assert list(more.params["starts"]) == ["first.json"] and more.params["start"] == "first.json"
    # the full-length confirmation windows of both searches are calib's: the start scores what the first search found
    assert more.params["starts"]["first.json"] == pytest.approx(first.params["best_fitness"], rel=1e-6)
    assert more.params["history"][0]["per_block"] == first.per_block
    assert more.params["best_fitness"] <= first.params["best_fitness"]
    assert more.achieved == pytest.approx(0.6, abs=1e-12)
    drawn = build_allocation(replace(settings, search_from=None, search_steps=0), model, calib=calib,
                             custom=starts["ramp"])
    assert drawn.params["start"] == "your curve" and drawn.per_block == starts["ramp"].per_block


def test_search_from_refuses_a_file_it_cannot_start_from(tiny_search, tmp_path):
    _, _, starts = tiny_search
    path = starts["ramp"].save(tmp_path / "ramp.json")
    (tmp_path / "bad.json").write_text("{")
    for settings, message in ((AllocationSettings(method="auto", sparsity=0.7, search_from=str(path)),
                               "ramp.json prunes 60.00% of the weights, the target sparsity is 70.00%"),
                              (AllocationSettings(method="auto", search_from=str(tmp_path / "no.json")),
                               "does not exist"),
                              (AllocationSettings(method="auto", search_from=str(tmp_path / "bad.json")),
                               "not valid JSON"),
                              (AllocationSettings(method="owl", sparsity=0.6, search_from=str(path)),
                               "needs allocation auto")):
        with pytest.raises(SettingsError, match=message) as e:
            settings.check()
        assert e.value.field == "allocation.search_from"


def test_search_from_refuses_a_file_whose_per_block_is_not_what_it_prunes(tiny_search, tmp_path):
    """The search starts from a file's per_block: a hand-edited one that is short (it crashed the search) or that
    disagrees with the file's per_layer is refused before anything loads."""
    from analysis.loading import ModelPreview

    model, _, starts = tiny_search
    preview = ModelPreview("tiny", None, model.config, False, model=model)
    good = starts["ramp"].to_dict()
    AllocationSettings(method="auto", sparsity=0.6,
                       search_from=str(Allocation.from_dict(good).save(tmp_path / "ok.json"))).check_model(preview)
    for per_block, message in (([0.6], "per_block has 1 ratios, the model has 4 blocks"),
                               ([0.5, 0.55, 0.7, 0.65], r"per_block\[2\] is 0.700000 but its matrices' ratios in "
                                                        r"per_layer average 0.650000 \(edited by hand\?\)")):
        path = Allocation.from_dict({**good, "per_block": per_block}).save(tmp_path / "edited.json")
        with pytest.raises(SettingsError, match=message) as e:
            AllocationSettings(method="auto", sparsity=0.6, search_from=str(path)).check_model(preview)
        assert e.value.field == "allocation.search_from"


@pytest.fixture
def off_grid_starts(tiny_search):
    """uniform, and a ramp whose ratios are not multiples of the search's step (the best start for Wanda)."""
    model, calib, starts = tiny_search
    ramp = [0.51, 0.56, 0.64, 0.69]
    return model, calib, {"uniform": starts["uniform"], "ramp": Allocation(
        "", 0.6, "custom", {}, ramp, {r.name: ramp[r.block] for r in prunable_layers(model)}, 0.6)}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_anchored_levels_are_a_real_prune(off_grid_starts, method):
    """BlockLevels.anchor(per_layer) leaves the model exactly as analysis.pruning.prune does (each block
    pruned from its inputs after the pruned blocks before it), keeps the levels of the blocks before
    the first block that changes, and apply() assembles the anchor again from its levels."""
    model, calib, starts = off_grid_starts
    dense = DenseSnapshot.take(model)
    ramp, child = starts["ramp"].per_layer, {n: r for n, r in starts["ramp"].per_layer.items()}
    for r in prunable_layers(model):  # one step from block 2 to block 3: blocks 0-2 keep their inputs
        child[r.name] += {2: -SEARCH_STEP, 3: SEARCH_STEP}.get(r.block, 0.0)
    levels = BlockLevels(model, calib, method)
    real = {}
    for name, per_layer in (("ramp", ramp), ("child", child)):
        prune(model, per_layer, method=method, calib=calib)
        real[name] = {r.name: r.weight().clone() for r in prunable_layers(model)}
        dense.restore(model)
    final = []
    assert levels.anchor(ramp, on_output=final.append)
    assert all(torch.equal(r.weight(), real["ramp"][r.name]) for r in prunable_layers(model))
    # the walk ends with the pruned model's final hidden states: through the head alone, its own forward's losses
    assert final[0].shape == (*calib.shape, model.config.hidden_size)
    assert np.allclose(window_losses(model, calib, final=final[0]), window_losses(model, calib), rtol=1e-6)
    assert _replays(model, calib[:4], final[0][:4], None) and not _replays(model, calib[4:8], final[0][:4], None)
    kept = {k: v for k, v in levels.cache.items() if k[0] <= 2}
    assert levels.anchor(child)
    assert all(torch.equal(r.weight(), real["child"][r.name]) for r in prunable_layers(model))
    assert all(levels.cache[k] is v for k, v in kept.items())  # not pruned again
    state = levels.save()
    levels.restore()
    levels.load(state)
    levels.apply(child)
    assert all(torch.equal(r.weight(), real["child"][r.name]) for r in prunable_layers(model))
    levels.restore()
    assert all(torch.equal(r.weight(), dense.weights[r.name]) for r in prunable_layers(model))


def test_reuse_caveats_name_another_pruner_device_or_dtype():
    """A search's allocation pruned with another pruner, or (SparseGPT, after real prunes) on another device
    or dtype, gets a warning; one pruned as it was searched, or a search that kept a start, gets none."""
    model = tiny_llama(layers=2)
    searched = {"history": [{}, {}], "result": "search", "pruner": "sparsegpt", "real_prunes": 3, "device": "cpu",
                "dtype": "float32"}
    assert reuse_caveats(searched, "sparsegpt", model) == []
    assert reuse_caveats({**searched, "result": "uniform"}, "wanda", model) == []  # a start claims no gain
    # a second stage that kept its start, the first stage's result, still holds that stage's gain
    staged = {**searched, "result": "stage 1", "before": searched}
    assert len(reuse_caveats(staged, "wanda", model)) == 1
    assert reuse_caveats({**staged, "before": {**searched, "result": "owl"}}, "wanda", model) == []
    assert reuse_caveats({"method": "uniform"}, "wanda", model) == []  # not a search's
    [other] = reuse_caveats(searched, "wanda", model)
    assert "searched with sparsegpt's prunes; pruned with wanda" in other
    [gpu] = reuse_caveats({**searched, "device": "cuda"}, "sparsegpt", model)
    assert "did best on cuda float32; pruned on cpu float32" in gpu and "search where you prune" in gpu
    assert reuse_caveats({**searched, "device": "cuda", "real_prunes": 0}, "sparsegpt", model) == []  # proxy only
    wanda = {**searched, "pruner": "wanda", "device": "cuda"}
    assert reuse_caveats(wanda, "wanda", model) == []  # Wanda's gain carried over to a GPU (README)
    before = {k: v for k, v in searched.items() if k != "dtype"}  # saved before the search kept its dtype
    model.to(torch.bfloat16)
    assert reuse_caveats(before, "sparsegpt", model) == []
    [half] = reuse_caveats(searched, "sparsegpt", model)
    assert "did best on cpu float32; pruned on cpu bfloat16" in half


# On this tiny model, with verify: Wanda (seed 4) improves twice and rejects 3 candidates after a real
# prune (one of them met twice); SparseGPT keeps its best start (seed 2: every candidate is worse after
# a real prune) or improves and rejects (seed 0).
@pytest.mark.parametrize("method, seed", [("wanda", 4), ("sparsegpt", 2), ("sparsegpt", 0)])
def test_verified_search_improves_only_after_a_real_prune(off_grid_starts, method, seed):
    """verify="all": every start (at its own ratios) and every offspring the proxy confirms is pruned for
    real; the parent is the best start after a real prune, every step of the history is a real
    improvement, and the result's fitness is that of a real prune at its ratios; deterministic."""
    model, calib, starts = off_grid_starts
    dense = DenseSnapshot.take(model)
    a = search_allocation(model, calib, starts, prune_method=method, steps=8, seed=seed, screen_samples=2,
                          screen_seqlen=16, verify="all")
    b = search_allocation(model, calib, starts, prune_method=method, steps=8, seed=seed, screen_samples=2,
                          screen_seqlen=16, verify="all")
    assert a.per_layer == b.per_layer and a.params["verified"] == b.params["verified"]
    verified, history = a.params["verified"], a.params["history"]
    assert set(starts) <= set(verified) and len(set(verified.values())) <= a.params["real_prunes"] <= len(verified)
    assert a.params["start"] == min(starts, key=verified.get)  # the parent: the best start after a real prune
    assert history[0]["fitness"] == verified[a.params["start"]]
    for before, h in zip(history, history[1:]):  # each improvement was measured by a real prune
        assert verified[f"step {h['step']}"] == h["fitness"] < before["fitness"]
    rejected = [s for s in verified if s not in starts and int(s.split()[1]) not in {h["step"] for h in history}]
    assert rejected and all(verified[s] >= min(verified.values()) for s in rejected)
    assert a.params["real_fitness"] == history[-1]["fitness"] == min(verified.values())
    # the gain is the real prunes', on all the scored windows
    assert a.params["gain"] == pytest.approx(history[0]["fitness"] - history[-1]["fitness"], abs=1e-9)
    assert a.params["gain_windows"] == calib.shape[0] and a.params["gain_se"] >= 0
    assert "starts (real prunes): " + a.params["start"] in "\n".join(describe(a.params))
    assert (a.params["device"], a.params["dtype"]) == ("cpu", "float32")  # where the real prunes ran
    assert f"{a.params['real_prunes']} real prunes on cpu float32" in describe(a.params)[-1]
    assert reuse_caveats(a.params, method, model) == []  # pruned as it was searched
    if len(history) == 1:
        assert a.params["result"] == a.params["start"] and a.per_layer == starts[a.params["start"]].per_layer
    else:
        assert a.params["result"] == "search" and a.per_block == history[-1]["per_block"]
    assert a.achieved == pytest.approx(0.6, abs=1e-12)
    assert all(torch.equal(r.weight(), dense.weights[r.name]) for r in prunable_layers(model))  # dense again
    prune(model, a.per_layer, method=method, calib=calib)
    assert fitness(model, calib[:, :128]) == pytest.approx(a.params["real_fitness"], rel=1e-6)
    dense.restore(model)


# On this tiny model, with verify "starts": the result is confirmed by its real prune for Wanda seed 3 and
# SparseGPT seed 3, and is worse than its start after the real prune for Wanda seed 4 and SparseGPT seed 0.
@pytest.mark.parametrize("method, seed, kept", [("wanda", 3, True), ("wanda", 4, False), ("sparsegpt", 3, True),
                                                ("sparsegpt", 0, False)])
def test_search_checking_its_starts_and_result(off_grid_starts, method, seed, kept):
    """verify="starts": every start is pruned for real and the best one after its real prune is the
    parent; the proxy search goes on from it without further real prunes, and its result is pruned for
    real once: kept only if it beats that start, else the start is returned at its own ratios. The kept
    allocation's real fitness is a real prune's; deterministic; the model is dense again."""
    model, calib, starts = off_grid_starts
    dense = DenseSnapshot.take(model)
    kw = dict(prune_method=method, steps=8, seed=seed, screen_samples=2, screen_seqlen=16, verify="starts")
    a, b = search_allocation(model, calib, starts, **kw), search_allocation(model, calib, starts, **kw)
    assert a.per_layer == b.per_layer and a.params["verified"] == b.params["verified"]
    p = a.params
    verified, start = p["verified"], p["start"]
    assert set(verified) == set(starts) | {"result"} and p["real_prunes"] == len(starts) + 1
    assert start == min(starts, key=verified.get)
    assert p["history"][0]["fitness"] == pytest.approx(verified[start], rel=1e-6)  # the proxy is exact at its anchor
    assert len(p["history"]) > 1  # the proxy search improved, so its result was checked
    assert (verified["result"] < verified[start]) == kept
    account = "\n".join(describe(p))
    assert "the search's result after a real prune" in account
    if kept:
        assert p["result"] == "search" and p["real_fitness"] == verified["result"]
        assert p["gain"] == pytest.approx(verified[start] - verified["result"], abs=1e-9) and p["gain_se"] > 0
        assert a.per_block == p["history"][-1]["per_block"] and "gain " in account
    else:
        assert p["result"] == start and a.per_layer == starts[start].per_layer and p["real_fitness"] == verified[start]
        assert p["gain"] == 0 and f"not better, so {start} is kept" in account and "gain " not in account
    assert a.achieved == pytest.approx(0.6, abs=1e-12)
    assert all(torch.equal(r.weight(), dense.weights[r.name]) for r in prunable_layers(model))
    prune(model, a.per_layer, method=method, calib=calib)
    assert fitness(model, calib[:, :128]) == pytest.approx(p["real_fitness"], rel=1e-6)
    dense.restore(model)


# On this tiny model, with windows of 32 tokens and 16 to confirm on: Wanda seed 1's result beats its start on both
# halves of the windows; SparseGPT seed 3's beats it on the first 16 tokens (where the moves were chosen) but not on
# the last 16, and SparseGPT seed 5's the other way round.
@pytest.mark.parametrize("method, seed, kept", [("wanda", 1, True), ("sparsegpt", 3, False), ("sparsegpt", 5, True)])
def test_checked_search_decides_on_the_tokens_it_did_not_select_on(off_grid_starts, method, seed, kept):
    """verify="starts" with windows at least twice as long as the tokens it confirms on: whether the result beats
    its start is decided after the two real prunes on the tokens after the first confirm_seqlen of each window
    (predicted with the window before them), which no candidate was selected on; the gain is measured there."""
    model, calib, starts = off_grid_starts
    dense = DenseSnapshot.take(model)
    a = search_allocation(model, calib, starts, prune_method=method, steps=8, seed=seed, screen_samples=2,
                          screen_seqlen=8, confirm_seqlen=16, verify="starts")
    p = a.params
    start, decided, verified = p["start"], p["decided"], p["verified"]
    assert set(decided) == {start, "result"} and p["decision_tokens"] == calib.shape[0] * 16
    for name, alloc in ((start, starts[start]), ("result", a if kept else None)):
        if alloc is None:
            continue
        prune(model, alloc.per_layer, method=method, calib=calib)  # the decision's numbers are real prunes'
        tail = window_losses(model, calib, from_token=16)
        assert tail.mean() == pytest.approx(decided[name], rel=1e-6)
        assert fitness(model, calib[:, :16]) == pytest.approx(verified[name], rel=1e-6)
        # the 31 predictions of a window: the first 15 (16 tokens) and the last 16, each with its context
        whole, first = window_losses(model, calib), window_losses(model, calib[:, :16])
        assert np.allclose(31 * whole, 15 * first + 16 * tail, rtol=1e-5)
        dense.restore(model)
    assert (decided["result"] < decided[start]) == kept
    assert (verified["result"] < verified[start]) == (kept if method == "wanda" else not kept)  # the first 16 tokens
    if kept:
        assert p["result"] == "search" and p["gain"] == pytest.approx(decided[start] - decided["result"], abs=1e-9)
    else:
        assert p["result"] == start and a.per_layer == starts[start].per_layer and p["gain"] == 0
    assert "calibration tokens the search did not select on" in "\n".join(describe(p))
    assert all(torch.equal(r.weight(), dense.weights[r.name]) for r in prunable_layers(model))


@pytest.mark.parametrize("objective", ["nll", "kl"])
def test_real_prunes_scored_from_their_walk_match_forwards(off_grid_starts, objective):
    """On the calibration windows a real prune is scored from its own block walk (the norm and head only): the
    same numbers as forwards over the same windows given as a held-out text, for fewer forward passes."""
    model, calib, starts = off_grid_starts
    kw = dict(prune_method="wanda", steps=8, seed=1, screen_samples=2, screen_seqlen=8, confirm_seqlen=16,
              verify="starts", objective=objective)
    walked = search_allocation(model, calib, starts, **kw).params
    forwards = search_allocation(model, calib, starts, fitness_windows=calib.clone(), **kw).params
    for key in ("verified", "decided"):
        assert walked[key].keys() == forwards[key].keys()
        assert all(walked[key][n] == pytest.approx(forwards[key][n], rel=1e-6, abs=1e-9) for n in walked[key])
    assert walked["result"] == forwards["result"] and walked["real_prunes"] == forwards["real_prunes"] == 3
    # each real prune: 2 forward passes over the 8 windows; replaying: 1 (4 windows) to check the replay once
    assert forwards["forward_passes"] - walked["forward_passes"] == 3 * 2 - 1


def test_checked_search_decides_on_later_tokens_with_the_kl_objective(off_grid_starts):
    """The same decision with the KL objective: KL(dense || pruned) on the tokens after the first 16, the dense
    reference taken at those positions with the window before them."""
    model, calib, starts = off_grid_starts
    dense = DenseSnapshot.take(model)
    reference = log_probs(model, calib, from_token=16)
    assert reference.shape[:2] == (8, 16)
    a = search_allocation(model, calib, starts, prune_method="wanda", steps=8, seed=1, screen_samples=2,
                          screen_seqlen=8, confirm_seqlen=16, verify="starts", objective="kl")
    p = a.params
    prune(model, starts[p["start"]].per_layer, method="wanda", calib=calib)
    kl = window_losses(model, calib, reference=reference, from_token=16)
    dense.restore(model)
    assert (kl > 0).all() and kl.mean() == pytest.approx(p["decided"][p["start"]], rel=1e-5)
    assert (p["result"] == "search") == (p["decided"]["result"] < p["decided"][p["start"]])
    assert window_losses(model, calib, reference=reference, from_token=16) == pytest.approx(0, abs=1e-3)  # dense


def test_verify_modes_are_checked(off_grid_starts):
    model, calib, starts = off_grid_starts
    with pytest.raises(AllocationError, match="verify must be one of none, starts, all"):
        search_allocation(model, calib, starts, steps=1, verify=True)
    with pytest.raises(SettingsError, match="search_verify must be one of none, starts, all") as e:
        AllocationSettings(method="auto", search_verify="some").check()
    assert e.value.field == "allocation.search_verify"
    with pytest.raises(SettingsError, match="search_space must be one of block, block\\+kind") as e:
        AllocationSettings(method="auto", search_space="matrix").check()
    assert e.value.field == "allocation.search_space"
    # a run stored before the modes (search_verify true/false) reads as "all"/"none"
    old = RunSettings().to_dict()
    for stored, mode in ((True, "all"), (False, "none")):
        old["allocation"]["search_verify"] = stored
        assert RunSettings.from_dict(old).allocation.search_verify == mode


def test_verified_search_with_a_repeated_start_anchors_on_the_first(off_grid_starts):
    """A start with the same ratios as an earlier one is not pruned again, and the search goes on
    from the first one's anchor: the same search as without the repeat."""
    model, calib, starts = off_grid_starts
    ordered = {"ramp": starts["ramp"], "uniform": starts["uniform"]}
    kw = dict(prune_method="wanda", steps=8, seed=4, screen_samples=2, screen_seqlen=16, verify="all")
    a = search_allocation(model, calib, {**ordered, "ramp again": starts["ramp"]}, **kw)
    b = search_allocation(model, calib, ordered, **kw)
    assert a.params["real_prunes"] == b.params["real_prunes"] and a.params["start"] == "ramp"
    assert a.params["history"] == b.params["history"] and a.per_layer == b.per_layer


def test_verified_search_on_more_held_out_windows_than_its_proxy(off_grid_starts):
    """confirm_samples: the proxy confirms on that many of the held-out windows, spread over them,
    while every real prune (verify) is scored on all of them."""
    model, calib, starts = off_grid_starts
    held = calib_ids(8, 24, seed=5)
    a = search_allocation(model, calib, starts, prune_method="sparsegpt", steps=6, seed=0, screen_samples=1,
                          screen_seqlen=16, fitness_windows=held, confirm_samples=2, verify="all")
    assert a.params["confirm_tokens"] == 2 * 24 and a.params["real_prune_tokens"] == held.numel()
    assert len(a.params["verified"]) > len(starts)
    dense = DenseSnapshot.take(model)
    prune(model, a.per_layer, method="sparsegpt", calib=calib)
    assert fitness(model, held) == pytest.approx(a.params["real_fitness"], rel=1e-6)
    dense.restore(model)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_search_in_two_stages_is_the_search_then_the_search_from_its_result(off_grid_starts, method):
    """settings.search_then_steps: the second stage is exactly a search from the first stage's result (its only
    start) with seed + THEN_SEED on the second stage's windows, as `--search-from` its JSON would run; the result
    holds both stages' accounts and their cost together, and progress and on_best count one run of 8 generations."""
    model, calib, starts = off_grid_starts
    held, more = calib_ids(4, 24, seed=5), calib_ids(8, 24, seed=6)
    settings = AllocationSettings(method="auto", sparsity=0.6, search_steps=4, search_seed=3, search_verify="all",
                                  search_then_steps=4)
    seen, best = [], []
    a = search_in_stages(settings, model, calib, starts, method, held, more,
                         progress=lambda m, f: seen.append((m, f)), on_best=lambda r, f, s: best.append(s))
    first = search_allocation(model, calib, starts, prune_method=method, steps=4, seed=3, fitness_windows=held,
                              verify="all", confirm_samples=1)
    then = search_allocation(model, calib, {"stage 1": first}, prune_method=method, steps=4, seed=3 + THEN_SEED,
                             fitness_windows=more, verify="all", confirm_samples=2)
    assert a.per_layer == then.per_layer and a.per_block == then.per_block
    assert a.achieved == pytest.approx(0.6, abs=1e-12)
    assert a.params["history"] == then.params["history"] and a.params["before"]["history"] == first.params["history"]
    assert a.params["real_prune_tokens"] == more.numel() and a.params["before"]["real_prune_tokens"] == held.numel()
    assert a.params["start"] == "stage 1" and a.params["seed"] == 3 + THEN_SEED
    assert a.params["history"][0]["per_block"] == first.per_block  # the second stage starts where the first ended
    for k in ("forward_passes", "tokens", "real_prunes"):
        assert a.params[k] == a.params["before"][k] + then.params[k]
    steps = [(m.split(":")[0], f) for m, f in seen if ": step " in m]
    assert [m for m, _ in steps] == ["search"] * 4 + ["search, stage 2"] * 4
    fractions = [f for _, f in steps]  # each stage's starts take the first part of its half of the bar
    assert 0.0 < fractions[0] and fractions == sorted(fractions) and fractions[3] == 0.5 and fractions[-1] == 1.0
    # each stage's statistics, gathered before its first generation, hold the bar where the stage starts
    stats = {(m.split(":")[0], f) for m, f in seen if "statistics: block" in m}
    assert stats == {("search statistics", 0.0), ("search, stage 2 statistics", 0.5)}
    assert all(0.0 <= f <= 1.0 for _, f in seen)
    assert best[0] == 0 and best.count(4) >= 1 and all(s > 4 for s in best[best.index(4) + 1:])
    text = describe(a.params)
    assert text[0].startswith("search fitness: held-out") and text[-1].startswith("cost: ")
    assert sum(line.startswith("from ") for line in text) == 2
    assert f"then 4 more generations from that result, scored on {more.numel()} tokens (search seed 103):" in text
    # a stop during the first stage ends the search there: no second stage
    stop = threading.Event()
    cut = search_in_stages(settings, model, calib, starts, method, held, more, stop=stop,
                           progress=lambda m, f: m.startswith("search: step 2/") and stop.set())
    assert "before" not in cut.params and cut.params["steps_done"] == 2
    # no generations at all: the starts alone, their progress shown as it comes
    seen.clear()
    starts_only = search_in_stages(replace(settings, search_steps=0, search_then_steps=0), model, calib, starts,
                                   method, held, progress=lambda m, f: seen.append((m, f)))
    assert starts_only.params["steps"] == 0 and seen and all(0.0 <= f <= 1.0 for _, f in seen)
    # before the first generation, the progress names the best start so far: on the proxy, then after real prunes
    for phase in ("scoring the start", "for real, block"):
        lines = [m for m, _ in seen if phase in m]
        assert "best so far" not in lines[0] and "(best so far: " in lines[-1], lines
    verified = starts_only.params["verified"]
    assert f"best so far: {min(list(verified)[:-1], key=verified.get)}, held-out NLL" in lines[-1]


def test_search_then_settings_are_checked():
    text = str(ROOT / "README.md")  # a held-out text any checkout has
    for settings, field, message in (
            (AllocationSettings(method="auto", search_then_steps=-1), "search_then_steps", ">= 0"),
            (AllocationSettings(method="auto", search_then_steps=2), "search_then_steps", "give search_text too"),
            (AllocationSettings(method="auto", search_then_samples=64), "search_then_samples", "give search_text too"),
            (AllocationSettings(method="auto", search_text=text, search_then_samples=64),
             "search_then_samples", "give its generations too"),
            (AllocationSettings(method="auto", search_text=text, search_then_steps=2,
                                search_then_samples=0), "search_then_samples", ">= 1")):
        with pytest.raises(SettingsError, match=message) as e:
            settings.check()
        assert e.value.field == f"allocation.{field}"


def test_verified_search_stopped_during_a_real_prune_keeps_the_best_so_far(off_grid_starts):
    """A stop that arrives while a candidate is pruned for real (after its second block) ends the
    search with the parent it had (measured by a real prune), that candidate unscored, and the model
    dense again. The progress shows each real prune block by block."""
    model, calib, starts = off_grid_starts
    dense = DenseSnapshot.take(model)
    stop = threading.Event()
    seen: dict[str, list[tuple[str, float]]] = {}

    def progress(message: str, fraction: float) -> None:
        if m := re.search(r"pruning the (step \d+) candidate for real, block (\d+)/4", message):
            seen.setdefault(m[1], []).append((m[2], fraction))
            if len(seen) == 2 and m[2] == "2":  # the second candidate (Wanda seed 4: after the improvement at step 1)
                stop.set()
    a = search_allocation(model, calib, starts, steps=8, seed=4, screen_samples=2, screen_seqlen=16, verify="all",
                          progress=progress, stop=stop)
    assert [b for b, _ in seen["step 1"]] == ["1", "2", "3", "4"] and list(seen) == ["step 1", "step 2"]
    assert len({f for _, f in seen["step 1"]}) == 1 and 0 < seen["step 1"][0][1] < seen["step 2"][0][1] < 1
    history, verified = a.params["history"], a.params["verified"]
    assert [h["step"] for h in history] == [0, 1] and a.params["steps_done"] == 2
    assert set(verified) == set(starts) | {"step 1"} and a.params["real_fitness"] == verified["step 1"]
    assert a.per_block == history[-1]["per_block"] and a.achieved == pytest.approx(0.6, abs=1e-12)
    assert all(torch.equal(r.weight(), dense.weights[r.name]) for r in prunable_layers(model))


@pytest.mark.parametrize("verify", ["starts", "all"])
def test_search_stopped_during_its_first_real_prune_returns_a_start_unverified(off_grid_starts, verify):
    """A stop while the first start is pruned for real: no start has a real score, so the search returns
    the proxy's best start at its own ratios with no real fitness, and the model is dense again."""
    model, calib, starts = off_grid_starts
    dense = DenseSnapshot.take(model)
    stop = threading.Event()

    def progress(message: str, _fraction: float) -> None:
        if "for real, block 2/" in message:
            stop.set()
    a = search_allocation(model, calib, starts, steps=4, seed=0, screen_samples=2, screen_seqlen=16, verify=verify,
                          progress=progress, stop=stop)
    assert a.params["verified"] == {} and a.params["real_fitness"] is None and a.params["steps_done"] == 0
    assert a.params["result"] == min(starts, key=a.params["starts"].get)
    assert a.per_layer == starts[a.params["result"]].per_layer
    assert all(torch.equal(r.weight(), dense.weights[r.name]) for r in prunable_layers(model))


def test_verified_start_keeps_its_own_ratios(off_grid_starts):
    """With no improvement to try, verify returns the best start after a real prune at its own ratios."""
    model, calib, starts = off_grid_starts
    a = search_allocation(model, calib, starts, steps=0, verify="all")
    assert a.params["result"] == "ramp" and a.params["verified"]["ramp"] < a.params["verified"]["uniform"]
    assert a.method == "auto" and a.per_block == [0.51, 0.56, 0.64, 0.69] and a.per_layer == starts["ramp"].per_layer
    assert a.params["history"][0]["per_block"] == [0.51, 0.56, 0.64, 0.69]  # the search's grid is anchored on it


def test_spread_windows_sample_the_whole_text():
    tokenizer = word_tokenizer(1000)
    text = " ".join(f"w{i}" for i in range(1000))  # 100 windows of 10 tokens
    w = spread_windows(tokenizer, text, 10, 4)
    assert w.shape == (4, 10) and w[0, 0] == 0 and w[-1, 0] == 990  # the first and the last window
    assert spread_windows(tokenizer, text, 10, 500).shape == (100, 10)  # no more windows than the text has
    with pytest.raises(DataError, match="The search text has 1000 tokens"):
        spread_windows(tokenizer, text, 2000, 4)


def test_search_windows_of_both_stages_come_from_one_text(tmp_path):
    """Both stages score on windows of the search text, spread over all of it: the second stage on
    THEN_SAMPLES times as many (or its own count); no second stage, no windows for it."""
    tokenizer = word_tokenizer(1000)
    path = tmp_path / "held_out.txt"
    path.write_text(" ".join(f"w{i}" for i in range(1000)))  # 100 windows of 10 tokens
    calibration = CalibrationSettings(n_samples=2, seqlen=10)
    text = str(path)
    first, then = search_windows(tokenizer, AllocationSettings(method="auto", search_text=text, search_verify="none",
                                                               search_then_steps=3), calibration)
    assert first.shape == (2, 10) and then.shape == (2 * THEN_SAMPLES, 10)
    assert first[0, 0] == then[0, 0] == 0 and first[-1, 0] == then[-1, 0] == 990  # each spans the whole text
    first, then = search_windows(tokenizer, AllocationSettings(method="auto", search_text=text, search_samples=5,
                                                               search_then_steps=3, search_then_samples=7), calibration)
    assert first.shape[0] == 5 and then.shape[0] == 7
    assert search_windows(tokenizer, AllocationSettings(method="auto", search_text=text), calibration)[1] is None
    assert search_windows(tokenizer, AllocationSettings(method="auto"), calibration) == (None, None)
    assert search_windows(tokenizer, AllocationSettings(method="owl", search_text=text), calibration) == (None, None)


def test_unsampled_windows_avoid_every_calibration_token():
    tokenizer = word_tokenizer(1000)
    text = " ".join(f"w{i}" for i in range(1000))  # token i at position i: 100 windows of 10 tokens
    calib = calibration_batches(tokenizer, text, n_samples=6, seqlen=50, seed=3)
    seen = set(calib.flatten().tolist())
    free = [k for k in range(100) if not seen & set(range(10 * k, 10 * k + 10))]
    assert 0 < len(free) < 100
    w = unsampled_windows(tokenizer, text, 10, 500, n_samples=6, calib_seqlen=50, seed=3)
    assert w[:, 0].tolist() == [10 * k for k in free]  # every window the batch leaves untouched, none other
    few = unsampled_windows(tokenizer, text, 10, 3, n_samples=6, calib_seqlen=50, seed=3)
    assert few.shape == (3, 10) and few[0, 0] == 10 * free[0] and few[-1, 0] == 10 * free[-1]  # spread over them
    other = unsampled_windows(tokenizer, text, 10, 500, n_samples=6, calib_seqlen=50, seed=4)
    assert other[:, 0].tolist() != w[:, 0].tolist()  # another seed samples (and so leaves) other text
    short = " ".join(f"w{i}" for i in range(60))  # every 10-token window overlaps one of 6 windows of 50
    assert unsampled_windows(tokenizer, short, 10, 4, n_samples=6, calib_seqlen=50, seed=3) is None


def test_cli_prune_with_auto_allocation_and_trim(tmp_path):
    folder = save_tiny_llama(tmp_path / "tiny")
    words = " ".join(f"w{i % 119}" for i in range(12000))
    (tmp_path / "calib.txt").write_text(words)
    (tmp_path / "eval.txt").write_text(" ".join(f"w{(7 * i) % 119}" for i in range(3000)))
    (tmp_path / "held.txt").write_text(" ".join(f"w{(5 * i) % 119}" for i in range(3000)))
    out = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "analysis", "prune", "--model", str(folder), "--device", "cpu",
                        "--allocation", "auto", "--search-steps", "3", "--search-seed", "1", "--search-step", "0.05",
                        "--sparsity", "0.6",
                        "--rowwise", "trim", "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4",
                        "--search-text", str(tmp_path / "held.txt"),
                        "--seqlen", "32", "--eval", str(tmp_path / "eval.txt"), "--eval-seqlen", "32",
                        "--max-windows", "2", "--out", str(out), "--db", str(tmp_path / "runs.sqlite")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["allocation"]["method"] == "auto" and rec["config"]["rowwise"] == "trim"
    assert rec["allocation"]["params"]["steps"] == 3 and rec["allocation"]["params"]["seed"] == 1
    assert rec["allocation"]["params"]["step"] == 0.05
    # scored on 4 held-out windows of 32 tokens (the calibration seqlen) spread over held.txt
    assert rec["allocation"]["params"]["fitness"].startswith("held-out")
    assert rec["allocation"]["params"]["confirm_tokens"] == 4 * 32
    assert rec["config"]["settings"]["allocation"]["search_text"] == str(tmp_path / "held.txt")
    assert rec["achieved"]["overall"] == pytest.approx(0.6, abs=0.01) and "warnings" not in rec
    # the allocation as a GPU's SparseGPT search would have saved it, pruned here: warned before the prune
    gpu = {**rec["allocation"], "params": {**rec["allocation"]["params"], "pruner": "sparsegpt", "device": "cuda",
                                           "result": "search", "real_prunes": 2}}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    r = subprocess.run([sys.executable, "-m", "analysis", "prune", "--model", str(folder), "--device", "cpu",
                        "--allocation", str(tmp_path / "gpu.json"), "--method", "sparsegpt",
                        "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "32",
                        "--eval", str(tmp_path / "eval.txt"), "--eval-seqlen", "32", "--max-windows", "2",
                        "--out", str(out), "--db", str(tmp_path / "runs.sqlite")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    warning = "warning: this allocation's search kept the candidates whose real SparseGPT prunes did best on cuda"
    assert r.stderr.index(warning) < r.stderr.index("sparsegpt: block")
    assert json.loads(out.read_text())["warnings"][0].startswith(warning.removeprefix("warning: "))
    r = subprocess.run([sys.executable, "-m", "analysis", "eval", "--model", str(folder), "--device", "cpu",
                        "--allocation", str(tmp_path / "gpu.json"), "--method", "wanda",
                        "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "32",
                        "--eval", str(tmp_path / "eval.txt"), "--eval-seqlen", "32", "--max-windows", "2"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "warning: this allocation was searched with sparsegpt's prunes; pruned with wanda" in r.stderr
    assert "eval.txt (2 windows of 32 tokens)" in r.stdout  # eval takes prune's --eval for its --text
    bad = subprocess.run([sys.executable, "-m", "analysis", "prune", "--rowwise", "trim", "--nm", "2:4"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2 and "--rowwise" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "analysis", "prune", "--allocation", "auto", "--search-objective",
                          "kld", "--calib", str(tmp_path / "calib.txt"), "--eval", str(tmp_path / "eval.txt")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2 and "--search-objective" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run([sys.executable, "-m", "analysis", "prune", "--allocation", "auto", "--search-step", "0.5",
                          "--calib", str(tmp_path / "calib.txt"), "--eval", str(tmp_path / "eval.txt")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2 and "--search-step" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    for held, message in (("eval.txt", "must not be the evaluation text"), ("short.txt", "The search text has")):
        bad = subprocess.run([sys.executable, "-m", "analysis", "prune", "--model", str(folder), "--allocation", "auto",
                              "--search-text", str(tmp_path / held), "--calib", str(tmp_path / "calib.txt"),
                              "--seqlen", "32", "--eval", str(tmp_path / "eval.txt")],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert bad.returncode == 2 and "--search-text" in bad.stderr and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_allocate_auto_with_the_pruner_and_a_held_out_text(tmp_path):
    """`allocate --method auto` searches with --pruner, scores on --search-text and verifies by real
    prunes with --search-verify; the JSON says so."""
    folder = save_tiny_llama(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(" ".join(f"w{i % 119}" for i in range(6000)))
    (tmp_path / "held.txt").write_text(" ".join(f"w{(5 * i) % 119}" for i in range(3000)))
    out = tmp_path / "auto.json"
    r = subprocess.run([sys.executable, "-m", "analysis", "allocate", "--model", str(folder), "--device", "cpu",
                        "--method", "auto", "--pruner", "sparsegpt", "--sparsity", "0.5", "--search-steps", "2",
                        "--search-text", str(tmp_path / "held.txt"), "--search-verify",
                        "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "32", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=600)
    assert r.returncode == 0, r.stderr
    a = Allocation.load(out)
    assert a.method == "auto" and a.params["pruner"] == "sparsegpt" and a.params["fitness"].startswith("held-out")
    assert a.params["verify"] == "all" and len(a.params["verified"]) >= 5  # uniform, AlphaPruning x 3, OWL
    # the proxy confirms on 4 windows of 32 tokens, the real prunes are scored on VERIFY_SAMPLES x 4
    assert a.params["confirm_tokens"] == 4 * 32 and a.params["real_prune_tokens"] == VERIFY_SAMPLES * 4 * 32
    assert a.achieved == pytest.approx(0.5, abs=1e-9)
    assert f"starts (real prunes): {a.params['start']}" in r.stdout
    assert any(line.startswith("cost: ") and line.endswith(" real prunes on cpu float32")
               for line in r.stdout.splitlines())
    # --search-samples: the real prunes are scored on that many held-out windows; the proxy still confirms on
    # at most --nsamples of them
    held = [sys.executable, "-m", "analysis", "allocate", "--model", str(folder), "--device", "cpu", "--method", "auto",
            "--pruner", "wanda", "--sparsity", "0.5", "--search-steps", "1", "--search-verify", "--calib",
            str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "long.json")]
    r = subprocess.run([*held, "--search-text", str(tmp_path / "held.txt"), "--search-samples", "24"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=600)
    assert r.returncode == 0, r.stderr
    long = Allocation.load(tmp_path / "long.json")
    assert long.params["real_prune_tokens"] == 24 * 32 and long.params["confirm_tokens"] == 4 * 32
    for extra, message in ((["--search-samples", "8"], "give search_text too"),
                           (["--search-text", str(tmp_path / "held.txt"), "--search-samples", "0"], ">= 1")):
        bad = subprocess.run([*held, *extra], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert bad.returncode == 2 and "--search-samples" in bad.stderr and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    # --search-verify starts: the starts and the result only; a mode it does not know is a one-line error
    args = [sys.executable, "-m", "analysis", "allocate", "--model", str(folder), "--device", "cpu", "--method", "auto",
            "--pruner", "wanda", "--sparsity", "0.5", "--search-steps", "3", "--calib", str(tmp_path / "calib.txt"),
            "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--search-verify"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([*args, "starts", "--search-space", "block+kind"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    a = Allocation.load(out)
    assert a.params["verify"] == "starts" and a.params["real_prunes"] == len(a.params["verified"])
    assert a.params["space"] == "block+kind" and "kinds" in a.params["history"][0]
    assert set(a.params["verified"]) - set(a.params["starts"]) <= {"result"}
    bad = subprocess.run([*args, "some"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2 and "--search-verify" in bad.stderr and "none, starts, all" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run([*args, "starts", "--search-space", "matrix"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "--search-space" in bad.stderr and "block, block+kind" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    # --search-from goes on from that result (its budget: a different --sparsity is refused before loading)
    base = [sys.executable, "-m", "analysis", "allocate", "--model", str(folder), "--device", "cpu", "--method", "auto",
            "--search-steps", "1", "--search-from", str(out), "--calib", str(tmp_path / "calib.txt"),
            "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "more.json")]
    r = subprocess.run([*base, "--sparsity", "0.5"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr
    more = Allocation.load(tmp_path / "more.json")
    assert more.params["start"] == "auto.json" and more.params["history"][0]["per_block"] == a.per_block
    bad = subprocess.run([*base, "--sparsity", "0.6"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert bad.returncode == 2 and "--search-from" in bad.stderr and "prunes 50.00%" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "loading" not in bad.stderr.lower()
    other = a.to_dict()  # an allocation for another model's matrices
    other["per_layer"] = {f"other.{name}": r for name, r in other["per_layer"].items()}
    (tmp_path / "other.json").write_text(json.dumps(other))
    bad = subprocess.run([*base, "--sparsity", "0.5", "--search-from", str(tmp_path / "other.json")],  # the last wins
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=120)
    assert bad.returncode == 2 and "--search-from" in bad.stderr and "another model" in bad.stderr, bad.stderr


def test_cli_allocate_auto_in_two_stages(tmp_path):
    """`--search-then-steps N [--search-then-samples M]`: a second stage from the first stage's result on M
    windows of the search text (default: twice the first stage's); its account names both stages. Settings it
    cannot use are one-line errors before the model loads."""
    folder = save_tiny_llama(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(" ".join(f"w{i % 119}" for i in range(6000)))
    (tmp_path / "held.txt").write_text(" ".join(f"w{(5 * i) % 119}" for i in range(3000)))
    args = [sys.executable, "-m", "analysis", "allocate", "--model", str(folder), "--device", "cpu", "--method", "auto",
            "--pruner", "wanda", "--sparsity", "0.5", "--search-steps", "2", "--search-verify", "none",
            "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "32",
            "--out", str(tmp_path / "staged.json")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    held = ["--search-text", str(tmp_path / "held.txt")]
    r = subprocess.run([*args, *held, "--search-then-steps", "2"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    a = Allocation.load(tmp_path / "staged.json")
    assert a.params["before"]["confirm_tokens"] == 4 * 32 and a.params["confirm_tokens"] == 2 * 4 * 32
    assert a.params["before"]["steps"] == 2 and a.params["steps"] == 2 and a.params["seed"] == THEN_SEED
    assert a.achieved == pytest.approx(0.5, abs=1e-9)
    assert sum(line.startswith("from ") for line in r.stdout.splitlines()) == 2
    assert f"then 2 more generations from that result, scored on {2 * 4 * 32} tokens" in r.stdout
    for extra, flag, message in ((["--search-then-steps", "2"], "--search-then-steps", "give search_text too"),
                                 (["--search-then-samples", "8"], "--search-then-samples", "give search_text too"),
                                 ([*held, "--search-then-samples", "8"], "--search-then-samples",
                                  "give its generations too"),
                                 (["--search-then-steps", "-1"], "--search-then-steps", ">= 0")):
        bad = subprocess.run([*args, *extra], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert bad.returncode == 2 and flag in bad.stderr and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_allocation_page_finds_an_allocation(tmp_path, monkeypatch):
    """The Allocation page's Find allocation on the real default model (one generation, KL objective,
    scored on a held-out text, the page's ε among the starts; the evaluation text is refused): progress,
    the best KL so far, "Use this curve" takes the search's per-block ratios as the control points, and
    "Start from your curve" searches from them. With the Prune page evaluating on WikiText-2 test, the
    page offers its valid split as the search text."""
    from test_app import fresh_app, metric, run_until_idle

    (tmp_path / "valid.txt").write_text("held out")
    monkeypatch.setenv("ALPHASCOPE_WIKITEXT", str(tmp_path))
    at = fresh_app()
    at.button(key="model_load").click().run()
    at.switch_page("pages/allocation.py")
    run_until_idle(at, "spectra")
    assert "alloc_search_text_suggest" not in [b.key for b in at.button]  # the embedded corpus has no valid split
    at.session_state["_prune_data"] = (CalibrationSettings(), replace(QUICK_EVALUATION, source="wikitext2:test"))
    at.run()
    assert at.button(key="alloc_search_text_suggest").label == "Score on wikitext2:valid"
    at.button(key="alloc_search_text_suggest").click().run()
    assert at.text_input(key="alloc_search_text").value == "wikitext2:valid"
    assert "alloc_search_text_suggest" not in [b.key for b in at.button]  # offered while the field is empty
    at.session_state["_prune_data"] = (CalibrationSettings(), QUICK_EVALUATION)
    # a curve left from another model is not offered as a start; this model's curve is (next run)
    at.session_state["alloc_custom"] = replace(at.session_state["alloc_custom"], model="another/model")
    at.run()
    assert at.checkbox(key="alloc_search_from_mine").disabled
    at.run()
    assert not at.checkbox(key="alloc_search_from_mine").disabled
    at.number_input(key="alloc_search_steps").set_value(1).run()
    at.number_input(key="alloc_search_step").set_value(0.05).run()
    at.selectbox(key="alloc_search_objective").set_value("kl").run()
    at.slider(key="alloc_epsilon").set_value(0.05).run()  # the page's ε joins the AlphaPruning and FARMS starts
    assert at.selectbox(key="alloc_search_verify").value == "starts"  # the default
    at.selectbox(key="alloc_search_verify").set_value("none").run()  # 10 starts: no real prunes for them here
    at.selectbox(key="alloc_search_space").set_value("block+kind").run()
    at.text_input(key="alloc_search_text").set_value("default").run()  # the Prune page's evaluation text
    at.button(key="alloc_search_run").click().run()
    assert any("must not be the evaluation text" in e.value for e in at.error)
    assert "alloc_search_job" not in at.session_state
    at.text_input(key="alloc_search_text").set_value(str(ROOT / "README.md")).run()  # a held-out English text
    at.number_input(key="alloc_search_then_steps").set_value(1).run()  # a second stage on twice the windows
    at.button(key="alloc_search_run").click().run()
    run_until_idle(at, "search")
    assert "nats/token" in metric(at, "Best KL to the dense model found")
    job = at.session_state["alloc_search_job"]
    assert job.status == "done" and job.result.method == "auto" and job.result.params["objective"] == "kl"
    assert job.result.params["step"] == 0.05
    first = job.result.params["before"]  # the first stage's account: the second went on from its result
    assert {"alphapruning eps=0.05", "farms eps=0.05", "alphapruning eps=0.3"} <= set(first["starts"])
    assert job.result.params["fitness"].startswith("held-out") and list(job.result.params["starts"]) == ["stage 1"]
    assert job.result.params["confirm_tokens"] == 2 * first["confirm_tokens"] and job.result.params["steps"] == 1
    assert any("starts (proxy): " in c.value and "cost: " in c.value and "then 1 more generations" in c.value
               for c in at.code)  # the search's account
    # a reload of the tab (a new session on its URL, the old one gone) finds the search again
    from test_app import reload_tab

    reload = reload_tab(at, timeout=300)
    reload.switch_page("pages/allocation.py").run()
    assert not reload.exception and reload.session_state["alloc_search_job"] is job
    assert "nats/token" in metric(reload, "Best KL to the dense model found")
    # a search of another model than the session's (loaded since) is dropped, and cancelled
    job.tag, tag = ("another/model", *job.tag[1:]), job.tag
    reload.run()
    assert "alloc_search_job" not in reload.session_state and job.cancelled
    job.tag = tag
    at.button(key="alloc_search_use").click().run()
    assert not at.exception
    assert len(at.session_state["alloc_points"]) == 30
    assert at.session_state["prune_alloc"] == "custom curve (Allocation page)"  # the Prune page prunes it now
    assert at.session_state["alloc_custom"].achieved == pytest.approx(0.5, abs=1e-6)
    # the curve with the search's kind offsets (if it moved any) is the search's allocation, matrix by matrix (to
    # the 4 decimals the control points keep)
    assert at.session_state["alloc_custom"].per_layer == pytest.approx(job.result.per_layer, abs=1e-3)
    blocks: dict[str, set] = {}
    for name, r in job.result.per_layer.items():
        blocks.setdefault(re.search(r"layers\.(\d+)\.", name)[1], set()).add(round(r, 9))
    spread = any(len(ratios) > 1 for ratios in blocks.values())  # kind moves the search kept
    assert any("offsets from the search" in i.value for i in at.info) == spread
    # and a search that starts from that curve refines it, at its budget
    curve = at.session_state["alloc_custom"]
    at.checkbox(key="alloc_search_from_mine").check().run()
    at.selectbox(key="alloc_search_verify").set_value("starts").run()  # the default: its start pruned for real
    at.number_input(key="alloc_search_then_steps").set_value(0).run()
    at.button(key="alloc_search_run").click().run()
    run_until_idle(at, "search")
    again = at.session_state["alloc_search_job"]
    assert again is not job and again.status == "done", again.error
    assert list(again.result.params["starts"]) == ["your curve"] and again.result.params["verify"] == "starts"
    assert any("starts (real prunes): your curve" in c.value for c in at.code)
    assert again.result.params["history"][0]["per_block"] == curve.per_block
    assert again.result.achieved == pytest.approx(curve.achieved, abs=1e-9)
