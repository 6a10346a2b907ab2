"""The `prune`, `eval` and `runs` commands: a pruned and evaluated run, its record, and reruns of it."""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from analysis.allocation import Allocation, AllocationError
from analysis.checkpoint import local_folder, stored_dtype
from analysis.cli.checks import (
    FILE_IGNORES,
    READ_BY,
    allocation_file,
    checked_model_folder,
    checked_outputs,
    hint_search_text,
    print_search,
    refuse_offload,
    refuse_search_text,
    refuse_unread,
    warn_memory,
    warn_non_finite,
)
from analysis.cli.options import (
    FLAGS,
    PRUNER_HELP,
    UsageError,
    add_allocation_args,
    add_calib_args,
    add_command,
    add_eval_args,
    add_model_args,
    allocation_settings,
    calibration_settings,
    evaluation_settings,
    load_checked,
    model_settings,
    print_ppl,
    print_progress,
    refuse_unused,
    typed_flags,
)
from analysis.evaluation import perplexity
from analysis.export import COMPRESSED_NOTE, DEFAULT_FORMAT, FORMATS, ExportError, export
from analysis.layers import prunable_layers, zero_fraction
from analysis.loading import DEVICE_MAP_AUTO, streamable_folder
from analysis.pipeline import (
    PRIOR_ZEROS,
    allocation_caveats,
    calibration_batch,
    changed_since,
    evaluation_windows,
    run,
    write_record,
)
from analysis.pruners import PRUNERS, ROWWISE
from analysis.pruning import gathers_gram, prune, prune_warnings
from analysis.settings import (
    ALLOCATION_METHODS,
    AllocationSettings,
    CalibrationSettings,
    PruneSettings,
    RunSettings,
    SettingsError,
    ZeroShotSettings,
)
from analysis.store import RunStore, StoreError, achieved_overall, eval_label, now_iso
from analysis.sweep import NAMED_ALLOCATIONS, run_line
from analysis.zeroshot import PAPER_TASKS, ZeroShotError, check_tasks, check_tokenizer
from analysis.zeroshot import evaluate as zeroshot_evaluate


def _add_zeroshot_args(p: argparse.ArgumentParser, what: str) -> None:
    d = ZeroShotSettings()
    p.add_argument("--tasks", default=None, help=f"zero-shot accuracy {what} on these lm-eval tasks, comma-separated: "
                   f"'cloze' (local, embedded corpus) or hub tasks such as {','.join(PAPER_TASKS)}")
    p.add_argument("--limit", type=int, default=d.limit, help="zero-shot: only the first N documents of each task")


def _zeroshot_settings(args: argparse.Namespace) -> ZeroShotSettings | None:
    """The zero-shot settings when --tasks is given, checked (task names and data) before any model loads."""
    if args.tasks is None:
        refuse_unused(typed_flags(args, "--limit"), "no --tasks are given")
        return None
    settings = ZeroShotSettings(tuple(args.tasks.split(",")), args.limit).check()
    try:
        return replace(settings, tasks=check_tasks(settings.tasks))
    except ZeroShotError as e:
        raise SettingsError(str(e), "zeroshot.tasks") from None


def _check_zeroshot_tokenizer(preview) -> None:
    """What zero-shot scoring asks of the model's tokenizer, checked before its weights load."""
    try:
        check_tokenizer(preview.tokenizer)
    except ZeroShotError as e:
        raise SettingsError(str(e), "zeroshot.tasks") from None


def _zeroshot(loaded, settings: ZeroShotSettings, label: str):
    result = zeroshot_evaluate(loaded.model, loaded.tokenizer, settings.tasks, limit=settings.limit,
                               batch_size=settings.batch_size, bos=loaded.info.bos_per_window, progress=print_progress)
    table = result.table().assign(value=lambda t: t["value"].round(4), stderr=lambda t: t["stderr"].round(4))
    print(f"zero-shot accuracy of the {label} model ({result.seconds:.0f} s):")
    print(table.to_string(index=False))
    return result


def _refuse_ignored(args: argparse.Namespace) -> None:
    """UsageError for a --sparsity, --allocation (both None when left out), --search-text, an option of
    FILE_IGNORES with an allocation file, or one the allocation does not read (READ_BY; when typed:
    args.typed) that the run would ignore."""
    if args.nm:
        for flag, given in (("--allocation", args.allocation), ("--sparsity", args.sparsity)):
            if given is not None:
                raise UsageError(f"{flag}: an N:M pattern ({args.nm}) prunes every matrix to (M-N)/M, so no allocation "
                                 f"or sparsity applies; drop {flag} or --nm")
        refuse_unused(typed_flags(args, *READ_BY), f"an N:M pattern ({args.nm}) makes no allocation")
    elif args.search_text is not None and args.allocation != "auto":
        refuse_search_text(args.search_text)
    elif args.allocation and Path(args.allocation).expanduser().is_file():
        refuse_unused(typed_flags(args, *FILE_IGNORES), f"{args.allocation} is an allocation with its own ratios")
        alloc = _readable_allocation(args.allocation)
        if args.sparsity is None or alloc is None:
            return
        if not math.isclose(own := alloc.sparsity, args.sparsity, abs_tol=1e-9):
            raise UsageError(f"--sparsity: {args.allocation} is an allocation at sparsity {own:g}, which it keeps; "
                             f"drop --sparsity {args.sparsity:g}")
    else:
        refuse_unread(args, [args.allocation or AllocationSettings.method])


def _readable_allocation(path: str) -> Allocation | None:
    """The allocation file `path`, or None where it cannot be read (the allocation's own check says why)."""
    try:
        return Allocation.load(Path(path).expanduser())
    except (AllocationError, OSError):
        return None


def _run_settings(args: argparse.Namespace) -> RunSettings:
    method, file = args.allocation or AllocationSettings.method, None
    if method not in ALLOCATION_METHODS or method in ("custom", "file"):
        method, file = "file", args.allocation
    own = _readable_allocation(file) if method == "file" else None
    sparsity = AllocationSettings.sparsity if args.sparsity is None else args.sparsity
    if own is not None:  # its own budget, so the record's settings say what was pruned (another is refused)
        sparsity = own.sparsity
    # the N:M pattern a file was made for (a prune --nm run's allocation names it): replaying that allocation
    # without it would prune the same shares unstructured, another model
    nm = args.nm or (own.params.get("nm") if own is not None else None)
    settings = RunSettings(model=model_settings(args),
                           allocation=allocation_settings(args, method, sparsity, file=file),
                           prune=PruneSettings(args.method, nm, args.rowwise), calibration=calibration_settings(args),
                           evaluation=evaluation_settings(args))
    if settings.prune.nm is None and method == "file" and not Path(file).expanduser().is_file():
        raise UsageError(f"--allocation: must be one of {', '.join(NAMED_ALLOCATIONS)} or an allocation "
                         f"JSON file; '{args.allocation}' is neither.")
    settings.prune.check()  # a bad --nm first, then a conflict between options, which says more than a
    _refuse_ignored(args)  # missing default text would
    settings.check()
    if nm and not args.nm:
        print(f"note: {file} was made for the N:M pattern {nm}: the run prunes with that pattern, as --nm {nm} "
              "would", file=sys.stderr)
    return settings


RERUN_KEEPS = ("--device", "--dtype", "--device-map", "--trust-remote-code")  # how it runs, not what it computes


# allocations a rerun takes from the record: a file may have changed since, a drawn curve's per-matrix offsets are
# not among the settings, and a search (deterministic for its seed) costs minutes
RERUN_OWN_COPY = ("file", "custom", "auto")


def _rerun_settings(args: argparse.Namespace) -> tuple[RunSettings, dict]:
    """The settings of the run record --rerun names (prune --out, runs --show), and the record. The run prunes
    with the record's own allocation where RERUN_OWN_COPY says so; uniform, AlphaPruning, FARMS and OWL are
    computed again (deterministic). Only RERUN_KEEPS may be given beside it (trust_remote_code is never taken
    from a file)."""
    path = Path(args.rerun).expanduser()
    try:
        record = json.loads(path.read_text())
        stored = record["config"]["settings"]
    except OSError as e:
        hint = f"; to rerun run {args.rerun} of the run store, write its record first: python -m analysis runs " \
            f"--show {args.rerun} > run.json, then --rerun run.json" if str(args.rerun).isdigit() else ""
        raise UsageError(f"--rerun: {args.rerun}: cannot read it ({e.strerror or e}){hint}") from None
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"--rerun: {args.rerun} is not a run record with its settings (write one with prune "
                         "--out, or runs --show ID > run.json)") from None
    settings_flags = {flag for field, flag in FLAGS.items() if field.split(".")[0] != "sweep"}
    settings_flags -= {"--tasks", "--limit", *RERUN_KEEPS}
    refuse_unused(sorted(typed_flags(args, *settings_flags)), "--rerun takes the run's settings from its record")
    try:  # a setting of the record, not an option, is what is wrong: no flag names it
        settings = RunSettings.from_dict(stored)
        given = model_settings(args)
        model = replace(settings.model, trust_remote_code=given.trust_remote_code)
        if typed_flags(args, "--device", "--device-map"):
            model = replace(model, device=given.device)
        if typed_flags(args, "--dtype"):
            model = replace(model, dtype=given.dtype)
        settings = replace(settings, model=model)
        if settings.allocation.method in RERUN_OWN_COPY:
            settings = replace(settings, allocation=AllocationSettings(method="file", file=str(path),
                                                                       sparsity=settings.allocation.sparsity))
        settings.check()
    except SettingsError as e:
        raise UsageError(f"--rerun: {args.rerun}: {e.field or 'a setting'}: {e}") from None
    threads = record["config"].get("torch_threads")
    if isinstance(threads, int) and threads > 0 and threads != torch.get_num_threads():
        # SparseGPT's masks change with the BLAS's rounding, which changes with the thread count (README, Sweeps)
        print(f"note: --rerun: torch on {threads} thread(s), as the record ran (not {torch.get_num_threads()})",
              file=sys.stderr)
        torch.set_num_threads(threads)
    return settings, record


def cmd_prune(args: argparse.Namespace) -> int:
    settings, recorded = _rerun_settings(args) if args.rerun else (_run_settings(args), None)
    if args.save_model:  # before the prune: a destination problem must not cost a run
        checked_model_folder(args)
    else:
        refuse_unused(typed_flags(args, "--save-format", "--overwrite"), "--save-model is not given")
    zeroshot = _zeroshot_settings(args)
    checked_outputs(args, {"--out": args.out})
    folder, out = (Path(p).expanduser().resolve() if p else None for p in (args.save_model, args.out))
    if folder is not None and out is not None and (out == folder or folder in out.parents):
        raise UsageError(f"--out: {args.out} is in the --save-model folder ({folder}), which the export fills; "
                         "write the record elsewhere")
    store: RunStore | None = None

    def check(preview) -> None:
        nonlocal store
        settings.check_model(preview)
        if zeroshot is not None:
            _check_zeroshot_tokenizer(preview)
        warn_memory(settings, preview, calibrates=settings.needs_calibration(),
                    hessians=gathers_gram(settings.prune.method, settings.prune.rowwise))
        if settings.model.device == DEVICE_MAP_AUTO:
            refuse_offload(settings, preview)
        if args.save_model and args.save_format == "dense-ct" and any(
                r.expert is not None for r in prunable_layers(preview.skeleton())):
            raise UsageError("--save-format: dense-ct cannot carry fused MoE experts (transformers does not load them "
                             "under compressed-tensors metadata); save as dense or compressed")
        # the last check: a store that cannot be opened is refused before the weights load, and a bad input above
        # creates no store
        store = RunStore(args.db).check_writable()

    loaded = load_checked(settings.model, check)
    calibrates = f"calibration {settings.calibration.n_samples} x {settings.calibration.seqlen} tokens from " \
        f"{settings.calibration.source}; " if settings.needs_calibration() else "no calibration text read" + (
            f" ({settings.prune.method} with this allocation does not use --calib)" if typed_flags(args, "--calib")
            else "") + "; "
    print(f"{calibrates}evaluation on {settings.evaluation.source}", file=sys.stderr)
    hint_search_text(settings.allocation, settings.evaluation.source)
    result = run(loaded, settings, progress=print_progress, on_ppl=print_ppl, origin="cli",
                 on_caveat=lambda caveat: print(f"warning: {caveat}", file=sys.stderr),
                 checkpoint=streamable_folder(settings.model.source, settings.model.trust_remote_code))
    record, report = result.record, result.report
    for warning in prune_warnings(report):
        print(f"warning: {warning}", file=sys.stderr)
    print_search(result.allocation, settings.allocation.file if settings.allocation.method == "file" else None)
    record["timings_s"]["load"] = round(loaded.info.load_seconds, 3)
    if recorded is not None:  # which record this one reran (the allocation file it names may be a temporary one)
        record["rerun_of"] = {"file": str(Path(args.rerun).expanduser().resolve()), "id": recorded.get("id"),
                              "created": recorded.get("created")}
    export_error = None
    if zeroshot is not None:
        record["zeroshot"] = _zeroshot(loaded, zeroshot, "pruned").to_dict()
    if args.save_model:
        try:
            path = export(loaded.model, loaded.tokenizer, result.allocation, args.save_model, args.save_format,
                          args.overwrite, pruner=settings.prune.method)
        except ExportError as e:  # e.g. a full disk: still keep the run record below
            export_error = e
        else:
            print(f"saved the pruned model ({args.save_format}) to {path}")
            if args.save_format == "compressed":
                print(f"note: --save-format compressed: {COMPRESSED_NOTE}", file=sys.stderr)
            record["saved_to"] = args.save_model
            folder = local_folder(loaded.info.path)
            stored = stored_dtype(folder) if folder is not None else None
            if stored is not None and stored != loaded.info.dtype:
                print(f"note: --save-model: saved in {loaded.info.dtype}, the dtype it was pruned in; the checkpoint "
                      f"stores {stored} (prune with --dtype {stored} to save in it)", file=sys.stderr)
    if args.out:
        print(f"wrote {write_record(record, args.out)}")
    try:
        run_id = store.add(record)
    except StoreError as e:  # nothing lost: the record goes to a file beside the store
        saved = args.out or write_record(record, store.path.with_name(f"unsaved-run-{now_iso()}.json"))
        raise StoreError(f"{e} The run's record is in {saved}.") from None
    print(f"{settings.prune.method} + {record['config']['allocation']} at {report.overall:.4f} sparsity: perplexity "
          f"{record['dense_ppl']:.3f} -> {record['pruned_ppl']:.3f} (run {run_id}, prune {report.seconds:.1f} s)")
    if recorded is not None:
        print(f"the record: perplexity {recorded.get('dense_ppl', float('nan')):.3f} -> "
              f"{recorded.get('pruned_ppl', float('nan')):.3f}")
        for change in changed_since(recorded, settings, record["config"]):
            print(f"note: --rerun: {change}", file=sys.stderr)
    if export_error is not None:
        print(f"error: --save-model: {export_error}", file=sys.stderr)
        return 2
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    PruneSettings(args.method).check()
    zeroshot = _zeroshot_settings(args)
    calibration, evaluation = calibration_settings(args).check(), evaluation_settings(args)
    if zeroshot is None:  # zero-shot tasks bring their own text
        evaluation.check()
    else:
        refuse_unused(typed_flags(args, "--eval-seqlen", "--max-windows", "--batch-size"),
                      "eval --tasks scores the zero-shot tasks instead of perplexity (measure it in a run of its own)")
    alloc = allocation_file(args.allocation) if args.allocation else None
    if alloc is None:  # (--calib is not among them: a text named for both is evaluated on its second half)
        c = CalibrationSettings
        ignored = [flag for flag, value, default in (
            ("--pruner", args.method, PruneSettings.method), ("--nsamples", args.nsamples, c.n_samples),
            ("--seqlen", args.seqlen, c.seqlen), ("--seed", args.seed, c.seed)) if value != default]
        if ignored:
            raise UsageError(f"{ignored[0]}: only eval --allocation prunes (and calibrates); without it the model is "
                             f"evaluated dense and {', '.join(ignored)} would be ignored; drop it or give --allocation")
    calibrates = alloc is not None and PRUNERS[args.method].statistic is not None

    def check(preview) -> None:
        if zeroshot is None:
            evaluation.check_model(preview, calibration.source)
        else:
            _check_zeroshot_tokenizer(preview)
        if alloc is not None:
            if calibrates:
                calibration.check_model(preview, evaluation.source)
            AllocationSettings(method="file", file=args.allocation).check_model(preview)
        warn_memory(RunSettings(model=model_settings(args), calibration=calibration, evaluation=evaluation), preview,
                    "pruned and evaluated" if alloc is not None else "evaluated", calibrates=calibrates,
                    hessians=calibrates)
    loaded = load_checked(model_settings(args), check)
    if alloc is None:  # (a prune refuses them)
        warn_non_finite(loaded.model, "its perplexity or scores")
    bos = loaded.info.bos_per_window
    windows = evaluation_windows(loaded.tokenizer, evaluation, calibration.source, bos) if zeroshot is None else None
    if alloc is not None:
        for caveat in allocation_caveats(alloc, args.method, loaded, eval_source=evaluation.source):
            print(f"warning: {caveat}", file=sys.stderr)
        calib = calibration_batch(loaded.tokenizer, calibration, evaluation.source, bos) if calibrates else None
        if nm := alloc.params.get("nm"):
            print(f"note: {args.allocation} was made for the N:M pattern {nm}: the model is pruned with that pattern",
                  file=sys.stderr)
        report = prune(loaded.model, alloc.per_layer, method=args.method, calib=calib, nm=nm,
                       progress=print_progress)
        print(f"pruned with {args.method} + {alloc.method}{', ' + nm if nm else ''}: {report.overall:.4f} sparsity",
              file=sys.stderr)
    # a model saved pruned (--save-model) is not "dense"; weights placed by accelerate are not read for zeros
    label = "pruned" if alloc else "dense" if loaded.info.device_map or zero_fraction(loaded.model) <= PRIOR_ZEROS \
        else "sparse"
    if zeroshot is not None:
        _zeroshot(loaded, zeroshot, label)
        return 0
    ppl = perplexity(loaded.model, windows, on_update=lambda u: print_ppl(label, u), batch_size=evaluation.batch_size)
    n = windows.shape[0]
    print(f"perplexity {ppl:.4f} on {evaluation.source} ({n} window{'s' if n != 1 else ''} of {windows.shape[1]} "
          "tokens)")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    if args.db is not None and not Path(args.db).expanduser().exists():  # a typo must not read as "no runs"
        raise UsageError(f"--db: no run store at {args.db}")
    store = RunStore(args.db)
    if args.show is not None and args.delete is not None:
        raise UsageError("give --show or --delete, not both")
    if args.delete is not None:
        ids = _run_ids(args.delete)
        try:
            store.delete(ids)
        except KeyError as e:
            raise UsageError(f"--delete: {e.args[0]} (python -m analysis runs lists them); nothing deleted") from None
        print(f"deleted run(s) {', '.join(map(str, ids))} from {store.path}")
        return 0
    if args.show is not None:
        try:
            print(json.dumps(store.get(args.show), indent=2))
        except KeyError:
            raise UsageError(f"--show: no run with id {args.show} in {store.path} (python -m analysis runs lists "
                             "them)") from None
        return 0
    table = store.all()
    if table.empty:
        print(f"no runs yet in {store.path}")
        return 0
    # what tells runs apart beyond the stored columns: the sparsity pruned, and the pruner and allocation as set
    records = [store.get(i) for i in table["id"]]
    table.insert(table.columns.get_loc("sparsity") + 1, "achieved",
                 [achieved_overall(r) for r in records])
    table["line"] = [(run_line(r) or {}).get("line", "") for r in records]
    table["evaluated on"] = [eval_label(r.get("config") or {}) or "" for r in records]  # ppl compare within one
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 60):
        print(table.assign(nm=table["nm"].fillna("")).to_string(index=False))
    return 0


def _run_ids(text: str) -> list[int]:
    """Run ids from "3,5-7" (UsageError naming --delete on anything else)."""
    ids = []
    for part in (p.strip() for p in text.split(",")):
        first, dash, last = part.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())) or (dash and int(last) < int(first)):
            raise UsageError(f"--delete: expected run ids such as 3,5-7, got {text!r}")
        ids += range(int(first), int(last if dash else first) + 1)
    return ids


def add_prune_parsers(sub) -> None:
    p = add_command(sub, "prune", "allocate, prune, evaluate; writes a run record")
    add_model_args(p)
    p.add_argument("--pruner", "--method", dest="method", default=PruneSettings.method, choices=list(PRUNERS),
                   metavar="PRUNER", help=PRUNER_HELP)
    p.add_argument("--allocation", default=None,
                   help=f"{', '.join(NAMED_ALLOCATIONS)}, or an allocation JSON file (default: "
                        f"{AllocationSettings.method}; none with --nm)")
    p.add_argument("--sparsity", type=float, default=None,
                   help=f"target fraction of pruned weights, in (0, 0.99] (default: {AllocationSettings.sparsity:g}; "
                        "none with --nm or an allocation file, which keeps its own)")
    add_allocation_args(p)
    p.add_argument("--nm", default=PruneSettings.nm,
                   help="N:M semi-structured sparsity, e.g. 2:4: every matrix (M-N)/M sparse, so no --allocation or "
                        "--sparsity with it (an allocation file made for a pattern brings its own)")
    p.add_argument("--rowwise", default=PruneSettings.rowwise, choices=list(ROWWISE),
                   help="row-wise sparsity inside each matrix: trim (TRIM, Beck et al. 2025)")
    add_calib_args(p)
    add_eval_args(p, "--eval")
    p.add_argument("--save-model", default=None,
                   help="save the pruned model (safetensors + tokenizer + allocation.json) in this folder")
    p.add_argument("--save-format", default=DEFAULT_FORMAT, choices=list(FORMATS),
                   help="dense: save_pretrained, loads anywhere; dense-ct: the same plus compressed-tensors' "
                        "sparsity metadata in config.json (as llm-compressor saves a sparse model); compressed: "
                        "compressed-tensors bitmask (smaller; --model DIR or analysis.export.load_pruned reads it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model saved in a non-empty --save-model folder")
    p.add_argument("--out", default=None, help="write the run record JSON here")
    p.add_argument("--db", default=None, help="SQLite run store (default: the cache folder's runs.sqlite)")
    p.add_argument("--rerun", default=None, metavar="RECORD",
                   help="run again with every setting of this run record (prune --out, or runs --show ID > run.json); "
                        f"only {', '.join(RERUN_KEEPS)} may change how it runs")
    _add_zeroshot_args(p, "of the pruned model (kept in the run record)")
    p.set_defaults(func=cmd_prune)

    p = add_command(sub, "eval", "perplexity of a model, optionally pruned with an allocation JSON")
    add_model_args(p)
    p.add_argument("--allocation", default=None, help="allocation JSON file to prune with first")
    p.add_argument("--pruner", "--method", dest="method", default=PruneSettings.method, choices=list(PRUNERS),
                   metavar="PRUNER", help=PRUNER_HELP + "; used with --allocation")
    add_calib_args(p)
    add_eval_args(p, "--text", "--eval")  # --eval as prune and sweep name it
    _add_zeroshot_args(p, "instead of perplexity")
    p.set_defaults(func=cmd_eval)

    p = add_command(sub, "runs", "list recorded pruning runs")
    p.add_argument("--db", default=None, help="SQLite run store (default: the cache folder's runs.sqlite)")
    p.add_argument("--show", type=int, default=None, help="print the full record of this run id")
    p.add_argument("--delete", default=None, metavar="IDS",
                   help="delete these runs, e.g. 3,5-7 (all or none; a resumed sweep runs a deleted one again)")
    p.set_defaults(func=cmd_runs)
