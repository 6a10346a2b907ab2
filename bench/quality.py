"""Pruning quality on a packaged model: WikiText-2 test perplexity after pruning.

    python -m bench.quality [--model default] [--windows 40] [--sparsities 0.5,0.6,0.7] [--device cuda]
                            [--allocations uniform,alphapruning,owl,auto,auto+trim] [--seeds 0,1,2]
                            [--out FILE] [--resume]

Grid: dense, then every seed x sparsity x pruner {magnitude, wanda, sparsegpt} x allocation {uniform,
owl, alphapruning, auto, auto-kl, auto-checked, auto-unsampled-checked, auto-valid, auto-valid-checked, auto-verify,
auto-verify-more, auto-verify-wide, auto-verify-kinds, auto-verify-long, auto-verify-2x}; "NAME+trim" prunes with
that allocation and TRIM row-wise sparsity. "auto" is the allocation search (analysis.search) on the
calibration batch only ("auto-kl": with the KL-to-dense objective instead of the calibration NLL;
"auto-checked": with the starts and the result pruned for real (analysis.search, verify "starts");
"auto-unsampled-checked": auto-checked scored on windows of the embedded corpus that the calibration batch does not
touch (analysis.data.unsampled_windows; measured as a default, not kept: bench/SEARCH.md);
"auto-valid": the NLL on WikiText-2 *valid*, `--nsamples` windows spread evenly over it, the text
epsilon is chosen on, with the pruner's statistics still from the calibration batch; "auto-valid-checked":
auto-valid with the starts and the result pruned for real; "auto-verify":
auto-valid with the starts and every candidate it confirms pruned for real, keeping only real
improvements; the real prunes are scored on settings.VERIFY_SAMPLES times as many valid windows as the
proxy; "auto-verify-more": that search gone on from the auto-verify result of the same cell for
`--search-steps` more generations, with search seed = calibration seed + MORE_SEED; "auto-verify-wide": the
same with mutations of WIDE_STEP instead of settings.SEARCH_STEP; "auto-verify-kinds": the same in the "block+kind"
search space, analysis.search, with an offset per matrix kind as well; "auto-verify-long": the same as
auto-verify-more with its real prunes scored on LONG_FACTOR times as many valid windows, the proxy confirming on
as many as before; "auto-verify-2x": auto-verify with its real prunes scored on LONG_FACTOR times as many valid windows
from its first step, what `--search-samples` at that many windows runs), started from
uniform, OWL, and AlphaPruning and FARMS at eps 0.1/0.2/0.3 and at the chosen epsilon (searches before
commit e11dfdb: without FARMS; a search whose recorded starts lack "alphapruning eps=<chosen>" predates
that start, which matters on Gemma-3, whose chosen epsilon is 0.05, not on SmolLM2, whose 0.2 is one of
the three), `--search-steps` generations with search seed = the calibration seed; its cost (seconds,
forward passes, tokens, load average) is recorded under "searches".
Calibration: n random windows from the embedded corpus (gensim's Lee background corpus, news text,
disjoint from WikiText-2). Evaluation: the first `--windows` non-overlapping 512-token windows of
WikiText-2 test (a fixed prefix, identical for every run, so differences between runs are paired;
`--windows 0` takes the whole test set; `--searches-from FILE` takes the searched allocations that the requested
runs read (those of `--search-steps` generations), and the epsilon selection, from another result file of the same
model and settings, so a longer evaluation of a finished benchmark prunes with the very allocations it found instead
of searching again).
AlphaPruning's epsilon is chosen from `--eps-grid` on WikiText-2 *valid* (first `--valid-windows` windows, wanda at
`--eps-sparsity`), never on test. OWL uses M=5, lambda=0.08.

Per run it records pruning and evaluation seconds and the peak resident memory of the process
during the run (sampled every 0.1 s with psutil; on a GPU also the peak GPU memory that torch
allocated). The model runs on `--device` (default: CUDA when visible). Results go to `--out`
(default bench/results/quality.json, or quality_cuda.json when the device is a GPU) after
every run (so an interrupted benchmark keeps what it finished; --resume skips finished runs), and a
Markdown table is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from analysis.allocation import Allocation, allocate
from analysis.data import calibration_batches, eval_windows, load_text, spread_windows, unsampled_windows
from analysis.evaluation import perplexity
from analysis.loading import load_model
from analysis.owl import collect_outlier_ratios
from analysis.pipeline import confirm_samples, dense_spectra, library_versions, search_starts
from analysis.pruning import DenseSnapshot, prune
from analysis.search import search_allocation
from analysis.settings import (
    SEARCH_STEP,
    THEN_SAMPLES,
    THEN_SEED,
    AllocationSettings,
    SpectraSettings,
    search_samples,
)
from analysis.store import now_iso

OUT = Path(__file__).resolve().parent / "results" / "quality.json"
METHODS = ("magnitude", "wanda", "sparsegpt")
# table columns
ALLOCS = ("uniform", "owl", "alphapruning", "auto", "auto-kl", "auto-checked", "auto-unsampled-checked", "auto-valid",
          "auto-valid-checked", "auto-verify", "auto-verify-more", "auto-verify-wide", "auto-verify-kinds",
          "auto-verify-long", "auto-verify-2x",
          "uniform+trim", "owl+trim", "auto+trim", "auto-valid+trim", "auto-verify+trim")
RUN_ORDER = ("wanda", "magnitude", "sparsegpt")  # cheapest informative runs first
WIDE_STEP = 0.05  # sparsity one mutation of auto-verify-wide moves: twice the default step
# auto-verify-long's and -2x's real prunes are scored on this many times auto-verify's valid windows: auto-verify-long
# is the library's two-stage search (`--search-then-steps`), run as two searches so its first is auto-verify's own
LONG_FACTOR = THEN_SAMPLES
# searched allocations: the objective of each, the text it is measured on ("calib": the calibration batch;
# "unsampled": windows of the embedded corpus the batch does not touch; "valid": WikiText-2 valid), what it prunes
# for real (analysis.search, verify: "none", "starts" or "all"), and its mutation step
SEARCHES = {"auto": ("nll", "calib", "none", SEARCH_STEP), "auto-kl": ("kl", "calib", "none", SEARCH_STEP),
            "auto-checked": ("nll", "calib", "starts", SEARCH_STEP),
            "auto-unsampled-checked": ("nll", "unsampled", "starts", SEARCH_STEP),
            "auto-valid": ("nll", "valid", "none", SEARCH_STEP),
            "auto-valid-checked": ("nll", "valid", "starts", SEARCH_STEP),
            "auto-verify": ("nll", "valid", "all", SEARCH_STEP),
            "auto-verify-more": ("nll", "valid", "all", SEARCH_STEP),
            "auto-verify-wide": ("nll", "valid", "all", WIDE_STEP),
            "auto-verify-kinds": ("nll", "valid", "all", SEARCH_STEP),
            "auto-verify-long": ("nll", "valid", "all", SEARCH_STEP),
            "auto-verify-2x": ("nll", "valid", "all", SEARCH_STEP)}
SCALES = {"auto-verify-long": LONG_FACTOR, "auto-verify-2x": LONG_FACTOR}  # searches scored on more valid windows
SPACES = {"auto-verify-kinds": "block+kind"}  # the search space of a search not over blocks alone
# searches that go on from another search's result of the same cell (its only start, as --search-from), with their own
# search seed (the calibration seed + MORE_SEED) so they do not replay the first search's moves
GOES_ON_FROM = {"auto-verify-more": "auto-verify", "auto-verify-wide": "auto-verify",
                "auto-verify-kinds": "auto-verify", "auto-verify-long": "auto-verify"}
MORE_SEED = THEN_SEED


class PeakRSS:
    """Peak resident set size (bytes) of this process while the context is open."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_key(sparsity: float, method: str, alloc: str, seed: int = 0) -> str:
    return f"{seed}/{sparsity:.2f}/{method}/{alloc}"


def save(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)


def make_allocation(name: str, sparsity: float, metrics, outliers: dict, epsilon: float, model: str = "default"):
    if name == "owl":
        return allocate(metrics, sparsity, method="owl", outlier_ratios=outliers, owl_lambda=0.08, model=model)
    return allocate(metrics, sparsity, method=name, epsilon=epsilon, model=model)


def searched_allocation(model, calib, sparsity: float, method: str, seed: int, steps: int, tokens: str, metrics,
                        outliers, model_name: str, results: dict, out: Path, name: str = "auto",
                        held_out: Callable | None = None) -> Allocation:
    """The `name` (one of SEARCHES) allocation of this seed/sparsity/pruner, searched once (kept in
    results["searches"]); `held_out(text, seed, verify, scale)`: the windows a search on `text` (a SEARCHES text)
    with calibration `seed` and `verify` scores on, `scale` times as many as usual (None: the calibration batch)."""
    key, calib_seed = run_key(sparsity, method, name, seed), seed
    found = results.setdefault("searches", {})
    if key not in found:
        if name in GOES_ON_FROM:
            first = found.get(run_key(sparsity, method, GOES_ON_FROM[name], seed))
            if first is None:
                raise SystemExit(f"{name} goes on from the {GOES_ON_FROM[name]} search of {key}: run that first")
            starts, seed = {GOES_ON_FROM[name]: Allocation.from_dict(first)}, seed + MORE_SEED
        else:
            # the epsilon chosen on valid is a start too, as `--epsilon` makes it for a user's search
            settings = AllocationSettings(sparsity=sparsity, owl_threshold=5.0, epsilon=results["epsilon"])
            starts = search_starts(settings, model, calib, metrics, outliers, model_name)
        load_before, cpu0 = os.getloadavg(), time.process_time()
        screen, confirm = tokens.split(",")
        n, length = (int(x) for x in screen.split("x"))
        objective, text, verify, step = SEARCHES[name]
        windows = held_out(text, calib_seed, verify, SCALES.get(name, 1))
        confirmed = confirm_samples(windows, verify, calib.shape[0])  # not `confirm`: the confirmation length above
        alloc = search_allocation(model, calib, starts, prune_method=method, steps=steps, step=step,
                                  space=SPACES.get(name, "block"), seed=seed,
                                  model_name=model_name,
                                  screen_samples=n, screen_seqlen=length, confirm_seqlen=int(confirm),
                                  confirm_samples=confirmed,
                                  objective=objective, fitness_windows=windows, verify=verify,
                                  progress=lambda m, f: f >= 1 or int(f * steps) % 10 or log(m))
        alloc.params["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        alloc.params["cpu_s"] = round(time.process_time() - cpu0, 1)  # all threads of this process
        found[key] = alloc.to_dict()
        save(results, out)
        p = alloc.params
        log(f"search {key}: start {p['start']} {min(p['starts'].values()):.4f} -> {p['best_fitness']:.4f} nats "
            f"(gain {p['gain']:.4f} +/- {p['gain_se']:.4f}), {p['seconds']:.0f} s, {p['forward_passes']} passes")
    return Allocation.from_dict(found[key])


# the settings a search or the epsilon selection depends on: a result file whose searches are reused must match them
# (its generations are checked search by search: a file's config holds its last invocation's `--search-steps`)
SEARCH_CONFIG = ("model", "valid_windows", "nsamples", "seqlen", "eps_grid", "eps_sparsity", "owl", "search_tokens")


def search_keys(sparsities, methods, allocs, seeds) -> set[str]:
    """The keys of results["searches"] that the runs of this grid read: each searched allocation's, and the search
    each of them goes on from."""
    keys = set()
    for seed, s, m, a in grid_order(sparsities, methods, allocs, seeds):
        name = a.partition("+")[0]
        while name in SEARCHES:
            keys.add(run_key(s, m, name, seed))
            name = GOES_ON_FROM.get(name)
    return keys


def reuse_searches(results: dict, source: Path, config: dict, keys: set[str]) -> None:
    """Copy the searches `keys` (those `source` has, of this run's `--search-steps` generations: a file's runs can
    differ in them) and the epsilon selection of `source` into `results` (those `results` has win), so a result
    file holds the searches its runs used, not every search of `source`."""
    other = json.loads(source.read_text())
    differ = [k for k in SEARCH_CONFIG if other["config"].get(k) != config[k]]
    if differ:
        raise SystemExit(f"--searches-from {source}: its {', '.join(differ)} differ from this run's; "
                         "its searches would not be the ones this run makes")
    found = {k: v for k, v in other.get("searches", {}).items() if k in keys}
    wanted = {k: v for k, v in found.items() if v["params"]["steps"] == config["search_steps"]}
    for k in found.keys() - wanted.keys():  # else a search of an hour starts unannounced
        log(f"--searches-from: {k} ran {found[k]['params']['steps']} generations, not {config['search_steps']}: "
            "searched again")
    results["searches"] = {**wanted, **results.get("searches", {})}
    results["epsilon_selection"] = {**other.get("epsilon_selection", {}), **results.get("epsilon_selection", {})}
    results["config"]["searches_from"] = source.name


def prune_and_eval(model, snap, alloc, method: str, calib, windows, rowwise: str | None = None) -> dict:
    """Prune with `alloc`, evaluate, restore the dense weights; returns the measurements."""
    gpu = next(model.parameters()).device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        report = prune(model, alloc.per_layer, method=method, calib=calib, rowwise=rowwise)
        t1 = time.perf_counter()
        ppl = perplexity(model, windows)
        t2 = time.perf_counter()
    snap.restore(model)
    out = {"ppl": ppl if math.isfinite(ppl) else None, "achieved": round(report.overall, 6),
           "prune_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2), "peak_rss_mb": round(mem.peak / 2**20, 1)}
    if gpu:
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def choose_epsilon(model, snap, metrics, calib, valid, grid, sparsity: float, results: dict, out: Path) -> float:
    sel = results.setdefault("epsilon_selection", {})
    for eps in grid:
        key = f"{eps:g}"
        if key in sel:
            continue
        alloc = allocate(metrics, sparsity, method="alphapruning", epsilon=eps, model="default")
        sel[key] = prune_and_eval(model, snap, alloc, "wanda", calib, valid)
        log(f"epsilon {eps:g}: wanda + alphapruning at {sparsity} -> valid ppl {sel[key]['ppl']:.3f}")
        save(results, out)
    best = min(grid, key=lambda e: sel[f"{e:g}"]["ppl"] or math.inf)
    results["epsilon"] = best
    return best


def grid_order(sparsities, methods, allocs, seeds=(0,)):
    """Seeds in the given order, then methods (SparseGPT, the slowest, last), highest sparsity first
    (where the allocations differ most), so a benchmark cut short still answers the main question."""
    return [(seed, s, m, a) for seed in seeds for m in methods for s in sorted(sparsities, reverse=True)
            for a in allocs]


def _seed_ppl(runs: dict, sparsity: float, method: str, alloc: str) -> dict[int, float]:
    """Seed -> WikiText-2 perplexity of the finished runs of one table cell."""
    return {r.get("seed", 0): r["ppl"] for r in runs.values() if r["sparsity"] == sparsity and r["method"] == method
            and r["allocation"] == alloc and r.get("ppl")}


def _ppl_cell(values: dict[int, float], empty: str = "n/a", digits: int = 2, count: bool = False) -> str:
    """Mean of the seeds (`digits` decimals), with their range (and, with `count`, their number) when there are
    several; one seed other than 0 is named, since a bare number is seed 0 alone; `empty` when none."""
    if not values:
        return empty
    v = list(values.values())
    mean = f"{sum(v) / len(v):.{digits}f}"
    if len(v) == 1:
        return mean if 0 in values else f"{mean} (seed {next(iter(values))})"
    return f"{mean} ({min(v):.1f}–{max(v):.1f}{f', {len(v)} seeds' if count else ''})"


def heading(cfg: dict) -> str:
    """The model, and the device when it is not the CPU (SparseGPT's prunes differ with round-off: bench/SEARCH.md)."""
    device = cfg.get("device", "cpu")
    return cfg.get("model", "default") + ("" if device == "cpu" else f" on {device}")


def scored_span(cfg: dict) -> str:
    """"all" for the whole test set, else "first" (a prefix of it)."""
    return "all" if cfg["windows"] == 0 else "first"


def markdown(results: dict) -> str:
    runs, cfg = results["runs"], results["config"]
    n_windows = cfg.get('eval_windows', cfg['windows'])
    seeds = sorted({r.get("seed", cfg.get("seed", 0)) for r in runs.values()})
    allocs = [a for a in ALLOCS if any(r["allocation"] == a for r in runs.values())]
    searched = [a for a in SEARCHES if a in allocs]
    names = {"uniform": "uniform", "owl": "OWL", "alphapruning": "AlphaPruning", "auto": "auto",
             "auto-kl": "auto (KL)", "auto-checked": "auto (checked)",
             "auto-unsampled-checked": "auto (checked, unsampled)", "auto-valid": "auto (valid)",
             "auto-valid-checked": "auto (valid, checked)", "auto-verify": "auto (valid, verified)",
             "auto-verify-more": "auto (valid, verified, gone on)",
             "auto-verify-wide": f"auto (valid, verified, gone on, step {WIDE_STEP:g})",
             "auto-verify-kinds": "auto (valid, verified, gone on, block+kind)",
             "auto-verify-long": f"auto (valid, verified, gone on, {LONG_FACTOR}x valid)",
             "auto-verify-2x": f"auto (valid, verified, {LONG_FACTOR}x valid)",
             "uniform+trim": "uniform+TRIM", "owl+trim": "OWL+TRIM", "auto+trim": "auto+TRIM",
             "auto-valid+trim": "auto (valid)+TRIM",
             "auto-verify+trim": "auto (valid, verified)+TRIM"}
    lines = [f"{heading(cfg)}: dense {results['dense']['ppl']:.2f}. WikiText-2 test perplexity, {scored_span(cfg)} "
             f"{n_windows} windows of {cfg['eval_seqlen']} tokens ({cfg['eval_tokens']} scored tokens); "
             f"calibration {cfg['nsamples']}x{cfg['seqlen']} tokens from the embedded corpus, seeds "
             f"{', '.join(map(str, seeds))} (mean, and range over seeds); AlphaPruning eps = "
             f"{results.get('epsilon')} (chosen on WikiText-2 valid); each \"vs\" column compares means over the "
             "seeds its column has.", "",
             f"| sparsity | pruner | {' | '.join(names.get(a, a) for a in allocs)} | best baseline vs uniform |"
             + "".join(f" {names[a]} vs best baseline |" for a in searched),
             "|---|---|" + "---|" * (len(allocs) + 1 + len(searched))]

    def best_baseline(cells, seeds):  # the best baseline's mean over `seeds`, the seeds a column has
        means = [sum(cells[b][k] for k in seeds) / len(seeds) for b in BASELINES
                 if seeds and all(k in cells[b] for k in seeds)]
        return min(means) if means else None

    for s in sorted({r["sparsity"] for r in runs.values()}):
        for m in METHODS:
            cells = {a: _seed_ppl(runs, s, m, a) for a in (*BASELINES, *allocs)}  # baselines not run: no seeds
            if not any(cells.values()):
                continue
            mean = {a: sum(v.values()) / len(v) for a, v in cells.items() if v}
            uniform_seeds = list(cells["uniform"])
            best = best_baseline(cells, uniform_seeds)
            row = f"| {s:.1f} | {m} | " + " | ".join(_ppl_cell(cells[a]) for a in allocs)
            row += f" | {100 * (best - mean['uniform']) / mean['uniform']:+.1f}% |" if best else " | n/a |"
            for a in searched:
                best = best_baseline(cells, list(cells[a]))
                row += f" {100 * (mean[a] - best) / best:+.1f}% |" if a in mean and best else " n/a |"
            lines.append(row)
    lines += ["", "| seed | sparsity | pruner | allocation | prune s | eval s | peak RSS MB |",
              "|---|---|---|---|---|---|---|"]
    for r in runs.values():
        lines.append(f"| {r.get('seed', 0)} | {r['sparsity']:.2f} | {r['method']} | {r['allocation']} | "
                     f"{r['prune_s']:.0f} | {r['eval_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    if results.get("searches"):
        lines += ["", "| search | fitness | start | start fitness | best fitness | gain ± SE | kept (real prunes) | s "
                  "| CPU s | forward passes | tokens | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, a in results["searches"].items():
            p = a["params"]
            kept = f"{p['result']} ({p['real_prunes']})" if p.get("real_prunes") else "search"
            scored = p.get("fitness", "calibration NLL").removesuffix(" (nats/token)").replace("||", "‖")
            gain = f"{p['gain']:.4f} ± {p['gain_se']:.4f}" if "gain_se" in p else "n/a"  # older searches: no SE
            lines.append(f"| {key} | {scored} | "
                         f"{p['start']} | {p['starts'][p['start']]:.4f} | {p['best_fitness']:.4f} | {gain} | {kept} | "
                         f"{p['seconds']:.0f} | {p.get('cpu_s')} | {p['forward_passes']} | {p['tokens']} | "
                         f"{p.get('loadavg_before_after')} |")
    return "\n".join(lines)


# the columns of the summary table: today's default search, and the held-out verified one
SUMMARY = {"auto-checked": "auto, the default (calibration text, `--search-verify starts`)",
           "auto-verify": "auto, `--search-text wikitext2:valid --search-verify all`"}
BASELINES = {"uniform": "uniform", "owl": "OWL", "alphapruning": "AlphaPruning"}


def _seeds_cell(values: dict[int, float]) -> str:
    """A summary cell: _ppl_cell to one decimal, with the number of seeds."""
    return _ppl_cell(values, empty="not run", digits=1, count=True)


def _span(values: list[float], unit: str = "") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.0f}{unit}" if lo == hi else f"{lo:.0f}–{hi:.0f}{unit}"


def summary(results: dict) -> str:
    """A short table for the README: per sparsity x pruner, uniform, the best of uniform / OWL / AlphaPruning,
    and the SUMMARY searches, each compared with those baselines over the seeds the search has; the default
    search's cost."""
    runs, cfg = results["runs"], results["config"]
    lines = [f"{heading(cfg)}: dense {results['dense']['ppl']:.2f}; WikiText-2 test perplexity, {scored_span(cfg)} "
             f"{cfg.get('eval_windows', cfg['windows'])} windows of {cfg['eval_seqlen']} tokens; calibration "
             f"{cfg['nsamples']}x{cfg['seqlen']} tokens of the embedded corpus per seed; mean over seeds "
             "(range, number of seeds); each \"vs\" compares means over the seeds the search has.", "",
             "| sparsity | pruner | uniform | best baseline | "
             + " | ".join(f"{name} | vs best | vs uniform" for name in SUMMARY.values())
             + " | default search: s, forward passes |",
             "|---|---|---|---|" + "---|---|---|" * len(SUMMARY) + "---|"]

    def mean(values: dict[int, float], seeds) -> float:
        return sum(values[k] for k in seeds) / len(seeds)

    for s in sorted({r["sparsity"] for r in runs.values()}):
        for m in METHODS:
            base = {a: _seed_ppl(runs, s, m, a) for a in BASELINES}
            if not base["uniform"]:
                continue
            seeds = list(base["uniform"])
            best = min((a for a in BASELINES if all(k in base[a] for k in seeds)), key=lambda a: mean(base[a], seeds))
            row = f"| {s:.1f} | {m} | {_seeds_cell(base['uniform'])} | {BASELINES[best]} {_seeds_cell(base[best])} |"
            for a in SUMMARY:
                found = _seed_ppl(runs, s, m, a)
                row += f" {_seeds_cell(found)} |"
                ks = [k for k in found if all(k in base[b] for b in BASELINES)]  # seeds with every baseline
                if not ks:
                    row += " | |"
                    continue
                row += f" {100 * (mean(found, ks) / min(mean(base[b], ks) for b in BASELINES) - 1):+.1f}% |"
                worse = [str(k) for k in ks if found[k] > base["uniform"][k]]  # the target: never worse than uniform
                row += f" {100 * (mean(found, ks) / mean(base['uniform'], ks) - 1):+.1f}%" + \
                    (f", worse on seed {', '.join(worse)} |" if worse else " |")
            cost = [p["params"] for k, p in results.get("searches", {}).items()  # of the default searches run here
                    if k.split("/")[1:] == [f"{s:.2f}", m, "auto-checked"] and _seed_ppl(runs, s, m, "auto-checked")]
            row += f" {_span([p['seconds'] for p in cost], ' s')}, {_span([p['forward_passes'] for p in cost])} |" \
                if cost else " |"
            lines.append(row)
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="packaged model: default or gemma3")
    p.add_argument("--windows", type=int, default=40, help="WikiText-2 test windows of 512 tokens (0: all)")
    p.add_argument("--valid-windows", type=int, default=20,
                   help="WikiText-2 valid windows for choosing epsilon (0: all)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--sparsities", default="0.5,0.6,0.7")
    p.add_argument("--pruners", "--methods", dest="methods", default=",".join(RUN_ORDER))
    p.add_argument("--allocations", default="uniform,alphapruning,owl",
                   help="any of uniform, alphapruning, owl, " + ", ".join(SEARCHES) + "; NAME+trim adds TRIM "
                        "row-wise sparsity")
    p.add_argument("--search-steps", type=int, default=40, help="auto: generations of the search")
    p.add_argument("--search-tokens", default="4x128,128",
                   help="auto: screening samples x tokens, and tokens of every calibration sample to confirm on")
    p.add_argument("--eps-grid", default="0.1,0.2,0.3")
    p.add_argument("--eps-sparsity", type=float, default=0.7)
    p.add_argument("--seeds", default="0", help="calibration seeds (and search seeds), e.g. 0,1,2")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--out", default=None, help="result file (default: bench/results/quality.json, "
                                                "quality_cuda.json on a GPU)")
    p.add_argument("--resume", action="store_true", help="keep finished runs of the result file")
    p.add_argument("--searches-from", type=Path, default=None,
                   help="reuse the searches and epsilon selection of this result file (same model and settings)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",")]
    torch.manual_seed(seeds[0])
    lm = load_model(args.model, device=args.device, dtype="float32")
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    out = Path(args.out) if args.out else OUT.with_name("quality_cuda.json" if device.type == "cuda" else OUT.name)
    config = {"model": args.model, "eval": "wikitext2:test", "eval_seqlen": 512, "windows": args.windows,
              "valid_windows": args.valid_windows, "calib": "default (embedded corpus)", "nsamples": args.nsamples,
              "seqlen": args.seqlen, "seeds": seeds, "eps_grid": args.eps_grid, "eps_sparsity": args.eps_sparsity,
              "owl": {"threshold_m": 5.0, "lambda": 0.08}, "search_steps": args.search_steps,
              "search_tokens": args.search_tokens,
              "torch_threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    results = json.loads(out.read_text()) if args.resume and out.exists() else {}
    if results.get("config", {}).get("windows") not in (None, args.windows) or \
            results.get("config", {}).get("model", args.model) != args.model:
        results = {}  # different evaluation set or model: nothing to resume
    results.update({"config": {**results.get("config", {}), **config}, "started": results.get("started", now_iso()),
                    "versions": library_versions(),
                    "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()}})
    if device.type == "cpu":
        results["machine"]["shared"] = "2-core CPU shared with other jobs; see each search's load average"
    results.setdefault("runs", {})
    sparsities, methods, allocs = ([float(s) for s in args.sparsities.split(",")], args.methods.split(","),
                                   args.allocations.split(","))
    if args.searches_from:
        keys = search_keys(sparsities, methods, allocs, seeds)
        reuse_searches(results, args.searches_from, config, keys)
    corpus = load_text("default")
    calibs = {seed: calibration_batches(tok, corpus, args.nsamples, args.seqlen, seed=seed,
                                        bos=lm.info.bos_per_window) for seed in seeds}
    test = eval_windows(tok, load_text("wikitext2:test"), 512, bos=lm.info.bos_per_window,
                        max_windows=args.windows or None)
    valid_text = load_text("wikitext2:valid")
    valid = eval_windows(tok, valid_text, 512, bos=lm.info.bos_per_window, max_windows=args.valid_windows or None)
    length = int(args.search_tokens.split(",")[1])

    def held_out(text: str, seed: int, verify: str, scale: int = 1):
        """A held-out search's fitness windows: settings.search_samples of the confirmation length (more for a
        search that prunes for real, whose real prunes are scored on all of them), spread over WikiText-2 valid
        or over the windows of the embedded corpus that calibration seed `seed` leaves untouched; `scale` times
        as many for a search that scores its real prunes on more text."""
        n, bos = search_samples(args.nsamples, verify) * scale, lm.info.bos_per_window
        if text == "valid":
            return spread_windows(tok, valid_text, length, n, bos)
        if text == "unsampled":
            return unsampled_windows(tok, corpus, length, n, args.nsamples, args.seqlen, seed, bos)
        return None

    results["config"]["eval_windows"] = int(test.shape[0])
    results["config"]["eval_tokens"] = int(test.shape[0] * (test.shape[1] - 1))
    snap = DenseSnapshot.take(model)

    t0 = time.perf_counter()
    metrics = dense_spectra(model, SpectraSettings())
    results["spectra_s"] = round(time.perf_counter() - t0, 2)
    if "dense" not in results:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            results["dense"] = {"ppl": perplexity(model, test), "eval_s": round(time.perf_counter() - t0, 2)}
        results["dense"]["peak_rss_mb"] = round(mem.peak / 2**20, 1)
        save(results, out)
    log(f"dense ppl {results['dense']['ppl']:.3f}")
    bases = {a.split("+")[0] for a in allocs}
    outliers: dict[int, dict] = {}
    if bases & {"owl", *SEARCHES}:
        for seed in seeds:
            t0 = time.perf_counter()
            outliers[seed] = collect_outlier_ratios(model, calibs[seed], owl_threshold=5.0)
            results["owl_outliers_s"] = round(time.perf_counter() - t0, 2)
    eps = 0.3
    if "alphapruning" in bases:
        grid = [float(e) for e in args.eps_grid.split(",")]
        eps = choose_epsilon(model, snap, metrics, calibs[seeds[0]], valid, grid, args.eps_sparsity, results, out)
        log(f"chosen epsilon {eps:g}")

    for seed, s, m, a in grid_order(sparsities, methods, allocs, seeds):
        key = run_key(s, m, a, seed)
        if key in results["runs"]:
            continue
        base, _, rowwise = a.partition("+")
        calib = calibs[seed]
        if base in SEARCHES:
            alloc = searched_allocation(model, calib, s, m, seed, args.search_steps, args.search_tokens, metrics,
                                        outliers[seed], args.model, results, out, name=base, held_out=held_out)
        else:
            alloc = make_allocation(base, s, metrics, outliers.get(seed, {}), eps, args.model)
        r = prune_and_eval(model, snap, alloc, m, calib, test, rowwise=rowwise or None)
        results["runs"][key] = {"seed": seed, "sparsity": s, "method": m, "allocation": a, **r}
        results["finished"] = now_iso()
        save(results, out)
        log(f"{key}: ppl {r['ppl']}, prune {r['prune_s']} s, eval {r['eval_s']} s, peak {r['peak_rss_mb']} MB")
    results["peak_rss_mb_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    save(results, out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
