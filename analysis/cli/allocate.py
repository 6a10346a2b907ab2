"""The `allocate` and `export` commands: allocation files (JSON, llm-compressor recipe, AlphaPruning .npy)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.allocation import METHODS as ALLOCATION_CHOICES
from analysis.allocation import Allocation, AllocationError, block_table, parse_points
from analysis.cli.checks import (
    allocation_file,
    checked_outputs,
    note_not_loaded,
    print_search,
    refuse_search_text,
    refuse_unread,
    warn_memory,
    warn_non_finite,
)
from analysis.cli.options import (
    UsageError,
    add_allocation_args,
    add_calib_args,
    add_command,
    add_model_args,
    allocation_settings,
    calibration_settings,
    load_checked,
    model_settings,
    print_progress,
    refuse_unused,
    typed_flags,
)
from analysis.data import held_out_split, names_test_split
from analysis.export import (
    DEFAULT_RECIPE_PRUNER,
    RECIPE_PRUNERS,
    ExportError,
    module_order,
    ratios_npy,
    recipe_caveats,
    recipe_note,
    recipe_pruner_for,
    recipe_yaml,
)
from analysis.layers import layer_table, skeleton
from analysis.loading import ModelLoadError, preview_model, streamable_folder
from analysis.pipeline import (
    build_allocation,
    calibration_batch,
    calibration_params,
    dense_spectra,
    search_windows,
    stated_caveats,
)
from analysis.pruners import PRUNERS, PruneError, check_nm_ratios, parse_nm
from analysis.pruning import gathers_gram
from analysis.settings import (
    SPECTRA_METHODS,
    AllocationSettings,
    CalibrationSettings,
    PruneSettings,
    RunSettings,
    SettingsError,
)
from analysis.spectra import NotStreamable


def _add_allocation_file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="write the allocation as an llm-compressor recipe (YAML) here")
    p.add_argument("--recipe-pruner", default=None, choices=list(RECIPE_PRUNERS),
                   help="the recipe's pruning modifier: SparseGPTModifier (sparsegpt) or WandaPruningModifier "
                   "(wanda); default: the pruner the allocation was searched or pruned with (a search's, a run "
                   f"record's) when it is one of these, else {DEFAULT_RECIPE_PRUNER}")
    p.add_argument("--npy", default=None, help="write the ratios here as a .npy vector (one per matrix, module "
                   "order: the ratios list AlphaPruning's prune functions take)")


def _check_recipe_options(args: argparse.Namespace) -> None:
    """UsageError for an option that only shapes the recipe when no --recipe is written."""
    if args.recipe:
        return
    for flag, value in (("--recipe-pruner", args.recipe_pruner), ("--nm", getattr(args, "nm", None))):
        if value is not None:
            raise UsageError(f"{flag}: it sets the llm-compressor recipe, and no --recipe is written")


def _write_allocation_files(args: argparse.Namespace, alloc: Allocation, per_layer: dict[str, float],
                            nm=None) -> None:
    contents = {}  # made before anything is written, so a refused recipe leaves no .npy behind
    if args.recipe:
        try:
            pruner = args.recipe_pruner or recipe_pruner_for(alloc.pruner)
            recipe = recipe_yaml(per_layer, pruner, nm, recipe_note(alloc))
        except ExportError as e:
            raise UsageError(f"--recipe: {e}") from None
        contents["--recipe"] = (args.recipe, recipe.encode())
        if args.recipe_pruner is None and pruner != DEFAULT_RECIPE_PRUNER:
            print(f"note: --recipe: its modifier is {RECIPE_PRUNERS[pruner]}, as the allocation was made with "
                  f"{pruner} (--recipe-pruner chooses)", file=sys.stderr)
    if args.npy:
        contents["--npy"] = (args.npy, ratios_npy(per_layer))
    for flag, (path, data) in contents.items():
        try:
            target = Path(path).expanduser()
            target.parent.mkdir(parents=True, exist_ok=True)  # as --out and --save-model do
            target.write_bytes(data)
        except OSError as e:
            raise UsageError(f"{flag}: cannot write {path}: {e.strerror or e}") from None
        print(f"wrote {path}")
    if args.recipe:
        for caveat in recipe_caveats(per_layer):
            print(f"warning: --recipe: {caveat}", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> int:
    if not (args.recipe or args.npy):
        raise UsageError("nothing to write: give --recipe and/or --npy")
    _check_recipe_options(args)
    parse_nm(args.nm)
    checked_outputs(args, {"--recipe": args.recipe, "--npy": args.npy})
    alloc = allocation_file(args.allocation)
    nm = parse_nm(args.nm or alloc.params.get("nm"))  # a prune --nm run's allocation names its pattern
    if args.nm and alloc.params.get("nm") and parse_nm(alloc.params["nm"]) != nm:
        print(f"note: --nm {args.nm} replaces the pattern {alloc.params['nm']} the allocation was pruned with",
              file=sys.stderr)
    source = args.model or alloc.model  # for the order of the recipe's targets and the N:M widths (config.json only)
    try:
        preview, unread = preview_model(source, tokenizer=False), None
    except ModelLoadError as e:
        if args.model:
            raise
        preview, unread = None, (f"{alloc.model}: {str(e).splitlines()[0]} (--model names it)" if alloc.model else
                                 "the allocation names no model; give it with --model")
    if nm is not None:
        if not args.nm and args.recipe:
            print(f"note: the allocation was made for the N:M pattern {alloc.params['nm']}: the recipe's mask "
                  "structure is that pattern", file=sys.stderr)
        if preview is None:
            print(f"warning: --nm: matrix widths not checked: {unread}", file=sys.stderr)
        else:
            PruneSettings(nm=f"{nm[0]}:{nm[1]}").check_model(preview)
        try:
            check_nm_ratios(alloc.per_layer, nm)
        except PruneError as e:
            raise UsageError(f"--nm: {e} (an N:M recipe prunes every matrix it targets to that pattern, whatever "
                             "its sparsity says)") from None
    if preview is not None:  # llm-compressor pairs the i-th sparsity with the i-th target in module order
        AllocationSettings(method="file", file=args.allocation).check_model(preview)  # every matrix, once: as prune
        model = skeleton(preview.config)
        for caveat in stated_caveats(alloc, model):
            print(f"warning: {caveat}", file=sys.stderr)
        per_layer = module_order(alloc.per_layer, model)
    else:
        per_layer = alloc.per_layer
        print(f"warning: the targets keep the file's order (llm-compressor pairs the i-th sparsity with the i-th "
              f"matched module in the model's order), as the model was not read: {unread}", file=sys.stderr)
    _write_allocation_files(args, alloc, per_layer, nm)
    return 0


def add_export_parser(sub) -> None:
    p = add_command(sub, "export", "an allocation JSON as an llm-compressor recipe and/or AlphaPruning .npy")
    p.add_argument("--allocation", required=True, help="allocation JSON (from allocate --out or a prune run)")
    p.add_argument("--model", default=None,
                   help="the model the recipe is for (default: the allocation's): its config.json gives the targets' "
                        "order; no weights are read")
    _add_allocation_file_args(p)
    p.add_argument("--nm", default=None, help="the recipe's mask structure, e.g. 2:4 (default: unstructured)")
    p.set_defaults(func=cmd_export)


def _print_allocation(alloc: Allocation, metrics: pd.DataFrame, metric: str | None) -> None:
    has_metric = metric is not None and metric in metrics.columns
    t = block_table(metrics, metric) if has_metric else block_table(metrics.assign(_none=float("nan")), "_none")
    t = t.set_index("block").reindex(range(len(alloc.per_block)))
    table = pd.DataFrame({"block": range(len(alloc.per_block)), "matrices": t["n_matrices"].to_numpy(),
                          "params": t["params"].to_numpy()})
    if has_metric:
        table[f"mean {metric}"] = t["metric_mean"].round(3).to_numpy()
    outliers = alloc.params.get("outlier_ratios")
    if outliers:
        table["outliers %"] = [round(100 * outliers.get(str(b), float("nan")), 3) for b in table["block"]]
    table["sparsity"] = [round(x, 4) for x in alloc.per_block]
    print(table.to_string(index=False))
    for w in alloc.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"allocation {alloc.method}: target {alloc.sparsity:.4f}, achieved {alloc.achieved:.6f} "
          f"(parameter-weighted over {len(alloc.per_layer)} prunable matrices)")


def cmd_allocate(args: argparse.Namespace) -> int:
    points = None
    if args.method == "custom":
        if not args.points:
            raise UsageError("--allocation custom needs --points, e.g. --points 0:0.5,0.5:0.7,1:0.8")
        try:
            points = tuple(parse_points(args.points))
        except AllocationError as e:
            raise SettingsError(str(e), "allocation.points") from None
        if args.sparsity is None and not args.as_drawn:
            raise UsageError("--sparsity is required unless --as-drawn")
    elif args.sparsity is None:
        raise UsageError("--sparsity is required")
    if args.search_text is not None and args.method != "auto":
        refuse_search_text(args.search_text)
    refuse_unread(args, [args.method])
    for flag_readers, flags in ((("custom",), ("--points", "--as-drawn")), (("auto",), ("--pruner",)),
                                (("owl", "auto"), ("--calib", "--nsamples", "--seqlen", "--seed", "--encoding"))):
        if args.method not in flag_readers:
            refuse_unused(typed_flags(args, *flags), f"only {' and '.join(flag_readers)} "
                               f"{'uses' if len(flag_readers) == 1 else 'use'} it, and the allocation is {args.method}")
    if args.as_drawn and args.sparsity is not None:
        raise UsageError(f"--sparsity: --as-drawn keeps the curve's own budget, so --sparsity {args.sparsity:g} "
                         "would be ignored; drop one of them")
    settings = allocation_settings(args, args.method, args.sparsity, points=points, as_drawn=args.as_drawn).check()
    if args.search_text is not None and names_test_split(args.search_text):
        valid = held_out_split(args.search_text) or "its validation split"
        print(f"warning: --search-text {args.search_text} names a test split: a run evaluated on it would judge the "
              f"allocation on the text it was chosen on (the JSON records it, and prune and eval say so); score on "
              f"{valid} instead", file=sys.stderr)
    calibration = calibration_settings(args).check() if args.method in ("owl", "auto") else None
    _check_recipe_options(args)
    checked_outputs(args, {"--out": args.out, "--recipe": args.recipe, "--npy": args.npy})

    def check(preview, loads: bool = True) -> None:
        if calibration is not None:
            calibration.check_model(preview)
        settings.check_model(preview, *([calibration.seqlen] if calibration else []))
        if loads:  # the search scores candidates on calibration windows: their logits are within a calibration pass
            warn_memory(RunSettings(model=model_settings(args), allocation=settings, prune=PruneSettings(args.pruner),
                                    calibration=calibration or CalibrationSettings()),
                        preview, "allocated", calibrates=calibration is not None, evaluates=False,
                        hessians=args.method == "auto" and gathers_gram(args.pruner))
    m = model_settings(args).check()
    folder = streamable_folder(m.source, m.trust_remote_code)
    # the search starts from AlphaPruning too (FARMS's pooled spectra: search_starts)
    spectral = args.method in SPECTRA_METHODS or (args.method == "auto" and settings.search_from is None)
    model = metrics = loaded = None
    if folder is not None and calibration is None:  # of the weights alone: read from the shards, the model not loaded
        preview = preview_model(m.source, tokenizer=False)
        check(preview, loads=False)
        try:
            if spectral:
                metrics = dense_spectra(None, settings.spectra, print_progress, folder, m.device)
                warn_non_finite(None, "an allocation measured on it", metrics)
            model = preview.skeleton()  # module names and shapes
            note_not_loaded(args, "its config and the checkpoint's shards, in their stored dtype, were read")
        except NotStreamable:
            pass
    if model is None:
        loaded = load_checked(m, check, tokenizer=calibration is not None)
        warn_non_finite(loaded.model, "an allocation measured on it")
        model = loaded.model
        if spectral:
            metrics = dense_spectra(model, settings.spectra, print_progress, folder, loaded.info.device)
    metrics = layer_table(model) if metrics is None else metrics
    calib = held_out = then = None
    if calibration is not None:
        bos = loaded.info.bos_per_window
        calib = calibration_batch(loaded.tokenizer, calibration, bos=bos)
        held_out, then = search_windows(loaded.tokenizer, settings, calibration, bos)
    if args.method == "custom" and args.as_drawn:
        settings = AllocationSettings(method="custom", points=points, as_drawn=True)
    alloc = build_allocation(settings, model, calib=calib, metrics=metrics, model_name=args.model,
                             prune_method=args.pruner, progress=print_progress, fitness_windows=held_out,
                             then_windows=then)
    if calibration is not None:  # its whole text: prune and eval warn when they evaluate on that text
        alloc.params["calibration"] = calibration_params(calibration)
    _print_allocation(alloc, metrics, args.metric if args.method in SPECTRA_METHODS else None)
    print_search(alloc)
    if args.out:
        print(f"wrote {alloc.save(args.out)}")
    _write_allocation_files(args, alloc, module_order(alloc.per_layer, model))
    return 0


def add_allocate_parser(sub) -> None:
    p = add_command(sub, "allocate", "layerwise sparsity (uniform, alphapruning, farms, owl, custom, auto) to JSON")
    add_model_args(p)
    p.add_argument("--allocation", "--method", dest="method", default=AllocationSettings.method,
                   choices=[*ALLOCATION_CHOICES, "auto"], metavar="ALLOCATION",
                   help=f"{', '.join([*ALLOCATION_CHOICES, 'auto'])} (default: {AllocationSettings.method}); auto: "
                        "search (analysis.search) with --pruner on the calibration text. --method: its older name")
    p.add_argument("--pruner", default=PruneSettings.method, choices=list(PRUNERS),
                   help="auto: the pruner the search prunes with (the one the allocation will be used with)")
    p.add_argument("--sparsity", type=float, default=None, help="target fraction of pruned weights, in [0, 0.99]")
    add_allocation_args(p)
    p.add_argument("--points", default=None,
                   help="custom curve control points depth:sparsity, e.g. 0:0.5,0.5:0.7,1:0.8")
    p.add_argument("--as-drawn", action="store_true", help="custom: apply the curve as drawn, report its budget")
    add_calib_args(p, "owl / auto calibration")
    p.add_argument("--out", default=None, help="write the allocation JSON here")
    _add_allocation_file_args(p)
    p.set_defaults(func=cmd_allocate)
