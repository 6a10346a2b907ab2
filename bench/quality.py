"""Pruning quality on the default model: WikiText-2 test perplexity after pruning.

    python -m bench.quality [--windows 40] [--sparsities 0.5,0.6,0.7] [--device cuda] [--out FILE] [--resume]

Grid: dense, then every sparsity x pruner {magnitude, wanda, sparsegpt} x allocation {uniform, owl,
alphapruning}. Calibration: n random windows from the embedded corpus (gensim's Lee background
corpus, news text, disjoint from WikiText-2). Evaluation: the first `--windows` non-overlapping
512-token windows of WikiText-2 test (a fixed prefix, identical for every run, so differences between
runs are paired; `--windows 0` takes the whole test set). AlphaPruning's epsilon is chosen from `--eps-grid` on
WikiText-2 *valid* (first
`--valid-windows` windows, wanda at `--eps-sparsity`), never on test. OWL uses M=5, lambda=0.08.

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
import platform
import resource
import threading
import time
from pathlib import Path

import psutil
import torch

from analysis.allocation import allocate
from analysis.data import calibration_batches, eval_windows, load_text
from analysis.evaluation import perplexity
from analysis.loading import load_model
from analysis.owl import collect_outlier_ratios
from analysis.pipeline import dense_spectra, library_versions
from analysis.pruning import DenseSnapshot, prune
from analysis.settings import SpectraSettings
from analysis.store import now_iso

OUT = Path(__file__).resolve().parent / "results" / "quality.json"
METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCS = ("uniform", "owl", "alphapruning")  # table columns
RUN_ORDER = ("wanda", "magnitude", "sparsegpt")  # cheapest informative runs first


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


def run_key(sparsity: float, method: str, alloc: str) -> str:
    return f"{sparsity:.2f}/{method}/{alloc}"


def save(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)


def make_allocation(name: str, sparsity: float, metrics, outliers: dict, epsilon: float):
    if name == "owl":
        return allocate(metrics, sparsity, method="owl", outlier_ratios=outliers, owl_lambda=0.08, model="default")
    return allocate(metrics, sparsity, method=name, epsilon=epsilon, model="default")


def prune_and_eval(model, snap, alloc, method: str, calib, windows) -> dict:
    """Prune with `alloc`, evaluate, restore the dense weights; returns the measurements."""
    gpu = next(model.parameters()).device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        report = prune(model, alloc.per_layer, method=method, calib=calib)
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


def grid_order(sparsities, methods, allocs):
    """Methods in the given order (SparseGPT, the slowest, last), highest sparsity first (where the
    allocations differ most), so a benchmark cut short still answers the main question."""
    return [(s, m, a) for m in methods for s in sorted(sparsities, reverse=True) for a in allocs]


def markdown(results: dict) -> str:
    runs, cfg = results["runs"], results["config"]
    n_windows = cfg.get('eval_windows', cfg['windows'])
    lines = [f"Dense: {results['dense']['ppl']:.2f}. WikiText-2 test perplexity, first {n_windows} windows of "
             f"{cfg['eval_seqlen']} tokens ({cfg['eval_tokens']} scored tokens); calibration {cfg['nsamples']}x"
             f"{cfg['seqlen']} tokens from the embedded corpus; AlphaPruning eps = {results.get('epsilon')} "
             f"(chosen on WikiText-2 valid).", "",
             "| sparsity | pruner | uniform | OWL | AlphaPruning | AlphaPruning vs uniform |",
             "|---|---|---|---|---|---|"]
    for s in sorted({r["sparsity"] for r in runs.values()}):
        for m in METHODS:
            cells = [runs.get(run_key(s, m, a), {}).get("ppl") for a in ALLOCS]
            if all(c is None for c in cells):
                continue
            u, a = cells[0], cells[2]
            delta = f"{100 * (a - u) / u:+.1f}%" if u and a else "n/a"
            shown = " | ".join(f"{c:.2f}" if c else "n/a" for c in cells)
            lines.append(f"| {s:.1f} | {m} | {shown} | {delta} |")
    lines += ["", "| sparsity | pruner | allocation | prune s | eval s | peak RSS MB |", "|---|---|---|---|---|---|"]
    for key, r in runs.items():
        s, m, a = key.split("/")
        lines.append(f"| {s} | {m} | {a} | {r['prune_s']:.0f} | {r['eval_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=40, help="WikiText-2 test windows of 512 tokens (0: all)")
    p.add_argument("--valid-windows", type=int, default=20,
                   help="WikiText-2 valid windows for choosing epsilon (0: all)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--sparsities", default="0.5,0.6,0.7")
    p.add_argument("--methods", default=",".join(RUN_ORDER))
    p.add_argument("--allocations", default="uniform,alphapruning,owl")
    p.add_argument("--eps-grid", default="0.1,0.2,0.3")
    p.add_argument("--eps-sparsity", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--out", default=None, help="result file (default: bench/results/quality.json, "
                                                "quality_cuda.json on a GPU)")
    p.add_argument("--resume", action="store_true", help="keep finished runs of the result file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    lm = load_model("default", device=args.device, dtype="float32")
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    out = Path(args.out) if args.out else OUT.with_name("quality_cuda.json" if device.type == "cuda" else OUT.name)
    config = {"model": "default", "eval": "wikitext2:test", "eval_seqlen": 512, "windows": args.windows,
              "valid_windows": args.valid_windows, "calib": "default (embedded corpus)", "nsamples": args.nsamples,
              "seqlen": args.seqlen, "seed": args.seed, "eps_grid": args.eps_grid, "eps_sparsity": args.eps_sparsity,
              "owl": {"threshold_m": 5.0, "lambda": 0.08}, "torch_threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    results = json.loads(out.read_text()) if args.resume and out.exists() else {}
    if results.get("config", {}).get("windows") not in (None, args.windows):
        results = {}  # different evaluation set: nothing to resume
    results.update({"config": {**results.get("config", {}), **config}, "started": results.get("started", now_iso()),
                    "versions": library_versions(),
                    "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()}})
    results.setdefault("runs", {})
    calib = calibration_batches(tok, load_text("default"), args.nsamples, args.seqlen, seed=args.seed)
    test = eval_windows(tok, load_text("wikitext2:test"), 512, max_windows=args.windows or None)
    valid = eval_windows(tok, load_text("wikitext2:valid"), 512, max_windows=args.valid_windows or None)
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
    allocs = args.allocations.split(",")
    outliers = {}
    if "owl" in allocs:
        t0 = time.perf_counter()
        outliers = collect_outlier_ratios(model, calib, threshold_m=5.0)
        results["owl_outliers_s"] = round(time.perf_counter() - t0, 2)
        results["owl_outlier_ratios"] = {str(k): v for k, v in outliers.items()}
    eps = 0.3
    if "alphapruning" in allocs:
        grid = [float(e) for e in args.eps_grid.split(",")]
        eps = choose_epsilon(model, snap, metrics, calib, valid, grid, args.eps_sparsity, results, out)
        log(f"chosen epsilon {eps:g}")

    sparsities = [float(s) for s in args.sparsities.split(",")]
    for s, m, a in grid_order(sparsities, args.methods.split(","), allocs):
        key = run_key(s, m, a)
        if key in results["runs"]:
            continue
        alloc = make_allocation(a, s, metrics, outliers, eps)
        r = prune_and_eval(model, snap, alloc, m, calib, test)
        results["runs"][key] = {"sparsity": s, "method": m, "allocation": a, **r}
        results["finished"] = now_iso()
        save(results, out)
        log(f"{key}: ppl {r['ppl']}, prune {r['prune_s']} s, eval {r['eval_s']} s, peak {r['peak_rss_mb']} MB")
    results["peak_rss_mb_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    save(results, out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
