"""Command line: `python -m analysis <command> ...`. Every dashboard action has a command here.

Option defaults are read from analysis.settings. Errors the user can fix exit with status 2 and one
line on stderr, never a traceback; options are checked before any model loads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from analysis.allocation import METHODS as ALLOCATION_CHOICES
from analysis.allocation import METRIC_DIRECTION, Allocation, AllocationError, block_table, parse_points
from analysis.checkpoint import has_safetensors, local_folder, open_checkpoint, stored_dtype
from analysis.data import held_out_split, names_test_split
from analysis.errors import AlphascopeError
from analysis.evaluation import default_batch_size, perplexity
from analysis.export import (
    COMPRESSED_NOTE,
    DEFAULT_FORMAT,
    DEFAULT_RECIPE_PRUNER,
    FORMATS,
    RECIPE_PRUNERS,
    ExportError,
    check_destination,
    check_output_file,
    export,
    module_order,
    ratios_npy,
    recipe_caveats,
    recipe_note,
    recipe_pruner_for,
    recipe_yaml,
)
from analysis.layers import UNSUPPORTED, layer_table, prunable_layers, skeleton, unsupported_weights, zero_fraction
from analysis.loading import (
    DEVICE_MAP_AUTO,
    PACKAGED,
    ModelLoadError,
    checkpoint_path,
    ensure_converted,
    load_model,
    memory_estimate,
    offloaded,
    pick_device,
    pick_dtype,
    preview_model,
    resolve_source,
)
from analysis.pipeline import (
    PRIOR_ZEROS,
    allocation_caveats,
    build_allocation,
    calibration_batch,
    calibration_params,
    changed_since,
    dense_spectra,
    evaluation_windows,
    run,
    search_windows,
    write_record,
)
from analysis.powerlaw import MIN_TAIL, XMIN_RULES, FitError, check_fit
from analysis.pruners import PRUNERS, ROWWISE, PruneError, check_nm_ratios, parse_nm
from analysis.pruning import gathers_gram, non_finite, prune, prune_warnings
from analysis.search import describe
from analysis.settings import (
    ALLOCATION_METHODS,
    SPECTRA_METHODS,
    AllocationSettings,
    CalibrationSettings,
    EvaluationSettings,
    ModelSettings,
    PruneSettings,
    RunSettings,
    SettingsError,
    SpectraSettings,
    ZeroShotSettings,
)
from analysis.spectra import ALPHA_BANDS, NotStreamable, alpha_summary, analyze, analyze_checkpoint
from analysis.store import RunStore, StoreError, achieved_overall, default_db_path, eval_label, now_iso
from analysis.sweep import (
    FAILED,
    NAMED_ALLOCATIONS,
    SweepGrid,
    check_address,
    check_models,
    check_workers,
    grid_from_text,
    outcome_table,
    run_line,
    run_sweep,
)
from analysis.zeroshot import PAPER_TASKS, ZeroShotError, check_tasks, check_tokenizer
from analysis.zeroshot import evaluate as zeroshot_evaluate


class UsageError(AlphascopeError, ValueError):
    """Bad option value; printed as one line."""


# the option that sets each setting (SettingsError.field), so an error names what to change
FLAGS = {
    "model.source": "--model", "spectra.fit": "--fit", "allocation.method": "--allocation",
    "allocation.file": "--allocation", "allocation.sparsity": "--sparsity", "allocation.epsilon": "--epsilon",
    "allocation.metric": "--metric", "allocation.granularity": "--granularity", "allocation.fit": "--fit",
    "allocation.owl_lambda": "--owl-lambda", "allocation.owl_threshold": "--owl-threshold",
    "allocation.points": "--points", "allocation.search_steps": "--search-steps",
    "allocation.search_step": "--search-step", "allocation.search_space": "--search-space",
    "allocation.search_seed": "--search-seed", "allocation.search_objective": "--search-objective",
    "allocation.search_text": "--search-text", "allocation.search_samples": "--search-samples",
    "allocation.search_verify": "--search-verify",
    "allocation.search_from": "--search-from", "allocation.search_then_steps": "--search-then-steps",
    "allocation.search_then_samples": "--search-then-samples",
    "prune.method": "--pruner", "prune.nm": "--nm",
    "prune.rowwise": "--rowwise", "calibration.source": "--calib",
    "calibration.n_samples": "--nsamples", "calibration.seqlen": "--seqlen", "calibration.seed": "--seed",
    "evaluation.source": "--eval", "evaluation.seqlen": "--eval-seqlen", "evaluation.max_windows": "--max-windows",
    "evaluation.batch_size": "--batch-size", "calibration.encoding": "--encoding", "evaluation.encoding": "--encoding",
    "model.device": "--device", "model.dtype": "--dtype",
    "zeroshot.tasks": "--tasks", "zeroshot.limit": "--limit",
    "sweep.methods": "--pruners", "sweep.allocations": "--allocations", "sweep.sparsities": "--sparsities",
    "sweep.epsilons": "--epsilons", "sweep.owl_lambdas": "--owl-lambdas", "sweep.seeds": "--seeds",
    "sweep.workers": "--workers", "sweep.cpus_per_worker": "--cpus-per-worker", "sweep.address": "--address",
    "sweep.curves": "--curve", "sweep.rowwise": "--rowwise",
}
# a sweep sets some settings through its grid options instead
SWEEP_FLAGS = {"allocation.points": "--curve", "allocation.method": "--allocations", "allocation.file": "--allocations",
               "allocation.sparsity": "--sparsities", "allocation.epsilon": "--epsilons",
               "allocation.owl_lambda": "--owl-lambdas", "prune.method": "--pruners", "calibration.seed": "--seeds"}
PRUNER_HELP = f"{', '.join(PRUNERS)} (default: {PruneSettings.method}; --method: its older name)"
# each command's older name of an option -> the name every command now shares (both are accepted)
OLD_NAMES = {"prune": {"--method": "--pruner"}, "eval": {"--method": "--pruner"}, "sweep": {"--methods": "--pruners"},
             "allocate": {"--method": "--allocation"}}
OTHER_NAMES = {"eval": {"--eval": "--text"}}  # two current names of one option (kept as typed: messages use it)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`error: ...`, exit status 2) like every other error here."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: "--eval" must never be taken as a prefix of "--eval-seqlen"
    return sub.add_parser(name, help=help, allow_abbrev=False)


def _print_progress(message: str, fraction: float) -> None:
    print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# model and data options


def _add_model_args(p: argparse.ArgumentParser) -> None:
    d = ModelSettings()
    p.add_argument("--model", default=d.source, help="'default' (SmolLM2-135M-Instruct), 'gemma3', a folder or a HF id")
    p.add_argument("--device", default=d.device, help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=d.dtype, help="auto, float32, bfloat16, float16")
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto: spread the weights over the visible GPUs, then CPU, then disk (accelerate), for "
                        "models larger than one GPU; replaces --device")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code from the model's repository (off by default)")


def _model_settings(args: argparse.Namespace) -> ModelSettings:
    if getattr(args, "device_map", None) == "auto" and _typed(args, "--device"):
        raise UsageError("--device: --device-map auto places the weights itself (GPUs, then the CPU), so --device "
                         "would be ignored; drop one of them")
    device = DEVICE_MAP_AUTO if getattr(args, "device_map", None) == "auto" else args.device
    return ModelSettings(args.model, device, args.dtype, args.trust_remote_code)


def _load(m: ModelSettings, check=None, tokenizer: bool = True):
    """Load the model; `check(preview)` runs on its tokenizer and config before the weights load.
    tokenizer=False: for work on the weights alone, which a folder without tokenizer files can do."""
    m.check()
    loaded = load_model(m.source, device=m.device, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                        check=check, tokenizer=tokenizer)
    if left := unsupported_weights(loaded.model):
        print(f"warning: {UNSUPPORTED.format(n=left)}", file=sys.stderr)
    return loaded


def _add_calib_args(p: argparse.ArgumentParser, what: str = "calibration", seed: bool = True) -> None:
    d = CalibrationSettings()
    p.add_argument("--calib", default=d.source, help=f"{what} text: default (embedded corpus), wikitext2:valid, "
                   "hf:<dataset>[:<config>]:<split> or a .txt path (the embedded corpus, or a text named for both "
                   "calibration and evaluation, is split in disjoint halves)")
    p.add_argument("--nsamples", type=int, default=d.n_samples, help=f"{what} sequences")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help=f"tokens per {what} sequence")
    if seed:
        p.add_argument("--seed", type=int, default=d.seed, help=f"seed for {what} sampling")
    p.add_argument("--encoding", default=d.encoding, help="encoding of the text files named as text sources")


def _calibration(args: argparse.Namespace) -> CalibrationSettings:
    return CalibrationSettings(args.calib, args.nsamples, args.seqlen, args.seed, args.encoding)


def _add_eval_args(p: argparse.ArgumentParser, *flags: str) -> None:
    d = EvaluationSettings()
    p.add_argument(*flags, dest="eval", default=d.source, help="evaluation text (same sources as --calib)")
    p.add_argument("--eval-seqlen", type=int, default=d.seqlen, help="tokens per evaluation window")
    p.add_argument("--max-windows", type=int, default=d.max_windows, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="evaluation windows per forward pass (default: 1 on CPU, 8 on GPU)")


def _evaluation(args: argparse.Namespace) -> EvaluationSettings:
    return EvaluationSettings(args.eval, args.eval_seqlen, args.max_windows, args.batch_size, args.encoding)


def _add_allocation_args(p: argparse.ArgumentParser, axes: bool = False) -> None:
    """axes: a sweep's comma-separated --epsilons and --owl-lambdas instead of one value each."""
    d = AllocationSettings()
    if axes:
        p.add_argument("--epsilons", default=f"{d.epsilon:g}", help="alphapruning/farms spreads, e.g. 0.1,0.3")
    else:
        p.add_argument("--epsilon", type=float, default=d.epsilon,
                       help="alphapruning/farms spread: ratios in [S(1-eps), S(1+eps)] before the rescaling to the "
                            "budget S; with auto, the search also starts from alphapruning and farms at this eps")
    p.add_argument("--metric", default=d.metric, choices=list(METRIC_DIRECTION),
                   help="per-matrix metric (alphapruning/farms)")
    p.add_argument("--granularity", default=d.granularity, choices=["block", "layer"],
                   help="one ratio per block or per matrix")
    p.add_argument("--fit", default=d.fit, help=f"power-law xmin rule: {', '.join(XMIN_RULES)}")
    if axes:
        p.add_argument("--owl-lambdas", default=f"{d.owl_lambda:g}", help="owl half-ranges, e.g. 0.04,0.08")
    else:
        p.add_argument("--owl-lambda", type=float, default=d.owl_lambda,
                       help="owl: half-range of the sparsities around the target")
    p.add_argument("--owl-threshold", type=float, default=d.owl_threshold,
                   help="owl: outlier = |activation x weight| > M x mean")
    p.add_argument("--search-steps", type=int, default=d.search_steps,
                   help="auto: generations of the allocation search")
    p.add_argument("--search-step", type=float, default=d.search_step,
                   help="auto: sparsity one mutation moves from a block to another (e.g. 0.05 for larger moves)")
    p.add_argument("--search-space", default=d.search_space,
                   help="auto: block (one sparsity per block) or block+kind (also one offset per matrix kind, e.g. "
                        "k_proj or down_proj, shared by every block, each block keeping its sparsity: lets the search "
                        "prune some kinds of matrix less everywhere)")
    if not axes:  # a sweep's searches take the seed of their calibration sample
        p.add_argument("--search-seed", type=int, default=d.search_seed, help="auto: seed of the allocation search")
    p.add_argument("--search-objective", default=d.search_objective,
                   help="auto: what the search minimises: nll (the pruned model's loss) or kl (its KL divergence "
                        "from the dense model)")
    p.add_argument("--search-text", default=d.search_text,
                   help="auto: score the search on this held-out text (a text source as for --calib, e.g. "
                        "wikitext2:valid, best a sample of the text the model will serve; never the evaluation "
                        "text) instead of the calibration text")
    p.add_argument("--search-samples", type=int, default=d.search_samples, metavar="N",
                   help="auto with --search-text: score on N windows of it (default 4 x --nsamples when the search "
                        "prunes for real, else --nsamples); its real prunes are scored on all N, so more text tells a "
                        "real improvement from noise better, at the cost of slower real prunes")
    p.add_argument("--search-verify", nargs="?", const="all", default=d.search_verify, metavar="WHAT",
                   help="auto: what the search prunes for real (one full prune each): none (its fast proxy "
                        "decides), starts (the default: the starts, so the best one after a real prune is the parent, "
                        "and the result, kept only if a real prune confirms it beats that start: a few prunes more) or "
                        "all (the flag alone: also every candidate the proxy confirms, keeping only real improvements; "
                        "slowest, every step measured on the real pruned model; worth it with SparseGPT at high "
                        "sparsity)")
    p.add_argument("--search-then-steps", type=int, default=d.search_then_steps, metavar="N",
                   help="auto with --search-text: then go on from the search's result for N more generations (a "
                        "second stage, search seed + 100), its real prunes scored on more held-out text: "
                        "--search-then-samples windows of the search text")
    p.add_argument("--search-then-samples", type=int, default=d.search_then_samples, metavar="N",
                   help="auto with --search-text and --search-then-steps: the second stage scores on N windows of it "
                        "(default: twice the first stage's)")
    if not axes:
        p.add_argument("--search-from", default=d.search_from, metavar="FILE",
                       help="auto: start the search from this allocation JSON (e.g. a previous search's result, to go "
                            "on from it) instead of uniform / OWL / AlphaPruning / FARMS; give its sparsity")


def _allocation(args: argparse.Namespace, method: str, sparsity: float | None, **extra) -> AllocationSettings:
    d = AllocationSettings()
    return AllocationSettings(method=method, sparsity=d.sparsity if sparsity is None else sparsity,
                              epsilon=args.epsilon, metric=args.metric, granularity=args.granularity, fit=args.fit,
                              owl_lambda=args.owl_lambda, owl_threshold=args.owl_threshold,
                              search_steps=args.search_steps, search_step=args.search_step,
                              search_space=args.search_space, search_seed=args.search_seed,
                              search_objective=args.search_objective, search_text=args.search_text,
                              search_samples=args.search_samples, search_verify=args.search_verify,
                              search_from=args.search_from, search_then_steps=args.search_then_steps,
                              search_then_samples=args.search_then_samples, **extra)


def _print_ppl(label: str, u) -> None:
    print(f"[{u.windows_done / u.windows_total:4.0%}] {label} perplexity {u.ppl:.3f} after "
          f"{u.windows_done}/{u.windows_total} windows ({u.tokens} tokens)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# models


def cmd_models(args: argparse.Namespace) -> int:
    for key, pm in PACKAGED.items():
        line = f"{key:10s} {pm.title:28s} {pm.quantization}"
        if args.convert:
            line += f"  -> {ensure_converted(key)}"
        print(line)
    return 0


# --------------------------------------------------------------------------------------------
# allocation files (llm-compressor recipe, AlphaPruning .npy) and model folders


# options whose value may be a local file or folder the command reads (argparse dest -> flag)
INPUTS = {"model": "--model", "allocation": "--allocation", "calib": "--calib", "eval": "--eval",
          "search_text": "--search-text", "search_from": "--search-from", "db": "--db", "rerun": "--rerun"}


def _inputs(args: argparse.Namespace) -> dict[str, Path]:
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


def _checked_outputs(args: argparse.Namespace, outputs: dict[str, str | None]) -> None:
    """UsageError naming the flag unless each output file (flag -> path; None: not asked for) can be
    written, is no other output's file, and overwrites none of the command's inputs (nor goes into the
    model's folder): a typo must not cost the user their run store, text or model."""
    inputs, taken = _inputs(args), {}
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


def _checked_model_folder(args: argparse.Namespace) -> None:
    """UsageError unless --save-model's folder can be written and holds none of the command's inputs."""
    try:
        check_destination(args.save_model, args.overwrite, _inputs(args))
    except ExportError as e:
        raise UsageError(f"--save-model: {e}") from None


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


def _allocation_file(path: str) -> Allocation:
    """The allocation JSON --allocation names; UsageError naming the option if it is missing or broken."""
    try:
        return Allocation.load(Path(path).expanduser())
    except AllocationError as e:
        raise UsageError(f"--allocation: {e}") from None


def cmd_export(args: argparse.Namespace) -> int:
    if not (args.recipe or args.npy):
        raise UsageError("nothing to write: give --recipe and/or --npy")
    _check_recipe_options(args)
    parse_nm(args.nm)
    _checked_outputs(args, {"--recipe": args.recipe, "--npy": args.npy})
    alloc = _allocation_file(args.allocation)
    nm = parse_nm(args.nm or alloc.params.get("nm"))  # a prune --nm run's allocation names its pattern
    if args.nm and alloc.params.get("nm") and parse_nm(alloc.params["nm"]) != nm:
        print(f"note: --nm {args.nm} replaces the pattern {alloc.params['nm']} the allocation was pruned with",
              file=sys.stderr)
    try:  # the allocation's model, for the order of the recipe's targets and the N:M widths
        preview, unread = preview_model(alloc.model, tokenizer=False), None
    except ModelLoadError as e:
        preview, unread = None, f"{alloc.model or 'the allocation names no model'}: {str(e).splitlines()[0]}"
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
        per_layer = module_order(alloc.per_layer, skeleton(preview.config))
    else:
        per_layer = alloc.per_layer
        print(f"warning: the targets keep the file's order (llm-compressor pairs the i-th sparsity with the i-th "
              f"matched module in the model's order), as the model was not read: {unread}", file=sys.stderr)
    _write_allocation_files(args, alloc, per_layer, nm)
    return 0


def _add_export_parser(sub) -> None:
    p = _parser(sub, "export", "an allocation JSON as an llm-compressor recipe and/or AlphaPruning .npy")
    p.add_argument("--allocation", required=True, help="allocation JSON (from allocate --out or a prune run)")
    _add_allocation_file_args(p)
    p.add_argument("--nm", default=None, help="the recipe's mask structure, e.g. 2:4 (default: unstructured)")
    p.set_defaults(func=cmd_export)


# --------------------------------------------------------------------------------------------
# allocate


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


def _hint_search_text(allocation: AllocationSettings, evaluation_source: str) -> None:
    suggestion = allocation.suggested_search_text(evaluation_source)
    if suggestion is not None:
        print(f"hint: the search is scored on the calibration text; --search-text {suggestion} (held out from the "
              f"evaluation text {evaluation_source}) scores it on the domain it is judged on: better in most "
              "cells measured (README, 'Allocation search')", file=sys.stderr)


def _print_search(alloc: Allocation, file: str | None = None) -> None:
    """The account of the search that made `alloc`: run now, or read from the allocation `file`."""
    if alloc.method == "auto" and "history" in alloc.params:
        if file is not None:
            print(f"the search that made {file} (stored in it, not run again):")
        print("\n".join(describe(alloc.params)))


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
        _refuse_search_text(args.search_text)
    _refuse_unread(args, [args.method])
    for flag_readers, flags in ((("custom",), ("--points", "--as-drawn")), (("auto",), ("--pruner",)),
                                (("owl", "auto"), ("--calib", "--nsamples", "--seqlen", "--seed", "--encoding"))):
        if args.method not in flag_readers:
            _refuse_unused(_typed(args, *flags), f"only {' and '.join(flag_readers)} "
                           f"{'uses' if len(flag_readers) == 1 else 'use'} it, and the allocation is {args.method}")
    if args.as_drawn and args.sparsity is not None:
        raise UsageError(f"--sparsity: --as-drawn keeps the curve's own budget, so --sparsity {args.sparsity:g} "
                         "would be ignored; drop one of them")
    settings = _allocation(args, args.method, args.sparsity, points=points, as_drawn=args.as_drawn).check()
    if args.search_text is not None and names_test_split(args.search_text):
        valid = held_out_split(args.search_text) or "its validation split"
        print(f"warning: --search-text {args.search_text} names a test split: a run evaluated on it would judge the "
              f"allocation on the text it was chosen on (the JSON records it, and prune and eval say so); score on "
              f"{valid} instead", file=sys.stderr)
    calibration = _calibration(args).check() if args.method in ("owl", "auto") else None
    _check_recipe_options(args)
    _checked_outputs(args, {"--out": args.out, "--recipe": args.recipe, "--npy": args.npy})

    def check(preview) -> None:
        if calibration is not None:
            calibration.check_model(preview)
        settings.check_model(preview, *([calibration.seqlen] if calibration else []))
        # the search scores candidates on calibration windows: their logits are within a calibration pass's size
        _warn_memory(RunSettings(model=_model_settings(args), calibration=calibration or CalibrationSettings()),
                     preview, "allocated", calibrates=calibration is not None, evaluates=False,
                     hessians=args.method == "auto" and gathers_gram(args.pruner))
    loaded = _load(_model_settings(args), check, tokenizer=calibration is not None)
    _warn_non_finite(loaded.model, "an allocation measured on it")
    if args.method in SPECTRA_METHODS or (args.method == "auto" and settings.search_from is None):
        # the search starts from AlphaPruning too (FARMS's pooled spectra: search_starts)
        metrics = dense_spectra(loaded.model, settings.spectra, progress=_print_progress)
    else:
        metrics = layer_table(loaded.model)
    calib = None
    if calibration is not None:
        calib = calibration_batch(loaded.tokenizer, calibration, bos=loaded.info.bos_per_window)
    if args.method == "custom" and args.as_drawn:
        settings = AllocationSettings(method="custom", points=points, as_drawn=True)
    bos = loaded.info.bos_per_window
    held_out, then = search_windows(loaded.tokenizer, settings, calibration, bos) if calibration else (None, None)
    alloc = build_allocation(settings, loaded.model, calib=calib, metrics=metrics, model_name=args.model,
                             prune_method=args.pruner, progress=_print_progress, fitness_windows=held_out,
                             then_windows=then)
    if calibration is not None:  # its whole text: prune and eval warn when they evaluate on that text
        alloc.params["calibration"] = calibration_params(calibration)
    _print_allocation(alloc, metrics, args.metric if args.method in SPECTRA_METHODS else None)
    _print_search(alloc)
    if args.out:
        print(f"wrote {alloc.save(args.out)}")
    _write_allocation_files(args, alloc, module_order(alloc.per_layer, loaded.model))
    return 0


def _add_allocate_parser(sub) -> None:
    p = _parser(sub, "allocate", "layerwise sparsity (uniform, alphapruning, farms, owl, custom, auto) to JSON")
    _add_model_args(p)
    p.add_argument("--allocation", "--method", dest="method", default=AllocationSettings.method,
                   choices=[*ALLOCATION_CHOICES, "auto"], metavar="ALLOCATION",
                   help=f"{', '.join([*ALLOCATION_CHOICES, 'auto'])} (default: {AllocationSettings.method}); auto: "
                        "search (analysis.search) with --pruner on the calibration text. --method: its older name")
    p.add_argument("--pruner", default=PruneSettings.method, choices=list(PRUNERS),
                   help="auto: the pruner the search prunes with (the one the allocation will be used with)")
    p.add_argument("--sparsity", type=float, default=None, help="target fraction of pruned weights, in [0, 0.99]")
    _add_allocation_args(p)
    p.add_argument("--points", default=None,
                   help="custom curve control points depth:sparsity, e.g. 0:0.5,0.5:0.7,1:0.8")
    p.add_argument("--as-drawn", action="store_true", help="custom: apply the curve as drawn, report its budget")
    _add_calib_args(p, "owl / auto calibration")
    p.add_argument("--out", default=None, help="write the allocation JSON here")
    _add_allocation_file_args(p)
    p.set_defaults(func=cmd_allocate)


# --------------------------------------------------------------------------------------------
# zero-shot accuracy


def _add_zeroshot_args(p: argparse.ArgumentParser, what: str) -> None:
    d = ZeroShotSettings()
    p.add_argument("--tasks", default=None, help=f"zero-shot accuracy {what} on these lm-eval tasks, comma-separated: "
                   f"'cloze' (local, embedded corpus) or hub tasks such as {','.join(PAPER_TASKS)}")
    p.add_argument("--limit", type=int, default=d.limit, help="zero-shot: only the first N documents of each task")


def _typed(args: argparse.Namespace, *flags: str) -> list[str]:
    """Those of `flags` the user gave (main records them in args.typed), not left at their defaults."""
    return [f for f in flags if f in getattr(args, "typed", ())]


def _refuse_unused(typed: list[str], reason: str) -> None:
    if typed:
        raise UsageError(f"{typed[0]}: {reason}, so {', '.join(typed)} would be ignored; drop "
                         f"{'it' if len(typed) == 1 else 'them'}")


def _zeroshot_settings(args: argparse.Namespace) -> ZeroShotSettings | None:
    """The zero-shot settings when --tasks is given, checked (task names and data) before any model loads."""
    if args.tasks is None:
        _refuse_unused(_typed(args, "--limit"), "no --tasks are given")
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
                               batch_size=settings.batch_size, bos=loaded.info.bos_per_window, progress=_print_progress)
    table = result.table().assign(value=lambda t: t["value"].round(4), stderr=lambda t: t["stderr"].round(4))
    print(f"zero-shot accuracy of the {label} model ({result.seconds:.0f} s):")
    print(table.to_string(index=False))
    return result


# --------------------------------------------------------------------------------------------
# prune / eval / runs


def _refuse_search_text(search_text: str) -> None:
    raise UsageError(f"--search-text: only the allocation search (auto) scores on a held-out text, so {search_text} "
                     "would be ignored; drop it or search")


# the options that make an allocation, which an allocation file has already made
FILE_IGNORES = ("--epsilon", "--metric", "--granularity", "--fit", "--owl-lambda", "--owl-threshold")
_SPECTRAL = ("alphapruning", "farms", "auto")  # auto starts from AlphaPruning, FARMS and OWL
READ_BY = {"--epsilon": _SPECTRAL, "--epsilons": _SPECTRAL, "--metric": _SPECTRAL, "--granularity": _SPECTRAL,
           "--fit": _SPECTRAL, "--owl-lambda": ("owl", "auto"), "--owl-lambdas": ("owl", "auto"),
           "--owl-threshold": ("owl", "auto")} | {
    flag: ("auto",) for field, flag in FLAGS.items() if field.startswith("allocation.search_")}


def _refuse_unread(args: argparse.Namespace, allocations: list[str]) -> None:
    """UsageError for an allocation option (when typed: args.typed) that none of `allocations` reads."""
    for flag, readers in READ_BY.items():
        if _typed(args, flag) and not set(readers) & set(allocations):
            who = readers[0] if len(readers) == 1 else f"{', '.join(readers[:-1])} and {readers[-1]}"
            uses = "uses" if len(readers) == 1 else "use"
            _refuse_unused([flag], f"only {who} {uses} it, and the allocation is {' or '.join(allocations)}")


def _refuse_ignored(args: argparse.Namespace) -> None:
    """UsageError for a --sparsity, --allocation (both None when left out), --search-text, an option of
    FILE_IGNORES with an allocation file, or one the allocation does not read (READ_BY; when typed:
    args.typed) that the run would ignore."""
    if args.nm:
        for flag, given in (("--allocation", args.allocation), ("--sparsity", args.sparsity)):
            if given is not None:
                raise UsageError(f"{flag}: an N:M pattern ({args.nm}) prunes every matrix to (M-N)/M, so no allocation "
                                 f"or sparsity applies; drop {flag} or --nm")
        _refuse_unused(_typed(args, *READ_BY), f"an N:M pattern ({args.nm}) makes no allocation")
    elif args.search_text is not None and args.allocation != "auto":
        _refuse_search_text(args.search_text)
    elif args.allocation and Path(args.allocation).expanduser().is_file():
        _refuse_unused(_typed(args, *FILE_IGNORES), f"{args.allocation} is an allocation with its own ratios")
        alloc = _readable_allocation(args.allocation)
        if args.sparsity is None or alloc is None:
            return
        if not math.isclose(own := alloc.sparsity, args.sparsity, abs_tol=1e-9):
            raise UsageError(f"--sparsity: {args.allocation} is an allocation at sparsity {own:g}, which it keeps; "
                             f"drop --sparsity {args.sparsity:g}")
    else:
        _refuse_unread(args, [args.allocation or AllocationSettings.method])


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
    settings = RunSettings(model=_model_settings(args),
                           allocation=_allocation(args, method, sparsity, file=file),
                           prune=PruneSettings(args.method, nm, args.rowwise), calibration=_calibration(args),
                           evaluation=_evaluation(args))
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
    _refuse_unused(sorted(_typed(args, *settings_flags)), "--rerun takes the run's settings from its record")
    try:  # a setting of the record, not an option, is what is wrong: no flag names it
        settings = RunSettings.from_dict(stored)
        given = _model_settings(args)
        model = replace(settings.model, trust_remote_code=given.trust_remote_code)
        if _typed(args, "--device", "--device-map"):
            model = replace(model, device=given.device)
        if _typed(args, "--dtype"):
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


def _warn_non_finite(model, what: str) -> None:
    if not offloaded(model) and (name := non_finite(model)) is not None:  # (weights on disk are not read for it)
        print(f"warning: '{name}' has non-finite weights (NaN or inf): {what} will mean nothing (the spectra command "
              "lists such matrices)", file=sys.stderr)


def _warn_memory(settings: RunSettings, preview, task: str = "pruned", calibrates: bool = True,
                 evaluates: bool = True, hessians: bool = True, snapshot: bool = False, copies: int = 1) -> None:
    """Say before the weights load when the run's estimated memory (loading.memory_estimate) exceeds what is free:
    a warning, not a refusal, as the estimate is an upper bound (placed by accelerate: not estimated). A command
    prunes the model it loaded, so it keeps no original values unless `snapshot` (a sweep restores its dense
    weights before each run); what it does not do (calibrate, evaluate, gather Hessians) is left out. `copies`:
    processes on this machine that each load the model (a sweep's local Ray workers on the CPU)."""
    if settings.model.device == DEVICE_MAP_AUTO:
        return
    device = pick_device(settings.model.device)
    eval_batch = (settings.evaluation.batch_size or default_batch_size(device)) if evaluates else 0
    est = memory_estimate(preview.skeleton(), pick_dtype(settings.model.dtype, device),
                          settings.calibration.n_samples if calibrates else 0, settings.calibration.seqlen, eval_batch,
                          settings.evaluation.seqlen)
    est = replace(est, prunable=est.prunable if snapshot else 0, hessians=est.hessians if hessians else 0)
    title = f"'{settings.model.source}'"
    if copies > 1:
        est = replace(est, **{f: getattr(est, f) * copies
                              for f in ("weights", "prunable", "calibration", "logits", "hessians")})
        title += f" ({copies} workers, each with its own copy)"
    if problem := est.problem(device, title, task):
        print(f"warning: {problem}", file=sys.stderr)


def cmd_prune(args: argparse.Namespace) -> int:
    settings, recorded = _rerun_settings(args) if args.rerun else (_run_settings(args), None)
    if args.save_model:  # before the prune: a destination problem must not cost a run
        _checked_model_folder(args)
    else:
        _refuse_unused(_typed(args, "--save-format", "--overwrite"), "--save-model is not given")
    zeroshot = _zeroshot_settings(args)
    _checked_outputs(args, {"--out": args.out})
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
        _warn_memory(settings, preview, calibrates=settings.needs_calibration(),
                     hessians=gathers_gram(settings.prune.method, settings.prune.rowwise))
        if args.save_model and args.save_format == "dense-ct" and any(
                r.expert is not None for r in prunable_layers(preview.skeleton())):
            raise UsageError("--save-format: dense-ct cannot carry fused MoE experts (transformers does not load them "
                             "under compressed-tensors metadata); save as dense or compressed")
        # the last check: a store that cannot be opened is refused before the weights load, and a bad input above
        # creates no store
        store = RunStore(args.db).check_writable()

    loaded = _load(settings.model, check)
    calibrates = f"calibration {settings.calibration.n_samples} x {settings.calibration.seqlen} tokens from " \
        f"{settings.calibration.source}; " if settings.needs_calibration() else "no calibration text read; "
    print(f"{calibrates}evaluation on {settings.evaluation.source}", file=sys.stderr)
    _hint_search_text(settings.allocation, settings.evaluation.source)
    result = run(loaded, settings, progress=_print_progress, on_ppl=_print_ppl, origin="cli",
                 on_caveat=lambda caveat: print(f"warning: {caveat}", file=sys.stderr))
    record, report = result.record, result.report
    for warning in prune_warnings(report):
        print(f"warning: {warning}", file=sys.stderr)
    _print_search(result.allocation, settings.allocation.file if settings.allocation.method == "file" else None)
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
                          args.overwrite)
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
    calibration, evaluation = _calibration(args).check(), _evaluation(args)
    if zeroshot is None:  # zero-shot tasks bring their own text
        evaluation.check()
    else:
        _refuse_unused(_typed(args, "--eval-seqlen", "--max-windows", "--batch-size"),
                       "eval --tasks scores the zero-shot tasks instead of perplexity (measure it in a run of its own)")
    alloc = _allocation_file(args.allocation) if args.allocation else None
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
        _warn_memory(RunSettings(model=_model_settings(args), calibration=calibration, evaluation=evaluation), preview,
                     "pruned and evaluated" if alloc is not None else "evaluated", calibrates=calibrates,
                     hessians=calibrates)
    loaded = _load(_model_settings(args), check)
    if alloc is None:  # (a prune refuses them)
        _warn_non_finite(loaded.model, "its perplexity or scores")
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
                       progress=_print_progress)
        print(f"pruned with {args.method} + {alloc.method}{', ' + nm if nm else ''}: {report.overall:.4f} sparsity",
              file=sys.stderr)
    # a model saved pruned (--save-model) is not "dense"; weights placed by accelerate are not read for zeros
    label = "pruned" if alloc else "dense" if loaded.info.device_map or zero_fraction(loaded.model) <= PRIOR_ZEROS \
        else "sparse"
    if zeroshot is not None:
        _zeroshot(loaded, zeroshot, label)
        return 0
    ppl = perplexity(loaded.model, windows, on_update=lambda u: _print_ppl(label, u), batch_size=evaluation.batch_size)
    print(f"perplexity {ppl:.4f} on {evaluation.source} ({windows.shape[0]} windows of {windows.shape[1]} tokens)")
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


def _add_prune_parsers(sub) -> None:
    p = _parser(sub, "prune", "allocate, prune, evaluate; writes a run record")
    _add_model_args(p)
    p.add_argument("--pruner", "--method", dest="method", default=PruneSettings.method, choices=list(PRUNERS),
                   metavar="PRUNER", help=PRUNER_HELP)
    p.add_argument("--allocation", default=None,
                   help=f"{', '.join(NAMED_ALLOCATIONS)}, or an allocation JSON file (default: "
                        f"{AllocationSettings.method}; none with --nm)")
    p.add_argument("--sparsity", type=float, default=None,
                   help=f"target fraction of pruned weights, in (0, 0.99] (default: {AllocationSettings.sparsity:g}; "
                        "none with --nm or an allocation file, which keeps its own)")
    _add_allocation_args(p)
    p.add_argument("--nm", default=PruneSettings.nm,
                   help="N:M semi-structured sparsity, e.g. 2:4: every matrix (M-N)/M sparse, so no --allocation or "
                        "--sparsity with it (an allocation file made for a pattern brings its own)")
    p.add_argument("--rowwise", default=PruneSettings.rowwise, choices=list(ROWWISE),
                   help="row-wise sparsity inside each matrix: trim (TRIM, Beck et al. 2025)")
    _add_calib_args(p)
    _add_eval_args(p, "--eval")
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

    p = _parser(sub, "eval", "perplexity of a model, optionally pruned with an allocation JSON")
    _add_model_args(p)
    p.add_argument("--allocation", default=None, help="allocation JSON file to prune with first")
    p.add_argument("--pruner", "--method", dest="method", default=PruneSettings.method, choices=list(PRUNERS),
                   metavar="PRUNER", help=PRUNER_HELP + "; used with --allocation")
    _add_calib_args(p)
    _add_eval_args(p, "--text", "--eval")  # --eval as prune and sweep name it
    _add_zeroshot_args(p, "instead of perplexity")
    p.set_defaults(func=cmd_eval)

    p = _parser(sub, "runs", "list recorded pruning runs")
    p.add_argument("--db", default=None, help="SQLite run store (default: the cache folder's runs.sqlite)")
    p.add_argument("--show", type=int, default=None, help="print the full record of this run id")
    p.add_argument("--delete", default=None, metavar="IDS",
                   help="delete these runs, e.g. 3,5-7 (all or none; a resumed sweep runs a deleted one again)")
    p.set_defaults(func=cmd_runs)


# --------------------------------------------------------------------------------------------
# sweep


def _sweep_grid(args: argparse.Namespace) -> SweepGrid:
    base = RunSettings(model=_model_settings(args),
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
                       evaluation=_evaluation(args))
    return grid_from_text(base, methods=args.methods, allocations=args.allocations, sparsities=args.sparsities,
                          epsilons=args.epsilons, owl_lambdas=args.owl_lambdas, seeds=args.seeds,
                          curves=tuple(args.curve or ()), rowwise=args.rowwise)


def cmd_sweep(args: argparse.Namespace) -> int:
    grid = _sweep_grid(args)
    _refuse_unread(args, list(dict.fromkeys([a if a in NAMED_ALLOCATIONS else "a file" for a in grid.allocations]
                                            + (["custom"] if grid.curves else []))))
    grid.check()  # before the first line below
    as_json = _checked_table_out(args)
    check_workers(args.workers, args.cpus_per_worker)
    check_address(args.address)
    configs = grid.expand()
    if args.address is None:  # (a cluster's machines are not this one) one error line before anything is written
        check_models(configs)
    searched = next((c for c in configs if c.allocation.method == "auto"), None)
    if searched is not None:
        _hint_search_text(searched.allocation, searched.evaluation.source)
    store = RunStore(args.db).check_writable()
    where = f"Ray at {args.address}" if args.address else (
        f"local Ray, {args.workers} workers" if args.workers > 1 else "this process")
    print(f"sweep: {len(configs)} configuration(s) on {where}; runs go to {store.path}", file=sys.stderr)
    if args.address is None:  # a cluster's machines are not this one
        first = configs[0]
        _warn_memory(first, preview_model(first.model.source, first.model.trust_remote_code), snapshot=True,
                     calibrates=any(c.needs_calibration() for c in configs),
                     hessians=any(gathers_gram(c.prune.method, c.prune.rowwise) for c in configs),
                     copies=args.workers if args.workers > 1 and pick_device(first.model.device).type == "cpu" else 1)
    outcomes = run_sweep(grid, store, workers=args.workers, address=args.address,
                         cpus_per_worker=args.cpus_per_worker, progress=_print_progress)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print((table := outcome_table(outcomes)).to_string(index=False))
    if args.out:
        _write_table(table, args.out, as_json)
        print(f"wrote {args.out}", file=sys.stderr)
    failed = sum(o.status == FAILED for o in outcomes)
    if failed:
        print(f"error: {failed} configuration(s) failed after a retry (see the error column); run the same "
              "command again to retry only those", file=sys.stderr)
        return 1
    return 0


def _add_sweep_parser(sub) -> None:
    p = _parser(sub, "sweep", "prune runs over a grid (pruners x row-wise x allocations x sparsities x epsilons "
                              "x seeds)")
    _add_model_args(p)
    p.add_argument("--pruners", "--methods", dest="methods", default=PruneSettings.method, metavar="PRUNERS",
                   help=f"comma-separated: {', '.join(PRUNERS)} (--methods: its older name)")
    p.add_argument("--allocations", default=AllocationSettings.method,
                   help=f"comma-separated: {', '.join(NAMED_ALLOCATIONS)} or allocation JSON files "
                        "(auto: the allocation search, with the seed of each calibration sample)")
    p.add_argument("--curve", action="append", default=None,
                   help="a custom curve's control points, e.g. 0:0.5,0.5:0.7,1:0.8 (repeat for more curves)")
    p.add_argument("--sparsities", default=f"{AllocationSettings.sparsity:g}",
                   help="target sparsities in (0, 0.99], e.g. 0.5,0.6,0.7")
    _add_allocation_args(p, axes=True)
    p.add_argument("--rowwise", default="none",
                   help=f"row-wise sparsity inside each matrix, comma-separated: none, {', '.join(ROWWISE)} "
                        "(none,trim runs every configuration both ways)")
    p.add_argument("--seeds", default=str(CalibrationSettings.seed), help="calibration seeds, e.g. 0,1,2")
    _add_calib_args(p, seed=False)
    _add_eval_args(p, "--eval")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel workers; more than 1 runs each configuration as a task on a local Ray")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPU cores of each Ray task (without a GPU)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (ray://host:port or host:port)")
    p.add_argument("--db", default=None, help="SQLite run store (default: the cache folder's runs.sqlite)")
    p.add_argument("--out", default=None, help="also write the final table here (.csv, or .json)")
    p.set_defaults(func=cmd_sweep)


# --------------------------------------------------------------------------------------------
# spectra


def _tqdm_progress(total_label: str):
    """A progress callback drawing one tqdm bar (on stderr) from (message, fraction) calls; the bar
    appears with the first call, so an error before it is a line of its own."""
    bar = None

    def update(message: str, fraction: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=100, desc=total_label, file=sys.stderr, bar_format="{percentage:3.0f}%|{bar:20}| {desc}")
        bar.set_description_str(message, refresh=False)
        bar.update(round(100 * fraction) - bar.n)
        if fraction >= 1.0:
            bar.close()
    return update


def _block_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean alpha per block and group (attn, mlp, ...), plus the block's mean over all its matrices, of the
    prunable matrices (an MoE router is listed in the table, not counted here: the means are those an
    allocation reads), and of the matrices outside the blocks when they are listed."""
    m = metrics[metrics["prunable"] | (metrics["block"] < 0)]
    m = m.assign(where=m["block"].map(lambda b: "outside" if b < 0 else b))
    table = m.pivot_table(index="where", columns="group", values="alpha", aggfunc="mean", sort=False)
    table["all"] = m.groupby("where", sort=False)["alpha"].mean()
    table.insert(0, "matrices", m.groupby("where", sort=False).size())
    table.index.name = "block"
    table.columns.name = None
    return table.round(3)


def _checked_table_out(args: argparse.Namespace) -> bool:
    """Check --out (a table: CSV, or JSON records); whether it names a JSON file."""
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".json", ".txt", ""):
        raise UsageError(f"--out: {args.out}: {args.command} writes CSV or JSON; name the file .csv or .json")
    _checked_outputs(args, {"--out": args.out})
    if getattr(args, "json", False) and (args.out or "").lower().endswith(".csv"):
        raise UsageError(f"--json: --out {args.out} names a CSV file; name it .json, or drop --json")
    return (args.out or "").lower().endswith(".json")


def _write_table(table: pd.DataFrame, out: str | None, as_json: bool) -> None:
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


def cmd_spectra(args: argparse.Namespace) -> int:
    settings = SpectraSettings(args.fit, args.farms, args.normalize, args.include_outside).check()
    try:
        check_fit(settings.fit, args.min_tail)
    except FitError as e:
        raise UsageError(f"--min-tail: {e}") from None
    if settings.fit != "scan":
        _refuse_unused(_typed(args, "--min-tail"), f"only the scan fit reads it, and the fit is {settings.fit}")
    as_json = _checked_table_out(args) or args.json  # (checked with --json too)
    model = _model_settings(args).check()
    folder = _checkpoint_folder(model)  # checked (headers only) before the progress bar appears
    kwargs = dict(fit=settings.fit, farms=settings.farms, normalize=settings.normalize,
                  include_outside=settings.include_outside, min_tail=args.min_tail, progress=_tqdm_progress("spectra"))
    result = None
    if folder is not None:  # streamed from the shards, no model load; cached by the checkpoint's content
        try:
            result = analyze_checkpoint(folder, device=model.device, **kwargs)
            title = resolve_source(model.source)[1]
            if unused := _typed(args, "--dtype", "--device-map"):
                print(f"note: {', '.join(unused)} unused: the checkpoint was streamed from its shards in their stored "
                      "dtype, not loaded", file=sys.stderr)
        except NotStreamable:
            pass
    if result is None:
        loaded = _load(model, tokenizer=False)
        result, title = analyze(loaded.model, **kwargs), loaded.info.title
    metrics = result.metrics
    report = sys.stdout if args.out else sys.stderr  # keep stdout clean when the table goes there
    _write_table(metrics, args.out, as_json)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(_block_summary(metrics).to_string(), file=report)
    for status, names in metrics[metrics["status"] != "ok"].groupby("status")["name"]:  # one line per status
        names = names.tolist()
        print(f"warning: {names[0]}: {status}" if len(names) == 1 else
              f"warning: {len(names)} matrices: {status} (e.g. {names[0]}; the status column names them)",
              file=sys.stderr)
    read = alpha_summary(result)  # the Spectra page's reading, of the prunable matrices fitted
    low, high = ALPHA_BANDS
    print(f"{len(metrics)} matrices of {title}, fit={settings.fit}{', FARMS' if settings.farms else ''}: "
          f"median alpha {metrics['alpha'].median():.3f}; of {read['fitted']} prunable fitted, {read['inside']} in "
          f"[{low:g}, {high:g}] and {read['with_tail']} with a tail beyond MP"
          + (" (from the cache)" if result.cached else "")
          + (f"; wrote {args.out}" if args.out else ""), file=report)
    return 0


def _checkpoint_folder(model: ModelSettings) -> Path | None:
    """The safetensors folder to stream the spectra from (a packaged model's converted folder, a local
    folder, a Hugging Face id's snapshot in the local cache), or None: then the model is loaded.
    Models that need their repository's code are always loaded."""
    if model.trust_remote_code:
        return None
    folder = checkpoint_path(model.source)
    if folder is None or not has_safetensors(folder):
        return None
    open_checkpoint(folder)  # a bad shard: one line (CheckpointError) before any work
    return folder


def _add_spectra_parser(sub) -> None:
    d = SpectraSettings()
    p = _parser(sub, "spectra", "ESD heavy-tail metrics (alpha, ...) of every weight matrix to CSV/JSON; a safetensors "
                "checkpoint is streamed matrix by matrix (no model load, --dtype unused) and cached")
    _add_model_args(p)
    p.add_argument("--out", default=None, help="output file (.csv, or .json); default: CSV on stdout")
    p.add_argument("--fit", default=d.fit, help=f"power-law xmin rule: {', '.join(XMIN_RULES)}")
    p.add_argument("--farms", action="store_true", help="fit the pooled ESD of square sliding windows (FARMS)")
    p.add_argument("--normalize", action="store_true",
                   help="divide eigenvalues by N = max(rows, cols), the long side (as weightwatcher; with --farms "
                        "the pooled ESD by its windows' side)")
    p.add_argument("--min-tail", type=int, default=MIN_TAIL,
                   help=f"smallest tail the scan fit may choose (default {MIN_TAIL}; 2 is weightwatcher's)")
    p.add_argument("--include-outside", action="store_true", help="also the embedding and lm_head (not prunable)")
    p.add_argument("--json", action="store_true", help="write JSON records instead of CSV")
    p.set_defaults(func=cmd_spectra)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m analysis", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = _parser(sub, "models", "list packaged models (and convert them with --convert)")
    p.add_argument("--convert", action="store_true", help="dequantize the packaged GGUF files into the cache now")
    p.set_defaults(func=cmd_models)
    _add_allocate_parser(sub)
    _add_export_parser(sub)
    _add_prune_parsers(sub)
    _add_spectra_parser(sub)
    _add_sweep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    typed = sys.argv[1:] if argv is None else [str(a) for a in argv]
    given = {a.split("=")[0] for a in typed if a.startswith("--")}
    old = OLD_NAMES.get(args.command, {})
    if both := [f"{new} and {name}" for name, new in (old | OTHER_NAMES.get(args.command, {})).items()
                if {name, new} <= given]:
        print(f"error: {both[0]} name the same option: give one of them", file=sys.stderr)
        return 2
    args.typed = {old.get(f, f) for f in given}  # the options given (by their new names), not defaulted
    try:
        return args.func(args)
    except SettingsError as e:
        flag = (SWEEP_FLAGS if args.command == "sweep" else {}).get(e.field) or FLAGS.get(e.field)
        if flag == "--eval" and args.command == "eval" and "--eval" not in args.typed:
            flag = "--text"  # eval's own name for it, unless the user typed prune's
        print(f"error: {flag + ': ' if flag else ''}{e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped reading (`runs --show 3 | head`): not an error of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # what a shell reports for a writer ended by SIGPIPE
    # SettingsError, AllocationError, DataError, UsageError are ValueErrors; OSError: e.g. a path too long
    except (ModelLoadError, StoreError, ValueError, OSError) as e:
        # the option that picks it
        flag = "--db: " if isinstance(e, StoreError) and hasattr(args, "db") else \
            "--model: " if isinstance(e, ModelLoadError) and hasattr(args, "model") else ""
        print(f"error: {flag}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
