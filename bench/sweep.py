"""A 12-configuration sweep on the default model, in this process and on a local Ray: same results?
How do the wall times compare?

    python -m bench.sweep [--workers 2] [--nsamples 4] [--seqlen 64] [--windows 4] [--eval-seqlen 128] [--out FILE]

Grid: wanda x {uniform, alphapruning ε=0.3, owl λ=0.08} x sparsity {0.5, 0.6} x calibration seed
{0, 1}; calibration `--nsamples` x `--seqlen` tokens from the embedded corpus, evaluation the first
`--windows` windows of `--eval-seqlen` tokens of WikiText-2 test (small by default: the point is the
runner, not the perplexities). The same grid runs twice, each into a fresh run
store: in this process (`--workers 1`), then as Ray tasks on a local Ray started with `--workers`
CPUs (one CPU per task). Each wall time counts everything a user waits for: model loads, the dense
reference, and for Ray its start-up. The result records the largest relative difference of the
pruned perplexities between the two, the wall-time ratio, and the load average before and after
each half (the machine may be shared: the ratio only means something next to it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from analysis.settings import CalibrationSettings, EvaluationSettings, RunSettings
from analysis.store import RunStore
from analysis.sweep import DONE, SweepGrid, outcome_table, run_sweep
from bench import machine_info, write_result

OUT = Path(__file__).resolve().parent / "results" / "sweep.json"


def timed_sweep(grid: SweepGrid, store: RunStore, workers: int) -> dict:
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    outcomes = run_sweep(grid, store, workers=workers,
                         progress=lambda m, f: print(f"[{f:4.0%}] workers={workers}: {m}", flush=True))
    seconds = time.perf_counter() - t0
    table = outcome_table(outcomes)
    return {"workers": workers, "wall_s": round(seconds, 1), "load_avg_before": load_before,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "done": int((table["status"] == DONE).sum()), "outcomes": outcomes, "table": table}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=128)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    base = RunSettings(calibration=CalibrationSettings(n_samples=args.nsamples, seqlen=args.seqlen),
                       evaluation=EvaluationSettings(seqlen=args.eval_seqlen, max_windows=args.windows))
    grid = SweepGrid(base, methods=("wanda",), allocations=("uniform", "alphapruning", "owl"), sparsities=(0.5, 0.6),
                     seeds=(0, 1)).check()
    with tempfile.TemporaryDirectory() as tmp:
        here = timed_sweep(grid, RunStore(Path(tmp) / "here.sqlite"), 1)
        on_ray = timed_sweep(grid, RunStore(Path(tmp) / "ray.sqlite"), args.workers)
    ppl_here = {o.key: o.pruned_ppl for o in here["outcomes"]}
    diffs = [abs(o.pruned_ppl - ppl_here[o.key]) / ppl_here[o.key] for o in on_ray["outcomes"] if o.status == DONE]
    rows = here["table"][["method", "allocation", "sparsity", "seed", "pruned_ppl"]].rename(
        columns={"pruned_ppl": "ppl_in_process"}).assign(ppl_ray=on_ray["table"]["pruned_ppl"].to_numpy(),
                                                         attempts_ray=on_ray["table"]["attempts"].to_numpy())
    print(rows.to_string(index=False))
    report = {
        "benchmark": "sweep", "command": " ".join(["python -m bench.sweep", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(),
        "note": "shared machine: other jobs ran at the same time (see the load averages); wall times include "
                "model loads, the dense reference and, for Ray, its start-up",
        "grid": {"configurations": len(grid.expand()), "methods": grid.methods, "allocations": grid.allocations,
                 "sparsities": grid.sparsities, "seeds": grid.seeds, "calibration": f"{args.nsamples} x {args.seqlen}",
                 "evaluation": f"wikitext2:test, first {args.windows} windows of {args.eval_seqlen}"},
        "in_process": {k: here[k] for k in ("workers", "wall_s", "load_avg_before", "load_avg_after", "done")},
        "ray": {k: on_ray[k] for k in ("workers", "wall_s", "load_avg_before", "load_avg_after", "done")},
        "ray_over_in_process_wall": round(on_ray["wall_s"] / here["wall_s"], 3),
        "max_rel_ppl_difference": max(diffs) if diffs else None,
        "dense_ppl": here["outcomes"][0].dense_ppl,
        "runs": rows.to_dict("records"),
    }
    write_result(report, args.out)
    return 0 if here["done"] == on_ray["done"] == len(grid.expand()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
