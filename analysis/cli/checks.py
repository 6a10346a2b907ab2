"""What commands check before a model loads (inputs, outputs, options a choice ignores, memory), and
the allocation and table files they read and write."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

from analysis.allocation import Allocation, AllocationError
from analysis.cli.options import FLAGS, UsageError, refuse_unused, typed_flags
from analysis.evaluation import default_batch_size
from analysis.export import ExportError, check_destination, check_output_file
from analysis.loading import (
    DEVICE_MAP_AUTO,
    format_bytes,
    memory_estimate,
    offloaded,
    pick_device,
    pick_dtype,
    placement_room,
)
from analysis.pruning import non_finite
from analysis.search import describe, search_memory
from analysis.settings import AllocationSettings, RunSettings
from analysis.spectra import NON_FINITE, SpectraResult
from analysis.store import default_db_path

# options whose value may be a local file or folder the command reads (argparse dest -> flag)
INPUTS = {"model": "--model", "allocation": "--allocation", "calib": "--calib", "eval": "--eval",
          "search_text": "--search-text", "search_from": "--search-from", "db": "--db", "rerun": "--rerun"}


def input_paths(args: argparse.Namespace) -> dict[str, Path]:
    """The local files and folders the command reads, by flag (a prune's default run store included)."""
    found = {}
    for dest, flag in INPUTS.items():
        value = getattr(args, dest, None)
        if dest == "db" and hasattr(args, "db"):  # created by the run if it does not exist yet
            found[flag] = Path(value or default_db_path()).expanduser().resolve()
        elif value:
            try:
                if Path(value).expanduser().exists():
                    found[flag] = Path(value).expanduser().resolve()
            except OSError:  # e.g. a name too long: no file, and its own check says so
                pass
    return found


def checked_outputs(args: argparse.Namespace, outputs: dict[str, str | None]) -> None:
    """UsageError naming the flag unless each output file (flag -> path; None: not asked for) can be
    written, is no other output's file, and overwrites none of the command's inputs (nor goes into the
    model's folder): a typo must not cost the user their run store, text or model."""
    inputs, taken = input_paths(args), {}
    for flag, path in outputs.items():
        if not path:
            continue
        try:
            target = check_output_file(path).resolve()
        except ExportError as e:
            raise UsageError(f"{flag}: {e}") from None
        if target in taken:
            raise UsageError(f"{flag}: {path} is also the {taken[target]} file; give each output its own")
        for source_flag, source in inputs.items():
            if source == target or (source.is_dir() and source in target.parents):
                raise UsageError(f"{flag}: {path} would overwrite what {source_flag} reads ({source}); "
                                 "write it elsewhere")
        taken[target] = flag
        if target.is_file():  # said before the run, while the user can still stop it
            print(f"note: {flag}: {path} exists; it will be replaced", file=sys.stderr)


def checked_model_folder(args: argparse.Namespace) -> None:
    """UsageError unless --save-model's folder can be written and holds none of the command's inputs."""
    try:
        check_destination(args.save_model, args.overwrite, input_paths(args))
    except ExportError as e:
        raise UsageError(f"--save-model: {e}") from None


def allocation_file(path: str) -> Allocation:
    """The allocation JSON --allocation names; UsageError naming the option if it is missing or broken."""
    try:
        return Allocation.load(Path(path).expanduser())
    except AllocationError as e:
        raise UsageError(f"--allocation: {e}") from None


def hint_search_text(allocation: AllocationSettings, evaluation_source: str) -> None:
    suggestion = allocation.suggested_search_text(evaluation_source)
    if suggestion is not None:
        print(f"hint: the search is scored on the calibration text; --search-text {suggestion} (held out from the "
              f"evaluation text {evaluation_source}) scores it on the domain it is judged on: better in most "
              "cells measured (README, 'Allocation search')", file=sys.stderr)


def print_search(alloc: Allocation, file: str | None = None) -> None:
    """The account of the search that made `alloc`: run now, or read from the allocation `file`."""
    if alloc.method == "auto" and "history" in alloc.params:
        if file is not None:
            print(f"the search that made {file} (stored in it, not run again):")
        print("\n".join(describe(alloc.params)))


def refuse_search_text(search_text: str) -> None:
    raise UsageError(f"--search-text: only the allocation search (auto) scores on a held-out text, so {search_text} "
                     "would be ignored; drop it or search")


# the options that make an allocation, which an allocation file has already made
FILE_IGNORES = ("--epsilon", "--metric", "--granularity", "--fit", "--owl-lambda", "--owl-threshold")


SPECTRAL = ("alphapruning", "farms", "auto")  # auto starts from AlphaPruning, FARMS and OWL


READ_BY = {"--epsilon": SPECTRAL, "--epsilons": SPECTRAL, "--metric": SPECTRAL, "--granularity": SPECTRAL,
           "--fit": SPECTRAL, "--owl-lambda": ("owl", "auto"), "--owl-lambdas": ("owl", "auto"),
           "--owl-threshold": ("owl", "auto")} | {
    flag: ("auto",) for field, flag in FLAGS.items() if field.startswith("allocation.search_")}


def refuse_unread(args: argparse.Namespace, allocations: list[str]) -> None:
    """UsageError for an allocation option (when typed: args.typed) that none of `allocations` reads."""
    for flag, readers in READ_BY.items():
        if typed_flags(args, flag) and not set(readers) & set(allocations):
            who = readers[0] if len(readers) == 1 else f"{', '.join(readers[:-1])} and {readers[-1]}"
            uses = "uses" if len(readers) == 1 else "use"
            refuse_unused([flag], f"only {who} {uses} it, and the allocation is {' or '.join(allocations)}")


def note_not_loaded(args: argparse.Namespace, read: str) -> None:
    """Say that --dtype and --device-map, where given, went unused: the model was not loaded (`read`: what was)."""
    if unused := typed_flags(args, "--dtype", "--device-map"):
        print(f"note: {', '.join(unused)} unused: the model was not loaded ({read})", file=sys.stderr)


def warn_non_finite(model, what: str, metrics: pd.DataFrame | None = None) -> None:
    """Name the first matrix with NaN or inf weights: of `model` (weights offloaded to disk are not read for it), or
    by the status of `metrics`, its spectra read from the checkpoint's shards when `model` is not loaded."""
    if metrics is not None:
        name = next(iter(metrics.loc[metrics["status"] == NON_FINITE, "name"]), None)
    else:
        name = None if offloaded(model) else non_finite(model)
    if name is not None:
        print(f"warning: '{name}' has non-finite weights (NaN or inf): {what} will mean nothing (the spectra command "
              "lists such matrices)", file=sys.stderr)


def warn_memory(settings: RunSettings, preview, task: str = "pruned", calibrates: bool = True,
                evaluates: bool = True, hessians: bool = True, snapshot: bool = False, copies: int = 1) -> None:
    """Say before the weights load when the run's estimated memory (loading.memory_estimate) exceeds what is free:
    a warning, not a refusal, as the estimate is an upper bound (placed by accelerate: not estimated). A command
    prunes the model it loaded, so it keeps no original values unless `snapshot` (a sweep restores its dense
    weights before each run); what it does not do (calibrate, evaluate, gather Hessians) is left out; an allocation
    search (settings.allocation "auto") adds its caches. `copies`: processes on this machine that each load the
    model (a sweep's local Ray workers on the CPU)."""
    if settings.model.device == DEVICE_MAP_AUTO:
        return
    device = pick_device(settings.model.device)
    eval_batch = (settings.evaluation.batch_size or default_batch_size(device)) if evaluates else 0
    est = memory_estimate(preview.skeleton(), pick_dtype(settings.model.dtype, device),
                          settings.calibration.n_samples if calibrates else 0, settings.calibration.seqlen, eval_batch,
                          settings.evaluation.seqlen)
    est = replace(est, prunable=est.prunable if snapshot else 0, hessians=est.hessians if hessians else 0)
    if settings.allocation.method == "auto" and settings.prune.nm is None:
        est = replace(est, search=search_memory(preview.skeleton(), settings.allocation, settings.prune.method,
                                                est.param_bytes, settings.calibration.n_samples,
                                                settings.calibration.seqlen))
    title = f"'{settings.model.source}'"
    if copies > 1:
        est = replace(est, **{f: getattr(est, f) * copies
                              for f in ("weights", "prunable", "calibration", "logits", "hessians", "search")})
        title += f" ({copies} workers, each with its own copy)"
    if problem := est.problem(device, title, task):
        print(f"warning: {problem}", file=sys.stderr)


def refuse_offload(settings: RunSettings, preview) -> None:
    """A prune of a model placed by accelerate (--device-map auto) needs every weight in memory: refused before the
    weights load when they exceed what device_map="auto" may place, as the rest would go to disk."""
    dtype = pick_dtype(settings.model.dtype, pick_device(None))  # as load_model picks it for a device map
    weights = memory_estimate(preview.skeleton(), dtype, 0, 1).weights
    if weights > (room := placement_room()):
        raise UsageError(f"--device-map: the weights ({format_bytes(weights)} in {str(dtype).removeprefix('torch.')}) "
                         f"exceed the {format_bytes(room)} free on the GPUs and the host, so accelerate would put some "
                         "on disk, where they can be evaluated, not pruned; prune with more memory free")


def checked_table_out(args: argparse.Namespace, more: dict[str, str | None] | None = None) -> bool:
    """Check --out (a table: CSV, or JSON records), and the command's `more` outputs (flag -> path) with it;
    whether --out names a JSON file."""
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".json", ".txt", ""):
        raise UsageError(f"--out: {args.out}: {args.command} writes CSV or JSON; name the file .csv or .json")
    checked_outputs(args, {"--out": args.out, **(more or {})})
    if getattr(args, "json", False) and (args.out or "").lower().endswith(".csv"):
        raise UsageError(f"--json: --out {args.out} names a CSV file; name it .json, or drop --json")
    return (args.out or "").lower().endswith(".json")


def write_esds(result: SpectraResult, out: str) -> None:
    """The spectra's eigenvalues as one .npz (SpectraResult.save_esds); UsageError naming --esds if it fails."""
    try:
        result.save_esds(Path(out).expanduser())
    except OSError as e:
        raise UsageError(f"--esds: cannot write {out}: {e.strerror or e}") from e


def write_table(table: pd.DataFrame, out: str | None, as_json: bool) -> None:
    target = sys.stdout if out is None else Path(out).expanduser()
    try:
        if out is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
        if as_json:
            table.to_json(target, orient="records", indent=1, double_precision=15)  # pandas' default: 10
        else:
            table.to_csv(target, index=False)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from e
