"""The `sweep` command: a grid of prunes, in this process or as Ray tasks (analysis.sweep)."""
from __future__ import annotations

import argparse
import sys

import pandas as pd

from analysis.cli.checks import checked_table_out, hint_search_text, refuse_unread, warn_memory, write_table
from analysis.cli.options import (
    add_allocation_args,
    add_calib_args,
    add_command,
    add_eval_args,
    add_model_args,
    evaluation_settings,
    model_settings,
    print_progress,
)
from analysis.loading import pick_device, preview_model
from analysis.pruners import PRUNERS, ROWWISE
from analysis.pruning import gathers_gram
from analysis.settings import AllocationSettings, CalibrationSettings, PruneSettings, RunSettings
from analysis.store import RunStore
from analysis.sweep import (
    FAILED,
    NAMED_ALLOCATIONS,
    SweepGrid,
    check_address,
    check_models,
    check_workers,
    grid_from_text,
    outcome_table,
    run_sweep,
)


def _sweep_grid(args: argparse.Namespace) -> SweepGrid:
    base = RunSettings(model=model_settings(args),
                       allocation=AllocationSettings(metric=args.metric, granularity=args.granularity, fit=args.fit,
                                                     owl_threshold=args.owl_threshold, search_steps=args.search_steps,
                                                     search_step=args.search_step,
                                                     search_space=args.search_space,
                                                     search_objective=args.search_objective,
                                                     search_text=args.search_text,
                                                     search_samples=args.search_samples,
                                                     search_verify=args.search_verify,
                                                     search_then_steps=args.search_then_steps,
                                                     search_then_samples=args.search_then_samples),
                       calibration=CalibrationSettings(args.calib, args.nsamples, args.seqlen, encoding=args.encoding),
                       evaluation=evaluation_settings(args))
    return grid_from_text(base, methods=args.methods, allocations=args.allocations, sparsities=args.sparsities,
                          epsilons=args.epsilons, owl_lambdas=args.owl_lambdas, seeds=args.seeds,
                          curves=tuple(args.curve or ()), rowwise=args.rowwise)


def cmd_sweep(args: argparse.Namespace) -> int:
    grid = _sweep_grid(args)
    refuse_unread(args, list(dict.fromkeys([a if a in NAMED_ALLOCATIONS else "a file" for a in grid.allocations]
                                           + (["custom"] if grid.curves else []))))
    grid.check()  # before the first line below
    as_json = checked_table_out(args)
    check_workers(args.workers, args.cpus_per_worker)
    check_address(args.address)
    configs = grid.expand()
    if args.address is None:  # (a cluster's machines are not this one) one error line before anything is written
        check_models(configs)
    searched = next((c for c in configs if c.allocation.method == "auto"), None)
    if searched is not None:
        hint_search_text(searched.allocation, searched.evaluation.source)
    store = RunStore(args.db).check_writable()
    where = f"Ray at {args.address}" if args.address else (
        f"local Ray, {args.workers} workers" if args.workers > 1 else "this process")
    print(f"sweep: {len(configs)} configuration(s) on {where}; runs go to {store.path}", file=sys.stderr)
    if args.address is None:  # a cluster's machines are not this one
        first = searched or configs[0]  # a search holds the most
        warn_memory(first, preview_model(first.model.source, first.model.trust_remote_code), snapshot=True,
                    calibrates=any(c.needs_calibration() for c in configs),
                    hessians=any(gathers_gram(c.prune.method, c.prune.rowwise) for c in configs),
                    copies=args.workers if args.workers > 1 and pick_device(first.model.device).type == "cpu" else 1)
    outcomes = run_sweep(grid, store, workers=args.workers, address=args.address,
                         cpus_per_worker=args.cpus_per_worker, progress=print_progress)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print((table := outcome_table(outcomes)).to_string(index=False))
    if args.out:
        write_table(table, args.out, as_json)
        print(f"wrote {args.out}", file=sys.stderr)
    failed = sum(o.status == FAILED for o in outcomes)
    if failed:
        print(f"error: {failed} configuration(s) failed after a retry (see the error column); run the same "
              "command again to retry only those", file=sys.stderr)
        return 1
    return 0


def add_sweep_parser(sub) -> None:
    p = add_command(sub, "sweep", "prune runs over a grid (pruners x row-wise x allocations x sparsities x epsilons "
                                  "x seeds)")
    add_model_args(p)
    p.add_argument("--pruners", "--methods", dest="methods", default=PruneSettings.method, metavar="PRUNERS",
                   help=f"comma-separated: {', '.join(PRUNERS)} (--methods: its older name)")
    p.add_argument("--allocations", default=AllocationSettings.method,
                   help=f"comma-separated: {', '.join(NAMED_ALLOCATIONS)} or allocation JSON files "
                        "(auto: the allocation search, with the seed of each calibration sample)")
    p.add_argument("--curve", action="append", default=None,
                   help="a custom curve's control points, e.g. 0:0.5,0.5:0.7,1:0.8 (repeat for more curves)")
    p.add_argument("--sparsities", default=f"{AllocationSettings.sparsity:g}",
                   help="target sparsities in (0, 0.99], e.g. 0.5,0.6,0.7")
    add_allocation_args(p, axes=True)
    p.add_argument("--rowwise", default="none",
                   help=f"row-wise sparsity inside each matrix, comma-separated: none, {', '.join(ROWWISE)} "
                        "(none,trim runs every configuration both ways)")
    p.add_argument("--seeds", default=str(CalibrationSettings.seed), help="calibration seeds, e.g. 0,1,2")
    add_calib_args(p, seed=False)
    add_eval_args(p, "--eval")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel workers; more than 1 runs each configuration as a task on a local Ray")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPU cores of each Ray task (without a GPU)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (ray://host:port or host:port)")
    p.add_argument("--db", default=None, help="SQLite run store (default: the cache folder's runs.sqlite)")
    p.add_argument("--out", default=None, help="also write the final table here (.csv, or .json)")
    p.set_defaults(func=cmd_sweep)
